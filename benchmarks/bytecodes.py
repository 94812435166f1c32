"""Bytecodes per request, per function: where luma-proxy's own cost is, free of noise.

Usage:
    .venv/bin/python benchmarks/bytecodes.py [--requests 1000] [--top 40]

Starts the same two targets as ``perf.py --instructions`` (the lean master with
a no-op routing addon, and ``luma-proxy run``), each with
``benchmarks/bytecodes/sitecustomize.py`` loaded, sends one keep-alive client's
warm-up, then counts the bytecodes of ``--requests`` requests, and prints the
totals per request and the functions whose counts differ most between the two.

A count of bytecodes is not of instructions: C work (a ``bytes.lower``, a regex,
a system call) is one bytecode however long it takes. Use it to find where
Python runs; judge a change with ``perf.py --instructions``.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import perf  # noqa: E402


def counts(path: Path, n: int) -> collections.Counter[str]:
    out: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        count, where = line.split("\t", 1)
        where = re.sub(r".*(site-packages|lib/python3\.\d+)/", "", where)
        out[where.replace(str(ROOT.parent) + "/", "")] += int(count) / n
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    env = perf.Env()
    env.env["PYTHONPATH"] = str(ROOT / "bytecodes")
    # As perf.py --instructions: work per second (a DNS refresh, a health round) is not
    # charged to the requests, which the counting slows to a few dozen a second.
    env.env.update(LUMA_PROXY_DNS_TTL="3600", LUMA_PROXY_HEALTH_INTERVAL="3600")
    found = {}
    for key in ("noop", "luma"):
        out = env.dir / f"bytecodes-{key}.txt"
        env.env["BYTECODES_OUT"] = str(out)
        t = perf.start_target(env, key, 1, tls=False, timeout=120)
        try:
            assert t.proc is not None
            perf.keepalive_requests(t.http_port, 200)
            os.kill(t.proc.proc.pid, signal.SIGUSR1)
            time.sleep(0.3)
            perf.keepalive_requests(t.http_port, args.requests)
            os.kill(t.proc.proc.pid, signal.SIGUSR2)
            for _ in range(50):
                if out.exists():
                    break
                time.sleep(0.2)
            time.sleep(0.5)  # written whole
        finally:
            perf.stop_target(env, t)
        found[key] = counts(out, args.requests)
    noop, luma = found["noop"], found["luma"]
    print(f"bytecodes per request: no-op master {sum(noop.values()):,.0f}, "
          f"luma-proxy run {sum(luma.values()):,.0f}")
    diff = {k: luma.get(k, 0) - noop.get(k, 0) for k in set(luma) | set(noop)}
    for where, d in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:args.top]:
        print(f"{d:9.1f}  {where}")


if __name__ == "__main__":
    main()
