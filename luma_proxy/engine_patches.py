"""HTTP/2 behaviour mitmproxy 12 does not offer a seam for: the one place that patches it.

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
* rapid reset (CVE-2023-44487): a connection whose client resets more than
  ``MAX_RESETS`` streams in ``RESET_WINDOW`` seconds gets GOAWAY(ENHANCE_YOUR_CALM)
  and is closed.
"""

from __future__ import annotations

import time
import types
from collections.abc import Generator
from typing import Any

import h2.errors
import h2.events
from mitmproxy import flow as mflow
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers.http import _events, _hooks, _http2

MAX_RESETS = 200
RESET_WINDOW = 10.0
GOAWAY_TEXT = b"closing"
TOO_LARGE = "request body too large"

_state: dict[str, Any] = {"body_limit": 1024**3, "installed": False}
_MULTIPLEXED = (b"HTTP/2.0", b"HTTP/3")


def set_body_limit(limit: int) -> None:
    _state["body_limit"] = limit


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
    request = event.request
    chunked = request.data.http_version in _MULTIPLEXED and needs_chunked(
        request.headers, event.end_stream)
    steps = _original_wait(self, event)
    sent: Any = None
    while True:
        try:
            command = steps.send(sent)
        except StopIteration:
            return
        if chunked and isinstance(command, _hooks.HttpRequestHeadersHook):
            # Past mitmproxy's validation (which refuses the field on HTTP/2): the framing
            # its HTTP/1 client writes the body with.
            request.headers["transfer-encoding"] = "chunked"
            chunked = False
        sent = yield command


def _over_limit(self: Any, event: Any) -> bool:
    if not isinstance(event, _events.RequestData):
        return False
    request = self.flow.request
    if request.data.http_version not in _MULTIPLEXED:
        return False  # HTTP/1 bodies are bounded in limits.py
    seen = self.flow.metadata.get("luma_h2_body", 0) + len(event.data)
    self.flow.metadata["luma_h2_body"] = seen
    return seen > _state["body_limit"]


def _refuse_too_large(self: Any, upstream: bool) -> Generator[Any, Any, None]:
    """413 on this stream only; an upstream request already begun is aborted, never completed."""
    self.flow.error = mflow.Error(TOO_LARGE)
    yield _hooks.HttpErrorHook(self.flow)
    yield http_layer.SendHttp(_events.ResponseProtocolError(
        self.stream_id, TOO_LARGE, _events.ErrorCode.REQUEST_TOO_LARGE), self.context.client)
    if upstream:
        yield http_layer.SendHttp(_events.RequestProtocolError(
            self.stream_id, TOO_LARGE, _events.ErrorCode.REQUEST_TOO_LARGE), self.context.server)
        self.server_state = self.state_errored
    self.client_state = self.state_errored
    self.flow.live = False


def _stream_request_body(self: Any, event: Any) -> Generator[Any, Any, None]:
    if _over_limit(self, event):
        yield from _refuse_too_large(self, upstream=True)
        return
    yield from _original_stream_body(self, event)


def _consume_request_body(self: Any, event: Any) -> Generator[Any, Any, None]:
    if _over_limit(self, event):
        yield from _refuse_too_large(self, upstream=False)
        return
    yield from _original_consume_body(self, event)


# ------------------------------------------------------------- HTTP/2 server
_original_server_event = _http2.Http2Server.handle_h2_event


def _server_h2_event(self: Any, event: Any) -> Generator[Any, Any, bool]:
    if isinstance(event, h2.events.RequestReceived):
        try:
            _http2.parse_h2_request_headers(event.headers)
        except ValueError:
            # Malformed request (RFC 9113 §8.1.1): a stream error, the connection lives on.
            self.h2_conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return False
    elif isinstance(event, h2.events.StreamReset):
        times = self.__dict__.setdefault("_luma_resets", [])
        if resets_exceeded(times, time.monotonic()):
            yield from self.protocol_error(
                "too many stream resets", h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            return True
    return (yield from _original_server_event(self, event))


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
    _http2.Http2Server.handle_h2_event = _server_h2_event  # type: ignore[method-assign]
    _http2.Http2Connection.protocol_error = _protocol_error  # type: ignore[method-assign]
    # The `server` header of mitmproxy's own HTTP/2 error answers (502 and the like).
    _http2.version = types.SimpleNamespace(MITMPROXY="luma-proxy")  # type: ignore[attr-defined]
