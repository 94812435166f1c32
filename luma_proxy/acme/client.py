"""Blocking ACME (RFC 8555) HTTP-01 client plus pure certificate helpers.

The proxy runs `AcmeIssuer.issue` in a worker thread (``asyncio.to_thread``),
so everything here is synchronous and free of mitmproxy. The HTTP-01 response
itself is served by the proxy: `issue` only hands it ``(token, key_authorization)``
through the ``publish`` callback and takes it back with ``unpublish``.

Every failure of `issue` surfaces as a single `AcmeError` with a one-line
message, so callers can log it and schedule a retry (`certinfo.backoff_delay`)
without knowing anything about ``acme``/``requests``/``josepy`` exception types.

What a certificate says (expiry, names, key, renewal) is `certinfo`'s, imported
from there: the proxy imports this module only when it orders a certificate.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import josepy as jose
import requests
from acme import challenges, messages
from acme import errors as acme_errors
from acme.client import ClientNetwork, ClientV2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from luma_proxy.acme.certinfo import (
    certificate_covers,
    certificate_not_after,
    key_matches_certificate,
)
from luma_proxy.models import ip_literal, normalize_host
from luma_proxy.store.atomic import make_private_dir, write_atomic

__all__ = [
    "AcmeError",
    "AcmeIssuer",
    "IssuedCertificate",
    "load_or_create_account_key",
]

USER_AGENT = "luma-proxy-acme"
ACCOUNT_KEY_BITS = 2048
_MAX_MESSAGE = 400


class AcmeError(Exception):
    """The only exception `AcmeIssuer` lets escape; ``str()`` is one human-readable line."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """What a successful issuance yields: PEM chain (leaf first), PEM key, leaf expiry (UTC)."""

    fullchain_pem: bytes
    key_pem: bytes
    not_after: datetime.datetime


# --------------------------------------------------------------------------------------
# Account key
# --------------------------------------------------------------------------------------


def load_or_create_account_key(path: Path) -> jose.JWK:
    """Load the ACME account key at *path*, creating an RSA-2048 one if it does not exist.

    The account is identified by this key alone (RFC 8555 §7.3.1), so losing or
    replacing it means a new account; hence creation is atomic and never clobbers
    a key another process created first. New files are 0600, and a parent
    directory created here is 0700 (existing directories are left alone).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _create_account_key(path)
    except OSError as exc:
        raise AcmeError(f"cannot read ACME account key {path}: {_os_reason(exc)}") from exc
    _tighten_mode(path)
    return _jwk_from_pem(data, path)


def _create_account_key(path: Path) -> jose.JWK:
    key = rsa.generate_private_key(public_exponent=65537, key_size=ACCOUNT_KEY_BITS)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        make_private_dir(path.parent)
        if not write_atomic(path, pem, 0o600, exclusive=True):
            # Lost a creation race: the key on disk is the account, use it.
            return load_or_create_account_key(path)
    except OSError as exc:
        raise AcmeError(f"cannot create ACME account key {path}: {_os_reason(exc)}") from exc
    return jose.JWKRSA(key=key)


def _tighten_mode(path: Path) -> None:
    """A private key readable by group/others is a leak waiting to happen; fix it if we can."""
    with contextlib.suppress(OSError):
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, mode & 0o700)


def _jwk_from_pem(data: bytes, path: Path) -> jose.JWK:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise AcmeError(
            f"ACME account key {path} is not an unencrypted PEM private key: {exc}"
        ) from exc
    if isinstance(key, rsa.RSAPrivateKey):
        return jose.JWKRSA(key=key)
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _EC_ALGS:
        return jose.JWKEC(key=key)
    raise AcmeError(f"ACME account key {path} has unsupported type {type(key).__name__}")


_EC_ALGS = {"secp256r1": jose.ES256, "secp384r1": jose.ES384, "secp521r1": jose.ES512}


def _jws_alg(key: jose.JWK) -> jose.JWASignature:
    if isinstance(key, jose.JWKEC):
        curve = key.key.curve.name
        return _EC_ALGS[curve]
    return jose.RS256


# --------------------------------------------------------------------------------------
# Issuer
# --------------------------------------------------------------------------------------


class AcmeIssuer:
    """Obtains certificates for single host names from one ACME directory via HTTP-01.

    Thread-safe: each `issue` call uses its own HTTP session and nonce pool; only
    the directory and the account URL are shared (and looked up once). The
    account key is loaded (or created) lazily, on the first `issue`.
    """

    def __init__(
        self,
        directory_url: str,
        account_key_path: Path,
        email: str | None,
        ca_bundle: str | None = None,
        *,
        network_timeout: float = 30.0,
        user_agent: str = USER_AGENT,
    ) -> None:
        self.directory_url = directory_url
        self.account_key_path = Path(account_key_path)
        self.email = email or None
        self.ca_bundle = ca_bundle
        self.network_timeout = network_timeout
        self.user_agent = user_agent
        self._lock = threading.Lock()
        self._key: jose.JWK | None = None
        self._directory: messages.Directory | None = None
        self._account: messages.RegistrationResource | None = None

    @property
    def account_url(self) -> str | None:
        """URL of the ACME account once registered/looked up (None before the first issue)."""
        account = self._account
        return None if account is None else account.uri

    def issue(
        self,
        host: str,
        publish: Callable[[str, str], None],
        unpublish: Callable[[str], None],
        timeout: float = 90,
    ) -> IssuedCertificate:
        """Run one full order for *host* and return the certificate; blocks up to ~*timeout* s.

        ``publish(token, key_authorization)`` must make
        ``http://<host>/.well-known/acme-challenge/<token>`` answer with
        ``key_authorization`` before it returns; ``unpublish(token)`` is always
        called for every published token, success or not. Raises `AcmeError`.
        """
        name = _normalise_dns_name(host)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        try:
            try:
                return self._issue_once(name, publish, unpublish, deadline)
            except messages.Error as exc:
                if exc.code != "accountDoesNotExist" or self._account is None:
                    raise
                # The CA forgot our cached account (CA reset, account purged):
                # look it up / register again and retry once.
                self._forget_account()
                return self._issue_once(name, publish, unpublish, deadline)
        except AcmeError:
            raise
        except Exception as exc:
            raise AcmeError(
                f"ACME issuance for {name} failed: {self._describe(exc, timeout)}"
            ) from exc

    # -- steps ------------------------------------------------------------------------

    def _issue_once(
        self,
        host: str,
        publish: Callable[[str, str], None],
        unpublish: Callable[[str], None],
        deadline: datetime.datetime,
    ) -> IssuedCertificate:
        key = self._account_key()
        net = ClientNetwork(
            key,
            alg=_jws_alg(key),
            # requests' ``verify`` accepts a CA bundle path as well as a bool.
            verify_ssl=self.ca_bundle if self.ca_bundle else True,  # type: ignore[arg-type]
            user_agent=self.user_agent,
            timeout=self.network_timeout,  # type: ignore[arg-type]
        )
        try:
            client = ClientV2(self._get_directory(net), net)
            net.account = self._get_account(client)

            cert_key = ec.generate_private_key(ec.SECP256R1())
            order = client.new_order(_make_csr(host, cert_key))
            with self._published_challenges(client, order, publish, unpublish):
                order = client.poll_and_finalize(order, deadline=deadline)
        finally:
            net.session.close()

        if not order.fullchain_pem:
            raise AcmeError(f"ACME issuance for {host} failed: CA returned no certificate")
        fullchain = order.fullchain_pem.encode("ascii")
        key_pem = cert_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Never hand the proxy a certificate that would not serve this host.
        if not certificate_covers(fullchain, host):
            raise AcmeError(f"ACME issuance for {host} failed: issued certificate omits {host}")
        if not key_matches_certificate(fullchain, key_pem):
            raise AcmeError(f"ACME issuance for {host} failed: issued certificate has wrong key")
        return IssuedCertificate(
            fullchain_pem=fullchain,
            key_pem=key_pem,
            not_after=certificate_not_after(fullchain),
        )

    @contextlib.contextmanager
    def _published_challenges(
        self,
        client: ClientV2,
        order: messages.OrderResource,
        publish: Callable[[str, str], None],
        unpublish: Callable[[str], None],
    ) -> Iterator[None]:
        """Publish and answer the HTTP-01 challenge of every pending authorization."""
        published: list[str] = []
        try:
            for authzr in order.authorizations:
                status = authzr.body.status
                if status == messages.STATUS_VALID:
                    continue  # reused authorization, nothing to prove
                ident = authzr.body.identifier.value
                if status != messages.STATUS_PENDING:
                    raise AcmeError(f"ACME authorization for {ident} is {status}")
                challb = next(
                    (c for c in authzr.body.challenges if isinstance(c.chall, challenges.HTTP01)),
                    None,
                )
                if challb is None:
                    raise AcmeError(f"ACME CA offered no http-01 challenge for {ident}")
                response, key_authorization = challb.response_and_validation(client.net.key)
                token = challb.chall.encode("token")
                publish(token, key_authorization)
                published.append(token)
                client.answer_challenge(challb, response)
            yield
        finally:
            for token in published:
                with contextlib.suppress(Exception):
                    unpublish(token)

    def _account_key(self) -> jose.JWK:
        with self._lock:
            if self._key is None:
                self._key = load_or_create_account_key(self.account_key_path)
            return self._key

    def _get_directory(self, net: ClientNetwork) -> messages.Directory:
        with self._lock:
            directory = self._directory
        if directory is None:
            directory = ClientV2.get_directory(self.directory_url, net)
            with self._lock:
                self._directory = directory
        return directory

    def _get_account(self, client: ClientV2) -> messages.RegistrationResource:
        """Register (agreeing to the ToS) or, if the key already has an account, reuse it."""
        with self._lock:
            if self._account is not None:
                return self._account
            if client.external_account_required():
                raise AcmeError(
                    f"ACME CA {self.directory_url} requires external account binding "
                    "(not supported)"
                )
            new_reg = messages.NewRegistration.from_data(
                email=self.email, terms_of_service_agreed=True
            )
            try:
                account = client.new_account(new_reg)
            except acme_errors.ConflictError as exc:
                # RFC 8555 §7.3.1: the key is already registered; the Location
                # header names the existing account, which we adopt as-is.
                account = messages.RegistrationResource(
                    body=messages.Registration(), uri=exc.location
                )
            self._account = account
            return account

    def _forget_account(self) -> None:
        with self._lock:
            self._account = None
            self._directory = None

    # -- error text -------------------------------------------------------------------

    def _describe(self, exc: BaseException, timeout: float) -> str:
        """Turn any library exception into a short reason (without the 'failed:' prefix)."""
        if isinstance(exc, requests.exceptions.SSLError):
            return f"TLS error talking to {_request_url(exc, self.directory_url)}: " + (
                _root_reason(exc)
            )
        if isinstance(exc, requests.exceptions.Timeout):
            return f"timed out talking to {_request_url(exc, self.directory_url)}"
        if isinstance(exc, requests.exceptions.ConnectionError):
            return f"cannot connect to {_request_url(exc, self.directory_url)}: " + (
                _root_reason(exc)
            )
        if isinstance(exc, requests.exceptions.RequestException):
            return f"HTTP error talking to {_request_url(exc, self.directory_url)}: {exc}"
        if isinstance(exc, acme_errors.ValidationError):
            return "challenge failed: " + "; ".join(
                _describe_problem(chall.error)
                for authzr in exc.failed_authzrs
                for chall in authzr.body.challenges
                if chall.error is not None
            )
        if isinstance(exc, acme_errors.TimeoutError):
            return f"timed out after {timeout:g}s waiting for the CA to validate and issue"
        if isinstance(exc, acme_errors.IssuanceError):
            return "CA refused to issue: " + _describe_problem(exc.error)
        if isinstance(exc, messages.Error):
            return _describe_problem(exc)
        if isinstance(exc, acme_errors.ClientError) and exc.args:
            first = exc.args[0]
            if isinstance(first, requests.Response):
                return f"unexpected HTTP {first.status_code} from {first.url}"
        if isinstance(exc, jose.DeserializationError):
            return f"malformed response from the CA ({exc})"
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _describe_problem(problem: messages.Error | None) -> str:
    """'detail (code)' for an RFC 7807 problem document, e.g. 'Connection refused (connection)'."""
    if problem is None:
        return "unknown error"
    text = problem.detail or problem.title or problem.description or "no detail"
    code = problem.code or problem.typ
    if problem.identifier is not None:
        text = f"{problem.identifier.value}: {text}"
    return f"{text} ({code})" if code and code != "about:blank" else text


def _request_url(exc: requests.exceptions.RequestException, default: str) -> str:
    request = exc.request
    url = getattr(request, "url", None)
    return str(url) if url else default


def _root_reason(exc: BaseException) -> str:
    """Dig through requests/urllib3 wrappers for the socket/TLS error underneath."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    best: BaseException | None = None
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        module = type(current).__module__
        if not module.startswith(("requests", "urllib3")):
            best = current
        for nxt in (
            getattr(current, "reason", None),
            current.__cause__,
            current.__context__,
            *current.args,
        ):
            if isinstance(nxt, BaseException):
                stack.append(nxt)
    if best is None:
        text = str(exc)
        return re.sub(r"<[^>]* object at 0x[0-9a-f]+>:?\s*", "", text) or type(exc).__name__
    if isinstance(best, OSError):
        return _os_reason(best)
    return str(best) or type(best).__name__


def _os_reason(exc: OSError) -> str:
    verify_message = getattr(exc, "verify_message", None)
    if verify_message:
        return f"certificate verify failed: {verify_message}"
    if exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 1] + "…"
    return text


# --------------------------------------------------------------------------------------
# Names, CSR
# --------------------------------------------------------------------------------------


def _normalise_dns_name(host: str) -> str:
    """``normalize_host``'s form of *host*; AcmeError for what HTTP-01 cannot prove."""
    if not host.strip():
        raise AcmeError("ACME issuance needs a host name, got an empty string")
    if "*" in host:
        raise AcmeError(f"ACME HTTP-01 cannot issue wildcard names ({host!r})")
    try:
        name = normalize_host(host)
    except ValueError as exc:
        raise AcmeError(f"invalid host name {host!r} for ACME issuance") from exc
    if ip_literal(name) is not None:
        raise AcmeError(f"ACME issuance is for DNS names, not IP addresses ({host!r})")
    return name


def _make_csr(host: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)
