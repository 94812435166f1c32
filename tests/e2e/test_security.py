"""Hostile clients and broken containers: the proxy keeps serving and lets nothing through."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import next_ip, request, wait_until
from tests.e2e.docker_double import free_port


def raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are; return the first answer (complete per Content-Length),
    or whatever arrived before the proxy closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                head, sep, body = out.partition(b"\r\n\r\n")
                if sep:
                    length = [line.split(b":", 1)[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")]
                    if length and len(body) >= int(length[0]):
                        break
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def status_of(answer: bytes) -> int | None:
    if not answer.startswith(b"HTTP/1.1 "):
        return None
    return int(answer[9:12])


@pytest.fixture
def site(dns, containers, cli):
    """blog.test is deployed; `evil` is a container that is *not* registered anywhere."""
    port = free_port()
    blog = containers("blog-1", port=port)
    evil = containers("evil-1", port=port)
    dns.set_alias("blog", [blog.ip])
    dns.set_alias("evil", [evil.ip])
    cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p",
        "--no-ssl")
    cli("deploy", "--host", "xn--bcher-kva.test", "--target", f"blog:{port}", "--project", "p",
        "--no-ssl")
    return blog, evil, port


def test_never_an_open_proxy(site, start_proxy) -> None:
    blog, evil, port = site
    proxy = start_proxy("run")
    p = proxy.port
    cases = {
        # absolute-form naming another host than Host: refused
        b"GET http://evil:%d/ HTTP/1.1\r\nHost: blog.test\r\n\r\n" % port: {400},
        b"GET http://%s:%d/ HTTP/1.1\r\nHost: blog.test\r\n\r\n" % (evil.ip.encode(), port):
            {400},
        # absolute-form alone: the URL's host is the host, and it is not registered
        b"GET http://evil/ HTTP/1.1\r\n\r\n": {400, 404},
        b"GET http://blog.test/ HTTP/1.1\r\nHost: blog.test\r\n\r\n": {200},
        b"CONNECT evil:%d HTTP/1.1\r\nHost: evil:%d\r\n\r\n" % (port, port): {400, 405},
        b"GET / HTTP/1.1\r\nHost: evil\r\n\r\n": {404},
        b"GET / HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (evil.ip.encode(), port): {404},
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % p: {404},  # the proxy itself
        b"GET / HTTP/1.1\r\nHost: mitm.it\r\n\r\n": {404},  # no onboarding app
        b"GET / HTTP/1.1\r\nHost: BLOG.Test\r\n\r\n": {200},
        b"GET / HTTP/1.1\r\nHost: blog.test:8080\r\n\r\n": {200},
        b"GET / HTTP/1.1\r\nHost: blog.test.\r\n\r\n": {200},
        b"GET / HTTP/1.1\r\nHost: blog.test..\r\n\r\n": {400},
        b"GET / HTTP/1.1\r\nHost: xn--bcher-kva.test\r\n\r\n": {200},
        "GET / HTTP/1.1\r\nHost: bücher.test\r\n\r\n".encode(): {200, 400},
        b"GET / HTTP/1.1\r\nHost: blog .test\r\n\r\n": {400},
        b"GET / HTTP/1.1\r\nHost: blog.test\r\nHost: evil\r\n\r\n": {400},
        b"GET / HTTP/1.1\r\n\r\n": {400},
        b"GET / HTTP/1.1\r\nHost: \r\n\r\n": {400},
        b"GET / HTTP/1.1\r\nHost: evil@blog.test\r\n\r\n": {400},
    }
    for data, allowed in cases.items():
        answer = raw(p, data)
        assert status_of(answer) in allowed, (data, answer[:200])
        if status_of(answer) != 200:
            assert b"evil" not in answer.split(b"\r\n\r\n", 1)[-1], data
    assert evil.served == 0
    assert blog.served >= 5


def test_http2_authority_host_mismatch_is_refused(site, start_proxy, tmp_path: Path,
                                                 cli) -> None:
    import h2.config
    import h2.connection
    import h2.events

    from tests.e2e.test_https import cert_args

    _, evil, port = site
    cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p",
        *cert_args(tmp_path, ["blog.test"]))
    https_port = free_port()
    start_proxy("run", args=("--https-port", str(https_port)))

    def h2_request(headers: list[tuple[str, str]]) -> tuple[int | None, bytes]:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", https_port), timeout=10) as raw_sock, \
                ctx.wrap_socket(raw_sock, server_hostname="blog.test") as s:
            assert s.selected_alpn_protocol() == "h2"
            conn = h2.connection.H2Connection(h2.config.H2Configuration(
                client_side=True, validate_outbound_headers=False,
                normalize_outbound_headers=False))
            conn.initiate_connection()
            conn.send_headers(1, headers, end_stream=True)
            s.sendall(conn.data_to_send())
            status, body = None, b""
            while True:
                data = s.recv(65536)
                if not data:
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                    elif isinstance(event, h2.events.StreamEnded):
                        return status, body, "ended"
                    elif isinstance(event, h2.events.StreamReset):
                        return status, body, "reset"
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        return status, body, f"goaway {event.error_code!r}"
                s.sendall(conn.data_to_send())
            return status, body, "closed"

    base = [(":method", "GET"), (":scheme", "https"), (":path", "/")]
    assert h2_request([*base, (":authority", "blog.test")]) == (200, b"blog-1", "ended")
    # hyper-h2 itself refuses a Host that differs from :authority, for the whole
    # connection (GOAWAY PROTOCOL_ERROR) before any hook runs; nothing goes upstream.
    mismatch = "goaway <ErrorCodes.PROTOCOL_ERROR: 1>"
    assert h2_request([*base, (":authority", "blog.test"), ("host", "evil")])[2] == mismatch
    assert h2_request([*base, (":authority", "evil"), ("host", "blog.test")])[2] == mismatch
    assert evil.served == 0


def test_smuggling_and_size_limits(site, start_proxy) -> None:
    blog, _, _ = site
    proxy = start_proxy("run", env={"LUMA_PROXY_MAX_HEADER_SIZE": "16k",
                                    "LUMA_PROXY_MAX_BODY_SIZE": "100k"})
    p = proxy.port
    before = blog.served
    smuggles = [
        b"POST / HTTP/1.1\r\nHost: blog.test\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: blog.test\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: blog.test\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\n"
        b"abcd",
        b"POST / HTTP/1.1\r\nHost: blog.test\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: blog.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
        b"0\r\n\r\n",
    ]
    for data in smuggles:
        assert status_of(raw(p, data)) == 400, data
    # Invalid chunking: never answered 2xx, never forwarded as a complete request.
    answer = raw(p, b"POST / HTTP/1.1\r\nHost: blog.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"zz\r\nabc\r\n0\r\n\r\n")
    assert status_of(answer) == 400, answer[:200]
    assert blog.served == before

    big_head = b"GET / HTTP/1.1\r\nHost: blog.test\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    assert status_of(raw(p, big_head)) == 431
    endless = b"GET / HTTP/1.1\r\nHost: blog.test\r\n" + b"X-A: b\r\n" * 5000  # never ends
    assert status_of(raw(p, endless)) == 431
    assert status_of(raw(p, b"POST / HTTP/1.1\r\nHost: blog.test\r\nContent-Length: 200000\r\n"
                            b"\r\n" + b"x" * 1000)) == 413
    assert blog.served == before
    # Within the limits all is well.
    reply = request(p, "blog.test", "/", method="POST", body=b"x" * 50_000)
    assert reply.status == 200 and json.loads(reply.body)["received"] == 50_000


def test_slow_clients_are_cut_off_without_starving_others(site, start_proxy) -> None:
    proxy = start_proxy("run", env={"LUMA_PROXY_HEADER_TIMEOUT": "3"})
    slow: list[socket.socket] = []
    for _ in range(500):
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        s.sendall(b"GET / HTTP/1.1\r\nHost: blog.test\r\n")
        slow.append(s)
    opened = time.monotonic()
    ok = total = 0
    stop = time.monotonic() + 2.5
    while time.monotonic() < stop:  # normal clients while the slow ones trickle
        for s in slow[:50]:
            with contextlib.suppress(OSError):
                s.sendall(b"X: y\r\n")
        total += 1
        ok += proxy.get("blog.test").status == 200
    assert total >= 20 and ok == total

    def closed(s: socket.socket) -> bool:
        s.settimeout(15)
        try:
            return s.recv(1) == b""
        except OSError:
            return True

    assert all(closed(s) for s in slow)
    assert time.monotonic() - opened < 20  # cut at the header timeout, not at tcp_timeout
    for s in slow:
        s.close()
    assert proxy.get("blog.test").status == 200


def test_trusted_proxies_keep_forwarding_chain(site, start_proxy) -> None:
    proxy = start_proxy("run", env={"LUMA_PROXY_TRUSTED_PROXIES": "127.0.0.0/8"})
    seen = json.loads(proxy.get("blog.test", "/headers", headers={
        "X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https"}).body)
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-forwarded-for"] == "198.51.100.7, 127.0.0.1"
    assert headers["x-real-ip"] == "198.51.100.7"
    assert headers["x-forwarded-proto"] == "https"


class FaultyContainer:
    """A container that misbehaves in the way the request path asks for."""

    def __init__(self, ip: str, port: int) -> None:
        self.sock = socket.create_server((ip, port))
        self.ip, self.port = ip, port
        self.alive = True
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while self.alive:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            path = data.split(b" ", 2)[1]
            if path == b"/up":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n"
                             b"\r\nok")
            elif path == b"/reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            elif path == b"/hang":
                time.sleep(30)
            elif path == b"/hang-body":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
                time.sleep(30)
            elif path == b"/garbage":
                conn.sendall(b"\x16\x03\x01garbage that is not HTTP\r\n\r\n")
            elif path == b"/short":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly this")

    def close(self) -> None:
        self.alive = False
        self.sock.close()


@pytest.fixture
def faulty(dns, cli) -> Iterator[FaultyContainer]:
    port = free_port()
    container = FaultyContainer(next_ip(), port)
    dns.set_alias("faulty", [container.ip])
    cli("deploy", "--host", "faulty.test", "--target", f"faulty:{port}", "--project", "q",
        "--no-ssl")
    yield container
    container.close()


def test_upstream_faults_get_502_in_time_and_stay_contained(site, faulty, start_proxy) -> None:
    proxy = start_proxy("run", env={"LUMA_PROXY_RESPONSE_TIMEOUT": "2"})
    for path in ("/reset", "/hang", "/hang-body", "/garbage", "/short"):
        started = time.monotonic()
        reply = proxy.get("faulty.test", path, timeout=20)
        took = time.monotonic() - started
        assert reply.status == 502, path
        assert took < 8, (path, took)  # the 2 s response timeout, not the container's 30 s
        assert faulty.ip.encode() not in reply.body
        assert proxy.get("blog.test").status == 200  # the other service is unaffected

    # Many hung requests at once do not slow the healthy service down to failure.
    hung = [threading.Thread(target=lambda: proxy.get("faulty.test", "/hang", timeout=20))
            for _ in range(20)]
    for t in hung:
        t.start()
    replies = [proxy.get("blog.test") for _ in range(50)]
    assert all(r.status == 200 for r in replies)
    for t in hung:
        t.join()
    assert proxy.proc.poll() is None


def test_refusing_container_is_ejected_and_answered_fast(dns, containers, cli,
                                                          start_proxy) -> None:
    port = free_port()
    alive = containers("app-1", port=port)
    dead_ip = next_ip()  # nothing listens there: connection refused
    dns.set_alias("app", [alive.ip, dead_ip])
    cli("deploy", "--host", "app.test", "--target", f"app:{port}", "--project", "p",
        "--no-ssl")
    proxy = start_proxy("run", env={"LUMA_PROXY_HEALTH_INTERVAL": "600",
                                    "LUMA_PROXY_HOLD_TIMEOUT": "0.5"})
    statuses = [proxy.get("app.test").status for _ in range(20)]
    assert statuses == [200] * 20  # the refusing IP never proved itself: never picked

    dns.set_alias("app", [dead_ip])
    time.sleep(1.2)  # past the DNS cache
    started = time.monotonic()
    replies = [proxy.get("app.test") for _ in range(5)]
    # Nothing can take them: each waits the hold (0.5 s), then 503 with Retry-After.
    assert [r.status for r in replies] == [503] * 5
    assert all(r.headers.get("retry-after") for r in replies)
    assert 2.5 <= time.monotonic() - started < 6


def test_no_admin_surface_only_configured_ports(start_proxy) -> None:
    proxy = start_proxy("run")
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    mine = [line for line in out.splitlines() if f"pid={proxy.proc.pid}," in line]
    assert len(mine) == 1 and f"127.0.0.1:{proxy.port}" in mine[0], out


def test_keep_alive_idle_and_websocket_not_cut_by_header_timeout(site, start_proxy) -> None:
    from websockets.sync.client import connect

    proxy = start_proxy("run", env={"LUMA_PROXY_HEADER_TIMEOUT": "1"})
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    with connect(f"ws://blog.test:{proxy.port}/ws", sock=sock) as ws:
        time.sleep(2.5)  # longer than the header timeout: an open WebSocket is not a slow head
        ws.send("hi")
        assert ws.recv(timeout=5) == "blog-1: hi"
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    assert request(proxy.port, "blog.test", conn=conn).status == 200
    time.sleep(2.5)  # idle keep-alive past the timeout: closed by the proxy
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        request(proxy.port, "blog.test", conn=conn)
    wait_until(lambda: proxy.get("blog.test").status == 200)


def test_response_timeout_spares_streams_that_have_begun(site, start_proxy) -> None:
    """The deadline covers the response head (and a buffered body), not a stream."""
    proxy = start_proxy("run", env={"LUMA_PROXY_RESPONSE_TIMEOUT": "1"})
    started = time.monotonic()
    events = proxy.get("blog.test", "/sse?n=5&interval=0.6", timeout=20)  # 3 s of events
    assert events.status == 200 and events.body.count(b"data:") == 5
    assert time.monotonic() - started >= 2.4
    download = proxy.get("blog.test", f"/bytes?n={3 << 20}", timeout=20)  # streamed: > 1 MiB
    assert download.status == 200 and len(download.body) == 3 << 20
    slow = proxy.get("blog.test", "/slow?s=4", timeout=20)  # nothing for 4 s: cut
    assert slow.status == 502
