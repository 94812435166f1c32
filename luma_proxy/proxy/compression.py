"""Response compression at the edge: zstd, br or gzip, as the client accepts.

Why: containers often answer text uncompressed (dev servers, small apps, APIs
that leave it to "the proxy"); compressing once here saves every client's
bandwidth without touching the apps.

Wiring: ``Compression`` is a mitmproxy addon (or its two methods are called
from the routing addon's hooks of the same names):

* ``responseheaders(flow)`` must run *after* the routing addon decided what
  streams (``streaming.stream_response`` sets ``.stream``): a streamed body is
  compressed chunk by chunk, flushed after every chunk so nothing waits in the
  compressor (a slow producer's bytes reach the client as they come).
* ``response(flow)``: a buffered body is compressed whole, Content-Length set.

``flow.metadata["luma_compress"] = False`` turns it off for one flow (the
service's ``--no-compress``).

Decisions:

* The coding: the client's q-values first (``q=0`` refuses, ``*`` stands for
  every coding not named, an ``identity`` preferred over every coding wins),
  ties broken by ours: zstd > br > gzip. No Accept-Encoding: no compression.
* What: text/* (but never text/event-stream), JSON, JavaScript, XML, the
  ``+json``/``+xml`` types (SVG is ``image/svg+xml``) and ``application/wasm``
  (not compressed by its producers, and typically shrinks to a third; browsers
  compile it while decoding). Images, video, fonts (woff/woff2 are compressed
  already), archives: never.
* Never: HEAD, 1xx/204/206/304, Content-Range, a request with Range, a body
  with a Content-Encoding other than identity, ``Cache-Control: no-transform``
  (response or request), bodies under ``MIN_SIZE`` (a known Content-Length
  below it is enough), streamed bodies to HTTP/1.0 clients (no chunked framing).
* ``Vary: Accept-Encoding`` goes on every response that *could* be compressed,
  also when this client got it plain, so a shared cache never hands one
  client's variant to another; merged into an existing Vary, never repeated.
* A strong ETag is weakened (``W/`` prefixed), as nginx does: the compressed
  bytes are another representation, but a client's ``If-None-Match: W/"x"``
  still revalidates against the container's ``"x"`` (weak comparison), while
  ``If-Range``/``If-Match`` (strong comparison) never match bytes we produced.
  ``Accept-Ranges`` is dropped from a compressed answer: ranges of it do not exist.
* A streamed body's ``streaming.ByteCounter`` is replaced by ``StreamEncoder``
  (a ByteCounter), so the access log's bytes_out counts the compressed bytes
  the client got, as it does for a buffered body.

Levels: the work is done on the event loop, so each library's fast end
(benchmarks/compression.py, a 61.6 KB HTML page): zstd 3 saves 71.5 % for
0.14 ms, br 4 72 % for 0.7 ms, gzip 4 71 % for 0.7 ms (gzip 6 would save
1 point more for twice the CPU). The largest buffered body (1 MiB, above it
bodies stream) then costs the loop ~3 ms for zstd, ~13 ms for br or gzip.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Callable
from typing import Any

import brotli
import zstandard
from mitmproxy import http

from luma_proxy.proxy.flowinfo import header, header_values
from luma_proxy.proxy.streaming import ByteCounter

METADATA = "luma_compress"  # flow.metadata key: False turns compression off for the flow
MIN_SIZE = 1024  # bytes; below this the framing and the CPU cost more than they save
PREFERENCE = ("zstd", "br", "gzip")  # ours, when the client's q-values tie
GZIP_LEVEL = 4
GZIP_WBITS = 31  # 16 + 15: a gzip header and trailer around a 32 KiB-window deflate stream
BROTLI_QUALITY = 4
ZSTD_LEVEL = 3

_TYPES = frozenset({
    "application/json", "application/javascript", "application/x-javascript",
    "application/ecmascript", "application/xml", "application/wasm",
})
_QVALUE = re.compile(r"q=(0(\.\d{0,3})?|1(\.0{0,3})?)", re.ASCII | re.IGNORECASE)
_ALIASES = {"x-gzip": "gzip"}  # RFC 9110 §8.4.1.3
_REQUEST_FIELDS = frozenset({b"accept-encoding", b"range", b"cache-control"})
_RESPONSE_FIELDS = frozenset(
    {b"content-type", b"content-encoding", b"content-range", b"cache-control", b"content-length"})
_NO_BODY = frozenset({204, 206, 304})
_ZSTD = zstandard.ZstdCompressor(level=ZSTD_LEVEL)  # buffered bodies; used on the event loop only


# ------------------------------------------------------------------ decisions
@functools.lru_cache(maxsize=256)
def choose_encoding(accept_encoding: str) -> str | None:
    """The coding for an ``Accept-Encoding`` value, or None for the body as it is.

    Cached: clients send a handful of distinct values. Never raises; a
    malformed entry is ignored.
    """
    q: dict[str, float] = {}
    for entry in accept_encoding.split(","):
        coding, _, params = entry.partition(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        value = 1.0
        for param in params.split(";"):
            param = param.strip()
            if param[:2].lower() == "q=":
                match = _QVALUE.fullmatch(param)
                value = float(match.group(1)) if match else -1.0
        if value < 0:
            continue  # q=2, q=abc: no meaning to honour
        coding = _ALIASES.get(coding, coding)
        q[coding] = min(value, q.get(coding, 1.0))  # named twice: a refusal wins
    star = q.get("*", 0.0)
    best, best_q = None, 0.0
    for coding in PREFERENCE:
        value = q.get(coding, star)
        if value > best_q:
            best, best_q = coding, value
    if best is not None and q.get("identity", 0.0) > best_q:
        return None  # the client prefers the body as it is
    return best


def compressible(content_type: str) -> bool:
    """Whether a body of this Content-Type is worth compressing (text-like, not yet compressed)."""
    mime = content_type.partition(";")[0].strip().lower()
    if mime.startswith("text/"):
        return mime != "text/event-stream"  # events must arrive as sent, never batched
    return mime in _TYPES or mime.endswith(("+json", "+xml"))


def _fields(headers: http.Headers, wanted: frozenset[bytes]) -> dict[bytes, bytes]:
    """The ``wanted`` fields (lowercase names; copies joined with ", ") in one pass."""
    found: dict[bytes, bytes] = {}
    for name, value in headers.fields:
        key = name.lower()
        if key in wanted:
            found[key] = found[key] + b", " + value if key in found else value
    return found


def _encoding_for(flow: http.HTTPFlow, response: http.Response, size: int | None) -> str | None:
    """The coding to apply to ``response``, or None; adds Vary where the answer depends on it.

    ``size``: the body's length if known (buffered), else None (Content-Length is read).
    Cheapest refusals first: most responses stop at the status or the type.
    """
    request = flow.request
    if not flow.metadata.get(METADATA, True) or request.method == "HEAD":
        return None
    status = response.status_code
    if status < 200 or status in _NO_BODY:
        return None
    fields = _fields(response.headers, _RESPONSE_FIELDS)
    if not compressible(fields.get(b"content-type", b"").decode("latin-1")):
        return None
    coding = fields.get(b"content-encoding", b"").strip().lower()
    if (coding and coding != b"identity") or b"content-range" in fields:
        return None
    if b"no-transform" in fields.get(b"cache-control", b"").lower():
        return None
    if size is None:
        length = fields.get(b"content-length", b"").strip()
        size = int(length) if length.isdigit() else None
    if size is not None and size < MIN_SIZE:
        return None
    asked = _fields(request.headers, _REQUEST_FIELDS)
    if b"no-transform" in asked.get(b"cache-control", b"").lower():
        return None
    add_vary(response.headers)
    if b"range" in asked:
        return None
    return choose_encoding(asked.get(b"accept-encoding", b"").decode("latin-1"))


# ---------------------------------------------------------------- the headers
def add_vary(headers: http.Headers) -> None:
    """Add ``Accept-Encoding`` to Vary: merged into one field, never twice, not next to ``*``."""
    values = [v for v in header_values(headers, "vary") if v.strip()]
    tokens = {t.strip().lower() for v in values for t in v.split(",")}
    if "accept-encoding" not in tokens and "*" not in tokens:
        headers["vary"] = ", ".join([*values, "Accept-Encoding"])


def _mark_encoded(headers: http.Headers, encoding: str) -> None:
    """Content-Encoding set, the ETag weakened, Accept-Ranges gone (see the module's text)."""
    headers["content-encoding"] = encoding
    etag = header(headers, "etag")
    if etag and not etag.startswith("W/"):
        headers["etag"] = "W/" + etag
    if "accept-ranges" in headers:
        del headers["accept-ranges"]


# -------------------------------------------------------------- compressors
def compress_body(encoding: str, data: bytes) -> bytes:
    """``data`` compressed whole with ``encoding`` (one of ``PREFERENCE``)."""
    if encoding == "gzip":
        return zlib.compress(data, GZIP_LEVEL, GZIP_WBITS)
    if encoding == "br":
        return brotli.compress(data, quality=BROTLI_QUALITY)
    return _ZSTD.compress(data)


Step = Callable[[bytes], bytes]


def _streamer(encoding: str) -> tuple[Step, Step]:
    """(chunk, last) for one body: compress a chunk and flush it out; compress the rest and end."""
    if encoding == "gzip":
        z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, GZIP_WBITS)
        return (lambda d: z.compress(d) + z.flush(zlib.Z_SYNC_FLUSH)), (
            lambda d: z.compress(d) + z.flush())
    if encoding == "br":
        b = brotli.Compressor(quality=BROTLI_QUALITY)
        return (lambda d: b.process(d) + b.flush()), (lambda d: b.process(d) + b.finish())
    c = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    return (lambda d: c.compress(d) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)), (
        lambda d: c.compress(d) + c.flush())


class StreamEncoder(ByteCounter):
    """A ``.stream`` callable that compresses each chunk and counts what goes out.

    mitmproxy calls it with each chunk as it arrives and with b"" at the end
    (``HttpStream.state_stream_response_body``); what it returns is sent on.
    A callable already on ``.stream`` (``inner``) still sees the plain bytes first.
    Nothing empty is returned mid-body: to an HTTP/1 chunked client an empty
    chunk would be the body's end.
    """

    __slots__ = ("_steps", "encoding")

    def __init__(self, encoding: str, inner: Callable[[bytes], Any] | None = None) -> None:
        super().__init__(inner)
        self.encoding = encoding
        self._steps: tuple[Step, Step] | None = _streamer(encoding)

    def __call__(self, data: bytes) -> bytes | list[bytes]:
        end = not data
        if self.inner is not None:
            out = self.inner(data)
            data = out if isinstance(out, bytes) else b"".join(out)
        if self._steps is None:
            # Past the end: mitmproxy ends a body with b"", but an HTTP/2 container may also
            # send an empty DATA frame mid-body. What follows is a new gzip member / zstd
            # frame (valid concatenations; brotli has none: a br client's body ends there).
            if not data:
                return []
            self._steps = _streamer(self.encoding)
        chunk, last = self._steps
        if end:
            out, self._steps = last(data), None
        else:
            out = chunk(data) if data else b""
        self.count += len(out)
        return out or []


# ------------------------------------------------------------------- the hooks
class Compression:
    """Compresses responses; keeps no state of its own (the flow carries it)."""

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """A streamed body: compress it as it passes. Call after ``.stream`` is decided."""
        response = flow.response
        if response is None or not response.stream:
            return
        if flow.request.data.http_version == b"HTTP/1.0":
            return  # no chunked framing; close-delimited would cost the upstream connection
        encoding = _encoding_for(flow, response, None)
        if encoding is None:
            return
        stream = response.stream
        inner = stream.inner if isinstance(stream, ByteCounter) else stream
        response.stream = StreamEncoder(encoding, inner if callable(inner) else None)
        headers = response.headers
        _mark_encoded(headers, encoding)
        if "content-length" in headers:
            del headers["content-length"]
        if (response.data.http_version.startswith(b"HTTP/1")
                or flow.request.data.http_version == b"HTTP/1.1") and (
                "chunked" not in header(headers, "transfer-encoding").lower()):
            # HTTP/1.1 clients need it to find the end; an HTTP/1 container's side needs it
            # to keep the connection (HTTP/2 and 3 drop the field from an HTTP/1 response).
            headers["transfer-encoding"] = "chunked"

    def response(self, flow: http.HTTPFlow) -> None:
        """A buffered body: compress it whole, if that makes it smaller."""
        response = flow.response
        if response is None or response.stream:
            return  # streamed: done in responseheaders, or left as it is
        content = response.raw_content
        if not content or len(content) < MIN_SIZE:
            return
        encoding = _encoding_for(flow, response, len(content))
        if encoding is None:
            return
        body = compress_body(encoding, content)
        if len(body) >= len(content):
            return
        response.raw_content = body
        headers = response.headers
        _mark_encoded(headers, encoding)
        if "transfer-encoding" not in headers:
            headers["content-length"] = str(len(body))
