"""Past one machine, for real: one `milvus-lite server` process, one tansu broker, two `clipdex consume`
processes in one consumer group (each with its own scratch directory) and two `clipdex serve` replicas
with no local index, all on the Milvus store.

- kill -9 one consumer mid-stream: the other takes its partitions, and every event takes effect exactly
  once (each live item once, at its last version; deleted ones gone; nothing twice); both replicas answer
  the same query with the same ids.
- stop the Milvus process mid-stream: the consumers wait and write again without committing, the replicas'
  /health says 503 with the reason; once Milvus is back, everything resumes and nothing is lost.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.config import Settings
from shared.stores import open_catalog
from tests.brokers import (
    SESSION_TIMEOUT_MS,
    Position,
    committed_offsets,
    create_topic,
    ends_of,
    free_port,
    publish,
    unique_topic,
    wait_for_port,
)
from tests.conftest import milvus_env, milvus_settings_for
from tests.integration.test_kafka_consume import event, write_image
from tests.milvus import MilvusLite, unique_collection

pytestmark = pytest.mark.integration

PARTITIONS = 4


@dataclass
class Proc:
    """A clipdex subprocess, its log in a file."""

    args: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "clipdex", *self.args], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def assignment(self) -> set[int]:
        """The partitions this consumer was last assigned, as its log says (empty before the first)."""
        lines = ASSIGNED.findall(self.text())
        return {int(p) for p in PARTITION.findall(lines[-1])} if lines else set()


ASSIGNED = re.compile(r"assigned partitions \[(.*)\]")
PARTITION = re.compile(r"\[(\d+)\]'")


def group_settled(consumers: list[Proc]) -> bool:
    """Every consumer alive and a member of the same generation: their last assignments are non-empty,
    disjoint, and cover every partition. A member still joining would leave another holding everything."""
    assigned = [c.assignment() for c in consumers]
    return (
        all(c.alive() for c in consumers)
        and all(assigned)
        and sum(len(a) for a in assigned) == PARTITIONS
        and set().union(*assigned) == set(range(PARTITIONS))
    )


@dataclass
class Cluster:
    milvus: MilvusLite
    bootstrap: str
    topic: str
    group: str
    settings: Settings  # the store, as this test process reads it
    images: Path
    consumers: list[Proc]
    replicas: list[Proc]
    urls: list[str]
    positions: list[Position] = field(default_factory=list)

    async def publish(self, messages: list[tuple[bytes | None, bytes | None]], *, pause_s: float = 0.0) -> None:
        for start in range(0, len(messages), 8):
            self.positions += await publish(self.bootstrap, self.topic, messages[start : start + 8])
            await asyncio.sleep(pause_s)

    async def committed(self) -> dict[int, int]:
        return await committed_offsets(self.bootstrap, self.topic, self.group, PARTITIONS)

    async def caught_up(self, timeout_s: float) -> None:
        ends = ends_of(self.positions, PARTITIONS)
        deadline = time.monotonic() + timeout_s
        while (got := await self.committed()) != ends:
            if time.monotonic() > deadline:
                logs = "\n".join(c.text()[-2000:] for c in self.consumers)
                raise AssertionError(f"not caught up: committed {got}, ends {ends}\n{logs}")
            await asyncio.sleep(0.3)

    def logs(self) -> str:
        state = ", ".join(
            f"consumer-{n} {'alive' if c.alive() else 'dead'} assigned {sorted(c.assignment())}"
            for n, c in enumerate(self.consumers)
        )
        head = f"published {len(self.positions)} messages so far; {state}\n"
        return head + "\n----\n".join(p.text()[-3000:] for p in [*self.consumers, *self.replicas])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("scale-out")
    milvus = MilvusLite(base / "milvus", log_path=base / "milvus.log")
    topic = unique_topic("scale-out")
    asyncio.run(create_topic(kafka_bootstrap, topic, partitions=PARTITIONS))
    collection = unique_collection("scale")
    images = base / "images"
    images.mkdir()

    def env(name: str) -> dict[str, str]:
        return milvus_env(base / name, milvus.uri, collection) | {
            "CLIPDEX_ALLOWED_ROOTS": str(images),
            "CLIPDEX_KAFKA_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
            "CLIPDEX_BATCH_SIZE": "8",
            "CLIPDEX_MAX_BATCH_WAIT_MS": "50",
            "CLIPDEX_DECODE_WORKERS": "1",
            "CLIPDEX_REFRESH_INTERVAL_MS": "100",
        }

    group = f"{topic}-indexers"
    consume = ["consume", "--bootstrap-servers", kafka_bootstrap, "--topic", topic, "--group", group]
    consumers = [Proc(consume, env(f"consumer-{n}"), base / f"consumer-{n}.log") for n in range(2)]
    ports = [free_port() for _ in range(2)]
    replicas = [
        Proc(["serve", "--port", str(port)], env(f"replica-{n}"), base / f"replica-{n}.log")
        for n, port in enumerate(ports)
    ]
    for p in [*consumers, *replicas]:
        p.start()
    made = Cluster(
        milvus,
        kafka_bootstrap,
        topic,
        group,
        milvus_settings_for(base / "reader", milvus.uri, collection),
        images,
        consumers,
        replicas,
        [f"http://127.0.0.1:{port}" for port in ports],
    )
    try:
        for port, replica in zip(ports, replicas, strict=True):
            wait_for_port(port, 120, replica.proc)
        # Both consumers in the group before any test publishes: a stream of ~100 events is consumed in
        # about 2 s, and a consumer still loading its model (slow under load) joined once it was all read,
        # got no batch, and the first test waited for one forever.
        deadline = time.monotonic() + 120
        while not group_settled(consumers):
            if time.monotonic() > deadline:
                raise AssertionError(f"the consumer group never settled with both members\n{made.logs()}")
            time.sleep(0.2)
        yield made
    finally:
        for p in [*consumers, *replicas]:
            if p.alive():
                assert p.proc is not None
                p.proc.terminate()
        for p in [*consumers, *replicas]:
            if p.proc is not None:
                try:
                    p.proc.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
        milvus.stop()
    for replica in replicas:  # stateless: no store, no index of their own
        scratch = Path(replica.env["CLIPDEX_DATA_DIR"])
        assert not (scratch / "clipdex.sqlite3").exists() and not (scratch / "index").exists()


@dataclass
class Expected:
    """What the store must hold once each event took effect once, in order per id."""

    items: dict[str, tuple[str, int, dict[str, Any]]] = field(default_factory=dict)  # id -> (sha, version, meta)


def stream(images: Path, prefix: str, n: int, seed: int) -> tuple[list[tuple[bytes | None, bytes | None]], Expected]:
    """n new items; then new images (higher versions) for some, metadata changes, stale versions that must
    lose, and deletes (versioned)."""
    expected = Expected()
    messages: list[tuple[bytes | None, bytes | None]] = []
    shas: dict[str, tuple[Path, str]] = {}
    for i in range(n):
        item = f"{prefix}{i}"
        path = images / f"{item}-v1.png"
        shas[item] = (path, write_image(path, seed + i, size=32))
        messages.append((item.encode(), event("upsert", item, path, metadata={"k": i % 3}, version=1)))
        expected.items[f"kafka:{item}"] = (shas[item][1], 1, {"k": i % 3})
    for i in range(0, n, 3):  # a new image, version 3
        item = f"{prefix}{i}"
        path = images / f"{item}-v3.png"
        sha = write_image(path, seed + 1000 + i, size=32)
        messages.append((item.encode(), event("upsert", item, path, metadata={"k": "new"}, version=3)))
        expected.items[f"kafka:{item}"] = (sha, 3, {"k": "new"})
        # a stale event (version 2) arriving later: must lose
        messages.append((item.encode(), event("upsert", item, shas[item][0], metadata={"k": "stale"}, version=2)))
    for i in range(1, n, 3):  # metadata only, version 2
        item = f"{prefix}{i}"
        messages.append((item.encode(), event("upsert", item, shas[item][0], metadata={"k": "meta"}, version=2)))
        expected.items[f"kafka:{item}"] = (shas[item][1], 2, {"k": "meta"})
    for i in range(2, n, 6):  # deleted
        item = f"{prefix}{i}"
        messages.append((item.encode(), event("delete", item, version=5)))
        expected.items.pop(f"kafka:{item}")
    return messages, expected


def stored(settings: Settings, prefix: str) -> dict[str, tuple[str | None, int | None, dict[str, Any]]]:
    with open_catalog(settings) as catalog:
        assert catalog is not None
        return {
            i.id: (i.sha256, i.version, i.metadata)
            for i in catalog.items("kafka", f"kafka:{prefix}")
            if i.status == "indexed"
        }


def search_ids(url: str, **params: str) -> list[str]:
    reply = httpx.get(f"{url}/search", params={"query": "a photo", "top_k": "100", **params}, timeout=30)
    reply.raise_for_status()
    return [h["id"] for h in reply.json()["hits"]]


def similar_ids(url: str, item_id: str) -> list[str]:
    reply = httpx.get(f"{url}/similar", params={"id": item_id}, timeout=30)
    reply.raise_for_status()
    return [h["id"] for h in reply.json()["hits"]]


async def wait_until(check: Callable[[], Any], timeout_s: float, what: str, cluster: Cluster) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(check)
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{cluster.logs()}")


async def test_a_consumer_killed_mid_stream_loses_nothing_and_the_replicas_agree(cluster: Cluster) -> None:
    messages, expected = stream(cluster.images, "s", 48, seed=0)
    publishing = asyncio.create_task(cluster.publish(messages, pause_s=0.15))
    victim, survivor = cluster.consumers

    def batches(p: Proc) -> int:
        return p.text().count("batch source=kafka")

    await wait_until(lambda: batches(victim) >= 2 and batches(survivor) >= 1, 120, "both consumers working", cluster)
    victim.kill()  # SIGKILL: no flush, no commit, no leaving the group
    await publishing
    await cluster.caught_up(120)  # the survivor owns every partition now, or this never happens
    assert survivor.alive(), survivor.text()[-3000:]

    got = stored(cluster.settings, "s")
    assert got == expected.items  # each live item once, at its last version; deleted ones gone; stale lost
    with open_catalog(cluster.settings) as catalog:
        assert catalog is not None
        stats = catalog.stats()
    assert (stats.items, stats.failed) == (len(expected.items), 0)  # no leftover row of an older version

    await wait_until(
        lambda: all(len(search_ids(u)) == len(expected.items) for u in cluster.urls), 30, "replicas", cluster
    )
    first, second = (search_ids(u) for u in cluster.urls)
    assert first == second and set(first) == set(expected.items)
    similar = [similar_ids(u, "kafka:s0") for u in cluster.urls]
    assert similar[0] == similar[1] and len(similar[0]) == 10
    filtered = [search_ids(u, **{"filter.k": "new"}) for u in cluster.urls]
    assert filtered[0] == filtered[1] and set(filtered[0]) == {
        i for i, v in expected.items.items() if v[2] == {"k": "new"}
    }

    joined = victim.text().count("consuming from")
    victim.start()  # back to two members for the next test
    await wait_until(
        lambda: victim.text().count("consuming from") > joined and group_settled(cluster.consumers),
        120,
        "the restarted consumer",
        cluster,
    )


async def test_milvus_stopped_mid_stream_consumers_wait_replicas_say_503_and_nothing_is_lost(cluster: Cluster) -> None:
    first, expected_first = stream(cluster.images, "m", 12, seed=10_000)
    await cluster.publish(first)
    await cluster.caught_up(120)

    cluster.milvus.stop()
    before = await cluster.committed()
    second, expected_second = stream(cluster.images, "n", 24, seed=20_000)
    await cluster.publish(second, pause_s=0.05)

    def waiting() -> bool:
        return any("written again in" in c.text() for c in cluster.consumers)

    await wait_until(waiting, 60, "a consumer waiting for the store", cluster)

    def unavailable() -> list[dict[str, Any]] | None:
        replies = [httpx.get(f"{u}/health", timeout=10) for u in cluster.urls]
        return [r.json() for r in replies] if all(r.status_code == 503 for r in replies) else None

    health = await wait_until(unavailable, 30, "both replicas to say 503", cluster)
    assert all(h["status"] == "unavailable" and "store cannot be reached" in h["reason"] for h in health)
    await asyncio.sleep(2)
    assert await cluster.committed() == before, "offsets moved while Milvus was down"
    assert all(c.alive() for c in cluster.consumers), cluster.logs()

    cluster.milvus.start()
    await cluster.caught_up(120)
    assert all(c.alive() for c in cluster.consumers), cluster.logs()
    await wait_until(
        lambda: all(httpx.get(f"{u}/health", timeout=10).status_code == 200 for u in cluster.urls),
        30,
        "health",
        cluster,
    )
    assert stored(cluster.settings, "m") == expected_first.items
    assert stored(cluster.settings, "n") == expected_second.items
    wanted = set(expected_second.items)
    await wait_until(lambda: all(wanted <= set(search_ids(u)) for u in cluster.urls), 30, "searchable", cluster)
