"""The health schedule's results: written through the registry, and logged readably."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from luma_proxy.health.schedule import LOG_EACH, HealthSchedule, write_results
from luma_proxy.models import Health, HealthEntry, Service
from luma_proxy.routing.resolver import Resolver
from luma_proxy.store.registry import Store


class Routed:
    """What the schedule reads of the routing addon, over a real registry."""

    def __init__(self, store: Store, services: dict[str, Service]) -> None:
        self.store, self.resolver = store, Resolver()
        self.services = services
        self.health: dict[str, HealthEntry] = {}
        self.reloads = 0

    def is_leader(self) -> bool:
        return True

    async def reload_in_background(self) -> bool:
        self.reloads += 1
        return True


def deployed(path: Path, n: int) -> tuple[Store, dict[str, Service]]:
    store = Store(path)
    services = {f"h{i:02d}.test": Service(name="x", host=f"h{i:02d}.test", target=f"a{i}:1",
                                          project="p") for i in range(n)}
    with store.transaction() as tx:
        for service in services.values():
            tx.put(service)
    return store, services


async def test_a_round_with_many_changes_logs_the_unhealthy_first_then_one_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = LOG_EACH + 15
    store, services = deployed(tmp_path / "state.json", n)
    routed = Routed(store, services)
    schedule = HealthSchedule(routed, lambda: 30.0, lambda: 1.0)
    results = {host: (s.routing_key(), Health(healthy=i >= 5, last_error=None if i >= 5
                                              else "HTTP 500"))
               for i, (host, s) in enumerate(services.items())}
    with caplog.at_level(logging.INFO, logger="luma_proxy"):
        schedule.record(results)
        await asyncio.sleep(0.5)  # the write, in a thread, then the reload
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("health:")]
    assert len(lines) == LOG_EACH + 1
    assert all("unhealthy (HTTP 500)" in line for line in lines[:5])  # the unhealthy first
    assert lines[-1] == (f"health: {n - LOG_EACH} more host(s) changed: {n - LOG_EACH} now "
                         "healthy, 0 unhealthy (`luma-proxy list` shows each)")
    assert routed.reloads == 1
    assert sorted(store.read_health()) == sorted(services)


def test_results_are_written_only_for_the_service_as_it_was_checked(tmp_path: Path) -> None:
    store, services = deployed(tmp_path / "state.json", 2)
    moved = services["h00.test"].model_copy(update={"target": "elsewhere:1"})
    with store.transaction() as tx:
        tx.put(moved)  # deployed elsewhere while the check ran
        tx.put_health("gone.test", HealthEntry.of(("x:1", "/up", "gone.test", True), Health()))
    write_results(store, {host: (s.routing_key(), Health(healthy=True))
                          for host, s in services.items()})
    assert sorted(store.read_health()) == ["h01.test"]  # gone.test's entry dropped too
