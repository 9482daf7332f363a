"""`clipdex index`, `watch`, `status` and `dlq` as a user runs them: real processes where the process is the
point (exit codes, signals, output), in-process parsing otherwise (each process start costs seconds)."""

from __future__ import annotations

import io
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from clipdex.cli import build_parser
from clipdex.synthetic import write_folder
from shared.cliargs import setting_overrides
from shared.config import load_settings
from shared.errors import ClipdexError
from shared.sqlite.store import SqliteStore
from tests.conftest import TINY_MODEL, tiny_env

pytestmark = pytest.mark.integration

CLIPDEX = [sys.executable, "-m", "clipdex"]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    write_folder(root, 4, seed=1, size=(96, 72))
    write_folder(root / "holidays", 1, seed=2, size=(96, 72), fmt="png", start=100)
    (root / "broken.jpg").write_text("this is a text file, not a JPEG")
    (root / "notes.txt").write_text("ignored: not an image name")
    return root


def clipdex(data: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLIPDEX, *args], env=tiny_env(data), capture_output=True, text=True, timeout=timeout, check=False
    )


def in_process(
    data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str]:
    """Run a command through the real parser and settings, without starting a process."""
    for key, value in tiny_env(data).items():
        if key.startswith("CLIPDEX_"):
            monkeypatch.setenv(key, value)
    args = build_parser().parse_args(list(argv))
    capsys.readouterr()
    code = args.func(args, load_settings(**setting_overrides(args)))
    return code, capsys.readouterr().out


def test_index_prints_a_summary_exits_0_and_a_second_run_finds_nothing_to_do(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    first = clipdex(data, "index", str(folder))
    assert first.returncode == 0, first.stderr
    assert "indexed 5 (embedded 5, reused 0" in first.stdout
    assert "failed 1" in first.stdout and "folder:photos/broken.jpg: ImageRejected: not an image" in first.stdout
    assert "6/6 (100%)" in first.stderr  # the progress bar
    assert "batch source=folder size=6" in first.stderr and "embed_ms=" in first.stderr  # one log line per batch

    (folder / "holidays" / "blue-copy.png").write_bytes((folder / "holidays").glob("*.png").__next__().read_bytes())
    second = clipdex(data, "index", str(folder))
    assert second.returncode == 0, second.stderr
    assert "reused 1 without a model call" in second.stdout and "unchanged 5" in second.stdout
    assert "1 files failed at an earlier run" in second.stdout

    code, out = in_process(data, monkeypatch, capsys, "status", "--json")
    status = json.loads(out)
    assert code == 0
    assert (status["items"], status["failed"], status["dead_letters"]) == (6, 1, 1)
    assert status["model"]["name"] == TINY_MODEL and status["generation"] == 0 and status["delta_size"] == 6
    assert status["newest_indexed_at"] and status["indexers"][0]["state"] == "stopped"

    code, out = in_process(data, monkeypatch, capsys, "compact")
    assert code == 0 and "main generation 1, 6 vectors" in out
    code, out = in_process(data, monkeypatch, capsys, "status")
    assert "main generation 1, delta 0 vectors" in out


def test_a_fixed_file_is_indexed_by_dlq_retry_and_purge_empties_the_dead_letters(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    code, _ = in_process(data, monkeypatch, capsys, "index", "--no-progress", str(folder))
    assert code == 0
    code, out = in_process(data, monkeypatch, capsys, "dlq", "list", "--json")
    (letter,) = json.loads(out)
    assert letter["item_id"] == "folder:photos/broken.jpg" and "not an image" in letter["reason"]

    pixels = io.BytesIO()
    Image.new("RGB", (40, 30), (0, 90, 200)).save(pixels, format="JPEG")
    (folder / "broken.jpg").write_bytes(pixels.getvalue())  # the user fixes the file
    (folder / "gone.jpg").write_text("also broken")
    code, _ = in_process(data, monkeypatch, capsys, "index", "--no-progress", str(folder))
    (folder / "gone.jpg").unlink()
    code, out = in_process(data, monkeypatch, capsys, "dlq", "retry", str(letter["id"]))
    assert code == 0 and "1 done, 0 failed again" in out
    with SqliteStore(data / "clipdex.sqlite3") as store:
        item = store.get_item("folder:photos/broken.jpg")
        assert item is not None and item.status == "indexed"
        assert [d.item_id for d in store.dead_letters()] == ["folder:photos/gone.jpg"]
    code, out = in_process(data, monkeypatch, capsys, "dlq", "purge", "--all")
    assert code == 0 and "purged 1" in out
    code, out = in_process(data, monkeypatch, capsys, "dlq", "list")
    assert "no dead letters" in out


def test_a_store_failure_exits_non_zero_with_a_clear_message(folder: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    with SqliteStore(data / "clipdex.sqlite3") as store, sqlite3.connect(store.path) as db:
        db.execute(
            "CREATE TRIGGER full BEFORE INSERT ON items BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
    result = clipdex(data, "index", str(folder))
    assert result.returncode != 0
    assert "clipdex: error: store write failed" in result.stderr and "disk is full" in result.stderr
    with SqliteStore(data / "clipdex.sqlite3") as store:
        assert store.stats().vectors == 0  # nothing half-written


@pytest.fixture
def watch_process(folder: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], list[str], threading.Thread]]:
    env = tiny_env(tmp_path / "data") | {"CLIPDEX_WATCH_SETTLE_MS": "300"}
    proc = subprocess.Popen(
        [*CLIPDEX, "watch", str(folder)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        yield proc, lines, reader
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        reader.join(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def wait_for_line(lines: list[str], text: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        assert time.monotonic() < deadline, f"no {text!r} in:\n{''.join(lines)}"
        time.sleep(0.05)


def test_watch_indexes_new_files_and_sigterm_exits_0(
    watch_process: tuple[subprocess.Popen[str], list[str], threading.Thread], folder: Path
) -> None:
    proc, lines, reader = watch_process
    wait_for_line(lines, "the files found at start are indexed")
    write_folder(folder / "new", 2, seed=9, size=(64, 64))
    wait_for_line(lines, "indexed=2")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, "".join(lines)
    assert proc.stdout is not None
    out = proc.stdout.read()
    reader.join(timeout=10)
    assert "indexed 7" in out
    assert any("SIGTERM: finishing the batch in flight" in line for line in lines)


def cli(
    data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    """`clipdex ARGV` as `clipdex.cli.main` runs it (a ClipdexError: exit 2, its text on stderr), in this
    process, without configuring its logging."""
    try:
        code, out = in_process(data, monkeypatch, capsys, *argv)
    except ClipdexError as exc:
        return 2, capsys.readouterr().out, f"clipdex: error: {exc}"
    return code, out, ""


def test_one_writer_per_source_beside_others_and_a_killed_writer_blocks_no_restart(
    watch_process: tuple[subprocess.Popen[str], list[str], threading.Thread],
    folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proc, lines, _ = watch_process
    data = tmp_path / "data"
    wait_for_line(lines, "the files found at start are indexed")

    for argv in (("watch", str(folder)), ("index", str(folder))):  # the same folder: refused at once
        code, _, err = cli(data, monkeypatch, capsys, *argv)
        assert code == 2, err
        assert f"another clipdex process is already indexing the folder {folder} into {data}" in err
        assert f"pid {proc.pid} (`clipdex watch {folder}`)" in err and "stop it first" in err

    other = tmp_path / "other"  # another folder into the same store: beside it
    write_folder(other, 1, seed=5, size=(64, 64))
    code, out, err = cli(data, monkeypatch, capsys, "index", "--no-progress", str(other))
    assert code == 0 and "indexed 1" in out, err
    code, out, _ = cli(data, monkeypatch, capsys, "compact")  # the two take turns
    assert code == 0 and "compacted: main generation" in out
    code, out, _ = cli(data, monkeypatch, capsys, "status", "--json")
    (writer,) = json.loads(out)["writers"]
    assert (writer["pid"], writer["writes"]) == (proc.pid, f"the folder {folder}")

    code, out, _ = cli(data, monkeypatch, capsys, "dlq", "list", "--json")
    (letter,) = json.loads(out)
    assert (letter["item_id"], letter["attempts"], letter["retriable"], letter["retry_at"]) == (
        "folder:photos/broken.jpg",
        1,
        False,
        None,
    )
    code, out, _ = cli(data, monkeypatch, capsys, "dlq", "retry", "--all")  # handed to the running watcher
    assert code == 0 and f"1 dead letters of the folder {folder} are retried" in out and f"pid {proc.pid}" in out
    deadline = time.monotonic() + 60
    while True:  # the watcher retries it (the file is still broken, so it fails again: attempt 2)
        code, out, _ = cli(data, monkeypatch, capsys, "dlq", "list")
        if "attempt 2, 1 fetch, permanent" in out:
            break
        assert time.monotonic() < deadline, out
        time.sleep(0.2)
    wait_for_line(lines, "retried 1 dead letters: 0 indexed, 1 failed again")

    proc.kill()  # SIGKILL: no chance to clean up; its lock file stays behind
    proc.wait(timeout=30)
    assert list(data.glob("writer-folder-*.lock"))
    code, out, err = cli(data, monkeypatch, capsys, "index", "--no-progress", str(folder))
    assert code == 0, err
    assert "unchanged 5" in out
