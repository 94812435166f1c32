"""Which bodies stream: large or unsized ones, decided from the headers."""

from __future__ import annotations

import pytest
from mitmproxy.test import tutils

from luma_proxy.proxy.streaming import STREAM_ABOVE, stream_request, stream_response


@pytest.mark.parametrize(("headers", "version", "streamed"), [
    ({}, b"HTTP/1.1", False),  # no body
    ({"content-length": "10"}, b"HTTP/1.1", False),
    ({"content-length": str(STREAM_ABOVE)}, b"HTTP/1.1", False),  # the bound itself buffers
    ({"content-length": str(STREAM_ABOVE + 1)}, b"HTTP/1.1", True),
    ({"content-length": "x"}, b"HTTP/1.1", True),
    ({"transfer-encoding": "Chunked"}, b"HTTP/1.1", True),
    ({}, b"HTTP/2.0", True),  # a body of unknown length may follow
    ({"content-length": "10"}, b"HTTP/2.0", False),
])
def test_stream_request(headers: dict[str, str], version: bytes, streamed: bool) -> None:
    request = tutils.treq(http_version=version, headers=tuple(
        (k.encode(), v.encode()) for k, v in headers.items()))
    assert stream_request(request) is streamed


@pytest.mark.parametrize(("headers", "streamed"), [
    ({"content-length": "10"}, False),
    ({"content-length": str(STREAM_ABOVE)}, False),
    ({"content-length": str(STREAM_ABOVE + 1)}, True),
    ({}, True),  # chunked or close-delimited: no length known
    ({"content-length": "10", "content-type": "text/event-stream"}, True),
])
def test_stream_response(headers: dict[str, str], streamed: bool) -> None:
    response = tutils.tresp(headers=tuple((k.encode(), v.encode()) for k, v in headers.items()))
    assert stream_response(response) is streamed
