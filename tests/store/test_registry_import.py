"""JSON states: imported once when the database is created (the Go proxy's ``state.json``,
this project's earlier layouts), kept as a backup, never read as empty; and
``export_json``/``import_json``."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from luma_proxy.models import HealthEntry, Service, Settings
from luma_proxy.store.registry import IMPORT_SUFFIX, RegistryError, Store, db_path
from tests.store.test_gostate import EXAMPLE, go_file, go_host

GO_HOSTS = ["api.example.com", "blog.example.com", "other.example.org"]
AT = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
CTX = multiprocessing.get_context("fork")


def write_go(path: Path, raw: dict | None = None) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = EXAMPLE.read_bytes() if raw is None else json.dumps(raw, indent=2).encode()
    path.write_bytes(data)
    return data


def service(host: str, target: str, **kw: object) -> Service:
    return Service(name=host.split(".")[0], host=host, target=target, project="p",
                   created_at=AT, updated_at=AT, **kw)


def entry(target: str, healthy: bool | None = True, **kw: object) -> HealthEntry:
    return HealthEntry(target=target, healthy=healthy, checked_at=AT, changed_at=AT, **kw)


# The files an import is about (a lock file or the like beside them is not).
LEFT_BY_AN_IMPORT = ("state.json", "state.json.health.json", "state.db",
                     f"state.json{IMPORT_SUFFIX}", f"state.json.health.json{IMPORT_SUFFIX}")


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def in_force(store: Store) -> dict[str, HealthEntry]:
    return store.observed(store.read())


# ---------------------------------------------------------------------------- the Go state


def test_go_state_is_imported_when_the_database_is_created(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    original = write_go(path)
    store = Store(path)
    assert store.open() == []  # taken over, nothing to report
    assert sorted(store.read().services) == GO_HOSTS
    api = store.read().services["api.example.com"]
    assert (api.target, api.project, api.health_path, api.ssl) == (
        "myproject-api:8080", "myproject", "/health", False)
    assert store.read().settings == Settings()
    assert store.read_health() == {}
    assert store.generation() == 1
    # The original is kept beside the database, and nobody reads it any more.
    assert (tmp_path / f"state.json{IMPORT_SUFFIX}").read_bytes() == original
    assert not path.exists()
    assert "state.db" in files(tmp_path)
    assert Store(path).open() is None  # already imported: nothing taken over again


def test_first_cli_write_imports_and_keeps_every_route(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_go(path)
    store = Store(path)

    def add(state) -> None:
        state.services["new.example.com"] = service("new.example.com", "new:80")

    store.update(add)
    assert store.last_import == []
    assert sorted(store.read().services) == sorted([*GO_HOSTS, "new.example.com"])
    assert (tmp_path / f"state.json{IMPORT_SUFFIX}").exists()


def test_go_state_notes_are_returned(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_go(path, go_file({
        "old": {"Blog.Example.COM": go_host("old-web:80", created="2025-01-01T00:00:00Z")},
        "new": {"blog.example.com": go_host("new-web:3000", created="2026-01-01T00:00:00Z"),
                "bad host": go_host("x:80")},
    }, lets_encrypt={"staging": True, "email": "ops@example.com"}))
    store = Store(path)
    notes = store.open()
    assert notes is not None and len(notes) == 2
    assert all("\n" not in note for note in notes)
    assert sorted(store.read().services) == ["blog.example.com"]
    assert store.read().services["blog.example.com"].project == "new"
    settings = store.read().settings
    assert settings.acme_staging is True and settings.acme_email == "ops@example.com"


def test_go_state_notes_are_one_line_each(tmp_path: Path) -> None:
    """A host the import skips gets a note of one line, whatever is wrong with it.
    """
    path = tmp_path / "state.json"
    write_go(path, go_file({"p": {"good.example.com": go_host("good:80"),
                                  "odd.example.com": go_host("odd:80", health_path=5)}}))
    notes = Store(path).open()
    assert notes is not None and len(notes) == 1 and "odd.example.com" in notes[0]
    assert "\n" not in notes[0], notes[0]


def test_go_certificate_directory_with_upper_case_is_renamed(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_go(path, go_file({"p": {"Blog.Example.com": go_host("web:3000"),
                                  "API.example.com": go_host("api:3000"),
                                  "Shop.Example.com": go_host("shop:3000")}}))
    certs = tmp_path / "certs"
    for name in ("Blog.Example.com", "API.example.com"):
        (certs / name).mkdir(parents=True)
        (certs / name / "cert.pem").write_text(f"chain of {name}")
    (certs / "api.example.com").mkdir()  # already there: nothing is overwritten
    Store(path).open()
    assert (certs / "blog.example.com" / "cert.pem").read_text() == "chain of Blog.Example.com"
    assert not (certs / "Blog.Example.com").exists()
    assert (certs / "API.example.com" / "cert.pem").exists()
    assert list((certs / "api.example.com").iterdir()) == []
    assert files(certs) == ["API.example.com", "api.example.com", "blog.example.com"]


def test_registry_in_a_certs_dir_takes_over_the_old_data_dir_file(tmp_path: Path) -> None:
    """The image under the Luma CLI's mounts: the registry moved into certs/.luma-proxy/."""
    old = tmp_path / "state.json"
    original = write_go(old, go_file({"p": {"Blog.Example.com": go_host("web:3000")}}))
    (tmp_path / "certs" / "Blog.Example.com").mkdir(parents=True)
    store = Store(tmp_path / "certs" / ".luma-proxy" / "state.json")
    assert store.open() == []
    assert store.db_path == tmp_path / "certs" / ".luma-proxy" / "state.db"
    assert store.db_path.exists()
    assert list(store.read().services) == ["blog.example.com"]
    assert (tmp_path / f"state.json{IMPORT_SUFFIX}").read_bytes() == original
    assert not old.exists()
    assert files(tmp_path / "certs") == [".luma-proxy", "blog.example.com"]
    assert list(Store(store.path).read().services) == ["blog.example.com"]


def test_a_state_json_in_the_certs_dir_wins_over_the_data_dir_one(tmp_path: Path) -> None:
    write_go(tmp_path / "state.json")
    mine = tmp_path / "certs" / ".luma-proxy" / "state.json"
    write_go(mine, go_file({"p": {"mine.example.com": go_host("mine:80")}}))
    store = Store(mine)
    assert store.open() == []
    assert list(store.read().services) == ["mine.example.com"]
    assert (tmp_path / "state.json").exists()  # the other one is left alone


# ---------------------------------------------------------------------------- earlier layouts


def old_layout(services: dict[str, Service], **settings: object) -> bytes:
    """This project's state file before the database (one service per line, no health)."""
    members = ",\n".join(f"    {json.dumps(h)}: {s.model_dump_json()}"
                         for h, s in services.items())
    head = json.dumps(Settings(**settings).model_dump(mode="json"))
    return f'{{\n  "version": 1,\n  "settings": {head},\n  "services": {{\n{members}\n  }}\n}}\n' \
        .encode()


def health_line(entry: HealthEntry) -> dict:
    return {"target": entry.target, "health_path": entry.health_path, "ssl": entry.ssl,
            "healthy": entry.healthy, "last_error": entry.last_error,
            "changed_at": entry.changed_at.isoformat() if entry.changed_at else None,
            "containers": entry.containers,
            "checked_at": entry.checked_at.isoformat() if entry.checked_at else None}


def test_old_layout_and_its_health_file_are_imported(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    services = {"a.test": service("a.test", "a:1"), "b.test": service("b.test", "b:1"),
                "c.test": service("c.test", "c:1", ssl=False), "d.test": service("d.test", "d:1")}
    path.write_bytes(old_layout(services, acme_staging=True))
    sidecar = tmp_path / "state.json.health.json"
    a_health = entry("a:1", healthy=False, last_error="HTTP 503", containers={"10.0.0.2": False})
    c_health = entry("c:1", ssl=False)
    sidecar.write_text(json.dumps({"version": 1, "services": {
        "a.test": health_line(a_health),
        "b.test": health_line(entry("old-b:1")),  # observed for another target: not in force
        "c.test": health_line(c_health),
        "d.test": {"target": 7},  # does not validate: that host has no health, no more
        "gone.test": health_line(entry("g:1")),  # no such service
    }}, indent=2))
    original, original_health = path.read_bytes(), sidecar.read_bytes()
    store = Store(path)
    assert store.open() == []
    state = store.read()
    assert state.services == services
    assert state.settings.acme_staging is True
    assert in_force(store) == {"a.test": a_health, "c.test": c_health}
    assert set(store.read_health()) == {"a.test", "c.test"}  # only what is in force
    assert (tmp_path / f"state.json{IMPORT_SUFFIX}").read_bytes() == original
    assert (tmp_path / f"state.json.health.json{IMPORT_SUFFIX}").read_bytes() == original_health
    assert set(files(tmp_path)) & set(LEFT_BY_AN_IMPORT) == {
        "state.db", f"state.json{IMPORT_SUFFIX}", f"state.json.health.json{IMPORT_SUFFIX}"}


def test_oldest_layout_with_health_inside_each_entry_is_imported(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    raw = json.loads(old_layout({"a.test": service("a.test", "a:1"),
                                 "b.test": service("b.test", "b:1"),
                                 "c.test": service("c.test", "c:1")}))
    raw["services"]["a.test"]["health"] = {"healthy": False, "checked_at": AT.isoformat(),
                                           "last_error": "HTTP 503",
                                           "containers": {"10.0.0.2": False}}
    raw["services"]["b.test"]["health"] = {"healthy": "maybe"}  # broken: ignored, not fatal
    raw["services"]["c.test"]["health"] = {"healthy": None, "checked_at": None}  # unchecked
    path.write_text(json.dumps(raw, indent=2))
    store = Store(path)
    assert store.open() == []
    assert sorted(store.read().services) == ["a.test", "b.test", "c.test"]
    health = in_force(store)
    assert set(health) == {"a.test", "c.test"}  # b's did not validate
    a = health["a.test"]
    assert (a.healthy, a.last_error, a.checked_at, a.containers) == (
        False, "HTTP 503", AT, {"10.0.0.2": False})
    assert (a.target, a.health_path, a.ssl) == ("a:1", "/up", True)
    assert health["c.test"].healthy is None  # never checked: pending, as with no entry
    # The next export writes the health apart, not inside the services.
    exported = json.loads(store.export_json())
    assert all("health" not in s for s in exported["services"].values())
    assert exported["health"]["a.test"]["healthy"] is False


def test_imported_once_a_later_state_json_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_go(path)
    assert Store(path).open() == []
    later = write_go(path, go_file({"p": {"later.example.com": go_host("later:80")}}))
    store = Store(path)
    assert store.open() is None
    assert sorted(store.read().services) == GO_HOSTS
    store.update(lambda state: None)
    assert path.read_bytes() == later  # left alone, and not imported
    assert sorted(Store(path, create=False).read().services) == GO_HOSTS


# ---------------------------------------------------------------------------- failed imports


@pytest.mark.parametrize(("data", "fragment"), [
    (b'{"version": 1, "services": {', "not valid JSON"),
    (b"", "empty"),
    (b'{"version": 7, "services": {}}', "version 7"),
    (b'{"routes": {"a.com": "a:80"}}', "unknown layout"),
    (b'{"hosts": []}', "unknown layout"),
    (b'{"projects": "nope"}', "Go state file"),
])
def test_failed_import_creates_nothing_and_fails_again_next_time(
        tmp_path: Path, data: bytes, fragment: str) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(data)
    sidecar = tmp_path / "state.json.health.json"
    sidecar.write_text('{"version": 1, "services": {}}')
    for use in (lambda s: s.open(), lambda s: s.read(), lambda s: s.update(lambda st: None),
                lambda s: s.open()):
        with pytest.raises(RegistryError) as info:
            use(Store(path))
        assert fragment in str(info.value) and "\n" not in str(info.value)
        # Nothing was dropped: the file is as it was, nothing moved, no database.
        assert path.read_bytes() == data
        assert set(files(tmp_path)) & set(LEFT_BY_AN_IMPORT) == {
            "state.json", "state.json.health.json"}
    with pytest.raises(RegistryError, match=fragment):
        Store(path, create=False).read()
    # Once the file is fixed, the next use imports it.
    write_go(path)
    assert Store(path).open() == []
    assert sorted(Store(path).read().services) == GO_HOSTS


def test_failed_import_names_the_file_and_the_way_out(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b'{"routes": {}}')
    with pytest.raises(RegistryError) as info:
        Store(path).open()
    message = str(info.value)
    assert str(path) in message and "luma-proxy import" in message and "\n" not in message


def test_failed_import_is_not_parsed_again_until_the_file_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy polls five times a second: the same store does not parse the same broken
    file each time, and takes it over once it is fixed."""
    from luma_proxy.store import jsonstate

    path = tmp_path / "state.json"
    path.write_bytes(b'{"version": 1, "services": {')
    parsed: list[bytes] = []
    parse_json = jsonstate.parse_json
    monkeypatch.setattr(jsonstate, "parse_json",
                        lambda data: parsed.append(data) or parse_json(data))
    store = Store(path)
    errors = set()
    for _ in range(5):
        with pytest.raises(RegistryError) as info:
            store.snapshot()
        errors.add(str(info.value))
    assert len(parsed) == 1 and len(errors) == 1
    write_go(path)  # fixed
    assert store.open() == []
    assert sorted(store.read().services) == GO_HOSTS


def test_failed_import_is_retried_once_the_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b'{"routes": {}}')
    store = Store(path)
    with pytest.raises(RegistryError):
        store.open()
    path.rename(tmp_path / "state.json.unknown")
    assert store.open() is None  # a new, empty registry
    assert store.read().services == {}


def test_failed_legacy_import_is_retried_once_the_file_is_fixed(tmp_path: Path) -> None:
    """In the image (registry in certs/.luma-proxy/), the broken file is the data dir's
    state.json: fixing or moving it aside must reach a running proxy too."""
    old = tmp_path / "state.json"
    old.write_bytes(b'{"routes": {}}')
    store = Store(tmp_path / "certs" / ".luma-proxy" / "state.json")
    with pytest.raises(RegistryError, match="unknown layout"):
        store.open()
    write_go(old)  # fixed
    assert store.open() == []
    assert sorted(store.read().services) == GO_HOSTS


def test_adopt_false_starts_a_new_registry_and_leaves_the_json_aside(tmp_path: Path) -> None:
    """``luma-proxy import FILE``: the registry starts from FILE alone."""
    path = tmp_path / "state.json"
    path.write_bytes(b'{"routes": {"a.com": "a:80"}}')  # would fail an import
    store = Store(path, adopt=False)
    data = json.dumps({"services": {"a.test": json.loads(
        service("a.test", "a:1").model_dump_json())}}).encode()
    assert store.import_json(data) == ([], 1)
    assert store.last_import is None
    assert path.read_bytes() == b'{"routes": {"a.com": "a:80"}}'  # left where it was
    assert not (tmp_path / f"state.json{IMPORT_SUFFIX}").exists()
    later = Store(path)  # the database exists: the JSON file is never taken over
    assert later.open() is None and list(later.read().services) == ["a.test"]

    go = tmp_path / "go" / "state.json"
    write_go(go)  # a file that would import fine is not taken either
    fresh = Store(go, adopt=False)
    assert fresh.open() is None and fresh.read().services == {}
    assert go.exists()


# ---------------------------------------------------------------------------- without a database


def test_read_only_commands_read_the_json_as_it_would_be_imported(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    original = write_go(path)
    store = Store(path, create=False)
    assert sorted(store.read().services) == GO_HOSTS
    assert store.read_only_reason() == "no registry yet"
    assert json.loads(store.export_json())["services"].keys() == set(GO_HOSTS)
    with pytest.raises(RegistryError, match="cannot write"), store.transaction():
        pass
    assert path.read_bytes() == original and files(tmp_path) == ["state.json"]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="luma-ro-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        directory.chmod(0o755)
        shutil.rmtree(directory)


def _use_read_only(path: str, conn) -> None:
    if os.geteuid() == 0:  # root writes anywhere: be somebody else
        os.setgid(65534)
        os.setuid(65534)
    store = Store(path)
    out: dict[str, object] = {"notes": store.open(), "hosts": sorted(store.read().services),
                              "reason": store.read_only_reason()}
    try:
        with store.transaction():
            pass
    except RegistryError as e:
        out["write"] = str(e)
    conn.send(out)


@pytest.mark.spawns
def test_read_only_directory_serves_the_json_as_read(shared_dir: Path) -> None:
    """No database can be created there: the JSON state is served, writes say why not."""
    path = shared_dir / "state.json"
    original = write_go(path)
    path.chmod(0o644)
    shared_dir.chmod(0o555)
    receive, send = CTX.Pipe(duplex=False)
    child = CTX.Process(target=_use_read_only, args=(str(path), send))
    child.start()
    assert receive.poll(30), "the child sent nothing"
    out = receive.recv()
    child.join(timeout=10)
    assert child.exitcode == 0
    assert out["notes"] is None  # nothing was taken over
    assert out["hosts"] == GO_HOSTS
    assert "denied" in str(out["reason"]).lower()
    assert "cannot write the registry" in str(out["write"]) and "\n" not in str(out["write"])
    assert path.read_bytes() == original and files(shared_dir) == ["state.json"]


# ---------------------------------------------------------------------------- export / import


def filled(path: Path) -> Store:
    store = Store(path)
    with store.transaction() as tx:
        tx.put(service("a.test", "a:1", networks=["web"]))
        tx.put(service("b.test", "b:1", health_path="/hz", ssl=False, hsts=False))
        tx.put(service("c.test", "c:1", cert_source="custom"))
        tx.put_health("a.test", entry("a:1", healthy=False, last_error="HTTP 503",
                                      containers={"10.0.0.2": False}))
        tx.put_health("b.test", entry("b:1", health_path="/hz", ssl=False))
        tx.put_health("c.test", entry("old-c:1"))  # not in force: not exported
        tx.set_settings(Settings(acme_staging=True, acme_email="ops@example.com",
                                 acme_directory="https://acme.internal/directory"))
    return store


def test_export_then_import_round_trips_services_settings_and_health(tmp_path: Path) -> None:
    source = filled(tmp_path / "a" / "state.json")
    data = source.export_json()
    exported = json.loads(data)
    assert sorted(exported["health"]) == ["a.test", "b.test"]

    copy = Store(tmp_path / "b" / "state.json")
    assert copy.import_json(data, replace=True) == ([], 3)
    assert json.loads(copy.export_json()) == exported
    assert copy.read() == source.read()
    assert in_force(copy) == in_force(source)
    # The same file again changes nothing: no generation moves.
    snapshot = copy.snapshot()
    assert copy.import_json(data, replace=True) == ([], 3)
    assert copy.snapshot() == snapshot

    # Without replace, the routes and health are added; the settings stay.
    added = Store(tmp_path / "c" / "state.json")
    added.import_json(data)
    assert added.read().services == source.read().services
    assert in_force(added) == in_force(source)
    assert added.read().settings == Settings()


def test_import_replace_removes_the_hosts_not_in_the_file(tmp_path: Path) -> None:
    data = json.dumps({"version": 1, "settings": {"acme_staging": True}, "services": {
        "b.test": json.loads(service("b.test", "b:2").model_dump_json()),
        "d.test": json.loads(service("d.test", "d:1").model_dump_json()),
    }}).encode()

    kept = filled(tmp_path / "kept" / "state.json")
    assert kept.import_json(data) == ([], 2)
    assert list(kept.read().services) == ["a.test", "b.test", "c.test", "d.test"]
    assert kept.read().services["b.test"].target == "b:2"
    assert sorted(in_force(kept)) == ["a.test"]  # b's entry was for b:1

    replaced = filled(tmp_path / "replaced" / "state.json")
    generation = replaced.generation()
    assert replaced.import_json(data, replace=True) == ([], 2)
    assert list(replaced.read().services) == ["b.test", "d.test"]
    assert replaced.read().settings == Settings(acme_staging=True)
    assert "a.test" not in replaced.read_health()  # its health went with it
    assert replaced.generation() == generation + 1


def test_import_json_of_a_go_state_and_of_a_broken_file(tmp_path: Path) -> None:
    store = filled(tmp_path / "state.json")
    before = store.export_json()
    for broken in (b"{", b'{"routes": {}}', b"[]", b'{"version": 3}'):
        with pytest.raises(RegistryError) as info:
            store.import_json(broken, replace=True)
        assert "\n" not in str(info.value)
        assert store.export_json() == before
    raw = go_file({"p": {"Blog.Example.com": go_host("web:3000"),
                         "blog.example.com": go_host("web2:3000", created="2027-01-01T00:00:00Z")}})
    notes, count = store.import_json(json.dumps(raw).encode())
    assert count == 1 and len(notes) == 1 and "more than once" in notes[0]
    assert store.read().services["blog.example.com"].target == "web2:3000"
    assert db_path(store.path).exists() and not store.path.exists()
