"""Six concurrent hostile uploads through a real `clipdex serve`: what each gets back, and how much the
server's peak resident memory grows.

The uploads (bench/hostile_images.py), as found in issue 9: three copies of a 124 KB 16-bit 8000x8000
PNG and three of a 0.56 MB ICO whose one entry is a 12000x12000 RGBA PNG, POSTed to /similar at once. The
server runs the tests' tiny model on an empty store, in a process of its own; its peak RSS is reset
(/proc/PID/clear_refs) after a warm-up upload and read (VmHWM) after the six answers.

    python bench/bench_hostile_uploads.py                          # this tree
    python bench/bench_hostile_uploads.py --baseline-tree /tmp/old  # and an older tree, in the same run
                                                                  # (git archive <commit> | tar -x -C /tmp/old)

tests/integration/test_hostile_uploads.py asserts the goal (each a 4xx or a result; growth < 1.2 GB).
Not part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a plain script from anywhere

from bench.hostile_images import ico_bomb, sixteen_bit_bomb  # noqa: E402

TINY_CONFIGS = ROOT / "tests" / "fixtures" / "configs"
MB = 2**20


@dataclass
class Outcome:
    statuses: list[int]
    errors: list[str]
    baseline_rss: int  # bytes, after the warm-up
    peak_rss: int  # bytes, the highest resident memory while the six were served
    seconds: float

    @property
    def growth(self) -> int:
        return self.peak_rss - self.baseline_rss


def hostile_uploads() -> list[tuple[str, bytes]]:
    png, ico = sixteen_bit_bomb(), ico_bomb()
    return [("image/png", png), ("image/x-icon", ico)] * 3


def serve_and_upload(
    tree: Path, work: Path, uploads: list[tuple[str, bytes]], *, env: dict[str, str] | None = None
) -> Outcome:
    """Start `python -m indexer serve` from `tree`, send `uploads` at once, stop it."""
    port = _free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CLIPDEX_")}
    environment.update(
        PYTHONPATH=str(tree),
        CLIPDEX_DATA_DIR=str(work / "data"),
        CLIPDEX_MODEL="clipdex-tiny",
        CLIPDEX_PRETRAINED="none",
        CLIPDEX_MODEL_CONFIGS=str(TINY_CONFIGS),
        CLIPDEX_DEVICE="cpu",
        HF_HUB_OFFLINE="1",
    )
    environment.update(env or {})
    log = work / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clipdex", "serve", "--port", str(port)],
            env=environment,
            cwd=tree,
            stdout=out,
            stderr=out,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log)
        small = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 30, 30)).save(small, format="PNG")
        warm = httpx.post(f"{url}/similar", content=small.getvalue(), headers={"content-type": "image/png"}, timeout=60)
        if warm.status_code != 200:
            raise RuntimeError(f"warm-up upload failed: {warm.status_code} {warm.text}")
        peak = _PeakRss(proc.pid)
        started = time.perf_counter()
        responses = asyncio.run(_upload_all(url, uploads))
        seconds = time.perf_counter() - started
        peak.stop()
        return Outcome(
            statuses=[r.status_code for r in responses],
            errors=[r.json().get("error", "") if r.status_code != 200 else "" for r in responses],
            baseline_rss=peak.baseline,
            peak_rss=peak.peak,
            seconds=seconds,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _upload_all(url: str, uploads: list[tuple[str, bytes]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return await asyncio.gather(
            *(client.post("/similar", content=body, headers={"content-type": kind}) for kind, body in uploads)
        )


class _PeakRss:
    """The highest RSS of a process from now on: the kernel's VmHWM after resetting it, or, where the
    reset is not allowed, sampled every 5 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = _status_bytes(pid, "VmRSS")
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._kernel = True
        except OSError:
            self._kernel = False
        self.peak = self.baseline
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            try:
                self.peak = max(self.peak, _status_bytes(self.pid, "VmRSS"))
            except OSError:
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        if self._kernel:
            self.peak = max(self.peak, _status_bytes(self.pid, "VmHWM"))


def _status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/{pid}/status")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server did not become healthy:\n{log.read_text()[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-tree", type=Path, help="an older source tree to measure first, for comparison")
    args = parser.parse_args(argv)
    runs: list[tuple[str, Path, dict[str, str]]] = []
    if args.baseline_tree:
        runs.append(("baseline", args.baseline_tree, {}))
    runs.append(("this tree", ROOT, {}))
    runs.append(("this tree, CLIPDEX_DECODE_MEMORY_MB=200", ROOT, {"CLIPDEX_DECODE_MEMORY_MB": "200"}))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}"
    )
    print("| tree | statuses | peak RSS growth | baseline RSS | wall time |")
    print("| --- | --- | --- | --- | --- |")
    for name, tree, env in runs:
        with tempfile.TemporaryDirectory(prefix="clipdex-hostile-") as work:
            outcome = serve_and_upload(tree, Path(work), hostile_uploads(), env=env)
        print(
            f"| {name} | {' '.join(map(str, outcome.statuses))} | {outcome.growth / MB:,.0f} MB | "
            f"{outcome.baseline_rss / MB:,.0f} MB | {outcome.seconds:.1f} s |"
        )
        for error in sorted(set(outcome.errors) - {""}):
            print(f"  - {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
