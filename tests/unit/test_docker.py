"""docker/: what can be checked without a Docker engine.

The compose file parses and interpolates, every service can be built or pulled, the files it
mounts exist, ports agree between listeners, mappings and publications, the interop test
service sets every variable the suite reads, and the example mapping loads.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from flowbridge.config import load

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
BROKERS = ("nats", "mosquitto", "rabbitmq", "kafka")
# URL scheme of each broker service's clients.
SCHEME_OF = {"nats": "nats", "mosquitto": "mqtt", "rabbitmq": "amqp", "kafka": "kafka"}

# Compose interpolation: $$ is a literal $, ${NAME}, ${NAME:-default} and ${NAME-default}.
_INTERP = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|(.|$))")


def interpolate(text: str, where: str, problems: list[str]) -> str:
    """Resolve ``text`` as compose does with an empty environment, noting what compose would
    reject or leave empty."""

    def sub(m: re.Match[str]) -> str:
        dollar, name, op, default, other = m.groups()
        if dollar:
            return "$"
        if name is None:
            problems.append(f"{where}: bare '$' before {other!r} (write $$ for a literal $)")
            return ""
        if op is None:
            problems.append(f"{where}: ${{{name}}} has no default")
            return ""
        return str(default)

    return _INTERP.sub(sub, text)


def _resolve(node: Any, where: str, problems: list[str]) -> Any:
    if isinstance(node, dict):
        return {
            interpolate(str(k), where, problems): _resolve(v, f"{where}.{k}", problems)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_resolve(v, f"{where}[{i}]", problems) for i, v in enumerate(node)]
    if isinstance(node, str):
        return interpolate(node, where, problems)
    return node


@functools.cache
def _compose() -> tuple[dict[str, Any], tuple[str, ...]]:
    raw = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    problems: list[str] = []
    return _resolve(raw, "compose", problems), tuple(problems)


def compose() -> dict[str, Any]:
    return _compose()[0]


def services() -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose()["services"]
    return result


def env_of(service: str) -> dict[str, str]:
    env = services()[service].get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def published(service: str) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each ``ports`` entry."""
    result = []
    for entry in services()[service].get("ports", []):
        address, host_port, container_port = str(entry).rsplit(":", 2)
        result.append((address, int(host_port), int(container_port.split("/")[0])))
    return result


def kafka_listeners(variable: str) -> dict[str, tuple[str, int]]:
    """Listener name -> (host, port) of a KAFKA_*LISTENERS value."""
    result = {}
    for item in env_of("kafka")[variable].split(","):
        name, address = item.split("://")
        host, port = address.rsplit(":", 1)
        result[name] = (host, int(port))
    return result


def mosquitto_listener_port() -> int:
    ports = re.findall(r"^listener\s+(\d+)", (DOCKER / "mosquitto.conf").read_text(), re.M)
    assert len(ports) == 1, ports
    return int(ports[0])


def internal_port(service: str) -> int:
    """The port other containers use to reach a broker service."""
    if service == "nats":
        command = services()["nats"].get("command", [])
        return int(command[command.index("-p") + 1]) if "-p" in command else 4222
    if service == "mosquitto":
        return mosquitto_listener_port()
    if service == "rabbitmq":
        return 5672
    if service == "kafka":
        return kafka_listeners("KAFKA_ADVERTISED_LISTENERS")[
            env_of("kafka")["KAFKA_INTER_BROKER_LISTENER_NAME"]
        ][1]
    raise AssertionError(service)


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions as (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.I)
            assert match, line
            current = [("FROM", match.group(1))]
            stages[match.group(2) or f"stage{len(stages)}"] = current
        else:
            current.append((instruction.upper(), args.strip()))
    return stages


def instructions(stage: str, name: str) -> list[str]:
    return [args for instr, args in dockerfile_stages()[stage] if instr == name]


def test_compose_interpolates_without_an_environment() -> None:
    assert _compose()[1] == ()


def test_interpolation_checker_catches_mistakes() -> None:
    problems: list[str] = []
    assert interpolate("a$$b ${X:-1} ${Y-2}", "w", problems) == "a$b 1 2"
    assert problems == []
    interpolate("$SYS ${NODEFAULT}", "w", problems)
    assert len(problems) == 2


def test_compose_has_every_service() -> None:
    assert set(services()) >= {*BROKERS, "flowbridge", "tests"}


@pytest.mark.parametrize("name", [*BROKERS, "flowbridge", "tests"])
def test_service_can_be_pulled_or_built(name: str) -> None:
    service = services()[name]
    assert service.get("image") or service.get("build"), f"{name}: neither image nor build"
    build = service.get("build")
    if build is None:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", service["image"]), "pin at least a major tag"
        return
    context = (DOCKER / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).is_file()
    assert build["target"] in dockerfile_stages()


def test_broker_images_and_modes() -> None:
    nats_image = services()["nats"]["image"]
    major, minor = (int(x) for x in re.findall(r":(\d+)\.(\d+)", nats_image)[0])
    assert (major, minor) >= (2, 10)
    assert "-js" in services()["nats"]["command"]
    assert services()["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    assert re.match(r"rabbitmq:(3|4)", services()["rabbitmq"]["image"])
    assert services()["kafka"]["image"].startswith("apache/kafka:")
    kafka = env_of("kafka")
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert kafka["CLUSTER_ID"]
    assert kafka["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"  # single node


def test_mounted_files_exist() -> None:
    mounts = 0
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith((".", "/")):
                mounts += 1
                assert (DOCKER / source).exists(), f"{name}: {source} missing"
    assert mounts >= 2


def test_brokers_are_healthchecked_and_waited_for() -> None:
    for name in BROKERS:
        check = services()[name].get("healthcheck", {})
        assert check.get("test"), f"{name} has no healthcheck"
    for name in ("flowbridge", "tests"):
        depends = services()[name]["depends_on"]
        assert set(depends) == set(BROKERS)
        assert all(d["condition"] == "service_healthy" for d in depends.values())


def test_interop_service_sets_every_variable_the_tests_read() -> None:
    source = (ROOT / "tests" / "support" / "brokers.py").read_text()
    read = set(re.findall(r"FLOWBRIDGE_TEST_[A-Z_]+_URL", source))
    assert len(read) >= 4
    tests = services()["tests"]
    assert "interop" in tests["profiles"]
    env = env_of("tests")
    assert read <= set(env)
    for variable in read:
        url = urlsplit(env[variable])
        assert url.hostname in BROKERS, f"{variable}: {url.hostname} is not a compose service"
        assert url.port == internal_port(url.hostname), variable
        assert url.scheme == SCHEME_OF[url.hostname], variable
    amqp = urlsplit(env["FLOWBRIDGE_TEST_AMQP_URL"])
    rabbit = env_of("rabbitmq")
    assert (amqp.username, amqp.password) == (
        rabbit["RABBITMQ_DEFAULT_USER"],
        rabbit["RABBITMQ_DEFAULT_PASS"],
    )


def test_interop_service_runs_the_test_script() -> None:
    tests = services()["tests"]
    command = [*tests.get("entrypoint", []), *tests.get("command", [])]
    assert "scripts/test.sh" in command
    assert (ROOT / "scripts" / "test.sh").is_file()
    test_stage = "\n".join(args for _, args in dockerfile_stages()["test"])
    # Fault tests start a mosquitto of their own.
    assert "mosquitto" in test_stage
    assert "'.[test]'" in test_stage


def test_published_ports_are_local_unique_and_match_listeners() -> None:
    seen: dict[int, str] = {}
    for name in services():
        for address, host_port, _ in published(name):
            assert address == "127.0.0.1", f"{name} publishes on {address}"
            assert host_port not in seen, f"{name} and {seen.get(host_port)} share {host_port}"
            seen[host_port] = name
    for name in ("nats", "mosquitto", "rabbitmq"):
        assert internal_port(name) in [c for _, _, c in published(name)], name
    health = services()["mosquitto"]["healthcheck"]["test"]
    assert health[health.index("-p") + 1] == str(mosquitto_listener_port())


def test_kafka_listeners_agree() -> None:
    env = env_of("kafka")
    listeners = kafka_listeners("KAFKA_LISTENERS")
    advertised = kafka_listeners("KAFKA_ADVERTISED_LISTENERS")
    protocols = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert set(listeners) == set(protocols)
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners
    assert controller not in advertised
    voter = env["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    assert voter == f"{env['KAFKA_NODE_ID']}@kafka:{listeners[controller][1]}"
    for name, (_, port) in advertised.items():
        assert listeners[name][1] == port or name == "HOST", name
    # Other containers: the service name on the inter-broker listener.
    internal = env["KAFKA_INTER_BROKER_LISTENER_NAME"]
    assert advertised[internal][0] == "kafka"
    # The host: what is published, advertised with the published port.
    [(address, host_port, container_port)] = published("kafka")
    assert listeners["HOST"][1] == container_port
    assert advertised["HOST"] == (address, host_port)


def mapping_text() -> str:
    return (DOCKER / "mapping.yaml").read_text()


def test_mapping_brokers_are_compose_services() -> None:
    spec = yaml.safe_load(mapping_text())
    seen_schemes = set()
    for name, broker in spec["brokers"].items():
        url = urlsplit(re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", broker["url"]))
        assert url.hostname in BROKERS, f"{name}: {url.hostname} is not a compose service"
        assert url.port == internal_port(url.hostname), name
        assert url.scheme == SCHEME_OF[url.hostname], name
        seen_schemes.add(url.scheme)
    assert seen_schemes == {"nats", "mqtt", "amqp", "kafka"}


def test_mapping_validates_and_mirrors_mqtt_and_nats() -> None:
    config = load([str(DOCKER / "mapping.yaml")], environ={})
    flows = {
        (config.brokers[r.source.broker].protocol, config.brokers[t.broker].protocol)
        for r in config.routes
        for t in r.targets
    }
    assert {("mqtt", "nats"), ("nats", "mqtt"), ("nats", "kafka"), ("nats", "amqp")} <= flows


def test_image_runs_the_mapping_compose_mounts() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "runtime", "runtime must be the default (last) stage"
    assert stages["base"][0] == ("FROM", "python:3.11-slim")
    assert stages["runtime"][0] == ("FROM", "base")
    # The package itself with uvloop ("fast"), never the test or embedded extras.
    runs = instructions("runtime", "RUN")
    assert any(re.match(r"pip install '\.\[fast\]'(\s|$)", run) for run in runs), runs
    users = instructions("runtime", "USER")
    assert users
    assert users[-1] not in ("root", "0")
    assert instructions("runtime", "ENTRYPOINT") == ['["flowbridge"]']
    assert instructions("runtime", "CMD") == ['["run", "-c", "/etc/flowbridge/mapping.yaml"]']
    service = services()["flowbridge"]
    assert service["command"] == ["run", "-c", "/etc/flowbridge/mapping.yaml"]
    assert "./mapping.yaml:/etc/flowbridge/mapping.yaml:ro" in service["volumes"]


def test_files_the_images_copy_exist() -> None:
    for stage in dockerfile_stages():
        for args in instructions(stage, "COPY"):
            parts = [p for p in args.split() if not p.startswith("--")]
            for source in parts[:-1]:
                assert (ROOT / source).exists(), f"{stage}: COPY {source}: missing"
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)
