"""Property-based tests (hypothesis) of CLI input and state-file contents.

Whatever the input: either the command succeeds, or it prints exactly one line
on stderr, exits non-zero, and the state file is byte-for-byte unchanged.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from luma_proxy.cli import main
from luma_proxy.models import Service, State
from luma_proxy.registry import RegistryError, Store, dump_state, parse_state

LUMA = str(Path(sys.executable).parent / "luma-proxy")
PROFILE = settings(max_examples=100, deadline=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture])


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def seeded(tmp_path: Path) -> Path:
    path = tmp_path / "state.json"
    path.unlink(missing_ok=True)
    Store(path).update(lambda s: s.services.update({"blog.com": Service(
        name="blog", host="blog.com", target="blog:3000", project="p")}))
    return path


text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
hostish = st.one_of(text, st.from_regex(r"[A-Za-z0-9.\-: ]{0,30}", fullmatch=True))
targetish = st.one_of(text, st.from_regex(r"[a-z0-9\-]{0,10}(:[0-9]{0,7})?", fullmatch=True))


@PROFILE
@given(host=hostish, target=targetish, project=text)
def test_deploy_input_either_succeeds_or_changes_nothing(tmp_path: Path, host: str,
                                                         target: str, project: str) -> None:
    path = seeded(tmp_path)
    before = path.read_bytes()
    code, out, err = run_cli("deploy", "--host", host, "--target", target, "--project",
                             project, "--state", str(path))
    if code == 0:
        assert out.startswith("✅") and err == ""
        assert parse_state(path.read_bytes())  # still a valid file
    else:
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("Error: ")
        assert path.read_bytes() == before


@PROFILE
@given(host=hostish, healthy=text)
def test_remove_and_updatehealth_input(tmp_path: Path, host: str, healthy: str) -> None:
    path = seeded(tmp_path)
    before = path.read_bytes()
    for args in (("remove", "--host", host), ("updatehealth", "--host", host, "--healthy",
                                                healthy)):
        code, _, err = run_cli(*args, "--state", str(path))
        if code != 0:
            assert len(err.strip().splitlines()) == 1, err
            assert path.read_bytes() == before
        else:
            before = path.read_bytes()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children,
                                                                       max_size=4),
    max_leaves=20)


@PROFILE
@given(content=st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda services: json.dumps({"version": 1, "services": services}).encode(),
              st.dictionaries(text, json_values, max_size=3)),
))
def test_any_state_file_is_read_or_explained_in_one_line(tmp_path: Path,
                                                        content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    try:
        state = parse_state(content)
    except RegistryError as e:
        assert "\n" not in str(e) and str(e)
        code, _, err = run_cli("list", "--state", str(path))
        assert code != 0 and len(err.strip().splitlines()) == 1
        code, _, err = run_cli("deploy", "--host", "a.com", "--target", "a:1", "--project",
                               "p", "--state", str(path))
        assert code != 0 and path.read_bytes() == content
    else:
        assert isinstance(state, State)
        assert parse_state(dump_state(state)) == state  # what we read, we can write back


@pytest.mark.spawns
def test_fifty_concurrent_cli_processes_end_with_exactly_the_expected_services(
        tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    initial = [f"old{i}.test" for i in range(20)]
    Store(path).update(lambda s: s.services.update({
        h: Service(name="x", host=h, target="x:1", project="p") for h in initial}))
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
    assert sorted(Store(path).read().services) == sorted(new)


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "directory", "foreign-version"])
def test_list_explains_a_broken_file(tmp_path: Path, kind: str) -> None:
    path = seeded(tmp_path)
    good = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(good[:25])
    elif kind == "corrupt":
        path.write_bytes(b"\x00\xff" + good[2:])
    elif kind == "directory":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(good.replace(b'"version": 1', b'"version": 9'))
    code, out, err = run_cli("list", "--state", str(path))
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "state file" in err
