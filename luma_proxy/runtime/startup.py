"""What ``luma-proxy run`` does before it imports mitmproxy, to serve cheaper.

Two things in mitmproxy cost a serving process without serving anyone:

- Its ``__debug__`` checks: every ``Request``/``Response`` it builds has each
  field type-checked (``http.MessageData.__post_init__``), and every task gets
  debug names. Python's ``-O`` (``PYTHONOPTIMIZE=1``) turns them off, which is
  what they are written for; ``luma-proxy run`` restarts itself that way.
- ``mitmproxy/addons/__init__.py`` imports all ~36 built-in addons (flask,
  ldap3, the onboarding app, ...) to offer ``default_addons()``, which the lean
  master never calls. Importing a submodule runs that file first, so
  ``skip_builtin_addon_registry`` has ``engine_patches`` register the package
  without running it.

``LUMA_PROXY_OPTIMIZE=0`` keeps both (mitmproxy's checks back on, for
debugging). And the event loop is uvloop's (``loop_factory``): asyncio's own
transports and selector loop were a fifth of the CPU per request; mitmproxy
does its TLS itself and needs nothing else from the loop.
``LUMA_PROXY_EVENT_LOOP=asyncio`` keeps asyncio's loop. None of this applies
under mitmdump or mitmweb.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import asyncio

ENV = "LUMA_PROXY_OPTIMIZE"
LOOP_ENV = "LUMA_PROXY_EVENT_LOOP"
LOOPS = ("uvloop", "asyncio")
LOG_LEVEL_ENV = "LUMA_PROXY_LOG_LEVEL"
LOG_LEVELS = ("debug", "info", "warning", "error")


def enabled(environ: Mapping[str, str]) -> bool:
    return environ.get(ENV, "1") != "0"


def wants_optimized_restart(args: Sequence[str], environ: Mapping[str, str],
                            optimized: int) -> bool:
    """Whether this command line is ``run`` and not yet under ``-O``."""
    return bool(args) and args[0] == "run" and not optimized and enabled(environ)


def restart_optimized() -> NoReturn:
    """Replace this process by the same command line under ``PYTHONOPTIMIZE=1``.

    Same PID, arguments and descriptors; the workers of ``--workers`` inherit
    the variable and so start optimized without a restart of their own.
    """
    env = dict(os.environ, PYTHONOPTIMIZE="1")
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


IMAGE_USER_ENV = "LUMA_PROXY_USER"
DEFAULT_IMAGE_USER = "10001:10001"
DOCKER_SOCKET = "/var/run/docker.sock"


def drop_root(environ: Mapping[str, str]) -> bool:
    """In the image, never run as root: become ``LUMA_PROXY_USER`` (uid:gid, 10001:10001).

    The image starts as root so that its entry point can hand the Luma CLI's
    host-owned bind mounts to that user; ``docker exec luma-proxy luma-proxy ...``
    also arrives as root, and must write the registry as the proxy does. The
    docker socket's group is kept, so the proxy can still ask the engine.
    Raises ``OSError`` if it cannot (``--cap-drop ALL`` without ``--user``).
    """
    if environ.get("LUMA_PROXY_IMAGE") != "1" or os.getuid() != 0:
        return False
    uid_text, _, gid_text = environ.get(IMAGE_USER_ENV, DEFAULT_IMAGE_USER).partition(":")
    uid = int(uid_text)
    gid = int(gid_text or uid_text)
    groups = [gid]
    with contextlib.suppress(OSError):
        groups.append(os.stat(DOCKER_SOCKET).st_gid)
    os.setgroups(sorted(set(groups)))
    os.setgid(gid)
    os.setuid(uid)
    return True


def log_level(environ: Mapping[str, str]) -> int:
    """The level of luma-proxy's own log lines; ``debug`` also logs the stack of bad input.

    A start-up error caused by input (a port in use, an unreadable file, a bad
    option) is one line on stderr; its stack is a debug line, so that line
    stays the only one unless whoever debugs asks for more.
    """
    import logging

    choice = (environ.get(LOG_LEVEL_ENV, "info") or "info").lower()
    if choice not in LOG_LEVELS:
        raise ValueError(f"{LOG_LEVEL_ENV} must be one of {', '.join(LOG_LEVELS)}, not {choice!r}")
    return logging.getLevelNamesMapping()[choice.upper()]


def loop_factory(environ: Mapping[str, str]) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop for ``asyncio.run``: uvloop's, or asyncio's default (None)."""
    choice = environ.get(LOOP_ENV, "uvloop") or "uvloop"
    if choice not in LOOPS:
        raise ValueError(f"{LOOP_ENV} must be one of {', '.join(LOOPS)}, not {choice!r}")
    if choice == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop
