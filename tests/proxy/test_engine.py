"""HookTable dispatches like mitmproxy's AddonManager, with the lookups cached."""

from __future__ import annotations

import logging

import pytest
from mitmproxy import addonmanager, exceptions, hooks
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow

from luma_proxy.proxy import engine


class Recorder:
    """Records (name, hook, flow id) for every hook it has."""

    def __init__(self, name: str, calls: list[tuple[str, str]]) -> None:
        self.name = name
        self.calls = calls

    def request(self, flow: object) -> None:
        self.calls.append((self.name, "request"))

    def response(self, flow: object) -> None:
        self.calls.append((self.name, "response"))


class Parent(Recorder):
    def __init__(self, name: str, calls: list[tuple[str, str]], child: Recorder) -> None:
        super().__init__(name, calls)
        self.addons = [child]


class Failing(Recorder):
    def request(self, flow: object) -> None:
        self.calls.append((self.name, "request"))
        raise ValueError("boom")


class Halting(Recorder):
    def request(self, flow: object) -> None:
        self.calls.append((self.name, "request"))
        raise exceptions.AddonHalt()


class AsyncRecorder(Recorder):
    async def request(self, flow: object) -> None:
        self.calls.append((self.name, "request-async"))


class AsyncFailing(Recorder):
    async def request(self, flow: object) -> None:
        self.calls.append((self.name, "request-async"))
        raise ValueError("async boom")


class AsyncHalting(Recorder):
    async def request(self, flow: object) -> None:
        self.calls.append((self.name, "request-async"))
        raise exceptions.AddonHalt()


class Updates(Recorder):
    def update(self, flows: list[object]) -> None:
        self.calls.append((self.name, f"update {len(flows)}"))


def manager_with(kind: type[addonmanager.AddonManager], *addons: object) -> tuple:
    """A taddons master whose manager is ``kind`` holding ``addons``."""
    ctx = taddons.context()
    ctx.__enter__()
    m = ctx.master
    m.addons = kind(m)
    m.addons.add(*addons)
    return ctx, m.addons


def chain(calls: list[tuple[str, str]]) -> list[object]:
    return [Recorder("a", calls), Parent("b", calls, Recorder("b.child", calls)),
            AsyncRecorder("c", calls), Recorder("d", calls)]


@pytest.mark.parametrize("hook", ["request", "response"])
async def test_same_order_and_calls_as_mitmproxys_manager(hook: str) -> None:
    theirs: list[tuple[str, str]] = []
    ours: list[tuple[str, str]] = []
    ctx1, reference = manager_with(addonmanager.AddonManager, *chain(theirs))
    ctx2, table = manager_with(engine.HookTable, *chain(ours))
    event = hooks.all_hooks[hook](tflow.tflow(resp=True))
    await reference.handle_lifecycle(event)
    await table.handle_lifecycle(event)
    assert ours == theirs
    assert [name for name, _ in ours][:2] == ["a", "b"]
    assert ("b.child", hook) in ours
    ctx1.__exit__(None, None, None)
    ctx2.__exit__(None, None, None)


async def test_an_error_is_logged_and_skips_only_that_addons_tree(caplog) -> None:
    calls: list[tuple[str, str]] = []
    failing = Failing("x", calls)
    failing.addons = [Recorder("x.child", calls)]  # type: ignore[attr-defined]
    ctx, table = manager_with(engine.HookTable, failing, Recorder("y", calls))
    with caplog.at_level(logging.ERROR):
        await table.trigger_event(hooks.all_hooks["request"](tflow.tflow()))
    assert calls == [("x", "request"), ("y", "request")]
    assert "Addon error: boom" in caplog.text
    ctx.__exit__(None, None, None)


@pytest.mark.parametrize("middle", [AsyncFailing, AsyncHalting, Failing, Halting])
async def test_awaiting_handlers_keep_mitmproxys_order_errors_and_halts(middle: type) -> None:
    """A chain that awaits in the middle continues after it exactly as mitmproxy's does."""
    results = []
    for kind in (addonmanager.AddonManager, engine.HookTable):
        calls: list[tuple[str, str]] = []
        addons = [AsyncRecorder("a", calls), Parent("m", calls, Recorder("m.child", calls)),
                  Recorder("z", calls)]
        addons[1].addons = [middle("m.child", calls)]
        ctx, manager = manager_with(kind, *addons)
        await manager.handle_lifecycle(hooks.all_hooks["request"](tflow.tflow()))
        ctx.__exit__(None, None, None)
        results.append(calls)
    assert results[0] == results[1]
    assert results[1][0] == ("a", "request-async")


async def test_addon_halt_stops_the_event() -> None:
    calls: list[tuple[str, str]] = []
    ctx, table = manager_with(engine.HookTable, Halting("h", calls), Recorder("after", calls))
    await table.trigger_event(hooks.all_hooks["request"](tflow.tflow()))
    assert calls == [("h", "request")]
    ctx.__exit__(None, None, None)


async def test_lookups_are_cached_and_renewed_when_the_chain_changes() -> None:
    calls: list[tuple[str, str]] = []
    first = Recorder("first", calls)
    ctx, table = manager_with(engine.HookTable, first)
    assert len(table.handlers("request")) == 1
    assert table.handlers("request") is table.handlers("request")  # cached
    second = Recorder("second", calls)
    table.add(second)
    assert [f.__self__.name for _, f in table.handlers("request")] == ["first", "second"]
    table.remove(first)
    await table.trigger_event(hooks.all_hooks["request"](tflow.tflow()))
    assert calls == [("second", "request")]
    ctx.__exit__(None, None, None)


async def test_a_hook_switched_off_by_configure_is_skipped() -> None:
    calls: list[tuple[str, str]] = []
    switch = Recorder("switch", calls)
    ctx, table = manager_with(engine.HookTable, switch)
    flow = tflow.tflow()
    assert len(table.handlers("request")) == 1
    switch.request = None  # what an addon does in configure when a feature is off
    table.trigger(hooks.ConfigureHook(set()))
    await table.trigger_event(hooks.all_hooks["request"](flow))
    del switch.request  # and back on
    table.trigger(hooks.ConfigureHook(set()))
    await table.trigger_event(hooks.all_hooks["request"](flow))
    assert calls == [("switch", "request")]
    ctx.__exit__(None, None, None)


async def test_update_hook_only_when_someone_listens() -> None:
    calls: list[tuple[str, str]] = []
    ctx, table = manager_with(engine.HookTable, Recorder("r", calls))
    await table.handle_lifecycle(hooks.all_hooks["request"](tflow.tflow()))
    assert calls == [("r", "request")]
    assert table.handlers("update") == ()
    table.add(Updates("u", calls))
    await table.handle_lifecycle(hooks.all_hooks["request"](tflow.tflow()))
    assert calls[1:] == [("r", "request"), ("u", "request"), ("u", "update 1")]
    ctx.__exit__(None, None, None)


def test_modules_named_like_hooks_are_skipped_and_other_values_refused() -> None:
    import logging as log_module

    class WithModule:
        log = log_module  # "from mitmproxy import log" in an addon

    class NotCallable:
        request = 3

    assert engine.handlers_for([WithModule()], "log") == ()
    with pytest.raises(exceptions.AddonManagerError, match="not callable"):
        engine.handlers_for([NotCallable()], "request")


def test_install_only_on_an_empty_master() -> None:
    with taddons.context() as tctx:
        tctx.master.addons.chain.clear()
        table = engine.install(tctx.master)
        assert tctx.master.addons is table
        table.add(Recorder("r", []))
        with pytest.raises(RuntimeError, match="before adding addons"):
            engine.install(tctx.master)


def test_hook_args_are_mitmproxys() -> None:
    flow = tflow.tflow(resp=True)
    data = server_hooks.ServerConnectionHookData(flow.server_conn, flow.client_conn)
    for event in (hooks.all_hooks["request"](flow), hooks.all_hooks["server_connect"](data),
                  hooks.ConfigureHook({"a", "b"}), hooks.UpdateHook([flow]),
                  hooks.all_hooks["client_connected"](flow.client_conn)):
        assert engine.hook_args(event) == event.args(), event.name
