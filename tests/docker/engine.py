"""A real Docker engine for the test suite, and the images it needs, built offline.

- ``Engine.ensure()`` uses a daemon that already answers (``$DOCKER_HOST`` or the
  default socket) as it is; otherwise it installs Debian's ``docker.io`` if missing
  (root) and starts a ``dockerd`` of its own that keeps every container inside this
  machine: no iptables, masquerade or forwarding, no default bridge, and an nftables
  table of its own that drops forwarded traffic leaving the test subnets' bridges.
  ``Engine.stop()`` stops only what it started, by PID.
- No registry is reachable, so the images are made here, cached across runs under
  ``$LUMA_TEST_CACHE`` (default ``/var/cache/luma-proxy-tests``): a Debian bookworm
  rootfs from ``debootstrap`` (imported as ``luma-test/bookworm``), a stand-in for
  ``python:3.12-slim-bookworm`` (this machine's Python 3.12 under ``/usr/local``),
  a wheelhouse from ``pip download`` served on 127.0.0.1 to ``docker build --network
  host``, then **the project's own Dockerfile** built with ``--build-arg BASE=...``,
  and the app image: the Docker double's container (``tests/e2e/docker_double.py``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("LUMA_TEST_CACHE", "/var/cache/luma-proxy-tests"))
SUBNETS = "10.213.0.0/16"  # every network the tests create lives in here
DAEMON_FLAGS = ["--iptables=false", "--ip-masq=false", "--ip-forward=false",
                "--ip6tables=false", "--bridge=none",
                f"--default-address-pool=base={SUBNETS},size=24"]
NFT_TABLE = "luma_proxy_tests"
BASE_IMAGE = "luma-test/bookworm"
PYTHON_IMAGE = "luma-test/python:3.12"
# One tag per checkout, so that two checkouts sharing one engine never test each other's image.
_CHECKOUT = hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]
APP_IMAGE = f"luma-test/app:{_CHECKOUT}"
PROXY_IMAGE = f"luma-test/proxy:{_CHECKOUT}"


class EngineError(RuntimeError):
    pass


def _run(cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = 600,
         check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(cmd), env=env, capture_output=True, text=True,
                            timeout=timeout, input=input.decode() if input else None)
    if check and result.returncode != 0:
        raise EngineError(f"{' '.join(cmd[:4])}... failed ({result.returncode}): "
                          f"{(result.stderr or result.stdout).strip()[-2000:]}")
    return result


class Engine:
    """The docker CLI pointed at one daemon."""

    def __init__(self) -> None:
        self.host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.own_nft = False
        self.prefix = f"lpt{os.getpid()}"
        self._subnet = random.randrange(100, 250)

    # ------------------------------------------------------------------ daemon
    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0"}

    def docker(self, *args: str, check: bool = True, timeout: float = 600
               ) -> subprocess.CompletedProcess[str]:
        return _run(["docker", *args], env=self.env, timeout=timeout, check=check)

    def answers(self) -> bool:
        if not shutil.which("docker"):
            return False
        return self.docker("info", "--format", "{{.ServerVersion}}", check=False,
                           timeout=20).returncode == 0

    def ensure(self) -> Engine:
        if self.answers():
            return self
        if os.getuid() != 0:
            raise EngineError("no Docker engine answers and starting one needs root")
        if not shutil.which("dockerd"):
            _apt_install("docker.io")
        run_dir = Path("/run/luma-test-docker")
        run_dir.mkdir(parents=True, exist_ok=True)
        self.host = f"unix://{run_dir}/docker.sock"
        log = (CACHE / "dockerd.log").open("ab") if _mkdir(CACHE) else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            ["dockerd", *DAEMON_FLAGS, f"--data-root={CACHE / 'docker-data'}",
             f"--exec-root={run_dir / 'exec'}", f"--pidfile={run_dir / 'docker.pid'}",
             "-H", self.host], stdout=log, stderr=subprocess.STDOUT)
        self._guard()
        deadline = time.monotonic() + 60
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise EngineError(f"dockerd did not start (see {CACHE / 'dockerd.log'})")
            time.sleep(0.3)
        return self

    def _guard(self) -> None:
        """Forwarded traffic from or to the test subnets stays on their bridges."""
        if not shutil.which("nft"):
            _apt_install("nftables")
        script = f"""
table inet {NFT_TABLE} {{
  chain forward {{
    type filter hook forward priority -10; policy accept;
    ip saddr {SUBNETS} oifname != "br-*" drop
    ip daddr {SUBNETS} iifname != "br-*" drop
  }}
}}
"""
        _run(["nft", "-f", "-"], input=script.encode())
        self.own_nft = True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.own_nft:
            _run(["nft", "delete", "table", "inet", NFT_TABLE], check=False)

    # ------------------------------------------------------------------ objects
    def name(self, what: str) -> str:
        return f"{self.prefix}-{what}"

    def network(self, what: str) -> str:
        """A network with an explicit subnet (there is no default bridge)."""
        name = self.name(what)
        for _ in range(40):
            self._subnet = self._subnet % 250 + 1
            result = self.docker("network", "create", "--subnet",
                                 f"10.213.{self._subnet}.0/24", name, check=False)
            if result.returncode == 0:
                return name
            if "overlap" not in result.stderr and "already" not in result.stderr:
                raise EngineError(result.stderr.strip())
        raise EngineError("no free subnet in " + SUBNETS)

    def cleanup(self) -> None:
        """Remove every container and network this run created."""
        ids = self.docker("ps", "-aq", "--filter", f"name={self.prefix}-",
                          check=False).stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, check=False)
        nets = self.docker("network", "ls", "-q", "--filter", f"name={self.prefix}-",
                           check=False).stdout.split()
        if nets:
            self.docker("network", "rm", *nets, check=False)

    def ip(self, container: str, network: str) -> str:
        out = self.docker("inspect", "-f",
                          f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}',
                          container).stdout.strip()
        return out

    def has_image(self, ref: str) -> bool:
        return self.docker("image", "inspect", ref, check=False).returncode == 0

    # ------------------------------------------------------------------ images
    def images(self) -> dict[str, str]:
        """Every image the docker tests need: name -> reference."""
        self._base()
        self._python()
        with wheelhouse() as links:
            app = self._app(links)
            proxy = self.build_proxy(links)
        return {"app": app, "proxy": proxy}

    def _base(self) -> None:
        if self.has_image(BASE_IMAGE):
            return
        tar = CACHE / "bookworm-minbase.tar"
        if not tar.exists():
            if not shutil.which("debootstrap"):
                _apt_install("debootstrap")
            rootfs = CACHE / "rootfs.tmp"
            shutil.rmtree(rootfs, ignore_errors=True)
            _run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs)], timeout=900)
            with tempfile.NamedTemporaryFile(dir=CACHE, delete=False) as out:
                subprocess.run(["tar", "-C", str(rootfs), "-c", "."], stdout=out, check=True)
            os.replace(out.name, tar)
            shutil.rmtree(rootfs, ignore_errors=True)
        with tar.open("rb") as f:
            subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=f, env=self.env,
                           check=True, capture_output=True, timeout=600)

    def _python(self) -> None:
        """``python:3.12-slim-bookworm``'s place: this machine's CPython 3.12 in /usr/local."""
        if self.has_image(PYTHON_IMAGE):
            return
        prefix = Path(sys.base_prefix)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        with tempfile.TemporaryDirectory() as ctx:
            target = Path(ctx) / "python"
            shutil.copytree(prefix, target, symlinks=True, ignore=shutil.ignore_patterns(
                "test", "tests", "__pycache__", "idlelib", "tkinter", "turtledemo",
                "site-packages"))  # a bare interpreter, as the official image (plus ensurepip)
            (Path(ctx) / "Dockerfile").write_text(f"""FROM {BASE_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends libssl3 libffi8 \\
    libsqlite3-0 zlib1g libbz2-1.0 liblzma5 libreadline8 libncursesw6 libuuid1 \\
    ca-certificates && rm -rf /var/lib/apt/lists/*
COPY python/ /usr/local/
RUN ldconfig && ln -sf python{version} /usr/local/bin/python3 \\
    && ln -sf python3 /usr/local/bin/python \\
    && mkdir -p /usr/local/lib/python{version}/site-packages \\
    && python3 -c 'import ssl, sqlite3, ctypes, ensurepip'
""")
            self.docker("build", "--network", "host", "-t", PYTHON_IMAGE, ctx, timeout=900)

    def _app(self, links: str) -> str:
        with tempfile.TemporaryDirectory() as ctx:
            shutil.copy(ROOT / "tests" / "e2e" / "docker_double.py", Path(ctx) / "app.py")
            # Where it lives in the project: it finds its repository two levels up.
            (Path(ctx) / "Dockerfile").write_text(f"""FROM {PYTHON_IMAGE}
RUN python3 -m ensurepip >/dev/null \\
    && python3 -m pip install -q --no-index --find-links {links} dnslib
COPY app.py /app/tests/e2e/docker_double.py
WORKDIR /app
ENTRYPOINT ["python3", "/app/tests/e2e/docker_double.py", "container", "--ip", "0.0.0.0"]
""")
            self.docker("build", "--network", "host", "-t", APP_IMAGE, ctx, timeout=900)
        return APP_IMAGE

    def build_proxy(self, links: str) -> str:
        """The image under test, from the project's own Dockerfile (base swapped by --build-arg)."""
        self.docker("build", "--network", "host", "--build-arg", f"BASE={PYTHON_IMAGE}",
                    "--build-arg", "PIP_NO_INDEX=1", "--build-arg", f"PIP_FIND_LINKS={links}",
                    "-t", PROXY_IMAGE, str(ROOT), timeout=900)
        return PROXY_IMAGE


def _mkdir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return True


def _apt_install(*packages: str) -> None:
    """Install Debian packages without letting any of them start a service."""
    policy = Path("/usr/sbin/policy-rc.d")
    made = not policy.exists()
    if made:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        _run(["apt-get", "update", "-qq"], env=env, timeout=600)
        _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
             env=env, timeout=900)
    finally:
        if made:
            policy.unlink()


def requirements() -> list[str]:
    """What the image installs: the project's dependencies and its build backend."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [*project["project"]["dependencies"], *project["build-system"]["requires"],
            "wheel", "dnslib"]


@functools.cache
def _wheel_dir() -> Path:
    """``pip download`` of every wheel the images need, once per set of requirements."""
    reqs = requirements()
    key = hashlib.sha256(json.dumps([reqs, sysconfig.get_platform(),
                                     sys.version_info[:2]]).encode()).hexdigest()[:12]
    wheels = CACHE / f"wheels-{key}"
    if not (wheels / ".complete").exists():
        _mkdir(wheels)
        _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
              "--dest", str(wheels), *reqs], timeout=900)
        (wheels / ".complete").touch()
    return wheels


@contextlib.contextmanager
def wheelhouse() -> Iterator[str]:
    """The wheels served on 127.0.0.1 for ``docker build --network host`` (pip --find-links)."""
    directory = str(_wheel_dir())

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=directory, **kw)  # type: ignore[misc]

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
