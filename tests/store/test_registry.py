"""Unit tests for luma_proxy.store.registry: the SQLite store, its transactions and generations,
crash safety and concurrency, and the parsing of JSON states."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from luma_proxy.models import Health, HealthEntry, Service, Settings, State
from luma_proxy.store.registry import RegistryError, Store, db_path, default_state_path
from tests.store.test_gostate import EXAMPLE

REPO = Path(__file__).resolve().parents[2]
# Fast children that share the imported modules. SQLite connections must not cross a
# fork: the parent opens its stores after the fork, or closes them before it.
CTX = multiprocessing.get_context("fork")
AT = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
LATER = AT + datetime.timedelta(seconds=30)


def service(host: str, target: str = "blog:3000", project: str = "p", **kw: object) -> Service:
    return Service(name=host, host=host, target=target, project=project, created_at=AT,
                   updated_at=AT, **kw)


def entry(target: str = "blog:3000", healthy: bool | None = True, checked: datetime.datetime = AT,
          changed: datetime.datetime = AT, **kw: object) -> HealthEntry:
    return HealthEntry(target=target, healthy=healthy, checked_at=checked, changed_at=changed,
                       containers={"10.0.0.2": bool(healthy)}, **kw)


def add(host: str, target: str = "blog:3000"):
    def change(state: State) -> None:
        state.services[host] = service(host, target)

    return change


def seed(path: Path, *hosts: str) -> None:
    """Write ``hosts`` and close the connection (nothing open across a later fork)."""
    store = Store(path)
    try:
        with store.transaction() as tx:
            for host in hosts:
                tx.put(service(host))
    finally:
        store.close()


def hosts_of(path: Path) -> list[str]:
    store = Store(path)
    try:
        return sorted(store.read().services)
    finally:
        store.close()


def integrity(path: Path) -> str:
    """``PRAGMA integrity_check`` of the registry of ``path``, on a connection of its own."""
    db = sqlite3.connect(db_path(path))
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


# ---------------------------------------------------------------------------- paths


def test_default_state_path_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUMA_PROXY_STATE", "/tmp/x/state.json")
    assert default_state_path() == "/tmp/x/state.json"
    monkeypatch.delenv("LUMA_PROXY_STATE")
    monkeypatch.delenv("LUMA_PROXY_IMAGE", raising=False)
    assert default_state_path() == "/var/lib/luma-proxy/state.json"


@pytest.mark.parametrize(("state", "db"), [
    ("/x/state.json", "/x/state.db"), ("/x/state.db", "/x/state.db"),
    ("/x/registry", "/x/registry.db"), ("/x/state.yaml", "/x/state.yaml.db"),
])
def test_db_path(state: str, db: str) -> None:
    assert db_path(state) == Path(db)
    assert Store(state).db_path == Path(db)


# ---------------------------------------------------------------------------- read / write


def test_missing_database_is_an_empty_registry(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "state.json"
    # Read-only commands (create=False) create nothing.
    store = Store(path, create=False)
    assert store.read() == State()
    assert store.read_health() == {}
    assert store.generation() == 0
    assert not (tmp_path / "nope").exists()
    # Any other use creates it, empty.
    store = Store(path)
    assert store.open() is None  # nothing was imported
    assert store.read() == State()
    snapshot = store.snapshot()
    assert (snapshot.routes_gen, snapshot.health_gen) == (0, 0)
    assert snapshot.services == [] and snapshot.health == []
    assert Settings.model_validate_json(snapshot.settings) == Settings()
    assert store.db_path.exists() and store.read_only_reason() is None


def test_update_round_trips_and_returns_the_change_result(tmp_path: Path) -> None:
    store = Store(tmp_path / "sub" / "state.json")
    assert store.update(lambda s: s.services.setdefault("blog.com", service("blog.com"))).host \
        == "blog.com"
    assert store.update(lambda s: 42) == 42
    assert store.db_path == tmp_path / "sub" / "state.db"

    def staging(state: State) -> None:
        state.settings.acme_staging = True
        state.services["b.com"] = service("b.com", "b:1", hsts=False, networks=["n1"])

    store.update(staging)
    again = Store(store.path).read()  # another connection reads what was committed
    assert list(again.services) == ["blog.com", "b.com"]
    assert again.services["blog.com"] == service("blog.com")
    assert again.services["b.com"] == service("b.com", "b:1", hsts=False, networks=["n1"])
    assert again.settings.acme_staging is True

    store.update(lambda s: s.services.pop("blog.com"))
    assert list(Store(store.path).read().services) == ["b.com"]


def test_transaction_round_trips_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.json")
    with store.transaction() as tx:
        assert tx.service("a.test") is None and tx.health("a.test") is None
        tx.put(service("a.test", "a:1"))
        tx.put(service("b.test", "b:1"))
        tx.put_health("a.test", entry("a:1"))
        tx.set_settings(Settings(acme_email="ops@example.com"))
        assert tx.service("a.test") == service("a.test", "a:1")  # its own writes, at once
    other = Store(store.path)
    with other.transaction() as tx:
        assert list(tx.services()) == ["a.test", "b.test"]
        assert tx.service("b.test") == service("b.test", "b:1")
        assert tx.health("a.test") == entry("a:1")
        assert tx.all_health() == {"a.test": entry("a:1")}
        assert tx.settings().acme_email == "ops@example.com"
        assert tx.delete("b.test") is True
        assert tx.delete("b.test") is False
        assert tx.delete_health("a.test") is True
        assert tx.delete_health("a.test") is False
    assert list(store.read().services) == ["a.test"]
    assert store.read_health() == {}


def test_read_health_and_observed(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.json")
    with store.transaction() as tx:
        tx.put(service("a.test", "a:1"))
        tx.put(service("b.test", "b:1"))
        tx.put_health("a.test", entry("a:1", healthy=False, last_error="HTTP 503"))
        tx.put_health("b.test", entry("old:1"))  # observed for another target
        tx.put_health("gone.test", entry("g:1"))  # no such service
    assert set(store.read_health()) == {"a.test", "b.test", "gone.test"}
    observed = store.observed(store.read())
    assert list(observed) == ["a.test"]
    assert (observed["a.test"].healthy, observed["a.test"].last_error) == (False, "HTTP 503")
    assert observed["a.test"].checked_at == AT


def test_routing_keys_without_validating_every_service(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = Store(path)
    services = [service("a.test", "a:1"), service("b.test", "b:2", health_path="/hz", ssl=False)]
    with store.transaction() as tx:
        for s in services:
            tx.put(s)
        assert tx.routing_keys() == {s.host: s.routing_key() for s in services}
    # A row that does not validate (a hand edit) still has its key.
    db = sqlite3.connect(db_path(path))
    with db:
        db.execute("UPDATE services SET data = ? WHERE host = 'b.test'", (json.dumps(
            {"host": "b.test", "target": "nope", "health_path": "/hz", "ssl": False}),))
    db.close()
    with store.transaction() as tx:
        assert tx.routing_keys()["b.test"] == ("nope", "/hz", "b.test", False)
        with pytest.raises(ValueError, match=r"service 'b\.test' is invalid"):
            tx.services()


def test_networks_of_every_route_without_validating_them(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = Store(path)
    assert store.networks() == set()
    with store.transaction() as tx:
        tx.put(service("a.test", networks=["front", "kamal"]))
        tx.put(service("b.test", networks=["kamal"]))
        tx.put(service("c.test"))
    assert store.networks() == {"front", "kamal"}
    # A hand-edited row that would not validate still names its networks; what is not
    # a name is not one.
    db = sqlite3.connect(db_path(path))
    with db:
        db.execute("UPDATE services SET data = ? WHERE host = 'c.test'", (json.dumps(
            {"host": "c.test", "target": "nope", "networks": ["edge", 3, None]}),))
    db.close()
    assert store.networks() == {"front", "kamal", "edge"}


def test_observations_move_only_the_rows_whose_result_changed(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.json")
    hosts = [f"h{i}.test" for i in range(5)]
    with store.transaction() as tx:
        for host in hosts:
            tx.put(service(host))
        tx.put_observations((h, service(h).routing_key(), Health(healthy=True, checked_at=AT))
                            for h in hosts)
    first = store.snapshot()
    assert first.health_gen == 1 and {gen for _h, gen, *_ in first.health} == {1}

    # The next round: only h3's result changes; every row's checked_at moves.
    with store.transaction() as tx:
        tx.put_observations((h, service(h).routing_key(), Health(
            healthy=h != "h3.test", checked_at=LATER)) for h in hosts)
    second = store.snapshot(first.routes_gen, first.health_gen)
    assert second.health_gen == 2
    assert {h: gen for h, gen, *_ in second.health} == {h: 2 if h == "h3.test" else 1
                                                        for h in hosts}
    assert {e.checked_at for e in store.read_health().values()} == {LATER}

    with store.transaction() as tx:  # a round with no result changed moves no generation
        tx.put_observations((h, service(h).routing_key(), Health(
            healthy=h != "h3.test", checked_at=LATER)) for h in hosts)
    assert store.generations()[1] == 2

    with store.transaction() as tx:  # entries of hosts no longer routed go, and that moves it
        tx.delete("h0.test")
        tx.delete_unrouted_health()
    assert sorted(store.read_health()) == hosts[1:] and store.generations()[1] == 3


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.json")
    seed(store.path, "a.test")
    before, generation = store.export_json(), store.generation()

    def change(tx) -> int:
        tx.put(service("b.test"))
        tx.delete("a.test")
        return len(tx.services())

    assert store.dry_run(change) == 1
    assert store.export_json() == before and store.generation() == generation


def test_database_mode_0600_with_its_wal_files(tmp_path: Path) -> None:
    path = tmp_path / "reg" / "state.json"
    old_umask = os.umask(0)  # a permissive umask must not leak into the modes
    try:
        store = Store(path)
        store.update(add("a.com"))
        files = [store.db_path, *(Path(f"{store.db_path}{s}") for s in ("-wal", "-shm"))]
        assert all(f.exists() for f in files), sorted(p.name for p in path.parent.iterdir())
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        Store(path).update(add("b.com"))  # another connection, still 0600
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    finally:
        os.umask(old_umask)


def test_change_that_raises_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = Store(path)
    with store.transaction() as tx:
        tx.put(service("a.com"))
        tx.put_health("a.com", entry())
    before, generation = store.export_json(), store.snapshot()

    def bad(state: State) -> None:
        state.services.clear()
        state.services["evil.com"] = service("evil.com")
        state.settings.acme_staging = True
        raise ValueError("nope")

    with pytest.raises(ValueError, match="nope"):
        store.update(bad)
    with pytest.raises(RuntimeError, match="abort"), store.transaction() as tx:
        tx.delete("a.com")
        tx.delete_health("a.com")
        tx.put(service("evil.com"))
        raise RuntimeError("abort")
    assert store.export_json() == before
    assert Store(path).export_json() == before  # as another connection sees it
    assert store.snapshot() == generation
    store.update(add("b.com"))  # and the store is still usable
    assert sorted(store.read().services) == ["a.com", "b.com"]


def test_change_that_raises_on_a_new_registry_leaves_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "state.json"

    def bad(state: State) -> None:
        state.services["a.com"] = service("a.com")
        raise RuntimeError("abort")

    with pytest.raises(RuntimeError):
        Store(path).update(bad)
    snapshot = Store(path).snapshot()
    assert (snapshot.routes_gen, snapshot.health_gen) == (0, 0)
    assert snapshot.services == [] and snapshot.health == []


# ---------------------------------------------------------------------------- generations


def gens(snapshot) -> dict[str, int]:
    return {host: gen for host, gen, *_ in snapshot.services}


def test_routes_generation_moves_on_service_changes_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.json")
    with store.transaction() as tx:
        tx.put(service("a.test"))
        tx.put(service("b.test"))
    one = store.snapshot()
    assert (one.routes_gen, one.health_gen) == (1, 0)
    assert gens(one) == {"a.test": 1, "b.test": 1}
    assert store.generation() == 1

    with store.transaction() as tx:  # the same service again: nothing moves
        tx.put(tx.service("a.test"))
    store.update(lambda s: None)
    assert store.snapshot(one.routes_gen, one.health_gen).services == []
    assert store.generation() == 1

    with store.transaction() as tx:  # one row changes: its generation, not the other's
        tx.put(service("b.test", "new:1"))
    two = store.snapshot(one.routes_gen, one.health_gen)
    assert two.routes_gen == 2 and gens(two) == {"a.test": 1, "b.test": 2}

    with store.transaction() as tx:  # health only: the routes do not move
        tx.put_health("a.test", entry())
    three = store.snapshot(two.routes_gen, two.health_gen)
    assert (three.routes_gen, three.health_gen) == (2, 1)
    assert three.services == [] and [h for h, *_ in three.health] == ["a.test"]

    store.update(lambda s: setattr(s.settings, "acme_staging", True))  # settings are routes
    four = store.snapshot(three.routes_gen, three.health_gen)
    assert (four.routes_gen, four.health_gen) == (3, 1) and four.health == []
    assert Settings.model_validate_json(four.settings).acme_staging is True
    assert gens(four) == {"a.test": 1, "b.test": 2}

    with store.transaction() as tx:
        assert not tx.delete("nothing.test")  # deleting nothing moves nothing
    assert store.generation() == 3
    with store.transaction() as tx:
        tx.delete("b.test")
    assert store.generation() == 4 and gens(store.snapshot()) == {"a.test": 1}


def test_health_generation_moves_on_observations_not_on_checked_at(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.json")
    with store.transaction() as tx:
        tx.put(service("a.test"))
        tx.put(service("b.test"))
        tx.put_health("a.test", entry())
        tx.put_health("b.test", entry())
    one = store.snapshot()
    assert (one.routes_gen, one.health_gen) == (1, 1)

    # A round that only moves checked_at: stored, but no generation moves and a reader
    # that asks what moved since gets no rows.
    with store.transaction() as tx:
        tx.put_health("a.test", entry(checked=LATER))
        tx.put_health("b.test", entry(checked=LATER))
    same = store.snapshot(one.routes_gen, one.health_gen)
    assert (same.routes_gen, same.health_gen) == (1, 1)
    assert same.services == [] and same.health == []
    assert {h: e.checked_at for h, e in store.read_health().items()} == {
        "a.test": LATER, "b.test": LATER}

    # An observation changes: health moves, for that row only; routes do not.
    with store.transaction() as tx:
        tx.put_health("a.test", entry(healthy=False, checked=LATER, changed=LATER,
                                      last_error="HTTP 503"))
        tx.put_health("b.test", entry(checked=LATER))
    two = store.snapshot(same.routes_gen, same.health_gen)
    assert (two.routes_gen, two.health_gen) == (1, 2) and two.services == []
    rows = {host: (gen, checked) for host, gen, _data, checked in two.health}
    assert rows == {"a.test": (2, LATER.isoformat()), "b.test": (1, LATER.isoformat())}

    with store.transaction() as tx:  # removing an entry is a change too
        tx.delete_health("b.test")
    assert store.snapshot(two.routes_gen, two.health_gen).health_gen == 3


def test_snapshot_returns_only_what_moved(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.json")
    with store.transaction() as tx:
        tx.put(service("a.test"))
        tx.put_health("a.test", entry())
    full = store.snapshot()
    assert len(full.services) == 1 and len(full.health) == 1
    assert store.snapshot(full.routes_gen, -1).services == []
    assert len(store.snapshot(full.routes_gen, -1).health) == 1
    assert len(store.snapshot(-1, full.health_gen).services) == 1
    assert store.snapshot(-1, full.health_gen).health == []


# ---------------------------------------------------------------------------- broken databases


@pytest.mark.parametrize("create", [True, False])
def test_corrupt_database_is_a_one_line_error(tmp_path: Path, create: bool) -> None:
    path = tmp_path / "state.json"
    seed(path, "a.test")
    garbage = random.Random(7).randbytes(8192)
    db_path(path).write_bytes(garbage)
    for use in (lambda s: s.read(), lambda s: s.open(), lambda s: s.snapshot(),
                lambda s: s.export_json(), lambda s: s.update(lambda state: None)):
        with pytest.raises(RegistryError) as info:
            use(Store(path, create=create))
        message = str(info.value)
        assert "\n" not in message and "state.db" in message, message
    assert db_path(path).read_bytes() == garbage  # left for a person to look at


def test_corrupt_database_is_an_error_even_with_a_json_state_beside_it(tmp_path: Path) -> None:
    """A damaged registry must not be replaced, silently, by whatever JSON file is beside it
    (one a later Go proxy wrote, a backup put back): the proxy would serve those routes
    and ``list`` would show them as if nothing were wrong.
    """
    path = tmp_path / "state.json"
    seed(path, "a.test")
    db_path(path).write_bytes(random.Random(7).randbytes(8192))
    path.write_bytes(EXAMPLE.read_bytes())
    with pytest.raises(RegistryError, match=r"state\.db"):
        Store(path).read()


def test_database_path_that_is_a_directory_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    db_path(path).mkdir()
    with pytest.raises(RegistryError) as info:
        Store(path).read()
    assert "cannot open the registry" in str(info.value) and "\n" not in str(info.value)


def test_state_json_that_is_a_directory_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.mkdir()
    with pytest.raises(RegistryError, match="cannot read state file"):
        Store(path).read()
    assert not db_path(path).exists()


# ---------------------------------------------------------------------------- concurrency


def _add_host(path: str, host: str, barrier) -> None:
    barrier.wait(timeout=30)
    Store(path).update(add(host))


@pytest.mark.spawns
def test_forty_processes_each_add_a_host(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    seed(path, "seed.com")
    hosts = [f"h{i}.example" for i in range(40)]
    barrier = CTX.Barrier(len(hosts))
    procs = [CTX.Process(target=_add_host, args=(str(path), h, barrier)) for h in hosts]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    assert hosts_of(path) == sorted([*hosts, "seed.com"])
    assert integrity(path) == "ok"


@pytest.fixture
def quick_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs if there is one (fsync costs nothing: many more rounds a
    second), else tmp_path."""
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="luma-test-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("existing", ["nothing", "go-state"])
def test_first_use_by_two_writers_at_once(quick_dir: Path, existing: str) -> None:
    """Two writers (the CLI, proxy workers starting) meeting a registry that does not exist
    yet both succeed, and the JSON state is imported exactly once.

    Threads with a connection each take the same SQLite file locks as processes, and
    meet in the window far more often. Before the database was built under a temporary
    name and linked into place, two connections switching a new file to WAL at once
    failed about one round in 15 here (``database is locked``, ``disk I/O error``).
    """
    go_hosts = ["api.example.com", "blog.example.com", "other.example.org"]
    for round_ in range(300):
        path = quick_dir / str(round_) / "state.json"
        path.parent.mkdir()
        if existing == "go-state":
            path.write_bytes(EXAMPLE.read_bytes())
        barrier = threading.Barrier(2)
        errors: list[str] = []

        def write(host: str, path: Path = path, barrier: threading.Barrier = barrier,
                  errors: list[str] = errors) -> None:
            barrier.wait(timeout=10)
            store = Store(path)
            try:
                store.update(add(host))
            except RegistryError as e:
                errors.append(str(e))
            finally:
                store.close()

        threads = [threading.Thread(target=write, args=(h,)) for h in ("a.test", "b.test")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == [], f"round {round_}: {errors}"
        expected = ["a.test", "b.test", *(go_hosts if existing == "go-state" else [])]
        assert hosts_of(path) == sorted(expected), f"round {round_}"


@pytest.mark.spawns
def test_concurrent_cli_deploy_and_remove(tmp_path: Path) -> None:
    """The real command, racing: deploys of new hosts and removes of old ones all land."""
    path = tmp_path / "state.json"
    exe = Path(sys.executable).parent / "luma-proxy"
    old = [f"old{i}.example" for i in range(2)]
    seed(path, *old)
    new = [f"new{i}.example" for i in range(4)]
    env = {**os.environ, "LUMA_PROXY_STATE": str(path)}
    procs = [
        subprocess.Popen([exe, "deploy", "--host", h, "--target", "x:1", "--project", "p"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for h in new
    ] + [
        subprocess.Popen([exe, "remove", "--host", h], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for h in old
    ]
    for p in procs:
        _out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    assert hosts_of(path) == sorted(new)


# Opens a transaction, writes 1000 rows and stops for good before the commit.
_STUCK_WRITER = textwrap.dedent(
    """
    import sys, time
    from luma_proxy.models import Service
    from luma_proxy.store.registry import Store

    with Store(sys.argv[1]).transaction() as tx:
        for i in range(1000):
            tx.put(Service(name="k", host=f"k{i}.test", target="k:1", project="p"))
        tx.delete("a.com")
        sys.stdout.write("in-transaction\\n")
        sys.stdout.flush()
        time.sleep(60)
    """
)


@pytest.mark.spawns
def test_sigkilled_writer_leaves_the_last_commit(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    seed(path, "a.com")
    before = Store(path).export_json()
    proc = subprocess.Popen([sys.executable, "-c", _STUCK_WRITER, str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == b"in-transaction\n", proc.stderr.read() if proc.stderr else b""
        # Readers go on while the writer holds the write lock, and see the last commit.
        assert hosts_of(path) == ["a.com"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert integrity(path) == "ok"
    assert Store(path).export_json() == before  # none of the change
    # The lock died with the process: the next writer does not wait for it.
    started = time.monotonic()
    seed(path, "b.com")
    assert time.monotonic() - started < 5
    assert hosts_of(path) == ["a.com", "b.com"]
    assert integrity(path) == "ok"


BATCH = 20  # rows every transaction of _write_loop rewrites


def _write_loop(path: str, start: int) -> None:
    """Rewrite the same BATCH rows to a new target, one transaction each, for ever."""
    store = Store(path)
    n = start
    while True:
        with store.transaction() as tx:
            for i in range(BATCH):
                tx.put(service(f"h{i}.example", f"r{n}:1"))
            if n % 7 == 0:  # and now and then a delete and an add in the same change
                tx.delete("extra.example")
            else:
                tx.put(service("extra.example", f"r{n}:1"))
        n += 1


def _batch_targets(path: Path) -> set[str]:
    """The targets of the batch rows; more than one means a half-applied change."""
    store = Store(path)
    try:
        state = store.read()
    finally:
        store.close()
    batch = [s for h, s in state.services.items() if h != "extra.example"]
    assert len(batch) == BATCH
    return {s.target for s in batch}


@pytest.mark.spawns
def test_writers_killed_at_random_moments_leave_all_or_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    seed(path, *(f"h{i}.example" for i in range(BATCH)))
    rng = random.Random(1234)
    seen: set[str] = set()
    for round_ in range(25):
        proc = CTX.Process(target=_write_loop, args=(str(path), (round_ + 1) * 1000))
        proc.start()
        time.sleep(rng.uniform(0.005, 0.06))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)
        assert proc.exitcode == -signal.SIGKILL
        assert integrity(path) == "ok"
        targets = _batch_targets(path)
        assert len(targets) == 1, f"round {round_}: half a change is visible: {targets}"
        seen |= targets
    assert len(seen) > 5, "the writers were killed before they wrote anything"
    seed(path, "final.example")  # the next writer is not stuck on a dead one's lock
    assert "final.example" in hosts_of(path)


@pytest.mark.spawns
def test_reader_never_sees_a_half_applied_change(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    seed(path, *(f"h{i}.example" for i in range(BATCH)))
    writer = CTX.Process(target=_write_loop, args=(str(path), 0))
    writer.start()  # before this process opens its own connection
    store = Store(path)
    versions: set[int] = set()
    reads = 0
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            state = store.read()  # RegistryError here fails the test
            batch = {s.target for h, s in state.services.items() if h != "extra.example"}
            assert len(batch) == 1 and len(state.services) in (BATCH, BATCH + 1), batch
            snapshot = store.snapshot()
            rows = [(gen, json.loads(data)["target"]) for host, gen, data in snapshot.services
                    if host != "extra.example"]
            assert len({target for _gen, target in rows}) == 1, rows
            assert len({gen for gen, _target in rows}) == 1, rows  # one commit wrote them
            versions.add(snapshot.routes_gen)
            reads += 1
    finally:
        writer.kill()
        writer.join(timeout=10)
        store.close()
    assert reads > 50
    assert len(versions) > 5, "the writer did not actually write while we read"
