"""Issue 15: with nothing to route to, a request is held for a container, then 503."""

from __future__ import annotations

import threading
import time

from tests.e2e.conftest import request
from tests.e2e.docker_double import free_port


def _deploy_empty_alias(dns, cli, alias: str = "blog") -> int:
    port = free_port()
    dns.set_alias(alias, [])  # the alias exists but no container answers yet
    cli("deploy", "--host", "blog.test", "--target", f"{alias}:{port}", "--project", "p")
    return port


def test_request_is_held_until_a_container_appears(dns, containers, cli, start_proxy,
                                                    proxy_kind):
    port = _deploy_empty_alias(dns, cli)
    proxy = start_proxy(proxy_kind, env={"LUMA_PROXY_HOLD_TIMEOUT": "8"})
    got = {}

    def send() -> None:
        started = time.monotonic()
        got["reply"] = request(proxy.port, "blog.test", timeout=20)
        got["took"] = time.monotonic() - started

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(1.0)
    c = containers("blog-1", port=port)
    dns.set_alias("blog", [c.ip])
    sender.join(20)
    assert (got["reply"].status, got["reply"].text) == (200, "blog-1"), got
    assert 0.9 < got["took"] < 8, got


def test_held_request_gets_503_with_retry_after_at_the_hold_timeout(dns, cli, start_proxy,
                                                                     proxy_kind):
    _deploy_empty_alias(dns, cli)
    proxy = start_proxy(proxy_kind, env={"LUMA_PROXY_HOLD_TIMEOUT": "1.5"})
    started = time.monotonic()
    reply = request(proxy.port, "blog.test", timeout=20)
    took = time.monotonic() - started
    assert reply.status == 503 and reply.headers["retry-after"].isdigit(), reply
    assert 1.4 < took < 6, took
