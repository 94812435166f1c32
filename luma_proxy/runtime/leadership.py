"""Which of a proxy's processes leads: runs the health checks and orders certificates.

One ``flock`` on ``<state>.health.lock`` decides it; the kernel frees the lock
when its holder dies, whatever the way. Every process tries to take it at
start and then every ``POLL`` seconds while it does not hold it (a
non-blocking ``flock``: no I/O beyond the call), so a follower takes over
within ``POLL`` of the leader's end. The change is logged once and every
listener (the health loop, the ACME loop) is told at once: before, a follower
found out only at its next health round, up to a whole interval later.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import Callable

logger = logging.getLogger("luma_proxy")

POLL = 1.0  # seconds between a follower's attempts to take the lock


def hold_lock(path: str | os.PathLike[str], new: bool = False) -> int | None:
    """Open ``path`` (``new``: it must not exist yet) and take an exclusive ``flock``
    without waiting; the fd holds it until closed (or the process dies), None if not.

    Leadership and each proxy's served-version file (served.py) use it.
    """
    flags = os.O_RDWR | os.O_CREAT | (os.O_EXCL if new else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


class Leadership:
    """Holds, or keeps trying to take, the leader's lock for one state file."""

    def __init__(self, lock_path: str, poll: float = POLL) -> None:
        self.lock_path = lock_path
        self.poll = poll
        self._fd: int | None = None
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def leading(self) -> bool:
        return self._fd is not None

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """``listener(leading)`` is called when this process starts or stops leading."""
        self._listeners.append(listener)

    def try_take(self) -> bool:
        """Take the lock if it is free; whether this process leads now."""
        if self._fd is None:
            self._fd = hold_lock(self.lock_path)
            if self._fd is not None:
                logger.info("leading: this process (pid %d) runs the health checks and "
                            "certificate orders", os.getpid())
                self._tell(True)
        return self.leading

    async def run(self) -> None:
        """Until cancelled: a follower tries to take the lock every ``poll`` seconds."""
        while True:
            self.try_take()
            await asyncio.sleep(self.poll)

    def close(self) -> None:
        """Give the lock up (at shutdown): another process takes over at its next try."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._tell(False)

    def _tell(self, leading: bool) -> None:
        for listener in self._listeners:
            try:
                listener(leading)
            except Exception:  # one listener's fault never stops the others
                logger.exception("leadership listener failed")
