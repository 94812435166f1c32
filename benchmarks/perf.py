#!/usr/bin/env python3
"""luma-proxy benchmark: throughput, latency, memory, registry scale and streaming.

One run on one machine measures, with ``wrk`` as the load generator:

* targets: the upstream directly (nginx, static answer), nginx as a reverse
  proxy, bare ``mitmdump -q`` in reverse mode (the engine's floor),
  ``mitmdump -s addons/luma.py``, the lean master with a no-op routing addon
  (``benchmarks/noop_master.py``), ``luma-proxy run`` and
  ``luma-proxy run --workers N``;
* loads: 1 keep-alive client (latency), 50 keep-alive clients, 50 clients
  with a connection per request, HTTPS HTTP/1.1 keep-alive, a 1 MiB response;
* memory: RSS idle and with 2,000 open keep-alive client connections;
* registry scale: routing cost with 10 vs 10,000 services (in process and
  with wrk), and the time a reload of a 10,000-service state file takes;
* streaming: 1 GiB download and upload and server-sent events through
  ``luma-proxy run`` while its RSS is sampled;
* ``--soak SECONDS``: RSS over a long run under load;
* ``--profile``: py-spy profiles of ``luma-proxy run`` and the no-op master.

It prints the tables and writes them, with the machine's description and the
exact commands, into ``docs/performance.md`` (between ``<!-- BEGIN perf:x -->``
markers; prose outside the markers is kept). Raw results go to
``benchmarks/results/<section>.json``.

    .venv/bin/python benchmarks/perf.py --setup          # apt: wrk nginx; pip: py-spy
    .venv/bin/python benchmarks/perf.py                  # the full run, ~10 s per row
    .venv/bin/python benchmarks/perf.py --soak 600       # 10-minute soak only
    .venv/bin/python benchmarks/perf.py --profile        # profiles only

Only loopback addresses are used. Every process it starts is stopped by its
own process group id.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gzip
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from luma_proxy.runtime import startup  # noqa: E402

BIN = Path(sys.executable).parent
LUMA = str(BIN / "luma-proxy")
MITMDUMP = str(BIN / "mitmdump")
PYSPY = str(BIN / "py-spy")
DOC = ROOT / "docs" / "performance.md"
RESULTS = ROOT / "benchmarks" / "results"

HTTP_HOST = "bench.test"  # --no-ssl service: plain HTTP rows
TLS_HOST = "tls.bench.test"  # --ssl service with a deployed self-signed pair: HTTPS rows
BIG_HOST = "big.bench.test"  # streaming rows (a docker_double container process)
ALIAS = "bench-app"
BIG_ALIAS = "bench-big"
ONE_MIB = 1 << 20
ONE_GIB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[perf {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- setup
def setup(profile: bool, extra: list[str] | None = None) -> None:
    """Install what the benchmark needs: wrk and nginx (Debian), py-spy (PyPI) for --profile,
    valgrind (Debian) for --instructions."""
    wanted = {"wrk": "wrk", "nginx": "nginx", "curl": "curl", "h2load": "nghttp2-client"}
    wanted.update({name: name for name in extra or []})
    missing = [package for binary, package in wanted.items() if shutil.which(binary) is None
               and not Path(f"/usr/sbin/{binary}").exists()]
    if missing:
        if os.geteuid() != 0:
            sys.exit(f"perf: please install Debian packages {' '.join(missing)} (needs root)")
        log(f"installing Debian packages: {' '.join(missing)}")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                       check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if profile and not Path(PYSPY).exists():
        log("installing py-spy into the venv")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)


def nginx_bin() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def have_tools() -> str | None:
    """None when wrk and nginx are there, else what is missing."""
    missing = [p for p in ("wrk", "h2load") if shutil.which(p) is None]
    if not Path(nginx_bin()).exists():
        missing.append("nginx")
    return ", ".join(missing) or None


# ------------------------------------------------------------------------ the machine
def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"n/a ({e})"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0].strip() if text else "n/a"


def machine() -> dict[str, str]:
    model = "n/a"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    import mitmproxy.version

    mem = "n/a"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION,
        "nginx": _first_line([nginx_bin(), "-v"]).replace("nginx version: ", ""),
        "wrk": _first_line(["wrk", "-v"]).split(" Copyright")[0],
        "loadavg_at_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(m: dict[str, str]) -> str:
    return (f"{m['nproc']} cores ({m['cpu']}), {m['memory']}, Linux {m['kernel']}, "
            f"Python {m['python']}, mitmproxy {m['mitmproxy']}, nginx {m['nginx']}, "
            f"{m['wrk']}; load average at start {m['loadavg_at_start']}; {m['date']}")


# ----------------------------------------------------------------------- /proc helpers
def descendants(pid: int) -> list[int]:
    """pid and all its descendants (via /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children")
                             .read_text().split()]
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far (all processes, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def rss_mib(pid: int, field_name: str = "VmRSS") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------- HTTP helpers
def http_get(port: int, host: str, path: str = "/", tls: bool = False,
             timeout: float = 5.0) -> tuple[int, bytes]:
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=context)
        # Connect to loopback, but send SNI = host.
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        conn.sock = context.wrap_socket(sock, server_hostname=host)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_http(port: int, host: str, tls: bool = False, timeout: float = 30.0,
              proc: subprocess.Popen[bytes] | None = None, path: str = "/") -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            status, _ = http_get(port, host, path, tls=tls, timeout=2)
            if status == 200:
                return
            last = status
        except (OSError, http.client.HTTPException) as e:
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"127.0.0.1:{port} (Host {host}, tls={tls}) not serving 200: {last}")


# --------------------------------------------------------------------------------- wrk
@dataclass(frozen=True)
class Load:
    key: str
    title: str
    conns: int
    threads: int
    path: str = "/"
    tls: bool = False
    close: bool = False
    h2load: str = ""  # "h2" or "h1": driven by nghttp2's h2load instead of wrk
    streams: int = 1  # h2load -m: concurrent streams per HTTP/2 connection


LOADS = [
    Load("c1", "1 keep-alive client", 1, 1),
    Load("ka50", "50 keep-alive clients", 50, 2),
    Load("close50", "50 clients, new connection per request", 50, 2, close=True),
    Load("tls50", "HTTPS (HTTP/1.1), 50 keep-alive clients", 50, 2, tls=True),
    Load("1mib", "1 MiB response, 50 keep-alive clients", 50, 2, path="/files/1m.bin"),
    # The same HTTPS load spoken both ways by one tool (issue 13, point 5).
    Load("h1h2load", "HTTPS HTTP/1.1, h2load, 10 keep-alive clients", 10, 1, tls=True,
         h2load="h1"),
    Load("h2h2load", "HTTPS HTTP/2, h2load, 10 clients x 100 streams", 10, 1, tls=True,
         h2load="h2", streams=100),
]
LOAD_BY_KEY = {load.key: load for load in LOADS}

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"bad wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests/s, p50/p90/p99 (ms), request count and errors from ``wrk --latency``."""
    result: dict[str, Any] = {"rps": 0.0, "p50_ms": None, "p90_ms": None, "p99_ms": None,
                              "requests": 0, "errors": 0, "non2xx": 0}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        result["rps"] = float(m.group(1))
    if m := re.search(r"(\d+) requests in", out):
        result["requests"] = int(m.group(1))
    for pct in ("50", "90", "99"):
        if m := re.search(rf"^\s+{pct}(?:\.0+)?%\s+(\S+)", out, re.M):
            result[f"p{pct}_ms"] = _ms(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        result["errors"] = sum(int(g) for g in m.groups())
        result["socket_errors"] = m.group(0)
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        result["non2xx"] = int(m.group(1))
    return result


def parse_h2load(out: str) -> dict[str, Any]:
    """Requests/s, succeeded and failed requests, 2xx and mean latency from ``h2load``."""
    result: dict[str, Any] = {"rps": 0.0, "p50_ms": None, "p90_ms": None, "p99_ms": None,
                              "requests": 0, "errors": 0, "non2xx": 0}
    if m := re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out):
        result["rps"] = float(m.group(1))
    if m := re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, "
                      r"(\d+) failed, (\d+) errored, (\d+) timeout", out):
        _total, done, _ok, failed, errored, timeout = (int(g) for g in m.groups())
        result["requests"] = done
        result["errors"] = failed + errored + timeout
        result["h2load_requests"] = m.group(0)
    if m := re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out):
        result["non2xx"] = sum(int(g) for g in m.groups()[1:])
    if m := re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out):
        result["mean_ms"] = _ms(m.group(1))
    return result


def wrk_cmd(load: Load, port: int, duration: float, host: str, lua: Path | None) -> list[str]:
    if load.h2load:
        return ["h2load", *(["--h1"] if load.h2load == "h1" else []), f"-c{load.conns}",
                f"-m{load.streams}", f"-D{duration:g}", f"--connect-to=127.0.0.1:{port}",
                f"https://{host}:{port}{load.path}"]
    cmd = ["wrk", f"-t{load.threads}", f"-c{load.conns}", f"-d{duration:g}s", "--latency",
           "-H", f"Host: {host}"]
    if load.close:
        cmd += ["-H", "Connection: close"]
    if load.tls:
        assert lua is not None
        cmd += ["-s", str(lua), f"https://{host}:{port}{load.path}"]
    else:
        cmd.append(f"http://127.0.0.1:{port}{load.path}")
    return cmd


def run_wrk(cmd: list[str], duration: float) -> dict[str, Any]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    result = (parse_h2load if cmd[0] == "h2load" else parse_wrk)(out.stdout)
    result["cmd"] = shlex.join(cmd)
    if out.returncode != 0 or not result["requests"]:
        result["failed"] = (out.stdout + out.stderr).strip()[-500:]
    return result


# ----------------------------------------------------------------------- environment
def make_cert(directory: Path, hosts: list[str]) -> tuple[Path, Path, Path]:
    """A self-signed ECDSA P-256 pair for ``hosts``: cert.pem, key.pem, and both in one PEM."""
    from tests.e2e.test_https import make_cert as make_pair

    cert_pem, key_pem = make_pair(hosts)
    paths = directory / "cert.pem", directory / "key.pem", directory / "combined.pem"
    paths[0].write_bytes(cert_pem)
    paths[1].write_bytes(key_pem)
    paths[2].write_bytes(cert_pem + key_pem)
    return paths


NGINX_COMMON = """\
daemon off;
master_process on;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_processes {workers};
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 75s;
  {body}
}}
"""

UPSTREAM_BODY = """\
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    listen 127.0.0.1:{tls_port} ssl backlog=4096;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location = / {{ default_type text/plain; return 200 "hello from the upstream\\n"; }}
    location = /up {{ default_type text/plain; return 200 "ok\\n"; }}
    location /files/ {{ root {www}; }}
  }}
"""

PROXY_BODY = """\
  upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    listen 127.0.0.1:{tls_port} ssl backlog=4096;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme;
    }}
  }}
"""


class Proc:
    """A process we started, in its own process group; stopped by that group's id."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str],
                 stdout: Path | None = None, cwd: Path = ROOT) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self._err = open(log_path, "ab")  # noqa: SIM115
        self._out = open(stdout, "ab") if stdout else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=self._err, env=env,
                                     cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        return descendants(self.proc.pid)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        else:  # the leader is gone; make sure no child of its group is left
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._err.close()
        if self._out is not subprocess.DEVNULL:
            self._out.close()

    def tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""


class Env:
    """Temp dir, certificates, the fake Docker DNS, the nginx upstream, the state file."""

    def __init__(self, keep: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="luma-perf-"))
        self.keep = keep
        self.procs: list[Proc] = []
        self.home = self.dir / "home"
        self.home.mkdir()
        self.env = {**os.environ, "HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        for var in ("LUMA_PROXY_STATE", "LUMA_PROXY_DNS", "LUMA_PROXY_LOG_FORMAT",
                    "LUMA_PROXY_HEALTH_INTERVAL", "LUMA_PROXY_ACME_DIRECTORY"):
            self.env.pop(var, None)
        certs = self.dir / "certs"
        certs.mkdir()
        self.cert, self.key, self.combined = make_cert(certs, [TLS_HOST, HTTP_HOST])
        self.lua = self.dir / "sni.lua"
        # wrk sends the URL's host as SNI; resolve every host to loopback instead of DNS.
        self.lua.write_text('wrk.resolve = function(host, service)\n'
                            '  wrk.addrs = wrk.lookup("127.0.0.1", service)\nend\n')
        www = self.dir / "www" / "files"
        www.mkdir(parents=True)
        (www / "1m.bin").write_bytes(os.urandom(ONE_MIB))
        for p in (self.dir, self.dir / "www", www):
            p.chmod(0o755)
        from tests.e2e.docker_double import FakeDockerDNS

        self.dns = FakeDockerDNS().start()
        self.upstream_port = free_port()
        self.upstream_tls_port = free_port()
        self.upstream = self.nginx("upstream", 2, UPSTREAM_BODY.format(
            port=self.upstream_port, tls_port=self.upstream_tls_port, cert=self.cert,
            key=self.key, www=self.dir / "www"))
        wait_http(self.upstream_port, HTTP_HOST)
        self.dns.set_alias(ALIAS, ["127.0.0.1"])
        self.state = self.dir / "state" / "state.json"
        self.deploy(self.state, HTTP_HOST, f"{ALIAS}:{self.upstream_port}", ssl=False)
        self.deploy(self.state, TLS_HOST, f"{ALIAS}:{self.upstream_port}", ssl=True,
                    pair=(self.cert, self.key))

    def deploy(self, state: Path, host: str, target: str, ssl: bool,
               pair: tuple[Path, Path] | None = None) -> float:
        cmd = [LUMA, "deploy", "--host", host, "--target", target, "--project", "bench",
               "--state", str(state), "--ssl" if ssl else "--no-ssl"]
        if pair:
            cmd += ["--tls-cert", str(pair[0]), "--tls-key", str(pair[1])]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=120)
        elapsed = time.perf_counter() - t0
        if out.returncode != 0:
            raise RuntimeError(f"deploy failed: {out.stdout} {out.stderr}")
        return elapsed

    def nginx(self, name: str, workers: int, body: str) -> Proc:
        d = self.dir / f"nginx-{name}"
        d.mkdir()
        user = "user root root;" if os.geteuid() == 0 else ""
        conf = d / "nginx.conf"
        conf.write_text(NGINX_COMMON.format(user=user, dir=d, workers=workers, body=body))
        return self.start(f"nginx-{name}", [nginx_bin(), "-p", str(d), "-e", str(d / "error.log"),
                                            "-c", str(conf)])

    def start(self, name: str, cmd: list[str], stdout: Path | None = None,
              env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, cmd, self.dir / f"{name}.stderr.log", env or self.env, stdout)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        self.dns.stop()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            log(f"kept {self.dir}")


# --------------------------------------------------------------------------- targets
@dataclass
class Target:
    key: str
    title: str
    http_port: int = 0
    https_port: int = 0
    proc: Proc | None = None
    cmd: str = ""
    note: str = ""
    workers: int = 1
    unavailable: str = ""

    def pids(self) -> list[int]:
        return self.proc.pids() if self.proc else []


def workers_available() -> str | None:
    """None when ``luma-proxy run --workers`` exists, else why not."""
    out = subprocess.run([LUMA, "run", "--help"], capture_output=True, text=True)
    if "--workers" not in out.stdout:
        return "n/a (not available: luma-proxy run has no --workers)"
    return None


def start_target(env: Env, key: str, workers: int, state: Path | None = None,
                 extra: list[str] | None = None, tls: bool = True,
                 prefix: list[str] | None = None, timeout: float = 30.0) -> Target:
    """Start one target and wait until it serves bench.test (and tls.bench.test) with 200.

    ``prefix`` runs it under another program (valgrind, for ``--instructions``);
    then the noop and luma targets get ``PYTHONOPTIMIZE=1`` from the start, as
    ``luma-proxy run`` would otherwise restart itself with it, out of valgrind's view.
    """
    state = state or env.state
    up = env.upstream_port
    port, tls_port = free_port(), free_port()
    access_log = env.dir / f"{key}.access.log"
    if key == "direct":
        t = Target(key, "upstream directly (nginx, 2 workers)", up, env.upstream_tls_port,
                   env.upstream, cmd=shlex.join(env.upstream.cmd))
        return t
    if key == "nginx":
        proc = env.nginx(f"proxy-{port}", 1, PROXY_BODY.format(
            upstream=up, port=port, tls_port=tls_port, cert=env.cert, key=env.key))
        t = Target(key, "nginx reverse proxy (1 worker, upstream keepalive)", port, tls_port,
                   proc, cmd=shlex.join(proc.cmd))
    elif key in ("mitmdump", "mitmdump-O"):
        cmd = [MITMDUMP, "-q", "--mode", f"reverse:http://127.0.0.1:{up}/@127.0.0.1:{port}",
               "--certs", f"*={env.combined}", "--set", f"confdir={env.dir / 'mitm'}"]
        title = "bare `mitmdump -q` (reverse mode, no addon)"
        if key == "mitmdump-O":  # the same engine without its __debug__ checks (as run)
            cmd = [sys.executable, "-O", *cmd]
            title = "bare `mitmdump -q` under `python -O`"
        proc = env.start(key, cmd)
        t = Target(key, title, port, port, proc, cmd=shlex.join(cmd))
    elif key == "mitmdump-luma":
        cmd = [MITMDUMP, "-q", "-s", str(ROOT / "addons" / "luma.py"), "--listen-host",
               "127.0.0.1", "-p", str(port), "--set", f"luma_state={state}",
               "--set", f"luma_dns={env.dns.address}", "--set", f"confdir={env.dir / 'mitm'}"]
        proc = env.start(key, cmd, stdout=access_log)
        t = Target(key, "`mitmdump -q -s addons/luma.py`", port, port, proc,
                   cmd=shlex.join(cmd) + f" > {access_log.name}")
    elif key == "noop":
        cmd = [sys.executable, str(ROOT / "benchmarks" / "noop_master.py"), "--port", str(port),
               "--https-port", str(tls_port), "--upstream", f"127.0.0.1:{up}",
               "--cert", str(env.combined)]
        # Optimized like `luma-proxy run` unless LUMA_PROXY_OPTIMIZE=0.
        optimize = {"PYTHONOPTIMIZE": "1"} if startup.enabled(os.environ) else {}
        proc = env.start(key, [*(prefix or []), *cmd], env={**env.env, **optimize})
        t = Target(key, "lean master + no-op routing addon", port, tls_port, proc,
                   cmd=shlex.join(cmd))
    elif key in ("luma", "luma-workers"):
        cmd = [LUMA, "run", "--listen-host", "127.0.0.1", "--http-port", str(port),
               "--https-port", str(tls_port), "--dns", env.dns.address, "--state", str(state),
               *(extra or [])]
        title = "`luma-proxy run`"
        if key == "luma-workers":
            if (why := workers_available()) is not None:
                return Target(key, f"`luma-proxy run --workers {workers}`", unavailable=why,
                              workers=workers)
            cmd += ["--workers", str(workers)]
            title = f"`luma-proxy run --workers {workers}`"
        optimize = {"PYTHONOPTIMIZE": "1"} if prefix and startup.enabled(os.environ) else {}
        if prefix:
            # Work per second, not per request: under valgrind a second holds ~15 requests
            # instead of ~600, so a health round or a DNS refresh (TTL 1 s) would be
            # charged to the requests ~40x over. Both are made rare for the count.
            optimize["LUMA_PROXY_HEALTH_INTERVAL"] = "3600"
            optimize["LUMA_PROXY_DNS_TTL"] = "3600"
        proc = env.start(key, [*(prefix or []), *cmd], stdout=access_log,
                         env={**env.env, **optimize})
        t = Target(key, title, port, tls_port, proc, workers=workers if key != "luma" else 1,
                   cmd=shlex.join(cmd) + f" > {access_log.name}",
                   note="access log (default format: text) on stdout, redirected to a file")
    else:
        raise ValueError(key)
    assert t.proc is not None
    try:
        wait_http(t.http_port, HTTP_HOST, proc=t.proc.proc, timeout=timeout)
        if tls:
            wait_http(t.https_port, TLS_HOST, tls=True, proc=t.proc.proc, timeout=timeout)
    except Exception as e:
        tail = t.proc.tail()
        env.stop(t.proc)
        raise RuntimeError(f"{key} did not come up: {e}\n{tail}") from None
    if t.workers > 1:  # wait for every worker to be up (each one listens by itself)
        deadline = time.monotonic() + 30
        while len(t.pids()) < t.workers and time.monotonic() < deadline:
            time.sleep(0.2)
    return t


def stop_target(env: Env, t: Target) -> None:
    if t.proc is not None and t.key != "direct":
        env.stop(t.proc)


def settle(pids: Callable[[], list[int]], limit: float = 180.0, idle: float = 0.05) -> float:
    """Wait until the processes use < ``idle`` of a core over 1 s; returns the time waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        ps = pids()
        before = cpu_seconds(ps)
        time.sleep(1.0)
        if cpu_seconds(ps) - before < idle:
            break
    return time.monotonic() - t0


def measure(t: Target, load: Load, duration: float, env: Env) -> dict[str, Any]:
    port = t.https_port if load.tls else t.http_port
    host = TLS_HOST if load.tls else HTTP_HOST
    cmd = wrk_cmd(load, port, duration, host, env.lua)
    pids = list(t.pids())
    cpu0, busy0, w0 = cpu_seconds(pids), machine_busy(), time.monotonic()
    result = run_wrk(cmd, duration)
    cpu1, busy1, w1 = cpu_seconds(pids), machine_busy(), time.monotonic()
    result["proxy_cpu"] = (cpu1 - cpu0) / (w1 - w0)  # cores busy, all of the target's processes
    # Everything busy on the machine meanwhile: target + wrk + upstream + anyone else's work.
    result["machine_busy"] = (busy1 - busy0) / (w1 - w0)
    if result["requests"]:
        result["cpu_us_per_req"] = (cpu1 - cpu0) / result["requests"] * 1e6
    return result


# -------------------------------------------------------------------------- throughput
TARGET_ORDER = ["direct", "nginx", "mitmdump", "mitmdump-O", "mitmdump-luma", "noop", "luma",
                "luma-workers"]


def throughput(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    """Every target under every load; with --rounds R the sweep is repeated R times and
    each cell shows the round with the median req/s (all rounds are kept in the JSON)."""
    results: dict[str, Any] = {"targets": {}, "duration": args.duration,
                               "workers": args.workers, "rounds": args.rounds}
    loads = [LOAD_BY_KEY[k] for k in args.loads]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for round_no in range(args.rounds):
        for key in args.targets:
            log(f"target {key} (round {round_no + 1}/{args.rounds})")
            t = start_target(env, key, args.workers)
            entry = results["targets"].setdefault(key, {
                "title": t.title, "cmd": t.cmd, "note": t.note,
                "unavailable": t.unavailable, "loads": {}})
            entry["cmd"], entry["unavailable"] = t.cmd, t.unavailable
            if t.unavailable:
                log(f"  {t.unavailable}")
                continue
            try:
                time.sleep(1.0)
                if key != "direct":
                    entry["rss_idle_mib"] = [round(rss_mib(p), 1) for p in t.pids()]
                if args.warmup > 0:
                    run_wrk(wrk_cmd(LOAD_BY_KEY["ka50"], t.http_port, args.warmup, HTTP_HOST,
                                    None), args.warmup)
                for load in loads:
                    r = measure(t, load, args.duration, env)
                    runs.setdefault(key, {}).setdefault(load.key, []).append(r)
                    log(f"  {load.key:8s} {r['rps']:10.0f} req/s  p50 {fmt_ms(r['p50_ms'])}  "
                        f"p99 {fmt_ms(r['p99_ms'])}  proxy cpu {r['proxy_cpu']:.2f} of "
                        f"{r['machine_busy']:.2f}  errors {r['errors']} non2xx {r['non2xx']}"
                        + (f"  FAILED {r['failed'][:200]}" if r.get("failed") else ""))
                    time.sleep(args.pause)
                if key != "direct":
                    entry["rss_after_mib"] = [round(rss_mib(p), 1) for p in t.pids()]
            finally:
                stop_target(env, t)
    for key, by_load in runs.items():
        for load_key, rs in by_load.items():
            ranked = sorted(rs, key=lambda r: r["rps"])
            chosen = dict(ranked[(len(ranked) - 1) // 2])
            chosen["rounds_rps"] = [round(r["rps"]) for r in rs]
            chosen["rounds_cpu_us_per_req"] = [round(r.get("cpu_us_per_req", 0)) for r in rs]
            results["targets"][key]["loads"][load_key] = chosen
    return results


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f} ms" if v < 100 else f"{v:.0f} ms"


# ---------------------------------------------------------------------------- memory
async def _hold_connections(port: int, n: int, host: str, hold: Callable[[], None]) -> int:
    """Open n keep-alive connections, one request each, keep them open while hold() runs."""
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    sem = asyncio.Semaphore(200)

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        async with sem:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), 20)
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
                await reader.readexactly(length)
                return reader, writer
            except (OSError, TimeoutError, asyncio.IncompleteReadError, AttributeError):
                return None

    conns = await asyncio.gather(*(one() for _ in range(n)))
    ok = [c for c in conns if c is not None]
    await asyncio.to_thread(hold)
    for _, writer in ok:
        writer.close()
    return len(ok)


def memory(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"connections": args.memory_conns, "targets": {}}
    keys = ["luma"] + (["luma-workers"] if "luma-workers" in args.targets else [])
    for key in keys:
        log(f"memory {key}")
        t = start_target(env, key, args.workers)
        entry: dict[str, Any] = {"title": t.title, "cmd": t.cmd, "unavailable": t.unavailable}
        results["targets"][key] = entry
        if t.unavailable:
            continue
        try:
            time.sleep(2.0)
            settle(t.pids, limit=20)
            entry["idle_mib"] = {str(p): round(rss_mib(p), 1) for p in t.pids()}
            entry["procs"] = {str(p): cmdline(p)[:120] for p in t.pids()}
            sample: dict[str, Any] = {}

            def hold(t: Target = t, sample: dict[str, Any] = sample) -> None:
                time.sleep(3.0)
                sample["rss"] = {str(p): round(rss_mib(p), 1) for p in t.pids()}

            opened = asyncio.run(_hold_connections(t.http_port, args.memory_conns, HTTP_HOST,
                                                   hold))
            entry["opened"] = opened
            entry["loaded_mib"] = sample["rss"]
            time.sleep(3.0)
            entry["after_close_mib"] = {str(p): round(rss_mib(p), 1) for p in t.pids()}
            log(f"  idle {entry['idle_mib']}  with {opened} conns {entry['loaded_mib']}  "
                f"after {entry['after_close_mib']}")
        finally:
            stop_target(env, t)
    return results


# ----------------------------------------------------------------------------- scale
def make_state(path: Path, n: int, port: int, ssl: bool = False) -> list[str]:
    """A registry with n services host i.bench.test -> alias app-i:port; returns hosts."""
    from luma_proxy.models import Service
    from luma_proxy.store.registry import Store

    services = {}
    hosts = []
    for i in range(n):
        host = f"s{i:05d}.bench.test" if i else HTTP_HOST
        services[host] = Service(name=f"app{i}", host=host, target=f"app-{i:05d}:{port}",
                                 project="bench", ssl=ssl)
        hosts.append(host)
    with Store(path).transaction() as tx:
        for service in services.values():
            tx.put(service)
    return hosts


async def _route_bench(state: Path, hosts: list[str], dns: str, iterations: int,
                       repeats: int) -> dict[str, Any]:
    from mitmproxy.test import taddons, tflow, tutils

    from luma_proxy.proxy.addon import LumaProxy

    addon = LumaProxy()
    with taddons.context(addon) as tctx:
        t0 = time.perf_counter()
        tctx.configure(addon, luma_state=str(state), luma_dns=dns, luma_dns_ttl=3600.0)
        first_load = time.perf_counter() - t0
        flows = []
        for i in range(50):
            f = tflow.tflow()
            host = hosts[(i * 7919) % len(hosts)]
            f.request = tutils.treq(host="127.0.0.1", port=80, path=b"/",
                                    headers=((b"host", host.encode()),
                                             (b"user-agent", b"wrk")))
            f.client_conn.peername = ("127.0.0.1", 40000 + i)
            flows.append(f)
        for f in flows:  # warm: DNS answers cached, sticky IPs chosen
            if (pending := addon.requestheaders(f)) is not None:
                await pending
            assert f.response is None, f.response
        # Wall clock and this process's CPU time: on a shared machine the wall clock also
        # counts the time other processes had the core; CPU time is the cost itself.
        per_call, per_call_cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(iterations):  # cached: synchronous, as on the proxy's hot path
                if (pending := addon.requestheaders(flows[i % 50])) is not None:
                    await pending
            per_call.append((time.perf_counter() - t0) / iterations * 1e6)
            per_call_cpu.append((time.process_time() - c0) / iterations * 1e6)
        # Python function calls per request: a count, so free of the machine's noise.
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for i in range(1000):
            if (pending := addon.requestheaders(flows[i % 50])) is not None:
                await pending
        profiler.disable()
        calls = pstats.Stats(profiler).total_calls / 1000  # type: ignore[attr-defined]
        # Reload: one service deployed (a transaction, as `luma-proxy deploy` writes it),
        # then snapshot + build_view + swap. "apply" is the part on the event loop (the swap).
        from luma_proxy.store.registry import Store
        from luma_proxy.store.view import build_view

        reloads, reloads_cpu = [], []
        applies: list[float] = []
        store = Store(state)
        for i in range(repeats):
            with store.transaction() as tx:
                service = tx.service(hosts[0])
                assert service is not None
                tx.put(service.model_copy(update={"app": f"r{i}"}))
            t0, c0 = time.perf_counter(), time.process_time()
            base = addon.view
            view = build_view(store.snapshot(base.routes_gen, base.health_gen,
                                             base.registry_id), base)
            a0 = time.perf_counter()
            changed = addon._swap(view)  # the loop's part (a thread does the rest in the proxy)
            applies.append((time.perf_counter() - a0) * 1e3)
            reloads.append((time.perf_counter() - t0) * 1e3)
            reloads_cpu.append((time.process_time() - c0) * 1e3)
            assert changed and addon.table.services[hosts[0]].app == f"r{i}"
        store.close()
        addon.done()  # its served-version beacon: a CLI deploy later must not wait for it
    return {"route_us": per_call, "route_us_median": statistics.median(per_call),
            "route_cpu_us": per_call_cpu, "route_cpu_us_min": min(per_call_cpu),
            "route_calls": calls,
            "route_cpu_us_median": statistics.median(per_call_cpu),
            "first_load_ms": first_load * 1e3, "reload_ms": reloads,
            "reload_ms_median": statistics.median(reloads), "reload_ms_max": max(reloads),
            "reload_cpu_ms_median": statistics.median(reloads_cpu),
            "reload_cpu_ms_min": min(reloads_cpu),
            "apply_ms_median": statistics.median(applies)}


def scale(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"sizes": {}, "wrk": {}}
    for n in args.scale_sizes:
        state = env.dir / f"scale-{n}" / "state.json"
        hosts = make_state(state, n, env.upstream_port)
        for i in range(n):
            env.dns.set_alias(f"app-{i:05d}", ["127.0.0.1"])
        log(f"scale: in-process routing with {n} services")
        r = asyncio.run(_route_bench(state, hosts, env.dns.address, args.route_iterations, 5))
        r["state_bytes"] = sum(p.stat().st_size for p in state.parent.glob("state.db*"))
        results["sizes"][str(n)] = r
        log(f"  route {r['route_us_median']:.1f} us/request (CPU min {r['route_cpu_us_min']:.1f}),"
            f" reload {r['reload_ms_median']:.1f} ms (CPU {r['reload_cpu_ms_median']:.1f})"
            f" (max {r['reload_ms_max']:.1f}), apply {r['apply_ms_median']:.2f} ms, "
            f"file {r['state_bytes'] / 1e6:.1f} MB")
        if not args.scale_wrk:
            continue
        log(f"scale: luma-proxy run with {n} services (health interval 3600 s)")
        t = start_target(env, "luma", 1, state=state, extra=["--health-interval", "3600"],
                         tls=False)
        try:
            waited = settle(t.pids)  # the first health round of every service
            entry: dict[str, Any] = {"cmd": t.cmd, "settled_s": round(waited, 1),
                                     "rss_mib": round(rss_mib(t.proc.pid), 1)}
            for key in ("c1", "ka50"):
                entry[key] = measure(t, LOAD_BY_KEY[key], args.duration, env)
                log(f"  {key} {entry[key]['rps']:.0f} req/s p50 {fmt_ms(entry[key]['p50_ms'])}")
            # A deploy while serving: time from the CLI's exit to the new host answering 200.
            new_host = f"new-{n}.bench.test"
            cli_s = env.deploy(state, new_host, f"{ALIAS}:{env.upstream_port}", ssl=False)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 30:
                with contextlib.suppress(OSError, http.client.HTTPException):
                    if http_get(t.http_port, new_host, timeout=2)[0] == 200:
                        break
                time.sleep(0.005)
            entry["deploy_cli_s"] = round(cli_s, 3)
            entry["deploy_to_served_ms"] = round((time.monotonic() - t0) * 1e3, 1)
            log(f"  deploy CLI {cli_s:.2f} s, then served after {entry['deploy_to_served_ms']} ms")
            results["wrk"][str(n)] = entry
        finally:
            stop_target(env, t)
    return results


# ------------------------------------------------------------------------- streaming
class RssSampler:
    def __init__(self, pids: list[int], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(rss_mib(p) for p in self.pids))
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def streaming(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    from tests.e2e.docker_double import spawn_container, stop_container_process

    size = args.stream_bytes
    results: dict[str, Any] = {"bytes": size, "cases": {}}
    big_port = free_port()
    container = spawn_container("bench-big", "127.0.0.3", big_port)
    try:
        env.dns.set_alias(BIG_ALIAS, ["127.0.0.3"])
        env.deploy(env.state, BIG_HOST, f"{BIG_ALIAS}:{big_port}", ssl=False)
        payload = env.dir / "upload.bin"
        with open(payload, "wb") as f:
            f.truncate(size)  # sparse: reading it costs no disk
        t = start_target(env, "luma", 1)
        results["cmd"] = t.cmd
        try:
            wait_http(t.http_port, BIG_HOST, path="/up")
            time.sleep(1.0)
            pids = t.pids()
            base = sum(rss_mib(p) for p in pids)
            results["rss_before_mib"] = round(base, 1)
            url = f"http://127.0.0.1:{t.http_port}"
            curl = ["curl", "-sS", "-H", f"Host: {BIG_HOST}", "-w",
                    "%{http_code} %{size_download} %{size_upload} %{time_total}"]
            cases = {
                "download": [*curl, "-o", "/dev/null", f"{url}/bytes?n={size}"],
                "upload (Content-Length)": [*curl, "-o", env.dir / "up1.json", "-T", payload,
                                            f"{url}/upload"],
                "upload (chunked)": [*curl, "-o", env.dir / "up2.json", "-T", payload,
                                     "-H", "Transfer-Encoding: chunked", f"{url}/upload"],
            }
            for name, cmd in cases.items():
                cmd = [str(c) for c in cmd]
                log(f"streaming: {name}")
                with RssSampler(pids) as sampler:
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                code, down, up, total = (out.stdout.split() + ["0"] * 4)[:4]
                entry = {"cmd": shlex.join(cmd), "status": code, "downloaded": int(down),
                         "uploaded": int(up), "seconds": float(total),
                         "peak_rss_mib": round(sampler.peak, 1),
                         "growth_mib": round(sampler.peak - base, 1)}
                if "upload" in name:
                    with contextlib.suppress(OSError, ValueError):
                        answer = json.loads(Path(cmd[cmd.index("-o") + 1]).read_text())
                        entry["container_received"] = answer.get("received")
                moved = max(int(down), int(up))
                entry["mib_per_s"] = round(moved / ONE_MIB / max(float(total), 1e-9), 1)
                results["cases"][name] = entry
                log(f"  {code} {moved / ONE_MIB:.0f} MiB in {float(total):.1f} s, "
                    f"peak RSS {sampler.peak:.0f} MiB (+{sampler.peak - base:.0f})")
            results["sse"] = sse_check(t.http_port)
            log(f"streaming: SSE {results['sse']}")
        finally:
            stop_target(env, t)
    finally:
        stop_container_process(container)
    return results


def sse_check(port: int, n: int = 5, interval: float = 0.5) -> dict[str, Any]:
    """Arrival time of each event: about i * interval when streamed, all at the end if buffered."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    t0 = time.monotonic()
    sock.sendall(f"GET /sse?n={n}&interval={interval} HTTP/1.1\r\nHost: {BIG_HOST}\r\n"
                 "Connection: close\r\n\r\n".encode())
    arrivals, buf = [], b""
    with sock:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            buf += data
            while b"data: " in buf:
                _, _, buf = buf.partition(b"data: ")
                arrivals.append(round(time.monotonic() - t0, 3))
    return {"events": len(arrivals), "arrivals_s": arrivals, "interval_s": interval}


# ------------------------------------------------------------------------------ soak
def soak(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    """luma-proxy run under alternating keep-alive / connection-per-request load; RSS sampled."""
    t = start_target(env, "luma", 1)
    results: dict[str, Any] = {"cmd": t.cmd, "seconds": args.soak, "samples": []}
    try:
        time.sleep(1.0)
        pid = t.proc.pid
        results["rss_idle_mib"] = round(rss_mib(pid), 1)
        start = time.monotonic()
        i = 0
        chunk = min(30.0, args.soak)
        while time.monotonic() - start < args.soak:
            load = LOAD_BY_KEY["ka50" if i % 2 == 0 else "close50"]
            r = measure(t, load, chunk, env)
            sample = {"t_s": round(time.monotonic() - start), "load": load.key,
                      "rps": round(r["rps"]), "errors": r["errors"] + r["non2xx"],
                      "rss_mib": round(rss_mib(pid), 1)}
            results["samples"].append(sample)
            results.setdefault("wrk_cmds", {})[load.key] = r["cmd"]
            log(f"soak {sample}")
            i += 1
        time.sleep(3.0)
        results["rss_end_idle_mib"] = round(rss_mib(pid), 1)
    finally:
        stop_target(env, t)
    return results


# --------------------------------------------------------------------------- profile
def profile(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    if not Path(PYSPY).exists():
        setup(profile=True)
    results: dict[str, Any] = {"duration": args.duration, "targets": {}}
    for key in ("luma", "noop"):
        t = start_target(env, key, 1)
        try:
            time.sleep(1.0)
            raw = env.dir / f"profile-{key}.txt"
            spy = [PYSPY, "record", "--nonblocking", "-r", "250", "-f", "raw", "-o", str(raw),
                   "-d", f"{int(args.duration)}", "-p", str(t.proc.pid)]
            log(f"profile {key}: {shlex.join(spy)}")
            spy_proc = subprocess.Popen(spy, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
            r = measure(t, LOAD_BY_KEY["ka50"], args.duration, env)
            spy_proc.wait(timeout=60)
            summary = summarize_profile(raw.read_text())
            summary["spy_cmd"] = shlex.join(spy)
            summary["wrk"] = r
            summary["cmd"] = t.cmd
            results["targets"][key] = summary
            args.results_dir.mkdir(parents=True, exist_ok=True)
            with gzip.open(args.results_dir / f"profile-{key}.txt.gz", "wb") as f:
                f.write(raw.read_bytes())
        finally:
            stop_target(env, t)
    return results


def keepalive_requests(port: int, n: int) -> None:
    """``n`` GETs of bench.test, one after another on one connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for _ in range(n):
            conn.request("GET", "/", headers={"Host": HTTP_HOST})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"status {response.status}")
    finally:
        conn.close()


def callgrind_total(out: Path) -> int:
    """Instructions in the newest dump of a callgrind run (``out.1``, ``out.2``...)."""
    dumps = sorted(out.parent.glob(out.name + ".*"), key=lambda p: int(p.suffix[1:]))
    for line in dumps[-1].read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dumps[-1]}")


def instructions(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    """Instructions per request under callgrind: the cost of the same work, without the noise.

    CPU time per request moves by 10-40 % between runs on a shared machine; the
    number of instructions executed for a request does not. Each target runs
    under ``valgrind --tool=callgrind``; after a warm-up the counters are zeroed,
    ``--instr-requests`` keep-alive requests are sent by one client, and the
    counters dumped. The instructions an idle window of ``--instr-idle``
    seconds took (timers, file polls: background work that under valgrind's
    slowdown would otherwise be charged to the requests) are subtracted pro rata;
    luma-proxy's health interval and DNS TTL are an hour: a health round and a
    DNS refresh are work per second, which at valgrind's pace (~15 requests a
    second instead of ~600) would be charged to the requests ~40 times over.
    The access log's writes are not adjusted: at that pace each line leaves
    alone, where at full speed one write carries ~30 lines, so the count
    overstates luma-proxy a little.
    """
    if shutil.which("callgrind_control") is None:
        setup(profile=False, extra=["valgrind"])
    n, idle = args.instr_requests, args.instr_idle
    results: dict[str, Any] = {"requests": n, "idle_seconds": idle, "targets": {}}
    for key in ("noop", "luma"):
        out = env.dir / f"callgrind-{key}.out"
        prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        t = start_target(env, key, 1, tls=False, prefix=prefix, timeout=900)
        try:
            assert t.proc is not None
            pid = str(t.proc.proc.pid)
            keepalive_requests(t.http_port, max(50, n // 3))  # warm-up
            control = ["callgrind_control"]
            subprocess.run([*control, "-z", pid], check=True, capture_output=True)
            time.sleep(idle)
            subprocess.run([*control, "-d", pid], check=True, capture_output=True)
            idle_total = callgrind_total(out)
            subprocess.run([*control, "-z", pid], check=True, capture_output=True)
            t0 = time.monotonic()
            keepalive_requests(t.http_port, n)
            took = time.monotonic() - t0
            subprocess.run([*control, "-d", pid], check=True, capture_output=True)
            busy = callgrind_total(out)
            net = (busy - idle_total / idle * took) / n
            log(f"instructions {key}: {busy / n:,.0f} per request, {net:,.0f} without the "
                f"idle work ({idle_total / idle:,.0f}/s over {took:.0f} s)")
            results["targets"][key] = {
                "cmd": shlex.join(prefix) + " " + t.cmd, "title": t.title,
                "raw_per_request": busy / n, "idle_per_second": idle_total / idle,
                "seconds": took, "per_request": net,
            }
        finally:
            stop_target(env, t)
    return results


_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frame(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    file = m.group("file")
    for marker in ("site-packages/", "lib/python3.12/", "/work/main/", str(ROOT) + "/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return m.group("fn"), file


# The process's entry (click, the lean master): every sample is under them.
ENTRY_MODULES = {"cli/commands.py", "proxy/server.py", "runtime/supervisor.py",
                 "proxy/worker.py", "__main__.py"}


def summarize_profile(text: str) -> dict[str, Any]:
    """Self and inclusive sample shares from py-spy's raw (collapsed) output."""
    total = 0
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    luma_hooks: Counter[str] = Counter()
    dispatch = 0
    luma_incl = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        leaf_fn, leaf_file = frames[-1]
        self_time[f"{leaf_fn} ({leaf_file})"] += count
        top = leaf_file.split("/")
        pkg = top[0] if top[0] not in ("mitmproxy",) else "/".join(top[:3])
        by_file[pkg if leaf_file else leaf_fn] += count
        seen = set()
        for fn, f in frames:
            key = f"{fn} ({f})"
            if key not in seen:
                inclusive[key] += count
                seen.add(key)
        luma = [(fn, f) for fn, f in frames if f.startswith("luma_proxy/")
                and f.removeprefix("luma_proxy/") not in ENTRY_MODULES]
        if luma:
            luma_incl += count
            fn, f = luma[0]
            luma_hooks[f"{f.removeprefix('luma_proxy/')}:{fn}"] += count
        if any(f.endswith("mitmproxy/addonmanager.py") for _, f in frames):
            dispatch += count

    def pct(c: int) -> float:
        return round(100.0 * c / total, 1) if total else 0.0

    return {
        "samples": total,
        "luma_inclusive_pct": pct(luma_incl),
        "hook_dispatch_inclusive_pct": pct(dispatch),
        "luma_entry_points_pct": {k: pct(v) for k, v in luma_hooks.most_common(12)},
        "top_self_pct": {k: pct(v) for k, v in self_time.most_common(20)},
        "top_inclusive_pct": {k: pct(v) for k, v in inclusive.most_common(40)},
        "self_by_package_pct": {k: pct(v) for k, v in by_file.most_common(15)},
    }


# ----------------------------------------------------------------------------- report
def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def render_machine(m: dict[str, str], command: str) -> str:
    rows = [("`nproc`", m["nproc"]), ("`lscpu | grep 'Model name'`", m["cpu"]),
            ("memory", m["memory"]), ("kernel (`uname -r`)", m["kernel"]),
            ("Python", m["python"]), ("mitmproxy", m["mitmproxy"]), ("nginx", m["nginx"]),
            ("wrk", m["wrk"]), ("load average at start", m["loadavg_at_start"]),
            ("date", m["date"])]
    lines = [f"Produced by `{command}`.", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def render_throughput(r: dict[str, Any], command: str, m: dict[str, str]) -> str:
    targets = r["targets"]
    loads = [LOAD_BY_KEY[k] for k in LOAD_BY_KEY if any(k in t["loads"]
                                                          for t in targets.values())]
    base = targets.get("mitmdump", {}).get("loads", {})
    rounds = r.get("rounds", 1)
    out = [f"Command: `{command}` ({r['duration']:g} s per cell"
           + (f", {rounds} rounds, each cell the median round, the lower one of an even "
              "number" if rounds > 1 else "")
           + f"). Machine: {machine_line(m)}.",
           "",
           "Requests per second (ratio against bare `mitmdump -q` in the same run), "
           "p50 / p99 latency:", ""]
    header = "| target | " + " | ".join(load.title for load in loads) + " |"
    out += [header, "|---" * (len(loads) + 1) + "|"]
    for _key, t in targets.items():
        cells = []
        for load in loads:
            if t["unavailable"]:
                cells.append(t["unavailable"])
                continue
            x = t["loads"].get(load.key)
            if x is None:
                cells.append("-")
                continue
            if x.get("failed") and not x["rps"]:
                cells.append("failed")
                continue
            b = base.get(load.key, {}).get("rps")
            err = x["errors"] + x["non2xx"]
            rounds = x.get("rounds_rps", [])
            cells.append(f"**{x['rps']:,.0f}** ({ratio(x['rps'], b)})<br>"
                         f"{fmt_ms(x['p50_ms'])} / {fmt_ms(x['p99_ms'])}"
                         + (f"<br>{err} errors" if err else "")
                         + (f"<br>rounds: {', '.join(f'{v:,}' for v in rounds)}"
                            if len(rounds) > 1 else ""))
        out.append(f"| {t['title']} | " + " | ".join(cells) + " |")
    out += ["", "CPU of the target's processes during each cell, in cores busy (\"of\": "
            "cores busy on the whole machine meanwhile, out of "
            f"{m['nproc']}: the target, wrk, the upstream and any other work on this shared "
            "machine), and the target's microseconds of CPU per request:", ""]
    out += [header, "|---" * (len(loads) + 1) + "|"]
    for _key, t in targets.items():
        if t["unavailable"]:
            continue
        cells = []
        for load in loads:
            x = t["loads"].get(load.key)
            if not x or not x.get("requests"):
                cells.append("-")
                continue
            busy = f" of {x['machine_busy']:.2f}" if "machine_busy" in x else ""
            cells.append(f"{x['proxy_cpu']:.2f}{busy} ({x.get('cpu_us_per_req', 0):,.0f} µs)")
        out.append(f"| {t['title']} | " + " | ".join(cells) + " |")
    out += ["", "The direct row's CPU is nginx's (2 workers). Idle RSS after start: " + ", ".join(
        f"{t['title']} {'+'.join(str(v) for v in t['rss_idle_mib'])} MiB"
        for t in targets.values() if t.get("rss_idle_mib")) + ".", ""]
    out += ["<details><summary>Exact commands</summary>", ""]
    for _key, t in targets.items():
        out.append(f"- {t['title']}: `{t['cmd'] or t['unavailable']}`"
                   + (f" ({t['note']})" if t.get("note") else ""))
        for load in loads:
            if (x := t["loads"].get(load.key)) is not None:
                out.append(f"  - {load.title}: `{x['cmd']}`")
    out += ["", "</details>"]
    return "\n".join(out)


def goals(thr: dict[str, Any] | None, mem: dict[str, Any] | None, sc: dict[str, Any] | None,
          st: dict[str, Any] | None, soak_r: dict[str, Any] | None,
          ins: dict[str, Any] | None = None) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) rows."""
    rows: list[tuple[str, str, str]] = []

    def rps(key: str, load: str = "ka50") -> float | None:
        if not thr:
            return None
        t = thr["targets"].get(key)
        if not t or t["unavailable"]:
            return None
        return t["loads"].get(load, {}).get("rps") or None

    def p50(key: str, load: str = "c1") -> float | None:
        if not thr or key not in thr["targets"]:
            return None
        return thr["targets"][key]["loads"].get(load, {}).get("p50_ms")

    if thr:
        luma, noop = rps("luma"), rps("noop")

        def cpu(key: str, load: str = "ka50") -> float | None:
            t = thr["targets"].get(key)
            if not t or t["unavailable"]:
                return None
            return t["loads"].get(load, {}).get("cpu_us_per_req") or None

        def verdict(by_rps: bool, by_cpu: bool | None) -> str:
            """req/s is the goal's measure; CPU per request is the check against the noise
            of a shared machine (a target that got less of a core looks slower)."""
            if by_cpu is None or by_rps == by_cpu:
                return "met" if by_rps else "**missed**"
            return ("met by req/s, **missed** per CPU-second" if by_rps
                    else "**missed** by req/s, met per CPU-second")

        for load in ("ka50", "close50", "tls50", "1mib"):
            lr, br = rps("luma", load), rps("mitmdump", load)
            lc, bc = cpu("luma", load), cpu("mitmdump", load)
            if lr and br:
                per_cpu = (f"; per CPU-second {bc / lc:.2f}x ({lc:,.0f} vs {bc:,.0f} µs of CPU "
                           "per request)" if lc and bc else "")
                # Issue 14's bar for keep-alive and new connections; 1.6x (the first
                # issue's) for HTTPS and 1 MiB bodies, where TLS and copying dominate.
                bar = 2.2 if load in ("ka50", "close50") else 1.6
                title = ("`luma-proxy run` >= 2.2x bare `mitmdump -q` (50 keep-alive)"
                         if load == "ka50" else f"(same, {LOAD_BY_KEY[load].title}; >= {bar}x)")
                rows.append((title, f"{lr:,.0f} / {br:,.0f} req/s = {lr / br:.2f}x{per_cpu}",
                             verdict(lr / br >= bar, bc / lc >= bar if lc and bc else None)))
        workers = thr.get("workers", 2)
        n = min(workers, os.cpu_count() or 1)
        wt = thr["targets"].get("luma-workers")
        if wt and wt["unavailable"]:
            rows.append((f"`--workers {workers}` >= 0.8 x {n} x one worker", wt["unavailable"],
                         "not measured"))
        elif (w := rps("luma-workers")) and luma:
            v = w / (n * luma)
            wl = wt["loads"]["ka50"]
            lc, wc = cpu("luma"), cpu("luma-workers")
            per_cpu = ""
            if lc and wc:
                per_cpu = (f"; CPU per request {wc:,.0f} vs {lc:,.0f} µs (per-core efficiency "
                           f"{lc / wc:.2f}), {wl['proxy_cpu']:.2f} cores used of {n} "
                           f"(wrk and the upstream share them)")
            rows.append((f"`--workers {workers}` >= 0.8 x {n} x one worker",
                         f"{w:,.0f} / ({n} x {luma:,.0f}) = {v:.2f}{per_cpu}",
                         "met" if v >= 0.8 else "**missed**"))
        if (a := p50("luma")) is not None and (d := p50("direct")) is not None:
            lc1 = cpu("luma", "c1")
            rows.append(("added p50 latency at 1 client <= 1.0 ms over direct",
                         f"{a:.2f} - {d:.2f} = {a - d:.2f} ms"
                         + (f"; the proxy's CPU alone is {lc1 / 1000:.2f} ms per request"
                            if lc1 else ""),
                         "met" if a - d <= 1.0 else "**missed**"))
        if luma and noop:
            cost = 1 - luma / noop
            lc, nc = cpu("luma"), cpu("noop")
            extra = f"; CPU per request {lc:,.0f} vs {nc:,.0f} µs (+{(lc / nc - 1) * 100:.0f} %)" \
                if lc and nc else ""
            rows.append(("addon cost <= 10 % vs the lean master with a no-op routing addon",
                         f"{luma:,.0f} vs {noop:,.0f} req/s = {cost * 100:.0f} % fewer{extra}",
                         verdict(cost <= 0.10, lc / nc - 1 <= 0.10 if lc and nc else None)))
    if ins and {"luma", "noop"} <= ins["targets"].keys():
        lu, no = ins["targets"]["luma"]["per_request"], ins["targets"]["noop"]["per_request"]
        rows.append(("(same, in instructions per request under callgrind: free of the "
                     "machine's noise)", f"{lu:,.0f} vs {no:,.0f} (+{(lu / no - 1) * 100:.1f} %)",
                     "met" if lu / no - 1 <= 0.10 else "**missed**"))
    if mem:
        for _key, t in mem["targets"].items():
            if t.get("unavailable") or "idle_mib" not in t:
                continue
            idle = max(t["idle_mib"].values())
            loaded = max(t["loaded_mib"].values())
            rows.append((f"{t['title']}: RSS per process <= 80 MiB idle",
                         f"{idle:.0f} MiB", "met" if idle <= 80 else "**missed**"))
            rows.append((f"{t['title']}: RSS per process <= 200 MB with "
                         f"{mem['connections']:,} keep-alive clients",
                         f"{loaded:.0f} MiB ({t['opened']:,} connections open)",
                         "met" if loaded * 1.048576 <= 200 and t["opened"] == mem["connections"]
                         else "**missed**"))
    if soak_r and soak_r["samples"]:
        s = soak_r["samples"]
        first = s[min(1, len(s) - 1)]["rss_mib"]
        last = s[-1]["rss_mib"]
        rows.append((f"no RSS growth over a {soak_r['seconds'] / 60:g}-minute soak",
                     f"{first:.0f} MiB after the first minute -> {last:.0f} MiB at the end "
                     f"(max {max(x['rss_mib'] for x in s):.0f})",
                     "met" if last - first <= 5 else "**missed** (grows)"))
    if sc:
        sizes = sc["sizes"]
        if "10" in sizes and "10000" in sizes:
            a, b = sizes["10"]["route_cpu_us_min"], sizes["10000"]["route_cpu_us_min"]
            ca, cb = sizes["10"].get("route_calls"), sizes["10000"].get("route_calls")
            calls = f"; {ca:.0f} vs {cb:.0f} Python calls per request" if ca and cb else ""
            same_work = ca is not None and cb is not None and abs(ca - cb) <= 1
            rows.append(("routing cost with 10,000 services unchanged (in process)",
                         f"CPU {a:.1f} vs {b:.1f} µs per request ({(b / a - 1) * 100:+.0f} %)"
                         + calls,
                         "met" if b <= a * 1.10 or same_work else "**missed**"))
            wr = sc.get("wrk", {})
            if "10" in wr and "10000" in wr:
                a, b = wr["10"]["ka50"]["rps"], wr["10000"]["ka50"]["rps"]
                rows.append(("(same, `luma-proxy run` under wrk, 50 keep-alive)",
                             f"{a:,.0f} vs {b:,.0f} req/s ({(b / a - 1) * 100:+.0f} %)",
                             "met" if b >= a * 0.9 else "**missed**"))
            rl = sizes["10000"]["reload_ms_median"]
            rows.append(("a deploy on a 10,000-service registry is in the view in <= 100 ms",
                         f"{rl:.0f} ms median (max {sizes['10000']['reload_ms_max']:.0f}, "
                         f"CPU {sizes['10000']['reload_cpu_ms_median']:.0f}); "
                         f"swap alone {sizes['10000']['apply_ms_median']:.1f} ms",
                         "met" if rl <= 100 else "**missed**"))
    if st:
        for name, c in st["cases"].items():
            moved = c.get("container_received") if "upload" in name else c["downloaded"]
            ok = c["status"] == "200" and moved == st["bytes"]
            bounded = c["growth_mib"] <= 64
            rows.append((f"{st['bytes'] / ONE_GIB:g} GiB {name} with bounded RSS",
                         f"HTTP {c['status']}, peak RSS {c['peak_rss_mib']:.0f} MiB "
                         f"(+{c['growth_mib']:.0f} over idle), {c['mib_per_s']:.0f} MiB/s",
                         "met" if ok and bounded else "**missed**"))
        sse = st.get("sse")
        if sse:
            arr = sse["arrivals_s"]
            streamed = len(arr) >= 2 and arr[0] < sse["interval_s"] * 0.8
            rows.append(("server-sent events are streamed, not buffered",
                         f"events at {', '.join(f'{a:.2f}' for a in arr)} s "
                         f"(sent every {sse['interval_s']} s)",
                         "met" if streamed else "**missed**"))
    return rows


def render_goals(rows: list[tuple[str, str, str]], sources: str) -> str:
    out = [f"From the latest results of each section ({sources}).", "",
           "| goal | measured | verdict |", "|---|---|---|"]
    out += [f"| {g} | {m} | {v} |" for g, m, v in rows]
    return "\n".join(out)


def render_memory(r: dict[str, Any], command: str, m: dict[str, str]) -> str:
    out = [f"Command: `{command}`. Machine: {machine_line(m)}.", "",
           f"RSS (MiB) per process: idle after start, with {r['connections']:,} open "
           "keep-alive client connections (each has made one request, so each also "
           "holds an upstream connection), and 3 s after they closed.", "",
           "| target | process | idle | loaded | after close |", "|---|---|---|---|---|"]
    for t in r["targets"].values():
        if t.get("unavailable"):
            out.append(f"| {t['title']} | {t['unavailable']} | | | |")
            continue
        for pid, idle in t["idle_mib"].items():
            out.append(f"| {t['title']} | `{t['procs'].get(pid, pid)[:60]}` | {idle} | "
                       f"{t['loaded_mib'].get(pid, '-')} | {t['after_close_mib'].get(pid, '-')} |")
        out.append(f"| | connections opened | | {t['opened']:,} | |")
    out += ["", "Server commands: " + "; ".join(f"`{t['cmd']}`" for t in r["targets"].values()
                                                if t.get("cmd")),
            "The client is this script's asyncio connection holder (`_hold_connections`)."]
    return "\n".join(out)


def render_scale(r: dict[str, Any], command: str, m: dict[str, str]) -> str:
    out = [f"Command: `{command}`. Machine: {machine_line(m)}.", "",
           "In process (`LumaProxy.requestheaders` on 50 prepared flows for 50 different "
           "hosts, DNS answers cached; after a one-field deploy (a transaction): the rows "
           "that moved read (`snapshot`), the next view built (`build_view`) and swapped in):",
           "",
           "| services | registry (db + WAL) | route µs/request: wall median / CPU median / "
           "CPU min (5 runs) | Python calls per request | first load | reload wall median / max / "
           "CPU median (5 runs) | swap on the event loop (`_swap`) |",
           "|---|---|---|---|---|---|---|"]
    for n, s in r["sizes"].items():
        out.append(f"| {int(n):,} | {s['state_bytes'] / 1e6:.1f} MB | {s['route_us_median']:.1f}"
                   f" / {s['route_cpu_us_median']:.1f} / {s['route_cpu_us_min']:.1f} "
                   f"| {s.get('route_calls', 0):.0f} | {s['first_load_ms']:.0f} ms "
                   f"| {s['reload_ms_median']:.0f} / "
                   f"{s['reload_ms_max']:.0f} / {s['reload_cpu_ms_median']:.0f} ms "
                   f"| {s['apply_ms_median']:.1f} ms |")
    if r.get("wrk"):
        out += ["", "`luma-proxy run` with the same state files (`--health-interval 3600`, "
                "measured after the first health round of every service finished):", "",
                "| services | 1 client p50 | 50 keep-alive req/s | p99 | deploy CLI | "
                "deploy -> served |", "|---|---|---|---|---|---|"]
        for n, w in r["wrk"].items():
            out.append(f"| {int(n):,} | {fmt_ms(w['c1']['p50_ms'])} | {w['ka50']['rps']:,.0f} | "
                       f"{fmt_ms(w['ka50']['p99_ms'])} | {w['deploy_cli_s']:.2f} s | "
                       f"{w['deploy_to_served_ms']:.0f} ms |")
        out += ["", "Commands: " + "; ".join(f"`{w['cmd']}` + `{w['ka50']['cmd']}`"
                                              for w in r["wrk"].values()),
                "\"deploy -> served\" is from the `luma-proxy deploy` process exiting to the "
                "first 200 for the new host; it includes the reloader's 0.2 s poll."]
    return "\n".join(out)


def render_streaming(r: dict[str, Any], command: str, m: dict[str, str]) -> str:
    out = [f"Command: `{command}`. Machine: {machine_line(m)}.", "",
           f"Server: `{r.get('cmd', '')}`; upstream: a `tests/e2e/docker_double` container "
           "process on 127.0.0.3 (streams `/bytes` in 256 KiB pieces, counts uploads). "
           f"RSS of the proxy sampled every 50 ms; idle before: {r.get('rss_before_mib')} MiB.",
           "", "| case | status | MiB/s | peak RSS | growth | command |",
           "|---|---|---|---|---|---|"]
    for name, c in r["cases"].items():
        extra = f" (container received {c['container_received']:,})" if c.get(
            "container_received") is not None else ""
        out.append(f"| {name} | {c['status']}{extra} | {c['mib_per_s']} | {c['peak_rss_mib']} | "
                   f"+{c['growth_mib']} | `{c['cmd']}` |")
    if sse := r.get("sse"):
        out += ["", f"SSE (`GET /sse?n=5&interval={sse['interval_s']}`): events arrived at "
                f"{sse['arrivals_s']} s after the request."]
    return "\n".join(out)


def render_soak(r: dict[str, Any], command: str, m: dict[str, str]) -> str:
    out = [f"Command: `{command}`. Machine: {machine_line(m)}.", "",
           f"Server: `{r['cmd']}`. Alternating 30 s of 50 keep-alive clients and 30 s of "
           "connection-per-request clients: `" + "`, `".join(r.get("wrk_cmds", {}).values())
           + "`.", "",
           f"RSS idle before: {r['rss_idle_mib']} MiB; idle 3 s after the end: "
           f"{r['rss_end_idle_mib']} MiB.", "", "| t (s) | load | req/s | errors | RSS MiB |",
           "|---|---|---|---|---|"]
    out += [f"| {s['t_s']} | {s['load']} | {s['rps']:,} | {s['errors']} | {s['rss_mib']} |"
            for s in r["samples"]]
    return "\n".join(out)


def render_profile(r: dict[str, Any], command: str, m: dict[str, str]) -> str:
    out = [f"Command: `{command}`. Machine: {machine_line(m)}.", ""]
    for key, p in r["targets"].items():
        out += [f"**{key}** — `{p['cmd']}` under `{p['wrk']['cmd']}` "
                f"({p['wrk']['rps']:,.0f} req/s while sampled); profiler: `{p['spy_cmd']}`; "
                f"{p['samples']:,} samples (on-CPU only).", "",
                f"- inclusive share in luma-proxy code: **{p['luma_inclusive_pct']} %**; "
                f"under mitmproxy's hook dispatch (`addonmanager`, incl. the addons): "
                f"{p['hook_dispatch_inclusive_pct']} %",
                "- luma-proxy entry points (inclusive %): " + ", ".join(
                    f"`{k}` {v}" for k, v in p["luma_entry_points_pct"].items()),
                "- self time by package (%): " + ", ".join(
                    f"`{k}` {v}" for k, v in p["self_by_package_pct"].items()),
                "- top self time (%): " + ", ".join(
                    f"`{k}` {v}" for k, v in list(p["top_self_pct"].items())[:12]), ""]
    return "\n".join(out)


BEGIN = "<!-- BEGIN perf:{} -->"
END = "<!-- END perf:{} -->"


def update_doc(path: Path, blocks: dict[str, str]) -> None:
    """Replace the generated blocks; append a missing one at the end."""
    text = path.read_text() if path.exists() else "# Performance\n"
    for name, body in blocks.items():
        begin, end = BEGIN.format(name), END.format(name)
        block = f"{begin}\n{body.rstrip()}\n{end}"
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _m, b=block: b, text)
        else:
            text = text.rstrip() + f"\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")


def save(results_dir: Path, name: str, data: dict[str, Any], m: dict[str, str],
         command: str) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(
        {"command": command, "machine": m, "results": data}, indent=1, default=str) + "\n")


def load_saved(results_dir: Path, name: str) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((results_dir / f"{name}.json").read_text())
    return None


def render_instructions(r: dict[str, Any], command: str, m: dict[str, str]) -> str:
    out = [f"Command: `{command}`. Machine: {machine_line(m)}.", "",
           "| target | instructions per request | raw (with the idle work) | idle work "
           "| time for the requests under valgrind |", "|---|---|---|---|---|"]
    for t in r["targets"].values():
        out.append(f"| {t['title']} | {t['per_request']:,.0f} | {t['raw_per_request']:,.0f} "
                   f"| {t['idle_per_second']:,.0f}/s | {t['seconds']:.0f} s |")
    luma, noop = r["targets"].get("luma"), r["targets"].get("noop")
    if luma and noop:
        own, share = luma["per_request"] - noop["per_request"], luma["per_request"] / noop[
            "per_request"] - 1
        out += ["", f"luma-proxy's own cost: {own:,.0f} instructions per request, "
                f"**{share * 100:.1f} %** over the no-op lean master ({r['requests']} keep-alive "
                "requests from one client, after a warm-up)."]
    out += ["", "Commands (both with `PYTHONOPTIMIZE=1`, as `luma-proxy run` restarts itself "
            "with it; luma-proxy with `LUMA_PROXY_HEALTH_INTERVAL=3600 LUMA_PROXY_DNS_TTL=3600`: "
            "work per second, not per request, that valgrind's slowdown would charge to "
            "the requests ~40x over): " + "; ".join(f"`{t['cmd']}`"
                                                     for t in r["targets"].values())]
    return "\n".join(out)


RENDER = {"throughput": render_throughput, "memory": render_memory, "scale": render_scale,
          "streaming": render_streaming, "soak": render_soak, "profile": render_profile,
          "instructions": render_instructions}


def render_all(results_dir: Path) -> dict[str, str]:
    saved = {name: load_saved(results_dir, name) for name in RENDER}
    blocks: dict[str, str] = {}
    for name, s in saved.items():
        if s is not None:
            blocks[name] = RENDER[name](s["results"], s["command"], s["machine"])
    latest = max((s for s in saved.values() if s), key=lambda s: s["machine"]["date"],
                 default=None)
    if latest is not None:
        blocks["machine"] = render_machine(latest["machine"], latest["command"])
    rows = goals(*(saved[n]["results"] if saved[n] else None
                   for n in ("throughput", "memory", "scale", "streaming", "soak",
                             "instructions")))
    sources = ", ".join(f"{n}: `{s['command']}` on {s['machine']['date']}"
                        for n, s in saved.items() if s)
    blocks["goals"] = render_goals(rows, sources)
    return blocks


# ------------------------------------------------------------------------------ main
SECTIONS = ["throughput", "memory", "scale", "streaming"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", action="store_true", help="install wrk, nginx, curl, py-spy")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk cell")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per target")
    p.add_argument("--pause", type=float, default=1.0, help="seconds between cells")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the throughput sweep; each cell reports the median round")
    p.add_argument("--targets", default=",".join(TARGET_ORDER),
                   help=f"comma-separated, from {','.join(TARGET_ORDER)}")
    p.add_argument("--loads", default=",".join(LOAD_BY_KEY),
                   help=f"comma-separated, from {','.join(LOAD_BY_KEY)}")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated, from {','.join(SECTIONS)}")
    p.add_argument("--memory-conns", type=int, default=2000)
    p.add_argument("--scale-sizes", default="10,10000")
    p.add_argument("--route-iterations", type=int, default=20000)
    p.add_argument("--no-scale-wrk", dest="scale_wrk", action="store_false")
    p.add_argument("--stream-bytes", type=int, default=ONE_GIB)
    p.add_argument("--soak", type=float, nargs="?", const=600.0, default=None,
                   help="only run the soak, for SECONDS (default 600)")
    p.add_argument("--profile", action="store_true", help="only run the py-spy profiles")
    p.add_argument("--instructions", action="store_true",
                   help="only count instructions per request under callgrind (noop, luma)")
    p.add_argument("--instr-requests", type=int, default=600)
    p.add_argument("--instr-idle", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=DOC, help="markdown file to update")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: rewrite the report from the saved results")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    args.loads = [x for x in args.loads.split(",") if x]
    args.sections = [s for s in args.sections.split(",") if s]
    args.scale_sizes = [int(x) for x in args.scale_sizes.split(",") if x]
    for t in args.targets:
        if t not in TARGET_ORDER:
            p.error(f"unknown target {t}")
    for x in args.loads:
        if x not in LOAD_BY_KEY:
            p.error(f"unknown load {x}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["benchmarks/perf.py", *(argv if argv is not None else sys.argv[1:])])
    if args.setup:
        setup(profile=True)
        return 0
    if args.render_only:
        blocks = render_all(args.results_dir)
        update_doc(args.out, blocks)
        log(f"wrote {args.out}")
        return 0
    if have_tools() is not None:
        setup(profile=False)
    m = machine()
    log(machine_line(m))
    if args.soak is not None:
        sections = ["soak"]
    elif args.profile:
        sections = ["profile"]
    elif args.instructions:
        sections = ["instructions"]
    else:
        sections = args.sections
    runners = {"throughput": throughput, "memory": memory, "scale": scale,
               "streaming": streaming, "soak": soak, "profile": profile,
               "instructions": instructions}
    env = Env(keep=args.keep)
    produced: dict[str, dict[str, Any]] = {}
    try:
        for name in sections:
            log(f"section {name}")
            produced[name] = runners[name](env, args)
            save(args.results_dir, name, produced[name], m, command)
    finally:
        env.close()
    blocks = render_all(args.results_dir)
    for name in ("machine", *sections, "goals"):
        if name in blocks:
            print(f"\n## {name}\n\n{blocks[name]}")
    if not args.no_write:
        update_doc(args.out, blocks)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
