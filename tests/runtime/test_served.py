"""served.py: the record of which state version each live proxy process serves."""

from __future__ import annotations

import os
import time
from pathlib import Path

from luma_proxy.runtime.served import Beacon, live_versions, served_dir, wait_served


def test_a_live_beacon_is_read_and_a_closed_one_is_gone(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    beacon = Beacon(state)
    assert beacon.open()
    beacon.serve((1, 2, 3, 4))
    assert live_versions(state) == [b"(1, 2, 3, 4)"]
    beacon.serve(None)  # a shorter value replaces the longer one whole
    assert live_versions(state) == [b"None"]
    beacon.close()
    assert live_versions(state) == []
    assert list(served_dir(state).iterdir()) == []


def test_a_file_nobody_holds_is_a_dead_proxy_and_is_removed(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    served_dir(state).mkdir()
    left = served_dir(state) / "123-dead"  # what a SIGKILLed proxy leaves: no lock
    left.write_bytes(b"(9, 9, 9, 9)")
    assert live_versions(state) == []
    assert not left.exists()


def test_wait_served_is_done_when_every_live_proxy_serves_the_current_version(
        tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    a, b = Beacon(state), Beacon(state)
    assert a.open() and b.open()
    a.serve("v2")
    b.serve("v1")
    started = time.monotonic()
    assert wait_served(state, lambda: "v2", timeout=0.3) == 1  # b is behind
    assert time.monotonic() - started >= 0.3
    b.serve("v2")
    assert wait_served(state, lambda: "v2", timeout=5) == 0
    a.close()
    b.close()


def test_no_running_proxy_means_no_wait(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    started = time.monotonic()
    assert wait_served(state, lambda: "v1", timeout=5) == 0
    assert time.monotonic() - started < 1


def test_an_unwritable_directory_gives_no_beacon_and_no_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    beacon = Beacon(blocker / "state.json")  # its parent is a file: mkdir fails
    assert beacon.open() is False
    beacon.serve("v1")  # a no-op, never an exception
    beacon.close()
    assert os.path.isfile(blocker)
