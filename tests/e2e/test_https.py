"""HTTPS end to end, against a real ACME server (Pebble) validating through the proxy."""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from luma_proxy.store.registry import Store
from tests.certs import make_pair
from tests.e2e.conftest import Proxy, wait_until
from tests.e2e.docker_double import Container, FakeDockerDNS, free_port
from tests.e2e.pebble import Pebble


def make_cert(names: list[str]) -> tuple[bytes, bytes]:
    """A self-signed certificate and key for ``names`` (EC P-256, 90 days)."""
    return make_pair(names)


def cert_args(directory: Path, names: list[str]) -> tuple[str, ...]:
    """``deploy``'s ``--tls-cert``/``--tls-key`` for a new certificate of ``names``,
    written as ``c.pem``/``k.pem`` in ``directory``."""
    cert, key = make_cert(names)
    (directory / "c.pem").write_bytes(cert)
    (directory / "k.pem").write_bytes(key)
    return "--tls-cert", str(directory / "c.pem"), "--tls-key", str(directory / "k.pem")


@dataclass
class Https:
    dns: FakeDockerDNS
    pebble: Pebble
    http_port: int
    https_port: int
    app_port: int
    root: Path
    start: Callable[..., Proxy]

    def proxy(self, **env: str) -> Proxy:
        return self.start("run", port=self.http_port, args=(
            "--https-port", str(self.https_port), "--acme-directory", self.pebble.directory_url,
            "--acme-ca-bundle", self.pebble.ca_bundle), env={"LUMA_PROXY_ACME_RETRY": "1", **env})

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.root))
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        return ctx

    def peer_cert(self, sni: str) -> x509.Certificate:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", self.https_port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname=sni) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der
        return x509.load_der_x509_certificate(der)

    def curl(self, host: str, path: str = "/", *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["curl", "-sS", "--max-time", "10", "--cacert", str(self.root), "--resolve",
             f"{host}:{self.https_port}:127.0.0.1", *args,
             f"https://{host}:{self.https_port}{path}"],
            capture_output=True, text=True, timeout=20)


@pytest.fixture
def https(dns: FakeDockerDNS, start_proxy, tmp_path: Path) -> Iterator[Https]:
    http_port, https_port, app_port = free_port(), free_port(), free_port()
    app = Container("blog-1", "127.0.30.1", app_port).start()
    dns.set_alias("blog", [app.ip])
    for name in ("blog.test", "shop.test", "plain.test"):
        dns.set_alias(name, ["127.0.0.1"])  # where Pebble finds the proxy's HTTP port
    with Pebble(http_port=http_port, dns_port=dns.port) as pebble:
        root = tmp_path / "pebble-root.pem"
        root.write_bytes(pebble.root_pem())
        yield Https(dns, pebble, http_port, https_port, app_port, root, start_proxy)
    app.kill()


def cert_status(cli, host: str) -> dict:
    return json.loads(cli("cert-status", "--host", host, "--json").stdout)["certificates"][0]


def test_issuance_https_h1_h2_and_redirect_rules(https: Https, cli, state_path: Path) -> None:
    cli("deploy", "--host", "blog.test", "--target", f"blog:{https.app_port}", "--project", "p")
    cli("deploy", "--host", "plain.test", "--target", f"blog:{https.app_port}", "--project", "p",
        "--ssl=false")
    proxy = https.proxy()
    wait_until(lambda: cert_status(cli, "blog.test")["state"] == "active", timeout=60)

    # Files as the Go proxy laid them out, the key and account key private.
    certs = state_path.parent / "certs"
    assert (certs / "blog.test" / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (certs / "account.key").stat().st_mode & 0o777 == 0o600
    assert b"BEGIN CERTIFICATE" in (certs / "blog.test" / "cert.pem").read_bytes()

    # HTTP/1.1 and HTTP/2, verified against Pebble's root; the container learns it was https.
    for flag, version in (("--http1.1", "1.1"), ("--http2", "2")):
        r = https.curl("blog.test", "/headers", flag, "-w", "\n%{http_version}")
        assert r.returncode == 0, r.stderr
        body, got = r.stdout.rsplit("\n", 1)
        assert got == version
        headers = dict((k.lower(), v) for k, v in json.loads(body)["headers"])
        assert headers["x-forwarded-proto"] == "https"

    # Plain HTTP to the ssl host: 301 to https, path and query kept.
    r = proxy.get("blog.test", "/a/b?c=1")
    assert r.status == 301
    assert r.headers["location"] == f"https://blog.test:{https.https_port}/a/b?c=1"
    # ...but never for the ACME challenge path, and never for --no-ssl hosts.
    assert proxy.get("blog.test", "/.well-known/acme-challenge/nope").status == 404
    assert proxy.get("plain.test", "/").status == 200


def test_unknown_sni_and_pending_host_get_fallback_not_mitmproxy_ca(https: Https, cli) -> None:
    cli("deploy", "--host", "plain.test", "--target", f"blog:{https.app_port}", "--project", "p",
        "--no-ssl")
    proxy = https.proxy()
    for sni in ("unknown.test", "plain.test"):
        cert = https.peer_cert(sni)
        issuer = cert.issuer.rfc4514_string()
        assert "mitmproxy" not in issuer
        assert "luma-proxy default" in issuer
    # No HTTPS redirect while no certificate is active: plain HTTP is served.
    assert proxy.get("plain.test").status == 200


def test_http_is_served_until_certificate_is_active(https: Https, cli) -> None:
    # The ACME directory is unreachable: the proxy must start and serve HTTP.
    dead = f"https://127.0.0.1:{free_port()}/dir"
    cli("deploy", "--host", "blog.test", "--target", f"blog:{https.app_port}", "--project", "p")
    proxy = https.start("run", port=https.http_port, args=(
        "--https-port", str(https.https_port), "--acme-directory", dead),
        env={"LUMA_PROXY_ACME_RETRY": "1"})
    assert proxy.get("blog.test").status == 200  # not redirected: no certificate yet
    status = wait_until(lambda: (s := cert_status(cli, "blog.test"))["attempts"] >= 2 and s,
                        timeout=20)
    assert status["state"] == "failed"
    assert "127.0.0.1" in status["last_error"] and "\n" not in status["last_error"]
    assert proxy.get("blog.test").status == 200
    assert "certificate:" in proxy.logs()


def test_restart_reuses_certificate_and_renewal_replaces_it(https: Https, cli,
                                                          state_path: Path) -> None:
    cli("deploy", "--host", "blog.test", "--target", f"blog:{https.app_port}", "--project", "p")
    proxy = https.proxy()
    wait_until(lambda: cert_status(cli, "blog.test")["state"] == "active", timeout=60)
    cert = state_path.parent / "certs" / "blog.test" / "cert.pem"
    first = cert.read_bytes()
    proxy.stop()

    proxy = https.proxy()
    assert https.curl("blog.test").stdout == "blog-1"  # served at once after the restart
    assert cert.read_bytes() == first  # no new order for a valid certificate
    assert proxy.logs().count("ordering one") == 0

    result = cli("cert-renew", "--host", "blog.test", "--wait", "60")
    assert result.stdout.startswith("✅")
    assert cert.read_bytes() != first
    wait_until(lambda: https.curl("blog.test").stdout == "blog-1", timeout=10)
    served = https.peer_cert("blog.test")
    assert served == x509.load_pem_x509_certificates(cert.read_bytes())[0]


def test_short_lived_certificate_is_renewed_automatically(
        dns: FakeDockerDNS, start_proxy, tmp_path: Path, cli, state_path: Path) -> None:
    http_port, https_port, app_port = free_port(), free_port(), free_port()
    app = Container("blog-1", "127.0.30.2", app_port).start()
    dns.set_alias("blog", [app.ip])
    dns.set_alias("blog.test", ["127.0.0.1"])
    # 15 s certificates: due after 2/3 of their life, i.e. about 10 s after issuance.
    with Pebble(http_port=http_port, dns_port=dns.port, certificate_validity=15) as pebble:
        cli("deploy", "--host", "blog.test", "--target", f"blog:{app_port}", "--project", "p")
        start_proxy("run", port=http_port, args=(
            "--https-port", str(https_port), "--acme-directory", pebble.directory_url,
            "--acme-ca-bundle", pebble.ca_bundle))
        cert = state_path.parent / "certs" / "blog.test" / "cert.pem"
        wait_until(cert.exists, timeout=60)
        first = cert.read_bytes()
        wait_until(lambda: cert.read_bytes() != first, timeout=60)
        leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
        assert leaf.not_valid_after_utc > datetime.datetime.now(datetime.UTC)
    app.kill()


def test_custom_certificate(https: Https, cli, state_path: Path, tmp_path: Path) -> None:
    cert_pem, key_pem = make_cert(["shop.test"])
    other_cert, other_key = make_cert(["elsewhere.test"])
    (tmp_path / "c.pem").write_bytes(cert_pem)
    (tmp_path / "k.pem").write_bytes(key_pem)
    (tmp_path / "other-c.pem").write_bytes(other_cert)
    (tmp_path / "other-k.pem").write_bytes(other_key)
    base = ("deploy", "--host", "shop.test", "--target", f"blog:{https.app_port}",
            "--project", "p")

    cli("deploy", "--host", "plain.test", "--target", f"blog:{https.app_port}", "--project", "p",
        "--no-ssl")  # something in the registry, to see it untouched
    before = cli("export").stdout
    generation = Store(state_path).generation()
    for cert, key, why in (("c.pem", "other-k.pem", "does not match"),
                           ("other-c.pem", "other-k.pem", "does not cover shop.test")):
        r = cli(*base, "--tls-cert", str(tmp_path / cert), "--tls-key", str(tmp_path / key),
                check=False)
        assert r.returncode != 0 and why in r.stderr and len(r.stderr.splitlines()) == 1
        assert cli("export").stdout == before  # the registry is untouched
        assert Store(state_path).generation() == generation
        assert not (state_path.parent / "certs" / "shop.test").exists()

    cli(*base, "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem"))
    proxy = https.proxy()
    wait_until(lambda: https.peer_cert("shop.test").subject.rfc4514_string() != "", timeout=5)
    served = https.peer_cert("shop.test")
    assert served == x509.load_pem_x509_certificate(cert_pem)
    for variant in ("SHOP.test", "Shop.Test", "SHOP.TEST."):  # DNS names ignore case
        assert https.peer_cert(variant) == served, variant
    assert "ordering one" not in proxy.logs()
    assert cert_status(cli, "shop.test")["source"] == "custom"


def handshake(port: int, sni: str, ciphers: str) -> str | None:
    """The cipher a TLS 1.2 client offering only ``ciphers`` gets, or None if refused."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers(ciphers)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                client.wrap_socket(raw, server_hostname=sni) as tls:
            return tls.cipher()[0]
    except ssl.SSLError:
        return None


def test_tls12_offers_only_forward_secret_aead_suites(https: Https) -> None:
    https.proxy()
    for cbc in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384",
                "ECDHE-ECDSA-AES128-SHA256"):
        assert handshake(https.https_port, "unknown.test", cbc) is None, cbc
    assert handshake(https.https_port, "unknown.test",
                     "ECDHE-ECDSA-AES128-GCM-SHA256") == "ECDHE-ECDSA-AES128-GCM-SHA256"
    # Server order: offered weakest-first, the proxy still picks its first choice.
    assert handshake(https.https_port, "unknown.test",
                     "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256"
                     ) == "ECDHE-ECDSA-AES128-GCM-SHA256"


def test_sni_of_another_configured_host_gets_421_h1_and_h2(https: Https, cli) -> None:
    for host in ("blog.test", "shop.test"):
        cli("deploy", "--host", host, "--target", f"blog:{https.app_port}", "--project", "p",
            "--no-ssl")
    https.proxy()
    for flag in ("--http1.1", "--http2"):
        r = https.curl("shop.test", "/", flag, "-k", "-H", "Host: blog.test",
                       "-o", "/dev/null", "-w", "%{http_code}")
        assert r.stdout == "421", (flag, r.stdout, r.stderr)
        # Same host in another spelling, and an SNI naming no configured host: served.
        r = https.curl("shop.test", "/", flag, "-k", "-H", "Host: SHOP.test",
                       "-o", "/dev/null", "-w", "%{http_code}")
        assert r.stdout == "200", (flag, r.stdout, r.stderr)
        r = https.curl("other.test", "/", flag, "-k", "-H", "Host: blog.test",
                       "-o", "/dev/null", "-w", "%{http_code}")
        assert r.stdout == "200", (flag, r.stdout, r.stderr)


# ------------------------------------------------------------------------------- HSTS
# Issue 13.16: Strict-Transport-Security on the HTTPS answers of an --ssl host served
# with its own certificate (custom here; no ACME server is needed), over HTTP/1.1 and
# HTTP/2, never with the placeholder certificate, never on plain HTTP or --no-ssl.

HSTS_NAMES = ["shop.test", "quiet.test", "down.test", "own.test"]


@dataclass
class Answer:
    status: int
    headers: dict[str, list[str]]
    version: str

    def hsts(self) -> list[str]:
        return self.headers.get("strict-transport-security", [])


@dataclass
class HstsBed:
    http_port: int
    https_port: int
    app_port: int
    cafile: Path
    start: Callable[..., Proxy]

    def proxy(self, *args: str, **env: str) -> Proxy:
        dead = f"http://127.0.0.1:{free_port()}/dir"  # no ACME server: pending stays pending
        proxy = self.start("run", port=self.http_port, args=(
            "--https-port", str(self.https_port), "--acme-directory", dead, *args), env=env)
        wait_until(lambda: self.get("shop.test", "--http1.1").status == 200, timeout=10)
        return proxy

    def get(self, host: str, flag: str, path: str = "/", *args: str,
            verify: bool = True) -> Answer:
        """``curl -D-`` over HTTPS with ``flag`` (--http1.1 or --http2)."""
        r = subprocess.run(
            ["curl", "-sS", "--max-time", "10", flag, "--resolve",
             f"{host}:{self.https_port}:127.0.0.1",
             *(["--cacert", str(self.cafile)] if verify else ["-k"]), *args, "-D", "-",
             "-o", "/dev/null", "-w", "%{http_version}",
             f"https://{host}:{self.https_port}{path}"],
            capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, (host, flag, r.stderr)
        head, _, version = r.stdout.rpartition("\n\n")  # text mode: CRLF read as \n
        lines = head.splitlines()
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        return Answer(int(lines[0].split()[1]), headers, version)


class OwnHstsApp:
    """A container that sends its own Strict-Transport-Security on every answer."""

    def __init__(self, ip: str) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Strict-Transport-Security", "max-age=5; includeSubDomains")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((ip, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hsts_bed(dns: FakeDockerDNS, start_proxy, cli, tmp_path: Path) -> Iterator[HstsBed]:
    """shop.test (custom certificate, HSTS on), quiet.test (--no-hsts), down.test (no
    container: the proxy's own 503), own.test (an app sending its own header),
    pending.test (--ssl, no certificate yet), plain.test (--no-ssl)."""
    http_port, https_port = free_port(), free_port()
    app = Container("shop-1", "127.0.31.1", free_port("127.0.31.1")).start()
    own = OwnHstsApp("127.0.31.2")
    dns.set_alias("shop", [app.ip])
    dns.set_alias("own", ["127.0.31.2"])
    cert_pem, key_pem = make_cert(HSTS_NAMES)
    cafile, keyfile = tmp_path / "hsts-cert.pem", tmp_path / "hsts-key.pem"
    cafile.write_bytes(cert_pem)  # self-signed: it is its own CA
    keyfile.write_bytes(key_pem)
    custom = ("--tls-cert", str(cafile), "--tls-key", str(keyfile))
    for host, target, extra in (("shop.test", f"shop:{app.port}", custom),
                                ("quiet.test", f"shop:{app.port}", (*custom, "--no-hsts")),
                                ("down.test", "nothing:80", custom),
                                ("own.test", f"own:{own.port}", custom),
                                ("pending.test", f"shop:{app.port}", ()),
                                ("plain.test", f"shop:{app.port}", ("--no-ssl",))):
        cli("deploy", "--host", host, "--target", target, "--project", "p", *extra)
    yield HstsBed(http_port, https_port, app.port, cafile, start_proxy)
    own.close()
    app.kill()


@pytest.mark.parametrize("flag, version", [("--http1.1", "1.1"), ("--http2", "2")])
def test_hsts_on_https_answers_of_ssl_hosts_with_their_certificate(
        hsts_bed: HstsBed, flag: str, version: str) -> None:
    proxy = hsts_bed.proxy()
    year = ["max-age=31536000"]
    shop = hsts_bed.get("shop.test", flag)
    assert (shop.status, shop.version, shop.hsts()) == (200, version, year)
    streamed = hsts_bed.get("shop.test", flag, "/sse?n=1&interval=0")  # headers sent early
    assert (streamed.status, streamed.hsts()) == (200, year)
    own_503 = hsts_bed.get("down.test", flag)  # the proxy's own page, for an --ssl host
    assert (own_503.status, own_503.hsts()) == (503, year)
    # The app's own header is passed as it is, not replaced nor doubled.
    assert hsts_bed.get("own.test", flag).hsts() == ["max-age=5; includeSubDomains"]
    # Another Host on shop.test's connection: that answer is not shop.test's.
    other = hsts_bed.get("shop.test", flag, "/", "-H", "Host: nowhere.test")
    assert (other.status, other.hsts()) == (404, [])
    # deploy --no-hsts; the placeholder certificate (pending, --no-ssl): no header.
    assert hsts_bed.get("quiet.test", flag).hsts() == []
    for host in ("pending.test", "plain.test"):
        answer = hsts_bed.get(host, flag, verify=False)
        assert (answer.status, answer.hsts()) == (200, []), host
    # Plain HTTP: never (shop.test is redirected, plain.test served).
    redirect = proxy.get("shop.test")
    assert redirect.status == 301 and "strict-transport-security" not in redirect.headers
    served = proxy.get("plain.test")
    assert served.status == 200 and "strict-transport-security" not in served.headers


def test_hsts_max_age_follows_the_setting(hsts_bed: HstsBed) -> None:
    proxy = hsts_bed.proxy(LUMA_PROXY_HSTS_MAX_AGE="600")
    for flag in ("--http1.1", "--http2"):
        assert hsts_bed.get("shop.test", flag).hsts() == ["max-age=600"], flag
    proxy.stop()
    proxy = hsts_bed.proxy("--hsts-max-age", "86400", LUMA_PROXY_HSTS_MAX_AGE="600")
    for flag in ("--http1.1", "--http2"):
        assert hsts_bed.get("shop.test", flag).hsts() == ["max-age=86400"], flag
    proxy.stop()
    hsts_bed.proxy("--hsts-max-age", "0")  # off for every host
    for flag in ("--http1.1", "--http2"):
        answer = hsts_bed.get("shop.test", flag)
        assert (answer.status, answer.hsts()) == (200, []), flag
