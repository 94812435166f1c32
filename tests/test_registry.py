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


def test_state_reader_matches_parse_state_and_reuses_unchanged_services() -> None:
    from luma_proxy.registry import StateReader

    at = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)

    def state_with(targets: dict[str, str], healthy: bool | None = None) -> State:
        state = State()
        for host, target in targets.items():
            state.services[host] = Service(name="x", host=host, target=target, project="p",
                                           created_at=at, updated_at=at)
            state.services[host].health.healthy = healthy
        return state

    reader = StateReader()
    first = dump_state(state_with({"a.test": "a:1", "b.test": "b:1"}))
    one = reader.parse(first)
    assert one == parse_state(first)

    second = dump_state(state_with({"a.test": "a:1", "b.test": "b:2", "c.test": "c:1"}))
    two = reader.parse(second)
    assert two == parse_state(second)
    assert two.services["a.test"] is one.services["a.test"]  # unchanged: not validated again
    assert two.services["b.test"] is not one.services["b.test"]

    third = dump_state(state_with({"a.test": "a:1", "b.test": "b:2", "c.test": "c:1"}, False))
    three = reader.parse(third)
    assert three == parse_state(third)
    assert three.services["a.test"].health.healthy is False  # health changes are seen

    for broken in (b"{", b'{"version": 2}', b'{"services": {"x.test": {"host": "y.test"}}}',
                   first.replace(b'"a:1"', b'"a:0"')):
        with pytest.raises(RegistryError) as caught:
            reader.parse(broken)
        with pytest.raises(RegistryError) as direct:
            parse_state(broken)
        assert str(caught.value) == str(direct.value)
    assert reader.parse(third) == parse_state(third)  # and it recovers
