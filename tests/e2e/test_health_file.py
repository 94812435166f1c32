"""Observed health lives in ``<state>.health.json``, end to end.

The proxy's health checks write the health file and never the state file (so a
health round costs the proxy no route reload); a restarted proxy serves the
health stored there before its first check; an older state file with health
inside still gives its health; and an entry observed for another target is
never applied to a service deployed elsewhere.
"""

from __future__ import annotations

import json
import os
import stat
import time
from datetime import timedelta
from pathlib import Path

from luma_proxy.models import Health, HealthEntry, now
from luma_proxy.registry import Store
from tests.e2e.conftest import wait_until
from tests.e2e.docker_double import free_port

SLOW_CHECK = "/slow?s=3"  # a health check that answers 200 after 3 s


def health_file(state: Path) -> Path:
    return state.with_name(state.name + ".health.json")


def entry_of(state: Path, host: str) -> HealthEntry | None:
    entries = Store(state).read_health()
    return None if entries is None else entries.get(host)


def file_id(path: Path) -> tuple[bytes, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_ino, st.st_mtime_ns


def test_health_rounds_write_the_health_file_and_never_the_state_file(
        dns, containers, cli, start_proxy, proxy_kind, state_path):
    port = free_port()
    c = containers("blog-1", port=port)
    dns.set_alias("blog", [c.ip])
    cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p")
    routes = file_id(state_path)
    proxy = start_proxy(proxy_kind)  # health every 1 s
    assert proxy.get("blog.test").status == 200

    first = wait_until(lambda: (e := entry_of(state_path, "blog.test")) and e.checked_at and e)
    assert first.healthy is True and first.target == f"blog:{port}"  # type: ignore[union-attr]
    # Two more rounds land in the health file ...
    later = first.checked_at + timedelta(seconds=1.5)  # type: ignore[union-attr]
    wait_until(lambda: entry_of(state_path, "blog.test").checked_at > later,  # type: ignore[union-attr]
               timeout=10)
    c.healthy = False
    wait_until(lambda: proxy.get("blog.test").status == 503, timeout=10)
    # The round that turned the service away is written to the health file
    # right after it is applied in memory: wait for the write, don't race it.
    wait_until(lambda: entry_of(state_path, "blog.test").healthy is False,  # type: ignore[union-attr]
               timeout=5)
    # ... and the state file is the one the CLI wrote: same bytes, same inode, same mtime.
    assert file_id(state_path) == routes
    assert b'"health":' not in state_path.read_bytes()
    assert stat.S_IMODE(health_file(state_path).stat().st_mode) == 0o600
    assert not list(state_path.parent.glob(".*.tmp"))
    listed = json.loads(cli("list", "--json").stdout)["services"][0]
    assert listed["health"]["healthy"] is False and listed["health"]["last_error"] == "HTTP 503"
    assert "unhealthy (HTTP 503)" in cli("list").stdout


def test_restart_serves_the_health_the_last_proxy_observed(
        dns, containers, cli, start_proxy, state_path):
    port = free_port()
    c = containers("blog-1", port=port)
    # The first proxy sees the alias unresolvable: unhealthy, in the health file.
    cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p",
        "--health-path", SLOW_CHECK)
    routes = file_id(state_path)
    proxy = start_proxy("run", env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    wait_until(lambda: (e := entry_of(state_path, "blog.test")) and e.healthy is False)
    assert proxy.get("blog.test").status == 503
    proxy.stop()
    assert file_id(state_path) == routes

    # The alias resolves now, but the new proxy's first check takes 3 s: until then
    # the answers come from the health file.
    dns.set_alias("blog", [c.ip])
    proxy = start_proxy("run", env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    assert proxy.get("blog.test").status == 503
    wait_until(lambda: proxy.get("blog.test").status == 200, timeout=15)
    # Its own first check (3 s too, started at start-up) lands in the file.
    wait_until(lambda: entry_of(state_path, "blog.test").healthy is True,  # type: ignore[union-attr]
               timeout=10)


def test_old_state_file_with_health_inside_still_loads(
        dns, containers, cli, start_proxy, state_path):
    port = free_port()
    c = containers("blog-1", port=port)
    dns.set_alias("blog", [c.ip])
    at = now().isoformat()
    service = {"name": "blog", "host": "blog.test", "target": f"blog:{port}", "project": "p",
               "health_path": SLOW_CHECK, "ssl": False, "created_at": at, "updated_at": at,
               "health": {"healthy": False, "checked_at": at, "last_error": "HTTP 503",
                          "changed_at": at, "containers": {c.ip: False}}}
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps({"version": 1, "services": {"blog.test": service},
                                      "settings": {}}, indent=2))  # as before health.json
    os.chmod(state_path, 0o600)
    old = file_id(state_path)
    assert "unhealthy (HTTP 503)" in cli("list").stdout

    proxy = start_proxy("run", env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    assert proxy.get("blog.test").status == 503  # its first check takes 3 s
    wait_until(lambda: proxy.get("blog.test").status == 200, timeout=15)
    wait_until(lambda: (e := entry_of(state_path, "blog.test")) and e.healthy is True)
    assert file_id(state_path) == old  # the proxy never rewrites it

    # The CLI's next write drops the old health from the state file; nothing is lost.
    cli("deploy", "--host", "shop.test", "--target", f"blog:{port}", "--project", "p",
        "--no-ssl")
    assert b'"health":' not in state_path.read_bytes()
    rows = {line.split()[0]: line for line in cli("list").stdout.splitlines()[1:]}
    assert " healthy " in rows["blog.test"]


def test_health_observed_for_an_old_target_is_never_applied(
        dns, containers, cli, start_proxy, state_path):
    old_port, new_port = free_port(), free_port()
    new = containers("blog-new", port=new_port)
    dns.set_alias("blog-new", [new.ip])
    cli("deploy", "--host", "blog.test", "--target", f"blog-old:{old_port}", "--project", "p",
        "--no-ssl")  # blog-old does not resolve: unhealthy
    proxy = start_proxy("run", env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    wait_until(lambda: proxy.get("blog.test").status == 503)

    cli("deploy", "--host", "blog.test", "--target", f"blog-new:{new_port}", "--project", "p",
        "--no-ssl", "--health-path", SLOW_CHECK)
    deployed = time.monotonic()
    # A check of the old target finishing now writes its result (as a leader whose
    # round started before the deploy would): it names the old target, so no
    # process may take it for the new one.
    store = Store(state_path)
    stale = HealthEntry.of((f"blog-old:{old_port}", "/up", "blog.test", False),
                           Health(healthy=False, checked_at=now(), last_error="HTTP 500"))
    store.update_health(lambda entries: entries.__setitem__("blog.test", stale))
    # The new container proves itself first (its check takes 3 s), then is routed;
    # the stale entry, applied, would answer 503 (an app's answer) instead.
    wait_until(lambda: proxy.get("blog.test").text == "blog-new", timeout=10)
    assert time.monotonic() - deployed < 8.0
    for _ in range(10):  # several reloads of the health file later, still routed
        assert proxy.get("blog.test").status == 200
        time.sleep(0.1)
    listed = json.loads(cli("list", "--json").stdout)["services"][0]
    assert listed["health"]["last_error"] != "HTTP 500"
