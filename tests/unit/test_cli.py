"""The command line, through main([...]) and once through the installed console script."""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

import pytest

from flowbridge import __version__, cli

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"
SCRIPT = Path(sys.executable).parent / "flowbridge"

GOOD = """\
brokers:
  edge: {url: "mqtt://127.0.0.1:1883"}
  core: {url: "nats://u:hunter2@127.0.0.1:4222"}
routes:
  - name: up
    from: {broker: edge, filter: "sensors/+/temperature"}
    to:
      - {broker: core}
      - {broker: core, topic: "t.{2}"}
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- translate


def test_translate_filter_may_give_several_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "translate", "--from", "mqtt", "--to", "nats", "foo.bar/#") == (
        0,
        "foo//bar\nfoo//bar.>\n",
        "",
    )


def test_translate_topics(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "translate", "--from", "mqtt", "--to", "nats", "/foo", "a/b")
    assert (code, out, err) == (0, "/.foo\na.b\n", "")


def test_translate_forced_filter(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "translate", "--from", "nats", "--to", "kafka", "--filter", "a.b")
    assert code == 0
    assert out == "^a\\.b$\n"
    # Without --filter the same name is a topic.
    assert run(capsys, "translate", "--from", "nats", "--to", "kafka", "a.b")[1] == "a.b\n"


def test_translate_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "translate", "--from", "nats", "--to", "mqtt", "ok.one", "bad subject", "two"
    )
    assert code == 2
    assert out == "ok/one\ntwo\n"  # the valid names are still translated
    (line,) = err.splitlines()
    assert line.startswith("bad subject: ")
    assert "Traceback" not in err


def test_translate_unknown_protocol_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["translate", "--from", "http", "--to", "nats", "x"])
    assert info.value.code == 2
    assert "invalid choice: 'http'" in capsys.readouterr().err


# --------------------------------------------------------------------------- check


def test_check_prints_route_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(GOOD)
    code, out, err = run(capsys, "check", "-c", str(path))
    assert (code, err) == (0, "")
    assert "  up  (at-least-once, max in flight 1000)" in out
    assert "    from edge (mqtt): sensors/+/temperature\n" in out
    assert "    to   core (nats): sensors/any/temperature -> sensors.any.temperature\n" in out
    assert "    to   core (nats): sensors/any/temperature -> t.any\n" in out
    assert "nats://u:***@127.0.0.1:4222" in out
    assert "hunter2" not in out
    assert out.endswith("OK: 2 brokers, 1 route\n")
    path.write_text(GOOD + "    pipeline: 8\n")
    code, out, err = run(capsys, "check", "-c", str(path))
    assert (code, err) == (0, "")
    assert "  up  (at-least-once, max in flight 1000, pipeline 8)" in out


def test_check_merges_several_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    brokers, routes = GOOD.split("routes:\n")
    (tmp_path / "b.yaml").write_text(brokers)
    (tmp_path / "r.yaml").write_text("routes:\n" + routes)
    code, out, _ = run(
        capsys, "check", "-c", str(tmp_path / "b.yaml"), "-c", str(tmp_path / "r.yaml")
    )
    assert code == 0
    assert f"[{tmp_path / 'r.yaml'}:2]" in out


def test_check_reports_every_problem_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("m.yaml").write_text(
        GOOD.replace("mqtt://", "mqttx://").replace('"t.{2}"}', '"t.{2}", options: {nope: 1}}')
    )
    code, out, err = run(capsys, "check", "-c", "m.yaml")
    assert code == 2
    assert out == ""
    first, second, total = err.splitlines()
    assert first == (
        "m.yaml:2: brokers.edge.url: unknown scheme 'mqttx' (did you mean 'mqtt'?); "
        "known: nats, tls, mqtt, mqtts, amqp, amqps, kafka, kafka+ssl"
    )
    # The rest of the message lists the NATS adapter's target options.
    assert second.startswith("m.yaml:9: routes[0].to[1].options.nope: unknown key")
    assert total == "2 problems found"


def test_check_requires_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["check"])
    assert info.value.code == 2
    assert "-c/--config" in capsys.readouterr().err


def test_check_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "check", "-c", "/nonexistent/m.yaml")
    assert code == 2
    assert err.splitlines()[0] == "/nonexistent/m.yaml: cannot read: No such file or directory"


def test_check_every_example(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["check"]
    for path in sorted(MAPPINGS.glob("*.yaml")):
        if path.name != "default.yaml":  # the others use distinct broker names per file
            code, _, err = run(capsys, "check", "-c", str(path))
            assert (code, err) == (0, ""), path
            args += ["-c", str(path)]
    # Merged, the examples repeat broker names: reported, not silently overridden.
    code, _, err = run(capsys, *args)
    assert code == 2
    assert "is also defined at" in err


# --------------------------------------------------------------------------- run, version, help


def test_run_passes_its_arguments_to_the_engine(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[argparse.Namespace] = []

    def run_cli(args: argparse.Namespace) -> int:
        seen.append(args)
        return 0

    engine = types.ModuleType("flowbridge.engine")
    engine.run_cli = run_cli  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flowbridge.engine", engine)
    code = cli.main(
        [
            "run",
            "-c",
            "a.yaml",
            "--config",
            "b.yaml",
            "--nats-port",
            "4333",
            "--mqtt-port",
            "1999",
            "--http",
            "127.0.0.1:8080",
            "--log-level",
            "debug",
            "--log-format",
            "json",
        ]
    )
    assert code == 0
    (args,) = seen
    assert args.config == ["a.yaml", "b.yaml"]
    assert (args.nats_port, args.mqtt_port, args.http) == (4333, 1999, "127.0.0.1:8080")
    assert (args.log_level, args.log_format) == ("debug", "json")


def test_run_config_error_is_reported_without_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flowbridge.errors import ConfigError  # noqa: PLC0415

    def run_cli(args: argparse.Namespace) -> int:
        raise ConfigError(["m.yaml:3: brokers.x.url: bad"])

    engine = types.ModuleType("flowbridge.engine")
    engine.run_cli = run_cli  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flowbridge.engine", engine)
    assert run(capsys, "run", "-c", "m.yaml") == (2, "", "m.yaml:3: brokers.x.url: bad\n")


def test_run_rejects_a_bad_port(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "--nats-port", "70000"])
    assert info.value.code == 2
    assert "port out of range 1-65535: 70000" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"flowbridge {__version__}\n"


def test_no_command_prints_help_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys)
    assert code == 2
    assert out == ""
    assert "examples:" in err
    assert "translate" in err


def test_help_texts_have_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("check", "translate", "run"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out
        assert f"flowbridge {command} " in out


# --------------------------------------------------------------------------- console script


def test_console_script(tmp_path: Path) -> None:
    assert SCRIPT.exists(), f"{SCRIPT} missing: install the package (pip install -e .)"
    good = tmp_path / "m.yaml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: [\n")
    done = subprocess.run(
        [str(SCRIPT), "translate", "--from", "mqtt", "--to", "nats", "foo.bar/#"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "foo//bar\nfoo//bar.>\n")
    done = subprocess.run(
        [str(SCRIPT), "check", "-c", str(good), "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith(f"{bad}:2: invalid YAML: ")
    assert "Traceback" not in done.stderr
