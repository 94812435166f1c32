"""Helpers for the unit tests of the request id, access log and metrics addons."""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

from mitmproxy import http
from mitmproxy.test import tflow, tutils

from luma_proxy.models import Health, HealthEntry, Service
from luma_proxy.store.registry import Store


def write_state(path: Path) -> Path:
    """blog.test -> 127.0.0.9:3000 (project p), down.test unhealthy (project q)."""
    down = Service(name="d", host="down.test", target="127.0.0.8:3000", project="q")

    with Store(path).transaction() as tx:
        tx.put(Service(name="b", host="blog.test", target="127.0.0.9:3000", project="p"))
        tx.put(down)
        tx.put_health("down.test", HealthEntry.of(down.routing_key(), Health(healthy=False)))
    return path


def flow_for(host: str, path: str = "/", headers: dict[str, str] | None = None,
             method: str = "GET", body: bytes = b"") -> http.HTTPFlow:
    f = tflow.tflow()
    f.request = tutils.treq(host="127.0.0.1", port=80, path=path.encode(), method=method.encode(),
                            headers=((b"host", host.encode()),), content=body)
    for k, v in (headers or {}).items():
        f.request.headers.add(k, v)
    f.request.timestamp_start = time.time()
    f.client_conn.peername = ("203.0.113.7", 5555)
    return f


async def call(addons: list[Any], hook: str, f: http.HTTPFlow) -> None:
    for addon in addons:
        method = getattr(addon, hook, None)
        if method is not None:
            result = method(f)
            if inspect.isawaitable(result):
                await result


async def through(addons: list[Any], f: http.HTTPFlow,
                  response: http.Response | None = None) -> http.HTTPFlow:
    """The hooks of one request that gets an answer, in mitmproxy's order."""
    await call(addons, "requestheaders", f)
    await call(addons, "request", f)
    if f.response is None:
        f.response = response or http.Response.make(200, b"hello", {"Content-Length": "5"})
    await call(addons, "responseheaders", f)
    await call(addons, "response", f)
    return f
