"""Run one mq-bridge route in its own process until SIGTERM:
``python -m benchmarks.peer ROUTE_JSON``.

mq-bridge (PyPI ``mq-bridge``) runs its routes on a Rust/Tokio core; its Python API deploys a
route from a dict (``Route.from_config``) with ``start()``/``stop()``.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import Any


def main() -> None:
    import mq_bridge  # noqa: PLC0415  (optional: only this process needs it)

    config: dict[str, Any] = json.loads(sys.argv[1])
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    route = mq_bridge.Route.from_config({"routes": {"bench": config}}, "bench")
    route.start()
    sys.stdout.write("STARTED\n")
    sys.stdout.flush()
    done.wait()
    route.stop()
    route.join()


if __name__ == "__main__":
    main()
