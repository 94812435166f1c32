"""Response compression through a real proxy process in front of a raw container,
under both entry points (``luma-proxy run`` and ``mitmdump -s addons/luma.py``)."""

from __future__ import annotations

import http.client
import zlib
from collections.abc import Iterator

import brotli
import pytest
import zstandard

from tests.e2e.conftest import Proxy, next_ip, request, wait_until
from tests.e2e.docker_double import free_port
from tests.e2e.recorder import OK, Recorder

PAGE = b"".join(b"<li><a href='/item/%d'>item %d of the catalogue</a></li>\n" % (i, i)
                for i in range(800))
BIG = b"".join(b"%08d GET /api/items?page=%d 200 0.004s\n" % (i, i % 97) for i in range(60_000))
EVENTS = b"".join(b"data: event %d, some text to compress\n\n" % i for i in range(100))
ALL = "gzip, br, zstd"


def chunked(body: bytes, size: int = 8192) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
             for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def reply(head: bytes) -> bytes:
    """The container: a page, a large sized text, an unsized text, events; else ``ok``."""
    target = head.split(b" ", 2)[1]
    if target == b"/page":
        answer = (b'HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nETag: "p1"\r\n'
                  b"Vary: Origin\r\nContent-Length: %d\r\n\r\n" % len(PAGE))
        return answer if head.startswith(b"HEAD ") else answer + PAGE
    if target == b"/big":  # over streaming.STREAM_ABOVE: streamed, though sized
        return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                % (len(BIG), BIG))
    if target == b"/unsized":
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + chunked(PAGE))
    if target == b"/events":
        return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + chunked(EVENTS, 64))
    return OK


def decode(encoding: str, data: bytes) -> bytes:
    if encoding == "gzip":
        return zlib.decompress(data, 31)
    if encoding == "br":
        return brotli.decompress(data)
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


@pytest.fixture
def container(dns, cli) -> Iterator[Recorder]:
    ip, port = next_ip(), free_port()
    rec = Recorder(ip, port, reply).start()
    dns.set_alias("shop", [ip])
    cli("deploy", "--host", "shop.test", "--target", f"shop:{port}", "--project", "p",
        "--no-ssl")
    yield rec
    rec.stop()


@pytest.fixture
def proxy(container, start_proxy, proxy_kind) -> Proxy:
    p = start_proxy(proxy_kind)
    wait_until(lambda: p.get("shop.test").status == 200, timeout=20, interval=0.2)
    return p


def test_buffered_answers(proxy: Proxy) -> None:
    for accept, encoding in ((ALL, "zstd"), ("gzip;q=1, br;q=0.5", "gzip"), ("br", "br")):
        reply = proxy.get("shop.test", "/page", headers={"Accept-Encoding": accept})
        assert reply.status == 200
        assert reply.headers["content-encoding"] == encoding
        assert int(reply.headers["content-length"]) == len(reply.body) < len(PAGE) / 4
        assert reply.headers["vary"] == "Origin, Accept-Encoding"
        assert reply.headers["etag"] == 'W/"p1"'
        assert decode(encoding, reply.body) == PAGE

    plain = proxy.get("shop.test", "/page")  # no Accept-Encoding
    assert plain.body == PAGE and "content-encoding" not in plain.headers
    assert plain.headers["vary"] == "Origin, Accept-Encoding"
    head = proxy.get("shop.test", "/page", method="HEAD", headers={"Accept-Encoding": ALL})
    assert "content-encoding" not in head.headers
    assert head.headers["content-length"] == str(len(PAGE))
    events = proxy.get("shop.test", "/events", headers={"Accept-Encoding": ALL})
    assert events.body == EVENTS and "content-encoding" not in events.headers


def test_streamed_answers_on_one_connection(proxy: Proxy, container: Recorder) -> None:
    """Sized and unsized bodies, compressed as they stream; the client's connection and the
    container's are both kept (chunked framing on each side)."""
    before = len(container.received())
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
    try:
        for path, body, encoding in (("/big", BIG, "zstd"), ("/unsized", PAGE, "gzip"),
                                     ("/big", BIG, "br")):
            reply = request(proxy.port, "shop.test", path, conn=conn,
                            headers={"Accept-Encoding": encoding})
            assert reply.status == 200
            assert reply.headers["content-encoding"] == encoding
            assert reply.headers["transfer-encoding"] == "chunked"
            assert "content-length" not in reply.headers
            assert len(reply.body) < len(body) / 4
            assert decode(encoding, reply.body) == body
    finally:
        conn.close()
    assert len(container.received()) == before + 1  # one upstream connection for all three


def test_no_compress_per_service(proxy: Proxy, container: Recorder, cli) -> None:
    cli("deploy", "--host", "shop.test", "--target", f"shop:{container.port}", "--project",
        "p", "--no-ssl", "--no-compress")
    assert "no compression" in cli("list").stdout
    assert cli("list", "--json").stdout.count('"compress": false') == 1
    reply = wait_until(lambda: (r := proxy.get("shop.test", "/page", headers={
        "Accept-Encoding": ALL})).headers.get("content-encoding") is None and r)
    assert reply.body == PAGE


def test_compressed_over_http2(container: Recorder, cli, start_proxy, tmp_path) -> None:
    """HTTP/2 frames a body by DATA frames: a compressed stream needs no chunked framing."""
    from tests.e2e.test_http2 import h2_connect, h2_exchange, req
    from tests.e2e.test_https import cert_args

    cli("deploy", "--host", "shop.test", "--target", f"shop:{container.port}", "--project",
        "p", *cert_args(tmp_path, ["shop.test"]))
    https_port = free_port()
    start_proxy("run", args=("--https-port", str(https_port)))
    s, conn = h2_connect(https_port, "shop.test")
    try:
        page = h2_exchange(s, conn, 1, req("/page", "shop.test", extra=[
            ("accept-encoding", "gzip, zstd")]))
        big = h2_exchange(s, conn, 3, req("/big", "shop.test", extra=[
            ("accept-encoding", "br")]))
        events = h2_exchange(s, conn, 5, req("/events", "shop.test", extra=[
            ("accept-encoding", ALL)]))
    finally:
        s.close()
    assert page.status == 200 and page.headers[b"content-encoding"] == b"zstd"
    assert decode("zstd", page.body) == PAGE
    assert big.headers[b"content-encoding"] == b"br"
    assert b"transfer-encoding" not in big.headers and b"content-length" not in big.headers
    assert decode("br", big.body) == BIG
    assert b"content-encoding" not in events.headers and events.body == EVENTS
