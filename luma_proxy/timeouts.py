"""Deadlines for slow peers: connecting to a container, its response, a client's headers.

mitmproxy has none of these (a black-holed container hangs a request for the
kernel's minutes; a client trickling header bytes is never cut off). Each
deadline is a timer that, when it fires, cancels the task that owns the
connection, exactly as mitmproxy's own inactivity watchdog does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy import server_hooks

from .connections import close_for_client
from .environ import env_float
from .flowinfo import header

logger = logging.getLogger("luma_proxy")

STREAM_ABOVE = 1024 * 1024  # the addon's stream_large_bodies


class Timeouts:
    def __init__(self) -> None:
        self.connect_timeout = 5.0
        self.response_timeout = 60.0
        self.header_timeout = 30.0
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}

    def load(self, loader: Any) -> None:
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
            "after the previous response (slow clients, idle keep-alive).",
        )

    def configure(self, updated: set[str]) -> None:
        for name in ("luma_connect_timeout", "luma_response_timeout", "luma_header_timeout"):
            if name in updated:
                value = getattr(ctx.options, name)
                if value <= 0:
                    raise exceptions.OptionsError(f"{name} must be > 0")
                setattr(self, name.removeprefix("luma_"), value)

    # ------------------------------------------------------------ machinery
    def _arm(self, key: tuple[str, str], delay: float, client_id: str, target: Any) -> None:
        self._disarm(key)
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(delay, self._fire, key, client_id, target)

    def _disarm(self, key: tuple[str, str]) -> None:
        if (timer := self._timers.pop(key, None)) is not None:
            timer.cancel()

    def _fire(self, key: tuple[str, str], client_id: str, target: Any) -> None:
        """Cancel the task that reads ``target`` (a connection, or a flow's server side)."""
        self._timers.pop(key, None)
        if isinstance(target, http.HTTPFlow):
            target = target.server_conn
        if close_for_client(client_id, target, f"{key[0]} timeout"):
            logger.info("%s timeout: closing %s", key[0], "client" if target is None else
                        "upstream connection")

    # ------------------------------------------------------------- clients
    def client_connected(self, client: connection.Client) -> None:
        self._arm(("header", client.id), self.header_timeout, client.id, None)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._disarm(("header", flow.client_conn.id))

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:  # going upstream
            self._arm(("response", flow.id), self.response_timeout, flow.client_conn.id, flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """A streamed body may legitimately take long; a buffered one must arrive in time.

        Buffered responses (known length up to ``stream_large_bodies``) reach the
        client only once complete, so a container that stalls mid-body would
        otherwise hold the client forever: the deadline covers the whole body.
        """
        response = flow.response
        assert response is not None
        length = header(response.headers, "content-length")
        if response.stream or not length.isdigit() or int(length) > STREAM_ABOVE:
            self._disarm(("response", flow.id))

    def response(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def _finished(self, flow: http.HTTPFlow) -> None:
        """The next request head must arrive in time too (an idle keep-alive bound)."""
        self._disarm(("response", flow.id))
        client = flow.client_conn
        if flow.websocket is None and client.alpn != b"h2" and client.connected:
            self._arm(("header", client.id), self.header_timeout, client.id, None)

    def client_disconnected(self, client: connection.Client) -> None:
        self._disarm(("header", client.id))

    # ------------------------------------------------------------- upstream
    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._arm(("connect", data.server.id), self.connect_timeout, data.client.id, data.server)

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._disarm(("connect", data.server.id))

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._disarm(("connect", data.server.id))
