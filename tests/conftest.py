"""Fixtures shared by every tier: a clean environment, a tiny random-weight CLIP, settings in tmp_path,
a Kafka-protocol broker (one tansu process per session on a loopback port, or the external broker named
by CLIPDEX_TEST_KAFKA_BOOTSTRAP) with a fresh topic for every test, and a Milvus (one `milvus-lite
server` process per session, or the one named by CLIPDEX_TEST_MILVUS_URI) with fresh collections for
every test."""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from clipdex import demo
from shared.config import Settings, load_settings
from shared.embedder import Embedder, ModelSpec
from tests.brokers import EXTERNAL_BOOTSTRAP, TansuBroker, create_topic, unique_topic
from tests.milvus import EXTERNAL_URI, MilvusLite, unique_collection

FIXTURES = Path(__file__).parent / "fixtures"
TINY_CONFIGS = FIXTURES / "configs"
TINY_MODEL = "clipdex-tiny"  # 32 px ViT, 1 layer, random weights: fast, meaningless results
SHAPES_MODELS = demo.MODEL_DIR  # the demo's model, trained on coloured shapes: real retrieval

os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental hub download fails fast instead of hanging


@functools.cache
def model_cache() -> Path:
    """CLIPDEX_MODEL_CACHE_DIR of every test: the test models' ONNX exports are built once per test session
    (about 10 s each) and reused by every embedder and clipdex process of the session."""
    return Path(tempfile.mkdtemp(prefix="clipdex-test-models-"))


@functools.cache
def exported(name: str = TINY_MODEL, pretrained: str | None = None, configs: Path = TINY_CONFIGS) -> None:
    """Build a test model's ONNX export in this process before a clipdex subprocess needs it: no subprocess
    spends its start (and its test's timeout) exporting, and parallel subprocesses never wait on the lock."""
    embedder = Embedder(ModelSpec(name, pretrained, configs, "cpu", "fp32", model_cache(), runtime="onnx"))
    embedder.load()
    embedder.close()


def pytest_unconfigure(config: pytest.Config) -> None:
    if model_cache.cache_info().currsize:
        shutil.rmtree(model_cache(), ignore_errors=True)


@pytest.fixture(autouse=True)
def _scrub_clipdex_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CLIPDEX_"):
            monkeypatch.delenv(name)


def tiny_settings_for(data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "model": TINY_MODEL,
        "pretrained": "none",
        "model_configs": TINY_CONFIGS,
        "device": "cpu",
        "model_cache_dir": model_cache(),
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture
def tiny_settings(tmp_path: Path) -> Settings:
    return tiny_settings_for(tmp_path / "data", allowed_roots=[str(tmp_path)])


@pytest.fixture(scope="session")
def tiny_embedder() -> Iterator[Embedder]:
    """The tiny model on torch: open_clip's own code path, the reference the ONNX runtime is held to."""
    embedder = Embedder(ModelSpec(TINY_MODEL, None, TINY_CONFIGS, "cpu", "fp32", runtime="torch"))
    embedder.load()
    yield embedder
    embedder.close()


@pytest.fixture(scope="session")
def tiny_onnx_embedder() -> Iterator[Embedder]:
    """The tiny model on ONNX Runtime, fp32 (what `CLIPDEX_RUNTIME=auto` runs on a CPU)."""
    embedder = Embedder(ModelSpec(TINY_MODEL, None, TINY_CONFIGS, "cpu", "fp32", model_cache(), runtime="onnx"))
    embedder.load()
    yield embedder
    embedder.close()


def clipdex_command() -> list[str]:
    """`python -m clipdex`: the code under test, whichever clipdex the environment's script points to."""
    return [sys.executable, "-m", "clipdex"]


def tiny_env(data_dir: Path) -> dict[str, str]:
    """Environment for a clipdex subprocess that uses the tiny model."""
    exported()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPDEX_")}
    env.update(
        CLIPDEX_DATA_DIR=str(data_dir),
        CLIPDEX_MODEL=TINY_MODEL,
        CLIPDEX_PRETRAINED="none",
        CLIPDEX_MODEL_CONFIGS=str(TINY_CONFIGS),
        CLIPDEX_DEVICE="cpu",
        CLIPDEX_MODEL_CACHE_DIR=str(model_cache()),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    if EXTERNAL_BOOTSTRAP:
        yield EXTERNAL_BOOTSTRAP
        return
    broker = TansuBroker()
    try:
        yield broker.bootstrap
    finally:
        broker.close()


@pytest.fixture
def kafka_topic(kafka_bootstrap: str) -> str:
    """A new topic with 3 partitions."""
    topic = unique_topic()
    asyncio.run(create_topic(kafka_bootstrap, topic, partitions=3))
    return topic


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if EXTERNAL_URI:
        yield EXTERNAL_URI
        return
    server = MilvusLite(tmp_path_factory.mktemp("milvus") / "data")
    try:
        yield server.uri
    finally:
        server.stop()


def milvus_settings_for(data_dir: Path, uri: str, collection: str | None = None, **overrides: object) -> Settings:
    """Tiny-model settings on the Milvus store, in a collection of this test's own."""
    return tiny_settings_for(
        data_dir, store="milvus", milvus_uri=uri, milvus_collection=collection or unique_collection(), **overrides
    )


def milvus_env(data_dir: Path, uri: str, collection: str) -> dict[str, str]:
    """`tiny_env` for a clipdex subprocess on the Milvus store."""
    return {
        **tiny_env(data_dir),
        "CLIPDEX_STORE": "milvus",
        "CLIPDEX_MILVUS_URI": uri,
        "CLIPDEX_MILVUS_COLLECTION": collection,
    }


@pytest.fixture(params=["sqlite", "milvus"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Tiny-model settings on each backend in turn: the store contract tests run against both."""
    if request.param == "sqlite":
        return tiny_settings_for(tmp_path / "data", allowed_roots=[str(tmp_path)])
    uri = request.getfixturevalue("milvus_uri")
    return milvus_settings_for(tmp_path / "data", uri, allowed_roots=[str(tmp_path)])
