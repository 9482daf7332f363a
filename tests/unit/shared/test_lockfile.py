"""The writer lock between real processes: a second writer is refused at once with the holder named, a
holder killed with SIGKILL blocks nobody, and within one process the lock is shared."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import lockfile
from shared.errors import WriterBusy
from shared.lockfile import Holder, command_line

REPO = Path(__file__).resolve().parents[3]

HOLDER = """
    import sys, time
    from pathlib import Path
    from shared import lockfile

    with lockfile.hold(Path(sys.argv[1]), what="the folder /srv/images", command="clipdex watch /srv/images"):
        lockfile.announce_retries(Path(sys.argv[1]), ["folder:images/"])
        print("holding", flush=True)
        time.sleep(120)
"""


@pytest.fixture
def holder_process(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), str(tmp_path / "data" / "writer-folder-x.lock")],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    proc.stdout.close()


def test_a_second_writer_is_refused_at_once_naming_the_holder(
    tmp_path: Path, holder_process: subprocess.Popen[str]
) -> None:
    path = tmp_path / "data" / "writer-folder-x.lock"
    started = time.monotonic()
    with pytest.raises(WriterBusy) as refused, lockfile.hold(path, what="the folder /srv/images"):
        pass
    assert time.monotonic() - started < 5, "refused at once, not after waiting for the holder"
    message = str(refused.value)
    assert message.startswith(f"another clipdex process is already indexing the folder /srv/images into {path.parent}")
    for part in (f"pid {holder_process.pid}", "`clipdex watch /srv/images`", "since 20", "stop it first"):
        assert part in message, message
    seen = lockfile.holder(path)
    assert seen is not None and seen.pid == holder_process.pid and seen.retries == ("folder:images/",)
    assert lockfile.holders(path.parent) == [seen]
    assert seen.takes("folder:images/a.jpg") and not seen.takes("kafka:a") and not seen.takes(None)


def test_a_holder_killed_with_sigkill_blocks_no_one(tmp_path: Path, holder_process: subprocess.Popen[str]) -> None:
    path = tmp_path / "data" / "writer-folder-x.lock"
    os.kill(holder_process.pid, signal.SIGKILL)
    holder_process.wait(timeout=10)
    assert path.exists() and str(holder_process.pid) in path.read_text()  # the file stays behind
    assert lockfile.holder(path) is None  # but nobody holds it
    with lockfile.hold(path, command="clipdex index /srv/images") as me:
        assert me.pid == os.getpid()
        seen = lockfile.holder(path)
        assert seen is not None and seen.command == "clipdex index /srv/images"


def test_within_one_process_the_lock_is_counted_not_taken_twice(tmp_path: Path) -> None:
    path = tmp_path / "writer-folder-x.lock"
    with lockfile.hold(path) as outer:
        with lockfile.hold(path) as inner:  # `clipdex run`: the command, then its indexer
            assert inner == outer
        assert lockfile.holder(path) == outer  # still held: the outer block has not ended
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from shared import lockfile; print(lockfile.holder(__import__('pathlib').Path({str(path)!r})))",
            ],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            check=True,
        )
        assert f"pid={os.getpid()}" in probe.stdout
    assert lockfile.holder(path) is None


def test_the_command_is_shown_as_people_typed_it() -> None:
    assert command_line(["/venv/bin/clipdex", "watch", "/srv/my images"]) == "clipdex watch '/srv/my images'"
    assert command_line(["/repo/clipdex/__main__.py", "consume"]) == "clipdex consume"
    assert command_line(["serve.py", "x"]) == "serve.py x"


def test_a_damaged_lock_file_is_no_holder_and_is_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "writer-folder-x.lock"
    path.write_text("{not json")
    assert lockfile.holder(path) is None
    with lockfile.hold(path):
        assert Holder.parse(path.read_text()) is not None
