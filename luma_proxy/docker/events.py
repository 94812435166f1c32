"""Docker says it first: the engine's events, read-only, when its socket is mounted.

``docker stop`` sends a ``kill`` event before the app even sees SIGTERM;
``die`` and a network ``disconnect`` follow. DNS drops the container's IP
only about 0.1 s later (and a gone IP does not refuse, it hangs), so the
proxy takes the IP out of rotation on the event itself. A ``connect``
brings a new IP: the alias is asked again at once, so the IP proves itself
(proving.py) without waiting out the DNS cache.

The socket is used for reading events and inspecting containers, nothing
else (and, at start, for rejoining networks: dockerengine.py). Without it,
nothing here runs and everything works from DNS alone.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from luma_proxy.docker.engine import SOCKET, EngineUnavailable, available, engine_client, reason_of

logger = logging.getLogger("luma_proxy.docker")

STOPPING = ("kill", "stop", "pause")  # the app may still finish what it has: no new requests
GONE = ("die", "destroy")  # nothing at that address will answer again
RECONNECT_PAUSE = 5.0  # seconds before following the events again after the stream broke


@dataclass
class Addresses:
    """What is known of each container's IPs, per network (events carry only ids)."""

    inspect: Callable[[str], Mapping[str, str]]  # container id -> {network id: IPv4}
    by_container: dict[str, dict[str, str]] = field(default_factory=dict)
    # (network id, IP) -> the container that joined with it last. The engine reuses a
    # freed address at once, and an old container's ``destroy`` (``docker rm``) can
    # come after its successor's ``connect``: that event must not retire the successor.
    owner: dict[tuple[str, str], str] = field(default_factory=dict)

    def joined(self, container: str) -> list[str]:
        """The IPs ``container`` has now (asked afresh), each now owned by it."""
        self.by_container.pop(container, None)
        known = self.of(container)
        for network, ip in known.items():
            self.owner[(network, ip)] = container
        return list(known.values())

    def left(self, container: str, networks: Mapping[str, str]) -> list[str]:
        """Of ``networks``' IPs, those still ``container``'s own (or never claimed)."""
        return [ip for network, ip in networks.items()
                if self.owner.get((network, ip), container) == container]

    def of(self, container: str) -> dict[str, str]:
        known = self.by_container.get(container)
        if known is None:
            try:
                known = dict(self.inspect(container))
            except Exception:
                known = {}
            self.by_container[container] = known
        return known


def changes(event: Mapping[str, Any], addresses: Addresses) -> list[tuple[str, str]]:
    """``("stopping" | "gone" | "joining", ip)`` for one engine event (pure but for inspecting).

    ``gone`` also covers a network ``disconnect``: a disconnected container's
    address does not refuse, its connections just hang.
    """
    kind, action = event.get("Type"), (event.get("Action") or "").split(":")[0]
    actor = event.get("Actor") or {}
    attributes = actor.get("Attributes") or {}
    if kind == "container":
        cid = actor.get("ID") or event.get("id") or ""
        if action in STOPPING or action in GONE:
            ips = addresses.left(cid, addresses.of(cid))
            if action == "destroy":
                addresses.by_container.pop(cid, None)
            return [("stopping" if action in STOPPING else "gone", ip) for ip in ips]
        if action in ("start", "unpause"):
            return [("joining", ip) for ip in addresses.joined(cid)]
        return []
    if kind == "network":
        cid, network = attributes.get("container", ""), actor.get("ID", "")
        if action == "disconnect":
            ip = addresses.of(cid).pop(network, None)
            return [("gone", ip)] if ip and addresses.left(cid, {network: ip}) else []
        if action == "connect":
            addresses.joined(cid)
            ip = addresses.of(cid).get(network)
            return [("joining", ip)] if ip else []
    return []


def container_ips(client: Any, container: str) -> dict[str, str]:
    """{network id: IPv4} of a container, from ``docker inspect``."""
    attrs = client.api.inspect_container(container)
    networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    return {n["NetworkID"]: n["IPAddress"] for n in networks.values()
            if n.get("NetworkID") and n.get("IPAddress")}


class EngineEvents:
    """Follows the engine's events in a thread; hands each change to ``report`` on the loop."""

    def __init__(self, report: Callable[[Iterable[tuple[str, str]]], None],
                 path: str = SOCKET) -> None:
        self.report = report
        self.path = path
        self._stop = threading.Event()
        self._client: Any = None
        self._thread: threading.Thread | None = None

    def start(self, call_soon: Callable[..., Any]) -> bool:
        """Start following (``call_soon``: the loop's ``call_soon_threadsafe``)."""
        if not available(self.path):
            return False
        self._call_soon = call_soon
        self._thread = threading.Thread(target=self._follow, name="luma docker events",
                                        daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        self._stop.set()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()  # ends the blocking read of the event stream

    def _follow(self) -> None:
        said = None
        while not self._stop.is_set():
            try:
                self._client = client = engine_client(self.path)
                addresses = Addresses(functools.partial(container_ips, client))
                stream = client.events(decode=True, filters={"type": ["container", "network"]})
                logger.info("docker: following the engine's events")
                said = None
                for event in stream:
                    found = changes(event, addresses)
                    if found:
                        self._call_soon(self.report, found)
                    if self._stop.is_set():
                        break
            except EngineUnavailable as e:
                reason = str(e)
            except Exception as e:
                reason = reason_of(e)
            else:
                reason = "the event stream ended"
            if self._stop.is_set():
                return
            if reason != said:
                logger.warning("docker: not following events (%s); DNS alone until it "
                               "works again", reason)
                said = reason
            time.sleep(RECONNECT_PAUSE)
