"""Issue 15: a black-holed container IP costs a race delay, not a hung or failed request."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import request, wait_until
from tests.e2e.test_routing import deploy_alias


@contextlib.contextmanager
def black_hole(ip: str, port: int) -> Iterator[None]:
    """A listener whose accept queue is full: the kernel drops further SYNs, connects hang."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((ip, port))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((ip, port))
            fillers.append(s)
        time.sleep(0.1)
        probe = socket.socket()
        probe.settimeout(0.5)
        with pytest.raises(TimeoutError):  # the black hole is real: a connect hangs
            probe.connect((ip, port))
        probe.close()
        yield
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_black_holed_ip_is_raced_and_requests_stay_fast(dns, containers, cli, start_proxy,
                                                        proxy_kind):
    live, dead = deploy_alias(dns, containers, cli, "blog.test", "blog", ["blog-1", "blog-2"])
    proxy = start_proxy(proxy_kind, env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    wait_until(lambda: {proxy.get("blog.test").text for _ in range(6)} == {"blog-1", "blog-2"},
               timeout=10)
    dead.kill()
    with black_hole(dead.ip, dead.port):
        took = []
        for _ in range(12):  # a new client connection each: each opens a new upstream connect
            started = time.monotonic()
            reply = request(proxy.port, "blog.test", timeout=10)
            took.append(time.monotonic() - started)
            assert (reply.status, reply.text) == (200, live.name), reply
        # Without the race a connect to the black hole hangs (SYN retransmits at 1 s, 3 s...)
        # until the retry deadline: 5 s. With it, it costs the race delay (0.25 s).
        assert max(took) < 1.5, took
