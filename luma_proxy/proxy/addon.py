"""The mitmproxy addon: Host -> service -> alias -> container IP.

The hot path (``requestheaders``) only reads the in-memory view. Background
tasks keep that view fresh: the reloader follows the registry (routes and
observed health), the health checker probes every service.
Works the same under ``mitmdump -s``, ``mitmweb -s`` and ``luma-proxy run``.

A reload reads the registry's rows that moved (``registry.Snapshot``) and
builds the next ``View`` in a thread (``view.build_view``, a pure function);
the event loop swaps it in whole and touches only what changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy import server_hooks

from luma_proxy.docker.events import EngineEvents
from luma_proxy.environ import env_float
from luma_proxy.health.checker import passed, probe, unreachable
from luma_proxy.health.schedule import HealthSchedule
from luma_proxy.models import Health, HealthEntry, Service, Settings
from luma_proxy.proxy import engine_patches, pages
from luma_proxy.proxy.flowinfo import (
    CLIENT_GONE,
    MULTIPLEXED,
    client_ip,
    header_values,
    host_header,
    valid_h2_target,
)
from luma_proxy.proxy.forwarding import (
    Network,
    asked_websocket,
    forwarded_client,
    parse_trusted_proxies,
    set_forwarding_headers,
)
from luma_proxy.proxy.gate import Broken, Gate, gate_of, hold_paused
from luma_proxy.proxy.streaming import stream_counted, stream_request, stream_response
from luma_proxy.routing.balancer import Balancer
from luma_proxy.routing.proving import Prover
from luma_proxy.routing.resolver import Resolver, parse_dns_server
from luma_proxy.routing.router import HostTable, Reject, admit, routing_path, strip_prefix
from luma_proxy.runtime.gcpolicy import settle
from luma_proxy.runtime.leadership import Leadership
from luma_proxy.runtime.served import Beacon
from luma_proxy.store.registry import IMPORT_SUFFIX, RegistryError, Store, default_state_path
from luma_proxy.store.view import EMPTY, Changes, View, diff, read_view

logger = logging.getLogger("luma_proxy")

RELOAD_POLL = 0.2
HOLD_POLL = 0.2  # a held request asks DNS again at least this often
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


@dataclass(slots=True)
class Route:
    """Where a request goes, up to the container: what picking one needs."""

    service: Service
    health: Health | None
    alias: str
    port: int
    raw_host: str


class LumaProxy:
    """Routes every request to a container of its host's Docker network alias."""

    def __init__(self) -> None:
        self.table = HostTable()
        self.gates: dict[str, Gate] = {}  # route key -> its checks (gate.py), if it has any
        self.view = EMPTY  # the registry as last swapped in (view.py)
        self.health: dict[str, HealthEntry] = {}  # the view's health in force
        self.balancer = Balancer()
        self.resolver = Resolver()
        self.store: Store | None = None
        self.beacon: Beacon | None = None  # tells the CLI which routes are in force
        self.settings = Settings()
        self.trusted: tuple[Network, ...] = ()
        self._read_error: str | None = None  # of the last reload
        self._reloading = asyncio.Lock()  # one background reload at a time
        self._tasks: list[asyncio.Task[None]] = []
        self.leadership: Leadership | None = None
        self._leader_listeners: list[Callable[[bool], None]] = []
        self._loop_thread: int | None = None  # the proxy loop's thread, once running
        self.schedule = HealthSchedule(self, lambda: ctx.options.luma_health_interval,
                                       lambda: ctx.options.luma_health_timeout)
        self._alias_of: dict[str, tuple[str, str]] = {}  # ip -> (alias, host) last sent there
        self.prover = Prover(self._probe, self._departed)
        self.engine_events = EngineEvents(self.engine_changed)

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
            self.schedule.use_resolver(self.resolver)
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
            self._swap(EMPTY)
            if self.leadership is not None:
                self.leadership.close()
            self.leadership = Leadership(str(self.store.path) + ".health.lock")
            self.leadership.on_change(self._leadership_changed)
            self._take_over()
            self.reload()  # routes and stored health are in place before the first request

    def _take_over(self) -> None:
        """Open the registry: the first process creates it and imports a JSON state file
        (the Go proxy's, or this project's before the database) once.

        If no database can be written (read-only disk), the JSON file is served as read.
        """
        assert self.store is not None
        try:
            notes = self.store.open()
        except RegistryError:
            return  # the reload says why the registry cannot be used
        if notes is not None:
            logger.warning("took over the state file %s (original kept as %s%s)",
                           self.store.path, self.store.path.name, IMPORT_SUFFIX)
            for note in notes:
                logger.warning("state import: %s", note)

    # -------------------------------------------------------------- lifecycle
    def running(self) -> None:
        self._set_engine_options()  # again: command-line options are applied after load
        engine_patches.install_engine_error_pages()  # mitmproxy's own answers: our pages
        self._tasks = [
            asyncio.create_task(self._reload_loop(), name="luma reload"),
        ]
        if self.leadership is not None:
            self._tasks.append(asyncio.create_task(self.leadership.run(), name="luma leader"))
        self._loop_thread = threading.get_ident()
        self.schedule.start(asyncio.get_running_loop())  # in its own thread and loop
        logger.info("luma-proxy routing %d host(s) from %s", len(self.table.services),
                    self.store.path if self.store else "-")
        self.engine_events.start(asyncio.get_running_loop().call_soon_threadsafe)
        engine_patches.set_reroute(self.reroute)

    def done(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        self.schedule.stop()
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
        """Swap in what moved in the registry since the view was built; False if nothing did."""
        base = self.view
        return self._swap_built(base, self._build(base))

    async def reload_in_background(self) -> bool:
        """As ``reload``, reading, parsing and comparing in a thread: the loop only applies.

        At 10,000 services a health round's changes took 6-8 ms to swap in when
        the loop also compared the views, 0.05 ms without (benchmarks/swap_cost.py).
        One at a time (the poll and the health leader's write both ask): a second
        built from the same view found it replaced, compared again on the loop, and
        stalled it for 22 ms (benchmarks/loop_lag/); now it waits, then reads only
        what moved after the first.
        """
        async with self._reloading:
            base = self.view
            return self._swap_built(base, await asyncio.to_thread(self._build, base))

    def _swap_built(self, base: View, built: tuple[View, Changes] | None) -> bool:
        if built is None or base is not self.view:
            return False  # (a reload on the loop meanwhile: the next poll builds on it)
        return self._swap(*built)

    def _build(self, base: View) -> tuple[View, Changes] | None:
        """The next view, from the rows that moved since ``base``, and how it differs."""
        assert self.store is not None
        try:
            view = read_view(self.store, base)
        except RegistryError as e:
            if str(e) != self._read_error:
                logger.error("keeping the last good routes: %s", e)
                self._read_error = str(e)
            return None
        self._read_error = None
        if view is base:
            return None
        for error in view.errors:
            logger.error("registry: %s", error)
        return view, diff(base, view)

    def _swap(self, view: View, changes: Changes | None = None) -> bool:
        """Put ``view`` in force; the work is per service or health entry that changed
        (``changes``: from the view in force, computed where ``view`` was built)."""
        old, self.view = self.view, view
        if changes is None:
            changes = diff(old, view)
        unused = self.table.update(view.services, changes.changed, changes.removed)
        self._update_gates(changes.changed, changes.removed)
        self.health, self.settings = view.health, view.settings
        # Without ejections, only failed containers have anything to undo.
        hosts = changes.health if self.balancer.has_ejections else changes.failing
        for host in hosts:
            self._take_containers(view.services[host], view.health[host])
        self.schedule.changed(changes.changed)
        if unused:
            self.resolver.discard(unused)
            self.balancer.discard(unused)
            self.balancer.forget(self.prover.discard(unused))
        if changes.removed:
            gone = set(changes.removed)
            self._alias_of = {ip: found for ip, found in self._alias_of.items()
                              if found[1] not in gone}
            self.schedule.removed(changes.removed)
        if self.beacon is not None and view.routes_gen != old.routes_gen:
            self.beacon.serve(view.routes_gen)  # a waiting CLI may go on (served.py)
        settle(len(changes.changed) + len(changes.health))  # a bulk: out of full GC passes
        return True

    def _update_gates(self, changed: dict[str, Service], removed: Iterable[str]) -> None:
        """Compile the gate of each changed route (gate.py); most have none."""
        if not (changed or self.gates):
            return
        gates = self.gates
        for key in removed:
            gates.pop(key, None)
        for key, service in changed.items():
            try:
                found = gate_of(service)
            except ValueError as e:  # a hand-edited row: refuse its requests, never open
                logger.error("route %s: %s; answering 500 until it is deployed again", key, e)
                found = Broken(service)
            if found is None:
                gates.pop(key, None)
            else:
                gates[key] = found

    def _take_containers(self, service: Service, health: Health) -> None:
        """Per-container results of a health check, into routing.

        A failed container must prove itself again (proving.py); a passing one
        is back in rotation at once, whatever its passive ejection's backoff
        (a flapped single replica would otherwise be 503 for up to 30 s).
        """
        containers = health.containers
        if not containers:
            return
        failed = [ip for ip, ok in containers.items() if not ok]
        if not failed and not self.balancer.has_ejections:
            return  # the common case (a round of 10,000 healthy services): nothing to undo
        _alias, port = self.table.target(service)
        for ip in failed:
            self.prover.forget(ip, port)
        for ip in passed(health):
            self.balancer.restore(ip, port)

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_POLL)
            try:
                if self._moved():
                    await self.reload_in_background()
            except Exception:  # never let the reloader die
                logger.exception("reload failed")

    def _moved(self) -> bool:
        """Whether the registry moved since the view in force: the generations alone, read
        on the loop. Handing each of the 5 polls a second to a thread cost 6-10 times
        the read itself (``benchmarks/reload_poll.py``); only a move is read in one."""
        assert self.store is not None
        try:
            return self.store.generations() != self.view.generations
        except RegistryError:
            return True  # the build says what is wrong, once

    # ---------------------------------------------------------------- leading
    def is_leader(self) -> bool:
        """One process (of several workers) runs the checks; the others read the file.

        From the health thread it only reads: the lock is taken on the proxy's loop
        (``leadership.run``), whose listeners (the ACME loop) expect that loop.
        """
        if self.leadership is None:
            return False
        if self._loop_thread is not None and threading.get_ident() != self._loop_thread:
            return self.leadership.leading
        return self.leadership.try_take()

    def on_leadership(self, listener: Callable[[bool], None]) -> None:
        """``listener(leading)`` when this process starts or stops leading (the ACME loop)."""
        self._leader_listeners.append(listener)

    @property
    def services(self) -> dict[str, Service]:
        return self.table.services

    def _leadership_changed(self, leading: bool) -> None:
        self.schedule.wake()
        for listener in self._leader_listeners:
            listener(leading)

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
        if isinstance(route, Route):
            return self._route_resolved(flow, route)
        if route is not None:
            return self._route_later(flow, route)
        if flow.response is not None:
            self._answered(flow)
        return None

    async def _route_later(self, flow: http.HTTPFlow, pending: Awaitable[Any]) -> None:
        """Await what the route's gate asked for (a password check, a pause), then route."""
        try:
            for _ in range(3):
                await pending
                if flow.response is not None:
                    break
                route = self._route(flow)
                if isinstance(route, Route):
                    await self._route_resolved(flow, route)
                    return
                if route is None:
                    break  # answered, or sent (to a container already resolved)
                pending = route
            else:
                flow.response = pages.page(503)  # held again and again: give up
        except Exception:
            self._failed(flow)
            return
        self._answered(flow)

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

    def _route(self, flow: http.HTTPFlow) -> Route | Awaitable[Any] | None:
        """Answer the request or set its upstream; its ``Route`` when DNS must be asked
        first; something to await (then route again) when its gate asks for it."""
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
        found = self.table.lookup(raw_host, request.data.path)
        if isinstance(found, Reject):
            flow.response = pages.page(found.status)
            return None
        service = found
        if self.gates and (gate := self.gates.get(service.key)) is not None:
            verdict = gate.check(flow, forwarded_client(
                client_ip(flow), request.headers, self.trusted), raw_host or "",
                flow.client_conn.tls_established)
            if isinstance(verdict, http.Response):
                flow.response = verdict
                return None
            if verdict is not None:
                return verdict
        if service.mode == "paused":
            return self._hold_paused(flow, service)
        health = self.health.get(service.key)
        if (reject := admit(health)) is not None and not unreachable(health):
            # the app itself said it is unhealthy
            flow.response = pages.page(reject.status, pages_dir=service.error_pages)
            return None
        if service.path_prefix and service.strip_path_prefix and not flow.metadata.get(
                "luma_stripped"):
            flow.metadata["luma_stripped"] = True  # once, however often it is routed
            request.data.path = strip_prefix(routing_path(request.path),
                                             service.path_prefix).encode()
        if not service.compress:
            flow.metadata["luma_compress"] = False
        alias, port = self.table.target(service)
        route = Route(service, health, alias, port, raw_host or "")
        ips = self.resolver.cached(alias)
        if ips is None or not self._send(flow, route, ips):
            return route  # ask DNS, or hold until a container can take it
        return None

    async def _hold_paused(self, flow: http.HTTPFlow, service: Service) -> None:
        """``luma-proxy pause``: hold the request until ``resume``, up to the service's bound."""
        key = service.key
        if not await hold_paused(lambda: self.table.services.get(key), service.max_pause):
            flow.response = pages.page(503, pages_dir=service.error_pages)

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
            flow.response = pages.page(503, pages_dir=route.service.error_pages)
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
        if prefix := route.service.path_prefix:  # after: a client's own is dropped there
            request.headers["X-Forwarded-Prefix"] = prefix
        # Where mitmproxy connects. Set on the data itself: the public setters
        # rewrite Host and :authority to ip:port (three header rewrites per
        # request, undone at once); the container must see them as sent.
        data = request.data
        data.scheme = b"http"
        data.host = ip
        data.port = route.port
        if flow.server_conn.transport_protocol == "udp":
            # An HTTP/3 (QUIC) client: mitmproxy opens the upstream connection with the
            # transport of flow.server_conn, which starts as the client's, and would
            # write HTTP/1.1 into UDP datagrams. Containers speak TCP: a TCP server
            # connection, made as mitmproxy's HttpLayer.get_connection makes one. Once
            # (a hold sends again with it, a resend gets a TCP one from mitmproxy); its
            # address is informative, mitmproxy connects to the request's host and port.
            flow.server_conn = connection.Server(address=(ip, route.port),
                                                 transport_protocol="tcp")
        flow.metadata["luma_service"] = route.service.key
        flow.metadata["luma_ip"] = ip
        self._alias_of[ip] = (route.alias, route.service.key)
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
                                    self.health.get(service.key))
        others = tuple(ip for ip in usable if ip != failed)
        ip = self.balancer.pick(alias, port, others, flow.client_conn.id)
        if ip is not None:
            flow.request.data.host = ip
            flow.metadata["luma_ip"] = ip
            self._alias_of[ip] = (alias, service.key)

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

    def engine_changed(self, changes: Iterable[tuple[str, str]]) -> None:
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

