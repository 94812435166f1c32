"""The ``--workers`` pieces without mitmproxy: option parsing, argument hand-over,
port checks, the SO_REUSEPORT shim, and the supervisor driving fake supervisor."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import click
import pytest

from luma_proxy.cli.commands import run as run_command
from luma_proxy.runtime import supervisor
from tests.e2e.docker_double import free_port


# ----------------------------------------------------------------- the option
@pytest.mark.parametrize(("value", "count"), [("1", 1), ("3", 3), (" 2 ", 2)])
def test_parse_workers_counts(value: str, count: int) -> None:
    assert supervisor.parse_workers(value) == count


@pytest.mark.parametrize("value", ["0", "auto", "AUTO"])
def test_parse_workers_auto_is_one_per_core(value: str) -> None:
    assert supervisor.parse_workers(value) == (os.cpu_count() or 1)


@pytest.mark.parametrize("value", ["-1", "many", "1.5", ""])
def test_parse_workers_rejects(value: str) -> None:
    with pytest.raises(click.BadParameter):
        supervisor.parse_workers(value)


# ------------------------------------------------------------ argument hand-over
def run_context(args: list[str]) -> click.Context:
    return run_command.make_context("run", list(args))


def test_worker_args_repeat_the_command_line_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUMA_PROXY_STATE", "/from/env/state.json")
    ctx = run_context(["--http-port", "8080", "--workers", "3", "--no-log-query",
                       "--metrics-port", "9100", "--health-interval", "0.5"])
    args = supervisor.worker_args(ctx)
    assert args == ["--http-port", "8080", "--health-interval", "0.5", "--no-log-query",
                    "--metrics-port", "9100"]
    assert "/from/env/state.json" not in args  # derived again from the same environment


def test_worker_args_round_trip_to_the_same_values() -> None:
    given = ["--http-port", "8080", "--https-port", "8443", "--http3", "--listen-host",
             "127.0.0.1", "--log-query", "--state", "/tmp/s.json", "--workers", "auto", "--dns",
             "127.0.0.1:5353"]
    original = run_context(given)
    assert "--http3" in supervisor.worker_args(original)  # each worker serves what was asked
    again = run_context([*supervisor.worker_args(original), "--worker-index", "2"])
    assert again.params.pop("worker_index") == 2
    assert again.params.pop("workers") == 1
    original.params.pop("worker_index")
    original.params.pop("workers")
    assert again.params == original.params


def test_worker_command_does_not_put_the_cwd_on_sys_path() -> None:
    command = supervisor.worker_command(["--http-port", "80"], 1)
    assert command[:4] == [sys.executable, "-P", "-m", "luma_proxy"]
    assert command[4:] == ["run", "--http-port", "80", "--worker-index", "1"]


def test_worker_env_sets_or_clears_the_metrics_dir() -> None:
    base = {"PATH": "/bin", supervisor.MULTIPROC_ENV: "/stale"}
    assert supervisor.worker_env(base, "/tmp/m")[supervisor.MULTIPROC_ENV] == "/tmp/m"
    assert supervisor.MULTIPROC_ENV not in supervisor.worker_env(base, None)
    assert supervisor.worker_env(base, None)["PYTHONPATH"].split(os.pathsep)[0] == \
        next(p for p in sys.path if p)


# ------------------------------------------------------------------- ports
def test_ports_in_use_none_when_free() -> None:
    assert supervisor.ports_in_use("127.0.0.1", [free_port(), free_port()]) is None


def test_ports_in_use_names_the_port_held_by_anything() -> None:
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        assert supervisor.ports_in_use("127.0.0.1", [free_port(), port]) == \
            f"cannot listen on 127.0.0.1:{port}: Address already in use"


def test_ports_in_use_refuses_another_reuse_port_group() -> None:
    """Another --workers proxy on the port must not be joined silently."""
    with socket.create_server(("127.0.0.1", 0), reuse_port=True) as held:
        port = held.getsockname()[1]
        assert supervisor.ports_in_use("127.0.0.1", [port]) is not None


def test_restart_delay_doubles_up_to_a_cap() -> None:
    delays = [supervisor.restart_delay(n) for n in range(1, 12)]
    assert delays[:4] == [0.25, 0.5, 1.0, 2.0]
    assert delays[-1] == supervisor.MAX_RESTART_DELAY
    assert delays == sorted(delays)


def test_describe_exit() -> None:
    assert supervisor.describe_exit(3) == "exited with code 3"
    assert supervisor.describe_exit(-9) == "was killed by SIGKILL"


# ------------------------------------------------- the supervisor, fake workers
FAKE_WORKER = """
import os, signal, sys, time
from pathlib import Path
from luma_proxy.proxy import worker

index, mode, marks = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
mark = marks / f"{index}-{os.getpid()}"
runs = len(list(marks.glob(f"{index}-*")))
mark.write_text("")
if mode == "exit-at-start" and index == 0:
    print("Error: the reason, from the worker", file=sys.stderr)
    sys.exit(int(os.environ.get("FAKE_CODE", "1")))
worker.enable_reuse_port = lambda: None  # no listeners here to share
worker.missing_reuse_port = lambda addrs: []
worker.enter_worker(index)  # gate (index > 0) and lifeline, as in serve()
got = []  # like serve(): signal handlers only once past the gate
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
signal.signal(signal.SIGINT, lambda s, f: got.append(s))
if mode == "fail-restarts" and index == 1 and runs > 0:
    sys.exit(2)
worker.worker_listening([])
if mode == "crash-once" and index == 1 and runs == 0:
    time.sleep(0.2)
    os._exit(3)
while not got:
    time.sleep(0.01)
if mode == "ignore-term":
    while True:
        time.sleep(1)
time.sleep(0.05)  # a second, duplicate signal would arrive now
mark.write_text(" ".join(signal.Signals(s).name for s in got))
"""

DRIVER = """
import logging, sys
from luma_proxy.runtime import supervisor
logging.basicConfig(level=logging.INFO, format="%(message)s")
supervisor.FIRST_RESTART_DELAY = 0.01
fake, mode, marks, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
supervisor = supervisor.Supervisor(
    count, lambda i: [sys.executable, fake, str(i), mode, marks],
    supervisor.worker_env(dict(__import__("os").environ), None), stop_timeout=1.0,
    listening="fake")
sys.exit(supervisor.run())
"""


class Fake:
    def __init__(self, tmp: Path, mode: str, count: int = 3) -> None:
        self.marks = tmp / "marks"
        self.marks.mkdir()
        (tmp / "fake.py").write_text(textwrap.dedent(FAKE_WORKER))
        (tmp / "driver.py").write_text(textwrap.dedent(DRIVER))
        self.log = tmp / "log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(tmp / "driver.py"), str(tmp / "fake.py"), mode,
                 str(self.marks), str(count)], stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    def logs(self) -> str:
        return self.log.read_text()

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.logs():
            assert self.proc.poll() is None or text in self.logs(), self.logs()
            assert time.monotonic() < deadline, self.logs()
            time.sleep(0.02)

    def runs(self) -> dict[str, str]:
        return {p.name: p.read_text() for p in self.marks.iterdir()}

    def wait(self) -> int:
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.spawns
def test_sigint_from_a_terminal_reaches_each_worker_once(tmp_path: Path) -> None:
    fake = Fake(tmp_path, "ok")
    fake.wait_for("3 workers listening on fake")
    os.killpg(fake.proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
    assert fake.wait() == 0, fake.logs()
    assert sorted(fake.runs().values()) == ["SIGINT"] * 3  # forwarded once, not twice


@pytest.mark.spawns
def test_crashed_worker_is_restarted_with_a_logged_backoff(tmp_path: Path) -> None:
    fake = Fake(tmp_path, "crash-once")
    fake.wait_for("worker 1 listening again")
    assert "worker 1 (pid" in fake.logs() and "exited with code 3" in fake.logs()
    assert "restarting in 0.01s" in fake.logs()
    fake.proc.send_signal(signal.SIGTERM)
    assert fake.wait() == 0, fake.logs()
    assert len(fake.runs()) == 4


@pytest.mark.spawns
def test_worker_that_keeps_failing_at_start_gives_exit_1(tmp_path: Path) -> None:
    fake = Fake(tmp_path, "fail-restarts")
    fake.wait_for("3 workers listening")
    one = next(name for name in fake.runs() if name.startswith("1-"))
    os.kill(int(one.split("-")[1]), signal.SIGKILL)
    assert fake.wait() == 1
    assert f"luma-proxy: worker 1 failed to start {supervisor.MAX_START_FAILURES} times in a row " \
           "(last: exited with code 2); giving up" in fake.logs()
    assert not any(pid_alive(int(n.split("-")[1])) for n in fake.runs())


@pytest.mark.spawns
def test_worker_0_failing_at_start_is_its_one_line_and_the_others_never_bind(
        tmp_path: Path) -> None:
    fake = Fake(tmp_path, "exit-at-start")
    assert fake.wait() == 1
    assert fake.logs().strip().splitlines() == ["Error: the reason, from the worker"]
    assert all(not text for text in fake.runs().values())  # none got past the gate


@pytest.mark.spawns
def test_worker_dying_oddly_at_start_is_named(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FAKE_CODE", "7")
    fake = Fake(tmp_path, "exit-at-start")
    assert fake.wait() == 1
    assert "luma-proxy: worker 0 exited with code 7 before listening" in fake.logs()


@pytest.mark.spawns
def test_workers_ignoring_sigterm_are_killed_after_the_timeout(tmp_path: Path) -> None:
    fake = Fake(tmp_path, "ignore-term", count=2)
    fake.wait_for("2 workers listening")
    fake.proc.send_signal(signal.SIGTERM)
    assert fake.wait() == 1
    assert "still running after 1s; killing them" in fake.logs()
    assert not any(pid_alive(int(n.split("-")[1])) for n in fake.runs())


@pytest.mark.spawns
def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    fake = Fake(tmp_path, "ok", count=2)
    fake.wait_for("2 workers listening")
    fake.proc.kill()
    fake.wait()
    deadline = time.monotonic() + 10
    while any(pid_alive(int(n.split("-")[1])) for n in fake.runs()):
        assert time.monotonic() < deadline, "orphaned workers kept running"
        time.sleep(0.02)
    assert sorted(fake.runs().values()) == ["SIGTERM"] * 2  # they stopped themselves, gracefully
