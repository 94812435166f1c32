"""A deploy is served when the command returns (``served.py``), and ``deploy --wait``.

A deploy tool stops the old containers right after ``luma-proxy deploy``;
the proxy reloads on its own every 0.2 s, so before the command waited, a
request sent at once could still find the old routes.
"""

from __future__ import annotations

import signal
import subprocess
import time

from luma_proxy.store.registry import Store
from tests.e2e.conftest import LUMA
from tests.e2e.docker_double import Container, free_port


def test_the_first_request_after_deploy_remove_and_switch_is_routed_the_new_way(
        dns, containers, cli, start_proxy, proxy_kind):
    blue, green = containers("blue-1"), containers("green-1")
    dns.set_alias("blue", [blue.ip])
    dns.set_alias("green", [green.ip])
    proxy = start_proxy(proxy_kind)
    for n in range(3):
        host = f"app{n}.test"
        cli("deploy", "--host", host, "--target", f"blue:{blue.port}", "--project", "p",
            "--no-ssl")
        assert proxy.get(host).text.startswith("blue-1")  # no wait, no retry
        cli("switch", "--host", host, "--target", f"green:{green.port}")
        assert proxy.get(host).text.startswith("green-1")
        cli("remove", "--host", host)
        assert proxy.get(host).status == 404


def test_a_proxy_that_does_not_answer_costs_a_bounded_wait_and_a_warning_on_stdout(
        dns, containers, cli, start_proxy, state_path, tmp_path):
    c = containers("blog-1")
    dns.set_alias("blog", [c.ip])
    proxy = start_proxy("run")
    cli("deploy", "--host", "a.test", "--target", f"blog:{c.port}", "--project", "p",
        "--no-ssl")
    proxy.proc.send_signal(signal.SIGSTOP)  # alive (its lock held) but reading nothing
    try:
        started = time.monotonic()
        result = subprocess.run(
            [LUMA, "deploy", "--host", "b.test", "--target", f"blog:{c.port}", "--project",
             "p", "--no-ssl", "--state", str(state_path)],
            capture_output=True, text=True, timeout=30,
            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                 "LUMA_PROXY_SERVED_TIMEOUT": "1"})
        took = time.monotonic() - started
    finally:
        proxy.proc.send_signal(signal.SIGCONT)
    assert result.returncode == 0 and result.stderr == ""
    assert "did not take the change within 1s" in result.stdout
    assert "✅ Deployed b.test" in result.stdout
    assert 1 <= took < 10
    assert "b.test" in Store(state_path).read().services  # saved all the same


def test_a_killed_proxy_is_not_waited_for(dns, containers, cli, start_proxy):
    c = containers("blog-1")
    dns.set_alias("blog", [c.ip])
    proxy = start_proxy("run")
    cli("deploy", "--host", "a.test", "--target", f"blog:{c.port}", "--project", "p",
        "--no-ssl")
    proxy.stop(signal.SIGKILL)  # its served file stays, its lock is gone
    started = time.monotonic()
    result = cli("deploy", "--host", "b.test", "--target", f"blog:{c.port}", "--project", "p",
                 "--no-ssl")
    assert time.monotonic() - started < 3
    assert "did not take" not in result.stdout


def deploy_wait(dns, containers, state_path, timeout: str
                ) -> tuple[list[str], dict[str, str], Container]:
    """``deploy --wait`` of blog.test to a container whose /up fails: (command, env, it)."""
    port = free_port()
    c = containers("blog-1", port=port)
    c.healthy = False
    dns.set_alias("blog", [c.ip])
    command = [LUMA, "deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project",
               "p", "--no-ssl", "--wait", "--wait-timeout", timeout, "--state",
               str(state_path)]
    return command, {"PATH": "/usr/bin:/bin", "LUMA_PROXY_DNS": dns.address}, c


def test_deploy_wait_returns_once_the_target_passed_a_health_check(
        dns, containers, state_path):
    command, env, c = deploy_wait(dns, containers, state_path, "20")
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    time.sleep(1.5)
    assert proc.poll() is None  # still waiting: /up answers 503
    c.healthy = True
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and err == "", err
    assert "✅ Deployed blog.test" in out
    assert 1.5 <= time.monotonic() - started < 15
    entry = Store(state_path).read_health()["blog.test"]  # type: ignore[index]
    assert entry.healthy is True and entry.target == f"blog:{c.port}"


def test_deploy_wait_fails_with_one_line_when_the_target_never_passes(
        dns, containers, state_path):
    command, env, c = deploy_wait(dns, containers, state_path, "1.5")
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, env=env)
    assert time.monotonic() - started >= 1.5
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: blog.test: blog:{c.port} did not pass a health check within 1.5s (HTTP 503)"]
    assert "✅" not in result.stdout
