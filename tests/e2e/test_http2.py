"""HTTP/2 end to end (issue 13, points 1-6): a frame-level client against a real proxy
process, and what the container receives recorded byte for byte."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest

from tests.e2e.conftest import Proxy, Shared, start_with_https, wait_until
from tests.e2e.docker_double import free_port
from tests.e2e.test_https import cert_args

RAW_IP = "127.0.50.1"


class RawUpstream:
    """A container that records every byte it receives and answers each connection once."""

    def __init__(self, ip: str = RAW_IP) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, 0))
        self.sock.listen(64)
        self.ip, self.port = ip, self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        data = b""
        recorded = False
        conn.settimeout(5)
        with conn:
            try:
                while not complete(data):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if complete(data):
                    # Recorded before it is answered: the client may look as soon as it
                    # has the answer (a whole-suite run once looked before the append).
                    self._record(data)
                    recorded = True
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                 b"Connection: close\r\n\r\nok")
            except OSError:
                pass
            finally:
                if not recorded:  # cut short: what arrived
                    self._record(data)

    def _record(self, data: bytes) -> None:
        with self.lock:
            self.received.append(data)

    def clear(self) -> None:
        with self.lock:
            self.received.clear()

    @property
    def raw(self) -> bytes:
        with self.lock:
            return b"".join(self.received)

    def close(self) -> None:
        self.sock.close()


def complete(data: bytes) -> bool:
    """One whole HTTP/1.1 request: head, then a body framed by Content-Length or chunked."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        return body.endswith(b"0\r\n\r\n")
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


@dataclass
class H2Answer:
    status: int | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    reset: int | None = None
    goaway: h2.events.ConnectionTerminated | None = None


def h2_connect(port: int, sni: str | None = "blog.test"
               ) -> tuple[ssl.SSLSocket, h2.connection.H2Connection]:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=15),
                        server_hostname=sni)
    assert s.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**24})
    conn.increment_flow_control_window(2**24)
    s.sendall(conn.data_to_send())
    return s, conn


def h2_exchange(s: ssl.SSLSocket, conn: h2.connection.H2Connection, stream: int,
                headers: list[tuple[str, str]], body: bytes | None = None) -> H2Answer:
    """Send one request on ``stream``; read until it ends, is reset, or the connection goes."""
    conn.send_headers(stream, headers, end_stream=body is None)
    answer = H2Answer()
    sent = 0
    while True:
        # All the window allows before reading: the proxy's window is large (2**31 - 1),
        # so a frame per read would wait for a WINDOW_UPDATE that never needs to come.
        while body is not None and sent < len(body):
            room = min(conn.local_flow_control_window(stream), conn.max_outbound_frame_size,
                       len(body) - sent)
            if room <= 0:
                break
            conn.send_data(stream, body[sent:sent + room], end_stream=sent + room == len(body))
            sent += room
        s.sendall(conn.data_to_send())
        data = s.recv(65536)
        if not data:
            return answer
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                answer.headers = dict(event.headers)
                answer.status = int(answer.headers[b":status"])
            elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                answer.body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, stream)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                s.sendall(conn.data_to_send())
                return answer
            elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                answer.reset = event.error_code
                return answer
            elif isinstance(event, h2.events.ConnectionTerminated):
                answer.goaway = event
                return answer


def req(path: str = "/", authority: str = "blog.test", method: str = "GET",
        extra: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    return [(":method", method), (":scheme", "https"), (":path", path),
            (":authority", authority), *(extra or [])]


@dataclass
class Site:
    proxy: Proxy
    https_port: int
    upstream: RawUpstream


@pytest.fixture(scope="module")
def shared_site(shared: Shared, shared_kind: str) -> Iterator[Site]:
    upstream = RawUpstream()
    shared.dns.set_alias("raw", [upstream.ip])
    shared.dns.set_alias("down", ["127.0.50.9"])
    tls = cert_args(shared.path, ["blog.test", "down.test"])
    shared.cli("deploy", "--host", "blog.test", "--target", f"raw:{upstream.port}",
               "--project", "p", *tls)
    shared.cli("deploy", "--host", "down.test", "--target", "down:1", "--project", "p", *tls)
    shared.cli("updatehealth", "--host", "down.test", "--healthy", "false")
    https_port = free_port()
    env = {"LUMA_PROXY_MAX_BODY_SIZE": "1m", "LUMA_PROXY_HEALTH_INTERVAL": "3600"}
    proxy = start_with_https(shared.start, shared_kind, https_port, env)
    yield Site(proxy, https_port, upstream)
    proxy.stop(signal.SIGKILL)
    upstream.close()


@pytest.fixture
def site(shared_site: Site) -> Site:
    """The module's proxy, with the upstream's record and the log starting afresh."""
    shared_site.upstream.clear()
    shared_site.proxy.mark()
    return shared_site


def requests_upstream(raw: list[bytes]) -> list[bytes]:
    """Request lines the container parsed (health checks left out)."""
    lines = [one.split(b"\r\n", 1)[0] for one in raw if one]
    return [line for line in lines if not line.startswith(b"GET /up ")]


def test_own_answers_reach_h2_clients(site: Site) -> None:
    # No SNI: one connection asks for several hosts (with an SNI naming another
    # configured host than :authority, the answer would rightly be 421).
    s, conn = h2_connect(site.https_port, sni=None)
    with s:
        unknown = h2_exchange(s, conn, 1, req(authority="nope.test"))
        assert (unknown.status, unknown.reset) == (404, None)
        down = h2_exchange(s, conn, 3, req(authority="down.test"))
        assert (down.status, down.reset) == (503, None)
        assert down.headers[b"retry-after"] == b"5"
        for answer in (unknown, down):
            assert not answer.headers.get(b"server", b"").startswith(b"mitmproxy")
        # the same connection still serves a routed request afterwards
        ok = h2_exchange(s, conn, 7, req("/after"))
        assert (ok.status, ok.body) == (200, b"ok")
    assert requests_upstream(site.upstream.received) == [b"GET /after HTTP/1.1"]


def test_goaway_debug_data_says_nothing_internal(site: Site) -> None:
    s, conn = h2_connect(site.https_port)
    with s:  # Host naming another host than :authority: hyper-h2 refuses the connection
        bad = h2_exchange(s, conn, 1, req(extra=[("host", "evil.test")]))
    assert bad.goaway is not None and bad.goaway.additional_data in (None, b"closing")
    assert requests_upstream(site.upstream.received) == []


def test_h2_body_without_length_is_framed_chunked(site: Site) -> None:
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: evil.test\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    s, conn = h2_connect(site.https_port)
    with s:
        answer = h2_exchange(s, conn, 1, req("/upload", method="POST"), body=smuggled)
    assert (answer.status, answer.body) == (200, b"ok")
    raw = site.upstream.raw
    assert requests_upstream(site.upstream.received) == [b"POST /upload HTTP/1.1"]
    head, _, body = raw[raw.index(b"POST /upload"):].partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled)


@pytest.mark.parametrize("path", ["http://evil.test/x", "x", "/a b", "*", "/a\x7f"])
def test_h2_request_line_only_from_valid_parts(site: Site, path: str) -> None:
    s, conn = h2_connect(site.https_port)
    with s:
        bad = h2_exchange(s, conn, 1, req(path))
        assert bad.status == 400
        ok = h2_exchange(s, conn, 3, req("/fine"))  # a stream error, not a closed connection
        assert ok.status == 200
    assert requests_upstream(site.upstream.received) == [b"GET /fine HTTP/1.1"]


def test_h2_malformed_request_is_400_on_its_stream_only(site: Site) -> None:
    s, conn = h2_connect(site.https_port)
    with s:
        bad = h2_exchange(s, conn, 1, req(authority="blog.test:99999"))  # no such port
        assert bad.status == 400 and bad.goaway is None
        assert b"400 Bad Request" in bad.body and b"mitmproxy" not in bad.body
        ok = h2_exchange(s, conn, 3, req("/next"))
        assert ok.status == 200
    assert requests_upstream(site.upstream.received) == [b"GET /next HTTP/1.1"]


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "no-length"])
def test_h2_body_limit(site: Site, tmp_path: Path, declared: bool) -> None:
    """2 MiB against a 1 MiB limit, declared or not: the limit counts DATA frames either way.

    nghttp always declares a length (for a body read from stdin too), so the
    body without ``content-length`` is sent by the frame-level client.
    """
    body = b"x" * (2 * 1024 * 1024)
    if declared:
        (tmp_path / "body").write_bytes(body)
        cmd = ["nghttp", "-v", "-H", ":authority: blog.test", "-H", ":method: POST",
               "-d", str(tmp_path / "body"), f"https://127.0.0.1:{site.https_port}/big"]
        out = subprocess.run(cmd, capture_output=True, timeout=60).stdout.decode(
            errors="replace")
        assert "content-length: 2097152" in out
        assert "(stream_id=13) :status: 413" in out, out[-1500:]
        assert "server: mitmproxy" not in out
    else:
        s, conn = h2_connect(site.https_port)
        with s:
            answer = h2_exchange(s, conn, 1, req("/big", method="POST"), body=body)
        assert (answer.status, answer.reset, answer.goaway) == (413, None, None)
        assert not answer.headers.get(b"server", b"").startswith(b"mitmproxy")
    # The container records a connection when it ends (at the latest after its own 5 s
    # read timeout): wait for the cut request, so "never complete" is not vacuous.
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and not any(
            one.startswith(b"POST /big") for one in site.upstream.received):
        time.sleep(0.05)
    big = [one for one in site.upstream.received if one.startswith(b"POST /big")]
    for upstream in big:  # streamed up to the limit at most, and never completed
        assert len(upstream) < 1024 * 1024 + 64 * 1024 and not complete(upstream)
        assert declared or b"transfer-encoding: chunked" in upstream.lower()
    # the access log says what the client got (before: 502 "request body too large")
    wait_until(lambda: " 413 POST blog.test /big " in site.proxy.logs(), timeout=5)


def test_rapid_reset_gets_goaway_and_others_are_served(site: Site) -> None:
    s, conn = h2_connect(site.https_port)
    goaway = None
    with s:
        for n in range(400):  # 400 streams opened and reset at once (CVE-2023-44487)
            stream = 1 + 2 * n
            conn.send_headers(stream, req("/flood"), end_stream=True)
            conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
        s.sendall(conn.data_to_send())
        while goaway is None:
            data = s.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    goaway = event
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    s2, conn2 = h2_connect(site.https_port)
    with s2:
        assert h2_exchange(s2, conn2, 1, req("/other")).status == 200
    wait_until(lambda: " /other " in site.proxy.logs(), timeout=5)
    # A stream opened and reset in the same read never became a flow (no hooks, no
    # routing, no log line); only a pair split across two reads can (before: 200).
    assert site.proxy.logs().count(" /flood ") <= 4


# ------------------------------------------------------------ idle HTTP/2 connections
IDLE = 1.5  # LUMA_PROXY_HEADER_TIMEOUT here: the idle bound of HTTP/1 keep-alive and HTTP/2
SLOW = 4.0  # the slow container's answer takes this long: well past IDLE
EVENTS = 8  # /sse sends one event every SLOW / EVENTS seconds
SLOW_IP = "127.0.50.3"
IDLE_HOST = "idle.test"


class SlowUpstream(RawUpstream):
    """A container answering ``/late`` after SLOW seconds and streaming ``/sse`` for SLOW
    seconds (server-sent events); anything else (health checks too) at once."""

    def __init__(self, ip: str = SLOW_IP) -> None:
        super().__init__(ip)

    def _one(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(30)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                path = head.split(b" ", 2)[1]
                if path == b"/sse":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
                    for n in range(EVENTS):
                        time.sleep(SLOW / EVENTS)
                        event = b"data: %d\n\n" % n
                        conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
                    conn.sendall(b"0\r\n\r\n")
                    return
                if path == b"/late":
                    time.sleep(SLOW)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            except OSError:
                pass


@pytest.fixture(scope="module")
def idle_site(shared: Shared, shared_kind: str) -> Iterator[int]:
    """IDLE_HOST on a SlowUpstream, behind a proxy whose idle bound is IDLE seconds (a host
    of its own: blog.test stays routed to the RawUpstream of the module's other proxy)."""
    upstream = SlowUpstream()
    shared.dns.set_alias("slow", [upstream.ip])
    shared.cli("deploy", "--host", IDLE_HOST, "--target", f"slow:{upstream.port}",
               "--project", "p", *cert_args(shared.path, [IDLE_HOST]))
    https_port = free_port()
    env = {"LUMA_PROXY_HEADER_TIMEOUT": str(IDLE), "LUMA_PROXY_HEALTH_INTERVAL": "3600"}
    proxy = start_with_https(shared.start, shared_kind, https_port, env)
    yield https_port
    proxy.stop(signal.SIGKILL)
    upstream.close()


def h2_read_until_closed(s: ssl.SSLSocket, conn: h2.connection.H2Connection
                         ) -> h2.events.ConnectionTerminated | None:
    """Read until the proxy closes the connection; the GOAWAY it sent on the way, if any."""
    goaway = None
    while data := s.recv(65536):
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ConnectionTerminated):
                goaway = event
    return goaway


def h2_read_streams(s: ssl.SSLSocket, conn: h2.connection.H2Connection,
                    answers: dict[int, H2Answer]) -> None:
    """Read until every stream in ``answers`` has ended or been reset, or the connection ends."""
    open_streams = set(answers)
    while open_streams:
        data = s.recv(65536)
        if not data:
            return
        for event in conn.receive_data(data):
            answer = answers.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2.events.ConnectionTerminated):
                for one in answers.values():
                    one.goaway = event
            elif answer is None:
                continue
            elif isinstance(event, h2.events.ResponseReceived):
                answer.headers = dict(event.headers)
                answer.status = int(answer.headers[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                answer.body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                open_streams.discard(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                answer.reset = event.error_code
                open_streams.discard(event.stream_id)
        s.sendall(conn.data_to_send())


@pytest.mark.parametrize("used", [True, False], ids=["after-a-response", "no-request"])
def test_idle_h2_connection_gets_goaway_and_is_closed(idle_site: int, used: bool) -> None:
    """No open stream for the idle timeout: GOAWAY(NO_ERROR) naming the last stream served,
    then the connection closes, as an idle HTTP/1 keep-alive is closed."""
    s, conn = h2_connect(idle_site, IDLE_HOST)
    with s:
        if used:
            answer = h2_exchange(s, conn, 1, req("/quick", IDLE_HOST))
            assert (answer.status, answer.body) == (200, b"ok")
        idle_since = time.monotonic()
        s.settimeout(IDLE + 10)
        try:
            goaway = h2_read_until_closed(s, conn)
        except TimeoutError:
            pytest.fail(f"an idle HTTP/2 connection was still open after {IDLE + 10:g}s")
        idle = time.monotonic() - idle_since
    assert goaway is not None, "closed without GOAWAY"
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert goaway.last_stream_id == (1 if used else 0)
    assert IDLE - 0.5 <= idle <= IDLE + 2.5, idle


@pytest.mark.parametrize("path", ["/late", "/sse"])
def test_h2_connection_with_an_open_stream_is_not_cut(idle_site: int, path: str) -> None:
    """A stream waiting on a slow response (or receiving a long event stream) keeps its
    connection open past the idle timeout, also after another stream on it has finished."""
    s, conn = h2_connect(idle_site, IDLE_HOST)
    answers = {1: H2Answer(), 3: H2Answer()}
    started = time.monotonic()
    with s:
        s.settimeout(SLOW + 10)
        conn.send_headers(1, req(path, IDLE_HOST), end_stream=True)
        # done at once: not idle yet
        conn.send_headers(3, req("/quick", IDLE_HOST), end_stream=True)
        s.sendall(conn.data_to_send())
        h2_read_streams(s, conn, answers)
    took = time.monotonic() - started
    assert (answers[3].status, answers[3].body) == (200, b"ok")
    slow = answers[1]
    assert (slow.status, slow.reset, slow.goaway) == (200, None, None), slow
    expected = b"ok" if path == "/late" else b"".join(b"data: %d\n\n" % n for n in range(EVENTS))
    assert slow.body == expected
    assert took >= SLOW > 2 * IDLE
