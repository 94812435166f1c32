"""Certificates on disk, as the Go luma-proxy laid them out, and in memory.

``<state dir>/certs/<host>/cert.pem`` (full chain), ``key.pem`` (0600) and
``status.json`` (the last ACME attempt, for ``cert-status``), plus
``certs/account.key``. ACME challenge answers live in ``certs/.challenges/``
as well as in memory, so that every worker process can answer Pebble or
Let's Encrypt, whichever one took the validation request.

A key and its certificate change together: two files cannot be replaced as one,
so a reader of ``cert.pem`` and ``key.pem`` can meet a new key with the old
certificate (a write in progress, or one a SIGKILL cut in half). Each pair is
therefore also written as one file, ``pair.pem`` (chain then key, 0600; the
layout ``ssl.SSLContext.load_cert_chain`` takes), renamed into place *before*
the two Go-layout files. ``load_pair`` reads ``pair.pem`` unless ``cert.pem`` is
newer (written since by someone else: the Go proxy, an operator), checks that
the key is the certificate's, and falls back to the other source if not. So a
reader sees the old pair or the new one, never half of each, and an install with
only the Go files is read as it is.

A proxy with thousands of hosts reads them through ``PairCache`` (the HTTPS
addon, in a thread) and the supervisor's metrics through ``ExpiryCache``: each
pass stats every host's files and reads and parses again only those whose
signature (inode, size, mtime) changed.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from mitmproxy import certs
from pydantic import BaseModel

from luma_proxy.acme.certinfo import (
    RENEW_BEFORE,
    certificate_covers,
    certificate_not_after,
    key_matches_certificate,
    renewal_due,
)
from luma_proxy.store.atomic import make_private_dir, write_atomic
from luma_proxy.store.paths import certs_dir as certs_dir

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,256}$")


class CertStatus(BaseModel):
    """What the proxy last did about a host's certificate (``status.json``)."""

    state: str = "pending"  # pending | active | failed
    source: str = "acme"  # acme | custom
    not_after: datetime.datetime | None = None
    issued_at: datetime.datetime | None = None
    last_error: str | None = None
    attempts: int = 0
    next_attempt_at: datetime.datetime | None = None


@dataclass(slots=True)
class Loaded:
    """A certificate ready for TLS handshakes."""

    entry: certs.CertStoreEntry
    not_after: datetime.datetime
    mtime_ns: int  # of the file it was read from: when it was issued or installed
    not_before: datetime.datetime | None = None
    # ``pair_version`` when it was read: a different one means the files changed since.
    version: Version | None = None

    def due(self, at: datetime.datetime, before: datetime.timedelta = RENEW_BEFORE) -> bool:
        return renewal_due(self.not_after, at, self.not_before, before)


def host_dir(root: Path, host: str) -> Path:
    return root / host


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomic write with *mode* from the first byte, its directory created 0700."""
    make_private_dir(path.parent)
    write_atomic(path, data, mode)


def check_pair(cert_pem: bytes, key_pem: bytes, host: str) -> datetime.datetime:
    """Refuse a custom pair that cannot serve ``host``; returns its expiry."""
    try:
        if not key_matches_certificate(cert_pem, key_pem):
            raise ValueError("the key does not match the certificate")
        if not certificate_covers(cert_pem, host):
            raise ValueError(f"the certificate does not cover {host}")
        not_after = certificate_not_after(cert_pem)
    except ValueError as e:
        raise ValueError(f"invalid certificate for {host}: {e}") from None
    if not_after <= datetime.datetime.now(datetime.UTC):
        raise ValueError(f"invalid certificate for {host}: it expired on {not_after:%Y-%m-%d}")
    return not_after


PAIR = "pair.pem"  # chain + key in one file: replaced as one unit
# In ``certs/``, replaced after every pair written (``store_pair``): a pass that
# finds it unchanged need not stat every host's files (``PairCache.scan``).
WRITTEN = ".written"
# Hosts a pass stats when nothing was written: all of them up to this many, else a
# slice, so that the whole of a large registry is looked at every ``ROLL`` passes
# (files copied in by hand: within a minute at one pass a second).
SLICE = 200
ROLL = 60
CERT = "cert.pem"  # the Go proxy's layout, still written and read
KEY = "key.pem"
_KEY_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.+?-----END \1PRIVATE KEY-----\r?\n?", re.DOTALL)


def store_pair(root: Path, host: str, cert_pem: bytes, key_pem: bytes) -> None:
    """Write a key and its certificate so that no reader sees one without the other.

    ``pair.pem`` first (one atomic rename), then the Go layout's ``key.pem`` and
    ``cert.pem``; see the module docstring for why that order.
    """
    directory = host_dir(root, host)
    chain = cert_pem if cert_pem.endswith(b"\n") else cert_pem + b"\n"
    write_private(directory / PAIR, chain + key_pem)
    write_private(directory / KEY, key_pem)
    write_private(directory / CERT, cert_pem, 0o644)
    write_private(root / WRITTEN, b"%d\n" % time.time_ns(), 0o644)  # every reader: look


def split_pair(pem: bytes) -> tuple[bytes, bytes]:
    """``pair.pem``'s bytes as (certificate chain, key); ValueError if there is no key."""
    key = _KEY_BLOCK.search(pem)
    if key is None:
        raise ValueError("no private key")
    return pem[:key.start()] + pem[key.end():], key.group(0)


Version = tuple[int, ...]
"""(inode, size, mtime_ns) of ``pair.pem``, ``cert.pem`` and ``key.pem``, zeros for one absent."""
_ABSENT = (0, 0, 0)


def _signature(path: str) -> tuple[int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return _ABSENT
    return st.st_ino, st.st_size, st.st_mtime_ns


def pair_version(root: Path, host: str) -> Version | None:
    """What changes whenever a file of the pair is replaced; None if it has no certificate.

    The inode is in it: every write is a rename of a new file, and two writes
    within one tick of the file-system clock have the same mtime. ``key.pem``
    is in it too: a Go-layout pair replaced by hand (certificate, then key) is
    read again when its second file lands.
    """
    directory = f"{root}/{host}/"  # os.stat of a str: a pass over 10,000 hosts stats 30,000
    pair, cert = _signature(directory + PAIR), _signature(directory + CERT)
    if pair is _ABSENT and cert is _ABSENT:
        return None
    return (*pair, *cert, *_signature(directory + KEY))


def load_pair(root: Path, host: str, version: Version | None = None) -> Loaded | None:
    """The host's certificate from disk, or None if absent or unusable.

    Never a key with another certificate: each source is checked, the preferred
    one first (module docstring). ``version``: the files' ``pair_version`` if
    the caller just took it (it is recorded in the result).
    """
    directory = host_dir(root, host)
    if version is None:
        version = pair_version(root, host)
    if version is None:
        return None
    pair_mtime, cert_mtime = version[2], version[5]
    sources = [_read_combined, _read_go_layout]
    if cert_mtime > pair_mtime:  # written after pair.pem, by someone who only knows them
        sources.reverse()
    for read in sources:
        try:
            chain_pem, key_pem, mtime_ns = read(directory)
            entry = entry_from_pem(chain_pem, key_pem)
        except (OSError, ValueError):
            continue
        leaf = entry.cert.to_cryptography()
        return Loaded(entry, leaf.not_valid_after_utc, mtime_ns, leaf.not_valid_before_utc,
                      version)
    return None


@dataclass(frozen=True, slots=True)
class Scan:
    """What changed on disk since the previous ``PairCache.scan``."""

    loaded: dict[str, Loaded] = field(default_factory=dict)  # new or replaced, readable
    gone: list[str] = field(default_factory=list)  # no longer asked for: stop serving


def stored_hosts(root: Path) -> list[str]:
    """The hosts with a directory under ``root`` (``certs/``): where pairs may be."""
    try:
        return [entry.name for entry in os.scandir(root)
                if entry.is_dir() and not entry.name.startswith(".")]
    except OSError:
        return []


class PairCache:
    """The certificates of many hosts, each read and parsed again only when its files change.

    Blocking (a ``stat`` per file of every host): called in a thread, never on
    the event loop. ``scan`` and ``load`` may run in two threads at once (the
    periodic pass, an ACME order that just stored a pair); a lock orders them,
    and ``version(host)`` says which read of a host is the latest, so a result
    overtaken by a later one can be told apart and dropped.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        # host -> the version last read (parsed or found unusable) and what it gave.
        self._read: dict[str, tuple[Version, Loaded | None]] = {}
        self._written: tuple[int, int, int] | None = None  # ``WRITTEN`` at the last pass
        self._looked: set[str] = set()  # hosts statted at least once
        self._cursor = 0

    def scan(self, hosts: Iterable[str]) -> Scan:
        """Stat the pairs of ``hosts``; read those new or changed since the last pass.

        Every host is statted when a pair was written since the last pass
        (``WRITTEN`` moved), and hosts never statted are; otherwise a slice of
        them in turn (``SLICE``, ``ROLL``): at 5,000 ``--ssl`` hosts a pass of
        every file cost 39 ms of CPU a second, in a thread whose hold on the GIL
        delayed the event loop's requests by as much.

        A host whose files changed but cannot be used (half a Go-layout pair, a
        broken file) is not in the result, and not read again until they
        change again; a host whose files disappeared keeps what was read. A
        host read before and not in ``hosts`` any more is in ``gone``.
        """
        root, changed = self.root, {}
        with self._lock:
            known = self._read
            hosts = list(hosts)
            asked = set(hosts)
            written = _signature(f"{root}/{WRITTEN}")
            if written != self._written or len(hosts) <= SLICE:
                self._written, todo = written, hosts
            else:
                step = max(SLICE, -(-len(hosts) // ROLL))
                start = self._cursor if self._cursor < len(hosts) else 0
                self._cursor = start + step
                # Hosts never statted, then the slice: a new host in the slice once.
                todo = list(dict.fromkeys(
                    [h for h in hosts if h not in self._looked] + hosts[start:start + step]))
            self._looked.intersection_update(asked)
            self._looked.update(todo)
            for host in todo:
                version = pair_version(root, host)
                if version is None:
                    continue
                previous = known.get(host)
                if previous is not None and previous[0] == version:
                    continue
                loaded = load_pair(root, host, version)  # the module's: tests count the calls
                known[host] = (version, loaded)
                if loaded is not None:
                    changed[host] = loaded
            gone = [host for host in known if host not in asked]
            for host in gone:
                del known[host]
        return Scan(changed, gone)

    def load(self, host: str) -> Loaded | None:
        """Read ``host``'s pair now (it was just written), whatever was read before."""
        with self._lock:
            version = pair_version(self.root, host)
            loaded = load_pair(self.root, host, version) if version is not None else None
            if version is not None:
                self._read[host] = (version, loaded)
            return loaded

    def version(self, host: str) -> Version | None:
        """The version of ``host``'s files last read (safe from any thread)."""
        read = self._read.get(host)
        return read[0] if read is not None else None

    def loaded(self, host: str) -> Loaded | None:
        """What the last read of ``host``'s files gave (None: none, or unusable)."""
        read = self._read.get(host)
        return read[1] if read is not None else None


class ExpiryCache:
    """host -> expiry (unix time) of the certificate on disk, parsed again only when it changes.

    For a process that serves none of them (the workers' supervisor, on each
    metrics scrape): only the expiry of each pair is kept. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._root: Path | None = None
        self._known: dict[str, tuple[Version, float | None]] = {}

    def expiries(self, root: Path, hosts: Iterable[str]) -> dict[str, float]:
        """The expiry of each of ``hosts`` that has a usable certificate under ``root``."""
        out: dict[str, float] = {}
        with self._lock:
            if root != self._root:
                self._root, self._known = root, {}
            known, kept = self._known, {}
            for host in hosts:
                version = pair_version(root, host)
                if version is None:
                    continue
                previous = known.get(host)
                if previous is not None and previous[0] == version:
                    not_after = previous[1]
                else:
                    loaded = load_pair(root, host, version)
                    not_after = loaded.not_after.timestamp() if loaded is not None else None
                kept[host] = (version, not_after)
                if not_after is not None:
                    out[host] = not_after
            self._known = kept  # hosts not asked for any more are forgotten
        return out


def _read_combined(directory: Path) -> tuple[bytes, bytes, int]:
    with (directory / PAIR).open("rb") as f:  # one open file: one version of it
        data = f.read()
        mtime_ns = os.fstat(f.fileno()).st_mtime_ns
    return (*split_pair(data), mtime_ns)


def _read_go_layout(directory: Path) -> tuple[bytes, bytes, int]:
    with (directory / CERT).open("rb") as f:
        chain_pem = f.read()
        mtime_ns = os.fstat(f.fileno()).st_mtime_ns
    return chain_pem, (directory / KEY).read_bytes(), mtime_ns


def entry_from_pem(chain_pem: bytes, key_pem: bytes) -> certs.CertStoreEntry:
    """A TLS-ready pair; ValueError if the key is not the leaf's (two files read mid-write)."""
    chain = [certs.Cert(c) for c in x509.load_pem_x509_certificates(chain_pem)]
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError("unsupported key type")
    if not same_public_key(key, chain[0].to_cryptography()):
        raise ValueError("the key does not match the certificate")
    return certs.CertStoreEntry(chain[0], key, None, chain)


def same_public_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
                    cert: x509.Certificate) -> bool:
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*der) == cert.public_key().public_bytes(*der)


def read_status(root: Path, host: str) -> CertStatus | None:
    try:
        return CertStatus.model_validate_json((host_dir(root, host) / "status.json").read_bytes())
    except (OSError, ValueError):
        return None


def write_status(root: Path, host: str, status: CertStatus) -> None:
    write_private(host_dir(root, host) / "status.json",
                  status.model_dump_json(indent=2).encode(), 0o644)


def fallback_entry() -> certs.CertStoreEntry:
    """A self-signed certificate naming no real host, for SNI we have no certificate for.

    Clients get a clean verification failure instead of a handshake abort (the Go
    proxy's behaviour) or a certificate minted for any name by mitmproxy's CA.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "luma-proxy default")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("luma-proxy.invalid")]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    mcert = certs.Cert(cert)
    return certs.CertStoreEntry(mcert, key, None, [mcert])


def valid_token(token: str) -> bool:
    return bool(_TOKEN.match(token))


def challenge_file(root: Path, token: str) -> Path:
    return root / ".challenges" / token


def directory_url(explicit: str, staging: bool) -> str:
    """``--acme-directory``/env first, then the staging switch, else production."""
    if explicit:
        return explicit
    return LETS_ENCRYPT_STAGING if staging else LETS_ENCRYPT


def status_line(status: CertStatus | None, loaded_not_after: datetime.datetime | None) -> dict:
    """What ``cert-status`` prints for one host."""
    out = json.loads((status or CertStatus()).model_dump_json())
    if loaded_not_after is not None:
        out["not_after"] = loaded_not_after.isoformat()
        out["days_left"] = (loaded_not_after - datetime.datetime.now(datetime.UTC)).days
    return out
