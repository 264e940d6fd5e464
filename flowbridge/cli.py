"""Command line: ``flowbridge run | check | translate | send | listen``."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

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

_SEND_EPILOG = """\
Items travel in the order given, as one msg_envelope_v1 message.  Each item under the size
threshold (default 500000 bytes, env SIZE_THRESHOLD) is carried inside the message; larger
ones are uploaded to the file server (env FILESERVER_URL, default http://localhost:8080;
'python -m flowbridge.fileserver' serves one for development) and sent as a link.
--file picks the payload type from the extension (image, audio, video, .arrow/.arrows
tables, otherwise binary).  Exit status 0 once the broker confirmed, 1 when it could not be
reached or refused, 2 for invalid input.

examples:
  flowbridge send nats://localhost:4222 chat.room1 --text 'Hello!'
  flowbridge send mqtt://localhost:1883 sensors/room1 --json '{"temp": 21.5}' --purpose updateStatus
  flowbridge send amqp://guest:guest@localhost/ chat.room1 --text hi --file photo.png
  flowbridge send kafka://localhost:9092 chat.room1 --file clip.mp4 --key room1
  flowbridge send mqtt://localhost:1883 a/b --text hi -o version=3.1.1
"""

_LISTEN_EPILOG = """\
FILTER uses the protocol's route filter syntax: NATS 'chat.*.>', MQTT 'chat/+/#', AMQP
binding keys 'chat.*.#', Kafka topic names with '+' and '#' for whole levels ('chat.+').
Text, dictionaries and JSON tables are printed; images, audio, video, binary payloads and
Arrow tables are saved under --save-dir.  Link payloads are downloaded only from the file
servers given (--fileserver, default env FILESERVER_URL).  Messages that are not valid
envelopes are reported on stderr and listening goes on.  Ctrl-C stops.

examples:
  flowbridge listen nats://localhost:4222 'chat.>'
  flowbridge listen mqtt://localhost:1883 'sensors/#' --save-dir received --count 10
  flowbridge listen amqp://guest:guest@localhost/ 'chat.#' --fileserver http://files:8080
  flowbridge listen kafka://localhost:9092 chat.room1 --timeout 30
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
    _add_send(commands)
    _add_listen(commands)
    return parser


def _broker_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", metavar="URL", help="broker URL: nats://, mqtt://, amqp://, kafka://")
    p.add_argument(
        "-o",
        "--option",
        dest="options",
        action="append",
        type=_broker_option,
        default=[],
        metavar="KEY=VALUE",
        help="broker option of the protocol, as in mapping files (e.g. version=3.1.1 for MQTT)",
    )


def _add_send(commands: Any) -> None:
    send = commands.add_parser(
        "send",
        help="publish a msg_envelope_v1 message",
        description="Publish text, JSON and files as one msg_envelope_v1 message to any broker.",
        epilog=_SEND_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(send)
    send.add_argument("topic", metavar="TOPIC", help="topic in the broker's protocol")
    items = send.add_argument_group("items (at least one; repeat to send several)")
    items.add_argument(
        "--text", dest="items", action="append", type=lambda v: ("text", v), metavar="TEXT"
    )
    items.add_argument(
        "--json",
        dest="items",
        action="append",
        type=lambda v: ("json", v),
        metavar="JSON",
        help="an object (dictionary) or an array of objects (jsontable)",
    )
    items.add_argument(
        "--file", dest="items", action="append", type=lambda v: ("file", v), metavar="FILE"
    )
    send.add_argument("--purpose", default="chat", help="msg_purpose (default: %(default)s)")
    send.add_argument("--sender", default="flowbridge", help="sender_name (default: %(default)s)")
    send.add_argument("--receiver", default="", help="receiver_name (default: broadcast)")
    send.add_argument("--reply-to", default="", metavar="TOPIC", help="topic for replies")
    send.add_argument("--correlation-id", metavar="UUID", help="default: a new UUID")
    send.add_argument("--key", help="Kafka record key")
    send.add_argument("--fileserver", metavar="URL", help="default: env FILESERVER_URL")
    send.add_argument(
        "--threshold",
        type=int,
        metavar="BYTES",
        help="link size threshold (default: env SIZE_THRESHOLD or 500000)",
    )


def _add_listen(commands: Any) -> None:
    listen = commands.add_parser(
        "listen",
        help="print msg_envelope_v1 messages as they arrive",
        description="Subscribe to a filter and print every msg_envelope_v1 message readably.",
        epilog=_LISTEN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(listen)
    listen.add_argument("filter", metavar="FILTER", help="subscription filter")
    listen.add_argument(
        "--save-dir",
        default=".",
        metavar="DIR",
        help="where binary payloads go (default: %(default)s)",
    )
    listen.add_argument(
        "--fileserver",
        action="append",
        default=[],
        metavar="URL",
        help="file server that link payloads may come from; repeat for several "
        "(default: env FILESERVER_URL)",
    )
    listen.add_argument("--count", type=int, metavar="N", help="stop after N messages")
    listen.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="stop when nothing arrives for this long"
    )
    listen.add_argument("--group", help="share messages with other listeners of this group")


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
        piped = f", pipeline {route.pipeline}" if route.pipeline > 1 else ""
        print(
            f"  {route.name}  ({route.delivery}, max in flight {route.max_in_flight}{piped})  "
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


EXIT_FAILED = 1  # a broker or file server failed or refused

_MEDIA = {
    "image": {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".svg", ".ico"},
    "audio": {".wav", ".mp3", ".ogg", ".oga", ".flac", ".aac", ".m4a", ".opus"},
    "video": {".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg"},
}


def _send_items(specs: Sequence[tuple[str, str]]) -> list[tuple[str, Any, str]]:
    from flowbridge.envelope import deserialize  # noqa: PLC0415

    items: list[tuple[str, Any, str]] = []
    for kind, value in specs:
        if kind == "text":
            items.append(("text", value, "text"))
        elif kind == "json":
            try:
                data = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"--json {value[:40]!r}: not JSON: {exc}") from None
            if isinstance(data, dict):
                items.append(("json", data, "dictionary"))
            elif isinstance(data, list) and all(isinstance(row, dict) for row in data):
                items.append(("json", data, "jsontable"))
            else:
                raise ValueError("--json takes an object or an array of objects")
        else:
            path = Path(value)
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise ValueError(f"--file {value}: {exc.strerror or exc}") from None
            ext = path.suffix.lower()
            if ext in (".arrow", ".arrows"):
                items.append((path.name, deserialize(raw, "arrowtable"), "arrowtable"))
                continue
            ptype = next((t for t, exts in _MEDIA.items() if ext in exts), "binary")
            items.append((path.name, raw, ptype))
    return items


def _send(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from flowbridge.envelope import EnvelopeError  # noqa: PLC0415
    from flowbridge.errors import FlowbridgeError  # noqa: PLC0415
    from flowbridge.smart import protocol_of, smartsend  # noqa: PLC0415

    if not args.items:
        print("send: give at least one --text, --json or --file", file=err)
        return EXIT_ERROR
    try:
        protocol_of(args.url)
        items = _send_items(args.items)
    except (ValueError, FlowbridgeError) as exc:
        print(f"send: {exc}", file=err)
        return EXIT_ERROR
    fields: dict[str, Any] = {
        "msg_purpose": args.purpose,
        "sender_name": args.sender,
        "receiver_name": args.receiver,
        "reply_to": args.reply_to,
    }
    if args.correlation_id:
        fields["correlation_id"] = args.correlation_id
    try:
        env = asyncio.run(
            smartsend(
                args.url,
                args.topic,
                items,
                fileserver=args.fileserver,
                threshold=args.threshold,
                broker_options=dict(args.options),
                key=args.key.encode() if args.key is not None else None,
                **fields,
            )
        )
    except EnvelopeError as exc:
        print(f"send: {exc}", file=err)
        return EXIT_ERROR
    except (FlowbridgeError, ValueError) as exc:
        print(f"send: {exc}", file=err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    print(f"sent {env.msg_id} (correlation_id {env.correlation_id}) to {args.topic}", file=out)
    for p in env.payloads:
        print(f"  {p.dataname} ({p.payload_type}, {p.size} bytes, {p.transport})", file=out)
    return EXIT_OK


def _printable(text: str) -> str:
    """``text`` with control characters escaped, so a message cannot drive the terminal."""
    return "".join(
        c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode() for c in text
    )


def _save(directory: Path, msg_id: str, dataname: str, ptype: str, value: Any) -> Path:
    from flowbridge.envelope import serialize  # noqa: PLC0415
    from flowbridge.fileserver import safe_name  # noqa: PLC0415

    raw = serialize(value, ptype)
    name = safe_name(dataname)
    if ptype == "arrowtable" and not name.endswith((".arrow", ".arrows")):
        name += ".arrows"
    directory.mkdir(parents=True, exist_ok=True)
    base = f"{msg_id[:8]}-{name}"
    for n in range(1000):
        path = directory / (base if n == 0 else f"{n}-{base}")
        try:
            with path.open("xb") as f:  # never overwrite what is there
                f.write(raw)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free file name for {base} in {directory}")


def _print_received(got: Any, save_dir: Path, out: TextIO) -> None:
    env = got.envelope
    print(
        f"[{env.timestamp}] {_printable(env.msg_purpose)} from {_printable(env.sender_name)} "
        f"on {_printable(got.message.topic)} (msg_id {env.msg_id}, correlation_id "
        f"{env.correlation_id})",
        file=out,
    )
    if env.reply_to:
        print(f"  reply to: {_printable(env.reply_to)}", file=out)
    for (dataname, value, ptype), p in zip(got.items, env.payloads, strict=True):
        label = f"  {_printable(dataname)} ({ptype}, {p.size} bytes, {p.transport})"
        if ptype == "text":
            print(f"{label}: {_printable(value)}", file=out)
        elif ptype in ("dictionary", "jsontable"):
            shown = json.dumps(value, ensure_ascii=False, indent=2).replace("\n", "\n    ")
            print(f"{label}:\n    {_printable(shown)}", file=out)
        else:
            path = _save(save_dir, env.msg_id, dataname, ptype, value)
            print(f"{label}: saved to {path}", file=out)
    out.flush()


async def _listen_loop(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from flowbridge.smart import listen  # noqa: PLC0415

    save_dir = Path(args.save_dir)
    seen = 0
    async with listen(
        args.url,
        args.filter,
        fileserver=args.fileserver or None,
        broker_options=dict(args.options),
        group=args.group,
    ) as rx:
        print(f"listening on {args.filter}", file=err)
        err.flush()
        it = aiter(rx)
        while args.count is None or seen < args.count:
            try:
                async with asyncio.timeout(args.timeout):
                    got = await anext(it)
            except TimeoutError:
                print(f"nothing for {args.timeout}s; stopping", file=err)
                return EXIT_FAILED if seen == 0 else EXIT_OK
            seen += 1
            if got.error is not None:
                print(f"invalid envelope on {_printable(got.message.topic)}: {got.error}", file=err)
                err.flush()
                continue
            try:
                _print_received(got, save_dir, out)
            except OSError as exc:
                print(f"cannot save a payload of {got.message.message_id}: {exc}", file=err)
    return EXIT_OK


def _listen(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from flowbridge.errors import FlowbridgeError  # noqa: PLC0415
    from flowbridge.smart import protocol_of  # noqa: PLC0415

    if args.count is not None and args.count < 1:
        print("listen: --count must be at least 1", file=err)
        return EXIT_ERROR
    try:
        protocol_of(args.url)
    except FlowbridgeError as exc:
        print(f"listen: {exc}", file=err)
        return EXIT_ERROR
    try:
        return asyncio.run(_listen_loop(args, out, err))
    except (FlowbridgeError, ValueError) as exc:
        print(f"listen: {exc}", file=err)
        return EXIT_FAILED
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
    if args.command == "send":
        return _send(args, out, err)
    if args.command == "listen":
        return _listen(args, out, err)
    parser.print_help(err)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
