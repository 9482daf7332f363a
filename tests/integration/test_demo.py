"""`clipdex demo`: a newcomer without internet gets real search results from generated images, from a clone
and from an installed wheel (the demo's model and renderer are package data of `clipdex`)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.brokers import free_port
from tests.conftest import SHAPES_MODELS, clipdex_command, exported, tiny_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTED = ["pyproject.toml", "README.md", "clipdex", "shared", "indexer", "tools"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the sources, installed (without dependencies: the environment's
    serve) into a directory outside the repository. Returns that directory."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in DISTRIBUTED:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    wheels, target = base / "wheels", base / "site"
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)]
    subprocess.run(build, check=True, capture_output=True, timeout=300, cwd=base)
    (wheel,) = wheels.glob("clipdex-*.whl")
    install = [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300, cwd=base)
    return target


@pytest.mark.parametrize("where", ["clone", "wheel"])
def test_demo_serves_real_results_offline(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    exported("clipdex-shapes", str(SHAPES_MODELS / "clipdex-shapes.safetensors"), SHAPES_MODELS)  # built once
    port = free_port()
    log = tmp_path / "demo.log"
    # tiny_env only for a clean environment: the demo picks its own model and data dir
    env = tiny_env(tmp_path / "unused")
    command = clipdex_command()
    if where == "wheel":
        site: Path = request.getfixturevalue("installed")
        env["PYTHONPATH"] = str(site)  # the installed copy, not this checkout
        command = [str(site / "bin" / "clipdex")]  # the console script, run from another directory
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*command, "demo", str(tmp_path / "demo"), "--count", "64", "--port", str(port)],
            env=env,
            cwd=tmp_path,
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
        if where == "wheel":  # the model that travelled in the wheel
            assert f"loading CLIP model clipdex-shapes ({site / 'clipdex' / 'models'}/" in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
