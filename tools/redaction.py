"""What the server tells a client about a failure, and about the reasons it stored.

A client learns what it needs to fix its request, never how the server is laid out: no allowed root, no
data directory, no internal address, no third-party library's own text (httpx's "[Errno 111] Connection
refused" turned a URL fetch into a port scanner), no absolute path and no URL query string (a signed
URL's signature) in a stored reason. The server log keeps every detail.

    error(exc)    the text of an error response (HTTP JSON, MCP tool error)
        store and fetch failures: a fixed text; others: the message without the text of the library
        error it wraps (`raise ... from exc`), then shown as a reason
    reason(text)  a stored dead-letter or failure reason, or any other text, as a client may see it
        allowed roots and the data directory: "…"; other absolute paths: "…/<file name>";
        URLs: no user, query string ("?…") or fragment; non-global IP addresses: "<internal address>"
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from shared.config import Settings
from shared.errors import ClipdexError, FetchFailed, StoreError

HIDDEN = "…"
INTERNAL_ADDRESS = "<internal address>"

STORE_UNAVAILABLE = "the index store is unavailable right now; try again shortly (the server log says why)"
FETCH_FAILED = (
    "the image could not be fetched from its URL: the host did not answer in time, refused, or failed; "
    "try again later or send the image itself"
)

# Both end before a blank or a quote, and not on punctuation that ends a phrase ("...x.jpg: no such file").
_URL = re.compile(r"\b(?:https?|file)://[^\s'\"<>]*[^\s'\"<>:;,.)\]]", re.IGNORECASE)
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/\\…])/[^\s'\"()\[\],;]*[^\s'\"()\[\],;:.]")  # not inside a word or URL
_IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?!\.?\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}(?![\w:])", re.IGNORECASE)
_EMPTY_BRACKETS = re.compile(r"\s*\(\s*\)")
_DANGLING_COLON = re.compile(r"(?::\s*)+(?=[;,.)]|$)")


@dataclass(frozen=True)
class Redactor:
    hidden: tuple[str, ...]  # absolute directory paths a client must not read

    @classmethod
    def for_settings(cls, settings: Settings, extra_roots: Iterable[Path] = ()) -> Redactor:
        """The allowed roots, `extra_roots` (a watched folder) and the data directory, as configured and
        as real paths."""
        dirs = [*settings.allowed_roots, *extra_roots, settings.data_dir]
        hidden = {form for d in dirs for form in (os.path.abspath(d), os.path.realpath(d))}
        return cls(tuple(sorted((h for h in hidden if h != "/"), key=len, reverse=True)))

    def error(self, exc: ClipdexError) -> str:
        if isinstance(exc, StoreError):
            return STORE_UNAVAILABLE
        if isinstance(exc, FetchFailed):
            return FETCH_FAILED
        return self.reason(_without_cause(exc))

    def reason(self, text: str) -> str:
        text = _URL.sub(self._url, text)
        text = self._hide_dirs(text)
        text = _ABSOLUTE_PATH.sub(_short_path, text)
        return _hide_addresses(text)

    def _hide_dirs(self, text: str) -> str:
        for path in self.hidden:
            text = re.sub(re.escape(path) + r"(?![^/\s'\"(),;\]])", HIDDEN, text)
        return text

    def _url(self, match: re.Match[str]) -> str:
        url = match[0]
        try:
            parts = urlsplit(url)
            host = parts.netloc.rpartition("@")[2]
        except ValueError:
            return f"{url.partition(':')[0]}://{HIDDEN}"
        if parts.scheme.lower() == "file":
            return f"file://{HIDDEN}/{parts.path.rsplit('/', 1)[-1]}"
        query = f"?{HIDDEN}" if parts.query else ""
        return f"{parts.scheme}://{host}{parts.path}{query}"


def _without_cause(exc: ClipdexError) -> str:
    """The message without the text of the third-party error it wraps, where that text is a whole
    segment (after ': ' or in brackets), tidied so that no empty brackets or dangling colons remain."""
    text = str(exc)
    cause = exc.__cause__
    detail = str(cause) if cause is not None and not isinstance(cause, ClipdexError) else ""
    if not detail:
        return text
    for piece in (f"{type(cause).__name__}: {detail}", detail):
        text = re.sub(r"(?:(?<=: )|(?<=\())" + re.escape(piece) + r"(?=\)|;|,|$)", "", text)
    text = _EMPTY_BRACKETS.sub("", text)
    return _DANGLING_COLON.sub("", text).strip()


def _short_path(match: re.Match[str]) -> str:
    name = match[0].rstrip("/").rsplit("/", 1)[-1]
    return f"{HIDDEN}/{name}" if name else HIDDEN


def _hide_addresses(text: str) -> str:
    def hide(match: re.Match[str]) -> str:
        try:
            address = ipaddress.ip_address(match[0])
        except ValueError:
            return match[0]
        return match[0] if address.is_global else INTERNAL_ADDRESS

    return _IPV6.sub(hide, _IPV4.sub(hide, text))
