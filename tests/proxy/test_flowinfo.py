"""The hot path's header helpers give what mitmproxy's own accessors give, more cheaply."""

from __future__ import annotations

import pytest
from mitmproxy import http
from mitmproxy.test import tutils

from luma_proxy.proxy.flowinfo import header, header_values, host_header, set_header

FIELDS = [(b"Host", b"a.test"), (b"A", b"1"), (b"a", b"2"), (b"B", b"x"),
          (b"U", "ü".encode()), (b"Raw", b"\xff\xfe")]


@pytest.mark.parametrize("name", ["a", "A", "b", "host", "u", "raw", "missing"])
def test_header_values_and_header_match_mitmproxy(name: str) -> None:
    headers = http.Headers(FIELDS)
    assert header_values(headers, name) == headers.get_all(name)
    assert header(headers, name, "dflt") == headers.get(name, "dflt")
    assert header(headers, "missing") == ""


@pytest.mark.parametrize("name", ["X-Request-ID", "a", "B", "U"])
def test_set_header_matches_setitem(name: str) -> None:
    mine, theirs = http.Headers(FIELDS), http.Headers(FIELDS)
    set_header(mine, name, "vålue")
    theirs[name] = "vålue"
    assert mine.fields == theirs.fields


def test_host_header_matches_mitmproxy() -> None:
    h1 = tutils.treq(headers=((b"host", b"a.test:8080"),))
    assert host_header(h1) == h1.host_header == "a.test:8080"
    twice = tutils.treq(headers=((b"host", b"a.test"), (b"Host", b"b.test")))
    assert host_header(twice) == twice.host_header
    none = tutils.treq(headers=())
    assert host_header(none) is none.host_header is None
    h2 = tutils.treq(http_version=b"HTTP/2.0", authority=b"c.test", headers=())
    assert host_header(h2) == h2.host_header == "c.test"
    h2_host = tutils.treq(http_version=b"HTTP/2.0", authority=b"", headers=((b"host", b"d"),))
    assert host_header(h2_host) == h2_host.host_header == "d"
