"""HTTP/2 clients share HTTP/1 upstream connections (issue 13, point 5).

mitmproxy opened one upstream connection per HTTP/2 stream and closed it after
one response: 100 streams were 100 connects at once, and a container's accept
queue overflowed. The container here is ``Recorder``, which keeps one entry per
connection it accepted, so each test counts connections, not time.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h2.connection
import h2.events
import pytest

from tests.e2e.conftest import Proxy, next_ip, start_with_https
from tests.e2e.docker_double import free_port
from tests.e2e.recorder import OK, Recorder
from tests.e2e.test_http2 import h2_connect, h2_exchange, req
from tests.e2e.test_https import cert_args

# Above mitmproxy's own bound of 5 per address, which kept-alive connections held:
# a sixth connect waited for ever.
POOL = 8


@dataclass
class Pooled:
    proxy: Proxy
    https_port: int
    upstream: Recorder


@pytest.fixture
def pooled(dns, cli, start_proxy, proxy_kind, tmp_path: Path) -> Iterator[Pooled]:
    """blog.test -> a recording container that takes 50 ms per request."""
    ip, port = next_ip(), free_port()

    def slow(head: bytes) -> bytes:
        if head.startswith(b"GET /close "):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        if not head.startswith(b"GET /up "):
            time.sleep(0.05)
        return OK

    upstream = Recorder(ip, port, slow).start()
    dns.set_alias("pool", [ip])
    cli("deploy", "--host", "blog.test", "--target", f"pool:{port}", "--project", "p",
        *cert_args(tmp_path, ["blog.test"]))
    https_port = free_port()
    env = {"LUMA_PROXY_H2_UPSTREAM_CONNECTIONS": str(POOL),
           "LUMA_PROXY_HEALTH_INTERVAL": "3600"}
    proxy = start_with_https(start_proxy, proxy_kind, https_port, env)
    yield Pooled(proxy, https_port, upstream)
    upstream.stop()


def all_at_once(s: ssl.SSLSocket, conn: h2.connection.H2Connection,
                streams: list[int]) -> dict[int, int]:
    """Open every stream before reading any answer; the status each one got."""
    for stream in streams:
        conn.send_headers(stream, req(f"/{stream}"), end_stream=True)
    s.sendall(conn.data_to_send())
    status: dict[int, int] = {}
    ended: set[int] = set()
    while len(ended) < len(streams):
        data = s.recv(65536)
        assert data, f"connection closed with {len(ended)} of {len(streams)} answered"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status[event.stream_id] = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.StreamEnded):
                ended.add(event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                pytest.fail(f"no answer: {event}")
        s.sendall(conn.data_to_send())
    return status


def test_sequential_streams_share_one_upstream_connection(pooled: Pooled) -> None:
    s, conn = h2_connect(pooled.https_port)
    with s:
        for stream in (1, 3, 5, 7):
            assert h2_exchange(s, conn, stream, req(f"/seq{stream}")).status == 200
    assert len(pooled.upstream.requests()) == 4
    # before: one connection per stream, closed after its response
    assert len(pooled.upstream.received()) == 1


def test_concurrent_streams_are_bounded_per_container_and_all_served(pooled: Pooled) -> None:
    s, conn = h2_connect(pooled.https_port)
    streams = list(range(1, 2 * 40, 2))
    with s:
        status = all_at_once(s, conn, streams)
    assert status == dict.fromkeys(streams, 200)
    assert len(pooled.upstream.requests()) == len(streams)
    # every connection the container saw stayed open (keep-alive), so this counts
    # the most that were ever open at once; before: 40
    assert 1 <= len(pooled.upstream.received()) <= POOL


def test_a_connection_the_container_ends_is_not_reused(pooled: Pooled) -> None:
    s, conn = h2_connect(pooled.https_port)
    with s:
        assert h2_exchange(s, conn, 1, req("/close")).status == 200  # Connection: close
        assert h2_exchange(s, conn, 3, req("/b")).status == 200
        assert h2_exchange(s, conn, 5, req("/c")).status == 200
    assert len(pooled.upstream.requests()) == 3
    assert len(pooled.upstream.received()) == 2
