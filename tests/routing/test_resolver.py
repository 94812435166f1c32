"""Unit tests for luma_proxy.routing.resolver against a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from luma_proxy.routing.resolver import (
    Resolver,
    cache_decision,
    ip_literal,
    parse_dns_server,
    query_dns,
    query_system,
)
from tests.e2e.docker_double import FakeDockerDNS


@pytest.fixture
def dns() -> Iterator[FakeDockerDNS]:
    with FakeDockerDNS() as server:
        yield server


def resolver(dns: FakeDockerDNS, ttl: float = 1.0, timeout: float = 1.0) -> Resolver:
    return Resolver(dns=(dns.host, dns.port), ttl=ttl, timeout=timeout)


def total_queries(dns: FakeDockerDNS) -> int:
    return sum(dns.queries.values())


# ---------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.11", ("127.0.0.11", 53)),
        (" 127.0.0.11 ", ("127.0.0.11", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:5353", ("::1", 5353)),
        ("[::1]", ("::1", 53)),
        ("::1", ("::1", 53)),
        ("fd00::53", ("fd00::53", 53)),
        ("10.0.0.2:65535", ("10.0.0.2", 65535)),
    ],
)
def test_parse_dns_server_ok(value: str, expected: tuple[str, int]) -> None:
    assert parse_dns_server(value) == expected


@pytest.mark.parametrize(
    "value",
    ["", "dns.local", "dns.local:53", "1.2.3.4:0", "1.2.3.4:99999", "1.2.3.4:x", "1.2.3.4:",
     "[::1]:x", "[::1]:0", "[nope]:53", "1.2.3:53", "[1.2.3.4]:x"],
)
def test_parse_dns_server_errors(value: str) -> None:
    with pytest.raises(ValueError, match="invalid DNS server"):
        parse_dns_server(value)


def test_ip_literal() -> None:
    assert ip_literal("10.0.0.1") == "10.0.0.1"
    assert ip_literal("2001:DB8::1") == "2001:db8::1"
    assert ip_literal("blog") is None
    assert ip_literal("10.0.0.1.nip.io") is None


# ---------------------------------------------------------------------------- resolving


def test_answers_a_and_aaaa(dns: FakeDockerDNS) -> None:
    dns.set_alias("blog", ["127.0.0.2", "127.0.0.3", "::1"])
    ips = asyncio.run(resolver(dns).resolve("blog"))
    assert sorted(ips) == ["127.0.0.2", "127.0.0.3", "::1"]
    assert len(ips) == 3


def test_nxdomain_is_empty(dns: FakeDockerDNS) -> None:
    dns.set_alias("blog", ["127.0.0.2"])
    r = resolver(dns)
    assert asyncio.run(r.resolve("nope")) == ()
    assert asyncio.run(query_dns((dns.host, dns.port), "nope", 1.0)) == []


def test_ttl_caching(dns: FakeDockerDNS) -> None:
    dns.set_alias("blog", ["127.0.0.2"])
    r = resolver(dns, ttl=0.3)

    async def scenario() -> None:
        assert await r.resolve("blog") == ("127.0.0.2",)
        queried = total_queries(dns)
        dns.set_alias("blog", ["127.0.0.3"])
        assert await r.resolve("blog") == ("127.0.0.2",)  # still cached
        assert r.cached("blog") == ("127.0.0.2",)
        assert total_queries(dns) == queried  # no query while fresh
        await asyncio.sleep(0.35)
        assert r.cached("blog") is None
        assert await r.resolve("blog") == ("127.0.0.3",)  # seen after the TTL
        assert total_queries(dns) > queried

    asyncio.run(scenario())


def test_ttl_zero_sees_every_change(dns: FakeDockerDNS) -> None:
    r = resolver(dns, ttl=0)

    async def scenario() -> None:
        for i in range(2, 8):
            dns.set_alias("blog", [f"127.0.0.{i}"])
            assert await r.resolve("blog") == (f"127.0.0.{i}",)
        dns.remove_alias("blog")
        assert await r.resolve("blog") == ()

    asyncio.run(scenario())


def test_lookup_now_bypasses_cache(dns: FakeDockerDNS) -> None:
    dns.set_alias("blog", ["127.0.0.2"])
    r = resolver(dns, ttl=60)

    async def scenario() -> None:
        assert await r.resolve("blog") == ("127.0.0.2",)
        dns.set_alias("blog", ["127.0.0.3"])
        assert await r.lookup_now("blog") == ("127.0.0.3",)
        assert await r.resolve("blog") == ("127.0.0.3",)  # and refreshed the cache

    asyncio.run(scenario())


def test_concurrent_resolves_share_one_query(dns: FakeDockerDNS) -> None:
    dns.set_alias("blog", ["127.0.0.2", "127.0.0.3"])
    dns.set_alias("shop", ["127.0.0.4"])
    r = resolver(dns, ttl=60)

    async def scenario() -> None:
        await r.resolve("shop")
        one_lookup = total_queries(dns)  # what a single resolve costs (A + AAAA)
        assert one_lookup >= 1
        dns.reset_queries()
        answers = await asyncio.gather(*(r.resolve("blog") for _ in range(50)))
        assert len(set(answers)) == 1
        assert sorted(answers[0]) == ["127.0.0.2", "127.0.0.3"]
        assert dns.queries["blog"] == one_lookup

    asyncio.run(scenario())


def test_cancelled_waiter_does_not_cancel_the_shared_query(dns: FakeDockerDNS) -> None:
    dns.set_alias("blog", ["127.0.0.2"])
    r = resolver(dns, ttl=60)

    async def scenario() -> None:
        first = asyncio.ensure_future(r.resolve("blog"))
        second = asyncio.ensure_future(r.resolve("blog"))
        await asyncio.sleep(0)
        first.cancel()
        assert await second == ("127.0.0.2",)

    asyncio.run(scenario())


def test_dns_down_keeps_last_answer(dns: FakeDockerDNS) -> None:
    dns.set_alias("blog", ["127.0.0.2"])
    r = resolver(dns, ttl=0, timeout=0.5)

    async def scenario() -> None:
        assert await r.resolve("blog") == ("127.0.0.2",)
        dns.stop()
        t0 = time.monotonic()
        assert await r.resolve("blog") == ("127.0.0.2",)
        assert await r.lookup_now("blog") == ("127.0.0.2",)
        assert await r.resolve("never-seen") == ()  # nothing to fall back on
        assert time.monotonic() - t0 < 3 * 0.5 + 1

    asyncio.run(scenario())


def test_unanswered_query_times_out(dns: FakeDockerDNS) -> None:
    """A server that swallows queries (a black hole) costs at most the timeout."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))
        r = Resolver(dns=hole.getsockname(), ttl=0, timeout=0.2)
        t0 = time.monotonic()
        assert asyncio.run(r.resolve("blog")) == ()
        assert time.monotonic() - t0 < 1.5


def test_ip_literal_shortcut(dns: FakeDockerDNS) -> None:
    r = resolver(dns)

    async def scenario() -> None:
        assert await r.resolve("10.1.2.3") == ("10.1.2.3",)
        assert await r.resolve("2001:DB8::1") == ("2001:db8::1",)
        assert await r.lookup_now("10.1.2.3") == ("10.1.2.3",)

    asyncio.run(scenario())
    # The hot path's sync lane answers literals too, also after expire_ip.
    r.expire_ip("10.1.2.3")
    assert r.cached("10.1.2.3") == ("10.1.2.3",) and r.cached("app") is None
    assert total_queries(dns) == 0
    # Works without any DNS server at all.
    assert asyncio.run(Resolver(dns=("127.0.0.1", 9), timeout=0.1).resolve("::1")) == ("::1",)


def test_discard(dns: FakeDockerDNS) -> None:
    dns.set_alias("blog", ["127.0.0.2"])
    dns.set_alias("shop", ["127.0.0.3"])
    r = resolver(dns, ttl=60)

    async def scenario() -> None:
        await r.resolve("blog")
        await r.resolve("shop")

    asyncio.run(scenario())
    assert r.cached("blog") == ("127.0.0.2",) and r.cached("shop") == ("127.0.0.3",)
    r.discard(["shop", "never-resolved"])
    assert r.cached("blog") == ("127.0.0.2",)
    assert r.cached("shop") is None
    r.discard({"blog"})
    assert r.cached("blog") is None


def test_cached_respects_now(dns: FakeDockerDNS) -> None:
    dns.set_alias("blog", ["127.0.0.2"])
    r = resolver(dns, ttl=10)
    asyncio.run(r.resolve("blog"))
    assert r.cached("blog", now=time.monotonic() + 9) == ("127.0.0.2",)
    assert r.cached("blog", now=time.monotonic() + 11) is None
    assert r.cached("other") is None


def test_expire_ip_asks_again_before_the_ttl(dns: FakeDockerDNS) -> None:
    dns.set_alias("blog", ["127.0.0.2", "127.0.0.3"])
    dns.set_alias("shop", ["127.0.0.4"])
    r = resolver(dns, ttl=60)

    async def scenario() -> None:
        await r.resolve("blog")
        await r.resolve("shop")
        dns.set_alias("blog", ["127.0.0.3"])  # .2 died and left the alias
        r.expire_ip("127.0.0.2")
        assert r.cached("blog") is None  # asked again on next use, not in 60 s
        assert r.cached("shop") == ("127.0.0.4",)  # other aliases keep their answer
        assert await r.resolve("blog") == ("127.0.0.3",)

    asyncio.run(scenario())


# ------------------------------------------------------- a DNS server that misbehaves


def test_truncated_answer_is_asked_again_over_tcp(dns: FakeDockerDNS) -> None:
    """Docker cuts a UDP answer past 512 bytes: the cut one would drop replicas."""
    ips = [f"127.0.0.{i}" for i in range(2, 7)]
    dns.set_alias("blog", ips)
    dns.fault = "truncate"
    assert sorted(asyncio.run(query_dns((dns.host, dns.port), "blog", 1.0))) == ips
    assert sorted(asyncio.run(resolver(dns).resolve("blog"))) == ips


def test_a_and_aaaa_are_in_flight_at_once(dns: FakeDockerDNS) -> None:
    """Both questions reach the server before either times out: one wait, not two."""
    dns.set_alias("blog", ["127.0.0.2"])
    dns.fault = "silent"
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        asyncio.run(query_dns((dns.host, dns.port), "blog", 0.3))
    assert time.monotonic() - t0 < 0.55
    assert dns.queries["blog"] == 2


def test_nxdomain_for_aaaa_keeps_the_a_records(dns: FakeDockerDNS) -> None:
    dns.set_alias("blog", ["127.0.0.2"])
    dns.fault = "aaaa_nxdomain"
    assert asyncio.run(resolver(dns).resolve("blog")) == ("127.0.0.2",)
    assert asyncio.run(resolver(dns).resolve("nope")) == ()


def test_malformed_reply_is_a_failed_lookup_not_an_exception(dns: FakeDockerDNS) -> None:
    dns.set_alias("blog", ["127.0.0.2"])
    r = resolver(dns, ttl=0, timeout=0.5)

    async def scenario() -> None:
        assert await r.resolve("blog") == ("127.0.0.2",)
        dns.fault = "garbage"
        with pytest.raises(OSError, match="malformed"):
            await query_dns((dns.host, dns.port), "blog", 0.5)
        assert await r.resolve("blog") == ("127.0.0.2",)  # the last good answer
        assert await r.lookup_now("blog") == ("127.0.0.2",)
        assert await r.resolve("never-seen") == ()  # the normal "no container" path

    asyncio.run(scenario())


@pytest.mark.parametrize("alias", ["a..b", "a" * 64, "x." + "b" * 64 + ".y"])
def test_an_alias_no_dns_can_hold_is_no_container(dns: FakeDockerDNS, alias: str) -> None:
    """The registry accepts such aliases; asking must not raise into the request hook."""
    assert asyncio.run(resolver(dns).resolve(alias)) == ()
    assert asyncio.run(Resolver(dns=None, timeout=1.0).resolve(alias)) == ()


def test_during_an_outage_known_answers_are_served_at_once(dns: FakeDockerDNS) -> None:
    """No alias with an answer waits the DNS timeout, not even the first one to expire."""
    aliases = {f"app{i}": [f"127.0.0.{i + 2}"] for i in range(3)}
    for alias, ips in aliases.items():
        dns.set_alias(alias, ips)
    r = resolver(dns, ttl=0.05, timeout=1.0)

    async def scenario() -> None:
        for alias, ips in aliases.items():
            assert await r.resolve(alias) == tuple(ips)
        dns.fault = "silent"
        dns.reset_queries()
        for _ in range(10):
            await asyncio.sleep(0.06)  # every answer expired
            for alias, ips in aliases.items():
                t0 = time.monotonic()
                assert await r.resolve(alias) == tuple(ips)
                assert time.monotonic() - t0 < 0.3  # STALE_WAIT at most, never the timeout
        assert await r.resolve("never-seen") == ()  # only an alias never answered waits
        for alias in aliases:  # one refresh in flight per alias (A + AAAA), not one a request
            assert dns.queries[alias] <= 2 * 2
        dns.fault = None  # back: the refreshes behind pick up the truth
        dns.set_alias("app0", ["127.0.0.9"])
        deadline = time.monotonic() + 3
        while await r.resolve("app0") != ("127.0.0.9",):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)

    asyncio.run(scenario())


def test_outage_answers_come_from_the_sync_lane(dns: FakeDockerDNS) -> None:
    """Once DNS is known down, the hot path's sync lane serves every known alias."""
    dns.set_alias("blog", ["127.0.0.2"])
    dns.set_alias("shop", ["127.0.0.3"])
    r = resolver(dns, ttl=0.05, timeout=0.2)

    async def scenario() -> None:
        await r.resolve("blog")
        await r.resolve("shop")
        dns.fault = "silent"
        await asyncio.sleep(0.06)
        assert r.cached("blog") is None  # not yet known down: resolve() waits a little
        assert await r.lookup_now("blog") == ("127.0.0.2",)  # a failed lookup: DNS is down
        await asyncio.sleep(0.06)
        assert r.cached("blog") == ("127.0.0.2",)
        assert r.cached("shop") == ("127.0.0.3",)  # every alias, not just the one that failed

    asyncio.run(scenario())


def test_healthy_dns_is_waited_for_after_the_ttl(dns: FakeDockerDNS) -> None:
    """Serving stale is for a failing DNS: a switch is still seen within one TTL."""
    dns.set_alias("blog", ["127.0.0.2"])
    r = resolver(dns, ttl=0.05)

    async def scenario() -> None:
        await r.resolve("blog")
        dns.set_alias("blog", ["127.0.0.3"])
        await asyncio.sleep(0.06)
        assert r.cached("blog") is None
        assert await r.resolve("blog") == ("127.0.0.3",)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("now", "expires", "failing", "started", "expected"),
    [
        (1.0, 2.0, False, None, "fresh"),
        (1.0, 2.0, True, None, "fresh"),
        (3.0, 2.0, False, None, "wait"),  # expired, DNS fine: ask and wait a little
        (3.0, 2.0, False, 2.95, "wait"),  # a refresh just started
        (3.0, 2.0, False, 2.5, "stale"),  # a refresh that is late
        (3.0, 2.0, True, None, "stale"),  # DNS failing: at once, refreshed behind
    ],
)
def test_cache_decision(now: float, expires: float, failing: bool, started: float | None,
                        expected: str) -> None:
    assert cache_decision(now, expires, failing, started, stale_wait=0.1) == expected


# ------------------------------------------------------------ the production path


def test_system_resolver_path_answers_from_etc_hosts() -> None:
    """No ``luma_dns``: the path the proxy takes inside Docker (getaddrinfo), for real."""
    r = Resolver(dns=None, ttl=60, timeout=2.0)

    async def scenario() -> None:
        assert "127.0.0.1" in await query_system("localhost")
        ips = await r.resolve("localhost")
        assert "127.0.0.1" in ips
        assert r.cached("localhost") == ips
        assert await r.lookup_now("LOCALHOST") == ips

    asyncio.run(scenario())
