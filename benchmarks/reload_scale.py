"""What the registry costs at 10,000 services: the CLI's write, and each proxy's reload.

Usage: .venv/bin/python benchmarks/reload_scale.py [--services 10000] [--runs 7]

Prints a markdown table of wall times (median and max of ``--runs`` runs, each
on a different service). The registry holds N services, half of them
``--ssl``, each with a stored health entry. The writers (the CLI, the health
leader) run in a second process, as in production, so their allocations and
garbage collections are not counted in the proxy's; the proxy side is a
``LumaProxy`` addon in this process, loaded with the registry:

- one deploy: the CLI's transaction (``luma-proxy deploy``'s write: read the
  row, write it, drop a stale health entry, commit with fsync), and the whole
  ``luma-proxy deploy`` command as a process;
- the proxy's side of that deploy: reading the rows that moved and building
  the next view (``store.snapshot`` + ``view.build_view``, in a thread in the
  proxy), the swap on the event loop, and end to end (``reload()``);
- a health round by the leader (``schedule.write_results``) where nothing
  changed (every ``checked_at`` moves) and one where every result flips, and
  what each proxy process then pays (``reload()``).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mitmproxy.version
from mitmproxy.test import taddons

from luma_proxy.health.schedule import write_results
from luma_proxy.models import Health, HealthEntry, Service
from luma_proxy.proxy.addon import LumaProxy
from luma_proxy.store.registry import Store
from luma_proxy.store.view import build_view

EXE = Path(sys.executable).parent / "luma-proxy"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def summary(samples: list[float]) -> str:
    return f"{ms(statistics.median(samples))} (max {ms(max(samples))})"


def timed[T](call: Callable[[], T]) -> tuple[float, T]:
    t0 = time.perf_counter()
    result = call()
    return time.perf_counter() - t0, result


def host(i: int) -> str:
    return f"h{i}.example.com"


def deploy(store: Store, i: int) -> None:
    """What ``luma-proxy deploy`` writes: one row, its stale health entry dropped."""
    with store.transaction() as tx:
        service = tx.service(host(i))
        assert service is not None
        moved = service.model_copy(update={"target": f"moved{i}:3000"})
        tx.put(moved)
        entry = tx.health(host(i))
        if entry is not None and not entry.matches(moved):
            tx.delete_health(host(i))


def health_round(store: Store, at: datetime, healthy: bool, flip: bool) -> float:
    """The leader's write of one result per service (``changed_at`` moves only on a flip)."""
    with store.transaction() as tx:
        keys = tx.routing_keys()
    changed = at if flip else FILLED_AT
    results = {h: (key, Health(healthy=healthy, checked_at=at, changed_at=changed,
                               last_error=None if healthy else "HTTP 503"))
               for h, key in keys.items()}
    return timed(lambda: write_results(store, results))[0]


def writer_process(path: str, conn: Connection) -> None:
    """The CLI and the health leader: another process, as in production."""
    store = Store(path)
    while True:
        command = conn.recv()
        if command[0] == "deploy":
            conn.send(timed(lambda c=command: deploy(store, c[1]))[0])
        elif command[0] == "health":
            conn.send(health_round(store, *command[1:]))
        else:
            return


FILLED_AT = datetime(2026, 1, 1, tzinfo=UTC)


def fill(path: Path, n: int) -> None:
    at = FILLED_AT
    with Store(path).transaction() as tx:
        for i in range(n):
            service = Service(name=f"app{i}", host=host(i), target=f"app{i}:3000",
                              project="p", ssl=i % 2 == 0)
            tx.put(service)
            tx.put_health(service.host, HealthEntry.of(service.routing_key(), Health(
                healthy=True, checked_at=at, changed_at=at)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    n, runs = args.services, args.runs
    started_at = datetime.now(UTC)
    workdir = Path(tempfile.mkdtemp(prefix="luma-reload-scale-"))
    path = workdir / "state.json"
    fill_time, _ = timed(lambda: fill(path, n))
    store = Store(path)
    fork = multiprocessing.get_context("spawn")  # never fork a process with SQLite open
    conn, child_end = fork.Pipe()
    helper = fork.Process(target=writer_process, args=(str(path), child_end), daemon=True)
    helper.start()

    def ask(*command: object) -> float:
        conn.send(command)
        return conn.recv()

    size = sum(p.stat().st_size for p in workdir.glob("state.db*"))
    rows: list[tuple[str, str]] = [
        ("registry", f"{size / 1e6:.1f} MB (db + WAL), {n} services (half --ssl), "
                     f"{n} health entries; written in one transaction in {ms(fill_time)}")]

    commands = []
    for i in range(runs):
        argv = [str(EXE), "deploy", "--host", host(i), "--target", f"cli{i}:3000",
                "--project", "p", "--state", str(path)]
        env = {**os.environ, "LUMA_PROXY_SERVED_TIMEOUT": "0"}
        seconds, result = timed(lambda a=argv, e=env: subprocess.run(
            a, capture_output=True, text=True, env=e))
        assert result.returncode == 0, result.stderr
        commands.append(seconds)
    gc.collect()

    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(path), luma_health_interval=3600)
        assert len(addon.table.services) == n and len(addon.health) == n - runs

        writes, builds, swaps, inline = [], [], [], []
        for i in range(runs, 2 * runs):
            writes.append(ask("deploy", i))
            base = addon.view
            seconds, view = timed(lambda b=base: build_view(
                store.snapshot(b.routes_gen, b.health_gen, b.registry_id), b))
            builds.append(seconds)
            swaps.append(timed(lambda v=view: addon._swap(v))[0])  # the loop's part alone
            assert addon.table.services[host(i)].target == f"moved{i}:3000", (
                base.routes_gen, view.routes_gen, addon.view.routes_gen,
                addon.table.services[host(i)].target)
        for i in range(2 * runs, 3 * runs):
            ask("deploy", i)
            seconds, changed = timed(addon.reload)
            assert changed and addon.table.services[host(i)].target == f"moved{i}:3000"
            inline.append(seconds)
        rows += [
            ("one deploy: the CLI's transaction (another process)", summary(writes)),
            ("one deploy: the whole `luma-proxy deploy` command (a process: Python start-up,"
             " imports, transaction; no proxy to wait for)", summary(commands)),
            ("one deploy, each proxy: rows that moved -> next view (`snapshot` + "
             "`build_view`, in a thread in the proxy)", summary(builds)),
            ("one deploy, each proxy: swap on the event loop", summary(swaps)),
            ("**one deploy: committed -> in the routing view (`reload()`, all inline)**",
             f"**{summary(inline)}**"),
        ]

        clock = datetime.now(UTC)
        for label, flip in (("round where no result changed (only checked_at moves)", False),
                            ("round where every result flips", True)):
            leader, reads = [], []
            for r in range(runs + 1):  # the first one only sets the scene
                clock += timedelta(seconds=30)
                healthy = bool(r % 2) if flip else True
                write = ask("health", clock, healthy, flip)
                read, _changed = timed(addon.reload)
                assert addon.health[host(3 * runs + 1)].healthy is healthy
                if r:
                    leader.append(write)
                    reads.append(read)
            rows += [(f"health {label}: the leader's write", summary(leader)),
                     (f"**health {label}: each proxy's `reload()`**", f"**{summary(reads)}**")]
    conn.send(("stop",))
    helper.join(5)

    print(f"`.venv/bin/python benchmarks/reload_scale.py --services {n} --runs {runs}`, "
          f"{started_at:%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, mitmproxy {mitmproxy.version.VERSION}, "
          f"SQLite {__import__('sqlite3').sqlite_version}\n")
    print("| step | wall time, median (max) |")
    print("|---|---|")
    for step, value in rows:
        print(f"| {step} | {value} |")


if __name__ == "__main__":
    main()
