"""The HTTP/1 request readers' bounds, driven through mitmproxy's own Http1Server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from h11._receivebuffer import ReceiveBuffer
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.test import taddons, tflow

from luma_proxy.proxy.engine_patches import install_http1_limits
from luma_proxy.proxy.headrules import HeadScanner, head_status


class CountingBuffer(ReceiveBuffer):
    """mitmproxy's receive buffer, counting the bytes copied out of it."""

    copied = 0

    def __bytes__(self) -> bytes:
        data = super().__bytes__()
        CountingBuffer.copied += len(data)
        return data


@pytest.fixture
def server() -> Iterator[_http1.Http1Server]:
    install_http1_limits(64 * 1024, 1024 * 1024)
    with taddons.context() as tctx:
        client = tflow.tclient_conn()
        srv = _http1.Http1Server(Context(client, tctx.options))
        srv.buf = CountingBuffer()
        CountingBuffer.copied = 0
        list(srv.handle_event(events.Start()))
        yield srv


def feed(srv: _http1.Http1Server, data: bytes) -> list[commands.Command]:
    return list(srv.handle_event(events.DataReceived(srv.conn, data)))


def test_a_head_sent_byte_by_byte_costs_linear_work(server) -> None:
    """Issue 13.11: the reader copied and searched the whole buffer on every segment."""
    head = b"GET / HTTP/1.1\r\nHost: blog.test\r\nX-Pad: " + b"a" * 60_000 + b"\r\n\r\n"
    for i in range(len(head)):
        feed(server, head[i:i + 1])
    assert server.request is not None and server.request.headers["x-pad"] == "a" * 60_000
    assert CountingBuffer.copied <= 2 * len(head)


def test_a_head_over_the_limit_arriving_slowly_is_431_at_the_limit(server) -> None:
    sent = b""
    for _ in range(70):
        out = feed(server, b"X" * 1024)
        sent += b"X" * 1024
        if out:
            break
    assert len(sent) <= 66 * 1024
    assert any(isinstance(c, commands.SendData) and c.data.startswith(b"HTTP/1.1 431")
               for c in out)
    assert CountingBuffer.copied <= 2 * len(sent)


def test_scanner_finds_an_end_split_across_segments() -> None:
    scanner = HeadScanner()
    pieces = [b"GET / HTTP/1.1\r\nHost: a\r", b"\n", b"\r", b"\nbody"]
    ends = [scanner.feed(p) for p in pieces]
    assert ends == [None, None, None, len(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")]
    assert scanner.examined <= sum(map(len, pieces)) + 2 * len(pieces)


@pytest.mark.parametrize("head, status", [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", None),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\tb\x80\xff\r\n\r\n", None),
    (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7f\r\n\r\n", 400),
    (b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\nHost: a\r\ncontent-length:10\r\n\r\n", None),
])
def test_head_status(head: bytes, status: int | None) -> None:
    assert head_status(head, 10) == status


def test_h2_upstream_connections_option_is_validated() -> None:
    from mitmproxy import exceptions

    from luma_proxy.proxy.limits import Limits

    limits = Limits()
    with taddons.context(limits) as tctx:
        tctx.configure(limits, luma_h2_upstream_connections=3)
        assert tctx.options.luma_h2_upstream_connections == 3
        with pytest.raises(exceptions.OptionsError, match="at least 1"):
            tctx.configure(limits, luma_h2_upstream_connections=0)
        assert tctx.options.luma_h2_upstream_connections == 3  # the bad value changed nothing


def test_every_control_byte_but_tab_is_refused_and_no_other() -> None:
    for byte in range(256):
        if byte in (0x0A, 0x0D):
            continue  # line ends: the bare-CR/LF rules above
        head = b"GET / HTTP/1.1\r\nHost: a\r\nX: a" + bytes([byte]) + b"b\r\n\r\n"
        refused = (byte < 0x20 and byte != 0x09) or byte == 0x7F
        assert head_status(head, 10) == (400 if refused else None), hex(byte)
