"""The production DNS path end to end: no LUMA_PROXY_DNS, so aliases go through the
system resolver (getaddrinfo), as inside Docker where /etc/resolv.conf names 127.0.0.11.
Here /etc/hosts answers ``localhost``; nothing leaves loopback."""

from __future__ import annotations

from tests.e2e.conftest import wait_until
from tests.e2e.docker_double import free_port


def test_routes_through_the_system_resolver(containers, cli, start_proxy, proxy_kind):
    port = free_port()
    containers("local-1", ip="127.0.0.1", port=port)
    cli("deploy", "--host", "local.test", "--target", f"localhost:{port}", "--project", "p")
    proxy = start_proxy(proxy_kind, env={"LUMA_PROXY_DNS": ""})  # unset: the system resolver

    wait_until(lambda: proxy.get("local.test").status == 200, timeout=10)
    assert proxy.get("local.test").text == "local-1"
