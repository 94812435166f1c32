"""A lag probe on the event loop of ``luma-proxy run`` under ``benchmarks/tls_scale.py``.

Copied into the venv's site-packages for one run, removed after (docs/performance.md,
"The loop's own blocking"). In the proxy process (its command line has
``--health-interval``), the event loop made on the main thread (uvloop's, or
asyncio's) gets a timer every 2 ms; each time it fires late by 5 ms or more, the log
gets ``LOOPLAG <unix time> <ms>``: how long the loop could not run a ready callback
(a callback running long, or the loop's thread waiting for the interpreter). The
client-side figures of ``tls_scale.py`` add on top of this the request's own
handling, which threads sharing the interpreter slow down without blocking the loop
(docs/performance.md), and the client's and the upstream's turns on the CPU.
"""

import asyncio
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

if "--health-interval" in sys.argv:
    PERIOD = 0.002

    _beat = [time.monotonic()]

    def _probe(loop: asyncio.AbstractEventLoop, due: float) -> None:
        _beat[0] = time.monotonic()
        late = (loop.time() - due) * 1000
        if late >= 5:
            sys.stderr.write(f"LOOPLAG {time.time():.3f} {late:.1f}ms\n")
        nxt = loop.time() + PERIOD
        loop.call_at(nxt, _probe, loop, nxt)

    def _probed(make: Callable[[], asyncio.AbstractEventLoop]
                ) -> Callable[[], asyncio.AbstractEventLoop]:
        def new_event_loop() -> asyncio.AbstractEventLoop:
            loop = make()
            if threading.current_thread() is threading.main_thread():
                due = loop.time() + PERIOD
                loop.call_at(due, _probe, loop, due)
                if os.environ.get("LOOPLAG_STACKS"):
                    threading.Thread(target=_watch, daemon=True).start()
            return loop
        return new_event_loop

    def _watch() -> None:
        """``LOOPLAG_STACKS=1``: every thread's stack when the probe is 10 ms overdue
        (once per stall): what the loop's thread was doing, and who held the interpreter."""
        main, seen = threading.main_thread().ident, 0.0
        while True:
            time.sleep(0.001)
            beat = _beat[0]
            if time.monotonic() - beat > 0.010 + PERIOD and beat != seen:
                seen = beat
                out = [f"LOOPSTACK {time.time():.3f}\n"]
                for ident, frame in sys._current_frames().items():
                    name = "main" if ident == main else str(ident)
                    out.append(f"-- thread {name}\n")
                    out.extend(traceback.format_stack(frame)[-8:])
                sys.stderr.write("".join(out))

    try:
        import uvloop
    except ImportError:
        pass
    else:
        uvloop.new_event_loop = _probed(uvloop.new_event_loop)
    asyncio.events.new_event_loop = _probed(asyncio.events.new_event_loop)
    asyncio.new_event_loop = asyncio.events.new_event_loop
