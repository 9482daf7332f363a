"""Fetching image bytes: paths only under allowed roots, URLs only from allowlisted hosts, errors that say why."""

from __future__ import annotations

import errno
import gzip
import http.server
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import httpx
import pytest
import trustme

from shared.config import Settings, load_settings
from shared.egress import Allowlist, GuardedTransport
from shared.errors import ConfigError, FetchFailed, HostNotAllowed, ImageRejected, PathNotAllowed, SourceNotFound
from shared.fetch import FetchPolicy, fetch_bytes, fetch_url, resolve_path
from tests.conftest import tiny_settings_for


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "images"
    (r / "cats").mkdir(parents=True)
    (r / "cats" / "tom.jpg").write_bytes(b"tom")
    (tmp_path / "secret.txt").write_bytes(b"password")
    return r


def policy(*roots: Path, hosts: tuple[str, ...] = (), max_bytes: int = 1024) -> FetchPolicy:
    return FetchPolicy(tuple(Path(os.path.realpath(r)) for r in roots), frozenset(hosts), max_bytes, timeout_s=2)


# -- paths -------------------------------------------------------------------------------------------------------


def test_a_path_under_a_root_is_read_absolute_relative_or_as_a_file_uri(root: Path) -> None:
    p = policy(root)
    assert fetch_bytes(str(root / "cats" / "tom.jpg"), p) == b"tom"
    assert fetch_bytes("cats/tom.jpg", p) == b"tom"
    assert fetch_bytes((root / "cats" / "tom.jpg").as_uri(), p) == b"tom"


def test_a_file_uri_is_percent_decoded(root: Path) -> None:
    (root / "cats" / "tom & jerry.jpg").write_bytes(b"both")
    uri = (root / "cats" / "tom & jerry.jpg").as_uri()
    assert "%20" in uri
    assert fetch_bytes(uri, policy(root)) == b"both"


@pytest.mark.parametrize("path", ["../secret.txt", "cats/../../secret.txt", "cats/../../images/../secret.txt"])
def test_dot_dot_traversal_out_of_the_root_is_refused(path: str, root: Path) -> None:
    with pytest.raises(PathNotAllowed, match="outside the allowed roots"):
        fetch_bytes(path, policy(root))


def test_an_absolute_path_outside_the_roots_is_refused(root: Path, tmp_path: Path) -> None:
    with pytest.raises(PathNotAllowed, match="CLIPDEX_ALLOWED_ROOTS"):
        fetch_bytes(str(tmp_path / "secret.txt"), policy(root))
    with pytest.raises(PathNotAllowed):
        fetch_bytes("file:///etc/passwd", policy(root))


def test_a_symlink_that_escapes_the_root_is_refused(root: Path, tmp_path: Path) -> None:
    (root / "cats" / "innocent.jpg").symlink_to(tmp_path / "secret.txt")
    (root / "linked-dir").symlink_to(tmp_path)
    for path in ("cats/innocent.jpg", "linked-dir/secret.txt"):
        with pytest.raises(PathNotAllowed):
            fetch_bytes(path, policy(root))


def test_a_symlink_inside_the_root_is_fine(root: Path) -> None:
    (root / "alias.jpg").symlink_to(root / "cats" / "tom.jpg")
    assert fetch_bytes("alias.jpg", policy(root)) == b"tom"


def test_a_relative_path_is_found_under_whichever_root_holds_it(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "more"
    (other / "dogs").mkdir(parents=True)
    (other / "dogs" / "rex.jpg").write_bytes(b"rex")
    assert fetch_bytes("dogs/rex.jpg", policy(root, other)) == b"rex"
    assert resolve_path("cats/tom.jpg", policy(root, other)) == Path(os.path.realpath(root / "cats" / "tom.jpg"))


def test_no_roots_means_no_paths(root: Path) -> None:
    with pytest.raises(PathNotAllowed, match="no allowed roots"):
        fetch_bytes(str(root / "cats" / "tom.jpg"), policy())


def test_a_missing_file_is_source_not_found(root: Path) -> None:
    with pytest.raises(SourceNotFound, match="no such file"):
        fetch_bytes("cats/felix.jpg", policy(root))


def test_a_file_over_the_size_cap_is_refused(root: Path) -> None:
    (root / "big.jpg").write_bytes(b"x" * 2048)
    with pytest.raises(ImageRejected, match=r"2,048 bytes is over the limit of 1,024.*CLIPDEX_MAX_IMAGE_BYTES"):
        fetch_bytes("big.jpg", policy(root))


def test_a_directory_or_a_fifo_is_not_read(root: Path) -> None:
    with pytest.raises(ImageRejected, match="not a regular file"):
        fetch_bytes("cats", policy(root))
    os.mkfifo(root / "pipe.jpg")  # reading it would block forever
    with pytest.raises(ImageRejected, match="not a regular file"):
        fetch_bytes("pipe.jpg", policy(root))


def test_an_unknown_scheme_is_refused(root: Path) -> None:
    with pytest.raises(SourceNotFound, match="unsupported URI scheme 'ftp'"):
        fetch_bytes("ftp://example.com/a.jpg", policy(root))


def test_the_policy_from_settings_includes_the_extra_roots(tmp_path: Path, root: Path) -> None:
    settings: Settings = tiny_settings_for(
        tmp_path / "data", allowed_roots=[str(root)], allowed_url_hosts="CDN.example.com"
    )
    p = FetchPolicy.from_settings(settings, extra_roots=[tmp_path / "watched"])
    assert p.roots == (Path(os.path.realpath(root)), Path(os.path.realpath(tmp_path / "watched")))
    assert p.hosts == frozenset({"cdn.example.com"}) and p.max_bytes == settings.max_image_bytes


# -- URLs (httpx.MockTransport) ---------------------------------------------------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


def mock(handler: Handler) -> httpx.MockTransport:
    return httpx.MockTransport(handler)


def serve(body: bytes = b"jpeg-bytes", status: int = 200, **headers: str) -> httpx.MockTransport:
    return mock(lambda request: httpx.Response(status, content=body, headers=headers))


WEB = policy(hosts=("img.example.com",), max_bytes=1024)


def test_a_url_on_an_allowed_host_is_fetched() -> None:
    assert fetch_url("https://img.example.com/a.jpg", WEB, transport=serve()) == b"jpeg-bytes"
    assert fetch_url("https://IMG.example.com/a.jpg", WEB, transport=serve()) == b"jpeg-bytes"


def test_a_url_on_another_host_is_refused_without_a_request() -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"requested {request.url}")

    for url in ("https://evil.example.net/a.jpg", "https://img.example.com@evil.example.net/a.jpg"):
        with pytest.raises(HostNotAllowed, match="not in CLIPDEX_ALLOWED_URL_HOSTS"):
            fetch_url(url, WEB, transport=mock(fail))


def test_no_hosts_means_no_url_fetching() -> None:
    with pytest.raises(HostNotAllowed, match="URL fetching is off"):
        fetch_url("https://img.example.com/a.jpg", policy(), transport=serve())


def test_a_redirect_within_the_host_is_followed() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/old.jpg":
            return httpx.Response(301, headers={"location": "/new.jpg"})
        return httpx.Response(200, content=b"new")

    assert fetch_url("https://img.example.com/old.jpg", WEB, transport=mock(handler)) == b"new"


def test_a_redirect_to_another_host_is_refused() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(302, headers={"location": "http://169.254.169.254/latest/meta-data"})

    with pytest.raises(HostNotAllowed, match="redirects to another host"):
        fetch_url("https://img.example.com/a.jpg", WEB, transport=mock(handler))
    assert seen == ["https://img.example.com/a.jpg"]


def test_a_redirect_loop_ends() -> None:
    loop = mock(lambda request: httpx.Response(302, headers={"location": "/a.jpg"}))
    with pytest.raises(SourceNotFound, match="redirects"):
        fetch_url("https://img.example.com/a.jpg", WEB, transport=loop)


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_server_errors_are_retriable(status: int) -> None:
    with pytest.raises(FetchFailed, match=f"HTTP {status}") as err:
        fetch_url("https://img.example.com/a.jpg", WEB, transport=serve(status=status))
    assert err.value.retriable


@pytest.mark.parametrize("status", [404, 410, 403])
def test_client_errors_are_not_retriable(status: int) -> None:
    with pytest.raises(SourceNotFound, match=f"HTTP {status}") as err:
        fetch_url("https://img.example.com/a.jpg", WEB, transport=serve(status=status))
    assert not err.value.retriable


@pytest.mark.parametrize(
    "exc", [httpx.ConnectTimeout("slow"), httpx.ReadTimeout("slow"), httpx.ConnectError("refused")]
)
def test_timeouts_and_connection_errors_are_retriable(exc: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(FetchFailed) as err:
        fetch_url("https://img.example.com/a.jpg", WEB, transport=mock(handler))
    assert err.value.retriable


def test_a_broken_compressed_body_is_a_fetch_failure_not_a_crash() -> None:
    transport = serve(b"\x1f\x8b not really gzip", **{"content-encoding": "gzip"})
    with pytest.raises(FetchFailed):
        fetch_url("https://img.example.com/a.jpg", WEB, transport=transport)


def test_a_url_httpx_cannot_parse_is_an_item_error_not_a_crash() -> None:
    with pytest.raises(SourceNotFound, match="invalid URL"):
        fetch_url("https://img.example.com/a\x00.jpg", WEB, transport=serve())


def test_a_declared_length_over_the_cap_is_refused_before_reading() -> None:
    with pytest.raises(ImageRejected, match="over the limit"):
        fetch_url("https://img.example.com/a.jpg", WEB, transport=serve(b"x" * 2000))


def test_a_body_over_the_cap_is_refused_even_without_a_length() -> None:
    def chunks() -> object:
        for _ in range(10):
            yield b"x" * 200

    transport = mock(lambda request: httpx.Response(200, content=chunks()))  # type: ignore[arg-type]
    with pytest.raises(ImageRejected, match="more than 1,024 bytes"):
        fetch_url("https://img.example.com/a.jpg", WEB, transport=transport)


def test_a_gzip_bomb_is_capped_on_the_decoded_bytes() -> None:
    bomb = gzip.compress(b"\0" * 1_000_000)
    assert len(bomb) < 1024 * 2
    transport = serve(bomb, **{"content-encoding": "gzip"})
    with pytest.raises(ImageRejected):
        fetch_url(
            "https://img.example.com/a.jpg", policy(hosts=("img.example.com",), max_bytes=4096), transport=transport
        )


# -- hostile URLs and files (issue 9) ----------------------------------------------------------------------------


class _Local(http.server.BaseHTTPRequestHandler):
    """/ok.jpg: bytes; /trickle: one byte every 0.1 s, forever; /reset: the connection is reset;
    /to?u=URL: a redirect to URL."""

    def do_GET(self) -> None:
        if self.path == "/ok.jpg":
            self.send_response(200)
            self.send_header("content-length", "9")
            self.end_headers()
            self.wfile.write(b"local-jpg")
        elif self.path == "/trickle":
            self.send_response(200)
            self.send_header("content-length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        elif self.path == "/reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
        elif self.path.startswith("/to?u="):
            self.send_response(302)
            self.send_header("location", unquote(self.path[len("/to?u=") :]))
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def local_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Local)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def dns(table: dict[str, list[str]], calls: list[str] | None = None) -> Callable[[str, int], list[str]]:
    """A fake resolver: name -> addresses."""

    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    return resolve


def test_a_trickling_download_is_cut_at_one_deadline_for_the_whole_download(local_port: int) -> None:
    """One byte every 0.1 s never trips a per-read timeout; the whole download still ends at the deadline."""
    p = FetchPolicy((), frozenset({f"127.0.0.1:{local_port}"}), max_bytes=4096, timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(FetchFailed, match="timed out after 1 s") as err:
        fetch_url(f"http://127.0.0.1:{local_port}/trickle", p)
    assert time.monotonic() - started < 3.0
    assert err.value.retriable


def test_the_deadline_also_bounds_a_mocked_body() -> None:
    def slow_chunks() -> Iterator[bytes]:
        for _ in range(100):
            time.sleep(0.05)
            yield b"x"

    transport = mock(lambda request: httpx.Response(200, content=slow_chunks()))
    p = FetchPolicy((), frozenset({"img.example.com"}), max_bytes=4096, timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(FetchFailed, match="timed out"):
        fetch_url("https://img.example.com/a.jpg", p, transport=transport)
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("url", ["https://img.example.com:8443/a.jpg", "http://img.example.com:22/a.jpg"])
def test_only_ports_80_and_443_unless_the_allowlist_names_the_port(url: str) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"requested {request.url}")

    with pytest.raises(HostNotAllowed, match=r"port \d+ is not allowed"):
        fetch_url(url, WEB, transport=mock(fail))
    port = urlsplit(url).port
    named = policy(hosts=(f"img.example.com:{port}",))
    assert fetch_url(url, named, transport=serve()) == b"jpeg-bytes"
    assert fetch_url("http://img.example.com:80/a.jpg", WEB, transport=serve()) == b"jpeg-bytes"


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.9.9.9",
        "169.254.169.254",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.10",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.251",
        "::1",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
    ],
)
def test_a_name_that_resolves_to_an_internal_address_is_refused(address: str, local_port: int) -> None:
    p = FetchPolicy((), frozenset({"images.example.com"}), max_bytes=4096, timeout_s=2)
    with pytest.raises(HostNotAllowed, match="internal address") as err:
        fetch_url("http://images.example.com/a.jpg", p, resolve=dns({"images.example.com": [address]}))
    assert address not in str(err.value)  # the client learns no internal address


def test_an_internal_address_is_fetched_only_when_the_allowlist_names_it(local_port: int) -> None:
    url = f"http://127.0.0.1:{local_port}/ok.jpg"
    named = FetchPolicy((), frozenset({f"127.0.0.1:{local_port}"}), max_bytes=4096, timeout_s=2)
    assert fetch_url(url, named) == b"local-jpg"
    by_name = FetchPolicy((), frozenset({f"localhost:{local_port}"}), max_bytes=4096, timeout_s=2)
    with pytest.raises(HostNotAllowed, match="internal address"):
        fetch_url(f"http://localhost:{local_port}/ok.jpg", by_name, resolve=dns({"localhost": ["127.0.0.1"]}))
    no_port = FetchPolicy((), frozenset({"127.0.0.1"}), max_bytes=4096, timeout_s=2)
    with pytest.raises(HostNotAllowed, match="port"):
        fetch_url(url, no_port)


def test_the_checked_address_is_the_one_connected_to(local_port: int) -> None:
    """DNS rebinding: a name that answers a safe address to the check and another one to the connection.
    The name is looked up once per connection, and the connection goes to the address that was checked."""
    calls: list[str] = []
    answers = iter([["127.0.0.1"], ["169.254.169.254"], ["169.254.169.254"]])

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    p = FetchPolicy((), frozenset({f"rebind.test:{local_port}", f"127.0.0.1:{local_port}"}), 4096, timeout_s=2)
    assert fetch_url(f"http://rebind.test:{local_port}/ok.jpg", p, resolve=rebinding) == b"local-jpg"
    assert calls == ["rebind.test"]


def test_every_redirect_is_checked_again(local_port: int) -> None:
    origin = f"http://127.0.0.1:{local_port}"
    p = FetchPolicy((), frozenset({f"127.0.0.1:{local_port}", "cdn.test"}), max_bytes=4096, timeout_s=2)
    resolve = dns({"cdn.test": ["169.254.169.254"]})
    to_metadata = f"{origin}/to?u={quote('http://cdn.test/latest/meta-data', safe='')}"
    with pytest.raises(HostNotAllowed, match="internal address"):
        fetch_url(to_metadata, p, resolve=resolve)
    to_other_port = f"{origin}/to?u={quote('http://127.0.0.1:22/', safe='')}"
    with pytest.raises(HostNotAllowed, match="port 22"):
        fetch_url(to_other_port, p, resolve=resolve)
    to_self = f"{origin}/to?u={quote(f'{origin}/ok.jpg', safe='')}"
    assert fetch_url(to_self, p, resolve=resolve) == b"local-jpg"


def test_a_redirect_to_another_allowlisted_host_is_followed() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "img.example.com":
            return httpx.Response(302, headers={"location": "https://cdn.example.com/a.jpg"})
        return httpx.Response(200, content=b"from-cdn")

    p = policy(hosts=("img.example.com", "cdn.example.com"))
    assert fetch_url("https://img.example.com/a.jpg", p, transport=mock(handler)) == b"from-cdn"


@pytest.mark.parametrize("status", [408, 429, 500, 503, 504])
def test_transient_statuses_are_retriable(status: int) -> None:
    with pytest.raises(FetchFailed, match=f"HTTP {status}") as err:
        fetch_url("https://img.example.com/a.jpg", WEB, transport=serve(status=status))
    assert err.value.retriable


def test_a_connection_reset_is_retriable_and_says_no_library_text(local_port: int) -> None:
    p = FetchPolicy((), frozenset({f"127.0.0.1:{local_port}"}), max_bytes=4096, timeout_s=2)
    with pytest.raises(FetchFailed) as err:
        fetch_url(f"http://127.0.0.1:{local_port}/reset", p)
    assert err.value.retriable
    assert "Errno" not in str(err.value) and "Error" not in str(err.value), str(err.value)


def test_a_refused_connection_says_no_library_text() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = FetchPolicy((), frozenset({f"127.0.0.1:{port}"}), max_bytes=4096, timeout_s=2)
    with pytest.raises(FetchFailed, match="cannot connect") as err:
        fetch_url(f"http://127.0.0.1:{port}/a.jpg", p)
    assert "Errno" not in str(err.value) and "refused" not in str(err.value).lower(), str(err.value)
    assert err.value.retriable


def test_an_unknown_name_is_a_retriable_failure() -> None:
    p = FetchPolicy((), frozenset({"gone.test"}), max_bytes=4096, timeout_s=2)
    with pytest.raises(FetchFailed, match="cannot resolve") as err:
        fetch_url("http://gone.test/a.jpg", p, resolve=dns({}))
    assert err.value.retriable


def test_messages_show_no_query_string() -> None:
    """Signed URLs carry credentials in the query: a failure's reason (a dead letter, a tool error) leaves it out."""
    with pytest.raises(SourceNotFound) as err:
        fetch_url("https://img.example.com/a.jpg?X-Amz-Signature=s3cr3t", WEB, transport=serve(status=404))
    assert "s3cr3t" not in str(err.value) and "https://img.example.com/a.jpg" in str(err.value)


def test_path_not_allowed_does_not_list_the_roots(root: Path, tmp_path: Path) -> None:
    with pytest.raises(PathNotAllowed) as err:
        fetch_bytes(str(tmp_path / "secret.txt"), policy(root))
    assert str(root) not in str(err.value) and "CLIPDEX_ALLOWED_ROOTS" in str(err.value)


def test_a_symlink_swapped_in_between_the_check_and_the_open_is_refused(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check and the open see different files when an attacker swaps the file for a symlink between
    them: the opened file itself must be checked."""
    real_open = os.open

    def swapping_open(path: str, flags: int, *args: object) -> int:
        target = root / "cats" / "tom.jpg"
        if os.fspath(path) == os.path.realpath(target):
            target.unlink()
            target.symlink_to(tmp_path / "secret.txt")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", swapping_open)
    with pytest.raises(PathNotAllowed):
        fetch_bytes("cats/tom.jpg", policy(root))


def test_a_directory_swapped_for_a_symlink_is_refused(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """O_NOFOLLOW guards only the last component; the real path of the opened file guards the rest."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "tom.jpg").write_bytes(b"not yours")
    real_open = os.open

    def swapping_open(path: str, flags: int, *args: object) -> int:
        cats = root / "cats"
        if not cats.is_symlink():
            cats.rename(tmp_path / "cats-moved")
            cats.symlink_to(outside)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", swapping_open)
    with pytest.raises(PathNotAllowed):
        fetch_bytes("cats/tom.jpg", policy(root))


def test_a_file_that_grows_after_its_size_is_checked_is_still_capped(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root / "growing.jpg").write_bytes(b"x" * 5000)
    real_fstat = os.fstat

    def stale_fstat(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, 10, *st[7:10]))

    monkeypatch.setattr(os, "fstat", stale_fstat)
    with pytest.raises(ImageRejected, match="more than 1,024 bytes"):
        fetch_bytes("growing.jpg", policy(root))


@pytest.mark.parametrize("code", [errno.EIO, errno.ESTALE])
def test_io_errors_of_a_network_share_are_retriable(code: int, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_read(fd: int, n: int) -> bytes:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "read", failing_read)
    with pytest.raises(FetchFailed, match="will be retried") as err:
        fetch_bytes("cats/tom.jpg", policy(root))
    assert err.value.retriable


def test_host_entries_with_ports_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPDEX_ALLOWED_URL_HOSTS", "cdn.example.com, 127.0.0.1:8080,[::1]:9000")
    assert load_settings().allowed_url_hosts == ["cdn.example.com", "127.0.0.1:8080", "[::1]:9000"]
    monkeypatch.setenv("CLIPDEX_ALLOWED_URL_HOSTS", "cdn.example.com:http")
    with pytest.raises(ConfigError, match="CLIPDEX_ALLOWED_URL_HOSTS"):
        load_settings()


@contextmanager
def https_server(ca: trustme.CA, name: str) -> Iterator[int]:
    """An HTTPS server on 127.0.0.1 whose certificate, from `ca`, is for `name`."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Local)
    server.daemon_threads = True
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_https_to_the_pinned_address_still_verifies_the_certificate_against_the_name() -> None:
    ca = trustme.CA()
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    resolve = dns({"img.test": ["127.0.0.1"]})
    for served_name, fetched in (("img.test", True), ("someone-else.test", False)):
        with https_server(ca, served_name) as port:
            p = FetchPolicy((), frozenset({f"img.test:{port}", f"127.0.0.1:{port}"}), 4096, timeout_s=5)
            transport = GuardedTransport(Allowlist(p.hosts), time.monotonic() + 5, resolve, ssl_context=client_context)
            if fetched:
                assert fetch_url(f"https://img.test:{port}/ok.jpg", p, transport=transport) == b"local-jpg"
            else:
                with pytest.raises(FetchFailed, match="cannot connect"):
                    fetch_url(f"https://img.test:{port}/ok.jpg", p, transport=transport)


@pytest.mark.parametrize(
    "uri", ["http://[::1/x.jpg", "https://img.example.com:99999/a.jpg", "/srv/a\x00.jpg", "a\x00b"]
)
def test_a_malformed_uri_or_path_is_an_item_error_not_a_crash(uri: str, root: Path) -> None:
    p = FetchPolicy((Path(os.path.realpath(root)),), frozenset({"img.example.com", "::1"}), 1024)
    with pytest.raises(SourceNotFound, match="invalid"):
        fetch_bytes(uri, p)
