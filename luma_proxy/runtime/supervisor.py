"""``luma-proxy run --workers N``: the supervisor of N processes serving the same ports
(the worker side is ``proxy/worker.py``).

mitmproxy runs one event loop on one core. To use more cores, the ``run``
process becomes a *supervisor* that starts N worker processes; every worker
is an ordinary ``luma-proxy run`` whose listeners set ``SO_REUSEPORT``, so the
kernel spreads new connections over them (per connection, by a hash of its
addresses). What workers share goes through the registry and files:

- routes: each worker follows the registry (a change is served by all of them
  within one reload poll);
- health: only the holder of the ``<state>.health.lock`` flock checks (see
  ``leadership.py``: a follower takes over within a second of the leader's
  end, and says so in the log) and writes the results to the registry; the
  others read them from there, so checks are not multiplied and workers agree
  within one reload poll;
- certificates: only that leader orders them; every worker loads them, and
  ACME challenge answers, from ``certs/``;
- metrics: in prometheus_client's multiprocess mode. The supervisor gives the
  workers a fresh ``PROMETHEUS_MULTIPROC_DIR`` and serves the sum on the
  metrics port itself (the workers record, and do not bind the port).

Supervisor <-> worker: each worker gets one end of a socketpair (its fd in
``LUMA_PROXY_WORKER_FD``). The worker writes ``ready`` on it once its listeners
are up; the supervisor writes only ``go`` (below), so the worker reads EOF
when the supervisor is gone (even by SIGKILL) and then stops itself instead of
lingering on the port as an orphan. Workers run in their own process group:
a terminal's Ctrl-C reaches the supervisor only, which forwards it once (a
second signal means "stop now, skip the drain" to a worker).

Startup: the ports are checked free first (without ``SO_REUSEPORT``, so a
port held by anything, including another ``--workers`` proxy, is refused
instead of silently shared). All workers start at once (imports are most of
the start-up time), but workers 1..N-1 wait for ``go`` before applying options
and binding, which they get once worker 0 listens: a bad option or a port
that cannot be bound gives the one line worker 0 prints, not N copies. Ready
is logged when all listen.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from luma_proxy.environ import MULTIPROC_ENV, drain_timeout

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from luma_proxy.runtime.runconfig import RunConfig

logger = logging.getLogger("luma_proxy")

# The channel's words and where its fd goes (the worker side: proxy/worker.py).
WORKER_FD_ENV = "LUMA_PROXY_WORKER_FD"
READY = b"ready\n"
GO = b"go\n"

FIRST_RESTART_DELAY = 0.25  # seconds before the first restart of a crashed worker; doubles
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 10.0  # a worker up this long has its crash count reset
MAX_START_FAILURES = 5  # consecutive restarts that never listened: give up, exit 1
STOP_GRACE = 10.0  # after forwarding SIGTERM/SIGINT, beyond the drain timeout: SIGKILL


# ------------------------------------------------------------------ the option
def parse_workers(value: str | int) -> int:
    """``--workers``: a count >= 1, or ``0``/``auto`` for one per core."""
    text = str(value).strip().lower()
    if text in ("0", "auto"):
        return os.cpu_count() or 1
    try:
        count = int(text)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number or 'auto'") from None
    if count < 0:
        raise click.BadParameter(f"{count} is negative")
    return count


def workers_option(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """click callback for ``--workers``."""
    return parse_workers(value)


# ------------------------------------------------------------ supervisor helpers
def worker_args(ctx: click.Context, skip: Iterable[str] = ("workers", "worker_index")) -> list[str]:
    """The ``run`` arguments given on the command line, to hand to each worker.

    Only values that came from the command line are repeated: defaults and
    environment values are derived again, identically, in the worker (same
    environment), and a secret set through the environment never appears in
    ``ps``. Generic over options, so options added to ``run`` later reach
    the workers without changes here.
    """
    out: list[str] = []
    positional: list[str] = []
    for param in ctx.command.params:
        name = param.name
        if name is None or name in skip or name not in ctx.params:
            continue
        source = ctx.get_parameter_source(name)
        if source not in (click.core.ParameterSource.COMMANDLINE,
                          click.core.ParameterSource.PROMPT):
            continue
        value = ctx.params[name]
        if isinstance(param, click.Argument):
            positional.extend(_strings(value, param.nargs != 1 or param.multiple))
            continue
        assert isinstance(param, click.Option)
        if param.count:
            out.extend([param.opts[0]] * int(value))
        elif param.is_flag:
            if param.secondary_opts:
                out.append(param.opts[0] if value else param.secondary_opts[0])
            elif value == param.flag_value:
                out.append(param.opts[0])
        elif value is not None:
            for item in (value if param.multiple else [value]):
                out.append(param.opts[0])
                out.extend(_strings(item, param.nargs != 1))
    return out + positional


def _strings(value: Any, many: bool) -> list[str]:
    return [str(v) for v in value] if many else [str(value)]


def worker_command(args: list[str], index: int) -> list[str]:
    """``python -P -m luma_proxy run ARGS --worker-index I`` (-P: the cwd is not on sys.path)."""
    return [sys.executable, "-P", "-m", "luma_proxy", "run", *args, "--worker-index", str(index)]


def worker_env(base: dict[str, str], metrics_dir: str | None) -> dict[str, str]:
    """The supervisor's environment, with its ``sys.path`` so workers import the same code."""
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    if metrics_dir is not None:
        env[MULTIPROC_ENV] = metrics_dir
    else:
        env.pop(MULTIPROC_ENV, None)  # a stale inherited dir would be summed in
    return env


def ports_in_use(host: str, ports: Iterable[int]) -> str | None:
    """None if every port can be bound; else one line saying which cannot and why.

    Binds *without* SO_REUSEPORT and closes again: a port with any listener,
    even a group of SO_REUSEPORT workers of another proxy, is refused.
    """
    for port in ports:
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except OSError as e:
            return f"cannot listen on {host}:{port}: {e}"
        for family, kind, proto, _name, addr in infos:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(addr)
                except OSError as e:
                    if e.errno == errno.EADDRNOTAVAIL and family == socket.AF_INET6:
                        continue  # no IPv6 here; asyncio skips it the same way
                    return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


def restart_delay(crashes: int) -> float:
    """Backoff before restarting a worker that crashed ``crashes`` times in a row (>= 1)."""
    return min(MAX_RESTART_DELAY, FIRST_RESTART_DELAY * 2 ** max(0, crashes - 1))


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


# ------------------------------------------------------------------- metrics
# What to serve: the sum of the workers' multiprocess files plus what only the
# registry and certs/ know (``proxy.metrics.supervisor_registry``, given by the CLI).
RegistryFactory = Callable[[str, str], "CollectorRegistry"]


class SupervisorMetrics:
    """The metrics port, served by the supervisor from the workers' multiprocess files."""

    def __init__(self, host: str, port: int, state_path: str,
                 registry: RegistryFactory) -> None:
        self.host, self.port, self.state_path = host, port, state_path
        self.registry = registry
        self.dir = tempfile.mkdtemp(prefix="luma-proxy-metrics-")
        self._server: Any = None

    def start(self) -> None:
        """Bind now, before any worker starts; a failure is logged, as in one process."""
        from prometheus_client import start_http_server

        try:
            self._server, _thread = start_http_server(
                self.port, self.host, self.registry(self.dir, self.state_path))
        except OSError as e:
            logger.error("cannot serve metrics on %s:%s: %s", self.host, self.port, e)
            return
        logger.info("metrics on http://%s:%s/metrics (sum of all workers)", self.host,
                    self._server.server_address[1])

    def process_dead(self, pid: int) -> None:
        """Drop a dead worker's live gauges (in flight); its counters stay in the sum."""
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, self.dir)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- supervisor
@dataclass
class Slot:
    """One worker position: the process in it now, and its crash history."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    channel: socket.socket | None = None
    started_at: float = 0.0
    ready: bool = False
    crashes: int = 0  # in a row, reset once a worker stays up STABLE_AFTER
    start_failures: int = 0  # in a row, exits before listening
    restart_at: float | None = None
    last_code: int | None = None


class StartFailed(Exception):
    """A worker could not start; the message (if any) is the one line to print."""


class Supervisor:
    """Starts N workers, restarts crashed ones, forwards SIGTERM/SIGINT, waits for them."""

    def __init__(self, count: int, command: Callable[[int], list[str]], env: dict[str, str],
                 stop_timeout: float = STOP_GRACE, on_exit: Callable[[int], None] | None = None,
                 listening: str = "") -> None:
        self.slots = [Slot(i) for i in range(count)]
        self.command = command
        self.env = env
        self.stop_timeout = stop_timeout
        self.on_exit = on_exit or (lambda _pid: None)
        self.listening = listening
        self.selector = selectors.DefaultSelector()
        self.signals: list[int] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._gate_open = False

    # ------------------------------------------------------------ running
    def run(self) -> int:
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: None)
        old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        try:
            return self._supervise()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._kill_all()
            self.selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signals.append(signum)

    def _supervise(self) -> int:
        try:
            for slot in self.slots:
                self._spawn(slot)
            self._await_ready(self.slots[:1])  # alone: a bad option or port fails once
            self._open_gate()
            self._await_ready(self.slots)
        except StartFailed as e:
            if str(e):
                print(f"luma-proxy: {e}", file=sys.stderr)
            self._stop(signal.SIGTERM, quiet=True)
            return 1
        except _Stopping as e:
            return self._stop(e.signum)
        pids = ", ".join(str(s.proc.pid) for s in self.slots if s.proc)
        logger.info("%d workers listening on %s (pids %s)", len(self.slots), self.listening, pids)
        while True:
            if self.signals:
                return self._stop(self.signals.pop(0))
            try:
                self._tick(self._next_timeout())
            except StartFailed as e:
                print(f"luma-proxy: {e}", file=sys.stderr)
                self._stop(signal.SIGTERM, quiet=True)
                return 1

    def _await_ready(self, slots: list[Slot]) -> None:
        """Wait until these workers listen; raise StartFailed if one exits."""
        while not all(s.ready for s in slots):
            if self.signals:
                raise _Stopping(self.signals.pop(0))
            self._tick(min(1.0, self._next_timeout()), starting=True)

    def _open_gate(self) -> None:
        """Worker 0 listens: the others may apply options and bind (restarts need no turn)."""
        self._gate_open = True
        for slot in self.slots[1:]:
            self._go(slot)

    def _go(self, slot: Slot) -> None:
        if slot.channel is not None:
            with contextlib.suppress(OSError):
                slot.channel.sendall(GO)

    def _next_timeout(self) -> float:
        due = [s.restart_at for s in self.slots if s.proc is None and s.restart_at is not None]
        return max(0.0, min(due) - time.monotonic()) if due else 1.0

    # ------------------------------------------------------ one worker
    def _spawn(self, slot: Slot) -> None:
        mine, theirs = socket.socketpair()
        env = {**self.env, WORKER_FD_ENV: str(theirs.fileno())}
        try:
            slot.proc = subprocess.Popen(self.command(slot.index), env=env, process_group=0,
                                         pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except OSError as e:
            mine.close()
            raise StartFailed(f"cannot start worker {slot.index}: {e}") from None
        finally:
            theirs.close()
        mine.setblocking(False)
        slot.channel = mine
        slot.started_at = time.monotonic()
        slot.ready = False
        slot.restart_at = None
        self.selector.register(mine, selectors.EVENT_READ, slot)
        if self._gate_open and slot.index > 0:
            self._go(slot)
        logger.debug("worker %d started (pid %d)", slot.index, slot.proc.pid)

    def _tick(self, timeout: float, starting: bool = False) -> None:
        """Wait for a message, a signal or a child's exit (or timeout); handle what came."""
        for key, _events in self.selector.select(timeout):
            if key.data is None:
                with contextlib.suppress(OSError):
                    while self._wake_r.recv(512):
                        pass
            else:
                self._read(key.data)
        for slot in self.slots:
            if slot.proc is not None and (code := slot.proc.poll()) is not None:
                self._read(slot)  # a "ready" sent just before exiting
                self._exited(slot, code, starting)
        now = time.monotonic()
        for slot in self.slots:
            if slot.proc is None and slot.restart_at is not None and slot.restart_at <= now \
                    and not self.signals:
                self._spawn(slot)

    def _read(self, slot: Slot) -> None:
        if slot.channel is None:
            return
        try:
            data = slot.channel.recv(512)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if READY.strip() in data and not slot.ready:
            slot.ready = True
            if slot.crashes:
                logger.info("worker %d listening again (pid %d)", slot.index,
                            slot.proc.pid if slot.proc else 0)
        if not data:
            self._close_channel(slot)

    def _close_channel(self, slot: Slot) -> None:
        if slot.channel is not None:
            self.selector.unregister(slot.channel)
            slot.channel.close()
            slot.channel = None

    def _exited(self, slot: Slot, code: int, starting: bool) -> None:
        assert slot.proc is not None
        pid, was_ready = slot.proc.pid, slot.ready
        uptime = time.monotonic() - slot.started_at
        self._close_channel(slot)
        slot.proc, slot.ready, slot.last_code = None, False, code
        self.on_exit(pid)
        if starting and not was_ready:
            # Exit code 1: the worker printed its reason (a CLI error, "cannot listen").
            raise StartFailed("" if code == 1 else
                              f"worker {slot.index} {describe_exit(code)} before listening")
        slot.crashes = 1 if uptime >= STABLE_AFTER else slot.crashes + 1
        slot.start_failures = 0 if was_ready else slot.start_failures + 1
        if slot.start_failures >= MAX_START_FAILURES:
            raise StartFailed(f"worker {slot.index} failed to start {slot.start_failures} "
                              f"times in a row (last: {describe_exit(code)}); giving up")
        delay = restart_delay(slot.crashes)
        slot.restart_at = time.monotonic() + delay
        logger.warning("worker %d (pid %d) %s after %.1fs; restarting in %.2fs", slot.index, pid,
                       describe_exit(code), uptime, delay)

    # ------------------------------------------------------------ stopping
    def _live(self) -> list[Slot]:
        return [s for s in self.slots if s.proc is not None]

    def _stop(self, signum: int, quiet: bool = False) -> int:
        """Forward the signal, wait up to stop_timeout, then SIGKILL. 0 if all stopped cleanly."""
        if not quiet:
            logger.info("stopping %d worker(s) (%s)", len(self._live()),
                        signal.Signals(signum).name)
        clean = True
        self._send(signum)
        deadline = time.monotonic() + self.stop_timeout
        while self._live() and time.monotonic() < deadline:
            if self.signals:
                self._send(self.signals.pop(0))  # a second Ctrl-C: the workers decide
            self._wait_exits(min(0.5, max(0.0, deadline - time.monotonic())))
        for slot in self.slots:
            if slot.last_code is not None and slot.last_code not in (0, -signum):
                clean = False
        if self._live():
            logger.warning("worker(s) %s still running after %.0fs; killing them",
                           ", ".join(str(s.index) for s in self._live()), self.stop_timeout)
            self._kill_all()
            clean = False
        return 0 if clean else 1

    def _send(self, signum: int) -> None:
        for slot in self._live():
            assert slot.proc is not None
            with contextlib.suppress(ProcessLookupError):
                slot.proc.send_signal(signum)
        for slot in self.slots:
            slot.restart_at = None

    def _wait_exits(self, timeout: float) -> None:
        self.selector.select(timeout)
        with contextlib.suppress(OSError):
            while self._wake_r.recv(512):
                pass
        for slot in self._live():
            assert slot.proc is not None
            if (code := slot.proc.poll()) is not None:
                pid = slot.proc.pid
                self._close_channel(slot)
                slot.proc, slot.ready, slot.last_code = None, False, code
                self.on_exit(pid)

    def _kill_all(self) -> None:
        for slot in self._live():
            assert slot.proc is not None
            with contextlib.suppress(ProcessLookupError):
                slot.proc.kill()
            slot.last_code = slot.proc.wait()
            self._close_channel(slot)
            self.on_exit(slot.proc.pid)
            slot.proc = None


class _Stopping(Exception):
    """A stop signal arrived while workers were starting."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# ------------------------------------------------------------------ entry
def listening_text(config: RunConfig) -> str:
    ports = [config.http_port] + ([config.https_port] if config.https_port else [])
    return ", ".join(f"{config.listen_host}:{p}" for p in ports)


def stop_timeout_for(config: RunConfig) -> float:
    """How long workers get after the forwarded signal: their drain timeout + a grace."""
    drain = config.options.get("luma_drain_timeout")
    if drain is None:  # the option's own default (env LUMA_PROXY_DRAIN_TIMEOUT, else 30 s)
        drain = drain_timeout()
    return float(drain) + STOP_GRACE


def supervise(config: RunConfig, count: int, ctx: click.Context,
              metrics_registry: RegistryFactory | None = None) -> int:
    """``luma-proxy run --workers N`` (N > 1): run N workers until SIGTERM/SIGINT."""
    ports = [config.http_port] + ([config.https_port] if config.https_port else [])
    if (problem := ports_in_use(config.listen_host, ports)) is not None:
        print(f"luma-proxy: {problem}", file=sys.stderr)
        return 1
    metrics: SupervisorMetrics | None = None
    if (port := int(config.options.get("luma_metrics_port") or 0)) and metrics_registry:
        metrics = SupervisorMetrics(str(config.options.get("luma_metrics_host") or "127.0.0.1"),
                                    port, str(config.options["luma_state"]), metrics_registry)
        metrics.start()
    args = worker_args(ctx)
    supervisor = Supervisor(
        count, lambda i: worker_command(args, i),
        worker_env(dict(os.environ), metrics.dir if metrics else None),
        stop_timeout=stop_timeout_for(config),
        on_exit=metrics.process_dead if metrics else None,
        listening=listening_text(config),
    )
    try:
        return supervisor.run()
    finally:
        if metrics is not None:
            metrics.close()

