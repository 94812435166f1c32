"""IP allow-lists per service: which client addresses may reach it at all."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

type Network = ipaddress.IPv4Network | ipaddress.IPv6Network
type Address = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_CACHE_SIZE = 4096
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_cidr(value: str) -> Network:
    """A network from ``10.0.0.0/8``, ``2001:db8::/32`` or a bare address (/32, /128).

    Host bits are allowed (``10.1.2.3/8`` is 10.0.0.0/8); an IPv4-mapped IPv6 network
    (``::ffff:10.0.0.0/104``) becomes its IPv4 network, as clients are matched as IPv4.
    """
    try:
        network = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        msg = f"invalid CIDR {value!r}: expected an address or a network like 10.0.0.0/8"
        raise ValueError(msg) from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def client_address(ip: str) -> Address | None:
    """The client's address as matched: ``::ffff:1.2.3.4`` is 1.2.3.4; None if unparsable."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class AllowList:
    """The networks a service accepts clients from; empty means everyone.

    ``allows`` runs on every request of the service, so verdicts are remembered per
    address string (a bounded dict, emptied when full: peers are few, and one
    verdict costs a few microseconds to recompute).
    """

    def __init__(self, cidrs: Iterable[str], *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        if cache_size < 1:
            raise ValueError("allow-list: the cache size must be at least 1")
        self.networks: tuple[Network, ...] = tuple(parse_cidr(c) for c in cidrs)
        self._v4 = tuple(n for n in self.networks if isinstance(n, ipaddress.IPv4Network))
        self._v6 = tuple(n for n in self.networks if isinstance(n, ipaddress.IPv6Network))
        self._cache: dict[str, bool] = {}
        self._cache_size = cache_size

    def __bool__(self) -> bool:
        """Whether the list restricts anything."""
        return bool(self.networks)

    def allows(self, ip: str) -> bool:
        """Whether a client at ``ip`` may connect; an unparsable address is refused."""
        if not self.networks:
            return True
        verdict = self._cache.get(ip)
        if verdict is None:
            verdict = self._match(ip)
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[ip] = verdict
        return verdict

    def _match(self, ip: str) -> bool:
        address = client_address(ip)
        if address is None:
            return False
        networks = self._v4 if isinstance(address, ipaddress.IPv4Address) else self._v6
        return any(address in network for network in networks)

    def cache_len(self) -> int:
        """How many verdicts are remembered (at most the cache size)."""
        return len(self._cache)
