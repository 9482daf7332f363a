"""Getting image bytes from a path under an allowed root or a URL on an allowlisted host.

Paths are resolved with symlinks followed and must land under one of the allowed roots, so `..` and a
symlink that points outside are refused. URLs are fetched only from allowlisted hosts, with a timeout, a
size cap, and redirects followed only within the same host.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from shared.config import Settings
from shared.errors import FetchFailed, HostNotAllowed, ImageRejected, PathNotAllowed, SourceNotFound

_MAX_REDIRECTS = 3


@dataclass(frozen=True)
class FetchPolicy:
    roots: tuple[Path, ...]
    hosts: frozenset[str]
    max_bytes: int
    timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings, extra_roots: Sequence[Path] = ()) -> FetchPolicy:
        roots = tuple(Path(os.path.realpath(r)) for r in [*settings.allowed_roots, *extra_roots])
        return cls(roots=roots, hosts=frozenset(settings.allowed_url_hosts), max_bytes=settings.max_image_bytes)

    def with_root(self, root: Path) -> FetchPolicy:
        real = Path(os.path.realpath(root))
        return FetchPolicy((*self.roots, real), self.hosts, self.max_bytes, self.timeout_s)


def is_url(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https")


def fetch_bytes(uri: str, policy: FetchPolicy) -> bytes:
    """Bytes of a local path, a file:// URI, or an http(s) URL, within the policy."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        return fetch_url(uri, policy)
    if parts.scheme == "file":
        return read_path(unquote(parts.path), policy)  # file:///a/b%20c.jpg names "/a/b c.jpg"
    if parts.scheme and len(parts.scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise SourceNotFound(f"unsupported URI scheme {parts.scheme!r}; use a path, file://, http or https")
    return read_path(uri, policy)


def resolve_path(path: str | Path, policy: FetchPolicy) -> Path:
    """The real path of `path` if it lies under an allowed root; relative paths are tried per root."""
    if not policy.roots:
        raise PathNotAllowed(f"{path}: no allowed roots are configured (CLIPDEX_ALLOWED_ROOTS)")
    raw = Path(path)
    candidates = [raw] if raw.is_absolute() else [root / raw for root in policy.roots]
    allowed = [
        real
        for real in (Path(os.path.realpath(c)) for c in candidates)
        if any(real.is_relative_to(root) for root in policy.roots)
    ]
    if allowed:  # a relative path names the file under whichever root holds it
        return next((real for real in allowed if real.exists()), allowed[0])
    roots = ", ".join(str(r) for r in policy.roots)
    raise PathNotAllowed(f"{path}: outside the allowed roots ({roots}); see CLIPDEX_ALLOWED_ROOTS")


def read_path(path: str | Path, policy: FetchPolicy) -> bytes:
    real = resolve_path(path, policy)
    try:
        size = real.stat().st_size
        if not real.is_file():
            raise ImageRejected(f"{path}: not a regular file")
        if size > policy.max_bytes:
            raise ImageRejected(
                f"{path}: {size:,} bytes is over the limit of {policy.max_bytes:,} (CLIPDEX_MAX_IMAGE_BYTES)"
            )
        return real.read_bytes()
    except FileNotFoundError as exc:
        raise SourceNotFound(f"{path}: no such file") from exc
    except PermissionError as exc:
        raise SourceNotFound(f"{path}: permission denied") from exc
    except IsADirectoryError as exc:
        raise ImageRejected(f"{path}: is a directory") from exc


def check_url(url: str, policy: FetchPolicy) -> str:
    """The URL's host, if fetching it is allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise HostNotAllowed(f"{url}: only http and https URLs are fetched")
    host = (parts.hostname or "").lower()
    if not policy.hosts:
        raise HostNotAllowed(f"{url}: URL fetching is off; allowlist hosts with CLIPDEX_ALLOWED_URL_HOSTS")
    if host not in policy.hosts:
        raise HostNotAllowed(f"{url}: host {host!r} is not in CLIPDEX_ALLOWED_URL_HOSTS")
    return host


def fetch_url(url: str, policy: FetchPolicy, transport: httpx.BaseTransport | None = None) -> bytes:
    host = check_url(url, policy)
    with httpx.Client(follow_redirects=False, timeout=policy.timeout_s, transport=transport) as client:
        for _ in range(_MAX_REDIRECTS + 1):
            try:
                with client.stream("GET", url) as response:
                    if response.is_redirect:
                        target = urljoin(url, response.headers.get("location", ""))
                        if (urlsplit(target).hostname or "").lower() != host:
                            raise HostNotAllowed(f"{url}: redirects to another host ({target}); refused")
                        url = target
                        continue
                    _raise_for_status(url, response.status_code)
                    return _read_capped(url, response, policy.max_bytes)
            except httpx.TimeoutException as exc:
                raise FetchFailed(f"{url}: timed out after {policy.timeout_s:g} s") from exc
            except httpx.HTTPError as exc:  # transport errors, and a body that does not decode (bad gzip)
                raise FetchFailed(f"{url}: {type(exc).__name__}: {exc}") from exc
            except httpx.InvalidURL as exc:
                raise SourceNotFound(f"{url}: invalid URL ({exc})") from exc
    raise SourceNotFound(f"{url}: more than {_MAX_REDIRECTS} redirects")


def _raise_for_status(url: str, status: int) -> None:
    if status >= 500 or status == 429:
        raise FetchFailed(f"{url}: HTTP {status}")
    if status == 404 or status == 410:
        raise SourceNotFound(f"{url}: HTTP {status}")
    if status >= 400:
        raise SourceNotFound(f"{url}: HTTP {status}")


def _read_capped(url: str, response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ImageRejected(f"{url}: {int(declared):,} bytes is over the limit of {max_bytes:,}")
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > max_bytes:
            raise ImageRejected(f"{url}: more than {max_bytes:,} bytes (CLIPDEX_MAX_IMAGE_BYTES)")
        chunks.append(chunk)
    return b"".join(chunks)
