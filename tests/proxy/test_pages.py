"""Unit tests for luma_proxy.proxy.pages: our own short pages, and mitmproxy's replaced."""

from __future__ import annotations

import pytest
from mitmproxy.proxy.layers.http import _http1, _http2, _http3

from luma_proxy.proxy.engine_patches import install_engine_error_pages
from luma_proxy.proxy.pages import RETRY_AFTER, page, page_body

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
