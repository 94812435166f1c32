"""A Go luma-proxy install taken over: its state.json and certificates, as they are."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from luma_proxy.store.registry import IMPORT_SUFFIX, db_path
from tests.e2e.conftest import wait_until
from tests.e2e.docker_double import free_port
from tests.e2e.test_https import make_cert
from tests.store.test_gostate import EXAMPLE


def go_key_pem(pkcs8: bytes) -> bytes:
    """The Go proxy wrote ``EC PRIVATE KEY`` (SEC 1) PEM files."""
    key = serialization.load_pem_private_key(pkcs8, password=None)
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def test_go_state_and_certificates_are_served_as_they_are(
        tmp_path: Path, state_path: Path, dns, containers, start_proxy, cli) -> None:
    state_path.parent.mkdir(parents=True)
    shutil.copy(EXAMPLE, state_path)
    cert_pem, key_pem = make_cert(["blog.example.com"])
    host_dir = state_path.parent / "certs" / "blog.example.com"
    host_dir.mkdir(parents=True)
    (host_dir / "cert.pem").write_bytes(cert_pem)
    (host_dir / "key.pem").write_bytes(go_key_pem(key_pem))
    (host_dir / "key.pem").chmod(0o600)
    web = containers("web-1", port=3000)  # the Go file's targets: myproject-web:3000 and
    dns.set_alias("myproject-web", [web.ip])
    api = containers("api-1", port=8080)  # myproject-api:8080 (each container has its own IP)
    dns.set_alias("myproject-api", [api.ip])
    https_port = free_port()
    # An ACME server that cannot be reached: any order for a valid certificate would fail loudly.
    proxy = start_proxy("run", args=("--https-port", str(https_port),
                                     "--acme-directory", "https://127.0.0.1:1/directory"))

    # Plain HTTP to a --no-ssl host of the Go file is routed.
    assert wait_until(lambda: proxy.get("api.example.com").status == 200)
    assert proxy.get("api.example.com").body.startswith(b"api-1")
    # The --ssl host is served over HTTPS with the Go proxy's own certificate.
    ca = tmp_path / "go-cert.pem"
    ca.write_bytes(cert_pem)
    result = wait_until(lambda: (r := subprocess.run(
        ["curl", "-sS", "--max-time", "5", "--cacert", str(ca), "--resolve",
         f"blog.example.com:{https_port}:127.0.0.1", f"https://blog.example.com:{https_port}/"],
        capture_output=True, text=True, timeout=20)).returncode == 0 and r)
    assert result.stdout.startswith("web-1")
    # ... and HTTP to it is redirected, since that certificate is active.
    assert proxy.get("blog.example.com").status == 301

    # The file was taken over: imported into the registry, the original kept beside it
    # (and never read again).
    assert (state_path.parent / f"state.json{IMPORT_SUFFIX}").read_bytes() == EXAMPLE.read_bytes()
    assert not state_path.exists() and db_path(state_path).exists()
    listed = {s["host"]: s for s in json.loads(cli("list", "--json").stdout)["services"]}
    assert {h: (s["target"], s["project"], s["ssl"]) for h, s in listed.items()} == {
        "api.example.com": ("myproject-api:8080", "myproject", False),
        "blog.example.com": ("myproject-web:3000", "myproject", True),
        "other.example.org": ("shop-web:80", "shop", True),
    }
    status = json.loads(cli("cert-status", "--host", "blog.example.com", "--json").stdout)
    assert status["certificates"][0]["state"] == "active"
    served = x509.load_pem_x509_certificate(cert_pem)
    assert served.subject.rfc4514_string() == "CN=blog.example.com"
    logs = proxy.logs()
    assert "took over the state file" in logs
    assert "ordering one for blog.example.com" not in logs
    assert "Traceback" not in logs


def test_unknown_state_layout_at_first_start_is_never_read_as_an_empty_registry(
        tmp_path: Path, state_path: Path, dns, containers, start_proxy, cli) -> None:
    web = containers("web-1", port=free_port())
    dns.set_alias("web", [web.ip])
    state_path.parent.mkdir(parents=True)
    unknown = b'{"routes": {"a.test": "web:1"}}'
    state_path.write_bytes(unknown)
    proxy = start_proxy("run")
    wait_until(lambda: "unknown layout" in proxy.logs())
    time.sleep(1)  # several reloads later
    assert proxy.proc.poll() is None
    assert proxy.get("a.test").status == 404  # nothing routed, nothing crashed
    lines = [line for line in proxy.logs().splitlines() if "unknown layout" in line]
    assert len(lines) == 1, lines  # one clear line, not one per poll
    assert "state file" in lines[0] and "Traceback" not in proxy.logs()
    # The file is left as it is, and nothing took its place.
    assert state_path.read_bytes() == unknown
    assert not (state_path.parent / f"state.json{IMPORT_SUFFIX}").exists()
    result = cli("list", check=False)  # the CLI does not read it as empty either
    assert result.returncode != 0 and "unknown layout" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    # The operator moves it aside and imports a good file: routed at once.
    state_path.rename(state_path.with_name("state.json.unknown"))
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"version": 1, "services": {"a.test": {
        "name": "web", "host": "a.test", "target": f"web:{web.port}", "project": "p",
        "ssl": False}}}))
    assert "Imported 1 host(s)" in cli("import", str(good)).stdout
    wait_until(lambda: proxy.get("a.test").status == 200, timeout=5)
    assert [s["host"] for s in json.loads(cli("list", "--json").stdout)["services"]] == ["a.test"]


def test_import_with_an_unknown_state_file_still_present(
        tmp_path: Path, state_path: Path, dns, containers, start_proxy, cli) -> None:
    web = containers("web-1", port=free_port())
    dns.set_alias("web", [web.ip])
    state_path.parent.mkdir(parents=True)
    state_path.write_bytes(b'{"routes": {"a.test": "web:1"}}')
    proxy = start_proxy("run")
    wait_until(lambda: "unknown layout" in proxy.logs())
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"version": 1, "services": {"a.test": {
        "name": "web", "host": "a.test", "target": f"web:{web.port}", "project": "p",
        "ssl": False}}}))
    cli("import", str(good))  # a new registry from FILE alone: the unknown file stays aside
    wait_until(lambda: proxy.get("a.test").status == 200, timeout=5)
    assert state_path.read_bytes() == b'{"routes": {"a.test": "web:1"}}'
    assert proxy.logs().count("unknown layout") == 1  # not re-parsed on every poll


def test_certificate_files_that_cannot_be_written_are_one_line_not_a_traceback(
        state_path: Path, dns, start_proxy, cli) -> None:
    cli("deploy", "--host", "blog.test", "--target", "blog:80", "--project", "p")
    (state_path.parent / "certs").write_text("not a directory")  # every write there fails
    proxy = start_proxy("run", args=("--https-port", str(free_port()),
                                     "--acme-directory", "https://127.0.0.1:1/directory"),
                        env={"LUMA_PROXY_ACME_RETRY": "1"})
    wait_until(lambda: "cannot write the status of blog.test" in proxy.logs(), timeout=20)
    logs = proxy.logs()
    assert "Traceback" not in logs and "Task exception" not in logs
    status = json.loads(cli("cert-status", "--host", "blog.test", "--json").stdout)
    row = status["certificates"][0]
    assert row["state"] == "failed" and "not" in row["last_error"]
