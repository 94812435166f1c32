"""What the proxy asks the Docker engine, when its socket is mounted.

The Luma CLI mounts ``/var/run/docker.sock`` into the proxy container. The
proxy uses it for one job here: to stay on the networks its routes need.
``luma proxy update`` re-creates the container with a plain ``docker run``
(no ``--network``), which leaves it on no project network, so every alias
would fail to resolve until the next ``luma setup``. So ``deploy`` records
the networks on which the target's alias lives, and ``run`` reconnects its
own container to them at start.

Blocking calls (the ``docker`` library is synchronous): call from a thread.
Without the socket every function says so instead of failing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger("luma_proxy.docker")

SOCKET = os.environ.get("LUMA_PROXY_DOCKER_SOCKET", "/var/run/docker.sock")
TIMEOUT = 5.0


class EngineUnavailable(Exception):
    """No socket, no permission, or not inside a container the engine knows."""


def available(path: str = SOCKET) -> bool:
    return os.path.exists(path)


def engine_client(path: str = SOCKET) -> Any:
    if not available(path):
        raise EngineUnavailable(f"docker socket {path} is not mounted")
    import docker  # ~0.2 s: only when the socket is there

    try:
        client = docker.DockerClient(base_url=f"unix://{path}", timeout=TIMEOUT)
        client.ping()
    except Exception as e:
        raise EngineUnavailable(f"docker socket {path}: {reason_of(e)}") from None
    return client


def reason_of(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "Permission denied" in text:
        return "permission denied"
    return text[:200]


def _own_container(client: Any) -> Any:
    """This process's container: Docker sets the hostname to the container's short id."""
    try:
        return client.containers.get(socket.gethostname())
    except Exception as e:
        raise EngineUnavailable(f"this process is not in a container the engine knows "
                                f"({reason_of(e)})") from None


def alias_networks(alias: str, path: str = SOCKET) -> list[str]:
    """The networks of this container on which some container answers to ``alias``."""
    client = engine_client(path)
    own = _own_container(client)
    out = []
    for name in own.attrs["NetworkSettings"]["Networks"]:
        try:
            network = client.networks.get(name)
        except Exception:
            continue
        for cid in network.attrs.get("Containers") or {}:
            try:
                other = client.containers.get(cid)
            except Exception:
                continue
            settings = other.attrs["NetworkSettings"]["Networks"].get(name) or {}
            if alias in (settings.get("Aliases") or []) or other.name == alias:
                out.append(name)
                break
    return sorted(out)


def join(networks: Iterable[str], path: str = SOCKET) -> tuple[list[str], list[str]]:
    """Connect this container to each network it is not on; (joined, failed) names."""
    client = engine_client(path)
    own = _own_container(client)
    current = set(own.attrs["NetworkSettings"]["Networks"])
    joined, failed = [], []
    for name in sorted(set(networks) - current):
        try:
            client.networks.get(name).connect(own.id)
        except Exception as e:
            logger.error("docker: cannot join network %s: %s", name, reason_of(e))
            failed.append(name)
        else:
            joined.append(name)
    return joined, failed


def rejoin_route_networks(networks: set[str], path: str = SOCKET) -> None:
    """At start: be back on every network a route was deployed on (one log line each way)."""
    if not networks:
        return
    try:
        joined, _failed = join(networks, path)
    except EngineUnavailable as e:
        logger.warning("docker: %s; cannot rejoin the networks routes need (%s): connect them "
                       "with `docker network connect NETWORK <this container>`",
                       e, ", ".join(sorted(networks)))
        return
    if joined:
        logger.info("docker: rejoined network(s) %s", ", ".join(joined))


def rejoin_networks(state_path: str, path: str = SOCKET) -> None:
    """``run``'s start: rejoin the recorded networks, or say in one line why it cannot.

    The registry is read only when there is an engine to ask, or the image has none.
    """
    mounted = available(path)
    if not mounted and os.environ.get("LUMA_PROXY_IMAGE") != "1":
        return
    from luma_proxy.store.registry import RegistryError, Store

    try:
        networks = Store(state_path, create=False).networks()
    except RegistryError:
        return  # the proxy itself says why the state cannot be read
    if mounted:
        rejoin_route_networks(networks, path)
    else:
        logger.warning("docker: socket %s not mounted: after a re-create this container cannot "
                       "rejoin the networks its routes need%s (mount it, or run "
                       "`docker network connect NETWORK luma-proxy`)", path,
                       f" ({', '.join(sorted(networks))})" if networks else "")
