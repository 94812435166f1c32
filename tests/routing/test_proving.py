"""proving.py: an IP gets traffic only after a probe of it passed; gone means gone."""

from __future__ import annotations

import asyncio

from luma_proxy.routing.proving import PROBE_SPACING, Prover


class Probes:
    """The probe the prover calls: records calls, answers from ``passing``."""

    def __init__(self, passing: set[str]) -> None:
        self.passing = passing
        self.calls: list[str] = []

    async def __call__(self, ip: str, port: int, host: str, path: str) -> bool:
        self.calls.append(ip)
        assert host.endswith(f":{port}") and path == "/up"
        return ip in self.passing


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_new_ip_waits_for_its_probe_while_proven_ones_serve() -> None:
    probes = Probes({"10.0.0.1"})
    p = Prover(probes)
    assert p.usable("blog", 3000, ("10.0.0.1",), "/up") == ()  # first sight: probing
    await settle()
    assert p.usable("blog", 3000, ("10.0.0.1",), "/up") == ("10.0.0.1",)
    # A second container joins the alias, its app still booting: not used yet.
    both = ("10.0.0.2", "10.0.0.1")
    assert p.usable("blog", 3000, both, "/up") == ("10.0.0.1",)
    await settle()
    assert p.usable("blog", 3000, both, "/up") == ("10.0.0.1",)  # its probe failed
    probes.passing.add("10.0.0.2")
    await asyncio.sleep(PROBE_SPACING)
    p.usable("blog", 3000, both, "/up")  # asked again: probed again (spaced)
    await settle()
    assert p.usable("blog", 3000, both, "/up") == both


async def test_an_ip_that_leaves_the_answer_starts_clean_when_it_comes_back() -> None:
    probes = Probes({"10.0.0.1", "10.0.0.2"})
    p = Prover(probes)
    p.usable("blog", 3000, ("10.0.0.1", "10.0.0.2"), "/up")
    await settle()
    assert p.usable("blog", 3000, ("10.0.0.1", "10.0.0.2"), "/up") == ("10.0.0.1", "10.0.0.2")
    p.usable("blog", 3000, ("10.0.0.1",), "/up")  # 10.0.0.2 left (a container stopped)
    probes.passing.discard("10.0.0.2")  # ... and the address went to a booting one
    await asyncio.sleep(PROBE_SPACING)
    assert p.usable("blog", 3000, ("10.0.0.1", "10.0.0.2"), "/up") == ("10.0.0.1",)
    await settle()
    assert p.usable("blog", 3000, ("10.0.0.1", "10.0.0.2"), "/up") == ("10.0.0.1",)


async def test_a_failed_ip_is_forgotten_and_a_passing_probe_brings_it_back() -> None:
    probes = Probes({"10.0.0.1"})
    p = Prover(probes)
    p.usable("blog", 3000, ("10.0.0.1",), "/up")
    await settle()
    p.forget("10.0.0.1", 3000)  # a refused connect, a failed health round
    await asyncio.sleep(PROBE_SPACING)
    assert p.usable("blog", 3000, ("10.0.0.1",), "/up") == ()
    await settle()
    assert p.usable("blog", 3000, ("10.0.0.1",), "/up") == ("10.0.0.1",)


async def test_probes_of_a_failing_ip_are_spaced() -> None:
    probes = Probes(set())
    p = Prover(probes)
    for _ in range(50):
        p.usable("blog", 3000, ("10.0.0.9",), "/up")
        await settle()
    assert probes.calls == ["10.0.0.9"]


async def test_wait_wakes_when_an_ip_is_proven() -> None:
    probes = Probes({"10.0.0.1"})
    p = Prover(probes)
    waiter = asyncio.ensure_future(p.wait("blog", 3000, 5))
    await settle()
    assert not waiter.done()
    p.usable("blog", 3000, ("10.0.0.1",), "/up")
    await asyncio.wait_for(waiter, 1)


async def test_an_ip_target_has_nothing_to_prove() -> None:
    probes = Probes(set())
    p = Prover(probes)
    assert p.usable("127.0.0.9", 3000, ("127.0.0.9",), "/up") == ("127.0.0.9",)
    assert probes.calls == []


async def test_discarded_aliases_leave_no_state_behind() -> None:
    probes = Probes({"10.0.0.1"})
    p = Prover(probes)
    p.usable("blog", 3000, ("10.0.0.1",), "/up")
    await settle()
    p.discard(["blog"])
    assert p.usable("blog", 3000, ("10.0.0.1",), "/up") == ()  # must prove itself again


async def test_at_first_sight_the_ips_the_health_in_force_passed_are_proven() -> None:
    from luma_proxy.models import Health

    probes = Probes(set())
    p = Prover(probes)
    stored = Health(healthy=True, containers={"10.0.0.1": True, "10.0.0.2": False})
    ips = ("10.0.0.1", "10.0.0.2")
    assert p.usable("blog", 3000, ips, "/up", stored) == ("10.0.0.1",)  # a restart: at once
    p.usable("blog", 3000, ("10.0.0.2",), "/up", stored)  # 10.0.0.1 left ...
    assert p.usable("blog", 3000, ips, "/up", stored) == ()  # ... and came back: clean


async def test_an_ip_that_left_is_probed_at_once_when_it_comes_back() -> None:
    """A container given a departed IP's address is probed at once, not after the spacing."""
    probes = Probes(set())
    p = Prover(probes)
    p.usable("blog", 3000, ("10.0.0.1", "10.0.0.2"), "/up")
    await settle()
    assert probes.calls.count("10.0.0.2") == 1  # failed: the old container is stopping
    p.usable("blog", 3000, ("10.0.0.1",), "/up")  # it left the answer
    probes.passing.add("10.0.0.2")  # ... and a new container got the address
    p.usable("blog", 3000, ("10.0.0.1", "10.0.0.2"), "/up")
    await settle()
    assert probes.calls.count("10.0.0.2") == 2
    assert p.usable("blog", 3000, ("10.0.0.1", "10.0.0.2"), "/up") == ("10.0.0.2",)


async def test_discard_names_the_ips_no_alias_answers_any_more() -> None:
    p = Prover(Probes(set()))
    p.usable("blog", 3000, ("10.0.0.1", "10.0.0.2"), "/up")
    p.usable("shop", 3000, ("10.0.0.2",), "/up")
    await settle()
    assert p.discard(["blog"]) == {"10.0.0.1"}  # 10.0.0.2 still serves shop
    assert p.discard(["nothing"]) == set()


async def test_two_aliases_of_one_container_are_each_proven_at_once() -> None:
    # A container carrying the service's alias and a per-colour one (the Luma CLI's
    # deploy): a probe of one alias must neither stand in for nor delay the other's.
    probes = Probes({"10.0.0.1"})
    p = Prover(probes)
    assert p.usable("blog", 3000, ("10.0.0.1",), "/up") == ()
    assert p.usable("blog-green", 3000, ("10.0.0.1",), "/up") == ()
    await settle()
    assert probes.calls == ["10.0.0.1", "10.0.0.1"]  # one each, neither spaced out
    assert p.usable("blog", 3000, ("10.0.0.1",), "/up") == ("10.0.0.1",)
    assert p.usable("blog-green", 3000, ("10.0.0.1",), "/up") == ("10.0.0.1",)
