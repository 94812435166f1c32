"""When each service is checked, on the leader only, and where the results go.

Every service each interval; new or changed ones at once; unhealthy ones
every ``UNHEALTHY_RECHECK`` seconds (a container restarting, an alias not yet
attached when the proxy starts costs seconds of 503, not a whole interval).
Results are written to the registry in a transaction that checks the service
is still deployed as it was checked, then swapped into the view: one source
of truth, ordered by the registry's generations, never by a clock.

Under a proxy the loop runs in a thread of its own, with its own event loop
(``start``): a round of 10,000 services is 20,000 probes, whose callbacks on
the proxy's loop queued requests behind them for tens of milliseconds. The
proxy's loop now only swaps the results in; the two share nothing but the
view (read, swapped whole) and the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol

from luma_proxy.health.checker import HealthChecker
from luma_proxy.models import Health, HealthEntry, Service
from luma_proxy.routing.resolver import Resolver
from luma_proxy.store.registry import RegistryError, Store

logger = logging.getLogger("luma_proxy")

UNHEALTHY_RECHECK = 2.0  # seconds between checks of a service that is unhealthy
LOG_EACH = 20  # health changes of one round logged one per line; the rest summed up
Results = dict[str, tuple[tuple, Health]]  # host -> (routing key checked, health)


class Routed(Protocol):
    """What the schedule reads of the routing addon: its view, and whether it leads."""

    store: Store | None
    resolver: Resolver
    health: dict[str, HealthEntry]

    @property
    def services(self) -> dict[str, Service]: ...

    def is_leader(self) -> bool: ...

    def reload_in_background(self) -> Coroutine[Any, Any, bool]: ...


class HealthSchedule:
    """The leader's health loop, and the write of its results."""

    def __init__(self, routed: Routed, interval: Callable[[], float],
                 timeout: Callable[[], float]) -> None:
        self.routed = routed
        self.interval, self.timeout = interval, timeout
        self.checker: HealthChecker | None = None
        self._dirty: set[str] = set()  # hosts new or changed since the loop looked
        self._kick = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._persist_error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # where ``run`` runs
        self._main: asyncio.AbstractEventLoop | None = None  # where the view is swapped
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------- what changed
    def changed(self, hosts: Iterable[str]) -> None:
        """New or re-deployed services: checked at once (on the leader)."""
        self._on_loop(self._changed, list(hosts))

    def _changed(self, hosts: list[str]) -> None:
        self._dirty.update(hosts)
        self._kick.set()

    def removed(self, hosts: list[str]) -> None:
        self._on_loop(self._removed, list(hosts))

    def _removed(self, hosts: list[str]) -> None:
        if self.checker:
            self.checker.discard(hosts)
        self._kick.set()

    def wake(self) -> None:
        """Leadership changed hands: a new leader checks everything at once."""
        self._on_loop(self._kick.set)

    def use_resolver(self, resolver: Resolver) -> None:
        if self.checker:
            self.checker.resolver = own_resolver(resolver)

    def _on_loop(self, call: Callable[..., object], *args: object) -> None:
        """Run ``call`` on the schedule's loop: at once from it, else handed over."""
        loop = self._loop
        if loop is None or loop.is_closed():
            call(*args)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            call(*args)
        else:
            loop.call_soon_threadsafe(call, *args)

    # ------------------------------------------------------------- its thread
    def start(self, main: asyncio.AbstractEventLoop) -> None:
        """Run the loop in a thread with an event loop of its own (see the module text);
        results are swapped into the view on ``main``."""
        self._main = main
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop, self._task = loop, loop.create_task(self.run(), name="luma health")
            ready.set()
            try:
                loop.run_until_complete(self._task)
            except asyncio.CancelledError:
                pass
            finally:
                loop.close()

        self._thread = threading.Thread(target=serve, name="luma health", daemon=True)
        self._thread.start()
        ready.wait()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the loop and wait for its thread (at shutdown)."""
        loop, task, thread = self._loop, self._task, self._thread
        if loop is not None and task is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(task.cancel)
        if thread is not None:
            thread.join(timeout)
        self._thread = self._task = None

    # ------------------------------------------------------------- the loop
    async def run(self) -> None:
        self._kick = asyncio.Event()
        self.checker = HealthChecker(own_resolver(self.routed.resolver), self.record,
                                     self.timeout())
        next_round = next_recheck = 0.0
        leading = False
        try:
            while True:
                interval = self.interval()
                recheck = min(UNHEALTHY_RECHECK, interval)
                try:
                    if self.routed.is_leader():
                        if not leading:  # just became the leader: check everything at once
                            leading, next_round = True, 0.0
                        now = time.monotonic()
                        if now >= next_round:
                            next_round, next_recheck = now + interval, now + recheck
                            self._dirty.clear()
                            await self._check(self.routed.services.values())
                        elif self._dirty:
                            await self._check_dirty()
                        elif now >= next_recheck:
                            next_recheck = now + recheck
                            await self._check(s for s in self.routed.services.values()
                                              if self._failing(s.key))
                    else:
                        leading = False
                        self._dirty.clear()
                        next_round = next_recheck = time.monotonic() + interval
                except Exception:
                    logger.exception("health check round failed")
                self._kick.clear()
                wake = next_round
                if any(h.healthy is False for h in self.routed.health.values()):
                    wake = min(wake, next_recheck)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(),
                                           max(0.05, wake - time.monotonic()))
        finally:
            for task in self._tasks:
                task.cancel()

    def _failing(self, host: str) -> bool:
        health = self.routed.health.get(host)
        return health is not None and health.healthy is False

    async def _check(self, services: Iterable[Service]) -> None:
        assert self.checker is not None
        await self.checker.check_all(list(services), self.routed.health)

    async def _check_dirty(self) -> None:
        assert self.checker is not None
        hosts, self._dirty = self._dirty, set()
        services = self.routed.services
        try:
            await self._check(self.checker.unchecked(
                [services[h] for h in hosts if h in services]))
        except BaseException:
            self._dirty |= hosts
            raise

    # ------------------------------------------------------------- results
    def record(self, results: Results) -> None:
        """Write the results, log what changed, then take them in (a task).

        All of it runs in a thread but the swap: at 10,000 services, filtering and
        logging a round on the loop stalled it for tens of milliseconds.
        """
        if not results:
            return
        task = asyncio.create_task(self.save(results))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def save(self, results: Results) -> None:
        """Write ``results`` to the registry (in a thread), then swap them into the view.

        Each is written only if the service is still deployed as it was checked,
        in the transaction that checks it; a result for a service deployed
        elsewhere (or removed) while it was checked says nothing about what is
        routed now and is dropped. Entries of hosts no longer routed go.
        """
        store = self.routed.store
        assert store is not None
        before = self.routed.health  # swapped whole, never changed in place: safe to read
        try:
            await asyncio.to_thread(self._write_and_log, store, results, before)
        except RegistryError as e:
            if str(e) != self._persist_error:
                logger.error("cannot save health: %s", e)
            self._persist_error = str(e)
            return
        self._persist_error = None
        main = self._main
        if main is None or main is asyncio.get_running_loop():
            await self.routed.reload_in_background()
        elif not main.is_closed():
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                self.routed.reload_in_background(), main))

    @staticmethod
    def _write_and_log(store: Store, results: Results, before: dict[str, HealthEntry]) -> None:
        written = write_results(store, results)
        log_changes([(host, results[host][1]) for host in written
                     if (old := before.get(host)) is None
                     or old.healthy is not results[host][1].healthy])


def own_resolver(resolver: Resolver) -> Resolver:
    """A resolver like the proxy's, for the checker alone: its cache and pending
    lookups belong to the loop that made them."""
    return Resolver(resolver.dns, resolver.ttl, resolver.timeout, resolver.stale_wait)


def log_changes(changed: list[tuple[str, Health]]) -> None:
    """The unhealthy first, each on its line up to LOG_EACH; the rest in one line (a
    first round of 10,000 services would be 10,000 lines)."""
    changed.sort(key=lambda item: bool(item[1].healthy))
    for host, health in changed[:LOG_EACH]:
        level = logging.INFO if health.healthy else logging.WARNING
        logger.log(level, "health: %s is now %s%s", host,
                   "healthy" if health.healthy else "unhealthy",
                   f" ({health.last_error})" if health.last_error else "")
    if len(changed) > LOG_EACH:
        rest = changed[LOG_EACH:]
        down = sum(1 for _host, health in rest if not health.healthy)
        logger.log(logging.WARNING if down else logging.INFO,
                   "health: %d more host(s) changed: %d now healthy, %d unhealthy "
                   "(`luma-proxy list` shows each)", len(rest), len(rest) - down, down)


def write_results(store: Store, results: Results) -> list[str]:
    """Write each result whose service is deployed as it was checked; the hosts written."""
    with store.transaction() as tx:
        keys = tx.routing_keys()
        written = [host for host, (key, _health) in results.items() if keys.get(host) == key]
        tx.put_observations((host, *results[host]) for host in written)
        tx.delete_unrouted_health()
    return written
