"""Unit tests for luma_proxy.proxy.pages: our own short pages, and mitmproxy's replaced."""

from __future__ import annotations

import html
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy.proxy.layers.http import _http1, _http2, _http3

from luma_proxy.proxy import pages
from luma_proxy.proxy.engine_patches import install_engine_error_pages
from luma_proxy.proxy.pages import RETRY_AFTER, builtin_page_body, page, page_body, page_text

ENGINE_MESSAGE = "[Errno 111] Connect call failed ('10.1.2.3', 3000)"


@pytest.mark.parametrize("status", [400, 404, 405, 413, 431, 500, 502, 503, 504])
def test_page_status_and_headers(status: int) -> None:
    response = page(status)
    assert response.status_code == status
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-store"
    assert str(status) in response.text
    assert response.content == page_body(status)
    assert response.headers["Content-Length"] == str(len(response.content))
    assert ("Retry-After" in response.headers) is (status == 503)


def test_503_has_retry_after() -> None:
    assert page(503).headers["Retry-After"] == RETRY_AFTER
    assert int(RETRY_AFTER) > 0


def test_extra_headers() -> None:
    response = page(404, {"X-Extra": "1", "Cache-Control": "max-age=1"})
    assert response.headers["X-Extra"] == "1"
    assert response.headers["Cache-Control"] == "max-age=1"


def test_page_bodies_are_distinct_and_say_nothing_internal() -> None:
    bodies = {status: page_body(status) for status in (400, 404, 502, 503, 504)}
    assert len(set(bodies.values())) == len(bodies)
    assert b"Service Unavailable" in bodies[503]
    for body in bodies.values():
        assert b"mitmproxy" not in body.lower()
        assert body.startswith(b"<!DOCTYPE html>")


def test_unknown_status_still_gets_a_page() -> None:
    body = page_body(599)
    assert b"599" in body
    assert b"could not be completed" in body
    assert page(418).status_code == 418


def _check_clean(data: bytes) -> None:
    assert b"10.1.2.3" not in data
    assert b"3000" not in data
    assert b"Errno" not in data
    assert b"mitmproxy" not in data.lower()


def test_engine_error_pages_hide_the_socket_error() -> None:
    # Without the patch, mitmproxy quotes the socket error (this is what we guard against).
    original_http1 = _http1.make_error_response
    original_formats = [m.format_error for m in (_http1, _http2, _http3)]
    try:
        before = _http1.make_error_response(502, ENGINE_MESSAGE)
        if original_http1.__module__ == _http1.__name__:  # mitmproxy's own, not yet replaced
            assert b"10.1.2.3" in before and b"mitmproxy" in before.lower()

        install_engine_error_pages()
        data = _http1.make_error_response(502, ENGINE_MESSAGE)
        assert data.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
        _check_clean(data)
        head, _, body = data.partition(b"\r\n\r\n")
        assert body == page_body(502)
        assert b"content-length: %d" % len(body) in head.lower()
        assert b"connection: close" in head.lower()
        assert b"\r\nserver:" not in head.lower()

        for module in (_http1, _http2, _http3):
            body = module.format_error(502, ENGINE_MESSAGE)
            _check_clean(body)
            assert body == page_body(502)
        assert _http1.make_error_response(400, "bad request line b'GET /\\x00'").endswith(
            page_body(400)
        )
    finally:
        _http1.make_error_response = original_http1
        for module, original in zip((_http1, _http2, _http3), original_formats, strict=True):
            module.format_error = original


# ------------------------------------------------------------------ custom pages
CUSTOM = b"<!DOCTYPE html><title>ours</title><p>custom {{message}}</p>\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _fresh_pages(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    """No default directory, empty caches, and a clock the test moves."""
    monkeypatch.delenv(pages.PAGES_ENV, raising=False)
    clock = Clock()
    monkeypatch.setattr(pages, "_now", clock)
    pages.set_default_pages_dir(None)
    pages.clear_cache()
    yield clock
    pages.set_default_pages_dir(None)
    pages.clear_cache()


@pytest.fixture
def clock(_fresh_pages: Clock) -> Clock:
    return _fresh_pages


def _write(directory: Path, name: str, data: bytes = CUSTOM) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def test_custom_page_is_served_with_our_headers(tmp_path: Path) -> None:
    _write(tmp_path, "503.html", b"<p>down</p>")
    response = page(503, {"X-Extra": "1"}, pages_dir=str(tmp_path))
    assert response.status_code == 503
    assert response.content == b"<p>down</p>"
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Retry-After"] == RETRY_AFTER
    assert response.headers["X-Extra"] == "1"
    assert response.headers["Content-Length"] == str(len(b"<p>down</p>"))
    assert pages.load_page(str(tmp_path), 503) == b"<p>down</p>"


def test_missing_page_falls_back_to_the_built_in_one(tmp_path: Path) -> None:
    _write(tmp_path, "503.html")
    assert page(404, pages_dir=str(tmp_path)).content == builtin_page_body(404)
    assert page(404, pages_dir=str(tmp_path / "nowhere")).content == builtin_page_body(404)
    assert pages.load_page(str(tmp_path), 404) is None


def test_status_outside_the_allow_list_gets_the_built_in_page(tmp_path: Path) -> None:
    for name in ("418.html", "200.html", "599.html"):
        _write(tmp_path, name)
    for status in (418, 200, 599):
        assert page(status, pages_dir=str(tmp_path)).content == builtin_page_body(status)
        assert pages.load_page(str(tmp_path), status) is None
    # Only names built from the allow-list are ever opened, whatever is passed in.
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub", "404.html")
    for bogus in ("../etc/passwd", "sub/404", "404", "maintenance.html", 404.0, [404]):
        assert pages.load_page(str(tmp_path), bogus) is None  # type: ignore[arg-type]
    assert "404.html" in {f"{status}.html" for status in pages.CUSTOM_STATUSES}
    assert {413, 431, 502, 503, 504, 404} <= pages.CUSTOM_STATUSES


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_is_never_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "503.html")  # opening it for reading would block the event loop
    assert page(503, pages_dir=str(tmp_path)).content == builtin_page_body(503)


def test_directory_too_large_and_empty_files_fall_back(tmp_path: Path) -> None:
    (tmp_path / "502.html").mkdir()
    _write(tmp_path, "504.html", b"x" * (pages.MAX_PAGE_BYTES + 1))
    _write(tmp_path, "413.html", b"")
    _write(tmp_path, "431.html", b"y" * pages.MAX_PAGE_BYTES)  # at the cap: served
    for status in (502, 504, 413):
        assert page(status, pages_dir=str(tmp_path)).content == builtin_page_body(status)
    assert page(431, pages_dir=str(tmp_path)).content == b"y" * pages.MAX_PAGE_BYTES


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file anyway")
def test_unreadable_file_falls_back(tmp_path: Path) -> None:
    path = _write(tmp_path, "404.html")
    path.chmod(0)
    assert page(404, pages_dir=str(tmp_path)).content == builtin_page_body(404)


def test_symlinks_are_never_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"root:x:0:0")
    site = tmp_path / "site"
    site.mkdir()
    (site / "404.html").symlink_to(secret)  # out of the directory
    (site / "real.html").write_bytes(b"inside")
    (site / "502.html").symlink_to(site / "real.html")  # inside it: not followed either
    (site / "503.html").symlink_to("../secret")
    for status in (404, 502, 503):
        body = page(status, pages_dir=str(site)).content
        assert body == builtin_page_body(status)
        assert b"root:x" not in body and b"inside" not in body


def test_a_directory_that_is_a_symlink_is_resolved_once(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    _write(real, "404.html", b"<p>real</p>")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert page(404, pages_dir=str(link)).content == b"<p>real</p>"


def test_edited_page_is_picked_up_after_the_recheck_interval(tmp_path: Path,
                                                              clock: Clock) -> None:
    path = _write(tmp_path, "404.html", b"<p>one</p>")
    directory = str(tmp_path)
    assert page(404, pages_dir=directory).content == b"<p>one</p>"

    path.write_bytes(b"<p>two, longer</p>")
    clock.now += pages.RECHECK_SECONDS / 2  # within the interval: the disk is not asked
    assert page(404, pages_dir=directory).content == b"<p>one</p>"
    clock.now += pages.RECHECK_SECONDS
    assert page(404, pages_dir=directory).content == b"<p>two, longer</p>"

    path.unlink()  # removed: the built-in page again
    clock.now += pages.RECHECK_SECONDS
    assert page(404, pages_dir=directory).content == builtin_page_body(404)
    _write(tmp_path, "404.html", b"<p>three</p>")  # and back
    clock.now += pages.RECHECK_SECONDS
    assert page(404, pages_dir=directory).content == b"<p>three</p>"


def test_unchanged_page_is_not_read_again(tmp_path: Path, clock: Clock,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, "404.html")
    assert pages.load_page(str(tmp_path), 404) == CUSTOM
    opened: list[object] = []
    real_open = os.open

    def counting_open(path: object, *args: object, **kwargs: object) -> int:
        opened.append(path)
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pages.os, "open", counting_open)
    clock.now += pages.RECHECK_SECONDS
    assert pages.load_page(str(tmp_path), 404) == CUSTOM
    assert "404.html" not in opened  # stat said it is the same file: the cached page


def test_maintenance_message_is_escaped_in_the_built_in_page() -> None:
    body = page(503, message="Back at <b>5</b> & soon").content
    assert b"Back at &lt;b&gt;5&lt;/b&gt; &amp; soon" in body
    assert b"<b>" not in body
    assert page_text(503).encode() not in body
    assert page(503, message="").content == builtin_page_body(503)


def test_maintenance_page_takes_the_message(tmp_path: Path) -> None:
    _write(tmp_path, "maintenance.html", b"<p>maint: {{message}} / {{message}}</p>")
    _write(tmp_path, "503.html", b"<p>503: {{message}}</p>")
    directory = str(tmp_path)
    response = page(503, pages_dir=directory, message='<script>"x"</script>')
    assert response.content == (b"<p>maint: &lt;script&gt;&quot;x&quot;&lt;/script&gt; / "
                                b"&lt;script&gt;&quot;x&quot;&lt;/script&gt;</p>")
    assert response.headers["Retry-After"] == RETRY_AFTER
    # Not maintenance (no message): 503.html, the placeholder gets the built-in sentence.
    assert page(503, pages_dir=directory).content == (
        f"<p>503: {html.escape(page_text(503))}</p>".encode())
    # Without maintenance.html the 503 page takes the message.
    (tmp_path / "maintenance.html").unlink()
    pages.clear_cache()
    assert page(503, pages_dir=directory, message="é & co").content == (
        "<p>503: é &amp; co</p>".encode())


def test_service_directory_first_then_the_default(tmp_path: Path) -> None:
    service, default = tmp_path / "service", tmp_path / "default"
    service.mkdir()
    default.mkdir()
    _write(service, "404.html", b"service 404")
    _write(default, "404.html", b"default 404")
    _write(default, "502.html", b"default 502")
    _write(default, "maintenance.html", b"default maintenance {{message}}")
    _write(service, "503.html", b"service 503 {{message}}")
    assert page(404, pages_dir=str(service)).content == b"service 404"  # no default yet
    assert page(502, pages_dir=str(service)).content == builtin_page_body(502)

    pages.set_default_pages_dir(str(default))
    assert pages.default_pages_dir() == str(default)
    assert page(404, pages_dir=str(service)).content == b"service 404"
    assert page(502, pages_dir=str(service)).content == b"default 502"
    assert page(404).content == b"default 404"
    assert page(413, pages_dir=str(service)).content == builtin_page_body(413)
    # The service's own page wins over the default's maintenance page.
    assert page(503, pages_dir=str(service), message="m").content == b"service 503 m"
    assert page(503, message="m").content == b"default maintenance m"
    assert page_body(404) == b"default 404"

    pages.set_default_pages_dir(None)
    assert page(404).content == builtin_page_body(404)


def test_default_directory_from_the_environment(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, "404.html", b"env 404")
    monkeypatch.setenv(pages.PAGES_ENV, str(tmp_path))
    pages.set_default_pages_dir(None)  # no run --error-pages: the environment's
    assert pages.default_pages_dir() == str(tmp_path)
    assert page(404).content == b"env 404"
    other = tmp_path / "other"
    other.mkdir()
    _write(other, "404.html", b"option 404")
    pages.set_default_pages_dir(str(other))  # the option wins
    assert page(404).content == b"option 404"


def test_engine_error_pages_use_the_default_directory(tmp_path: Path) -> None:
    _write(tmp_path, "502.html", b"<p>our 502</p>")
    pages.set_default_pages_dir(str(tmp_path))
    original_http1 = _http1.make_error_response
    original_formats = [m.format_error for m in (_http1, _http2, _http3)]
    try:
        install_engine_error_pages()
        data = _http1.make_error_response(502, ENGINE_MESSAGE)
        assert data.endswith(b"\r\n\r\n<p>our 502</p>")
        _check_clean(data)
        for module in (_http1, _http2, _http3):
            assert module.format_error(502, ENGINE_MESSAGE) == b"<p>our 502</p>"
    finally:
        _http1.make_error_response = original_http1
        for module, original in zip((_http1, _http2, _http3), original_formats, strict=True):
            module.format_error = original


def test_parse_error_pages_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pages").mkdir()
    assert pages.parse_error_pages_dir("pages") == str(tmp_path / "pages")
    assert pages.parse_error_pages_dir(str(tmp_path / "pages") + "/") == str(tmp_path / "pages")
    _write(tmp_path, "file.html")
    for value, words in (("missing", "does not exist"), ("file.html", "not a directory"),
                         ("", "empty"), ("  ", "empty")):
        with pytest.raises(ValueError, match=words) as raised:
            pages.parse_error_pages_dir(value)
        assert "\n" not in str(raised.value)
