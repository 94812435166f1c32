"""What ``run --http3`` needs of mitmproxy's internals (engine_patches): the upstream pool
for HTTP/3 streams, the QUIC ClientHello parser under ``-O``, and CONNECTION_CLOSE when
the proxy closes a QUIC client. End to end: ``tests/e2e/test_http3.py``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace
from typing import Any

import pytest
from mitmproxy.connection import ConnectionState
from mitmproxy.test import tflow

from luma_proxy.proxy import engine_patches


def layer_of(alpn: bytes | None) -> Any:
    return SimpleNamespace(context=SimpleNamespace(client=SimpleNamespace(alpn=alpn)))


@pytest.mark.parametrize(("alpn", "pooled"), [
    (b"h2", True), (b"h3", True), (b"http/1.1", False), (None, False)])
def test_http3_streams_share_the_upstream_pool_as_http2_streams_do(alpn: bytes | None,
                                                                   pooled: bool) -> None:
    """mitmproxy would hand a busy HTTP/1 connection to a second HTTP/3 stream."""
    steps = engine_patches._get_connection(layer_of(alpn), object())
    assert (steps.__name__ == "_get_pooled_connection") is pooled
    steps.close()
    steps = engine_patches._layer_event(layer_of(alpn), object())
    assert (steps.__name__ == "_layer_event_retrying") is pooled
    steps.close()
    if not pooled:  # HTTP/1 clients: mitmproxy's own generator, unwrapped (hot path)
        steps = engine_patches._get_connection(layer_of(alpn), object(), reuse=True)
        assert steps.gi_code is engine_patches._original_get_connection.__code__
        steps.close()


PARSE_UNDER_O = textwrap.dedent("""
    import sys, time
    from aioquic.h3.connection import H3_ALPN
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from mitmproxy.proxy.layers.quic import _stream_layers
    from luma_proxy.proxy import engine_patches

    assert not __debug__  # -O: asserts are gone
    client = QuicConnection(configuration=QuicConfiguration(
        is_client=True, alpn_protocols=H3_ALPN, server_name="app.test"))
    client.connect(("127.0.0.1", 443), now=time.time())
    datagrams = [data for data, _ in client.datagrams_to_send(now=time.time())]

    def sni():
        try:
            hello = _stream_layers.quic_parse_client_hello_from_datagrams(datagrams)
        except ValueError as e:
            return f"ValueError: {e}"
        return hello.sni if hello else None

    print(sni())
    print(engine_patches.install_quic_hello_parser(), engine_patches.install_quic_hello_parser())
    print(sni())
""")


@pytest.mark.spawns  # python -O in a child: the bug only shows there
def test_the_quic_client_hello_is_read_under_python_O() -> None:
    """``luma-proxy run`` serves under -O; mitmproxy reads the ClientHello in an assert."""
    result = subprocess.run([sys.executable, "-O", "-c", PARSE_UNDER_O], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    before, installed, after = result.stdout.splitlines()
    assert before != "app.test"  # mitmproxy's parser, compiled under -O: one byte off
    assert installed == "True True"  # idempotent
    assert after == "app.test"


def test_the_recompiled_parser_is_mitmproxys_own() -> None:
    from mitmproxy.proxy.layers.quic import _client_hello_parser, _stream_layers

    assert engine_patches.install_quic_hello_parser()
    parser = _stream_layers.quic_parse_client_hello_from_datagrams
    assert parser is not _client_hello_parser.quic_parse_client_hello_from_datagrams
    assert parser.__code__.co_filename == _client_hello_parser.__file__
    with pytest.raises(ValueError, match="not initial"):
        parser([b"\x40" + b"\x00" * 40])  # a short-header packet: refused as before


class FakeQuic:
    def __init__(self) -> None:
        self.closed: list[tuple[int, str]] = []

    def close(self, error_code: int = 0, frame_type: int | None = None,
              reason_phrase: str = "") -> None:
        self.closed.append((error_code, reason_phrase))


def test_a_quic_client_the_proxy_closes_gets_connection_close(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As HTTP/2 gets GOAWAY: without it the client sends its next request into the void."""
    monkeypatch.setattr(engine_patches, "_original_quic_receive_close",
                        lambda layer: iter(["mitmproxy's receive_close"]))
    client, server = tflow.tclient_conn(), tflow.tserver_conn()

    def layer(conn: Any) -> Any:
        return SimpleNamespace(quic=FakeQuic(), conn=conn, context=SimpleNamespace(client=client),
                               tls_interact=lambda: iter(["CONNECTION_CLOSE datagram"]))

    client.state = ConnectionState.CLOSED  # closed by the proxy (idle timeout, drain)
    ours = layer(client)
    assert list(engine_patches._quic_receive_close(ours)) == [
        "CONNECTION_CLOSE datagram", "mitmproxy's receive_close"]
    assert ours.quic.closed == [(engine_patches.H3_NO_ERROR, "closing")]
    client.state = ConnectionState.CAN_WRITE  # the client closed: nothing to tell it
    theirs = layer(client)
    assert list(engine_patches._quic_receive_close(theirs)) == ["mitmproxy's receive_close"]
    assert theirs.quic.closed == []
    server.state = ConnectionState.CLOSED  # an upstream QUIC connection: left to mitmproxy
    upstream = layer(server)
    assert list(engine_patches._quic_receive_close(upstream)) == ["mitmproxy's receive_close"]
    assert upstream.quic.closed == []
