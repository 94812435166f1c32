"""Gone means gone, with DNS alone (no Docker socket).

When a container's IP leaves its alias's answer, the proxy's idle pooled
connections to it are closed, never reused; one with a request in flight is
left to finish.
"""

from __future__ import annotations

import http.client
import threading
import time

from tests.e2e.conftest import request, wait_until
from tests.e2e.docker_double import free_port


def test_idle_connections_to_an_ip_that_left_the_alias_are_closed(
        dns, containers, cli, start_proxy, proxy_kind):
    port = free_port()
    old, new = containers("blog-old", port=port), containers("blog-new", port=port)
    dns.set_alias("blog", [old.ip])
    cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p",
        "--no-ssl")
    proxy = start_proxy(proxy_kind, env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    clients = [http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
               for _ in range(3)]
    for conn in clients:  # three client connections, each with a pooled one to old
        assert request(proxy.port, "blog.test", conn=conn).text == "blog-old"
    slow = threading.Thread(target=lambda: request(proxy.port, "blog.test", "/slow?s=3"))
    slow.start()  # ... and one more with a request in flight
    wait_until(lambda: old.in_flight == 1, timeout=5)
    pooled = old.open_connections
    assert pooled >= 4

    dns.set_alias("blog", [new.ip])
    time.sleep(1.2)  # the DNS cache
    assert request(proxy.port, "blog.test").text == "blog-new"  # the new answer is seen
    # The idle ones are closed at once; the busy one finishes.
    wait_until(lambda: old.open_connections == 1, timeout=5)
    slow.join(10)
    for conn in clients:  # those clients go on, to the new container
        assert request(proxy.port, "blog.test", conn=conn).text == "blog-new"
        conn.close()
