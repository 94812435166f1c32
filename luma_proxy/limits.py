"""What clients send over HTTP/1: the head's size (431) and syntax (400), the body's size (413).

mitmproxy buffers a request head until it is complete, without any bound
(its own source says "FIXME: protect against header size DoS"), accepts bare
LF line ends, control characters and obs-fold in it, and reads a whole
request body before it sends an answer an addon set. So the head is checked
inside its HTTP/1 reader, before any body byte is read, and a chunked body
(no declared length) is counted as its reader decodes it: over the limit, the
client gets 413 and the upstream connection is closed mid-body, so a cut
request never looks complete to the container.

Every touch of mitmproxy internals for this is here: the two patched methods
of ``Http1Server`` (``read_headers``, ``read_body``), the scanner kept on the
server object between segments (``luma_scanner``), and the body reader wrapped
in place (``body_reader``).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Generator
from typing import Any

import h11
from h11._readers import ChunkedReader
from mitmproxy import ctx, exceptions
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http import ErrorCode, ReceiveHttp, RequestProtocolError, _http1
from mitmproxy.utils import human

from . import engine_patches, pages
from .environ import env_int
from .flowinfo import BODY_TOO_LARGE

DEFAULT_MAX_HEADER = "64k"
DEFAULT_MAX_BODY = "1g"
# Per HTTP/2 client connection and container: h2load -c 10 -m 100 then opens at most
# 80 connections at once, not 1,000 (docs/performance.md, HTTP/2 row).
DEFAULT_H2_POOL = 8
# The start of flow.error.msg for a body over the limit (flowinfo.error_status: 413).
# The flow.error.msg of a body cut by its deadline (flowinfo.error_status: 408).
BODY_TIMEOUT = "request body timeout"

_limits = {"head": 64 * 1024, "body": 1024**3}
# Request bodies still arriving, for the body deadlines (timeouts.py): client
# connection id -> [when the body began, when bytes last came, the Http1Server].
BODIES: dict[str, list[Any]] = {}
# Client connections closed by a body deadline: their flow ends with BODY_TIMEOUT.
TIMED_OUT: set[str] = set()
_original_read_headers = _http1.Http1Server.read_headers
_original_read_body = _http1.Http1Server.read_body


def parse_size(value: str, name: str) -> int:
    try:
        size = human.parse_size(value)
    except ValueError:
        size = None
    if size is None or size <= 0:
        raise ValueError(f"invalid {name} {value!r}: expected a size like 64k, 10m, 1g")
    return size


_HEAD_END = re.compile(rb"\n\r?\n")  # how h11, mitmproxy's reader, finds it


class HeadScanner:
    """Finds the end of a request head arriving in pieces, looking at each byte once.

    ``examined`` counts the bytes looked at: a head sent one byte per segment
    costs as much as one sent whole (the old reader searched the whole buffer
    again on every segment).
    """

    __slots__ = ("examined", "scanned", "tail")

    def __init__(self) -> None:
        self.scanned = 0  # bytes of the stream fed so far
        self.tail = b""  # the last two of them: an end may straddle segments
        self.examined = 0

    def feed(self, data: bytes) -> int | None:
        """The head's length (its end offset in the stream) once it is complete, else None."""
        text = self.tail + data
        self.examined += len(text)
        match = _HEAD_END.search(text)
        start = self.scanned - len(self.tail)
        self.scanned += len(data)
        if match is not None:
            return start + match.end()
        self.tail = text[-2:]
        return None


# Controls other than HT, CR, LF, and DEL: never valid in a request line or a field.
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*(\d+)", re.IGNORECASE)


def head_status(head: bytes, body_limit: int) -> int | None:
    """400 or 413 for a complete request head that must not go on; None when it may.

    400 (RFC 9112 §2.2, §5.2, RFC 9110 §5.5): a control character or DEL, a
    bare CR, a bare LF (a line end other recipients may read differently), or
    obs-fold (a line starting with SP or HT). 413: a Content-Length over the
    body limit. Plain byte counts and one character class: no per-byte Python.
    """
    crlf = head.count(b"\r\n")
    if (crlf != head.count(b"\r") or crlf != head.count(b"\n") or b"\n " in head
            or b"\n\t" in head or _CONTROL.search(head) is not None):
        return 400
    match = _CONTENT_LENGTH.search(head)
    if match is not None and int(match.group(1)) > body_limit:
        return 413
    return None


def refuse(status: int) -> bytes:
    from mitmproxy.net.http import http1

    return http1.assemble_response(pages.page(status, {"Connection": "close"}))


def _refuse(conn: Any, status: int) -> Generator[commands.Command, Any, None]:
    """Answer and half-close: a full close with unread request bytes makes the kernel
    send RST, which can destroy the answer before the client reads it."""
    yield commands.SendData(conn, refuse(status))
    yield commands.CloseTcpConnection(conn, half_close=True)


def _read_headers_bounded(
    self: _http1.Http1Server, event: events.ConnectionEvent
) -> Generator[commands.Command, Any, None]:
    """mitmproxy's request-head reader, with a size bound, a syntax check and an early 413.

    The scanner follows the buffer while the head arrives (mitmproxy appends
    each segment before calling this); a buffer that does not continue what
    was scanned (a new request) starts a new one.
    """
    if isinstance(event, events.DataReceived):
        scanner: HeadScanner | None = getattr(self, "luma_scanner", None)
        if scanner is None or scanner.scanned + len(event.data) != len(self.buf):
            scanner = self.luma_scanner = HeadScanner()  # type: ignore[attr-defined]
            end = scanner.feed(bytes(self.buf))
        else:
            end = scanner.feed(event.data)
        status = None
        if end is None:
            if len(self.buf) > _limits["head"]:
                status = 431
        else:
            self.luma_scanner = None  # type: ignore[attr-defined]
            if end > _limits["head"]:
                status = 431
            else:
                status = head_status(bytes(self.buf)[:end], _limits["body"])
        if status is not None:
            yield from _refuse(self.conn, status)
            self.state = self.done
            return
    yield from _original_read_headers(self, event)


class BodyTooLarge(Exception):
    pass


class BadChunking(Exception):
    """A chunked body that does not parse (mitmproxy would close without an answer)."""


class CountedReader:
    """h11's chunked body reader, counting the body and dropping trailers.

    Trailers: mitmproxy raises ``NotImplementedError`` on them (a traceback
    and a hung client); a proxy may discard them (RFC 9110 §6.5.1).
    """

    __slots__ = ("limit", "reader", "seen")

    def __init__(self, reader: ChunkedReader, limit: int) -> None:
        self.reader, self.limit, self.seen = reader, limit, 0

    def __call__(self, buf: Any) -> Any:
        try:
            event = self.reader(buf)
        except h11.ProtocolError as e:
            raise BadChunking(str(e)) from None
        if type(event) is h11.Data:
            self.seen += len(event.data)
            if self.seen > self.limit:
                raise BodyTooLarge
        elif type(event) is h11.EndOfMessage and event.headers:
            return h11.EndOfMessage()
        return event

    def read_eof(self) -> Any:
        return self.reader.read_eof()


def _read_body_bounded(
    self: _http1.Http1Server, event: events.Event
) -> Generator[commands.Command, Any, None]:
    """mitmproxy's request-body reader; a chunked body over the limit ends in 413.

    A body not complete after this segment is noted in ``BODIES`` (begun,
    last bytes), so that the body deadlines can cut a client that trickles it.

    The error event makes mitmproxy close the upstream connection before any
    chunk terminator is written (the container sees a cut request, never a
    complete one) and end the flow with ``BODY_TOO_LARGE``.
    """
    if type(self.body_reader) is ChunkedReader:
        self.body_reader = CountedReader(self.body_reader, _limits["body"])
    if TIMED_OUT and isinstance(event, events.ConnectionClosed) and self.conn.id in TIMED_OUT:
        TIMED_OUT.discard(self.conn.id)
        yield ReceiveHttp(RequestProtocolError(self.stream_id, BODY_TIMEOUT,
                                               code=ErrorCode.GENERIC_CLIENT_ERROR))
        self.state = self.done
        return
    try:
        yield from _original_read_body(self, event)
    except BodyTooLarge:
        BODIES.pop(self.conn.id, None)
        yield from _refuse(self.conn, 413)
        yield ReceiveHttp(RequestProtocolError(self.stream_id, BODY_TOO_LARGE,
                                               code=ErrorCode.REQUEST_TOO_LARGE))
        self.state = self.done
        return
    except BadChunking as e:  # 400, and the upstream request is cut, never completed
        BODIES.pop(self.conn.id, None)
        yield from _refuse(self.conn, 400)
        yield ReceiveHttp(RequestProtocolError(self.stream_id, f"HTTP/1 protocol error: {e}",
                                               code=ErrorCode.GENERIC_CLIENT_ERROR))
        self.state = self.done
        return
    if getattr(self.state, "__func__", None) is _read_body_bounded:  # more body to come
        now = time.monotonic()
        progress = BODIES.get(self.conn.id)
        if progress is None:
            BODIES[self.conn.id] = [now, now, self]
        else:
            progress[1] = now
    elif BODIES:
        BODIES.pop(self.conn.id, None)


def install_limits(head: int, body: int) -> None:
    """Put the bounded readers in place (idempotent) with these limits."""
    _limits.update(head=head, body=body)
    _http1.Http1Server.read_headers = _read_headers_bounded  # type: ignore[method-assign]
    _http1.Http1Server.read_body = _read_body_bounded  # type: ignore[method-assign]


class Limits:
    def __init__(self) -> None:
        self.max_body = parse_size(DEFAULT_MAX_BODY, "size")

    def load(self, loader: Any) -> None:
        loader.add_option("luma_max_header_size", str,
                          os.environ.get("LUMA_PROXY_MAX_HEADER_SIZE", DEFAULT_MAX_HEADER),
                          "Largest request head (request line and headers) accepted; more: 431.")
        loader.add_option("luma_max_body_size", str,
                          os.environ.get("LUMA_PROXY_MAX_BODY_SIZE", DEFAULT_MAX_BODY),
                          "Largest request body accepted; more: 413.")
        loader.add_option("luma_h2_upstream_connections", int,
                          env_int("LUMA_PROXY_H2_UPSTREAM_CONNECTIONS", DEFAULT_H2_POOL),
                          "Most HTTP/1 connections one HTTP/2 client connection opens to one "
                          "container (reused across its streams; more streams wait).")

    def configure(self, updated: set[str]) -> None:
        if "luma_h2_upstream_connections" in updated:
            try:
                engine_patches.set_pool_size(ctx.options.luma_h2_upstream_connections)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
        if not updated & {"luma_max_header_size", "luma_max_body_size"}:
            return
        try:
            head = parse_size(ctx.options.luma_max_header_size, "luma_max_header_size")
            self.max_body = parse_size(ctx.options.luma_max_body_size, "luma_max_body_size")
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None
        install_limits(head, self.max_body)
        engine_patches.install(self.max_body)  # HTTP/2 bodies are counted there
