"""Deploy flows at full length on a real Docker engine; prints one table.

    .venv/bin/python benchmarks/docker_bluegreen.py [--seconds 30] [--deploys 5]
        [--keepalive 50] [--fresh 10] [--only luma_cli,per_colour,...] [--workers auto]

Uses a running dockerd as it is, or starts one of its own (root), exactly as
tests/docker does (tests/docker/engine.py), builds the images offline, and runs
each scenario of tests/docker/scenarios.py under closed-loop load (keep-alive +
new-connection clients on 127.0.0.1; a failure is a non-2xx, a reset or 10 s
without an answer). Each scenario lasts at least --seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.docker import scenarios
from tests.docker.engine import Engine
from tests.docker.load import Load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--deploys", type=int, default=5)
    parser.add_argument("--keepalive", type=int, default=50)
    parser.add_argument("--fresh", type=int, default=10)
    parser.add_argument("--only", default="")
    parser.add_argument("--workers", default="",
                        help="run the image with `run ... --workers N|auto` instead of its CMD")
    args = parser.parse_args()
    engine = Engine().ensure()
    images = engine.images()
    kw = {"keepalive": args.keepalive, "fresh": args.fresh, "settle": 2.0}  # as measured

    def paced(flow, deploys: int):  # spread the deploys over --seconds
        def run(bed: scenarios.Bed) -> tuple[Load, str]:
            per_colour = flow in (scenarios.per_colour_deploy, scenarios.per_colour_stop_at_once)
            current = scenarios.first_deploy(bed, per_colour=per_colour)
            pause = args.seconds / max(deploys, 1)

            def steps(_load: Load) -> None:
                nonlocal current
                for _ in range(deploys):
                    t0 = time.monotonic()
                    current = flow(bed, current)
                    time.sleep(max(0.0, pause - (time.monotonic() - t0)))

            return scenarios.run_under_load(bed, steps, **kw), ""
        return run

    def kill(bed: scenarios.Bed) -> tuple[Load, str]:
        load, in_flight = scenarios.scenario_kill(bed, **kw)
        return load, f"in flight at the kills: {in_flight}"

    def single(bed: scenarios.Bed) -> tuple[Load, str]:
        return scenarios.scenario_single_replica(bed, gap=5.0, **kw), "5 s without a container"

    def recreate(bed: scenarios.Bed) -> tuple[Load, str]:
        load, a, b = scenarios.scenario_proxy_recreate(bed, **kw)
        return load, f"routed again after {a:.1f} s (re-create), {b:.1f} s (restart)"

    table = {
        "luma_cli": ("Luma CLI flow (CONTRACT.md 4)", paced(scenarios.luma_cli_deploy,
                                                            args.deploys)),
        "disconnect": ("one alias, old ones `docker network disconnect`ed",
                       paced(scenarios.disconnect_deploy, args.deploys)),
        "per_colour": ("per-colour alias + deploy --target, stop old 2 s later",
                       paced(scenarios.per_colour_deploy, args.deploys)),
        "per_colour_now": ("per-colour alias + deploy --target, `docker stop` old at once",
                           paced(scenarios.per_colour_stop_at_once, args.deploys)),
        "kill": ("docker kill: one replica, then all old after a switch", kill),
        "single": ("single replica redeployed", single),
        "recreate": ("proxy re-created (luma proxy update), then restarted", recreate),
    }
    only = [k for k in args.only.split(",") if k] or list(table)
    proxy_cmd = (["run", "--http-port", "80", "--https-port", "443", "--log-format", "json",
                  "--workers", args.workers] if args.workers else [])
    rows = []
    try:
        for key in only:
            title, run = table[key]
            bed = scenarios.Bed(engine, images, tag=key, proxy_cmd=proxy_cmd).setup()
            try:
                load, note = run(bed)
            finally:
                bed.close()
            rows.append((title, load, note))
            print(f"{title}: {load.summary()} {note}", file=sys.stderr, flush=True)
    finally:
        engine.cleanup()
        engine.stop()
    print(f"| scenario ({args.keepalive}+{args.fresh} clients, 2 replicas) | requests | failed "
          "| failures | note |")
    print("|---|---:|---:|---|---|")
    for title, load, note in rows:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(load.failures().items())) or "-"
        print(f"| {title} | {load.requests:,} | {load.failed} | {kinds} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
