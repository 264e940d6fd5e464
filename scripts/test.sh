#!/usr/bin/env bash
# Set up .venv, make sure the test brokers are reachable (starting missing local ones), then run
# ruff, mypy and pytest.  Extra arguments go to pytest:  scripts/test.sh tests/unit -x -q
#
# Broker addresses come from FLOWBRIDGE_TEST_NATS_URL / _MQTT_URL / _AMQP_URL (defaults in
# tests/support/brokers.py).  A broker that is not reachable at a loopback address is started
# here and left running for the next run; one at another address is reported, never started.
# Kafka: the test session starts Tansu itself unless FLOWBRIDGE_TEST_KAFKA_URL is set.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STATE="$ROOT/.flowbridge/brokers"  # logs, configs and stores of brokers started here
EXTRA=test

# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

# "host port reachable(0|1) loopback(0|1)" for a broker, from the tests' own settings.
probe() {
    .venv/bin/python - "$1" "$2" <<'EOF'
import ipaddress
import socket
import sys

from tests.support import brokers

name, default_port = sys.argv[1], int(sys.argv[2])
host, port = brokers.host_port(getattr(brokers, f"{name.upper()}_URL"), default_port)
try:
    addrs = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    loopback = all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)
except (OSError, ValueError):
    loopback = False
print(host, port, int(brokers.reachable(host, port)), int(loopback))
EOF
}

reachable() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

wait_reachable() {  # host port seconds what logfile
    local deadline=$((SECONDS + $3))
    until reachable "$1" "$2"; do
        if ((SECONDS >= deadline)); then
            [[ -f ${5:-} ]] && tail -n 20 "$5" >&2
            die "$4 did not start listening on $1:$2 within $3s"
        fi
        sleep 0.2
    done
}

start_nats() {  # host port
    local dir="$STATE/nats-$2"
    mkdir -p "$dir"
    setsid nohup .venv/bin/nats-server -a "$1" -p "$2" -js -sd "$dir/jetstream" \
        >"$dir/nats-server.log" 2>&1 </dev/null &
    echo $! >"$dir/pid"
    wait_reachable "$1" "$2" 15 nats-server "$dir/nats-server.log"
    echo "nats: started nats-server on $1:$2 (pid $(cat "$dir/pid"), log $dir/nats-server.log)"
}

start_mosquitto() {  # host port
    local exe
    exe="$(command -v mosquitto || true)"
    [[ -z $exe && -x /usr/sbin/mosquitto ]] && exe=/usr/sbin/mosquitto
    if [[ -z $exe ]]; then
        apt_install mosquitto
        exe="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
        # The package may have started its own service on the port.
        if reachable "$1" "$2"; then
            echo "mqtt: started by the mosquitto package on $1:$2"
            return
        fi
    fi
    mkdir -p "$STATE"
    printf 'listener %s %s\nallow_anonymous true\n' "$2" "$1" >"$STATE/mosquitto-$2.conf"
    "$exe" -d -c "$STATE/mosquitto-$2.conf"
    wait_reachable "$1" "$2" 10 mosquitto
    echo "mqtt: started mosquitto on $1:$2 (config $STATE/mosquitto-$2.conf)"
}

start_rabbitmq() {  # host port
    local server=rabbitmq-server ctl=rabbitmqctl
    [[ -x /usr/sbin/rabbitmq-server ]] && server=/usr/sbin/rabbitmq-server
    [[ -x /usr/sbin/rabbitmqctl ]] && ctl=/usr/sbin/rabbitmqctl
    if ! command -v "$server" >/dev/null; then
        apt_install rabbitmq-server
        server=/usr/sbin/rabbitmq-server ctl=/usr/sbin/rabbitmqctl
        if reachable "$1" "$2"; then
            echo "amqp: started by the rabbitmq-server package on $1:$2"
            return
        fi
    fi
    as_root env RABBITMQ_NODE_IP_ADDRESS="$1" RABBITMQ_NODE_PORT="$2" "$server" -detached
    # await_startup fails at once while the detached node has not registered yet: retry.
    local deadline=$((SECONDS + 120))
    until as_root timeout 60 "$ctl" await_startup --timeout 50 >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            die "rabbitmq-server did not finish starting within 120s (see /var/log/rabbitmq/)"
        fi
        sleep 1
    done
    wait_reachable "$1" "$2" 10 rabbitmq-server
    echo "amqp: started rabbitmq-server on $1:$2"
}

ensure_broker() {  # name default_port env_var
    local host port up loopback out
    out="$(probe "$1" "$2")"
    read -r host port up loopback <<<"$out"
    if [[ $up -eq 1 ]]; then
        echo "$1: reused $host:$port"
    elif [[ $loopback -eq 1 ]]; then
        "start_$4" "$host" "$port"
    else
        die "$1: nothing listening at $host:$port ($3) and it is not a local address to start it on"
    fi
}

ensure_venv
ensure_broker nats 4222 FLOWBRIDGE_TEST_NATS_URL nats
ensure_broker mqtt 1883 FLOWBRIDGE_TEST_MQTT_URL mosquitto
ensure_broker amqp 5672 FLOWBRIDGE_TEST_AMQP_URL rabbitmq
if [[ -n ${FLOWBRIDGE_TEST_KAFKA_URL:-} ]]; then
    out="$(probe kafka 9092)"
    read -r host port up _ <<<"$out"
    [[ $up -eq 1 ]] || die "kafka: nothing listening at $host:$port (FLOWBRIDGE_TEST_KAFKA_URL)"
    echo "kafka: reused $host:$port"
else
    echo "kafka: Tansu is started by the test session (set FLOWBRIDGE_TEST_KAFKA_URL to reuse one)"
fi

echo "check: ruff check"
.venv/bin/ruff check .
echo "check: ruff format --check"
.venv/bin/ruff format --check .
echo "check: mypy"
.venv/bin/mypy

status=0
.venv/bin/python -m pytest "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "error: pytest collected no tests" >&2
fi
exit "$status"
