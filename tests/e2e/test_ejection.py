"""Passive ejection never outlives the container it was for (issue 14 point 5).

On the Docker double: a single replica that refused connects for a while (its
ejection backed off to 8 s and more) is served as soon as its health check
passes again; an IP whose container was replaced by a healthy one on the same
address (Docker reuses addresses) is served at once, not after the dead
container's backoff. (The second passes on the code before issue 14.5 too: with
an alias target the proving probe already lifted the ejection; it guards that
the forgetting added since, on the IP leaving the alias, keeps it so.)
"""

from __future__ import annotations

import time

from tests.e2e.conftest import next_ip, request, wait_until
from tests.e2e.docker_double import free_port


def refuse_for(proxy_port: int, host: str, seconds: float) -> list[int]:
    """Requests while the only container refuses: each fails, and the ejection backs off."""
    statuses, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        statuses.append(request(proxy_port, host, timeout=15).status)
        time.sleep(0.1)
    return statuses


def test_a_flapped_single_replica_is_served_once_its_health_check_passes(
        containers, cli, start_proxy):
    ip, port = next_ip(), free_port()
    app = containers("blog-1", ip=ip, port=port)
    cli("deploy", "--host", "blog.test", "--target", f"{ip}:{port}", "--project", "p",
        "--no-ssl")  # an IP target: nothing but health checks and time lift an ejection
    proxy = start_proxy("run", env={"LUMA_PROXY_HOLD_TIMEOUT": "1",
                                    "LUMA_PROXY_HEALTH_INTERVAL": "1"})
    assert proxy.get("blog.test").status == 200
    app.kill()  # refuses: ejected for 2 s, then 4, then 8 ...
    statuses = refuse_for(proxy.port, "blog.test", 8)
    assert 200 not in statuses and "out of rotation for 8s" in proxy.logs()
    containers("blog-1", ip=ip, port=port)  # back, on the same address
    # (the first "now healthy" line is from the proxy's start)
    try:
        wait_until(lambda: proxy.logs().count("blog.test is now healthy") >= 2, timeout=5)
    except AssertionError:
        raise AssertionError(f"no passing health check seen:\n{proxy.logs()[-4000:]}") from None
    # Its ejection still has about 7 s to run: before, the request was held for the
    # hold (1 s) and got 503. Now it is served, and at once: never held.
    reply = proxy.get("blog.test")
    assert reply.status == 200 and reply.text.startswith("blog-1")
    wait_until(lambda: " 200 GET blog.test " in proxy.logs().split("is now healthy")[-1],
               timeout=5)
    served = proxy.logs().split("is now healthy")[-1]
    assert "held=" not in served, served


def test_a_container_reusing_an_ejected_ip_is_served_at_once(
        dns, containers, cli, start_proxy):
    ip, port = next_ip(), free_port()
    old = containers("blog-old", ip=ip, port=port)
    dns.set_alias("blog", [ip])
    cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p",
        "--no-ssl")
    proxy = start_proxy("run", env={"LUMA_PROXY_HOLD_TIMEOUT": "1",
                                    "LUMA_PROXY_HEALTH_INTERVAL": "600"})
    assert proxy.get("blog.test").text.startswith("blog-old")
    old.kill()  # refuses while still in DNS: ejected
    statuses = refuse_for(proxy.port, "blog.test", 3)
    assert 200 not in statuses and "out of rotation for" in proxy.logs()
    dns.set_alias("blog", [])  # docker rm: the address leaves the alias ...
    time.sleep(1.5)  # (the DNS cache)
    assert proxy.get("blog.test").status == 503
    containers("blog-new", ip=ip, port=port)  # ... and the next container gets it
    dns.set_alias("blog", [ip])
    time.sleep(1.2)  # the DNS cache
    started = time.monotonic()
    reply = proxy.get("blog.test")
    assert reply.status == 200 and reply.text.startswith("blog-new")
    assert time.monotonic() - started < 1, proxy.logs()[-700:]
