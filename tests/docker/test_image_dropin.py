"""The image as the Luma CLI runs it, on a real engine: a drop-in for the Go luma-proxy."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.docker.engine import Engine
from tests.docker.scenarios import APP_PORT, HOST, PROJECT, Bed, first_deploy, free_port
from tests.e2e.test_https import make_cert

pytestmark = pytest.mark.docker


def uid_of_pid_1(engine: Engine, container: str) -> str:
    status = engine.docker("exec", container, "cat", "/proc/1/status").stdout
    return next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))


def https_get(port: int, host: str, ca: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "5", "--cacert", str(ca), "--resolve",
                           f"{host}:{port}:127.0.0.1", f"https://{host}:{port}/"],
                          capture_output=True, text=True, timeout=20)


def test_luma_cli_run_serves_as_10001_and_writes_its_host_owned_mounts(
        bed: Bed, tmp_path: Path) -> None:
    first_deploy(bed)
    assert uid_of_pid_1(bed.engine, bed.proxy) == "10001"
    certs = bed.home / ".luma" / "luma-proxy-certs"
    registry = certs / ".luma-proxy" / "state.db"
    assert registry.exists() and registry.stat().st_uid == 10001  # the registry lives in the mount
    listed = json.loads(bed.exec("list", "--json").stdout)["services"]
    assert HOST in [s["host"] for s in listed]
    # A certificate lands in the certs mount and is served.
    cert_pem, key_pem = make_cert([HOST])
    config = bed.home / ".luma" / "luma-proxy-config"  # mounted on /tmp
    (config / "c.pem").write_bytes(cert_pem)
    (config / "k.pem").write_bytes(key_pem)
    result = bed.exec("deploy", "--host", HOST, "--target", f"{PROJECT}-web:{APP_PORT}",
                      "--project", PROJECT, "--tls-cert", "/tmp/c.pem", "--tls-key", "/tmp/k.pem")
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert (certs / HOST / "cert.pem").read_bytes() == cert_pem
    ca = tmp_path / "ca.pem"
    ca.write_bytes(cert_pem)
    deadline = time.monotonic() + 15
    while (got := https_get(bed.https_port, HOST, ca)).returncode != 0 \
            and time.monotonic() < deadline:
        time.sleep(0.3)
    assert got.returncode == 0 and got.stdout.startswith(bed.engine.prefix), got.stderr
    # Nothing says the certificates cannot be written (the Go image's failure).
    rows = json.loads(bed.exec("cert-status", "--json").stdout)["certificates"]
    assert all("not writable" not in (r.get("last_error") or "") for r in rows)


def test_every_command_the_luma_cli_runs_through_docker_exec(bed: Bed) -> None:
    def ok(*args: str) -> str:
        result = bed.exec(*args)
        assert (result.returncode, result.stderr) == (0, ""), (args, result.stderr)
        return result.stdout

    out = ok("deploy", "--host", HOST, "--target", f"{PROJECT}-web:{APP_PORT}", "--project",
             PROJECT, "--health-path", "/up", "--ssl")
    assert out.startswith("✅")
    assert ok("updatehealth", "--host", HOST, "--healthy", "true").startswith("✅")
    status = bed.engine.docker("exec", bed.proxy, "sh", "-c",
                               "/usr/local/bin/luma-proxy status 2>/dev/null")
    assert HOST in status.stdout
    listed = bed.engine.docker("exec", bed.proxy, "luma-proxy", "list")  # bare name, on PATH
    assert listed.stderr == "" and HOST in listed.stdout
    assert ok("deploy", "--host", "plain.example.test", "--target", "x:80", "--project",
              PROJECT, "--ssl=false").startswith("✅")
    assert ok("switch", "--host", "plain.example.test", "--target", "y:80").startswith("✅")
    assert ok("remove", "--host", "plain.example.test").startswith("✅")
    for bad in (("deploy", "--host", "bad host", "--target", "x:80", "--project", "p"),
                ("updatehealth", "--host", HOST, "--healthy", "maybe"),
                ("remove", "--host", "nowhere.example.test")):
        result = bed.exec(*bad)
        assert result.returncode != 0 and result.stdout == "", bad
        assert result.stderr.count("\n") == 1 and "✅" not in result.stderr, result.stderr
    # The Luma CLI's own health gate runs curl through sh inside this container.
    assert bed.engine.docker("exec", bed.proxy, "sh", "-c", "command -v curl").returncode == 0


def test_proxy_update_keeps_routes_and_certificates_and_rejoins_the_network(
        bed: Bed, tmp_path: Path) -> None:
    from tests.docker.scenarios import scenario_proxy_recreate

    secure = "secure.example.test"  # a second host with its own certificate (HOST stays http)
    cert_pem, key_pem = make_cert([secure])
    config = bed.home / ".luma" / "luma-proxy-config"
    (config / "c.pem").write_bytes(cert_pem)
    (config / "k.pem").write_bytes(key_pem)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(cert_pem)

    def with_certificate() -> None:
        result = bed.exec("deploy", "--host", secure, "--target", f"{PROJECT}-web:{APP_PORT}",
                          "--project", PROJECT, "--tls-cert", "/tmp/c.pem", "--tls-key",
                          "/tmp/k.pem")
        assert (result.returncode, result.stderr) == (0, ""), result.stderr

    load, recreated, restarted = scenario_proxy_recreate(bed, with_certificate, keepalive=10,
                                                         fresh=2)
    print(f"\nproxy re-created under load: routed again after {recreated:.1f} s; "
          f"restarted: {restarted:.1f} s; {load.summary()}")
    assert recreated < 30 and restarted < 30
    # Back on the project network by itself (the Luma CLI's update does not connect it).
    networks = bed.engine.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}",
                                 bed.proxy).stdout
    assert bed.network in json.loads(networks)
    listed = json.loads(bed.exec("list", "--json").stdout)["services"]
    assert sorted(s["host"] for s in listed) == [HOST, secure]
    # The certificate came through both: the same one is served over HTTPS.
    certs = bed.home / ".luma" / "luma-proxy-certs"
    assert (certs / secure / "cert.pem").read_bytes() == cert_pem
    deadline = time.monotonic() + 15
    while (got := https_get(bed.https_port, secure, ca)).returncode != 0 \
            and time.monotonic() < deadline:
        time.sleep(0.3)
    assert got.returncode == 0 and got.stdout.startswith(bed.engine.prefix), got.stderr


def test_hardened_run_and_root_without_capabilities(engine: Engine, images: dict[str, str]
                                                    ) -> None:
    name, volume, port = engine.name("hardened"), engine.name("hardened-data"), free_port()
    network = engine.network("hardened-net")  # the bed's engine has no default bridge
    engine.docker("run", "-d", "--name", name, "--network", network, "--read-only",
                  "--tmpfs", "/tmp",
                  "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                  "--user", "10001:10001", "--sysctl", "net.ipv4.ip_unprivileged_port_start=0",
                  "-v", f"{volume}:/var/lib/luma-proxy", "-p", f"127.0.0.1:{port}:80",
                  images["proxy"])
    try:
        deadline = time.monotonic() + 30
        while True:
            got = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                  "-H", "Host: nothing.invalid", f"http://127.0.0.1:{port}/"],
                                 capture_output=True, text=True)
            if got.stdout == "404" or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert got.stdout == "404"
        result = engine.docker("exec", name, "luma-proxy", "deploy", "--host", "h.example.test",
                               "--target", "h:80", "--project", "p", check=False)
        assert (result.returncode, result.stderr) == (0, ""), result.stderr
        assert engine.docker("exec", name, "test", "-s",
                             "/var/lib/luma-proxy/state.db", check=False).returncode == 0
        # No Docker socket here: said in one line, and routing goes on from DNS alone.
        engine.docker("restart", name)  # run's start now has a route whose networks it lacks
        time.sleep(3)
        logs = engine.docker("logs", name, check=False)
        said = [line for line in (logs.stdout + logs.stderr).splitlines()
                if "/var/run/docker.sock not mounted" in line]
        assert len(said) == 2, logs.stdout[-2000:]  # once per start: the first and the restart
    finally:
        engine.docker("rm", "-f", name, check=False)
        engine.docker("volume", "rm", volume, check=False)
        engine.docker("network", "rm", network, check=False)
    # Root that cannot drop its privileges refuses to run at all.
    refused = engine.docker("run", "--rm", "--cap-drop", "ALL", images["proxy"], "list",
                            check=False)
    assert refused.returncode != 0 and "refusing to run as root" in refused.stderr
