"""`clipdex search` and `clipdex similar`, run in process against a filled store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipdex import cli
from shared.embedder import Embedder
from shared.sqlite.store import SqliteStore
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
