"""Which bodies pass straight through instead of being buffered.

mitmproxy buffers a whole body before the ``request``/``response`` hooks
unless ``.stream`` is set. Bodies of unknown length (chunked uploads, HTTP/2
bodies without Content-Length, server-sent events, long polls) and bodies over
``STREAM_ABOVE`` are streamed, so memory stays bounded whatever a client or a
container sends.

mitmproxy's own ``stream_large_bodies`` option would do the sized part, but it
makes mitmproxy work out every message's expected body size before the hooks
run (``check_body_size``, see docs/performance.md), and it leaves unsized
responses buffered. The routing addon decides here instead, from two or three
header reads.
"""

from __future__ import annotations

from mitmproxy import http

from .flowinfo import header

STREAM_ABOVE = 1024 * 1024


def _large(length: str) -> bool:
    """A Content-Length over the bound; a malformed one streams (mitmproxy refuses it)."""
    return not length.isdigit() or int(length) > STREAM_ABOVE


def stream_request(request: http.Request) -> bool:
    """Stream a request body that is large or of unknown length.

    A request without a body on HTTP/2 or 3 (a GET) ends with its headers, so
    marking it costs nothing; mitmproxy only streams a body that follows.
    """
    length = header(request.headers, "content-length")
    if length:
        return _large(length)
    return request.is_http2 or request.is_http3 or "chunked" in header(
        request.headers, "transfer-encoding").lower()


def stream_response(response: http.Response) -> bool:
    """Stream a response that is large, of unknown length, or an event stream."""
    length = header(response.headers, "content-length")
    return not length or _large(length) or header(
        response.headers, "content-type").startswith("text/event-stream")
