"""Prometheus metrics of the read side: request counters and latency histograms, plus the store's own
counts (items, failures, dead letters: the ingest side as seen from the shared store), the models (the
store's, the one answering this server's queries, a re-embed's) and a re-embed's progress at scrape time.

A few dozen lines instead of a dependency: counters and fixed-bucket histograms keyed by label values,
rendered in the Prometheus text format (version 0.0.4).
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from shared.status import Status
from shared.types import ModelIdentity
from tools.redaction import pretrained_tag

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Labels = tuple[str, ...]


@dataclass(frozen=True)
class Sample:
    """One extra gauge line, for collectors that other parts of the process register."""

    name: str
    help: str
    value: float
    kind: str = "gauge"
    labels: tuple[tuple[str, str], ...] = ()


class Counter:
    def __init__(self, name: str, help: str, label_names: Sequence[str]) -> None:
        self.name, self.help, self.label_names = name, help, tuple(label_names)
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            for labels, value in sorted(self._values.items()):
                lines.append(f"{self.name}{_labels(self.label_names, labels)} {_num(value)}")
        return lines


class Histogram:
    def __init__(
        self, name: str, help: str, label_names: Sequence[str], buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> None:
        self.name, self.help, self.label_names = name, help, tuple(label_names)
        self.buckets = tuple(buckets)
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}  # bucket counts, [sum, count]
        self._lock = threading.Lock()

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            counts, total = self._series.setdefault(labels, ([0] * (len(self.buckets) + 1), [0.0, 0.0]))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            total[0] += value
            total[1] += 1

    def count(self, *labels: str) -> int:
        with self._lock:
            series = self._series.get(labels)
            return 0 if series is None else int(series[1][1])

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            for labels, (counts, (total, n)) in sorted(self._series.items()):
                cumulative = 0
                for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                    cumulative += count
                    le = "+Inf" if bound == math.inf else _num(bound)
                    names, values = (*self.label_names, "le"), (*labels, le)
                    lines.append(f"{self.name}_bucket{_labels(names, values)} {cumulative}")
                lines.append(f"{self.name}_sum{_labels(self.label_names, labels)} {_num(total)}")
                lines.append(f"{self.name}_count{_labels(self.label_names, labels)} {int(n)}")
        return lines


class Metrics:
    """Every metric of one server process. Created by the app builder, never at import time."""

    def __init__(self) -> None:
        self.requests = Counter(
            "clipdex_search_requests_total",
            "Search requests by transport (http, mcp), kind (text, image, item, get_item, status) and outcome.",
            ("transport", "kind", "outcome"),
        )
        self.latency = Histogram(
            "clipdex_search_latency_seconds",
            "Latency of successful search requests, seconds, from arguments to result.",
            ("transport", "kind"),
        )
        self.http_responses = Counter(
            "clipdex_http_responses_total", "HTTP responses by route and status code.", ("route", "status")
        )
        self._collectors: list[Callable[[], Iterable[Sample]]] = []

    def add_collector(self, collect: Callable[[], Iterable[Sample]]) -> None:
        """Add gauges computed at scrape time (e.g. the indexer's counters when it shares the process)."""
        self._collectors.append(collect)

    def timer(self, transport: str, kind: str) -> RequestTimer:
        return RequestTimer(self, transport, kind)

    def render(self, status: Status) -> str:
        """The text exposition, with gauges from a server's status (`Queries.status_sync`)."""
        stats, index = status.stats, status.searcher
        assert index is not None, "a server's status has its own index"
        lines: list[str] = []
        for metric in (self.requests, self.latency, self.http_responses):
            lines += metric.render()
        now = time.time()
        gauges = [
            Sample("clipdex_items", "Searchable items in the store.", stats.items),
            Sample("clipdex_items_failed", "Items that could not be indexed.", stats.failed),
            Sample("clipdex_vectors", "Live vectors in the store.", stats.vectors),
            Sample("clipdex_tombstones", "Deleted or replaced vectors not yet purged.", stats.tombstones),
            Sample("clipdex_dead_letters", "Dead letters (refused events or files) in the store.", stats.dead_letters),
            Sample("clipdex_store_changes", "Store change counter; grows with each write.", stats.changes),
            Sample("clipdex_index_generation", "Main index generation this server searches.", index.generation),
            Sample("clipdex_index_vectors", "Vectors in the index this server searches.", index.vectors),
            Sample("clipdex_index_delta_vectors", "Vectors in the in-memory delta index.", index.delta_size),
            Sample(
                "clipdex_index_refresh_age_seconds",
                "Seconds since this server last read new vectors from the store.",
                max(0.0, now - index.refreshed_at) if index.refreshed_at else math.nan,
            ),
            Sample(
                "clipdex_newest_indexed_timestamp_seconds",
                "Unix time of the newest indexed vector.",
                stats.newest_indexed_at.timestamp() if stats.newest_indexed_at else math.nan,
            ),
            Sample(
                "clipdex_last_compaction_timestamp_seconds",
                "Unix time of the last compaction.",
                stats.last_compaction_at.timestamp() if stats.last_compaction_at else math.nan,
            ),
        ]
        gauges += _model_samples(status)
        gauges += _reembed_samples(status)
        for collect in self._collectors:
            gauges += list(collect())
        described: set[str] = set()
        for sample in gauges:
            if sample.name not in described:  # one HELP and TYPE per metric, whatever its label sets
                described.add(sample.name)
                lines += [f"# HELP {sample.name} {sample.help}", f"# TYPE {sample.name} {sample.kind}"]
            names, values = zip(*sample.labels, strict=True) if sample.labels else ((), ())
            lines.append(f"{sample.name}{_labels(names, values)} {_num(sample.value)}")
        return "\n".join(lines) + "\n"


_MODEL_HELP = (
    "1 for each model by role: the store's (`store`), the one answering this server's queries "
    "(`answering`), and the one a re-embed moves the store to (`reembed`)."
)


def _model_samples(status: Status) -> list[Sample]:
    roles: list[tuple[str, ModelIdentity]] = []
    if status.model is not None:
        roles.append(("store", status.model))
    if status.searcher is not None and status.searcher.model is not None:
        roles.append(("answering", status.searcher.model))
    if status.reembed is not None:
        roles.append(("reembed", status.reembed.model))
    return [
        Sample(
            "clipdex_model_info",
            _MODEL_HELP,
            1,
            labels=(
                ("role", role),
                ("name", m.name),
                ("pretrained", pretrained_tag(m.pretrained)),
                ("dim", str(m.dim)),
            ),
        )
        for role, m in roles
    ]


def _reembed_samples(status: Status) -> list[Sample]:
    """Zeros when no re-embed is in progress, so a dashboard's series never vanish."""
    re = status.reembed
    cov = None if re is None else re.coverage
    return [
        Sample("clipdex_reembed_active", "1 while a re-embed to another model is in progress.", int(re is not None)),
        Sample(
            "clipdex_reembed_running",
            "1 while a process fills the re-embed (0: paused).",
            int(re is not None and re.running),
        ),
        Sample("clipdex_reembed_items_total", "Live items the re-embed must cover.", cov.total if cov else 0),
        Sample(
            "clipdex_reembed_items_done",
            "Items the re-embed covered (re-embedded, or failed).",
            cov.done + cov.failed if cov else 0,
        ),
        Sample("clipdex_reembed_items_failed", "Items whose source could not be read again.", cov.failed if cov else 0),
        Sample("clipdex_reembed_rate", "Items per second of the running re-embed.", re.rate if re else 0.0),
        Sample(
            "clipdex_reembed_eta_seconds",
            "Seconds to the switch at the current rate (NaN: not known).",
            re.eta_s if re is not None and re.eta_s is not None else math.nan,
        ),
    ]


class RequestTimer:
    """Times one request; `ok()` or `failed()` records it once."""

    def __init__(self, metrics: Metrics, transport: str, kind: str) -> None:
        self.metrics, self.transport, self.kind = metrics, transport, kind
        self.started = time.perf_counter()

    def ok(self) -> None:
        self.metrics.latency.observe(time.perf_counter() - self.started, self.transport, self.kind)
        self.metrics.requests.inc(self.transport, self.kind, "ok")

    def failed(self, outcome: str) -> None:
        self.metrics.requests.inc(self.transport, self.kind, outcome)


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = (f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + ",".join(pairs) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if float(value).is_integer() else repr(float(value))
