"""compose.yaml, the Dockerfile and .dockerignore, checked so that they cannot silently rot.

No Docker engine runs here, so nothing is started. Instead:
- `docker compose config` (or Debian's `docker-compose config`), when installed, validates the files;
- every `clipdex` command in compose.yaml is parsed by the real CLI, and every service's CLIPDEX_*
  environment is validated by the real Settings, so a renamed flag or setting fails here;
- the wiring is checked as a user would need it: the indexer reaches Kafka on an advertised listener and
  consumes the topic that is created, the server and the indexer share the data and model volumes, the
  healthchecks probe what the services serve, the GPU reservation is there (and absent on the CPU
  fallback), and the image's build arguments, user and mount points match what compose expects.
"""

from __future__ import annotations

import base64
import fnmatch
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from clipdex.cli import build_parser
from indexer.events import parse_event
from shared.cliargs import setting_overrides
from shared.config import Settings, env_name, load_settings
from shared.images import decode_image

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
OFFLINE_OVERRIDE = ROOT / "examples" / "compose.offline.yaml"
MILVUS_GPU_OVERRIDE = ROOT / "examples" / "compose.milvus-gpu.yaml"
COMPOSE_ENV = ROOT / "examples" / "compose.env"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

SETTING_VARS = {env_name(name) for name in Settings.model_fields}
# Variables that compose.yaml interpolates but that are not clipdex settings (documented in compose.env).
COMPOSE_ONLY_VARS = {"IMAGES_DIR", "PUBLISH_ADDR", "MILVUS_INDEXERS", "SEARCH_REPLICAS"}
TOKEN = "test-token-0123456789"
CLIPDEX_SERVICES = ("indexer", "indexer-cpu", "server")

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, ${NAME:+alt}, $NAME, and $$.
_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution (the subset of the spec this project's files may use)."""

    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        unset_or_empty = not value
        if op == ":-":
            return arg if unset_or_empty else str(value)
        if op == "-":
            return arg if value is None else value
        if op in (":?", "?"):
            if (op == ":?" and unset_or_empty) or value is None:
                raise MissingVariable(f"{name}: {arg}")
            return str(value)
        if op == ":+":
            return "" if unset_or_empty else arg
        return value or ""

    return _INTERPOLATION.sub(one, text)


def resolve(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(v, env) for v in node]
    if isinstance(node, dict):
        return {k: resolve(v, env) for k, v in node.items()}
    return node


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    resolved: dict[str, Any] = resolve(raw, {"CLIPDEX_API_TOKEN": TOKEN} if env is None else env)
    return resolved


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    assert name in compose["services"], f"compose.yaml has no service {name!r}"
    svc: dict[str, Any] = compose["services"][name]
    return svc


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command")
    assert cmd, "service has no command"
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """target path -> source (a named volume or a host path), from the short volume syntax."""
    result = {}
    for entry in svc.get("volumes") or []:
        source, target = entry.split(":")[:2]
        result[target] = source
    return result


def is_named_volume(source: str) -> bool:
    return not source.startswith((".", "/", "~", "$"))


def clipdex_settings(svc: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Settings]:
    """Parse the service's `clipdex` command with the real CLI and build its Settings, as `clipdex` does."""
    cmd = command(svc)
    assert cmd[0] == "clipdex", f"expected a clipdex command, got {cmd}"
    try:
        args = build_parser().parse_args(cmd[1:])
    except SystemExit as exc:
        pytest.fail(f"the real CLI rejects compose.yaml's command {shlex.join(cmd)!r} (exit {exc.code})")
    for name, value in environment(svc).items():
        monkeypatch.setenv(name, value)
    return args, load_settings(**setting_overrides(args))


def listeners(value: str) -> dict[str, str]:
    """'PLAINTEXT://kafka:9092,CONTROLLER://:9093' -> {'PLAINTEXT': 'kafka:9092', 'CONTROLLER': ':9093'}"""
    return dict(entry.split("://", 1) for entry in value.split(","))


# -- docker compose itself --------------------------------------------------------------------------------


def compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def run_compose_config(
    cli: list[str], files: list[Path], profiles: list[str], env: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    env_file = tmp_path / "empty.env"  # never the developer's own .env
    env_file.write_text("")
    cmd = [*cli, "--project-directory", str(ROOT), "--env-file", str(env_file)]
    for f in files:
        cmd += ["-f", str(f)]
    for p in profiles:
        cmd += ["--profile", p]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPDEX_", "COMPOSE_"))}
    return subprocess.run(
        [*cmd, "config", "-q"], capture_output=True, text=True, env={**base, **env}, timeout=120, cwd=ROOT
    )


@pytest.mark.parametrize(
    ("files", "profiles"),
    [
        ([COMPOSE], ["gpu"]),
        ([COMPOSE], ["cpu"]),
        ([COMPOSE], ["cpu", "examples"]),
        ([COMPOSE, OFFLINE_OVERRIDE], ["gpu"]),
        ([COMPOSE], ["milvus"]),
        ([COMPOSE, MILVUS_GPU_OVERRIDE], ["milvus"]),
    ],
    ids=["gpu", "cpu", "examples", "offline", "milvus", "milvus-gpu"],
)
def test_docker_compose_accepts_the_files(files: list[Path], profiles: list[str], tmp_path: Path) -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (the structural checks still run)")
    result = run_compose_config(cli, files, profiles, {"CLIPDEX_API_TOKEN": TOKEN}, tmp_path)
    assert result.returncode == 0, result.stderr


def test_docker_compose_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    result = run_compose_config(cli, [COMPOSE], ["cpu"], {}, tmp_path)
    assert result.returncode != 0
    assert "CLIPDEX_API_TOKEN" in result.stderr


def test_structure_refuses_to_start_without_a_token() -> None:
    with pytest.raises(MissingVariable, match="CLIPDEX_API_TOKEN"):
        load_compose(env={})


# -- Kafka ------------------------------------------------------------------------------------------------


def test_kafka_is_a_single_kraft_node_with_a_healthcheck(compose: dict[str, Any]) -> None:
    kafka = service(compose, "kafka")
    image, _, tag = kafka["image"].partition(":")
    assert image == "apache/kafka", "the official Apache Kafka image"
    assert tag and tag != "latest", "pin the Kafka version"
    env = environment(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, "KRaft, combined mode"
    assert not any("ZOOKEEPER" in k for k in env), "KRaft needs no ZooKeeper"
    node_id = env["KAFKA_NODE_ID"]
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert len(voters) == 1 and voters[0].startswith(f"{node_id}@kafka:")
    declared = listeners(env["KAFKA_LISTENERS"])
    controller_port = voters[0].rsplit(":", 1)[1]
    assert declared[env["KAFKA_CONTROLLER_LISTENER_NAMES"]].endswith(f":{controller_port}")
    protocols = dict(entry.split(":", 1) for entry in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(declared) <= set(protocols), "every listener needs a security protocol"
    # A single node: internal topics must not ask for three replicas, or consumer groups never form.
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"):
        assert env[key] == "1"
    # The image formats its storage with CLUSTER_ID: a base64url UUID, 16 bytes.
    cluster_id = env["CLUSTER_ID"]
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16 and len(cluster_id) == 22
    # The data volume is where the log lives.
    assert mounts(kafka).get(env["KAFKA_LOG_DIRS"]) in compose["volumes"]

    probe = " ".join(kafka["healthcheck"]["test"])
    assert "kafka-broker-api-versions" in probe or "kafka-topics" in probe
    port = re.search(r"--bootstrap-server \S+:(\d+)", probe)
    assert port is not None and any(a.endswith(f":{port[1]}") for a in declared.values())


def test_the_indexer_consumes_the_created_topic_through_an_advertised_listener(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    advertised = listeners(environment(service(compose, "kafka"))["KAFKA_ADVERTISED_LISTENERS"]).values()
    topics_cmd = " ".join(command(service(compose, "topics")))
    for name in ("indexer", "indexer-cpu"):
        with monkeypatch.context() as m:
            _, settings = clipdex_settings(service(compose, name), m)
        assert command(service(compose, name))[1] == "consume"
        assert settings.kafka_bootstrap_servers in advertised, "the broker hands out its advertised address"
        assert settings.kafka_topic, "the topic is given"
        assert f'"{settings.kafka_topic}"' in topics_cmd, "the topics service creates the consumed topic"
        assert f'"{settings.kafka_dlq_topic}"' in topics_cmd, "the dead-letter topic is created too"
    assert "--create" in topics_cmd and "--if-not-exists" in topics_cmd, "re-running `up` must not fail"


# -- the clipdex services ---------------------------------------------------------------------------------


def test_gpu_indexer_reserves_a_gpu_and_the_cpu_fallback_does_not(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu, cpu = service(compose, "indexer"), service(compose, "indexer-cpu")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) and d.get("driver") == "nvidia" for d in devices)
    assert gpu["build"]["args"]["FLAVOR"] == "cuda"
    assert "deploy" not in cpu, "a device reservation stops the container from starting on a host without GPUs"
    assert cpu["build"]["args"]["FLAVOR"] == "cpu"
    assert command(cpu) == command(gpu), "the fallback runs the same job"
    # One profile or the other: never both indexers in one consumer group by accident.
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    with monkeypatch.context() as m:
        assert clipdex_settings(gpu, m)[1].device == "cuda"
    with monkeypatch.context() as m:
        assert clipdex_settings(cpu, m)[1].device == "cpu"


def test_server_binds_all_interfaces_with_a_token_and_is_probed_on_health(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = service(compose, "server")
    args, settings = clipdex_settings(server, monkeypatch)
    assert args.command == "serve"
    assert settings.host == "0.0.0.0", "reachable from the other containers and the published port"
    assert settings.api_token is not None and settings.api_token.get_secret_value() == TOKEN
    from tools.auth import check_bind

    check_bind(settings, insecure=False)  # the server would start, not refuse
    assert not set(server.get("profiles", [])) - {"gpu", "cpu"}, "the server runs with either indexer"

    published = [p.rsplit(":", 1)[1].split("/")[0] for p in server["ports"]]
    assert published == [str(settings.port)]
    probe = server["healthcheck"]["test"]
    assert probe[0] == "CMD" and probe[1] == "python"
    code = probe[-1]
    compile(code, "healthcheck", "exec")  # the probe itself is valid Python
    assert f"127.0.0.1:{settings.port}/health" in code


def test_clipdex_services_share_the_data_and_model_volumes(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = {}
    for name in CLIPDEX_SERVICES:
        svc = service(compose, name)
        with monkeypatch.context() as m:
            _, settings = clipdex_settings(svc, m)
        assert settings.model_cache_dir is not None, "weights must go to a volume, or they download every start"
        volume_of = mounts(svc)
        data, models = volume_of[str(settings.data_dir)], volume_of[str(settings.model_cache_dir)]
        assert is_named_volume(data) and is_named_volume(models)
        for root in settings.allowed_roots:
            assert str(root) in volume_of, f"{name}: allowed root {root} is not mounted"
        seen[name] = (data, models, settings.model, settings.pretrained)
    assert len(set(seen.values())) == 1, f"the indexer and the server must share store and model: {seen}"


def test_named_volumes_are_declared_and_dependencies_are_sound(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for source in mounts(svc).values():
            if is_named_volume(source):
                assert source in compose["volumes"], f"{name} mounts undeclared volume {source!r}"
        for target, spec in (svc.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown service {target!r}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck to wait for"
            elif condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", f"{target} is a one-shot"
            else:
                assert condition == "service_started"
    for name in ("indexer", "indexer-cpu", "milvus-indexer", "seed"):
        assert services[name]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_every_clipdex_variable_in_the_deployment_files_is_a_setting() -> None:
    files = (COMPOSE, OFFLINE_OVERRIDE, MILVUS_GPU_OVERRIDE, COMPOSE_ENV, DOCKERFILE)
    texts = {p.name: p.read_text(encoding="utf-8") for p in files}
    for name, text in texts.items():
        unknown = set(re.findall(r"CLIPDEX_[A-Z0-9_]+", text)) - SETTING_VARS
        assert not unknown, f"{name} names CLIPDEX_* variables that are not settings: {sorted(unknown)}"

    interpolated = {
        m["braced"] or m["bare"]
        for name in ("compose.yaml", "compose.milvus-gpu.yaml")
        for m in _INTERPOLATION.finditer(texts[name])
    } - {None}
    assert interpolated - SETTING_VARS == COMPOSE_ONLY_VARS
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", texts["compose.env"], re.MULTILINE))
    assert interpolated <= documented, f"undocumented in compose.env: {sorted(interpolated - documented)}"
    # compose.env's settings are valid values (an empty value stands for "unset").
    values = dict(re.findall(r"^(CLIPDEX_[A-Z0-9_]+)=(.*)$", texts["compose.env"], re.MULTILINE))
    overrides = {k.removeprefix("CLIPDEX_").lower(): v for k, v in values.items() if v}
    load_settings(**overrides)


# -- profile milvus ---------------------------------------------------------------------------------------


def test_milvus_is_the_official_standalone_image_with_embedded_etcd_a_volume_and_a_healthcheck(
    compose: dict[str, Any],
) -> None:
    milvus = service(compose, "milvus")
    image, _, tag = milvus["image"].partition(":")
    assert image == "milvusdb/milvus" and tag.startswith("v2.") and tag != "latest", "the official image, pinned"
    assert milvus["profiles"] == ["milvus"]
    assert command(milvus) == ["milvus", "run", "standalone"]
    env = environment(milvus)
    assert env["ETCD_USE_EMBED"] == "true" and env["COMMON_STORAGETYPE"] == "local", "no etcd or MinIO containers"
    volume = mounts(milvus)["/var/lib/milvus"]
    assert is_named_volume(volume) and volume in compose["volumes"]
    assert env["ETCD_DATA_DIR"].startswith("/var/lib/milvus/"), "etcd's data on the volume too"
    probe = " ".join(milvus["healthcheck"]["test"])
    assert "localhost:9091/healthz" in probe


def test_milvus_indexers_are_one_consumer_group_scaled_with_replicas(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    indexer = service(compose, "milvus-indexer")
    _, settings = clipdex_settings(indexer, monkeypatch)
    assert command(indexer)[1] == "consume" and indexer["profiles"] == ["milvus"]
    assert settings.store == "milvus"
    assert settings.milvus_uri == "http://milvus:19530", "the milvus service, on its gRPC port"
    assert settings.milvus_token is None, "empty means none"
    assert int(indexer["deploy"]["replicas"]) >= 2, "several members of one group"
    assert indexer["depends_on"]["milvus"]["condition"] == "service_healthy"
    assert f'"{settings.kafka_topic}"' in " ".join(command(service(compose, "topics")))
    assert "data" not in mounts(indexer).values(), "no shared data volume: the store is Milvus"
    gpu = yaml.safe_load(MILVUS_GPU_OVERRIDE.read_text(encoding="utf-8"))["services"]["milvus-indexer"]
    assert gpu["build"]["args"]["FLAVOR"] == "cuda" and gpu["environment"]["CLIPDEX_DEVICE"] == "cuda"
    assert any("gpu" in d["capabilities"] for d in gpu["deploy"]["resources"]["reservations"]["devices"])


def test_milvus_search_replicas_are_stateless_and_probed_on_health(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    search = service(compose, "milvus-search")
    args, settings = clipdex_settings(search, monkeypatch)
    assert args.command == "serve" and search["profiles"] == ["milvus"]
    assert settings.store == "milvus" and settings.milvus_uri == "http://milvus:19530"
    assert settings.host == "0.0.0.0" and settings.api_token is not None
    assert int(search["deploy"]["replicas"]) >= 2
    assert "data" not in mounts(search).values(), "a replica holds no state"
    host_ports = search["ports"][0].rsplit(":", 1)[0].rsplit(":", 1)[1]
    low, high = (int(p) for p in host_ports.split("-"))
    assert high - low + 1 >= int(search["deploy"]["replicas"]), "a host port for each replica"
    assert f"127.0.0.1:{settings.port}/health" in search["healthcheck"]["test"][-1]
    with monkeypatch.context() as m:
        _, indexer = clipdex_settings(service(compose, "milvus-indexer"), m)
    # The collection is derived from the model: indexers and replicas must name the same one.
    same = ("model", "pretrained", "milvus_uri", "milvus_db", "milvus_collection")
    assert {f: getattr(settings, f) for f in same} == {f: getattr(indexer, f) for f in same}


def test_the_sqlite_server_and_the_milvus_profile_never_run_together(compose: dict[str, Any]) -> None:
    assert set(service(compose, "server")["profiles"]) == {"gpu", "cpu"}
    for name in ("milvus", "milvus-indexer", "milvus-search"):
        assert service(compose, name)["profiles"] == ["milvus"]


# -- the image ------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_image_flavors_user_and_mount_points_match_compose(compose: dict[str, Any]) -> None:
    instructions = dockerfile_instructions()
    args = {a.split("=", 1)[0]: a.partition("=")[2] for kind, a in instructions if kind == "ARG"}
    assert args["FLAVOR"] == "cpu", "a plain `docker build .` gives the slim CPU image"
    run_text = " ".join(a for kind, a in instructions if kind == "RUN")
    for svc in compose["services"].values():
        build = svc.get("build")
        if build:
            assert set(build.get("args", {})) <= set(args), "compose passes a build argument the image lacks"
            flavor = build["args"]["FLAVOR"]
            assert f"{flavor})" in run_text, f"the Dockerfile has no branch for FLAVOR={flavor}"
            assert svc["image"].endswith(f":{flavor}"), "one tag per flavor, so the two never overwrite"
    assert "faiss-gpu" in run_text and "uninstall -y faiss-cpu" in run_text, "cuda swaps faiss-cpu for faiss-gpu"

    final_stage = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    users = [a for k, a in final_stage if k == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image runs as a non-root user"
    # Named volumes start out with the owner of the image's mount point: it must be the image's user.
    chowned = " ".join(a for k, a in final_stage if k == "RUN")
    for name in (*CLIPDEX_SERVICES, "seed"):
        for target, source in mounts(compose["services"][name]).items():
            if is_named_volume(source):
                assert re.search(rf"chown [^;&]*{re.escape(target)}\b", chowned), f"{target} not owned by the user"
    # No weights in the image: nothing downloads a model at build time.
    for forbidden in ("create_model", "hf_hub_download", "hf download", "huggingface-cli", "snapshot_download"):
        assert forbidden not in run_text


def dockerignored(path: str) -> bool:
    """Whether `docker build` leaves `path` out of the context (last matching pattern wins)."""
    ignored = False
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.removeprefix("**/")) for p in prefixes):
            ignored = not negate
    return ignored


def test_the_build_context_has_what_the_image_copies_and_nothing_heavy_or_secret() -> None:
    for kind, arguments in dockerfile_instructions():
        if kind == "COPY" and "--from=" not in arguments:
            for source in arguments.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
                assert not dockerignored(source), f"COPY {source}, but .dockerignore leaves it out"
    # pyproject.toml names README.md as the readme: `pip install .` needs it.
    assert not dockerignored("README.md") and not dockerignored("pyproject.toml")
    for heavy in (".git/HEAD", ".venv/bin/python", "clipdex-data/clipdex.sqlite3", ".env", "images/a.jpg"):
        assert dockerignored(heavy), f"{heavy} would be sent to the Docker daemon"


# -- the example event producer (the `seed` service) ----------------------------------------------------


def produce_events_module() -> ModuleType:
    path = ROOT / "examples" / "produce_events.py"
    spec = importlib.util.spec_from_file_location("produce_events", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("produce_events", module)
    spec.loader.exec_module(module)
    return module


def test_example_events_are_valid_and_point_at_readable_images(tmp_path: Path) -> None:
    events = produce_events_module().build_events(tmp_path / "images", count=6)
    assert len(events) == 6 and len({e.key for e in events}) == 6
    for example in events:
        key, value = example.encoded()
        event = parse_event(value, key)
        assert event.op == "upsert" and event.id == key.decode()
        assert event.uri is not None
        image = decode_image(Path(event.uri).read_bytes(), max_pixels=64_000_000)
        assert image.mode == "RGB"
        assert event.metadata["colour"] in event.metadata["caption"]


@pytest.mark.parametrize("fmt", ["clipdex", "debezium", "cloudevents-structured", "cloudevents-binary", "products"])
def test_example_events_of_every_format_parse_with_the_settings_the_producer_names(tmp_path: Path, fmt: str) -> None:
    from indexer.formats import Incoming, format_from_settings
    from indexer.products import Product
    from shared.config import load_settings

    module = produce_events_module()
    assert fmt in module.FORMATS
    events = module.build_events(tmp_path / "images", count=6, fmt=fmt)
    env = module.consumer_settings(fmt)
    settings = load_settings(
        event_format=env.get("CLIPDEX_EVENT_FORMAT", "clipdex"), event_map=env.get("CLIPDEX_EVENT_MAP")
    )
    reader = format_from_settings(settings)
    parsed = []
    for example in events:
        key, value = example.encoded()
        parsed += reader.parse(Incoming(value, key, tuple(example.headers)))
    images = [i for p in parsed if isinstance(p, Product) for i in p.images] + [
        p for p in parsed if not isinstance(p, Product) and p.op == "upsert"
    ]
    for image in images:
        assert image.uri is not None and Path(image.uri).is_file()
        assert image.metadata["colour"] in image.metadata.get("caption", image.metadata.get("title"))
    if fmt == "products":
        assert [len(p.images) for p in parsed] == [3, 3]  # type: ignore[union-attr]
    if fmt == "debezium":  # a snapshot, a title-only update, a new image, a delete and its tombstone (skipped)
        assert len(events) == 10 and [p.op for p in parsed] == ["upsert"] * 8 + ["delete"]
    if fmt == "cloudevents-binary":
        assert all(dict(e.headers)["ce_specversion"] == b"1.0" for e in events)


def test_seed_service_writes_where_the_indexer_may_read(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = service(compose, "seed")
    assert seed["profiles"] == ["examples"], "example events only when asked for"
    cmd = command(seed)
    assert cmd[:2] == ["python", "/app/examples/produce_events.py"]
    args = produce_events_module().build_parser().parse_args(cmd[2:])
    indexer = service(compose, "indexer")
    _, settings = clipdex_settings(indexer, monkeypatch)
    assert args.topic == settings.kafka_topic
    assert args.bootstrap_servers == settings.kafka_bootstrap_servers
    seed_volume = next(
        (src, tgt) for tgt, src in mounts(seed).items() if args.images_dir.is_relative_to(tgt) and is_named_volume(src)
    )
    assert mounts(indexer).get(seed_volume[1]) == seed_volume[0], "the indexer mounts the seed's images"
    assert any(args.images_dir.is_relative_to(root) for root in settings.allowed_roots)


@pytest.mark.integration
async def test_example_producer_publishes_to_a_real_broker(tmp_path: Path) -> None:
    from aiokafka import AIOKafkaConsumer

    from tests.brokers import TansuBroker, create_topic, unique_topic

    module = produce_events_module()
    broker = TansuBroker()
    try:
        topic = unique_topic("examples")
        await create_topic(broker.bootstrap, topic, partitions=1)
        events = module.build_events(tmp_path / "images", count=3)
        await module.publish(broker.bootstrap, topic, events, wait_s=10)
        binary_topic = unique_topic("examples-ce")
        await create_topic(broker.bootstrap, binary_topic, partitions=1)
        binary = module.build_events(tmp_path / "ce", count=2, fmt="cloudevents-binary")
        await module.publish(broker.bootstrap, binary_topic, binary, wait_s=10)
        got: list[tuple[bytes, bytes]] = []
        headers: list[list[tuple[str, bytes]]] = []
        for name, expected in ((topic, 3), (binary_topic, 2)):
            consumer = AIOKafkaConsumer(name, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest")
            await consumer.start()
            try:
                read: list[Any] = []
                for _ in range(50):
                    batch = await consumer.getmany(timeout_ms=200)
                    read += [r for records in batch.values() for r in records]
                    if len(read) >= expected:
                        break
            finally:
                await consumer.stop()
            if name == topic:
                got = [(r.key, r.value) for r in read]
            else:
                headers = [list(r.headers) for r in read]
    finally:
        broker.close()
    assert sorted(got) == sorted(e.encoded() for e in events)
    assert all(parse_event(value, key).op == "upsert" for key, value in got)
    assert headers == [e.headers for e in binary]  # binary-mode CloudEvents keep their ce_* headers
