"""``X-Request-ID``: one id per request, seen by the container, the client and the log.

A client's own id is kept when it is sane (1-200 characters of
``[A-Za-z0-9._:@/+=-]``, sent once); anything else is replaced by a fresh
random 32-hex-digit id, so a hostile value never reaches a container's logs or ours. The id
is set on the request before it goes upstream, kept in
``flow.metadata["luma_request_id"]`` for the other addons, and returned on the
response, the proxy's own 404/503 pages included.

Must come before the routing addon in the addon list.
"""

from __future__ import annotations

import os
import re

from mitmproxy import http

from luma_proxy.proxy.flowinfo import append_header, header_values, set_header

HEADER = "X-Request-ID"
METADATA = "luma_request_id"
_SANE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,200}")


def is_sane(value: str) -> bool:
    return _SANE.fullmatch(value) is not None


class _Ids:
    """128 random bits per id, as 32 hex digits (like a uuid4 hex; uuid.uuid4() is 5x slower).

    The bits come from ``os.urandom`` 256 ids at a time: one system call per
    256 requests instead of one each. A forked child starts a batch of its own.
    """

    BATCH = 256

    def __init__(self) -> None:
        self._hex = ""
        self._next = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._hex, self._next = "", 0

    def __call__(self) -> str:
        start = self._next
        if start >= len(self._hex):
            self._hex, start = os.urandom(16 * self.BATCH).hex(), 0
        self._next = start + 32
        return self._hex[start:start + 32]


new_request_id = _Ids()


def choose_request_id(sent: list[str]) -> str:
    """The client's id if it sent exactly one sane one, else a new one."""
    if len(sent) == 1 and is_sane(sent[0]):
        return sent[0]
    return new_request_id()


class RequestId:
    """Gives every request an ``X-Request-ID`` and returns it on the response."""

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        headers = flow.request.headers
        sent = header_values(headers, HEADER)
        request_id = choose_request_id(sent)
        if not sent:  # the usual case: nothing to replace
            append_header(headers, HEADER, request_id)
        elif sent != [request_id]:
            set_header(headers, HEADER, request_id)  # replaces every copy the client sent
        flow.metadata[METADATA] = request_id

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Before the headers go out, streamed or not.

        mitmproxy also runs this hook for a response an addon set in
        ``requestheaders``/``request`` (the proxy's own 404/503 pages, redirects).
        """
        request_id = flow.metadata.get(METADATA)
        if request_id and flow.response is not None:
            set_header(flow.response.headers, HEADER, request_id)
