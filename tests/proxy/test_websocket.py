"""WebSocket messages are let go once relayed (luma_proxy/websocket.py, issue 13 point 14).

The rule and the option with mitmproxy's ``taddons``/``tflow``; and mitmproxy's
own ``WebsocketLayer``, driven event by event, to show that trimming the list
changes nothing that is forwarded and that ``drop()`` still works.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import wsproto
import wsproto.events
from mitmproxy import exceptions, http, options
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.websocket import WebsocketLayer
from mitmproxy.test import taddons, tflow
from mitmproxy.websocket import WebSocketMessage
from wsproto.frame_protocol import Opcode

from luma_proxy.proxy.composition import all_addons
from luma_proxy.proxy.websocket import DEFAULT_KEEP, ENV, SERVING_KEEP, WebSocketTail, trim


def message(i: int) -> WebSocketMessage:
    return WebSocketMessage(Opcode.BINARY, True, b"%d" % i)


@pytest.mark.parametrize(("size", "keep", "left"), [
    (0, 0, 0), (5, 0, 0), (5, 2, 2), (5, 5, 5), (2, 5, 2), (5, -1, 0),
])
def test_trim_keeps_the_last_entries_in_place(size: int, keep: int, left: int) -> None:
    messages = [message(i) for i in range(size)]
    same = messages
    tail = messages[size - left:] if left else []
    assert trim(messages, keep) == size - left
    assert messages is same and messages == tail  # the flow's own list, the newest kept


async def test_option_defaults_env_and_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    tails = [a for a in all_addons(serving=True) if isinstance(a, WebSocketTail)]
    assert [t.default_keep for t in tails] == [SERVING_KEEP] == [0]  # luma-proxy run: none
    tail = WebSocketTail()
    with taddons.context(tail) as tctx:
        assert tctx.options.luma_websocket_keep == DEFAULT_KEEP  # mitmdump/mitmweb: a tail
        tctx.configure(tail, luma_websocket_keep=3)
        assert tail.keep == 3
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(tail, luma_websocket_keep=-1)
    for value, expected in (("7", 7), ("lots", DEFAULT_KEEP)):  # malformed: ignored
        monkeypatch.setenv(ENV, value)
        with taddons.context(WebSocketTail()) as tctx:
            assert tctx.options.luma_websocket_keep == expected
    monkeypatch.setenv(ENV, "7")
    with taddons.context(WebSocketTail(SERVING_KEEP)) as tctx:
        assert tctx.options.luma_websocket_keep == 7  # the variable sets run's too


@pytest.mark.parametrize("keep", [0, 1, 3])
async def test_hooks_bound_the_list_and_the_last_message_stays_while_hooks_run(keep: int) -> None:
    tail = WebSocketTail()
    with taddons.context(tail) as tctx:
        tctx.configure(tail, luma_websocket_keep=keep)
        flow = tflow.twebsocketflow()
        assert flow.websocket is not None
        messages = flow.websocket.messages
        messages.clear()
        for i in range(10):
            current = message(i)
            messages.append(current)  # what mitmproxy does, then it runs the hook
            tail.websocket_message(flow)
            assert messages[-1] is current  # addons after us still see (and may drop) it
            assert len(messages) == min(i + 1, max(keep, 1))
        tail.websocket_end(flow)
        assert [m.content for m in messages] == [b"%d" % i for i in range(10 - keep, 10)]


# ------------------------------------------------- mitmproxy's WebsocketLayer itself
Hook = Callable[[http.HTTPFlow], Any]


def drive(layer: WebsocketLayer, event: events.Event, hooks: dict[str, list[Hook]]) -> list[bytes]:
    """Feed one event; answer each hook with ``hooks[name]`` in order; the bytes sent."""
    sent: list[bytes] = []
    pending = [event]
    while pending:
        for command in layer.handle_event(pending.pop()):
            if isinstance(command, commands.StartHook):
                for hook in hooks.get(command.name, []):
                    hook(command.args()[0])
                pending.append(events.HookCompleted(command))
            elif isinstance(command, commands.SendData):
                sent.append(command.data)
    return sent


def received(frames: list[bytes]) -> list[bytes]:
    """The messages in what the layer sent to the server, as that server reads them."""
    server = wsproto.Connection(wsproto.ConnectionType.SERVER)
    server.receive_data(b"".join(frames))
    out: list[bytes] = []
    for event in server.events():
        assert isinstance(event, wsproto.events.BytesMessage)
        out.append(bytes(event.data))
    return out


async def test_mitmproxy_relays_each_message_unchanged_and_drop_still_works() -> None:
    """Trimmed to nothing after every message, the layer still sends each one intact.

    A hook after ours (a user's script under mitmdump) reads ``messages[-1]`` and
    drops every third message: those, and only those, are not forwarded.
    """
    tail = WebSocketTail(SERVING_KEEP)
    with taddons.context(tail) as tctx:
        tctx.configure(tail, luma_websocket_keep=0)
        flow = tflow.twebsocketflow()
        assert flow.websocket is not None
        flow.websocket.messages.clear()
        ctx = Context(flow.client_conn, options.Options())
        ctx.server = flow.server_conn
        layer = WebsocketLayer(ctx, flow)
        seen: list[bytes] = []

        def after_us(f: http.HTTPFlow) -> None:
            assert f.websocket is not None
            last = f.websocket.messages[-1]
            seen.append(last.content)
            if len(seen) % 3 == 0:
                last.drop()

        hooks: dict[str, list[Hook]] = {"websocket_message": [tail.websocket_message, after_us],
                                        "websocket_end": [tail.websocket_end]}
        drive(layer, events.Start(), hooks)
        client = wsproto.Connection(wsproto.ConnectionType.CLIENT)  # masks what it sends
        payloads = [bytes([i]) * (70_000 + i) for i in range(9)]  # 64-bit length frames
        frames: list[bytes] = []
        for payload in payloads:
            data = client.send(wsproto.events.BytesMessage(payload))
            frames += drive(layer, events.DataReceived(flow.client_conn, data), hooks)
            assert len(flow.websocket.messages) <= 1
        assert seen == payloads
        assert received(frames) == [p for i, p in enumerate(payloads) if (i + 1) % 3]
        close = client.send(wsproto.events.CloseConnection(1000))
        drive(layer, events.DataReceived(flow.client_conn, close), hooks)
        assert flow.websocket.close_code == 1000 and flow.websocket.messages == []
