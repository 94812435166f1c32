"""``luma-proxy run --workers N``: N processes on one port, end to end.

Which worker served a connection is read from the kernel, not from the proxy:
the proxy-side socket of a client connection is found in ``/proc/net/tcp``
(by the client's port) and its inode among the workers' ``/proc/<pid>/fd``.

Starting workers is most of the cost, so the tests taking the ``cluster``
fixture share one 3-worker proxy, in file order; the last one stops it.
Hosts are deployed ``--no-ssl``: no ACME order may leave loopback.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from luma_proxy.models import now
from luma_proxy.proxy.addon import RELOAD_POLL
from luma_proxy.store.registry import Store
from tests.e2e.conftest import LUMA, Proxy, next_ip, request, wait_until
from tests.e2e.docker_double import Container, FakeDockerDNS, free_port

READY = "workers listening"
INTERVAL = 0.5  # health check interval of the shared proxy
pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")


# ------------------------------------------------------------------ helpers
def children(pid: int) -> set[int]:
    """Live (non-zombie) processes whose parent is ``pid``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def owner(conn: http.client.HTTPConnection, proxy_port: int, pids: set[int]) -> int | None:
    """The worker whose socket is the proxy's end of ``conn`` (an answered request)."""
    assert conn.sock is not None
    client_port = conn.sock.getsockname()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == proxy_port and int(remote.split(":")[1], 16) == \
                client_port:
            inode = fields[9]
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        fd_dir = Path("/proc") / str(pid) / "fd"
        try:
            for fd in fd_dir.iterdir():
                try:
                    if os.readlink(fd) == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


def lock_holder(path: Path) -> int | None:
    """The pid holding a flock on ``path`` (from /proc/locks)."""
    inode = path.stat().st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "FLOCK" in fields and "->" not in fields and int(fields[-3].rsplit(":", 1)[1]) == inode:
            return int(fields[-4])
    return None


def connect(proxy: Proxy) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)


def one_per_worker(proxy: Proxy, pids: set[int], host: str,
                   tries: int = 200) -> dict[int, http.client.HTTPConnection]:
    """A keep-alive connection served by each worker (extra connections are closed)."""
    picked: dict[int, http.client.HTTPConnection] = {}
    for _ in range(tries):
        conn = connect(proxy)
        assert request(proxy.port, host, conn=conn).status == 200
        pid = owner(conn, proxy.port, pids)
        if pid is not None and pid not in picked:
            picked[pid] = conn
        else:
            conn.close()
        if len(picked) == len(pids):
            return picked
    raise AssertionError(f"connections reached only {sorted(picked)} of {sorted(pids)}")


@dataclass
class Cluster:
    """One ``run --workers 3`` proxy with its Docker double, shared by the module."""

    proxy: Proxy
    dns: FakeDockerDNS
    blog: Container
    metrics_port: int
    env: dict[str, str]
    started: list[Container]

    def cli(self, *args: str) -> None:
        result = subprocess.run([LUMA, *args, "--state", str(self.proxy.state)],
                                capture_output=True, text=True, timeout=60, env=self.env)
        assert result.returncode == 0, result.stderr

    def container(self, name: str, alias: str, host: str) -> Container:
        c = Container(name, next_ip(), free_port()).start()
        self.started.append(c)
        self.dns.set_alias(alias, [c.ip])
        self.cli("deploy", "--host", host, "--target", f"{alias}:{c.port}", "--project", "p",
                 "--no-ssl")
        return c

    def pids(self) -> set[int]:
        return children(self.proxy.proc.pid)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("workers")
    dns = FakeDockerDNS().start()
    env = {**os.environ, "LUMA_PROXY_DNS": dns.address, "HOME": str(tmp),
           "LUMA_PROXY_HEALTH_INTERVAL": str(INTERVAL)}
    port, metrics_port = free_port(), free_port()
    log = tmp / "proxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [LUMA, "run", "--workers", "3", "--http-port", str(port), "--listen-host",
             "127.0.0.1", "--metrics-port", str(metrics_port), "--state",
             str(tmp / "state.json")],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    proxy = Proxy(proc, port, tmp / "state.json", log)
    cluster = Cluster(proxy, dns, None, metrics_port, env, [])  # type: ignore[arg-type]
    try:
        cluster.blog = cluster.container("blog-1", "blog", "blog.test")
        wait_until(lambda: READY in proxy.logs() or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, proxy.logs()
        yield cluster
    finally:
        proxy.stop(signal.SIGKILL)
        for c in cluster.started:
            if c.running:
                c.kill()
        dns.stop()


# ------------------------------------------------------------- shared proxy
def test_connections_spread_over_all_workers(cluster: Cluster) -> None:
    proxy, pids = cluster.proxy, cluster.pids()
    assert len(pids) == 3, pids
    conns = [connect(proxy) for _ in range(45)]
    served: Counter[int | None] = Counter()
    for conn in conns:
        assert request(proxy.port, "blog.test", conn=conn).text == "blog-1"
        served[owner(conn, proxy.port, pids)] += 1
    for conn in conns:
        conn.close()
    print(f"connections per worker: {dict(served)}")
    assert set(served) == pids, served  # every worker took connections, nobody else did


def test_cli_deploy_returns_once_every_worker_serves_it(cluster: Cluster) -> None:
    """No polling: the first request on each worker after ``deploy`` returns is routed.

    (Each worker reloads every 0.2 s on its own; without ``served.py`` a request
    sent right after the command got 404 from a worker that had not yet.)
    """
    proxy = cluster.proxy
    per_worker = one_per_worker(proxy, cluster.pids(), "blog.test")
    for round_ in range(3):
        host = f"shop{round_}.test"
        cluster.container(f"shop-{round_}", f"shop{round_}", host)  # returns after deploy
        statuses = {pid: request(proxy.port, host, conn=conn).status
                    for pid, conn in per_worker.items()}
        assert statuses == dict.fromkeys(per_worker, 200), statuses
    for conn in per_worker.values():
        conn.close()


def test_all_workers_agree_on_health_within_one_interval(cluster: Cluster) -> None:
    proxy, blog = cluster.proxy, cluster.blog
    conns = one_per_worker(proxy, cluster.pids(), "blog.test")
    slack = 0.5  # one probe round trip and the polling below, on a busy machine
    try:
        for healthy, status in ((False, 503), (True, 200)):
            blog.healthy = healthy
            changed = time.monotonic()
            seen: dict[int, float] = {}
            while len(seen) < len(conns) and time.monotonic() - changed < 10:
                for pid, conn in conns.items():
                    if pid not in seen and \
                            request(proxy.port, "blog.test", conn=conn).status == status:
                        seen[pid] = time.monotonic()
                time.sleep(0.02)
            assert len(seen) == len(conns), f"only {sorted(seen)} answered {status}"
            last, first = max(seen.values()), min(seen.values())
            print(f"all workers answer {status} {last - changed:.2f}s after the change, "
                  f"{last - first:.2f}s between the first and the last")
            assert last - changed <= INTERVAL + RELOAD_POLL + slack, (status, last - changed)
            assert last - first <= RELOAD_POLL + slack, (status, last - first)
    finally:
        blog.healthy = True
        for conn in conns.values():
            conn.close()


def count_health_checks(container: Container, seconds: float) -> int:
    before = container.requests
    time.sleep(seconds)
    return container.requests - before


def test_health_checks_are_not_multiplied_by_workers(cluster: Cluster, start_proxy, dns,
                                                     containers, cli) -> None:  # type: ignore[no-untyped-def]
    window, per_round = 2.0, 2  # each round probes the alias and its one IP
    most = per_round * (window / INTERVAL + 1)  # 3 workers each checking would be 3x this
    three = count_health_checks(cluster.blog, window)  # nothing else is sent to it meanwhile

    # The same service behind one process (its own state file, so its own lock).
    port = free_port()
    alone = containers("blog-alone", port=port)
    dns.set_alias("blog", [alone.ip])
    cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p", "--no-ssl")
    start_proxy("run", env={"LUMA_PROXY_HEALTH_INTERVAL": str(INTERVAL)})
    wait_until(lambda: alone.requests > 0, timeout=30)
    one = count_health_checks(alone, window)

    print(f"health requests in {window:g}s at {INTERVAL:g}s interval: 1 worker {one}, "
          f"3 workers {three}")
    assert 0 < one <= most, one
    assert 0 < three <= most, three
    assert three < 2 * one + per_round, (one, three)  # multiplied, it would be ~3x


def test_metrics_port_serves_the_sum_of_all_workers(cluster: Cluster) -> None:
    proxy = cluster.proxy
    conns = one_per_worker(proxy, cluster.pids(), "blog.test")

    def scrape() -> str:
        return request(cluster.metrics_port, "127.0.0.1", "/metrics").text

    def total() -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in scrape().splitlines()
                   if line.startswith('luma_http_requests_total{service="blog.test"'))

    before = total()
    for conn in conns.values():
        for _ in range(10):
            assert request(proxy.port, "blog.test", conn=conn).status == 200
        conn.close()
    assert total() - before == 30  # ten from each of the three processes
    assert 'luma_service_healthy{service="blog.test"} 1.0' in scrape()
    assert "cannot serve metrics" not in proxy.logs()


def test_killed_worker_is_restarted_and_the_port_keeps_serving(cluster: Cluster) -> None:
    proxy, pids = cluster.proxy, cluster.pids()
    lock = Path(f"{proxy.state}.health.lock")
    victim = lock_holder(lock)  # the health leader, to see another take over
    assert victim in pids, (victim, pids)
    os.kill(victim, signal.SIGKILL)
    killed_at = now()
    # Reaped, so all its threads are gone and its listening socket is closed (a zombie
    # thread-group leader is not enough: another thread may still hold the files).
    wait_until(lambda: f"(pid {victim}) was killed by SIGKILL" in proxy.logs(), timeout=10)
    for _ in range(30):  # meanwhile, new connections go to the other two
        assert proxy.get("blog.test").text == "blog-1"
    wait_until(lambda: "listening again" in proxy.logs(), timeout=30)
    running = cluster.pids()
    assert len(running) == 3 and victim not in running, running
    one_per_worker(proxy, running, "blog.test")  # the new worker takes connections too

    def checked_at() -> datetime | None:
        entry = (Store(str(proxy.state)).read_health() or {}).get("blog.test")
        return entry.checked_at if entry is not None else None

    # Health checks go on: another worker took the lock the dead one held, within the
    # coordinator's poll (1 s), and said so; not at its next round (INTERVAL later).
    wait_until(lambda: proxy.logs().count("leading: this process") >= 2, timeout=5)
    wait_until(lambda: (at := checked_at()) is not None and at > killed_at, timeout=10)
    assert lock_holder(lock) in cluster.pids()


def test_sigterm_stops_every_worker_and_exits_0(cluster: Cluster) -> None:
    proxy, pids = cluster.proxy, cluster.pids()
    conn = connect(proxy)  # an idle keep-alive client must not hold the shutdown up
    assert request(proxy.port, "blog.test", conn=conn).status == 200
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(30) == 0, proxy.logs()
    conn.close()
    assert not [pid for pid in pids if alive(pid)]
    assert "stopping 3 worker(s) (SIGTERM)" in proxy.logs()


# --------------------------------------------------------------- failures
def run_to_end(tmp_path: Path, state_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LUMA, "run", "--workers", "2", "--listen-host", "127.0.0.1", "--state",
         str(state_path), *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})


def test_port_in_use_is_one_line_and_no_worker_starts(tmp_path: Path, state_path: Path) -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        result = run_to_end(tmp_path, state_path, "--http-port", str(port))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"luma-proxy: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_bad_option_fails_once_not_once_per_worker(tmp_path: Path, state_path: Path) -> None:
    result = run_to_end(tmp_path, state_path, "--http-port", str(free_port()),
                        "--dns", "not-an-address")
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("Error: ")] == \
        result.stderr.strip().splitlines()[-1:], result.stderr
    assert result.stderr.count("Error: ") == 1, result.stderr
