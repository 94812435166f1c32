"""Test tiers.

Every test that starts a process (the proxy, the CLI, dockerd, a fork) is
marked ``spawns``; tests under ``tests/e2e/`` and ``tests/docker/`` are marked
so by their directory. The fast tier is everything else:

    scripts/test.sh --fast      # pytest -m "not spawns", with spawning forbidden

With ``LUMA_TEST_FAST=1`` (set by ``--fast``) a test that tries to start a
process fails at once, so a test missing its mark cannot slow the tier down
unnoticed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SPAWNING_DIRS = ("e2e", "docker")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(HERE).parts
        if parts and parts[0] in SPAWNING_DIRS:
            item.add_marker(pytest.mark.spawns)


class SpawnForbidden(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _forbid_spawning_in_the_fast_tier(monkeypatch: pytest.MonkeyPatch,
                                      request: pytest.FixtureRequest) -> None:
    if os.environ.get("LUMA_TEST_FAST") != "1" or request.node.get_closest_marker("spawns"):
        return

    def forbidden(*_args: object, **_kw: object) -> None:
        raise SpawnForbidden(f"{request.node.nodeid} starts a process: mark it "
                             "@pytest.mark.spawns (fast tier)")

    monkeypatch.setattr(subprocess.Popen, "__init__", forbidden)
    monkeypatch.setattr(os, "fork", forbidden)
    monkeypatch.setattr(os, "posix_spawn", forbidden)
