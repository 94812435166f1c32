"""The one atomic write: all or nothing, mode from the first byte, killed writers cleaned up."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from luma_proxy.store import atomic
from luma_proxy.store.atomic import make_private_dir, remove_stale_temps, write_atomic


def temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(".*.tmp"))


def test_replaces_the_file_by_a_new_inode_with_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(b"old")
    inode = path.stat().st_ino
    assert write_atomic(path, b"new", 0o600) is True
    assert path.read_bytes() == b"new" and path.stat().st_ino != inode
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_atomic(path, b"public", 0o644)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert temps(tmp_path) == []


def test_the_mode_is_set_before_any_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A private key is never readable by others, not even while it is written."""
    seen: list[tuple[int, int]] = []
    real_fdopen = os.fdopen

    def fdopen(fd: int, *args: object, **kwargs: object) -> object:
        st = os.fstat(fd)
        seen.append((stat.S_IMODE(st.st_mode), st.st_size))
        return real_fdopen(fd, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(atomic.os, "fdopen", fdopen)
    write_atomic(tmp_path / "cert.pem", b"chain", 0o640)
    assert seen == [(0o640, 0)]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"old")

    def full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old" and temps(tmp_path) == []


def test_exclusive_keeps_the_first_version(tmp_path: Path) -> None:
    path = tmp_path / "account.key"
    assert write_atomic(path, b"first", exclusive=True) is True
    assert write_atomic(path, b"second", exclusive=True) is False
    assert path.read_bytes() == b"first" and temps(tmp_path) == []


def test_stale_temps_of_this_file_only_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    mine, theirs = tmp_path / ".state.json.abc123.tmp", tmp_path / ".state.json.health.json.x.tmp"
    for p in (mine, theirs):
        p.write_bytes(b"half")
    write_atomic(path, b"{}")  # no lock held: a fresh temp may be a live writer's
    assert mine.exists() and theirs.exists()
    old = time.time() - atomic.STALE_AFTER - 1
    os.utime(mine, (old, old))
    write_atomic(path, b"{}")
    assert not mine.exists() and theirs.exists()
    fresh = tmp_path / ".state.json.def456.tmp"
    fresh.write_bytes(b"half")
    remove_stale_temps(path, 0)  # the caller holds the lock: every temp of the file is stale
    assert not fresh.exists() and theirs.exists()


def test_make_private_dir_is_0700_whatever_the_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        make_private_dir(tmp_path / "a" / "certs")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "a" / "certs").stat().st_mode) == 0o700
    make_private_dir(tmp_path / "a" / "certs")  # exists: left alone
