"""The lean master of ``luma-proxy run``: its addon list, hook dispatch and listeners."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
from mitmproxy import addonmanager, options

from luma_proxy.proxy import engine, server
from luma_proxy.runtime.runconfig import RunConfig


async def test_lean_master_dispatches_through_the_hook_table() -> None:
    lean = server.lean_master(options.Options(), {})
    assert isinstance(lean.addons, engine.HookTable)


async def test_mitmproxys_manager_on_request() -> None:
    lean = server.lean_master(options.Options(), {"LUMA_PROXY_DISPATCH": "mitmproxy"})
    assert type(lean.addons) is addonmanager.AddonManager


def test_ours_come_before_tlsconfig() -> None:
    class Ours:
        pass

    names = [type(a).__name__ for a in server.lean_addons([Ours()])]
    assert names == ["Core", "Proxyserver", "NextLayer", "Ours", "TlsConfig"]


def test_modes_one_tcp_listener_per_port() -> None:
    assert server.modes(RunConfig(http_port=80, https_port=443)) == [
        "reverse:http://127.0.0.1:1/@0.0.0.0:80", "reverse:http://127.0.0.1:1/@0.0.0.0:443"]
    assert server.modes(RunConfig(http_port=80)) == ["reverse:http://127.0.0.1:1/@0.0.0.0:80"]


def test_http3_adds_a_udp_listener_on_the_https_port_in_one_process_only(
        caplog: pytest.LogCaptureFixture) -> None:
    tcp = ["reverse:http://127.0.0.1:1/@127.0.0.1:8080",
           "reverse:http://127.0.0.1:1/@127.0.0.1:8443"]
    quic = "reverse:http3://127.0.0.1:1/@127.0.0.1:8443"
    config = RunConfig(listen_host="127.0.0.1", http_port=8080, https_port=8443, http3=True)
    assert server.modes(config) == [*tcp, quic]
    assert server.modes(replace(config, worker_index=0)) == [*tcp, quic]  # worker 0 owns it
    with caplog.at_level(logging.INFO, logger="luma_proxy"):
        # mitmproxy_rs binds UDP without SO_REUSEPORT: the other workers would fail to bind.
        assert server.modes(replace(config, worker_index=1)) == tcp
    assert [r.getMessage() for r in caplog.records] == [
        "HTTP/3 on 127.0.0.1:8443/udp is served by worker 0, not this worker"]
    assert server.modes(replace(config, http3=False)) == tcp
    assert server.modes(replace(config, https_port=0)) == tcp[:1]  # no HTTPS port, no QUIC
