"""A Milvus for tests: a `milvus-lite server` process on a free loopback port (gRPC; any number of client
processes), with its data in a directory, so a stop and a start keep the collections.

- `MilvusLite(data_dir)`: ready in about a second; `stop()` (SIGTERM), `kill()` (SIGKILL) and `start()`
  again on the same port and data. milvus-lite is a test engine written in Python: it answers like
  Milvus, slowly (a search took ~1.2 s at 20k vectors), so tests keep to tens or hundreds of vectors.
- `CLIPDEX_TEST_MILVUS_URI=http://host:19530` points the tests at a real Milvus instead (compose's
  `milvus` service); read once, when this module is imported, before any fixture scrubs CLIPDEX_*.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from tests.brokers import free_port, stop_process, wait_for_port

EXTERNAL_URI = os.environ.get("CLIPDEX_TEST_MILVUS_URI") or None


def milvus_lite_binary() -> str:
    found = shutil.which("milvus-lite", path=str(Path(sys.executable).parent)) or shutil.which("milvus-lite")
    if found is None:
        raise RuntimeError("milvus-lite is not installed: pip install milvus-lite (the dev extra has it)")
    return found


def unique_collection(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


class MilvusLite:
    def __init__(self, data_dir: Path, *, port: int | None = None, log_path: Path | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._log_path = log_path or data_dir.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        cmd = [milvus_lite_binary(), "server", "--data-dir", str(self.data_dir)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--max-workers", "16"]
        with self._log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, 30, self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout_s=15)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def log(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""
