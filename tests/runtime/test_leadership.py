"""Leadership: one flock decides; a follower takes over within a poll and says so."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from luma_proxy.runtime.leadership import Leadership


def test_one_leader_per_lock(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "state.json.health.lock")
    a, b = Leadership(path), Leadership(path)
    with caplog.at_level(logging.INFO, logger="luma_proxy"):
        assert a.try_take() and a.leading
        assert not b.try_take() and not b.leading
        assert a.try_take()  # asking again changes nothing, says nothing more
    assert caplog.text.count("leading: this process") == 1
    a.close()
    b.close()


async def test_a_follower_takes_over_within_a_poll_and_tells_its_listeners(
        tmp_path: Path) -> None:
    path = str(tmp_path / "state.json.health.lock")
    leader, follower = Leadership(path), Leadership(path, poll=0.05)
    assert leader.try_take()
    told: list[bool] = []

    def broken(_leading: bool) -> None:
        raise RuntimeError("a listener's own fault")

    follower.on_change(broken)  # never stops the next listener
    follower.on_change(told.append)
    task = asyncio.create_task(follower.run())
    try:
        await asyncio.sleep(0.2)
        assert told == [] and not follower.leading
        leader.close()  # the leader's process ends: the kernel frees its lock
        async with asyncio.timeout(2):
            while not told:
                await asyncio.sleep(0.01)
        assert told == [True] and follower.leading
    finally:
        task.cancel()
        follower.close()
    assert told == [True, False]
