"""The `clipdex` subcommands of the indexer side.

clipdex index DIR                 index a folder once (progress on stderr, a summary on stdout)
clipdex watch DIR                 index a folder, then keep it indexed as files come, change and go
clipdex consume ...               index catalog events from Kafka (a consumer group member)
clipdex status [--json]           counts, index state, model, freshness and lag
clipdex compact [--if-needed]     fold the delta into a new main index now
clipdex reembed --model M ...     move the store to another model without downtime (--abort: give up)
clipdex dlq list|retry|purge      the dead letters: what could not be indexed, and why
clipdex migrate --to milvus       copy the store to the other backend (or --to sqlite), without re-embedding
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from indexer import service
from indexer.compaction import Compactor
from indexer.formats import format_from_settings
from indexer.progress import ProgressBar, format_eta
from indexer.reembed import Progress as ReembedProgress
from indexer.reembed import ReembedReport
from indexer.sources.folder import FolderSummary
from indexer.sources.kafka_client import require_kafka
from shared.cliargs import add_setting_flag
from shared.config import Settings
from shared.errors import ConfigError, SpaceGone
from shared.migrate import MigrationReport, migrate
from shared.roles import DeadLetter
from shared.signals import stop_on_signals
from shared.status import read_status
from shared.stores import (
    Backend,
    PortableStore,
    describe,
    open_catalog,
    open_portable,
    open_writer,
    store_exists,
    writers,
)


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

    consume = sub.add_parser(
        "consume",
        help="index catalog change events from a Kafka topic (consumer group, at least once)",
        description="Consume catalog events from a Kafka topic and index them: clipdex's own {op, id, uri, "
        "metadata, version}, Debezium change events or CloudEvents (--format), with fields mapped by --map. "
        "Offsets are committed only after each micro-batch is durable in the store. SIGTERM or Ctrl-C "
        "finishes the batch in flight, commits it, and exits 0.",
    )
    add_setting_flag(consume, "--bootstrap-servers", "kafka_bootstrap_servers")
    add_setting_flag(consume, "--topic", "kafka_topic")
    add_setting_flag(consume, "--group", "kafka_group")
    add_setting_flag(consume, "--dlq-topic", "kafka_dlq_topic")
    add_setting_flag(consume, "--format", "event_format", choices=["clipdex", "debezium", "cloudevents"])
    add_setting_flag(consume, "--map", "event_map")
    _batch_flags(consume)
    consume.set_defaults(func=_cmd_consume)

    status = sub.add_parser("status", help="what is indexed, how fresh, and how far behind the indexer is")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=_cmd_status)

    comp = sub.add_parser(
        "compact",
        help="fold the delta into a new main index now",
        description="Build the next main index generation from the store and purge deleted vectors. "
        "Searches keep running meanwhile; a running indexer also does this on its own thresholds, and "
        "this command may run beside it (the two take turns).",
    )
    comp.add_argument("--if-needed", action="store_true", help="only when a size or age threshold is passed")
    comp.set_defaults(func=_cmd_compact)

    reembed = sub.add_parser(
        "reembed",
        help="move the store to another model without downtime: re-embed every item, then switch",
        description="Re-embed every live item with another model into a shadow space of the store, in "
        "micro-batches, while search keeps answering with the current model; then switch the store to the new "
        "model in one transaction. Running servers and indexers follow the switch without a restart. New and "
        "changed items that arrive meanwhile are re-embedded too; deleted ones leave both spaces. Interrupted "
        "(Ctrl-C, or killed), the same command resumes where it stopped. Point every process at the new model "
        "(CLIPDEX_MODEL, CLIPDEX_PRETRAINED, CLIPDEX_MODEL_CONFIGS) before its next restart.",
    )
    add_setting_flag(reembed, "--model", "model")
    add_setting_flag(reembed, "--pretrained", "pretrained")
    add_setting_flag(reembed, "--model-configs", "model_configs", type=Path)
    add_setting_flag(reembed, "--rate", "reembed_rate", type=float)
    add_setting_flag(reembed, "--grace-s", "reembed_grace_s", type=float)
    add_setting_flag(reembed, "--batch-size", "batch_size", type=int)
    reembed.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    reembed.add_argument(
        "--detach",
        action="store_true",
        help="only create the shadow space: indexers with CLIPDEX_REEMBED_IN_INDEXER fill it in the background",
    )
    reembed.add_argument(
        "--abort", action="store_true", help="give up a re-embed in progress: its shadow space is dropped"
    )
    reembed.set_defaults(func=_cmd_reembed)

    migrate = sub.add_parser(
        "migrate",
        help="copy the store to the other backend: items, vectors and dead letters, without re-embedding",
        description="Copy the SQLite store in CLIPDEX_DATA_DIR to Milvus (CLIPDEX_MILVUS_URI, ...), or back "
        "with --to sqlite. Nothing is embedded again. Stop the indexers first. Resumable: run it again after "
        "a stop and it copies only what the target does not hold yet. Then set CLIPDEX_STORE to the target.",
    )
    migrate.add_argument("--to", required=True, choices=["milvus", "sqlite"], help="the backend to copy into")
    migrate.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    migrate.set_defaults(func=_cmd_migrate)

    dlq = sub.add_parser("dlq", help="dead letters: list, retry or purge what could not be indexed")
    verbs = dlq.add_subparsers(dest="dlq_command", required=True, metavar="VERB")
    dlq_list = verbs.add_parser("list", help="the newest dead letters, with their reasons")
    dlq_list.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    dlq_list.add_argument("--json", action="store_true", help="print a JSON list")
    dlq_list.set_defaults(func=_cmd_dlq_list)
    for verb, func, text in (
        (
            "retry",
            _cmd_dlq_retry,
            "index the dead letters again (after fixing the cause); still failing ones stay. Beside a running "
            "indexer, that indexer retries them",
        ),
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
            return await service.index_folder(settings, args.dir, stop=stop, progress=progress)
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
        return await service.watch_folder(settings, args.dir, stop)

    summary = asyncio.run(main())
    print(format_summary(summary))
    return 0


def _cmd_consume(args: argparse.Namespace, settings: Settings) -> int:
    require_kafka(settings)  # before anything loads
    format_from_settings(settings)
    return asyncio.run(service.consume(settings))


# -- status and compact ----------------------------------------------------------------------------------------


def status_of(settings: Settings) -> dict[str, Any]:
    """Everything `clipdex status` shows, as plain data. Reads the store; loads no model."""
    with open_catalog(settings) as catalog:
        status = read_status(
            settings.data_dir, catalog, grace_s=settings.reembed_grace_s, store=describe(settings)
        ).to_dict()
    status["writers"] = [
        {"pid": w.pid, "command": w.command, "since": _iso(_at(w.since)), "writes": w.what} for w in writers(settings)
    ]
    return status


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat(timespec="seconds")


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    st = status_of(settings)
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    if not st["exists"]:
        print(f"no index yet in {st['store']} (run `clipdex index DIR`, `clipdex watch DIR` or `clipdex consume`)")
        return 0
    model = st["model"]
    lines = [
        f"store       {st['store']}",
        "model       "
        + ("(none yet)" if model is None else f"{model['name']} / {model['pretrained']} (dim {model['dim']})"),
        f"items       {st['items']} indexed, {st['failed']} failed, {st['dead_letters']} dead letters"
        + (f" ({st['dead_letters_retrying']} to be retried automatically)" if st["dead_letters_retrying"] else ""),
        f"index       main generation {st['generation']}, delta {st['delta_size']} vectors, "
        f"{st['tombstones']} deleted vectors not yet purged",
        f"newest      {st['newest_indexed_at'] or '-'}",
        f"compacted   {st['last_compaction_at'] or 'never'}",
    ]
    lines += _reembed_lines(st)
    for w in st["writers"]:
        lines.append(f"writer      {w['writes']}: pid {w['pid']} (`{w['command']}`), since {w['since']}")
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


def _reembed_lines(st: dict[str, Any]) -> list[str]:
    lines = []
    if (re := st["reembed"]) is not None:
        model = re["model"]
        pct = 100.0 if re["total"] == 0 else 100.0 * re["done"] / re["total"]
        head = f"re-embed    {model['name']} / {model['pretrained']} (dim {model['dim']}): "
        head += f"{re['done']}/{re['total']} ({pct:.0f}%), {re['failed']} failed, "
        if re["state"] == "running":
            head += f"{re['rate']:.1f}/s, ETA {format_eta(re['eta_s'])} (pid {re['pid']})"
        else:
            head += "paused: no process runs it (`clipdex reembed --model ...` resumes it)"
        lines.append(head)
    if (prev := st["previous_model"]) is not None:
        model = prev["model"]
        until = f" until {prev['removed_after']}" if prev["removed_after"] else ""
        lines.append(f"previous    {model['name']} / {model['pretrained']}: kept{until} for servers still switching")
    return lines


def _cmd_compact(args: argparse.Namespace, settings: Settings) -> int:
    if not store_exists(settings):
        print(f"nothing to compact: no store in {describe(settings)}")
        return 0
    with open_writer(settings, None) as store:  # beside running indexers too: the compaction lock serialises
        if store.catalog.model_identity() is None:
            print("nothing to compact: the store holds no vectors yet")
            return 0
        if store.compaction is None:
            print("nothing to compact: Milvus compacts its segments by itself")
            return 0
        compactor = Compactor.from_settings(store.compaction, settings, store.spaces)
        if store.spaces is not None:
            store.spaces.drop_spaces(settings.reembed_grace_s)
        results = compactor.compact_if_needed() if args.if_needed else compactor.compact()
    if not results:
        print("no threshold passed; not compacting")
    for result in results:
        print(
            f"compacted: main generation {result.generation}, {result.vectors} vectors ({result.kind}"
            f"{', rebuilt' if result.rebuilt else ''}), {result.purged} deleted vectors purged, {result.seconds:.2f} s"
        )
    return 0


# -- re-embedding ------------------------------------------------------------------------------------------------


def _cmd_reembed(args: argparse.Namespace, settings: Settings) -> int:
    if settings.store == "milvus":
        raise ConfigError(MILVUS_REEMBED)
    if not settings.db_path.exists():
        raise ConfigError(f"nothing to re-embed: no store in {settings.data_dir} (CLIPDEX_DATA_DIR)")
    if args.abort:
        return _reembed_abort(settings)
    settings = absolute_model_paths(settings)  # other processes load the new model from what the store records
    bar = None if args.no_progress else ProgressBar()

    def show(p: ReembedProgress) -> None:
        if bar is not None:
            bar.show(p.done, p.coverage.total, f"{p.coverage.failed} failed", rate=p.rate, eta_s=p.eta_s)

    async def main() -> int:
        stop = asyncio.Event()
        stop_on_signals(stop)
        try:
            report = await service.reembed(settings, stop, detach=args.detach, on_progress=show)
        finally:
            if bar is not None:
                bar.close()
        _print_reembed(report, settings)
        if report is not None and report.switched:
            await service.drop_previous(settings, stop, say=print)
        return 0

    try:
        return asyncio.run(main())
    except SpaceGone:
        print("clipdex reembed: the re-embed was aborted (clipdex reembed --abort)", file=sys.stderr)
        return 1


def _print_reembed(report: ReembedReport | None, settings: Settings) -> None:
    name = f"{settings.model} / {settings.pretrained}"
    if report is None:
        print(f"created a shadow space for {name}: indexers with CLIPDEX_REEMBED_IN_INDEXER=true fill it")
        return
    cov = report.coverage
    assert cov is not None
    rate = (report.embedded + report.reused) / report.seconds if report.seconds > 0 else 0.0
    print(
        f"{cov.done + cov.failed}/{cov.total} items re-embedded with {name} (this run: embedded {report.embedded}, "
        f"reused {report.reused} without a model call, {report.failed} failed, {rate:.1f} images/s)"
    )
    if report.switched:
        print(
            f"switched: the store answers with {settings.model} now; running servers and indexers follow. Set "
            "CLIPDEX_MODEL, CLIPDEX_PRETRAINED (and CLIPDEX_MODEL_CONFIGS) to it for their next start"
        )
        if cov.failed:
            print(f"{cov.failed} items whose source could not be read are failed now (clipdex dlq list, dlq retry)")
    else:
        print("interrupted: run the same command again to resume (finished items are not embedded again)")


def absolute_model_paths(settings: Settings) -> Settings:
    """A checkpoint path and a config folder as absolute paths: every process that follows the switch
    loads the new model from what the store records."""
    updates: dict[str, Any] = {}
    if settings.model_configs is not None:
        updates["model_configs"] = settings.model_configs.expanduser().resolve()
    checkpoint = Path(settings.pretrained).expanduser()
    if not settings.random_weights and checkpoint.is_file():
        updates["pretrained"] = str(checkpoint.resolve())
    return settings.model_copy(update=updates)


MILVUS_REEMBED = (
    "re-embedding (clipdex reembed) is supported on the SQLite store (CLIPDEX_STORE=sqlite) only; the Milvus "
    "store keeps one collection set per model and cannot switch in place yet (how it would map: "
    "docs/architecture.md, 'Changing the model: embedding spaces'). On Milvus today: index with the new model "
    "beside the running indexers (its own collections fill while search uses the old ones), then restart the "
    "servers with it (CLIPDEX_MODEL, CLIPDEX_PRETRAINED)"
)


def _reembed_abort(settings: Settings) -> int:
    with open_writer(settings, None) as store:
        assert store.spaces is not None, "the SQLite store re-embeds"
        shadow = store.spaces.abort()
        if shadow is None:
            print("no re-embed in progress")
            return 0
        store.spaces.drop_spaces(settings.reembed_grace_s)
        active = store.catalog.model_identity()
    model = shadow.model
    print(
        f"aborted the re-embed with {model.name if model else '?'}: its vectors are dropped; the store answers "
        f"with {active.name if active else '?'}"
    )
    return 0


# -- migrate -------------------------------------------------------------------------------------------------


def _cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    target_kind: Backend = args.to
    source_kind: Backend = "sqlite" if target_kind == "milvus" else "milvus"
    source_where = describe(settings.model_copy(update={"store": source_kind}))
    target_where = describe(settings.model_copy(update={"store": target_kind}))
    source = open_portable(settings, source_kind, None)
    if source is None:
        print(f"nothing to migrate: no store in {source_where}")
        return 0
    try:
        identity = source.model_identity()
        if identity is None:
            print(f"nothing to migrate: the store in {source_where} holds nothing yet")
            return 0
        target = open_portable(settings, target_kind, identity)
        assert target is not None, "a target bound to a model is created when missing"
        try:
            report = asyncio.run(_migrate_until_signal(source, target, show_progress=not args.no_progress))
        finally:
            target.close()
    finally:
        source.close()
    print(
        f"migrated {report.items} items from {source_where} to {target_where}: {report.copied} copied, "
        f"{report.items - report.copied} already there; {report.dead_letters} dead letters; {report.seconds:.1f} s"
    )
    if report.interrupted:
        print("interrupted: run the same command again to copy the rest")
        return 130
    print(f"now set CLIPDEX_STORE={target_kind} for every clipdex process")
    return 0


async def _migrate_until_signal(
    source: PortableStore, target: PortableStore, *, show_progress: bool
) -> MigrationReport:
    """The copy runs in a thread; a signal stops it after the chunk in flight (a re-run resumes)."""
    signalled = asyncio.Event()
    stop_on_signals(signalled)
    stop = threading.Event()
    bar = ProgressBar() if show_progress else None

    def progress(done: int, total: int, copied: int) -> None:
        if bar is not None:
            bar.show(done, total, f"{copied} copied")

    copy = asyncio.ensure_future(asyncio.to_thread(migrate, source, target, progress=progress, stop=stop))
    waiter = asyncio.ensure_future(signalled.wait())
    try:
        await asyncio.wait({copy, waiter}, return_when=asyncio.FIRST_COMPLETED)
        stop.set()  # no-op when the copy is done
        return await copy
    finally:
        waiter.cancel()
        if bar is not None:
            bar.close()


# -- dead letters ------------------------------------------------------------------------------------------------


def _cmd_dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    letters = _letters(settings, limit=args.limit)
    if args.json:
        print(json.dumps([_letter_json(d) for d in letters], indent=2))
        return 0
    if not letters:
        print("no dead letters")
    for d in letters:
        print(f"#{d.id} {_iso(d.created_at)} {d.source} {d.item_id or '-'} ({_retry_state(d)})\n    {d.reason}")
    return 0


def _retry_state(d: DeadLetter) -> str:
    """Where a dead letter stands: `attempt 2, transient: retried automatically at ...`."""
    head = f"attempt {d.attempts}, {d.tries} {'fetch' if d.tries == 1 else 'fetches'}"
    if d.retry_at is not None:
        return f"{head}, {'transient' if d.retriable else 'permanent'}: retried at {_iso(d.retry_at)}"
    if d.retriable:
        return f"{head}, transient: not retried automatically (retries used up, or a later event came)"
    return f"{head}, permanent"


def _letter_json(d: DeadLetter) -> dict[str, Any]:
    return {
        "id": d.id,
        "source": d.source,
        "item_id": d.item_id,
        "payload": d.payload,
        "reason": d.reason,
        "tries": d.tries,
        "created_at": _iso(d.created_at),
        "retriable": d.retriable,
        "attempts": d.attempts,
        "retry_at": _iso(d.retry_at),
    }


def _letters(settings: Settings, *, limit: int = 2**31) -> list[DeadLetter]:
    with open_catalog(settings) as catalog:
        return [] if catalog is None else catalog.dead_letters(limit=limit)


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
        with open_catalog(settings) as catalog:
            assert catalog is not None, "dead letters were listed, so the store exists"
            catalog.delete_dead_letters([d.id for d in letters])
    print(f"purged {len(letters)} dead letters")
    return 0


def _cmd_dlq_retry(args: argparse.Namespace, settings: Settings) -> int:
    letters = _chosen(args, settings)
    if letters is None:
        return 2
    if not letters:
        print("no dead letters to retry")
        return 0
    handed = _hand_over(settings, letters)  # two writers of one source must not race
    rest = [d for d in letters if d.id not in handed]
    if rest:
        report = asyncio.run(service.retry(settings, rest))  # WriterBusy if an indexer started meanwhile
        done, failed = report.records - report.failed, report.failed
        print(f"retried {len(rest)} dead letters: {done} done, {failed} failed again (clipdex dlq list)")
    return 0


def _hand_over(settings: Settings, letters: list[DeadLetter]) -> set[int]:
    """The letters whose items a running indexer retries by itself, made due now; their ids."""
    handed: set[int] = set()
    for writer in writers(settings):
        mine = [d for d in letters if d.id not in handed and writer.takes(d.item_id)]
        if not mine:
            continue
        with open_catalog(settings) as catalog:
            assert catalog is not None, "dead letters were listed, so the store exists"
            catalog.schedule_dead_letters([d.id for d in mine], datetime.now(UTC))
        handed.update(d.id for d in mine)
        print(
            f"{len(mine)} dead letters of {writer.what or 'its items'} are retried within a few seconds by the "
            f"indexer that runs for them: {writer.describe()} (see `clipdex dlq list`)"
        )
    return handed


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


__all__ = ["format_summary", "register", "status_of"]
