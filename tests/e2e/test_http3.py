"""``luma-proxy run --https-port P --http3``: HTTP/3 (QUIC) on the HTTPS port's UDP side.

A real HTTP/3 client (aioquic, ``tests/e2e/h3client.py``) talks to the real proxy;
the containers keep speaking HTTP/1.1 over TCP. Hosts bring their own certificate
(``deploy --tls-cert``): no ACME order leaves loopback.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from tests.e2e.conftest import LUMA, Proxy, wait_until
from tests.e2e.docker_double import Container, FakeDockerDNS, free_port
from tests.e2e.h3client import Reply, Request, Session, h3
from tests.e2e.test_https import cert_args


def deploy(dns: FakeDockerDNS, containers: Callable[..., Container], cli: Callable[..., object],
           tmp_path: Path) -> tuple[Container, Path]:
    """``app.test`` with its own certificate (returned: the client's root) and the
    ``--no-ssl`` host ``plain.test``, both on one container."""
    app = containers("app-1")
    dns.set_alias("app", [app.ip])
    certs = tmp_path / "app-cert"
    certs.mkdir()
    cli("deploy", "--host", "app.test", "--target", f"app:{app.port}", "--project", "p",
        *cert_args(certs, ["app.test"]))
    cli("deploy", "--host", "plain.test", "--target", f"app:{app.port}", "--project", "p",
        "--no-ssl")
    return app, certs / "c.pem"


def replies(session: Session) -> list[Reply]:
    for r in session.replies:
        if isinstance(r, BaseException):
            raise AssertionError(f"an HTTP/3 request failed: {r!r}")
    return session.replies  # type: ignore[return-value]


def curl_headers(https_port: int, host: str, cafile: Path | None, *flags: str) -> dict[str, str]:
    """The response headers of ``GET https://host:port/`` over TCP (curl; --http1.1/--http2)."""
    verify = ("--cacert", str(cafile)) if cafile else ("-k",)
    r = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-D", "-", "-o", "/dev/null", *verify, *flags,
         "--resolve", f"{host}:{https_port}:127.0.0.1", f"https://{host}:{https_port}/"],
        capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    return {"status": lines[0], **{k.strip().lower(): v.strip() for k, v in fields.items()}}


def test_http3_serves_routed_requests_with_the_hosts_certificate(
        dns, containers, cli, start_proxy, tmp_path: Path) -> None:
    app, cafile = deploy(dns, containers, cli, tmp_path)
    https_port = free_port()
    proxy: Proxy = start_proxy("run", args=("--https-port", str(https_port), "--http3"),
                               env={"LUMA_PROXY_HEADER_TIMEOUT": "1"})
    wait_until(lambda: f"127.0.0.1:{https_port}/udp" in proxy.logs())  # "listening on ..."

    # GET routed by :authority: the container's answer, over the host's own certificate.
    session = h3(https_port, "app.test", [Request("/headers")], cafile=str(cafile))
    assert session.alpn == "h3"
    assert session.peer_cert == x509.load_pem_x509_certificate(cafile.read_bytes())
    (reply,) = replies(session)
    assert reply.status == 200, reply
    seen = json.loads(reply.body)
    assert seen["container"] == "app-1"
    assert seen["http_version"] == "HTTP/1.1"  # the container speaks HTTP/1.1 over TCP
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["host"] == "app.test"
    assert headers["x-forwarded-proto"] == "https"
    assert "alt-svc" not in reply.headers  # the client is on HTTP/3 already

    # Concurrent streams on one connection: each its own upstream request, all answered.
    session = h3(https_port, "app.test", [Request("/slow?s=0.3")] * 5, cafile=str(cafile))
    assert [(r.status, r.text) for r in replies(session)] == [(200, "app-1")] * 5

    # The idle bound (--header-timeout, 1 s here) waits for the last open stream, and
    # the client is told when the connection is closed (CONNECTION_CLOSE, H3_NO_ERROR).
    session = h3(https_port, "app.test", [Request("/slow?s=1.5"), Request("/")],
                 cafile=str(cafile), linger=3)
    assert [(r.status, r.text) for r in replies(session)] == [(200, "app-1")] * 2
    assert session.closed == (0x100, "closing")

    # A POST body without content-length reaches the container whole (chunked upstream).
    body = b"x" * 50000
    (posted,) = replies(h3(https_port, "app.test", [Request("/upload", "POST", body)],
                           cafile=str(cafile)))
    assert posted.status == 200, posted
    assert json.loads(posted.body) == {"container": "app-1", "received": len(body)}

    # Alt-Svc advertises it on HTTPS over TCP, HTTP/1.1 and HTTP/2...
    for flag, status in (("--http1.1", ["HTTP/1.1", "200"]), ("--http2", ["HTTP/2", "200"])):
        got = curl_headers(https_port, "app.test", cafile, flag)
        assert got["status"].split()[:2] == status, got
        assert got["alt-svc"] == f'h3=":{https_port}"; ma=86400', got
    # ...not with the placeholder certificate (an unknown name), nor on plain HTTP.
    assert "alt-svc" not in curl_headers(https_port, "unknown.test", None)
    plain = proxy.get("plain.test")
    assert plain.status == 200 and "alt-svc" not in plain.headers

    # SIGTERM with an HTTP/3 request in flight: it is answered, then the proxy exits 0.
    slow: list[Session | BaseException] = []

    def slow_request() -> None:
        try:
            slow.append(h3(https_port, "app.test", [Request("/slow?s=1.5")], cafile=str(cafile)))
        except BaseException as e:  # reported below
            slow.append(e)

    t = threading.Thread(target=slow_request)
    t.start()
    wait_until(lambda: app.in_flight, timeout=5)
    proxy.proc.send_signal(signal.SIGTERM)
    t.join(15)
    assert slow and isinstance(slow[0], Session), slow
    assert [(r.status, r.text) for r in replies(slow[0])] == [(200, "app-1")]
    assert proxy.proc.wait(10) == 0, proxy.logs()


def test_http3_without_https_port_is_refused_in_one_line(state_path: Path,
                                                         tmp_path: Path) -> None:
    result = subprocess.run(
        [LUMA, "run", "--http3", "--http-port", str(free_port()), "--listen-host", "127.0.0.1",
         "--state", str(state_path)], capture_output=True, text=True, timeout=30,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "Error: --http3 needs --https-port: HTTP/3 is served on the HTTPS port (UDP)"]


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_http3_under_two_workers_is_served_by_one(dns, containers, cli, start_proxy,
                                                  tmp_path: Path) -> None:
    _, cafile = deploy(dns, containers, cli, tmp_path)
    https_port = free_port()
    proxy = start_proxy("run", args=("--https-port", str(https_port), "--http3",
                                     "--workers", "2"))
    wait_until(lambda: "workers listening" in proxy.logs(), timeout=30)
    for _ in range(3):  # every connection, whatever the TCP side's workers do
        (reply,) = replies(h3(https_port, "app.test", cafile=str(cafile)))
        assert (reply.status, reply.text) == (200, "app-1")
    # Worker 1 said it leaves HTTP/3 to worker 0 (it would fail to bind the UDP port).
    assert proxy.logs().count("is served by worker 0, not this worker") == 1, proxy.logs()
    # Every worker advertises it on HTTPS over TCP.
    for _ in range(4):
        assert curl_headers(https_port, "app.test", cafile, "--http1.1")["alt-svc"] == \
            f'h3=":{https_port}"; ma=86400'
