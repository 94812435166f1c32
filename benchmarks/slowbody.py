"""A slow-body flood (slowhttptest -B) against `luma-proxy run`: are the slow connections cut?

Starts the Docker double's DNS, a recording container and the proxy (body
deadline from ``--body-timeout``), runs Debian's ``slowhttptest -B`` against it
and prints its CSV, how many bodies the proxy cut, and how many POSTs reached
the container complete (should be 0).

Usage: .venv/bin/python benchmarks/slowbody.py [--body-timeout 15] [--connections 200]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.docker_double import FakeDockerDNS, free_port, wait_for_port  # noqa: E402
from tests.e2e.recorder import Recorder  # noqa: E402

BIN = Path(sys.executable).parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--body-timeout", default="15")
    parser.add_argument("--connections", default="200")
    parser.add_argument("--seconds", default="40")
    args = parser.parse_args()
    work = tempfile.mkdtemp()
    state = f"{work}/state.json"
    dns = FakeDockerDNS().start()
    port, proxy_port = free_port(), free_port()
    rec = Recorder("127.0.9.9", port).start()
    dns.set_alias("rec", ["127.0.9.9"])
    # slowhttptest sends Host: 127.0.0.1:PORT, so that is the deployed host.
    subprocess.run([str(BIN / "luma-proxy"), "deploy", "--host", "127.0.0.1", "--target",
                    f"rec:{port}", "--project", "p", "--no-ssl", "--state", state],
                   check=True, capture_output=True)
    env = {**os.environ, "LUMA_PROXY_DNS": dns.address, "HOME": work,
           "LUMA_PROXY_BODY_TIMEOUT": args.body_timeout}
    with open(f"{work}/log", "wb") as log:
        proxy = subprocess.Popen([str(BIN / "luma-proxy"), "run", "--http-port", str(proxy_port),
                                  "--listen-host", "127.0.0.1", "--state", state],
                                 env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", proxy_port, 20)
        time.sleep(2)
        cmd = ["slowhttptest", "-B", "-c", args.connections, "-i", "5", "-r", "100", "-s", "8192",
               "-l", args.seconds, "-u", f"http://127.0.0.1:{proxy_port}/", "-t", "POST",
               "-x", "10", "-g", "-o", f"{work}/slow"]
        print(" ".join(cmd))
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=float(args.seconds) + 60)
        print(out.stdout[-400:])
        print(Path(f"{work}/slow.csv").read_text())
        cut = Path(f"{work}/log").read_text().count("body timeout: closing client")
        complete = sum(1 for r in rec.requests() if r.startswith(b"POST"))
        print(f"bodies cut by the deadline: {cut}; POSTs complete upstream: {complete}")
    finally:
        proxy.terminate()
        proxy.wait(10)
        rec.stop()
        dns.stop()


if __name__ == "__main__":
    main()
