"""Blue-green deployments played end to end, for the acceptance tests and the benchmark.

``Deployment`` plays Docker and the deploy tool around a real ``luma-proxy run``
process: it owns the embedded-DNS double, the container *processes* of every
colour (``spawn_container``: SIGTERM and SIGKILL are real signals) and the
proxy. ``deploy_next_colour()`` performs the spec's flow:

1. start the next colour's replicas on fresh 127.x addresses, same port;
2. give them a temporary alias (``blog-green-temp``), as ``docker run
   --network-alias`` would;
3. health-check each new IP's ``/up`` directly (not through the proxy);
4. move the alias atomically: ``set_alias("blog", new_ips)``; the time just
   *before* that call is the switch time every lag is measured from;
5. wait the drain delay (see ``DEFAULT_DRAIN``);
6. ``docker stop`` the old colour (SIGTERM) and wait for it to exit.

``strategy="target"`` plays the other way to switch (see ``STRATEGIES``): one
alias per colour, and the switch is ``luma-proxy deploy --target``. The harsh
modes (``MODES``) SIGKILL the old colour at the moments that hurt.

``LoadGenerator`` drives the proxy with N keep-alive clients and M clients
that open a new connection per request, on one asyncio loop in a thread (an
asyncio client costs a fraction of ``http.client`` in threads, so it leaves
the CPU to the proxy under test), and records every request.
``analyse()`` turns the samples and the switch records into the figures.

All clocks are ``time.monotonic()`` (CLOCK_MONOTONIC is system-wide on Linux,
so the proxy's and the containers' processes share it, should one compare).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Self

from luma_proxy.store.registry import db_path
from tests.e2e.conftest import Proxy
from tests.e2e.docker_double import (
    FakeDockerDNS,
    free_port,
    spawn_container,
    stop_container_process,
    wait_for_port,
)

BIN = Path(sys.executable).parent
LUMA = str(BIN / "luma-proxy")
COLOURS = ("blue", "green")

TTL = 1.0
"""The proxy's default alias cache (``LUMA_PROXY_DNS_TTL``)."""

LAG_BOUND = TTL + 0.5
"""The promise: no response from the old colour later than this after the switch."""

DEFAULT_DRAIN = TTL + 1.0
"""How long the deploy tool waits between moving the alias and stopping the old colour.

After the switch the proxy may still pick an old IP from a cached answer for
up to one TTL; a request picked at the very end of that window still has to
get its upstream connection and its answer, which on a loaded proxy takes a
few hundred milliseconds (the event loop is busy). Stopping the old colour
before that would turn those requests into refused connects (502). TTL + 1 s
is twice the margin the promise itself allows (TTL + 0.5 s), so the old colour
receives its last request well before it is asked to stop, and what is in
flight then is finished by its graceful shutdown anyway.
"""


# --------------------------------------------------------------------------------------
# The proxy process
# --------------------------------------------------------------------------------------


# The proxy process is tests.e2e.conftest.Proxy (its `logs` and `stop`).


def get(
    port: int,
    host: str,
    path: str = "/",
    *,
    ip: str = "127.0.0.1",
    timeout: float = 5.0,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, str, str]:
    """One GET: (status, X-Container header or "", body text)."""
    c = conn or http.client.HTTPConnection(ip, port, timeout=timeout)
    try:
        c.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        c.putheader("Host", host)
        c.endheaders()
        r = c.getresponse()
        body = r.read().decode(errors="replace")
        return r.status, r.getheader("X-Container") or "", body
    finally:
        if conn is None:
            c.close()


# --------------------------------------------------------------------------------------
# Docker + deploy tool
# --------------------------------------------------------------------------------------


@dataclass
class Replica:
    name: str
    ip: str
    port: int
    proc: subprocess.Popen[bytes]
    returncode: int | None = None
    exited_at: float | None = None


@dataclass
class Generation:
    """One deployed version: ``blue`` or ``green``, numbered so names never repeat."""

    number: int
    colour: str
    replicas: list[Replica]

    @property
    def ips(self) -> list[str]:
        return [r.ip for r in self.replicas]

    @property
    def names(self) -> set[str]:
        return {r.name for r in self.replicas}


@dataclass
class Switch:
    """What one deploy did and when (monotonic seconds)."""

    number: int
    old: Generation
    new: Generation
    mode: str
    started: float  # new colour spawning
    healthy: float  # every new IP answered /up with 2xx
    at: float  # the alias moved (taken just before the DNS table changed)
    killed: float | None = None  # harsh modes: when SIGKILL was sent to the old colour
    stop_sent: float | None = None  # graceful: when SIGTERM was sent
    old_exited: float | None = None
    old_returncodes: list[int | None] = field(default_factory=list)


STRATEGIES = ("alias", "target")
"""How the deploy tool points the host at the new colour.

``alias``   the spec's way: the host's target is ``blog:PORT`` and the alias ``blog``
            moves from the old colour's IPs to the new ones (one DNS table change).
``target``  one alias per colour (``blog-blue``, ``blog-green``) that never moves;
            the switch is ``luma-proxy deploy --target blog-green:PORT``, which the
            running proxy picks up from the registry. The old colour keeps its
            alias until it exits, as Docker keeps a container's aliases until then.
"""

MODES = ("graceful", "kill-after-switch", "kill-in-alias", "stop-in-alias", "kill-then-switch")
"""How the old colour leaves.

``graceful``          the spec's flow: switch, drain delay, SIGTERM, wait.
``kill-after-switch`` switch, then SIGKILL the old colour at once (a crash, or a
                      deploy tool that does not wait).
``kill-in-alias``     the alias answers both colours (``docker network connect
                      --alias`` done, ``disconnect`` not yet), SIGKILL the old
                      colour, its dead IPs stay in the answer for ``dead_listed``
                      seconds, then the alias is the new colour only.
``stop-in-alias``     what plain Docker allows when the alias moves: the alias answers
                      both colours, the old colour is ``docker stop``ped (SIGTERM) while
                      in it and leaves the answer when it exits (Docker removes a
                      container's aliases with its address, on exit or disconnect).
``kill-then-switch``  the wrong order: SIGKILL the old colour while it alone
                      carries the alias, move the alias ``dead_listed`` later.
"""


class Deployment:
    """Docker (DNS double + container processes), the deploy tool, and the proxy."""

    def __init__(
        self,
        workdir: Path,
        *,
        replicas: int = 2,
        host: str = "blog.test",
        alias: str = "blog",
        drain: float = DEFAULT_DRAIN,
        ttl: float | None = None,
        health_interval: float | None = None,
        grace: float = 10.0,
        proxy_env: dict[str, str] | None = None,
        proxy_command: Sequence[str] = (LUMA, "run"),
        strategy: str = "alias",
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.replicas = replicas
        self.host = host
        self.alias = alias
        self.drain = drain
        self.ttl = ttl
        self.health_interval = health_interval
        self.grace = grace
        self.proxy_env = proxy_env or {}
        self.proxy_command = list(proxy_command)
        self.strategy = strategy
        self.port = 0
        self.dns = FakeDockerDNS()
        self.proxy: Proxy | None = None
        self.live: Generation | None = None
        self.generations: list[Generation] = []
        self.switches: list[Switch] = []
        # A random /16 of 127/8 per deployment: concurrent runs on one machine don't collide.
        self._net = random.randrange(64, 250)
        self.state = self.workdir / "state" / "state.json"

    # ---- naming ------------------------------------------------------------------

    def _ip(self, generation: int, index: int) -> str:
        return f"127.{self._net}.{generation % 250}.{index + 1}"

    # ---- lifecycle ---------------------------------------------------------------

    def start(self) -> Self:
        """DNS, blue replicas under the alias, the host registered, the proxy serving blue."""
        self.dns.start()
        self.port = free_port()
        blue = self._spawn(COLOURS[0])
        self.dns.set_alias(self.target_alias(blue), blue.ips)
        self.live = blue
        self._point_host(blue)
        self.proxy = self._start_proxy()
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, container, _ = self.get("/")
                if status == 200 and container in blue.names:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"proxy never served blue:\n{self.proxy.logs()}")
            time.sleep(0.05)
        return self

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for g in self.generations:
            for r in g.replicas:
                if r.proc.poll() is None:
                    stop_container_process(r.proc, kill=True)
                elif r.proc.stdout is not None:
                    r.proc.stdout.close()
        self.dns.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [LUMA, *args, "--state", str(self.state)],
            capture_output=True, text=True, timeout=30, env=self._env(),
        )
        if result.returncode != 0:
            raise RuntimeError(f"luma-proxy {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def _env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "LUMA_PROXY_STATE": str(self.state),
            "LUMA_PROXY_DNS": self.dns.address,
            "HOME": str(self.workdir),  # mitmproxy's confdir (CA) lands here, not in ~
        }
        if self.ttl is not None:
            env["LUMA_PROXY_DNS_TTL"] = str(self.ttl)
        if self.health_interval is not None:
            env["LUMA_PROXY_HEALTH_INTERVAL"] = str(self.health_interval)
        env.update(self.proxy_env)
        return env

    def _start_proxy(self) -> Proxy:
        port = free_port()
        log = self.workdir / "proxy.log"
        cmd = [*self.proxy_command, "--http-port", str(port), "--listen-host", "127.0.0.1",
               "--state", str(self.state)]
        engine = Path(self.proxy_command[0]).name
        if engine in ("mitmdump", "mitmweb"):  # the addon script; the state comes from the env
            cmd = [*self.proxy_command, "-q", "--listen-host", "127.0.0.1", "-p", str(port),
                   "-s", str(Path(__file__).parents[2] / "addons" / "luma.py")]
            if engine == "mitmweb":
                cmd += ["--no-web-open-browser", "--web-host", "127.0.0.1",
                        "--web-port", str(free_port())]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    env=self._env(), cwd=self.workdir)
        proxy = Proxy(proc, port, self.state, log)
        try:
            wait_for_port("127.0.0.1", port, timeout=20)
        except Exception:
            proxy.stop(signal.SIGKILL)
            raise RuntimeError(f"proxy did not start:\n{proxy.logs()}") from None
        return proxy

    def get(self, path: str = "/", timeout: float = 5.0) -> tuple[int, str, str]:
        assert self.proxy is not None
        return get(self.proxy.port, self.host, path, timeout=timeout)

    # ---- the deploy steps --------------------------------------------------------

    def _spawn(self, colour: str, replicas: int | None = None) -> Generation:
        number = len(self.generations)
        n = self.replicas if replicas is None else replicas

        def one(i: int) -> Replica:
            name = f"{self.alias}-{colour}{number}-{i + 1}"
            ip = self._ip(number, i)
            proc = spawn_container(name, ip, self.port, grace=self.grace, timeout=20)
            return Replica(name, ip, self.port, proc)

        with ThreadPoolExecutor(n) as pool:
            replicas_ = list(pool.map(one, range(n)))
        generation = Generation(number, colour, replicas_)
        self.generations.append(generation)
        return generation

    def temp_alias(self, generation: Generation) -> str:
        """The alias a new colour starts with: temporary (``alias``) or its own (``target``)."""
        suffix = "-temp" if self.strategy == "alias" else ""
        return f"{self.alias}-{generation.colour}{suffix}"

    def target_alias(self, generation: Generation) -> str:
        """The alias the host's target names while ``generation`` serves."""
        return self.alias if self.strategy == "alias" else self.temp_alias(generation)

    def _point_host(self, generation: Generation) -> None:
        self.cli("deploy", "--host", self.host, "--target",
                 f"{self.target_alias(generation)}:{self.port}", "--project", "p", "--no-ssl")

    def _point_host_timed(self, generation: Generation) -> float:
        """``_point_host``, returning when the registry first named the new target: the
        moment the CLI's transaction committed the host's row (what the proxy reloads)."""
        wanted = f"{self.target_alias(generation)}:{self.port}"
        registry = db_path(self.state)
        seen: list[float] = []
        done = threading.Event()

        def target(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT data FROM services WHERE host = ?", (self.host,)).fetchone()
            return json.loads(row[0]).get("target") if row else None

        def watch() -> None:
            db: sqlite3.Connection | None = None
            try:
                while not done.is_set():
                    with contextlib.suppress(sqlite3.Error, ValueError):
                        if db is None and registry.exists():  # read-only: creates nothing
                            db = sqlite3.connect(f"file:{registry}?mode=ro", uri=True)
                        if db is not None and target(db) == wanted:
                            seen.append(time.monotonic())
                            return
                    time.sleep(0.002)
            finally:
                if db is not None:
                    db.close()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            self._point_host(generation)
        finally:
            done.set()
            watcher.join()
        if not seen:  # a silent fallback would measure the lags from the CLI's exit
            raise RuntimeError(f"the registry {registry} never named {wanted} for {self.host}")
        return seen[0]

    def start_next(self, replicas: int | None = None) -> Generation:
        """``docker run --network-alias blog-green-temp`` (or ``blog-green``) per replica."""
        assert self.live is not None
        colour = COLOURS[1] if self.live.colour == COLOURS[0] else COLOURS[0]
        generation = self._spawn(colour, replicas)
        self.dns.set_alias(self.temp_alias(generation), generation.ips)
        return generation

    def health_check(self, generation: Generation, timeout: float = 20.0) -> float:
        """Each new IP's ``/up`` directly, until every one answers 2xx; returns when."""
        deadline = time.monotonic() + timeout
        pending = list(generation.replicas)
        while pending:
            r = pending[0]
            try:
                status, _, _ = get(r.port, f"{self.temp_alias(generation)}:{r.port}", "/up",
                                   ip=r.ip, timeout=2)
            except (OSError, http.client.HTTPException):
                status = 0
            if 200 <= status < 300:
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(f"{r.name} never became healthy")
            time.sleep(0.05)
        return time.monotonic()

    def switch(self, generation: Generation) -> float:
        """Point the host at ``generation`` in one step; returns when (just before).

        ``alias``: the alias ``blog`` now answers the new IPs only (the temporary alias
        goes). ``target``: ``luma-proxy deploy --target blog-green:PORT``; the time is
        when the new target first shows in the registry (polled every 2 ms while the
        CLI runs): the CLI's own start-up and exit are not the proxy's lag.
        """
        if self.strategy == "alias":
            at = time.monotonic()
            self.dns.set_alias(self.alias, generation.ips)
            self.dns.remove_alias(self.temp_alias(generation))
        else:
            at = self._point_host_timed(generation)
        self.live = generation
        return at

    def retire(self, generation: Generation, *, kill: bool = False) -> float:
        """``docker stop`` (SIGTERM, wait) or ``docker kill`` every replica; returns when done."""
        for r in generation.replicas:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)

        def wait(r: Replica) -> None:
            # Wait without signalling again: a second SIGTERM after the container's loop
            # closed would hit the default handler and fake an unclean exit.
            try:
                r.returncode = r.proc.wait(self.grace + 10)
            except subprocess.TimeoutExpired:
                r.returncode = stop_container_process(r.proc, kill=True)
            r.exited_at = time.monotonic()
            if r.proc.stdout is not None:
                r.proc.stdout.close()

        with ThreadPoolExecutor(len(generation.replicas)) as pool:
            list(pool.map(wait, generation.replicas))
        if self.strategy == "target" and generation is not self.live:
            self.dns.remove_alias(self.temp_alias(generation))  # Docker: gone with the container
        return max(r.exited_at or 0.0 for r in generation.replicas)

    def deploy_next_colour(
        self, mode: str = "graceful", *, drain: float | None = None, dead_listed: float = 1.0
    ) -> Switch:
        """One blue -> green (or green -> blue) deploy; see ``MODES``."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        if mode != "graceful" and self.strategy != "alias":
            raise ValueError("the SIGKILL modes move the alias; use strategy='alias'")
        old = self.live
        assert old is not None
        started = time.monotonic()
        new = self.start_next()
        healthy = self.health_check(new)
        sw = Switch(len(self.switches) + 1, old, new, mode, started, healthy, at=0.0)
        if mode == "graceful":
            sw.at = self.switch(new)
            time.sleep(self.drain if drain is None else drain)
            sw.stop_sent = time.monotonic()
            sw.old_exited = self.retire(old)
        elif mode == "kill-after-switch":
            sw.at = self.switch(new)
            sw.killed = time.monotonic()
            sw.old_exited = self.retire(old, kill=True)
        elif mode == "kill-in-alias":
            self.dns.set_alias(self.alias, [*old.ips, *new.ips])  # connect green, both answer
            time.sleep((self.ttl or TTL) + 0.5)  # the proxy has seen both colours
            sw.killed = time.monotonic()
            for r in old.replicas:
                r.proc.send_signal(signal.SIGKILL)
            time.sleep(dead_listed)
            sw.at = self.switch(new)  # the deploy tool disconnects blue
            sw.old_exited = self.retire(old, kill=True)
        elif mode == "stop-in-alias":
            self.dns.set_alias(self.alias, [*old.ips, *new.ips])
            self.dns.remove_alias(self.temp_alias(new))
            time.sleep((self.ttl or TTL) + 0.5)
            sw.stop_sent = time.monotonic()
            sw.old_exited = self.retire(old)  # SIGTERM, graceful, still in the answer
            sw.at = self.switch(new)  # gone from the answer when it exits
        else:  # kill-then-switch
            sw.killed = time.monotonic()
            for r in old.replicas:
                r.proc.send_signal(signal.SIGKILL)
            time.sleep(dead_listed)
            sw.at = self.switch(new)
            sw.old_exited = self.retire(old, kill=True)
        sw.old_returncodes = [r.returncode for r in old.replicas]
        self.switches.append(sw)
        return sw


# --------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------


class Sample(NamedTuple):
    client: int
    kind: str  # "keepalive" or "fresh"
    conn: int  # the client's connection serial (keep-alive clients reconnect after errors)
    sent: float
    received: float
    status: int  # 0: no HTTP response
    container: str  # X-Container of the answer ("" for the proxy's own pages)
    error: str  # "" when an HTTP response arrived

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class _Closed(Exception):
    """The connection ended before a complete response."""


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        raise _Closed("closed before a response" if not e.partial else "closed in head") from None
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(None, 2)[1])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    try:
        if b"content-length" in headers:
            body = await reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass
                    break
                parts.append(await reader.readexactly(size + 2))
            body = b"".join(p[:-2] for p in parts)
        else:
            body = await reader.read()
    except asyncio.IncompleteReadError:
        raise _Closed("closed in body") from None
    return status, headers, body


class LoadGenerator:
    """``keepalive`` clients reusing one connection, ``fresh`` clients connecting per request.

    Every client sends its next request as soon as the previous one is answered
    (closed loop). Every request becomes a ``Sample``; a non-2xx answer or any
    connection error is a failure. A keep-alive client whose connection the
    proxy closed *while idle* notices the EOF before reusing it (as urllib3 and
    browsers do) and reconnects; that is counted in ``idle_closes``, not as a
    failure, because no request was sent on it.
    """

    def __init__(
        self,
        port: int,
        host: str,
        *,
        keepalive: int = 50,
        fresh: int = 10,
        path: str = "/",
        timeout: float = 10.0,
    ) -> None:
        self.port = port
        self.host = host
        self.keepalive = keepalive
        self.fresh = fresh
        self.timeout = timeout
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bluegreen-load\r\n\r\n"
        ).encode()
        self.samples: list[Sample] = []
        self.idle_closes = 0
        self.started = 0.0
        self.stopped = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="bluegreen-load", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> list[Sample]:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(self.timeout + 10)
        return self.samples

    def count(self) -> int:
        return len(self.samples)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.started = time.monotonic()
        tasks = [asyncio.create_task(self._keepalive(i)) for i in range(self.keepalive)]
        tasks += [
            asyncio.create_task(self._fresh(self.keepalive + i)) for i in range(self.fresh)
        ]
        self._ready.set()
        await self._stop.wait()
        self.stopped = time.monotonic()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def _one(
        self, client: int, kind: str, conn: int,
        rw: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None,
    ) -> tuple[Sample, tuple[asyncio.StreamReader, asyncio.StreamWriter] | None]:
        """One request; returns the sample and the connection if it may be reused."""
        sent = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                if rw is None:
                    rw = await self._open()
                reader, writer = rw
                writer.write(self.request)
                status, headers, _ = await _read_response(reader)
        except (OSError, _Closed, TimeoutError, ValueError, IndexError) as e:
            if rw is not None:
                rw[1].close()
            error = str(e) if isinstance(e, _Closed) else type(e).__name__
            return Sample(client, kind, conn, sent, time.monotonic(), 0, "", error), None
        sample = Sample(client, kind, conn, sent, time.monotonic(), status,
                        headers.get(b"x-container", b"").decode(), "")
        if headers.get(b"connection", b"").lower() == b"close":
            writer.close()
            return sample, None
        return sample, rw

    async def _keepalive(self, client: int) -> None:
        assert self._stop is not None
        rw = None
        conn = 0
        while not self._stop.is_set():
            if rw is not None and rw[0].at_eof():
                rw[1].close()
                rw = None
                self.idle_closes += 1
            if rw is None:
                conn += 1
            sample, rw = await self._one(client, "keepalive", conn, rw)
            self.samples.append(sample)
            if not sample.ok:
                await asyncio.sleep(0.01)  # don't spin on a failing proxy
        if rw is not None:
            rw[1].close()

    async def _fresh(self, client: int) -> None:
        assert self._stop is not None
        conn = 0
        while not self._stop.is_set():
            conn += 1
            sample, rw = await self._one(client, "fresh", conn, None)
            if rw is not None:
                rw[1].close()
            self.samples.append(sample)
            if not sample.ok:
                await asyncio.sleep(0.01)


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass
class SwitchFigures:
    number: int
    direction: str  # "blue0 -> green1"
    mode: str
    lag: float  # switch -> last response from the old colour (0 if none after the switch)
    client_lags: list[float]  # per client connection that got an old response after the switch
    last_old_sent: float  # switch -> last request *sent* that the old colour answered (<= 0: none)
    old_after: int  # responses from the old colour after the switch
    new_before_next: int  # responses from the new colour until the next switch
    keepalive_moved: int  # keep-alive clients that reached the new colour while it was live
    keepalive_total: int
    failed: int  # failures answered between this deploy's start and the next one's
    failures: Counter[str]
    observed: bool


@dataclass
class Figures:
    total: int
    failed: int
    failures: Counter[str]
    duration: float
    switches: list[SwitchFigures]
    split: dict[str, dict[str, int]]  # generation label -> replica name -> responses
    idle_closes: int

    @property
    def lags(self) -> list[float]:
        return [s.lag for s in self.switches]


def _failure_label(s: Sample) -> str:
    return f"HTTP {s.status}" if s.status else s.error


def analyse(samples: Sequence[Sample], dep: Deployment, *, idle_closes: int = 0) -> Figures:
    """The figures of one run: failures, per-switch lags and moves, replica split."""
    failed = [s for s in samples if not s.ok]
    switches = dep.switches
    keepalive_clients = {s.client for s in samples if s.kind == "keepalive"}
    out = []
    for i, sw in enumerate(switches):
        window_end = switches[i + 1].started if i + 1 < len(switches) else math.inf
        live_until = switches[i + 1].at if i + 1 < len(switches) else math.inf
        old, new = sw.old.names, sw.new.names
        per_client: dict[tuple[int, int], float] = {}
        old_after = 0
        last_old_sent = -math.inf
        for s in samples:
            if s.container in old:
                last_old_sent = max(last_old_sent, s.sent - sw.at)
            if s.container in old and s.received > sw.at:
                old_after += 1
                key = (s.client, s.conn)
                per_client[key] = max(per_client.get(key, 0.0), s.received - sw.at)
        # The new colour serves until the next switch moves the alias away from it.
        new_seen = [s for s in samples if sw.at <= s.received < live_until and s.container in new]
        moved = {s.client for s in new_seen if s.kind == "keepalive"}
        # A failure belongs to the deploy during which it was *answered*: under load a request
        # can wait in the proxy long enough to be sent in one window and fail in the next.
        window_failures = [s for s in failed if sw.started <= s.received < window_end]
        lag = max(per_client.values(), default=0.0)
        out.append(SwitchFigures(
            number=sw.number,
            direction=f"{sw.old.colour}{sw.old.number} -> {sw.new.colour}{sw.new.number}",
            mode=sw.mode,
            lag=lag,
            client_lags=sorted(per_client.values()),
            last_old_sent=last_old_sent,
            old_after=old_after,
            new_before_next=len(new_seen),
            keepalive_moved=len(moved & keepalive_clients),
            keepalive_total=len(keepalive_clients),
            failed=len(window_failures),
            failures=Counter(_failure_label(s) for s in window_failures),
            observed=bool(new_seen) and moved >= keepalive_clients,
        ))
    split: dict[str, dict[str, int]] = defaultdict(dict)
    counts = Counter(s.container for s in samples if s.ok)
    for g in dep.generations:
        label = f"{g.colour}{g.number}"
        for r in g.replicas:
            split[label][r.name] = counts.get(r.name, 0)
    sent = [s.sent for s in samples]
    return Figures(
        total=len(samples),
        failed=len(failed),
        failures=Counter(_failure_label(s) for s in failed),
        duration=(max(s.received for s in samples) - min(sent)) if samples else 0.0,
        switches=out,
        split=dict(split),
        idle_closes=idle_closes,
    )


def describe_failures(samples: Iterable[Sample], dep: Deployment, limit: int = 20) -> str:
    """Failed samples with their time relative to the nearest earlier switch (for messages)."""
    lines = []
    for s in [s for s in samples if not s.ok][:limit]:
        before = [sw for sw in dep.switches if sw.started <= s.sent]
        ref = (f"switch {before[-1].number} {s.sent - before[-1].at:+.3f}s"
               if before else "before any switch")
        lines.append(f"{s.kind} client {s.client} conn {s.conn}: {_failure_label(s)} "
                     f"sent {ref}, took {s.received - s.sent:.3f}s")
    return "\n".join(lines)
