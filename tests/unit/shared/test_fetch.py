"""Fetching image bytes: paths only under allowed roots, URLs only from allowlisted hosts, errors that say why."""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from shared.config import Settings
from shared.errors import FetchFailed, HostNotAllowed, ImageRejected, PathNotAllowed, SourceNotFound
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
