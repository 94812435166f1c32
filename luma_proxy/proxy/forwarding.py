"""Forwarding headers: tell the container who the client was, without trusting the client."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from mitmproxy import http

from luma_proxy.access.allowlist import client_address

FORWARDING_HEADERS = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Real-IP")

type Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_trusted_proxies(value: str | Iterable[str]) -> tuple[Network, ...]:
    """Comma-separated CIDRs (or a list of them); raises ``ValueError`` on a bad one."""
    items = value.split(",") if isinstance(value, str) else list(value)
    networks = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            msg = f"invalid trusted proxy {item!r}: expected a CIDR like 10.0.0.0/8"
            raise ValueError(msg) from None
    return tuple(networks)


def is_trusted(peer_ip: str, trusted: Sequence[Network]) -> bool:
    """Whether ``peer_ip`` is in ``trusted``, matched as the allow-lists match clients."""
    if not trusted:
        return False
    address = client_address(peer_ip)
    return address is not None and any(address in network for network in trusted)


def forwarded_client(peer_ip: str, headers: http.Headers, trusted: Sequence[Network]) -> str:
    """The client's address: the peer, or, from a trusted proxy, the last address of
    ``X-Forwarded-For`` that is not itself a trusted proxy (right to left)."""
    peer_ip = peer_ip.removeprefix("::ffff:")
    if not is_trusted(peer_ip, trusted):
        return peer_ip
    chain = [a.strip() for v in headers.get_all("X-Forwarded-For") for a in v.split(",")]
    for address in reversed(chain):
        if not address:
            continue
        if not is_trusted(address, trusted):
            return address.removeprefix("::ffff:")
    return chain[0].removeprefix("::ffff:") if chain and chain[0] else peer_ip


def set_forwarding_headers(
    headers: http.Headers, peer_ip: str, scheme: str, host: str, trusted: Sequence[Network] = ()
) -> None:
    """Drop hop-by-hop fields, then set X-Forwarded-* and X-Real-IP for the upstream.

    From an untrusted peer, whatever the client sent is replaced. From a trusted
    proxy (``--trusted-proxies``) its values are kept and the peer is appended.
    """
    strip_hop_by_hop(headers)
    if peer_ip.startswith("::ffff:"):
        peer_ip = peer_ip.removeprefix("::ffff:")
    if is_trusted(peer_ip, trusted):
        chain = ", ".join(headers.get_all("X-Forwarded-For"))
        headers["X-Forwarded-For"] = f"{chain}, {peer_ip}" if chain else peer_ip
        headers.setdefault("X-Forwarded-Proto", scheme)
        headers.setdefault("X-Forwarded-Host", host)
        headers.setdefault("X-Real-IP", chain.split(",")[0].strip() if chain else peer_ip)
        return
    _replace_untrusted(headers, (peer_ip, scheme, host, peer_ip))


_SET = tuple(n.encode() for n in FORWARDING_HEADERS)
_SET_LOWER = tuple(n.lower() for n in _SET)
_DROPPED = frozenset(
    (b"forwarded", b"x-forwarded-port", b"x-forwarded-server", b"x-client-ip",
     b"x-forwarded-prefix", *_SET_LOWER)  # the prefix: set by a path-prefix route only
)
# Names of other lengths are not lowered to be compared: lowering (a new bytes object
# each) was most of what the scans cost (callgrind, docs/performance.md).
_DROPPED_SIZES = frozenset(len(name) for name in _DROPPED)


def _replace_untrusted(headers: http.Headers, values: tuple[str, str, str, str]) -> None:
    """Set the four headers and drop the spoofable rest, in one pass over the fields.

    Same result as ``headers[name] = value`` for each of ``FORWARDING_HEADERS`` followed by
    ``headers.pop(name, None)`` for each dropped one (the first copy of a header keeps its
    place and spelling, later copies go, absent ones are appended in order), without the
    eight scans over every header that those cost per request. When the client sent none
    of them (nearly always), the four are simply appended.
    """
    encoded = [value.encode("utf-8", "surrogateescape") for value in values]
    fields = headers.fields
    for field in fields:
        if len(field[0]) in _DROPPED_SIZES and field[0].lower() in _DROPPED:
            break
    else:  # none of them sent (nearly always): append the four
        headers.fields = (*fields, *zip(_SET, encoded, strict=True))
        return
    pending = dict(zip(_SET_LOWER, encoded, strict=True))
    kept = []
    for field in fields:
        lower = field[0].lower()
        if lower in pending:
            kept.append((field[0], pending.pop(lower)))
        elif lower not in _DROPPED:
            kept.append(field)
    kept += [(name, pending[lower]) for name, lower in zip(_SET, _SET_LOWER, strict=True)
             if lower in pending]
    headers.fields = tuple(kept)


# Fields that describe one hop, never forwarded (RFC 9110 §7.6.1, §7.8; RFC 7540 §3.2).
_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"upgrade",
                  b"http2-settings"))
_HOP_SIZES = frozenset(len(name) for name in _HOP)
# Never dropped even when Connection names them: mitmproxy frames the upstream
# request by them (a body without its length would read as a second request).
_FRAMING = frozenset((b"host", b"content-length", b"transfer-encoding"))


def _tokens(value: bytes) -> set[bytes]:
    return {token.strip().lower() for token in value.split(b",")}


def strip_hop_by_hop(headers: http.Headers) -> None:
    """Remove ``Connection`` and every field it names, and the other hop-by-hop fields.

    Otherwise ``Connection: X-Forwarded-For`` makes whatever honours it behind
    the proxy strip the proxy's own forwarding headers. Only a WebSocket
    upgrade keeps its ``Connection: Upgrade`` and ``Upgrade: websocket``: no
    other protocol (``h2c``) becomes a tunnel to the container. ``close`` is
    kept. One pass over the fields when there are none (most requests).
    """
    fields = headers.fields
    for name, _ in fields:
        if len(name) in _HOP_SIZES and name.lower() in _HOP:
            break
    else:
        return
    connection: set[bytes] = set()
    upgrade: set[bytes] = set()
    for name, value in fields:
        lower = name.lower()
        if lower == b"connection":
            connection |= _tokens(value)
        elif lower == b"upgrade":
            upgrade |= _tokens(value)
    drop = (_HOP | connection) - _FRAMING
    kept = tuple(field for field in fields if field[0].lower() not in drop)
    if b"upgrade" in connection and b"websocket" in upgrade:
        kept += ((b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"))
    elif b"close" in connection:
        kept += ((b"Connection", b"close"),)
    headers.fields = kept


def asked_websocket(headers: http.Headers) -> bool:
    """Whether a request (already stripped) asked for a WebSocket upgrade, the only tunnel."""
    return any(name.lower() == b"upgrade" and value.lower() == b"websocket"
               for name, value in headers.fields)
