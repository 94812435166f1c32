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

STREAM_ABOVE = 1024 * 1024


def _large(length: str) -> bool:
    """A Content-Length over the bound; a malformed one streams (mitmproxy refuses it)."""
    return not length.isdigit() or int(length) > STREAM_ABOVE


MULTIPLEXED = (b"HTTP/2.0", b"HTTP/3")


def stream_request(request: http.Request) -> bool:
    """Stream a request body that is large or of unknown length.

    A request without a body on HTTP/2 or 3 (a GET) ends with its headers, so
    marking it costs nothing; mitmproxy only streams a body that follows.
    One pass over the fields: this runs for every request.
    """
    length: bytes | None = None
    chunked = False
    for name, value in request.headers.fields:
        lower = name.lower()
        if lower == b"content-length":
            length = value if length is None else length + b", " + value
        elif lower == b"transfer-encoding":
            chunked = chunked or b"chunked" in value.lower()
    if length is not None:
        return _large(length.decode("latin-1"))
    return chunked or request.data.http_version in MULTIPLEXED


def stream_response(response: http.Response) -> bool:
    """Stream a response that is large, of unknown length, or an event stream (one pass)."""
    length: bytes | None = None
    events = False
    for name, value in response.headers.fields:
        lower = name.lower()
        if lower == b"content-length":
            length = value if length is None else length + b", " + value
        elif lower == b"content-type" and value.startswith(b"text/event-stream"):
            events = True
    return length is None or events or _large(length.decode("latin-1"))
