"""Does each optimisation still earn its lines? ``luma-proxy run`` as shipped, with
``engine.py``'s hook table off (``LUMA_PROXY_DISPATCH=mitmproxy``) and with the
``-O`` restart and the skipped built-in addon registry off (``LUMA_PROXY_OPTIMIZE=0``),
alternated three times: ``wrk -t2 -c50`` for 6 s against perf.py's nginx upstream;
requests/s and the proxy's CPU per request.

    .venv/bin/python benchmarks/earn_its_lines.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import perf

VARIANTS = [("as shipped", {}),
            ("LUMA_PROXY_DISPATCH=mitmproxy", {"LUMA_PROXY_DISPATCH": "mitmproxy"}),
            ("LUMA_PROXY_OPTIMIZE=0", {"LUMA_PROXY_OPTIMIZE": "0"})]


def main() -> None:
    env = perf.Env()
    load = perf.LOAD_BY_KEY["ka50"]
    try:
        for rnd in range(3):
            for name, extra in VARIANTS:
                port, tls = perf.free_port(), perf.free_port()
                cmd = [perf.LUMA, "run", "--listen-host", "127.0.0.1", "--http-port", str(port),
                       "--https-port", str(tls), "--dns", env.dns.address,
                       "--state", str(env.state)]
                proc = env.start(f"v-{port}", cmd, stdout=env.dir / f"{port}.log",
                                 env={**env.env, **extra})
                perf.wait_http(port, perf.HTTP_HOST, proc=proc.proc)
                perf.run_wrk(perf.wrk_cmd(load, port, 1, perf.HTTP_HOST, None), 1)  # warm-up
                pids = proc.pids()
                cpu0 = perf.cpu_seconds(pids)
                r = perf.run_wrk(perf.wrk_cmd(load, port, 6, perf.HTTP_HOST, None), 6)
                us = (perf.cpu_seconds(pids) - cpu0) / max(r["requests"], 1) * 1e6
                print(f"round {rnd + 1} {name}: {r['rps']:.0f} req/s, {us:.0f} µs CPU/request, "
                      f"errors {r['errors']}", flush=True)
                env.stop(proc)
    finally:
        env.close()


if __name__ == "__main__":
    main()
