"""mitmproxy 12 internals luma-proxy patches: the one module that touches them.

Everything luma-proxy needs beyond mitmproxy's public addon API is here, so that a
mitmproxy upgrade has one place to look (``tests/test_engine_patches_boundary.py``
fails if another module imports an internal mitmproxy module). What it patches or
touches, one line each:

* ``HttpStream`` request-header, body and protocol-error states: HTTP/2 framing, body limit, resend.
* ``HttpLayer.get_connection`` and ``HttpLayer._handle_event``: an HTTP/2 or HTTP/3 client's
  upstream pool.
* ``_http1.Http1Client.send``: an HTTP/2 request made HTTP/1 before the connection is kept.
* ``_http2.Http2Server.handle_h2_event``: malformed requests (400 on the stream), rapid reset.
* ``_http2.Http2Server._handle_event``: GOAWAY(NO_ERROR) when the proxy closes an idle connection.
* ``_http2.BufferedH2Connection.receive_data``: streams opened and reset in one read are dropped.
* ``_http2.Http2Connection.protocol_error``: GOAWAY debug data that says nothing internal.
* ``_http2.version``: no ``server: mitmproxy`` header on its own HTTP/2 error answers.
* ``ConnectionHandler.__init__`` (``proxy/server``): its per-address connect semaphore (``pool``).
* ``proxy/server``'s module-global ``asyncio``: container connects through ``Connector``.
* ``_http1.Http1Server.read_headers`` and ``read_body``: HTTP/1 head and body bounds (limits.py).
* ``Http1Server.response``, ``body_reader`` (h11's ``ChunkedReader``): body deadlines, counting.
* ``format_error`` in ``_http1``/``_http2``/``_http3``, ``_http1.make_error_response``: our pages.
* ``mitmproxy.net.http.http1.assemble_response``: our own pages as HTTP/1 bytes.
* ``mitmproxy.utils.human.parse_size``: size options read as mitmproxy reads its own.
* ``mode_servers``' module-global ``asyncio``: listeners bound with ``SO_REUSEPORT`` (workers).
* ``Proxyserver.connections`` and a handler's ``transports``: closing live connections.
* ``tlsconfig.certstore.certs``: each host's certificate put where the TLS layer looks (tls.py).
* ``quic._client_hello_parser``: recompiled with its asserts, which read the ClientHello (-O).
* ``quic.QuicLayer.receive_close``: CONNECTION_CLOSE(H3_NO_ERROR) when the proxy closes a client.
* a handler's layer stack (``layer``, ``child_layer``, ``connections``, ``ClientTLSLayer.tls``):
  idle upstream connections found, an answer written through the client's TLS session.
* ``sys.modules["mitmproxy.addons"]``: a stand-in package, so the built-in addons never load.
* ``AddonManager._configure_all``: unsubscribed when ``engine.HookTable`` replaces the manager.
* the layers' own events, hooks and commands (``_events``, ``_hooks``, ``commands``,
  ``SendHttp``, ``ReceiveHttp``): built as mitmproxy's layers build them, in the patches above.
* attributes of ours kept on its objects: ``luma_scanner`` (``Http1Server``),
  ``_luma_resets`` (an HTTP/2 connection), ``_luma_parked`` (``HttpLayer``).

The larger seams in detail: HTTP/2 handling (issue 13), opening a connection
to a container (issue 15), and a request the container closed under.

**HTTP/2.**

Every touch of mitmproxy's HTTP/2 internals lives here (``install`` is idempotent):

* framing: an HTTP/2 request body without ``content-length`` goes to an HTTP/1
  container with ``transfer-encoding: chunked``; mitmproxy writes it raw, so a
  body that is itself an HTTP/1 request arrived as a second request (smuggling).
* the body limit on HTTP/2: bytes are counted per stream; over the limit the
  stream gets 413 (mitmproxy's own REQUEST_TOO_LARGE answer) and nothing more
  goes upstream; the upstream request is aborted, never completed.
* a malformed request (bad pseudo-headers) is a stream error, not the end of
  the whole connection; GOAWAY debug data never quotes internal error text;
  mitmproxy's own HTTP/2 error answers carry no ``server: mitmproxy`` header.
* upstream connections: an HTTP/2 client connection reuses its idle HTTP/1
  connections to a container across streams and opens at most
  ``luma_h2_upstream_connections`` to one (mitmproxy opened one per stream).
  An HTTP/3 client's streams share the pool alike (mitmproxy would hand a busy
  HTTP/1 connection to a second stream: ``AssertionError`` in ``Http1Client.send``).
* rapid reset (CVE-2023-44487): a connection whose client resets more than
  ``MAX_RESETS`` streams in ``RESET_WINDOW`` seconds gets GOAWAY(ENHANCE_YOUR_CALM)
  and is closed; a stream opened and reset within one read never reaches the
  HTTP layer (no flow, no hooks). hyper-h2 bounds concurrent streams at 100
  (SETTINGS_MAX_CONCURRENT_STREAMS); a client opening more gets GOAWAY.

**Connection opening.**

mitmproxy has no retry API. ``ConnectionHandler.open_connection`` (mitmproxy/proxy/
server.py) connects with ``asyncio.open_connection`` looked up through that module's
``asyncio`` name. ``install_connect_retry`` points that single name at a namespace whose
``open_connection`` is ``Connector.open``; nothing else in the process changes, and the
same seam serves ``luma-proxy run``, ``mitmdump -s`` and ``mitmweb -s``. This is the only
place that touches that mitmproxy internal.

A refused, reset or timed-out connect is retried on another IP of the alias (asking DNS
again once the cached answer is exhausted) until ``luma_retry_timeout``; a connect not
done after ``RACE_DELAY`` races one to another IP, and the first to complete wins.

**A request the container closed under.** An app that stops closes its idle keep-alive
connections; a request written on one just then gets no answer at all ("server closed
connection", mitmproxy's 502). ``HttpStream.handle_protocol_error`` is wrapped: such a
request is sent again, on a new connection to another container (``set_reroute``
picks it), when that is safe: an idempotent method, the whole request sent and still
held (never a streamed body), no response byte received; at most ``MAX_RESENDS`` times.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import os
import socket
import sys
import time
import types
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import h11
from h11._readers import ChunkedReader
from mitmproxy import connection, ctx, exceptions, http
from mitmproxy import flow as mflow
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events
from mitmproxy.proxy import server as proxy_server
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers import tls as tls_layer
from mitmproxy.proxy.layers.http import _events, _hooks, _http1, _http2, _http3
from mitmproxy.utils import human
from OpenSSL import SSL

from luma_proxy.environ import env_float
from luma_proxy.proxy.flowinfo import (
    BODY_TIMEOUT,
    BODY_TOO_LARGE,
    MULTIPLEXED,
    MULTIPLEXED_ALPN,
)
from luma_proxy.proxy.headrules import HeadScanner, head_end, head_status
from luma_proxy.proxy.pages import page, page_body

MAX_RESETS = 200
RESET_WINDOW = 10.0
GOAWAY_TEXT = b"closing"

_state: dict[str, Any] = {"body_limit": 1024**3, "installed": False, "reroute": None,
                          "pool": 8}
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# A request can meet two closing containers in one deploy (the old one stopping,
# then a new one disconnected and reconnected by the Luma CLI): twice, no more.
MAX_RESENDS = 2
SERVER_CLOSED = "server closed connection"  # mitmproxy's text: no response byte came


def set_body_limit(limit: int) -> None:
    _state["body_limit"] = limit


def set_pool_size(size: int) -> None:
    """Most HTTP/1 connections one HTTP/2 client connection keeps open to one upstream."""
    if size < 1:
        raise ValueError(f"luma_h2_upstream_connections must be at least 1, not {size}")
    _state["pool"] = size


def needs_chunked(headers: Any, end_stream: bool) -> bool:
    """An HTTP/2 body of unknown length must be framed for an HTTP/1 container."""
    return not end_stream and "content-length" not in headers


def resets_exceeded(times: list[float], now: float, limit: int = MAX_RESETS,
                    window: float = RESET_WINDOW) -> bool:
    """Record a reset at ``now``; True when more than ``limit`` fall inside ``window``."""
    times.append(now)
    while times and times[0] <= now - window:
        times.pop(0)
    return len(times) > limit


# ---------------------------------------------------------------- HttpStream
_original_wait = http_layer.HttpStream.state_wait_for_request_headers
_original_stream_body = http_layer.HttpStream.state_stream_request_body
_original_consume_body = http_layer.HttpStream.state_consume_request_body


def _wait_for_request_headers(self: Any, event: Any) -> Generator[Any, Any, None]:
    """mitmproxy's own generator, unwrapped, unless an HTTP/2 body must be reframed.

    Plain functions returning a generator (here and for the body states below): the
    states run for every request, and a wrapper generator costs a frame and a
    delegation per step (callgrind: docs/performance.md)."""
    request = event.request
    if request.data.http_version in MULTIPLEXED and needs_chunked(
            request.headers, event.end_stream):
        return _wait_framing_chunked(self, event)
    return _original_wait(self, event)


def _wait_framing_chunked(self: Any, event: Any) -> Generator[Any, Any, None]:
    steps = _original_wait(self, event)
    chunked = True
    sent: Any = None
    while True:
        try:
            command = steps.send(sent)
        except StopIteration:
            return
        if chunked and isinstance(command, _hooks.HttpRequestHeadersHook):
            # Past mitmproxy's validation (which refuses the field on HTTP/2): the framing
            # its HTTP/1 client writes the body with.
            event.request.headers["transfer-encoding"] = "chunked"
            chunked = False
        sent = yield command


def _over_limit(self: Any, event: Any) -> bool:
    """An HTTP/2 or HTTP/3 body past the limit (HTTP/1 bodies are bounded in limits.py)."""
    if not isinstance(event, _events.RequestData):
        return False
    seen = self.flow.metadata.get("luma_h2_body", 0) + len(event.data)
    self.flow.metadata["luma_h2_body"] = seen
    return seen > _state["body_limit"]


def _refuse_too_large(self: Any, upstream: bool) -> Generator[Any, Any, None]:
    """413 on this stream only; an upstream request already begun is aborted, never completed."""
    self.flow.error = mflow.Error(BODY_TOO_LARGE)
    yield _hooks.HttpErrorHook(self.flow)
    code = _events.ErrorCode.REQUEST_TOO_LARGE
    yield http_layer.SendHttp(_events.ResponseProtocolError(
        self.stream_id, BODY_TOO_LARGE, code), self.context.client)
    if upstream:
        yield http_layer.SendHttp(_events.RequestProtocolError(
            self.stream_id, BODY_TOO_LARGE, code), self.context.server)
        self.server_state = self.state_errored
    self.client_state = self.state_errored
    self.flow.live = False


def _stream_request_body(self: Any, event: Any) -> Generator[Any, Any, None]:
    if self.flow.request.data.http_version not in MULTIPLEXED:
        return _original_stream_body(self, event)  # HTTP/1 bodies are bounded in limits.py
    return _bounded_body(self, event, _original_stream_body, upstream=True)


def _consume_request_body(self: Any, event: Any) -> Generator[Any, Any, None]:
    if self.flow.request.data.http_version not in MULTIPLEXED:
        return _original_consume_body(self, event)
    return _bounded_body(self, event, _original_consume_body, upstream=False)


def _bounded_body(self: Any, event: Any, original: Callable[..., Generator[Any, Any, None]],
                  upstream: bool) -> Generator[Any, Any, None]:
    if _over_limit(self, event):
        yield from _refuse_too_large(self, upstream=upstream)
        return
    yield from original(self, event)


# ------------------------------------------------------------- HTTP/2 server
_original_server_event = _http2.Http2Server.handle_h2_event


def _server_h2_event(self: Any, event: Any) -> Generator[Any, Any, bool]:
    if isinstance(event, h2.events.RequestReceived):
        try:
            _http2.parse_h2_request_headers(event.headers)
        except ValueError:
            # Malformed request (RFC 9113 §8.1.1; e.g. Host and :authority that differ):
            # the client gets a 400 on that stream, and the connection lives on.
            body = page_body(400)
            self.h2_conn.send_headers(event.stream_id, [
                (b":status", b"400"), (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(body)).encode())])
            self.h2_conn.send_data(event.stream_id, body, end_stream=True)
            if event.stream_ended is None:  # its body would follow: we want none of it
                self.h2_conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.NO_ERROR)
            return False
    elif isinstance(event, h2.exceptions.DenialOfServiceError):  # from _receive_data
        yield from self.protocol_error(str(event), h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        return True
    elif isinstance(event, h2.events.StreamReset):
        times = self.h2_conn.__dict__.setdefault("_luma_resets", [])
        if resets_exceeded(times, time.monotonic()):
            yield from self.protocol_error(
                "too many stream resets", h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            return True
    return (yield from _original_server_event(self, event))


def opened_and_reset(events: Sequence[Any]) -> set[int]:
    """Streams a client opened and reset within one read, with no body: never served.

    The rapid-reset pattern (CVE-2023-44487). Such a stream would still cost a
    flow, the request hooks and routing before its reset is seen; dropping
    the pair costs only hyper-h2's parsing of its frames.
    """
    opened: set[int] = set()
    reset: set[int] = set()
    with_body: set[int] = set()
    for event in events:
        if isinstance(event, h2.events.RequestReceived):
            opened.add(event.stream_id)
        elif isinstance(event, h2.events.StreamReset) and event.stream_id in opened:
            reset.add(event.stream_id)
        elif isinstance(event, h2.events.DataReceived):
            with_body.add(event.stream_id)  # its flow-control window is acknowledged as usual
    return reset - with_body


_original_receive_data = _http2.BufferedH2Connection.receive_data


def _receive_data(self: Any, data: bytes) -> list[Any]:
    """The client side's events less the streams opened and reset in this read; their
    resets count toward ``MAX_RESETS`` (then GOAWAY ENHANCE_YOUR_CALM)."""
    events = _original_receive_data(self, data)
    if self.config.client_side:
        return events  # our own connections to HTTP/2 upstreams
    skip = opened_and_reset(events)
    if not skip:
        return events
    times = self.__dict__.setdefault("_luma_resets", [])
    now = time.monotonic()
    exceeded = False
    for _ in skip:
        exceeded = resets_exceeded(times, now) or exceeded
    kept = [event for event in events if getattr(event, "stream_id", None) not in skip]
    if exceeded:
        return [h2.exceptions.DenialOfServiceError("too many stream resets")]
    return kept


_original_handle_protocol_error = http_layer.HttpStream.handle_protocol_error


def set_reroute(reroute: Callable[[Any], None] | None) -> None:
    """``reroute(flow)`` points a request that will be sent again at another container."""
    _state["reroute"] = reroute


def may_resend(method: str, streamed: bool, answered: bool, sent: bool, retried: bool,
               message: str, cut: bool = False) -> bool:
    """The rule: only what a container provably never answered, and only when safe.

    ``cut``: the proxy itself closed the connection (a response timeout): a slow
    container is not a closing one.
    """
    return (message == SERVER_CLOSED and method.upper() in IDEMPOTENT and not streamed
            and not answered and sent and not retried and not cut)


def _handle_protocol_error(self: Any, event: Any) -> Generator[Any, Any, None]:
    flow = self.flow
    if isinstance(event, _events.ResponseProtocolError) and may_resend(
            flow.request.method, bool(flow.request.stream), flow.response is not None,
            self.client_state == self.state_done
            and self.server_state == self.state_wait_for_response_headers,
            flow.metadata.get("luma_resent", 0) >= MAX_RESENDS, event.message,
            bool(flow.metadata.get("luma_cut"))):
        flow.metadata["luma_resent"] = flow.metadata.get("luma_resent", 0) + 1
        if _state["reroute"] is not None:
            _state["reroute"](flow)
        if not (yield from self.make_server_connection()):
            return  # its own error (connect failed) was handled there
        content = flow.request.raw_content
        trailers = flow.request.trailers
        yield _send_upstream(self, _events.RequestHeaders(
            self.stream_id, flow.request, not (content or trailers)))
        if content:
            yield _send_upstream(self, _events.RequestData(self.stream_id, content))
        if trailers:
            yield _send_upstream(self, _events.RequestTrailers(self.stream_id, trailers))
        yield _send_upstream(self, _events.RequestEndOfMessage(self.stream_id))
        return
    yield from _original_handle_protocol_error(self, event)


def close_upstreams(ip: str, idle_only: bool = False) -> int:
    """Abort the upstream connections to ``ip``; how many.

    All of them when its container is gone (they can only hang); with
    ``idle_only``, only the HTTP/1 ones carrying no request, for an IP that left
    its alias's answer (a busy one, or a WebSocket, is left to finish).
    mitmproxy keeps them per client connection, with no API for this: the
    handler's ``transports``, and its HTTP layer's ``connections`` (server
    connection -> ``HttpClient`` -> ``Http1Client``, idle when its ``stream_id``
    is None).
    """
    proxyserver = ctx.master.addons.get("proxyserver")
    closed = 0
    for handler in list(getattr(proxyserver, "connections", {}).values()):
        idle: set[Any] = set()
        if idle_only:
            for http in _http_layers(getattr(handler, "layer", None)):
                for conn, child in http.connections.items():
                    client = getattr(child, "child_layer", None)
                    if type(client) is _http1.Http1Client and client.stream_id is None:
                        idle.add(conn)
        for conn, io in list(handler.transports.items()):
            if (isinstance(conn, connection.Server) and conn.peername
                    and conn.peername[0] == ip and (not idle_only or conn in idle)):
                transport = getattr(io.writer, "transport", None)
                if transport is not None:
                    transport.abort()
                    closed += 1
    return closed


def _layers(root: Any, kind: type) -> list[Any]:
    """The layers of ``kind`` in one connection's layer stack (modes, TLS, next-layer links)."""
    found, seen, todo = [], set(), [root]
    while todo:
        layer = todo.pop()
        if layer is None or id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, kind):
            found.append(layer)
        todo.extend((getattr(layer, "layer", None), getattr(layer, "child_layer", None),
                     getattr(getattr(layer, "_handle_event", None), "__self__", None)))
    return found


def _http_layers(root: Any) -> list[Any]:
    return _layers(root, http_layer.HttpLayer)


def as_sent_to_client(handler: Any, data: bytes) -> bytes:
    """``data`` as it must go on the client's socket: through its TLS session, if any.

    An answer written straight to the transport (a 408 as a connection is cut)
    would otherwise land raw inside the TLS stream, where the client reads a
    broken record, not an answer.
    """
    for layer in _layers(getattr(handler, "layer", None), tls_layer.ClientTLSLayer):
        session = getattr(layer, "tls", None)
        if layer.conn is not handler.client or session is None:
            continue
        out = b""
        with contextlib.suppress(SSL.Error):
            session.sendall(data)
            while True:
                out += session.bio_read(65535)
        return out
    return data


# ------------------------------------------------------------ live connections
# Closing one of mitmproxy's live connections from an addon: mitmproxy offers no
# API for it; its own inactivity watchdog cancels the task that reads the
# connection, and so do the timeouts, the body limit and the graceful drain here.


def certificate_entries() -> dict[str, Any] | None:
    """mitmproxy's certificates by SNI (tlsconfig's ``CertStore.certs``), where its TLS
    layer looks before minting one; None without tlsconfig (nothing to serve HTTPS)."""
    tlsconfig = ctx.master.addons.get("tlsconfig")
    if tlsconfig is None or tlsconfig.certstore is None:
        return None
    return tlsconfig.certstore.certs


def client_handlers() -> dict[str, Any]:
    """The live connection handlers, by client connection id (``proxyserver.connections``).

    mitmproxy's own mapping (not a copy): it shrinks as connections end.
    """
    return ctx.master.addons.get("proxyserver").connections


def close_connection(handler: Any, conn: connection.Connection | None, reason: str,
                     answer: bytes | None = None) -> bool:
    """Cancel the task reading ``conn`` (default: the client) of one connection handler.

    ``answer`` is written to that connection first (a 408 while the request is still
    arriving, before any response byte): the writer flushes it as the task closes it.
    The handler keeps a ``transports`` entry per connection (reader, writer, task).
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
    """As ``close_connection``, finding the handler by the client connection's id."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = proxyserver.connections.get(client_id) if proxyserver else None
    return handler is not None and close_connection(handler, conn, reason, answer)


# ------------------------------------------------- HTTP/2 client, HTTP/1 upstream
# mitmproxy sends each HTTP/2 stream on a new HTTP/1 connection and closes it after
# one response ("we can rely on the proxyserver's max-connection-per-server
# throttling", which reverse mode does not have): 100 streams meant 100 connects at
# once, and a container's accept queue overflowed (502 "connect timeout" under
# h2load). Here an HTTP/2 client connection keeps its HTTP/1 upstream connections
# alive and hands an idle one to the next stream, and opens at most ``pool`` to one
# address; a stream beyond that waits for one to come free. A response with
# read-until-EOF framing still closes its connection (mitmproxy's rule).
# mitmproxy's own bound, a semaphore of 5 per address and client connection held
# for a connection's whole life, becomes ``pool`` too: kept-alive connections
# would otherwise hold it and a sixth connect would wait forever.
# An HTTP/3 client (``MULTIPLEXED_ALPN``) is served the same way: mitmproxy does not even keep
# its streams apart (it reuses a busy HTTP/1 connection, and Http1Client.send asserts).
_original_get_connection = http_layer.HttpLayer.get_connection
_original_h1_client_send = _http1.Http1Client.send
_original_layer_event = http_layer.HttpLayer._handle_event
_original_handler_init = proxy_server.ConnectionHandler.__init__


def pool_has_room(busy: int, size: int) -> bool:
    """Whether one more upstream connection may be opened."""
    return busy < size


def _handler_init(self: Any, context: Any) -> None:
    _original_handler_init(self, context)
    self.max_conns = collections.defaultdict(lambda: asyncio.Semaphore(_state["pool"]))


def _h1_client(layer: Any) -> Any:
    """The ``Http1Client`` at the end of an upstream connection's layer stack, or None."""
    while layer is not None and not isinstance(layer, _http1.Http1Client):
        layer = getattr(layer, "child_layer", None)
    return layer


def _idle(h1: Any) -> bool:
    return (h1 is not None and h1.stream_id is None and h1.request is None
            and h1.state == h1.read_headers)


def _pooled(self: Any, event: Any) -> tuple[Any, int]:
    """An idle upstream connection ``event`` may use (or None), and how many are busy."""
    idle, busy = None, 0
    for conn, child in self.connections.items():
        if not event.connection_spec_matches(conn) or conn.error:
            continue
        if conn in self.waiting_for_establishment:
            busy += 1
        elif conn.connected:
            if idle is None and _idle(_h1_client(child)):
                idle = conn
            else:
                busy += 1
    return idle, busy


def _get_connection(self: Any, event: Any, *, reuse: bool = True) -> Generator[Any, Any, None]:
    # HTTP/1 clients (and no reuse): mitmproxy's own generator, not one wrapped around it;
    # the patched methods run for every request (callgrind: docs/performance.md).
    if self.context.client.alpn not in MULTIPLEXED_ALPN or not reuse:
        return _original_get_connection(self, event, reuse=reuse)
    return _get_pooled_connection(self, event)


def _get_pooled_connection(self: Any, event: Any) -> Generator[Any, Any, None]:
    idle, busy = _pooled(self, event)
    if idle is not None:
        stream = self.command_sources.pop(event)
        yield from self.event_to_child(
            stream, http_layer.GetHttpConnectionCompleted(event, (idle, None)))
    elif pool_has_room(busy, _state["pool"]):
        # mitmproxy's own path, which never hands an HTTP/1 connection to a second stream
        yield from _original_get_connection(self, event, reuse=False)
    else:
        self.__dict__.setdefault("_luma_parked", []).append(event)


def _layer_event(self: Any, event: Any) -> Generator[Any, Any, None]:
    """mitmproxy's, then any stream parked for a pooled connection retries (FIFO).

    Only an HTTP/2 or HTTP/3 client's streams are ever parked: an HTTP/1 client gets
    mitmproxy's own generator, unwrapped."""
    if self.context.client.alpn not in MULTIPLEXED_ALPN:
        return _original_layer_event(self, event)
    return _layer_event_retrying(self, event)


def _layer_event_retrying(self: Any, event: Any) -> Generator[Any, Any, None]:
    yield from _original_layer_event(self, event)
    parked = self.__dict__.get("_luma_parked")
    while parked:
        idle, busy = _pooled(self, parked[0])
        if idle is None and not pool_has_room(busy, _state["pool"]):
            return
        yield from _get_pooled_connection(self, parked.pop(0))


def _h1_client_send(self: Any, event: Any) -> Generator[Any, Any, None]:
    """Convert an HTTP/2 request as mitmproxy does, but before it is kept: then the
    connection's keep-alive follows the HTTP/1 rules and it can serve the next stream.
    Anything else: mitmproxy's own generator, unwrapped."""
    if isinstance(event, _events.RequestHeaders) and (
            event.request.data.http_version in MULTIPLEXED):
        request = event.request.copy()
        request.http_version = "HTTP/1.1"
        if "Host" not in request.headers and request.authority:
            request.headers.insert(0, "Host", request.authority)
        request.authority = ""
        cookies = request.headers.get_all("Cookie")
        if len(cookies) > 1:  # RFC 6265 §5.4: one Cookie field on HTTP/1
            request.headers["Cookie"] = "; ".join(cookies)
        event = _events.RequestHeaders(event.stream_id, request, event.end_stream,
                                       event.replay_flow)
    return _original_h1_client_send(self, event)


def _send_upstream(self: Any, event: Any) -> Any:
    return http_layer.SendHttp(event, self.context.server)


def _protocol_error(self: Any, message: str,
                    error_code: int = h2.errors.ErrorCodes.PROTOCOL_ERROR
                    ) -> Generator[Any, Any, None]:
    """mitmproxy's, with GOAWAY debug data that says nothing internal."""
    yield commands.Log(f"HTTP/2 connection closed: {message}")
    self.h2_conn.close_connection(error_code, GOAWAY_TEXT)
    yield commands.SendData(self.conn, self.h2_conn.data_to_send())
    yield from self.close_connection(message)


def install(body_limit: int | None = None) -> None:
    """Put the patches in place (once); ``body_limit`` updates the HTTP/2 body bound."""
    if body_limit is not None:
        set_body_limit(body_limit)
    if _state["installed"]:
        return
    _state["installed"] = True
    stream = http_layer.HttpStream
    stream.state_wait_for_request_headers = _wait_for_request_headers  # type: ignore[method-assign]
    stream.state_stream_request_body = _stream_request_body  # type: ignore[method-assign]
    stream.state_consume_request_body = _consume_request_body  # type: ignore[method-assign]
    stream.handle_protocol_error = _handle_protocol_error  # type: ignore[method-assign]
    _http2.Http2Server.handle_h2_event = _server_h2_event  # type: ignore[method-assign]
    _http2.BufferedH2Connection.receive_data = _receive_data  # type: ignore[method-assign]
    _http2.Http2Connection.protocol_error = _protocol_error  # type: ignore[method-assign]
    http_layer.HttpLayer.get_connection = _get_connection  # type: ignore[method-assign]
    http_layer.HttpLayer._handle_event = _layer_event  # type: ignore[method-assign]
    _http1.Http1Client.send = _h1_client_send  # type: ignore[method-assign]
    proxy_server.ConnectionHandler.__init__ = _handler_init  # type: ignore[method-assign]
    # The `server` header of mitmproxy's own HTTP/2 error answers (502 and the like).
    _http2.version = types.SimpleNamespace(MITMPROXY="luma-proxy")  # type: ignore[attr-defined]


# ------------------------------------------------------------------ connection opening
RACE_DELAY = 0.25  # a healthy container on a Docker network answers a SYN in well under 1 ms
RETRY_PAUSE = 0.05  # between rounds once every known IP failed (a container restarting)
HOLD_PAUSE = 0.2  # between rounds past the retry timeout, while held for a container

Alternatives = Callable[[str, int, bool], Awaitable[Sequence[str]]]


class Connector:
    """Opens a connection to one of an alias's IPs, retrying and racing."""

    def __init__(self, alternatives: Alternatives, timeout: float = 5.0,
                 opener: Callable[..., Awaitable[Any]] = asyncio.open_connection,
                 hold: float = 0.0) -> None:
        self.alternatives = alternatives  # (ip, port, fresh) -> the alias's IPs
        self.timeout = timeout
        self.hold = hold  # how long to keep at it once every IP failed (nothing to route to)
        self.opener = opener  # one attempt to one IP

    async def open(self, host: str, port: int, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.timeout
        tried = {host}
        attempts: dict[asyncio.Task[Any], str] = {self._attempt(host, port, kwargs): host}
        error: BaseException | None = None
        fresh = False
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise error if error is not None else TimeoutError(
                        f"no container took the connection within {self.timeout:g}s")
                if attempts:
                    done, _ = await asyncio.wait(
                        attempts, timeout=min(RACE_DELAY, remaining),
                        return_when=asyncio.FIRST_COMPLETED)
                else:  # nothing to try: wait for the alias to offer a container
                    done = set()
                    await asyncio.sleep(min(HOLD_PAUSE, remaining))
                for task in done:
                    del attempts[task]
                    if task.exception() is None:
                        return task.result()
                    error = task.exception()
                if done and attempts:
                    continue  # one failed, another still racing: give it its chance
                current = list(await self.alternatives(host, port, fresh))
                if fresh:
                    # DNS was asked again: a connect still hanging to an address that
                    # left the alias (a gone container does not refuse) is given up.
                    for task, ip in list(attempts.items()):
                        if ip not in current:
                            del attempts[task]
                            task.cancel()
                            task.add_done_callback(_close_result)
                others = [ip for ip in current if ip not in tried]
                fresh = not others  # exhausted: ask DNS next time
                if others:
                    tried.add(others[0])
                    attempts[self._attempt(others[0], port, kwargs)] = others[0]
                elif not attempts:
                    # Every IP failed once: no container can take it now (a single
                    # replica redeployed, all restarting). Wait for one, up to the hold,
                    # trying again what the alias offers then.
                    deadline = max(deadline, started + self.hold)
                    pause = RETRY_PAUSE if loop.time() < started + self.timeout else HOLD_PAUSE
                    await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
                    current = list(await self.alternatives(host, port, True))
                    tried = set(current[:1])
                    for ip in current[:1]:
                        attempts[self._attempt(ip, port, kwargs)] = ip
        finally:
            for task in attempts:
                task.cancel()
                task.add_done_callback(_close_result)

    def _attempt(self, host: str, port: int, kwargs: dict[str, Any]) -> asyncio.Task[Any]:
        return asyncio.ensure_future(self.opener(host, port, **kwargs))


def _close_result(task: asyncio.Task[Any]) -> None:
    """A racer that connected after the winner: close its socket."""
    if not task.cancelled() and task.exception() is None:
        _, writer = task.result()
        with contextlib.suppress(Exception):
            writer.close()


def install_connect_retry(connector: Connector) -> None:
    """Point mitmproxy's server module (only) at ``connector`` for TCP connects."""
    shim = types.SimpleNamespace(**{name: getattr(asyncio, name) for name in dir(asyncio)
                                    if not name.startswith("__")})
    shim.open_connection = connector.open
    proxy_server.asyncio = shim  # type: ignore[attr-defined]  # its module-global ``asyncio``


class ConnectRetry:
    """The addon: option ``luma_retry_timeout`` and the seam, installed on load."""

    def __init__(self, alternatives: Alternatives) -> None:
        self.connector = Connector(alternatives)

    def load(self, loader: Any) -> None:
        loader.add_option(
            "luma_retry_timeout", float, env_float("LUMA_PROXY_RETRY_TIMEOUT", 1.0),
            "Seconds to keep retrying a failed container connect on other IPs of the alias.",
        )
        install_connect_retry(self.connector)

    def configure(self, updated: set[str]) -> None:
        if "luma_retry_timeout" in updated:
            if ctx.options.luma_retry_timeout <= 0:
                raise exceptions.OptionsError("luma_retry_timeout must be > 0")
            self.connector.timeout = ctx.options.luma_retry_timeout
        if "luma_hold_timeout" in updated and "luma_hold_timeout" in ctx.options:
            self.connector.hold = ctx.options.luma_hold_timeout  # LumaProxy's option


# ------------------------------------------------- HTTP/2: GOAWAY when the proxy closes
_original_server_handle = _http2.Http2Server._handle_event


def _server_handle(self: Any, event: Any) -> Generator[Any, Any, None]:
    """A client HTTP/2 connection the proxy closes with no stream open gets GOAWAY(NO_ERROR).

    The proxy closes a connection by cancelling the task that reads it (idle
    timeout, drain, mitmproxy's inactivity watchdog); mitmproxy's
    ``Http2Server`` then sends nothing, and a client cannot tell an idle close
    from a crash. Only a close of ours (``state`` CLOSED, where a peer's close
    leaves CAN_WRITE) with no stream open, which loses no request.
    """
    if (isinstance(event, events.ConnectionClosed) and event.connection is self.conn
            and self.conn.state is ConnectionState.CLOSED
            and self.h2_conn.open_inbound_streams == 0):
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2_conn.close_connection(h2.errors.ErrorCodes.NO_ERROR)
            yield commands.SendData(self.conn, self.h2_conn.data_to_send())
    yield from _original_server_handle(self, event)


def install_h2_goaway_on_close() -> None:
    """Put ``_server_handle`` in place (idempotent)."""
    _http2.Http2Server._handle_event = _server_handle  # type: ignore[method-assign]


# ------------------------------------------------- HTTP/1 request limits (limits.py)
# mitmproxy buffers a request head until it is complete, without any bound, and
# reads a whole request body before it sends an answer an addon set; it has no
# hook inside its HTTP/1 reader. So ``Http1Server.read_headers`` and ``read_body``
# are wrapped: the head is checked (``headrules.HeadScanner``, ``headrules.head_status``)
# before any body byte is read, and a chunked body is counted as h11's reader
# decodes it. The scanner is kept on the server object between segments
# (``luma_scanner``) and the body reader is wrapped in place (``body_reader``).
_limits = {"head": 64 * 1024, "body": 1024**3}
# Request bodies still arriving, for the body deadlines (timeouts.py): client
# connection id -> [when the body began, when bytes last came, the Http1Server].
BODIES: dict[str, list[Any]] = {}
# Client connections closed by a body deadline: their flow ends with BODY_TIMEOUT.
TIMED_OUT: set[str] = set()
_original_read_headers = _http1.Http1Server.read_headers
_original_read_body = _http1.Http1Server.read_body


def human_size(value: str) -> int | None:
    """A size such as ``64k``, ``10m`` or ``1g``, read as mitmproxy reads its own size
    options (``mitmproxy.utils.human``); ValueError when it is not one."""
    return human.parse_size(value)


def assemble_http1(response: http.Response) -> bytes:
    """A response as it goes on an HTTP/1 connection (``mitmproxy.net.http.http1``)."""
    return http1.assemble_response(response)


def refuse(status: int) -> bytes:
    """Our page for ``status`` as HTTP/1 bytes, closing the connection."""
    return assemble_http1(page(status, {"Connection": "close"}))


def response_begun(server: Any) -> bool:
    """Whether the ``Http1Server`` noted in ``BODIES`` has begun its response."""
    return server.response is not None


def _refuse(conn: Any, status: int) -> Generator[commands.Command, Any, None]:
    """Answer and half-close: a full close with unread request bytes makes the kernel
    send RST, which can destroy the answer before the client reads it."""
    yield commands.SendData(conn, refuse(status))
    yield commands.CloseTcpConnection(conn, half_close=True)


def _read_headers_bounded(
    self: _http1.Http1Server, event: events.ConnectionEvent
) -> Generator[commands.Command, Any, None]:
    """mitmproxy's request-head reader, with a size bound, a syntax check and an early 413.

    The scanner follows the buffer while the head arrives (mitmproxy appends
    each segment before calling this); a buffer that does not continue what
    was scanned (a new request) starts a new one.
    """
    if isinstance(event, events.DataReceived):
        scanner: HeadScanner | None = getattr(self, "luma_scanner", None)
        data = None
        if scanner is None or scanner.scanned + len(event.data) != len(self.buf):
            data = bytes(self.buf)
            end = head_end(data)  # nearly always whole in one segment: no scanner needed
            if end is None:
                scanner = self.luma_scanner = HeadScanner()  # type: ignore[attr-defined]
                scanner.feed(data)
        else:
            end = scanner.feed(event.data)
        status = None
        if end is None:
            if len(self.buf) > _limits["head"]:
                status = 431
        else:
            self.luma_scanner = None  # type: ignore[attr-defined]
            if end > _limits["head"]:
                status = 431
            else:
                head = data if data is not None else bytes(self.buf)
                status = head_status(head[:end], _limits["body"])
        if status is not None:
            yield from _refuse(self.conn, status)
            self.state = self.done
            return
    yield from _original_read_headers(self, event)


class BodyTooLarge(Exception):
    pass


class BadChunking(Exception):
    """A chunked body that does not parse (mitmproxy would close without an answer)."""


class CountedReader:
    """h11's chunked body reader (mitmproxy's ``body_reader``), counting the body and
    dropping trailers.

    Trailers: mitmproxy raises ``NotImplementedError`` on them (a traceback
    and a hung client); a proxy may discard them (RFC 9110 §6.5.1).
    """

    __slots__ = ("limit", "reader", "seen")

    def __init__(self, reader: ChunkedReader, limit: int) -> None:
        self.reader, self.limit, self.seen = reader, limit, 0

    def __call__(self, buf: Any) -> Any:
        try:
            event = self.reader(buf)
        except h11.ProtocolError as e:
            raise BadChunking(str(e)) from None
        if type(event) is h11.Data:
            self.seen += len(event.data)
            if self.seen > self.limit:
                raise BodyTooLarge
        elif type(event) is h11.EndOfMessage and event.headers:
            return h11.EndOfMessage()
        return event

    def read_eof(self) -> Any:
        return self.reader.read_eof()


def _read_body_bounded(
    self: _http1.Http1Server, event: events.Event
) -> Generator[commands.Command, Any, None]:
    """mitmproxy's request-body reader; a chunked body over the limit ends in 413.

    A body not complete after this segment is noted in ``BODIES`` (begun,
    last bytes), so that the body deadlines can cut a client that trickles it.

    The error event makes mitmproxy close the upstream connection before any
    chunk terminator is written (the container sees a cut request, never a
    complete one) and end the flow with ``BODY_TOO_LARGE``.
    """
    if type(self.body_reader) is ChunkedReader:
        self.body_reader = CountedReader(self.body_reader, _limits["body"])
    if TIMED_OUT and isinstance(event, events.ConnectionClosed) and self.conn.id in TIMED_OUT:
        TIMED_OUT.discard(self.conn.id)
        yield http_layer.ReceiveHttp(http_layer.RequestProtocolError(
            self.stream_id, BODY_TIMEOUT, code=http_layer.ErrorCode.GENERIC_CLIENT_ERROR))
        self.state = self.done
        return
    try:
        yield from _original_read_body(self, event)
    except BodyTooLarge:
        BODIES.pop(self.conn.id, None)
        yield from _refuse(self.conn, 413)
        yield http_layer.ReceiveHttp(http_layer.RequestProtocolError(
            self.stream_id, BODY_TOO_LARGE, code=http_layer.ErrorCode.REQUEST_TOO_LARGE))
        self.state = self.done
        return
    except BadChunking as e:  # 400, and the upstream request is cut, never completed
        BODIES.pop(self.conn.id, None)
        yield from _refuse(self.conn, 400)
        yield http_layer.ReceiveHttp(http_layer.RequestProtocolError(
            self.stream_id, f"HTTP/1 protocol error: {e}",
            code=http_layer.ErrorCode.GENERIC_CLIENT_ERROR))
        self.state = self.done
        return
    if getattr(self.state, "__func__", None) is _read_body_bounded:  # more body to come
        now = time.monotonic()
        progress = BODIES.get(self.conn.id)
        if progress is None:
            BODIES[self.conn.id] = [now, now, self]
        else:
            progress[1] = now
    elif BODIES:
        BODIES.pop(self.conn.id, None)


def install_http1_limits(head: int, body: int) -> None:
    """Put the bounded HTTP/1 readers in place (idempotent) with these limits."""
    _limits.update(head=head, body=body)
    _http1.Http1Server.read_headers = _read_headers_bounded  # type: ignore[method-assign]
    _http1.Http1Server.read_body = _read_body_bounded  # type: ignore[method-assign]


# ----------------------------------------------------------- error pages (pages.py)
def _engine_error(status_code: int, message: str) -> bytes:
    """Replaces mitmproxy's error page, which quotes the socket error (with IPs)."""
    return page_body(status_code)


def _http1_error_response(status_code: int, message: str = "") -> bytes:
    """mitmproxy's HTTP/1 error response, without the engine's name and version."""
    response = http.Response.make(
        status_code,
        page_body(status_code),
        {"Content-Type": "text/html; charset=utf-8", "Connection": "close"},
    )
    return assemble_http1(response)


def install_engine_error_pages() -> None:
    """Make mitmproxy's own error answers (e.g. 502 on a refused connect) our pages.

    mitmproxy builds them with ``format_error(status, message)`` imported into each
    HTTP layer module, and offers no hook to replace them; rebinding that name is
    the narrowest change that keeps socket errors out of pages.
    """
    for module in (_http1, _http2, _http3):
        module.format_error = _engine_error  # type: ignore[attr-defined]
    _http1.make_error_response = _http1_error_response  # type: ignore[attr-defined]


# ------------------------------------------- SO_REUSEPORT for run --workers (workers.py)
class _ReusePortAsyncio(types.ModuleType):
    """What the name ``asyncio`` means inside ``mitmproxy.proxy.mode_servers`` in a worker.

    Everything is the real asyncio except ``start_server``, which adds
    ``reuse_port=True`` and remembers the sockets so that the worker can prove
    they got the option before it reports ready.
    """

    def __init__(self) -> None:
        super().__init__("asyncio")
        self.sockets: list[socket.socket] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def start_server(self, client_connected_cb: Any, host: Any = None, port: Any = None,
                           **kwds: Any) -> asyncio.Server:
        if kwds.get("sock") is None:
            kwds["reuse_port"] = True
        server = await asyncio.start_server(client_connected_cb, host, port, **kwds)
        self.sockets.extend(server.sockets)
        return server


def enable_reuse_port() -> _ReusePortAsyncio:
    """Make mitmproxy's TCP listeners in this process set ``SO_REUSEPORT`` (idempotent).

    mitmproxy binds with ``asyncio.start_server(handler, host, port)`` in
    ``mitmproxy/proxy/mode_servers.py`` and has no option for reuse_port.
    Choices, narrowest first:

    - rebind the name ``asyncio`` in that one module to a shim whose
      ``start_server`` passes ``reuse_port=True`` (this): nothing else in the
      process changes, mitmproxy still does its own binding, error messages and
      restarts, and any later ``listen()`` (an options change) gets it too;
    - patch ``asyncio.start_server`` for the whole process: also changes every
      other server in the worker (metrics, anything an addon starts);
    - subclass/replace ``AsyncioServerInstance.listen``: copies mitmproxy code
      that changes between releases;
    - bind in the supervisor and pass fds: mitmproxy cannot adopt a socket.

    If a mitmproxy release stops binding through this name, ``reuse_port_sockets``
    misses its listeners and ``workers.worker_listening`` fails the worker.
    """
    from mitmproxy.proxy import mode_servers

    current = mode_servers.asyncio
    if isinstance(current, _ReusePortAsyncio):
        return current
    shim = _ReusePortAsyncio()
    mode_servers.asyncio = shim  # type: ignore[attr-defined]
    return shim


def reuse_port_sockets() -> list[socket.socket]:
    """The sockets mitmproxy's listeners bound through the shim (none without it)."""
    from mitmproxy.proxy import mode_servers

    shim = mode_servers.asyncio
    return shim.sockets if isinstance(shim, _ReusePortAsyncio) else []


# ----------------------------------------- QUIC ClientHello under -O (run --http3, tls.py)
_QUIC_PARSER = "quic_parse_client_hello_from_datagrams"


def install_quic_hello_parser() -> bool:
    """mitmproxy's QUIC ClientHello parser, compiled with its asserts (idempotent);
    whether it is in place.

    ``luma-proxy run`` serves under ``-O`` (startup.py), which drops ``assert``
    statements. mitmproxy's parser reads the ClientHello's first byte inside one
    (``_client_hello_parser.py``: ``assert input_buf.pull_uint8() == ...``): under
    ``-O`` the read is gone, the ClientHello is cut one byte off, and every QUIC
    handshake fails (aioquic: "Could not parse TLS message"). That module's own
    source, compiled with ``optimize=0``, is mitmproxy's code with the read back;
    the modules that call the parser (the QUIC layers, next_layer) get that one.
    Only the parser's module is recompiled: ``-O`` keeps its gains everywhere else.
    """
    from mitmproxy.proxy.layers import quic
    from mitmproxy.proxy.layers.quic import _client_hello_parser, _stream_layers

    current = getattr(_stream_layers, _QUIC_PARSER)
    if getattr(current, "luma_with_asserts", False):
        return True
    path = _client_hello_parser.__file__
    try:
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec", optimize=0)
    except (OSError, SyntaxError, ValueError):  # no source (a .pyc-only install)
        return False
    namespace: dict[str, Any] = {"__name__": _client_hello_parser.__name__, "__file__": path,
                                 "__package__": _client_hello_parser.__package__}
    exec(code, namespace)  # mitmproxy's own module, as installed
    parser = namespace[_QUIC_PARSER]
    parser.luma_with_asserts = True
    modules = [_stream_layers, quic, sys.modules.get("mitmproxy.addons.next_layer")]
    for module in modules:
        if module is not None and hasattr(module, _QUIC_PARSER):
            setattr(module, _QUIC_PARSER, parser)
    return True


# --------------------------------------- QUIC: tell the client when the proxy closes it
_original_quic_receive_close: Callable[..., Any] | None = None


def _quic_receive_close(self: Any) -> Generator[Any, Any, None]:
    """A client QUIC connection the proxy closes gets CONNECTION_CLOSE(H3_NO_ERROR).

    The proxy closes a connection by cancelling the task that reads it (idle
    timeout, drain); mitmproxy's QUIC layer then sends nothing, and a client
    whose QUIC idle timeout is longer sends its next request into the void and
    waits for it. As ``_server_handle`` does for HTTP/2 (GOAWAY): only a close
    of ours (``state`` CLOSED) on an established connection that is not
    closing already (aioquic's ``close`` does nothing then).
    """
    quic = self.quic
    if (quic is not None and self.conn is self.context.client
            and self.conn.state is ConnectionState.CLOSED):
        quic.close(error_code=H3_NO_ERROR, reason_phrase="closing")
        yield from self.tls_interact()
    assert _original_quic_receive_close is not None
    yield from _original_quic_receive_close(self)


H3_NO_ERROR = 0x100  # RFC 9114 §8.1: the connection is closed with no error


def install_http3() -> bool:
    """What serving HTTP/3 needs of mitmproxy (idempotent); False if the ClientHello
    parser could not be recompiled (``install_quic_hello_parser``)."""
    global _original_quic_receive_close
    from mitmproxy.proxy.layers.quic import _stream_layers

    if _original_quic_receive_close is None:
        _original_quic_receive_close = _stream_layers.QuicLayer.receive_close
        _stream_layers.QuicLayer.receive_close = _quic_receive_close  # type: ignore[method-assign]
    return install_quic_hello_parser()


# --------------------------------------- mitmproxy.addons left unimported (startup.py)
def skip_addon_registry(modules: dict[str, types.ModuleType] | None = None) -> bool:
    """Register ``mitmproxy.addons`` in ``modules`` (``sys.modules``) as a bare package;
    whether it did. ``luma-proxy run`` calls it before it imports the lean master.

    ``mitmproxy/addons/__init__.py`` imports all ~36 built-in addons (flask, ldap3,
    the onboarding app, ...) to offer ``default_addons()``, which the lean master
    never calls, and importing a submodule runs that file first. A stand-in
    package with the same ``__path__`` lets the submodules (``core``,
    ``proxyserver``, ...) import without it. Nothing once the package is imported;
    importing this module does not import it. ``LUMA_PROXY_OPTIMIZE=0`` turns it off
    (``startup.enabled``), with the ``-O`` restart, to measure what both earn.
    """
    from luma_proxy.runtime.startup import enabled

    modules = sys.modules if modules is None else modules
    if "mitmproxy.addons" in modules or not enabled(os.environ):
        return False
    spec = importlib.util.find_spec("mitmproxy")
    if spec is None or spec.origin is None:
        return False
    package = types.ModuleType("mitmproxy.addons", "mitmproxy's built-in addons (not imported)")
    package.__path__ = [os.path.join(os.path.dirname(spec.origin), "addons")]
    package.__package__ = "mitmproxy.addons"
    modules["mitmproxy.addons"] = package
    return True


# ------------------------------------------- the hook table's manager swap (engine.py)
def detach_addon_manager(master: Any) -> None:
    """Stop ``master``'s current ``AddonManager`` from hearing option changes.

    An ``AddonManager`` subscribes its private ``_configure_all`` to
    ``options.changed`` when it is built; one replaced by ``engine.HookTable``
    must be unsubscribed, or every option change would also reach the old one.
    """
    master.options.changed.disconnect(master.addons._configure_all)
