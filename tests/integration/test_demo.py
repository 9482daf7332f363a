"""`clipdex demo`: a newcomer without internet gets real search results from generated images."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import FIXTURES, exported, tiny_env
from tests.unit.test_tools_fixtures import clipdex_command, free_port

pytestmark = pytest.mark.integration


def test_demo_serves_real_results_offline(tmp_path: Path) -> None:
    models = FIXTURES / "models"
    exported("clipdex-shapes", str(models / "clipdex-shapes.safetensors"), models)  # the demo's model
    port = free_port()
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        # tiny_env only for a clean environment: the demo picks its own model and data dir
        proc = subprocess.Popen(
            [*clipdex_command(), "demo", str(tmp_path / "demo"), "--count", "64", "--port", str(port)],
            env=tiny_env(tmp_path / "unused"),
            stdout=out,
            stderr=out,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("items") == 64:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"the demo never indexed its 64 images:\n{log.read_text()[-3000:]}")
        hits = httpx.get(f"{url}/search", params={"query": "a red circle", "top_k": 1}).json()["hits"]
        assert Path(hits[0]["uri"]).name.startswith("red-circle-"), hits
        assert "knows ONLY shapes" in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
