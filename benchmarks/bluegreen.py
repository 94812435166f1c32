"""Blue-green switching under load, full length, printed as markdown tables.

    .venv/bin/python benchmarks/bluegreen.py [--duration 30] [--switches 6] [--harsh]

Sets everything up itself (DNS double, container processes, ``luma-proxy run``,
the host registered through the CLI) with the harness in
``tests/e2e/bluegreen.py``, then:

* graceful: ``--keepalive`` keep-alive clients plus ``--fresh`` clients that open
  a new connection per request, for ``--duration`` seconds, while the deploy
  flow (start green, /up per IP, move the alias, wait, SIGTERM blue) runs
  ``--switches`` times, alternating colours. Any non-2xx answer or connection
  error is a failed request.
* ``--harsh``: the same load, with the old colour stopped the wrong way: SIGTERM
  without the drain wait; ``docker stop`` while still in the alias next to green;
  SIGKILL right after the switch; SIGKILL while still in the alias next to green;
  and (for reference) the wrong order, killed while it alone carries the alias.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.e2e.bluegreen import (  # noqa: E402
    DEFAULT_DRAIN,
    LAG_BOUND,
    Deployment,
    Figures,
    LoadGenerator,
    Sample,
    analyse,
    percentile,
)

HARSH = {
    "no-wait": "SIGTERM (graceful) blue right after the switch, without the drain wait",
    "stop-in-alias": "`docker stop` (SIGTERM) blue while the alias answers blue + green, "
                     "blue leaves the answer when it exits (plain Docker's alias move)",
    "kill-after-switch": "SIGKILL blue right after the alias moved to green",
    "kill-in-alias": "SIGKILL blue while still in the alias (answer: blue + green), "
                     "removed from it 1 s later",
    "kill-then-switch": "(wrong order, reference) SIGKILL blue while it alone carries "
                        "the alias, alias moved 1 s later",
}


# --------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------


def deployment(args: argparse.Namespace, name: str, strategy: str = "alias") -> Deployment:
    return Deployment(Path(args.workdir) / name, replicas=args.replicas, drain=args.drain,
                      strategy=strategy)


def load_for(dep: Deployment, args: argparse.Namespace) -> LoadGenerator:
    assert dep.proxy is not None
    return LoadGenerator(dep.proxy.port, dep.host, keepalive=args.keepalive,
                         fresh=args.fresh).start()


def graceful(
    args: argparse.Namespace, strategy: str = "alias"
) -> tuple[Figures, Deployment, list[Sample]]:
    with deployment(args, f"graceful-{strategy}", strategy) as dep:
        load = load_for(dep, args)
        began = time.monotonic()
        every = args.duration / (args.switches + 1)
        for k in range(1, args.switches + 1):
            time.sleep(max(0.0, began + k * every - time.monotonic()))
            sw = dep.deploy_next_colour()
            progress(f"{strategy} switch {sw.number}: {sw.old.colour}{sw.old.number} -> "
                     f"{sw.new.colour}{sw.new.number}, {load.count()} requests so far")
        time.sleep(max(0.0, began + args.duration - time.monotonic()))
        samples = load.stop()
        return analyse(samples, dep, idle_closes=load.idle_closes), dep, samples


def harsh(args: argparse.Namespace, mode: str) -> tuple[Figures, Deployment, list[Sample]]:
    with deployment(args, mode) as dep:
        load = load_for(dep, args)
        time.sleep(2.0)
        for _ in range(args.harsh_switches):
            if mode == "no-wait":
                sw = dep.deploy_next_colour("graceful", drain=0.0)
            else:
                sw = dep.deploy_next_colour(mode)
            progress(f"{mode} {sw.number}: {load.count()} requests so far")
            time.sleep(3.0)  # everything settles (ejections expire after 2 s)
        samples = load.stop()
        return analyse(samples, dep, idle_closes=load.idle_closes), dep, samples


def progress(line: str) -> None:
    print(f"  .. {line}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10,
                              cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine() -> list[str]:
    from mitmproxy.version import VERSION

    model = next((line.split(":", 1)[1].strip() for line in sh("lscpu").splitlines()
                  if line.startswith("Model name")), platform.processor() or "?")
    dirty = sh("git status --porcelain -- luma_proxy addons | wc -l")
    return [
        f"- machine: {sh('nproc')} CPUs ({model}), {platform.system()} {platform.release()}, "
        f"load average at start {os.getloadavg()[0]:.2f}",
        f"- Python {platform.python_version()}, mitmproxy {VERSION}",
        f"- code: git {sh('git rev-parse --short HEAD') or '?'}"
        f"{f' + {dirty} uncommitted file(s) in luma_proxy/' if dirty not in ('', '0') else ''}",
    ]


def ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:.0f}"  # nan -> "-"


def failures_text(counter: Counter[str]) -> str:
    return ", ".join(f"{n} x {label}" for label, n in counter.most_common()) or "-"


TITLES = {
    "alias": "### Graceful switches, alias moved (the spec's flow)\n\n"
             "Switch = the alias `blog` answers the green IPs instead of the blue ones "
             "(one DNS table change); blue stays up until the drain wait is over.",
    "target": "### Graceful switches, host re-targeted (one alias per colour)\n\n"
              "Switch = `luma-proxy deploy --host blog.test --target blog-green:PORT` "
              "(measured from when the state file first names green); the aliases never move.",
}


def print_graceful(
    fig: Figures, dep: Deployment, samples: list[Sample], args: argparse.Namespace
) -> bool:
    lags = fig.lags
    observed = sum(s.observed for s in fig.switches)
    ka_conns = len({(s.client, s.conn) for s in samples if s.kind == "keepalive"})
    print(TITLES[dep.strategy] + "\n")
    print(f"{args.keepalive} keep-alive + {args.fresh} new-connection clients, "
          f"{args.replicas} replicas per colour, {args.duration:g} s, drain wait "
          f"{args.drain:g} s, alias cache TTL 1 s (default).\n")
    latency = [s.received - s.sent for s in samples]
    print("| requests | req/s | latency p50/p99 (ms) | failed | keep-alive connections "
          "| switches observed | lag p50 (ms) | lag p99 (ms) | lag max (ms) | bound (ms) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {fig.total} | {fig.total / fig.duration:.0f} "
          f"| {ms(percentile(latency, 50))}/{ms(percentile(latency, 99))} | {fig.failed} "
          f"| {ka_conns} for {args.keepalive} clients "
          f"| {observed}/{len(fig.switches)} | {ms(percentile(lags, 50))} "
          f"| {ms(percentile(lags, 99))} | {ms(max(lags, default=float('nan')))} "
          f"| {ms(LAG_BOUND)} |")
    if fig.failed:
        print(f"\nFailures: {failures_text(fig.failures)}")
    print("\nLag = time from the alias switch until the last response from the old colour "
          "(per switch; p50/p99/max over switches).\n")
    print("| # | switch | green up+healthy (ms) | lag (ms) | per-client lag p50/p99 (ms) "
          "| last old request sent (ms) | old answers after switch "
          "| keep-alive clients moved | failed | old exit codes |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for s, sw in zip(fig.switches, dep.switches, strict=True):
        cl = s.client_lags
        print(f"| {s.number} | {s.direction} | {ms(sw.healthy - sw.started)} | {ms(s.lag)} "
              f"| {ms(percentile(cl, 50))}/{ms(percentile(cl, 99))} "
              f"| {ms(max(s.last_old_sent, 0.0))} | {s.old_after} "
              f"| {s.keepalive_moved}/{s.keepalive_total} | {s.failed} "
              f"| {', '.join(str(c) for c in sw.old_returncodes)} |")
    print()
    print_split(fig)
    return fig.failed == 0 and observed == len(fig.switches) and all(
        lag <= LAG_BOUND for lag in lags)


def print_split(fig: Figures) -> None:
    print("Load split between the replicas of each colour (answers per replica, share):\n")
    print("| generation | replica 1 | replica 2 | shares |")
    print("|---|---:|---:|---|")
    for gen, counts in fig.split.items():
        values = list(counts.values())
        total = sum(values) or 1
        cells = [str(v) for v in values[:2]] + [""] * (2 - len(values[:2]))
        shares = " / ".join(f"{v / total:.1%}" for v in values)
        print(f"| {gen} | {cells[0]} | {cells[1]} | {shares} |")
    print()


def print_harsh(results: list[tuple[str, Figures, Deployment, list[Sample]]],
                args: argparse.Namespace) -> None:
    print("### Harsh cases\n")
    print(f"{args.keepalive} keep-alive + {args.fresh} new-connection clients, "
          f"{args.harsh_switches} deploys per case.\n")
    print("| case | requests | failed per deploy | failed total | of which "
          "| failed requests were sent, from the kill (ms) |")
    print("|---|---:|---:|---:|---|---|")
    for mode, fig, dep, samples in results:
        windows = []
        for sw in dep.switches:
            ref = sw.killed if sw.killed is not None else (sw.stop_sent or sw.at)
            nxt = [o.started for o in dep.switches if o.number == sw.number + 1]
            end = nxt[0] if nxt else float("inf")
            bad = [s.sent - ref for s in samples if not s.ok and sw.started <= s.received < end]
            windows.append(f"{ms(min(bad))}..{ms(max(bad))}" if bad else "none")
        per = ", ".join(str(s.failed) for s in fig.switches)
        print(f"| {HARSH[mode]} | {fig.total} | {per} | {fig.failed} "
              f"| {failures_text(fig.failures)} | {'; '.join(windows)} |")
    print()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="benchmarks/bluegreen.py", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (graceful run)")
    p.add_argument("--switches", type=int, default=6, help="alias switches in the graceful run")
    p.add_argument("--keepalive", type=int, default=50, help="keep-alive clients")
    p.add_argument("--fresh", type=int, default=10,
                   help="clients that open a new connection per request")
    p.add_argument("--replicas", type=int, default=2, help="containers per colour")
    p.add_argument("--drain", type=float, default=DEFAULT_DRAIN,
                   help="seconds between the switch and SIGTERM to the old colour")
    p.add_argument("--strategy", nargs="+", choices=("alias", "target"),
                   default=["alias", "target"],
                   help="graceful runs: move the alias, and/or re-target the host")
    p.add_argument("--harsh", action="store_true", help="also run the SIGKILL cases")
    p.add_argument("--harsh-switches", type=int, default=3, help="deploys per harsh case")
    p.add_argument("--only-harsh", action="store_true", help="skip the graceful run")
    p.add_argument("--workdir", default=None, help="keep proxy logs here (default: temp dir)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bluegreen-") as tmp:
        args.workdir = args.workdir or tmp
        print(f"## luma-proxy blue-green benchmark\n\n"
              f"`{shlex.join(['.venv/bin/python', 'benchmarks/bluegreen.py', *argv])}`\n")
        print("\n".join(machine()))
        print("- proxy: `luma-proxy run`, defaults "
              "(alias cache 1 s, health every 30 s, connect timeout 5 s)\n")
        ok = True
        if not args.only_harsh:
            for strategy in args.strategy:
                fig, dep, samples = graceful(args, strategy)
                ok = print_graceful(fig, dep, samples, args) and ok
        if args.harsh or args.only_harsh:
            results = []
            for mode in HARSH:
                fig, dep, samples = harsh(args, mode)
                results.append((mode, fig, dep, samples))
            print_harsh(results, args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
