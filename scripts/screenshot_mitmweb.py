#!/usr/bin/env python3
"""Reproduce docs/img/mitmweb.png: mitmweb running the luma addon, flows routed by it.

    .venv/bin/python scripts/screenshot_mitmweb.py            # writes docs/img/mitmweb.png

What it does, all on loopback (see docs/operations.md, "Debugging live traffic"):

1. the demo setup of ``scripts/demo.py`` in a temp dir: Docker's DNS played by
   ``FakeDockerDNS``, "containers" on 127.0.0.x (``demo``, ``blog`` with two
   replicas, ``shop`` whose ``/up`` fails), hosts registered with the CLI
   (``luma-proxy deploy``);
2. ``mitmweb -s addons/luma.py`` instead of ``luma-proxy run``, with a web
   password, the UI bound to 127.0.0.1;
3. a few requests through it: several hosts, a query string, a POST, a 404
   (unknown host) and a 503 (unhealthy service);
4. a screenshot by headless Chromium (Debian: ``apt-get install -y chromium``)
   of the UI, logged in with ``?token=<password>``, one flow opened;
5. if Pillow is importable, the PNG is re-encoded with a palette to keep it small
   (``.venv/bin/python -m pip install pillow``; only this script uses it, so it
   is not a dependency in pyproject.toml).

Options: ``--tab connection`` opens the Connection tab (the container IP)
instead of the request headers; ``--show-log`` prints mitmweb's output.

``--setup-only`` stops after step 1, prints the ``export`` lines for the
``luma-proxy`` commands in docs/operations.md and waits for Ctrl-C (the
access-log, metrics and restart examples there were captured that way).
``--pebble`` adds an HTTPS host whose certificate a local Pebble ACME server
issues (Debian package ``pebble``); the proxy must then serve HTTP on ``--port``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.docker_double import Container, FakeDockerDNS, free_port  # noqa: E402

BIN = Path(sys.executable).parent
LUMA = str(BIN / "luma-proxy")
MITMWEB = str(BIN / "mitmweb")
PASSWORD = "demo-password-change-me"

# (container name, loopback IP playing its address, alias, healthy)
CONTAINERS = [
    ("demo-blue-1", "127.0.0.2", "demo", True),
    ("blog-1", "127.0.0.4", "blog", True),
    ("blog-2", "127.0.0.5", "blog", True),
    ("shop-1", "127.0.0.6", "shop", False),  # its /up answers 503: the service is unhealthy
]
# (host, alias, project)
HOSTS = [
    ("demo.localhost", "demo", "demo"),
    ("blog.localhost", "blog", "blog"),
    ("shop.localhost", "shop", "shop"),
]
# (host, method, path, extra headers, body): what the screenshot shows
TRAFFIC = [
    ("demo.localhost", "GET", "/", {}, None),
    ("blog.localhost", "GET", "/", {}, None),
    ("blog.localhost", "GET", "/headers", {"X-Request-ID": "req-1234"}, None),
    ("blog.localhost", "POST", "/comments", {"Content-Type": "application/json"},
     b'{"text": "hello"}'),
    ("blog.localhost", "GET", "/bytes?n=20000&token=s3cret", {}, None),
    ("demo.localhost", "GET", "/favicon.ico", {}, None),
    ("nothing.localhost", "GET", "/", {}, None),  # unknown host: 404
    ("shop.localhost", "GET", "/cart", {}, None),  # unhealthy service: 503
    ("blog.localhost", "GET", "/headers", {}, None),
]
OPENED = 2  # index in TRAFFIC of the flow whose request is shown in the detail pane


class Setup:
    """DNS double + containers + state written by the CLI, as scripts/demo.py does."""

    def __init__(self, workdir: Path, pebble_port: int | None = None) -> None:
        self.workdir = workdir
        self.state = workdir / "state.json"
        self.dns = FakeDockerDNS().start()
        self.containers: list[Container] = []
        ports: dict[str, int] = {}
        for name, ip, alias, healthy in CONTAINERS:
            port = ports.setdefault(alias, free_port(ip))
            self.containers.append(Container(name, ip, port, healthy=healthy).start())
            self.dns.add(alias, ip)
        self.env = {**os.environ, "LUMA_PROXY_STATE": str(self.state),
                    "LUMA_PROXY_DNS": self.dns.address, "HOME": str(workdir)}
        for host, alias, project in HOSTS:
            self.cli("deploy", "--host", host, "--target", f"{alias}:{ports[alias]}",
                     "--project", project, "--no-ssl")
        self.pebble = None
        if pebble_port is not None:
            self._start_pebble(pebble_port, ports["demo"])

    def _start_pebble(self, http_port: int, demo_port: int) -> None:
        from tests.e2e.pebble import Pebble

        # Pebble resolves the host through the DNS double and validates HTTP-01
        # on http_port, where the proxy is expected to listen.
        self.dns.set_alias("secure.localhost", ["127.0.0.1"])
        self.pebble = Pebble(http_port=http_port, dns_port=self.dns.port).start()
        self.cli("deploy", "--host", "secure.localhost", "--target", f"demo:{demo_port}",
                 "--project", "demo", "--ssl")

    def cli(self, *args: str) -> str:
        done = subprocess.run([LUMA, *args], env=self.env, check=True, capture_output=True,
                              text=True)
        return done.stdout

    def health(self) -> dict[str, bool | None]:
        services = json.loads(self.cli("list", "--json"))["services"]
        return {s["host"]: s["health"]["healthy"] for s in services}

    def stop(self) -> None:
        if self.pebble is not None:
            self.pebble.stop()
        for container in self.containers:
            container.stop(grace=1)
        self.dns.stop()


def wait_for(check, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"screenshot_mitmweb: timed out waiting for {what}")


def send(port: int, host: str, method: str, path: str, headers: dict[str, str],
         body: bytes | None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", host)
    conn.putheader("User-Agent", "curl/7.88.1")
    for name, value in headers.items():
        conn.putheader(name, value)
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status


def web_get(web_port: int, path: str) -> object:
    request = urllib.request.Request(f"http://127.0.0.1:{web_port}{path}",
                                     headers={"Authorization": f"Bearer {PASSWORD}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=5) as response:
        return json.loads(response.read())


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("screenshot_mitmweb: no chromium on PATH (apt-get install -y chromium)")


def screenshot(url: str, out: Path, width: int, height: int) -> None:
    profile = tempfile.mkdtemp(prefix="luma-chromium-")
    try:
        subprocess.run([
            find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--window-size={width},{height}", "--virtual-time-budget=8000",
            f"--screenshot={out}", url,
        ], check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()})
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def shrink(path: Path, colours: int) -> str:
    """Re-encode with a palette (screenshots of a UI lose nothing visible); needs Pillow."""
    try:
        from PIL import Image
    except ImportError:
        return "Pillow not installed: PNG left as Chromium wrote it"
    before = path.stat().st_size
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
        if len(image.convert("RGB").getcolors(1 << 16) or []) < 16:
            raise SystemExit(f"screenshot_mitmweb: {path} looks blank")
    small.save(path, optimize=True)
    return f"re-encoded with {colours} colours: {before} -> {path.stat().st_size} bytes"


def take(args: argparse.Namespace, setup: Setup) -> int:
    port = args.port or free_port()
    web_port = free_port()
    log = (setup.workdir / "mitmweb.log").open("w+")
    cmd = [MITMWEB, "-s", str(ROOT / "addons" / "luma.py"), "--listen-host", "127.0.0.1",
           "-p", str(port), "--web-host", "127.0.0.1", "--web-port", str(web_port),
           "--set", f"web_password={PASSWORD}", "--set", "web_open_browser=false"]
    print("$", " ".join(cmd).replace(PASSWORD, "$PASSWORD"), flush=True)
    web = subprocess.Popen(cmd, env=setup.env, stdout=log, stderr=subprocess.STDOUT,
                           cwd=setup.workdir)
    try:
        wait_for(lambda: "Web server listening" in (setup.workdir / "mitmweb.log").read_text(),
                 30, "mitmweb's web server")
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), 1).close() or True, 30,
                 "mitmweb's proxy port")
        # The addon checks every service once at start; wait for the verdicts.
        wait_for(lambda: setup.health() == {"demo.localhost": True, "blog.localhost": True,
                                            "shop.localhost": False}, 30, "health checks")
        statuses = []
        for host, method, path, headers, body in TRAFFIC:
            statuses.append(send(port, host, method, path, headers, body))
            time.sleep(0.05)
        print("sent:", ", ".join(f"{h}{p} {s}" for (h, _m, p, _hd, _b), s
                                  in zip(TRAFFIC, statuses, strict=True)), flush=True)
        flows = wait_for(lambda: [f for f in web_get(web_port, "/flows")  # type: ignore[union-attr]
                                  if f.get("response") or f.get("error")] or None, 10, "flows")
        print(f"mitmweb holds {len(flows)} flows", flush=True)
        opened = flows[OPENED]["id"] if len(flows) > OPENED else flows[0]["id"]
        url = f"http://127.0.0.1:{web_port}/?token={PASSWORD}#/flows/{opened}/{args.tab}"
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(url, out, args.width, args.height)
        print(f"screenshot: {out} ({out.stat().st_size} bytes)")
        if args.colours:
            print(shrink(out, args.colours))
        log.seek(0)
        if args.show_log:
            print("--- mitmweb output ---\n" + log.read().replace(PASSWORD, "$PASSWORD"))
        return 0 if sorted(set(statuses)) == [200, 404, 503] else 1
    finally:
        web.send_signal(signal.SIGTERM)
        try:
            web.wait(15)
        except subprocess.TimeoutExpired:
            web.kill()
            web.wait()
        log.close()


def hold(args: argparse.Namespace, setup: Setup) -> int:
    hosts = ", ".join(h for h, _a, _p in HOSTS)
    if setup.pebble is not None:
        hosts += ", secure.localhost (HTTPS, certificate from Pebble)"
    lines = [f"# demo setup in {setup.workdir} (Ctrl-C stops it); in another shell:",
             f"export LUMA_PROXY_STATE={setup.state} LUMA_PROXY_DNS={setup.dns.address}"]
    if setup.pebble is not None:
        lines.append(f"export LUMA_PROXY_ACME_DIRECTORY={setup.pebble.directory_url} "
                     f"LUMA_PROXY_ACME_CA_BUNDLE={setup.pebble.ca_bundle}")
    https = " --https-port 18443" if setup.pebble is not None else ""
    lines += [f"# hosts: {hosts}; shop.localhost is unhealthy (503)",
              f".venv/bin/luma-proxy run --listen-host 127.0.0.1 --http-port {args.port or 8080}"
              f"{https} --log-format json"]
    print("\n".join(lines), flush=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "img" / "mitmweb.png"))
    parser.add_argument("--port", type=int, default=0,
                        help="proxy port (default: a free one; 8080 with --setup-only)")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=600)
    parser.add_argument("--tab", default="request", choices=["request", "response", "connection",
                                                             "timing"],
                        help="the tab of the opened flow's detail pane")
    parser.add_argument("--colours", type=int, default=64,
                        help="palette size when Pillow is there (0: keep Chromium's PNG)")
    parser.add_argument("--show-log", action="store_true", help="print mitmweb's output")
    parser.add_argument("--setup-only", action="store_true",
                        help="only the DNS double, containers and state; wait for Ctrl-C")
    parser.add_argument("--pebble", action="store_true",
                        help="with --setup-only: an HTTPS host with a Pebble certificate")
    args = parser.parse_args()
    if args.pebble and not args.setup_only:
        parser.error("--pebble goes with --setup-only")
    workdir = Path(tempfile.mkdtemp(prefix="luma-mitmweb-"))
    setup = Setup(workdir, (args.port or 8080) if args.pebble else None)
    try:
        return hold(args, setup) if args.setup_only else take(args, setup)
    finally:
        setup.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
