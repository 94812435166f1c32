"""Issue 16, per service: maintenance (stop, pause, resume), error pages, basic auth,
IP allow-lists. Each through a real ``luma-proxy run``; HTTP/2 where the protocol
carries what is checked (``authorization``, the 503 page)."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
from pathlib import Path

import bcrypt
import pytest

from tests.e2e.conftest import LUMA, Proxy, wait_until
from tests.e2e.docker_double import free_port
from tests.e2e.test_http2 import h2_connect, h2_exchange, req
from tests.e2e.test_https import cert_args


@pytest.fixture
def site(dns, containers, cli, start_proxy):
    """blog.test (and blog.test/api) served by one container; the proxy running."""
    port = free_port()
    container = containers("blog-1", port=port)
    dns.set_alias("blog", [container.ip])
    for extra in ((), ("--path-prefix", "/api")):
        cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p",
            "--no-ssl", *extra)
    proxy = start_proxy("run")
    wait_until(lambda: proxy.get("blog.test").status == 200)
    return proxy, port


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_stop_answers_503_with_the_message_then_resume(site, cli) -> None:
    proxy, _port = site
    out = cli("stop", "--host", "blog.test", "--message", "Back at <b>noon</b>").stdout
    assert out.splitlines() == ["✅ Stopped blog.test", "✅ Stopped blog.test/api"]
    # deploy/stop return once every proxy serves the change: no wait needed
    for path in ("/", "/api/x"):
        stopped = proxy.get("blog.test", path)
        assert stopped.status == 503
        assert "Back at &lt;b&gt;noon&lt;/b&gt;" in stopped.text  # escaped, never markup
        assert stopped.headers["retry-after"]
    listed = json.loads(cli("list", "--json").stdout)["services"]
    assert {s["mode"] for s in listed} == {"stopped"}
    assert "stopped (Back at <b>noon</b>)" in cli("list").stdout
    # health checks continue while stopped
    checked = listed[0]["health"]["checked_at"]
    wait_until(lambda: json.loads(cli("list", "--json").stdout)["services"][0]["health"][
        "checked_at"] != checked, timeout=10)
    assert cli("resume", "--host", "blog.test").stdout.splitlines()[0] == "✅ Resumed blog.test"
    assert proxy.get("blog.test").text == "blog-1"


def test_stop_survives_a_restart(site, cli, start_proxy) -> None:
    proxy, _port = site
    cli("stop", "--host", "blog.test")
    proxy.stop()
    again = start_proxy("run")
    assert wait_until(lambda: again.get("blog.test").status == 503)


def test_pause_holds_until_resume(site, cli) -> None:
    proxy, _port = site
    assert cli("pause", "--host", "blog.test", "--max-pause", "20s").stdout.splitlines()[0] \
        == "✅ Paused blog.test (requests held up to 20s)"
    answers: list[tuple[int, float]] = []

    def one() -> None:
        started = time.monotonic()
        reply = proxy.get("blog.test", timeout=30)
        answers.append((reply.status, time.monotonic() - started))

    waiting = threading.Thread(target=one)
    waiting.start()
    time.sleep(1.0)
    assert answers == []  # still held
    cli("resume", "--host", "blog.test")
    waiting.join(15)
    assert answers and answers[0][0] == 200 and answers[0][1] >= 1.0


def test_pause_gives_503_at_the_bound(site, cli) -> None:
    proxy, _port = site
    cli("pause", "--host", "blog.test", "--max-pause", "500ms")
    started = time.monotonic()
    reply = proxy.get("blog.test")
    assert reply.status == 503 and time.monotonic() - started >= 0.5


def test_error_pages_per_service_and_global(dns, containers, cli, start_proxy,
                                            tmp_path: Path) -> None:
    own, default = tmp_path / "own", tmp_path / "default"
    own.mkdir()
    default.mkdir()
    (own / "503.html").write_text("<h1>own 503: {{message}}</h1>")
    (default / "404.html").write_text("<h1>default 404</h1>")
    (tmp_path / "secret.txt").write_text("do not serve")
    (own / "502.html").symlink_to(tmp_path / "secret.txt")  # never followed out of the dir
    port = free_port()
    container = containers("blog-1", port=port)
    dns.set_alias("blog", [container.ip])
    cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p",
        "--no-ssl", "--error-pages", str(own))
    proxy = start_proxy("run", args=("--error-pages", str(default)))
    assert proxy.get("unknown.test").text == "<h1>default 404</h1>"
    cli("stop", "--host", "blog.test", "--message", "soon")
    stopped = proxy.get("blog.test")
    assert stopped.status == 503 and stopped.text == "<h1>own 503: soon</h1>"
    assert f"error pages {own}" in cli("list").stdout
    # a missing page falls back to the built-in one
    (own / "503.html").unlink()
    time.sleep(1.1)  # pages are looked at again at most once a second
    assert "soon" in proxy.get("blog.test").text
    assert "own 503" not in proxy.get("blog.test").text
    bad = cli("deploy", "--host", "x.test", "--target", f"blog:{port}", "--project", "p",
              "--no-ssl", "--error-pages", str(tmp_path / "secret.txt"), check=False)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
    refused = subprocess.run([LUMA, "run", "--error-pages", str(tmp_path / "nope"),
                              "--state", str(tmp_path / "s.json")],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1


def test_basic_auth(dns, containers, cli, start_proxy, tmp_path: Path) -> None:
    hashed = subprocess.run([LUMA, "hash-password"], input="s3cret\n", capture_output=True,
                            text=True, timeout=30, check=True).stdout.strip()
    assert bcrypt.checkpw(b"s3cret", hashed.encode())
    port = free_port()
    container = containers("blog-1", port=port)
    dns.set_alias("blog", [container.ip])
    tls = cert_args(tmp_path, ["blog.test"])
    cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p",
        "--basic-auth", f"admin:{hashed}", *tls)
    https_port = free_port()
    proxy: Proxy = start_proxy("run", args=("--https-port", str(https_port)))
    s, conn = h2_connect(https_port, "blog.test")
    try:
        none = h2_exchange(s, conn, 1, req("/", "blog.test"))
        wrong = h2_exchange(s, conn, 3, req("/", "blog.test", extra=[
            ("authorization", basic("admin", "nope")["Authorization"])]))
        right = h2_exchange(s, conn, 5, req("/headers", "blog.test", extra=[
            ("authorization", basic("admin", "s3cret")["Authorization"])]))
        again = h2_exchange(s, conn, 7, req("/", "blog.test", extra=[
            ("authorization", basic("admin", "s3cret")["Authorization"])]))
    finally:
        s.close()
    assert none.status == 401
    assert none.headers[b"www-authenticate"] == b'Basic realm="blog.test", charset="UTF-8"'
    assert wrong.status == 401
    assert right.status == 200 and again.status == 200
    # the container gets the request (the header is for the app to see as well)
    assert json.loads(right.body)["container"] == "blog-1"
    assert "s3cret" not in proxy.logs() and "Basic " not in proxy.logs()
    listed = json.loads(cli("list", "--json").stdout)["services"][0]
    assert listed["basic_auth"] == ["admin"] and hashed not in cli("list", "--json").stdout


def test_allow_list_with_trusted_proxies(dns, containers, cli, start_proxy) -> None:
    port = free_port()
    container = containers("blog-1", port=port)
    dns.set_alias("blog", [container.ip])
    cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p",
        "--no-ssl", "--allow", "10.1.0.0/16", "--allow", "::1")
    proxy = start_proxy("run", args=("--trusted-proxies", "127.0.0.0/8"))
    assert proxy.get("blog.test").status == 403  # 127.0.0.1 itself is not allowed
    assert proxy.get("blog.test", headers={"X-Forwarded-For": "10.1.2.3"}).text == "blog-1"
    assert proxy.get("blog.test", headers={"X-Forwarded-For": "10.2.0.1"}).status == 403
    # a client cannot hide behind an address it puts first itself
    spoofed = proxy.get("blog.test", headers={"X-Forwarded-For": "10.1.2.3, 10.9.9.9"})
    assert spoofed.status == 403
    assert "allow 10.1.0.0/16 ::1/128" in cli("list").stdout


def test_stop_and_resume_reach_every_worker_when_the_cli_returns(dns, containers, cli,
                                                                  start_proxy) -> None:
    port = free_port()
    container = containers("blog-1", port=port)
    dns.set_alias("blog", [container.ip])
    cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p",
        "--no-ssl")
    proxy = start_proxy("run", args=("--workers", "2"))
    wait_until(lambda: proxy.get("blog.test").status == 200)
    cli("stop", "--host", "blog.test")
    # new connections land on either worker (SO_REUSEPORT): each must already say 503
    assert {proxy.get("blog.test").status for _ in range(20)} == {503}
    cli("resume", "--host", "blog.test")
    assert {proxy.get("blog.test").status for _ in range(20)} == {200}
