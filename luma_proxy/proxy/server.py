"""``luma-proxy run``: a lean mitmproxy master with only what serving needs.

mitmdump loads ~36 built-in addons and calls each of them on every hook;
most of the per-request cost is that dispatch. This master loads the five
built-ins a reverse proxy needs plus ours, so the same addon runs faster.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

from mitmproxy import hooks, master, options
from mitmproxy.addons import core, next_layer, proxyserver, tlsconfig
from mitmproxy.exceptions import OptionsError as OptionsError  # cli words these as bad input

from luma_proxy.proxy import engine
from luma_proxy.proxy.composition import all_addons
from luma_proxy.runtime import gcpolicy
from luma_proxy.runtime.runconfig import RunConfig

logger = logging.getLogger("luma_proxy")
SWITCH_INTERVAL = 0.001  # seconds a thread holds the GIL while another waits (default 0.005)


def lean_addons(ours: list[Any]) -> list[Any]:
    """The built-ins a reverse proxy needs, with ours before ``tlsconfig``.

    Ours must see ``tls_start_client`` first to hand it the host's certificate
    (as under mitmdump, where scripts sit before tlsconfig).
    """
    return [core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), *ours,
            tlsconfig.TlsConfig()]


def lean_master(opts: options.Options, environ: Mapping[str, str]) -> master.Master:
    """A master without addons, dispatching hooks through ``engine.HookTable``.

    ``LUMA_PROXY_DISPATCH=mitmproxy`` keeps mitmproxy's own ``AddonManager``.
    """
    lean = master.Master(opts)
    if environ.get("LUMA_PROXY_DISPATCH", "luma") != "mitmproxy":
        engine.install(lean)
    return lean


def modes(config: RunConfig) -> list[str]:
    """mitmproxy mode specs: one reverse listener per port, its target a dead end.

    The addon routes every request itself; the reverse target is only where a
    request would go if it did not, and nothing listens there. With ``http3``
    the HTTPS port also gets a UDP listener for QUIC (``reverse:http3``), in
    one process only: worker 0, or the single process.
    """
    ports = [config.http_port] + ([config.https_port] if config.https_port else [])
    # A reverse listener detects a TLS ClientHello by itself, so HTTPS is the same spec.
    specs = [f"reverse:http://127.0.0.1:1/@{config.listen_host}:{port}" for port in ports]
    if config.http3 and config.https_port:
        if config.worker_index:
            # mitmproxy_rs binds UDP without SO_REUSEPORT: one process only, worker 0.
            logger.info("HTTP/3 on %s:%d/udp is served by worker 0, not this worker",
                        config.listen_host, config.https_port)
        else:
            # QUIC on the HTTPS port's UDP side, next to its TCP listener (docs/http3.md).
            specs.append(f"reverse:http3://127.0.0.1:1/@{config.listen_host}:{config.https_port}")
    return specs


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # mitmproxy's own chatter (per-connection lines) stays out
    logging.getLogger("luma_proxy").setLevel(level)


async def graceful_stop(lean: master.Master) -> None:
    drain = lean.addons.get("drain")
    try:
        if drain is not None:
            await drain.drain()
    finally:
        lean.shutdown()


async def serve(config: RunConfig) -> int:
    if config.worker_index is not None:  # one of N processes on the same ports
        from luma_proxy.proxy.worker import enter_worker
        enter_worker(config.worker_index)
    opts = options.Options()
    lean = lean_master(opts, os.environ)
    lean.addons.add(*lean_addons(all_addons(serving=True)))
    opts.update(mode=modes(config), luma_https_port=config.https_port,
                luma_http3_port=config.https_port if config.http3 else 0, **config.options)
    # Master.addons.add() only loads; like mitmdump's script loader, tell every
    # addon about every option once so that defaults (from env) take effect.
    lean.addons.trigger(hooks.ConfigureHook(set(opts.keys())))
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        """First signal: drain gracefully; a second one: stop now."""
        if stopping:
            lean.shutdown()
            return
        stopping.append(asyncio.create_task(graceful_stop(lean)))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    run = asyncio.create_task(lean.run())
    ps = lean.addons.get("proxyserver")
    # Bringing up the listeners happens inside run(); a failure is only logged there.
    for _ in range(100):
        await asyncio.sleep(0.05)
        if run.done() or (not ps.servers.is_updating and list(ps.servers)):
            break
    failed = [s for s in ps.servers if not s.is_running]
    if failed or not list(ps.servers):
        detail = ", ".join(s.last_exception.__str__() for s in failed if s.last_exception)
        for s in failed:  # the stack, for LUMA_PROXY_LOG_LEVEL=debug; stderr keeps one line
            if s.last_exception is not None:
                logger.debug("cannot listen", exc_info=s.last_exception)
        print(f"luma-proxy: cannot listen: {detail or 'unknown error'}", file=sys.stderr)
        lean.shutdown()
        await run
        return 1
    addrs = ", ".join(f"{h}:{p}{'/udp' if s.mode.transport_protocol == 'udp' else ''}"
                      for s in ps.servers for h, p, *_ in s.listen_addrs)
    logger.info("listening on %s", addrs)
    # Everything loaded so far (mitmproxy, the registry's view, certificates) lives as
    # long as the process: out of the collector's full passes, which otherwise scan it
    # all again and again (at 10,000 services, a 100+ ms stall every few seconds of a
    # health round: benchmarks/tls_scale.py, docs/performance.md).
    gc.freeze()
    gcpolicy.hold_full_passes(loop)  # start-up's bulks still to come, built while serving
    # The health checks and file work run in threads; a thread that wants the GIL
    # back waits up to this long each time. At Python's 5 ms, a request on the loop
    # (a few syscalls, each giving the GIL up) waited up to 46 ms behind the first
    # health round of 10,000 services (benchmarks/tls_scale.py, docs/performance.md).
    sys.setswitchinterval(SWITCH_INTERVAL)
    if config.worker_index is not None:
        from luma_proxy.proxy.worker import worker_listening
        if not worker_listening(ps.servers):  # checks SO_REUSEPORT, tells the supervisor
            lean.shutdown()
            await run
            return 1
    await run
    return 0
