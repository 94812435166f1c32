"""The lean master of ``luma-proxy run``: its addon list and its hook dispatch."""

from __future__ import annotations

from mitmproxy import addonmanager, options

from luma_proxy.proxy import engine, server


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
