"""The mitmproxy addon: Host -> service -> alias -> container IP.

The hot path (``requestheaders``) only reads the in-memory view. Background
tasks keep that view fresh: the reloader follows the state file (routes) and
the health file (observed health), the health checker probes every service.
Works the same under ``mitmdump -s``, ``mitmweb -s`` and ``luma-proxy run``.

A reload is incremental: the files are read and parsed in a thread, by readers
that keep the objects of unchanged entries, and what changed is worked out
there by identity; the event loop then only swaps the new routes dict in and
touches the services (and health entries) that changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy import server_hooks

from . import engine_patches, pages
from .balancer import Balancer
from .dockerevents import EngineEvents
from .environ import env_float
from .flowinfo import CLIENT_GONE, MULTIPLEXED, header_values, host_header, valid_h2_target
from .forwarding import Network, asked_websocket, parse_trusted_proxies, set_forwarding_headers
from .health import HealthChecker, passed, probe, unreachable
from .leadership import Leadership
from .models import Health, HealthEntry, Service, Settings, State
from .proving import Prover
from .registry import (
    IMPORT_SUFFIX,
    HealthReader,
    RegistryError,
    StateReader,
    Store,
    default_state_path,
)
from .resolver import Resolver, parse_dns_server
from .router import HostTable, Reject, admit
from .served import Beacon
from .streaming import stream_counted, stream_request, stream_response

logger = logging.getLogger("luma_proxy")

RELOAD_POLL = 0.2
HOLD_POLL = 0.2  # a held request asks DNS again at least this often
UNHEALTHY_RECHECK = 2.0  # seconds between checks of a service that is unhealthy
# Options of mitmproxy's own addons that routing by Host needs. Options of
# built-ins a lean master does not load are simply absent, so each is optional.
ENGINE_OPTIONS: dict[str, Any] = {
    "keep_host_header": True,  # else Host is rewritten to the reverse target before any hook
    "connection_strategy": "lazy",  # eager would connect to the dummy reverse target
    "block_global": False,  # the proxy is meant for public clients
    "onboarding": False,  # would answer Host: mitm.it itself
}
# Where requests would go if the addon ever failed to route one: nothing listens there.
DUMMY_REVERSE = "reverse:http://127.0.0.1:1/"
_UNREAD = object()  # the signature of a file not read yet


@dataclass(slots=True)
class Routes:
    """A parsed state file and how it differs from the view it was compared with."""

    state: State
    base: dict[str, Service]  # the routes it was compared with
    changed: dict[str, Service]  # new or different (by identity) services
    removed: list[str]


def diff_routes(state: State, base: dict[str, Service]) -> Routes:
    services = state.services
    return Routes(state, base, {h: s for h, s in services.items() if base.get(h) is not s},
                  [h for h in base if h not in services])


@dataclass(slots=True)
class Route:
    """Where a request goes, up to the container: what picking one needs."""

    service: Service
    health: Health | None
    alias: str
    port: int
    raw_host: str


@dataclass(slots=True)
class Observed:
    """The parsed health file (or, without one, the state file's old health)."""

    entries: dict[str, HealthEntry] | None  # None: there is no health file
    # (host, service, health in force, entry): entries that may replace what is in
    # force, worked out in the reader thread; the loop checks nothing moved since.
    candidates: list[tuple[str, Service, Health | None, HealthEntry]] = field(
        default_factory=list)


def same_observation(a: Health, b: Health) -> bool:
    return (a.healthy, a.checked_at, a.last_error, a.containers) == (
        b.healthy, b.checked_at, b.last_error, b.containers)


class LumaProxy:
    """Routes every request to a container of its host's Docker network alias."""

    def __init__(self) -> None:
        self.table = HostTable()
        self.health: dict[str, Health] = {}
        self.balancer = Balancer()
        self.resolver = Resolver()
        self.store: Store | None = None
        self.beacon: Beacon | None = None  # tells the CLI which routes are in force
        self._reader = StateReader()
        self._health_reader = HealthReader()
        self._health_writer = HealthReader()  # the leader's: keeps the lines it wrote
        self.settings = Settings()
        self.trusted: tuple[Network, ...] = ()
        self.checker: HealthChecker | None = None
        self._signature: object = None
        self._health_signature: object = _UNREAD
        # The health file's entries (or the state file's old health while there is
        # no health file): looked up when a service changes, compared on reload.
        self._observed: dict[str, HealthEntry] = {}
        self._legacy: dict[str, HealthEntry] = {}
        self._dirty: set[str] = set()  # hosts new or changed since the health loop looked
        self._last_error: str | None = None  # of the last reload
        self._health_error: str | None = None  # of the last health file read
        self._persist_error: str | None = None  # of the last health write
        self._tasks: list[asyncio.Task[None]] = []
        self.leadership: Leadership | None = None
        self._leader_listeners: list[Callable[[bool], None]] = []
        self._kick = asyncio.Event()
        self._alias_of: dict[str, tuple[str, str]] = {}  # ip -> (alias, host) last sent there
        self.prover = Prover(self._probe, self._departed)
        self.engine_events = EngineEvents(self._engine_changes)

    # ----------------------------------------------------------------- options
    def load(self, loader: Any) -> None:
        loader.add_option("luma_state", str, default_state_path(), "Path of the state file.")
        loader.add_option(
            "luma_dns", str, os.environ.get("LUMA_PROXY_DNS", ""),
            "Resolve aliases through this DNS server (IP:PORT) instead of the system resolver.",
        )
        loader.add_option(
            "luma_dns_ttl", float, env_float("LUMA_PROXY_DNS_TTL", 1.0),
            "Seconds an alias's DNS answer is reused; 0 resolves on every request.",
        )
        loader.add_option(
            "luma_health_interval", float, env_float("LUMA_PROXY_HEALTH_INTERVAL", 30.0),
            "Seconds between health checks of every service.",
        )
        loader.add_option(
            "luma_health_timeout", float, 5.0, "Timeout of one health check request."
        )
        loader.add_option(
            "luma_hold_timeout", float, env_float("LUMA_PROXY_HOLD_TIMEOUT", 10.0),
            "Seconds a request waits for a container when its service has none that can "
            "take it (a single-replica redeploy, every replica restarting); then 503.",
        )
        loader.add_option(
            "luma_trusted_proxies", str, os.environ.get("LUMA_PROXY_TRUSTED_PROXIES", ""),
            "Comma-separated CIDRs whose X-Forwarded-* headers are kept.",
        )
        self._set_engine_options()

    def _set_engine_options(self) -> None:
        opts = ctx.options
        updates = {k: v for k, v in ENGINE_OPTIONS.items() if k in opts}
        if "mode" in opts and list(opts.mode) == ["regular"]:
            updates["mode"] = [DUMMY_REVERSE]
        opts.update(**{k: v for k, v in updates.items() if getattr(opts, k) != v})

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "luma_dns" in updated or "luma_dns_ttl" in updated:
            try:
                dns = parse_dns_server(opts.luma_dns) if opts.luma_dns else None
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
            if opts.luma_dns_ttl < 0:
                raise exceptions.OptionsError("luma_dns_ttl must be >= 0")
            self.resolver = Resolver(dns, opts.luma_dns_ttl)
            if self.checker:
                self.checker.resolver = self.resolver
        if "luma_trusted_proxies" in updated:
            try:
                self.trusted = parse_trusted_proxies(opts.luma_trusted_proxies)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
        if "luma_hold_timeout" in updated and opts.luma_hold_timeout < 0:
            raise exceptions.OptionsError("luma_hold_timeout must be >= 0")
        if "luma_health_interval" in updated and opts.luma_health_interval <= 0:
            raise exceptions.OptionsError("luma_health_interval must be > 0")
        if "luma_state" in updated:
            self.store = Store(opts.luma_state)
            if self.beacon is not None:
                self.beacon.close()
            self.beacon = Beacon(opts.luma_state)
            self.beacon.open()  # no beacon (read-only disk): the CLI simply does not wait
            self._reader, self._health_reader = StateReader(), HealthReader()
            self._health_writer = HealthReader()
            self._signature, self._health_signature = _UNREAD, _UNREAD
            if self.leadership is not None:
                self.leadership.close()
            self.leadership = Leadership(str(self.store.path) + ".health.lock")
            self.leadership.on_change(self._leadership_changed)
            self._take_over()
            self.reload()  # routes and stored health are in place before the first request

    def _take_over(self) -> None:
        """A state file of the Go proxy (or left where the registry used to be) becomes ours.

        Every worker tries; the first one writes it under the lock, the others find
        nothing left to do. If it cannot be written (read-only disk), it is still
        served as read: the reload below parses that layout too.
        """
        assert self.store is not None
        try:
            notes = self.store.take_over()
        except RegistryError:
            return  # the reload says why the file cannot be used
        if notes is not None:
            logger.warning("took over the state file %s (original kept as %s%s)",
                           self.store.path, self.store.path.name, IMPORT_SUFFIX)
            for note in notes:
                logger.warning("state import: %s", note)

    # -------------------------------------------------------------- lifecycle
    def running(self) -> None:
        self._set_engine_options()  # again: command-line options are applied after load
        pages.install_engine_error_pages()
        self._kick = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._reload_loop(), name="luma reload"),
            asyncio.create_task(self._health_loop(), name="luma health"),
        ]
        if self.leadership is not None:
            self._tasks.append(asyncio.create_task(self.leadership.run(), name="luma leader"))
        logger.info("luma-proxy routing %d host(s) from %s", len(self.table.services),
                    self.store.path if self.store else "-")
        self.engine_events.start(asyncio.get_running_loop().call_soon_threadsafe)
        engine_patches.set_reroute(self.reroute)

    def done(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        self.prover.close()
        self.engine_events.stop()
        engine_patches.set_reroute(None)
        if self.leadership is not None:
            self.leadership.close()
        if self.beacon is not None:
            self.beacon.close()
            self.beacon = None

    # ------------------------------------------------------------- the state
    def reload(self) -> bool:
        """Re-read the state and health files if they changed; keep the last good view on error."""
        assert self.store is not None
        changed = False
        signature = self.store.signature()
        if signature != self._signature:
            changed = self._take(signature, self._read(self.table.services))
        signature = self.store.health_signature()
        if signature != self._health_signature:
            changed = self._take_health(signature, self._read_health(self.table.services)) \
                or changed
        return changed

    async def reload_in_background(self) -> bool:
        """As ``reload``, with the reads, parsing and diffing off the event loop.

        Parsing a big registry takes long enough that doing it on the loop would
        stop all traffic meanwhile; the loop only swaps in what changed.
        """
        assert self.store is not None
        changed = False
        signature = self.store.signature()
        if signature != self._signature:
            routes = await asyncio.to_thread(self._read, self.table.services)
            changed = self._take(signature, routes)
        signature = self.store.health_signature()
        if signature != self._health_signature:
            observed = await asyncio.to_thread(self._read_health, self.table.services)
            changed = self._take_health(signature, observed) or changed
        return changed

    def _read(self, base: dict[str, Service]) -> Routes | RegistryError:
        """Parse the state file and diff it against ``base`` (runs in a thread)."""
        assert self.store is not None
        try:
            state = self.store.read(self._reader)
        except RegistryError as e:
            return e
        return diff_routes(state, base)

    def _take(self, signature: object, routes: Routes | RegistryError) -> bool:
        if isinstance(routes, RegistryError):
            if str(routes) != self._last_error:
                logger.error("keeping the last good routes: %s", routes)
                self._last_error = str(routes)
            self._signature = signature  # parse this version once: read again when it changes
            self._served()
            return False
        self._signature = signature
        self._last_error = None
        if routes.base is not self.table.services:  # the view moved while we parsed
            routes = diff_routes(routes.state, self.table.services)
        self.settings = routes.state.settings
        self._legacy = routes.state.legacy_health
        self._apply_changes(routes.state.services, routes.changed, routes.removed)
        if self._health_signature is None:  # no health file: the state file's old health
            self._take_health(None, Observed(None, self._candidates(self._legacy,
                                                                    self.table.services)))
        self._served()
        return True

    def _served(self) -> None:
        """Tell a waiting CLI (served.py) which state version this process has in force."""
        if self.beacon is not None:
            self.beacon.serve(self._signature)

    def _read_health(self, services: dict[str, Service]) -> Observed | RegistryError:
        """Parse the health file and pick the entries that may change the view (in a thread)."""
        assert self.store is not None
        try:
            entries = self.store.read_health(self._health_reader)
        except RegistryError as e:
            return e
        return Observed(entries, self._candidates(
            self._legacy if entries is None else entries, services))

    def _candidates(self, entries: dict[str, HealthEntry], services: dict[str, Service]
                    ) -> list[tuple[str, Service, Health | None, HealthEntry]]:
        """Entries written since the last read that match their service as it is now.

        Order is the order of writes to the file (under its lock), never the
        ``checked_at`` clocks: after a wall-clock step back, a fresh result
        has an earlier time than the one it replaces and must still win.
        """
        known, health = self._observed, self.health
        out = []
        for host, entry in entries.items():
            if known.get(host) is entry:
                continue
            service = services.get(host)
            if service is None or not entry.matches(service):
                continue
            mine = health.get(host)
            if mine is None or not same_observation(entry, mine):  # our own write read back
                out.append((host, service, mine, entry))
        return out

    def _take_health(self, signature: object, observed: Observed | RegistryError) -> bool:
        if isinstance(observed, RegistryError):
            if str(observed) != self._health_error:
                logger.error("keeping the last good health: %s", observed)
                self._health_error = str(observed)
            self._health_signature = signature  # read again once it changes
            return False
        self._health_signature = signature
        self._health_error = None
        self._observed = self._legacy if observed.entries is None else observed.entries
        services, health = self.table.services, self.health
        taken = 0
        for host, _service, mine, entry in observed.candidates:
            current = services.get(host)
            if health.get(host) is not mine or current is None or not entry.matches(current):
                # A result taken since the file was read is newer than the file's; a
                # service deployed elsewhere meanwhile is not what the entry observed.
                continue
            health[host] = entry
            self._take_containers(current, entry)
            taken += 1
        return taken > 0

    def _take_containers(self, service: Service, health: Health) -> None:
        """Per-container results of a health check, into routing.

        A failed container must prove itself again (proving.py); a passing one
        is back in rotation at once, whatever its passive ejection's backoff
        (a flapped single replica would otherwise be 503 for up to 30 s).
        """
        if not health.containers:
            return
        _alias, port = self.table.target(service)
        for ip, ok in health.containers.items():
            if not ok:
                self.prover.forget(ip, port)
        for ip in passed(health):
            self.balancer.restore(ip, port)

    def _apply_changes(self, services: dict[str, Service], changed: dict[str, Service],
                       removed: list[str]) -> None:
        """Swap in ``services``, touching only the hosts that changed or left.

        A service whose target, health path or ssl changed drops the health in
        force (a new target must prove itself) unless the health file already
        has an entry for what it is now.
        """
        before = self.table.services
        unused = self.table.update(services, changed, removed)
        for host in removed:
            self.health.pop(host, None)
        for host, service in changed.items():
            old = before.get(host)
            if old is None or old.routing_key() != service.routing_key():
                self.health.pop(host, None)
                entry = self._observed.get(host)
                if entry is not None and entry.matches(service):
                    self.health[host] = entry
            self._dirty.add(host)
        if unused:
            self.resolver.discard(unused)
            self.balancer.discard(unused)
            self.balancer.forget(self.prover.discard(unused))
        if removed:
            gone = set(removed)
            self._alias_of = {ip: found for ip, found in self._alias_of.items()
                              if found[1] not in gone}
        if self.checker and removed:
            self.checker.discard(removed)
        if changed or removed:
            self._kick.set()

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_POLL)
            try:
                await self.reload_in_background()
            except Exception:  # never let the reloader die
                logger.exception("reload failed")

    # ---------------------------------------------------------------- health
    def is_leader(self) -> bool:
        """One process (of several workers) runs the checks; the others read the file."""
        return self.leadership is not None and self.leadership.try_take()

    def on_leadership(self, listener: Callable[[bool], None]) -> None:
        """``listener(leading)`` when this process starts or stops leading (the ACME loop)."""
        self._leader_listeners.append(listener)

    def _leadership_changed(self, leading: bool) -> None:
        self._kick.set()  # the health loop: a new leader checks everything at once
        for listener in self._leader_listeners:
            listener(leading)

    async def _health_loop(self) -> None:
        """Every service each interval; new or changed ones at once; unhealthy ones often.

        An unhealthy service is re-checked every ``UNHEALTHY_RECHECK`` seconds, so a
        transient failure (a container restarting, an alias not yet attached when
        the proxy starts) costs seconds of 503, not a whole interval.
        """
        self.checker = HealthChecker(self.resolver, self._report, ctx.options.luma_health_timeout)
        next_round = next_recheck = 0.0
        leading = False
        while True:
            interval = ctx.options.luma_health_interval
            recheck = min(UNHEALTHY_RECHECK, interval)
            try:
                if self.is_leader():
                    if not leading:  # just became the leader: check everything at once
                        leading, next_round = True, 0.0
                    services = self.table.services
                    now = time.monotonic()
                    if now >= next_round:
                        next_round, next_recheck = now + interval, now + recheck
                        self._dirty.clear()
                        await self.checker.check_all(list(services.values()), self.health)
                    elif self._dirty:
                        hosts, self._dirty = self._dirty, set()
                        fresh = self.checker.unchecked(
                            [services[h] for h in hosts if h in services])
                        try:
                            await self.checker.check_all(fresh, self.health)
                        except BaseException:
                            self._dirty |= hosts
                            raise
                    elif now >= next_recheck:
                        next_recheck = now + recheck
                        failing = [s for s in services.values()
                                   if (h := self.health.get(s.host)) is not None
                                   and h.healthy is False]
                        await self.checker.check_all(failing, self.health)
                else:
                    leading = False
                    self._dirty.clear()
                    next_round = next_recheck = time.monotonic() + interval
            except Exception:
                logger.exception("health check round failed")
            self._kick.clear()
            wake = next_round
            if any(h.healthy is False for h in self.health.values()):
                wake = min(wake, next_recheck)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), max(0.05, wake - time.monotonic()))

    def _report(self, results: dict[str, tuple[tuple, Health]]) -> None:
        """Take fresh results into the view at once, then write them to the health file.

        A result for a service deployed elsewhere (or removed) while it was being
        checked says nothing about what is routed now: it is dropped.
        """
        services = self.table.services
        results = {host: (key, health) for host, (key, health) in results.items()
                   if (service := services.get(host)) is not None
                   and service.routing_key() == key}
        if not results:
            return
        for host, (_key, health) in results.items():
            before = self.health.get(host)
            if before is None or before.healthy is not health.healthy:
                level = logging.INFO if health.healthy else logging.WARNING
                logger.log(level, "health: %s is now %s%s", host,
                               "healthy" if health.healthy else "unhealthy",
                               f" ({health.last_error})" if health.last_error else "")
            self.health[host] = health
            self._take_containers(services[host], health)
        self._tasks.append(asyncio.create_task(self._persist(results)))
        self._tasks = [t for t in self._tasks if not t.done()]

    async def _persist(self, results: dict[str, tuple[tuple, Health]]) -> None:
        """Merge ``results`` into the health file (never the state file), in a thread.

        Each entry carries the target it was checked for. A result for a
        service deployed elsewhere by the time it is written is left out (were
        it written, no process would apply it to the new target); entries of
        hosts that are no longer routed are dropped.
        """
        assert self.store is not None
        store, services = self.store, self.table.services

        def change(entries: dict[str, HealthEntry]) -> None:
            for host, (key, health) in results.items():
                service = services.get(host)
                if service is None or service.routing_key() != key:
                    continue  # deployed elsewhere or removed since the check started
                # A fresh result always replaces the entry: writes are ordered by the
                # file's lock, not by checked_at (which a clock step can reorder).
                entries[host] = HealthEntry.of(key, health)
            for host in [h for h in entries if h not in services]:
                del entries[host]

        try:
            await asyncio.to_thread(store.update_health, change, self._legacy,
                                    self._health_writer)
        except RegistryError as e:
            if str(e) != self._persist_error:
                logger.error("cannot save health: %s", e)
            self._persist_error = str(e)
        else:
            self._persist_error = None

    # -------------------------------------------------------------- hot path
    def requestheaders(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        """Route the request: synchronous, unless its alias must be resolved first.

        The alias's IPs are cached for the DNS TTL, so nearly every request is
        routed without a coroutine; only a cache miss returns one to await.
        A large or unsized body is streamed (streaming.py), decided first so that
        an answer given here can close such a request instead of reading it all.
        """
        request = flow.request
        if flow.response is not None and not request.stream:
            return None  # answered before us (ACME, redirect, 421): read, then answered
        if request.stream or stream_request(request):
            stream_counted(request)  # also a chunked upload the size limit counts
        try:
            route = self._route(flow)
        except Exception:
            self._failed(flow)
            return None
        if route is not None:
            return self._route_resolved(flow, route)
        if flow.response is not None:
            self._answered(flow)
        return None

    async def _route_resolved(self, flow: http.HTTPFlow, route: Route) -> None:
        try:
            ips = await self.resolver.resolve(route.alias)
            if not self._send(flow, route, ips):
                await self._hold(flow, route)
        except Exception:
            self._failed(flow)
            return
        self._answered(flow)

    def _failed(self, flow: http.HTTPFlow) -> None:
        """Fail closed: never let an unrouted request reach the dummy target."""
        logger.exception("routing failed for %s", host_header(flow.request))
        flow.response = pages.page(500)
        self._answered(flow)

    @staticmethod
    def _answered(flow: http.HTTPFlow) -> None:
        if flow.response is not None and flow.request.data.http_version in MULTIPLEXED:
            # One stream of a multiplexed connection: answer it; its body, if any,
            # is read up to the body limit (engine_patches), never the whole connection killed.
            flow.request.stream = False
        elif flow.response is not None and flow.request.stream:
            # Answered here (404, 503, redirect...) while a large body is still coming:
            # mitmproxy can neither stream it nowhere nor answer before reading it all
            # into memory. Close instead; small bodies are read and answered normally.
            flow.kill()

    def _route(self, flow: http.HTTPFlow) -> Route | None:
        """Answer the request or set its upstream; its ``Route`` when DNS must be asked first."""
        if flow.response is not None:  # answered by an addon before us (ACME, redirect)
            return None
        request = flow.request
        hosts = header_values(request.headers, "host")
        if len(hosts) > 1:
            flow.response = pages.page(400)
            return None
        raw_host = hosts[0] if hosts else None
        authority = request.authority
        if request.data.http_version in MULTIPLEXED and not valid_h2_target(
                request.data.method, request.data.path, request.data.authority):
            flow.response = pages.page(400)  # would be written into the container's request line
            return None
        if authority and request.data.http_version in MULTIPLEXED:
            raw_host = authority  # what request.host_header is, without a second scan
        if authority and hosts and self.table.canonical(authority) != self.table.canonical(
                hosts[0]):
            # Absolute-form URL or HTTP/2 :authority naming another host than Host:
            # refuse rather than pick one (request smuggling, cache poisoning).
            flow.response = pages.page(400)
            return None
        found = self.table.lookup(raw_host)
        if isinstance(found, Reject):
            flow.response = pages.page(found.status)
            return None
        service = found
        health = self.health.get(service.host)
        if (reject := admit(health)) is not None and not unreachable(health):
            flow.response = pages.page(reject.status)  # the app itself said it is unhealthy
            return None
        alias, port = self.table.target(service)
        route = Route(service, health, alias, port, raw_host or "")
        ips = self.resolver.cached(alias)
        if ips is None or not self._send(flow, route, ips):
            return route  # ask DNS, or hold until a container can take it
        return None

    async def _hold(self, flow: http.HTTPFlow, route: Route) -> None:
        """No container can take the request yet: wait for one, up to the hold timeout.

        A single-replica redeploy, a new alias whose containers are still proving
        themselves, every replica restarting: the request waits (re-asking DNS)
        instead of failing, then gets 503 with ``Retry-After``.
        """
        started = time.monotonic()
        deadline = started + ctx.options.luma_hold_timeout
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                await self.prover.wait(route.alias, route.port, min(HOLD_POLL, remaining))
                ips = await self.resolver.resolve(route.alias)
                if self._send(flow, route, ips):
                    return
            flow.response = pages.page(503)
        finally:  # also when the client leaves mid-hold: the log says how long it waited
            flow.metadata["luma_held"] = time.monotonic() - started

    def _send(self, flow: http.HTTPFlow, route: Route, ips: tuple[str, ...]) -> bool:
        """Point the request at a proven container of the service; False if none can take it."""
        usable = self.prover.usable(route.alias, route.port, ips, route.service.health_path,
                                    route.health)
        ip = self.balancer.pick(route.alias, route.port, usable, flow.client_conn.id)
        if ip is None:
            return False
        request = flow.request
        scheme = "https" if flow.client_conn.tls_established else "http"
        set_forwarding_headers(
            request.headers, flow.client_conn.peername[0], scheme, route.raw_host, self.trusted
        )
        # Where mitmproxy connects. Set on the data itself: the public setters
        # rewrite Host and :authority to ip:port (three header rewrites per
        # request, undone at once); the container must see them as sent.
        data = request.data
        data.scheme = b"http"
        data.host = ip
        data.port = route.port
        flow.metadata["luma_service"] = route.service.host
        flow.metadata["luma_ip"] = ip
        self._alias_of[ip] = (route.alias, route.service.host)
        return True

    def _departed(self, ip: str) -> None:
        """An IP left an alias's answer: its idle pooled connections go (never reused).

        Its ejection and backoff go too: Docker gives a freed address to the next
        container, which must start clean.
        """
        self.balancer.forget((ip,))
        try:
            closed = engine_patches.close_upstreams(ip, idle_only=True)
        except Exception:  # never let connection bookkeeping fail a request
            logger.exception("closing idle connections to %s failed", ip)
            return
        if closed:
            logger.info("%s left its alias: %d idle upstream connection(s) closed", ip, closed)

    def reroute(self, flow: http.HTTPFlow) -> None:
        """A request its container closed under is sent again (engine_patches): elsewhere.

        The IP must prove itself again; the request goes to another proven IP of
        the alias if there is one, else to the same address on a new connection
        (the connect retry then moves it on if that refuses).
        """
        timeouts = ctx.master.addons.get("timeouts")
        if timeouts is not None:
            timeouts.request(flow)  # it goes upstream again: a fresh response deadline
        failed = flow.metadata.get("luma_ip")
        service = self.table.services.get(flow.metadata.get("luma_service", ""))
        if failed is None or service is None:
            return
        alias, port = self.table.target(service)
        self.prover.forget(failed, port)
        self.resolver.expire_ip(failed)
        ips = self.resolver.cached(alias) or ()
        usable = self.prover.usable(alias, port, ips, service.health_path,
                                    self.health.get(service.host))
        others = tuple(ip for ip in usable if ip != failed)
        ip = self.balancer.pick(alias, port, others, flow.client_conn.id)
        if ip is not None:
            flow.request.data.host = ip
            flow.metadata["luma_ip"] = ip
            self._alias_of[ip] = (alias, service.host)

    async def _probe(self, ip: str, port: int, host: str, path: str) -> bool:
        """One health probe of a container that must prove itself (proving.py)."""
        result = await probe(ip, port, host, path, ctx.options.luma_health_timeout)
        if result.ok:
            self.balancer.restore(ip, port)  # a passing check outranks a passive ejection
        return result.ok

    async def alternatives(self, ip: str, port: int, fresh: bool) -> tuple[str, ...]:
        """The IPs a failed connect to ``ip`` may be retried on (engine_patches.Connector)."""
        found = self._alias_of.get(ip)
        if found is None:
            return ()
        alias, host = found
        if fresh:
            self.resolver.expire_ip(ip)
        ips = await self.resolver.resolve(alias)
        service = self.table.services.get(host)
        path = service.health_path if service is not None else "/up"
        proven = self.prover.usable(alias, port, ips, path, self.health.get(host))
        # Proven containers first; an unproven one only when nothing else is left;
        # never one the engine says is stopping.
        return (*proven, *(other for other in ips
                           if other not in proven and not self.prover.is_retired(other)))

    def _engine_changes(self, changes: Iterable[tuple[str, str]]) -> None:
        """Docker's events (dockerevents.py), ahead of DNS: stopping IPs out, new ones asked."""
        joined = False
        for change, ip in changes:
            if change in ("stopping", "gone"):
                self.prover.retire(ip)
                self.resolver.expire_ip(ip)
            if change == "gone":
                self.balancer.forget((ip,))  # a container reusing the address starts clean
                # Its connections can only hang now: close them, so a request waiting
                # there is sent again elsewhere (engine_patches: the resend seam).
                closed = engine_patches.close_upstreams(ip)
                logger.info("docker: %s is gone (%d upstream connection(s) closed)", ip, closed)
            elif change == "stopping":
                logger.info("docker: %s is stopping: no new requests", ip)
            else:
                self.prover.unretire(ip)
                joined = True
        if joined:
            self.resolver.expire_all()  # its alias is asked again: the new IP proves itself

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Stream what is large or has no length (SSE, long polls) instead of buffering it."""
        response = flow.response
        assert response is not None
        if response.status_code == 101 and not asked_websocket(flow.request.headers):
            # A switch the request did not ask for (h2c, or none): never a raw tunnel.
            flow.response = response = pages.page(502, {"Connection": "close"})
        if response.stream or stream_response(response):
            stream_counted(response)

    # --------------------------------------------------- upstream connections
    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.address:
            self.balancer.restore(data.server.address[0], data.server.address[1])

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Passive ejection: an IP that refused or timed out gets no new requests for a while."""
        if not data.server.address or data.server.error == CLIENT_GONE:
            return  # the client left while we connected: that says nothing about the container
        ip, port = data.server.address[0], data.server.address[1]
        self.resolver.expire_ip(ip)
        self.prover.forget(ip, port)
        delay = self.balancer.eject(ip, port)
        logger.warning("upstream %s:%s failed to connect (%s); out of rotation for %.0fs",
                       ip, port, data.server.error, delay)

    def error(self, flow: http.HTTPFlow) -> None:
        """The container failed mid-request (reset, died): ask DNS again before the TTL."""
        gone = flow.error is not None and CLIENT_GONE in flow.error.msg.lower()
        if flow.response is None and not gone and (ip := flow.metadata.get("luma_ip")):
            self.resolver.expire_ip(ip)

    def client_disconnected(self, client: connection.Client) -> None:
        self.balancer.release(client.id)

