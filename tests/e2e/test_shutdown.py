"""SIGTERM: stop accepting, finish what is in flight, close idle connections, exit 0."""

from __future__ import annotations

import http.client
import re
import signal
import socket
import threading
import time

from tests.e2e.conftest import request, wait_until
from tests.e2e.docker_double import free_port


def deploy(dns, containers, cli) -> None:
    port = free_port()
    c = containers("blog-1", port=port)
    dns.set_alias("blog", [c.ip])
    cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p",
        "--no-ssl")


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_sigterm_drains_in_flight_and_closes_idle(dns, containers, cli, start_proxy) -> None:
    deploy(dns, containers, cli)
    proxy = start_proxy("run")
    idle = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    assert request(proxy.port, "blog.test", conn=idle).status == 200  # now idle keep-alive

    slow: list[object] = []
    t = threading.Thread(target=lambda: slow.append(proxy.get("blog.test", "/slow?s=3")))
    t.start()
    time.sleep(0.5)  # the slow request is in flight
    sent = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)

    wait_until(lambda: refused(proxy.port), timeout=3)  # no new connections
    idle.sock.settimeout(5)
    assert idle.sock.recv(1) == b""  # the idle keep-alive connection was closed
    t.join(10)
    assert slow and slow[0].status == 200 and slow[0].text == "blog-1"  # type: ignore[attr-defined]
    assert slow[0].headers.get("connection") == "close"  # type: ignore[attr-defined]
    assert proxy.proc.wait(10) == 0
    assert time.monotonic() - sent < 8
    assert "draining" in proxy.logs()
    # The access line of the request that finished while draining was written before exit.
    assert re.search(r" 200 GET blog\.test /slow ", proxy.logs()), proxy.logs()


def test_drain_timeout_bounds_the_wait(dns, containers, cli, start_proxy) -> None:
    deploy(dns, containers, cli)
    proxy = start_proxy("run", env={"LUMA_PROXY_DRAIN_TIMEOUT": "1"})
    t = threading.Thread(target=lambda: proxy.get("blog.test", "/slow?s=20", timeout=30),
                         daemon=True)
    t.start()
    time.sleep(0.5)
    sent = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(15) == 0
    assert time.monotonic() - sent < 6  # 1 s drain timeout, not the request's 20 s
    assert "drain timeout" in proxy.logs()
