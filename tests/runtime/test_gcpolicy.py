"""gcpolicy: bulks frozen out of full passes; none while start-up's bulks land."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from luma_proxy.runtime import gcpolicy


@pytest.fixture(autouse=True)
def collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.set_threshold(*threshold)
    gc.unfreeze()


def test_a_bulk_is_frozen_a_trickle_is_not() -> None:
    before = gc.get_freeze_count()
    assert not gcpolicy.settle(gcpolicy.BULK - 1)
    assert gc.get_freeze_count() == before
    kept = [[i] for i in range(1000)]  # tracked containers, alive
    assert gcpolicy.settle(gcpolicy.BULK)
    assert gc.get_freeze_count() >= before + len(kept)


def test_full_passes_are_held_then_resume_with_start_up_frozen() -> None:
    young, middle, full = gc.get_threshold()

    async def main() -> tuple[int, int, tuple[int, int, int]]:
        gcpolicy.hold_full_passes(asyncio.get_running_loop(), seconds=0.05)
        held = gc.get_threshold()[2]
        built = [[i] for i in range(1000)]  # what start-up builds while serving
        frozen = gc.get_freeze_count()
        await asyncio.sleep(0.2)
        assert built
        return held, gc.get_freeze_count() - frozen, gc.get_threshold()

    held, newly_frozen, after = asyncio.run(main())
    assert held > 10**6  # no count of middle-generation passes reaches it
    assert newly_frozen >= 1000
    assert after == (young, middle, full)
