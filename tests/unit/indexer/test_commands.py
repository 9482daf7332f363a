"""The indexer's commands in process, through the real parser and settings: the store commands on the
Milvus store (`index` twice, then after a rename and a delete, `status`, `compact`, `dlq`, `search`,
`similar`; the same on the SQLite store, and what only a process shows, are tested in
tests/integration/test_cli_index.py and tests/unit/tools/test_commands.py); and a dead letter read back as
its source first sent it, in its event format."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image

from clipdex import cli
from clipdex.cli import build_parser
from clipdex.synthetic import write_folder
from indexer.events import Event
from indexer.formats import Incoming, event_format
from indexer.products import Product
from indexer.records import Redelivery
from indexer.redeliver import retry_records
from shared.cliargs import setting_overrides
from shared.config import load_settings
from shared.roles import DeadLetter
from tests.catalog_events import GALLERY_MAP, PRODUCTS_MAP, cloudevent, debezium, product_row
from tests.conftest import milvus_env
from tests.milvus import unique_collection

Run = Callable[..., tuple[int, str]]


@pytest.fixture
def run(milvus_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Run:
    """`run("index", DIR)` -> (exit code, stdout), on a collection of this test's own."""
    env = milvus_env(tmp_path / "scratch", milvus_uri, unique_collection())
    for key, value in env.items():
        if key.startswith("CLIPDEX_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)

    def call(*argv: str) -> tuple[int, str]:
        args = build_parser().parse_args(list(argv))
        capsys.readouterr()
        code = args.func(args, load_settings(**setting_overrides(args)))
        return code, capsys.readouterr().out

    return call


def test_index_status_dlq_and_searches_on_milvus(run: Run, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    write_folder(root, 4, seed=1, size=(64, 48))
    (root / "broken.jpg").write_text("not a JPEG")

    code, out = run("index", "--no-progress", str(root))
    assert code == 0 and "indexed 4 (embedded 4" in out and "failed 1" in out
    code, out = run("index", "--no-progress", str(root))
    assert code == 0 and "unchanged 4" in out and "1 files failed at an earlier run" in out

    first, second = sorted(p.name for p in root.glob("*.jpg") if p.name != "broken.jpg")[:2]
    (root / first).rename(root / "renamed.jpg")
    (root / second).unlink()
    code, out = run("index", "--no-progress", str(root))
    assert code == 0 and "reused 1 without a model call" in out and "deleted 2" in out

    code, out = run("status", "--json")
    status = json.loads(out)
    assert (status["items"], status["failed"], status["dead_letters"]) == (3, 1, 1)
    assert status["newest_indexed_at"] is not None and status["indexers"][0]["state"] == "stopped"

    code, out = run("compact")
    assert code == 0
    assert "Milvus compacts its segments by itself" in out

    code, out = run("search", "a photo", "--json", "--top-k", "10")
    hits = json.loads(out)
    assert {h["id"] for h in hits} == {
        "folder:photos/renamed.jpg",
        *(f"folder:photos/{p.name}" for p in root.glob("*.jpg") if p.name not in ("broken.jpg", "renamed.jpg")),
    }
    code, out = run("similar", "--id", "folder:photos/renamed.jpg", "--json")
    assert "folder:photos/renamed.jpg" not in {h["id"] for h in json.loads(out)} and len(json.loads(out)) == 2

    code, out = run("dlq", "list", "--json")
    (letter,) = json.loads(out)
    assert letter["item_id"] == "folder:photos/broken.jpg"
    pixels = io.BytesIO()
    Image.new("RGB", (40, 30), (0, 90, 200)).save(pixels, format="JPEG")
    (root / "broken.jpg").write_bytes(pixels.getvalue())  # the user fixes the file
    code, out = run("dlq", "retry", str(letter["id"]))
    assert code == 0 and "1 done, 0 failed again" in out
    code, out = run("dlq", "list")
    assert "no dead letters" in out
    code, out = run("status", "--json")
    assert (json.loads(out)["items"], json.loads(out)["failed"]) == (4, 0)


# -- dead letters read back in their event format -------------------------------------------------------


def letter(payload: str, item_id: str | None = None, source: str = "kafka") -> DeadLetter:
    return DeadLetter(1, source, item_id, payload, "reason", 1, datetime.now(UTC))


def test_a_debezium_dead_letter_is_read_again_as_a_debezium_change() -> None:
    fmt = event_format("debezium", json.dumps(PRODUCTS_MAP))
    row = product_row(1, "A-1", "Shoe", "https://cdn.shop.example/a.jpg")
    (record,) = retry_records(letter(debezium("u", None, row, lsn=42).decode(), "kafka:A-1"), fmt)
    assert isinstance(record.event, Event)
    assert (record.event.id, record.event.version) == ("A-1", 42)
    gallery = event_format("debezium", json.dumps(GALLERY_MAP))
    row = product_row(1, "A-1", "Shoe", images=["https://cdn.shop.example/a.jpg"])
    (record,) = retry_records(letter(debezium("c", None, row, lsn=43).decode(), "kafka:A-1#0123456789abcdef"), gallery)
    assert isinstance(record.event, Product) and record.event.id == "A-1"  # the whole product again
    assert record.position == Redelivery(1, 2)  # its next delivery: automatic retries count it
    renamed = product_row(1, "A-2", "Shoe", "https://cdn.shop.example/a.jpg")
    old = product_row(1, "A-1", "Shoe", "https://cdn.shop.example/a.jpg")
    records = retry_records(letter(debezium("u", old, renamed, lsn=44).decode(), "kafka:A-2"), fmt)
    assert [(r.event.op, r.event.id) for r in records if r.event] == [("delete", "A-1"), ("upsert", "A-2")]
    assert {r.position for r in records} == {Redelivery(1, 2)}  # one letter, read as two events


def test_a_binary_cloudevent_dead_letter_is_kept_structured_and_read_back() -> None:
    fmt = event_format("cloudevents", json.dumps({"id": "/sku", "uri": "/image"}))
    value, headers = cloudevent("t", {"sku": "B-1", "image": "b.jpg"}, event_id="e", binary=True)
    payload = fmt.raw(Incoming(value, None, tuple(headers)))
    (record,) = retry_records(letter(payload, "kafka:B-1"), fmt)
    assert record.event == Event(op="upsert", id="B-1", uri="b.jpg")


def test_clipdex_events_keep_the_key_as_id_and_folder_letters_are_clipdex_events() -> None:
    (record,) = retry_records(letter('{"op": "delete"}', "kafka:sku-1"), event_format("clipdex"))
    assert record.event == Event(op="delete", id="sku-1")
    folder = json.dumps({"op": "upsert", "id": "a.jpg", "uri": "/photos/a.jpg"})
    (record,) = retry_records(
        letter(folder, "folder:a.jpg", "folder"), event_format("debezium", json.dumps(PRODUCTS_MAP))
    )
    assert record.event == Event(op="upsert", id="a.jpg", uri="/photos/a.jpg")
    (bad,) = retry_records(letter("{not json", "kafka:x"), event_format("cloudevents"))
    assert bad.event is None and "not JSON" in (bad.error or "")
