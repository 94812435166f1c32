"""Pick one container IP of an alias for a request.

Each client connection stays on the IP it got while that IP is still in the
alias's answer and in rotation, so mitmproxy can reuse its upstream socket; new
connections are spread round-robin. IPs that refused or timed out a connect
are ejected for a while (passive ejection) and tried again after it. A passing
health check or proving probe lifts an ejection at once (``restore``), and an IP
that leaves its alias is forgotten (``forget``): Docker hands freed addresses to
new containers, which must not inherit a dead one's ejection or backoff.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

EJECT_BASE = 2.0
EJECT_MAX = 30.0


@dataclass(slots=True)
class _Ejection:
    until: float
    strikes: int


class Balancer:
    def __init__(self) -> None:
        self._sticky: dict[str, tuple[str, int]] = {}  # client id -> (ip, port)
        self._next: dict[tuple[str, int], int] = {}  # (alias, port) -> round-robin cursor
        self._ejected: dict[tuple[str, int], _Ejection] = {}

    def pick(
        self,
        alias: str,
        port: int,
        ips: Sequence[str],
        client_id: str,
        unhealthy: Collection[str] = (),
        now: float | None = None,
    ) -> str | None:
        """The IP for this request, or None when no IP of the alias can take it."""
        now = time.monotonic() if now is None else now
        sticky = self._sticky.get(client_id)
        if sticky is not None and sticky[1] == port and sticky[0] in ips:
            ip = sticky[0]
            if ip not in unhealthy and not self.is_ejected(ip, port, now):
                return ip
        candidates = [
            ip for ip in sorted(ips) if ip not in unhealthy and not self.is_ejected(ip, port, now)
        ]
        if not candidates:
            return None
        key = (alias, port)
        cursor = self._next.get(key, 0)
        self._next[key] = cursor + 1
        ip = candidates[cursor % len(candidates)]
        self._sticky[client_id] = (ip, port)
        return ip

    def is_ejected(self, ip: str, port: int, now: float | None = None) -> bool:
        ejection = self._ejected.get((ip, port))
        if ejection is None:
            return False
        return ejection.until > (time.monotonic() if now is None else now)

    def eject(self, ip: str, port: int, now: float | None = None) -> float:
        """Take ``ip:port`` out of rotation; repeated failures back off longer."""
        now = time.monotonic() if now is None else now
        previous = self._ejected.get((ip, port))
        if previous is not None and previous.until > now:
            # Connects already under way when the IP died fail in the same burst:
            # one failure, not several strikes (else a restarted replica waits 30 s).
            return previous.until - now
        strikes = previous.strikes + 1 if previous else 1
        delay = min(EJECT_BASE * 2 ** (strikes - 1), EJECT_MAX)
        self._ejected[(ip, port)] = _Ejection(now + delay, strikes)
        return delay

    def restore(self, ip: str, port: int) -> None:
        """A connect succeeded, or a health probe passed: lift the ejection, forget strikes."""
        self._ejected.pop((ip, port), None)

    def forget(self, ips: Iterable[str]) -> None:
        """These IPs left their alias (or their container is gone): drop all state on them.

        A container that later gets the same address starts clean: no ejection,
        no backoff, no client stuck to it.
        """
        gone = set(ips)
        if not gone:
            return
        for key in [k for k in self._ejected if k[0] in gone]:
            del self._ejected[key]
        for client in [c for c, (ip, _port) in self._sticky.items() if ip in gone]:
            del self._sticky[client]

    def discard(self, aliases: Iterable[str]) -> None:
        """Forget the round-robin cursors of aliases no service routes to any more."""
        unused = set(aliases)
        for key in [k for k in self._next if k[0] in unused]:
            del self._next[key]

    @property
    def has_ejections(self) -> bool:
        """Whether any IP has an ejection (or its backoff) on record: else restoring is moot."""
        return bool(self._ejected)

    def knows(self, ip: str) -> bool:
        """Whether any state (ejection, backoff, a client stuck to it) is kept for ``ip``."""
        return any(k[0] == ip for k in self._ejected) or any(
            s[0] == ip for s in self._sticky.values())

    def release(self, client_id: str) -> None:
        self._sticky.pop(client_id, None)

    def ejected(self, now: float | None = None) -> list[tuple[str, int]]:
        now = time.monotonic() if now is None else now
        return [key for key, e in self._ejected.items() if e.until > now]
