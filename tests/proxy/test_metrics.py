"""Metrics: counted on the hot path, health and certificates read at scrape time, served locally."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy import connection, exceptions, flow
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from luma_proxy.models import Health
from luma_proxy.proxy.addon import LumaProxy
from luma_proxy.proxy.metrics import HOT_HOOKS, CertExpiryCollector, Metrics, metrics_response
from luma_proxy.proxy.requestid import RequestId
from tests.e2e.docker_double import free_port
from tests.obs_util import call, flow_for, through, write_state


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return samples(generate_latest(m.registry).decode()).get((name, frozenset(labels.items())))


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[tuple[list, taddons.context]]:
    addons = [RequestId(), LumaProxy(), Metrics()]
    with taddons.context(*addons) as tctx:
        tctx.configure(addons[1], luma_state=str(write_state(tmp_path / "state.json")))
        tctx.configure(addons[2], luma_metrics_port=free_port())  # on, but not serving
        yield addons, tctx


async def test_requests_by_service_and_status_class(chain) -> None:
    addons, _ = chain
    m = addons[2]
    for host in ("blog.test", "blog.test", "nope.test", "down.test"):
        await through(addons, flow_for(host))
    assert value(m, "luma_http_requests_total", service="blog.test", status_class="2xx") == 2
    assert value(m, "luma_http_requests_total", service="", status_class="4xx") == 1
    assert value(m, "luma_http_requests_total", service="down.test", status_class="5xx") == 1
    assert value(m, "luma_http_request_duration_seconds_count", service="blog.test") == 2
    assert value(m, "luma_http_requests_in_flight") == 0


async def test_in_flight_and_errors(chain) -> None:
    addons, _ = chain
    m = addons[2]
    f = flow_for("blog.test")
    await call(addons, "requestheaders", f)
    assert value(m, "luma_http_requests_in_flight") == 1
    f.error = flow.Error("Client disconnected.")
    await call(addons, "error", f)
    await call(addons, "error", f)  # counted once
    assert value(m, "luma_http_requests_in_flight") == 0
    assert value(m, "luma_http_requests_total", service="blog.test", status_class="4xx") == 1


async def test_connect_errors_by_service(chain) -> None:
    addons, _ = chain
    m = addons[2]
    await call(addons, "requestheaders", flow_for("blog.test"))
    server = connection.Server(address=("127.0.0.9", 3000))
    m.server_connect_error(server_hooks.ServerConnectionHookData(server, connection.Client(
        peername=("1.2.3.4", 5), sockname=("0.0.0.0", 80), timestamp_start=0)))
    assert value(m, "luma_upstream_connect_errors_total", service="blog.test") == 1


async def test_off_by_default_counts_nothing(tmp_path: Path) -> None:
    addons = [RequestId(), LumaProxy(), Metrics()]
    with taddons.context(*addons) as tctx:
        tctx.configure(addons[1], luma_state=str(write_state(tmp_path / "state.json")))
        assert tctx.options.luma_metrics_port == 0
        assert tctx.options.luma_metrics_host == "127.0.0.1"
        await through(addons, flow_for("blog.test"))
        assert value(addons[2], "luma_http_requests_total", service="blog.test",
                     status_class="2xx") is None
        # Off, the per-request hooks are absent: no dispatch cost at all.
        assert all(getattr(addons[2], name) is None for name in HOT_HOOKS)
        tctx.configure(addons[2], luma_metrics_port=free_port())
        assert all(callable(getattr(addons[2], name)) for name in HOT_HOOKS)
        await through(addons, flow_for("blog.test"))
        assert value(addons[2], "luma_http_requests_total", service="blog.test",
                     status_class="2xx") == 1


def test_bad_options_are_refused() -> None:
    m = Metrics()
    with taddons.context(m) as tctx:
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(m, luma_metrics_port=70000)
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(m, luma_metrics_host=" ")


async def test_health_per_service_and_container_at_scrape_time(chain) -> None:
    addons, _ = chain
    router, m = addons[1], addons[2]
    router.health["blog.test"] = Health(healthy=True,
                                        containers={"127.0.0.9": True, "127.0.0.10": False})
    router.health["new.test"] = Health()  # not checked yet: no series
    assert value(m, "luma_service_healthy", service="blog.test") == 1
    assert value(m, "luma_service_healthy", service="down.test") == 0
    assert value(m, "luma_service_healthy", service="new.test") is None
    assert value(m, "luma_container_healthy", service="blog.test", ip="127.0.0.9") == 1
    assert value(m, "luma_container_healthy", service="blog.test", ip="127.0.0.10") == 0
    router.health["blog.test"] = Health(healthy=False, containers={"127.0.0.9": False})
    assert value(m, "luma_service_healthy", service="blog.test") == 0
    assert value(m, "luma_container_healthy", service="blog.test", ip="127.0.0.10") is None


class FakeCertificates:
    name = "https"

    def expiry(self) -> dict[str, float]:
        return {"blog.test": 1_800_000_000.0}


def test_certificate_expiry_from_the_certificate_addon() -> None:
    m = Metrics()
    with taddons.context(FakeCertificates(), m):
        name = "luma_certificate_expiry_timestamp_seconds"
        assert value(m, name, host="blog.test") == 1_800_000_000
    with taddons.context(Metrics()) as tctx:  # no certificate addon: no series, no error
        assert tctx.master.addons.get("https") is None


def test_a_broken_expiry_provider_does_not_break_the_scrape() -> None:
    def broken() -> dict[str, float]:
        raise RuntimeError("store is being rebuilt")

    collector = CertExpiryCollector(lambda: [broken, lambda: {"shop.test": 1_900_000_000}])
    (family,) = collector.collect()
    assert [(s.labels, s.value) for s in family.samples] == [({"host": "shop.test"},
                                                                1_900_000_000)]


def test_metrics_response() -> None:
    m = Metrics()
    status, content_type, body = metrics_response("GET", "/metrics", "", m.registry)
    assert status == 200 and content_type.startswith("text/plain")
    assert b"luma_http_requests_in_flight" in body
    openmetrics = metrics_response("GET", "/metrics", "application/openmetrics-text", m.registry)
    assert openmetrics[1].startswith("application/openmetrics-text")
    assert metrics_response("POST", "/metrics", "", m.registry)[0] == 405
    assert metrics_response("GET", "/admin", "", m.registry)[0] == 404


async def scrape(port: int, host: str = "127.0.0.1", request: bytes | None = None) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request or b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


async def test_served_on_loopback_from_running_and_stopped_in_done() -> None:
    m = Metrics()
    port = free_port()
    with taddons.context(m) as tctx:
        tctx.configure(m, luma_metrics_port=port)
        m.running()
        await asyncio.sleep(0.05)
        reply = await scrape(port)
        assert reply.startswith(b"HTTP/1.1 200 ") and b"luma_http_requests_in_flight 0" in reply
        assert (await scrape(port, request=b"GET /x HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        with pytest.raises(OSError):
            await scrape(port, host="127.0.0.2")  # bound to 127.0.0.1 only
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.05)  # accepted and waiting for its request
        m.done()
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # open scrapes are dropped
        idle_writer.close()
        with pytest.raises(OSError):
            await scrape(port)


async def test_port_in_use_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    busy = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = busy.sockets[0].getsockname()[1]
    try:
        with taddons.context(m) as tctx:
            tctx.configure(m, luma_metrics_port=port)
            m.running()
            assert m.server is None
            assert "cannot serve metrics" in caplog.text
            m.done()
    finally:
        busy.close()


async def test_a_worker_records_but_leaves_the_port_to_the_supervisor(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    m = Metrics()
    port = free_port()
    with taddons.context(m) as tctx:
        tctx.configure(m, luma_metrics_port=port)
        m.running()
        assert m.enabled and m.server is None
        with pytest.raises(OSError):
            await scrape(port)
        m.done()


async def test_held_requests_are_counted_by_outcome(chain) -> None:
    addons, tctx = chain
    m, router = addons[2], addons[1]
    tctx.configure(router, luma_hold_timeout=0.3)
    router.balancer.eject("127.0.0.9", 3000)  # nothing to route to for 2 s
    held = await through(addons, flow_for("blog.test"))
    assert held.response is not None and held.response.status_code == 503
    router.balancer.restore("127.0.0.9", 3000)
    await through(addons, flow_for("blog.test"))  # not held: not counted
    assert value(m, "luma_http_requests_held_total", service="blog.test", outcome="503") == 1
    assert value(m, "luma_http_requests_held_total", service="blog.test",
                 outcome="routed") is None


async def test_a_removed_service_has_no_series_left(chain, tmp_path: Path) -> None:
    """Series of hosts no longer deployed go at the next scrape: removed hosts don't pile up."""
    from luma_proxy.store.registry import Store

    addons, tctx = chain
    m, router = addons[2], addons[1]
    tctx.configure(router, luma_hold_timeout=0)
    await through(addons, flow_for("blog.test"))
    router.balancer.eject("127.0.0.9", 3000)
    await through(addons, flow_for("blog.test"))  # held, then 503
    server = connection.Server(address=("127.0.0.9", 3000))
    m.server_connect_error(server_hooks.ServerConnectionHookData(server, connection.Client(
        peername=("1.2.3.4", 5), sockname=("0.0.0.0", 80), timestamp_start=0)))
    await through(addons, flow_for("down.test"))
    text = metrics_response("GET", "/metrics", "", m.registry)[2].decode()
    assert 'service="blog.test"' in text
    Store(tmp_path / "state.json").update(lambda s: s.services.pop("blog.test"))
    assert router.reload()
    text = metrics_response("GET", "/metrics", "", m.registry)[2].decode()
    assert 'blog.test' not in text
    assert 'service="down.test"' in text  # still deployed: kept
    await through(addons, flow_for("blog.test"))  # now an unknown host: counted under ""
    assert value(m, "luma_http_requests_total", service="", status_class="4xx") == 1
