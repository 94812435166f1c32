"""The access log: one line per request on stdout, as text or as JSON.

Every request gets exactly one line when it ends: answered by a container, by
the proxy itself (400/404/503), or by an error (502 when the container fails,
499 when the client went away first). Fields, in this order::

    time         ISO 8601 UTC, milliseconds, when the request ended
    host         the Host header as sent (clipped to 256 characters)
    method, path the path *without* its query string, unless luma_log_query
    status       what the client was given
    duration_ms  from the request's first byte to the end of the answer
    bytes_in     request body bytes; bytes_out: response body bytes
    service      the deployed host it matched ("" for unknown hosts)
    project      that service's project
    container_ip the container it went to ("" if it went to none)
    request_id   the X-Request-ID the container and the client saw
    client       the peer address (the TCP peer, not X-Forwarded-For)
    user_agent   clipped to 512 characters
    error        only on lines that ended in an error

Query strings are left out by default: they often carry tokens (password reset
links, signed URLs, API keys), and access logs travel further than the proxy.
``luma_log_query=true`` (``--log-query``) puts them in.

Streamed bodies (server-sent events, chunked uploads, anything over
``streaming.STREAM_ABOVE``) are counted on their way through by the
``streaming.ByteCounter`` the routing addon puts on ``.stream``; nothing reads
or keeps them. (A body another mitmproxy script streams later is logged as 0.)

The line is built with one pre-configured ``json`` encoder call (or a few
f-strings for text) and written to stdout by ``LineWriter``, not through
``logging`` (a ``LogRecord`` costs more than the line): the lines of 50 ms
leave together, as ``os.write`` calls of whole lines of at most PIPE_BUF bytes
each, so ``--workers`` sharing one stdout pipe never tear a line. The proxy's other log
records stay where the logging setup puts them; ``configure_logging("json")``
makes them JSON lines on stdout as well.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import select
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from mitmproxy import ctx, exceptions, http

from luma_proxy.proxy.flowinfo import (
    client_ip,
    error_status,
    header,
    host_header,
    project_of,
    service_host,
)
from luma_proxy.proxy.requestid import METADATA as REQUEST_ID
from luma_proxy.proxy.streaming import ByteCounter

LOG_FORMATS = ("text", "json")
ENV_LOG_FORMAT = "LUMA_PROXY_LOG_FORMAT"
LOGGED = "luma_logged"
MAX_PATH = 2048
MAX_USER_AGENT = 512
MAX_HOST = 256
MAX_ERROR = 512

logger = logging.getLogger("luma_proxy")

_encode = json.JSONEncoder(separators=(",", ":")).encode
_PLAIN = re.compile(r"[\w.:/@+=,;~%&?!*()'\[\]$-]+", re.ASCII)


def default_log_format() -> str:
    """``$LUMA_PROXY_LOG_FORMAT`` if it is valid, else ``text``."""
    value = os.environ.get(ENV_LOG_FORMAT, "text").strip().lower()
    if value not in LOG_FORMATS:
        logger.warning("ignoring %s=%r: expected text or json", ENV_LOG_FORMAT, value)
        return "text"
    return value


_last_second: tuple[int, str] = (-1, "")  # one tuple: swapped whole, safe across threads


_MILLIS = tuple(f".{n:03d}Z" for n in range(1000))  # a lookup, not a format, per line


def iso_utc(timestamp: float) -> str:
    """``2025-01-02T03:04:05.678Z``; the seconds part is formatted once per second."""
    global _last_second
    second = int(timestamp)
    cached, text = _last_second
    if cached != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second = (second, text)
    return text + _MILLIS[int((timestamp - second) * 1000)]


def body_bytes(message: http.Message | None) -> int:
    if message is None:
        return 0
    if isinstance(message.stream, ByteCounter):
        return message.stream.count
    content = message.raw_content
    return len(content) if content else 0


def milliseconds(seconds: float) -> float:
    """``round(seconds * 1000, 3)`` for a duration (0 if negative), without ``round``'s
    conversion through decimal digits, which every request's log line paid."""
    return int(seconds * 1_000_000 + 0.5) / 1000 if seconds > 0 else 0.0


def clip(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[:limit] + "..."


def access_entry(
    flow: http.HTTPFlow,
    status: int,
    now: float,
    router: Any | None = None,
    with_query: bool = False,
    error: str | None = None,
) -> dict[str, Any]:
    """The fields of one access line (see the module docstring)."""
    request = flow.request
    path = request.path if with_query else request.path.partition("?")[0]
    metadata = flow.metadata
    service = metadata.get("luma_service") or service_host(flow, router)
    entry: dict[str, Any] = {
        "time": iso_utc(now),
        "level": "info",
        "msg": "request",
        "host": clip(host_header(request) or "", MAX_HOST),
        "method": request.method,
        "path": clip(path, MAX_PATH),
        "status": status,
        "duration_ms": milliseconds(now - request.timestamp_start),
        "bytes_in": body_bytes(request),
        "bytes_out": body_bytes(flow.response),
        "service": service,
        "project": project_of(service, router),
        "container_ip": metadata.get("luma_ip", ""),
        "request_id": metadata.get(REQUEST_ID, ""),
        "client": client_ip(flow),
        "user_agent": clip(header(request.headers, "user-agent"), MAX_USER_AGENT),
    }
    if error:
        entry["error"] = clip(error, MAX_ERROR)
    held = metadata.get("luma_held")
    if held is not None:  # waited for a container (addon.LumaProxy._hold)
        entry["held_ms"] = milliseconds(held)
    return entry


def render_json(entry: dict[str, Any]) -> str:
    return _encode(entry)


def _text(value: str) -> str:
    """As is when it is plain, JSON-quoted otherwise (spaces, quotes, control characters)."""
    if not value:
        return "-"
    return value if _PLAIN.fullmatch(value) else _encode(value)


def render_text(e: dict[str, Any]) -> str:
    """One text line; IPs and the request id (sane or generated) never need quoting.

    The other strings are checked together first: when all are plain or empty
    (nearly always; an empty one is "-"), one regex match instead of one per field.
    """
    method, host, path = e["method"] or "-", e["host"] or "-", e["path"] or "-"
    service, project, agent = e["service"] or "-", e["project"] or "-", e["user_agent"] or "-"
    if _PLAIN.fullmatch(f"{method}{host}{path}{service}{project}{agent}"):
        quoted = f"{method} {host} {path}", service, project, agent
    else:
        quoted = (f"{_text(method)} {_text(host)} {_text(path)}", _text(service),
                  _text(project), _text(agent))
    line = (
        f"{e['time']} {e['status']} {quoted[0]} "
        f"{e['duration_ms']}ms in={e['bytes_in']} out={e['bytes_out']} "
        f"service={quoted[1]} project={quoted[2]} "
        f"ip={e['container_ip'] or '-'} id={e['request_id'] or '-'} "
        f"client={e['client'] or '-'} ua={quoted[3]}"
    )
    if "error" in e:
        line += f" error={_text(e['error'])}"
    if "held_ms" in e:
        line += f" held={e['held_ms']}ms"
    return line


RENDERERS = {"text": render_text, "json": render_json}


FLUSH_EVERY = 0.05  # seconds a line may wait for the ones after it
MAX_PENDING = 512  # lines; more are written at once


def pipe_chunks(lines: list[str], limit: int = select.PIPE_BUF) -> Iterator[bytes]:
    """Whole lines joined into pieces of at most ``limit`` bytes (a longer line alone).

    Why: ``--workers`` share one stdout. The kernel keeps a pipe write whole only
    up to PIPE_BUF bytes; a bigger one can be split and interleaved with another
    worker's, tearing lines. Each piece is one ``os.write``: a line is never cut.
    """
    piece: list[bytes] = []
    size = 0
    for line in lines:
        data = line.encode() + b"\n"
        if piece and size + len(data) > limit:
            yield b"".join(piece)
            piece, size = [], 0
        piece.append(data)
        size += len(data)
    if piece:
        yield b"".join(piece)


class LineWriter:
    """Writes the lines of up to ``interval`` seconds with one ``write`` and one ``flush``.

    Not through ``logging``: building a ``LogRecord`` (caller lookup, thread and
    process names) costs several times more than the line itself. The first line
    after a write schedules the next one ``interval`` seconds later (0: at the end
    of the event loop's turn); the lines that arrive meanwhile leave with it, one
    system call for all, or at once when ``MAX_PENDING`` are waiting. Without a
    running loop a line is written at once, and ``flush()`` (the addon's ``done``)
    writes what is waiting. ``stream=None`` means whatever ``sys.stdout`` is at the
    time of writing. A broken stdout is reported once and never fails a request.
    """

    def __init__(self, stream: TextIO | None = None, interval: float = FLUSH_EVERY) -> None:
        self.stream = stream
        self.interval = interval
        self.failed = False
        self._lines: list[str] = []

    def __call__(self, line: str) -> None:
        lines = self._lines
        lines.append(line)
        if len(lines) == 1:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop: nothing would flush later
                self.flush()
                return
            if self.interval > 0:
                loop.call_later(self.interval, self.flush)
            else:
                loop.call_soon(self.flush)
        elif len(lines) >= MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        lines, self._lines = self._lines, []
        if not lines:
            return
        stream = self.stream if self.stream is not None else sys.stdout
        try:
            try:
                fd = stream.fileno()
            except (OSError, ValueError, AttributeError):  # io.StringIO and the like
                stream.write("\n".join(lines) + "\n")
                stream.flush()
                return
            stream.flush()  # whatever print() left in its buffer goes first
            for chunk in pipe_chunks(lines):
                while chunk:
                    chunk = chunk[os.write(fd, chunk):]
        except (OSError, ValueError) as e:  # EPIPE, closed file
            if not self.failed:
                self.failed = True
                logger.warning("cannot write the access log: %s", e)


class JsonFormatter(logging.Formatter):
    """Any log record as one JSON line: time, level, logger, msg (and exc, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": iso_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _encode(entry)


def configure_logging(fmt: str, stream: TextIO | None = None) -> None:
    """For ``json``: every log record, luma-proxy's and mitmproxy's, as one JSON line on stdout.

    Call it after the process's logging setup (``server.setup_logging()``): it
    replaces the root logger's handlers and keeps the levels. ``text`` leaves
    that setup as it is. The access log has its own writer either way.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"invalid log format {fmt!r}: expected text or json")
    if fmt != "json":
        return
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(JsonFormatter())
    logging.getLogger().handlers[:] = [handler]


class AccessLog:
    """Writes one access line per request. Runs after the routing addon."""

    def __init__(self, write: Callable[[str], None] | None = None) -> None:
        self.render = render_text
        self.with_query = False
        self.write = write or LineWriter()
        self._router: Any | None = None

    def load(self, loader: Any) -> None:
        loader.add_option(
            "luma_log_format", str, default_log_format(),
            "Access log (stdout) format: text or json; env LUMA_PROXY_LOG_FORMAT.",
            choices=LOG_FORMATS,
        )
        loader.add_option(
            "luma_log_query", bool, False,
            "Log the query string of each request (it may carry tokens).",
        )

    def configure(self, updated: set[str]) -> None:
        if "luma_log_format" in updated:
            fmt = ctx.options.luma_log_format
            if fmt not in RENDERERS:
                raise exceptions.OptionsError(f"luma_log_format must be text or json, not {fmt!r}")
            self.render = RENDERERS[fmt]
        if "luma_log_query" in updated:
            self.with_query = ctx.options.luma_log_query

    def running(self) -> None:
        self._router = None

    def done(self) -> None:
        """Lines still waiting for the writer's timer are not lost on shutdown."""
        flush = getattr(self.write, "flush", None)
        if flush is not None:
            flush()

    def router(self) -> Any | None:
        if self._router is None:
            self._router = ctx.master.addons.get("lumaproxy")
        return self._router

    # -------------------------------------------------------------- hot path
    def response(self, flow: http.HTTPFlow) -> None:
        assert flow.response is not None
        self.log(flow, flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        self.log(flow, error_status(flow), flow.error.msg if flow.error else "error")

    def log(self, flow: http.HTTPFlow, status: int, error: str | None = None) -> None:
        metadata = flow.metadata
        if LOGGED in metadata:
            return
        metadata[LOGGED] = True
        entry = access_entry(flow, status, time.time(), self.router(), self.with_query, error)
        self.write(self.render(entry))
