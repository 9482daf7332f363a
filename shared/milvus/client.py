"""The Milvus adapter: the few verbs the backend needs from pymilvus, each with a deadline, each failure
wrapped where it enters clipdex.

    Milvus.connect(uri, token, db) ─▶ one MilvusClient (gRPC; any number of processes share a server)
    ensure(name, schema, indexes)     create a collection if missing (processes may race to), then load it
    upsert · insert · delete(expr) · query(expr) · rows(expr) (an iterator) · count(expr) · search(...)

Errors: a server that is down, restarting or too slow to answer (gRPC UNAVAILABLE, DEADLINE_EXCEEDED, a
refused connection) is `StoreUnavailable`, which the indexer waits out without committing; anything else
Milvus refuses is `StoreError`. A collection that a server restart left unloaded is loaded again, once.

Every expression passed here comes from `shared.milvus.expr` (hashes and integers only).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from shared.errors import ConfigError, StoreError, StoreUnavailable
from shared.milvus import expr as ex

logger = logging.getLogger(__name__)

T = TypeVar("T")

CALL_TIMEOUT_S = 10.0  # one call; a server that takes longer is as good as down for an indexer's batch
_PAGE = 1000  # rows per page of an iterator
_QUERY_WINDOW = 16_384  # Milvus answers at most this many rows per query (offset + limit)
_NOT_LOADED = 101  # Milvus's code for "collection not loaded"
_COLLECTION_NOT_FOUND = 100
_CONNECT_FAILED = 2  # pymilvus: "Fail connecting to server on ..."
# pymilvus pings an idle connection every 10 s; a gRPC server with the default policy (milvus-lite's) counts
# those as abuse and closes the connection ("too_many_pings"), failing the calls in flight. Ping only while
# a call runs: every call has a deadline anyway.
_GRPC_OPTIONS = {"grpc.keepalive_time_ms": 60_000, "grpc.keepalive_permit_without_calls": 0}


def require_pymilvus() -> Any:
    """The pymilvus module, or a ConfigError that says how to install it."""
    try:
        import pymilvus
    except ImportError as exc:  # pragma: no cover - the dev extra installs it
        raise ConfigError("CLIPDEX_STORE=milvus needs pymilvus: pip install 'clipdex[milvus]' (or pymilvus)") from exc
    _quiet_pymilvus()
    return pymilvus


def _quiet_pymilvus() -> None:
    """pymilvus logs every failed RPC with a traceback through its own handler; the store says once, in
    its own words, what failed and what it does about it."""
    for name in ("pymilvus", "pymilvus.milvus_client", "pymilvus.bulk_writer"):
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)


class Milvus:
    """One connection to one Milvus database."""

    def __init__(self, client: Any, where: str) -> None:
        self._client = client
        self.where = where  # for messages: "Milvus at http://…, database …"

    @classmethod
    def connect(cls, uri: str, token: str | None, db: str) -> Milvus:
        pymilvus = require_pymilvus()
        where = f"Milvus at {uri} (database {db})"
        try:
            client = pymilvus.MilvusClient(
                uri=uri, token=token or "", db_name=db, timeout=CALL_TIMEOUT_S, grpc_options=_GRPC_OPTIONS
            )
        except Exception as exc:
            raise _wrapped(exc, f"cannot connect to {where}") from exc
        return cls(client, where)

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # closing a client whose server is gone is not worth a crash
            logger.debug("closing the Milvus client failed", exc_info=True)

    # -- collections ------------------------------------------------------------------------------------

    def collections(self) -> list[str]:
        return list(self._call("list collections", self._client.list_collections))

    def has(self, name: str) -> bool:
        return bool(self._call(f"look up collection {name}", self._client.has_collection, name))

    def describe(self, name: str) -> dict[str, Any]:
        described: dict[str, Any] = self._call(f"describe collection {name}", self._client.describe_collection, name)
        return described

    def ensure(self, name: str, schema: Any, indexes: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Create the collection and whichever of its indexes are missing, then load it. Processes may race
        (the loser finds them made), and one that died half way is finished by the next. An index this
        server cannot build (milvus-lite has none on arrays) is skipped: it speeds filters up, the results
        are the same."""
        if not self.has(name):
            try:
                self._call(f"create collection {name}", self._client.create_collection, name, schema=schema)
            except StoreUnavailable:
                raise
            except StoreError:
                if not self._appears(name):
                    raise
        for field, params in indexes:
            if field in self._indexes(name):
                continue
            index = self._client.prepare_index_params()
            index.add_index(field, **params)
            try:
                # sync=False: a real Milvus builds indexes in the background; load does not wait for them
                self._call(f"index {name}.{field}", self._client.create_index, name, index, sync=False)
            except StoreUnavailable:
                raise
            except StoreError as exc:
                if field in self._indexes(name):
                    continue  # another process made it meanwhile
                if field == "vector":
                    raise
                logger.info("%s: no %s index on %s.%s (%s)", self.where, params.get("index_type"), name, field, exc)
        self.load(name)

    def _appears(self, name: str, wait_s: float = 10.0) -> bool:
        """Whether another process's creation of `name` completes within `wait_s` (milvus-lite refuses a
        second create with "File exists" before the first one is listed)."""
        deadline = time.monotonic() + wait_s
        while not self.has(name):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def _indexes(self, name: str) -> set[str]:
        return set(self._call(f"list the indexes of {name}", self._client.list_indexes, name))

    def load(self, name: str) -> None:
        self._call(f"load collection {name}", self._client.load_collection, name)

    def drop(self, name: str) -> None:
        self._call(f"drop collection {name}", self._client.drop_collection, name)

    # -- rows -------------------------------------------------------------------------------------------------

    def upsert(self, name: str, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._call(f"write to {name}", self._client.upsert, name, rows, loaded=name)

    def insert(self, name: str, rows: list[dict[str, Any]]) -> list[int]:
        if not rows:
            return []
        done = self._call(f"write to {name}", self._client.insert, name, rows, loaded=name)
        return [int(i) for i in done["ids"]]

    def delete(self, name: str, expr: str) -> None:
        self._call(f"delete from {name}", self._client.delete, name, filter=ex.checked(expr), loaded=name)

    def query(
        self, name: str, expr: str, fields: Sequence[str], *, consistency: str = "Strong", limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Rows matching `expr` (at most 16,384: Milvus's window; use `rows` for more)."""
        kwargs: dict[str, Any] = {"consistency_level": consistency}
        if limit is not None:
            kwargs["limit"] = limit
        found = self._call(
            f"read {name}",
            self._client.query,
            name,
            filter=ex.checked(expr),
            output_fields=list(fields),
            loaded=name,
            **kwargs,
        )
        return [dict(row) for row in found]

    def query_many(
        self, name: str, field: str, keys: Sequence[str], fields: Sequence[str], *, consistency: str = "Strong"
    ) -> list[dict[str, Any]]:
        """Rows whose `field` is one of `keys`, asked in chunks that stay well inside the query window."""
        out: list[dict[str, Any]] = []
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            out += self.query(name, ex.keys_in(field, chunk), fields, consistency=consistency)
        return out

    def rows(
        self, name: str, expr: str, fields: Sequence[str], *, consistency: str = "Strong"
    ) -> Iterator[dict[str, Any]]:
        """Every row matching `expr` (empty: all), page by page."""
        iterator = self._call(
            f"read {name}",
            self._client.query_iterator,
            name,
            batch_size=_PAGE,
            filter=ex.checked(expr) if expr else "",
            output_fields=list(fields),
            consistency_level=consistency,
            loaded=name,
        )
        try:
            while True:
                page = self._plain(f"read {name}", iterator.next)
                if not page:
                    return
                yield from (dict(row) for row in page)
        finally:
            iterator.close()

    def count(self, name: str, expr: str = "", *, consistency: str = "Strong") -> int:
        found = self._call(
            f"count {name}",
            self._client.query,
            name,
            filter=ex.checked(expr) if expr else "",
            output_fields=["count(*)"],
            consistency_level=consistency,
            loaded=name,
        )
        return int(found[0]["count(*)"]) if found else 0

    def search(
        self,
        name: str,
        vector: list[float],
        limit: int,
        expr: str,
        fields: Sequence[str],
        *,
        consistency: str,
    ) -> list[dict[str, Any]]:
        """The nearest rows to `vector` that match `expr`, best first, each with its `distance` (cosine)."""
        found = self._call(
            f"search {name}",
            self._client.search,
            name,
            data=[vector],
            limit=min(limit, _QUERY_WINDOW),
            filter=ex.checked(expr),
            output_fields=list(fields),
            anns_field="vector",
            consistency_level=consistency,
            loaded=name,
        )
        return [{**hit["entity"], "distance": float(hit["distance"])} for hit in found[0]] if found else []

    # -- errors -------------------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., T], *args: Any, loaded: str | None = None, **kwargs: Any) -> T:
        """Call pymilvus with the deadline; on "not loaded" (a restarted server) load `loaded`, try again once."""
        return self._plain(what, fn, *args, loaded=loaded, timeout=CALL_TIMEOUT_S, **kwargs)

    def _plain(self, what: str, fn: Callable[..., T], *args: Any, loaded: str | None = None, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if loaded is not None and getattr(exc, "code", None) == _NOT_LOADED:
                logger.info("%s: collection %s is not loaded (after a restart?); loading it", self.where, loaded)
                self.load(loaded)
                return self._plain(what, fn, *args, **kwargs)
            raise _wrapped(exc, f"{self.where}: {what} failed") from exc


def _wrapped(exc: BaseException, message: str) -> StoreError:
    """StoreUnavailable for what passes (the server away, slow, restarting), StoreError for the rest."""
    if isinstance(exc, StoreError):
        return exc
    detail = _detail(exc)
    if _unavailable(exc):
        return StoreUnavailable(f"{message}: the server is unreachable or did not answer in time ({detail})")
    return StoreError(f"{message}: {detail}")


def _unavailable(exc: BaseException) -> bool:
    import grpc

    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return exc.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.CANCELLED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    code = getattr(exc, "code", None)
    if code == _CONNECT_FAILED or getattr(exc, "retriable", False):
        return True
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and _unavailable(cause)


def _detail(exc: BaseException) -> str:
    details_of = getattr(exc, "details", None)
    details = details_of() if callable(details_of) else None
    message = str(getattr(exc, "message", None) or details or exc).strip()
    return message.splitlines()[0][:300] if message else type(exc).__name__
