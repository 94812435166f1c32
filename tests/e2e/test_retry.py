"""Issue 15: a refused connect is retried on another IP of the alias, not answered 502."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.e2e.bluegreen import BIN, LUMA, Deployment, LoadGenerator


@pytest.mark.parametrize("command", [(LUMA, "run"), (str(BIN / "mitmdump"),),
                                     (str(BIN / "mitmweb"),)], ids=["run", "mitmdump", "mitmweb"])
def test_refused_connects_to_a_dead_replica_are_retried_on_the_survivor(
        tmp_path: Path, command: tuple[str, ...]) -> None:
    """SIGKILL one of two replicas under new-connection load: no request sent after it fails.

    Health checks are far apart (600 s) and the dead IP stays in DNS, so only the connect
    retry can save the requests that pick it.
    """
    with Deployment(tmp_path / "bg", health_interval=600, proxy_command=command) as dep:
        assert dep.live is not None and dep.proxy is not None
        dead, survivor = dep.live.replicas
        load = LoadGenerator(dep.proxy.port, dep.host, keepalive=0, fresh=4).start()
        time.sleep(1.0)
        killed = time.monotonic()
        dead.proc.send_signal(signal.SIGKILL)
        dead.proc.wait(5)
        time.sleep(3.5)  # past the 2 s passive ejection: the dead IP is tried again
        samples = load.stop()
        after = [s for s in samples if s.sent >= killed + 0.05]  # in flight at the kill: not ours
        failed = [s for s in after if not s.ok]
        assert len(after) > 50, len(after)
        assert failed == [], [(s.status, s.sent - killed) for s in failed]
        assert {s.container for s in after} == {survivor.name}
