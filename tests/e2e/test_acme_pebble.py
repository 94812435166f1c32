"""Real ACME issuance against Pebble: HTTP-01 over loopback, names resolved by a test DNS server.

Topology (all on 127.0.0.1): Pebble resolves ``blog.test`` through
``FakeDockerDNS`` (alias ``blog.test`` -> 127.0.0.1), then fetches
``http://blog.test:<challenge port>/.well-known/acme-challenge/<token>`` from a
tiny HTTP server that serves whatever `AcmeIssuer.issue` published.
"""

from __future__ import annotations

import datetime
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from luma_proxy.acme.certinfo import certificate_covers, key_matches_certificate, renewal_due
from luma_proxy.acme.client import AcmeError, AcmeIssuer, IssuedCertificate
from tests.e2e.docker_double import FakeDockerDNS
from tests.e2e.pebble import Pebble, find_pebble, free_port

HOST = "blog.test"
CHALLENGE_PREFIX = "/.well-known/acme-challenge/"

try:
    find_pebble()
except Exception as exc:  # pragma: no cover - environment without pebble
    pytest.skip(f"pebble unavailable: {exc}", allow_module_level=True)


# -- test doubles ---------------------------------------------------------------------


class ChallengeServer:
    """Serves ``/.well-known/acme-challenge/<token>`` from a dict, like the proxy will."""

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}
        self.hits: list[tuple[str, str]] = []  # (Host header, path)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits.append((self.headers.get("Host", ""), self.path))
                token = self.path.removeprefix(CHALLENGE_PREFIX)
                body = server.tokens.get(token) if self.path.startswith(CHALLENGE_PREFIX) else None
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                payload = body.encode("ascii")
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def publish(self, token: str, key_authorization: str) -> None:
        self.tokens[token] = key_authorization

    def unpublish(self, token: str) -> None:
        self.tokens.pop(token, None)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def challenge_server() -> Iterator[ChallengeServer]:
    server = ChallengeServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def docker_dns() -> Iterator[FakeDockerDNS]:
    """Module-scoped (Pebble is): the proxy's Docker DNS double, serving the test host."""
    server = FakeDockerDNS().start()
    server.set_alias(HOST, ["127.0.0.1"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pebble(challenge_server: ChallengeServer, docker_dns: FakeDockerDNS) -> Iterator[Pebble]:
    with Pebble(http_port=challenge_server.port, dns_port=docker_dns.port) as server:
        yield server


def _issue(issuer: AcmeIssuer, server: ChallengeServer, host: str = HOST) -> IssuedCertificate:
    return issuer.issue(host, server.publish, server.unpublish, timeout=20)


def _verify_chain(fullchain_pem: bytes, root_pem: bytes, host: str) -> None:
    """Path-validate leaf -> intermediates -> Pebble root for *host*, as a TLS client would."""
    leaf, *intermediates = x509.load_pem_x509_certificates(fullchain_pem)
    roots = x509.load_pem_x509_certificates(root_pem)
    verifier = PolicyBuilder().store(Store(roots)).build_server_verifier(x509.DNSName(host))
    verifier.verify(leaf, intermediates)


# -- tests ----------------------------------------------------------------------------


def test_issue_certificate_for_blog_test(
    tmp_path: Path,
    pebble: Pebble,
    challenge_server: ChallengeServer,
    docker_dns: FakeDockerDNS,
) -> None:
    key_path = tmp_path / "state" / "acme" / "account.pem"
    issuer = AcmeIssuer(pebble.directory_url, key_path, email=None, ca_bundle=pebble.ca_bundle)
    hits_before = len(challenge_server.hits)

    issued = _issue(issuer, challenge_server)

    _verify_chain(issued.fullchain_pem, pebble.root_pem(), HOST)
    assert certificate_covers(issued.fullchain_pem, HOST)
    assert not certificate_covers(issued.fullchain_pem, "other.test")
    assert key_matches_certificate(issued.fullchain_pem, issued.key_pem)
    now = datetime.datetime.now(datetime.UTC)
    assert issued.not_after > now + datetime.timedelta(days=60)  # Pebble default: ~5 years
    assert issued.not_after.tzinfo is not None
    # Pebble really validated over HTTP, via our DNS, and the token was cleaned up.
    new_hits = challenge_server.hits[hits_before:]
    assert any(path.startswith(CHALLENGE_PREFIX) for _, path in new_hits), new_hits
    assert any(h.startswith(HOST) for h, _ in new_hits), new_hits
    assert docker_dns.queries[HOST] > 0
    assert challenge_server.tokens == {}
    # Account key: private file in a private directory.
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    assert issuer.account_url


def test_second_issuer_reuses_existing_account(
    tmp_path: Path, pebble: Pebble, challenge_server: ChallengeServer
) -> None:
    key_path = tmp_path / "account.pem"
    first = AcmeIssuer(pebble.directory_url, key_path, "ops@luma.test", pebble.ca_bundle)
    issued1 = _issue(first, challenge_server)
    key_bytes = key_path.read_bytes()

    # A fresh issuer (think: proxy restart) with the same key hits "account exists".
    second = AcmeIssuer(pebble.directory_url, key_path, "ops@luma.test", pebble.ca_bundle)
    issued2 = _issue(second, challenge_server)

    assert key_path.read_bytes() == key_bytes
    assert second.account_url == first.account_url
    assert issued2.fullchain_pem != issued1.fullchain_pem
    assert issued2.key_pem != issued1.key_pem  # fresh certificate key every time
    _verify_chain(issued2.fullchain_pem, pebble.root_pem(), HOST)


def test_failed_validation_raises_one_line_error(
    tmp_path: Path, pebble: Pebble, challenge_server: ChallengeServer
) -> None:
    issuer = AcmeIssuer(pebble.directory_url, tmp_path / "k.pem", None, pebble.ca_bundle)
    unpublished: list[str] = []

    def publish_wrong(token: str, key_authorization: str) -> None:
        challenge_server.publish(token, key_authorization + "-tampered")

    def unpublish(token: str) -> None:
        unpublished.append(token)
        challenge_server.unpublish(token)

    with pytest.raises(AcmeError) as info:
        issuer.issue(HOST, publish_wrong, unpublish, timeout=20)

    message = str(info.value)
    assert "\n" not in message
    assert HOST in message
    assert "challenge failed" in message
    assert unpublished, "published tokens must always be unpublished"
    assert challenge_server.tokens == {}


def test_untrusted_directory_certificate_is_an_acme_error(tmp_path: Path, pebble: Pebble) -> None:
    issuer = AcmeIssuer(pebble.directory_url, tmp_path / "k.pem", None, ca_bundle=None)
    with pytest.raises(AcmeError) as info:
        issuer.issue(HOST, lambda t, k: None, lambda t: None, timeout=10)
    message = str(info.value)
    assert "\n" not in message
    assert "TLS" in message and "certificate verify failed" in message


def test_unreachable_directory_fails_fast_with_one_line(tmp_path: Path) -> None:
    url = f"https://127.0.0.1:{free_port()}/dir"  # nothing listens there
    issuer = AcmeIssuer(url, tmp_path / "acme" / "account.pem", None)
    published: list[str] = []

    started = time.monotonic()
    with pytest.raises(AcmeError) as info:
        issuer.issue(HOST, lambda t, k: published.append(t), lambda t: None, timeout=30)
    elapsed = time.monotonic() - started

    message = str(info.value)
    assert elapsed < 5, elapsed
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"ACME issuance for {HOST} failed: cannot connect to {url}")
    assert "refused" in message.lower()
    assert published == []


def test_short_validity_certificates_are_due_for_renewal(
    tmp_path: Path, challenge_server: ChallengeServer, docker_dns: FakeDockerDNS
) -> None:
    # A second Pebble that issues 1-hour certificates: valid (verifiable), but due.
    with Pebble(
        http_port=challenge_server.port, dns_port=docker_dns.port, certificate_validity=3600
    ) as short:
        issuer = AcmeIssuer(short.directory_url, tmp_path / "k.pem", None, short.ca_bundle)
        issued = _issue(issuer, challenge_server)
        _verify_chain(issued.fullchain_pem, short.root_pem(), HOST)

    now = datetime.datetime.now(datetime.UTC)
    assert now < issued.not_after <= now + datetime.timedelta(hours=1)
    assert renewal_due(issued.not_after, now)  # within 30 days: due by the plain rule
    assert not renewal_due(issued.not_after, now, before=datetime.timedelta(minutes=1))


def test_issuer_survives_ca_forgetting_its_account(
    tmp_path: Path, challenge_server: ChallengeServer, docker_dns: FakeDockerDNS
) -> None:
    # Pebble keeps no state across restarts: a restarted CA at the same URL no
    # longer knows the account URL the issuer cached, and answers accountDoesNotExist.
    port = free_port()
    issuer = None
    with Pebble(http_port=challenge_server.port, dns_port=docker_dns.port, port=port) as first:
        issuer = AcmeIssuer(first.directory_url, tmp_path / "k.pem", None, first.ca_bundle)
        _issue(issuer, challenge_server)
        old_account = issuer.account_url
    with Pebble(http_port=challenge_server.port, dns_port=docker_dns.port, port=port) as second:
        issuer.ca_bundle = second.ca_bundle  # new throwaway HTTPS identity per Pebble run
        issued = _issue(issuer, challenge_server)
        _verify_chain(issued.fullchain_pem, second.root_pem(), HOST)
    assert issuer.account_url and issuer.account_url != old_account
