"""Unit tests for luma_proxy.resolver against a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from luma_proxy.resolver import Resolver, ip_literal, parse_dns_server, query_dns
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
class OddDNS:
    """A DNS server on loopback whose UDP answers a test shapes (delay, TC bit, garbage)."""

    def __init__(self, ips: list[str], delay: float = 0.0, truncate: bool = False,
                 garbage: bool = False) -> None:
        import socket
        import threading

        self.ips, self.delay, self.truncate, self.garbage = ips, delay, truncate, garbage
        self.silent = False  # True: swallow every query (a DNS that stopped answering)
        # One port for UDP and TCP: the UDP port the kernel picks may be taken on TCP
        # (another test's socket), so pick again until both bind.
        for _ in range(100):
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind(("127.0.0.1", 0))
            self.address = self.udp.getsockname()
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                self.tcp.bind(self.address)
                break
            except OSError:
                self.tcp.close()
                self.udp.close()
        self.tcp.listen()
        self.tcp_queries = 0
        for target in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    def _answer(self, data: bytes, full: bool) -> bytes:
        from dnslib import QTYPE, RR, A, DNSRecord

        q = DNSRecord.parse(data)
        reply = q.reply()
        if q.q.qtype == QTYPE.A:
            for ip in self.ips if full else self.ips[:1]:
                reply.add_answer(RR(q.q.qname, QTYPE.A, rdata=A(ip), ttl=0))
        if not full:
            reply.header.tc = 1
        return reply.pack()

    def _serve_udp(self) -> None:
        import threading

        while True:
            try:
                data, peer = self.udp.recvfrom(4096)
            except OSError:
                return

            if self.silent:
                continue

            def answer(data: bytes = data, peer: object = peer) -> None:
                time.sleep(self.delay)
                if self.garbage:  # the right id, then nonsense
                    out = data[:2] + b"\xff\xff\xff\xff"
                else:
                    out = self._answer(data, not self.truncate)
                self.udp.sendto(out, peer)

            threading.Thread(target=answer, daemon=True).start()

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                self.tcp_queries += 1
                size = int.from_bytes(conn.recv(2))
                out = self._answer(conn.recv(size), True)
                conn.sendall(len(out).to_bytes(2) + out)

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


def test_truncated_answer_is_asked_again_over_tcp() -> None:
    ips = [f"10.0.0.{i}" for i in range(1, 6)]
    server = OddDNS(ips, truncate=True)
    try:
        assert sorted(asyncio.run(query_dns(server.address, "blog", 1.0))) == ips
        assert server.tcp_queries >= 1
    finally:
        server.close()


def test_a_and_aaaa_are_asked_side_by_side() -> None:
    server = OddDNS(["10.0.0.1"], delay=0.4)
    try:
        t0 = time.monotonic()
        assert asyncio.run(query_dns(server.address, "blog", 2.0)) == ["10.0.0.1"]
        assert time.monotonic() - t0 < 0.75  # one delay, not two in a row
    finally:
        server.close()


def test_malformed_reply_is_a_failed_lookup_not_an_exception() -> None:
    server = OddDNS(["10.0.0.1"], garbage=True)
    try:
        with pytest.raises(OSError, match="malformed"):
            asyncio.run(query_dns(server.address, "blog", 1.0))
        assert asyncio.run(Resolver(dns=server.address, ttl=0, timeout=0.5).resolve("x")) == ()
    finally:
        server.close()


def test_during_an_outage_the_last_answer_is_served_at_once() -> None:
    """A DNS that stops answering costs one timeout, not one per TTL per alias."""
    server = OddDNS(["10.0.0.2"])
    r = Resolver(dns=server.address, ttl=0.05, timeout=0.5)

    async def scenario() -> None:
        assert await r.resolve("blog") == ("10.0.0.2",)
        server.silent = True
        await asyncio.sleep(0.1)
        assert await r.resolve("blog") == ("10.0.0.2",)  # this one waits out the timeout
        for _ in range(5):  # ... later ones do not, TTL after TTL
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            assert await r.resolve("blog") == ("10.0.0.2",)
            assert r.cached("blog") == ("10.0.0.2",)
            assert time.monotonic() - t0 < 0.25
        server.silent = False  # back: the refresh behind picks up the truth
        server.ips = ["10.0.0.3"]
        await asyncio.sleep(0.6)  # the refresh under way when it came back times out
        await r.resolve("blog")  # starts a refresh behind
        await asyncio.sleep(0.2)
        assert await r.resolve("blog") == ("10.0.0.3",)

    try:
        asyncio.run(scenario())
    finally:
        server.close()
