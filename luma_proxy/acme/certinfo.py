"""What a certificate says, and when to renew or retry: pure functions.

Apart from ``acme_client`` (which needs the ``acme``/``josepy`` libraries, about
6 MiB of memory, imported only when a certificate is ordered): the proxy checks
expiry, names and key pairs of every stored certificate without them.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from luma_proxy.models import ip_literal, normalize_host

RENEW_BEFORE = datetime.timedelta(days=30)
BACKOFF_BASE_SECONDS = 60.0
BACKOFF_CAP_SECONDS = 3600.0

def _leaf(pem: bytes) -> x509.Certificate:
    """First certificate of a PEM bundle: by convention (and ACME's) the leaf."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ValueError(f"invalid PEM certificate: {exc}") from exc
    if not certs:
        raise ValueError("no PEM certificate found")
    return certs[0]


def certificate_not_after(pem: bytes) -> datetime.datetime:
    """Expiry (timezone-aware UTC) of the leaf, i.e. the first certificate in *pem*."""
    return _leaf(pem).not_valid_after_utc


def certificate_covers(pem: bytes, host: str) -> bool:
    """Does the leaf's subjectAltName cover *host*? Like browsers and Go, CN is ignored.

    DNS names compare case-insensitively in IDNA form; a ``*.`` wildcard matches
    exactly one leftmost label (``*.example.com`` covers ``a.example.com`` but not
    ``example.com`` or ``a.b.example.com``). IP hosts match IP SAN entries.
    """
    try:
        san = _leaf(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    if host.startswith("*."):  # a wildcard route needs the same wildcard in the SAN
        return any(p.strip().rstrip(".").lower() == host
                   for p in san.get_values_for_type(x509.DNSName))
    ip = ip_literal(host)  # also a bare IPv6 address, which normalize_host refuses
    if ip is None:
        try:
            name = normalize_host(host)  # the registry's spelling: case, IDNA, dot, port
        except ValueError:
            return False
        ip = ip_literal(name)
    if ip is not None:
        return ip in san.get_values_for_type(x509.IPAddress)
    labels = name.split(".")
    for pattern in san.get_values_for_type(x509.DNSName):
        # A SAN pattern, not a host (it may hold "*"): compared as it is, case aside.
        pattern_labels = pattern.strip().rstrip(".").lower().split(".")
        if len(pattern_labels) != len(labels):
            continue
        first, *rest = pattern_labels
        if rest != labels[1:]:
            continue
        if first == labels[0] or (first == "*" and rest):
            return True
    return False


def key_matches_certificate(cert_pem: bytes, key_pem: bytes) -> bool:
    """Is *key_pem* the private key of the leaf in *cert_pem*? (Catches swapped uploads.)"""
    cert = _leaf(cert_pem)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as exc:  # encrypted key, no password
        raise ValueError(f"private key cannot be used: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"invalid PEM private key: {exc}") from exc
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def renewal_due(
    not_after: datetime.datetime,
    now: datetime.datetime,
    not_before: datetime.datetime | None = None,
    before: datetime.timedelta = RENEW_BEFORE,
) -> bool:
    """Renew *before* expiry (30 days), or after 2/3 of a shorter lifetime. Naive means UTC.

    The second rule keeps short-lived certificates (a test CA's, or future
    short-lived public ones) from being renewed in a loop.
    """
    if not_before is not None:
        before = min(before, (_as_utc(not_after) - _as_utc(not_before)) / 3)
    return _as_utc(not_after) - _as_utc(now) <= before


def _as_utc(moment: datetime.datetime) -> datetime.datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=datetime.UTC)
    return moment.astimezone(datetime.UTC)


def backoff_delay(
    attempt: int,
    base: float = BACKOFF_BASE_SECONDS,
    cap: float = BACKOFF_CAP_SECONDS,
) -> float:
    """Seconds to wait before retry number *attempt* (0-based): base·2^attempt, at most cap.

    Failed issuances must back off hard: CAs rate-limit failed validations
    (Let's Encrypt: 5 per hour per host per account).
    """
    if attempt <= 0:
        return min(base, cap)
    if attempt >= 64:  # 2**attempt would only be clamped anyway
        return cap
    return min(base * float(2**attempt), cap)
