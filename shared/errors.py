"""The one exception tree of clipdex.

    ClipdexError
    ├── ConfigError              a setting is invalid; raised at start, names the variable
    ├── ModelError               the CLIP model cannot be loaded
    │   ├── UnknownModelError    no such open_clip architecture
    │   ├── CheckpointNotFound   CLIPDEX_PRETRAINED names a file that does not exist
    │   ├── ModelDownloadError   a hub download failed (offline?)
    │   └── ModelExportError     a tower cannot be exported to ONNX (CLIPDEX_RUNTIME=onnx)
    ├── StoreError               the store itself failed (disk full, locked): stop, do not commit
    │   ├── StoreUnavailable     the store cannot be reached now (Milvus down, restarting): retriable
    │   └── ModelMismatchError   the store was built with another model
    ├── WriterBusy               another process writes to this data directory (names it): retriable
    ├── ItemError                one item cannot be indexed or used; the others go on
    │   ├── InvalidEvent         a catalog event that does not match the schema
    │   ├── ImageRejected        not an image, corrupt, truncated, too many bytes or pixels
    │   ├── PathNotAllowed       a path outside the allowed roots (traversal, symlink escape)
    │   ├── HostNotAllowed       a URL whose host is not allowlisted
    │   ├── SourceNotFound       the file or URL does not exist
    │   ├── FetchFailed          a transient fetch failure (timeout, HTTP 5xx): retriable
    │   └── EmbedFailed          the model failed on one image (a flaky device?): retriable
    ├── NotFound                 an unknown item id
    └── InvalidRequest           a search argument out of range or missing

Each class says whether retrying the same operation may succeed (`retriable`), in the manner of aiokafka's
errors. Third-party errors are wrapped where they enter clipdex, with `raise ... from exc`.
"""

from __future__ import annotations


class ClipdexError(Exception):
    """Base of every error clipdex raises on purpose."""

    retriable: bool = False


class ConfigError(ClipdexError):
    """A setting is invalid. The message names the CLIPDEX_* variable to fix."""


class ModelError(ClipdexError):
    """The CLIP model cannot be loaded."""


class UnknownModelError(ModelError):
    pass


class CheckpointNotFound(ModelError):
    pass


class ModelDownloadError(ModelError):
    pass


class ModelExportError(ModelError):
    pass


class StoreError(ClipdexError):
    """The store itself failed. The indexer stops without committing its source position."""


class StoreUnavailable(StoreError):
    """The store cannot be reached now (a Milvus server down or restarting, the network). Nothing was
    written that a replay does not make whole: wait, then try the same batch again, still uncommitted."""

    retriable = True


class ModelMismatchError(StoreError):
    pass


class WriterBusy(ClipdexError):
    """Another process holds the data directory's writer lock. The message names it (pid, command, since
    when); trying again after it stops succeeds."""

    retriable = True


class ItemError(ClipdexError):
    """One item cannot be processed. It is dead-lettered; the rest of its batch goes on."""


class InvalidEvent(ItemError):
    pass


class ImageRejected(ItemError):
    pass


class PathNotAllowed(ItemError):
    pass


class HostNotAllowed(ItemError):
    pass


class SourceNotFound(ItemError):
    pass


class FetchFailed(ItemError):
    retriable = True


class EmbedFailed(ItemError):
    """The model failed on this one image, alone: perhaps the image, perhaps a device that is out of
    memory or lost. Retried a bounded number of times (a dead letter's automatic retries)."""

    retriable = True


class NotFound(ClipdexError):
    """An item id that the store does not hold."""


class InvalidRequest(ClipdexError):
    """A search request with a bad argument (top_k out of range, an empty query, ...)."""
