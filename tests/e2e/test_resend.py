"""A request its container closed the connection under (no response byte) is sent again.

An app that stops closes its idle keep-alive connections; a request written on
one at that moment reached nothing. Idempotent requests are sent once more on a
new connection to another container (engine_patches: the resend seam); others
keep mitmproxy's 502, since the container may have acted on them.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import next_ip
from tests.e2e.docker_double import free_port


class Closer:
    """A container whose keep-alive connections end under their second request.

    /up is always answered (so it proves itself); any other request is answered
    200 the first time on a connection, and the connection is closed, unanswered,
    the second time: what a stopping app does to a request that raced its close.
    """

    def __init__(self, name: str, ip: str, port: int) -> None:
        self.name, self.ip, self.port = name, ip, port
        self.received: list[tuple[str, str]] = []  # (method, path) of non-/up requests
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        assert self.ready.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, self.ip,
                                                                   self.port))
        self.server = server
        self.ready.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path = head.split(b" ", 2)[:2]
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                if path != b"/up":
                    self.received.append((method.decode(), path.decode()))
                    seen += 1
                    if seen == 2:
                        writer.close()  # no answer: the connection just ends
                        return
                body = self.name.encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def closers(dns) -> Iterator[list[Closer]]:
    port = free_port()
    made = [Closer(f"app-{n}", next_ip(), port) for n in (1, 2)]
    dns.set_alias("app", [c.ip for c in made])
    yield made
    for c in made:
        c.stop()


def two_on_one_connection(port: int, method: str) -> list[int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    statuses = []
    for _ in range(2):
        body = b"x" if method in ("PUT", "POST") else None
        conn.request(method, "/thing", body=body, headers={"Host": "app.test"})
        r = conn.getresponse()
        r.read()
        statuses.append(r.status)
    conn.close()
    return statuses


@pytest.mark.parametrize("kind", ["run", "mitmdump"])
def test_an_idempotent_request_closed_under_is_served_by_another_container(
        closers, cli, start_proxy, kind):
    cli("deploy", "--host", "app.test", "--target", f"app:{closers[0].port}", "--project",
        "p", "--no-ssl")
    proxy = start_proxy(kind, env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    for method in ("GET", "PUT"):
        assert two_on_one_connection(proxy.port, method) == [200, 200], proxy.logs()
    # Each resent request reached both containers: the first closed under it.
    received = [r for c in closers for r in c.received]
    assert received.count(("GET", "/thing")) == 3 and received.count(("PUT", "/thing")) == 3


def test_a_post_is_never_sent_twice(closers, cli, start_proxy):
    cli("deploy", "--host", "app.test", "--target", f"app:{closers[0].port}", "--project",
        "p", "--no-ssl")
    proxy = start_proxy("run", env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    assert two_on_one_connection(proxy.port, "POST") == [200, 502]
    received = [r for c in closers for r in c.received]
    assert received.count(("POST", "/thing")) == 2  # the second reached one container, once
