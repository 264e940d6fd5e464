"""Command line: ``flowbridge run | check | translate``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import TextIO

from flowbridge import __version__
from flowbridge.errors import ConfigError, TopicError
from flowbridge.topics import (
    PROTOCOLS,
    encode_topic,
    parse_filter,
    translate_filter,
    translate_topic,
)

EXIT_OK = 0
EXIT_ERROR = 2  # invalid input: mapping problems, names that cannot be translated

_MAIN_EPILOG = """\
examples:
  flowbridge check -c mappings/mqtt-nats.yaml
  flowbridge run -c mappings/mqtt-nats.yaml --http 127.0.0.1:8080
  flowbridge translate --from mqtt --to nats 'sensors/+/temperature'

Run 'flowbridge COMMAND --help' for the options of a command.
"""

_CHECK_EPILOG = """\
Validates the mapping files (several merge into one configuration) and prints, per route,
the source subscription(s), the delivery mode and what a sample topic becomes on each
target.  Exit status 0 when valid, 2 with one 'FILE:LINE: key.path: problem' line per
problem on stderr otherwise.

examples:
  flowbridge check -c mappings/mqtt-nats.yaml
  EDGE_URL=mqtt://10.0.0.5:1883 flowbridge check -c brokers.yaml -c routes.yaml
"""

_TRANSLATE_EPILOG = """\
A name with wildcards for its protocol is read as a filter and may need several native
subscriptions in the target (one line each).  Exit status 2 when any name is invalid.

examples:
  flowbridge translate --from mqtt --to nats 'foo.bar/baz'     ->  foo//bar.baz
  flowbridge translate --from mqtt --to nats 'foo.bar/#'       ->  foo//bar  and  foo//bar.>
  flowbridge translate --from nats --to kafka --filter 'orders.*'
"""

_RUN_EPILOG = """\
Ctrl-C or SIGTERM stops it gracefully.

examples:
  flowbridge run                     # embedded NATS + MQTT, every topic both ways
  flowbridge run -c mappings/mqtt-nats.yaml
  flowbridge run -c brokers.yaml -c routes.yaml --log-format json --http 127.0.0.1:8080
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowbridge",
        description="Bridge messages between NATS, MQTT, AMQP 0-9-1 and Kafka, with one "
        "topic model across them.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"flowbridge {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run the bridge",
        description="Connect to every broker of the mapping files and run their routes.",
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="mapping file (YAML); repeat to merge several.  Without -c: start an embedded "
        "NATS server and MQTT broker and bridge every topic between them",
    )
    run.add_argument(
        "--nats-port", type=_port, metavar="PORT", help="port of the embedded NATS server"
    )
    run.add_argument(
        "--mqtt-port", type=_port, metavar="PORT", help="port of the embedded MQTT broker"
    )
    run.add_argument(
        "--watch",
        action="store_true",
        help="reload the mapping files when they change (SIGHUP always reloads)",
    )
    run.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve health and metrics over HTTP on this address (e.g. 127.0.0.1:8080)",
    )
    run.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="(default: %(default)s)",
    )
    run.add_argument(
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="json: one object per line (default: %(default)s)",
    )

    check = commands.add_parser(
        "check",
        help="validate mapping files and print the route table",
        description="Validate mapping files without connecting to any broker.",
        epilog=_CHECK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument(
        "-c",
        "--config",
        action="append",
        required=True,
        metavar="FILE",
        help="mapping file (YAML); repeat to merge several",
    )

    translate = commands.add_parser(
        "translate",
        help="show a topic or filter in another protocol's syntax",
        description="Translate topic names or subscription filters between protocols.",
        epilog=_TRANSLATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    translate.add_argument(
        "--from", dest="source", required=True, choices=PROTOCOLS, help="protocol of NAME"
    )
    translate.add_argument(
        "--to", dest="target", required=True, choices=PROTOCOLS, help="protocol to write"
    )
    translate.add_argument(
        "--filter", action="store_true", help="read every NAME as a subscription filter"
    )
    translate.add_argument("names", nargs="+", metavar="NAME", help="topic or filter")
    return parser


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port out of range 1-65535: {port}")
    return port


def _translate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    status = EXIT_OK
    for name in args.names:
        try:
            as_filter = args.filter
            if not as_filter:
                try:
                    as_filter = not parse_filter(name, args.source).is_literal
                except TopicError:
                    as_filter = False  # not a valid filter: report it as the topic it claims to be
            if as_filter:
                results = translate_filter(name, args.source, args.target)
            else:
                results = [translate_topic(name, args.source, args.target)]
        except TopicError as exc:
            print(f"{name}: {exc.reason}", file=err)
            status = EXIT_ERROR
            continue
        for line in results:
            print(line, file=out)
    return status


def _check(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from flowbridge import config  # noqa: PLC0415 - adapters load only for the commands needing them
    from flowbridge.template import sample_topic  # noqa: PLC0415

    try:
        cfg = config.load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=err)
        n = len(exc.problems)
        print(f"{n} problem{'s' if n != 1 else ''} found", file=err)
        return EXIT_ERROR
    width = max((len(name) for name in cfg.brokers), default=0)
    print("brokers:", file=out)
    for broker in cfg.brokers.values():
        print(
            f"  {broker.name:<{width}}  {broker.protocol:<5}  {config.mask_url(broker.url)}",
            file=out,
        )
    print("routes:", file=out)
    for route in cfg.routes:
        src = route.source
        sample = sample_topic(src.filter)
        native = encode_topic(sample, src.protocol)
        print(
            f"  {route.name}  ({route.delivery}, max in flight {route.max_in_flight})  "
            f"[{route.origin}]",
            file=out,
        )
        subs = ", ".join(src.subscriptions)
        print(f"    from {src.broker} ({src.protocol}): {subs}", file=out)
        for target in route.targets:
            shown = target.template.render(sample)
            print(f"    to   {target.broker} ({target.protocol}): {native} -> {shown}", file=out)
        if route.dead_letter is not None:
            dl = route.dead_letter
            print(f"    dead letters -> {dl.broker}: {dl.topic}", file=out)
    n = len(cfg.routes)
    print(f"OK: {len(cfg.brokers)} brokers, {n} route{'s' if n != 1 else ''}", file=out)
    return EXIT_OK


def _run(args: argparse.Namespace, err: TextIO) -> int:
    engine = importlib.import_module("flowbridge.engine")
    try:
        return int(engine.run_cli(args) or 0)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=err)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out, err = sys.stdout, sys.stderr
    if args.command == "translate":
        return _translate(args, out, err)
    if args.command == "check":
        return _check(args, out, err)
    if args.command == "run":
        return _run(args, err)
    parser.print_help(err)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
