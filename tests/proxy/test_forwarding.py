"""Unit tests for luma_proxy.proxy.forwarding: X-Forwarded-* from untrusted and trusted peers."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import http

from luma_proxy.access.allowlist import AllowList
from luma_proxy.proxy.forwarding import (
    forwarded_client,
    is_trusted,
    parse_trusted_proxies,
    set_forwarding_headers,
)

SPOOFED = [
    ("X-Forwarded-For", "6.6.6.6"),
    ("X-Forwarded-For", "7.7.7.7, 8.8.8.8"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.com"),
    ("X-Real-IP", "6.6.6.6"),
    ("Forwarded", "for=6.6.6.6;proto=https"),
    ("X-Forwarded-Port", "1"),
    ("X-Forwarded-Server", "evil"),
    ("X-Client-IP", "6.6.6.6"),
]


def headers(*pairs: tuple[str, str]) -> http.Headers:
    return http.Headers([(k.encode(), v.encode()) for k, v in pairs])


def test_untrusted_peer_values_are_replaced() -> None:
    h = headers(("Accept", "*/*"), *SPOOFED)
    set_forwarding_headers(h, "203.0.113.9", "http", "blog.com")
    assert h.get_all("X-Forwarded-For") == ["203.0.113.9"]
    assert h.get_all("X-Forwarded-Proto") == ["http"]
    assert h.get_all("X-Forwarded-Host") == ["blog.com"]
    assert h.get_all("X-Real-IP") == ["203.0.113.9"]
    for name in ("Forwarded", "X-Forwarded-Port", "X-Forwarded-Server", "X-Client-IP"):
        assert name not in h
    assert h["Accept"] == "*/*"  # unrelated headers untouched
    assert "6.6.6.6" not in str(list(h.items(multi=True)))


def test_untrusted_without_client_headers() -> None:
    h = headers(("Host", "blog.com"))
    set_forwarding_headers(h, "203.0.113.9", "https", "blog.com")
    assert dict(h) == {
        "Host": "blog.com",
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "blog.com",
        "X-Real-IP": "203.0.113.9",
    }


def test_peer_outside_trusted_range_is_untrusted() -> None:
    trusted = parse_trusted_proxies("10.0.0.0/8")
    h = headers(*SPOOFED)
    set_forwarding_headers(h, "11.0.0.1", "http", "blog.com", trusted)
    assert h.get_all("X-Forwarded-For") == ["11.0.0.1"]
    assert h["X-Real-IP"] == "11.0.0.1"
    assert "Forwarded" not in h


def test_trusted_peer_keeps_chain_and_appends() -> None:
    trusted = parse_trusted_proxies("10.0.0.0/8, 192.168.1.1")
    h = headers(
        ("X-Forwarded-For", "198.51.100.7, 172.16.0.1"),
        ("X-Forwarded-For", "172.16.0.2"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "public.example"),
        ("Forwarded", "for=198.51.100.7"),
    )
    set_forwarding_headers(h, "10.1.2.3", "http", "blog.com", trusted)
    assert h.get_all("X-Forwarded-For") == ["198.51.100.7, 172.16.0.1, 172.16.0.2, 10.1.2.3"]
    assert h["X-Forwarded-Proto"] == "https"  # what the trusted proxy saw
    assert h["X-Forwarded-Host"] == "public.example"
    assert h["X-Real-IP"] == "198.51.100.7"  # the original client
    assert h["Forwarded"] == "for=198.51.100.7"


def test_trusted_peer_without_chain_fills_in() -> None:
    trusted = parse_trusted_proxies(["192.168.1.1/32"])
    h = headers()
    set_forwarding_headers(h, "192.168.1.1", "https", "blog.com", trusted)
    assert h["X-Forwarded-For"] == "192.168.1.1"
    assert h["X-Forwarded-Proto"] == "https"
    assert h["X-Forwarded-Host"] == "blog.com"
    assert h["X-Real-IP"] == "192.168.1.1"


def test_trusted_peer_keeps_its_real_ip() -> None:
    trusted = parse_trusted_proxies("10.0.0.0/8")
    h = headers(("X-Forwarded-For", "1.1.1.1"), ("X-Real-IP", "2.2.2.2"))
    set_forwarding_headers(h, "10.0.0.1", "http", "blog.com", trusted)
    assert h["X-Real-IP"] == "2.2.2.2"
    assert h["X-Forwarded-For"] == "1.1.1.1, 10.0.0.1"


def test_ipv4_mapped_peer_untrusted_is_written_as_ipv4() -> None:
    h = headers(("X-Forwarded-For", "6.6.6.6"))
    set_forwarding_headers(h, "::ffff:203.0.113.9", "http", "blog.com")
    assert h["X-Forwarded-For"] == "203.0.113.9"
    assert h["X-Real-IP"] == "203.0.113.9"


def test_ipv4_mapped_peer_matches_ipv4_cidr() -> None:
    trusted = parse_trusted_proxies("10.0.0.0/8")
    assert is_trusted("::ffff:10.0.0.5", trusted)
    assert not is_trusted("::ffff:11.0.0.5", trusted)
    h = headers(("X-Forwarded-For", "198.51.100.7"))
    set_forwarding_headers(h, "::ffff:10.0.0.5", "http", "blog.com", trusted)
    assert h["X-Forwarded-For"] == "198.51.100.7, 10.0.0.5"
    assert h["X-Real-IP"] == "198.51.100.7"


def test_ipv6_peers() -> None:
    trusted = parse_trusted_proxies("fd00::/8")
    assert is_trusted("fd00::1", trusted)
    assert not is_trusted("2001:db8::1", trusted)
    h = headers(("X-Forwarded-For", "6.6.6.6"))
    set_forwarding_headers(h, "2001:db8::1", "http", "blog.com", trusted)
    assert h["X-Forwarded-For"] == "2001:db8::1"


def test_is_trusted_edge_cases() -> None:
    assert not is_trusted("10.0.0.1", ())
    assert not is_trusted("not-an-ip", parse_trusted_proxies("0.0.0.0/0"))
    assert is_trusted("10.0.0.1", parse_trusted_proxies("0.0.0.0/0"))


def test_parse_trusted_proxies() -> None:
    assert parse_trusted_proxies("") == ()
    assert parse_trusted_proxies(" , ") == ()
    assert parse_trusted_proxies("10.0.0.0/8,172.16.0.0/12 , fd00::/8") == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("172.16.0.0/12"),
        ipaddress.ip_network("fd00::/8"),
    )
    # Host bits are tolerated; a bare address is a /32.
    assert parse_trusted_proxies("10.1.2.3/8") == (ipaddress.ip_network("10.0.0.0/8"),)
    assert parse_trusted_proxies(["192.168.1.1"]) == (ipaddress.ip_network("192.168.1.1/32"),)


@pytest.mark.parametrize("value", ["10.0.0.0/33", "nope", "10.0.0.0/8,garbage", "1.2.3/8",
                                   "fd00::/129", "10.0.0.0/-1"])
def test_parse_trusted_proxies_errors(value: str) -> None:
    with pytest.raises(ValueError, match="invalid trusted proxy") as info:
        parse_trusted_proxies(value)
    assert "\n" not in str(info.value)


def _reference_untrusted(h: http.Headers, peer: str, scheme: str, host: str) -> None:
    """The straightforward version the one-pass implementation must equal."""
    h["X-Forwarded-For"] = peer
    h["X-Forwarded-Proto"] = scheme
    h["X-Forwarded-Host"] = host
    h["X-Real-IP"] = peer
    for name in ("Forwarded", "X-Forwarded-Port", "X-Forwarded-Server", "X-Client-IP"):
        h.pop(name, None)


_NAMES = ["Host", "Accept", "X-Forwarded-For", "x-forwarded-for", "X-FORWARDED-PROTO",
          "X-Forwarded-Host", "X-Real-Ip", "Forwarded", "x-forwarded-port",
          "X-Forwarded-Server", "X-Client-IP", "Cookie", "X-Request-ID"]


@given(st.lists(st.tuples(st.sampled_from(_NAMES), st.text(max_size=8)), max_size=12),
       st.sampled_from(["http", "https"]), st.text(min_size=1, max_size=12))
def test_one_pass_equals_reference(pairs: list[tuple[str, str]], scheme: str,
                                   host: str) -> None:
    fields = [(k.encode(), v.encode("utf-8", "surrogateescape")) for k, v in pairs]
    ours, reference = http.Headers(fields), http.Headers(fields)
    set_forwarding_headers(ours, "203.0.113.9", scheme, host)
    _reference_untrusted(reference, "203.0.113.9", scheme, host)
    assert ours.fields == reference.fields


# ---------------------------------------------------------------------------- forwarded_client

TRUSTED = parse_trusted_proxies("10.0.0.0/8, fd00::/8")


def xff(*values: str) -> http.Headers:
    return headers(*(("X-Forwarded-For", v) for v in values))


@pytest.mark.parametrize(
    ("peer", "sent", "client"),
    [
        ("203.0.113.9", xff("1.1.1.1"), "203.0.113.9"),  # the header of a stranger is ignored
        ("::ffff:203.0.113.9", xff("1.1.1.1"), "203.0.113.9"),
        ("2001:db8::1", xff("1.1.1.1"), "2001:db8::1"),
        ("11.0.0.1", xff(), "11.0.0.1"),
    ],
)
def test_forwarded_client_untrusted_peer_is_the_client(peer: str, sent: http.Headers,
                                                       client: str) -> None:
    assert forwarded_client(peer, sent, TRUSTED) == client


def test_forwarded_client_trusts_nobody_by_default() -> None:
    assert forwarded_client("10.0.0.1", xff("1.1.1.1"), ()) == "10.0.0.1"
    assert forwarded_client("::ffff:10.0.0.1", xff("1.1.1.1"), ()) == "10.0.0.1"


@pytest.mark.parametrize(
    ("peer", "sent", "client"),
    [
        ("10.0.0.1", xff("1.1.1.1"), "1.1.1.1"),
        # The rightmost address not a trusted proxy: what the client put before it is
        # not believed.
        ("10.0.0.1", xff("6.6.6.6, 2.2.2.2, 10.0.0.5"), "2.2.2.2"),
        ("10.0.0.1", xff("6.6.6.6, 2.2.2.2, 10.0.0.5, fd00::7"), "2.2.2.2"),
        ("::ffff:10.0.0.1", xff("6.6.6.6, ::ffff:3.3.3.3"), "3.3.3.3"),
        ("fd00::1", xff("2001:db8::1, fd00::2"), "2001:db8::1"),
        ("10.0.0.1", xff(" 1.1.1.1 ,  2.2.2.2 "), "2.2.2.2"),
        ("10.0.0.1", xff("1.1.1.1, , "), "1.1.1.1"),  # empty entries are skipped
        ("10.0.0.1", xff(), "10.0.0.1"),  # nothing forwarded: the peer
        ("10.0.0.1", xff(""), "10.0.0.1"),
    ],
)
def test_forwarded_client_trusted_peer(peer: str, sent: http.Headers, client: str) -> None:
    assert forwarded_client(peer, sent, TRUSTED) == client


def test_forwarded_client_several_headers_are_one_list() -> None:
    assert forwarded_client("10.0.0.1", xff("6.6.6.6", "2.2.2.2, 10.1.1.1"),
                            TRUSTED) == "2.2.2.2"
    assert forwarded_client("10.0.0.1", xff("6.6.6.6, 2.2.2.2", "10.1.1.1", "10.2.2.2"),
                            TRUSTED) == "2.2.2.2"
    mixed = headers(("X-Forwarded-For", "6.6.6.6"), ("x-forwarded-for", "7.7.7.7"))
    assert forwarded_client("10.0.0.1", mixed, TRUSTED) == "7.7.7.7"


def test_forwarded_client_all_trusted_is_the_leftmost() -> None:
    assert forwarded_client("10.0.0.1", xff("10.0.0.7, 10.0.0.5"), TRUSTED) == "10.0.0.7"
    assert forwarded_client("10.0.0.1", xff("10.0.0.7", "fd00::5"), TRUSTED) == "10.0.0.7"


@pytest.mark.parametrize("garbage", ["garbage", "1.2.3.4:5678", "[2001:db8::1]", "unknown",
                                     "1.1.1.1.1"])
def test_forwarded_client_garbage_is_returned_and_refused(garbage: str) -> None:
    """An entry that is no address is not skipped (that would believe one further left,
    which the client wrote): it is the client, and no allow-list lets it in."""
    found = forwarded_client("10.0.0.1", xff(f"1.1.1.1, {garbage}"), TRUSTED)
    assert found == garbage
    assert not AllowList(["0.0.0.0/0", "::/0"]).allows(found)
