"""Which version of the registry's routes each running proxy process serves.

A deploy tool stops the old containers right after ``luma-proxy deploy``
returns; if no worker has read the new routes yet, those requests still go
to the old containers (503s within 0.1 s of a kill were seen on a real
engine). So every proxy process keeps a small file in ``<state>.served/``
naming the routes generation it serves, and holds an exclusive ``flock`` on
it for its life; the CLI, after a write, waits until every file whose lock
is still held names the version now on disk. The kernel drops the lock when
a process dies, so a file left by a killed proxy is recognised (and removed)
without pids, which do not cross container boundaries.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

from luma_proxy.runtime.leadership import hold_lock

SUFFIX = ".served"


def served_dir(state_path: str | os.PathLike[str]) -> Path:
    path = Path(state_path)
    return path.with_name(path.name + SUFFIX)


def encode(signature: object) -> bytes:
    return repr(signature).encode()


class Beacon:
    """One proxy process's record of the state version it serves."""

    def __init__(self, state_path: str | os.PathLike[str]) -> None:
        self.dir = served_dir(state_path)
        self.fd: int | None = None
        self.path: Path | None = None

    def open(self) -> bool:
        """Create and lock this process's file; False (and no beacon) if the disk says no."""
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            return False
        path = self.dir / f"{os.getpid()}-{os.urandom(4).hex()}"
        self.fd = hold_lock(path, new=True)
        self.path = path if self.fd is not None else None
        return self.fd is not None

    def serve(self, signature: object) -> None:
        """Say which version is in force now (after it was swapped into the view)."""
        if self.fd is None:
            return
        data = encode(signature)
        with contextlib.suppress(OSError):
            os.pwrite(self.fd, data, 0)
            os.ftruncate(self.fd, len(data))

    def close(self) -> None:
        if self.fd is None:
            return
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self.fd)
        self.fd = self.path = None


def live_versions(state_path: str | os.PathLike[str]) -> list[bytes]:
    """The version each live proxy process serves; files of dead ones are removed."""
    out: list[bytes] = []
    try:
        entries = list(served_dir(state_path).iterdir())
    except OSError:
        return out
    for path in entries:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: a live proxy
                out.append(os.pread(fd, 256, 0))
                continue
            with contextlib.suppress(OSError):  # nobody holds it: its proxy is gone
                path.unlink()
        except OSError:
            continue
        finally:
            os.close(fd)
    return out


def wait_served(state_path: str | os.PathLike[str], current: Callable[[], object],
                timeout: float, poll: float = 0.02) -> int:
    """Wait until every live proxy serves ``current()`` (the generation committed now).

    Any version on disk now is the caller's or a later one, so matching it
    means the caller's change is in force. Returns how many live proxies
    still did not serve it when ``timeout`` ran out (0: all did, or none runs).
    """
    deadline = time.monotonic() + timeout
    while True:
        want = encode(current())
        pending = sum(1 for v in live_versions(state_path) if v != want)
        if pending == 0 or time.monotonic() >= deadline:
            return pending
        time.sleep(poll)
