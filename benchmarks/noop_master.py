"""The lean master of ``luma-proxy run`` with a no-op routing addon instead of luma-proxy's.

The reference for "what does luma-proxy's own code cost": the same five built-in
addons (``server.lean_addons``), the same listener specs (``server.modes``), the
same engine options, and one addon that sends every request to a fixed upstream
and does nothing else (no lookup, no health, no headers, no log, no metrics).

    python benchmarks/noop_master.py --port 8080 --upstream 127.0.0.1:8081 \
        [--https-port 8443 --cert PEM]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from luma_proxy.proxy import engine_patches
from luma_proxy.runtime import startup

engine_patches.skip_addon_registry()  # as `luma-proxy run` does, before the lean master

from mitmproxy import hooks, http, master, options  # noqa: E402

from luma_proxy.proxy import engine  # noqa: E402
from luma_proxy.proxy.server import lean_addons, modes  # noqa: E402
from luma_proxy.runtime.runconfig import RunConfig  # noqa: E402


class NoopRoute:
    """Route every request to one upstream; keep the Host header as sent."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        raw_host = request.host_header
        request.scheme = "http"
        request.host = self.host
        request.port = self.port
        request.host_header = raw_host


async def serve(args: argparse.Namespace) -> None:
    host, _, port = args.upstream.rpartition(":")
    opts = options.Options()
    lean = master.Master(opts)
    if not args.mitmproxy_dispatch:
        engine.install(lean)
    lean.addons.add(*lean_addons([NoopRoute(host, int(port))]))
    config = RunConfig(listen_host=args.listen_host, http_port=args.port,
                       https_port=args.https_port)
    extra: dict[str, Any] = {"keep_host_header": True, "connection_strategy": "lazy"}
    if args.cert:
        extra["certs"] = [f"*={args.cert}"]
    opts.update(mode=modes(config), **extra)
    lean.addons.trigger(hooks.ConfigureHook(set(opts.keys())))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lean.shutdown)
    await lean.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--https-port", type=int, default=0)
    parser.add_argument("--upstream", required=True, help="IP:PORT every request goes to")
    parser.add_argument("--mitmproxy-dispatch", action="store_true",
                        help="keep mitmproxy's AddonManager instead of luma_proxy.proxy.engine's")
    parser.add_argument("--cert", default="", help="PEM (certificate + key) for HTTPS")
    # The same event loop as `luma-proxy run` (uvloop unless LUMA_PROXY_EVENT_LOOP=asyncio).
    asyncio.run(serve(parser.parse_args()), loop_factory=startup.loop_factory(os.environ))


if __name__ == "__main__":
    main()
