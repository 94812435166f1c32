"""The routing decision for one request: pure, given the in-memory view.

Kept apart from the addon so that the rules (which host, which answer) can be
tested without mitmproxy's machinery and read in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from luma_proxy.models import Health, Service, normalize_host

_MAX_CACHED_HOSTS = 4096
_UNRESERVED = re.compile(r"%([0-9A-Fa-f]{2})")


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
        # host (or ``*.parent``) -> its routes, longest path prefix first
        self._routes: dict[str, list[Service]] = {}
        # host (or ``*.parent``) -> the route of its shortest prefix: what HTTPS reads
        # (one certificate per host, however many path prefixes share it). Replaced,
        # never modified in place, so a thread may read the one it was given.
        self.hosts: dict[str, Service] = {}
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
        touched = {s.host for s in changed.values()}
        for host in (*changed, *removed):
            old = before.get(host)
            if old is not None:
                touched.add(old.host)
                self._unindex(old)
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
            routes = self._routes.setdefault(service.host, [])
            routes.append(service)
            routes.sort(key=lambda s: len(s.path_prefix), reverse=True)
        if touched:
            hosts = dict(self.hosts)
            for host in touched:
                routes = self._routes.get(host)
                if routes:
                    hosts[host] = routes[-1]
                else:
                    hosts.pop(host, None)
            self.hosts = hosts
        return unused

    def route_of_host(self, host: str) -> Service | None:
        """The route HTTPS goes by for a canonical host: its own, else its wildcard's."""
        found = self.hosts.get(host)
        if found is None:
            _label, dot, parent = host.partition(".")
            found = self.hosts.get("*." + parent) if dot else None
        return found

    def _unindex(self, service: Service) -> None:
        routes = self._routes.get(service.host, [])
        for i, route in enumerate(routes):
            if route.key == service.key:
                del routes[i]
                break
        if not routes:
            self._routes.pop(service.host, None)

    def routed_aliases(self) -> set[str]:
        return set(self._aliases)

    def target(self, service: Service) -> tuple[str, int]:
        """``(service.alias, service.port)``, split once per service and view, not per request.

        ``service.target`` was validated into ``alias:port`` / ``[v6]:port`` form, so a
        split gives what ``parse_target`` would, at a fraction of the cost (10,000 services).
        """
        cached = self._targets.get(service.key)
        if cached is not None and cached[0] is service:  # a reload keeps unchanged services
            return cached[1]
        alias, _, port = service.target.rpartition(":")
        if alias.startswith("["):
            alias = alias[1:-1]
        target = (alias, int(port))
        self._targets[service.key] = (service, target)
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

    def lookup(self, raw_host: str | None, path: str | bytes = "/") -> Service | Reject:
        """The route of a request: its exact host, else the wildcard one label up; of
        that host's routes, the longest path prefix ``path`` falls under.

        ``path`` as sent (``routing_path`` spells it once, and only for a host that has
        path-prefix routes: most have one route, and their requests skip it).
        """
        if not raw_host:
            return Reject(400, "missing Host header")
        host = self.canonical(raw_host)
        if host is None:
            return Reject(400, "invalid Host header")
        routes = self._routes.get(host)
        found = choose(routes, path) if routes is not None else None
        if found is None:
            _label, dot, parent = host.partition(".")
            wild = self._routes.get("*." + parent) if dot else None
            found = choose(wild, path) if wild is not None else None
        return found if found is not None else Reject(404, "unknown host")


def choose(routes: list[Service], path: str | bytes) -> Service | None:
    """Of one host's routes (longest prefix first), the one ``path`` falls under."""
    if not routes[0].path_prefix:  # no prefix at all: the host's one route
        return routes[0]
    if isinstance(path, bytes):
        path = path.decode("utf-8", "surrogateescape")  # as mitmproxy's ``Request.path``
    return match_prefix(routes, routing_path(path))


def match_prefix(routes: list[Service], path: str) -> Service | None:
    """The first route (longest prefix first) whose prefix ``path`` is under.

    ``/api`` takes ``/api``, ``/api/...`` and ``/api?...``, never ``/apix``.
    """
    for service in routes:
        prefix = service.path_prefix
        if not prefix or (path.startswith(prefix) and (
                len(path) == len(prefix) or path[len(prefix)] in "/?")):
            return service
    return None


def _unreserved(m: re.Match[str]) -> str:
    """An escape of an unreserved character (ASCII letters, digits, ``-._~``) decoded."""
    c = chr(int(m.group(1), 16))
    return c if c.isascii() and (c.isalnum() or c in "-._~") else m.group(0)


def routing_path(raw: str) -> str:
    """The path a route is chosen by: unreserved %-escapes decoded and dot segments
    removed (RFC 3986 6.2.2), so ``/%61pi/`` and ``/x/../api`` choose what ``/api`` does.
    """
    path, sep, query = raw.partition("?")
    if "%" in path:
        path = _UNRESERVED.sub(_unreserved, path)
    if "/." in path:
        out: list[str] = []
        for segment in path.split("/")[1:]:
            if segment == "..":
                if out:
                    out.pop()
            elif segment != ".":
                out.append(segment)
        trailing = path.endswith(("/.", "/.."))
        path = "/" + "/".join(out) + ("/" if trailing and out else "")
    return path + sep + query


def strip_prefix(path: str, prefix: str) -> str:
    """``/api/users?x`` less ``/api`` is ``/users?x``; ``/api`` and ``/api?x`` become ``/``."""
    rest = path[len(prefix):] if path.startswith(prefix) else path
    return rest if rest.startswith("/") else "/" + rest


def canonical_target(service: Service, raw_host: str | None) -> str | None:
    """The host to redirect to: the service's canonical host, unless asked for already."""
    canonical = service.canonical_host
    if not canonical or not raw_host:
        return None
    try:
        asked = normalize_host(raw_host)
    except ValueError:
        return None
    return None if asked == canonical else canonical


def admit(health: Health | None) -> Reject | None:
    """503 while the last check said unhealthy; unchecked services are routed."""
    if health is not None and health.healthy is False:
        return Reject(503, "service unhealthy")
    return None
