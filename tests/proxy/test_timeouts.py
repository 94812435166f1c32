"""Deadlines: which hook arms and disarms which, and the sweep that enforces them.

The end-to-end behaviour (a slow client cut off, a hung container answered
502, an idle keep-alive closed) is in ``tests/e2e/test_security.py``.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from mitmproxy import exceptions
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow

from luma_proxy.proxy.timeouts import MAX_TICK, Timeouts, passed, streaming_response, sweep_tick


def test_sweep_tick_is_a_quarter_of_the_shortest_timeout_at_most_half_a_second() -> None:
    assert sweep_tick(5.0, 60.0, 30.0) == MAX_TICK == 0.5
    assert sweep_tick(60.0, 1.0, 30.0) == 0.25
    assert sweep_tick(0.2) == pytest.approx(0.05)


def test_passed_lists_only_deadlines_at_or_before_now() -> None:
    pending = {"a": (10.0, "c1", None), "b": (10.5, "c2", None), "c": (9.0, "c3", None)}
    assert sorted(passed(pending, 10.0)) == ["a", "c"]
    assert passed(pending, 8.0) == []


def test_configure_sets_timeouts_and_tick_and_rejects_non_positive() -> None:
    addon = Timeouts()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_header_timeout=1.0, luma_response_timeout=2.0)
        assert (addon.header_timeout, addon.response_timeout, addon.connect_timeout) == (
            1.0, 2.0, 5.0)
        assert addon.tick == 0.25
        with pytest.raises(exceptions.OptionsError, match="luma_connect_timeout"):
            tctx.configure(addon, luma_connect_timeout=0.0)
        assert addon.connect_timeout == 5.0 and addon.tick == 0.25  # nothing changed


def test_a_request_arms_and_disarms_its_deadlines() -> None:
    addon = Timeouts()
    with taddons.context(addon):
        flow = tflow.tflow(resp=False)
        client = flow.client_conn
        before = time.monotonic()
        addon.client_connected(client)
        assert addon.pending["header"][client.id][0] >= before + addon.header_timeout
        addon.requestheaders(flow)  # the head arrived in time
        assert client.id not in addon.pending["header"]
        addon.request(flow)
        due, client_id, target = addon.pending["response"][flow.id]
        assert due >= before + addon.response_timeout
        assert client_id == client.id and target is flow
        flow.response = tflow.tresp()  # buffered, small: the deadline covers the body too
        assert flow.id in addon.pending["response"]
        addon.response(flow)
        assert flow.id not in addon.pending["response"]
        assert client.id in addon.pending["header"]  # idle keep-alive bound until the next head
        addon.client_disconnected(client)
        assert not any(addon.pending.values())


def test_streamed_and_unsized_responses_are_not_bounded_once_begun() -> None:
    waiting = tflow.tflow(resp=False)
    assert not streaming_response(waiting)  # no response yet: the deadline applies
    for stream, length in ((True, "10"), (False, None), (False, str(2 * 1024 * 1024)),
                           (False, "10")):
        flow = tflow.tflow(resp=True)
        flow.response.stream = stream
        if length is None:
            del flow.response.headers["content-length"]
        else:
            flow.response.headers["content-length"] = length
        # A small buffered body must arrive in time too; anything streamed may take long.
        assert streaming_response(flow) is (length != "10" or stream), (stream, length)


def test_a_passed_deadline_of_a_streaming_response_is_dropped_without_closing() -> None:
    addon = Timeouts()
    with taddons.context(addon):
        flow = tflow.tflow(resp=False)
        addon.request(flow)
        flow.response = tflow.tresp()
        flow.response.stream = True
        assert addon.sweep(time.monotonic() + addon.response_timeout + 1) == 1
        assert not addon.pending["response"]


def test_answered_requests_arm_no_response_deadline() -> None:
    addon = Timeouts()
    with taddons.context(addon):
        flow = tflow.tflow(resp=True)  # answered by an addon: never goes upstream
        addon.request(flow)
        assert not addon.pending["response"]


@pytest.mark.parametrize("alpn", [b"h2", b"h3"])
def test_an_h2_connection_is_idle_only_once_no_stream_is_open(alpn: bytes) -> None:
    """Streams overlap: one ending while another waits (a slow answer, an event stream)
    must not arm the idle bound; the last one ending does, and a new stream disarms it.
    HTTP/3 (QUIC) alike: its idle bound cut the streams still open."""
    addon = Timeouts()
    with taddons.context(addon):
        slow = tflow.tflow(resp=True)
        client = slow.client_conn
        client.alpn = alpn
        quick = tflow.tflow(resp=True)
        quick.client_conn = client
        addon.requestheaders(slow)
        addon.requestheaders(quick)
        addon.response(quick)
        addon.error(quick)  # a flow ending twice cannot make the busy connection idle
        assert client.id not in addon.pending["header"]
        before = time.monotonic()
        addon.response(slow)
        assert addon.pending["header"][client.id][0] >= before + addon.header_timeout
        later = tflow.tflow(resp=False)
        later.client_conn = client
        addon.requestheaders(later)  # a new stream: busy again
        assert client.id not in addon.pending["header"]
        addon.response(later)
        assert client.id in addon.pending["header"]  # idle again
        addon.client_disconnected(client)
        assert client.id not in addon.pending["header"]


def test_connect_deadline_lives_until_connected_or_failed() -> None:
    addon = Timeouts()
    with taddons.context(addon):
        for outcome in (addon.server_connected, addon.server_connect_error):
            flow = tflow.tflow()
            data = server_hooks.ServerConnectionHookData(flow.server_conn, flow.client_conn)
            addon.server_connect(data)
            assert addon.pending["connect"][flow.server_conn.id][1] == flow.client_conn.id
            outcome(data)
            assert not addon.pending["connect"]


def test_sweep_fires_only_passed_deadlines_once() -> None:
    addon = Timeouts()
    with taddons.context(addon):
        early, late = tflow.tflow(), tflow.tflow()
        addon.client_connected(early.client_conn)
        addon.request(late)
        now = time.monotonic()
        assert addon.sweep(now) == 0
        # The header deadline (30 s) passes first, the response one (60 s) later.
        assert addon.sweep(now + addon.header_timeout + 1) == 1
        assert not addon.pending["header"] and late.id in addon.pending["response"]
        assert addon.sweep(now + addon.header_timeout + 1) == 0
        assert addon.sweep(now + addon.response_timeout + 1) == 1
        assert not any(addon.pending.values())


async def test_the_sweeper_runs_while_the_proxy_runs() -> None:
    addon = Timeouts()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_header_timeout=0.2)  # tick 0.05 s
        addon.running()
        addon.client_connected(tflow.tclient_conn())
        for _ in range(100):  # the deadline passes within 0.2 s plus one tick
            if not addon.pending["header"]:
                break
            await asyncio.sleep(0.05)
        assert not addon.pending["header"]
        assert any(t.get_name() == "luma timeouts" for t in asyncio.all_tasks())
        addon.done()
        await asyncio.sleep(0)  # the cancelled task ends
        assert not any(t.get_name() == "luma timeouts" and not t.done()
                       for t in asyncio.all_tasks())
