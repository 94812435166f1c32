"""mitmproxy 12 internals luma-proxy patches: the one module that touches them.

Connection opening (issue 15): retry and race a container connect.

mitmproxy has no retry API. ``ConnectionHandler.open_connection`` (mitmproxy/proxy/
server.py) connects with ``asyncio.open_connection`` looked up through that module's
``asyncio`` name. ``install_connect_retry`` points that single name at a namespace whose
``open_connection`` is ``Connector.open``; nothing else in the process changes, and the
same seam serves ``luma-proxy run``, ``mitmdump -s`` and ``mitmweb -s``. This is the only
place that touches that mitmproxy internal.

A refused, reset or timed-out connect is retried on another IP of the alias (asking DNS
again once the cached answer is exhausted) until ``luma_retry_timeout``; a connect not
done after ``RACE_DELAY`` races one to another IP, and the first to complete wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import types
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from mitmproxy import ctx, exceptions

from .environ import env_float

RACE_DELAY = 0.25  # a healthy container on a Docker network answers a SYN in well under 1 ms
RETRY_PAUSE = 0.05  # between rounds once every known IP failed (a container restarting)

Alternatives = Callable[[str, int, bool], Awaitable[Sequence[str]]]


class Connector:
    """Opens a connection to one of an alias's IPs, retrying and racing."""

    def __init__(self, alternatives: Alternatives, timeout: float = 5.0,
                 opener: Callable[..., Awaitable[Any]] = asyncio.open_connection) -> None:
        self.alternatives = alternatives  # (ip, port, fresh) -> the alias's IPs
        self.timeout = timeout
        self.opener = opener  # one attempt to one IP

    async def open(self, host: str, port: int, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        tried = {host}
        pending: set[asyncio.Task[Any]] = {self._attempt(host, port, kwargs)}
        error: BaseException | None = None
        fresh = False
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise error if error is not None else TimeoutError(
                        f"no container took the connection within {self.timeout:g}s")
                done, pending = await asyncio.wait(
                    pending, timeout=min(RACE_DELAY, remaining),
                    return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is None:
                        return task.result()
                    error = task.exception()
                if done and pending:
                    continue  # one failed, another still racing: give it its chance
                others = [ip for ip in await self.alternatives(host, port, fresh)
                          if ip not in tried]
                fresh = not others  # exhausted: ask DNS next time
                if others:
                    tried.add(others[0])
                    pending.add(self._attempt(others[0], port, kwargs))
                elif not pending:
                    tried = set()  # every IP failed once: try them again shortly
                    await asyncio.sleep(min(RETRY_PAUSE, max(0.0, deadline - loop.time())))
                    tried.add(host)
                    pending.add(self._attempt(host, port, kwargs))
        finally:
            for task in pending:
                task.cancel()
                task.add_done_callback(_close_result)

    def _attempt(self, host: str, port: int, kwargs: dict[str, Any]) -> asyncio.Task[Any]:
        return asyncio.ensure_future(self.opener(host, port, **kwargs))


def _close_result(task: asyncio.Task[Any]) -> None:
    """A racer that connected after the winner: close its socket."""
    if not task.cancelled() and task.exception() is None:
        _, writer = task.result()
        with contextlib.suppress(Exception):
            writer.close()


def install_connect_retry(connector: Connector) -> None:
    """Point mitmproxy's server module (only) at ``connector`` for TCP connects."""
    from mitmproxy.proxy import server  # mitmproxy internal: its module-global ``asyncio``

    shim = types.SimpleNamespace(**{name: getattr(asyncio, name) for name in dir(asyncio)
                                    if not name.startswith("__")})
    shim.open_connection = connector.open
    server.asyncio = shim  # type: ignore[attr-defined]


class ConnectRetry:
    """The addon: option ``luma_retry_timeout`` and the seam, installed on load."""

    def __init__(self, alternatives: Alternatives) -> None:
        self.connector = Connector(alternatives)

    def load(self, loader: Any) -> None:
        loader.add_option(
            "luma_retry_timeout", float, env_float("LUMA_PROXY_RETRY_TIMEOUT", 5.0),
            "Seconds to keep retrying a failed container connect on other IPs of the alias.",
        )
        install_connect_retry(self.connector)

    def configure(self, updated: set[str]) -> None:
        if "luma_retry_timeout" in updated:
            if ctx.options.luma_retry_timeout <= 0:
                raise exceptions.OptionsError("luma_retry_timeout must be > 0")
            self.connector.timeout = ctx.options.luma_retry_timeout
