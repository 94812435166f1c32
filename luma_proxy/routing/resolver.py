"""Alias -> container IPs, through Docker's DNS, with a short cache.

Routing to the IP rather than the alias string is what makes a keep-alive
client follow an alias switch: mitmproxy pools upstream sockets per client
connection keyed by (host, port), so a new IP means a new upstream connection.
The cache bounds both the DNS load and how long the old answer is used.

When DNS is slow or down, an alias that has an answer keeps it: a request
never waits more than ``STALE_WAIT`` for a refresh (RFC 8767's "client
response timer"), and while DNS is failing the last answer is served at once
and refreshed behind. There is no bound on how long a last answer is served:
the alternative is no container at all (a 503 for every request) while the
old IPs may well still work, and health checks and failed connects still take
dead IPs out. Only an alias never answered waits for DNS.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from dnslib import QTYPE, RCODE, DNSRecord

logger = logging.getLogger(__name__)

STALE_WAIT = 0.1
"""Seconds a request waits for an expired alias's refresh before it takes the last answer.

Docker's DNS answers in well under a millisecond, so a healthy refresh always
lands first (an alias switch is seen within one TTL); a DNS that stopped
answering costs a request this long, not the whole DNS timeout.
"""


def parse_dns_server(value: str) -> tuple[str, int]:
    """``HOST[:PORT]`` (port 53 by default, ``[v6]:port`` for IPv6)."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest.removeprefix(":") or "53"
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    else:
        host, port_text = value, "53"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"invalid DNS server {value!r}: expected IP[:PORT]") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"invalid DNS server {value!r}: bad port")
    return host, int(port_text)


@functools.lru_cache(maxsize=4096)
def ip_literal(alias: str) -> str | None:
    """``alias`` as an IP address, if it is one (a target may name a container's IP)."""
    try:
        return str(ipaddress.ip_address(alias))
    except ValueError:
        return None


class _DnsProtocol(asyncio.DatagramProtocol):
    def __init__(self, qid: int) -> None:
        self.qid = qid
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) >= 2 and int.from_bytes(data[:2]) == self.qid and not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


async def query_dns(server: tuple[str, int], name: str, timeout: float) -> list[str]:
    """A and AAAA records of ``name`` from one DNS server, asked side by side.

    Returns [] for NXDOMAIN, no records, or a name no DNS server can hold
    (an empty or over-long label); raises ``OSError``/``TimeoutError`` when
    the server does not answer or answers garbage. A truncated UDP answer is
    asked again over TCP (Docker's DNS truncates at 512 bytes: about 30
    replicas; it and every system resolver serve TCP too), never used as if
    it were whole: a partial answer would silently drop replicas.
    """
    if not _askable(name):
        return []
    replies = await asyncio.gather(_ask(server, name, "A", timeout),
                                   _ask(server, name, "AAAA", timeout),
                                   return_exceptions=True)
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
    ips: list[str] = []
    for reply in replies:
        assert isinstance(reply, DNSRecord)
        if reply.header.rcode not in (RCODE.NOERROR, RCODE.NXDOMAIN):
            raise OSError(f"DNS server answered {RCODE.get(reply.header.rcode)}")
        # NXDOMAIN for one type beside records of the other (a DNS that forwards
        # the type it lacks upstream) still means the records are the answer.
        ips += [str(rr.rdata) for rr in reply.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA)]
    return ips


def _askable(name: str) -> bool:
    """Whether ``name`` can be put in a DNS question (labels of 1..63 octets).

    The registry accepts aliases such as ``a..b`` that no DNS can hold; asking
    would raise ``UnicodeError`` into the request hook, a 500.
    """
    labels = name.rstrip(".").split(".")
    return all(0 < len(label.encode()) < 64 for label in labels) and len(name) < 254


def _parse_reply(data: bytes, qid: int) -> DNSRecord:
    try:
        reply = DNSRecord.parse(data)
    except Exception:  # dnslib raises several types for garbage
        raise OSError("malformed DNS reply") from None
    if reply.header.id != qid:
        raise OSError("DNS reply for another query")
    return reply


async def _ask(server: tuple[str, int], name: str, qtype: str, timeout: float) -> DNSRecord:
    loop = asyncio.get_running_loop()
    question = DNSRecord.question(name, qtype)
    question.header.id = qid = random.randrange(65536)
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _DnsProtocol(qid), remote_addr=server)
    try:
        transport.sendto(question.pack())
        reply = _parse_reply(await asyncio.wait_for(proto.answer, timeout), qid)
    finally:
        transport.close()
    if reply.header.tc:
        reply = await asyncio.wait_for(_ask_tcp(server, question), timeout)
    return reply


async def _ask_tcp(server: tuple[str, int], question: DNSRecord) -> DNSRecord:
    reader, writer = await asyncio.open_connection(*server)
    try:
        packet = question.pack()
        writer.write(len(packet).to_bytes(2) + packet)
        size = int.from_bytes(await reader.readexactly(2))
        data = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise OSError("DNS server closed the TCP connection") from None
    finally:
        writer.close()
    reply = _parse_reply(data, question.header.id)
    if reply.header.tc:
        raise OSError("DNS answer truncated over TCP too")
    return reply


async def query_system(name: str) -> list[str]:
    """Addresses from the system resolver (inside Docker: the embedded DNS).

    glibc asks A and AAAA in parallel and retries a truncated answer over TCP.
    """
    if not _askable(name):
        return []
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
            return []
        raise OSError(str(e)) from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(slots=True)
class _Entry:
    ips: tuple[str, ...]
    expires: float


@dataclass(slots=True)
class _Refresh:
    task: asyncio.Future[tuple[str, ...]]
    started: float = field(default_factory=time.monotonic)


Decision = Literal["fresh", "stale", "wait"]


def cache_decision(
    now: float, expires: float, dns_failing: bool, refresh_started: float | None,
    stale_wait: float = STALE_WAIT,
) -> Decision:
    """What to do with an alias's known answer: use it, use it and refresh behind, or wait.

    "wait" means wait for the refresh, at most ``stale_wait`` after it started;
    once DNS is known to fail, or a refresh is that late, waiting is pointless.
    """
    if now < expires:
        return "fresh"
    if dns_failing:
        return "stale"
    if refresh_started is not None and now - refresh_started >= stale_wait:
        return "stale"
    return "wait"


class Resolver:
    """Cached alias lookups; concurrent misses for one alias share one query."""

    def __init__(
        self, dns: tuple[str, int] | None = None, ttl: float = 1.0, timeout: float = 2.0,
        stale_wait: float = STALE_WAIT,
    ) -> None:
        self.dns = dns
        self.ttl = ttl
        self.timeout = timeout
        self.stale_wait = stale_wait
        self._cache: dict[str, _Entry] = {}
        self._pending: dict[str, _Refresh] = {}
        self._failing = False  # the last lookup failed: DNS is down for every alias

    def cached(self, alias: str, now: float | None = None) -> tuple[str, ...] | None:
        """The answer to route ``alias`` with now, if any: the hot path's sync fast lane.

        An IP literal is its own answer, never cached and never stale. An
        expired answer is returned (and refreshed behind) when DNS is failing
        or its refresh is already late; None means: ``await resolve()``.
        """
        entry = self._cache.get(alias)
        if entry is None:
            if (literal := ip_literal(alias)) is not None:
                return (literal,)
            return None
        refresh = self._pending.get(alias)
        decision = cache_decision(
            time.monotonic() if now is None else now, entry.expires, self._failing,
            refresh.started if refresh else None, self.stale_wait)
        if decision == "wait":
            return None
        if decision == "stale":
            self._refresh_behind(alias)
        return entry.ips

    def _refresh_behind(self, alias: str) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # a synchronous caller: asked on the next async use
            return
        self._refresh(alias)

    def _refresh(self, alias: str) -> _Refresh:
        """The alias's refresh under way, or a new one: one query in flight per alias."""
        refresh = self._pending.get(alias)
        if refresh is None:
            refresh = _Refresh(asyncio.ensure_future(self._lookup(alias)))
            self._pending[alias] = refresh

            def done(_f: object, refresh: _Refresh = refresh) -> None:
                if self._pending.get(alias) is refresh:
                    del self._pending[alias]

            refresh.task.add_done_callback(done)
        return refresh

    async def resolve(self, alias: str) -> tuple[str, ...]:
        """The alias's IPs: cached, else asked (at most ``stale_wait`` if it has an answer)."""
        if (literal := ip_literal(alias)) is not None:
            return (literal,)
        if (ips := self.cached(alias)) is not None:
            return ips
        refresh = self._refresh(alias)
        entry = self._cache.get(alias)
        if entry is None:  # never answered: nothing to serve but what DNS says
            return await asyncio.shield(refresh.task)
        left = self.stale_wait - (time.monotonic() - refresh.started)
        try:
            return await asyncio.wait_for(asyncio.shield(refresh.task), max(left, 0.0))
        except TimeoutError:  # DNS is slow: the last answer now, the refresh lands behind
            return entry.ips

    async def lookup_now(self, alias: str) -> tuple[str, ...]:
        """A fresh answer (health checks want the truth, not the cache)."""
        if (literal := ip_literal(alias)) is not None:
            return (literal,)
        return await self._lookup(alias)

    async def _lookup(self, alias: str) -> tuple[str, ...]:
        try:
            if self.dns is not None:
                ips = await query_dns(self.dns, alias, self.timeout)
            else:
                ips = await asyncio.wait_for(query_system(alias), self.timeout)
        except (OSError, TimeoutError) as e:
            stale = self._cache.get(alias)
            if stale is None or not self._failing:  # once per outage, not once per TTL
                logger.warning("DNS lookup of %s failed (%s); %s", alias, e or "timeout",
                               "serving the last answers" if stale else "no answer yet")
            self._failing = True
            if stale is None:
                return ()
            stale.expires = time.monotonic() + self.ttl  # asked again behind, once per TTL
            return stale.ips
        if self._failing:
            logger.warning("DNS answers again (%s)", alias)
            self._failing = False
        answer = tuple(ips)
        self._cache[alias] = _Entry(answer, time.monotonic() + self.ttl)
        return answer

    def expire_ip(self, ip: str) -> None:
        """A container at ``ip`` failed: answers holding it are asked again on next use.

        After a container dies its alias's answer has usually changed already;
        re-asking at once, instead of at the end of the TTL, stops routing more
        requests to it. The old answer stays as the fallback if DNS fails.
        """
        for entry in self._cache.values():
            if ip in entry.ips:
                entry.expires = 0.0

    def expire_all(self) -> None:
        """A container joined a network (Docker's event): every alias is asked again."""
        for entry in self._cache.values():
            entry.expires = 0.0

    def discard(self, aliases: Iterable[str]) -> None:
        """Drop the cache entries of aliases no longer routed (bounded memory)."""
        for alias in aliases:
            self._cache.pop(alias, None)
