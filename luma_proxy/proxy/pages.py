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
