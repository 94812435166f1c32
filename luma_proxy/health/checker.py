"""Health checks: ``GET http://<alias>:<port><health_path>``, per alias and per container.

The probe is a deliberately tiny HTTP/1.1 client: one request, a hard
deadline, no redirects followed, at most a few KiB of response read. A hostile
or broken health endpoint can only make its own service unhealthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from luma_proxy.models import SET_BY_HAND, UNCHECKED, Health, Service, now
from luma_proxy.routing.resolver import Resolver

MAX_HEAD = 16 * 1024
MAX_BODY = 4 * 1024
# A probe's errors where the container did answer, badly.
HEAD_TOO_LARGE = "response headers too large"
MALFORMED = "malformed HTTP response"


@dataclass(frozen=True, slots=True)
class Probe:
    ok: bool
    error: str | None = None


def judge_status(status: int) -> Probe:
    """Any 2xx is healthy; a redirect is not followed (it could lead off the alias)."""
    if 200 <= status < 300:
        return Probe(True)
    return Probe(False, f"HTTP {status}")


def parse_status_line(line: bytes) -> int:
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError("malformed status line")
    return int(parts[1])


async def probe(ip: str, port: int, host: str, path: str, timeout: float) -> Probe:
    """One health request to ``ip:port`` with ``Host: host``; never raises."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(ip, port, limit=MAX_HEAD)
            try:
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: luma-proxy-health\r\n"
                    "Accept: */*\r\nConnection: close\r\n\r\n".encode()
                )
                await writer.drain()
                status = parse_status_line(await reader.readline())
                # Read (and bound) the rest of the head and a little body, then drop it.
                await reader.readuntil(b"\r\n\r\n")
                with contextlib.suppress(asyncio.IncompleteReadError):
                    await reader.read(MAX_BODY)
                return judge_status(status)
            finally:
                writer.close()
    except TimeoutError:
        return Probe(False, f"timed out after {timeout:g}s")
    except asyncio.LimitOverrunError:
        return Probe(False, HEAD_TOO_LARGE)
    except (asyncio.IncompleteReadError, ValueError):
        return Probe(False, MALFORMED)
    except OSError as e:
        return Probe(False, e.strerror or type(e).__name__)


def combine(
    previous: Health, alias_probe: Probe, containers: dict[str, Probe], at: datetime | None = None
) -> Health:
    """A service's health from its alias probe and its per-container probes.

    The service is healthy when the alias answers 2xx or any container does: one
    dead replica must not take the service out, only itself.
    """
    at = at or now()
    healthy = alias_probe.ok or any(p.ok for p in containers.values())
    if healthy:
        error = None
    elif alias_probe.error:
        error = alias_probe.error
    elif not containers:
        error = "no containers behind the alias"
    else:
        error = next(p.error for p in containers.values() if p.error)
    return Health(
        healthy=healthy,
        checked_at=at,
        last_error=error,
        changed_at=at if previous.healthy is not healthy else previous.changed_at,
        containers={ip: p.ok for ip, p in containers.items()},
    )


def passed(health: Health) -> list[str]:
    """Container IPs whose probe passed: a fresh pass outranks a passive ejection."""
    return [ip for ip, ok in health.containers.items() if ok]


# Failures where a container answered (or an operator decided): the service is
# unhealthy and says so, 503 at once. Any other failure means no container could
# be reached (none behind the alias, refused, timed out): requests are held.
ANSWERED = ("HTTP ", MALFORMED, HEAD_TOO_LARGE, SET_BY_HAND)  # "HTTP ": judge_status


def unreachable(health: Health | None) -> bool:
    """Unhealthy only because no container could be reached (a gap, a restart)."""
    if health is None or health.healthy is not False or health.last_error is None:
        return False
    return not health.last_error.startswith(ANSWERED)


class HealthChecker:
    """Checks every service each interval, and new or changed ones at once.

    Results go to ``report`` (the addon updates its view and the health file);
    the checker itself keeps only which routing key it last checked per host.
    """

    def __init__(
        self,
        resolver: Resolver,
        report: Callable[[dict[str, tuple[tuple, Health]]], None],
        timeout: float = 5.0,
        concurrency: int = 64,
    ) -> None:
        self.resolver = resolver
        self.report = report
        self.timeout = timeout
        self.concurrency = concurrency
        self._limit = asyncio.Semaphore(concurrency)
        self._checked: dict[str, tuple] = {}

    async def check(self, service: Service, previous: Health) -> Health:
        """Probe the alias and each container IP behind it, concurrently."""
        return combine(previous, *await self.probe_target(service))

    async def probe_target(self, service: Service) -> tuple[Probe, dict[str, Probe]]:
        """The alias's probe and each container's: all a service's health is made of.

        The probes name the alias, never a public host, so every route of one
        target and health path (several hosts, several path prefixes) shares them.
        """
        async with self._limit:
            alias, port = service.alias, service.port
            ips = await self.resolver.lookup_now(alias)
            host = f"{alias}:{port}"
            path = service.health_path
            probes = await asyncio.gather(
                self._probe_alias(ips, port, host, path),
                *(probe(ip, port, host, path, self.timeout) for ip in ips),
            )
            return probes[0], dict(zip(ips, probes[1:], strict=True))

    async def _probe_alias(self, ips: tuple[str, ...], port: int, host: str, path: str) -> Probe:
        """The alias as Docker's DNS would hand it out: one of its IPs, at random."""
        if not ips:
            return Probe(False, "alias does not resolve")
        return await probe(random.choice(ips), port, host, path, self.timeout)

    async def check_all(self, services: Iterable[Service], health: dict[str, Health]) -> None:
        """Check ``services``, at most ``concurrency`` at a time, then report them together.

        A fixed set of workers pulls from one iterator: 10,000 services never mean
        10,000 tasks created in one tick of the event loop (a stall of ~0.1 s or more).
        """
        groups: dict[tuple[str, str], list[Service]] = {}
        for service in services:  # one probe per target and health path, not per route
            groups.setdefault((service.target, service.health_path), []).append(service)
        pending = iter(list(groups.values()))
        report: dict[str, tuple[tuple, Health]] = {}

        async def worker() -> None:
            for group in pending:
                probes = await self.probe_target(group[0])
                for service in group:
                    key = service.routing_key()
                    result = combine(health.get(service.key, UNCHECKED), *probes)
                    self._checked[service.key] = key
                    report[service.key] = (key, result)

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        if report:
            self.report(report)

    def unchecked(self, services: Iterable[Service]) -> list[Service]:
        """Services never checked under their current routing key (new or changed)."""
        return [s for s in services if self._checked.get(s.key) != s.routing_key()]

    def discard(self, hosts: Iterable[str]) -> None:
        """Forget these hosts (removed services)."""
        for host in hosts:
            self._checked.pop(host, None)
