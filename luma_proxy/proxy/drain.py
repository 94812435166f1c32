"""Graceful shutdown: stop accepting, let in-flight requests finish, close idle connections.

On SIGTERM the listeners close first (new connections are refused, so a
restarted proxy or a sibling worker takes them), then every keep-alive
connection is closed as soon as it has nothing in flight, buffered responses
sent meanwhile carry ``Connection: close``, and the process exits once no
connection is left or the drain timeout has passed.

The UDP listener of HTTP/3 (``run --http3``) is the exception: every QUIC
connection sends and receives through its one socket, so closing it would cut
the HTTP/3 requests in flight. It closes last, once the connections are done
(or the timeout passed); until then a new QUIC connection is still accepted,
and closed as soon as it is idle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

from mitmproxy import connection, ctx, http

from luma_proxy.environ import drain_timeout
from luma_proxy.proxy.engine_patches import client_handlers, close_connection

logger = logging.getLogger("luma_proxy")

POLL = 0.05


class Drain:
    def __init__(self) -> None:
        self.in_flight: Counter[str] = Counter()  # client connection id -> open flows
        self.draining = False

    def load(self, loader: Any) -> None:
        loader.add_option(
            "luma_drain_timeout", float, drain_timeout(),
            "On SIGTERM, seconds to let in-flight requests finish before exiting.",
        )

    # ------------------------------------------------------------ bookkeeping
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.in_flight[flow.client_conn.id] += 1

    def response(self, flow: http.HTTPFlow) -> None:
        """A buffered response leaves after this hook: while draining it says so.

        (A streamed one has left already; its connection is closed by ``drain``
        once nothing is in flight on it.)
        """
        if flow.websocket is None:  # an open WebSocket stays in flight until it ends
            if self.draining and flow.response is not None and not flow.response.stream:
                flow.response.headers["Connection"] = "close"
            self._done(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._done(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._done(flow)

    def _done(self, flow: http.HTTPFlow) -> None:
        client = flow.client_conn.id
        if self.in_flight[client] > 1:
            self.in_flight[client] -= 1
        else:
            self.in_flight.pop(client, None)

    def client_disconnected(self, client: connection.Client) -> None:
        self.in_flight.pop(client.id, None)

    # --------------------------------------------------------------- shutdown
    async def drain(self) -> bool:
        """Stop listening and wait for connections to finish; True if all did in time."""
        self.draining = True
        timeout = ctx.options.luma_drain_timeout
        proxyserver = ctx.master.addons.get("proxyserver")
        servers = list(proxyserver.servers)
        quic = [server for server in servers if server.mode.transport_protocol == "udp"]
        for server in servers:
            if server not in quic:
                await server.stop()
        handlers = client_handlers()
        logger.info("draining %d connection(s), up to %gs", len(handlers), timeout)
        deadline = time.monotonic() + timeout
        while handlers and time.monotonic() < deadline:
            for client_id, handler in list(handlers.items()):
                if not self.in_flight.get(client_id):
                    close_connection(handler, None, "shutting down")
            await asyncio.sleep(POLL)
        left = len(handlers)
        if left:
            logger.warning("drain timeout: closing %d connection(s) with requests in flight",
                           left)
        for server in quic:  # its connections are done (or out of time): the socket goes
            if server.is_running:
                await server.stop()
        return left == 0
