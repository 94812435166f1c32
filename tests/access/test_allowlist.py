"""IP allow-lists: CIDR parsing, IPv4/IPv6/mapped matching, refusals, the bounded cache."""

from __future__ import annotations

import ipaddress

import pytest

from luma_proxy.access.allowlist import AllowList, client_address, parse_cidr


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3/8", "10.0.0.0/8"),  # host bits allowed
        ("192.168.1.7", "192.168.1.7/32"),
        (" 172.16.0.0/12 ", "172.16.0.0/12"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("2001:db8::1", "2001:db8::1/128"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),  # mapped networks match as IPv4
        ("::ffff:1.2.3.4", "1.2.3.4/32"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("::/0", "::/0"),
    ],
)
def test_parse_cidr(value: str, expected: str) -> None:
    assert parse_cidr(value) == ipaddress.ip_network(expected)


@pytest.mark.parametrize(
    "value", ["", "  ", "10.0.0.0/33", "2001:db8::/129", "300.1.1.1", "example.com",
              "10.0.0.0/8,10.1.0.0/16", "10.0.0.0/8\nX-Injected: 1", "1.2.3.4/-1"]
)
def test_parse_cidr_refuses_with_one_line(value: str) -> None:
    with pytest.raises(ValueError, match="invalid CIDR") as info:
        parse_cidr(value)
    assert "\n" not in str(info.value)


def test_empty_list_allows_everyone_even_garbage() -> None:
    allow = AllowList([])
    assert not allow
    assert allow.allows("203.0.113.9")
    assert allow.allows("2001:db8::1")
    assert allow.allows("not an ip")


def test_ipv4() -> None:
    allow = AllowList(["10.0.0.0/8", "192.168.1.7"])
    assert allow
    assert allow.allows("10.255.0.1")
    assert allow.allows("192.168.1.7")
    assert not allow.allows("192.168.1.8")
    assert not allow.allows("11.0.0.1")
    assert not allow.allows("2001:db8::1")


def test_ipv6() -> None:
    allow = AllowList(["2001:db8::/32", "fe80::/10"])
    assert allow.allows("2001:db8:1::5")
    assert not allow.allows("2001:db9::5")
    assert allow.allows("fe80::1%eth0")  # a scoped link-local peer
    assert not allow.allows("10.0.0.1")


def test_ipv4_mapped_client_matches_ipv4_network() -> None:
    allow = AllowList(["10.0.0.0/8"])
    assert allow.allows("::ffff:10.1.2.3")
    assert allow.allows("::FFFF:10.1.2.3")
    assert not allow.allows("::ffff:11.1.2.3")


def test_mapped_network_matches_both_spellings() -> None:
    allow = AllowList(["::ffff:10.0.0.0/104"])
    assert allow.allows("10.9.9.9")
    assert allow.allows("::ffff:10.9.9.9")
    assert not allow.allows("11.0.0.1")


def test_everything_networks() -> None:
    v4 = AllowList(["0.0.0.0/0"])
    assert v4.allows("203.0.113.9")
    assert v4.allows("::ffff:203.0.113.9")
    assert not v4.allows("2001:db8::1")
    assert AllowList(["0.0.0.0/0", "::/0"]).allows("2001:db8::1")


@pytest.mark.parametrize("ip", ["", "garbage", "10.0.0", "10.0.0.1/8", "10.0.0.1 ", "::g"])
def test_unparsable_client_refused(ip: str) -> None:
    assert not AllowList(["0.0.0.0/0", "::/0"]).allows(ip)


def test_bad_cidr_refuses_the_whole_list() -> None:
    with pytest.raises(ValueError, match="invalid CIDR 'nope'"):
        AllowList(["10.0.0.0/8", "nope"])


def test_client_address() -> None:
    assert client_address("::ffff:1.2.3.4") == ipaddress.IPv4Address("1.2.3.4")
    assert client_address("2001:db8::1") == ipaddress.IPv6Address("2001:db8::1")
    assert client_address("nope") is None


def test_cache_is_bounded_and_verdicts_stay_right() -> None:
    allow = AllowList(["10.0.0.0/24"], cache_size=8)
    for round_ in range(3):  # the cache fills, empties and refills many times
        for last in range(256):
            assert allow.allows(f"10.0.0.{last}"), round_
            assert not allow.allows(f"10.0.1.{last}"), round_
            assert allow.cache_len() <= 8
    assert allow.allows("10.0.0.1") and not allow.allows("10.0.1.1")
    with pytest.raises(ValueError, match="cache size"):
        AllowList(["10.0.0.0/8"], cache_size=0)
