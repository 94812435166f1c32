"""Certificate files: a key and its certificate are replaced as one unit (issue 13.16).

``store_pair`` writes ``pair.pem`` (one atomic rename) and the Go layout's
``cert.pem``/``key.pem``; ``load_pair`` must never return a key with another
key's certificate, whatever it races with, and a writer killed mid-write leaves
the old pair or the new one.
"""

from __future__ import annotations

import datetime
import os
import random
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from luma_proxy.proxy import certificates
from luma_proxy.proxy.certificates import (
    PAIR,
    ExpiryCache,
    Loaded,
    PairCache,
    Scan,
    load_pair,
    pair_version,
    store_pair,
)
from tests.certs import make_pair

HOST = "shop.test"
PUBLIC = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def consistent(loaded: Loaded) -> bool:
    """The loaded key is the served certificate's: what a TLS handshake needs."""
    key = loaded.entry.privatekey.public_key().public_bytes(*PUBLIC)
    return key == loaded.entry.cert.to_cryptography().public_key().public_bytes(*PUBLIC)


def leaf_of(cert_pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(cert_pem)[0]


def test_store_then_load_and_file_modes(tmp_path: Path) -> None:
    cert_pem, key_pem = make_pair([HOST])
    store_pair(tmp_path, HOST, cert_pem, key_pem)
    directory = tmp_path / HOST
    assert (directory / "cert.pem").read_bytes() == cert_pem  # the Go layout, as it was
    assert (directory / "key.pem").read_bytes() == key_pem
    for name, mode in (("pair.pem", 0o600), ("key.pem", 0o600), ("cert.pem", 0o644)):
        assert (directory / name).stat().st_mode & 0o777 == mode, name
    # pair.pem is the layout OpenSSL takes as one file (chain and key).
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(directory / PAIR)
    loaded = load_pair(tmp_path, HOST)
    assert loaded is not None and consistent(loaded)
    assert loaded.entry.cert.to_cryptography() == leaf_of(cert_pem)
    assert sorted(p.name for p in directory.iterdir()) == ["cert.pem", "key.pem", "pair.pem"]


def test_go_install_without_pair_file_is_read(tmp_path: Path) -> None:
    """An install the Go proxy (or this proxy before pair.pem) left: two files, EC key in SEC1."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    directory = tmp_path / HOST
    directory.mkdir()
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))  # "BEGIN EC PRIVATE KEY", as Go writes it
    loaded = load_pair(tmp_path, HOST)
    assert loaded is not None and consistent(loaded)
    assert loaded.entry.cert.to_cryptography() == cert


def test_go_files_replaced_by_hand_after_pair_file_win(tmp_path: Path) -> None:
    """cert.pem/key.pem written after pair.pem (an operator, the Go proxy) are what is served."""
    store_pair(tmp_path, HOST, *make_pair([HOST]))
    newer_cert, newer_key = make_pair([HOST], rsa_key=True)
    directory = tmp_path / HOST
    later = time.time_ns() + 2_000_000_000
    (directory / "key.pem").write_bytes(newer_key)
    (directory / "cert.pem").write_bytes(newer_cert)
    os.utime(directory / "cert.pem", ns=(later, later))
    loaded = load_pair(tmp_path, HOST)
    assert loaded is not None and consistent(loaded)
    assert loaded.entry.cert.to_cryptography() == leaf_of(newer_cert)
    # The same by hand but only half done (new cert, old key): pair.pem is still served.
    (directory / "cert.pem").write_bytes(make_pair([HOST])[0])
    os.utime(directory / "cert.pem", ns=(later + 1, later + 1))
    loaded = load_pair(tmp_path, HOST)
    assert loaded is not None and consistent(loaded)


def test_version_changes_with_every_write(tmp_path: Path) -> None:
    """Two writes within one tick of the file-system clock are still told apart."""
    assert pair_version(tmp_path, HOST) is None
    pairs = [make_pair([HOST]) for _ in range(2)]
    seen = set()
    for i in range(6):
        store_pair(tmp_path, HOST, *pairs[i % 2])
        version = pair_version(tmp_path, HOST)
        assert version is not None and version not in seen
        seen.add(version)
        loaded = load_pair(tmp_path, HOST)
        assert loaded is not None and loaded.version == version


def test_reader_racing_writers_never_sees_a_mismatched_pair(tmp_path: Path) -> None:
    pairs = [make_pair([HOST]) for _ in range(4)]
    leaves = {leaf_of(cert_pem) for cert_pem, _ in pairs}
    store_pair(tmp_path, HOST, *pairs[0])
    stop = threading.Event()
    writes = [0]

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            store_pair(tmp_path, HOST, *rng.choice(pairs))
            writes[0] += 1

    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    reads = mismatched = missing = openssl_refused = 0
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    snapshot = tmp_path / "snapshot.pem"
    deadline = time.monotonic() + 1.5
    try:
        while time.monotonic() < deadline:
            loaded = load_pair(tmp_path, HOST)
            reads += 1
            if loaded is None:
                missing += 1
            elif not consistent(loaded) or loaded.entry.cert.to_cryptography() not in leaves:
                mismatched += 1
            # What OpenSSL makes of pair.pem as read at one instant (load_cert_chain
            # itself opens the path twice, once for the chain and once for the key).
            snapshot.write_bytes((tmp_path / HOST / PAIR).read_bytes())
            try:
                context.load_cert_chain(snapshot)
            except ssl.SSLError:
                openssl_refused += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert writes[0] > 50 and reads > 50, (writes, reads)
    assert (mismatched, missing, openssl_refused) == (0, 0, 0), (reads, writes)


CHILD = """
import sys
from pathlib import Path
from luma_proxy.proxy.certificates import store_pair
root = Path(sys.argv[1])
pairs = [(Path(sys.argv[i]).read_bytes(), Path(sys.argv[i + 1]).read_bytes()) for i in (2, 4)]
print("ready", flush=True)
n = 0
while True:
    store_pair(root, "shop.test", *pairs[n % 2])
    n += 1
"""


@pytest.mark.spawns
def test_sigkill_mid_write_leaves_the_old_or_the_new_pair(tmp_path: Path) -> None:
    pairs = [make_pair([HOST]) for _ in range(2)]
    files: list[str] = []
    for i, (cert_pem, key_pem) in enumerate(pairs):
        for kind, data in (("cert", cert_pem), ("key", key_pem)):
            path = tmp_path / f"{kind}{i}.pem"
            path.write_bytes(data)
            files.append(str(path))
    leaves = {leaf_of(cert_pem) for cert_pem, _ in pairs}
    root = tmp_path / "certs"
    store_pair(root, HOST, *pairs[0])
    rng = random.Random(13)
    for _ in range(12):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), *files],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.001, 0.05))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        loaded = load_pair(root, HOST)
        assert loaded is not None and consistent(loaded)
        assert loaded.entry.cert.to_cryptography() in leaves


# ------------------------------------------------- many hosts: only what changed is parsed


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The hosts whose pair is read and parsed (``certificates.load_pair``, counted)."""
    calls: list[str] = []
    real = certificates.load_pair

    def counting(root: Path, host: str, version: tuple[int, ...] | None = None) -> Loaded | None:
        calls.append(host)
        return real(root, host, version)

    monkeypatch.setattr(certificates, "load_pair", counting)
    return calls


def test_pair_cache_parses_again_only_the_pairs_that_changed(tmp_path: Path,
                                                             parses: list[str]) -> None:
    hosts = [f"h{i}.test" for i in range(3)]
    for host in hosts:
        store_pair(tmp_path, host, *make_pair([host]))
    cache = PairCache(tmp_path)
    first = cache.scan([*hosts, "pending.test"])  # no files yet: nothing to read
    assert sorted(first.loaded) == hosts and first.gone == [] and sorted(parses) == hosts
    assert all(consistent(loaded) for loaded in first.loaded.values())
    parses.clear()
    assert cache.scan(hosts) == Scan() and parses == []  # unchanged: statted, not read
    new_cert, new_key = make_pair(["h1.test"])
    store_pair(tmp_path, "h1.test", new_cert, new_key)
    again = cache.scan(hosts)
    assert parses == ["h1.test"] and list(again.loaded) == ["h1.test"]
    assert again.loaded["h1.test"].entry.cert.to_cryptography() == leaf_of(new_cert)
    assert again.loaded["h1.test"].version == pair_version(tmp_path, "h1.test")
    assert cache.version("h1.test") == pair_version(tmp_path, "h1.test")
    assert cache.loaded("h1.test") is again.loaded["h1.test"]
    # A host no longer asked for (removed, --no-ssl) is gone; asked for again, read again.
    assert cache.scan(hosts[:2]) == Scan(gone=["h2.test"])
    parses.clear()
    assert list(cache.scan(hosts).loaded) == ["h2.test"] and parses == ["h2.test"]


def test_pair_cache_reads_a_go_pair_replaced_by_hand_again_when_its_key_lands(
        tmp_path: Path, parses: list[str]) -> None:
    store_pair(tmp_path, HOST, *make_pair([HOST]))
    cache = PairCache(tmp_path)
    old = cache.scan([HOST]).loaded[HOST]
    newer_cert, newer_key = make_pair([HOST])
    directory = tmp_path / HOST
    later = time.time_ns() + 2_000_000_000
    (directory / "cert.pem").write_bytes(newer_cert)  # in place, as an operator might
    os.utime(directory / "cert.pem", ns=(later, later))
    half = cache.scan([HOST]).loaded[HOST]  # the new certificate with the old key: not served
    assert consistent(half)
    assert half.entry.cert.to_cryptography() == old.entry.cert.to_cryptography()
    (directory / "key.pem").write_bytes(newer_key)
    os.utime(directory / "key.pem", ns=(later + 1, later + 1))
    whole = cache.scan([HOST]).loaded[HOST]
    assert consistent(whole) and whole.entry.cert.to_cryptography() == leaf_of(newer_cert)
    assert parses == [HOST] * 3


def test_pair_cache_does_not_parse_an_unusable_pair_on_every_pass(tmp_path: Path,
                                                                  parses: list[str]) -> None:
    (tmp_path / HOST).mkdir()
    (tmp_path / HOST / "cert.pem").write_bytes(b"not a certificate")
    cache = PairCache(tmp_path)
    assert cache.scan([HOST]) == Scan() and cache.scan([HOST]) == Scan()
    assert parses == [HOST]
    store_pair(tmp_path, HOST, *make_pair([HOST]))  # fixed: read at the next pass
    assert list(cache.scan([HOST]).loaded) == [HOST] and parses == [HOST, HOST]


def test_pair_cache_load_supersedes_what_an_earlier_pass_read(tmp_path: Path) -> None:
    """An order's read of the pair it just stored is the latest: ``version`` says so."""
    store_pair(tmp_path, HOST, *make_pair([HOST]))
    cache = PairCache(tmp_path)
    earlier = cache.scan([HOST]).loaded[HOST]
    store_pair(tmp_path, HOST, *make_pair([HOST]))
    now = cache.load(HOST)
    assert now is not None and now.version != earlier.version
    assert cache.version(HOST) == now.version == pair_version(tmp_path, HOST)
    assert cache.scan([HOST]) == Scan()  # already read


def test_expiry_cache_parses_again_only_the_certificates_that_changed(
        tmp_path: Path, parses: list[str]) -> None:
    certs = {f"h{i}.test": make_pair([f"h{i}.test"], days=30 + i) for i in range(3)}
    for host, pair in certs.items():
        store_pair(tmp_path, host, *pair)
    hosts = [*certs, "pending.test"]

    def expected() -> dict[str, float]:
        return {host: leaf_of(cert).not_valid_after_utc.timestamp()
                for host, (cert, _key) in certs.items()}

    cache = ExpiryCache()
    assert cache.expiries(tmp_path, hosts) == expected()
    assert sorted(parses) == sorted(certs)
    parses.clear()
    assert cache.expiries(tmp_path, hosts) == expected() and parses == []
    certs["h1.test"] = make_pair(["h1.test"], days=7)
    store_pair(tmp_path, "h1.test", *certs["h1.test"])
    assert cache.expiries(tmp_path, hosts) == expected() and parses == ["h1.test"]
    parses.clear()
    assert cache.expiries(tmp_path, ["h0.test"]) == {"h0.test": expected()["h0.test"]}
    assert parses == []
    assert cache.expiries(tmp_path, ["h2.test"]) == {"h2.test": expected()["h2.test"]}
    assert parses == ["h2.test"]  # forgotten when it was not asked for


def test_pair_cache_stats_a_slice_unless_a_pair_was_written(tmp_path: Path,
                                                            parses: list[str]) -> None:
    """Many hosts: a pass after ``store_pair`` looks at every host; otherwise a slice in
    turn, so a pair copied in by hand is read within ``ROLL`` passes, not at once."""
    hosts = [f"h{i}.test" for i in range(500)]  # most without files: a stat each
    store_pair(tmp_path, hosts[0], *make_pair([hosts[0]]))
    store_pair(tmp_path, hosts[450], *make_pair([hosts[450]]))
    cache = PairCache(tmp_path)
    assert sorted(cache.scan(hosts).loaded) == [hosts[0], hosts[450]]  # the first: whole
    parses.clear()
    cert, key = make_pair([hosts[450]])
    later = time.time_ns() + 2_000_000_000
    for name, data in (("cert.pem", cert), ("key.pem", key)):  # by hand: no store_pair
        (tmp_path / hosts[450] / name).write_bytes(data)
        os.utime(tmp_path / hosts[450] / name, ns=(later, later))
    passes = 0
    while hosts[450] not in parses:
        cache.scan(hosts)
        passes += 1
        assert passes <= certificates.ROLL
    assert passes == 3  # slices of SLICE (200) hosts: 0-199, 200-399, then 400-599
    parses.clear()
    store_pair(tmp_path, hosts[0], *make_pair([hosts[0]]))
    assert list(cache.scan(hosts).loaded) == [hosts[0]]  # written: the next pass sees it
    assert cache.scan(hosts[:10]).gone == [hosts[450]]  # asked no more: gone, slice or not
