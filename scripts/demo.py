"""Run the proxy in front of a demo container, with Docker's DNS played locally.

Started by ``scripts/demo.sh``; everything lives under ``.demo/`` and stops on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.docker_double import Container, FakeDockerDNS, free_port  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    workdir = ROOT / ".demo"
    workdir.mkdir(exist_ok=True)
    state = workdir / "state.json"
    for stale in (state, *workdir.glob("state.db*")):  # each demo starts from no routes
        stale.unlink(missing_ok=True)
    luma = str(Path(sys.executable).parent / "luma-proxy")

    dns = FakeDockerDNS().start()
    app_port = free_port("127.0.0.2")
    blue = Container("demo-blue-1", "127.0.0.2", app_port).start()
    green = Container("demo-green-1", "127.0.0.3", app_port).start()
    dns.set_alias("demo", [blue.ip])
    env = {**os.environ, "LUMA_PROXY_STATE": str(state), "LUMA_PROXY_DNS": dns.address,
           "HOME": str(workdir)}
    subprocess.run([luma, "deploy", "--host", "demo.localhost", "--target", f"demo:{app_port}",
                    "--project", "demo", "--no-ssl"], env=env, check=True)
    print(f"""
luma-proxy demo: http://127.0.0.1:{args.port}/  (Ctrl-C stops it)
  curl -H 'Host: demo.localhost' http://127.0.0.1:{args.port}/        -> demo-blue-1
  curl -H 'Host: nothing.localhost' http://127.0.0.1:{args.port}/     -> 404
  LUMA_PROXY_STATE={state} .venv/bin/luma-proxy list
Type 'switch' + Enter to move the alias `demo` between blue and green.
""", flush=True)
    proxy = subprocess.Popen([luma, "run", "--http-port", str(args.port),
                              "--listen-host", "127.0.0.1"], env=env)
    signal.signal(signal.SIGTERM, lambda *_: proxy.terminate())
    try:
        colour = blue
        for line in sys.stdin:
            if line.strip() == "switch":
                colour = green if colour is blue else blue
                dns.set_alias("demo", [colour.ip])
                print(f"alias demo -> {colour.name}", flush=True)
        return proxy.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        proxy.terminate()
        proxy.wait()
        blue.stop(grace=1)
        green.stop(grace=1)
        dns.stop()


if __name__ == "__main__":
    sys.exit(main())
