"""The core, end to end: Host -> alias -> container, through both entry points."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from luma_proxy.store.registry import Store, db_path
from tests.e2e.conftest import LUMA, request, wait_until
from tests.e2e.docker_double import free_port


def deploy_alias(dns, containers, cli, host: str, alias: str, names: list[str], **kw):
    port = free_port()
    cs = [containers(n, port=port) for n in names]
    dns.set_alias(alias, [c.ip for c in cs])
    cli(
        "deploy",
        "--host",
        host,
        "--target",
        f"{alias}:{port}",
        "--project",
        "p",
        *kw.get("args", ()),
    )
    return cs


def test_routes_by_host_and_keeps_host_header(dns, containers, cli, start_proxy, proxy_kind):
    deploy_alias(dns, containers, cli, "blog.test", "blog", ["blog-blue-1"])
    deploy_alias(dns, containers, cli, "shop.test", "shop", ["shop-blue-1"])
    proxy = start_proxy(proxy_kind)

    assert proxy.get("blog.test").text == "blog-blue-1"
    assert proxy.get("shop.test").text == "shop-blue-1"
    assert proxy.get("BLOG.test.:80").text == "blog-blue-1"  # case, trailing dot, port

    seen = json.loads(
        proxy.get(
            "blog.test",
            "/headers",
            headers={
                "X-Forwarded-For": "6.6.6.6",
                "X-Real-IP": "6.6.6.6",
                "X-Forwarded-Host": "evil.test",
            },
        ).body
    )
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["host"] == "blog.test"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-real-ip"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "blog.test"


def test_unknown_host_gets_short_404(dns, containers, cli, start_proxy, proxy_kind):
    deploy_alias(dns, containers, cli, "blog.test", "blog", ["blog-1"])
    proxy = start_proxy(proxy_kind)
    reply = proxy.get("other.test")
    assert reply.status == 404
    assert b"blog" not in reply.body and b"127.0." not in reply.body
    assert proxy.get(None).status == 400


def test_cli_changes_are_served_within_a_second(dns, containers, cli, start_proxy, proxy_kind):
    proxy = start_proxy(proxy_kind)
    assert proxy.get("new.test").status == 404
    port = free_port()
    c = containers("new-1", port=port)
    dns.set_alias("new", [c.ip])
    cli("deploy", "--host", "new.test", "--target", f"new:{port}", "--project", "p")
    deployed = time.monotonic()
    wait_until(lambda: proxy.get("new.test").status == 200, timeout=5)
    assert time.monotonic() - deployed < 1.0

    cli("remove", "--host", "new.test")
    removed = time.monotonic()
    wait_until(lambda: proxy.get("new.test").status == 404, timeout=5)
    assert time.monotonic() - removed < 1.0


def test_unhealthy_service_gets_503_then_recovers(dns, containers, cli, start_proxy, proxy_kind):
    (c,) = deploy_alias(dns, containers, cli, "blog.test", "blog", ["blog-1"])
    (other,) = deploy_alias(dns, containers, cli, "shop.test", "shop", ["shop-1"])
    proxy = start_proxy(proxy_kind)  # health interval 1 s
    assert proxy.get("blog.test").status == 200

    c.healthy = False
    reply = wait_until(lambda: (r := proxy.get("blog.test")).status == 503 and r, timeout=10)
    assert reply.headers["retry-after"].isdigit()
    assert b"127.0." not in reply.body
    assert proxy.get("shop.test").text == "shop-1"  # one service's fault stays its own
    listed = json.loads(cli("list", "--json").stdout)["services"]
    blog = next(s for s in listed if s["host"] == "blog.test")
    assert blog["health"]["healthy"] is False and blog["health"]["last_error"] == "HTTP 503"
    assert "unhealthy" in cli("list").stdout

    c.healthy = True
    wait_until(lambda: proxy.get("blog.test").status == 200, timeout=10)
    assert other.requests >= 1


def test_upstream_failure_is_502_without_internals(dns, containers, cli, start_proxy, proxy_kind):
    (c,) = deploy_alias(dns, containers, cli, "blog.test", "blog", ["blog-1"])
    proxy = start_proxy(proxy_kind, env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    assert proxy.get("blog.test").status == 200
    c.kill()  # the container dies between two health checks
    reply = proxy.get("blog.test")
    assert reply.status == 502
    for leak in (c.ip.encode(), b"Errno", b"mitmproxy", b"Traceback", b"refused"):
        assert leak not in reply.body
    assert "mitmproxy" not in reply.headers.get("server", "")
    # The dead IP is now out of rotation: the next request is answered 503 at once.
    assert proxy.get("blog.test").status == 503


def break_row(state_path: Path, host: str) -> None:
    """A row that does not validate (a hand edit, a newer writer), straight into the database."""
    with contextlib.closing(sqlite3.connect(db_path(state_path))) as db, db:
        db.execute("UPDATE services SET data = ?, gen = gen + 1000 WHERE host = ?",
                   (json.dumps({"host": host, "target": "nope"}), host))
        db.execute("UPDATE meta SET value = value + 1000 WHERE key = 'routes'")


def test_invalid_row_keeps_last_good_route_until_deploy_force(
        dns, containers, cli, start_proxy, state_path):
    deploy_alias(dns, containers, cli, "blog.test", "blog", ["blog-1"])
    proxy = start_proxy("run", env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    assert proxy.get("blog.test").status == 200
    break_row(state_path, "blog.test")
    wait_until(lambda: "service 'blog.test' is invalid" in proxy.logs(), timeout=5)
    time.sleep(1)  # several reloads later
    assert proxy.get("blog.test").text == "blog-1"
    assert proxy.logs().count("service 'blog.test' is invalid") == 1  # once, not per poll
    assert proxy.proc.poll() is None
    result = cli("list", check=False)
    assert result.returncode != 0 and "blog.test" in result.stderr and "invalid" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    # Other hosts can still be deployed, and are served.
    deploy_alias(dns, containers, cli, "shop.test", "shop", ["shop-1"])
    wait_until(lambda: proxy.get("shop.test").text == "shop-1", timeout=5)
    assert proxy.get("blog.test").text == "blog-1"
    # Whose host it is cannot be read: a plain deploy says how to replace it ...
    refused = cli("deploy", "--host", "blog.test", "--target", "blog:1", "--project", "p",
                  check=False)
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1
    assert "is invalid" in refused.stderr and "--force" in refused.stderr
    # ... and deploy --force does.
    deploy_alias(dns, containers, cli, "blog.test", "blog2", ["blog-2"], args=("--force",))
    wait_until(lambda: proxy.get("blog.test").text == "blog-2", timeout=5)
    assert "blog2:" in cli("list").stdout
    assert "Traceback" not in proxy.logs()


KILLED_WRITER = """
import os, sys
from luma_proxy.models import Service
from luma_proxy.store.registry import Store

with Store(sys.argv[1]).transaction() as tx:
    for i in range(2000):
        tx.put(Service(name="w", host=f"w{i}.test", target="web:80", project="p", ssl=False))
    print("written", flush=True)
    sys.stdin.readline()  # holds the write transaction open until told
    os.kill(os.getpid(), 9)
"""


def test_writer_killed_mid_transaction_changes_nothing(
        dns, containers, cli, start_proxy, state_path):
    deploy_alias(dns, containers, cli, "blog.test", "blog", ["blog-1"])
    proxy = start_proxy("run", env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    assert proxy.get("blog.test").status == 200
    generation = Store(state_path).generation()
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(state_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline() == "written\n"
        # While it holds its transaction, readers go on: the proxy serves, list lists.
        assert proxy.get("blog.test").text == "blog-1"
        assert "blog.test" in cli("list").stdout
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.wait(10) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    time.sleep(0.6)  # several reloads later
    assert proxy.proc.poll() is None
    assert proxy.get("blog.test").text == "blog-1"
    for host in ("w0.test", "w1999.test"):
        assert proxy.get(host).status == 404
    listed = json.loads(cli("list", "--json").stdout)["services"]
    assert [s["host"] for s in listed] == ["blog.test"]
    assert Store(state_path).generation() == generation
    # The lock it held died with it: the next writer goes on at once.
    started = time.monotonic()
    deploy_alias(dns, containers, cli, "shop.test", "shop", ["shop-1"])
    assert time.monotonic() - started < 5
    wait_until(lambda: proxy.get("shop.test").text == "shop-1", timeout=5)
    logs = proxy.logs()
    assert "Traceback" not in logs and "keeping the last good routes" not in logs


def test_restart_starts_from_last_observed_health(dns, containers, cli, start_proxy):
    port = free_port()
    c = containers("blog-1", port=port)
    dns.set_alias("blog", [c.ip])
    # The health check takes 3 s, so the first answers come from the stored health.
    cli(
        "deploy",
        "--host",
        "blog.test",
        "--target",
        f"blog:{port}",
        "--project",
        "p",
        "--health-path",
        "/slow?s=3",
    )
    cli("updatehealth", "--host", "blog.test", "--healthy", "false")
    proxy = start_proxy("run", env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    assert proxy.get("blog.test").status == 503  # not "pending", not routed
    wait_until(lambda: proxy.get("blog.test").status == 200, timeout=10)
    proxy.stop()

    # Now the stored health says healthy: a restarted proxy serves at once.
    proxy = start_proxy("run", env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    assert proxy.get("blog.test").status == 200


def test_keep_alive_client_is_served_repeatedly(dns, containers, cli, start_proxy, proxy_kind):
    import http.client

    deploy_alias(dns, containers, cli, "blog.test", "blog", ["blog-1"])
    proxy = start_proxy(proxy_kind)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    for _ in range(20):  # DESIGN.md: rewriting the server address hung the 6th request
        assert request(proxy.port, "blog.test", conn=conn).text == "blog-1"
    conn.close()


def test_port_in_use_is_one_line_and_nonzero(start_proxy, tmp_path):
    proxy = start_proxy("run")
    result = subprocess.run(
        [
            LUMA,
            "run",
            "--http-port",
            str(proxy.port),
            "--listen-host",
            "127.0.0.1",
            "--state",
            str(tmp_path / "x.json"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "cannot listen" in result.stderr


def test_unhealthy_service_is_rechecked_often_not_once_per_interval(
        dns, containers, cli, start_proxy) -> None:
    # The alias does not resolve yet when the proxy starts (the network is connected
    # a moment later, as in a container restart): one failed check must not mean a
    # whole interval (here 600 s) of 503.
    port = free_port()
    c = containers("blog-1", port=port)
    cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p")
    proxy = start_proxy("run", env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    wait_until(lambda: proxy.get("blog.test").status == 503, timeout=10)
    dns.set_alias("blog", [c.ip])
    healed = time.monotonic()
    wait_until(lambda: proxy.get("blog.test").status == 200, timeout=15)
    assert time.monotonic() - healed < 10


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _uses_uvloop(pid: int) -> bool:
    return "/uvloop/" in Path(f"/proc/{pid}/maps").read_text()


def test_run_serves_optimized_on_uvloop_and_each_can_be_turned_off(dns, containers, cli,
                                                                   start_proxy):
    """`luma-proxy run` serves from the same PID under PYTHONOPTIMIZE=1, on uvloop (startup.py)."""
    deploy_alias(dns, containers, cli, "blog.test", "blog", ["blog-blue-1"])
    optimized = start_proxy("run")
    assert optimized.get("blog.test").text == "blog-blue-1"
    assert _environ(optimized.proc.pid).get("PYTHONOPTIMIZE") == "1"
    assert _uses_uvloop(optimized.proc.pid)

    plain = start_proxy("run", env={"LUMA_PROXY_OPTIMIZE": "0", "PYTHONOPTIMIZE": "",
                                    "LUMA_PROXY_DISPATCH": "mitmproxy",
                                    "LUMA_PROXY_EVENT_LOOP": "asyncio"})
    assert plain.get("blog.test").text == "blog-blue-1"
    assert _environ(plain.proc.pid).get("PYTHONOPTIMIZE", "") == ""
    assert not _uses_uvloop(plain.proc.pid)


def test_run_refuses_an_unknown_event_loop(tmp_path):
    result = subprocess.run(
        [LUMA, "run", "--http-port", str(free_port()), "--listen-host", "127.0.0.1",
         "--state", str(tmp_path / "x.json")],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "LUMA_PROXY_EVENT_LOOP": "trio"},
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "Error: LUMA_PROXY_EVENT_LOOP must be one of uvloop, asyncio, not 'trio'"]


def test_large_bodies_stream_through_with_bounded_memory(dns, containers, cli, start_proxy):
    """Sized and unsized bodies far over the proxy's memory pass through, in both directions."""
    import http.client

    deploy_alias(dns, containers, cli, "big.test", "big", ["big-1"])
    proxy = start_proxy("run")
    assert proxy.get("big.test").status == 200

    def rss_kib(field: str) -> int:
        status = Path(f"/proc/{proxy.proc.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith(field)).split()[1])

    before = rss_kib("VmRSS:")
    size = 256 << 20
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    conn.request("GET", f"/bytes?n={size}", headers={"Host": "big.test"})
    response = conn.getresponse()
    got = 0
    while chunk := response.read(1 << 20):
        got += len(chunk)
    assert (response.status, got) == (200, size)
    body = (b"x" * (1 << 20) for _ in range(size >> 20))
    conn.request("POST", "/upload", body=body, headers={"Host": "big.test",
                                                        "Content-Length": str(size)})
    assert json.loads(conn.getresponse().read())["received"] == size
    chunks = (b"y" * (1 << 20) for _ in range(64))
    conn.request("PUT", "/upload", body=chunks, encode_chunked=True, headers={"Host": "big.test"})
    assert json.loads(conn.getresponse().read())["received"] == 64 << 20
    conn.close()
    # Buffering any of them would have taken 64-256 MiB; the peak stays well below.
    assert rss_kib("VmHWM:") - before < 48 * 1024, (before, rss_kib("VmHWM:"))
