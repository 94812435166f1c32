"""Facts about a finished flow that the access log and the metrics both report.

Pure functions of the flow (and of the routing addon's host table): which
service a request belonged to, and which status the client was given, also
when no response object exists (upstream connect failure, client gone).
"""

from __future__ import annotations

import functools
import re
from typing import Any

from mitmproxy import http

# nginx's code for "the client closed the connection before the answer".
CLIENT_CLOSED = 499
# What mitmproxy answers when the upstream fails (refused, timeout, bad response).
UPSTREAM_FAILED = 502
TOO_LARGE = 413
# The flow.error.msg of a request body cut at the size limit (HTTP/1 in limits.py,
# HTTP/2 in engine_patches.py): logged 413, as the client saw it.
BODY_TOO_LARGE = "request body exceeds the size limit"
REQUEST_TIMEOUT = 408
BAD_REQUEST = 400


# request.is_http2 or request.is_http3, as bytes: bodies end with a flag, not a length.
MULTIPLEXED = (b"HTTP/2.0", b"HTTP/3")
# The client ALPNs of those: one connection carries concurrent streams (timeouts, the pool).
MULTIPLEXED_ALPN = (b"h2", b"h3")
# mitmproxy cancels a pending upstream connect with this message when the client leaves.
CLIENT_GONE = "client disconnected"
# The flow.error.msg of a body cut by its deadline (error_status: 408).
BODY_TIMEOUT = "request body timeout"


@functools.cache
def _raw_name(name: str) -> bytes:
    return name.lower().encode()


def header_values(headers: http.Headers, name: str) -> list[str]:
    """``headers.get_all(name)`` in one pass over the raw fields.

    mitmproxy's ``get_all`` makes several Python calls per field it compares
    (``_kconv``, ``always_bytes``); with a browser's dozen headers a lookup cost
    microseconds, and a request's hooks do about ten of them.
    """
    key = _raw_name(name)
    size = len(key)  # a field of another length is not lowered to be compared
    return [value.decode("utf-8", "surrogateescape") for field, value in headers.fields
            if len(field) == size and field.lower() == key]


def header(headers: http.Headers, name: str, default: str = "") -> str:
    """``headers.get(name, default)``, without mitmproxy's costs.

    mitmproxy's ``Headers.get`` is ``Mapping.get``: a missing field raises and
    catches a ``KeyError`` (5 % of the proxy's own CPU in the 21:24 UTC profile),
    after a ``get_all`` (see ``header_values``). Several values are joined with
    ", ", as ``Headers.__getitem__`` does.
    """
    values = header_values(headers, name)
    return ", ".join(values) if values else default


def set_header(headers: http.Headers, name: str, value: str) -> None:
    """``headers[name] = value``; when the field is absent (the usual case), one append.

    mitmproxy's ``__setitem__`` rebuilds the whole field list through several
    calls per field, even to add one.
    """
    key = _raw_name(name)
    size = len(key)
    for field, _ in headers.fields:
        if len(field) == size and field.lower() == key:
            headers[name] = value
            return
    append_header(headers, name, value)


def append_header(headers: http.Headers, name: str, value: str) -> None:
    """``headers.add(name, value)`` for a field known to be absent: one tuple append."""
    headers.fields += ((name.encode(), value.encode("utf-8", "surrogateescape")),)


def host_header(request: http.Request) -> str | None:
    """``request.host_header`` (the Host field, or HTTP/2's :authority), read in one pass."""
    if request.data.http_version in MULTIPLEXED and request.authority:
        return request.authority
    hosts = header_values(request.headers, "host")
    return ", ".join(hosts) if hosts else None


def service_host(flow: http.HTTPFlow, router: Any | None) -> str:
    """The canonical host of the service this request was for; "" if none.

    Routed flows carry it in ``flow.metadata["luma_service"]``. Flows the
    routing addon answered itself (503 for an unhealthy service) are looked up
    again in its host table, so they count for their service too. Unknown hosts
    give "", which keeps label and log values bounded by the deployed hosts.
    """
    host = flow.metadata.get("luma_service")
    if host:
        return host
    table = getattr(router, "table", None)
    if table is None:
        return ""
    found = table.lookup(host_header(flow.request))
    return getattr(found, "key", "") or ""


def project_of(host: str, router: Any | None) -> str:
    if not host:
        return ""
    table = getattr(router, "table", None)
    service = table.services.get(host) if table is not None else None
    return service.project if service is not None else ""


def error_status(flow: http.HTTPFlow) -> int:
    """The status the client saw for a flow that ended in the ``error`` hook.

    A response whose headers were already sent (a stream cut short) keeps its
    status. Otherwise: the client went away (499), the request was too large
    (413) or too slow (408), or the upstream failed: mitmproxy's own 502 page.
    """
    if flow.response is not None:
        return flow.response.status_code
    message = (flow.error.msg if flow.error else "").lower()
    if CLIENT_GONE in message or "by client" in message:
        return CLIENT_CLOSED
    if message.startswith(BODY_TOO_LARGE):
        return TOO_LARGE
    if message.startswith(BODY_TIMEOUT):
        return REQUEST_TIMEOUT
    if "from client" in message:  # mitmproxy refused a malformed or smuggling request
        return BAD_REQUEST
    return UPSTREAM_FAILED


def status_class(status: int) -> str:
    """``200`` -> ``"2xx"``; anything outside 100-599 is ``"other"``."""
    if 100 <= status < 600:
        return f"{status // 100}xx"
    return "other"


def client_ip(flow: http.HTTPFlow) -> str:
    peer = flow.client_conn.peername
    if not peer:
        return ""
    ip = str(peer[0])
    return ip.removeprefix("::ffff:")


_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ORIGIN_PATH = re.compile(rb"/[\x21-\x7e]*")


def valid_h2_target(method: bytes, path: bytes, authority: bytes) -> bool:
    """An HTTP/2 request whose parts can become an HTTP/1 request line as they are.

    ``:method`` a token, ``:path`` origin-form (a leading slash, no space, control
    or non-ASCII byte: never an absolute URL or ``*``), ``:authority`` without
    whitespace or controls. Anything else is answered 400 (RFC 9113 §8.3.1).
    """
    return (_TOKEN.fullmatch(method) is not None and _ORIGIN_PATH.fullmatch(path) is not None
            and _ORIGIN_PATH.fullmatch(b"/" + authority) is not None)
