"""Response compression: the pure decisions, then the hooks on mitmproxy's test flows."""

from __future__ import annotations

import os
import zlib

import brotli
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.proxy.layers.http import HttpResponseHeadersHook, HttpResponseHook
from mitmproxy.test import taddons, tflow

from luma_proxy.proxy.compression import (
    MIN_SIZE,
    Compression,
    StreamEncoder,
    add_vary,
    choose_encoding,
    compressible,
)
from luma_proxy.proxy.streaming import ByteCounter, stream_counted, stream_response

HTML = b"".join(b"<li class='item'>entry %d of the list</li>\n" % i for i in range(200))
ALL = "gzip, deflate, br, zstd"


def decode(encoding: str, data: bytes) -> bytes:
    """A whole body, decoded as a browser would (also several gzip members / zstd frames)."""
    if encoding == "gzip":
        out, rest = b"", data
        while rest:
            d = zlib.decompressobj(31)
            out += d.decompress(rest)
            rest = d.unused_data
        return out
    if encoding == "br":
        return brotli.decompress(data)
    return zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(data)


def decoder(encoding: str):
    """An incremental decoder: feed it what the client has so far, get the text so far."""
    if encoding == "gzip":
        return zlib.decompressobj(31).decompress
    if encoding == "br":
        return brotli.Decompressor().process
    return zstandard.ZstdDecompressor().decompressobj().decompress


# ------------------------------------------------------------------ decisions
@pytest.mark.parametrize(("accept", "chosen"), [
    ("", None),  # none named: the body as it is
    ("gzip", "gzip"),
    ("gzip, deflate, br", "br"),
    (ALL, "zstd"),  # ours: zstd > br > gzip
    ("br;q=0.8, gzip;q=0.8", "br"),  # a tie: ours
    ("br;q=0.5, gzip", "gzip"),  # the client's q-values first
    ("zstd;q=0, br;q=0, gzip", "gzip"),  # q=0 refuses
    ("gzip;q=0", None),
    ("*", "zstd"),
    ("*;q=0", None),
    ("*, zstd;q=0", "br"),  # * stands for the codings not named
    ("gzip;q=0.5, identity", None),  # identity preferred to every coding
    ("gzip, identity;q=0", "gzip"),
    ("identity", None),
    ("deflate", None),  # not offered
    ("x-gzip", "gzip"),
    ("GZIP;Q=1.000", "gzip"),
    ("gzip ; q=0.001", "gzip"),
    ("gzip;q=2, br", "br"),  # a malformed entry is ignored
    ("gzip;q=abc", None),
    ("gzip;q=0.0001", None),  # four decimals: malformed
    ("gzip;q=0, gzip", None),  # named twice: the refusal wins
    (" , ;q=1,,br ;level=9", "br"),
    ("\x00\xff;;;q=", None),
])
def test_choose_encoding(accept: str, chosen: str | None) -> None:
    assert choose_encoding(accept) == chosen


@given(st.text())
def test_choose_encoding_never_raises(accept: str) -> None:
    assert choose_encoding(accept) in (None, "zstd", "br", "gzip")


@pytest.mark.parametrize(("content_type", "expected"), [
    ("text/html; charset=utf-8", True),
    ("Text/CSS", True),
    ("text/plain", True),
    ("text/event-stream", False),  # SSE: never
    ("text/event-stream; charset=utf-8", False),
    ("application/json", True),
    ("application/problem+json", True),
    ("application/ld+json;profile=x", True),
    ("application/javascript", True),
    ("application/xml", True),
    ("application/atom+xml", True),
    ("image/svg+xml", True),
    ("application/wasm", True),
    ("image/png", False),
    ("application/octet-stream", False),
    ("font/woff2", False),
    ("application/zip", False),
    ("", False),
    (";;", False),
])
def test_compressible(content_type: str, expected: bool) -> None:
    assert compressible(content_type) is expected


@pytest.mark.parametrize(("before", "after"), [
    ([], ["Accept-Encoding"]),
    (["Origin"], ["Origin, Accept-Encoding"]),
    (["Origin", "Cookie"], ["Origin, Cookie, Accept-Encoding"]),  # merged into one field
    (["origin, ACCEPT-ENCODING"], ["origin, ACCEPT-ENCODING"]),  # never twice
    (["*"], ["*"]),
    ([""], ["Accept-Encoding"]),
])
def test_add_vary(before: list[str], after: list[str]) -> None:
    headers = http.Headers([(b"vary", v.encode()) for v in before])
    add_vary(headers)
    assert headers.get_all("vary") == after


# -------------------------------------------------------------- buffered bodies
def flow(body: bytes = HTML, accept: str | None = ALL, method: str = "GET",
         status: int = 200, request_version: str = "HTTP/1.1",
         response_version: str = "HTTP/1.1", **response_headers: str) -> http.HTTPFlow:
    """A GET with ``accept`` and an HTML answer of ``body``; keyword args set response fields."""
    f = tflow.tflow(resp=True)
    f.request.method = method
    f.request.http_version = request_version
    f.request.headers.clear()
    f.request.headers["host"] = "app.test"
    if accept is not None:
        f.request.headers["accept-encoding"] = accept
    response = f.response
    assert response is not None
    response.status_code = status
    response.http_version = response_version
    response.headers = http.Headers(content_type="text/html; charset=utf-8")
    response.raw_content = body
    response.headers["content-length"] = str(len(body))
    for name, value in response_headers.items():
        response.headers[name.replace("_", "-")] = value
    return f


@pytest.mark.parametrize(("accept", "encoding"), [
    ("gzip", "gzip"), ("br, gzip", "br"), (ALL, "zstd")])
def test_buffered_body_compressed_whole(accept: str, encoding: str) -> None:
    f = flow(accept=accept, etag='"v1"', accept_ranges="bytes")
    Compression().response(f)
    response = f.response
    assert response is not None
    body = response.raw_content
    assert body is not None and len(body) < len(HTML) / 4
    assert decode(encoding, body) == HTML
    assert response.headers["content-encoding"] == encoding
    assert response.headers["content-length"] == str(len(body))
    assert response.headers["vary"] == "Accept-Encoding"
    assert response.headers["etag"] == 'W/"v1"'  # weakened: other bytes
    assert "accept-ranges" not in response.headers  # no ranges of bytes we made


def test_weak_etag_and_existing_vary_kept() -> None:
    f = flow(etag='W/"v1"', vary="Origin")
    Compression().response(f)
    assert f.response is not None
    assert f.response.headers["etag"] == 'W/"v1"'
    assert f.response.headers.get_all("vary") == ["Origin, Accept-Encoding"]


def test_identity_content_encoding_is_replaced() -> None:
    f = flow(content_encoding="identity")
    Compression().response(f)
    assert f.response is not None and f.response.headers["content-encoding"] == "zstd"


def test_chunked_buffered_body_gets_no_content_length() -> None:
    f = flow(transfer_encoding="chunked")
    del f.response.headers["content-length"]  # type: ignore[union-attr]
    Compression().response(f)
    assert f.response is not None and f.response.headers["content-encoding"] == "zstd"
    assert "content-length" not in f.response.headers


@pytest.mark.parametrize("change", [
    {"method": "HEAD"},
    {"status": 204},
    {"status": 304},
    {"status": 206, "content_range": "bytes 0-9/100"},
    {"status": 101},
    {"content_range": "bytes */5000"},  # a 416's
    {"content_encoding": "gzip"},  # compressed already
    {"content_encoding": "br, identity"},
    {"cache_control": "public, No-Transform"},
    {"content_type": "image/png"},
    {"content_type": "text/event-stream"},
    {"body": HTML[: MIN_SIZE - 1]},
    {"body": b""},
])
def test_left_alone(change: dict[str, object]) -> None:
    f = flow(**change)  # type: ignore[arg-type]
    assert f.response is not None
    before = f.response.copy()
    Compression().response(f)
    assert f.response.raw_content == before.raw_content
    assert f.response.headers == before.headers  # no Vary either: never compressed


def asking(**fields: str) -> http.HTTPFlow:
    f = flow()
    for name, value in fields.items():
        f.request.headers[name.replace("_", "-")] = value
    return f


@pytest.mark.parametrize("f", [
    pytest.param(flow(accept=None), id="no Accept-Encoding"),
    pytest.param(flow(accept="gzip;q=0, identity"), id="all refused"),
    pytest.param(asking(range="bytes=0-99"), id="a Range request"),
    pytest.param(flow(body=os.urandom(4096)), id="grows when compressed"),
])
def test_plain_but_varies(f: http.HTTPFlow) -> None:
    """Could have been compressed for another client: Vary tells caches so."""
    assert f.response is not None
    body = f.response.raw_content
    Compression().response(f)
    assert f.response.raw_content == body
    assert "content-encoding" not in f.response.headers
    assert f.response.headers["vary"] == "Accept-Encoding"


def test_opt_out_and_request_no_transform() -> None:
    for f in (flow(), asking(cache_control="no-transform")):
        if "cache-control" not in f.request.headers:
            f.metadata["luma_compress"] = False  # the service's --no-compress
        assert f.response is not None
        before = f.response.copy()
        Compression().response(f)
        assert f.response.headers == before.headers
        assert f.response.raw_content == before.raw_content


async def test_cycled_through_mitmproxy() -> None:
    """Every hook of an HTTP flow, as mitmproxy invokes them on the addon."""
    addon = Compression()
    with taddons.context(addon) as tctx:
        f = flow()
        await tctx.cycle(addon, f)
    assert f.response is not None and f.response.headers["content-encoding"] == "zstd"
    assert decode("zstd", f.response.raw_content or b"") == HTML


# -------------------------------------------------------------- streamed bodies
class Streamer:
    """Stands in for the routing addon's ``responseheaders``: streams what it would."""

    def responseheaders(self, f: http.HTTPFlow) -> None:
        assert f.response is not None
        if f.response.stream or stream_response(f.response):
            stream_counted(f.response)


def streamed(f: http.HTTPFlow) -> http.HTTPFlow:
    """``f`` through the routing stand-in and then ``Compression``, in that order."""
    with taddons.context(Streamer(), Compression()) as tctx:
        tctx.master.addons.trigger(HttpResponseHeadersHook(f))
    return f


def unsized(**kw: object) -> http.HTTPFlow:
    f = flow(**kw)  # type: ignore[arg-type]
    assert f.response is not None
    del f.response.headers["content-length"]
    f.response.raw_content = None
    return f


def feed(encoder: object, chunks: list[bytes]) -> list[bytes]:
    """What mitmproxy sends on for each chunk and for the end (b"")."""
    assert callable(encoder)
    sent = []
    for chunk in [*chunks, b""]:
        out = encoder(chunk)
        sent.append(out if isinstance(out, bytes) else b"".join(out))
    return sent


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_streamed_body_flushed_per_chunk(encoding: str) -> None:
    f = streamed(unsized(accept=encoding, transfer_encoding="chunked", etag='"v1"'))
    response = f.response
    assert response is not None
    assert isinstance(response.stream, StreamEncoder)
    assert response.headers["content-encoding"] == encoding
    assert response.headers["vary"] == "Accept-Encoding"
    assert response.headers["etag"] == 'W/"v1"'
    chunks = [HTML[i:i + 1000] for i in range(0, len(HTML), 1000)]
    sent = feed(response.stream, chunks)
    step, seen = decoder(encoding), b""
    for i, out in enumerate(sent[:-1]):
        assert out, "an empty chunk would end an HTTP/1 chunked body"
        seen += step(out)
        assert seen == b"".join(chunks[: i + 1])  # all of it out, none held back
    assert decode(encoding, b"".join(sent)) == HTML
    assert response.stream.count == sum(map(len, sent))  # the access log's bytes_out


def test_sized_streamed_body_becomes_chunked() -> None:
    """A large body with a Content-Length (streamed) to an HTTP/1.1 client."""
    f = flow(body=HTML * 100)
    assert f.response is not None
    f.response.headers["content-length"] = str(2 * 1024 * 1024)  # over the streaming bound
    streamed(f)
    assert isinstance(f.response.stream, StreamEncoder)
    assert "content-length" not in f.response.headers
    assert f.response.headers["transfer-encoding"] == "chunked"


@pytest.mark.parametrize(("client", "container", "chunked"), [
    ("HTTP/1.1", "HTTP/1.1", True),
    ("HTTP/1.1", "HTTP/2.0", True),  # the client needs the framing
    ("HTTP/2.0", "HTTP/1.1", True),  # dropped for the client; keeps the container's connection
    ("HTTP/2.0", "HTTP/2.0", False),  # a connection field is an error in HTTP/2
    ("HTTP/3", "HTTP/2.0", False),
])
def test_streamed_framing(client: str, container: str, chunked: bool) -> None:
    f = streamed(unsized(request_version=client, response_version=container))
    assert f.response is not None and isinstance(f.response.stream, StreamEncoder)
    assert ("transfer-encoding" in f.response.headers) is chunked


@pytest.mark.parametrize("f", [
    pytest.param(unsized(request_version="HTTP/1.0"), id="HTTP/1.0 client"),
    pytest.param(unsized(content_type="text/event-stream"), id="SSE"),
    pytest.param(unsized(accept=None), id="no Accept-Encoding"),
    pytest.param(unsized(method="HEAD"), id="HEAD"),
])
def test_streamed_left_alone(f: http.HTTPFlow) -> None:
    streamed(f)
    assert f.response is not None
    assert type(f.response.stream) is ByteCounter  # the routing addon's, as it was
    assert "content-encoding" not in f.response.headers


def test_buffered_flow_untouched_by_responseheaders() -> None:
    f = flow()
    streamed(f)  # small and sized: the stand-in buffers it
    assert f.response is not None and f.response.stream is False
    assert "content-encoding" not in f.response.headers


def test_streamed_flow_skipped_by_response_hook() -> None:
    f = streamed(unsized())
    assert f.response is not None
    headers = f.response.headers.copy()
    with taddons.context(Compression()) as tctx:
        tctx.master.addons.trigger(HttpResponseHook(f))
    assert f.response.headers == headers


def test_inner_stream_callable_still_sees_the_plain_bytes() -> None:
    f = unsized()
    assert f.response is not None
    f.response.stream = bytes.upper  # another addon's transformation
    streamed(f)
    stream = f.response.stream
    assert isinstance(stream, StreamEncoder)
    assert decode("zstd", b"".join(feed(stream, [HTML[:3000], HTML[3000:]]))) == HTML.upper()


def test_empty_chunk_mid_body() -> None:
    """An empty DATA frame mid-body ends the frame; what follows is a new one."""
    encoder = StreamEncoder("gzip")
    sent = feed(encoder, [HTML[:2000], b"", HTML[2000:]])
    assert decode("gzip", b"".join(sent)) == HTML
    assert encoder(b"") == []  # the real end after the end: nothing more


def test_nothing_to_send_is_no_chunk() -> None:
    """An inner callable holding bytes back: nothing is sent, not an empty chunk."""
    encoder = StreamEncoder("br", inner=lambda data: [])
    assert encoder(b"abc") == []
