"""The packages' layering, read from the source: who may import whom (README, "Architecture").

clipdex ──▶ indexer ──▶ shared        shared imports neither side; the sides never import each other
        └─▶ tools   ──▶ shared        callers depend on store roles (shared.roles), not on a backend
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("clipdex", "shared", "indexer", "tools")


def modules() -> dict[str, set[str]]:
    """module name -> the modules it imports (absolute names; relative imports are not used here)."""
    out: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            imported: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    imported.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module:
                    assert node.level == 0, f"{name}: a relative import"
                    imported.add(node.module)
                    imported.update(f"{node.module}.{alias.name}" for alias in node.names)
            out[name] = imported
    return out


MODULES = modules()


def importers_of(prefix: str) -> set[str]:
    return {m for m, imported in MODULES.items() if any(i == prefix or i.startswith(prefix + ".") for i in imported)}


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("shared", ("indexer", "tools", "clipdex")), ("indexer", ("tools", "clipdex")), ("tools", ("indexer", "clipdex"))],
)
def test_a_package_never_imports_the_layers_above_or_beside_it(package: str, forbidden: tuple[str, ...]) -> None:
    for other in forbidden:
        wrong = {m for m in importers_of(other) if in_package(m, package)}
        assert not wrong, f"{sorted(wrong)} import {other}"


def test_the_roles_name_no_backend() -> None:
    backends = ("sqlite3", "faiss", "shared.sqlite", "pymilvus")
    assert not {b for b in backends if "shared.roles" in importers_of(b)}


def test_only_the_store_opener_and_compaction_reach_into_the_sqlite_backend() -> None:
    outside = {m for m in importers_of("shared.sqlite") if not in_package(m, "shared.sqlite")}
    assert outside == {"shared.stores", "indexer.compaction"}


def test_only_the_store_opener_reaches_into_the_milvus_backend() -> None:
    outside = {m for m in importers_of("shared.milvus") if not in_package(m, "shared.milvus")}
    assert outside == {"shared.stores"}


def test_pymilvus_is_imported_by_its_adapter_alone() -> None:
    """The SQLite store never loads pymilvus (over a second of imports): only the adapter imports it, lazily."""
    assert importers_of("pymilvus") == {"shared.milvus.client"}
    assert importers_of("grpc") <= {"shared.milvus.client"}


def test_aiokafka_is_imported_by_its_adapter_alone() -> None:
    assert importers_of("aiokafka") == {"indexer.sources.kafka_client"}


def test_the_sources_do_not_import_each_other_or_the_composition() -> None:
    """Consuming Kafka does not load the folder watcher, and a source knows its sink only as a `Sink`."""
    composition = ("indexer.service", "indexer.pipeline", "indexer.commands")
    for source, other in (
        ("indexer.sources.folder", "indexer.sources.kafka"),
        ("indexer.sources.kafka", "indexer.sources.folder"),
    ):
        imported = MODULES[source]
        assert not {i for i in imported if i.startswith((other, *composition))}
    assert not {i for i in MODULES["indexer.sources.kafka"] if i.startswith(("watchfiles", "indexer.sources.settle"))}


def test_fakes_are_for_tests_only() -> None:
    assert not importers_of("indexer.testing")
