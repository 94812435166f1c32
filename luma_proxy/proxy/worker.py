"""The worker side of ``run --workers N`` (the supervisor is ``runtime.supervisor``).

A worker is an ordinary ``luma-proxy run`` whose listeners set ``SO_REUSEPORT``
(``engine_patches``), so the kernel spreads connections over the workers. It
talks to its supervisor over one end of a socketpair (its fd in
``LUMA_PROXY_WORKER_FD``): it writes ``ready`` once its listeners are up,
workers 1..N-1 wait for ``go`` before binding, and EOF means the supervisor is
gone (even by SIGKILL), so the worker stops instead of lingering on the port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterable
from typing import Any

from luma_proxy.proxy import engine_patches
from luma_proxy.runtime.supervisor import READY, WORKER_FD_ENV


# --------------------------------------------------------- SO_REUSEPORT, worker side
def enable_reuse_port() -> Any:
    """Make mitmproxy's TCP listeners in this process set ``SO_REUSEPORT``.

    mitmproxy has no option for it; ``engine_patches.enable_reuse_port`` gives
    its listeners the option where they are bound. Called only in worker
    processes. If a mitmproxy release stops binding there, ``worker_listening``
    sees listeners without the option and the worker fails with one line
    instead of sharing nothing.
    """
    return engine_patches.enable_reuse_port()


def has_reuse_port(sock: socket.socket) -> bool:
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
    except OSError:
        return False


def missing_reuse_port(listen_addrs: Iterable[tuple[Any, ...]]) -> list[str]:
    """The listening addresses (host:port) not bound through the shim with SO_REUSEPORT."""
    sockets = engine_patches.reuse_port_sockets()
    good = set()
    for sock in sockets:
        with contextlib.suppress(OSError):
            if has_reuse_port(sock):
                good.add(sock.getsockname()[:2])
    return [f"{a[0]}:{a[1]}" for a in listen_addrs if tuple(a[:2]) not in good]


# ------------------------------------------------------------ worker lifecycle
_channel: socket.socket | None = None


def enter_worker(index: int) -> None:
    """Start of a worker's ``serve()``: share the ports, wait for our turn, die with the
    supervisor."""
    global _channel
    enable_reuse_port()
    fd = os.environ.pop(WORKER_FD_ENV, None)
    if fd is None or _channel is not None:
        return  # started by hand with --worker-index: no supervisor to talk to
    _channel = socket.socket(fileno=int(fd))
    _channel.set_inheritable(False)
    if index > 0:
        with contextlib.suppress(OSError):
            if not _channel.recv(64):  # blocks until worker 0 listens
                sys.exit(0)  # worker 0 failed and said why; the supervisor is stopping
    threading.Thread(target=_watch_supervisor, args=(_channel,), daemon=True,
                     name=f"luma worker {index} lifeline").start()


def _watch_supervisor(channel: socket.socket) -> None:
    """EOF on the channel: the supervisor is gone. Stop gracefully, like on SIGTERM."""
    with contextlib.suppress(OSError):
        while channel.recv(64):
            pass
    os.kill(os.getpid(), signal.SIGTERM)


def worker_listening(servers: Iterable[Any]) -> bool:
    """After the listeners are up: check they share the port, then tell the supervisor.

    ``servers`` are mitmproxy's server instances (``proxyserver.servers``).
    False (after printing one line) when a listener lacks ``SO_REUSEPORT``.
    """
    addrs = [a for s in servers for a in s.listen_addrs]
    if missing := missing_reuse_port(addrs):
        print(f"luma-proxy: cannot share {', '.join(missing)} between workers: this mitmproxy "
              "did not bind through asyncio.start_server in mode_servers", file=sys.stderr)
        return False
    if _channel is not None:
        with contextlib.suppress(OSError):
            _channel.sendall(READY)
    return True
