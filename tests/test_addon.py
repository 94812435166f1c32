"""The addon's hooks, driven with mitmproxy's own test helpers (taddons, tflow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.addons import proxyserver
from mitmproxy.test import taddons, tflow

from luma_proxy.addon import LumaProxy
from tests.obs_util import flow_for, write_state


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return write_state(tmp_path / "state.json")


async def test_routes_to_container_ip_and_keeps_host(state: Path) -> None:
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(state))
        f = flow_for("Blog.Test:80", headers={"X-Forwarded-For": "6.6.6.6"})
        await addon.requestheaders(f)
        assert f.response is None
        assert (f.request.host, f.request.port, f.request.scheme) == ("127.0.0.9", 3000, "http")
        assert f.request.host_header == "Blog.Test:80"
        assert f.request.headers["X-Forwarded-For"] == "203.0.113.7"
        assert f.request.headers["X-Forwarded-Host"] == "Blog.Test:80"
        assert f.metadata["luma_ip"] == "127.0.0.9"


async def test_unknown_unhealthy_and_duplicate_host(state: Path) -> None:
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(state))
        f = flow_for("nope.test")
        await addon.requestheaders(f)
        assert f.response is not None and f.response.status_code == 404
        f = flow_for("down.test")
        await addon.requestheaders(f)
        assert f.response is not None and f.response.status_code == 503
        assert f.response.headers["Retry-After"]
        f = flow_for("blog.test")
        f.request.headers.add("Host", "down.test")
        await addon.requestheaders(f)
        assert f.response is not None and f.response.status_code == 400


async def test_ejected_ip_gives_503(state: Path) -> None:
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(state))
        addon.balancer.eject("127.0.0.9", 3000)
        f = flow_for("blog.test")
        await addon.requestheaders(f)
        assert f.response is not None and f.response.status_code == 503


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


def test_corrupt_state_keeps_last_good_view(state: Path) -> None:
    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(state))
        assert set(addon.table.services) == {"blog.test", "down.test"}
        state.write_text('{"version": 1, "services": {')
        assert addon.reload() is False
        assert set(addon.table.services) == {"blog.test", "down.test"}
        state.write_text('{"version": 7}')
        assert addon.reload() is False
        state.write_text('{"version": 1, "services": {}}')
        assert addon.reload() is True
        assert addon.table.services == {}


def test_sse_and_unsized_responses_are_streamed() -> None:
    addon = LumaProxy()
    with taddons.context(addon):
        f = tflow.tflow(resp=True)
        f.response.headers["content-type"] = "text/event-stream"
        addon.responseheaders(f)
        assert f.response.stream
        f = tflow.tflow(resp=True)
        f.response.headers["content-length"] = "10"
        addon.responseheaders(f)
        assert not f.response.stream


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
