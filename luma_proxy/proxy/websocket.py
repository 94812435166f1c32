"""WebSocket messages: a flow keeps at most the last few (issue 13, point 14).

mitmproxy appends every message of a WebSocket to ``flow.websocket.messages``
and keeps them for as long as the flow lives, so a proxy's memory grew with
the data a socket carried (200 x 1 MiB each way through one socket: +425 MB).
Only a flow viewer (mitmweb) has a use for old messages. ``luma_websocket_keep``
bounds the list: 0 under ``luma-proxy run``, which shows flows to nobody; a
small tail (``DEFAULT_KEEP``) under ``mitmdump -s`` / ``mitmweb -s``.
``LUMA_PROXY_WEBSOCKET_KEEP`` sets it for both. Which default applies is
decided where the addons are composed: ``server.serve`` (only ``run``) asks
``all_addons(serving=True)``; guessing from the master (mitmweb's ``view``)
would be fragile, and the environment stays one way to set it everywhere.

Why trimming the list is safe (mitmproxy 12, ``proxy/layers/websocket.py``):
the layer appends the message, runs the ``websocket_message`` hook, and then
forwards (or, if ``message.dropped``, drops) its own reference to that message,
never ``messages[-1]`` or any other list entry. What the list holds changes
nothing that is sent. The message a hook is about stays in the list while the
hook runs, so ``messages[-1]`` and ``messages[-1].drop()`` keep working for
every addon (mitmproxy's ``dumper`` and ``view``, scripts loaded after ours);
with a keep of 0 it leaves the list at the next message or when the socket
closes. This addon must come last in the chain, after everything that reads
the list.

The trim at ``websocket_end`` matters too: a finished flow sits in a reference
cycle inside mitmproxy and is freed only when Python's cyclic collector runs,
which big ``bytes`` objects do not prompt; until then its messages stayed
(the issue's "not reused after the sockets closed").
"""

from __future__ import annotations

from typing import Any

from mitmproxy import ctx, exceptions, http

from luma_proxy.environ import env_int

ENV = "LUMA_PROXY_WEBSOCKET_KEEP"
DEFAULT_KEEP = 50  # under mitmdump/mitmweb: enough to look at in mitmweb, bounded
SERVING_KEEP = 0  # under luma-proxy run: nobody looks


def trim(messages: list[Any], keep: int) -> int:
    """Delete all but the last ``keep`` entries of ``messages`` in place; how many went."""
    excess = len(messages) - max(keep, 0)
    if excess <= 0:
        return 0
    del messages[:excess]
    return excess


class WebSocketTail:
    """Bounds ``flow.websocket.messages`` to the ``luma_websocket_keep`` most recent."""

    def __init__(self, default_keep: int = DEFAULT_KEEP) -> None:
        self.default_keep = default_keep  # SERVING_KEEP for luma-proxy run (composition.all_addons)
        self.keep = default_keep

    def load(self, loader: Any) -> None:
        loader.add_option(
            "luma_websocket_keep", int, env_int(ENV, self.default_keep),
            "WebSocket messages kept per flow, the most recent ones (for mitmweb); "
            "older ones are let go once forwarded. 0 keeps none.",
        )

    def configure(self, updated: set[str]) -> None:
        if "luma_websocket_keep" in updated:
            keep = ctx.options.luma_websocket_keep
            if keep < 0:
                raise exceptions.OptionsError("luma_websocket_keep must be >= 0")
            self.keep = keep

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        """The message just relayed stays (addons after us read ``messages[-1]``); older go."""
        if flow.websocket is not None:
            trim(flow.websocket.messages, max(self.keep, 1))

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        """The socket closed: nothing reads the last message any more, keep only the tail."""
        if flow.websocket is not None:
            trim(flow.websocket.messages, self.keep)
