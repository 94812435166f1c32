"""Deploy flows on a real engine, shared by tests/docker and benchmarks/docker_bluegreen.py.

``Bed`` runs the proxy image exactly as the Luma CLI does (``../shared/luma-cli/
CONTRACT.md`` section 1: host-owned bind mounts on certs/ and /tmp, the docker
socket), except that the ports are published on 127.0.0.1 only. Each scenario
returns the ``Load`` it ran under, so a caller prints or asserts its counts.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.docker.engine import Engine
from tests.docker.load import Load
from tests.e2e.docker_double import free_port

APP_PORT = 3000
HOST = "blog.example.test"
PROJECT = "proj"
APP = "web"
HOST_UID = 1000  # the Luma CLI's SSH user owns ./.luma/*


@dataclass
class Bed:
    engine: Engine
    images: dict[str, str]
    tag: str = "bed"
    replicas: int = 2
    home: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="luma-home-")))
    http_port: int = field(default_factory=free_port)
    https_port: int = field(default_factory=free_port)
    network: str = ""
    bridge: str = ""
    colour: str = "blue"
    generation: int = 0
    apps: list[str] = field(default_factory=list)
    proxy_cmd: list[str] = field(default_factory=list)  # instead of the image's CMD

    @property
    def proxy(self) -> str:
        return self.engine.name(f"{self.tag}-luma-proxy")

    @property
    def socket_path(self) -> str:
        return self.engine.host.removeprefix("unix://")

    # ------------------------------------------------------------ the proxy
    def run_proxy_args(self) -> list[str]:
        """The Luma CLI's ``docker run`` (ports on loopback only)."""
        # --network: the bed's engine has no default bridge (it keeps containers inside
        # the machine); this network plays docker0, where the Luma CLI's run lands.
        # The one change to the CLI's command: ACME orders (the CLI deploys --ssl) go to
        # a closed port on the container's loopback, never to Let's Encrypt.
        return ["run", "-d", "--name", self.proxy, "--restart", "always",
                "-e", "LUMA_PROXY_ACME_DIRECTORY=https://127.0.0.1:9/directory",
                "--network", self.bridge,
                "-p", f"127.0.0.1:{self.http_port}:80", "-p", f"127.0.0.1:{self.https_port}:443",
                "-v", f"{self.home}/.luma/luma-proxy-certs:/var/lib/luma-proxy/certs",
                "-v", f"{self.home}/.luma/luma-proxy-config:/tmp",
                "-v", f"{self.socket_path}:/var/run/docker.sock",
                self.images["proxy"], *self.proxy_cmd]

    def setup(self) -> Bed:
        """``luma setup``: the host dirs (owned by the SSH user), the network, the proxy."""
        for d in ("luma-proxy-certs", "luma-proxy-config"):
            path = self.home / ".luma" / d
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, HOST_UID, HOST_UID)
        os.chmod(self.home, 0o755)
        self.bridge = self.engine.network(f"{self.tag}-bridge")
        self.network = self.engine.network(f"{self.tag}-{PROJECT}-network")
        self.engine.docker(*self.run_proxy_args())
        self.engine.docker("network", "connect", self.network, self.proxy)
        self.wait_serving()
        return self

    def wait_serving(self, timeout: float = 60) -> float:
        """Seconds until the proxy answers HTTP on its published port."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                with socket.create_connection(("127.0.0.1", self.http_port), timeout=1) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x.invalid\r\nConnection: close\r\n\r\n")
                    if s.recv(12).startswith(b"HTTP/1.1"):
                        return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.1)
        logs = self.engine.docker("logs", "--tail", "30", self.proxy, check=False)
        raise AssertionError(f"the proxy did not serve within {timeout}s:\n{logs.stdout}"
                             f"{logs.stderr}")

    def exec(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """``docker exec luma-proxy /usr/local/bin/luma-proxy ...``"""
        return self.engine.docker("exec", self.proxy, "/usr/local/bin/luma-proxy", *args,
                                  check=check)

    def deploy(self, target: str = f"{PROJECT}-{APP}:{APP_PORT}") -> None:
        for args in (("deploy", "--host", HOST, "--target", target, "--project", PROJECT,
                      "--health-path", "/up", "--ssl"),
                     ("updatehealth", "--host", HOST, "--healthy", "true")):
            result = self.exec(*args)
            assert result.returncode == 0 and result.stderr == "", result.stderr

    def recreate(self) -> None:
        """``luma proxy update``: stop, rm, the same ``docker run`` (and no network connect)."""
        self.engine.docker("rm", "-f", self.proxy)
        self.engine.docker(*self.run_proxy_args())

    # ------------------------------------------------------------ apps
    def start_app(self, aliases: list[str]) -> str:
        self.generation += 1
        name = self.engine.name(f"{self.tag}-{PROJECT}-{APP}-{self.colour}-{self.generation}")
        alias_args = [a for alias in aliases for a in ("--network-alias", alias)]
        self.engine.docker("run", "-d", "--name", name, "--network", self.network, *alias_args,
                           "--restart", "unless-stopped", self.images["app"],
                           "--name", name, "--port", str(APP_PORT))
        self.apps.append(name)
        return name

    def luma_health_check(self, alias: str, tries: int = 30) -> bool:
        """The Luma CLI's own gate: curl inside the proxy container, until exactly 200."""
        command = ("command -v curl >/dev/null 2>&1 || exit 9; curl -s -o /dev/null -w "
                   f"'%{{http_code}}' --connect-timeout 3 --max-time 5 http://{alias}:{APP_PORT}/up"
                   " || echo 'failed'")
        for _ in range(tries):
            out = self.engine.docker("exec", self.proxy, "sh", "-c", command, check=False)
            if out.stdout.strip() == "200":
                return True
            time.sleep(1)
        return False

    def stop_app(self, name: str, how: str = "stop") -> None:
        if how == "stop":
            self.engine.docker("stop", "--time", "30", name)
        elif how == "kill":
            self.engine.docker("kill", name)
        elif how == "disconnect":
            self.engine.docker("network", "disconnect", self.network, name)
        self.engine.docker("rm", "-f", name)
        self.apps.remove(name)

    def next_colour(self) -> str:
        self.colour = "green" if self.colour == "blue" else "blue"
        return self.colour

    def close(self) -> None:
        for name in [*self.apps, self.proxy]:
            self.engine.docker("rm", "-f", name, check=False)
        for net in (self.network, self.bridge):
            if net:
                self.engine.docker("network", "rm", net, check=False)
        shutil.rmtree(self.home, ignore_errors=True)


# ------------------------------------------------------------------ flows
def first_deploy(bed: Bed, per_colour: bool = False) -> list[str]:
    aliases = [f"{APP}-{bed.colour}"] if per_colour else [APP, f"{PROJECT}-{APP}"]
    names = [bed.start_app(aliases) for _ in range(bed.replicas)]
    assert bed.luma_health_check(aliases[-1])
    bed.deploy(f"{aliases[-1]}:{APP_PORT}")
    return names


def luma_cli_deploy(bed: Bed, old: list[str], old_how: str = "stop") -> list[str]:
    """CONTRACT.md section 4, step by step."""
    bed.next_colour()
    aliases = [APP, f"{PROJECT}-{APP}"]
    new = [bed.start_app(aliases) for _ in range(bed.replicas)]  # 1: with the live aliases
    assert bed.luma_health_check(f"{PROJECT}-{APP}")  # 2: curl inside the proxy container
    for name in new:  # 3: disconnect + connect with the aliases
        bed.engine.docker("network", "disconnect", bed.network, name, check=False)
        bed.engine.docker("network", "connect", *[a for al in aliases for a in ("--alias", al)],
                          bed.network, name)
    for name in old:  # 4: docker stop --time 30, docker rm
        bed.stop_app(name, old_how)
    bed.deploy()  # 5: deploy ... --ssl, updatehealth --healthy true
    return new


def disconnect_deploy(bed: Bed, old: list[str]) -> list[str]:
    """The Luma CLI's flow, but the old containers leave with ``docker network disconnect``."""
    return luma_cli_deploy(bed, old, old_how="disconnect")


def per_colour_deploy(bed: Bed, old: list[str], wait: float = 2.0) -> list[str]:
    """One alias per colour, then ``deploy --target``; the old colour is stopped ``wait`` later."""
    colour = bed.next_colour()
    new = [bed.start_app([f"{APP}-{colour}"]) for _ in range(bed.replicas)]
    assert bed.luma_health_check(f"{APP}-{colour}")
    bed.deploy(f"{APP}-{colour}:{APP_PORT}")
    time.sleep(wait)
    for name in old:
        bed.stop_app(name)
    return new


def run_under_load(bed: Bed, steps: Callable[[Load], None], keepalive: int = 20,
                   fresh: int = 5, settle: float = 2.0) -> Load:
    with Load(bed.http_port, HOST, keepalive, fresh) as load:
        time.sleep(settle)
        steps(load)
        time.sleep(settle)
    return load


def scenario_luma_cli(bed: Bed, deploys: int = 3, old_how: str = "stop", **kw: int) -> Load:
    """The Luma CLI's flow; ``old_how="disconnect"``: old ones leave by network disconnect."""
    current = first_deploy(bed)

    def steps(_load: Load) -> None:
        nonlocal current
        for _ in range(deploys):
            current = luma_cli_deploy(bed, current, old_how)

    return run_under_load(bed, steps, **kw)


def per_colour_stop_at_once(bed: Bed, old: list[str]) -> list[str]:
    """``deploy --target``, then ``docker stop`` of the old colour the moment it returns."""
    return per_colour_deploy(bed, old, wait=0.0)


def scenario_per_colour(bed: Bed, deploys: int = 3, wait: float = 2.0, **kw: int) -> Load:
    current = first_deploy(bed, per_colour=True)

    def steps(_load: Load) -> None:
        nonlocal current
        for _ in range(deploys):
            current = per_colour_deploy(bed, current, wait)

    return run_under_load(bed, steps, **kw)


def scenario_kill(bed: Bed, **kw: int) -> tuple[Load, int]:
    """``docker kill`` of one replica, then of all old ones right after a switch.

    Returns the load and the requests in flight at the kills (the bound for issue 15).
    """
    current = first_deploy(bed)
    kills: list[float] = []

    def steps(_load: Load) -> None:
        nonlocal current
        victim = current[0]
        kills.append(time.monotonic())
        bed.stop_app(victim, "kill")
        current = current[1:]
        time.sleep(2)
        bed.next_colour()
        new = [bed.start_app([APP, f"{PROJECT}-{APP}"]) for _ in range(bed.replicas)]
        assert bed.luma_health_check(f"{PROJECT}-{APP}")
        kills.append(time.monotonic())
        for name in current:
            bed.stop_app(name, "kill")
        current = new
        bed.deploy()

    load = run_under_load(bed, steps, **kw)
    return load, sum(load.in_flight_at(t) for t in kills)


def scenario_single_replica(bed: Bed, gap: float = 2.0, **kw: int) -> Load:
    bed.replicas = 1
    current = first_deploy(bed)

    def steps(_load: Load) -> None:
        nonlocal current
        bed.stop_app(current[0])
        time.sleep(gap)
        bed.next_colour()
        current = [bed.start_app([APP, f"{PROJECT}-{APP}"])]
        assert bed.luma_health_check(f"{PROJECT}-{APP}")
        bed.deploy()

    return run_under_load(bed, steps, **kw)


def scenario_proxy_recreate(bed: Bed, before: Callable[[], None] | None = None,
                            **kw: int) -> tuple[Load, float, float]:
    """The proxy re-created (``luma proxy update``), then restarted, under load.

    ``before`` runs after the first deploy (e.g. a deploy with a certificate).
    Returns the load and the seconds until the route answered 200 again each time.
    """
    first_deploy(bed)
    if before is not None:
        before()
    back: list[float] = []

    def until_routed(timeout: float = 60) -> float:
        t0 = time.monotonic()
        import http.client

        while time.monotonic() - t0 < timeout:
            try:
                c = http.client.HTTPConnection("127.0.0.1", bed.http_port, timeout=2)
                c.request("GET", "/", headers={"Host": HOST})
                if c.getresponse().status == 200:
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("the route did not answer 200 again")

    def steps(_load: Load) -> None:
        bed.recreate()
        back.append(until_routed())
        bed.engine.docker("restart", bed.proxy)
        back.append(until_routed())

    load = run_under_load(bed, steps, **kw)
    return load, back[0], back[1]
