"""The connect seam over real loopback sockets: refused IPs are retried, black holes raced."""

from __future__ import annotations

import asyncio
import socket
import time

from luma_proxy.proxy.engine_patches import Connector


async def _serve(host: str) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(lambda r, w: w.close(), host, 0)
    return server, server.sockets[0].getsockname()[1]


def _closed_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def test_refused_ip_is_retried_on_another_ip_of_the_alias() -> None:
    async def main() -> str:
        server, port = await _serve("127.0.0.2")
        async def alternatives(ip: str, p: int, fresh: bool) -> list[str]:
            return ["127.0.0.3", "127.0.0.2"]  # .3 refuses: nothing listens there
        try:
            # 127.0.0.4 refuses too: the first try fails, the connector moves on
            _, writer = await Connector(alternatives, 5.0).open("127.0.0.4", port)
            peer = writer.get_extra_info("peername")[0]
            writer.close()
            return peer
        finally:
            server.close()
    assert asyncio.run(main()) == "127.0.0.2"


def test_everything_refused_raises_after_the_deadline() -> None:
    port = _closed_port("127.0.0.5")
    async def alternatives(ip: str, p: int, fresh: bool) -> list[str]:
        return ["127.0.0.5"]
    async def main() -> None:
        await Connector(alternatives, 0.5).open("127.0.0.5", port)
    started = time.monotonic()
    try:
        asyncio.run(main())
    except OSError:
        pass
    else:
        raise AssertionError("connect succeeded with no listener")
    assert 0.4 < time.monotonic() - started < 3.0


def test_a_black_hole_is_raced_and_the_live_ip_wins_fast() -> None:
    async def main() -> float:
        server, port = await _serve("127.0.0.2")
        async def slow_connection(host: str, p: int, **kw):  # a black-holed IP never answers
            if host == "127.0.0.9":
                await asyncio.sleep(30)
            return await asyncio.open_connection(host, p, **kw)
        connector = Connector(lambda ip, p, fresh: _const(["127.0.0.9", "127.0.0.2"]), 5.0,
                              opener=slow_connection)
        started = time.monotonic()
        try:
            _, writer = await connector.open("127.0.0.9", port)
            writer.close()
            return time.monotonic() - started
        finally:
            server.close()
    assert asyncio.run(main()) < 2.0


async def _const(value: list[str]) -> list[str]:
    return value


def test_with_nothing_to_connect_to_it_holds_until_a_container_comes() -> None:
    """The only replica gone (a redeploy gap): past the retry timeout, up to the hold."""
    port = _closed_port("127.0.0.6")
    appeared: list[asyncio.Server] = []

    async def alternatives(ip: str, p: int, fresh: bool) -> list[str]:
        return ["127.0.0.7"] if appeared else []

    async def main() -> tuple[str, float]:
        async def bring_up() -> None:
            await asyncio.sleep(1.5)  # three times the retry timeout below
            appeared.append(await asyncio.start_server(lambda r, w: w.close(),
                                                       "127.0.0.7", port))
        task = asyncio.ensure_future(bring_up())
        started = time.monotonic()
        try:
            _, writer = await Connector(alternatives, 0.5, hold=5.0).open("127.0.0.6", port)
            peer = writer.get_extra_info("peername")[0]
            writer.close()
            return peer, time.monotonic() - started
        finally:
            await task
            appeared[0].close()

    peer, took = asyncio.run(main())
    assert peer == "127.0.0.7" and 1.4 < took < 3.0


def test_the_hold_is_bounded_too() -> None:
    port = _closed_port("127.0.0.8")

    async def alternatives(ip: str, p: int, fresh: bool) -> list[str]:
        return []

    started = time.monotonic()
    try:
        asyncio.run(Connector(alternatives, 0.2, hold=1.0).open("127.0.0.8", port))
    except OSError:
        pass
    else:
        raise AssertionError("connect succeeded with no listener")
    assert 0.9 < time.monotonic() - started < 2.5
