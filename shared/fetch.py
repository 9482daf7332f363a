"""Getting image bytes from a path under an allowed root or a URL on an allowlisted host.

Paths: the path is resolved (symlinks followed) and must land under an allowed root; the file is then
opened once (O_NOFOLLOW, O_NONBLOCK) and the real path of the descriptor that was opened is checked
again, so swapping a file or a directory for a symlink between the check and the open escapes nothing.
Only a regular file is read (a FIFO would block), and never more than max_bytes + 1 bytes of it.

URLs: http(s) only, a host and port the allowlist names (ports 80 and 443 unless it names `host:port`),
connections only to checked addresses (shared/egress.py), one deadline for the whole download including
redirects, each redirect checked like the first URL, a size cap on the decoded body.

Failures say whether a retry may help (shared.errors): a timeout, HTTP 408, 429 or 5xx, a reset or
refused connection, an unresolvable name, EIO or ESTALE on a network share are FetchFailed (retriable);
404, 410 and other 4xx are SourceNotFound, a refused path, host, port or address is PathNotAllowed or
HostNotAllowed, too many bytes is ImageRejected. Messages name neither the allowed roots nor library
texts nor a URL's query string (signed URLs carry credentials there); the log keeps the detail.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import httpx

from shared.config import Settings
from shared.egress import Allowlist, GuardedTransport, Resolve, system_resolve
from shared.errors import FetchFailed, HostNotAllowed, ImageRejected, PathNotAllowed, SourceNotFound

logger = logging.getLogger(__name__)

_MAX_REDIRECTS = 3
# errno values of a file that may read fine later: a network share that hiccups or was remounted.
_TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR})
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class FetchPolicy:
    roots: tuple[Path, ...]
    hosts: frozenset[str]  # CLIPDEX_ALLOWED_URL_HOSTS entries: name, name:port, address, address:port
    max_bytes: int
    timeout_s: float = 10.0  # the whole download, redirects included

    @classmethod
    def from_settings(cls, settings: Settings, extra_roots: Sequence[Path] = ()) -> FetchPolicy:
        roots = tuple(Path(os.path.realpath(r)) for r in [*settings.allowed_roots, *extra_roots])
        return cls(
            roots=roots,
            hosts=frozenset(settings.allowed_url_hosts),
            max_bytes=settings.max_image_bytes,
            timeout_s=settings.fetch_timeout_s,
        )

    def with_root(self, root: Path) -> FetchPolicy:
        real = Path(os.path.realpath(root))
        return FetchPolicy((*self.roots, real), self.hosts, self.max_bytes, self.timeout_s)


def is_url(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https")


def fetch_bytes(uri: str, policy: FetchPolicy) -> bytes:
    """Bytes of a local path, a file:// URI, or an http(s) URL, within the policy."""
    try:
        parts = urlsplit(uri)
    except ValueError as exc:  # http://[::1/x.jpg
        raise SourceNotFound(f"{shown_url(uri)}: invalid URI") from exc
    if parts.scheme in ("http", "https"):
        return fetch_url(uri, policy)
    if parts.scheme == "file":
        return read_path(unquote(parts.path), policy)  # file:///a/b%20c.jpg names "/a/b c.jpg"
    if parts.scheme and len(parts.scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise SourceNotFound(f"unsupported URI scheme {parts.scheme!r}; use a path, file://, http or https")
    return read_path(uri, policy)


# -- paths ----------------------------------------------------------------------------------------------------------


def resolve_path(path: str | Path, policy: FetchPolicy) -> Path:
    """The real path of `path` if it lies under an allowed root; relative paths are tried per root."""
    if not policy.roots:
        raise PathNotAllowed(f"{path}: no allowed roots are configured (CLIPDEX_ALLOWED_ROOTS)")
    raw = Path(path)
    candidates = [raw] if raw.is_absolute() else [root / raw for root in policy.roots]
    try:
        allowed = [real for real in (Path(os.path.realpath(c)) for c in candidates) if _under_roots(real, policy)]
    except ValueError as exc:  # a NUL byte
        raise SourceNotFound(f"{shown_path(path)}: invalid path") from exc
    if allowed:  # a relative path names the file under whichever root holds it
        return next((real for real in allowed if real.exists()), allowed[0])
    logger.info("refused %s: outside the allowed roots %s", path, ", ".join(map(str, policy.roots)))
    raise PathNotAllowed(f"{path}: outside the allowed roots; see CLIPDEX_ALLOWED_ROOTS")


def read_path(path: str | Path, policy: FetchPolicy) -> bytes:
    """The bytes of a regular file under an allowed root, at most policy.max_bytes of them."""
    real = resolve_path(path, policy)
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as exc:
        raise _path_error(path, exc) from exc
    try:
        opened = _opened_path(fd, real)
        if not _under_roots(opened, policy):
            logger.warning("refused %s: the file opened is %s, outside the allowed roots", path, opened)
            raise PathNotAllowed(f"{path}: outside the allowed roots; see CLIPDEX_ALLOWED_ROOTS")
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageRejected(f"{path}: not a regular file")
        if info.st_size > policy.max_bytes:
            raise ImageRejected(
                f"{path}: {info.st_size:,} bytes is over the limit of {policy.max_bytes:,} (CLIPDEX_MAX_IMAGE_BYTES)"
            )
        data = _read_at_most(fd, policy.max_bytes + 1)
        if len(data) > policy.max_bytes:  # it grew after fstat
            raise ImageRejected(f"{path}: more than {policy.max_bytes:,} bytes (CLIPDEX_MAX_IMAGE_BYTES)")
        return data
    except OSError as exc:
        raise _path_error(path, exc) from exc
    finally:
        os.close(fd)


def _under_roots(real: Path, policy: FetchPolicy) -> bool:
    return any(real.is_relative_to(root) for root in policy.roots)


def _opened_path(fd: int, fallback: Path) -> Path:
    """The real path of an open descriptor, from the kernel."""
    if sys.platform.startswith("linux"):
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    if sys.platform == "darwin":
        import fcntl

        name = fcntl.fcntl(fd, fcntl.F_GETPATH, b"\0" * 1024)  # type: ignore[attr-defined,unused-ignore]
        return Path(os.fsdecode(name.rstrip(b"\0")))
    return fallback  # no way to ask: the resolved path, opened without following a final symlink


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        chunk = os.read(fd, min(limit - total, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _path_error(path: str | Path, exc: OSError) -> Exception:
    if exc.errno == errno.ENOENT:
        return SourceNotFound(f"{path}: no such file")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return SourceNotFound(f"{path}: permission denied")
    if exc.errno == errno.ELOOP:  # the last component became a symlink after the path was checked
        logger.warning("refused %s: it became a symbolic link while being opened", path)
        return PathNotAllowed(f"{path}: outside the allowed roots; see CLIPDEX_ALLOWED_ROOTS")
    if exc.errno in _TRANSIENT_ERRNOS:
        logger.info("reading %s failed: %s", path, exc)
        return FetchFailed(f"{path}: read error ({errno.errorcode.get(exc.errno or 0, 'I/O')}); will be retried")
    logger.info("reading %s failed: %s", path, exc)
    return SourceNotFound(f"{path}: cannot be read ({errno.errorcode.get(exc.errno or 0, 'error')})")


# -- URLs -----------------------------------------------------------------------------------------------------------


def check_url(url: str, policy: FetchPolicy) -> str:
    """The URL's host, if its scheme, host and port are allowed."""
    shown = shown_url(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise SourceNotFound(f"{shown}: invalid URL") from exc
    if parts.scheme not in ("http", "https"):
        raise HostNotAllowed(f"{shown}: only http and https URLs are fetched")
    allow = Allowlist(policy.hosts)
    if not allow:
        raise HostNotAllowed(f"{shown}: URL fetching is off; allowlist hosts with CLIPDEX_ALLOWED_URL_HOSTS")
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise SourceNotFound(f"{shown}: invalid URL (bad port)") from exc
    if not allow.has_host(host):
        raise HostNotAllowed(f"{shown}: host {host!r} is not in CLIPDEX_ALLOWED_URL_HOSTS")
    if not allow.allows(host, port):
        raise HostNotAllowed(
            f"{shown}: port {port} is not allowed; only 80 and 443 unless CLIPDEX_ALLOWED_URL_HOSTS names {host}:{port}"
        )
    return host


def fetch_url(
    url: str,
    policy: FetchPolicy,
    transport: httpx.BaseTransport | None = None,
    resolve: Resolve = system_resolve,
) -> bytes:
    """The body of an image URL within the policy. `transport` replaces the network (tests); `resolve`
    replaces the system's name lookup."""
    deadline = time.monotonic() + policy.timeout_s
    transport = transport or GuardedTransport(Allowlist(policy.hosts), deadline, resolve)
    first = url
    with httpx.Client(transport=transport, follow_redirects=False, trust_env=False) as client:
        for _ in range(_MAX_REDIRECTS + 1):
            check_url(url, policy)  # the first URL and every redirect: scheme, host, port
            try:
                with client.stream("GET", url, timeout=_left(deadline, policy, url)) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        _check_redirect(first, url, policy)
                        continue
                    _raise_for_status(url, response.status_code)
                    return _read_capped(url, response, policy, deadline)
            except httpx.TimeoutException as exc:
                logger.info("fetching %s timed out: %r", shown_url(url), exc)
                raise FetchFailed(f"{shown_url(url)}: timed out after {policy.timeout_s:g} s") from exc
            except httpx.ConnectError as exc:
                logger.info("fetching %s: cannot connect: %r", shown_url(url), exc)
                raise FetchFailed(f"{shown_url(url)}: cannot connect to the host") from exc
            except httpx.DecodingError as exc:
                logger.info("fetching %s: undecodable body: %r", shown_url(url), exc)
                raise FetchFailed(f"{shown_url(url)}: the response body cannot be decoded") from exc
            except httpx.HTTPError as exc:  # a reset, a broken response
                logger.info("fetching %s failed: %r", shown_url(url), exc)
                raise FetchFailed(f"{shown_url(url)}: the connection failed") from exc
            except httpx.InvalidURL as exc:
                raise SourceNotFound(f"{shown_url(url)}: invalid URL") from exc
    raise SourceNotFound(f"{shown_url(first)}: more than {_MAX_REDIRECTS} redirects")


def _check_redirect(first: str, target: str, policy: FetchPolicy) -> None:
    """A redirect may go to any allowlisted host; check_url then checks it like the first URL, and the
    transport checks the address it resolves to."""
    if not Allowlist(policy.hosts).has_host((urlsplit(target).hostname or "").lower()):
        logger.info("refused a redirect from %s to %s", shown_url(first), shown_url(target))
        raise HostNotAllowed(f"{shown_url(first)}: redirects to another host, which is not allowed")


def _left(deadline: float, policy: FetchPolicy, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchFailed(f"{shown_url(url)}: timed out after {policy.timeout_s:g} s")
    return left


def shown_path(path: str | Path) -> str:
    """`path` fit for a message: control characters (a NUL byte) escaped."""
    text = os.fspath(path)
    return text if text.isprintable() else repr(text)[1:-1]


def shown_url(url: str) -> str:
    """`url` without its query string, fragment and user info: what a message may repeat."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "(an invalid URL)"  # not repeated: it may be anything


def _raise_for_status(url: str, status: int) -> None:
    if status >= 500 or status in (408, 429):
        raise FetchFailed(f"{shown_url(url)}: HTTP {status}")
    if status >= 400:
        raise SourceNotFound(f"{shown_url(url)}: HTTP {status}")


def _read_capped(url: str, response: httpx.Response, policy: FetchPolicy, deadline: float) -> bytes:
    max_bytes = policy.max_bytes
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ImageRejected(f"{shown_url(url)}: {int(declared):,} bytes is over the limit of {max_bytes:,}")
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > max_bytes:
            raise ImageRejected(f"{shown_url(url)}: more than {max_bytes:,} bytes (CLIPDEX_MAX_IMAGE_BYTES)")
        if time.monotonic() > deadline:  # a transport without the deadline built in (tests' MockTransport)
            raise FetchFailed(f"{shown_url(url)}: timed out after {policy.timeout_s:g} s")
        chunks.append(chunk)
    return b"".join(chunks)
