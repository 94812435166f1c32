"""Unit tests for the pure parts of luma_proxy.acme.client (no network, self-made certs)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import josepy as jose
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from luma_proxy.acme.certinfo import (
    backoff_delay,
    certificate_covers,
    certificate_not_after,
    key_matches_certificate,
    renewal_due,
)
from luma_proxy.acme.client import AcmeError, AcmeIssuer, load_or_create_account_key

UTC = datetime.UTC
NOT_AFTER = datetime.datetime(2031, 5, 17, 12, 30, 0, tzinfo=UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, password: bytes | None = None):
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _cert(
    dns_names: Sequence[str] = (),
    *,
    ips: Sequence[str] = (),
    cn: str = "ignored.example",
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    not_after: datetime.datetime = NOT_AFTER,
    san: bool = True,
) -> tuple[bytes, bytes]:
    """Self-signed certificate PEM and its key PEM."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - datetime.timedelta(days=90))
        .not_valid_after(not_after)
    )
    if san:
        entries: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        entries += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(entries), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


# -- certificate_not_after --------------------------------------------------------------


def test_not_after_is_leaf_expiry_in_utc() -> None:
    leaf, _ = _cert(["a.test"], not_after=NOT_AFTER)
    other, _ = _cert(["b.test"], not_after=NOT_AFTER + datetime.timedelta(days=400))
    got = certificate_not_after(leaf + other)  # chain: the first one counts
    assert got == NOT_AFTER
    assert got.utcoffset() == datetime.timedelta(0)


@pytest.mark.parametrize("pem", [b"", b"not a pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n"])
def test_not_after_rejects_garbage(pem: bytes) -> None:
    with pytest.raises(ValueError):
        certificate_not_after(pem)


# -- certificate_covers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("sans", "host", "expected"),
    [
        (["blog.test"], "blog.test", True),
        (["blog.test"], "BLOG.Test", True),
        (["Blog.TEST"], "blog.test", True),
        (["blog.test"], "blog.test.", True),
        (["blog.test"], "www.blog.test", False),
        (["blog.test"], "log.test", False),
        (["*.blog.test"], "www.blog.test", True),
        (["*.blog.test"], "WWW.BLOG.TEST", True),
        (["*.blog.test"], "blog.test", False),  # wildcard does not cover the apex
        (["*.blog.test"], "a.b.blog.test", False),  # only one label
        (["*.test"], "blog.test", True),
        (["*"], "localhost", False),  # a bare "*" matches nothing
        (["w*.blog.test"], "www.blog.test", False),  # partial wildcards are not honoured
        (["a.test", "blog.test"], "blog.test", True),
        (["xn--bcher-kva.test"], "bücher.test", True),  # IDN host vs A-label SAN
        ([], "", False),
        # The host goes through models.normalize_host, as the registry's hosts do.
        (["blog.test"], "  Blog.Test.  ", True),
        (["blog.test"], "blog.test:443", True),  # a Host header's port is not the name
        (["xn--bcher-kva.test"], "BÜCHER.test.", True),
        (["blog.test"], "blog .test", False),
        (["blog_x.test"], "blog_x.test", False),  # not a host name
    ],
)
def test_covers_dns_names(sans: list[str], host: str, expected: bool) -> None:
    pem, _ = _cert(sans or ["unrelated.test"])
    assert certificate_covers(pem, host) is expected


def test_covers_ignores_common_name() -> None:
    pem, _ = _cert(san=False, cn="blog.test")
    assert certificate_covers(pem, "blog.test") is False
    pem, _ = _cert(["other.test"], cn="blog.test")
    assert certificate_covers(pem, "blog.test") is False


def test_covers_ip_hosts_only_by_ip_san() -> None:
    pem, _ = _cert(["127.0.0.1.test"], ips=["127.0.0.1", "::1"])
    assert certificate_covers(pem, "127.0.0.1")
    assert certificate_covers(pem, "[::1]")
    assert certificate_covers(pem, "::1")  # bare, as no Host header spells it
    assert certificate_covers(pem, "[::1]:443")
    assert not certificate_covers(pem, "[::2]")
    assert not certificate_covers(pem, "127.0.0.2")


def test_covers_looks_at_leaf_only() -> None:
    leaf, _ = _cert(["a.test"])
    intermediate, _ = _cert(["blog.test"])
    assert not certificate_covers(leaf + intermediate, "blog.test")


# -- key_matches_certificate ------------------------------------------------------------


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: rsa.generate_private_key(65537, 2048),
    ],
)
def test_key_matches(make_key) -> None:  # type: ignore[no-untyped-def]
    cert_pem, key_pem = _cert(["a.test"], key=make_key())
    _, other_key_pem = _cert(["a.test"], key=make_key())
    assert key_matches_certificate(cert_pem, key_pem) is True
    assert key_matches_certificate(cert_pem, other_key_pem) is False


def test_key_matches_rsa_cert_vs_ec_key() -> None:
    cert_pem, _ = _cert(["a.test"], key=rsa.generate_private_key(65537, 2048))
    _, ec_key_pem = _cert(["a.test"])
    assert key_matches_certificate(cert_pem, ec_key_pem) is False


def test_key_matches_rejects_unusable_keys() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert_pem, _ = _cert(["a.test"], key=key)
    with pytest.raises(ValueError, match="invalid PEM private key"):
        key_matches_certificate(cert_pem, b"garbage")
    with pytest.raises(ValueError, match="cannot be used"):
        key_matches_certificate(cert_pem, _key_pem(key, password=b"secret"))
    with pytest.raises(ValueError):
        key_matches_certificate(b"garbage", _key_pem(key))


# -- renewal_due (the rule Loaded.due applies) / backoff_delay ---------------------------


def test_renewal_is_due_30_days_before_expiry() -> None:
    day = datetime.timedelta(days=1)
    assert not renewal_due(NOT_AFTER, NOT_AFTER - 31 * day)
    assert renewal_due(NOT_AFTER, NOT_AFTER - 30 * day)  # boundary is inclusive
    assert renewal_due(NOT_AFTER, NOT_AFTER - 29 * day)
    assert renewal_due(NOT_AFTER, NOT_AFTER + day)  # already expired
    assert not renewal_due(NOT_AFTER, NOT_AFTER - 2 * day, before=day)
    assert renewal_due(NOT_AFTER, NOT_AFTER - 2 * day, before=3 * day)


def test_a_short_lived_certificate_is_renewed_after_two_thirds_of_its_life() -> None:
    issued = NOT_AFTER - datetime.timedelta(hours=3)  # a 3-hour certificate
    assert not renewal_due(NOT_AFTER, issued, issued)  # not at once (no renewal loop)
    assert not renewal_due(NOT_AFTER, issued + datetime.timedelta(minutes=119), issued)
    assert renewal_due(NOT_AFTER, issued + datetime.timedelta(hours=2), issued)


def test_loaded_certificates_apply_the_same_rule() -> None:
    from luma_proxy.proxy.certificates import Loaded

    issued = NOT_AFTER - datetime.timedelta(days=90)
    loaded = Loaded(None, NOT_AFTER, 0, issued)  # type: ignore[arg-type]
    assert not loaded.due(NOT_AFTER - datetime.timedelta(days=31))
    assert loaded.due(NOT_AFTER - datetime.timedelta(days=30))


def test_renewal_due_handles_naive_and_other_zones() -> None:
    naive = NOT_AFTER.replace(tzinfo=None)
    plus2 = datetime.timezone(datetime.timedelta(hours=2))
    just_outside = (NOT_AFTER - datetime.timedelta(days=30, minutes=1)).astimezone(plus2)
    assert not renewal_due(naive, just_outside)
    assert renewal_due(naive, just_outside + datetime.timedelta(minutes=2))


def test_backoff_is_exponential_and_capped() -> None:
    assert [backoff_delay(n) for n in range(8)] == [
        60.0,
        120.0,
        240.0,
        480.0,
        960.0,
        1920.0,
        3600.0,
        3600.0,
    ]
    assert backoff_delay(-3) == 60.0
    assert backoff_delay(10_000) == 3600.0
    assert backoff_delay(2, base=1.0, cap=10.0) == 4.0


# -- account key ------------------------------------------------------------------------


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_account_key_created_private_and_reloaded(tmp_path: Path, loose_umask: None) -> None:
    path = tmp_path / "state" / "acme" / "account.pem"
    key = load_or_create_account_key(path)

    assert isinstance(key, jose.JWKRSA)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["account.pem"]  # no temp debris
    assert b"PRIVATE KEY" in path.read_bytes()

    again = load_or_create_account_key(path)
    assert again.thumbprint() == key.thumbprint()


def test_account_key_leaves_existing_dir_mode_alone(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    load_or_create_account_key(tmp_path / "account.pem")
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


def test_account_key_existing_ec_key_and_loose_mode_tightened(tmp_path: Path) -> None:
    path = tmp_path / "account.pem"
    ec_key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(_key_pem(ec_key))
    path.chmod(0o644)

    key = load_or_create_account_key(path)

    assert isinstance(key, jose.JWKEC)
    assert key.thumbprint() == jose.JWKEC(key=ec_key).thumbprint()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_account_key_corrupt_file_is_one_line_acme_error(tmp_path: Path) -> None:
    path = tmp_path / "account.pem"
    path.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(AcmeError) as info:
        load_or_create_account_key(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert path.read_text().startswith("-----BEGIN")  # never overwritten


def test_account_key_unreadable_path_is_acme_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # a file where the key's directory should be (fails even as root)
    with pytest.raises(AcmeError, match="cannot read ACME account key") as info:
        load_or_create_account_key(blocker / "account.pem")
    assert "\n" not in str(info.value)


def test_account_key_write_failure_is_acme_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(AcmeError, match=r"cannot create ACME account key .*Permission denied"):
        load_or_create_account_key(tmp_path / "account.pem")
    assert not (tmp_path / "account.pem").exists()


# -- AcmeIssuer input checks (no network reached) ---------------------------------------


@pytest.mark.parametrize(
    ("host", "fragment"),
    [
        ("*.blog.test", "wildcard"),
        ("10.0.0.1", "IP address"),
        ("[::1]", "IP address"),
        ("", "empty"),
        ("bad_name.test", "invalid host name"),
        ("-bad.test", "invalid host name"),
        ("a..test", "invalid host name"),
        ("10.0.0.1:80", "IP address"),
        ("[::1]:443", "IP address"),
        ("blog .test", "invalid host name"),
    ],
)
def test_issue_rejects_unissuable_hosts(tmp_path: Path, host: str, fragment: str) -> None:
    issuer = AcmeIssuer("https://127.0.0.1:9/dir", tmp_path / "k.pem", None)
    with pytest.raises(AcmeError, match=fragment):
        issuer.issue(host, lambda t, k: None, lambda t: None, timeout=1)
    assert not (tmp_path / "k.pem").exists()  # rejected before touching the account


@pytest.mark.parametrize(
    ("host", "name"),
    [("Blog.TEST.", "blog.test"), ("blog.test:80", "blog.test"), (" bücher.test ",
                                                                   "xn--bcher-kva.test")],
)
def test_issue_orders_the_registry_spelling(host: str, name: str) -> None:
    """The name ordered is the one the registry and the certificate store use."""
    from luma_proxy.acme.client import _normalise_dns_name
    from luma_proxy.models import normalize_host

    assert _normalise_dns_name(host) == name == normalize_host(host)


def test_acme_error_is_always_one_line() -> None:
    err = AcmeError("first line\n  second\tline\r\n" + "x" * 1000)
    text = str(err)
    assert "\n" not in text and "\r" not in text and "\t" not in text
    assert text.startswith("first line second line")
    assert len(text) <= 400
