"""The README and the examples say what the code does: checked against the code, so the docs cannot drift.

- The configuration table is generated from Settings (scripts/gen_config_table.py) and must be current.
- Every CLIPDEX_* variable the docs mention is a real setting.
- Every `clipdex ...` command the docs show parses with the real CLI; every `make` target exists.
- Every HTTP request the docs show is answered by the real app (built on an empty store with the tiny
  model) as a known route with accepted parameters: no 404 "no such endpoint", no 400 for a parameter.
- JSON examples parse: events with the real event parser, MCP client configs, the search result shape.
- Links to files and to sections resolve.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from clipdex.cli import build_parser
from indexer.events import parse_event
from indexer.records import BatchReport
from shared.config import Settings, env_name

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("**/*.md")), *sorted((ROOT / "examples").glob("**/*.*"))]
SETTING_VARS = {env_name(name) for name in Settings.model_fields}


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int


def code_blocks(markdown: str) -> list[Block]:
    blocks = []
    for match in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", markdown, re.MULTILINE | re.DOTALL):
        indent = len(match[1])
        text = "\n".join(line[indent:] for line in match[3].splitlines())
        blocks.append(Block(match[2], text, markdown.count("\n", 0, match.start()) + 1))
    return blocks


def shell_commands(markdown: str) -> Iterator[tuple[Block, list[str]]]:
    """Each command of each sh block, split like a shell (comments dropped, continuations joined,
    leading VAR=value assignments removed)."""
    for block in code_blocks(markdown):
        if block.lang != "sh":
            continue
        for line in block.text.replace("\\\n", " ").splitlines():
            for part in line.split(";"):
                words = shlex.split(part, comments=True)
                while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                    words.pop(0)
                if words:
                    yield block, words


def readme() -> str:
    return README.read_text(encoding="utf-8")


# -- configuration ----------------------------------------------------------------------------------------


def test_configuration_table_is_generated_from_the_settings() -> None:
    import scripts.gen_config_table as gen

    text = readme()
    assert gen.replace_table(text, gen.config_table()) == text, (
        "README.md's configuration table differs from shared/config.py: run python scripts/gen_config_table.py --write"
    )
    table = text.split(gen.BEGIN, 1)[1].split(gen.END, 1)[0]
    listed = re.findall(r"^\| `(CLIPDEX_[A-Z0-9_]+)` \|", table, re.MULTILINE)
    assert sorted(listed) == sorted(SETTING_VARS), "one row per setting"


def test_a_stale_table_is_detected_and_rewritten() -> None:
    import scripts.gen_config_table as gen

    stale = readme().replace("| `CLIPDEX_BATCH_SIZE` | `64` |", "| `CLIPDEX_BATCH_SIZE` | `32` |")
    assert gen.replace_table(stale, gen.config_table()) == readme()
    assert stale != readme()


def test_every_clipdex_variable_in_the_docs_is_a_setting() -> None:
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        unknown = set(re.findall(r"CLIPDEX_[A-Z][A-Z0-9_]*", text)) - SETTING_VARS
        assert not unknown, f"{path.relative_to(ROOT)} mentions variables that are not settings: {sorted(unknown)}"


# -- commands ---------------------------------------------------------------------------------------------


def documented_clipdex_commands() -> list[str]:
    """Whole commands: the README's sh blocks and the MCP client configs' command lines."""
    commands = [shlex.join(words) for _, words in shell_commands(readme()) if words[0] == "clipdex"]
    for path in sorted((ROOT / "examples" / "mcp").glob("*.json")):
        server = json.loads(path.read_text(encoding="utf-8"))["mcpServers"]["clipdex"]
        if "command" in server:
            commands.append(shlex.join(["clipdex", *server["args"]]))
    return sorted(set(commands))


@pytest.mark.parametrize("command", documented_clipdex_commands())
def test_documented_command_parses_with_the_real_cli(command: str) -> None:
    words = shlex.split(command)
    try:
        build_parser().parse_args(words[1:])
    except SystemExit as exc:
        pytest.fail(f"README documents `{command}`, but the CLI rejects it (exit {exc.code})")


def test_commands_named_in_prose_exist() -> None:
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices  # argparse keeps them here
    assert subcommands is not None
    named = set(re.findall(r"`(?:[A-Z_]+=\S+ )*clipdex ([a-z]+)", readme()))
    named |= set(re.findall(r"`clipdex [a-z]+` \(or ((?:`[a-z]+`(?:, )?)+)\)", readme()))
    named = {n.strip("`") for group in named for n in group.split(", ")}
    missing = sorted(named - set(subcommands))
    assert not missing, f"README names clipdex commands that do not exist: {missing}"


def test_the_two_commands_are_make_targets_and_ci_runs_the_same() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.MULTILINE))
    for _, words in shell_commands(readme()):
        if words[0] == "make":
            wanted = [w for w in words[1:] if "=" not in w]
            assert set(wanted) <= targets, f"`{shlex.join(words)}`: no such make target"
            for assignment in (w for w in words[1:] if "=" in w):
                assert re.search(rf"^{assignment.split('=')[0]}\s*\?=", makefile, re.MULTILINE)
    assert re.search(r"^run: .*\n\t.*clipdex run \$\(DIR\)", makefile, re.MULTILINE)
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    head = readme().split("## ", 1)[0]
    assert "make run DIR=" in head and "make test" in head, "the two commands come first"


def test_documented_compose_services_and_profiles_exist() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    profiles = {p for svc in services.values() for p in svc.get("profiles", [])}
    for _, words in shell_commands(readme()):
        if words[:2] != ["docker", "compose"]:
            continue
        args = words[2:]
        for i, word in enumerate(args):
            if word == "--profile":
                assert args[i + 1] in profiles
            if word in ("run", "exec"):
                rest = [a for a in args[i + 1 :] if not a.startswith("-")]
                assert rest and rest[0] in services, f"`{shlex.join(words)}`: no such service"
    for word in re.findall(r"`(indexer(?:-cpu)?|server|seed|kafka|topics)`", readme()):
        assert word in services


def test_documented_scripts_exist() -> None:
    for block, words in shell_commands(readme()):
        if words[0] != "python" or len(words) < 2:
            continue
        if words[1] == "-m":
            path = ROOT / (words[2].replace(".", "/") + ".py")
        elif words[1].endswith(".py"):
            path = ROOT / words[1]
        else:
            continue
        assert path.is_file(), f"README line {block.line} runs {shlex.join(words)}, but {path} does not exist"


def test_documented_build_arguments_exist() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    args = set(re.findall(r"^ARG (\w+)", dockerfile, re.MULTILINE))
    documented = set(re.findall(r"--build-arg (\w+)=", readme())) | set(re.findall(r"`(FLAVOR)=", readme()))
    assert documented and documented <= args, f"README names build arguments the Dockerfile lacks: {documented - args}"


# -- HTTP -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curl:
    method: str
    path: str  # with its query string
    files: dict[str, str]  # -F name=@file
    fields: dict[str, str]  # -F name=value
    json: str | None  # --json '...'


def documented_requests() -> list[Curl]:
    """Every curl command of the README, with $URL expanded: its method, path, form parts and JSON body."""
    requests = []
    for block in code_blocks(readme()):
        if block.lang != "sh" or "curl" not in block.text:
            continue
        for line in block.text.replace("\\\n", " ").splitlines():
            if not line.lstrip().startswith("curl"):
                continue
            words = shlex.split(line.replace("$URL", "http://127.0.0.1:8765"), comments=True)
            url = next((w for w in words if w.startswith("http://")), None)
            assert url, f"README line {block.line}: a curl without a URL: {line}"
            files, fields, body = {}, {}, None
            for flag, value in itertools.pairwise(words):
                if flag == "-F":
                    name, _, part = value.partition("=")
                    (files if part.startswith("@") else fields)[name] = part.removeprefix("@")
                elif flag in ("--json", "-d"):
                    body = value
            method = "POST" if files or fields or body is not None else "GET"
            requests.append(Curl(method, url[len("http://127.0.0.1:8765") :], files, fields, body))
    return requests


def test_readme_shows_every_http_endpoint() -> None:
    paths = {re.sub(r"\?.*", "", r.path) for r in documented_requests()}
    for endpoint in ("/search", "/similar", "/health", "/metrics"):
        assert endpoint in paths
    assert any(p.startswith("/items/") and p.endswith("/thumbnail") for p in paths)
    assert any(p.startswith("/items/") and not p.endswith("/thumbnail") for p in paths)
    assert {(r.method, r.path.split("?")[0], bool(r.files)) for r in documented_requests()} >= {
        ("POST", "/similar", True),
        ("POST", "/search", True),
        ("POST", "/search", False),
    }


def test_documented_http_requests_hit_real_routes_with_accepted_parameters(tmp_path: Path) -> None:
    from PIL import Image
    from starlette.testclient import TestClient

    from shared.core import build_core
    from tests.conftest import tiny_settings_for
    from tools.app import build_app

    token = "YOUR_TOKEN"
    assert f"Bearer {token}" in readme(), "the README's examples send the bearer token"
    settings = tiny_settings_for(tmp_path / "data", api_token=token, allowed_roots=[str(tmp_path)])
    core = build_core(settings)
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(jpeg, format="JPEG")
    try:
        with TestClient(build_app(core, settings), base_url="http://127.0.0.1:8765") as client:
            for curl in documented_requests():
                method, path = curl.method, curl.path
                files = {name: (name, jpeg.getvalue(), "image/jpeg") for name in curl.files} or None
                headers = {"Authorization": f"Bearer {token}"}
                if curl.json is not None:
                    headers["content-type"] = "application/json"
                content = curl.json.encode() if curl.json is not None else None
                response = client.request(
                    method, path, files=files, data=curl.fields or None, content=content, headers=headers
                )
                body = response.text
                # An empty store answers 404 for an unknown item: that is a known route, not a wrong one.
                assert "no such endpoint" not in body and response.status_code not in (400, 405, 421), (
                    f"README's `{method} {path}` -> {response.status_code} {body[:300]}"
                )
                assert response.status_code in (200, 404), f"{method} {path} -> {response.status_code} {body[:300]}"
    finally:
        core.close()


# -- operations -------------------------------------------------------------------------------------------


def test_documented_metrics_and_batch_log_fields_exist() -> None:
    source = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "tools").glob("*.py")))
    documented = set(re.findall(r"`(clipdex_[a-z_]+)`", readme()))
    assert documented, "the README names the metrics"
    missing = sorted(n for n in documented if f'"{n}"' not in source)
    assert not missing, f"README names metrics the server does not export: {missing}"

    example = next(b.text for b in code_blocks(readme()) if b.text.startswith("batch source="))
    indexer_source = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "indexer").glob("**/*.py")))
    formats = re.findall(r'"(batch source=[^"]*)"', indexer_source)
    assert formats, "the indexer logs one line per batch"
    for fmt in formats:  # each source's line: its own fields around the report's (`%s`)
        logged = re.findall(r"(\w+)=", fmt.replace("%s", BatchReport().log_fields(), 1))
        assert re.findall(r"(\w+)=", example) == logged, "the README's batch line has the logged fields"


# -- JSON examples --------------------------------------------------------------------------------------


def section(markdown: str, heading: str) -> str:
    """The text under `heading` (a line starting with it), up to the next heading of the same level."""
    level = len(heading.split(" ", 1)[0])
    start = markdown.index("\n" + heading) + 1
    end = re.compile(rf"^#{{1,{level}}} ", re.MULTILINE).search(markdown, start + len(heading))
    return markdown[start : end.start() if end else len(markdown)]


def test_event_examples_parse_with_the_real_event_schema() -> None:
    lines = [ln for ln in (ROOT / "examples" / "events.jsonl").read_text(encoding="utf-8").splitlines() if ln]
    readme_events = []
    for block in code_blocks(section(readme(), "## Events")):
        if block.lang == "json" and '"op"' in block.text:
            # One event per line, or one event spread over lines.
            try:
                readme_events.append(json.dumps(json.loads(block.text)))
            except json.JSONDecodeError:
                readme_events += [ln for ln in block.text.splitlines() if ln.strip()]
    assert readme_events, "the README shows example events"
    ops = set()
    for raw in [*lines, *readme_events]:
        event = parse_event(raw)
        ops.add(event.op)
    assert ops == {"upsert", "delete"}


def test_mcp_client_configs_are_valid_json_of_the_documented_shape() -> None:
    blocks = [b for b in code_blocks(readme()) if b.lang == "json" and "mcpServers" in b.text]
    files = sorted((ROOT / "examples" / "mcp").glob("*.json"))
    configs = [json.loads(b.text) for b in blocks] + [json.loads(p.read_text(encoding="utf-8")) for p in files]
    assert len(blocks) == 2 and len(files) == 2
    stdio = [c["mcpServers"]["clipdex"] for c in configs if "command" in c["mcpServers"]["clipdex"]]
    remote = [c["mcpServers"]["clipdex"] for c in configs if "url" in c["mcpServers"]["clipdex"]]
    assert len(stdio) == 2 and len(remote) == 2
    for server in stdio:
        assert server["command"].endswith("clipdex") and server["args"] == ["mcp"]
        assert set(server.get("env", {})) <= SETTING_VARS
        assert all(Path(v).is_absolute() for v in server.get("env", {}).values() if "/" in v)
    for server in remote:
        assert server["url"].endswith(":8765/mcp")
        assert server["headers"]["Authorization"].startswith("Bearer ")


def test_search_result_example_has_the_real_shape() -> None:
    from tools.schemas import SearchOutput

    examples = [b for b in code_blocks(readme()) if b.lang == "json" and '"hits"' in b.text]
    assert len(examples) == 1
    SearchOutput.model_validate_json(examples[0].text)


# -- links ----------------------------------------------------------------------------------------------


def github_anchor(heading: str) -> str:
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_links_to_files_and_sections_resolve() -> None:
    text = readme()
    anchors = {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        if target.startswith("#"):
            assert target[1:] in anchors, f"README links to a missing section {target}"
        else:
            assert (ROOT / target.split("#")[0]).exists(), f"README links to a missing file {target}"


def test_json_blocks_parse() -> None:
    for block in code_blocks(readme()):
        if block.lang == "json":
            try:
                json.loads(block.text)
            except json.JSONDecodeError:
                for line in block.text.splitlines():  # one JSON document per line
                    if line.strip():
                        json.loads(line)


def test_the_limits_table_states_the_limits_in_the_code() -> None:
    from indexer import events
    from shared.search import MAX_QUERY_CHARS

    text = readme()
    section = text[text.index("## Limits and security") :]
    section = section[: section.index("\n## ", 1)]
    assert "| Limit | Setting | What the caller sees |" in section
    for value in (
        events.MAX_EVENT_BYTES,
        events.MAX_ID_BYTES,
        events.MAX_URI_BYTES,
        events.MAX_METADATA_BYTES,
        MAX_QUERY_CHARS,
    ):
        assert f"{value:,}" in section, f"{value:,} is a limit in the code but not in README's Limits table"
    assert f"nests at most {events.MAX_EVENT_DEPTH} levels" in section
    assert f"its `metadata` {events.MAX_METADATA_DEPTH}" in section
    from indexer import products
    from indexer.formats import cloudevents

    assert f"nests at most {events.MAX_ENVELOPE_DEPTH} levels" in section
    assert f"at most {products.MAX_IMAGES} images; its id at most {products.MAX_PRODUCT_ID_BYTES:,} bytes" in section
    assert f"at most {cloudevents.MAX_HEADERS}, together at most {cloudevents.MAX_HEADER_BYTES:,} bytes" in section


def test_the_limits_table_states_the_retry_policy_the_writer_lock_and_the_store_failure_as_coded() -> None:
    from indexer.redeliver import MAX_DELAY_S
    from shared.lockfile import PREFIX
    from tools.http_api import STORE_RETRY_AFTER_S
    from tools.redaction import STORE_UNAVAILABLE

    defaults = Settings.model_fields
    text = readme()
    section = text[text.index("## Limits and security") :]
    section = section[: section.index("\n## ", 1)]
    retries, delay = defaults["dlq_retries"].default, defaults["dlq_retry_delay_s"].default
    assert f"{retries} more attempts, the first after {delay:.0f} s" in section
    assert f"at most {MAX_DELAY_S // 3600} hours" in section
    assert f"`<data dir>/{PREFIX}folder-<digest>.lock`, `{PREFIX}kafka.lock`" in section
    assert f"503 `{STORE_UNAVAILABLE}` with `Retry-After: {STORE_RETRY_AFTER_S}`" in section


FORMAT_OF_SECTION = {
    "### Debezium change data": "debezium",
    "### CloudEvents": "cloudevents",
    "### A product with several images": "clipdex",
}


@pytest.mark.parametrize("heading", sorted(FORMAT_OF_SECTION))
def test_event_format_examples_parse_with_their_map(heading: str) -> None:
    """Each example event of an Event formats section parses, with the section's map, into events (a
    binary-mode CloudEvent: its headers block, then its value)."""
    from indexer.formats import Incoming, event_format

    blocks = code_blocks(section(readme(), heading))
    maps = [
        json.loads(b.text) for b in blocks if b.lang == "json" and str(json.loads(b.text).get("id", "")).startswith("/")
    ]
    assert len(maps) == 1, f"{heading}: one map"
    fmt = event_format(FORMAT_OF_SECTION[heading], json.dumps(maps[0]))  # type: ignore[arg-type]
    parsed = []
    headers: tuple[tuple[str, bytes], ...] = ()
    for block in blocks:
        if block.lang == "text":
            headers = tuple(
                (k.strip(), v.strip().encode()) for k, v in (ln.split(":", 1) for ln in block.text.splitlines())
            )
        elif block.lang == "json" and json.loads(block.text) is not maps[0] and json.loads(block.text) != maps[0]:
            (event,) = fmt.parse(Incoming(json.dumps(json.loads(block.text)).encode(), None, headers))
            parsed.append(event)
            headers = ()
    assert parsed, heading
    if heading == "### A product with several images":
        assert len(parsed[0].images) == 3  # type: ignore[union-attr]
    if heading == "### CloudEvents":
        assert [p.op for p in parsed] == ["upsert", "delete"]  # type: ignore[union-attr]
