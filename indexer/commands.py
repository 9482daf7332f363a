"""The `clipdex` subcommands of the indexer side.

clipdex index DIR                 index a folder once (progress on stderr, a summary on stdout)
clipdex watch DIR                 index a folder, then keep it indexed as files come, change and go
clipdex consume ...               index catalog events from Kafka (indexer/sources/kafka.py)
clipdex status [--json]           counts, index state, model, freshness and lag
clipdex compact [--if-needed]     fold the delta into a new main index now
clipdex dlq list|retry|purge      the dead letters: what could not be indexed, and why
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from indexer.events import parse_event
from indexer.heartbeat import read_heartbeats
from indexer.pipeline import open_pipeline
from indexer.progress import ProgressBar
from indexer.records import Record
from indexer.service import index_folder, stop_on_signals, watch_folder
from indexer.sources.folder import FolderSummary
from indexer.sources.kafka import register_consume
from shared.cliargs import add_setting_flag
from shared.config import Settings
from shared.errors import InvalidEvent
from shared.index import IndexParams, compact, needs_compaction
from shared.store import DeadLetter, Store


def register(sub: Any) -> None:  # argparse's _SubParsersAction is private
    """Add this side's subcommands to the `clipdex` parser."""
    index = sub.add_parser(
        "index",
        help="index a folder of images once, then exit",
        description="Index every image under DIR (subfolders too): new and changed files are embedded, "
        "renamed ones reuse their vector, deleted ones leave the index. Ends with a summary; exits 0 even "
        "when some files fail (they are dead letters: `clipdex dlq list`).",
    )
    index.add_argument("dir", type=Path, metavar="DIR")
    index.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _batch_flags(index)
    index.set_defaults(func=_cmd_index)

    watch = sub.add_parser(
        "watch",
        help="index a folder, then keep watching it",
        description="Index DIR as `index` does, then watch it: a file is indexed once it is completely "
        "written, a rename reuses the vector, a delete removes it from search. SIGTERM or Ctrl-C finishes "
        "the batch in flight and exits 0.",
    )
    watch.add_argument("dir", type=Path, metavar="DIR")
    add_setting_flag(watch, "--poll", "watch_polling", action="store_true")
    add_setting_flag(watch, "--settle-ms", "watch_settle_ms", type=int)
    _batch_flags(watch)
    watch.set_defaults(func=_cmd_watch)

    register_consume(sub)

    status = sub.add_parser("status", help="what is indexed, how fresh, and how far behind the indexer is")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=_cmd_status)

    comp = sub.add_parser(
        "compact",
        help="fold the delta into a new main index now",
        description="Build the next main index generation from the store and purge deleted vectors. "
        "Searches keep running meanwhile; a running indexer also does this on its own thresholds.",
    )
    comp.add_argument("--if-needed", action="store_true", help="only when a size or age threshold is passed")
    comp.set_defaults(func=_cmd_compact)

    dlq = sub.add_parser("dlq", help="dead letters: list, retry or purge what could not be indexed")
    verbs = dlq.add_subparsers(dest="dlq_command", required=True, metavar="VERB")
    dlq_list = verbs.add_parser("list", help="the newest dead letters, with their reasons")
    dlq_list.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    dlq_list.add_argument("--json", action="store_true", help="print a JSON list")
    dlq_list.set_defaults(func=_cmd_dlq_list)
    for verb, func, text in (
        ("retry", _cmd_dlq_retry, "index the dead letters again (after fixing the files); still failing ones stay"),
        ("purge", _cmd_dlq_purge, "delete dead letters"),
    ):
        p = verbs.add_parser(verb, help=text)
        p.add_argument("ids", type=int, nargs="*", metavar="ID", help="dead letter ids (`clipdex dlq list`)")
        p.add_argument("--all", action="store_true", help="every dead letter")
        p.set_defaults(func=func)


def _batch_flags(parser: argparse.ArgumentParser) -> None:
    add_setting_flag(parser, "--batch-size", "batch_size", type=int)
    add_setting_flag(parser, "--max-wait-ms", "max_batch_wait_ms", type=int)


# -- index and watch -----------------------------------------------------------------------------------------


def _cmd_index(args: argparse.Namespace, settings: Settings) -> int:
    progress = None if args.no_progress else ProgressBar()

    async def main() -> FolderSummary:
        stop = asyncio.Event()
        stop_on_signals(stop)
        try:
            return await index_folder(settings, args.dir, stop=stop, progress=progress)
        finally:
            if progress is not None:
                progress.close()

    summary = asyncio.run(main())
    print(format_summary(summary))
    return 0


def format_summary(s: FolderSummary) -> str:
    rate = (s.indexed + s.reused) / s.seconds if s.seconds > 0 else 0.0
    lines = [
        f"indexed {s.indexed + s.reused} (embedded {s.indexed}, reused {s.reused} without a model call), "
        f"unchanged {s.unchanged}, deleted {s.deleted}, failed {s.failed}; "
        f"{s.files} image files in {s.seconds:.1f} s ({rate:.1f} images/s)"
    ]
    if s.failures:
        lines.append("failed:")
        lines += [f"  {name}: {reason}" for name, reason in s.failures]
    if s.failed_before:
        lines.append(f"{s.failed_before} files failed at an earlier run and have not changed since (clipdex dlq list)")
    if s.interrupted:
        lines.append("interrupted: the rest is indexed at the next run")
    return "\n".join(lines)


def _cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    async def main() -> FolderSummary:
        stop = asyncio.Event()
        stop_on_signals(stop)
        return await watch_folder(settings, args.dir, stop)

    summary = asyncio.run(main())
    print(format_summary(summary))
    return 0


# -- status and compact ----------------------------------------------------------------------------------------


def status_of(settings: Settings) -> dict[str, Any]:
    """Everything `clipdex status` shows, as plain data. Reads the store; loads no model."""
    now = time.time()
    out: dict[str, Any] = {"data_dir": str(settings.data_dir), "exists": settings.db_path.exists()}
    if out["exists"]:
        with Store(settings.db_path, vector_dtype=settings.vector_dtype) as store:
            stats = store.stats()
            identity = store.model_identity()
            delta = store.delta_size(stats.meta.high_water)
            age = store.oldest_uncompacted_age_s(stats.meta.high_water)
        out.update(
            items=stats.items,
            failed=stats.failed,
            dead_letters=stats.dead_letters,
            vectors=stats.vectors,
            tombstones=stats.tombstones,
            delta_size=delta,
            delta_age_s=age,
            generation=stats.meta.generation,
            model=None
            if identity is None
            else {"name": identity.name, "pretrained": identity.pretrained, "dim": identity.dim},
            newest_indexed_at=_iso(stats.newest_indexed_at),
            last_compaction_at=_iso(stats.last_compaction_at),
        )
    else:
        out.update(items=0, failed=0, dead_letters=0, vectors=0, tombstones=0, delta_size=0, delta_age_s=None)
        out.update(generation=0, model=None, newest_indexed_at=None, last_compaction_at=None)
    indexers = read_heartbeats(settings.data_dir) if settings.data_dir.is_dir() else []
    for hb in indexers:
        hb["seconds_since_update"] = round(now - float(hb.get("updated_at", now)), 1)
    running = [hb for hb in indexers if hb.get("state") == "running"]
    # Lag: from event to durable, as the last batch measured it, while anything is still pending; a running
    # indexer with nothing pending has caught up. None when no indexer runs.
    lags = [
        float(hb.get("lag_s") or 0.0) if int(hb.get("pending") or 0) > 0 else 0.0
        for hb in running
        if isinstance(hb.get("lag_s", 0.0), int | float)
    ]
    out["lag_s"] = round(max(lags), 3) if lags else None
    out["pending"] = sum(int(hb.get("pending") or 0) for hb in running)
    out["indexers"] = indexers
    return out


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat(timespec="seconds")


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    st = status_of(settings)
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    if not st["exists"]:
        print(f"no index yet in {st['data_dir']} (run `clipdex index DIR` or `clipdex watch DIR`)")
        return 0
    model = st["model"]
    lines = [
        f"data dir    {st['data_dir']}",
        "model       "
        + ("(none yet)" if model is None else f"{model['name']} / {model['pretrained']} (dim {model['dim']})"),
        f"items       {st['items']} indexed, {st['failed']} failed, {st['dead_letters']} dead letters",
        f"index       main generation {st['generation']}, delta {st['delta_size']} vectors, "
        f"{st['tombstones']} deleted vectors not yet purged",
        f"newest      {st['newest_indexed_at'] or '-'}",
        f"compacted   {st['last_compaction_at'] or 'never'}",
    ]
    lag = "- (no indexer running)" if st["lag_s"] is None else f"{st['lag_s']:.2f} s"
    lines.append(f"lag         {lag}, {st['pending']} pending")
    for hb in st["indexers"]:
        where = hb.get("root") or hb.get("topic") or ""
        lines.append(
            f"indexer     {hb.get('source')} {where}: {hb.get('state')}, pid {hb.get('pid')}, "
            f"updated {hb['seconds_since_update']:.0f} s ago"
        )
    print("\n".join(lines))
    return 0


def _cmd_compact(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.db_path.exists():
        print(f"nothing to compact: no store in {settings.data_dir}")
        return 0
    params = IndexParams.from_settings(settings)
    with Store(settings.db_path, vector_dtype=settings.vector_dtype) as store:
        identity = store.model_identity()
        if identity is None:
            print("nothing to compact: the store holds no vectors yet")
            return 0
        if args.if_needed and not needs_compaction(store, params):
            print("no threshold passed; not compacting")
            return 0
        result = compact(store, params, identity.dim, settings.index_dir)
    print(
        f"compacted: main generation {result.generation}, {result.vectors} vectors ({result.kind}"
        f"{', rebuilt' if result.rebuilt else ''}), {result.purged} deleted vectors purged, {result.seconds:.2f} s"
    )
    return 0


# -- dead letters ------------------------------------------------------------------------------------------------


def _cmd_dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    letters = _letters(settings, limit=args.limit)
    if args.json:
        print(json.dumps([_letter_json(d) for d in letters], indent=2))
        return 0
    if not letters:
        print("no dead letters")
    for d in letters:
        print(f"#{d.id} {_iso(d.created_at)} {d.source} {d.item_id or '-'} (tries {d.tries})\n    {d.reason}")
    return 0


def _letter_json(d: DeadLetter) -> dict[str, Any]:
    return {
        "id": d.id,
        "source": d.source,
        "item_id": d.item_id,
        "payload": d.payload,
        "reason": d.reason,
        "tries": d.tries,
        "created_at": _iso(d.created_at),
    }


def _letters(settings: Settings, *, limit: int = 2**31) -> list[DeadLetter]:
    if not settings.db_path.exists():
        return []
    with Store(settings.db_path, vector_dtype=settings.vector_dtype) as store:
        return store.dead_letters(limit=limit)


def _chosen(args: argparse.Namespace, settings: Settings) -> list[DeadLetter] | None:
    if not args.all and not args.ids:
        print("name dead letter ids (`clipdex dlq list`), or --all", file=sys.stderr)
        return None
    letters = _letters(settings)
    return letters if args.all else [d for d in letters if d.id in set(args.ids)]


def _cmd_dlq_purge(args: argparse.Namespace, settings: Settings) -> int:
    letters = _chosen(args, settings)
    if letters is None:
        return 2
    if letters:
        with Store(settings.db_path, vector_dtype=settings.vector_dtype) as store:
            store.delete_dead_letters([d.id for d in letters])
    print(f"purged {len(letters)} dead letters")
    return 0


def _cmd_dlq_retry(args: argparse.Namespace, settings: Settings) -> int:
    letters = _chosen(args, settings)
    if letters is None:
        return 2
    if not letters:
        print("no dead letters to retry")
        return 0
    records = [retry_record(d) for d in letters]
    roots = sorted({root for r in records if (root := _folder_root(r)) is not None})

    async def main() -> tuple[int, int]:
        async with open_pipeline(settings, roots=roots, compaction=False) as pipeline:
            report = await pipeline.write(records)
            # Only now that the retry is durable (new dead letters included) do the old ones go.
            await asyncio.to_thread(pipeline.store.delete_dead_letters, [d.id for d in letters])
            return report.records - report.failed, report.failed

    done, failed = asyncio.run(main())
    print(f"retried {len(letters)} dead letters: {done} done, {failed} failed again (clipdex dlq list)")
    return 0


def retry_record(letter: DeadLetter) -> Record:
    """A dead letter as a record again, as its source first sent it."""
    key = letter.item_id.removeprefix(f"{letter.source}:") if letter.item_id else None
    try:
        event = parse_event(letter.payload, key)
    except InvalidEvent as exc:
        return Record(letter.source, letter.payload, None, str(exc))
    return Record(letter.source, letter.payload, event)


def _folder_root(record: Record) -> Path | None:
    """The watched folder a folder item came from: its uri minus its relative path."""
    event = record.event
    if record.source != "folder" or event is None or not event.uri:
        return None
    rel = event.metadata.get("path")
    if isinstance(rel, str) and event.uri.endswith("/" + rel):
        return Path(event.uri[: -len(rel) - 1])
    return None


__all__ = ["format_summary", "register", "retry_record", "status_of"]
