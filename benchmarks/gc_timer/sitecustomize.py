"""A ``gc.callbacks`` timer for ``luma-proxy run`` under ``benchmarks/tls_scale.py``.

Copied into the venv's site-packages for one run, removed after (docs/performance.md,
"Full collections while start-up's bulks land"): every collection of 5 ms or more in
the proxy process (its command line has ``--health-interval``) is written to its log
as ``GCPAUSE <unix time> gen<N> <ms> ...``, to be read beside its "listening" line.
"""

import gc
import os
import sys
import threading
import time

if "--health-interval" in sys.argv:
    _started: dict[str, float] = {}

    def _timer(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _started["at"] = time.perf_counter()
            return
        took = (time.perf_counter() - _started.get("at", time.perf_counter())) * 1000
        if took >= 5:
            sys.stderr.write(f"GCPAUSE {time.time():.3f} gen{info['generation']} {took:.1f}ms "
                             f"collected={info['collected']} "
                             f"thread={threading.current_thread().name} pid={os.getpid()}\n")

    gc.callbacks.append(_timer)
