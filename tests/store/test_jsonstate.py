"""JSON state layouts (``store/jsonstate.py``): what the registry imports and exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from luma_proxy.models import STATE_VERSION, Settings, State
from luma_proxy.store.jsonstate import parse_json
from luma_proxy.store.registry import Store
from tests.store.test_gostate import EXAMPLE
from tests.store.test_registry import AT, entry, service


def _valid_service(host: str = "a.com") -> dict:
    return {"name": "a", "host": host, "target": "blog:80", "project": "p"}


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"  \n\t", "empty"),
        (b"not json", "not valid JSON"),
        (b'{"version": 1, "services": {', "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"string"', "not a JSON object"),
        (b"null", "not a JSON object"),
        (b'{"version": 99}', "version 99"),
        (b'{"version": "1"}', "version '1'"),
        (b'{"version": 2, "services": {}}', "version 2"),
        (
            json.dumps({"services": {"a.com": {**_valid_service(), "target": "blog"}}}).encode(),
            "invalid at services.a.com.target",
        ),
        (
            json.dumps({"services": {"a.com": {"host": "a.com"}}}).encode(),
            "invalid at services.a.com",
        ),
        (b'{"services": []}', "invalid at services"),
        (b'{"services": {}, "settings": {"acme_staging": "maybe"}}', "invalid at settings"),
        (
            json.dumps({"services": {"b.com": _valid_service("a.com")}}).encode(),
            "key 'b.com' != host 'a.com'",
        ),
        (
            # The key is compared with the *normalised* host.
            json.dumps({"services": {"A.com": _valid_service("A.com")}}).encode(),
            "key 'A.com' != host 'a.com'",
        ),
        # Neither ours nor the Go proxy's: an error, never an empty registry.
        (b'{"routes": {"a.com": "a:80"}}', "unknown layout"),
        (b'{"hosts": []}', "unknown layout"),
        (b'{"version": 1, "hosts": {}}', "unknown layout"),
        (b'{"projects": "nope"}', "'projects' is not an object"),
        (b'{"projects": {"p": {"hosts": 3}}}', "project 'p' has no 'hosts' object"),
    ],
)
def test_parse_json_errors_are_one_line(data: bytes, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_json(data)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
    assert message.startswith(("state file", "Go state file"))


@pytest.mark.parametrize("health", [[1], "x", 3, True])
def test_parse_json_health_that_is_not_an_object(health: object) -> None:
    """What ``export`` writes has a ``health`` object; anything else there is ignored or
    explained in one line, never an ``AttributeError`` (a traceback from every command
    while such a file waits to be imported).
    """
    data = json.dumps({"services": {"a.com": _valid_service()}, "health": health}).encode()
    try:
        state, entries, _notes = parse_json(data)
    except ValueError as e:
        assert "\n" not in str(e)
    else:
        assert list(state.services) == ["a.com"] and entries == {}


def test_parse_json_ok() -> None:
    state, health, notes = parse_json(json.dumps({"services": {"a.com": _valid_service()}})
                                      .encode())
    assert state.version == STATE_VERSION and notes == [] and health == {}
    assert state.services["a.com"].target == "blog:80"
    assert parse_json(b"{}") == (State(), {}, [])
    assert parse_json(b'{"version": 1}') == (State(), {}, [])
    go_state, go_health, go_notes = parse_json(EXAMPLE.read_bytes())
    assert sorted(go_state.services) == ["api.example.com", "blog.example.com",
                                         "other.example.org"]
    assert go_health == {} and go_notes == []


def test_parse_json_reads_what_export_writes(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.json")
    with store.transaction() as tx:
        tx.put(service("a.test", "a:1"))
        tx.put(service("b.test", "b:1"))
        tx.put_health("a.test", entry("a:1", healthy=False))
        tx.put_health("b.test", entry("stale:1"))  # not in force: not exported
        tx.set_settings(Settings(acme_staging=True))
    state, health, notes = parse_json(store.export_json())
    assert state == store.read() and notes == []
    assert health == {"a.test": entry("a:1", healthy=False)}


def test_parse_json_takes_health_kept_inside_entries_by_early_versions() -> None:
    raw = {"version": 1, "services": {
        "a.test": {**_valid_service("a.test"), "target": "a:1",
                   "health": {"healthy": False, "checked_at": AT.isoformat(),
                              "last_error": "HTTP 503", "containers": {"10.0.0.2": False}}},
        "b.test": {**_valid_service("b.test"), "health": {"healthy": "maybe"}},  # ignored
        "c.test": {**_valid_service("c.test"), "health": None},
    }}
    state, health, _ = parse_json(json.dumps(raw, indent=2).encode())
    assert set(state.services) == {"a.test", "b.test", "c.test"}
    assert list(health) == ["a.test"]
    legacy = health["a.test"]
    assert (legacy.healthy, legacy.last_error, legacy.checked_at) == (False, "HTTP 503", AT)
    assert legacy.matches(state.services["a.test"])


