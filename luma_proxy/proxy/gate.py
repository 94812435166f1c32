"""What a route asks of a request before it is forwarded (issue 16).

In order: the canonical host (one 301), the allow-list (403), basic auth (401),
maintenance (``stop``: 503 with the operator's message; ``pause``: held). A
``Gate`` is compiled once per service row of a view and reused by every request
of it; a service with none of these has no gate, and its requests pay nothing.

Checking a password hash costs 50-250 ms of CPU, so it never runs on the event
loop: an answer not yet cached is verified in a thread (``verify``) and the
request is routed again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from mitmproxy import http

from luma_proxy.access.allowlist import AllowList
from luma_proxy.access.basicauth import BasicAuth, challenge, parse_credential
from luma_proxy.models import Service
from luma_proxy.proxy import pages
from luma_proxy.proxy.flowinfo import header_values
from luma_proxy.routing.router import canonical_target

PAUSE_POLL = 0.05  # a held request looks at the view this often


class Gate:
    """One service row's checks, compiled from its fields."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.allow = AllowList(service.allow) if service.allow else None
        self.auth = BasicAuth([parse_credential(c) for c in service.basic_auth]) \
            if service.basic_auth else None
        self.realm = service.host

    def check(self, flow: http.HTTPFlow, client: str, raw_host: str, https: bool,
              ) -> http.Response | Coroutine[Any, Any, Any] | None:
        """An answer, a coroutine to await before routing again, or None: forward it."""
        service = self.service
        target = canonical_target(service, raw_host)
        if target is not None:
            return redirect(target, raw_host, flow.request.path, https)
        if self.allow is not None and not self.allow.allows(client):
            return pages.page(403, pages_dir=service.error_pages)
        if self.auth is not None:
            values = header_values(flow.request.headers, "authorization")
            given = values[0] if len(values) == 1 else None
            known = self.auth.cached(given) if given is not None else False
            if known is None:
                return asyncio.to_thread(self.auth.verify, given)  # then routed again
            if not known:
                return pages.page(401, {"WWW-Authenticate": challenge(self.realm)},
                                  pages_dir=service.error_pages)
        if service.mode == "stopped":
            return pages.page(503, pages_dir=service.error_pages,
                              message=service.stop_message or "")
        return None


class Broken(Gate):
    """A route whose checks do not compile (a hand edit): refused, never left open."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def check(self, flow: http.HTTPFlow, client: str, raw_host: str, https: bool,
              ) -> http.Response | Coroutine[Any, Any, Any] | None:
        return pages.page(500)


def redirect(host: str, raw_host: str, path: str, https: bool) -> http.Response:
    """301 to ``host``, keeping the port the client used, the scheme, the path and query."""
    port = ""
    if not raw_host.endswith("]") and raw_host.count(":") == 1:
        port = ":" + raw_host.rsplit(":", 1)[1]
    location = f"{'https' if https else 'http'}://{host}{port}{path}"
    return http.Response.make(301, b"", {"Location": location, "Content-Length": "0"})


def gate_of(service: Service) -> Gate | None:
    """A gate when the service asks for any check; None (the common case) otherwise."""
    if (service.canonical_host or service.allow or service.basic_auth
            or service.mode == "stopped"):
        return Gate(service)
    return None


async def hold_paused(current: Callable[[], Service | None], bound: float) -> bool:
    """Wait while the route is paused, up to ``bound`` seconds: True once it serves
    again (resumed, or redeployed), False when the bound is reached."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    while loop.time() < deadline:
        service = current()
        if service is None or service.mode != "paused":
            return True
        await asyncio.sleep(min(PAUSE_POLL, max(0.0, deadline - loop.time())))
    service = current()
    return service is None or service.mode != "paused"
