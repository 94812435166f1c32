"""Test double for the parts of Docker that luma-proxy talks to.

There is no Docker engine in the test environment, so this module plays its roles:

* ``FakeDockerDNS`` stands in for Docker's embedded DNS server (127.0.0.11 inside a
  container): it resolves network aliases to the IPs of the containers that carry them,
  with TTL 0 and shuffled order, and answers NXDOMAIN for anything else.
* ``Container`` is an HTTP/1.1 + WebSocket app bound to one loopback IP (127.x.y.z plays
  the container's address on the Docker network). It runs in a thread, or as a real
  process via ``python -m tests.e2e.docker_double container ...`` / ``spawn_container``
  so tests can SIGTERM / SIGKILL it exactly like ``docker stop`` / ``docker kill``.

The HTTP server is hand-written on ``asyncio.Protocol`` rather than ``http.server`` so
that graceful shutdown can be precise: stop listening first, finish in-flight requests
(answering them with ``Connection: close``), close idle keep-alive connections, send
WebSocket close frames, and only then exit.
"""

import argparse
import asyncio
import base64
import contextlib
import hashlib
import http
import ipaddress
import json
import os
import random
import selectors
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSServer
from dnslib.server import TCPServer as _DnslibTCPServer

REPO_ROOT = Path(__file__).resolve().parents[2]
"""Where ``python -m tests.e2e.docker_double`` must run from (``spawn_container`` cwd)."""

DEFAULT_GRACE = 10.0
"""Like ``docker stop``'s default timeout before SIGKILL."""

# --------------------------------------------------------------------------------------
# Small socket helpers
# --------------------------------------------------------------------------------------


def _port_pool() -> range:
    """Ports below the kernel's ephemeral range: the local port of any outgoing
    connection is drawn from that range, so a port the kernel handed out for
    ``bind(0)`` and released can be taken by a connection before the proxy binds
    it (a CI run saw ``run`` fail to listen on its HTTPS port that way)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 12000), low) if low > 2024 else range(0)


_POOL = _port_pool()
_cursor = random.Random(os.getpid()).randrange(len(_POOL)) if _POOL else 0


def free_port(ip: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """Return a port that is free on ``ip`` right now, from outside the ephemeral
    range and never the one this process handed out last (still racy against
    another bind, but not against every outgoing connection)."""
    global _cursor
    for _ in range(len(_POOL)):
        port = _POOL[_cursor % len(_POOL)]
        _cursor += 1
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((ip, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def wait_for_port(ip: str, port: int, timeout: float = 10.0) -> None:
    """Block until a TCP connect to ``ip:port`` succeeds; raise ``TimeoutError`` otherwise."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((ip, port), timeout=0.5):
                return
        except OSError as exc:
            last = exc
            time.sleep(0.02)
    raise TimeoutError(f"{ip}:{port} not accepting connections after {timeout}s: {last}")


def expected_bytes(n: int) -> bytes:
    """The exact body ``GET /bytes?n=N`` returns, so tests can check for corruption."""
    return (_PATTERN_UNIT * (n // 256 + 1))[:n]


_PATTERN_UNIT = bytes(range(256))
_PATTERN_BLOCK = _PATTERN_UNIT * 1024  # 256 KiB, a multiple of 256 so chunks line up

# --------------------------------------------------------------------------------------
# Fake Docker embedded DNS
# --------------------------------------------------------------------------------------


def _norm(name: str) -> str:
    """Docker matches names case-insensitively; a trailing root dot is insignificant."""
    return str(name).rstrip(".").lower()


class _QuietLogger:
    """dnslib prints every query by default; thousands of queries would flood test output."""

    def __init__(self) -> None:
        self.errors = 0

    def log_recv(self, handler: Any, data: bytes) -> None:
        pass

    def log_send(self, handler: Any, data: bytes) -> None:
        pass

    def log_request(self, handler: Any, request: DNSRecord) -> None:
        pass

    def log_reply(self, handler: Any, reply: DNSRecord) -> None:
        pass

    def log_truncated(self, handler: Any, reply: DNSRecord) -> None:
        pass

    def log_error(self, handler: Any, e: Exception) -> None:
        self.errors += 1

    def log_data(self, dnsobj: DNSRecord) -> None:
        pass


class _UDPServer(socketserver.UDPServer):
    """Single-threaded UDP server: lookups are in-memory, so a thread per packet is waste.

    No SO_REUSEADDR: on Linux it would let two UDP sockets share a port and a stale
    server could silently steal queries.
    """

    allow_reuse_address = False

    def __init__(self, server_address: tuple[str, int], handler: type[DNSHandler]) -> None:
        self.errors = 0
        super().__init__(server_address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors += 1


class _TCPServer(_DnslibTCPServer):
    """Threaded TCP server whose client sockets time out, so a silent client can't pin a thread."""

    client_timeout = 5.0

    def __init__(self, server_address: tuple[str, int], handler: type[DNSHandler]) -> None:
        self.errors = 0
        super().__init__(server_address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        sock.settimeout(self.client_timeout)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors += 1


class _AliasResolver(BaseResolver):
    """Bridges dnslib's resolver callback to the alias table of a ``FakeDockerDNS``."""

    def __init__(self, owner: "FakeDockerDNS") -> None:
        self.owner = owner

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        try:
            for q in request.questions:
                self.owner._answer(q.qname, q.qtype, reply)
        except Exception:  # never let one bad packet kill the reply path
            reply = request.reply()
            reply.header.rcode = RCODE.SERVFAIL
        return reply


class _FaultyHandler(DNSHandler):
    """dnslib's handler plus the faults a test switches on with ``FakeDockerDNS.fault``."""

    def handle(self) -> None:
        owner = self.server.resolver.owner
        if owner.fault == "silent":  # a DNS that stopped answering: queries counted, no reply
            if self.server.socket_type == socket.SOCK_DGRAM:
                with contextlib.suppress(Exception):
                    self.server.resolver.resolve(DNSRecord.parse(self.request[0]), self)
            return
        super().handle()

    def get_reply(self, data: bytes) -> bytes:
        owner = self.server.resolver.owner
        if owner.fault == "garbage":  # the query's id, then nonsense
            return data[:2] + b"\xff\xff\xff\xff"
        if owner.fault == "truncate" and self.protocol == "udp":
            # Docker past 512 bytes: the records that fit, and the TC bit; TCP has them all.
            reply = self.server.resolver.resolve(DNSRecord.parse(data), self)
            if len(reply.rr) > 1:
                reply.rr = reply.rr[:1]
                reply.header.tc = 1
            return reply.pack()
        if owner.fault == "aaaa_nxdomain":
            request = DNSRecord.parse(data)
            if request.q.qtype == QTYPE.AAAA:  # a DNS that forwards what it lacks upstream
                owner._answer(request.q.qname, QTYPE.AAAA, reply := request.reply())
                reply.header.rcode = RCODE.NXDOMAIN
                return reply.pack()
        return super().get_reply(data)


IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


class FakeDockerDNS:
    """Docker's embedded DNS as the proxy sees it: alias -> container IPs, TTL 0, shuffled.

    UDP and TCP are served on the same port of ``host`` (port 0 picks a free one).
    Tests mutate the table while the proxy runs, the way containers join and leave a
    network during a deploy; each mutation swaps the whole entry under a lock so a query
    never sees a half-applied change.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._table: dict[str, tuple[IPAddr, ...]] = {}
        self._queries: Counter[str] = Counter()
        self._logger = _QuietLogger()
        self._servers: list[DNSServer] = []
        self._threads: list[threading.Thread] = []
        self.fault: str | None = None
        """None, or what goes wrong: "silent" (no reply: an outage), "garbage" (a
        malformed reply), "truncate" (UDP answers cut to one record with the TC bit),
        "aaaa_nxdomain" (AAAA is NXDOMAIN, as old Docker forwarding it upstream)."""

    # ---- table -----------------------------------------------------------------------

    @staticmethod
    def _parse_ips(ips: Iterable[str]) -> tuple[IPAddr, ...]:
        """Validate up front so a typo fails in the test, not as a weird DNS answer."""
        seen: dict[IPAddr, None] = {}
        for ip in ips:
            seen[ipaddress.ip_address(ip)] = None
        return tuple(seen)

    def set_alias(self, name: str, ips: Iterable[str]) -> None:
        """Replace the alias' IPs atomically; an empty list removes the alias (NXDOMAIN)."""
        parsed = self._parse_ips(ips)
        key = _norm(name)
        with self._lock:
            if parsed:
                self._table[key] = parsed
            else:
                self._table.pop(key, None)

    def add(self, name: str, ip: str) -> None:
        """A container carrying this alias joined the network."""
        (addr,) = self._parse_ips([ip])
        key = _norm(name)
        with self._lock:
            current = self._table.get(key, ())
            if addr not in current:
                self._table[key] = (*current, addr)

    def remove(self, name: str, ip: str) -> None:
        """A container left the network; the alias disappears with its last IP, like Docker."""
        addr = ipaddress.ip_address(ip)
        key = _norm(name)
        with self._lock:
            remaining = tuple(a for a in self._table.get(key, ()) if a != addr)
            if remaining:
                self._table[key] = remaining
            else:
                self._table.pop(key, None)

    def remove_alias(self, name: str) -> None:
        """Drop the alias entirely; later queries get NXDOMAIN."""
        with self._lock:
            self._table.pop(_norm(name), None)

    def aliases(self) -> dict[str, list[str]]:
        """Snapshot of the table (normalised names -> IP strings)."""
        with self._lock:
            return {k: [str(a) for a in v] for k, v in self._table.items()}

    @property
    def queries(self) -> Counter[str]:
        """Copy of the per-name query counter (normalised names), to assert caching/re-resolving."""
        with self._lock:
            return Counter(self._queries)

    def reset_queries(self) -> None:
        """Zero the counters, e.g. between phases of a test."""
        with self._lock:
            self._queries.clear()

    @property
    def errors(self) -> int:
        """Malformed packets / handler failures seen; should stay 0 in a healthy test."""
        return self._logger.errors + sum(s.server.errors for s in self._servers)

    def _answer(self, qname: Any, qtype: int, reply: DNSRecord) -> None:
        """Fill ``reply`` for one question: all matching IPs, shuffled, TTL 0."""
        key = _norm(str(qname))
        with self._lock:
            self._queries[key] += 1
            addrs = list(self._table.get(key, ()))
        if not addrs:
            reply.header.rcode = RCODE.NXDOMAIN
            return
        random.shuffle(addrs)  # Docker shuffles to spread clients over replicas
        for addr in addrs:
            if addr.version == 4 and qtype in (QTYPE.A, QTYPE.ANY):
                reply.add_answer(RR(qname, QTYPE.A, rdata=A(str(addr)), ttl=0))
            elif addr.version == 6 and qtype in (QTYPE.AAAA, QTYPE.ANY):
                reply.add_answer(RR(qname, QTYPE.AAAA, rdata=AAAA(str(addr)), ttl=0))
        # Known name but no record of the asked type: NOERROR with an empty answer.

    # ---- lifecycle -------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port``, the form a resolver option usually takes."""
        return f"{self.host}:{self.port}"

    def start(self) -> Self:
        """Bind UDP then TCP on the same port (retrying if port 0 collides) and serve.

        A restart after ``stop()`` reuses the previous port, so a proxy configured with
        ``address`` keeps working, like Docker's DNS which never moves.
        """
        if self._servers:
            return self
        wanted = self.port
        resolver = _AliasResolver(self)
        last_error: OSError | None = None
        for _ in range(50):
            udp = DNSServer(
                resolver,
                address=self.host,
                port=wanted,
                server=_UDPServer,
                handler=_FaultyHandler,
                logger=self._logger,
            )
            port = int(udp.server.server_address[1])
            try:
                tcp = DNSServer(
                    resolver,
                    address=self.host,
                    port=port,
                    tcp=True,
                    server=_TCPServer,
                    handler=_FaultyHandler,
                    logger=self._logger,
                )
            except OSError as exc:
                udp.server.server_close()
                last_error = exc
                if wanted:
                    raise
                continue
            self.port = port
            self._servers = [udp, tcp]
            break
        else:
            raise OSError(f"could not bind UDP+TCP on one port of {self.host}: {last_error}")
        for srv, proto in zip(self._servers, ("udp", "tcp"), strict=True):
            t = threading.Thread(
                target=srv.server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"fake-docker-dns-{proto}-{self.port}",
                daemon=True,
            )
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Stop both servers and release the port."""
        for srv in self._servers:
            srv.server.shutdown()
            srv.server.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers = []
        self._threads = []

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------
# HTTP / WebSocket "container"
# --------------------------------------------------------------------------------------

_MAX_HEAD = 64 * 1024
_MAX_WS_MESSAGE = 64 * 1024 * 1024
_READ_HIGH_WATER = 1024 * 1024
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class _BadRequest(Exception):
    """Malformed input: answer with this status and close the connection."""

    def __init__(self, status: int = 400) -> None:
        super().__init__(status)
        self.status = status


class _Request:
    """Parsed request head; headers keep wire order, case and duplicates for /headers."""

    __slots__ = ("headers", "keep_alive", "method", "path", "query", "target", "version")

    def __init__(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        try:
            method, target, version = lines[0].decode("latin-1").split(" ")
        except ValueError:
            raise _BadRequest() from None
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _BadRequest(505 if version.startswith("HTTP/") else 400)
        self.method = method
        self.target = target
        self.version = version
        self.headers: list[tuple[str, str]] = []
        for raw in lines[1:]:
            name, sep, value = raw.partition(b":")
            if not sep or not name or name != name.strip():
                raise _BadRequest()
            self.headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
        parts = urlsplit(target)
        self.path = parts.path or "/"
        self.query = parse_qs(parts.query)
        tokens = self.tokens("connection")
        if version == "HTTP/1.1":
            self.keep_alive = "close" not in tokens
        else:
            self.keep_alive = "keep-alive" in tokens

    def get(self, name: str) -> str | None:
        """All values of a header joined with ', ' (RFC 9110 list semantics), or None."""
        lname = name.lower()
        values = [v for n, v in self.headers if n.lower() == lname]
        return ", ".join(values) if values else None

    def tokens(self, name: str) -> set[str]:
        """Lower-cased comma-separated tokens of a header such as Connection or Upgrade."""
        value = self.get(name) or ""
        return {t.strip().lower() for t in value.split(",") if t.strip()}

    def qfloat(self, key: str, default: float) -> float:
        try:
            return float(self.query[key][0])
        except (KeyError, ValueError, IndexError):
            return default

    def qint(self, key: str, default: int) -> int:
        try:
            return int(self.query[key][0])
        except (KeyError, ValueError, IndexError):
            return default


class _App:
    """Shared state of one container: name, health, counters, live connections, drain flag."""

    def __init__(self, name: str, healthy: bool = True) -> None:
        self.name = name
        self.healthy = healthy
        self.requests = 0
        self.served = 0  # requests other than health checks
        self.accepted = 0
        self.conns: set[_Conn] = set()
        self.draining = False
        self.server: asyncio.Server | None = None
        self.port = 0
        self._drained: asyncio.Event | None = None

    async def listen(self, ip: str, port: int) -> int:
        """Bind exactly ``ip:port`` (SO_REUSEADDR, big backlog) and return the real port."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Conn(self), host=ip, port=port, reuse_address=True, backlog=1024
        )
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self.port

    @property
    def in_flight(self) -> int:
        return sum(1 for c in self.conns if c.busy)

    def _forget(self, conn: "_Conn") -> None:
        self.conns.discard(conn)
        if self._drained is not None and not self.conns:
            self._drained.set()

    async def shutdown(self, grace: float = DEFAULT_GRACE) -> None:
        """Graceful stop: refuse new connects, finish in-flight work, then close everything."""
        self.draining = True
        self._drained = asyncio.Event()
        if self.server is not None:
            self.server.close()  # closes the listening socket now: new connects are refused
        for conn in list(self.conns):
            conn.begin_drain()
        if self.conns:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout=grace)
        for conn in list(self.conns):
            conn.abort(rst=False)
        await asyncio.sleep(0)  # let transports run connection_lost

    async def kill(self) -> None:
        """Harsh stop: drop every socket with RST (SO_LINGER 0), like SIGKILL would."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns):
            conn.abort(rst=True)
        await asyncio.sleep(0)
        await asyncio.sleep(0)


class _Conn(asyncio.Protocol):
    """One client connection: HTTP/1.1 keep-alive loop, optionally upgraded to WebSocket.

    Reading is done by a per-connection task over our own buffer (not StreamReader) so
    the drain logic can see whether request bytes are already buffered.
    """

    def __init__(self, app: _App) -> None:
        self.app = app
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.busy = False
        self.eof = False
        self.closed = False
        self.is_ws = False
        self.ws_close_sent = False
        self._read_paused = False
        self._write_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None

    # ---- asyncio.Protocol callbacks --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.app.accepted += 1
        self.app.conns.add(self)
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > _READ_HIGH_WATER and not self._read_paused and self.transport:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return True  # keep the write side open: a half-closed client still gets its answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.app._forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # ---- control from _App -----------------------------------------------------------

    def begin_drain(self) -> None:
        """Shutdown started: idle connections go now, WebSockets get a close frame."""
        if self.is_ws:
            self._ws_send_close(1001, "server shutting down")
        elif not self.busy and not self.buf:
            self._close()
        # busy connections answer with Connection: close and end after the response

    def abort(self, rst: bool) -> None:
        """Drop the connection now; with ``rst`` the peer sees a reset instead of a FIN."""
        if self.transport is None or self.closed:
            return
        if rst:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    # ---- low-level I/O ---------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait_data(self) -> None:
        """Wait for more bytes; raise ConnectionError if none can come any more."""
        if self.closed or self.eof:
            raise ConnectionError("peer closed")
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._wait_data()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def _read_line(self) -> bytes:
        while True:
            idx = self.buf.find(b"\r\n")
            if idx >= 0:
                line = bytes(self.buf[:idx])
                del self.buf[: idx + 2]
                return line
            if len(self.buf) > _MAX_HEAD:
                raise _BadRequest()
            await self._wait_data()

    async def _discard(self, n: int) -> None:
        """Consume ``n`` body bytes without keeping them (uploads may be large)."""
        while n > 0:
            if not self.buf:
                await self._wait_data()
            take = min(n, len(self.buf))
            del self.buf[:take]
            n -= take

    async def _read_head(self) -> bytes | None:
        """Next request head, or None when the connection should end quietly (EOF/drain)."""
        while True:
            while self.buf.startswith(b"\r\n"):  # tolerate stray CRLF after a body
                del self.buf[:2]
            idx = self.buf.find(b"\r\n\r\n")
            if idx >= 0:
                head = bytes(self.buf[:idx])
                del self.buf[: idx + 4]
                return head
            if len(self.buf) > _MAX_HEAD:
                raise _BadRequest(431)
            if not self.buf and (self.app.draining or self.eof or self.closed):
                return None
            await self._wait_data()

    def _write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionError("connection closed")
        self.transport.write(data)

    async def _drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self.closed:
            raise ConnectionError("connection closed")

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # ---- HTTP ------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            while True:
                self.busy = False
                head = await self._read_head()
                if head is None:
                    break
                self.busy = True
                self.app.requests += 1
                try:
                    req = _Request(head)
                    if req.path != "/up":
                        self.app.served += 1
                    keep = await self._dispatch(req)
                except _BadRequest as exc:
                    self._respond_raw(exc.status, b"bad request\n")
                    break
                if not keep or self.is_ws:
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.busy = False
            self._close()

    def _head_bytes(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        reason = http.HTTPStatus(status).phrase
        lines = [f"HTTP/1.1 {status} {reason}", f"X-Container: {self.app.name}"]
        lines += [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _conn_headers(self, req: _Request | None, keep_alive: bool) -> list[tuple[str, str]]:
        if not keep_alive:
            return [("Connection", "close")]
        if req is not None and req.version == "HTTP/1.0":
            return [("Connection", "keep-alive")]
        return []

    def _respond_raw(self, status: int, body: bytes) -> None:
        """Error answer outside the normal request flow; always closes the connection."""
        with contextlib.suppress(ConnectionError):
            headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
            self._write(self._head_bytes(status, headers + self._conn_headers(None, False)) + body)

    def _respond(
        self,
        req: _Request,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
    ) -> bool:
        """Send a complete response in one write; decide keep-alive at send time (drain!)."""
        keep = req.keep_alive and not self.app.draining
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        head = self._head_bytes(status, headers + self._conn_headers(req, keep))
        self._write(head if req.method == "HEAD" else head + body)
        return keep

    async def _read_body(self, req: _Request) -> int:
        """Consume the request body (Content-Length or chunked) and return its size."""
        if "100-continue" in req.tokens("expect") and req.version == "HTTP/1.1":
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in req.tokens("transfer-encoding"):
            total = 0
            while True:
                line = await self._read_line()
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise _BadRequest() from None
                if size < 0:
                    raise _BadRequest()
                if size == 0:
                    while await self._read_line():  # trailers, up to the empty line
                        pass
                    return total
                await self._discard(size)
                total += size
                if await self._read_line() != b"":
                    raise _BadRequest()
        length = req.get("content-length")
        if length is None:
            return 0
        try:
            values = {int(v.strip()) for v in length.split(",")}
        except ValueError:
            raise _BadRequest() from None
        if len(values) != 1 or (n := values.pop()) < 0:
            raise _BadRequest()
        await self._discard(n)
        return n

    async def _dispatch(self, req: _Request) -> bool:
        """Route one request; return whether the connection may serve another one."""
        app = self.app
        if (
            req.method == "GET"
            and req.path == "/ws"
            and "websocket" in req.tokens("upgrade")
            and "upgrade" in req.tokens("connection")
        ):
            await self._websocket(req)
            return False
        received = await self._read_body(req)
        if req.method not in ("GET", "HEAD"):
            body = json.dumps({"container": app.name, "received": received}).encode()
            return self._respond(req, 200, body, "application/json")
        path = req.path
        if path == "/up":
            if app.healthy:
                return self._respond(req, 200, b"ok")
            return self._respond(req, 503, b"unhealthy")
        if path == "/headers" or path.endswith("/headers"):  # also under a kept prefix
            peer = self.transport.get_extra_info("peername") if self.transport else None
            payload = {
                "container": app.name,
                "method": req.method,
                "path": req.target,
                "http_version": req.version,
                "peer": list(peer) if peer else None,
                "headers": [[k, v] for k, v in req.headers],
            }
            return self._respond(req, 200, json.dumps(payload).encode(), "application/json")
        if path == "/slow":
            await asyncio.sleep(max(0.0, min(req.qfloat("s", 1.0), 600.0)))
            return self._respond(req, 200, app.name.encode())
        if path == "/bytes":
            return await self._bytes(req, max(0, req.qint("n", 1024)))
        if path == "/sse":
            return await self._sse(req, max(0, req.qint("n", 5)), req.qfloat("interval", 0.2))
        return self._respond(req, 200, app.name.encode())

    async def _bytes(self, req: _Request, n: int) -> bool:
        """Large bodies are streamed in 256 KiB pieces with back-pressure, not built in RAM."""
        if n <= len(_PATTERN_BLOCK):
            return self._respond(req, 200, _PATTERN_BLOCK[:n], "application/octet-stream")
        keep = req.keep_alive and not self.app.draining
        headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(n))]
        self._write(self._head_bytes(200, headers + self._conn_headers(req, keep)))
        if req.method == "HEAD":
            return keep
        left = n
        while left > 0:
            piece = _PATTERN_BLOCK if left >= len(_PATTERN_BLOCK) else _PATTERN_BLOCK[:left]
            self._write(piece)
            left -= len(piece)
            await self._drain()
        return keep

    async def _sse(self, req: _Request, n: int, interval: float) -> bool:
        """Server-sent events, one write per event so each reaches the client immediately."""
        chunked = req.version == "HTTP/1.1"
        keep = chunked and req.keep_alive and not self.app.draining
        headers = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        self._write(self._head_bytes(200, headers + self._conn_headers(req, keep)))
        if req.method == "HEAD":
            return keep
        for i in range(n):
            event = f"data: {self.app.name} {i}\n\n".encode()
            self._write(b"%x\r\n%s\r\n" % (len(event), event) if chunked else event)
            await self._drain()
            if i < n - 1:
                await asyncio.sleep(max(0.0, interval))
        if chunked:
            self._write(b"0\r\n\r\n")
        return keep

    # ---- WebSocket (RFC 6455, server side, no extensions) -----------------------------

    async def _websocket(self, req: _Request) -> None:
        key = req.get("sec-websocket-key")
        if not key or req.get("sec-websocket-version") != "13" or self.app.draining:
            status = 503 if self.app.draining else 400
            self._respond(req, status, b"websocket handshake refused")
            return
        accept = base64.b64encode(hashlib.sha1(key.encode("latin-1") + _WS_GUID).digest())
        self._write(
            self._head_bytes(
                101,
                [
                    ("Upgrade", "websocket"),
                    ("Connection", "Upgrade"),
                    ("Sec-WebSocket-Accept", accept.decode()),
                ],
            )
        )
        self.is_ws = True
        self.busy = False  # an open WebSocket is not an in-flight request
        prefix = f"{self.app.name}: ".encode()
        message = bytearray()
        message_op = 0
        while True:
            fin, opcode, payload = await self._ws_read_frame()
            if opcode == _OP_CLOSE:
                if not self.ws_close_sent:
                    code = payload[:2] if len(payload) >= 2 else b""
                    self._ws_send(_OP_CLOSE, code)
                    self.ws_close_sent = True
                return
            if opcode == _OP_PING:
                if not self.ws_close_sent:
                    self._ws_send(_OP_PONG, payload)
                continue
            if opcode == _OP_PONG:
                continue
            if opcode in (_OP_TEXT, _OP_BINARY):
                if message_op:
                    raise ConnectionError("new message inside a fragmented one")
                message_op = opcode
                message = bytearray(payload)
            elif opcode == _OP_CONT:
                if not message_op:
                    raise ConnectionError("continuation without a message")
                message += payload
            else:
                raise ConnectionError(f"unknown opcode {opcode}")
            if len(message) > _MAX_WS_MESSAGE:
                raise ConnectionError("message too big")
            if fin:
                if not self.ws_close_sent:
                    self._ws_send(message_op, prefix + bytes(message))
                    await self._drain()
                message_op = 0
                message = bytearray()

    async def _ws_read_frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = await self._read_exact(2)
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self._read_exact(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self._read_exact(8))
        if length > _MAX_WS_MESSAGE:
            raise ConnectionError("frame too big")
        mask = await self._read_exact(4) if b1 & 0x80 else b""
        payload = await self._read_exact(length)
        if mask and length:
            # XOR as one big integer: far faster in Python than a per-byte loop
            key = (mask * (length // 4 + 1))[:length]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(
                length, "big"
            )
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def _ws_send(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 127, n)
        self._write(header + payload)

    def _ws_send_close(self, code: int, reason: str) -> None:
        if self.ws_close_sent or self.closed:
            return
        self.ws_close_sent = True
        with contextlib.suppress(ConnectionError):
            self._ws_send(_OP_CLOSE, struct.pack("!H", code) + reason.encode()[:120])


class Container:
    """An app container on the Docker network, run in a background thread of this process.

    ``ip`` plays the container's network address (any 127.x.y.z works on Linux); ``port``
    0 picks a free one. ``healthy`` can be flipped at any time to fail ``/up``.
    """

    def __init__(
        self,
        name: str,
        ip: str = "127.0.0.1",
        port: int = 0,
        *,
        healthy: bool = True,
        grace: float = DEFAULT_GRACE,
    ) -> None:
        self.name = name
        self.ip = ip
        self.port = port
        self.grace = grace
        self._app = _App(name, healthy)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- observable state ------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._app.healthy

    @healthy.setter
    def healthy(self, value: bool) -> None:
        self._app.healthy = value

    @property
    def requests(self) -> int:
        """HTTP requests served (WebSocket upgrades included)."""
        return self._app.requests

    @property
    def served(self) -> int:
        """Requests other than ``/up`` (health checks): what clients got through."""
        return self._app.served

    @property
    def connections(self) -> int:
        """TCP connections accepted in total; with keep-alive it grows slower than requests."""
        return self._app.accepted

    @property
    def open_connections(self) -> int:
        return len(self._app.conns)

    @property
    def in_flight(self) -> int:
        """Requests currently being processed (open WebSockets not counted)."""
        return self._app.in_flight

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> Self:
        """Bind and serve in a daemon thread; returns once the port accepts connections."""
        if self.running:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._app = _App(self.name, self._app.healthy)

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self.port = loop.run_until_complete(self._app.listen(self.ip, self.port))
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                _cancel_all(loop)
                loop.close()

        self._thread = threading.Thread(target=run, name=f"container-{self.name}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def _run(self, make_coro: Callable[[], Coroutine[Any, Any, None]], timeout: float) -> None:
        """Run a shutdown coroutine on the container's loop, then stop loop and thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return  # already stopped: stop()/kill() are idempotent
        try:
            asyncio.run_coroutine_threadsafe(make_coro(), loop).result(timeout=timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            self._thread = None

    def stop(self, graceful: bool = True, grace: float | None = None) -> None:
        """``docker stop``: stop listening, let in-flight requests finish, then close.

        ``graceful=False`` closes all connections at once (FIN, not RST).
        """
        g = self.grace if grace is None else grace
        self._run(lambda: self._app.shutdown(g if graceful else 0.0), timeout=g + 10)

    def kill(self) -> None:
        """``docker kill``: every socket is reset immediately."""
        self._run(self._app.kill, timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(graceful=True, grace=1.0)


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel leftover tasks so closing the loop doesn't warn about pending ones."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


# --------------------------------------------------------------------------------------
# Process mode
# --------------------------------------------------------------------------------------


async def _run_container_process(name: str, ip: str, port: int, healthy: bool, grace: float) -> int:
    """Serve until SIGTERM/SIGINT, then shut down gracefully and return exit code 0."""
    app = _App(name, healthy)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def toggle_health() -> None:
        app.healthy = not app.healthy

    # Handlers go in before "ready": the default SIGUSR1 action would kill the process.
    loop.add_signal_handler(signal.SIGUSR1, toggle_health)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await app.listen(ip, port)
    print("ready", flush=True)
    await stop.wait()
    await app.shutdown(grace)
    return 0


def spawn_container(
    name: str,
    ip: str,
    port: int,
    *,
    unhealthy: bool = False,
    grace: float | None = None,
    timeout: float = 10.0,
    stderr: Any = None,
) -> "subprocess.Popen[bytes]":
    """Start a container as a separate process and return once it printed ``ready``.

    A real process is needed to test what Docker does to containers: SIGTERM
    (graceful stop), SIGKILL (crash) and independent CPU from the proxy under test.
    """
    cmd = [
        sys.executable,
        "-m",
        "tests.e2e.docker_double",
        "container",
        "--name",
        name,
        "--ip",
        ip,
        "--port",
        str(port),
    ]
    if unhealthy:
        cmd.append("--unhealthy")
    if grace is not None:
        cmd += ["--grace", str(grace)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr)
    try:
        line = _read_ready_line(proc, timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        raise
    if line != b"ready":
        stop_container_process(proc, kill=True)
        raise RuntimeError(f"container {name} printed {line!r} instead of ready")
    return proc


def _read_ready_line(proc: "subprocess.Popen[bytes]", timeout: float) -> bytes:
    """First stdout line of ``proc``, read with a deadline (readline() could block forever)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    got = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in got:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(timeout=left):
                raise TimeoutError(f"container not ready after {timeout}s: {got!r}")
            chunk = os.read(fd, 4096)
            if not chunk:
                rc = proc.wait()
                raise RuntimeError(f"container exited with {rc} before ready: {got!r}")
            got += chunk
    return got.split(b"\n", 1)[0].strip()


def stop_container_process(
    proc: "subprocess.Popen[bytes]", timeout: float = 15.0, *, kill: bool = False
) -> int:
    """``docker stop`` (SIGTERM) or ``docker kill`` (SIGKILL) a spawned container; return rc."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return rc


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``container`` runs one HTTP/WebSocket container in the foreground."""
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.docker_double")
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("container", help="run an HTTP/WebSocket app container")
    c.add_argument("--name", required=True)
    c.add_argument("--ip", default="127.0.0.1")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--unhealthy", action="store_true", help="start with /up failing")
    c.add_argument("--grace", type=float, default=DEFAULT_GRACE)
    args = parser.parse_args(argv)
    return asyncio.run(
        _run_container_process(args.name, args.ip, args.port, not args.unhealthy, args.grace)
    )


if __name__ == "__main__":
    sys.exit(main())
