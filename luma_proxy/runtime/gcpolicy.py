"""Objects built in bulk that live as long as their view: out of the collector's full passes.

``luma-proxy run`` freezes what it loaded before listening (``gc.freeze()``,
server.py). What is built in bulk afterwards (the first health round's 10,000
entries, 2,000 certificates read in a thread) stays tracked, and each full
collection walks all of it again: 55-76 ms on the event loop, 13 times in 30 s
at 10,000 services (``benchmarks/tls_scale.py`` with a ``gc.callbacks`` timer,
docs/performance.md). Freezing after such a bulk moves it out of those passes.

The price: cyclic garbage alive at that moment (a request in flight) is never
collected. Bulks are rare (start-up, bulk imports, a round that changes
thousands of results), and objects freed by their reference count (a replaced
view's rows) are freed as before.
"""

from __future__ import annotations

import gc

BULK = 500  # rows built at once from which they are frozen


def settle(count: int) -> bool:
    """After ``count`` long-lived objects were built at once: freeze if it was a bulk."""
    if count < BULK:
        return False
    gc.freeze()
    return True
