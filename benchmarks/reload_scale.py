"""How long the running proxy takes to re-read a 10,000-service state file.

Usage: .venv/bin/python benchmarks/reload_scale.py [--services 10000]
Prints seconds of wall time for: json.loads alone; a full validation
(parse_state, what the CLI does); the proxy's incremental reader (StateReader)
on an unchanged file, after a deploy (one entry changed), and after a health
round (every entry's health changed); and the swap into the addon (apply).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mitmproxy.test import taddons

from luma_proxy.addon import LumaProxy
from luma_proxy.models import Service, State
from luma_proxy.registry import StateReader, dump_state, parse_state


def timed(fn, *args) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=10_000)
    n = parser.parse_args().services
    state = State(services={
        f"h{i}.example.com": Service(name="a", host=f"h{i}.example.com", target=f"app{i}:3000",
                                     project="p") for i in range(n)})
    data = dump_state(state)
    deployed = state.model_copy(deep=True)
    deployed.services["h5.example.com"].target = "other:1"
    deploy_data = dump_state(deployed)
    checked = deployed.model_copy(deep=True)
    now = datetime.datetime.now(datetime.UTC)
    for service in checked.services.values():
        service.health.checked_at = now
        service.health.healthy = True
    health_data = dump_state(checked)

    rows = [("state file", f"{len(data) / 1e6:.1f} MB, {n} services")]
    rows.append(("json.loads", f"{timed(json.loads, data)[0] * 1000:.0f} ms"))
    rows.append(("full validation (parse_state)", f"{timed(parse_state, data)[0] * 1000:.0f} ms"))
    reader = StateReader()
    reader.parse(data)
    rows.append(("StateReader, file unchanged", f"{timed(reader.parse, data)[0] * 1000:.0f} ms"))
    rows.append(("StateReader, one service deployed",
                 f"{timed(reader.parse, deploy_data)[0] * 1000:.0f} ms"))
    seconds, after = timed(reader.parse, health_data)
    rows.append(("StateReader, every service's health changed", f"{seconds * 1000:.0f} ms"))
    addon = LumaProxy()
    with taddons.context(addon):
        addon.apply(parse_state(data).services)
        rows.append(("swap into the addon (apply)",
                     f"{timed(addon.apply, after.services)[0] * 1000:.0f} ms"))  # type: ignore[attr-defined]
    print("| step | wall time |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
