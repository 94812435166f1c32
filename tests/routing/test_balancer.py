"""Unit tests for luma_proxy.routing.balancer: round-robin, stickiness, passive ejection."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import pytest

from luma_proxy.routing.balancer import EJECT_BASE, EJECT_MAX, Balancer

IPS = ("10.0.0.1", "10.0.0.2", "10.0.0.3")
T0 = 1000.0


def test_round_robin_spreads_new_clients_evenly() -> None:
    b = Balancer()
    picks = [b.pick("blog", 3000, IPS, f"client-{i}", now=T0) for i in range(30)]
    assert Counter(picks) == {ip: 10 for ip in IPS}
    # Consecutive new clients never land on the same IP.
    assert all(a != c for a, c in pairwise(picks))


def test_round_robin_ignores_answer_order() -> None:
    """Docker shuffles its answers; the rotation must not depend on that order."""
    b = Balancer()
    orders = [IPS, IPS[::-1], (IPS[1], IPS[2], IPS[0])]
    picks = [b.pick("blog", 3000, orders[i % 3], f"c{i}", now=T0) for i in range(30)]
    assert Counter(picks) == {ip: 10 for ip in IPS}


def test_cursor_is_per_alias_and_port() -> None:
    b = Balancer()
    first = b.pick("blog", 3000, IPS, "a", now=T0)
    assert b.pick("shop", 3000, IPS, "b", now=T0) == first
    assert b.pick("blog", 4000, IPS, "c", now=T0) == first
    assert b.pick("blog", 3000, IPS, "d", now=T0) != first


def test_client_sticks_while_ip_is_in_answer() -> None:
    b = Balancer()
    ip = b.pick("blog", 3000, IPS, "client", now=T0)
    for i in range(20):
        b.pick("blog", 3000, IPS, f"other-{i}", now=T0)  # move the cursor on
        shuffled = IPS[i % 3 :] + IPS[: i % 3]
        assert b.pick("blog", 3000, shuffled, "client", now=T0) == ip


def test_client_moves_when_ip_leaves_answer() -> None:
    b = Balancer()
    ip = b.pick("blog", 3000, IPS, "client", now=T0)
    remaining = tuple(x for x in IPS if x != ip)
    new_ip = b.pick("blog", 3000, remaining, "client", now=T0)
    assert new_ip in remaining
    # ... and sticks to the new one, even once the old IP is back.
    assert b.pick("blog", 3000, IPS, "client", now=T0) == new_ip


def test_stickiness_is_per_port() -> None:
    b = Balancer()
    b.pick("blog", 3000, IPS, "someone-else", now=T0)
    on_3000 = b.pick("blog", 3000, IPS, "client", now=T0)
    assert on_3000 == IPS[1]
    # Another port is another upstream: a fresh round-robin choice, not the 3000 one ...
    on_4000 = b.pick("blog", 4000, IPS, "client", now=T0)
    assert on_4000 == IPS[0]
    # ... which then sticks.
    assert {b.pick("blog", 4000, IPS, "client", now=T0) for _ in range(5)} == {on_4000}


def test_skips_unhealthy_ips() -> None:
    b = Balancer()
    sick = {"10.0.0.2"}
    picks = {b.pick("blog", 3000, IPS, f"c{i}", unhealthy=sick, now=T0) for i in range(12)}
    assert picks == {"10.0.0.1", "10.0.0.3"}


def test_sticky_client_leaves_an_ip_that_turns_unhealthy() -> None:
    b = Balancer()
    ip = b.pick("blog", 3000, IPS, "client", now=T0)
    moved = b.pick("blog", 3000, IPS, "client", unhealthy={ip}, now=T0)
    assert moved is not None and moved != ip


def test_skips_ejected_ips_and_sticky_client_moves() -> None:
    b = Balancer()
    ip = b.pick("blog", 3000, IPS, "client", now=T0)
    assert b.eject(ip, 3000, now=T0) == EJECT_BASE
    assert b.is_ejected(ip, 3000, now=T0)
    assert not b.is_ejected(ip, 4000, now=T0)  # ejection is per ip:port
    moved = b.pick("blog", 3000, IPS, "client", now=T0)
    assert moved != ip
    picks = {b.pick("blog", 3000, IPS, f"c{i}", now=T0 + 1) for i in range(12)}
    assert ip not in picks and len(picks) == 2
    assert b.ejected(now=T0 + 1) == [(ip, 3000)]


def test_ejection_expires() -> None:
    b = Balancer()
    b.eject("10.0.0.1", 3000, now=T0)
    assert b.is_ejected("10.0.0.1", 3000, now=T0 + EJECT_BASE - 0.01)
    assert not b.is_ejected("10.0.0.1", 3000, now=T0 + EJECT_BASE)
    assert b.ejected(now=T0 + EJECT_BASE) == []
    only = ("10.0.0.1",)
    assert b.pick("blog", 3000, only, "c", now=T0 + 1) is None
    assert b.pick("blog", 3000, only, "c", now=T0 + EJECT_BASE + 0.01) == "10.0.0.1"


def test_ejection_backoff_grows_and_is_capped() -> None:
    b = Balancer()
    delays, t = [], T0
    for _ in range(8):  # each failure comes when the previous ejection has run out
        delay = b.eject("10.0.0.1", 3000, now=t)
        delays.append(delay)
        t += delay
    assert delays[:4] == [EJECT_BASE, 2 * EJECT_BASE, 4 * EJECT_BASE, 8 * EJECT_BASE]
    assert delays == sorted(delays)
    assert delays[-1] == EJECT_MAX
    last = t - delays[-1]
    assert b.is_ejected("10.0.0.1", 3000, now=last + EJECT_MAX - 0.01)
    assert not b.is_ejected("10.0.0.1", 3000, now=last + EJECT_MAX)


def test_a_burst_of_failures_is_one_strike() -> None:
    """Connects under way when an IP dies all fail at once: that is one failure."""
    b = Balancer()
    burst = [b.eject("10.0.0.1", 3000, now=T0 + i * 0.001) for i in range(5)]
    assert burst[0] == EJECT_BASE
    assert all(d <= EJECT_BASE for d in burst)
    assert not b.is_ejected("10.0.0.1", 3000, now=T0 + EJECT_BASE)
    # The next failure after the ejection ran out is the second strike.
    assert b.eject("10.0.0.1", 3000, now=T0 + EJECT_BASE) == 2 * EJECT_BASE


def test_restore_resets_strikes() -> None:
    b = Balancer()
    for i in range(4):
        b.eject("10.0.0.1", 3000, now=T0 + i)
    b.restore("10.0.0.1", 3000)
    assert not b.is_ejected("10.0.0.1", 3000, now=T0 + 4)
    assert b.eject("10.0.0.1", 3000, now=T0 + 5) == EJECT_BASE
    b.restore("10.9.9.9", 1)  # unknown: no error


def test_none_when_nothing_is_eligible() -> None:
    b = Balancer()
    assert b.pick("blog", 3000, (), "c", now=T0) is None
    assert b.pick("blog", 3000, IPS, "c", unhealthy=set(IPS), now=T0) is None
    b.eject("10.0.0.1", 3000, now=T0)
    b.eject("10.0.0.2", 3000, now=T0)
    assert b.pick("blog", 3000, IPS, "c", unhealthy={"10.0.0.3"}, now=T0) is None
    assert b.pick("blog", 3000, IPS, "c", now=T0) == "10.0.0.3"


def test_release_forgets_client() -> None:
    b = Balancer()
    ip = b.pick("blog", 3000, IPS, "client", now=T0)
    assert b.pick("blog", 3000, IPS, "client", now=T0) == ip
    b.release("client")
    # Forgotten: the next pick is a fresh round-robin choice, i.e. the next IP.
    assert b.pick("blog", 3000, IPS, "client", now=T0) != ip
    b.release("never-seen")  # no error


@pytest.mark.parametrize("n", [1, 2, 5])
def test_every_ip_gets_used(n: int) -> None:
    b = Balancer()
    ips = tuple(f"10.0.1.{i}" for i in range(n))
    assert {b.pick("a", 80, ips, f"c{i}", now=T0) for i in range(n)} == set(ips)


def test_default_now_uses_monotonic_clock() -> None:
    b = Balancer()
    b.eject("10.0.0.1", 3000)
    assert b.is_ejected("10.0.0.1", 3000)
    assert b.pick("blog", 3000, ("10.0.0.1",), "c") is None


def test_forget_drops_ejection_backoff_and_clients_of_a_departed_ip() -> None:
    """Docker reuses a freed address: the next container there must start clean."""
    b = Balancer()
    ip = "10.0.0.1"
    for i in range(4):  # a dead container's strikes: the backoff has grown
        b.eject(ip, 3000, now=T0 + i * EJECT_MAX)
    b.pick("blog", 8080, (ip,), "client", now=T0)
    assert b.knows(ip) and b.is_ejected(ip, 3000, now=T0 + 3 * EJECT_MAX)
    b.eject("10.0.0.2", 3000, now=T0)
    b.forget([ip])
    assert not b.knows(ip)
    assert not b.is_ejected(ip, 3000, now=T0 + 3 * EJECT_MAX)
    assert b.eject(ip, 3000, now=T0 + 4 * EJECT_MAX) == EJECT_BASE  # first strike again
    assert b.is_ejected("10.0.0.2", 3000, now=T0)  # others untouched
    b.forget([])  # nothing: no error


def test_discard_forgets_round_robin_of_unused_aliases() -> None:
    b = Balancer()
    assert b.pick("blog", 3000, IPS, "c1", now=T0) == IPS[0]
    assert b.pick("blog", 3000, IPS, "c2", now=T0) == IPS[1]
    b.discard(["blog"])
    assert b.pick("blog", 3000, IPS, "c3", now=T0) == IPS[0]  # starts over
