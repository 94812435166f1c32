"""The mitmproxy addon: Host -> service -> alias -> container IP.

The hot path (``requestheaders``) only reads the in-memory view. Background
tasks keep that view fresh: the reloader follows the state file, the health
checker probes every service. Works the same under ``mitmdump -s``,
``mitmweb -s`` and ``luma-proxy run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from typing import Any

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy import server_hooks

from . import pages
from .balancer import Balancer
from .environ import env_float
from .forwarding import Network, parse_trusted_proxies, set_forwarding_headers
from .health import HealthChecker, unhealthy_ips
from .models import Health, Service, Settings, State
from .registry import RegistryError, StateReader, Store, default_state_path
from .resolver import Resolver, parse_dns_server
from .router import HostTable, Reject, admit

logger = logging.getLogger("luma_proxy")

RELOAD_POLL = 0.2
UNHEALTHY_RECHECK = 2.0  # seconds between checks of a service that is unhealthy
# Options of mitmproxy's own addons that routing by Host needs. Options of
# built-ins a lean master does not load are simply absent, so each is optional.
ENGINE_OPTIONS: dict[str, Any] = {
    "keep_host_header": True,  # else Host is rewritten to the reverse target before any hook
    "connection_strategy": "lazy",  # eager would connect to the dummy reverse target
    "block_global": False,  # the proxy is meant for public clients
    "onboarding": False,  # would answer Host: mitm.it itself
    "stream_large_bodies": "1m",  # big bodies pass through instead of sitting in memory
}
# mitmproxy cancels a pending upstream connect with this message when the client leaves.
CLIENT_GONE = "client disconnected"
# Where requests would go if the addon ever failed to route one: nothing listens there.
DUMMY_REVERSE = "reverse:http://127.0.0.1:1/"


class LumaProxy:
    """Routes every request to a container of its host's Docker network alias."""

    def __init__(self) -> None:
        self.table = HostTable()
        self.health: dict[str, Health] = {}
        self.balancer = Balancer()
        self.resolver = Resolver()
        self.store: Store | None = None
        self._reader = StateReader()
        self.settings = Settings()
        self.trusted: tuple[Network, ...] = ()
        self.checker: HealthChecker | None = None
        self._signature: object = None
        self._last_error: str | None = None  # of the last reload
        self._persist_error: str | None = None  # of the last health write
        self._tasks: list[asyncio.Task[None]] = []
        self._leader_fd: int | None = None
        self._kick = asyncio.Event()

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
        if "luma_health_interval" in updated and opts.luma_health_interval <= 0:
            raise exceptions.OptionsError("luma_health_interval must be > 0")
        if "luma_state" in updated:
            self.store = Store(opts.luma_state)
            self._reader = StateReader()
            self._signature = None
            self.reload()  # routes are in place before the first request

    # -------------------------------------------------------------- lifecycle
    def running(self) -> None:
        self._set_engine_options()  # again: command-line options are applied after load
        pages.install_engine_error_pages()
        self._kick = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._reload_loop(), name="luma reload"),
            asyncio.create_task(self._health_loop(), name="luma health"),
        ]
        logger.info("luma-proxy routing %d host(s) from %s", len(self.table.services),
                    self.store.path if self.store else "-")

    def done(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if self._leader_fd is not None:
            os.close(self._leader_fd)
            self._leader_fd = None

    # ------------------------------------------------------------- the state
    def reload(self) -> bool:
        """Re-read the state file if it changed; keep the last good view on error."""
        assert self.store is not None
        signature = self.store.signature()
        if signature == self._signature:
            return False
        return self._take(signature, self._read())

    async def reload_in_background(self) -> bool:
        """As ``reload``, with the read and validation off the event loop.

        Parsing a big registry takes long enough (about a second for 10,000
        services) that doing it on the loop would stop all traffic meanwhile.
        """
        assert self.store is not None
        signature = self.store.signature()
        if signature == self._signature:
            return False
        return self._take(signature, await asyncio.to_thread(self._read))

    def _read(self) -> State | RegistryError:
        assert self.store is not None
        try:
            return self.store.read(self._reader)
        except RegistryError as e:
            return e

    def _take(self, signature: object, state: State | RegistryError) -> bool:
        if isinstance(state, RegistryError):
            if str(state) != self._last_error:
                logger.error("keeping the last good routes: %s", state)
                self._last_error = str(state)
            return False
        self._signature = signature
        self._last_error = None
        self.settings = state.settings
        self.apply(state.services)
        return True

    def apply(self, services: dict[str, Service]) -> None:
        """Swap in a new view. Health: the newer of the file's and our own observation."""
        health = {}
        for host, service in services.items():
            mine = self.health.get(host)
            theirs = service.health
            if mine is None or (theirs.checked_at and (
                    mine.checked_at is None or theirs.checked_at > mine.checked_at)):
                health[host] = theirs
            else:
                health[host] = mine
        self.health = health
        self.table.replace(services)
        self.resolver.forget({self.table.target(s)[0] for s in services.values()})
        if self.checker:
            self.checker.forget(set(services))
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
        if self._leader_fd is not None:
            return True
        assert self.store is not None
        path = str(self.store.path) + ".health.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._leader_fd = fd
        return True

    async def _health_loop(self) -> None:
        """Every service each interval; new or changed ones at once; unhealthy ones often.

        An unhealthy service is re-checked every ``UNHEALTHY_RECHECK`` seconds, so a
        transient failure (a container restarting, an alias not yet attached when
        the proxy starts) costs seconds of 503, not a whole interval.
        """
        self.checker = HealthChecker(self.resolver, self._report, ctx.options.luma_health_timeout)
        next_round = next_recheck = 0.0
        while True:
            interval = ctx.options.luma_health_interval
            recheck = min(UNHEALTHY_RECHECK, interval)
            try:
                if self.is_leader():
                    services = list(self.table.services.values())
                    now = time.monotonic()
                    if now >= next_round:
                        next_round, next_recheck = now + interval, now + recheck
                        await self.checker.check_all(services, self.health)
                    elif fresh := self.checker.unchecked(services):
                        await self.checker.check_all(fresh, self.health)
                    elif now >= next_recheck:
                        next_recheck = now + recheck
                        failing = [s for s in services
                                   if self.health.get(s.host, s.health).healthy is False]
                        await self.checker.check_all(failing, self.health)
                else:
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
        """Take fresh results into the view at once, then persist them."""
        for host, (_key, health) in results.items():
            before = self.health.get(host)
            if before is None or before.healthy is not health.healthy:
                level = logging.INFO if health.healthy else logging.WARNING
                logger.log(level, "health: %s is now %s%s", host,
                               "healthy" if health.healthy else "unhealthy",
                               f" ({health.last_error})" if health.last_error else "")
            self.health[host] = health
        self._tasks.append(asyncio.create_task(self._persist(results)))
        self._tasks = [t for t in self._tasks if not t.done()]

    async def _persist(self, results: dict[str, tuple[tuple, Health]]) -> None:
        assert self.store is not None
        store = self.store

        def change(state: Any) -> None:
            for host, (key, health) in results.items():
                service = state.services.get(host)
                if service is not None and service.routing_key() == key:
                    service.health = health

        try:
            await asyncio.to_thread(store.update, change)
        except RegistryError as e:
            if str(e) != self._persist_error:
                logger.error("cannot save health: %s", e)
            self._persist_error = str(e)
        else:
            self._persist_error = None

    # -------------------------------------------------------------- hot path
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        try:
            await self._route(flow)
        except Exception:  # fail closed: never let an unrouted request reach the dummy target
            logger.exception("routing failed for %s", flow.request.host_header)
            flow.response = pages.page(500)
        if flow.response is not None and flow.request.stream:
            # Answered here (404, 503, redirect...) while a large body is still coming:
            # mitmproxy can neither stream it nowhere nor answer before reading it all
            # into memory. Close instead; small bodies are read and answered normally.
            flow.kill()

    async def _route(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:  # answered by an addon before us (ACME, redirect)
            return
        request = flow.request
        if len(request.headers.get_all("host")) > 1:
            flow.response = pages.page(400)
            return
        raw_host = request.host_header
        if request.authority and "host" in request.headers and self.table.canonical(
            request.authority
        ) != self.table.canonical(request.headers["host"]):
            # Absolute-form URL or HTTP/2 :authority naming another host than Host:
            # refuse rather than pick one (request smuggling, cache poisoning).
            flow.response = pages.page(400)
            return
        found = self.table.lookup(raw_host)
        if isinstance(found, Reject):
            flow.response = pages.page(found.status)
            return
        service = found
        health = self.health.get(service.host)
        if (reject := admit(health)) is not None:
            flow.response = pages.page(reject.status)
            return
        alias, port = self.table.target(service)
        ips = self.resolver.cached(alias)
        if ips is None:
            ips = await self.resolver.resolve(alias)
        unhealthy = unhealthy_ips(health) if health is not None else frozenset()
        ip = self.balancer.pick(alias, port, ips, flow.client_conn.id, unhealthy)
        if ip is None:
            flow.response = pages.page(503)
            return
        scheme = "https" if flow.client_conn.tls_established else "http"
        set_forwarding_headers(
            request.headers, flow.client_conn.peername[0], scheme, raw_host or "", self.trusted
        )
        # Where mitmproxy connects. Set on the data itself: the public setters
        # rewrite Host and :authority to ip:port (three header rewrites per
        # request, undone at once); the container must see them as sent.
        data = request.data
        data.scheme = b"http"
        data.host = ip
        data.port = port
        flow.metadata["luma_service"] = service.host
        flow.metadata["luma_ip"] = ip

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Stream what has no length (SSE, long polls) instead of buffering it."""
        response = flow.response
        assert response is not None
        if "content-length" not in response.headers or response.headers.get(
            "content-type", ""
        ).startswith("text/event-stream"):
            response.stream = True

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


def all_addons() -> list[Any]:
    """Everything luma-proxy adds to mitmproxy, in hook order."""
    from .accesslog import AccessLog
    from .drain import Drain
    from .limits import Limits
    from .metrics import Metrics
    from .requestid import RequestId
    from .timeouts import Timeouts
    from .tls import Https

    router = LumaProxy()
    return [RequestId(), Limits(), Https(router), router, Timeouts(), AccessLog(), Metrics(),
            Drain()]
