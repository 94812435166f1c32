"""Prometheus metrics on an opt-in port (``luma_metrics_port``, 0 = off).

The endpoint binds ``luma_metrics_host`` (127.0.0.1 unless told otherwise) and
serves ``GET /metrics`` from a small asyncio server in the proxy's own event
loop: no thread, so the collectors read the routing addon's view without locks,
and ``done`` stops it by closing its socket. Series (own registry)::

    luma_http_requests_total{service, status_class}    2xx/3xx/4xx/5xx (1xx, other)
    luma_http_request_duration_seconds{service}        histogram, first byte to end
    luma_http_requests_in_flight                       gauge
    luma_upstream_connect_errors_total{service}        from server_connect_error
    luma_service_healthy{service}                      1/0, absent until first check
    luma_container_healthy{service, ip}                1/0 per container IP
    luma_certificate_expiry_timestamp_seconds{host}    from the https addon's expiry()

With ``PROMETHEUS_MULTIPROC_DIR`` set (a worker of ``run --workers N``) the
addon records into that directory and does not bind: the supervisor serves the
sum (``workers.py``); the in-flight gauge is summed over live processes.

``service`` is the deployed host a request matched; "" for unknown hosts, so
clients cannot create series by sending made-up Host headers. Health and
certificate series are read at scrape time, never updated on the hot path.
The series of a service that is no longer deployed are removed at the next
scrape (``Pruner``), so removed hosts do not pile up; per-container series
follow the last health check. (Not with ``PROMETHEUS_MULTIPROC_DIR``: the
worker's values live in files prometheus_client cannot remove labels from.)

Certificate expiry comes from the ``expiry()`` method of the certificate addon
(``{host: not_after_unix_time}``), looked up at scrape time as the addon named
``https``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy import server_hooks
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from luma_proxy.environ import MULTIPROC_ENV
from luma_proxy.proxy.flowinfo import error_status, service_host, status_class

logger = logging.getLogger("luma_proxy")

IN_FLIGHT = "luma_in_flight"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_UPSTREAMS = 4096
MAX_REQUEST_HEAD = 16 * 1024
READ_TIMEOUT = 10.0

type ExpiryProvider = Callable[[], Mapping[str, float]]
HELD_OUTCOMES = ("routed", "503")


def stale_services(recorded: Iterable[str], live: Collection[str]) -> set[str]:
    """Services with series that no longer route ("" stays: it counts unknown hosts)."""
    return {s for s in recorded if s and s not in live}


# ------------------------------------------------------------- collectors
class Pruner:
    """Registered first: before each scrape, drops the series of services no longer deployed."""

    def __init__(self, prune: Callable[[], None]) -> None:
        self.prune = prune

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            self.prune()
        except Exception as e:  # pruning must not break the scrape
            logger.debug("pruning metrics failed: %s", e)
        return iter(())


class HealthCollector:
    """Health per service and per container IP, read from the routing addon at scrape time."""

    def __init__(self, router: Callable[[], Any | None]) -> None:
        self.router = router

    def describe(self) -> list[Metric]:
        return []  # nothing to check for clashes at registration; avoids a collect()

    def collect(self) -> Iterator[Metric]:
        service = GaugeMetricFamily(
            "luma_service_healthy", "1 if the service's last health check passed, else 0.",
            labels=["service"],
        )
        container = GaugeMetricFamily(
            "luma_container_healthy", "1 if the container IP passed its last health check.",
            labels=["service", "ip"],
        )
        router = self.router()
        for host, health in sorted(getattr(router, "health", {}).items()):
            if health.healthy is not None:
                service.add_metric([host], 1.0 if health.healthy else 0.0)
            for ip, ok in sorted(health.containers.items()):
                container.add_metric([host, ip], 1.0 if ok else 0.0)
        yield service
        yield container


class CertExpiryCollector:
    """``not_after`` per host from the providers ``discover`` finds at scrape time."""

    def __init__(self, discover: Callable[[], list[ExpiryProvider]] = list) -> None:
        self.discover = discover

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "luma_certificate_expiry_timestamp_seconds",
            "Unix time at which the host's certificate expires.", labels=["host"],
        )
        seen: dict[str, float] = {}
        for provider in self.discover():
            try:
                seen.update({str(h): float(t) for h, t in provider().items()})
            except Exception as e:  # a broken provider must not break the scrape
                logger.debug("certificate expiry provider failed: %s", e)
        for host, not_after in sorted(seen.items()):
            family.add_metric([host], not_after)
        yield family


# ------------------------------------------------------------ the endpoint
def metrics_response(
    method: str, path: str, accept: str, registry: CollectorRegistry
) -> tuple[int, str, bytes]:
    """(status, content type, body) for one request to the metrics endpoint (HEAD: body too)."""
    if method not in ("GET", "HEAD"):
        return 405, "text/plain; charset=utf-8", b"method not allowed\n"
    if path.partition("?")[0] not in ("/metrics", "/"):
        return 404, "text/plain; charset=utf-8", b"not found: try /metrics\n"
    encoder, content_type = choose_encoder(accept)
    return 200, content_type, encoder(registry)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (raises OSError); IPv6 if the host has a colon."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=64)


class MetricsServer:
    """A minimal HTTP/1.0 server for the registry, in the running event loop."""

    def __init__(self, registry: CollectorRegistry, sock: socket.socket) -> None:
        self.registry = registry
        self.sock = sock
        self.address: tuple[str, int] = sock.getsockname()[:2]
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, sock=self.sock, limit=MAX_REQUEST_HEAD
        )

    def close(self) -> None:
        """Stop listening and drop open scrapes, at once (callable from a sync ``done``)."""
        if self._server is not None:
            self._server.close()
        else:
            self.sock.close()
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            lines = head.decode("latin-1").split("\r\n")
            method, _, rest = lines[0].partition(" ")
            path = rest.partition(" ")[0]
            accept = next((line.partition(":")[2].strip() for line in lines[1:]
                           if line.lower().startswith("accept:")), "")
            status, content_type, body = metrics_response(method, path, accept, self.registry)
            writer.write(
                f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode() + (b"" if method == "HEAD" else body)
            )
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except Exception:
            logger.exception("metrics request failed")
        finally:
            self._writers.discard(writer)
            writer.close()


# ----------------------------------------------------------------- addon
HOT_HOOKS = ("requestheaders", "response", "error", "server_connect_error")


class Metrics:
    """Counts requests on the hot path; serves them with the health view on scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # First: the registry collects in registration order, so pruning precedes the counters.
        self.registry.register(Pruner(self.prune))
        self.requests = Counter(
            "luma_http_requests", "Requests by service and status class.",
            ["service", "status_class"], registry=self.registry,
        )
        self.duration = Histogram(
            "luma_http_request_duration_seconds",
            "Time from a request's first byte to the end of its answer.",
            ["service"], buckets=BUCKETS, registry=self.registry,
        )
        self.in_flight = Gauge(
            "luma_http_requests_in_flight", "Requests being answered now.",
            registry=self.registry, multiprocess_mode="livesum",
        )
        self.connect_errors = Counter(
            "luma_upstream_connect_errors", "Failed connects to containers, by service.",
            ["service"], registry=self.registry,
        )
        self.held = Counter(
            "luma_http_requests_held", "Requests that waited for a container, by service and "
            "outcome (routed, or 503 when the hold timed out).",
            ["service", "outcome"], registry=self.registry,
        )
        self.registry.register(HealthCollector(self.router))
        self.registry.register(CertExpiryCollector(self.cert_providers))
        self.enabled = False
        self.server: MetricsServer | None = None
        self._running = False
        self._task: asyncio.Task[None] | None = None
        self._router: Any | None = None
        self._children: dict[tuple[str, str], Any] = {}
        self._histograms: dict[str, Any] = {}
        self._upstreams: dict[tuple[str, int], str] = {}
        self._services: set[str] = set()  # services with labelled series
        self._hooks(on=False)

    # ----------------------------------------------------------------- options
    def load(self, loader: Any) -> None:
        loader.add_option(
            "luma_metrics_port", int, 0,
            "Serve Prometheus metrics on this port (0: off).",
        )
        loader.add_option(
            "luma_metrics_host", str, "127.0.0.1",
            "Address the metrics port binds (loopback unless told otherwise).",
        )

    def configure(self, updated: set[str]) -> None:
        if not updated & {"luma_metrics_port", "luma_metrics_host"}:
            return
        port, host = ctx.options.luma_metrics_port, ctx.options.luma_metrics_host
        if not 0 <= port <= 65535:
            raise exceptions.OptionsError(f"luma_metrics_port must be 0-65535, not {port}")
        if not host.strip():
            raise exceptions.OptionsError("luma_metrics_host must not be empty")
        self.enabled = port != 0
        self._hooks(on=self.enabled)
        if self._running:
            self._stop()
            self._start()

    # -------------------------------------------------------------- lifecycle
    def running(self) -> None:
        self._running = True
        self._router = None
        self._start()

    def done(self) -> None:
        self._running = False
        self._stop()

    def _start(self) -> None:
        if not self.enabled:
            return
        if os.environ.get(MULTIPROC_ENV):
            # A worker of `run --workers N`: record into the shared directory; the
            # supervisor serves the sum on the port (workers.py).
            return
        host, port = ctx.options.luma_metrics_host, ctx.options.luma_metrics_port
        try:
            sock = bind(host, port)
        except OSError as e:
            logger.error("cannot serve metrics on %s:%s: %s", host, port, e)
            return
        self.server = MetricsServer(self.registry, sock)
        self._task = asyncio.create_task(self.server.start(), name="luma metrics")
        logger.info("metrics on http://%s:%s/metrics", host, self.server.address[1])

    def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.server is not None:
            self.server.close()
            self.server = None

    def router(self) -> Any | None:
        if self._router is None:
            self._router = ctx.master.addons.get("lumaproxy")
        return self._router

    def cert_providers(self) -> list[ExpiryProvider]:
        """``expiry()`` of the certificate addon, found at scrape time (absent: none)."""
        expiry = getattr(ctx.master.addons.get("https"), "expiry", None)
        return [expiry] if callable(expiry) else []

    # -------------------------------------------------------------- hot path
    def _hooks(self, on: bool) -> None:
        """Off, the per-request hooks are absent: disabled metrics cost no dispatch at all.

        mitmproxy (and ``engine.HookTable``, which looks handlers up again after
        every ``configure``) skips a hook attribute that is ``None``.
        """
        for name in HOT_HOOKS:
            if on:
                self.__dict__.pop(name, None)
            else:
                setattr(self, name, None)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Runs after routing: the flow knows its service and container IP."""
        if not self.enabled:
            return
        self.in_flight.inc()
        flow.metadata[IN_FLIGHT] = True
        ip = flow.metadata.get("luma_ip")
        if ip:
            key = (ip, flow.request.port)
            service = flow.metadata.get("luma_service", "")
            # Compared, not just set once: Docker reuses a freed IP for another service.
            if self._upstreams.get(key) != service:
                if len(self._upstreams) >= MAX_UPSTREAMS:
                    self._upstreams.clear()
                self._upstreams[key] = service

    def response(self, flow: http.HTTPFlow) -> None:
        assert flow.response is not None
        self._finish(flow, flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow, error_status(flow))

    def _finish(self, flow: http.HTTPFlow, status: int) -> None:
        if flow.metadata.pop(IN_FLIGHT, None) is None:
            return  # not counted at the start (metrics were off), or counted already
        self.in_flight.dec()
        service = service_host(flow, self.router())
        key = (service, status_class(status))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(*key)
            self._services.add(service)
        child.inc()
        histogram = self._histograms.get(service)
        if histogram is None:
            histogram = self._histograms[service] = self.duration.labels(service)
        histogram.observe(max(0.0, time.time() - flow.request.timestamp_start))
        if flow.metadata.get("luma_held") is not None:
            routed = flow.metadata.get("luma_ip") is not None
            self.held.labels(service, HELD_OUTCOMES[0] if routed else HELD_OUTCOMES[1]).inc()

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        if not self.enabled:
            return
        address = data.server.address
        service = self._upstreams.get((address[0], address[1]), "") if address else ""
        self.connect_errors.labels(service).inc()
        self._services.add(service)

    # ---------------------------------------------------------------- pruning
    def prune(self) -> None:
        """Remove the series of services the routing addon no longer has (at scrape time)."""
        table = getattr(self.router(), "table", None)
        if table is None or os.environ.get(MULTIPROC_ENV):
            return
        self.forget_services(stale_services(self._services, table.services))

    def forget_services(self, services: Iterable[str]) -> None:
        """Drop every labelled series of these services (removed from the registry)."""
        gone = set(services)
        if not gone:
            return
        for key in [k for k in self._children if k[0] in gone]:
            self.requests.remove(*key)
            del self._children[key]
        for service in gone:
            self.duration.remove(service)
            self._histograms.pop(service, None)
            self.connect_errors.remove(service)
            for outcome in HELD_OUTCOMES:
                self.held.remove(service, outcome)
        for key in [k for k, s in self._upstreams.items() if s in gone]:
            del self._upstreams[key]
        self._services -= gone


def supervisor_registry(multiproc_dir: str, state_path: str) -> CollectorRegistry:
    """What ``run --workers``' supervisor serves: the sum of all workers' series, plus
    health and certificate expiry.

    The workers' own health/expiry collectors read their in-memory view, which
    multiprocess mode cannot carry; the same numbers are in the registry
    (written by the health leader) and in ``certs/``, so they are read there.
    """
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from luma_proxy.proxy.certificates import ExpiryCache, certs_dir
    from luma_proxy.store.registry import Store
    from luma_proxy.store.view import EMPTY, read_view

    store = Store(state_path)
    certs = certs_dir(state_path)
    last = [EMPTY]  # a scrape parses only the rows that moved (view.py)

    def view() -> Any:
        try:
            last[0] = read_view(store, last[0])
        except Exception:
            return None
        return last[0]

    expiries = ExpiryCache()  # a scrape parses again only the certificates that changed

    def expiry() -> dict[str, float]:
        state = view()
        # one certificate per host, however many path-prefix routes share it
        ssl = list(dict.fromkeys(s.host for s in state.services.values() if s.ssl)) \
            if state else []
        return expiries.expiries(certs, ssl)

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=multiproc_dir)
    registry.register(HealthCollector(view))
    registry.register(CertExpiryCollector(lambda: [expiry]))
    return registry
