"""Run a real Pebble ACME test server for end-to-end tests.

Pebble is started with a config file of its own in a temp dir, so tests never
depend on the packaged example config (which points at ``test/certs/...`` files
that the Debian package does not ship). Its HTTPS listener therefore gets a
throwaway CA + ``localhost``/``127.0.0.1`` certificate generated here; that CA
is what `Pebble.ca_bundle` points at.

Pebble validates HTTP-01 by resolving the identifier through ``-dnsserver`` and
connecting to ``<ip>:<httpPort>`` — so the port to validate against is a config
value, not something the ACME client can choose.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e.docker_double import free_port

__all__ = ["Pebble", "PebbleError", "find_pebble", "free_port"]


class PebbleError(RuntimeError):
    """Pebble could not be found, started or queried."""


def find_pebble() -> str:
    """Return the path of the pebble binary ($PEBBLE_BIN, then $PATH, then /usr/bin)."""
    candidates = [os.environ.get("PEBBLE_BIN"), shutil.which("pebble"), "/usr/bin/pebble"]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise PebbleError("pebble binary not found (install Debian's 'pebble' or set PEBBLE_BIN)")


def _write_https_identity(directory: Path) -> tuple[Path, Path, Path]:
    """Create a tiny CA and a leaf for localhost/127.0.0.1; return (ca, cert, key) paths."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "luma-proxy test pebble CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "https-ca.pem"
    cert_path = directory / "https-cert.pem"
    key_path = directory / "https-key.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf_cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


class Pebble:
    """A Pebble process with its own temp dir, config and HTTPS identity.

    ``http_port`` is where Pebble sends HTTP-01 validation requests (to whatever
    address ``dns_port``'s server returns for the name). ``certificate_validity``
    (seconds) maps to Pebble's ``certificateValidityPeriod`` config key, which
    this Pebble version (2.4.0) honours; Pebble's default is five years.
    ``port`` pins the ACME listener (e.g. to restart "the same" CA with no state).
    """

    def __init__(
        self,
        *,
        http_port: int,
        dns_port: int | None = None,
        certificate_validity: int | None = None,
        port: int | None = None,
        binary: str | None = None,
        startup_timeout: float = 15.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.binary = binary or find_pebble()
        self.http_port = http_port
        self.dns_port = dns_port
        self.certificate_validity = certificate_validity
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})
        self.requested_port = port
        self.port = 0
        self.management_port = 0
        self.tls_port = 0
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None
        self.ca_bundle = ""

    # -- public API -------------------------------------------------------------

    @property
    def directory_url(self) -> str:
        """ACME directory URL of the running server."""
        return f"https://127.0.0.1:{self.port}/dir"

    @property
    def management_url(self) -> str:
        """Base URL of Pebble's management API (roots, intermediates, cert status)."""
        return f"https://127.0.0.1:{self.management_port}"

    def start(self) -> Pebble:
        """Write config + certs, launch Pebble and wait until the directory answers."""
        if self._proc is not None:
            raise PebbleError("pebble already started")
        self._tmp = tempfile.TemporaryDirectory(prefix="luma-pebble-")
        workdir = Path(self._tmp.name)
        ca_path, cert_path, key_path = _write_https_identity(workdir)
        self.ca_bundle = str(ca_path)
        self.port = self.requested_port or free_port()
        self.management_port = free_port()
        self.tls_port = free_port()
        config: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(cert_path),
            "privateKey": str(key_path),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if self.certificate_validity is not None:
            if self.certificate_validity < 1:
                raise PebbleError("certificate_validity must be >= 1 second")
            config["certificateValidityPeriod"] = int(self.certificate_validity)
        config_path = workdir / "pebble-config.json"
        config_path.write_text(json.dumps({"pebble": config}, indent=2))

        env = {
            k: v
            for k, v in os.environ.items()
            if k.lower() not in {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
        }
        env.update(
            {
                "PEBBLE_VA_NOSLEEP": "1",
                "PEBBLE_WFE_NONCEREJECT": "0",
                "PEBBLE_AUTHZREUSE": "0",
            }
        )
        env.update(self.extra_env)
        args = [self.binary, "-config", str(config_path)]
        if self.dns_port is not None:
            args += ["-dnsserver", f"127.0.0.1:{self.dns_port}"]
        self._log_path = workdir / "pebble.log"
        with self._log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                args, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate Pebble (its state is lost by design) and remove the temp dir."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            tmp.cleanup()

    def root_pem(self, index: int = 0) -> bytes:
        """Return the PEM root that signs issued chains (regenerated on every Pebble start)."""
        return self._management_get(f"/roots/{index}")

    def intermediate_pem(self, index: int = 0) -> bytes:
        """Return the PEM intermediate Pebble issues from."""
        return self._management_get(f"/intermediates/{index}")

    def log(self) -> str:
        """Pebble's combined stdout/stderr so far (handy in assertion messages)."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")

    def __enter__(self) -> Pebble:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals --------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_bundle)

    def _management_get(self, path: str) -> bytes:
        if self._proc is None:
            raise PebbleError("pebble is not running")
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=self._ssl_context()),
        )
        try:
            with opener.open(self.management_url + path, timeout=5) as resp:
                return bytes(resp.read())
        except (urllib.error.URLError, OSError) as exc:
            raise PebbleError(f"GET {self.management_url}{path} failed: {exc}") from exc

    def _wait_ready(self) -> None:
        assert self._proc is not None
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=self._ssl_context()),
        )
        deadline = time.monotonic() + self.startup_timeout
        last_error: object = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PebbleError(
                    f"pebble exited with code {self._proc.returncode}:\n{self.log()[-2000:]}"
                )
            try:
                with opener.open(self.directory_url, timeout=2) as resp:
                    if resp.status == 200:
                        json.loads(resp.read())
                        # The management API starts in its own goroutine; wait for it too.
                        with contextlib.suppress(PebbleError):
                            self.root_pem()
                            return
            except (urllib.error.URLError, OSError, ValueError) as exc:
                last_error = exc
            time.sleep(0.05)
        raise PebbleError(
            f"pebble not ready after {self.startup_timeout}s ({last_error}):\n{self.log()[-2000:]}"
        )
