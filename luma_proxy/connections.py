"""Closing one of mitmproxy's live connections from an addon.

mitmproxy offers no API for it; its own inactivity watchdog cancels the task
that reads the connection, and so do the timeouts, the body limit and the
graceful drain here, through these two functions.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import connection, ctx

from .engine_patches import as_sent_to_client


def close(handler: Any, conn: connection.Connection | None, reason: str,
          answer: bytes | None = None) -> bool:
    """Cancel the task reading ``conn`` (default: the client) of one connection handler.

    ``answer`` is written to that connection first (a 408 while the request is still
    arriving, before any response byte): the writer flushes it as the task closes it.
    """
    io = handler.transports.get(conn if conn is not None else handler.client)
    if io is None or io.handler is None or io.handler.done():
        return False
    if answer is not None and io.writer is not None:
        io.writer.write(as_sent_to_client(handler, answer) if conn is None else answer)
    io.handler.cancel(reason)
    return True


def close_for_client(client_id: str, conn: connection.Connection | None, reason: str,
                     answer: bytes | None = None) -> bool:
    """As ``close``, finding the handler by the client connection's id."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = proxyserver.connections.get(client_id) if proxyserver else None
    return handler is not None and close(handler, conn, reason, answer)
