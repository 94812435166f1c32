"""Property-based tests (hypothesis) of CLI input and of JSON states to import.

Whatever the input: either the command succeeds, or it prints exactly one line
on stderr, exits non-zero, and the registry is unchanged (its export is
byte-for-byte the same).
"""

from __future__ import annotations

import contextlib
import gc
import io
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from luma_proxy.cli.commands import main
from luma_proxy.models import Service, State
from luma_proxy.store.jsonstate import parse_json
from luma_proxy.store.registry import IMPORT_SUFFIX, RegistryError, Store, db_path

LUMA = str(Path(sys.executable).parent / "luma-proxy")
# Each example creates a registry and commits with fsync: the fast tier (LUMA_TEST_FAST=1,
# under a minute in all) tries 30 of each, the whole suite 100.
PROFILE = settings(max_examples=30 if os.environ.get("LUMA_TEST_FAST") == "1" else 100,
                   deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


_examples = itertools.count()


def fresh(tmp_path: Path) -> Path:
    """A directory of its own for each example (hypothesis runs them all with one tmp_path).

    Clearing one directory instead needed a full collection per example, 8 s a test
    late in the suite: the stores the CLI leaves open remove their -wal and -shm files,
    by name, when collected, which would take the next example's.
    """
    directory = tmp_path / f"example-{next(_examples)}"
    directory.mkdir()
    return directory


def seeded(tmp_path: Path) -> Path:
    path = fresh(tmp_path) / "state.json"
    store = Store(path)
    store.update(lambda s: s.services.update({"blog.com": Service(
        name="blog", host="blog.com", target="blog:3000", project="p")}))
    store.close()
    return path


def export(path: Path) -> bytes:
    """Everything in the registry (routes, settings, health in force)."""
    return Store(path, create=False).export_json()


text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
hostish = st.one_of(text, st.from_regex(r"[A-Za-z0-9.\-: ]{0,30}", fullmatch=True))
targetish = st.one_of(text, st.from_regex(r"[a-z0-9\-]{0,10}(:[0-9]{0,7})?", fullmatch=True))


@PROFILE
@given(host=hostish, target=targetish, project=text)
def test_deploy_input_either_succeeds_or_changes_nothing(tmp_path: Path, host: str,
                                                         target: str, project: str) -> None:
    path = seeded(tmp_path)
    before = export(path)
    code, out, err = run_cli("deploy", "--host", host, "--target", target, "--project",
                             project, "--state", str(path))
    if code == 0:
        assert out.startswith("✅") and err == ""
        after = export(path)
        state, _health, _notes = parse_json(after)  # still a valid registry
        assert len(state.services) in (1, 2)
    else:
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("Error: ")
        assert export(path) == before


@PROFILE
@given(host=hostish, healthy=text)
def test_remove_and_updatehealth_input(tmp_path: Path, host: str, healthy: str) -> None:
    path = seeded(tmp_path)
    before = export(path)
    for args in (("remove", "--host", host), ("updatehealth", "--host", host, "--healthy",
                                                healthy)):
        code, _, err = run_cli(*args, "--state", str(path))
        if code != 0:
            assert len(err.strip().splitlines()) == 1, err
            assert export(path) == before
        else:
            before = export(path)


def json_containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    json_containers, max_leaves=20)
go_hosts = st.dictionaries(hostish, st.one_of(
    json_values,
    st.fixed_dictionaries({"target": targetish}, optional={
        "app": json_values, "health_path": json_values, "created_at": json_values,
        "ssl_enabled": json_values}),
), max_size=3)


@PROFILE
@given(content=st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda services: json.dumps({"version": 1, "services": services}).encode(),
              st.dictionaries(text, json_values, max_size=3)),
    # What export writes, with anything in its health part.
    st.builds(lambda health: json.dumps({"version": 1, "services": {}, "health": health})
              .encode(), json_values),
    # The Go proxy's layout, with anything in its hosts and settings.
    st.builds(lambda projects, le: json.dumps({"projects": projects, "lets_encrypt": le})
              .encode(),
              st.dictionaries(text, st.one_of(json_values, st.fixed_dictionaries(
                  {"hosts": go_hosts})), max_size=2),
              json_values),
))
def test_any_state_file_is_imported_or_explained_in_one_line(tmp_path: Path,
                                                            content: bytes) -> None:
    directory = fresh(tmp_path)
    path = directory / "state.json"
    path.write_bytes(content)
    try:
        notes = Store(path).open()
    except RegistryError as e:
        assert "\n" not in str(e) and str(e)
        # Nothing was taken over, nothing was created, the file is as it was.
        assert path.read_bytes() == content
        assert not db_path(path).exists()
        assert not (directory / f"state.json{IMPORT_SUFFIX}").exists()
        code, out, err = run_cli("list", "--state", str(path))
        assert code != 0 and out == "" and len(err.strip().splitlines()) == 1, err
        code, _, err = run_cli("deploy", "--host", "a.com", "--target", "a:1", "--project",
                               "p", "--state", str(path))
        assert code != 0 and len(err.strip().splitlines()) == 1, err
        assert path.read_bytes() == content
        assert not db_path(path).exists()
    else:
        assert notes is not None, "a JSON state was there: it must have been imported"
        assert all(isinstance(n, str) and "\n" not in n for n in notes), notes
        assert (directory / f"state.json{IMPORT_SUFFIX}").read_bytes() == content
        assert not path.exists()
        state = Store(path).read()
        assert isinstance(state, State)
        # What was imported can be exported, and that export imported again as it is.
        data = export(path)
        again = directory / "again" / "state.json"
        Store(again).import_json(data, replace=True)
        assert export(again) == data
        code, _, err = run_cli("list", "--state", str(path))
        assert code == 0 and err == ""


@pytest.mark.spawns
def test_fifty_concurrent_cli_processes_end_with_exactly_the_expected_services(
        tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    initial = [f"old{i}.test" for i in range(20)]
    Store(path).update(lambda s: s.services.update({
        h: Service(name="x", host=h, target="x:1", project="p") for h in initial}))
    generation = Store(path).generation()
    new = [f"new{i}.test" for i in range(30)]
    procs = [subprocess.Popen([LUMA, "deploy", "--host", h, "--target", "x:2", "--project", "p",
                               "--state", str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for h in new]
    procs += [subprocess.Popen([LUMA, "remove", "--host", h, "--state", str(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for h in initial]
    assert len(procs) == 50
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    store = Store(path)
    assert sorted(store.read().services) == sorted(new)
    assert all(s.target == "x:2" for s in store.read().services.values())
    assert store.generation() == generation + 50  # one commit per command


@pytest.mark.parametrize("kind", ["garbage", "truncated", "zeroed-header", "directory",
                                  "foreign-version-json"])
def test_list_explains_a_broken_registry(tmp_path: Path, kind: str) -> None:
    path = seeded(tmp_path)
    store = Store(path)
    with store.transaction() as tx:  # a database of several pages
        for i in range(200):
            tx.put(Service(name="x", host=f"h{i}.test", target="x:1", project="p"))
    store.close()
    gc.collect()  # the CLI's stores too: with no connection left, all is in the file itself
    assert not Path(f"{db_path(path)}-wal").exists()
    db = db_path(path)
    good = db.read_bytes()
    if kind == "garbage":
        db.write_bytes(random.Random(3).randbytes(len(good)))
    elif kind == "truncated":
        db.write_bytes(good[: len(good) // 2])
    elif kind == "zeroed-header":
        db.write_bytes(bytes(100) + good[100:])
    elif kind == "directory":
        db.unlink()
        db.mkdir()
    else:  # no database yet, and a JSON state of another version waiting to be imported
        db.unlink()
        path.write_text('{"version": 9, "services": {}}')
    code, out, err = run_cli("list", "--state", str(path))
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("Error: ")
    assert ("state.db" in err) if kind != "foreign-version-json" else ("version 9" in err)
