"""The routing decision for one request: pure, given the in-memory view.

Kept apart from the addon so that the rules (which host, which answer) can be
tested without mitmproxy's machinery and read in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from luma_proxy.models import Health, Service, normalize_host

_MAX_CACHED_HOSTS = 4096


@dataclass(frozen=True, slots=True)
class Reject:
    """Answer the client ourselves with this status."""

    status: int
    reason: str


class HostTable:
    """Host header -> service, with the header's canonical form memoised.

    Normalising (IDNA, case, port, trailing dot) costs more than a dict lookup,
    and clients repeat the same few Host strings, so the canonical form of each
    raw string is cached (bounded: hostile clients can send endless variants).
    """

    def __init__(self, services: dict[str, Service] | None = None) -> None:
        self.services: dict[str, Service] = {}
        self._canonical: dict[str, str | None] = {}
        self._targets: dict[str, tuple[Service, tuple[str, int]]] = {}
        self._aliases: dict[str, int] = {}  # alias -> number of services routed to it
        if services:
            self.replace(services)

    def replace(self, services: dict[str, Service]) -> set[str]:
        """Swap in a whole new set; returns the aliases no service is routed to any more."""
        before = self.services
        changed = {h: s for h, s in services.items() if before.get(h) is not s}
        return self.update(services, changed, [h for h in before if h not in services])

    def update(self, services: dict[str, Service], changed: dict[str, Service],
               removed: list[str]) -> set[str]:
        """Swap in ``services``, which differ from the current ones only in ``changed`` and
        ``removed``; the work is per changed host, not per service. ``services`` is
        taken as it is (and never modified), so a reader may hold on to the old dict.

        Returns the aliases no service is routed to any more.
        """
        before, aliases = self.services, self._aliases
        unused = set()
        for host in (*changed, *removed):
            old = before.get(host)
            if old is not None:
                alias = self.target(old)[0]
                count = aliases.get(alias, 0) - 1
                if count > 0:
                    aliases[alias] = count
                else:
                    aliases.pop(alias, None)
                    unused.add(alias)
            self._targets.pop(host, None)
        self.services = services
        for service in changed.values():
            alias = self.target(service)[0]
            aliases[alias] = aliases.get(alias, 0) + 1
            unused.discard(alias)
        return unused

    def routed_aliases(self) -> set[str]:
        return set(self._aliases)

    def target(self, service: Service) -> tuple[str, int]:
        """``(service.alias, service.port)``, split once per service and view, not per request.

        ``service.target`` was validated into ``alias:port`` / ``[v6]:port`` form, so a
        split gives what ``parse_target`` would, at a fraction of the cost (10,000 services).
        """
        cached = self._targets.get(service.host)
        if cached is not None and cached[0] is service:  # a reload keeps unchanged services
            return cached[1]
        alias, _, port = service.target.rpartition(":")
        if alias.startswith("["):
            alias = alias[1:-1]
        target = (alias, int(port))
        self._targets[service.host] = (service, target)
        return target

    def canonical(self, raw: str) -> str | None:
        try:
            return self._canonical[raw]
        except KeyError:
            pass
        try:
            host: str | None = normalize_host(raw)
        except ValueError:
            host = None
        if len(self._canonical) >= _MAX_CACHED_HOSTS:
            self._canonical.clear()
        self._canonical[raw] = host
        return host

    def lookup(self, raw_host: str | None) -> Service | Reject:
        if not raw_host:
            return Reject(400, "missing Host header")
        host = self.canonical(raw_host)
        if host is None:
            return Reject(400, "invalid Host header")
        service = self.services.get(host)
        if service is None:
            return Reject(404, "unknown host")
        return service


def admit(health: Health | None) -> Reject | None:
    """503 while the last check said unhealthy; unchecked services are routed."""
    if health is not None and health.healthy is False:
        return Reject(503, "service unhealthy")
    return None
