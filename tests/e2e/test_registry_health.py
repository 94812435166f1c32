"""Observed health lives in the registry database (``<state>.db``), end to end.

The proxy's health checks write observed health to the registry and never move
its routes (no route reload for a health round; a round that only moves
``checked_at`` does not move the health generation either); a restarted proxy
serves the health stored there before its first check; an older state file
with health inside is imported with its health at first start; and an entry
observed for another target is never applied to a service deployed elsewhere.
"""

from __future__ import annotations

import json
import os
import stat
import time
from datetime import timedelta
from pathlib import Path

from luma_proxy.models import Health, HealthEntry, now
from luma_proxy.store.registry import IMPORT_SUFFIX, Store, db_path
from tests.e2e.conftest import wait_until
from tests.e2e.docker_double import free_port

SLOW_CHECK = "/slow?s=3"  # a health check that answers 200 after 3 s


def entry_of(state: Path, host: str) -> HealthEntry | None:
    return Store(state).read_health().get(host)


def routes_of(state: Path) -> tuple[int, list[tuple[str, int, str]], str]:
    """The routes generation, the rows of ``services`` and the settings, as stored."""
    store = Store(state)
    snapshot = store.snapshot()
    return store.generation(), sorted(snapshot.services), snapshot.settings


def health_generation(state: Path) -> int:
    return Store(state).snapshot().health_gen


def test_health_rounds_write_the_registry_and_never_move_the_routes(
        dns, containers, cli, start_proxy, proxy_kind, state_path):
    port = free_port()
    c = containers("blog-1", port=port)
    dns.set_alias("blog", [c.ip])
    cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p")
    routes = routes_of(state_path)
    proxy = start_proxy(proxy_kind)  # health every 1 s
    assert proxy.get("blog.test").status == 200

    first = wait_until(lambda: (e := entry_of(state_path, "blog.test")) and e.checked_at and e)
    assert first.healthy is True and first.target == f"blog:{port}"  # type: ignore[union-attr]
    observed = health_generation(state_path)
    # Two more rounds land in the registry, each moving checked_at alone: nobody has
    # anything to re-read for them, so the health generation stays where it was.
    later = first.checked_at + timedelta(seconds=1.5)  # type: ignore[union-attr]
    wait_until(lambda: entry_of(state_path, "blog.test").checked_at > later,  # type: ignore[union-attr]
               timeout=10)
    assert health_generation(state_path) == observed
    assert entry_of(state_path, "blog.test").healthy is True  # type: ignore[union-attr]

    c.healthy = False
    wait_until(lambda: proxy.get("blog.test").status == 503, timeout=10)
    # The round that turned the service away is written to the registry right
    # after it is applied in memory: wait for the write, don't race it.
    wait_until(lambda: entry_of(state_path, "blog.test").healthy is False,  # type: ignore[union-attr]
               timeout=5)
    assert health_generation(state_path) > observed  # an observation that changed moves it
    # ... and the routes are the ones the CLI wrote: same generation, same rows.
    assert routes_of(state_path) == routes
    db = db_path(state_path)
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        if path.exists() or path == db:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # One database, no JSON files beside it any more.
    assert not state_path.exists()
    assert not list(state_path.parent.glob("*.json"))
    assert not list(state_path.parent.glob(".*.tmp"))
    listed = json.loads(cli("list", "--json").stdout)["services"][0]
    assert listed["health"]["healthy"] is False and listed["health"]["last_error"] == "HTTP 503"
    assert "unhealthy (HTTP 503)" in cli("list").stdout


def test_restart_serves_the_health_the_last_proxy_observed(
        dns, containers, cli, start_proxy, state_path):
    port = free_port()
    c = containers("blog-1", port=port)
    # The first proxy sees the alias unresolvable: unhealthy, in the registry.
    cli("deploy", "--host", "blog.test", "--target", f"blog:{port}", "--project", "p",
        "--health-path", SLOW_CHECK)
    routes = routes_of(state_path)
    proxy = start_proxy("run", env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    wait_until(lambda: (e := entry_of(state_path, "blog.test")) and e.healthy is False)
    assert proxy.get("blog.test").status == 503
    proxy.stop()
    assert routes_of(state_path) == routes

    # The alias resolves now, but the new proxy's first check takes 3 s: until then
    # the answers come from the health stored in the registry.
    dns.set_alias("blog", [c.ip])
    proxy = start_proxy("run", env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    assert proxy.get("blog.test").status == 503
    wait_until(lambda: proxy.get("blog.test").status == 200, timeout=15)
    # Its own first check (3 s too, started at start-up) lands in the registry.
    wait_until(lambda: entry_of(state_path, "blog.test").healthy is True,  # type: ignore[union-attr]
               timeout=10)
    assert routes_of(state_path) == routes


def test_old_state_file_with_health_inside_is_imported_at_first_start(
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
    original = state_path.read_bytes()
    # A read-only command reads it as it would be imported, and creates nothing.
    assert "unhealthy (HTTP 503)" in cli("list").stdout
    assert not db_path(state_path).exists() and state_path.read_bytes() == original

    proxy = start_proxy("run", env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    # The imported health is served until the first check (3 s) says otherwise.
    assert proxy.get("blog.test").status == 503
    wait_until(lambda: proxy.get("blog.test").status == 200, timeout=15)
    wait_until(lambda: (e := entry_of(state_path, "blog.test")) and e.healthy is True)
    # Imported once, kept beside the database as it was; never read again.
    assert not state_path.exists()
    kept = state_path.with_name(state_path.name + IMPORT_SUFFIX)
    assert kept.read_bytes() == original
    assert "took over the state file" in proxy.logs()

    cli("deploy", "--host", "shop.test", "--target", f"blog:{port}", "--project", "p",
        "--no-ssl")
    assert kept.read_bytes() == original and not state_path.exists()
    rows = {line.split()[0]: line for line in cli("list").stdout.splitlines()[1:]}
    assert " healthy " in rows["blog.test"] and "shop.test" in rows


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
    stale = HealthEntry.of((f"blog-old:{old_port}", "/up", "blog.test", False),
                           Health(healthy=False, checked_at=now(), last_error="HTTP 500"))
    with Store(state_path).transaction() as tx:
        tx.put_health("blog.test", stale)
    # The new container proves itself first (its check takes 3 s), then is routed;
    # the stale entry, applied, would answer 503 (an app's answer) instead.
    wait_until(lambda: proxy.get("blog.test").text == "blog-new", timeout=10)
    assert time.monotonic() - deployed < 8.0
    for _ in range(10):  # several reloads of the registry later, still routed
        assert proxy.get("blog.test").status == 200
        time.sleep(0.1)
    listed = json.loads(cli("list", "--json").stdout)["services"][0]
    assert listed["health"]["last_error"] != "HTTP 500"
