"""Deadlines for slow peers: connecting to a container, its response, a client's head and body.

mitmproxy has none of these (a black-holed container hangs a request for the
kernel's minutes; a client trickling header bytes is never cut off). When a
deadline passes, the task that owns the connection is cancelled, exactly as
mitmproxy's own inactivity watchdog does.

A request arms and disarms two deadlines on its way through, so they are not
one event-loop timer each (``call_later`` plus ``cancel``, twice per request)
but entries in a dict, checked by one sweep every ``tick`` seconds: arming is
a dict store, disarming a dict pop. A deadline is therefore enforced up to one
tick late: a quarter of the shortest timeout, at most half a second.

An HTTP/2 (or HTTP/3) connection is idle once none of its streams is open: its
flows are tracked per client, and when the last one ends the same idle bound as
an HTTP/1 keep-alive (``luma_header_timeout``) is armed; a new stream disarms it.
When it passes the connection is closed as any other, and mitmproxy's HTTP/2
layer first sends GOAWAY(NO_ERROR) (``engine_patches.install_h2_goaway_on_close``):
the client knows no request was lost and opens a new connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy import server_hooks

from luma_proxy.environ import env_float
from luma_proxy.proxy.engine_patches import (
    BODIES,
    TIMED_OUT,
    close_for_client,
    install_h2_goaway_on_close,
    refuse,
    response_begun,
)
from luma_proxy.proxy.flowinfo import MULTIPLEXED_ALPN
from luma_proxy.proxy.streaming import stream_response

logger = logging.getLogger("luma_proxy")

MAX_TICK = 0.5

# key (client, flow or server id) -> (due, client id, what to close: None for the client)
Pending = dict[str, tuple[float, str, Any]]


def sweep_tick(*timeouts: float) -> float:
    """How often to look for passed deadlines: late by at most a quarter of the shortest."""
    return min(MAX_TICK, min(timeouts) / 4)


def streaming_response(flow: http.HTTPFlow) -> bool:
    """A response deadline does not apply once a streamed response has begun.

    A streamed body (server-sent events, a download) may legitimately take
    long; a buffered one (known length up to ``streaming.STREAM_ABOVE``)
    reaches the client only once complete, so a container that stalls mid-body
    would otherwise hold the client forever: for it the deadline covers the
    whole body. Decided when the deadline passes, not per response, so the hot
    path pays nothing for it.
    """
    response = flow.response
    return response is not None and bool(response.stream or stream_response(response))


def passed(pending: Pending, now: float) -> list[str]:
    """The keys whose deadline is at or before ``now``."""
    return [key for key, (due, _, _) in pending.items() if due <= now]


class Timeouts:
    def __init__(self) -> None:
        self.connect_timeout = 5.0
        self.hold = 0.0  # LumaProxy's luma_hold_timeout, when it is loaded
        self.response_timeout = 60.0
        self.header_timeout = 30.0
        self.body_timeout = 120.0
        self.body_idle_timeout = 10.0
        self.tick = sweep_tick(self.connect_timeout, self.response_timeout, self.header_timeout,
                               self.body_idle_timeout)
        self.pending: dict[str, Pending] = {"header": {}, "response": {}, "connect": {}}
        self._header, self._response, self._connect = self.pending.values()
        # HTTP/2 or HTTP/3 client id -> ids of its flows still open: idle when empty
        self._h2_open: dict[str, set[str]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def load(self, loader: Any) -> None:
        install_h2_goaway_on_close()
        loader.add_option(
            "luma_connect_timeout", float, env_float("LUMA_PROXY_CONNECT_TIMEOUT", 5.0),
            "Seconds to connect to a container before giving up (502, IP ejected).",
        )
        loader.add_option(
            "luma_response_timeout", float, env_float("LUMA_PROXY_RESPONSE_TIMEOUT", 60.0),
            "Seconds a container may take to send response headers after the request (502).",
        )
        loader.add_option(
            "luma_header_timeout", float, env_float("LUMA_PROXY_HEADER_TIMEOUT", 30.0),
            "Seconds a client has to send a complete request head, on a new connection or "
            "after the previous response (slow clients, idle keep-alive); an HTTP/2 "
            "connection with no open stream is closed (GOAWAY) after as long.",
        )
        loader.add_option(
            "luma_body_timeout", float, env_float("LUMA_PROXY_BODY_TIMEOUT", 120.0),
            "Seconds a client has to send a whole HTTP/1 request body (408).",
        )
        loader.add_option(
            "luma_body_idle_timeout", float, env_float("LUMA_PROXY_BODY_IDLE_TIMEOUT", 10.0),
            "Seconds a request body may pause between bytes (408).",
        )

    def configure(self, updated: set[str]) -> None:
        if "luma_hold_timeout" in updated and "luma_hold_timeout" in ctx.options:
            # A connect may wait that long for a container (engine_patches.Connector).
            self.hold = ctx.options.luma_hold_timeout
        names = ("luma_connect_timeout", "luma_response_timeout", "luma_header_timeout",
                 "luma_body_timeout", "luma_body_idle_timeout")
        if not updated.intersection(names):
            return
        for name in names:
            value = getattr(ctx.options, name)
            if value <= 0:
                raise exceptions.OptionsError(f"{name} must be > 0")
        for name in names:
            setattr(self, name.removeprefix("luma_"), getattr(ctx.options, name))
        self.tick = sweep_tick(self.connect_timeout, self.response_timeout, self.header_timeout,
                               self.body_idle_timeout)

    # ------------------------------------------------------------ machinery
    def running(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="luma timeouts")

    def done(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                self.sweep(time.monotonic())
            except Exception:  # never let the sweeper die
                logger.exception("timeout sweep failed")

    def sweep(self, now: float) -> int:
        """Close what every passed deadline guards; returns how many fired."""
        fired = 0
        for kind, pending in self.pending.items():
            for key in passed(pending, now):
                _, client_id, target = pending.pop(key)
                fired += 1
                self._fire(kind, client_id, target)
        if BODIES:
            fired += self._sweep_bodies(now)
        return fired

    def _sweep_bodies(self, now: float) -> int:
        """408 and close for an HTTP/1 body that paused too long or takes too long in all.

        Its upstream connection goes with the client's: the container never sees
        the request complete.
        """
        late = [client_id for client_id, (begun, last, _) in BODIES.items()
                if now - last > self.body_idle_timeout or now - begun > self.body_timeout]
        for client_id in late:
            server = BODIES.pop(client_id)[2]
            answer = None if response_begun(server) else refuse(408)
            if close_for_client(client_id, None, "body timeout", answer):
                TIMED_OUT.add(client_id)
                logger.info("body timeout: closing client")
        return len(late)

    def _fire(self, kind: str, client_id: str, target: Any) -> None:
        """Cancel the task that reads ``target`` (a connection, or a flow's server side)."""
        if isinstance(target, http.HTTPFlow):
            if streaming_response(target):
                return
            target.metadata["luma_cut"] = True  # we closed it: never resent (engine_patches)
            target = target.server_conn
        if close_for_client(client_id, target, f"{kind} timeout"):
            logger.info("%s timeout: closing %s", kind, "client" if target is None else
                        "upstream connection")

    # ------------------------------------------------------------- clients
    def client_connected(self, client: connection.Client) -> None:
        self._header[client.id] = (time.monotonic() + self.header_timeout, client.id, None)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        client = flow.client_conn
        self._header.pop(client.id, None)
        if client.alpn in MULTIPLEXED_ALPN:  # streams overlap: idle only once none is open
            self._h2_open.setdefault(client.id, set()).add(flow.id)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:  # going upstream
            self._response[flow.id] = (time.monotonic() + self.response_timeout,
                                       flow.client_conn.id, flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def _finished(self, flow: http.HTTPFlow) -> None:
        """The next request head must arrive in time too (an idle keep-alive bound).

        On HTTP/2 that is once no other stream is open (a long request, an event
        stream): each flow is discarded from its client's set, so a flow that
        ends twice (a response, then an error) cannot make a busy connection idle.
        """
        self._response.pop(flow.id, None)
        client = flow.client_conn
        if flow.websocket is not None or not client.connected:
            return
        if client.alpn in MULTIPLEXED_ALPN:
            open_flows = self._h2_open.get(client.id)
            if open_flows:
                open_flows.discard(flow.id)
                if open_flows:
                    return
        self._header[client.id] = (time.monotonic() + self.header_timeout, client.id, None)

    def client_disconnected(self, client: connection.Client) -> None:
        self._header.pop(client.id, None)
        self._h2_open.pop(client.id, None)
        if BODIES:
            BODIES.pop(client.id, None)
        TIMED_OUT.discard(client.id)

    # ------------------------------------------------------------- upstream
    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._connect[data.server.id] = (time.monotonic() + self.connect_timeout + self.hold,
                                         data.client.id, data.server)

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._connect.pop(data.server.id, None)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._connect.pop(data.server.id, None)
