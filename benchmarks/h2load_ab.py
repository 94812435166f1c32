"""HTTP/2 load against two source trees of luma-proxy, in turns, in one run.

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/h2load_ab.py /tmp/before . [-- h2load args]

Each tree's ``luma-proxy run`` (``LAUNCH``: that tree's package, not the editable
install's; ``LUMA_PROXY_OPTIMIZE=0`` on both sides, as its ``-O`` re-exec would
import the editable install again) serves tls.bench.test from perf.py's nginx upstream; h2load
(default ``-n 20000 -c 10 -m 100``, the issue's load) runs against each in turn,
twice, and its summary lines are printed as they come, with the most
connections to the upstream seen established at once (``ss``, every 0.1 s).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import perf

LAUNCH = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path.insert(0, sys.argv.pop(1))
sys.argv[0] = "luma-proxy"
runpy.run_module("luma_proxy", run_name="__main__")
"""


def most_upstream_connections(port: int, stop: threading.Event, seen: list[int]) -> None:
    """Sample the established connections to the upstream's ``port`` until ``stop``."""
    while not stop.is_set():
        out = subprocess.run(["ss", "-Htn", "state", "established", "dport", f"= :{port}"],
                             capture_output=True, text=True).stdout
        seen.append(len(out.splitlines()))
        time.sleep(0.1)


def main() -> None:
    args = sys.argv[1:]
    extra = args[args.index("--") + 1:] if "--" in args else ["-n", "20000", "-c", "10",
                                                                 "-m", "100"]
    trees = [str(Path(a).resolve()) for a in (args[:args.index("--")] if "--" in args
                                               else args)]
    env = perf.Env()
    try:
        for tree in trees * 2:
            port, tls = perf.free_port(), perf.free_port()
            cmd = [sys.executable, "-c", LAUNCH, tree, "run", "--listen-host", "127.0.0.1",
                   "--http-port", str(port), "--https-port", str(tls),
                   "--dns", env.dns.address, "--state", str(env.state)]
            proc = env.start(f"luma-{port}", cmd, stdout=env.dir / f"{port}.log",
                             env={**env.env, "LUMA_PROXY_OPTIMIZE": "0"})
            perf.wait_http(tls, perf.TLS_HOST, tls=True, proc=proc.proc)
            h2 = ["h2load", *extra, "-T", "30", "-N", "30", f"--connect-to=127.0.0.1:{tls}",
                  f"https://{perf.TLS_HOST}:{tls}/"]
            stop, seen = threading.Event(), [0]
            sampler = threading.Thread(target=most_upstream_connections,
                                       args=(env.upstream_port, stop, seen))
            sampler.start()
            out = subprocess.run(h2, capture_output=True, text=True, timeout=900).stdout
            stop.set()
            sampler.join()
            summary = [line for line in out.splitlines()
                       if line.startswith(("finished", "requests:", "status codes"))]
            print(f"{tree}: " + " | ".join(summary)
                  + f" | upstream connections at once: at most {max(seen)}", flush=True)
            print(f"  {' '.join(h2)}", flush=True)
            env.stop(proc)
            time.sleep(2)
    finally:
        env.close()


if __name__ == "__main__":
    main()
