"""Size limits on what clients send: request head (431) and request body (413).

mitmproxy buffers a request head until it is complete, without any bound
(its own source says "FIXME: protect against header size DoS"), and it
reads a whole request body before it sends an answer an addon set. So both
limits are enforced inside its HTTP/1 reader, before any body byte is read;
chunked bodies (no declared length) are counted on their way upstream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable, Generator
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.utils import human

from . import engine_patches, pages
from .connections import close_for_client
from .flowinfo import header

logger = logging.getLogger("luma_proxy")

DEFAULT_MAX_HEADER = "64k"
DEFAULT_MAX_BODY = "1g"

_limits = {"head": 64 * 1024, "body": 1024**3}
_original_read_headers = _http1.Http1Server.read_headers


def parse_size(value: str, name: str) -> int:
    try:
        size = human.parse_size(value)
    except ValueError:
        size = None
    if size is None or size <= 0:
        raise ValueError(f"invalid {name} {value!r}: expected a size like 64k, 10m, 1g")
    return size


def head_too_large(buf: bytes, limit: int) -> bool:
    """True when the head is longer than ``limit`` (complete or still arriving)."""
    if len(buf) <= limit:
        return False
    end = buf[: limit + 4].find(b"\r\n\r\n")
    return end == -1 or end + 4 > limit


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*(\d+)", re.IGNORECASE)


def declared_too_large(head: bytes, limit: int, end: int | None = None) -> bool:
    """A complete head (``head[:end]``) whose Content-Length is over ``limit``."""
    match = _CONTENT_LENGTH.search(head, 0, len(head) if end is None else end)
    return match is not None and int(match.group(1)) > limit


def refuse(status: int) -> bytes:
    from mitmproxy.net.http import http1

    return http1.assemble_response(pages.page(status, {"Connection": "close"}))


def _read_headers_bounded(
    self: _http1.Http1Server, event: events.ConnectionEvent
) -> Generator[commands.Command, Any, None]:
    """mitmproxy's request-head reader, with a size bound and an early 413.

    Both answers are given before any body byte is read, then the connection is
    half-closed: a full close with unread request bytes makes the kernel send
    RST, which can destroy the answer before the client reads it.
    """
    if isinstance(event, events.DataReceived):
        buf = bytes(self.buf)
        status = None
        if head_too_large(buf, _limits["head"]):
            status = 431
        elif (end := buf.find(b"\r\n\r\n")) != -1 and declared_too_large(
                buf, _limits["body"], end):
            status = 413
        if status is not None:
            yield commands.SendData(self.conn, refuse(status))
            yield commands.CloseTcpConnection(self.conn, half_close=True)
            self.state = self.done
            return
    yield from _original_read_headers(self, event)


def install_limits(head: int, body: int) -> None:
    """Put the bounded reader in place (idempotent) with these limits."""
    _limits.update(head=head, body=body)
    _http1.Http1Server.read_headers = _read_headers_bounded  # type: ignore[method-assign]


def body_counter(limit: int, on_exceeded: Callable[[], None]) -> Callable[[bytes], bytes]:
    """A request stream function that passes chunks on until ``limit`` bytes, then stops."""
    seen = 0

    def count(chunk: bytes) -> bytes:
        nonlocal seen
        seen += len(chunk)
        if seen > limit:
            on_exceeded()
            return b""
        return chunk

    return count


class Limits:
    def __init__(self) -> None:
        self.max_body = parse_size(DEFAULT_MAX_BODY, "size")

    def load(self, loader: Any) -> None:
        loader.add_option("luma_max_header_size", str,
                          os.environ.get("LUMA_PROXY_MAX_HEADER_SIZE", DEFAULT_MAX_HEADER),
                          "Largest request head (request line and headers) accepted; more: 431.")
        loader.add_option("luma_max_body_size", str,
                          os.environ.get("LUMA_PROXY_MAX_BODY_SIZE", DEFAULT_MAX_BODY),
                          "Largest request body accepted; more: 413.")

    def configure(self, updated: set[str]) -> None:
        if not updated & {"luma_max_header_size", "luma_max_body_size"}:
            return
        try:
            head = parse_size(ctx.options.luma_max_header_size, "luma_max_header_size")
            self.max_body = parse_size(ctx.options.luma_max_body_size, "luma_max_body_size")
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None
        install_limits(head, self.max_body)
        engine_patches.install(self.max_body)  # HTTP/2 bodies are counted there

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Chunked bodies have no declared length: count them on the way through."""
        request = flow.request
        if flow.response is None and "chunked" in header(request.headers, "transfer-encoding"):
            request.stream = body_counter(self.max_body, lambda: _drop_client(flow))


def _drop_client(flow: http.HTTPFlow) -> None:
    """A chunked body went over the limit mid-stream: nothing more of it goes upstream."""
    logger.warning("request body from %s over the limit; closing", flow.client_conn.peername[0])

    asyncio.get_running_loop().call_soon(
        close_for_client, flow.client_conn.id, None, "request body too large"
    )
