"""Self-tests for the Docker test double: if these fail, proxy e2e failures mean nothing."""

import http.client
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import websockets.sync.client
from dnslib import QTYPE, RCODE, DNSRecord
from websockets.exceptions import ConnectionClosed

from tests.e2e.docker_double import (
    Container,
    FakeDockerDNS,
    expected_bytes,
    free_port,
    spawn_container,
    stop_container_process,
    wait_for_port,
)

# ---------------------------------------------------------------------------- helpers


def query(dns: FakeDockerDNS, name: str, qtype: str = "A", tcp: bool = False) -> DNSRecord:
    """One real DNS round trip to the fake server."""
    raw = DNSRecord.question(name, qtype).send(dns.host, dns.port, tcp=tcp, timeout=2)
    return DNSRecord.parse(raw)


def answer_ips(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr]


def get(c: Container, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(c.ip, c.port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def connect_refused(ip: str, port: int) -> bool:
    try:
        socket.create_connection((ip, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def dns() -> Iterator[FakeDockerDNS]:
    with FakeDockerDNS() as server:
        yield server


@pytest.fixture
def container() -> Iterator[Container]:
    c = Container("blue-1", "127.0.0.2", free_port("127.0.0.2"), grace=3.0).start()
    yield c
    c.kill()


# ---------------------------------------------------------------------------- DNS


def test_dns_answers_all_ips_with_ttl_zero_over_udp_and_tcp(dns: FakeDockerDNS) -> None:
    dns.set_alias("blog", ["127.0.0.2", "127.0.0.3"])
    assert dns.address == f"127.0.0.1:{dns.port}" and dns.port > 0
    for tcp in (False, True):
        reply = query(dns, "blog", tcp=tcp)
        assert reply.header.rcode == RCODE.NOERROR
        assert sorted(answer_ips(reply)) == ["127.0.0.2", "127.0.0.3"]
        assert all(rr.ttl == 0 and rr.rtype == QTYPE.A for rr in reply.rr)


def test_dns_unknown_name_is_nxdomain(dns: FakeDockerDNS) -> None:
    dns.set_alias("blog", ["127.0.0.2"])
    reply = query(dns, "nope")
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert reply.rr == []


def test_dns_names_are_case_insensitive_and_ignore_trailing_dot(dns: FakeDockerDNS) -> None:
    dns.set_alias("Blog.", ["127.0.0.2"])
    for name in ("blog", "BLOG.", "bLoG"):
        assert answer_ips(query(dns, name)) == ["127.0.0.2"]
    assert dns.aliases() == {"blog": ["127.0.0.2"]}
    assert dns.queries["blog"] == 3


def test_dns_updates_are_visible_immediately(dns: FakeDockerDNS) -> None:
    dns.set_alias("blog", ["127.0.0.2"])
    assert answer_ips(query(dns, "blog")) == ["127.0.0.2"]
    dns.add("blog", "127.0.0.3")
    dns.add("blog", "127.0.0.3")  # idempotent, like re-attaching the same container
    assert sorted(answer_ips(query(dns, "blog"))) == ["127.0.0.2", "127.0.0.3"]
    dns.remove("blog", "127.0.0.2")
    assert answer_ips(query(dns, "blog")) == ["127.0.0.3"]
    dns.set_alias("blog", ["127.0.0.4", "127.0.0.5"])
    assert sorted(answer_ips(query(dns, "blog"))) == ["127.0.0.4", "127.0.0.5"]
    dns.remove_alias("blog")
    assert query(dns, "blog").header.rcode == RCODE.NXDOMAIN
    dns.add("blog", "127.0.0.6")
    dns.remove("blog", "127.0.0.6")  # last container left: name is gone
    assert query(dns, "blog").header.rcode == RCODE.NXDOMAIN
    with pytest.raises(ValueError):
        dns.set_alias("blog", ["not-an-ip"])


def test_dns_restart_keeps_port() -> None:
    dns = FakeDockerDNS()
    with dns:
        port = dns.port
        dns.set_alias("blog", ["127.0.0.2"])
    with pytest.raises(OSError):
        DNSRecord.question("blog").send(dns.host, port, tcp=True, timeout=1)
    with dns:
        assert dns.port == port
        assert answer_ips(query(dns, "blog")) == ["127.0.0.2"]


def test_dns_aaaa(dns: FakeDockerDNS) -> None:
    dns.set_alias("v4only", ["127.0.0.2"])
    dns.set_alias("dual", ["127.0.0.2", "::1"])
    empty = query(dns, "v4only", "AAAA")
    assert empty.header.rcode == RCODE.NOERROR and empty.rr == []
    v6 = query(dns, "dual", "AAAA")
    assert answer_ips(v6) == ["::1"] and v6.rr[0].rtype == QTYPE.AAAA
    assert answer_ips(query(dns, "dual", "A")) == ["127.0.0.2"]


def test_dns_shuffles_order(dns: FakeDockerDNS) -> None:
    dns.set_alias("blog", ["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    orders = {tuple(answer_ips(query(dns, "blog"))) for _ in range(40)}
    assert len(orders) > 1
    assert all(sorted(o) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"] for o in orders)


def test_dns_survives_thousands_of_concurrent_queries_and_garbage(dns: FakeDockerDNS) -> None:
    dns.set_alias("blog", ["127.0.0.2", "127.0.0.3"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"\x00garbage", (dns.host, dns.port))
    failures: list[Any] = []

    def worker(n: int) -> None:
        for i in range(n):
            try:
                ips = answer_ips(query(dns, "blog", tcp=i % 10 == 0))
                if sorted(ips) != ["127.0.0.2", "127.0.0.3"]:
                    failures.append(ips)
            except Exception as exc:
                failures.append(exc)

    threads = [threading.Thread(target=worker, args=(500,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert dns.queries["blog"] == 2000
    assert dns.errors >= 1  # the garbage packet was seen and survived


# ---------------------------------------------------------------------------- HTTP


def test_root_and_unknown_paths_answer_with_name(container: Container) -> None:
    for path in ("/", "/some/where?x=1"):
        status, headers, body = get(container, path)
        assert (status, body, headers["X-Container"]) == (200, b"blue-1", "blue-1")
        assert headers["Content-Length"] == "6"


def test_keep_alive_reuses_one_connection(container: Container) -> None:
    conn = http.client.HTTPConnection(container.ip, container.port, timeout=5)
    for _ in range(20):
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.read() == b"blue-1"
        assert resp.getheader("Connection") is None
    conn.close()
    assert container.requests == 20
    assert container.connections == 1


def test_binds_exactly_the_given_ip(container: Container) -> None:
    assert connect_refused("127.0.0.1", container.port)


def test_up_follows_health_flag(container: Container) -> None:
    assert get(container, "/up")[::2] == (200, b"ok")
    container.healthy = False
    assert get(container, "/up")[0] == 503
    container.healthy = True
    assert get(container, "/up")[0] == 200


def test_headers_echo_preserves_duplicates(container: Container) -> None:
    conn = http.client.HTTPConnection(container.ip, container.port, timeout=5)
    conn.putrequest("GET", "/headers?q=1", skip_accept_encoding=True)
    conn.putheader("X-Dup", "a")
    conn.putheader("X-Dup", "b")
    conn.putheader("X-Forwarded-For", "10.0.0.1")
    conn.endheaders()
    data = json.loads(conn.getresponse().read())
    conn.close()
    assert data["container"] == "blue-1"
    assert data["path"] == "/headers?q=1"
    assert [h for h in data["headers"] if h[0] == "X-Dup"] == [["X-Dup", "a"], ["X-Dup", "b"]]
    assert ["X-Forwarded-For", "10.0.0.1"] in data["headers"]


def test_bytes_and_uploads(container: Container) -> None:
    conn = http.client.HTTPConnection(container.ip, container.port, timeout=5)
    for n in (0, 1000, 3 * 1024 * 1024 + 7):
        conn.request("GET", f"/bytes?n={n}")
        assert conn.getresponse().read() == expected_bytes(n)
    conn.request("POST", "/upload", body=b"x" * 2_000_000)
    assert json.loads(conn.getresponse().read()) == {"container": "blue-1", "received": 2_000_000}
    conn.request("PUT", "/thing", body=iter([b"ab", b"cde", b"f" * 70000]), encode_chunked=True)
    assert json.loads(conn.getresponse().read())["received"] == 70005
    conn.request("GET", "/")  # connection still usable after a chunked body
    assert conn.getresponse().read() == b"blue-1"
    conn.close()
    assert container.connections == 1


def test_raw_pipelining_and_http10(container: Container) -> None:
    with socket.create_connection((container.ip, container.port), timeout=5) as s:
        s.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /up HTTP/1.1\r\nHost: x\r\n\r\n")
        s.sendall(b"GET /b HTTP/1.0\r\n\r\n")  # HTTP/1.0 without keep-alive: server closes
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert data.endswith(b"Connection: close\r\n\r\nblue-1")
    assert b"\r\n\r\nok" in data


def test_slow_waits(container: Container) -> None:
    t0 = time.monotonic()
    assert get(container, "/slow?s=0.3")[2] == b"blue-1"
    assert time.monotonic() - t0 >= 0.3


def test_sse_arrives_incrementally(container: Container) -> None:
    conn = http.client.HTTPConnection(container.ip, container.port, timeout=5)
    t0 = time.monotonic()
    conn.request("GET", "/sse?n=4&interval=0.3")
    resp = conn.getresponse()
    assert resp.getheader("Content-Type") == "text/event-stream"
    assert resp.getheader("Content-Length") is None
    received = b""
    arrivals: list[float] = []
    while chunk := resp.read1(65536):
        received += chunk
        arrivals += [time.monotonic() - t0] * chunk.count(b"\n\n")
    assert received == b"".join(b"data: blue-1 %d\n\n" % i for i in range(4))
    assert arrivals[0] < 0.3  # first event came before the second was even produced
    assert arrivals[-1] >= 0.85
    conn.request("GET", "/")  # chunked stream ended cleanly, keep-alive intact
    assert conn.getresponse().read() == b"blue-1"
    conn.close()


def test_websocket_echo(container: Container) -> None:
    url = f"ws://{container.ip}:{container.port}/ws"
    with websockets.sync.client.connect(url, open_timeout=5, max_size=None) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "blue-1: hello"
        ws.send(b"\x00\x01\xff")
        assert ws.recv(timeout=5) == b"blue-1: \x00\x01\xff"
        big = "z" * 200_000  # exercises the 64-bit length path both ways
        ws.send(big)
        assert ws.recv(timeout=5) == "blue-1: " + big
        ws.send(["frag", "mented"])  # fragmented message
        assert ws.recv(timeout=5) == "blue-1: fragmented"
        assert ws.ping(b"p").wait(timeout=5)
    assert ws.close_code == 1000


def test_graceful_stop_finishes_in_flight_and_refuses_new(container: Container) -> None:
    result: dict[str, Any] = {}

    def slow_request() -> None:
        conn = http.client.HTTPConnection(container.ip, container.port, timeout=10)
        conn.request("GET", "/slow?s=1")
        resp = conn.getresponse()
        result.update(status=resp.status, body=resp.read(), conn=resp.getheader("Connection"))
        conn.close()

    idle = http.client.HTTPConnection(container.ip, container.port, timeout=5)
    idle.request("GET", "/")
    assert idle.getresponse().read() == b"blue-1"
    with websockets.sync.client.connect(f"ws://{container.ip}:{container.port}/ws") as ws:
        client = threading.Thread(target=slow_request)
        client.start()
        wait_until(lambda: container.in_flight == 1)
        t0 = time.monotonic()
        stopper = threading.Thread(target=container.stop, kwargs={"graceful": True})
        stopper.start()
        wait_until(lambda: connect_refused(container.ip, container.port), timeout=1)
        assert client.is_alive() and stopper.is_alive()

        assert idle.sock is not None
        idle.sock.settimeout(2)
        assert idle.sock.recv(1) == b""  # idle keep-alive connection closed at once
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=2)
        assert ws.close_code == 1001
        assert client.is_alive()  # both happened while the slow request was still running

        client.join(timeout=5)
        assert result == {"status": 200, "body": b"blue-1", "conn": "close"}
        stopper.join(timeout=5)
        assert not stopper.is_alive()
        assert 0.8 < time.monotonic() - t0 < 3
    idle.close()


def test_kill_resets_connections(container: Container) -> None:
    # raw sockets: http.client turns a clean FIN into RemoteDisconnected, which subclasses
    # ConnectionResetError and would hide a missing RST
    busy = socket.create_connection((container.ip, container.port), timeout=5)
    idle = socket.create_connection((container.ip, container.port), timeout=5)
    busy.sendall(b"GET /slow?s=5 HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: container.in_flight == 1 and container.open_connections == 2)
    container.kill()
    for s in (busy, idle):
        with s, pytest.raises(ConnectionResetError):
            s.recv(1)
    assert connect_refused(container.ip, container.port)


def test_container_port_zero_and_restart() -> None:
    c = Container("green-1", "127.0.0.3").start()
    try:
        assert c.port > 0
        wait_for_port(c.ip, c.port, timeout=1)
        c.stop(graceful=False)
        assert connect_refused(c.ip, c.port)
        c.start()  # same port again, thanks to SO_REUSEADDR
        assert get(c, "/")[2] == b"green-1"
    finally:
        c.kill()


def test_helpers() -> None:
    port = free_port("127.0.0.4")
    with pytest.raises(TimeoutError):
        wait_for_port("127.0.0.4", port, timeout=0.2)


# ---------------------------------------------------------------------------- process


def test_process_mode_ready_sigusr1_and_sigterm() -> None:
    ip = "127.0.0.5"
    port = free_port(ip)
    proc = spawn_container("blue-2", ip, port, grace=5)
    try:
        c = Container("blue-2", ip, port)  # only used as an address holder for get()
        assert get(c, "/")[2] == b"blue-2"
        proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: get(c, "/up")[0] == 503, timeout=2)
        proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: get(c, "/up")[0] == 200, timeout=2)

        # SIGTERM with a request in flight: it completes, then the process exits 0
        conn = http.client.HTTPConnection(ip, port, timeout=5)
        conn.request("GET", "/slow?s=0.5")
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        resp = conn.getresponse()
        assert (resp.status, resp.read(), resp.getheader("Connection")) == (200, b"blue-2", "close")
        assert proc.wait(timeout=5) == 0
    finally:
        stop_container_process(proc, kill=True)


def test_process_mode_unhealthy_flag_and_throughput() -> None:
    ip = "127.0.0.6"
    port = free_port(ip)
    proc = spawn_container("blue-3", ip, port, unhealthy=True)
    try:
        conn = http.client.HTTPConnection(ip, port, timeout=5)
        conn.request("GET", "/up")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (503, b"unhealthy")
        n = 2000
        t0 = time.monotonic()
        for _ in range(n):
            conn.request("GET", "/")
            conn.getresponse().read()
        rate = n / (time.monotonic() - t0)
        conn.close()
        assert rate > 1000, f"only {rate:.0f} req/s on one keep-alive connection"
    finally:
        assert stop_container_process(proc) == 0


def test_process_mode_bad_port_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.7", 0))
        s.listen()
        taken = s.getsockname()[1]
        with pytest.raises(RuntimeError):
            spawn_container("dup", "127.0.0.7", taken, stderr=subprocess.DEVNULL)
