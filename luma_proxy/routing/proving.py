"""A container IP proves itself (one passing health probe) before it gets traffic.

The Luma CLI starts new containers *with* the live alias, so Docker's DNS
hands out their IPs while their app is still booting; an IP that comes back
after a disconnect/connect may be another container now. So an IP that
appears in an alias's answer is probed at once and gets requests only after
the probe passes; the IPs already proven keep serving meanwhile. An IP that
leaves the answer, fails a connect, or is reported unhealthy is forgotten and
must prove itself again. When no IP of an alias is proven, requests wait
(``hold``) until one is, or until the hold timeout. A target given as an IP
(no alias) has nothing to prove: no DNS answer can change under it.

Each process proves IPs on its own (a probe costs one small request), so no
worker waits for the health leader's next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from luma_proxy.models import Health
from luma_proxy.routing.resolver import ip_literal

PROBE_SPACING = 0.25  # seconds between two probes of one IP that keeps failing

Probe = Callable[[str, int, str, str], Awaitable[bool]]  # (ip, port, host, path) -> passed


@dataclass(slots=True)
class _Alias:
    answer: frozenset[str] = frozenset()
    proven: set[str] = field(default_factory=set)
    last_ips: tuple[str, ...] | None = None  # the answer object the cache below is for
    usable: tuple[str, ...] = ()
    changed: asyncio.Event | None = None  # set when an IP of this alias is proven
    literal: bool = False  # the target is an IP: no DNS churn, nothing to prove
    probing: int = 0  # probes under way


class Prover:
    """Which IPs of each ``(alias, port)`` may take requests; probes the others."""

    def __init__(self, probe: Probe, departed: Callable[[str], None] | None = None) -> None:
        self.probe = probe
        self.departed = departed  # called with each IP that leaves an alias's answer
        self._aliases: dict[tuple[str, int], _Alias] = {}
        # By (alias, ip, port): a probe asks for the alias's Host, so two aliases of one
        # container (a per-colour alias beside the service's) are each proven at once.
        self._probing: dict[tuple[str, str, int], asyncio.Task[None]] = {}
        self._last_probe: dict[tuple[str, str, int], float] = {}
        # IPs whose container the engine says is stopping or gone (dockerevents.py):
        # no requests, no probes, until they leave the answer or a container joins on them.
        self._retired: set[str] = set()

    def usable(self, alias: str, port: int, ips: tuple[str, ...], health_path: str,
               health: Health | None = None) -> tuple[str, ...]:
        """The proven IPs of ``ips`` (hot path); the unproven ones get a probe started.

        Cheap when nothing moved: the resolver hands out the same tuple while
        its answer is cached, and the result is kept for that tuple. The first
        time an alias is seen (a restart), the IPs its health in force says
        passed count as proven, so a restarted proxy serves at once.
        """
        state = self._aliases.get((alias, port))
        if state is None:
            state = self._state(alias, port)
            state.answer = frozenset(ips)
            if health is not None:
                state.proven = {ip for ip, ok in health.containers.items()
                                if ok and ip in state.answer}
        if state.literal:
            return ips
        if ips is state.last_ips and len(state.usable) == len(ips):
            return state.usable
        answer = frozenset(ips)
        if answer != state.answer:
            state.proven &= answer  # gone means gone: an IP that comes back starts clean
            gone = state.answer - answer
            if self._retired:
                self._retired -= gone
            for ip in gone:  # a container given this address next is probed at once
                self._last_probe.pop((alias, ip, port), None)
            state.answer = answer
            if self.departed is not None:
                for ip in gone:
                    self.departed(ip)
        for ip in ips:
            if ip not in state.proven and ip not in self._retired:
                self._start_probe(alias, ip, port, health_path)
        state.last_ips = ips
        state.usable = tuple(ip for ip in ips if ip in state.proven)
        return state.usable

    def _state(self, alias: str, port: int) -> _Alias:
        state = self._aliases.get((alias, port))
        if state is None:
            state = self._aliases[(alias, port)] = _Alias(literal=ip_literal(alias) is not None)
        return state

    def _start_probe(self, alias: str, ip: str, port: int, path: str) -> None:
        target = (alias, ip, port)
        if target in self._probing:
            return
        now = time.monotonic()
        if now - self._last_probe.get(target, -PROBE_SPACING) < PROBE_SPACING:
            return
        self._last_probe[target] = now
        try:
            task = asyncio.ensure_future(self._prove(alias, ip, port, path))
        except RuntimeError:  # no running loop (a synchronous caller): probe on next use
            return
        self._state(alias, port).probing += 1
        self._probing[target] = task
        task.add_done_callback(lambda _t: self._probing.pop(target, None))

    async def _prove(self, alias: str, ip: str, port: int, path: str) -> None:
        passed = False
        try:
            passed = await self.probe(ip, port, f"{alias}:{port}", path)
        finally:
            state = self._aliases.get((alias, port))
            if state is not None:
                state.probing -= 1
                if passed and ip in state.answer and ip not in self._retired:
                    state.proven.add(ip)
                    state.last_ips = None
                # Held requests wake once the alias's probes are all in (a few ms when
                # the apps are up), so they spread over every new container, not
                # pile onto the first one proven; they also look again every 0.2 s.
                if state.probing == 0 and state.proven and state.changed is not None:
                    state.changed.set()
                    state.changed = None

    def forget(self, ip: str, port: int | None = None) -> None:
        """``ip`` failed (a connect, a health check): it must prove itself again."""
        for (_alias, p), state in self._aliases.items():
            if (port is None or p == port) and ip in state.proven:
                state.proven.discard(ip)
                state.last_ips = None

    def retire(self, ip: str) -> None:
        """The engine says ``ip``'s container is stopping or gone: no new requests."""
        self.forget(ip)
        self._retired.add(ip)

    def unretire(self, ip: str) -> None:
        """A container joined a network with ``ip`` (Docker reuses addresses)."""
        self._retired.discard(ip)

    def is_retired(self, ip: str) -> bool:
        return ip in self._retired

    async def wait(self, alias: str, port: int, timeout: float) -> None:
        """Until an IP of ``alias`` is proven, or ``timeout`` (the caller looks again)."""
        state = self._state(alias, port)
        if state.changed is None:
            state.changed = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.changed.wait(), timeout)

    def discard(self, aliases: Iterable[str]) -> set[str]:
        """Forget aliases no service routes to any more (bounded state).

        Returns the IPs that were in their answers and are in no other alias's,
        so the caller can drop its own state on them.
        """
        gone = set(aliases)
        dropped: set[str] = set()
        for key in [k for k in self._aliases if k[0] in gone]:
            dropped |= self._aliases.pop(key).answer
        live = {ip for state in self._aliases.values() for ip in state.answer}
        for target in [t for t in self._last_probe if t[0] in gone or t[1] not in live]:
            del self._last_probe[target]
        return dropped - live

    def close(self) -> None:
        for task in list(self._probing.values()):
            task.cancel()
        self._probing.clear()
