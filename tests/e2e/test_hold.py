"""New containers prove themselves first; with nothing to route to, requests wait.

On the Docker double, where timing is exact: a container that joins the alias
with its app not ready gets nothing until ``/up`` passes; a single replica
redeployed with a gap loses nothing (its requests are held); a hold that ends
with no container is a 503 with ``Retry-After``, counted in the access log.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field

from tests.e2e.conftest import request, wait_until
from tests.e2e.docker_double import free_port


@dataclass
class Load:
    """Closed-loop clients (keep-alive and new-connection) recording every outcome."""

    port: int
    host: str
    outcomes: list[tuple[float, int | str, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def client(self, keepalive: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                r = request(self.port, self.host, conn=conn if keepalive else None, timeout=20)
                self.outcomes.append((sent, r.status, r.text.split()[0] if r.body else ""))
            except OSError as e:
                self.outcomes.append((sent, type(e).__name__, ""))
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        conn.close()

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self.client, args=(ka,), daemon=True)
                        for ka in (True, True, True, False)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def failed(self) -> list[tuple[float, int | str, str]]:
        return [o for o in self.outcomes if o[1] != 200]


def test_a_container_joining_with_its_app_not_ready_gets_nothing_until_it_passes(
        dns, containers, cli, start_proxy):
    port = free_port()
    old = containers("blog-old", port=port)
    dns.set_alias("blog", [old.ip])
    cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p",
        "--no-ssl")
    proxy = start_proxy("run", env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    assert proxy.get("blog.test").text.startswith("blog-old")
    booting = containers("blog-new", port=port, healthy=False)  # / answers, /up 503
    dns.set_alias("blog", [old.ip, booting.ip])  # as the Luma CLI starts it: with the alias
    with Load(proxy.port, "blog.test") as load:
        time.sleep(2)
        assert booting.served == 0  # probed (503), never given a request
        booting.healthy = True
        wait_until(lambda: booting.served > 0, timeout=3)  # proven: in rotation
    assert load.failed() == [] and len(load.outcomes) > 50


def test_a_single_replica_redeployed_with_a_gap_loses_nothing(
        dns, containers, cli, start_proxy, tmp_path):
    port = free_port()
    first = containers("blog-1", port=port)
    dns.set_alias("blog", [first.ip])
    cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p",
        "--no-ssl")
    proxy = start_proxy("run", env={"LUMA_PROXY_HOLD_TIMEOUT": "10",
                                    "LUMA_PROXY_HEALTH_INTERVAL": "1"})
    assert proxy.get("blog.test").status == 200
    with Load(proxy.port, "blog.test") as load:
        time.sleep(1)
        dns.set_alias("blog", [])  # docker stop: the name leaves DNS ...
        first.stop(graceful=True, grace=5)  # ... and the app finishes what it has
        time.sleep(3)  # no container at all; a health round sees it meanwhile
        second = containers("blog-2", port=port)
        dns.set_alias("blog", [second.ip])
        wait_until(lambda: second.served > 20, timeout=10)
    assert load.failed() == [], load.failed()[:5]
    served_by = {o[2] for o in load.outcomes}
    assert served_by == {"blog-1", "blog-2"}
    held = [line for line in proxy.logs().splitlines() if " held=" in line]
    assert held and all(" 200 " in line for line in held)


def test_a_hold_with_no_container_ends_in_503_with_retry_after(
        dns, containers, cli, start_proxy):
    port = free_port()
    cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p",
        "--no-ssl")  # the alias has no container yet
    proxy = start_proxy("run", env={"LUMA_PROXY_HOLD_TIMEOUT": "2",
                                    "LUMA_PROXY_HEALTH_INTERVAL": "600"})
    started = time.monotonic()
    reply = proxy.get("blog.test")
    took = time.monotonic() - started
    assert reply.status == 503 and reply.headers["retry-after"]
    assert 2 <= took < 4
    # A first deploy is routed as soon as its container passes: held, then served.
    late = containers("blog-1", port=port)
    timer = threading.Timer(1.0, dns.set_alias, ("blog", [late.ip]))
    timer.start()
    started = time.monotonic()
    reply = proxy.get("blog.test")
    assert reply.status == 200 and reply.text.startswith("blog-1")
    assert 1 <= time.monotonic() - started < 2.5
    assert [line for line in proxy.logs().splitlines() if " held=" in line]


def test_an_app_that_says_it_is_unhealthy_is_503_at_once_not_held(
        dns, containers, cli, start_proxy):
    port = free_port()
    sick = containers("blog-1", port=port, healthy=False)
    dns.set_alias("blog", [sick.ip])
    cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p",
        "--no-ssl")
    proxy = start_proxy("run", env={"LUMA_PROXY_HOLD_TIMEOUT": "10",
                                    "LUMA_PROXY_HEALTH_INTERVAL": "1"})
    wait_until(lambda: "blog.test is now unhealthy (HTTP 503)" in proxy.logs(), timeout=10)
    started = time.monotonic()
    assert proxy.get("blog.test").status == 503
    assert time.monotonic() - started < 1
