"""A proxy's memory per WebSocket stays bounded (issue 13, point 14).

mitmproxy keeps every message of a WebSocket in ``flow.websocket.messages``:
200 x 1 MiB each way through one socket cost the proxy about 425 MB, for as
long as the flow lived. ``luma_proxy/websocket.py`` trims that list; these
tests send large messages through a real proxy process and read its resident
set size (run with ``-s`` to see the figures; docs/security.md quotes them).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from websockets.sync.client import connect

from tests.e2e.docker_double import free_port

MIB = 1 << 20
COUNT = 200  # messages of 1 MiB each way on the first socket
SECOND = 50  # and on a second one, after the first has closed
# Without the trimming the first socket alone keeps 2 x 200 MiB (measured: about
# +425 MB); with it the growth is a few tens of MB (buffers, allocator slack).
MAX_GROWTH = 150 * MIB


def rss(pid: int) -> int:
    """The process's resident set size in bytes (``VmRSS`` of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def payload(i: int) -> bytes:
    """1 MiB, distinct per message (its index first), cheap to build."""
    return i.to_bytes(4, "big") + os.urandom(64) * ((MIB - 4) // 64) + b"\x00" * ((MIB - 4) % 64)


def echo_many(port: int, count: int, start: int = 0) -> tuple[int, int]:
    """Send ``count`` messages of 1 MiB over a new socket, one at a time; (sent, echoed intact)."""
    sock = socket.create_connection(("127.0.0.1", port))
    intact = 0
    with connect(f"ws://ws.test:{port}/ws", sock=sock, max_size=None, open_timeout=10,
                 compression=None) as ws:
        for i in range(start, start + count):
            data = payload(i)
            ws.send(data)
            if ws.recv(timeout=20) == b"ws-1: " + data:  # the container echoes what it got
                intact += 1
    return count, intact


@pytest.fixture
def ws_site(dns, containers, cli) -> None:
    port = free_port()
    app = containers("ws-1", port=port)
    dns.set_alias("ws", [app.ip])
    cli("deploy", "--host", "ws.test", "--target", f"ws:{port}", "--project", "p", "--no-ssl")


def measure(proxy_pid: int, port: int) -> dict[str, int]:
    """RSS before, with the first socket's messages through, and after a second socket."""
    sent, intact = echo_many(port, 1)  # warm up: the WebSocket path and its buffers
    assert intact == sent
    before = rss(proxy_pid)
    sent, intact = echo_many(port, COUNT)
    assert intact == sent == COUNT
    first = rss(proxy_pid)
    sent, intact = echo_many(port, SECOND, start=COUNT)
    assert intact == sent == SECOND
    second = rss(proxy_pid)
    figures = {"before": before, "first": first, "second": second}
    print(f"\nproxy RSS (MB): {', '.join(f'{k} {v / 1e6:.0f}' for k, v in figures.items())}"
          f"; {COUNT + SECOND} x 1 MiB sent each way")
    return figures


def test_memory_per_websocket_is_bounded_under_run(ws_site, start_proxy) -> None:
    """No message is kept under ``luma-proxy run``: the proxy's memory does not follow the data."""
    proxy = start_proxy("run")
    figures = measure(proxy.proc.pid, proxy.port)
    assert figures["first"] - figures["before"] < MAX_GROWTH
    assert figures["second"] - figures["before"] < MAX_GROWTH  # freed memory is reused


def test_a_small_tail_is_kept_under_mitmdump(ws_site, start_proxy) -> None:
    """mitmdump (and mitmweb, which shows them) keep a small tail; it is bounded too."""
    proxy = start_proxy("mitmdump", env={"LUMA_PROXY_WEBSOCKET_KEEP": "10"})
    figures = measure(proxy.proc.pid, proxy.port)
    assert figures["first"] - figures["before"] < MAX_GROWTH
    assert figures["second"] - figures["before"] < MAX_GROWTH
