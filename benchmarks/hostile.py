"""Normal clients' experience while others misbehave.

1. 500 slowloris connections trickle header bytes: success rate and latency of
   normal requests meanwhile, and when the slow connections get cut.
2. One service's container hangs every request: p50/p99 of a healthy
   service's requests, against the same measure with no hanging traffic.

Usage: .venv/bin/python benchmarks/hostile.py [--seconds 10]
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.docker_double import (  # noqa: E402
    Container,
    FakeDockerDNS,
    free_port,
    wait_for_port,
)
from tests.e2e.test_security import FaultyContainer  # noqa: E402

LUMA = str(Path(sys.executable).parent / "luma-proxy")


def timed_get(port: int, host: str, path: str = "/", timeout: float = 30) -> tuple[int, float]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        status = conn.getresponse().status
    except OSError:
        status = 0
    finally:
        conn.close()
    return status, (time.perf_counter() - started) * 1000


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def normal_load(port: int, seconds: float) -> list[tuple[int, float]]:
    results = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        results.append(timed_get(port, "blog.test"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--slow", type=int, default=500)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="luma-hostile-"))
    state = work / "state.json"
    dns = FakeDockerDNS().start()
    port = free_port()
    blog = Container("blog-1", "127.0.50.1", port).start()
    faulty = FaultyContainer("127.0.50.2", port)
    dns.set_alias("blog", [blog.ip])
    dns.set_alias("faulty", [faulty.ip])
    for host, alias in (("blog.test", "blog"), ("faulty.test", "faulty")):
        subprocess.run([LUMA, "deploy", "--host", host, "--target", f"{alias}:{port}",
                        "--project", "p", "--no-ssl", "--state", str(state)], check=True,
                       capture_output=True)
    proxy_port = free_port()
    env = {**os.environ, "LUMA_PROXY_DNS": dns.address, "HOME": str(work),
           "LUMA_PROXY_HEADER_TIMEOUT": "5", "LUMA_PROXY_RESPONSE_TIMEOUT": "5"}
    proxy = subprocess.Popen([LUMA, "run", "--http-port", str(proxy_port), "--listen-host",
                              "127.0.0.1", "--state", str(state)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows: list[tuple[str, str]] = []
    try:
        wait_for_port("127.0.0.1", proxy_port, 20)
        time.sleep(1)
        base = normal_load(proxy_port, args.seconds)
        lat = [ms for s, ms in base if s == 200]
        rows.append(("baseline: requests ok / total", f"{len(lat)} / {len(base)}"))
        rows.append(("baseline: p50 / p99 ms", f"{pct(lat, .5):.2f} / {pct(lat, .99):.2f}"))

        slow = []
        for _ in range(args.slow):
            s = socket.create_connection(("127.0.0.1", proxy_port))
            s.sendall(b"GET / HTTP/1.1\r\nHost: blog.test\r\n")
            slow.append(s)
        opened = time.monotonic()
        stop = threading.Event()

        def trickle() -> None:
            while not stop.is_set():
                for s in slow:
                    with contextlib.suppress(OSError):
                        s.sendall(b"X: y\r\n")
                time.sleep(0.5)

        threading.Thread(target=trickle, daemon=True).start()
        during = normal_load(proxy_port, min(args.seconds, 4.5))
        stop.set()
        lat = [ms for s, ms in during if s == 200]
        rows.append((f"{args.slow} slowloris: requests ok / total", f"{len(lat)} / {len(during)}"))
        rows.append((f"{args.slow} slowloris: p50 / p99 ms",
                     f"{pct(lat, .5):.2f} / {pct(lat, .99):.2f}"))
        cut = []
        for s in slow:
            s.settimeout(30)
            with contextlib.suppress(OSError):
                s.recv(1)
            cut.append(time.monotonic() - opened)
            s.close()
        rows.append(("slowloris cut after (s, header timeout 5)", f"max {max(cut):.1f}"))

        hang_stop = threading.Event()

        def hang() -> None:
            while not hang_stop.is_set():
                timed_get(proxy_port, "faulty.test", "/hang")

        hangers = [threading.Thread(target=hang, daemon=True) for _ in range(20)]
        for t in hangers:
            t.start()
        time.sleep(0.5)
        hung = normal_load(proxy_port, args.seconds)
        hang_stop.set()
        lat = [ms for s, ms in hung if s == 200]
        rows.append(("20 hung requests on another service: ok / total",
                     f"{len(lat)} / {len(hung)}"))
        rows.append(("20 hung requests on another service: p50 / p99 ms",
                     f"{pct(lat, .5):.2f} / {pct(lat, .99):.2f}"))
        base_p99 = pct([ms for s, ms in base if s == 200], .99)
        rows.append(("p99 ratio hung / baseline", f"{pct(lat, .99) / base_p99:.2f}"))
    finally:
        proxy.terminate()
        proxy.wait()
        faulty.close()
        blog.stop(grace=1)
        dns.stop()
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"\nmedian of baseline: {statistics.median(ms for _, ms in base):.2f} ms")


if __name__ == "__main__":
    main()
