"""The addon's hooks, driven with mitmproxy's own test helpers (taddons, tflow)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from mitmproxy import connection, exceptions
from mitmproxy.addons import proxyserver
from mitmproxy.test import taddons, tflow

from luma_proxy.models import Health, HealthEntry, Service, now
from luma_proxy.proxy.addon import LumaProxy
from luma_proxy.proxy.streaming import ByteCounter
from luma_proxy.store import view
from luma_proxy.store.registry import Store, db_path
from tests.obs_util import call, flow_for, write_state


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return write_state(tmp_path / "state.json")


async def test_routes_to_container_ip_and_keeps_host(state: Path) -> None:
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(state))
        f = flow_for("Blog.Test:80", headers={"X-Forwarded-For": "6.6.6.6"})
        await call([addon], "requestheaders", f)
        assert f.response is None
        assert (f.request.host, f.request.port, f.request.scheme) == ("127.0.0.9", 3000, "http")
        assert f.request.host_header == "Blog.Test:80"
        assert f.request.headers["X-Forwarded-For"] == "203.0.113.7"
        assert f.request.headers["X-Forwarded-Host"] == "Blog.Test:80"
        assert f.metadata["luma_ip"] == "127.0.0.9"


async def test_an_http3_request_goes_to_its_container_over_tcp(state: Path) -> None:
    """A QUIC client's flow starts with a UDP server connection (the client's transport);
    the container is reached over TCP. A TCP client's server connection is left as it is."""
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(state))
        f = flow_for("blog.test")
        f.request.http_version = "HTTP/3"
        f.request.authority = "blog.test"
        f.client_conn.transport_protocol = "udp"
        f.server_conn = connection.Server(address=("127.0.0.1", 1), transport_protocol="udp")
        await call([addon], "requestheaders", f)
        assert f.response is None
        assert f.server_conn.transport_protocol == "tcp"
        assert f.server_conn.address == ("127.0.0.9", 3000)
        assert (f.request.host, f.request.port, f.request.scheme) == ("127.0.0.9", 3000, "http")
        tcp = flow_for("blog.test")
        before = tcp.server_conn
        await call([addon], "requestheaders", tcp)
        assert tcp.server_conn is before


async def test_unknown_unhealthy_and_duplicate_host(state: Path) -> None:
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(state))
        f = flow_for("nope.test")
        await call([addon], "requestheaders", f)
        assert f.response is not None and f.response.status_code == 404
        f = flow_for("down.test")
        await call([addon], "requestheaders", f)
        assert f.response is not None and f.response.status_code == 503
        assert f.response.headers["Retry-After"]
        f = flow_for("blog.test")
        f.request.headers.add("Host", "down.test")
        await call([addon], "requestheaders", f)
        assert f.response is not None and f.response.status_code == 400


async def test_ejected_ip_gives_503_once_the_hold_is_over(state: Path) -> None:
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(state), luma_hold_timeout=0)
        addon.balancer.eject("127.0.0.9", 3000)
        f = flow_for("blog.test")
        await call([addon], "requestheaders", f)
        assert f.response is not None and f.response.status_code == 503
        assert f.response.headers["Retry-After"]
        assert f.metadata["luma_held"] < 0.1  # held, and not for long


async def test_a_held_request_is_routed_when_its_container_is_back(state: Path) -> None:
    """Nothing to route to (the only IP ejected): wait, don't fail."""
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(state), luma_hold_timeout=10)
        addon.balancer.eject("127.0.0.9", 3000)  # 2 s out of rotation
        f = flow_for("blog.test")
        started = time.monotonic()
        await call([addon], "requestheaders", f)
        assert f.response is None and f.request.host == "127.0.0.9"
        assert 1.5 < f.metadata["luma_held"] < 5 and time.monotonic() - started < 5


async def test_routing_is_synchronous_unless_the_alias_must_be_resolved(tmp_path: Path) -> None:
    """The hot path awaits nothing while the alias's IPs are cached (docs/performance.md)."""
    from tests.e2e.docker_double import FakeDockerDNS

    async def up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the proving probe (proving.py)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        writer.close()

    container = await asyncio.start_server(up, "127.0.0.21", 0)
    port = container.sockets[0].getsockname()[1]
    path = tmp_path / "state.json"
    Store(path).update(lambda s: s.services.update({"app.test": Service(
        name="a", host="app.test", target=f"app:{port}", project="p")}))
    with FakeDockerDNS() as dns, contextlib.closing(container):
        dns.set_alias("app", ["127.0.0.21"])
        addon = LumaProxy()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, luma_state=str(path), luma_dns=dns.address, luma_dns_ttl=60)
            first, second = flow_for("app.test"), flow_for("app.test")
            pending = addon.requestheaders(first)
            assert asyncio.iscoroutine(pending) and first.metadata.get("luma_ip") is None
            await pending
            asked = dns.queries["app"]
            assert addon.requestheaders(second) is None  # cached: routed at once
            for f in (first, second):
                assert f.response is None and (f.request.host, f.request.port) == (
                    "127.0.0.21", port)
            assert asked >= 1 and dns.queries["app"] == asked


async def test_a_routing_fault_fails_closed_with_500(state: Path, caplog) -> None:
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(state))
        addon.balancer = None  # any fault inside routing
        f = flow_for("blog.test")
        assert addon.requestheaders(f) is None
        assert f.response is not None and f.response.status_code == 500
        assert f.request.host == "127.0.0.1"  # never sent anywhere
        assert "routing failed for blog.test" in caplog.text


def test_bad_options_are_refused(tmp_path: Path) -> None:
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(addon, luma_dns="not-an-ip:53")
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(addon, luma_dns_ttl=-1)
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(addon, luma_trusted_proxies="10.0.0.0/99")
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(addon, luma_health_interval=0)


def test_sets_engine_options_it_needs(tmp_path: Path) -> None:
    addon = LumaProxy()
    with taddons.context(proxyserver.Proxyserver(), addon) as tctx:
        assert tctx.options.keep_host_header is True
        assert tctx.options.connection_strategy == "lazy"
        assert tctx.options.mode[0].startswith("reverse:")


def test_sse_unsized_and_large_responses_are_streamed() -> None:
    addon = LumaProxy()
    with taddons.context(addon):
        f = tflow.tflow(resp=True)
        f.response.headers["content-type"] = "text/event-stream"
        addon.responseheaders(f)
        assert f.response.stream
        f = tflow.tflow(resp=True)
        f.response.headers["content-length"] = str(2 << 20)
        addon.responseheaders(f)
        assert f.response.stream
        f = tflow.tflow(resp=True)
        f.response.headers["content-length"] = "10"
        addon.responseheaders(f)
        assert not f.response.stream
        counted = tflow.tflow(resp=True)
        del counted.response.headers["content-length"]
        counted.response.stream = len  # another addon's callable is kept, and counted
        addon.responseheaders(counted)
        assert isinstance(counted.response.stream, ByteCounter)
        assert counted.response.stream.inner is len


async def test_large_uploads_stream_and_are_closed_when_answered_here(state: Path) -> None:
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(state))
        routed = flow_for("blog.test", headers={"Content-Length": str(2 << 20)})
        await call([addon], "requestheaders", routed)
        assert isinstance(routed.request.stream, ByteCounter) and routed.response is None
        small = flow_for("blog.test", headers={"Content-Length": "10"})
        await call([addon], "requestheaders", small)
        assert not small.request.stream
        unknown = flow_for("nope.test", headers={"Content-Length": str(2 << 20)})
        await call([addon], "requestheaders", unknown)
        # 404 without reading 2 MiB into memory: the connection is closed instead.
        assert unknown.response.status_code == 404 and unknown.error is not None


def test_client_leaving_during_connect_does_not_eject_the_container() -> None:
    """mitmproxy cancels a pending upstream connect when the client goes away; the
    container did nothing wrong, so it must stay in rotation (a refusal still ejects)."""
    from mitmproxy.proxy import server_hooks
    from mitmproxy.test import tflow as tf

    addon = LumaProxy()
    client, server = tf.tclient_conn(), tf.tserver_conn()
    server.address = ("127.0.0.9", 3000)
    server.error = "client disconnected"
    addon.server_connect_error(server_hooks.ServerConnectionHookData(server=server, client=client))
    assert not addon.balancer.is_ejected("127.0.0.9", 3000)
    server.error = "Connection refused"
    addon.server_connect_error(server_hooks.ServerConnectionHookData(server=server, client=client))
    assert addon.balancer.is_ejected("127.0.0.9", 3000)


# ------------------------------------------------------------------ the registry and health
def deploy(path: Path, host: str, target: str, **fields: object) -> Service:
    service = Service(name="x", host=host, target=target, project="p", **fields)  # type: ignore[arg-type]
    store = Store(path)
    with store.transaction() as tx:
        tx.put(service)
    store.close()  # as the CLI's process ends: no connection of ours outlives the write
    return service


def set_health(path: Path, host: str, healthy: bool, target: str | None = None,
               at: datetime | None = None, containers: dict[str, bool] | None = None) -> None:
    """Write ``host``'s entry as the health leader would, for ``target`` (default: as
    deployed), with what each container's probe gave."""
    with Store(path).transaction() as tx:
        service = tx.service(host)
        assert service is not None
        key = service.routing_key() if target is None else (target, *service.routing_key()[1:])
        health = Health(healthy=healthy, checked_at=at or now(), containers=containers or {})
        tx.put_health(host, HealthEntry.of(key, health))


def test_health_in_force_is_the_entry_for_the_target_deployed(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    deploy(path, "blog.test", "127.0.0.9:3000")
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(path))
        assert addon.health == {}
        set_health(path, "blog.test", False)
        assert addon.reload() is True
        assert addon.health["blog.test"].healthy is False
        # An entry observed for another target says nothing about this one.
        set_health(path, "blog.test", True, target="127.0.0.7:3000")
        addon.reload()
        assert "blog.test" not in addon.health
        set_health(path, "blog.test", False)
        addon.reload()
        # A deploy to a new target drops the health in force: it must prove itself.
        deploy(path, "blog.test", "127.0.0.8:3000")
        addon.reload()
        assert "blog.test" not in addon.health
        set_health(path, "blog.test", False)
        addon.reload()
        assert addon.health["blog.test"].healthy is False
        # A change that keeps the target keeps the health in force.
        deploy(path, "blog.test", "127.0.0.8:3000", app="renamed")
        addon.reload()
        assert addon.health["blog.test"].healthy is False
        # The later write wins, whatever its clock says (a wall-clock step back,
        # a VM resumed): an entry written after ours carries an earlier time.
        set_health(path, "blog.test", True, at=now() + timedelta(hours=1))
        addon.reload()
        assert addon.health["blog.test"].healthy is True
        set_health(path, "blog.test", False, at=now() - timedelta(minutes=1))
        addon.reload()
        assert addon.health["blog.test"].healthy is False


def test_restart_serves_stored_health_before_any_check(tmp_path: Path) -> None:
    path = write_state(tmp_path / "state.json")  # down.test stored unhealthy
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(path))  # a fresh process: no check ran
        assert addon.health["down.test"].healthy is False
        assert "blog.test" not in addon.health


async def test_an_old_state_file_is_imported_with_its_health(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    down = Service(name="d", host="down.test", target="127.0.0.8:3000", project="q")
    raw = {"version": 1, "settings": {}, "services": {
        "down.test": {**down.model_dump(mode="json"), "health": {
            "healthy": False, "checked_at": now().isoformat(), "last_error": "HTTP 503",
            "containers": {}}},
        "blog.test": Service(name="b", host="blog.test", target="127.0.0.9:3000",
                             project="p").model_dump(mode="json")}}
    path.write_text(json.dumps(raw, indent=2))  # as an early luma-proxy wrote it
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(path))
        f = flow_for("down.test")
        await call([addon], "requestheaders", f)
        assert f.response is not None and f.response.status_code == 503
        assert addon.health["down.test"].last_error == "HTTP 503"
        assert (tmp_path / "state.json.imported.json").read_text() == json.dumps(raw, indent=2)
        assert not path.exists()  # nobody edits a file that is no longer read
        set_health(path, "down.test", True)
        addon.reload()
        assert addon.health["down.test"].healthy is True


def corrupt_row(path: Path, host: str, data: str) -> None:
    """A row no writer of ours would write (a hand edit, a newer version), as a new generation."""
    with contextlib.closing(sqlite3.connect(db_path(path))) as db, db:
        db.execute("UPDATE services SET data = ?, gen = gen + 1000 WHERE host = ?", (data, host))
        db.execute("UPDATE meta SET value = value + 1000 WHERE key = 'routes'")


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The hosts whose service rows the view parses, in order."""
    hosts: list[str] = []
    real = view.parse_service
    monkeypatch.setattr(view, "parse_service",
                        lambda host, data: hosts.append(host) or real(host, data))
    return hosts


async def test_an_invalid_row_keeps_its_last_good_version_and_is_parsed_once(
        state: Path, parsed: list[str], caplog) -> None:
    """One bad row costs nothing else; it is not re-validated on every poll."""
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(state))
        corrupt_row(state, "blog.test", '{"host": "blog.test", "target": "nope"}')
        parsed.clear()
        for _ in range(5):
            await addon.reload_in_background()
        assert parsed == ["blog.test"]
        assert caplog.text.count("service 'blog.test' is invalid") == 1
        assert (await _route(addon, "blog.test")).request.host == "127.0.0.9"  # last good kept
        assert (await _route(addon, "down.test")).response.status_code == 503
        deploy(state, "blog.test", "127.0.0.7:3000")  # a good version again
        await addon.reload_in_background()
        assert (await _route(addon, "blog.test")).request.host == "127.0.0.7"


async def test_two_reloads_at_once_read_and_swap_once(state: Path, parsed: list[str]) -> None:
    """The poll and the health leader's write may both ask: the second waits for the
    first, finds nothing newer, and never compares views on the event loop."""
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(state))
        deploy(state, "blog.test", "127.0.0.7:3000")
        parsed.clear()
        swapped = await asyncio.gather(addon.reload_in_background(),
                                       addon.reload_in_background())
        assert swapped == [True, False] and parsed == ["blog.test"]
        assert (await _route(addon, "blog.test")).request.host == "127.0.0.7"


async def test_health_results_go_to_the_registry_and_leave_routes_alone(tmp_path: Path) -> None:
    path = write_state(tmp_path / "state.json")
    store = Store(path)
    routes = store.generation()
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(path))
        blog, down = addon.table.services["blog.test"], addon.table.services["down.test"]
        await addon.schedule.save({
            "blog.test": (blog.routing_key(), Health(healthy=True, checked_at=now())),
            "down.test": (down.routing_key(), Health(healthy=True, checked_at=now())),
            # checked for a target it no longer has: not written
            "gone.test": (("x:1", "/up", "gone.test", True), Health(healthy=False))})
        assert store.generation() == routes
        entries = store.read_health()
        assert sorted(entries) == ["blog.test", "down.test"]
        assert entries["down.test"].healthy is True and entries["down.test"].target == down.target
        assert addon.health["down.test"].healthy is True  # in force at once
        # A check of a target blog.test no longer has is neither applied nor written.
        await addon.schedule.save({"blog.test": (("old:1", "/up", "blog.test", True),
                                               Health(healthy=False, checked_at=now()))})
        assert addon.health["blog.test"].healthy is True
        assert store.read_health()["blog.test"].healthy is True
        # A removed host's entry is dropped with the next write.
        with store.transaction() as tx:
            tx.delete("down.test")
        addon.reload()
        await addon.schedule.save({"blog.test": (blog.routing_key(),
                                               Health(healthy=False, checked_at=now()))})
        assert sorted(store.read_health()) == ["blog.test"]


async def test_a_round_that_changes_no_health_moves_nothing(tmp_path: Path) -> None:
    """Only ``checked_at`` moved: no generation, so no process re-reads anything."""
    path = write_state(tmp_path / "state.json")
    store = Store(path)
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(path))
        down = addon.table.services["down.test"]
        before = store.snapshot()
        in_force = addon.health["down.test"]
        later = now() + timedelta(seconds=30)
        await addon.schedule.save({"down.test": (down.routing_key(), Health(
            healthy=False, checked_at=later, changed_at=in_force.changed_at))})
        after = store.snapshot()
        assert (after.routes_gen, after.health_gen) == (before.routes_gen, before.health_gen)
        assert store.read_health()["down.test"].checked_at == later  # yet it is stored
        assert addon.health["down.test"] is in_force


def test_one_deploy_on_a_large_registry_touches_only_that_service(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 3000
    path = tmp_path / "state.json"
    with Store(path).transaction() as tx:
        for i in range(n):
            service = Service(name="x", host=f"h{i}.test", target=f"app{i}:3000", project="p")
            tx.put(service)
            tx.put_health(service.host, HealthEntry.of(
                service.routing_key(), Health(healthy=True, checked_at=now())))
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(path))
        assert len(addon.table.services) == n and len(addon.health) == n
        before_services = dict(addon.table.services)
        before_health = dict(addon.health)

        parsed: list[str] = []
        real = view.parse_service
        monkeypatch.setattr(view, "parse_service",
                            lambda host, data: parsed.append(host) or real(host, data))
        swaps: list[tuple[list[str], list[str]]] = []
        original_update = addon.table.update

        def update(services, changed, removed):  # type: ignore[no-untyped-def]
            swaps.append((list(changed), list(removed)))
            return original_update(services, changed, removed)

        monkeypatch.setattr(addon.table, "update", update)
        # One transaction: h7 moves, h9 is removed, new.test is added.
        with Store(path).transaction() as tx:
            h7 = tx.service("h7.test")
            assert h7 is not None
            tx.put(h7.model_copy(update={"target": "moved:1"}))
            tx.delete("h9.test")
            tx.put(Service(name="n", host="new.test", target="app1:3000", project="p"))
        assert addon.reload() is True

        assert sorted(parsed) == ["h7.test", "new.test"]  # only the rows that moved
        assert swaps == [(["h7.test", "new.test"], ["h9.test"])] or swaps == [
            (["new.test", "h7.test"], ["h9.test"])]
        after = addon.table.services
        assert len(after) == n
        same = [h for h in after if after[h] is before_services.get(h)]
        assert len(same) == n - 2  # every other service is the very same object
        assert [h for h, health in addon.health.items() if health is not before_health.get(h)
                ] == []  # no health entry was replaced ...
        assert "h7.test" not in addon.health and "h9.test" not in addon.health  # ... only dropped


async def _route(addon: LumaProxy, host: str):
    f = flow_for(host)
    await call([addon], "requestheaders", f)
    return f


async def test_leader_results_are_written_after_a_wall_clock_step_back(tmp_path: Path) -> None:
    """An entry stamped an hour ahead (the clock then stepped back) must not freeze health."""
    path = tmp_path / "state.json"
    deploy(path, "blog.test", "127.0.0.9:3000")
    store = Store(path)
    set_health(path, "blog.test", False, at=now() + timedelta(hours=1))
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(path))
        service = addon.table.services["blog.test"]
        fresh = Health(healthy=True, checked_at=now())
        await addon.schedule.save({"blog.test": (service.routing_key(), fresh)})
        assert store.read_health()["blog.test"].healthy is True
        assert addon.health["blog.test"].healthy is True


# ------------------------------------------------------------------ passive ejection
async def test_a_passing_health_check_lifts_a_passive_ejection_at_once(tmp_path: Path) -> None:
    """A flapped single replica, healthy again, is served at once, not after its backoff."""
    path = tmp_path / "state.json"
    deploy(path, "blog.test", "127.0.0.9:3000")
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(path), luma_hold_timeout=0)
        for i in range(4):  # it flapped: the backoff grew to 16 s
            addon.balancer.eject("127.0.0.9", 3000, now=time.monotonic() - 30 * (3 - i))
        f = flow_for("blog.test")
        await call([addon], "requestheaders", f)
        assert f.response is not None and f.response.status_code == 503
        set_health(path, "blog.test", True, containers={"127.0.0.9": True})  # the check passed
        assert addon.reload()
        f = flow_for("blog.test")
        await call([addon], "requestheaders", f)
        assert f.response is None and f.request.host == "127.0.0.9"


async def test_a_failing_health_check_does_not_lift_an_ejection(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    deploy(path, "blog.test", "127.0.0.9:3000")
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(path), luma_hold_timeout=0)
        addon.balancer.eject("127.0.0.9", 3000)
        set_health(path, "blog.test", True, containers={"127.0.0.9": False, "127.0.0.10": True})
        addon.reload()
        assert addon.balancer.is_ejected("127.0.0.9", 3000)


async def test_an_ip_that_leaves_its_alias_is_forgotten(tmp_path: Path) -> None:
    """Its next container (Docker reuses addresses) must not inherit its ejection."""
    path = tmp_path / "state.json"
    deploy(path, "app.test", "app:3000")
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(path))
        addon.prover.usable("app", 3000, ("10.0.0.1", "10.0.0.2"), "/up")
        addon.balancer.eject("10.0.0.2", 3000)
        addon.prover.usable("app", 3000, ("10.0.0.1",), "/up")  # the answer without it
        assert not addon.balancer.is_ejected("10.0.0.2", 3000)
        assert not addon.balancer.knows("10.0.0.2")
        addon.balancer.eject("10.0.0.1", 3000)
        addon.engine_changed([("gone", "10.0.0.1")])  # the engine: its container is gone
        assert not addon.balancer.is_ejected("10.0.0.1", 3000)
        assert not addon.balancer.knows("10.0.0.1")
        addon.prover.close()


async def test_a_removed_service_leaves_no_state_on_its_ips(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    deploy(path, "blog.test", "127.0.0.9:3000")
    deploy(path, "shop.test", "127.0.0.10:3000")
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(path), luma_hold_timeout=0)
        for host in ("blog.test", "shop.test"):
            await call([addon], "requestheaders", flow_for(host))
        addon.balancer.eject("127.0.0.9", 3000)
        addon.balancer.eject("127.0.0.10", 3000)
        with Store(path).transaction() as tx:
            tx.delete("blog.test")
        assert addon.reload()
        assert not addon.balancer.is_ejected("127.0.0.9", 3000)
        assert not addon.balancer.knows("127.0.0.9")
        assert addon.balancer.is_ejected("127.0.0.10", 3000)


def test_a_recreated_registry_is_taken_whole_whatever_its_generations(tmp_path: Path) -> None:
    """The database removed with its journal and created again by the next deploy starts
    its generations again: the proxy must serve it, not keep the newer-numbered view."""
    path = tmp_path / "state.json"
    for i in range(5):
        deploy(path, f"h{i}.test", f"127.0.0.{i + 1}:3000")  # generation 5
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(path))
        assert len(addon.table.services) == 5
        for name in ("state.db", "state.db-wal", "state.db-shm"):
            (tmp_path / name).unlink(missing_ok=True)
        deploy(path, "recreated.test", "127.0.0.9:3000")  # generation 1 of a new database
        assert addon.reload() is True
        assert list(addon.table.services) == ["recreated.test"]
        deploy(path, "next.test", "127.0.0.8:3000")  # and it follows it from there
        assert addon.reload() is True
        assert sorted(addon.table.services) == ["next.test", "recreated.test"]


def test_a_registry_restored_with_import_replace_is_served_live(tmp_path: Path) -> None:
    """The supported live restore: ``luma-proxy import FILE --replace`` of an export."""
    path = tmp_path / "state.json"
    deploy(path, "kept.test", "127.0.0.1:3000")
    backup = Store(path)
    exported = backup.export_json()
    backup.close()
    deploy(path, "later.test", "127.0.0.2:3000")
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(path))
        assert sorted(addon.table.services) == ["kept.test", "later.test"]
        store = Store(path)
        store.import_json(exported, replace=True)
        store.close()
        assert addon.reload() is True
        assert list(addon.table.services) == ["kept.test"]
