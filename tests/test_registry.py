"""Unit tests for luma_proxy.registry: parsing, atomic locked writes, crash safety."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from luma_proxy.models import STATE_VERSION, Service, State
from luma_proxy.registry import (
    RegistryError,
    Store,
    default_state_path,
    dump_state,
    parse_state,
)

REPO = Path(__file__).resolve().parents[1]
CTX = multiprocessing.get_context("fork")  # fast children that share the imported modules


def service(host: str, target: str = "blog:3000", project: str = "p") -> Service:
    return Service(name=host, host=host, target=target, project=project)


def add(host: str):
    def change(state: State) -> None:
        state.services[host] = service(host)

    return change


def temp_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


# ---------------------------------------------------------------------------- read / write


def test_read_missing_file_is_empty_state(tmp_path: Path) -> None:
    store = Store(tmp_path / "nope" / "state.json")
    state = store.read()
    assert state == State()
    assert state.services == {}
    assert not (tmp_path / "nope").exists()  # reading creates nothing


def test_default_state_path_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUMA_PROXY_STATE", "/tmp/x/state.json")
    assert default_state_path() == "/tmp/x/state.json"
    monkeypatch.delenv("LUMA_PROXY_STATE")
    assert default_state_path() == "/var/lib/luma-proxy/state.json"


def test_update_writes_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    store = Store(path)
    assert store.update(lambda s: s.services.setdefault("blog.com", service("blog.com"))).host
    assert path.exists()
    state = store.read()
    assert list(state.services) == ["blog.com"]
    assert state.services["blog.com"].target == "blog:3000"
    assert json.loads(path.read_bytes())["version"] == STATE_VERSION
    assert path.read_bytes() == dump_state(state)


def test_update_returns_change_result(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.json")
    assert store.update(lambda s: 42) == 42


def test_update_mode_0600_and_atomic_rename(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = Store(path)
    old_umask = os.umask(0)  # a permissive umask must not leak into the file mode
    try:
        store.update(add("a.com"))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    inode = path.stat().st_ino
    store.update(add("b.com"))
    # A new file was renamed over the old one (not rewritten in place) ...
    assert path.stat().st_ino != inode
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # ... and no temp file is left behind.
    assert temp_files(path) == []
    assert sorted(store.read().services) == ["a.com", "b.com"]


def test_noop_update_does_not_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = Store(path)
    store.update(add("a.com"))
    before = store.signature()
    store.update(lambda s: None)
    assert store.signature() == before


def test_change_that_raises_leaves_file_byte_identical(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = Store(path)
    store.update(add("a.com"))
    data = path.read_bytes()
    signature = store.signature()

    def bad(state: State) -> None:
        state.services.clear()
        state.services["evil.com"] = service("evil.com")
        raise ValueError("nope")

    with pytest.raises(ValueError, match="nope"):
        store.update(bad)
    assert path.read_bytes() == data
    assert store.signature() == signature
    assert temp_files(path) == []


def test_change_that_raises_on_missing_file_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.json"

    def bad(state: State) -> None:
        state.services["a.com"] = service("a.com")
        raise RuntimeError("abort")

    with pytest.raises(RuntimeError):
        Store(path).update(bad)
    assert not path.exists()


def test_update_refuses_corrupt_file_without_touching_it(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b'{"version": 1, "services": {')
    with pytest.raises(RegistryError):
        Store(path).update(add("a.com"))
    assert path.read_bytes() == b'{"version": 1, "services": {'


def test_read_directory_is_registry_error(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.mkdir()
    with pytest.raises(RegistryError, match="cannot read state file"):
        Store(path).read()


# ---------------------------------------------------------------------------- parse_state


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
        (
            json.dumps({"services": {"a.com": {**_valid_service(), "target": "blog"}}}).encode(),
            "invalid at services.a.com.target",
        ),
        (
            json.dumps({"services": {"a.com": {"host": "a.com"}}}).encode(),
            "invalid at services.a.com",
        ),
        (b'{"services": []}', "invalid at services"),
        (
            json.dumps({"services": {"b.com": _valid_service("a.com")}}).encode(),
            "key 'b.com' != host 'a.com'",
        ),
        (
            # The key is compared with the *normalised* host.
            json.dumps({"services": {"A.com": _valid_service("A.com")}}).encode(),
            "key 'A.com' != host 'a.com'",
        ),
    ],
)
def test_parse_state_errors(data: bytes, fragment: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_state(data)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
    assert message.startswith("state file")


def test_parse_state_ok_and_version_default() -> None:
    state = parse_state(json.dumps({"services": {"a.com": _valid_service()}}).encode())
    assert state.version == STATE_VERSION
    assert state.services["a.com"].target == "blog:80"
    assert parse_state(b"{}") == State()
    assert parse_state(dump_state(state)) == state


# ---------------------------------------------------------------------------- concurrency


def _add_host(path: str, host: str, barrier) -> None:
    barrier.wait(timeout=30)
    Store(path).update(add(host))


@pytest.mark.spawns
def test_forty_processes_each_add_a_host(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    Store(path).update(add("seed.com"))
    hosts = [f"h{i}.example" for i in range(40)]
    barrier = CTX.Barrier(len(hosts))
    procs = [CTX.Process(target=_add_host, args=(str(path), h, barrier)) for h in hosts]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    assert sorted(Store(path).read().services) == sorted([*hosts, "seed.com"])
    assert temp_files(path) == []


@pytest.mark.spawns
def test_concurrent_cli_deploy_and_remove(tmp_path: Path) -> None:
    """The real command, racing: deploys of new hosts and removes of old ones all land."""
    path = tmp_path / "state.json"
    exe = Path(sys.executable).parent / "luma-proxy"
    old = [f"old{i}.example" for i in range(2)]
    for h in old:
        Store(path).update(add(h))
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
    assert sorted(Store(path).read().services) == sorted(new)


# Holds the lock and stops for good right after the temp file is written, inside update().
_STUCK_WRITER = textwrap.dedent(
    """
    import os, sys, time
    import luma_proxy.registry as registry
    from luma_proxy.models import Service

    real_replace = os.replace

    def stuck_replace(src, dst):
        sys.stdout.write("in-write\\n")
        sys.stdout.flush()
        time.sleep(60)
        real_replace(src, dst)

    registry.os.replace = stuck_replace

    def change(state):
        state.services["killed.com"] = Service(
            name="k", host="killed.com", target="k:1", project="p")

    registry.Store(sys.argv[1]).update(change)
    """
)


@pytest.mark.spawns
def test_sigkilled_writer_leaves_old_file_and_temp_is_cleaned(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = Store(path)
    store.update(add("a.com"))
    before = path.read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-c", _STUCK_WRITER, str(path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == b"in-write\n", proc.stderr.read() if proc.stderr else b""
        # The writer holds the lock and has a fully written temp file; kill it now.
        leftovers = temp_files(path)
        assert len(leftovers) == 1
        assert b"killed.com" in leftovers[0].read_bytes()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert path.read_bytes() == before  # the rename never happened
    assert "killed.com" not in store.read().services

    # The lock died with the process: the next write neither blocks nor keeps the litter.
    child = CTX.Process(target=_add_host, args=(str(path), "b.com", CTX.Barrier(1)))
    child.start()
    child.join(timeout=10)
    assert child.exitcode == 0, "next writer blocked on a dead writer's lock"
    assert sorted(store.read().services) == ["a.com", "b.com"]
    assert temp_files(path) == []


def _write_loop(path: str, start: int) -> None:
    store = Store(path)
    i = start
    while True:
        store.update(add(f"h{i}.example"))
        i += 1
        if i % 20 == 0:  # keep the file small so each write stays quick
            store.update(lambda s: s.services.clear())


@pytest.mark.spawns
def test_writers_killed_at_random_moments_never_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = Store(path)
    store.update(add("seed.example"))
    rng = random.Random(1234)
    for round_ in range(25):
        proc = CTX.Process(target=_write_loop, args=(str(path), round_ * 1000))
        proc.start()
        time.sleep(rng.uniform(0.005, 0.04))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)
        assert proc.exitcode == -signal.SIGKILL
        parse_state(path.read_bytes())  # raises RegistryError on a broken file
    # Whatever was left by the killed writers is removed by the next write.
    store.update(add("final.example"))
    assert temp_files(path) == []
    assert "final.example" in store.read().services


@pytest.mark.spawns
def test_reader_never_sees_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = Store(path)
    store.update(add("seed.example"))
    writer = CTX.Process(target=_write_loop, args=(str(path), 0))
    writer.start()
    versions: set[frozenset[str]] = set()
    reads = 0
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            state = store.read()  # RegistryError here fails the test
            versions.add(frozenset(state.services))
            reads += 1
    finally:
        writer.kill()
        writer.join(timeout=10)
    assert reads > 50
    assert len(versions) > 5, "the writer did not actually write while we read"


# ---------------------------------------------------------------------------- incremental reads
AT = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def state_with(targets: dict[str, str], **settings: object) -> State:
    state = State()
    state.settings = state.settings.model_copy(update=settings)
    for host, target in targets.items():
        state.services[host] = Service(name="x", host=host, target=target, project="p",
                                       created_at=AT, updated_at=AT)
    return state


def indented(state: State) -> bytes:
    """The layout of earlier versions (and of ``jq .``): one field per line."""
    return json.dumps(json.loads(dump_state(state)), indent=2).encode()


def test_dump_state_is_one_service_per_line() -> None:
    from luma_proxy.registry import split_layout

    state = state_with({"a.test": "a:1", "b.test": "b:1"}, acme_staging=True)
    data = dump_state(state)
    lines = data.decode().splitlines()
    assert lines[0] == "{" and lines[-2:] == ["  }", "}"]
    assert [line.split('"')[1] for line in lines if line.startswith("    ")] == ["a.test", "b.test"]
    assert "\"health\":" not in data.decode()
    head, members = split_layout(data)
    assert head == {"version": STATE_VERSION, "settings": state.settings.model_dump(mode="json")}
    assert len(members) == 2
    assert parse_state(data) == state
    empty = dump_state(State())
    assert split_layout(empty)[1] == [] and parse_state(empty) == State()


@pytest.mark.parametrize("layout", [dump_state, indented], ids=["lines", "indented"])
def test_state_reader_matches_parse_state_and_reuses_unchanged_services(layout) -> None:
    from luma_proxy.registry import StateReader

    reader = StateReader()
    first = layout(state_with({"a.test": "a:1", "b.test": "b:1"}))
    one = reader.parse(first)
    assert one == parse_state(first)

    second = layout(state_with({"a.test": "a:1", "b.test": "b:2", "c.test": "c:1"}))
    two = reader.parse(second)
    assert two == parse_state(second)
    assert two.services["a.test"] is one.services["a.test"]  # unchanged: not validated again
    assert two.services["b.test"] is not one.services["b.test"]
    assert list(two.services) == ["a.test", "b.test", "c.test"]

    third = layout(state_with({"c.test": "c:1", "a.test": "a:1"}, acme_staging=True))
    three = reader.parse(third)
    assert three == parse_state(third)
    assert three.settings.acme_staging is True
    assert three.services["c.test"] is two.services["c.test"]

    for broken in (b"{", b'{"version": 2}', b'{"services": {"x.test": {"host": "y.test"}}}',
                   first.replace(b'"a:1"', b'"a:0"'),
                   first.replace(b'"version": 1', b'"version": 3'),
                   first.replace(b'"a.test": {', b'"z.test": {')):
        with pytest.raises(RegistryError) as caught:
            reader.parse(broken)
        with pytest.raises(RegistryError) as direct:
            parse_state(broken)
        assert str(caught.value) == str(direct.value)
    assert reader.parse(third) == parse_state(third)  # and it recovers


def test_state_reader_validates_only_changed_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    from luma_proxy.registry import StateReader

    targets = {f"h{i}.test": f"app{i}:3000" for i in range(500)}
    reader = StateReader()
    reader.parse(dump_state(state_with(targets)))
    validated: list[object] = []
    original = Service.model_validate.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(Service, "model_validate", classmethod(
        lambda cls, obj, *a, **kw: validated.append(obj) or original(cls, obj, *a, **kw)))
    state = reader.parse(dump_state(state_with({**targets, "h7.test": "moved:1"})))
    assert [v["host"] for v in validated] == ["h7.test"]  # type: ignore[index]
    assert state.services["h7.test"].target == "moved:1"


def test_hand_edited_layouts_parse_as_json_does() -> None:
    """Whatever the file looks like, the reader's view is the one of a full parse."""
    from luma_proxy.registry import StateReader

    base = dump_state(state_with({"a.test": "a:1", "b.test": "b:1"}))
    variants = [
        base.replace(b"\n", b"\r\n"),  # CRLF
        base.replace(b'"target":"a:1",', b'"target":"a:1",\n'),  # a member over two lines
        base.replace(b"},\n    \"b.test\"", b'}, "b.test"'),  # two members on one line
        base.rstrip(b"\n"),  # no final newline
        base.replace(b'  "services": {\n', b'  "services": {\n    "a.test": {},\n'),  # dup key
        base.replace(b'"host":"b.test"', b'"host":"b.test","health":{"healthy":false}'),
    ]
    reader = StateReader()
    for data in variants:
        assert reader.parse(data) == parse_state(data), data
        assert StateReader().parse(data) == parse_state(data), data


def test_old_state_file_with_health_inside_loads_as_legacy_health() -> None:
    from luma_proxy.registry import StateReader, observed_health

    raw = json.loads(dump_state(state_with({"a.test": "a:1", "b.test": "b:1", "c.test": "c:1"})))
    raw["services"]["a.test"]["health"] = {"healthy": False, "checked_at": AT.isoformat(),
                                           "last_error": "HTTP 503", "containers": {"10.0.0.2":
                                                                                   False}}
    raw["services"]["b.test"]["health"] = {"healthy": None, "checked_at": None}  # never checked
    raw["services"]["c.test"]["health"] = {"healthy": "maybe"}  # broken: ignored, not fatal
    data = json.dumps(raw, indent=2).encode()
    for state in (parse_state(data), StateReader().parse(data)):
        assert set(state.services) == {"a.test", "b.test", "c.test"}
        assert list(state.legacy_health) == ["a.test"]
        legacy = state.legacy_health["a.test"]
        assert (legacy.healthy, legacy.last_error, legacy.checked_at) == (False, "HTTP 503", AT)
        assert legacy.matches(state.services["a.test"])
        # Without a health file, it is the health in force; with one, it is not.
        assert observed_health(state, None) == {"a.test": legacy}
        assert observed_health(state, {}) == {}
    assert b"\"health\":" not in dump_state(parse_state(data))


def test_cli_write_moves_old_health_to_the_health_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    raw = json.loads(dump_state(state_with({"a.test": "a:1"})))
    raw["services"]["a.test"]["health"] = {"healthy": False, "checked_at": AT.isoformat()}
    path.write_text(json.dumps(raw, indent=2))
    store = Store(path)
    assert store.read_health() is None
    store.update(add("b.test"))
    assert b"\"health\":" not in path.read_bytes()
    entries = store.read_health()
    assert entries is not None and list(entries) == ["a.test"]
    assert entries["a.test"].healthy is False and entries["a.test"].target == "a:1"
    assert store.observed(store.read())["a.test"].healthy is False
    assert stat.S_IMODE(store.health_path.stat().st_mode) == 0o600


# ---------------------------------------------------------------------------- the health file
def entry(target: str, healthy: bool | None = True, at: datetime.datetime = AT):
    from luma_proxy.models import HealthEntry

    return HealthEntry(target=target, healthy=healthy, checked_at=at, changed_at=at,
                       containers={"10.0.0.2": bool(healthy)})


def test_update_health_writes_only_the_health_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = Store(path)
    store.update(add("a.test"))
    state_bytes, state_inode = path.read_bytes(), path.stat().st_ino
    assert store.update_health(lambda e: e.setdefault("a.test", entry("blog:3000"))) is not None
    assert store.health_path == tmp_path / "state.json.health.json"
    assert path.read_bytes() == state_bytes and path.stat().st_ino == state_inode
    assert stat.S_IMODE(store.health_path.stat().st_mode) == 0o600
    assert store.read_health() == {"a.test": entry("blog:3000")}
    assert store.observed(store.read())["a.test"].healthy is True
    # Atomic: a new file renamed over the old one, no temp file left, 0600 again.
    inode = store.health_path.stat().st_ino
    store.update_health(lambda e: e.update({"b.test": entry("b:1", False)}))
    assert store.health_path.stat().st_ino != inode
    assert stat.S_IMODE(store.health_path.stat().st_mode) == 0o600
    assert sorted(tmp_path.glob(".*.tmp")) == []
    assert list(store.read_health() or {}) == ["a.test", "b.test"]
    # Not even the state file's lock is taken: a writer holding it does not block us.
    import fcntl

    with store.lock_path.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        store.update_health(lambda e: e.pop("b.test"))
    assert list(store.read_health() or {}) == ["a.test"]


def test_update_health_starts_from_seed_and_creates_nothing_empty(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.json")
    store.update_health(lambda e: None)
    assert not store.health_path.exists()
    store.update_health(lambda e: None, seed={"a.test": entry("a:1")})
    assert store.read_health() == {"a.test": entry("a:1")}
    store.update_health(lambda e: None, seed={"b.test": entry("b:1")})  # a file exists: no seed
    assert list(store.read_health() or {}) == ["a.test"]


def test_health_reader_reuses_unchanged_entries_and_skips_bad_ones(tmp_path: Path) -> None:
    from luma_proxy.registry import HealthReader

    store = Store(tmp_path / "state.json")
    store.update_health(lambda e: e.update({f"h{i}.test": entry(f"h{i}:1") for i in range(5)}))
    reader = HealthReader()
    one = store.read_health(reader)
    assert one is not None and len(one) == 5
    later = AT + datetime.timedelta(seconds=30)
    store.update_health(lambda e: e.update({"h2.test": entry("h2:1", False, later)}))
    two = store.read_health(reader)
    assert two is not None
    assert two["h1.test"] is one["h1.test"]
    assert two["h2.test"] is not one["h2.test"] and two["h2.test"].healthy is False
    # A line that does not validate costs that host its entry, not the others theirs.
    data = store.health_path.read_bytes().replace(b'"target":"h3:1"', b'"target":7')
    store.health_path.write_bytes(data)
    three = store.read_health(reader)
    assert three is not None and sorted(three) == ["h0.test", "h1.test", "h2.test", "h4.test"]
    # Any other layout is read too (an indented file, e.g. after jq).
    store.health_path.write_text(json.dumps(json.loads(data), indent=2))
    assert sorted(HealthReader().parse(store.health_path.read_bytes())) == sorted(three)


@pytest.mark.parametrize(("data", "fragment"), [
    (b"", "empty"), (b"{", "not valid JSON"), (b"[]", "not a JSON object"),
    (b'{"version": 2, "services": {}}', "version 2"),
    (b'{\n  "version": 2,\n  "services": {\n  }\n}\n', "version 2"),
    (b'{"services": []}', "invalid at services"),
])
def test_health_file_errors(tmp_path: Path, data: bytes, fragment: str) -> None:
    from luma_proxy.registry import HealthReader

    with pytest.raises(RegistryError) as info:
        HealthReader().parse(data)
    assert fragment in str(info.value) and str(info.value).startswith("health file")
    # A writer replaces what it cannot read instead of failing forever.
    store = Store(tmp_path / "state.json")
    store.health_path.write_bytes(data)
    store.update_health(lambda e: e.update({"a.test": entry("a:1")}))
    assert list(store.read_health() or {}) == ["a.test"]


def test_state_write_keeps_a_health_writers_temp_file(tmp_path: Path) -> None:
    """Each file cleans up its own killed writers' temp files, never the other file's."""
    store = Store(tmp_path / "state.json")
    mine = tmp_path / ".state.json.abc123xy.tmp"
    theirs = tmp_path / ".state.json.health.json.abc123xy.tmp"
    mine.write_bytes(b"x")
    theirs.write_bytes(b"y")
    store.update(add("a.test"))
    assert not mine.exists() and theirs.exists()
    store.update_health(lambda e: e.update({"a.test": entry("blog:3000")}))
    assert not theirs.exists()
