"""Alias -> container IPs, through Docker's DNS, with a short cache.

Routing to the IP rather than the alias string is what makes a keep-alive
client follow an alias switch: mitmproxy pools upstream sockets per client
connection keyed by (host, port), so a new IP means a new upstream connection.
The cache bounds both the DNS load and how long the old answer is used.
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
from dataclasses import dataclass

from dnslib import QTYPE, RCODE, DNSRecord

logger = logging.getLogger(__name__)


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

    Returns [] for NXDOMAIN or no records; raises ``OSError``/``TimeoutError``
    when the server does not answer or answers garbage. A truncated UDP
    answer is asked again over TCP (Docker's DNS truncates at 512 bytes:
    about 30 replicas), never used as if it were whole.
    """
    replies = await asyncio.gather(_ask(server, name, "A", timeout),
                                   _ask(server, name, "AAAA", timeout),
                                   return_exceptions=True)
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
    ips: list[str] = []
    for reply in replies:
        assert isinstance(reply, DNSRecord)
        if reply.header.rcode == RCODE.NXDOMAIN:
            return []
        if reply.header.rcode != RCODE.NOERROR:
            raise OSError(f"DNS server answered {RCODE.get(reply.header.rcode)}")
        ips += [str(rr.rdata) for rr in reply.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA)]
    return ips


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
    return _parse_reply(data, question.header.id)


async def query_system(name: str) -> list[str]:
    """Addresses from the system resolver (inside Docker: the embedded DNS)."""
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
    failing: bool = False  # the last lookup failed: serve this at once, refresh behind


class Resolver:
    """Cached alias lookups; concurrent misses for one alias share one query."""

    def __init__(
        self, dns: tuple[str, int] | None = None, ttl: float = 1.0, timeout: float = 2.0
    ) -> None:
        self.dns = dns
        self.ttl = ttl
        self.timeout = timeout
        self._cache: dict[str, _Entry] = {}
        self._pending: dict[str, asyncio.Future[tuple[str, ...]]] = {}

    def cached(self, alias: str, now: float | None = None) -> tuple[str, ...] | None:
        """The fresh answer for ``alias``, if any: the hot path's sync fast lane.

        An IP literal is its own answer, never cached and never stale.
        """
        entry = self._cache.get(alias)
        if entry is not None:
            if entry.expires > (time.monotonic() if now is None else now):
                return entry.ips
            if entry.failing:  # DNS is down: the last answer now, a fresh one when it can
                self._refresh_behind(alias)
                return entry.ips
        if (literal := ip_literal(alias)) is not None:
            return (literal,)
        return None

    def _refresh_behind(self, alias: str) -> None:
        if alias not in self._pending:
            try:
                pending = asyncio.ensure_future(self._lookup(alias))
            except RuntimeError:  # no running loop (a synchronous caller): ask later
                return
            self._pending[alias] = pending
            pending.add_done_callback(lambda _f: self._pending.pop(alias, None))

    async def resolve(self, alias: str) -> tuple[str, ...]:
        if (literal := ip_literal(alias)) is not None:
            return (literal,)
        if (ips := self.cached(alias)) is not None:
            return ips
        pending = self._pending.get(alias)
        if pending is None:
            pending = asyncio.ensure_future(self._lookup(alias))
            self._pending[alias] = pending
            pending.add_done_callback(lambda _f: self._pending.pop(alias, None))
        return await asyncio.shield(pending)

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
            if stale is None or not stale.failing:  # once per outage, not once per TTL
                logger.warning("DNS lookup of %s failed (%s); %s", alias, e or "timeout",
                               "serving the last answer" if stale else "no answer yet")
            if stale is None:
                return ()
            stale.expires = time.monotonic() + self.ttl
            stale.failing = True
            return stale.ips
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
