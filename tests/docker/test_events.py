"""dockerevents.py: which IPs an engine event takes out of rotation or brings in.

Events are shaped as the engine's /events stream sends them (Docker API 1.41).
"""

from __future__ import annotations

from luma_proxy.docker.events import Addresses, EngineEvents, changes
from luma_proxy.routing.proving import PROBE_SPACING, Prover

NET = "n" * 64


def container_event(action: str, cid: str = "c1") -> dict:
    return {"Type": "container", "Action": action, "Actor": {"ID": cid, "Attributes": {}}}


def network_event(action: str, cid: str = "c1") -> dict:
    return {"Type": "network", "Action": action,
            "Actor": {"ID": NET, "Attributes": {"container": cid, "name": "proj-network"}}}


def test_docker_stop_takes_the_ip_out_at_the_kill_before_dns_does() -> None:
    inspected: list[str] = []

    def inspect(cid: str) -> dict[str, str]:
        inspected.append(cid)
        return {NET: "10.213.0.5"}

    known = Addresses(inspect)
    # docker stop: kill (signal 15), then die, stop, network disconnect, destroy (rm).
    assert changes(container_event("kill"), known) == [("stopping", "10.213.0.5")]
    assert changes(container_event("die"), known) == [("gone", "10.213.0.5")]
    assert changes(network_event("disconnect"), known) == [("gone", "10.213.0.5")]
    assert changes(container_event("destroy"), known) == []
    assert inspected == ["c1"]  # asked once; after that the cache answers


def test_an_old_containers_late_events_never_retire_the_one_reusing_its_ip() -> None:
    """The engine hands a freed address to the next container at once; the old one's
    ``destroy`` (``docker rm``) or ``disconnect`` may come after the new one joined."""
    ips = {"old": {NET: "10.213.0.5"}, "new": {NET: "10.213.0.5"}}
    known = Addresses(lambda cid: ips[cid])
    assert changes(network_event("connect", "old"), known) == [("joining", "10.213.0.5")]
    assert changes(container_event("die", "old"), known) == [("gone", "10.213.0.5")]
    assert changes(network_event("connect", "new"), known) == [("joining", "10.213.0.5")]
    # before: ("gone", "10.213.0.5") for each, retiring the new container
    assert changes(network_event("disconnect", "old"), known) == []
    assert changes(container_event("destroy", "old"), known) == []
    assert changes(container_event("kill", "new"), known) == [("stopping", "10.213.0.5")]


def test_a_container_joining_a_network_is_announced() -> None:
    known = Addresses(lambda cid: {NET: "10.213.0.9"})
    assert changes(network_event("connect", "c2"), known) == [("joining", "10.213.0.9")]
    assert changes(container_event("exec_start: sh -c curl", "c2"), known) == []
    assert changes({"Type": "image", "Action": "pull"}, known) == []


def test_an_inspect_that_fails_gives_nothing_rather_than_an_error() -> None:
    def inspect(cid: str) -> dict[str, str]:
        raise RuntimeError("no such container")

    assert changes(container_event("kill"), Addresses(inspect)) == []


def test_without_the_socket_nothing_is_followed(tmp_path) -> None:
    events = EngineEvents(lambda found: None, path=str(tmp_path / "docker.sock"))
    assert events.start(lambda *a: None) is False
    events.stop()


async def test_a_retired_ip_gets_no_requests_until_it_leaves_the_answer() -> None:
    async def passes(ip: str, port: int, host: str, path: str) -> bool:
        return True

    import asyncio

    p = Prover(passes)
    ips = ("10.213.0.5", "10.213.0.6")
    p.usable("web", 3000, ips, "/up")
    await asyncio.sleep(0.01)
    assert p.usable("web", 3000, ips, "/up") == ips
    p.retire("10.213.0.5")  # the kill event of `docker stop`
    await asyncio.sleep(0.01)
    assert p.usable("web", 3000, ips, "/up") == ("10.213.0.6",)  # still in DNS, not used
    p.usable("web", 3000, ("10.213.0.6",), "/up")  # DNS drops it ...
    await asyncio.sleep(PROBE_SPACING)
    p.usable("web", 3000, ips, "/up")  # ... and a new container gets the address
    await asyncio.sleep(0.01)
    assert p.usable("web", 3000, ips, "/up") == ips  # proven again, as a new one
