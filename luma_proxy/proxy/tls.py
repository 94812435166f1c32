"""HTTPS: certificates per SNI, ACME HTTP-01 issuance and renewal, HTTP->HTTPS redirects.

An addon placed before the routing addon: it answers ACME challenges for any
host (before routing could 404 them), redirects plain HTTP to HTTPS for ssl
hosts *once their certificate is active*, hands mitmproxy's TLS layer the
right certificate for each SNI (TLS over TCP, and QUIC for HTTP/3), and adds
``Strict-Transport-Security`` (and, with ``run --http3``, ``Alt-Svc``) to the
HTTPS answers of a host served with its own certificate. Issuance runs in a
background task, one ACME order per host at a time, with backoff on failure;
it never blocks requests.

Certificates written by another process (the CLI, the leader worker) are taken
in every second: the files are statted, and only the changed ones read and
parsed, in a thread (``certificates.PairCache``); the event loop swaps in the
hosts that changed. Start-up does not wait for them either: until a host's
certificate has been read, its handshakes get the placeholder, as a host whose
certificate is not issued yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mitmproxy import ctx, exceptions, http, tls

from luma_proxy.acme.certinfo import backoff_delay
from luma_proxy.environ import env_float, env_int
from luma_proxy.models import Service, Settings, is_wildcard, now
from luma_proxy.proxy import certificates as c
from luma_proxy.proxy import engine_patches
from luma_proxy.proxy.flowinfo import append_header, header_values, host_header
from luma_proxy.routing.router import HostTable, canonical_target
from luma_proxy.runtime.gcpolicy import settle
from luma_proxy.store.paths import ACCOUNT_KEY

if TYPE_CHECKING:
    from types import ModuleType

    from luma_proxy.acme.client import AcmeIssuer

CHALLENGE_PREFIX = c.CHALLENGE_PREFIX.encode()  # matched on the raw path: no decoding

logger = logging.getLogger("luma_proxy.proxy.tls")

TICK = 1.0
# Mozilla "intermediate" TLS 1.2 suites: forward-secret key exchange, AEAD only,
# in the server's order of preference (mitmproxy sets OP_CIPHER_SERVER_PREFERENCE).
# TLS 1.3 suites are all of that kind; TLS 1.2 is mitmproxy's minimum already.
INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
)
MAX_PARALLEL_ORDERS = 4
HSTS = "Strict-Transport-Security"
HSTS_MAX_AGE = 31536000  # one year: the usual value, and what preload lists ask for
ALT_SVC = "Alt-Svc"
ALT_SVC_MAX_AGE = 86400  # a day: how long a client may remember that HTTP/3 is offered


def redirect_location(host_header: str, path: str, https_port: int) -> str:
    """``https://`` + the requested host (its port replaced) + the path and query."""
    host = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
    if host_header.startswith("[") and "]:" in host_header:
        host = host_header.rsplit(":", 1)[0]
    port = "" if https_port == 443 else f":{https_port}"
    return f"https://{host}{port}{path}"


def wants_certificate(service: Service, loaded: c.Loaded | None, at: datetime.datetime) -> bool:
    """An ACME order is due: none yet, renewal window reached, or renewal asked for."""
    if not service.ssl or service.cert_source != "acme":
        return False
    if loaded is None or loaded.due(at):
        return True
    requested = service.renew_requested_at
    issued = datetime.datetime.fromtimestamp(loaded.mtime_ns / 1e9, datetime.UTC)
    return requested is not None and requested > issued


def due_orders(services: Mapping[str, Service], pairs: c.PairCache,
               at: datetime.datetime) -> list[tuple[str, Service]]:
    """The services ``wants_certificate`` says need an order, as far as ``pairs`` has read.

    Runs in a thread with the certificate pass: a look at every service, so that
    the event loop only looks at those.
    """
    return [(host, service) for host, service in services.items()
            if service.ssl and service.cert_source == "acme" and not is_wildcard(host)
            and wants_certificate(service, pairs.loaded(host), at)]


def _import_acme() -> ModuleType:
    from luma_proxy.acme import client as acme_client  # ~6 MiB, a few hundred ms: once

    return acme_client


class Router(Protocol):
    """What HTTPS needs of the routing addon (``addon.LumaProxy``): the hosts, the
    settings, and whether this process orders certificates (the leader)."""

    table: HostTable
    settings: Settings

    def is_leader(self) -> bool: ...

    def on_leadership(self, listener: Callable[[bool], None]) -> None: ...


def misdirected(router: Router, sni: str | None, host: str | None) -> bool:
    """The TLS SNI and ``Host`` name two different configured hosts: RFC 9110's 421.

    A connection opened for one service (its certificate, its TLS) must not carry
    requests for another. An SNI or a Host naming no configured host is left to
    routing (404 for an unknown Host), which serves no other host's content either.
    """
    if not sni:
        return False
    table = router.table
    named, asked = table.canonical(sni), table.canonical(host or "")
    if named is None or asked is None or named == asked:
        return False
    by_sni, by_host = table.route_of_host(named), table.route_of_host(asked)
    return by_sni is not None and by_host is not None and by_sni.host != by_host.host


class Https:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.loaded: dict[str, c.Loaded] = {}
        self.challenges: dict[str, str] = {}
        self.fallback = c.fallback_entry()
        self.root: Path | None = None
        self.pairs: c.PairCache | None = None  # what is on disk, read in a thread
        self._due: list[tuple[str, Service]] = []  # of the last pass: candidates for orders
        self.https_port = 0
        self._attempts: dict[str, int] = {}
        self._next_attempt: dict[str, float] = {}
        self._orders: dict[str, asyncio.Task[None]] = {}
        self._issuer: AcmeIssuer | None = None
        self._issuer_key: tuple | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.hsts = f"max-age={HSTS_MAX_AGE}"  # the header's value; "" when off
        self.alt_svc = ""  # the Alt-Svc value; "" when HTTP/3 is not served

    def load(self, loader: Any) -> None:
        loader.add_option("luma_https_port", int, 0,
                          "Port HTTPS is served on; plain HTTP to ssl hosts with an active "
                          "certificate is redirected there. 0: no HTTPS, no redirects.")
        loader.add_option("luma_acme_directory", str,
                          os.environ.get("LUMA_PROXY_ACME_DIRECTORY", ""),
                          "ACME directory URL (default: Let's Encrypt, or its staging "
                          "server after `luma-proxy set-staging --enabled true`).")
        loader.add_option("luma_acme_email", str, os.environ.get("LUMA_PROXY_ACME_EMAIL", ""),
                          "Contact e-mail for the ACME account (optional).")
        loader.add_option("luma_acme_ca_bundle", str,
                          os.environ.get("LUMA_PROXY_ACME_CA_BUNDLE", ""),
                          "CA bundle to verify the ACME server's HTTPS with (default: system).")
        loader.add_option("luma_acme_retry", float, env_float("LUMA_PROXY_ACME_RETRY", 60.0),
                          "Seconds before the first retry of a failed ACME order (doubles, "
                          "up to 1 h).")
        loader.add_option("luma_hsts_max_age", int,
                          env_int("LUMA_PROXY_HSTS_MAX_AGE", HSTS_MAX_AGE),
                          "max-age (seconds) of the Strict-Transport-Security header on the "
                          "HTTPS answers of ssl hosts served with their own certificate; "
                          "0: never sent.")
        loader.add_option("luma_http3_port", int, 0,
                          "UDP port HTTP/3 (QUIC) is served on, advertised with Alt-Svc on "
                          "the HTTPS answers of hosts served with their own certificate; "
                          "0: not served (run --http3 sets it to the HTTPS port).")

    def configure(self, updated: set[str]) -> None:
        if "luma_state" in updated:
            self.root = c.certs_dir(ctx.options.luma_state)
            self.pairs = c.PairCache(self.root)
            self.loaded, self._due = {}, []
            # The pairs on disk, read before the listeners open (the routes are not
            # known yet: every host directory): the first handshake after a restart gets
            # the host's own certificate. Only parsing, once; later passes run in a thread.
            self._take(self.pairs, self.pairs.scan(c.stored_hosts(self.root)))
            self._wake.set()  # the loop's first pass: what the routes want, in a thread
        if "luma_https_port" in updated:
            self.https_port = ctx.options.luma_https_port
        if "luma_hsts_max_age" in updated:
            age = ctx.options.luma_hsts_max_age
            if age < 0:
                raise exceptions.OptionsError(
                    f"luma_hsts_max_age must be 0 (off) or more seconds, not {age}")
            self.hsts = f"max-age={age}" if age else ""
        if "luma_http3_port" in updated:
            port = ctx.options.luma_http3_port
            if not 0 <= port <= 65535:
                raise exceptions.OptionsError(
                    f"luma_http3_port must be 0 (off) or a port, not {port}")
            self.alt_svc = f'h3=":{port}"; ma={ALT_SVC_MAX_AGE}' if port else ""
            if port and not engine_patches.install_http3() and not __debug__:
                logger.warning("HTTP/3: mitmproxy's QUIC ClientHello parser has no source "
                               "to recompile; QUIC handshakes fail under -O: set "
                               "LUMA_PROXY_OPTIMIZE=0")

    def running(self) -> None:
        self._wake = asyncio.Event()
        self.router.on_leadership(lambda _leading: self._wake.set())  # a new leader orders now
        self._task = asyncio.create_task(self._loop(), name="luma certificates")

    def done(self) -> None:
        if self._task:
            self._task.cancel()
        for task in self._orders.values():
            task.cancel()

    # ------------------------------------------------------------ requests
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        if request.data.path.startswith(CHALLENGE_PREFIX):
            path = request.path
            self._answer_challenge(flow, path[len(c.CHALLENGE_PREFIX):].split("?", 1)[0])
            return
        if flow.client_conn.tls_established:
            if misdirected(self.router, flow.client_conn.sni, host_header(request)):
                flow.response = http.Response.make(421, b"Misdirected Request\n",
                                                   {"Content-Type": "text/plain"})
            return
        if self.https_port:
            host = host_header(request)
            found = self.router.table.lookup(host, request.data.path)  # decoded if it must be
            if isinstance(found, Service) and found.ssl and self.active(found.host):
                # One hop to the canonical host's HTTPS address when it has one.
                location = redirect_location(canonical_target(found, host) or host
                                             or found.host, request.path, self.https_port)
                flow.response = http.Response.make(301, b"", {"Location": location,
                                                              "Content-Length": "0"})

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """HSTS on an HTTPS answer for the host whose own, active certificate served it.

        Only then can a browser keep to HTTPS for that host: sent with the
        placeholder certificate (pending, unknown SNI) or on plain HTTP it
        would lock users out or be ignored. Every answer for that host counts,
        the proxy's own (503, 413...) included; an answer for another Host on
        the connection (404, 421) does not. A header the app sent is kept.
        With ``run --http3``, Alt-Svc too (``_advertise_http3``).
        """
        cert = flow.client_conn.mitmcert  # set by tls_start_client; None on plain HTTP
        if cert is None or cert is self.fallback.cert:
            return
        if self.alt_svc:
            self._advertise_http3(flow)
        if not self.hsts:
            return
        host = flow.client_conn.sni  # canonical (tls_clienthello)
        service = self.router.table.route_of_host(host) if host else None
        if service is None or not service.ssl or not service.hsts or not self.active(
                service.host):
            return
        response = flow.response
        if (response is None or self.router.table.canonical(host_header(flow.request) or "")
                != host or header_values(response.headers, HSTS)):
            return
        append_header(response.headers, HSTS, self.hsts)

    def _advertise_http3(self, flow: http.HTTPFlow) -> None:
        """``Alt-Svc: h3=":PORT"`` on an answer over TLS on TCP (HTTP/1.1, HTTP/2).

        Only with the host's own certificate (the caller checks): a client that
        cannot verify the placeholder gains nothing from QUIC either. Not on an
        HTTP/3 answer (the client is there already). A header the app sent is kept.
        """
        response = flow.response
        if (response is not None and flow.client_conn.transport_protocol == "tcp"
                and ALT_SVC not in response.headers):
            response.headers[ALT_SVC] = self.alt_svc

    def _answer_challenge(self, flow: http.HTTPFlow, token: str) -> None:
        answer = self.challenges.get(token)
        if answer is None and self.root is not None and c.valid_token(token):
            with contextlib.suppress(OSError):
                answer = c.challenge_file(self.root, token).read_text()
        if answer is None:
            flow.response = http.Response.make(404, b"", {"Content-Type": "text/plain"})
        else:
            flow.response = http.Response.make(200, answer.encode(),
                                               {"Content-Type": "text/plain"})

    def active(self, host: str) -> bool:
        loaded = self.loaded.get(host)
        return loaded is not None and loaded.not_after > now()

    # ------------------------------------------------------------- TLS
    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """Only the intermediate suites, unless the operator set ``ciphers_client``.

        Set on the connection before mitmproxy's tlsconfig builds its context from it.
        Not on QUIC (HTTP/3): it is TLS 1.3 only, and tlsconfig reads the list as
        aioquic suite names there, where these OpenSSL names fail every handshake.
        """
        client = data.context.client
        if client.sni and (host := self.router.table.canonical(client.sni)):
            client.sni = host  # one spelling: the certificate store keeps one entry per host
        if (not client.cipher_list and not ctx.options.ciphers_client
                and client.transport_protocol == "tcp"):
            client.cipher_list = list(INTERMEDIATE_CIPHERS)

    def tls_start_client(self, data: tls.TlsData) -> None:
        """Put this SNI's certificate where mitmproxy's TLS layer looks first.

        Unknown SNI (or none) gets the fallback certificate, registered under
        "*" so mitmproxy never mints one with its own CA. The store holds one
        entry per configured host served (the SNI is canonical by now), and
        ``client.mitmcert`` says which certificate this connection got (HSTS).
        """
        certs = engine_patches.certificate_entries()
        if certs is None:
            return
        if certs.get("*") is not self.fallback:
            certs["*"] = self.fallback
        client = data.context.client
        sni = client.sni
        host = self.router.table.canonical(sni) if sni else None
        route = self.router.table.route_of_host(host) if host else None
        loaded = self.loaded.get(route.host) if route is not None and route.ssl else None
        if loaded is None:
            if sni and sni != "*":
                certs.pop(sni, None)  # a removed host's certificate is not served
            client.mitmcert = self.fallback.cert
            return
        if loaded.entry is not certs.get(sni):
            certs[sni] = loaded.entry
        client.mitmcert = loaded.entry.cert

    # A QUIC handshake (HTTP/3): the same certificate from the same store; tlsconfig's
    # quic_start_client looks it up as its tls_start_client does (QuicTlsData is a TlsData).
    quic_start_client = tls_start_client

    # ------------------------------------------------- background: certificates
    async def refresh(self) -> None:
        """Take in certificates written by another process (a leader worker, the CLI).

        The stat of every ssl host's files, and the reading and parsing of those
        that changed, happen in a thread; here only the hosts that changed are
        swapped in. The services dict is never modified in place (``HostTable``),
        so the thread may read the one it was given.
        """
        pairs = self.pairs
        if pairs is None:
            return
        services = self.router.table.hosts
        leading = self.router.is_leader()
        scan, due = await asyncio.to_thread(self._survey, pairs, services, leading)
        if pairs is not self.pairs:  # the state moved meanwhile: the next pass reads it
            return
        self._take(pairs, scan)
        self._due = due
        for host in [h for h in self._next_attempt if h not in services]:
            self._attempts.pop(host, None)  # a removed host's failed orders are forgotten
            self._next_attempt.pop(host, None)

    @staticmethod
    def _survey(pairs: c.PairCache, services: Mapping[str, Service], leading: bool,
                ) -> tuple[c.Scan, list[tuple[str, Service]]]:
        """In a thread: the certificates that changed, and (leader) the orders due."""
        scan = pairs.scan(host for host, service in services.items() if service.ssl)
        return scan, due_orders(services, pairs, now()) if leading else []

    def _take(self, pairs: c.PairCache, scan: c.Scan) -> None:
        """On the loop: O(hosts that changed)."""
        loaded = self.loaded
        for host in scan.gone:
            loaded.pop(host, None)
        for host, pair in scan.loaded.items():
            if pairs.version(host) == pair.version:  # not overtaken by a later read
                loaded[host] = pair
        settle(len(scan.loaded))  # 2,000 certificates read at once: out of full GC passes

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
                if self.router.is_leader():
                    self._start_due_orders()
            except Exception:
                logger.exception("certificate check failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK)
            self._wake.clear()

    def _start_due_orders(self) -> None:
        """Order for the candidates of the last pass still deployed as they were then."""
        at = now()
        clock = asyncio.get_running_loop().time()
        services = self.router.table.hosts
        for host, service in self._due:
            if host in self._orders or self._next_attempt.get(host, 0) > clock:
                continue
            if len(self._orders) >= MAX_PARALLEL_ORDERS:
                return
            if services.get(host) is not service:
                continue  # redeployed or removed since the pass: the next one decides
            if wants_certificate(service, self.loaded.get(host), at):
                task = asyncio.create_task(self._order(host), name=f"acme {host}")
                self._orders[host] = task
                task.add_done_callback(lambda _t, h=host: self._orders.pop(h, None))

    def issuer(self) -> AcmeIssuer:
        from luma_proxy.acme.client import AcmeIssuer  # ~6 MiB: only once a certificate is ordered

        assert self.root is not None
        opts = ctx.options
        staging = self.router.settings.acme_staging
        url = c.directory_url(opts.luma_acme_directory or self.router.settings.acme_directory
                              or "", staging)
        email = opts.luma_acme_email or self.router.settings.acme_email or None
        key = (url, email, opts.luma_acme_ca_bundle)
        if self._issuer is None or self._issuer_key != key:
            self._issuer = AcmeIssuer(url, self.root / ACCOUNT_KEY, email,
                                      opts.luma_acme_ca_bundle or None)
            self._issuer_key = key
        return self._issuer

    async def _order(self, host: str) -> None:
        acme = await asyncio.to_thread(_import_acme)
        assert self.root is not None and self.pairs is not None
        root, pairs = self.root, self.pairs
        previous = await asyncio.to_thread(c.read_status, root, host) or c.CertStatus()
        logger.info("certificate: ordering one for %s from %s", host,
                    self.issuer().directory_url)
        try:
            issued = await asyncio.to_thread(self.issuer().issue, host, self._publish,
                                             self._unpublish)
            await asyncio.to_thread(c.store_pair, root, host, issued.fullchain_pem,
                                    issued.key_pem)
        except (acme.AcmeError, OSError) as e:
            error = str(e) if isinstance(e, acme.AcmeError) else (
                f"cannot write the certificate of {host} under {root}: {e.strerror}")
            attempt = self._attempts.get(host, 0)
            delay = backoff_delay(attempt, base=ctx.options.luma_acme_retry)
            self._attempts[host] = attempt + 1
            self._next_attempt[host] = asyncio.get_running_loop().time() + delay
            status = previous.model_copy(update={
                "state": "failed" if host not in self.loaded else "active",
                "last_error": error, "attempts": attempt + 1,
                "next_attempt_at": now() + datetime.timedelta(seconds=delay)})
            logger.warning("certificate: %s; retrying in %.0fs", error, delay)
        else:
            self._attempts.pop(host, None)
            self._next_attempt.pop(host, None)
            loaded = await asyncio.to_thread(pairs.load, host)
            if loaded is not None and pairs is self.pairs \
                    and pairs.version(host) == loaded.version:
                self.loaded[host] = loaded
            status = c.CertStatus(state="active", source="acme", not_after=issued.not_after,
                                  issued_at=now(), attempts=0)
            logger.info("certificate: issued for %s, valid until %s", host,
                        issued.not_after.isoformat())
        try:
            await asyncio.to_thread(c.write_status, root, host, status)
        except OSError as e:  # the line above already said what failed; say this once too
            logger.error("certificate: cannot write the status of %s under %s: %s",
                         host, root, e.strerror)

    def _publish(self, token: str, key_authorization: str) -> None:
        """Called from the ACME thread: make the answer visible to every worker."""
        self.challenges[token] = key_authorization
        assert self.root is not None
        c.write_private(c.challenge_file(self.root, token), key_authorization.encode(), 0o644)

    def _unpublish(self, token: str) -> None:
        self.challenges.pop(token, None)
        if self.root is not None:
            with contextlib.suppress(OSError):
                c.challenge_file(self.root, token).unlink()

    def expiry(self) -> dict[str, float]:
        """host -> not_after (unix time), for the metrics."""
        return {h: loaded.not_after.timestamp() for h, loaded in self.loaded.items()}
