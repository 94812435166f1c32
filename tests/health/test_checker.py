"""Unit tests for luma_proxy.health.checker: the probe against real loopback servers, combine."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from luma_proxy.health.checker import (
    MAX_BODY,
    MAX_HEAD,
    HealthChecker,
    Probe,
    combine,
    judge_status,
    parse_status_line,
    passed,
    probe,
)
from luma_proxy.models import Health, Service
from luma_proxy.routing.resolver import Resolver
from tests.e2e.docker_double import FakeDockerDNS

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def failed_ips(health: Health) -> set[str]:
    return {ip for ip, ok in health.containers.items() if not ok}



def respond(status: str, body: bytes = b"ok", extra: str = "") -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body
        )
        await writer.drain()
        writer.close()

    return handler


@contextlib.asynccontextmanager
async def server(handler: Handler, ip: str = "127.0.0.1", port: int = 0) -> AsyncIterator[int]:
    """A TCP server on ``ip``; yields its port."""
    tasks: set[asyncio.Task] = set()

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await handler(reader, writer)
        except Exception:
            pass
        finally:
            writer.close()  # also when cancelled: wait_closed() waits for every connection

    srv = await asyncio.start_server(wrapped, ip, port)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.wait_for(srv.wait_closed(), 5)


def closed_port(ip: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- probe


def test_probe_200_is_ok_and_sends_host_and_path() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async def scenario() -> Probe:
        async with server(handler, "127.0.0.2") as port:
            return await probe("127.0.0.2", port, "blog:3000", "/up?x=1", 2.0)

    assert asyncio.run(scenario()) == Probe(True)
    request = seen[0].decode()
    assert request.startswith("GET /up?x=1 HTTP/1.1\r\n")
    assert "\r\nHost: blog:3000\r\n" in request
    assert "\r\nConnection: close\r\n" in request


@pytest.mark.parametrize(("status", "ok"), [("204 No Content", True), ("299 Whatever", True),
                                            ("503 Service Unavailable", False),
                                            ("500 Internal Server Error", False),
                                            ("404 Not Found", False)])
def test_probe_status(status: str, ok: bool) -> None:
    async def scenario() -> Probe:
        async with server(respond(status), "127.0.0.3") as port:
            return await probe("127.0.0.3", port, "h", "/up", 2.0)

    result = asyncio.run(scenario())
    assert result.ok is ok
    if not ok:
        assert result.error == f"HTTP {status.split()[0]}"


def test_probe_does_not_follow_redirect() -> None:
    hits: list[int] = []

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(1)
        await respond("200 OK")(reader, writer)

    async def scenario() -> Probe:
        async with server(target, "127.0.0.4") as healthy_port:
            location = f"Location: http://127.0.0.4:{healthy_port}/up\r\n"
            async with server(respond("301 Moved Permanently", b"", location),
                              "127.0.0.3") as port:
                return await probe("127.0.0.3", port, "h", "/up", 2.0)

    result = asyncio.run(scenario())
    assert not result.ok
    assert result.error is not None and "301" in result.error
    assert hits == []


def test_probe_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async def scenario() -> tuple[Probe, float]:
        async with server(silent, "127.0.0.5") as port:
            t0 = time.monotonic()
            result = await probe("127.0.0.5", port, "h", "/up", 0.5)
            return result, time.monotonic() - t0

    result, elapsed = asyncio.run(scenario())
    assert not result.ok
    assert result.error == "timed out after 0.5s"
    assert 0.45 <= elapsed < 1.5


def test_probe_times_out_on_a_trickling_server() -> None:
    """A server sending one header byte at a time cannot hold the probe past its deadline."""

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(1000):
            writer.write(b"X")
            await writer.drain()
            await asyncio.sleep(0.05)

    async def scenario() -> tuple[Probe, float]:
        async with server(trickle, "127.0.0.5") as port:
            t0 = time.monotonic()
            result = await probe("127.0.0.5", port, "h", "/up", 0.5)
            return result, time.monotonic() - t0

    result, elapsed = asyncio.run(scenario())
    assert not result.ok and "timed out" in (result.error or "")
    assert elapsed < 1.5


def test_probe_huge_header_block_fails() -> None:
    async def huge_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(2 * MAX_HEAD // 100):  # 32 KiB: over our limit, under asyncio's 64 KiB
            writer.write(b"X-Filler-%d: %s\r\n" % (i, b"a" * 90))
        writer.write(b"\r\nok")
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def scenario() -> Probe:
        async with server(huge_head, "127.0.0.6") as port:
            return await probe("127.0.0.6", port, "h", "/up", 2.0)

    result = asyncio.run(scenario())
    assert result == Probe(False, "response headers too large")


def test_probe_huge_status_line_fails() -> None:
    async def huge_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 " + b"O" * (2 * MAX_HEAD) + b"\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def scenario() -> Probe:
        async with server(huge_line, "127.0.0.6") as port:
            return await probe("127.0.0.6", port, "h", "/up", 2.0)

    result = asyncio.run(scenario())
    assert not result.ok
    assert result.error in ("malformed HTTP response", "response headers too large")


def test_probe_does_not_read_an_endless_body() -> None:
    sent = [0]

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n")
        chunk = b"z" * 65536
        while True:  # until the probe hangs up
            writer.write(chunk)
            await writer.drain()
            sent[0] += len(chunk)

    async def scenario() -> tuple[Probe, float]:
        async with server(endless, "127.0.0.7") as port:
            t0 = time.monotonic()
            result = await probe("127.0.0.7", port, "h", "/up", 3.0)
            elapsed = time.monotonic() - t0
            await asyncio.sleep(0.05)
            return result, elapsed

    result, elapsed = asyncio.run(scenario())
    assert result == Probe(True)
    assert elapsed < 1.0  # returned long before the 3 s deadline
    # Only socket buffers' worth was ever sent, nowhere near the announced 10 GB.
    assert sent[0] < 64 * 1024 * 1024
    assert MAX_BODY < 64 * 1024


def test_probe_malformed_responses() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-")
        await writer.drain()

    async def scenario() -> list[Probe]:
        results = []
        for handler in (garbage, hang_up):
            async with server(handler, "127.0.0.8") as port:
                results.append(await probe("127.0.0.8", port, "h", "/up", 2.0))
        return results

    assert asyncio.run(scenario()) == [Probe(False, "malformed HTTP response")] * 2


def test_probe_connection_refused() -> None:
    port = closed_port("127.0.0.9")
    t0 = time.monotonic()
    result = asyncio.run(probe("127.0.0.9", port, "h", "/up", 2.0))
    assert not result.ok
    assert result.error
    assert time.monotonic() - t0 < 1.0


def test_judge_and_parse_status_line() -> None:
    assert judge_status(200).ok and judge_status(299).ok
    assert judge_status(199) == Probe(False, "HTTP 199")
    assert judge_status(302) == Probe(False, "HTTP 302")
    assert parse_status_line(b"HTTP/1.1 204 No Content\r\n") == 204
    assert parse_status_line(b"HTTP/1.0 503\r\n") == 503
    for bad in (b"", b"\r\n", b"HTTP/2 200\r\n", b"HTTP/1.1 abc OK\r\n", b"ICY 200 OK\r\n"):
        with pytest.raises(ValueError):
            parse_status_line(bad)


# ---------------------------------------------------------------------------- combine

T0 = datetime(2025, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(seconds=30)
OK, BAD = Probe(True), Probe(False, "HTTP 503")


def test_combine_healthy_if_alias_ok() -> None:
    h = combine(Health(), OK, {"10.0.0.1": BAD}, at=T1)
    assert h.healthy is True and h.last_error is None
    assert h.containers == {"10.0.0.1": False}
    assert failed_ips(h) == {"10.0.0.1"}
    assert h.checked_at == T1


def test_combine_healthy_if_any_container_ok() -> None:
    h = combine(Health(), Probe(False, "timed out after 5s"),
                {"10.0.0.1": BAD, "10.0.0.2": OK}, at=T1)
    assert h.healthy is True
    assert h.last_error is None
    assert failed_ips(h) == {"10.0.0.1"}


def test_combine_unhealthy_errors() -> None:
    h = combine(Health(), Probe(False, "alias does not resolve"), {}, at=T1)
    assert h.healthy is False and h.last_error == "alias does not resolve"
    h = combine(Health(), Probe(False), {}, at=T1)
    assert h.last_error == "no containers behind the alias"
    h = combine(Health(), Probe(False), {"a": Probe(False, "x"), "b": Probe(False, "y")}, at=T1)
    assert h.healthy is False and h.last_error == "x"
    assert failed_ips(h) == {"a", "b"}


def test_combine_changed_at_only_moves_on_a_change() -> None:
    first = combine(Health(), OK, {}, at=T0)
    assert first.changed_at == T0  # unknown -> healthy is a change
    same = combine(first, OK, {"10.0.0.1": OK}, at=T1)
    assert same.changed_at == T0 and same.checked_at == T1
    down = combine(same, BAD, {"10.0.0.1": BAD}, at=T1 + timedelta(seconds=1))
    assert down.changed_at == T1 + timedelta(seconds=1)
    still_down = combine(down, BAD, {}, at=T1 + timedelta(seconds=9))
    assert still_down.changed_at == down.changed_at
    first_bad = combine(Health(), BAD, {}, at=T0)
    assert first_bad.changed_at == T0  # unknown -> unhealthy is a change too


def test_combine_default_time_is_now() -> None:
    h = combine(Health(), OK, {})
    assert h.checked_at is not None
    assert abs((h.checked_at - datetime.now(UTC)).total_seconds()) < 5


# ---------------------------------------------------------------------------- checker


@pytest.fixture
def dns() -> Iterator[FakeDockerDNS]:
    with FakeDockerDNS() as srv:
        yield srv


async def servers_on_one_port(
    stack: contextlib.AsyncExitStack, handlers: dict[str, Handler]
) -> int:
    """Like containers behind one alias: the same port on several IPs."""
    for _ in range(20):
        port = closed_port(next(iter(handlers)))
        try:
            for ip, handler in handlers.items():
                await stack.enter_async_context(server(handler, ip, port))
        except OSError:
            await stack.aclose()
            continue
        return port
    raise RuntimeError("no common free port")


def test_checker_probes_alias_and_each_container(dns: FakeDockerDNS) -> None:
    seen_hosts: list[bytes] = []

    def healthy() -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            seen_hosts.extend(line for line in head.split(b"\r\n") if line.startswith(b"Host:"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

        return handler

    reports: list[dict] = []
    services: list[Service] = []

    async def scenario() -> tuple[Health, Health, Health]:
        async with contextlib.AsyncExitStack() as stack:
            port = await servers_on_one_port(stack, {
                "127.0.0.2": healthy(), "127.0.0.3": respond("503 Service Unavailable"),
            })
            dns.set_alias("blog", ["127.0.0.2", "127.0.0.3", "127.0.0.4"])  # .4: refused
            service = Service(name="blog", host="blog.com", target=f"blog:{port}", project="p")
            services.append(service)
            checker = HealthChecker(Resolver(dns=(dns.host, dns.port), ttl=60), reports.append,
                                    timeout=1.0)
            mixed = await checker.check(service, Health())

            dns.set_alias("blog", ["127.0.0.3", "127.0.0.4"])  # the healthy one left
            down = await checker.check(service, mixed)

            dns.remove_alias("blog")
            gone = await checker.check(service, down)

            assert checker.unchecked([service]) == [service]
            await checker.check_all([service], {})
            assert checker.unchecked([service]) == []
            moved = service.model_copy(update={"target": "blog:1"})
            assert checker.unchecked([moved]) == [moved]
            checker.discard(["blog.com"])  # removed: a later deploy is checked at once
            assert checker.unchecked([service]) == [service]
            return mixed, down, gone

    mixed, down, gone = asyncio.run(scenario())
    assert mixed.healthy is True
    assert mixed.containers == {"127.0.0.2": True, "127.0.0.3": False, "127.0.0.4": False}
    assert failed_ips(mixed) == {"127.0.0.3", "127.0.0.4"}
    assert seen_hosts and all(h.startswith(b"Host: blog:") for h in seen_hosts)

    assert down.healthy is False
    assert down.containers == {"127.0.0.3": False, "127.0.0.4": False}
    assert down.last_error
    assert mixed.changed_at == mixed.checked_at  # unknown -> healthy
    assert down.changed_at == down.checked_at  # healthy -> unhealthy
    assert down.changed_at != mixed.changed_at

    assert gone.healthy is False
    assert gone.containers == {}
    assert gone.last_error == "alias does not resolve"
    assert gone.changed_at == down.changed_at

    assert len(reports) == 1 and list(reports[0]) == ["blog.com"]
    key, health = reports[0]["blog.com"]
    assert health.healthy is False
    assert key == services[0].routing_key()


def test_checker_uses_fresh_dns_answer(dns: FakeDockerDNS) -> None:
    """A cached resolver answer must not hide a container that was just added."""

    async def scenario() -> tuple[Health, Health]:
        async with contextlib.AsyncExitStack() as stack:
            port = await servers_on_one_port(stack, {
                "127.0.0.2": respond("200 OK"), "127.0.0.3": respond("200 OK"),
            })
            dns.set_alias("shop", ["127.0.0.2"])
            resolver = Resolver(dns=(dns.host, dns.port), ttl=60)
            await resolver.resolve("shop")  # warm the routing cache
            dns.set_alias("shop", ["127.0.0.2", "127.0.0.3"])
            service = Service(name="s", host="shop.com", target=f"shop:{port}", project="p")
            checker = HealthChecker(resolver, lambda _r: None, timeout=1.0)
            first = await checker.check(service, Health())
            return first, await checker.check(service, first)

    first, second = asyncio.run(scenario())
    assert first.containers == {"127.0.0.2": True, "127.0.0.3": True}
    assert first.healthy is True
    assert second.changed_at == first.changed_at


def test_passed_names_the_containers_whose_probe_passed() -> None:
    health = Health(healthy=True, containers={"10.0.0.1": True, "10.0.0.2": False})
    assert passed(health) == ["10.0.0.1"]
    assert passed(Health(healthy=False)) == []
