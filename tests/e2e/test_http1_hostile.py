"""Hostile HTTP/1.1 (issue 13, points 7-13): what the client gets and what the container receives.

The container here is ``Recorder``: it keeps every byte the proxy sent it, so each
test can say what a hostile request turned into upstream.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import Proxy, Shared, next_ip, start_with_https, wait_until
from tests.e2e.docker_double import free_port
from tests.e2e.recorder import OK, Recorder
from tests.e2e.test_https import cert_args

LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def shared_recorder(shared: Shared) -> Iterator[Recorder]:
    """blog.test (plain) and tls.test (HTTPS, a custom certificate) are routed to a
    recording container."""
    ip, port = next_ip(), free_port()

    def reply(head: bytes) -> bytes:
        if b" /switch " in head.split(b"\r\n", 1)[0]:  # a container that switches anyway
            return (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                    b"Upgrade: h2c\r\n\r\n")
        return OK

    rec = Recorder(ip, port, reply).start()
    shared.dns.set_alias("rec", [ip])
    shared.cli("deploy", "--host", "blog.test", "--target", f"rec:{port}", "--project", "p",
               "--no-ssl")
    shared.cli("deploy", "--host", "tls.test", "--target", f"rec:{port}", "--project", "p",
               *cert_args(shared.path, ["tls.test"]))
    yield rec
    rec.stop()


@pytest.fixture
def recorder(shared_recorder: Recorder) -> Recorder:
    """The module's container, its record starting afresh."""
    shared_recorder.clear()
    return shared_recorder


def wait_served(port: int, host: str = "blog.test", sni: str | None = None) -> None:
    head = b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode()
    wait_until(lambda: answer(port, head, sni=sni)[0] == 200, timeout=20, interval=0.2)


@pytest.fixture(scope="module")
def shared_proxy(shared_recorder: Recorder, shared: Shared, shared_kind: str
                 ) -> Iterator[Proxy]:
    p = shared.start(shared_kind, env={"LUMA_PROXY_MAX_BODY_SIZE": "1m"})
    wait_served(p.port)
    yield p
    p.stop(signal.SIGKILL)


@pytest.fixture
def proxy(shared_proxy: Proxy, recorder: Recorder) -> Proxy:
    return shared_proxy.mark()


def answer(port: int, head: bytes, body: Iterator[bytes] | bytes = b"",
           timeout: float = 20, sni: str | None = None) -> tuple[int | None, bytes]:
    """Send ``head`` and ``body`` (pieces, sent while they are accepted); the status and the
    answer. A status is the behaviour here: no status is a failure, not a pass. With
    ``sni``, over TLS (HTTP/1.1)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if sni is not None:
        tls = ssl.create_default_context()
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        tls.set_alpn_protocols(["http/1.1"])
        raw = tls.wrap_socket(raw, server_hostname=sni)
    with raw as s:
        s.sendall(head)
        try:
            for piece in [body] if isinstance(body, bytes) else body:
                s.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy answered and stopped reading: the answer is still there
        out = b""
        try:
            while b"\r\n\r\n" not in out and (chunk := s.recv(65536)):
                out += chunk
        except (ConnectionResetError, TimeoutError, ssl.SSLError):
            pass
    if not out.startswith(b"HTTP/1.1 "):
        return None, out
    return int(out[9:12]), out


def posts(rec: Recorder) -> list[bytes]:
    return [r for r in rec.received() if not r.startswith(b"GET / HTTP/1.1")]


def chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    for _ in range(total // size):
        yield b"%x\r\n%s\r\n" % (size, b"x" * size)
    yield b"0\r\n\r\n"


# ---------------------------------------------------------------- 7: body limit
@pytest.mark.parametrize("coding", [b"chunked", b"Chunked", b"CHUNKED"])
def test_chunked_body_over_the_limit_is_413_and_never_complete_upstream(
        proxy, recorder, coding) -> None:
    head = b"POST /up1 HTTP/1.1\r\nHost: blog.test\r\nTransfer-Encoding: %s\r\n\r\n" % coding
    status, _ = answer(proxy.port, head, chunks(4 * LIMIT))
    assert status == 413
    # Upstream: at most a cut request (none at all when the limit is hit before the
    # upstream connection opens), never a terminated one, on a connection closed after it.
    for data in posts(recorder):
        assert b"0\r\n\r\n" not in data[data.find(b"\r\n\r\n") + 4:], data[-40:]
        assert data.count(b"POST ") == 1 and data.count(b" HTTP/1.1\r\n") == 1
    assert [r for r in recorder.requests() if r.startswith(b"POST")] == []
    assert "Traceback" not in proxy.logs()


def test_chunked_body_under_the_limit_goes_through_whole(proxy, recorder) -> None:
    head = b"POST /ok HTTP/1.1\r\nHost: blog.test\r\nTransfer-Encoding: Chunked\r\n\r\n"
    status, _ = answer(proxy.port, head, chunks(LIMIT // 2))
    assert status == 200
    [request] = [r for r in recorder.requests() if r.startswith(b"POST /ok")]
    assert request.endswith(b"\r\n0\r\n\r\n") and request.count(b"x") == LIMIT // 2


def test_bare_lf_head_is_refused_before_its_body(proxy, recorder) -> None:
    head = b"POST / HTTP/1.1\nHost: blog.test\nContent-Length: %d\n\n" % (8 * LIMIT)
    status, _ = answer(proxy.port, head, iter([b"x" * 65536] * 16))
    assert status == 400
    assert posts(recorder) == []


# ------------------------------------------------------- 8: control characters
BAD_HEADS = [
    b"GET / HTTP/1.1\r\nHost: blog.test\r\nX-A: a\rb\r\n\r\n",  # bare CR
    b"GET / HTTP/1.1\r\nHost: blog.test\r\nX-A: a\x00b\r\n\r\n",  # NUL
    b"GET / HTTP/1.1\r\nHost: blog.test\r\nX-A: a\x01b\r\n\r\n",  # other C0
    b"GET / HTTP/1.1\r\nHost: blog.test\r\nX-A: a\x1bb\r\n\r\n",  # ESC
    b"GET / HTTP/1.1\r\nHost: blog.test\r\nX-A: a\x7fb\r\n\r\n",  # DEL
    b"GET /a\x00b HTTP/1.1\r\nHost: blog.test\r\n\r\n",  # NUL in the target
    b"GET /a\x7fb HTTP/1.1\r\nHost: blog.test\r\n\r\n",  # DEL in the target
    b"GET / HTTP/1.1\r\nHost: blog.test\r\nX-A: a\r\n b\r\n\r\n",  # obs-fold (SP)
    b"GET / HTTP/1.1\r\nHost: blog.test\r\nX-A: a\r\n\tb\r\n\r\n",  # obs-fold (HT)
    b"GET / HTTP/1.1\r\nHost: blog.test\nX-A: a\r\n\r\n",  # a bare LF among CRLFs
]


def test_control_characters_and_obs_fold_are_400_and_never_forwarded(proxy, recorder) -> None:
    for head in BAD_HEADS:
        status, _ = answer(proxy.port, head)
        assert status == 400, head
    time.sleep(0.3)
    forwarded = b"".join(recorder.received())
    for marker in (b"X-A", b"/a"):
        assert marker not in forwarded
    # A tab in a value and obs-text (bytes >= 0x80) are allowed.
    assert answer(proxy.port, b"GET / HTTP/1.1\r\nHost: blog.test\r\nX-B: a\tb\xe9\r\n\r\n")[0] \
        == 200


# ---------------------------------------------------------------- 9: trailers
def test_chunked_trailers_are_dropped_quickly_without_a_traceback(proxy, recorder) -> None:
    head = b"POST /trailer HTTP/1.1\r\nHost: blog.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    started = time.monotonic()
    status, _ = answer(proxy.port, head, b"5\r\nhello\r\n0\r\nX-Trailer: evil\r\n\r\n")
    assert status == 200 and time.monotonic() - started < 10
    [request] = [r for r in recorder.requests() if r.startswith(b"POST /trailer")]
    assert request.endswith(b"5\r\nhello\r\n0\r\n\r\n")
    assert b"X-Trailer" not in request
    assert "Traceback" not in proxy.logs() and "NotImplementedError" not in proxy.logs()


# ------------------------------------------------------------ 12: hop-by-hop
def test_connection_named_headers_are_removed_before_the_proxys_own(proxy, recorder) -> None:
    head = (b"GET /hop HTTP/1.1\r\nHost: blog.test\r\n"
            b"Connection: keep-alive, X-Forwarded-For, X-Real-IP, X-Secret, Content-Length\r\n"
            b"X-Secret: s\r\nKeep-Alive: timeout=5\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
    assert answer(proxy.port, head)[0] == 200
    [request] = [r for r in recorder.requests() if r.startswith(b"GET /hop")]
    lower = request.lower()
    assert b"x-secret" not in lower and b"keep-alive" not in lower
    assert b"\r\nconnection:" not in lower
    assert b"\r\nx-forwarded-for: 127.0.0.1\r\n" in lower
    assert b"\r\nx-real-ip: 127.0.0.1\r\n" in lower
    assert b"6.6.6.6" not in request


# ------------------------------------------------------------- 13: upgrades
def test_h2c_upgrade_never_reaches_the_container(proxy, recorder) -> None:
    head = (b"GET /h2c HTTP/1.1\r\nHost: blog.test\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
    assert answer(proxy.port, head)[0] == 200
    [request] = [r for r in recorder.requests() if r.startswith(b"GET /h2c")]
    assert b"upgrade" not in request.lower() and b"http2-settings" not in request.lower()


def test_a_switch_nobody_asked_for_is_502_and_no_tunnel(proxy, recorder) -> None:
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: evil\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as s:
        s.sendall(b"GET /switch HTTP/1.1\r\nHost: blog.test\r\nUpgrade: h2c\r\n"
                  b"Connection: Upgrade\r\n\r\n")
        out = b""
        while b"\r\n\r\n" not in out and (chunk := s.recv(65536)):
            out += chunk
        assert out.startswith(b"HTTP/1.1 502 "), out[:100]
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(smuggled)
    time.sleep(0.5)
    assert b"/smuggled" not in b"".join(recorder.received())



# ------------------------------------------------------------ 10: slow body
@pytest.fixture(scope="module")
def shared_slow_proxy(shared_recorder: Recorder, shared: Shared, shared_kind: str
                      ) -> Iterator[Proxy]:
    """Short body deadlines; tls.test over HTTPS as well (``extra["https"]``)."""
    https_port = free_port()
    env = {"LUMA_PROXY_BODY_IDLE_TIMEOUT": "1", "LUMA_PROXY_BODY_TIMEOUT": "4"}
    p = start_with_https(shared.start, shared_kind, https_port, env)
    p.extra["https"] = https_port
    wait_served(p.port)
    wait_served(https_port, "tls.test", sni="tls.test")
    yield p
    p.stop(signal.SIGKILL)


@pytest.fixture
def slow_proxy(shared_slow_proxy: Proxy, recorder: Recorder) -> Proxy:
    return shared_slow_proxy.mark()


def test_a_body_that_stops_over_https_gets_a_readable_408(slow_proxy, recorder) -> None:
    """The 408 goes through the connection's TLS: it was written raw into the TLS stream,
    which a client reads as a broken record, not an answer."""
    head = b"POST /stall HTTP/1.1\r\nHost: tls.test\r\nContent-Length: 100\r\n\r\n"
    status, out = answer(slow_proxy.extra["https"], head + b"hello", timeout=30,
                         sni="tls.test")
    assert status == 408, out[:200]
    assert [r for r in recorder.requests() if r.startswith(b"POST")] == []


def trickle(pieces: list[bytes], gap: float) -> Iterator[bytes]:
    for piece in pieces:
        yield piece
        time.sleep(gap)


@pytest.mark.parametrize("framing", [b"Content-Length: 100", b"Transfer-Encoding: chunked"])
def test_a_body_that_stops_is_408_after_the_idle_gap(slow_proxy, recorder, framing) -> None:
    head = b"POST /stall HTTP/1.1\r\nHost: blog.test\r\n%s\r\n\r\n" % framing
    started = time.monotonic()
    first = b"5\r\nhello\r\n" if b"chunked" in framing else b"hello"
    status, _ = answer(slow_proxy.port, head + first, timeout=30)
    assert status == 408
    assert 0.9 < time.monotonic() - started < 10
    assert [r for r in recorder.requests() if r.startswith(b"POST")] == []
    wait_until(lambda: " 408 POST blog.test /stall " in slow_proxy.logs()
               or '"status": 408' in slow_proxy.logs(), timeout=5)


def test_a_trickled_body_is_408_at_the_total_deadline(slow_proxy, recorder) -> None:
    head = b"POST /trickle HTTP/1.1\r\nHost: blog.test\r\nContent-Length: 100\r\n\r\n"
    started = time.monotonic()
    status, _ = answer(slow_proxy.port, head, trickle([b"x"] * 60, 0.3), timeout=30)
    assert status == 408
    assert 3.9 < time.monotonic() - started < 15
    assert [r for r in recorder.requests() if r.startswith(b"POST")] == []


def test_a_steady_body_within_the_deadlines_goes_through(slow_proxy, recorder) -> None:
    head = b"POST /steady HTTP/1.1\r\nHost: blog.test\r\nContent-Length: 5\r\n\r\n"
    status, _ = answer(slow_proxy.port, head, trickle([b"x"] * 5, 0.3))
    assert status == 200
    assert [r for r in recorder.requests() if r.startswith(b"POST /steady")]
