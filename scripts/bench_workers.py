"""Requests/s of ``luma-proxy run --workers N`` for a few N, with wrk and an nginx upstream.

    .venv/bin/python scripts/bench_workers.py [N ...]      # default: 1 2

Everything on loopback: nginx answers ``ok`` on 127.0.0.1:<port>, the Docker
DNS double maps the alias ``bench`` to 127.0.0.1, and wrk sends 50 keep-alive
connections for 10 s per run. wrk and nginx share the cores with the proxy, so
the numbers are a comparison between N on this machine, not a capacity figure.
Prints the load average too: on a busy machine the numbers mean little.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.docker_double import FakeDockerDNS, free_port, wait_for_port  # noqa: E402

LUMA = str(Path(sys.executable).parent / "luma-proxy")
NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
    uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
    server {{ listen 127.0.0.1:{port}; keepalive_requests 100000;
             location / {{ return 200 "ok\\n"; }} }}
}}
"""


def bench(count: int, tmp: Path, env: dict[str, str]) -> float:
    port = free_port()
    log = (tmp / f"proxy-{count}.log").open("wb")
    proxy = subprocess.Popen(
        [LUMA, "run", "--workers", str(count), "--http-port", str(port),
         "--listen-host", "127.0.0.1"], env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 120
        ready = "workers listening" if count > 1 else "listening on"
        while ready not in (tmp / f"proxy-{count}.log").read_text():
            if proxy.poll() is not None or time.monotonic() > deadline:
                raise SystemExit((tmp / f"proxy-{count}.log").read_text())
            time.sleep(0.1)
        wait_for_port("127.0.0.1", port)
        out = subprocess.run(
            ["wrk", "-t2", "-c50", "-d10s", "-H", "Host: bench.test", f"http://127.0.0.1:{port}/"],
            capture_output=True, text=True, check=True).stdout
        match = re.search(r"Requests/sec:\s+([\d.]+)", out)
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
        if errors:
            print(f"  wrk reported: {errors.group(0)}")
        return float(match.group(1)) if match else 0.0
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(60)


def main() -> None:
    counts = [int(a) for a in sys.argv[1:]] or [1, 2]
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        upstream = free_port()
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=upstream))
        nginx = subprocess.Popen(["nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)],
                                 stderr=subprocess.DEVNULL)
        dns = FakeDockerDNS().start()
        try:
            wait_for_port("127.0.0.1", upstream)
            dns.set_alias("bench", ["127.0.0.1"])
            env = {**os.environ, "LUMA_PROXY_STATE": str(tmp / "state.json"),
                   "LUMA_PROXY_DNS": dns.address, "HOME": str(tmp)}
            subprocess.run([LUMA, "deploy", "--host", "bench.test", "--target",
                            f"bench:{upstream}", "--project", "bench", "--no-ssl"],
                           env=env, check=True, capture_output=True)
            print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()}")
            for count in counts:
                rate = bench(count, tmp, env)
                print(f"--workers {count}: {rate:,.0f} requests/s "
                      f"(load average after: {os.getloadavg()[0]:.1f})", flush=True)
        finally:
            dns.stop()
            nginx.terminate()
            nginx.wait()


if __name__ == "__main__":
    main()
