"""What certificate bookkeeping costs ``luma-proxy run`` at 10,000 services, seen from outside.

Usage:
    .venv/bin/python benchmarks/tls_scale.py [--services 10000] [--certs 2000]
        [--seconds 30] [--tree DIR] [--keep] [--instrument-nice N]

Three runs, each with a state written through the registry's API
(``Store(path).update(change)``, as the CLI writes it):

1. 10 services, half ``--ssl`` (the default), half ``--no-ssl``;
2. ``--services`` services, all ``--no-ssl`` (the control: the same routes, the
   same first health round, no certificate work);
3. ``--services`` services, half ``--ssl``, half ``--no-ssl``.

In 1 and 3, ``--certs`` of the ssl services (scaled down with the size: 2 of 10)
have a self-signed pair stored as ``deploy --tls-cert`` stores it. The others
are ACME hosts whose orders fail at once (``--acme-directory`` is a closed
local port): the leader keeps ordering, four at a time, and writing their
status, as it would against an unreachable CA.

Then ``luma-proxy run`` starts (``--dns`` at a fake Docker DNS, ``--health-interval
3600``: one health round at start-up, then none) and, from outside, without
looking inside the process:

- start-up: from the launch to the first 200 on a ``--no-ssl`` host, and to the
  first TLS handshake that gets an ssl host's own certificate instead of the
  placeholder (``luma-proxy default``);
- event-loop blocking: one client sends one small request every 5 ms on a
  keep-alive connection to a ``--no-ssl`` host, backed by a tiny local HTTP
  server, from the first 200 to ``--seconds`` after the launch; a request that
  waits behind a blocked loop takes as long as the block. Reported: the longest
  request, the longest from 10 s after the launch on (start-up over: what the
  once-a-second certificate pass leaves), the 99th percentile, the requests
  over 50 ms and the requests done (one at a time: a blocked loop means fewer).
  Run 3 minus run 2 is what the certificates cost at that size; the first
  health round of 10,000 services (two probes each) lasts well into the
  window and blocks the loop by itself, in both.

The upstream and the fake DNS run in a child process, so that the measuring
client is the only thread of its process. On 2 cores the proxy's own threads
(health, certificates, reloads) may still take the CPU from the client and the
upstream: ``--instrument-nice N`` (as root) runs both at nice -N and the proxy
at 0, to tell their wait from the proxy's (at 10,000 services it changed
nothing: docs/performance.md). ``--tree DIR``: run that checkout's
``luma_proxy`` (and write the state with it), not the editable install's, as
``benchmarks/h2load_ab.py`` does; e.g. ``git worktree add /tmp/tls-before HEAD``.
Every process started here runs in its own process group and is stopped by it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The proxy's launcher: the tree's package, not the editable install's (h2load_ab.py).
LAUNCH = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path.insert(0, sys.argv.pop(1))
sys.argv[0] = "luma-proxy"
runpy.run_module("luma_proxy", run_name="__main__")
"""
PROBE = "probe.bench.test"  # --no-ssl: the loop-latency client's host
ALIAS = "bench-app"
REQUEST = f"GET / HTTP/1.1\r\nHost: {PROBE}\r\nUser-Agent: tls-scale\r\n\r\n".encode()
INTERVAL = 0.005
STEADY_AFTER = 10.0  # seconds after the launch: start-up and the first health round are over
PLACEHOLDER = "luma-proxy default"
TLS_CLIENT = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA loaded: only the name is read
TLS_CLIENT.check_hostname = False
TLS_CLIENT.verify_mode = ssl.CERT_NONE


def use_tree(tree: Path) -> None:
    """Import ``luma_proxy`` (and ``tests``) from ``tree`` in this process too."""
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
    sys.path.insert(0, str(tree))


def log(msg: str) -> None:
    print(f"[tls_scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------- upstream and DNS (child)
async def _serve_upstream(port: int) -> None:
    body = b"ok"
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\n" + body

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(answer)
                await writer.drain()
                if b"connection: close" in head.lower():
                    break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def helpers(tree: str, port: int, conn: Connection) -> None:
    """The child process: the fake Docker DNS (ALIAS -> 127.0.0.1) and the upstream."""
    from tests.e2e.docker_double import FakeDockerDNS

    dns = FakeDockerDNS().start()
    dns.set_alias(ALIAS, ["127.0.0.1"])
    conn.send(dns.address)
    asyncio.run(_serve_upstream(port))


# ------------------------------------------------------------------------- the state
def write_state(state: Path, n: int, certs: int, port: int, ssl_half: bool,
                ) -> tuple[int, int, str]:
    """n services, half --ssl (or none), ``certs`` of those with their own pair;
    returns (ssl services, pairs stored, an ssl host with its own pair)."""
    from luma_proxy.models import Service
    from luma_proxy.proxy.certificates import certs_dir, store_pair
    from luma_proxy.store.registry import Store
    from tests.certs import make_pair

    hosts = [PROBE] + [f"s{i:05d}.bench.test" for i in range(1, n)]
    ssl_hosts = [h for i, h in enumerate(hosts) if ssl_half and i % 2]  # not PROBE (i = 0)
    ssl_set = set(ssl_hosts)
    own = ssl_hosts[:certs]
    custom = set(own)

    def change(s: Any) -> None:  # the registry's State: its services are what is set
        for i, host in enumerate(hosts):
            s.services[host] = Service(
                name=f"app{i}", host=host, target=f"{ALIAS}:{port}", project="bench",
                ssl=host in ssl_set, cert_source="custom" if host in custom else "acme")

    root = certs_dir(str(state))
    for host in own:  # before the state names them custom, as deploy --tls-cert does
        store_pair(root, host, *make_pair([host]))
    Store(state).update(change)
    return len(ssl_hosts), len(own), own[0] if own else ""


# ------------------------------------------------------------------------ the client
def get_once(port: int, timeout: float = 1.0) -> int | None:
    """Status of one GET on a new connection, None if there is none yet."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            data = s.recv(4096)
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    except (OSError, ValueError, IndexError):
        return None


def own_certificate_served(port: int, host: str) -> bool:
    """Does a handshake with SNI ``host`` get that host's pair (not the placeholder)?"""
    from cryptography import x509

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
                TLS_CLIENT.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except OSError:
        return False
    if not der:
        return False
    return PLACEHOLDER not in x509.load_der_x509_certificate(der).subject.rfc4514_string()


class KeepAlive:
    """One HTTP/1.1 connection; ``request()`` returns the seconds one request took."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.reconnects = 0

    def request(self) -> float:
        for _attempt in range(2):
            if self.sock is None:
                self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t0 = time.perf_counter()
            try:
                self.sock.sendall(REQUEST)
                self._read_response()
                return time.perf_counter() - t0
            except (OSError, ValueError):
                self.sock.close()
                self.sock = None
                self.reconnects += 1
        raise RuntimeError("the probe host does not answer")

    def _read_response(self) -> None:
        assert self.sock is not None
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ValueError("closed")
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 200"):
            raise ValueError(head[:40])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ValueError("closed")
            body += chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


# --------------------------------------------------------------------------- one run
@dataclass
class Run:
    services: int
    ssl: int
    own: int
    first_200: float = 0.0
    own_cert: float | None = None
    samples: list[tuple[float, float]] = field(default_factory=list)  # (since launch, s)
    reconnects: int = 0
    command: str = ""

    def longest(self, after: float = 0.0) -> float:
        return max((lat for at, lat in self.samples if at >= after), default=0.0)

    def over(self, seconds: float) -> int:
        return sum(1 for _, lat in self.samples if lat > seconds)

    def quantile(self, q: float) -> float:
        ordered = sorted(lat for _, lat in self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def run_once(args: argparse.Namespace, tree: Path, n: int, ssl_half: bool, upstream: int,
             dns: str, home: Path) -> Run:
    work = Path(tempfile.mkdtemp(prefix=f"luma-tls-scale-{n}-"))
    try:
        state = work / "state" / "state.json"
        certs = max(1, round(args.certs * n / args.services)) if args.certs and ssl_half else 0
        t0 = time.perf_counter()
        ssl_count, own, own_host = write_state(state, n, certs, upstream, ssl_half)
        log(f"{n} services: state and {own} pairs written in {time.perf_counter() - t0:.1f} s")
        http_port, https_port = free_port(), free_port()
        cmd = [sys.executable, "-c", LAUNCH, str(tree), "run", "--listen-host", "127.0.0.1",
               "--http-port", str(http_port), "--https-port", str(https_port),
               "--dns", dns, "--state", str(state), "--health-interval", "3600",
               "--acme-directory", f"http://127.0.0.1:{free_port()}/directory",
               "--drain-timeout", "1"]
        env = {**os.environ, "HOME": str(home), "LUMA_PROXY_OPTIMIZE": "0",
               "PYTHONUNBUFFERED": "1"}
        for var in ("LUMA_PROXY_STATE", "LUMA_PROXY_DNS", "LUMA_PROXY_HEALTH_INTERVAL",
                    "LUMA_PROXY_ACME_DIRECTORY", "PYTHONPATH"):
            env.pop(var, None)
        result = Run(n, ssl_count, own, command=" ".join(
            ["luma-proxy", *cmd[cmd.index("run"):]]))
        with open(work / "proxy.log", "wb") as out:
            launched = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, preexec_fn=(
                                        (lambda: os.setpriority(os.PRIO_PROCESS, 0, 0))
                                        if args.instrument_nice else None))
        try:
            measure(result, proc, launched, http_port, https_port, own_host, args.seconds)
        except Exception:
            print((work / "proxy.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            stop(proc)
        return result
    finally:
        if args.keep:
            log(f"kept {work} (proxy.log: the proxy's output)")
        else:
            shutil.rmtree(work, ignore_errors=True)


def measure(result: Run, proc: subprocess.Popen[bytes], launched: float, http_port: int,
            https_port: int, own_host: str, seconds: float) -> None:
    def since() -> float:
        return time.perf_counter() - launched

    while get_once(http_port) != 200:
        if proc.poll() is not None:
            raise RuntimeError(f"luma-proxy exited with {proc.returncode}")
        if since() > 120:
            raise TimeoutError("no 200 within 120 s")
        time.sleep(0.01)
    result.first_200 = since()
    client = KeepAlive(http_port)
    next_check = 0.0
    next_send = time.perf_counter()
    try:
        while since() < seconds:
            at = since()
            result.samples.append((at, client.request()))
            if own_host and result.own_cert is None and at >= next_check:
                if own_certificate_served(https_port, own_host):
                    result.own_cert = since()
                next_check = at + 0.05
            next_send += INTERVAL
            pause = next_send - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            else:
                next_send = time.perf_counter()  # behind (a long request): no burst after it
    finally:
        client.close()
    result.reconnects = client.reconnects
    if own_host and result.own_cert is None:  # not within the window: wait for it
        while since() < 120 and not own_certificate_served(https_port, own_host):
            time.sleep(0.05)
        result.own_cert = since() if since() < 120 else None


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the proxy's own process group, SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ------------------------------------------------------------------------- the report
def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def machine() -> str:
    import mitmproxy.version

    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} vCPU {cpu}, Python {platform.python_version()}, "
            f"mitmproxy {mitmproxy.version.VERSION}, load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def report(runs: list[Run], args: argparse.Namespace, tree: Path, commit: str) -> None:
    print(f"Command: `{' '.join(sys.argv)}`; tree {tree} ({commit}); {machine()}.\n")
    print(f"Proxy: `{runs[-1].command}` (LUMA_PROXY_OPTIMIZE=0). Client: one request every "
          f"{INTERVAL * 1000:.0f} ms on a keep-alive connection to a --no-ssl host, from "
          f"the first 200 to {args.seconds:.0f} s after the launch.\n")
    print("| services (ssl / own pair) | launch -> first 200 | launch -> own certificate "
          f"served | longest request | longest from {STEADY_AFTER:.0f} s on | p99 | median "
          "| requests > 50 ms | requests done |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        own = f"{r.own_cert:.2f} s" if r.own_cert is not None else "-"
        print(f"| {r.services:,} ({r.ssl:,} / {r.own:,}) | {r.first_200:.2f} s | {own} | "
              f"{ms(r.longest())} | {ms(r.longest(STEADY_AFTER))} | {ms(r.quantile(0.99))} | "
              f"{r.quantile(0.5) * 1000:.1f} ms | {r.over(0.05)} | {len(r.samples)} |")
    small, control, big = runs
    for label, a, b in (("certificates at scale: run 3 - run 2", control, big),
                        (f"size: {big.services:,} - {small.services:,}", small, big)):
        print(f"| **{label}** | {b.first_200 - a.first_200:+.2f} s | | "
              f"{ms(b.longest() - a.longest())} | "
              f"{ms(b.longest(STEADY_AFTER) - a.longest(STEADY_AFTER))} | "
              f"{ms(b.quantile(0.99) - a.quantile(0.99))} | | {b.over(0.05) - a.over(0.05):+d} | "
              f"{len(b.samples) - len(a.samples):+d} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--certs", type=int, default=2_000,
                        help="ssl services with their own pair at --services (scaled for 10)")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="length of the window from the launch")
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="checkout whose luma_proxy runs (default: this one)")
    parser.add_argument("--keep", action="store_true", help="keep each run's directory")
    parser.add_argument("--instrument-nice", type=int, default=0, metavar="N",
                        help="run the client, the upstream and the DNS at nice -N (root), "
                             "the proxy at 0: a busy proxy's threads do not delay the "
                             "instrument's own turn on the CPU")
    args = parser.parse_args()
    tree = args.tree.resolve()
    use_tree(tree)
    import luma_proxy

    assert Path(luma_proxy.__file__).resolve().is_relative_to(tree), luma_proxy.__file__
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "?"
    home = Path(tempfile.mkdtemp(prefix="luma-tls-scale-home-"))
    from mitmproxy.certs import CertStore

    # mitmproxy's CA, made once here: no run pays for its key generation at start-up.
    CertStore.from_store(home / ".mitmproxy", "mitmproxy", 2048)
    if args.instrument_nice:
        os.setpriority(os.PRIO_PROCESS, 0, -args.instrument_nice)  # inherited by the helpers
    upstream = free_port()
    fork = multiprocessing.get_context("fork")
    parent_end, child_end = fork.Pipe()
    child = fork.Process(target=helpers, args=(str(tree), upstream, child_end), daemon=True)
    child.start()
    try:
        dns = parent_end.recv()
        runs = []
        for n, ssl_half in ((10, True), (args.services, False), (args.services, True)):
            log(f"run with {n} services, {'half' if ssl_half else 'none'} --ssl ({tree})")
            runs.append(run_once(args, tree, n, ssl_half, upstream, dns, home))
            r = runs[-1]
            log(f"  first 200 after {r.first_200:.2f} s, longest request {ms(r.longest())}, "
                f"from {STEADY_AFTER:.0f} s on {ms(r.longest(STEADY_AFTER))}")
            slow = [f"{lat * 1000:.0f} ms at {at:.1f} s" for at, lat in r.samples if lat > 0.1]
            log(f"  requests over 100 ms: {', '.join(slow) or 'none'}")
        report(runs, args, tree, commit)
    finally:
        child.terminate()
        child.join(5)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
