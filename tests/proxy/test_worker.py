"""The worker side of ``run --workers``: mitmproxy's listeners share their port."""

from __future__ import annotations

import asyncio

import pytest

from luma_proxy.proxy import worker
from tests.e2e.docker_double import free_port


async def test_shim_lets_two_mitmproxy_listeners_share_a_port(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mitmproxy.proxy import mode_servers

    monkeypatch.setattr(mode_servers, "asyncio", mode_servers.asyncio)  # restored afterwards
    shim = worker.enable_reuse_port()
    assert worker.enable_reuse_port() is shim  # idempotent
    assert mode_servers.asyncio.Server is asyncio.Server  # the rest is the real module

    async def handle(_r: asyncio.StreamReader, _w: asyncio.StreamWriter) -> None:
        pass

    port = free_port()
    first = await mode_servers.asyncio.start_server(handle, "127.0.0.1", port)
    second = await mode_servers.asyncio.start_server(handle, "127.0.0.1", port)
    try:
        assert all(worker.has_reuse_port(s) for s in [*first.sockets, *second.sockets])
        assert worker.missing_reuse_port([("127.0.0.1", port)]) == []
        assert worker.missing_reuse_port([("127.0.0.1", port + 1)]) == [f"127.0.0.1:{port + 1}"]
    finally:
        first.close()
        second.close()
