"""Shared fixtures for end-to-end tests: the proxy as a real subprocess on a
loopback port, Docker's DNS played by ``FakeDockerDNS``, containers played by
HTTP servers on distinct 127.x addresses, and the CLI run as a subprocess."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.docker_double import Container, FakeDockerDNS, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LUMA = str(BIN / "luma-proxy")
MITMDUMP = str(BIN / "mitmdump")

_ips = itertools.count(1)


def next_ip() -> str:
    """A fresh loopback address per container, so containers never share one."""
    n = next(_ips)
    return f"127.0.{10 + n // 250}.{n % 250 + 1}"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def request(
    port: int,
    host: str | None,
    path: str = "/",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10,
    conn: http.client.HTTPConnection | None = None,
) -> Reply:
    """One HTTP/1.1 request to the proxy; pass ``conn`` to reuse a keep-alive connection."""
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    if host is not None:
        c.putheader("Host", host)
    for k, v in (headers or {}).items():
        c.putheader(k, v)
    if body is not None:
        c.putheader("Content-Length", str(len(body)))
    c.endheaders(body)
    r = c.getresponse()
    reply = Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    if conn is None:
        c.close()
    return reply


@dataclass
class Proxy:
    """A running proxy process."""

    proc: subprocess.Popen[bytes]
    port: int
    state: Path
    log: Path
    extra: dict[str, int] = field(default_factory=dict)
    log_from: int = 0  # where ``logs()`` starts (``mark``)

    def get(self, host: str | None, path: str = "/", **kw: object) -> Reply:
        return request(self.port, host, path, **kw)  # type: ignore[arg-type]

    def logs(self) -> str:
        """The proxy's output since it started, or since ``mark()``."""
        with self.log.open("rb") as f:
            f.seek(self.log_from)
            return f.read().decode(errors="replace")

    def mark(self) -> Proxy:
        """From now on ``logs()`` shows only what comes next: a test on a shared proxy
        reads its own lines."""
        self.log_from = self.log.stat().st_size
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_until(check: Callable[[], object], timeout: float = 10, interval: float = 0.05) -> object:
    """Poll ``check`` until it returns something truthy; the timeout is a generous bound."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


@pytest.fixture
def state_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.json"


@pytest.fixture
def dns() -> Iterator[FakeDockerDNS]:
    server = FakeDockerDNS().start()
    yield server
    server.stop()


@pytest.fixture
def containers() -> Iterator[Callable[..., Container]]:
    started: list[Container] = []

    def make(name: str, ip: str | None = None, port: int = 0, **kw: object) -> Container:
        c = Container(name, ip or next_ip(), port, **kw).start()  # type: ignore[arg-type]
        started.append(c)
        return c

    yield make
    for c in started:
        if c.running:
            c.kill()


def cli_runner(state_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``luma-proxy ARGS --state state_path`` as a subprocess, as the Luma CLI runs it."""
    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [LUMA, *args, "--state", str(state_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"luma-proxy {' '.join(args)} failed: {result.stderr}")
        return result

    return run


@pytest.fixture
def cli(state_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    return cli_runner(state_path)


@contextlib.contextmanager
def proxy_starter(
    tmp_path: Path, state_path: Path, dns: FakeDockerDNS
) -> Iterator[Callable[..., Proxy]]:
    """Start the proxy as ``luma-proxy run`` (kind="run") or ``mitmdump -s`` (kind="mitmdump");
    every one started is killed on the way out."""
    running: list[Proxy] = []

    def start(
        kind: str = "run",
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> Proxy:
        port = port or free_port()
        log = tmp_path / f"proxy-{len(running)}.log"
        full_env = {
            **os.environ,
            "LUMA_PROXY_STATE": str(state_path),
            "LUMA_PROXY_DNS": dns.address,
            "LUMA_PROXY_HEALTH_INTERVAL": "1",
            # A request with no container to go to waits this long, then 503: 1 s keeps
            # the tests of 503s quick; test_hold.py sets the hold it tests.
            "LUMA_PROXY_HOLD_TIMEOUT": "1",
            "HOME": str(tmp_path),  # mitmproxy's confdir (CA) lands here, not in ~
            **(env or {}),
        }
        if kind == "run":
            cmd = [LUMA, "run", "--http-port", str(port), "--listen-host", "127.0.0.1", *args]
        elif kind == "mitmdump":
            cmd = [
                MITMDUMP,
                "-q",
                "--listen-host",
                "127.0.0.1",
                "-p",
                str(port),
                "-s",
                str(ROOT / "addons" / "luma.py"),
                *args,
            ]
        else:
            raise ValueError(kind)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=tmp_path
            )
        proxy = Proxy(proc, port, state_path, log)
        running.append(proxy)
        try:
            for listener in (port, *listening_ports(args)):
                wait_for_port("127.0.0.1", listener, timeout=20)
        except Exception:
            proxy.stop()
            raise AssertionError(f"proxy did not start:\n{proxy.logs()}") from None
        return proxy

    try:
        yield start
    finally:
        for proxy in running:
            proxy.stop(signal.SIGKILL)


@pytest.fixture
def start_proxy(
    tmp_path: Path, state_path: Path, dns: FakeDockerDNS
) -> Iterator[Callable[..., Proxy]]:
    with proxy_starter(tmp_path, state_path, dns) as start:
        yield start


@dataclass
class Shared:
    """What a module's tests share when each of them only sends requests: starting a proxy
    (and deploying to it) per test was most of their time. Their own records (an
    upstream's, the log from ``Proxy.mark()`` on) keep each test's assertions its own."""

    path: Path
    dns: FakeDockerDNS
    cli: Callable[..., subprocess.CompletedProcess[str]]
    start: Callable[..., Proxy]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    path = tmp_path_factory.mktemp("shared")
    state = path / "state" / "state.json"
    dns = FakeDockerDNS().start()
    try:
        with proxy_starter(path, state, dns) as start:
            yield Shared(path, dns, cli_runner(state), start)
    finally:
        dns.stop()


@pytest.fixture(scope="module", params=["run", "mitmdump"])
def shared_kind(request: pytest.FixtureRequest) -> str:
    """``proxy_kind`` for a module-scoped proxy."""
    return request.param


def listening_ports(args: tuple[str, ...]) -> list[int]:
    """The TCP ports ``args`` ask for besides the first (``--https-port N``, a
    ``--mode reverse:...@host:N``): the listeners open one after the other, so
    the first answering says nothing of the others (a CI run was refused on the
    HTTPS port in between)."""
    ports = []
    for flag, value in itertools.pairwise(args):
        if flag == "--https-port" and value.isdigit() and value != "0":
            ports.append(int(value))
        elif flag == "--mode" and value.startswith(("reverse:http:", "reverse:https:")) \
                and "@" in value:
            tail = value.rsplit("@", 1)[1].rsplit(":", 1)[-1]
            if tail.isdigit():
                ports.append(int(tail))
    return ports


@pytest.fixture(params=["run", "mitmdump"])
def proxy_kind(request: pytest.FixtureRequest) -> str:
    """Run a test against both entry points: the behaviour must be the same."""
    return request.param


def start_with_https(start_proxy: Callable[..., Proxy], kind: str, https_port: int,
                     env: dict[str, str]) -> Proxy:
    """The proxy of ``kind`` with an HTTPS listener on ``https_port`` as well
    (``run --https-port``; under mitmdump, a second reverse mode)."""
    if kind == "run":
        return start_proxy("run", args=("--https-port", str(https_port)), env=env)
    http_port = free_port()
    return start_proxy("mitmdump", port=http_port, env=env, args=(
        "--mode", f"reverse:http://127.0.0.1:1/@127.0.0.1:{http_port}",
        "--mode", f"reverse:http://127.0.0.1:1/@127.0.0.1:{https_port}"))
