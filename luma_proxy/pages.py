"""The short pages the proxy answers itself. None of them says anything internal."""

from __future__ import annotations

import html
from http import HTTPStatus

from mitmproxy import http

RETRY_AFTER = "5"

_TEXT = {
    400: "The request could not be understood.",
    404: "No site is configured for this host.",
    405: "This method is not allowed here.",
    413: "The request body is too large.",
    431: "The request headers are too large.",
    500: "The proxy could not handle this request.",
    502: "The site did not answer properly. Please try again.",
    503: "The site is temporarily unavailable. Please try again shortly.",
    504: "The site took too long to answer.",
}


def page_body(status: int) -> bytes:
    try:
        title = f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        title = str(status)
    text = _TEXT.get(status, "The request could not be completed.")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title></head>\n"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>\n"
    ).encode()


def page(status: int, headers: dict[str, str] | None = None) -> http.Response:
    """A response for ``flow.response``; 503 carries ``Retry-After``."""
    all_headers = {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"}
    if status == 503:
        all_headers["Retry-After"] = RETRY_AFTER
    all_headers.update(headers or {})
    return http.Response.make(status, page_body(status), all_headers)


def _engine_error(status_code: int, message: str) -> bytes:
    """Replaces mitmproxy's error page, which quotes the socket error (with IPs)."""
    return page_body(status_code)


def _http1_error_response(status_code: int, message: str = "") -> bytes:
    """mitmproxy's HTTP/1 error response, without the engine's name and version."""
    from mitmproxy.net.http import http1

    response = http.Response.make(
        status_code,
        page_body(status_code),
        {"Content-Type": "text/html; charset=utf-8", "Connection": "close"},
    )
    return http1.assemble_response(response)


def install_engine_error_pages() -> None:
    """Make mitmproxy's own error answers (e.g. 502 on a refused connect) ours.

    mitmproxy builds them with ``format_error(status, message)`` imported into each
    HTTP layer module, and offers no hook to replace them; rebinding that name is
    the narrowest change that keeps socket errors out of pages.
    """
    from mitmproxy.proxy.layers.http import _http1, _http2, _http3

    for module in (_http1, _http2, _http3):
        module.format_error = _engine_error  # type: ignore[attr-defined]
    _http1.make_error_response = _http1_error_response  # type: ignore[attr-defined]
