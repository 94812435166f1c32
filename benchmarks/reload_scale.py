"""What a reload costs the running proxy with 10,000 services, in process.

Usage: .venv/bin/python benchmarks/reload_scale.py [--services 10000] [--runs 7]

Prints a markdown table of wall times (median and max of ``--runs`` runs, each
on a different service), in one process that holds a ``LumaProxy`` addon loaded
with the registry, as a proxy process does. The writers (the CLI, the health
leader) run in a second process, as in production, so that their allocations
and garbage collections are not counted in the proxy's:

- the parts of a reload of the state file after one deploy: read + parse
  (``StateReader``), the diff against the routes in force, and the swap on the
  event loop (``LumaProxy._take``);
- end to end, one deploy: from the moment the state file has been written (by
  ``Store.update``, as ``luma-proxy deploy`` writes it) to the moment the new
  target is in the routing view, by ``LumaProxy.reload()`` (all of it inline) and
  by ``reload_in_background()`` (the proxy's path: parse in a thread, swap on
  the event loop);
- a health round: the leader writing every service's result to the health
  file, and then what each process pays to take them in (read + parse in a
  thread, swap on the loop), for a typical round (every ``checked_at`` moves,
  no health changes) and for one where every service's health flips; the state
  file is not touched by either;
- for scale: ``orjson.loads`` of the whole state file, the full validation the
  CLI does (``parse_state``) and the CLI's whole locked read-modify-write.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mitmproxy.version
import orjson
from mitmproxy.test import taddons

from luma_proxy.addon import LumaProxy
from luma_proxy.models import Health, HealthEntry, Service, State
from luma_proxy.registry import HealthReader, StateReader, Store, dump_state, parse_state


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def summary(samples: list[float]) -> str:
    return f"{ms(statistics.median(samples))} (max {ms(max(samples))})"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def record_time(obj: object, method: str) -> list[float]:
    """Wrap ``obj.method`` so that each call's wall time is appended to the returned list."""
    original = getattr(obj, method)
    seconds: list[float] = []

    def wrapper(*args: object) -> object:
        took, result = timed(lambda: original(*args))
        seconds.append(took)
        return result

    setattr(obj, method, wrapper)
    return seconds


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} vCPU {cpu}, Python {platform.python_version()}, "
            f"mitmproxy {mitmproxy.version.VERSION}, load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def deploy(store: Store, i: int) -> None:
    """What ``luma-proxy deploy --host h<i>.example.com --target moved<i>:3000`` writes."""
    host = f"h{i}.example.com"

    def change(state: State) -> None:
        state.services[host] = state.services[host].model_copy(
            update={"target": f"moved{i}:3000"})

    store.update(change)


def health_round(store: Store, writer: HealthReader, services: dict[str, Service],
                 clock: datetime, flip: bool, healthy: bool) -> float:
    """The leader's write of one round's results; returns the seconds it took."""
    since = datetime(2026, 1, 1, tzinfo=UTC)  # the last change, long ago
    results = {h: (s.routing_key(), Health(
        healthy=healthy, checked_at=clock, changed_at=clock if flip else since,
        containers={f"10.0.{i % 250}.2": healthy}))
        for i, (h, s) in enumerate(services.items())}

    def change(entries: dict[str, HealthEntry]) -> None:
        for host, (key, health) in results.items():  # what LumaProxy._persist does
            entries[host] = HealthEntry.of(key, health)

    return timed(lambda: store.update_health(change, None, writer))[0]


def writer_process(path: str, conn: Connection) -> None:
    """The other processes: the CLI deploying, the health leader writing its rounds.

    They run apart from the measured process, as they do in production, so
    that their allocations (and garbage collections) are not counted there.
    """
    store, writer = Store(path), HealthReader()
    services: dict[str, Service] | None = None
    while True:  # nothing runs here while the measured process works
        command, *args = conn.recv()
        if command == "deploy":
            conn.send(timed(lambda: deploy(store, args[0]))[0])  # noqa: B023
            services = None
        elif command == "health":
            if services is None:
                services = store.read().services
            conn.send(health_round(store, writer, services, *args))
        else:
            return


def reader_rows(path: Path, ask: Callable[..., float], runs: int) -> list[tuple[str, str]]:
    """The parse of one reload, with a reader that kept the previous version (as the proxy)."""
    data = path.read_bytes()
    reader = StateReader()
    reader.parse(data)
    unchanged = [timed(lambda: reader.parse(data))[0] for _ in range(runs)]
    cli, parse = [], []
    for i in range(runs):
        cli.append(ask("deploy", i))
        changed = path.read_bytes()
        parse.append(timed(lambda: reader.parse(changed))[0])  # noqa: B023
    return [("StateReader.parse, file unchanged", summary(unchanged)),
            ("StateReader.parse, one service deployed", summary(parse)),
            ("the CLI's write of that deploy (`Store.update`: lock, parse all, change, dump, "
             "fsync, rename; another process)", summary(cli))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    n, runs = args.services, args.runs
    started_at = datetime.now(UTC)
    workdir = Path(tempfile.mkdtemp(prefix="luma-reload-scale-"))
    path = workdir / "state.json"
    store = Store(path)
    services = {f"h{i}.example.com": Service(name=f"app{i}", host=f"h{i}.example.com",
                                             target=f"app{i}:3000", project="p")
                for i in range(n)}
    path.write_bytes(dump_state(State(services=services)))
    del services
    data = path.read_bytes()
    fork = multiprocessing.get_context("fork")
    conn, child_end = fork.Pipe()
    helper = fork.Process(target=writer_process, args=(str(path), child_end), daemon=True)
    helper.start()

    def ask(*command: object) -> float:
        conn.send(command)
        return conn.recv()

    rows: list[tuple[str, str]] = [("state file", f"{len(data) / 1e6:.1f} MB, {n} services")]
    rows.append(("orjson.loads of the whole state file",
                 summary([timed(lambda: orjson.loads(data))[0] for _ in range(runs)])))
    rows.append(("full validation (`parse_state`, what the CLI does)",
                 summary([timed(lambda: parse_state(data))[0] for _ in range(3)])))

    rows += reader_rows(path, ask, runs)
    gc.collect()

    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(path), luma_health_interval=3600)
        assert len(addon.table.services) == n

        # --- end to end, inline: reload() = stat + read + parse + diff + swap
        inline: list[float] = []
        swaps = record_time(addon, "_take")
        for i in range(runs, 2 * runs):
            ask("deploy", i)
            seconds, changed = timed(addon.reload)
            assert changed and addon.table.services[f"h{i}.example.com"].target == \
                f"moved{i}:3000"
            inline.append(seconds)
        rows.append(("swap on the event loop (`_take`: diff check, routes, health, resolver)",
                     summary(swaps)))
        rows.append(("**deploy, file written -> in the routing view, `reload()` inline**",
                     f"**{summary(inline)}**"))

        # --- end to end, the proxy's path: parse in a thread, swap on the loop
        async def background() -> list[float]:
            out = []
            for i in range(2 * runs, 3 * runs):
                ask("deploy", i)
                t0 = time.perf_counter()
                await addon.reload_in_background()
                out.append(time.perf_counter() - t0)
                assert addon.table.services[f"h{i}.example.com"].target == f"moved{i}:3000"
            return out

        rows.append(("**deploy, file written -> in the routing view, `reload_in_background()`"
                     " (thread + loop)**", f"**{summary(asyncio.run(background()))}**"))

        # --- health rounds: the leader (another process) writes, this process reads
        state_before = path.read_bytes()
        health_swaps = record_time(addon, "_take_health")
        clock = datetime.now(UTC)
        kinds = (("typical round: every service checked, no health changed", False),
                 ("every service's health changed (all flip)", True))
        for label, flip in kinds:
            writes, reads = [], []
            del health_swaps[:]
            for r in range(runs + 1):  # the first one only sets the scene
                clock += timedelta(seconds=30)
                healthy = bool(r % 2) if flip else True
                write = ask("health", clock, flip, healthy)
                swaps_before = len(health_swaps)
                read, _changed = timed(addon.reload)
                assert len(health_swaps) == swaps_before + 1
                assert addon.health["h0.example.com"].healthy is healthy
                assert addon.health["h0.example.com"].checked_at == clock
                if r:
                    writes.append(write)
                    reads.append(read)
            del health_swaps[0]
            rows.append((f"{label}, leader: write every result (merge, encode, fsync, "
                         "rename)", summary(writes)))
            rows.append((f"{label}, each process: swap on the event loop",
                         summary(health_swaps)))
            rows.append((f"**{label}, each process: read + parse + swap (`reload()`)**",
                         f"**{summary(reads)}**"))
        assert path.read_bytes() == state_before
        health_size = store.health_path.stat().st_size
        rows.append(("health file", f"{health_size / 1e6:.1f} MB, {n} entries"))
        rows.append(("state file rewritten by the health rounds", "no (byte-identical)"))

    conn.send(("stop",))
    helper.join(10)
    print(f"Command: `.venv/bin/python benchmarks/reload_scale.py --services {n} --runs {runs}`; "
          f"{machine()}; {started_at:%Y-%m-%d %H:%M} UTC.\n")
    print("| step | wall time, median (max) of runs |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for file in workdir.iterdir():
        file.unlink()
    workdir.rmdir()


if __name__ == "__main__":
    main()
