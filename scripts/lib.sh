# Shared by scripts/run.sh and scripts/test.sh (sourced): set up .venv with the extra named
# in $EXTRA, installing what a fresh Debian machine lacks.

die() {
    echo "error: $*" >&2
    exit 1
}

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "root is needed to run: $*"
    fi
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null || die "$* missing and apt-get not available: install it by hand"
    if [[ $APT_UPDATED -eq 0 ]]; then
        echo "setup: apt-get update"
        as_root apt-get update -qq
        APT_UPDATED=1
    fi
    echo "setup: apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

find_python() {
    local py
    for py in ${PYTHON:-} python3.11 python3.12 python3.13 python3; do
        if command -v "$py" >/dev/null &&
            "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"
            return
        fi
    done
    die "Python >= 3.11 not found (set PYTHON=/path/to/python3.11)"
}

# Create .venv and install the extra; skipped while the stamp is newer than pyproject.toml.
ensure_venv() {
    local stamp=".venv/.flowbridge-$EXTRA.stamp" py
    if [[ ! -x .venv/bin/python ]]; then
        py="$(find_python)"
        echo "setup: creating .venv with $py"
        if ! "$py" -m venv .venv 2>/dev/null; then
            # Debian ships venv's ensurepip in a separate package.
            rm -rf .venv
            apt_install "python$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
            "$py" -m venv .venv
        fi
    fi
    if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
        echo "setup: pip install -e '.[$EXTRA]'"
        .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$EXTRA]"
        touch "$stamp"
    fi
}
