#!/usr/bin/env python3
"""What the event loop spends swapping in a health round that changes every result.

    .venv/bin/python benchmarks/swap_cost.py [--services 10000] [--rounds 6]

A registry of ``--services`` services; each round rewrites every health entry
(as a leader's round where every result changed), the next view is read and
compared as the proxy's reload thread does, and ``LumaProxy._swap`` is timed on
this thread: alternately comparing the views itself (``changes`` not given)
and applying the changes computed beforehand (what the proxy now hands over).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mitmproxy.test import taddons

from luma_proxy.models import HealthEntry, Service
from luma_proxy.proxy.addon import LumaProxy
from luma_proxy.store.registry import Store
from luma_proxy.store.view import diff, read_view


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    n = args.services
    state = Path(tempfile.mkdtemp(prefix="luma-swap-")) / "state.json"
    store = Store(state)
    with store.transaction() as tx:
        for i in range(n):
            tx.put(Service(name=f"a{i}", host=f"s{i}.test", target=f"app-{i}:80",
                           project="p", ssl=False))

    def health_round(k: int) -> None:
        now = datetime.datetime.now(datetime.UTC)
        with store.transaction() as tx:
            for i in range(n):
                tx.put_health(f"s{i}.test", HealthEntry(
                    target=f"app-{i}:80", health_path="/up", ssl=False, healthy=True,
                    last_error=None if k % 2 else f"round {k}", changed_at=now,
                    checked_at=now, containers={f"10.0.{i // 250}.{i % 250}": True}))

    addon = LumaProxy()
    comparing: list[float] = []
    applying: list[float] = []
    with taddons.context(addon) as tctx:
        tctx.configure(addon, luma_state=str(state), luma_health_interval=3600)
        for k in range(args.rounds):
            health_round(k)
            base = addon.view
            view = read_view(store, base)
            changes = diff(base, view)
            t0 = time.perf_counter()
            if k % 2:
                addon._swap(view)
                comparing.append((time.perf_counter() - t0) * 1e3)
            else:
                addon._swap(view, changes)
                applying.append((time.perf_counter() - t0) * 1e3)
            assert addon.view is view and len(changes.health) == n
        addon.done()
    print(f"{n} changed results; swap comparing on the loop: "
          f"{[round(x, 1) for x in comparing]} ms (median {statistics.median(comparing):.1f})")
    print(f"swap with the changes handed over: {[round(x, 2) for x in applying]} ms "
          f"(median {statistics.median(applying):.2f})")


if __name__ == "__main__":
    main()
