"""luma_proxy.store.view: the hot path's picture of the registry, built by a pure function from
a snapshot, parsing only the rows that moved since the previous one."""

from __future__ import annotations

import copy
import datetime
import sqlite3
from pathlib import Path

import pytest

import luma_proxy.store.view as view_module
from luma_proxy.models import HealthEntry, Service, Settings
from luma_proxy.store.registry import Snapshot, Store, db_path
from luma_proxy.store.view import EMPTY, Changes, View, build_view, diff

AT = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
LATER = AT + datetime.timedelta(seconds=30)


def service(host: str, target: str = "blog:3000", **kw: object) -> Service:
    return Service(name=host.split(".")[0], host=host, target=target, project="p",
                   created_at=AT, updated_at=AT, **kw)


def entry(target: str = "blog:3000", healthy: bool | None = True,
          checked: datetime.datetime = AT, **kw: object) -> HealthEntry:
    return HealthEntry(target=target, healthy=healthy, checked_at=checked, changed_at=AT,
                       containers={"10.0.0.2": bool(healthy)}, **kw)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state.json")


def deploy(store: Store, *services: Service) -> None:
    with store.transaction() as tx:
        for s in services:
            tx.put(s)


def observe(store: Store, host: str, health: HealthEntry) -> None:
    with store.transaction() as tx:
        tx.put_health(host, health)


def next_view(store: Store, previous: View = EMPTY) -> View:
    """What the addon does: the rows that moved since ``previous``, built on it."""
    return build_view(store.snapshot(previous.routes_gen, previous.health_gen), previous)


def hand_edit(store: Store, host: str, data: str) -> None:
    """Write a service row as a person with sqlite3 (or a newer writer) might: it moves."""
    db = sqlite3.connect(db_path(store.path))
    with db:
        gen = int(db.execute("SELECT value FROM meta WHERE key = 'routes'").fetchone()[0]) + 1
        db.execute("UPDATE meta SET value = ? WHERE key = 'routes'", (str(gen),))
        db.execute("UPDATE services SET data = ?, gen = ? WHERE host = ?", (data, gen, host))
    db.close()


class Counter:
    """Counts the rows ``build_view`` parses (``view.parse_service``/``parse_health``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.services: list[str] = []
        self.health: list[str] = []
        parse_service, parse_health = view_module.parse_service, view_module.parse_health

        def counted_service(host: str, data: str) -> Service:
            self.services.append(host)
            return parse_service(host, data)

        def counted_health(data: str, checked_at: str | None) -> HealthEntry | None:
            parsed = parse_health(data, checked_at)
            self.health.append(parsed.target if parsed is not None else "?")
            return parsed

        monkeypatch.setattr(view_module, "parse_service", counted_service)
        monkeypatch.setattr(view_module, "parse_health", counted_health)

    def clear(self) -> None:
        self.services.clear()
        self.health.clear()


# ---------------------------------------------------------------------------- purity


def test_build_view_is_pure_and_deterministic(store: Store) -> None:
    deploy(store, service("a.test", "a:1"), service("b.test", "b:1"))
    observe(store, "a.test", entry("a:1"))
    observe(store, "b.test", entry("old-b:1"))
    store.update(lambda s: setattr(s.settings, "acme_staging", True))
    snapshot = store.snapshot()
    kept = copy.deepcopy(snapshot)

    one, two = build_view(snapshot), build_view(snapshot, EMPTY)
    assert one == two
    assert snapshot == kept  # the snapshot is not touched
    assert View() == EMPTY  # nor the empty view
    assert (one.routes_gen, one.health_gen) == (snapshot.routes_gen, snapshot.health_gen)
    assert list(one.services) == ["a.test", "b.test"]
    assert one.services["a.test"] == service("a.test", "a:1")
    assert one.health == {"a.test": entry("a:1")}
    assert set(one.observed) == {"a.test", "b.test"}
    assert one.settings == Settings(acme_staging=True)
    assert one.errors == ()

    # Built on a previous view: that view is not touched, and the result is the one a
    # build from scratch gives (the memo saves work, it never changes the answer).
    before = copy.deepcopy(one)
    deploy(store, service("b.test", "b:2"), service("c.test", "c:1"))
    observe(store, "c.test", entry("c:1", healthy=False))
    three = next_view(store, one)
    assert one == before
    assert three == build_view(store.snapshot())
    assert three == build_view(store.snapshot(), one)
    assert next_view(store, one) == three  # deterministic with a previous view too


def test_empty_registry(store: Store) -> None:
    view = build_view(store.snapshot())
    assert (view.routes_gen, view.health_gen) == (0, 0)
    assert view.services == {} and view.health == {} and view.errors == ()
    assert view.settings == Settings()


# ---------------------------------------------------------------------------- reuse


def test_only_changed_rows_are_parsed_the_others_keep_their_objects(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    deploy(store, *(service(f"h{i}.test", f"app{i}:3000") for i in range(100)))
    for i in range(5):
        observe(store, f"h{i}.test", entry(f"app{i}:3000"))
    count = Counter(monkeypatch)
    one = next_view(store)
    assert len(count.services) == 100 and len(count.health) == 5

    count.clear()
    deploy(store, service("h7.test", "moved:1"))
    two = next_view(store, one)
    assert count.services == ["h7.test"] and count.health == []
    assert two.services["h7.test"].target == "moved:1"
    assert two.services["h7.test"] is not one.services["h7.test"]
    assert all(two.services[h] is one.services[h] for h in one.services if h != "h7.test")
    assert two.observed is one.observed  # health did not move
    assert two.health == one.health

    # A whole snapshot (not only what moved) is parsed just as little.
    count.clear()
    assert build_view(store.snapshot(), one).services == two.services
    assert count.services == ["h7.test"]

    # Health only: not one service parsed, the routes are the very same objects.
    count.clear()
    observe(store, "h3.test", entry("app3:3000", healthy=False))
    three = next_view(store, two)
    assert count.services == [] and count.health == ["app3:3000"]
    assert three.services is two.services and three.settings is two.settings
    assert three.service_rows is two.service_rows
    assert three.health["h3.test"].healthy is False
    assert all(three.health[h] is two.health[h] for h in two.health if h != "h3.test")

    # Only checked_at moved: no generation moves, nothing is parsed, nothing changes.
    count.clear()
    observe(store, "h1.test", entry("app1:3000", checked=LATER))
    four = next_view(store, three)
    assert count.services == [] and count.health == []
    assert four.services is three.services and four.health is three.health
    assert diff(three, four) == Changes({}, [], [], [])


# ---------------------------------------------------------------------------- invalid rows


def test_invalid_row_keeps_the_last_good_version_and_is_reported_once(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    deploy(store, service("a.test", "a:1"), service("b.test", "b:1"))
    one = next_view(store)
    good = one.services["a.test"]

    hand_edit(store, "a.test", '{"host": "a.test", "target": "no port"}')
    two = next_view(store, one)
    assert two.services["a.test"] is good  # the last good version stays in force
    assert len(two.errors) == 1
    assert "a.test" in two.errors[0] and "\n" not in two.errors[0]
    assert diff(one, two).changed == {}

    count = Counter(monkeypatch)
    deploy(store, service("c.test", "c:1"))  # the routes move, the bad row does not
    three = next_view(store, two)
    assert three.errors == ()  # not reported again
    assert three.services["a.test"] is good
    assert count.services == ["c.test"]  # nor parsed again
    assert build_view(store.snapshot(), three).errors == ()
    assert next_view(store, three) == three  # nothing moved

    deploy(store, service("a.test", "a:2"))  # written properly again
    four = next_view(store, three)
    assert four.errors == () and four.services["a.test"].target == "a:2"


def test_invalid_row_without_a_good_version_is_left_out_and_reported_once(
        store: Store) -> None:
    deploy(store, service("a.test", "a:1"), service("b.test", "b:1"))
    hand_edit(store, "a.test", "not json")
    one = build_view(store.snapshot())
    assert list(one.services) == ["b.test"]
    assert len(one.errors) == 1 and "a.test" in one.errors[0]
    deploy(store, service("c.test", "c:1"))
    two = next_view(store, one)
    assert list(two.services) == ["b.test", "c.test"] and two.errors == ()


def test_row_of_another_host_and_invalid_settings() -> None:
    """Hand-made snapshots: a row whose data names another host, settings that do not
    validate (kept from the last good view)."""
    first = build_view(Snapshot(1, 0, Settings(acme_staging=True).model_dump_json(),
                                [("a.test", 1, service("a.test").model_dump_json())], []))
    assert first.errors == () and first.settings.acme_staging is True
    second = build_view(Snapshot(2, 0, '{"acme_staging": "maybe"}', [
        ("a.test", 1, service("a.test").model_dump_json()),
        ("b.test", 2, service("x.test").model_dump_json()),
    ], []), first)
    assert list(second.services) == ["a.test"]
    assert second.services["a.test"] is first.services["a.test"]
    assert second.settings is first.settings
    assert len(second.errors) == 2
    assert "its host is 'x.test'" in second.errors[0]
    assert "settings are invalid" in second.errors[1]


def test_invalid_health_row_costs_that_host_its_health_only(store: Store) -> None:
    deploy(store, service("a.test", "a:1"), service("b.test", "b:1"))
    observe(store, "a.test", entry("a:1"))
    observe(store, "b.test", entry("b:1", healthy=False))
    db = sqlite3.connect(db_path(store.path))
    with db:
        db.execute("UPDATE health SET data = '{\"target\": 7}', gen = gen + 10 "
                   "WHERE host = 'a.test'")
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 10 WHERE key = 'health'")
    db.close()
    view = build_view(store.snapshot())
    assert list(view.health) == ["b.test"] and view.errors == ()


# ---------------------------------------------------------------------------- health in force


def test_health_is_in_force_only_for_the_service_as_it_is(store: Store) -> None:
    deploy(store, service("a.test", "a:1"), service("b.test", "b:1", health_path="/hz"),
           service("c.test", "c:1", ssl=False), service("d.test", "d:1"))
    observe(store, "a.test", entry("a:1"))
    observe(store, "b.test", entry("b:1"))  # checked on /up, the service says /hz
    observe(store, "c.test", entry("c:1"))  # checked with ssl, the service has none
    observe(store, "d.test", entry("d:1", health_path="/up", ssl=True, healthy=False))
    observe(store, "gone.test", entry("g:1"))  # no such service
    one = next_view(store)
    assert sorted(one.health) == ["a.test", "d.test"]
    assert sorted(one.observed) == ["a.test", "b.test", "c.test", "d.test", "gone.test"]
    assert one.health["d.test"].healthy is False

    # A new target must prove itself: the entry observed for the old one no longer counts...
    deploy(store, service("a.test", "a:2"))
    two = next_view(store, one)
    assert "a.test" not in two.health
    assert two.observed is one.observed
    # ... and counts again, the very same entry, once the service is back as it was.
    deploy(store, service("a.test", "a:1"))
    three = next_view(store, two)
    assert three.health["a.test"] is one.health["a.test"]

    # An entry for the new target puts it in force.
    deploy(store, service("b.test", "b:1"))  # back on /up: b's entry matches now
    four = next_view(store, three)
    assert four.health["b.test"] is one.observed["b.test"]


# ---------------------------------------------------------------------------- diff


def test_diff_gives_changed_removed_and_health_hosts(store: Store) -> None:
    deploy(store, service("a.test", "a:1"), service("b.test", "b:1"), service("c.test", "c:1"))
    observe(store, "a.test", entry("a:1"))
    one = next_view(store)
    assert diff(EMPTY, one) == Changes(dict(one.services), [], ["a.test"], [])
    assert diff(one, one) == Changes({}, [], [], [])

    deploy(store, service("b.test", "b:2"), service("d.test", "d:1"))
    with store.transaction() as tx:
        tx.delete("c.test")
    observe(store, "a.test", entry("a:1", healthy=False))
    two = next_view(store, one)
    changes = diff(one, two)
    assert set(changes.changed) == {"b.test", "d.test"}
    assert changes.changed["b.test"] is two.services["b.test"]
    assert changes.removed == ["c.test"]
    assert changes.health == ["a.test"]
    assert changes.failing == ["a.test"]  # its container failed: routing must drop it

    observe(store, "d.test", entry("d:1"))  # health only
    three = next_view(store, two)
    assert diff(two, three) == Changes({}, [], ["d.test"], [])

    deploy(store, service("a.test", "a:9"))  # a's entry stops being in force
    four = next_view(store, three)
    changes = diff(three, four)
    assert list(changes.changed) == ["a.test"] and changes.removed == []
    assert "a.test" not in four.health and changes.health == []
