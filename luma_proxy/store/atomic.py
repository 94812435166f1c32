"""One way to replace a file so that no reader, and no crash, ever sees half of it.

The registry's state and health files, certificate files and the ACME account
key are all written here: a temp file in the same directory (so the rename
stays on one file system), its mode set before any byte is in it (a key is
never readable by others, not even for a moment), fsynced, renamed over the
target, then the directory fsynced (so the rename itself survives a power
cut). A writer killed mid-write leaves its temp file behind; the next write of
the same file removes it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
from pathlib import Path

# A temp file this old is no live writer's: a write takes milliseconds. Used
# when the caller holds no lock that keeps other writers of the file out.
STALE_AFTER = 300.0


def make_private_dir(directory: Path) -> None:
    """Create *directory* (and missing parents) with the leaf at 0700, umask notwithstanding."""
    if directory.is_dir():
        return
    try:
        directory.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        return
    os.chmod(directory, 0o700)


def temp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temps(path: Path, older_than: float = STALE_AFTER) -> None:
    """Remove temp files of *path* left by killed writers (not those of other files).

    mkstemp's random part has no dot, so ``.state.json.health.json.x.tmp`` is
    the health file's, not the state file's. ``older_than=0``: the caller holds
    the file's lock, so every temp file of it is stale.
    """
    prefix = temp_prefix(path)
    now = time.time()
    for stale in path.parent.glob(f"{prefix}*.tmp"):
        if "." in stale.name[len(prefix):-len(".tmp")]:
            continue
        with contextlib.suppress(OSError):
            if older_than <= 0 or now - stale.stat().st_mtime >= older_than:
                stale.unlink()


def fsync_dir(directory: Path) -> None:
    """Make a rename in *directory* durable (a file system that cannot is let be)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600, *,
                 stale_after: float = STALE_AFTER, exclusive: bool = False) -> bool:
    """Replace *path* by *data* with *mode*, all or nothing; OSError if it cannot.

    ``exclusive``: publish only if *path* does not exist yet (False then, and
    nothing written), for a file two processes may create at once and whose
    first version must win (the ACME account key). ``stale_after=0`` if the
    caller holds a lock on *path* (see ``remove_stale_temps``).
    """
    directory = path.parent
    remove_stale_temps(path, stale_after)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            if not _publish_no_clobber(tmp, path):
                return False
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # only still there if something failed, or after a hard link
    fsync_dir(directory)
    return True


def _publish_no_clobber(tmp: str, path: Path) -> bool:
    """Atomically make *tmp* visible as *path*; False if *path* already exists.

    A hard link is atomic and refuses to overwrite; file systems without hard
    links fall back to rename (atomic, but last writer wins).
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if path.exists():
            return False
        os.replace(tmp, path)
    return True
