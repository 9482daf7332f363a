"""`clipdex search` and `clipdex similar`, run in process against a filled store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipdex import cli
from shared.embedder import Embedder
from shared.roles import Upsert
from shared.sqlite.store import SqliteStore
from shared.types import image_id
from tests.conftest import tiny_env
from tests.sample_store import Sample, fill_store


@pytest.fixture
def catalog(tmp_path: Path, tiny_embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> Sample:
    data = tmp_path / "data"
    for name, value in tiny_env(data).items():
        if name.startswith("CLIPDEX_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)  # keep pytest's log capture
    with SqliteStore(data / "clipdex.sqlite3") as store:
        return fill_store(store, tiny_embedder, tmp_path / "images")


def test_search_json_prints_id_uri_score_metadata(catalog: Sample, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["search", "a red square", "--top-k", "4", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 4
    assert all(set(h) == {"id", "uri", "score", "metadata", "duplicates"} for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_search_filters_and_plain_output(catalog: Sample, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["search", "x", "--top-k", "100", "--filter", "category=shoes", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits and all(h["metadata"]["category"] == "shoes" for h in hits)
    assert cli.main(["search", "x", "--top-k", "2", "--source", "folder"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[1].startswith("folder:") for line in lines)


def test_similar_by_id_and_by_image(catalog: Sample, capsys: pytest.CaptureFixture[str]) -> None:
    target = catalog.image_ids["green"]
    assert cli.main(["similar", "--id", target, "--top-k", "100", "--json"]) == 0
    ids = [h["id"] for h in json.loads(capsys.readouterr().out)]
    assert target not in ids and len(ids) == catalog.searchable - 1
    assert cli.main(["similar", "--image", str(catalog.root / "green.png"), "--top-k", "1"]) == 0
    assert capsys.readouterr().out.split("\t")[1] == target


def test_errors_exit_2_with_the_reason(catalog: Sample, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["similar", "--id", "kafka:nope"]) == 2
    assert "no item with id 'kafka:nope'" in capsys.readouterr().err
    assert cli.main(["search", "x", "--top-k", "0"]) == 2
    assert "top_k must be a whole number from 1 to 100" in capsys.readouterr().err
    assert cli.main(["search", "x", "--filter", "nokey"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_search_like_unlike_and_weights(catalog: Sample, capsys: pytest.CaptureFixture[str]) -> None:
    red, green = catalog.image_ids["red"], catalog.image_ids["green"]
    assert cli.main(["search", "x", "--like", red, "--weight", "5", "--unlike", green, "--top-k", "100", "--json"]) == 0
    ids = [h["id"] for h in json.loads(capsys.readouterr().out)]
    assert red not in ids and green not in ids and len(ids) == catalog.searchable - 2
    image = str(catalog.root / "blue.png")
    assert cli.main(["search", "--like", image, "--top-k", "1"]) == 0  # an image file alone
    assert capsys.readouterr().out.split("\t")[1] == catalog.image_ids["blue"]
    assert cli.main(["search", "x", "--unlike", "people", "--weight", "0.3", "--top-k", "2"]) == 0  # text
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert cli.main(["search", "x", "--like", "kafka:nope"]) == 2
    assert "no stored item has that id, and no such file" in capsys.readouterr().err
    assert cli.main(["search"]) == 2
    assert "say what to look for" in capsys.readouterr().err


def test_pages_by_number_or_cursor_never_repeat(catalog: Sample, capsys: pytest.CaptureFixture[str]) -> None:
    pages = []
    for n in (1, 2, 3):
        assert cli.main(["search", "x", "--top-k", "5", "--page", str(n), "--json"]) == 0
        out = capsys.readouterr()
        pages.append([h["id"] for h in json.loads(out.out)])
        assert "more: --cursor " in out.err
    assert len({i for page in pages for i in page}) == 15
    assert cli.main(["search", "x", "--top-k", "15", "--json"]) == 0
    assert [h["id"] for h in json.loads(capsys.readouterr().out)] == [i for page in pages for i in page]
    assert cli.main(["search", "x", "--top-k", "5"]) == 0
    cursor = capsys.readouterr().err.split("more: --cursor ")[1].strip()
    assert cli.main(["search", "x", "--top-k", "5", "--cursor", cursor, "--json"]) == 0
    assert [h["id"] for h in json.loads(capsys.readouterr().out)] == pages[1]
    assert cli.main(["search", "x", "--top-k", "10", "--page", "101"]) == 2
    assert "--page is from 1 to 100" in capsys.readouterr().err


def test_collapse_parent_shows_a_product_once(
    catalog: Sample, tiny_embedder: Embedder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uris = [f"https://cdn.example/p-7/{side}.jpg" for side in ("front", "side", "back")]
    images = [image_id("kafka:P-7", uri) for uri in uris]
    with SqliteStore(tmp_path / "data" / "clipdex.sqlite3") as store:
        store.apply(
            upserts=[
                Upsert(i, "kafka", u, f"sha-{i}", {"parent": "P-7"}, tiny_embedder.encode_text(u).vector)
                for i, u in zip(images, uris, strict=True)
            ]
        )
    assert cli.main(["search", "x", "--top-k", "100", "--collapse", "parent", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    (product,) = [h for h in hits if h["metadata"].get("parent") == "P-7"]
    assert sorted([product["id"], *product["duplicates"]]) == sorted(images)
    assert len(hits) + sum(len(h["duplicates"]) for h in hits) == catalog.searchable + 3  # each shown once
