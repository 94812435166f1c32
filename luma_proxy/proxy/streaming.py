"""Which bodies pass straight through instead of being buffered.

mitmproxy buffers a whole body before the ``request``/``response`` hooks
unless ``.stream`` is set. Bodies of unknown length (chunked uploads, HTTP/2
bodies without Content-Length, server-sent events, long polls) and bodies over
``STREAM_ABOVE`` are streamed, so memory stays bounded whatever a client or a
container sends.

mitmproxy's own ``stream_large_bodies`` option would do the sized part, but it
makes mitmproxy work out every message's expected body size before the hooks
run (``check_body_size``, see docs/performance.md), and it leaves unsized
responses buffered. The routing addon decides here instead, from one pass over
the header fields.

A streamed body is counted as it passes (``ByteCounter``), for the access log.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mitmproxy import http

from luma_proxy.proxy.flowinfo import MULTIPLEXED

STREAM_ABOVE = 1024 * 1024


def _large(length: bytes) -> bool:
    """A Content-Length over the bound; a malformed one streams (mitmproxy refuses it)."""
    return not length.isdigit() or int(length) > STREAM_ABOVE


_LENGTH_SIZE = len(b"content-length")


def _length_and(headers: http.Headers, other: bytes) -> tuple[bytes | None, bytes]:
    """Content-Length and the field ``other`` (copies joined with ", "), in one pass.

    This runs for every request and every response.
    """
    length: bytes | None = None
    values = b""
    sizes = (_LENGTH_SIZE, len(other))  # names of other lengths are not lowered to compare
    for name, value in headers.fields:
        if len(name) not in sizes:
            continue
        lower = name.lower()
        if lower == b"content-length":
            length = value if length is None else length + b", " + value
        elif lower == other:
            values = values + b", " + value if values else value
    return length, values


def stream_request(request: http.Request) -> bool:
    """Stream a request body that is large or of unknown length.

    A request without a body on HTTP/2 or 3 (a GET) ends with its headers, so
    marking it costs nothing; mitmproxy only streams a body that follows.
    """
    length, coding = _length_and(request.headers, b"transfer-encoding")
    if length is not None:
        return _large(length)
    return b"chunked" in coding.lower() or request.data.http_version in MULTIPLEXED


def stream_response(response: http.Response) -> bool:
    """Stream a response that is large, of unknown length, or an event stream."""
    length, kind = _length_and(response.headers, b"content-type")
    return length is None or kind.startswith(b"text/event-stream") or _large(length)


class ByteCounter:
    """A ``.stream`` callable that counts the body bytes coming through.

    Wraps another addon's stream callable, if there was one (the body size
    limit's counter on chunked uploads), and counts what arrives, before it.
    """

    __slots__ = ("count", "inner")

    def __init__(self, inner: Callable[[bytes], Any] | None = None) -> None:
        self.count = 0
        self.inner = inner

    def __call__(self, data: bytes) -> Any:
        self.count += len(data)
        return data if self.inner is None else self.inner(data)


def stream_counted(message: http.Message) -> None:
    """Stream ``message``'s body through a ``ByteCounter`` (around a callable already set)."""
    stream = message.stream
    if not isinstance(stream, ByteCounter):
        message.stream = ByteCounter(stream if callable(stream) else None)
