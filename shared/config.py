"""Settings: one class, read from CLIPDEX_* environment variables, validated at start.

Nothing else in clipdex reads os.environ. The CLI builds one `Settings` (flags override the environment)
and passes it down.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.errors import ConfigError

ENV_PREFIX = "CLIPDEX_"
# Milvus allows 255 characters; 64 leave room for the `_dead_letters` beside a collection, and for a name a
# person can read.
_MILVUS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def _split_list(value: Any) -> Any:
    """Accept a list, or a string separated by commas (and, for paths, the OS path separator)."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace(os.pathsep, ",").split(",")]
        return [p for p in parts if p]
    return value


class Settings(BaseSettings):
    """Every setting of clipdex. The field descriptions are the documentation (README's table)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    # Storage
    data_dir: Path = Field(
        Path("./clipdex-data"),
        description="Where the SQLite store and FAISS files live; with the Milvus store, this process's own "
        "scratch directory (indexer heartbeats for `clipdex status`).",
    )
    store: Literal["sqlite", "milvus"] = Field(
        "sqlite",
        description="Where items and vectors live: `sqlite` (one machine, in CLIPDEX_DATA_DIR) or `milvus` "
        "(several indexers and search replicas on one Milvus; needs `pip install 'clipdex[milvus]'`).",
    )
    milvus_uri: str = Field("http://localhost:19530", description="The Milvus server (CLIPDEX_STORE=milvus).")
    milvus_token: SecretStr | None = Field(
        None, description="Milvus credentials: `user:password`, or an API key; none when Milvus has no auth."
    )
    milvus_db: str = Field("default", description="The Milvus database that holds clipdex's collections.")
    milvus_collection: str | None = Field(
        None,
        description="The Milvus collection of items and vectors (with `_meta` and `_dead_letters` beside it); "
        "default: derived from the model, e.g. `clipdex_vit_b_32_1a2b3c4d5e6f`, one collection per model.",
    )

    # Model
    model: str = Field("ViT-B-32", description="open_clip architecture name (`clipdex models` lists them).")
    pretrained: str = Field(
        "laion2b_s34b_b79k",
        description="open_clip pretrained tag (downloaded once), a local checkpoint path, or `none` "
        "for random weights (testing only).",
    )
    model_configs: Path | None = Field(None, description="A directory of extra open_clip model config JSONs.")
    model_cache_dir: Path | None = Field(
        None,
        description="Where downloaded weights are cached, and ONNX exports (under `onnx/`; default "
        "`~/.cache/clipdex/onnx`).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto` uses CUDA when present.")
    runtime: Literal["auto", "torch", "onnx"] = Field(
        "auto",
        description="Inference engine: `onnx` (ONNX Runtime, CPU only; the model is exported once and cached), "
        "`torch`, or `auto`: ONNX Runtime on the CPU when it is installed, torch on CUDA.",
    )
    precision: Literal["auto", "fp32", "fp16", "bf16", "int8"] = Field(
        "auto",
        description="Model precision; `auto` is fp16 on CUDA and fp32 on the CPU. `int8` (ONNX Runtime only): "
        "linear layers quantised, the fastest on a CPU (about 1.5x fp32), vectors within 0.99 cosine of fp32 "
        "and mixable with them in one store.",
    )
    query_cache_size: int = Field(1024, ge=0, description="Recent text queries whose embeddings are cached.")
    # CLIP reads 77 tokens, about 300 characters of English: 1,000 characters leave the model's own cut the
    # one that matters for a real query, and keep a hostile one cheap (tokenising 0.9 MB took 3 s).
    max_query_chars: int = Field(
        1000,
        ge=10,
        le=100_000,
        description="Longest text query, in characters (runs of whitespace count as one); a longer one is cut "
        "before it is tokenised and its result says `query_truncated: true`.",
    )
    # Measured with the shapes model: re-encoded and resized copies of one image score 0.982 to 1.0 (5th
    # percentile 0.995), distinct images of one class 0.97 or more in 2.4% of pairs (bench/RESULTS.md).
    near_duplicate_cosine: float = Field(
        0.97,
        ge=0.5,
        le=1.0,
        description="Cosine at which `collapse=near` folds an item into a better-ranked one as a copy "
        "(re-encoded, resized); depends on the model.",
    )

    # Indexer
    batch_size: int = Field(64, ge=1, le=4096, description="Images per micro-batch.")
    max_batch_wait_ms: int = Field(
        200, ge=0, le=60_000, description="How long a micro-batch waits to fill before it is embedded."
    )
    decode_workers: int = Field(
        0, ge=0, le=256, description="Threads that fetch and decode images; 0 means one per CPU core."
    )
    fetch_retries: int = Field(3, ge=0, le=20, description="Retries of a transient fetch failure.")
    dlq_retries: int = Field(
        6,
        ge=0,
        le=100,
        description="Automatic retries of a dead letter whose failure was transient (a timeout, HTTP 408, 429 "
        "or 5xx, a reset connection, EIO or ESTALE), by the running indexer; 0 turns them off.",
    )
    dlq_retry_delay_s: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="Wait before the first automatic retry of a transient dead letter; each next wait is twice "
        "as long (at most 6 hours).",
    )
    watch_polling: bool = Field(
        False,
        description="Watch folders by polling instead of OS file notifications (network shares, some "
        "container mounts, where notifications never arrive).",
    )
    watch_settle_ms: int = Field(
        500,
        ge=0,
        le=600_000,
        description="A watched file is indexed once its size and mtime have not changed for this long, "
        "so a file still being copied is never indexed half-written.",
    )
    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories that image paths may resolve under (comma-separated). The watched folder "
        "is always allowed.",
    )
    allowed_url_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts whose http(s) image URLs may be fetched (comma-separated); empty means none. "
        "`name` allows ports 80 and 443, `name:port` that port. Names that resolve to loopback, private, "
        "link-local or multicast addresses are refused unless the address itself is listed "
        "(`10.0.0.5`, `127.0.0.1:8080`, `[::1]:8080`).",
    )
    fetch_timeout_s: float = Field(
        10.0, gt=0, le=600, description="The longest one URL download may take, start to end, redirects included."
    )
    max_image_bytes: int = Field(50 * 2**20, ge=1024, description="Largest image file or download, in bytes.")
    max_pixels: int = Field(
        64_000_000, ge=1024, description="Largest image, in pixels; larger ones are refused before decoding."
    )
    decode_memory_mb: int = Field(
        1024,
        ge=64,
        description="Memory that the image decodes of one process may hold together, in MiB (estimated from "
        "each image's header); a decode waits for room. Uploads, thumbnails and indexing share it.",
    )
    kafka_bootstrap_servers: str | None = Field(None, description="Kafka bootstrap servers, host:port.")
    kafka_topic: str | None = Field(None, description="Topic of catalog change events.")
    kafka_group: str = Field("clipdex-indexer", description="Kafka consumer group.")
    kafka_dlq_topic: str | None = Field(None, description="Topic that dead letters are also published to.")
    event_format: Literal["clipdex", "debezium", "cloudevents"] = Field(
        "clipdex",
        description="What the topic's messages are: clipdex's own events, Debezium change events of a catalog "
        "table, or CloudEvents (structured or binary mode). README: Event formats.",
    )
    event_map: str | None = Field(
        None,
        description="Which fields are the item's id, image (`uri`), images (`uris`), metadata and version: a JSON "
        "object of JSON Pointers, or a path to a file holding one. Required for `debezium`. README: Event formats.",
    )
    kafka_session_timeout_ms: int = Field(
        10_000,
        ge=1_000,
        le=300_000,
        description="How long the group waits for a silent indexer before another takes its partitions "
        "(a crashed indexer's events resume after this).",
    )

    # Changing the model (clipdex reembed)
    reembed_rate: float = Field(
        0.0,
        ge=0,
        description="At most this many images per second re-embedded by `clipdex reembed` (0: as fast as the "
        "model goes); a lower rate leaves CPU or GPU to live indexing and queries.",
    )
    reembed_grace_s: float = Field(
        300.0,
        ge=0,
        description="After a re-embed switches the store to the new model, the old model's vectors are kept "
        "this long (seconds) for search processes still switching, then removed.",
    )
    reembed_in_indexer: bool = Field(
        False,
        description="Indexers (`watch`, `consume`, `run`) also fill a pending re-embed "
        "(`clipdex reembed --detach`) in the background, one process at a time.",
    )

    # Index
    index_kind: Literal["auto", "flat", "ivf", "hnsw"] = Field(
        "auto", description="Main index type; `auto` is flat below ann_threshold vectors, else IVF."
    )
    ann_threshold: int = Field(100_000, ge=1, description="Vectors at which `auto` switches to an ANN index.")
    ivf_nlist: int | None = Field(None, ge=1, description="IVF lists; default about sqrt(n).")
    ivf_nprobe: int | None = Field(None, ge=1, description="IVF lists probed per query; default nlist/32, at least 32.")
    hnsw_m: int = Field(32, ge=4, le=256, description="HNSW graph degree.")
    hnsw_ef_search: int = Field(128, ge=1, description="HNSW search breadth.")
    compact_delta_size: int = Field(
        20_000,
        ge=1,
        description="Compact when the delta index holds this many vectors, or main this many deleted ones.",
    )
    compact_max_age_s: float = Field(
        600.0, gt=0, description="Compact when the oldest uncompacted vector is this old (seconds)."
    )
    refresh_interval_ms: int = Field(
        250, ge=10, le=60_000, description="How often a query process reads new vectors from the store."
    )
    faiss_gpu: bool = Field(False, description="Search a GPU copy of the index (needs faiss-gpu and a GPU).")
    vector_dtype: Literal["float32", "float16"] = Field(
        "float32", description="How embeddings are stored in SQLite; float16 halves the disk use."
    )

    # Server
    host: str = Field("127.0.0.1", description="Address the HTTP/MCP server binds.")
    port: int = Field(8765, ge=0, le=65535, description="Port of the HTTP/MCP server.")
    api_token: SecretStr | None = Field(
        None, description="Bearer token for /mcp and the HTTP API; required to bind a non-loopback address."
    )
    max_upload_bytes: int = Field(20 * 2**20, ge=1024, description="Largest HTTP request body, in bytes.")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra Host header values the server answers to (comma-separated, `name` or `name:port`), "
        "e.g. the name clients use behind a proxy; the bound address and localhost always work. Other Host "
        "headers are refused (DNS-rebinding protection).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("allowed_hosts", "allowed_url_hosts", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:  # not split on ':', which separates a host from its port
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("allowed_url_hosts", "allowed_hosts")
    @classmethod
    def _hosts_lower(cls, value: list[str]) -> list[str]:
        return [h.lower() for h in value]

    @field_validator("milvus_db")
    @classmethod
    def _milvus_db_name(cls, value: str) -> str:
        if not _MILVUS_NAME.fullmatch(value):
            raise ValueError("a Milvus database name: a letter or _, then letters, digits or _ (at most 64)")
        return value

    @field_validator("milvus_collection")
    @classmethod
    def _milvus_collection_name(cls, value: str | None) -> str | None:
        if value is not None and not _MILVUS_NAME.fullmatch(value):
            raise ValueError("a Milvus collection name: a letter or _, then letters, digits or _ (at most 64)")
        return value

    @field_validator("milvus_token", mode="before")
    @classmethod
    def _empty_milvus_token_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("allowed_url_hosts")
    @classmethod
    def _host_entries(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_url_host(entry)  # ValueError says which entry is wrong
        return value

    @field_validator("api_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: Any) -> Any:
        # `CLIPDEX_API_TOKEN=` (compose writes an unset variable so) is no token, not the empty token:
        # otherwise "a non-loopback bind needs a token" passes while requests need none.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("pretrained")
    @classmethod
    def _pretrained_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a pretrained tag, a checkpoint path, or `none`")
        return value.strip()

    @property
    def random_weights(self) -> bool:
        return self.pretrained.lower() == "none"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "clipdex.sqlite3"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"


def parse_url_host(entry: str) -> tuple[str, int | None]:
    """`name`, `name:port`, `1.2.3.4:port`, `::1` or `[::1]:port` -> (lowercased host, port or None).

    Raises ValueError for anything else."""
    text = entry.strip()
    try:
        return str(ipaddress.ip_address(text)), None  # a bare IPv6 address has colons but no port
    except ValueError:
        pass
    parts = urlsplit("//" + text)
    host = (parts.hostname or "").lower()
    if not host or parts.username is not None or parts.path or parts.query or parts.fragment:
        raise ValueError(f"{entry!r} is not a host name or address, with an optional :port")
    port = parts.port  # raises ValueError for a port that is not a number from 0 to 65535
    if port == 0:
        raise ValueError(f"{entry!r}: port 0 is not a port")
    return host, port


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def load_settings(**overrides: Any) -> Settings:
    """Read the environment, apply overrides (CLI flags; None means 'not given'), validate.

    Raises ConfigError naming every invalid CLIPDEX_* variable.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            problems.append(f"{env_name(field)}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems)) from exc
