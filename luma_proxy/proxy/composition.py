"""The composition root: every addon luma-proxy adds to mitmproxy, in hook order.

mitmproxy calls a hook on each addon in list order, so the order is behaviour:

1. ``RequestId``: the request's ID exists before anyone logs or forwards it.
2. ``Limits``: head and body bounds are in place before any request is read.
3. ``Https``: ACME challenges and the HTTPS redirect are answered before
   routing; it sees ``tls_start_client`` before mitmproxy's ``tlsconfig``
   (``server.lean_addons`` puts ours first) to hand over the host's certificate.
4. ``LumaProxy``: the hot path: Host -> service -> container.
5. ``Compression``: after ``LumaProxy`` (whose ``responseheaders`` decides what is
   streamed) and before ``AccessLog`` (which logs the bytes sent): zstd, br or gzip.
6. ``ConnectRetry``: the connect seam, asking ``LumaProxy`` for an alias's IPs.
7. ``Timeouts``: deadlines armed once the request is routed.
8. ``AccessLog``, ``Metrics``: record what the hooks before them decided.
9. ``Drain``: graceful SIGTERM, counting what is in flight.
10. ``WebSocketTail``: last, as it trims the message list every other addon reads.
"""

from __future__ import annotations

from typing import Any

from luma_proxy.proxy.accesslog import AccessLog
from luma_proxy.proxy.addon import LumaProxy
from luma_proxy.proxy.compression import Compression
from luma_proxy.proxy.drain import Drain
from luma_proxy.proxy.engine_patches import ConnectRetry
from luma_proxy.proxy.limits import Limits
from luma_proxy.proxy.metrics import Metrics
from luma_proxy.proxy.requestid import RequestId
from luma_proxy.proxy.timeouts import Timeouts
from luma_proxy.proxy.tls import Https
from luma_proxy.proxy.websocket import DEFAULT_KEEP, SERVING_KEEP, WebSocketTail


def all_addons(serving: bool = False) -> list[Any]:
    """Everything luma-proxy adds to mitmproxy, in hook order (see the module's text).

    ``serving``: for ``luma-proxy run``, where no flow viewer needs WebSocket messages kept.
    """
    router = LumaProxy()
    return [RequestId(), Limits(), Https(router), router, Compression(),
            ConnectRetry(router.alternatives),
            Timeouts(), AccessLog(), Metrics(), Drain(),
            WebSocketTail(SERVING_KEEP if serving else DEFAULT_KEEP)]
