"""Objects built in bulk that live as long as their view: out of the collector's full passes.

``luma-proxy run`` freezes what it loaded before listening (``gc.freeze()``,
server.py). What is built in bulk afterwards (the first health round's 10,000
entries, 2,000 certificates read in a thread) stays tracked, and each full
collection walks all of it again: 55-76 ms on the event loop, 13 times in 30 s
at 10,000 services (``benchmarks/tls_scale.py`` with a ``gc.callbacks`` timer,
docs/performance.md). Freezing after such a bulk moves it out of those passes.

Start-up's bulks land after the listeners are up, and building them triggers
full passes of their own before they can be frozen: a first health round of
10,000 services built in its thread set off one of 15-22 ms in the first second
of serving, which every thread waits out (``gc.callbacks`` timer, 19:52 UTC,
docs/performance.md). ``hold_full_passes`` keeps the full passes off for the
first minute of serving; young and middle generations are collected as always.

The price: cyclic garbage alive at that moment (a request in flight) is never
collected. Bulks are rare (start-up, bulk imports, a round that changes
thousands of results), and objects freed by their reference count (a replaced
view's rows) are freed as before.
"""

from __future__ import annotations

import asyncio
import gc

BULK = 500  # rows built at once from which they are frozen
START_UP = 60.0  # seconds of serving without full passes: the first round, certificate pass
_NEVER = 2**30  # a full-pass threshold no count of middle-generation passes reaches


def settle(count: int) -> bool:
    """After ``count`` long-lived objects were built at once: freeze if it was a bulk."""
    if count < BULK:
        return False
    gc.freeze()
    return True


def hold_full_passes(loop: asyncio.AbstractEventLoop, seconds: float = START_UP) -> None:
    """No full collection for ``seconds``; then what start-up built is frozen and they resume."""
    young, middle, full = gc.get_threshold()
    gc.set_threshold(young, middle, _NEVER)

    def resume() -> None:
        gc.freeze()
        gc.set_threshold(young, middle, full)

    loop.call_later(seconds, resume)
