"""What one idle reload poll costs the proxy process: the registry did not move.

Usage:
    .venv/bin/python benchmarks/reload_poll.py [--services 10] [--polls 2000]

Each proxy process looks at the registry five times a second (``addon.RELOAD_POLL``).
Timed in CPU time of this process (``time.process_time``), per poll, on a registry
of ``--services`` routes written through the registry's API:

- ``generations()`` on the calling thread: what the loop reads to see whether
  anything moved;
- ``read_view`` handed to a thread with ``asyncio.to_thread``: what every poll
  cost before the generations were read on the loop (the thread finds nothing
  new and returns the same view).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from luma_proxy.models import Service  # noqa: E402
from luma_proxy.store.registry import Store  # noqa: E402
from luma_proxy.store.view import EMPTY, read_view  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--services", type=int, default=10)
    p.add_argument("--polls", type=int, default=2000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "state.json")

        def fill(state):  # type: ignore[no-untyped-def]
            for i in range(args.services):
                host = f"app-{i:05d}.test"
                state.services[host] = Service(host=host, target=f"app-{i:05d}:80",
                                               name=f"app-{i}", project="bench")
        store.update(fill)
        view = read_view(store, EMPTY)
        n = args.polls

        t = time.process_time()
        for _ in range(n):
            assert store.generations() == view.generations
        on_loop = (time.process_time() - t) / n * 1e6

        async def threaded() -> float:
            t = time.process_time()
            for _ in range(n):
                assert await asyncio.to_thread(read_view, store, view) is view
            return (time.process_time() - t) / n * 1e6

        in_thread = asyncio.run(threaded())
        store.close()
    print(f"{args.services} services, {n} polls, CPU per idle poll: generations() on the "
          f"loop {on_loop:.1f} us; read_view in a thread {in_thread:.1f} us "
          f"({in_thread / on_loop:.1f}x)")


if __name__ == "__main__":
    main()
