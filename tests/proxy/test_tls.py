"""The HTTPS addon's hooks with mitmproxy's own ``TlsConfig`` (issue 13.16).

Handshakes are driven up to the point where mitmproxy has chosen the
certificate (``tls_clienthello``, ``tls_start_client``): the certificate
served is read from the pyOpenSSL connection, and the certificate store's
entries from ``CertStore.certs``, mitmproxy's public map of them.
"""

from __future__ import annotations

import asyncio
import datetime
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from mitmproxy import connection, exceptions, http, tls
from mitmproxy.addons import tlsconfig
from mitmproxy.proxy import context
from mitmproxy.proxy.layers.quic import QuicTlsData
from mitmproxy.test import taddons, tflow

from luma_proxy.models import Service, State
from luma_proxy.proxy import certificates
from luma_proxy.proxy.addon import LumaProxy
from luma_proxy.proxy.certificates import Loaded, PairCache, certs_dir, store_pair
from luma_proxy.proxy.tls import ALT_SVC, HSTS, INTERMEDIATE_CIPHERS, Https, due_orders
from luma_proxy.store.registry import Store
from tests.obs_util import flow_for
from tests.proxy.test_certificates import make_pair


@dataclass
class Bed:
    router: LumaProxy
    https: Https
    tlsconfig: tlsconfig.TlsConfig
    tctx: taddons.context
    state: Path
    certs: dict[str, x509.Certificate]

    def handshake(self, sni: str | None) -> tuple[x509.Certificate, connection.Client]:
        """The certificate a client sending ``sni`` gets, and its connection."""
        client = tflow.tclient_conn()
        client.sni = sni
        ctx = context.Context(client, self.tctx.options)
        self.https.tls_clienthello(tls.ClientHelloData(ctx, None))  # type: ignore[arg-type]
        data = tls.TlsData(client, ctx)
        self.https.tls_start_client(data)
        self.tlsconfig.tls_start_client(data)
        assert data.ssl_conn is not None
        served = data.ssl_conn.get_certificate()
        assert served is not None
        return served.to_cryptography(), client

    def entries(self) -> int:
        assert self.tlsconfig.certstore is not None
        return len(self.tlsconfig.certstore.certs)

    def answer(self, client: connection.Client | None, host: str,
               headers: dict[str, str] | None = None, status: int = 200) -> http.Response:
        """The response the client gets for a request with ``Host: host``."""
        f = flow_for(host)
        if client is not None:
            f.client_conn = client
        f.response = http.Response.make(status, b"", headers or {})
        self.https.responseheaders(f)
        assert f.response is not None
        return f.response

    def deploy(self, change: Any) -> None:
        Store(self.state).update(change)
        self.router.reload()
        refresh(self.https)


def refresh(https: Https) -> None:
    """One pass of the certificate loop (its reads run in a thread) from a synchronous test."""
    asyncio.run(https.refresh())


def service(host: str, **kw: Any) -> Service:
    return Service(name=host, host=host, target="127.0.0.9:3000", project="p", **kw)


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    state = tmp_path / "state" / "state.json"

    def add(s: State) -> None:
        for svc in (service("shop.test", cert_source="custom"),
                    service("quiet.test", cert_source="custom", hsts=False),
                    service("old.test", cert_source="custom"),
                    service("pending.test"), service("plain.test", ssl=False)):
            s.services[svc.host] = svc

    Store(state).update(add)
    certs = {}
    for host, days in (("shop.test", 90), ("quiet.test", 90), ("old.test", -1)):
        cert_pem, key_pem = make_pair([host], days=days)
        store_pair(certs_dir(str(state)), host, cert_pem, key_pem)
        certs[host] = x509.load_pem_x509_certificate(cert_pem)
    router, https, config = LumaProxy(), Https(LumaProxy()), tlsconfig.TlsConfig()
    https.router = router
    with taddons.context(router, https, config) as tctx:
        tctx.configure(config, confdir=str(tmp_path / "mitmproxy"))
        tctx.configure(router, luma_state=str(state))
        refresh(https)
        yield Bed(router, https, config, tctx, state, certs)


def placeholder(cert: x509.Certificate) -> bool:
    return "luma-proxy default" in cert.subject.rfc4514_string()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(host, thread id) of each read and parse of a pair (``certificates.load_pair``)."""
    calls: list[tuple[str, int]] = []
    real = certificates.load_pair

    def recording(root: Path, host: str, version: tuple[int, ...] | None = None
                  ) -> Loaded | None:
        calls.append((host, threading.get_ident()))
        return real(root, host, version)

    monkeypatch.setattr(certificates, "load_pair", recording)
    return calls


# ----------------------------------------------------- certificates from disk, off the loop


async def test_stored_certificates_are_served_from_the_first_handshake_then_read_in_a_thread(
        bed: Bed, reads: list[tuple[str, int]]) -> None:
    bed.https.configure({"luma_state"})  # as at start-up, before the listeners open
    assert sorted(host for host, _ in reads) == ["old.test", "quiet.test", "shop.test"]
    served, _ = bed.handshake("shop.test")
    assert served == bed.certs["shop.test"]  # a restart serves the host's own certificate
    reads.clear()
    await bed.https.refresh()  # the loop's passes: nothing changed, nothing parsed
    assert reads == []
    cert_pem, key_pem = make_pair(["shop.test"])
    store_pair(certs_dir(str(bed.state)), "shop.test", cert_pem, key_pem)
    await bed.https.refresh()
    assert [host for host, _ in reads] == ["shop.test"]
    assert all(thread != threading.get_ident() for _, thread in reads)  # off the loop
    served, _ = bed.handshake("shop.test")
    assert served == x509.load_pem_x509_certificate(cert_pem)


def test_a_pass_parses_again_only_the_certificates_that_changed(
        bed: Bed, reads: list[tuple[str, int]]) -> None:
    refresh(bed.https)
    assert reads == []  # nothing changed since the fixture's pass: statted only
    cert_pem, key_pem = make_pair(["shop.test"])
    store_pair(certs_dir(str(bed.state)), "shop.test", cert_pem, key_pem)
    refresh(bed.https)
    assert [host for host, _ in reads] == ["shop.test"]
    served, _ = bed.handshake("shop.test")
    assert served == x509.load_pem_x509_certificate(cert_pem)
    refresh(bed.https)
    assert len(reads) == 1


def test_orders_are_due_for_acme_hosts_without_a_valid_certificate(tmp_path: Path) -> None:
    at = datetime.datetime.now(datetime.UTC)
    services = {s.host: s for s in (
        service("new.test"), service("valid.test"), service("renew.test"),
        service("custom.test", cert_source="custom"), service("plain.test", ssl=False))}
    for host in ("valid.test", "renew.test", "custom.test"):
        store_pair(tmp_path, host, *make_pair([host]))
    pairs = PairCache(tmp_path)
    pairs.scan(services)
    assert [h for h, _ in due_orders(services, pairs, at)] == ["new.test"]
    # cert-renew: asked after the certificate was written.
    services["renew.test"] = service("renew.test", renew_requested_at=at
                                     + datetime.timedelta(seconds=5))
    assert [h for h, _ in due_orders(services, pairs, at)] == ["new.test", "renew.test"]
    # Within 30 days of expiry (or after 2/3 of its life): renewed.
    later = at + datetime.timedelta(days=61)
    assert [h for h, _ in due_orders(services, pairs, later)] == [
        "new.test", "valid.test", "renew.test"]


# ------------------------------------------------------------------ SNI and the store


def test_case_variants_of_an_sni_add_no_store_entries(bed: Bed) -> None:
    served, _ = bed.handshake("shop.test")
    assert served == bed.certs["shop.test"]
    entries = bed.entries()
    for sni in ("SHOP.test", "Shop.Test", "shop.TEST", "SHOP.TEST.", "shop.test."):
        served, _ = bed.handshake(sni)
        assert served == bed.certs["shop.test"], sni  # DNS names ignore case
    assert bed.entries() == entries
    # Unknown names in any spelling: the placeholder, and nothing stored either.
    for sni in ("unknown.test", "UNKNOWN.test", "Unknown.Test.", None):
        served, _ = bed.handshake(sni)
        assert "luma-proxy default" in served.subject.rfc4514_string(), sni
    assert bed.entries() == entries


def test_a_removed_host_leaves_the_store(bed: Bed) -> None:
    bed.handshake("shop.test")
    entries = bed.entries()
    bed.deploy(lambda s: s.services.pop("shop.test"))
    served, _ = bed.handshake("Shop.Test")
    assert "luma-proxy default" in served.subject.rfc4514_string()
    assert bed.entries() == entries - 1


# ------------------------------------------------------------------------------ HSTS


def test_hsts_on_answers_served_with_the_hosts_own_certificate(bed: Bed) -> None:
    _, client = bed.handshake("Shop.Test")
    assert bed.answer(client, "shop.test").headers[HSTS] == "max-age=31536000"
    assert bed.answer(client, "SHOP.test:443", status=503).headers[HSTS] == "max-age=31536000"
    # The app's own header is kept as it is.
    kept = bed.answer(client, "shop.test", {HSTS: "max-age=5; includeSubDomains"})
    assert kept.headers.get_all(HSTS) == ["max-age=5; includeSubDomains"]
    # Another Host on that connection (404 unknown, 421 another host): not for shop.test.
    assert HSTS not in bed.answer(client, "unknown.test", status=404).headers
    assert HSTS not in bed.answer(client, "quiet.test", status=421).headers


def test_no_hsts_without_an_active_certificate_of_the_host_or_when_off(bed: Bed) -> None:
    _, shop = bed.handshake("shop.test")
    assert HSTS in bed.answer(shop, "shop.test").headers
    assert HSTS not in bed.answer(None, "shop.test").headers  # plain HTTP
    _, quiet = bed.handshake("quiet.test")  # deploy --no-hsts
    assert HSTS not in bed.answer(quiet, "quiet.test").headers
    for host in ("pending.test", "plain.test", "unknown.test"):  # the placeholder served
        _, client = bed.handshake(host)
        assert HSTS not in bed.answer(client, host).headers, host
    _, old = bed.handshake("old.test")  # its own certificate, but expired
    assert HSTS not in bed.answer(old, "old.test").headers
    # Redeployed --no-ssl: not even on the connection opened while it had a certificate.
    bed.deploy(lambda s: s.services.update({"shop.test": service("shop.test", ssl=False)}))
    assert HSTS not in bed.answer(shop, "shop.test").headers


def test_hsts_max_age_follows_the_option(bed: Bed) -> None:
    _, client = bed.handshake("shop.test")
    bed.tctx.configure(bed.https, luma_hsts_max_age=600)
    assert bed.answer(client, "shop.test").headers[HSTS] == "max-age=600"
    bed.tctx.configure(bed.https, luma_hsts_max_age=0)
    assert HSTS not in bed.answer(client, "shop.test").headers
    with pytest.raises(exceptions.OptionsError, match="luma_hsts_max_age"):
        bed.tctx.configure(bed.https, luma_hsts_max_age=-1)


async def test_hsts_max_age_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUMA_PROXY_HSTS_MAX_AGE", "86400")
    https = Https(LumaProxy())
    with taddons.context(https) as tctx:
        assert tctx.options.luma_hsts_max_age == 86400
    monkeypatch.setenv("LUMA_PROXY_HSTS_MAX_AGE", "soon")
    https = Https(LumaProxy())
    with taddons.context(https) as tctx:
        assert tctx.options.luma_hsts_max_age == 31536000


# --------------------------------------------------------------- HTTP/3 (run --http3)


def quic_handshake(bed: Bed, sni: str | None) -> tuple[x509.Certificate, connection.Client]:
    """The certificate a QUIC client sending ``sni`` gets (HTTP/3), and its connection."""
    client = tflow.tclient_conn()
    client.transport_protocol = "udp"
    client.sni = sni
    client.alpn_offers = [b"h3"]
    ctx = context.Context(client, bed.tctx.options)
    bed.https.tls_clienthello(tls.ClientHelloData(ctx, None))  # type: ignore[arg-type]
    data = QuicTlsData(client, ctx)
    bed.https.quic_start_client(data)
    bed.tlsconfig.quic_start_client(data)  # raised KeyError on TLS 1.2 suite names
    assert data.settings is not None and data.settings.certificate is not None
    return data.settings.certificate, client


def test_quic_handshakes_get_the_hosts_certificate_as_tls_does(bed: Bed) -> None:
    served, client = quic_handshake(bed, "Shop.Test")
    assert served == bed.certs["shop.test"]
    assert client.mitmcert is not None and client.mitmcert.to_cryptography() == served
    entries = bed.entries()
    tcp_served, _ = bed.handshake("shop.test")
    assert tcp_served == served and bed.entries() == entries  # one store entry for both
    for sni in ("unknown.test", "pending.test", None):  # the placeholder, never mitmproxy's CA
        served, _ = quic_handshake(bed, sni)
        assert placeholder(served), sni


def test_the_tls12_suite_list_is_set_on_tcp_only(bed: Bed) -> None:
    """QUIC is TLS 1.3 only, and tlsconfig reads the list as aioquic suite names there."""
    _, tcp = bed.handshake("shop.test")
    assert tcp.cipher_list == list(INTERMEDIATE_CIPHERS)
    _, udp = quic_handshake(bed, "shop.test")
    assert udp.cipher_list == []


ALT_SVC_8443 = 'h3=":8443"; ma=86400'


def test_alt_svc_on_tcp_https_answers_with_the_hosts_own_certificate(bed: Bed) -> None:
    _, client = bed.handshake("shop.test")
    assert ALT_SVC not in bed.answer(client, "shop.test").headers  # HTTP/3 not served: none
    bed.tctx.configure(bed.https, luma_http3_port=8443)
    assert bed.answer(client, "shop.test").headers[ALT_SVC] == ALT_SVC_8443
    assert bed.answer(client, "shop.test", status=503).headers[ALT_SVC] == ALT_SVC_8443
    _, quiet = bed.handshake("quiet.test")  # --no-hsts says nothing about HTTP/3
    assert bed.answer(quiet, "quiet.test").headers[ALT_SVC] == ALT_SVC_8443
    # The app's own header is kept as it is.
    kept = bed.answer(client, "shop.test", {ALT_SVC: "clear"})
    assert kept.headers.get_all(ALT_SVC) == ["clear"]
    bed.tctx.configure(bed.https, luma_http3_port=0)
    assert ALT_SVC not in bed.answer(client, "shop.test").headers


def test_no_alt_svc_with_the_placeholder_on_plain_http_or_over_http3(bed: Bed) -> None:
    bed.tctx.configure(bed.https, luma_http3_port=8443)
    for host in ("pending.test", "plain.test", "unknown.test"):  # the placeholder served
        _, client = bed.handshake(host)
        assert ALT_SVC not in bed.answer(client, host).headers, host
    assert ALT_SVC not in bed.answer(None, "shop.test").headers  # plain HTTP
    _, quic = quic_handshake(bed, "shop.test")
    answer = bed.answer(quic, "shop.test")
    assert ALT_SVC not in answer.headers  # already on HTTP/3
    assert answer.headers[HSTS] == "max-age=31536000"  # HSTS alike over HTTP/3


def test_http3_port_option_is_checked(bed: Bed) -> None:
    with pytest.raises(exceptions.OptionsError, match="luma_http3_port"):
        bed.tctx.configure(bed.https, luma_http3_port=70000)
