"""The ``luma-proxy`` command, run for real as a subprocess (the way Luma drives it).

``luma_proxy/cli.py`` has no ``__main__`` block, so ``python -m luma_proxy.cli.commands`` does
nothing; the console script installed next to the interpreter is used instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import bcrypt
import pytest
from argon2 import PasswordHasher

from luma_proxy.models import Health, Service
from luma_proxy.store.registry import Store

pytestmark = pytest.mark.spawns  # runs the CLI / builds as real processes

EXE = Path(sys.executable).parent / "luma-proxy"

DEPLOY_BLOG = [
    "deploy", "--host", "blog.com", "--target", "myproject-blog:3000",
    "--project", "myproject", "--health-path", "/up", "--ssl",
]


def run(*args: str, state: Path | None = None, env_state: Path | None = None,
        ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LUMA_PROXY_STATE"}
    if env_state is not None:
        env["LUMA_PROXY_STATE"] = str(env_state)
    argv = [str(EXE), *args]
    if state is not None:
        argv += ["--state", str(state)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)


def run_all(calls: list[Callable[[], subprocess.CompletedProcess[str]]],
            ) -> list[subprocess.CompletedProcess[str]]:
    """Run independent CLI calls side by side (each one costs a Python start-up)."""
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda call: call(), calls))


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def registry(path: Path) -> bytes:
    """Everything in the registry (routes, settings, health), to compare before and after."""
    return Store(path, create=False).export_json()


def routes(path: Path) -> tuple[int, bytes]:
    """The routes generation and the routes: what the proxy follows."""
    store = Store(path, create=False)
    data = json.loads(store.export_json())
    return store.generation(), json.dumps([data["services"], data["settings"]]).encode()


def seed(path: Path, *services: Service) -> bytes:
    """Write services in-process (faster than the CLI) and return the registry's content."""
    with Store(path).transaction() as tx:
        for s in services:
            tx.put(s)
    return registry(path)


def health_of(path: Path, host: str) -> Health:
    """The health in force for ``host``, as ``list`` shows it (pending if none)."""
    store = Store(path)
    return store.observed(store.read()).get(host) or Health()


def svc(host: str, project: str = "myproject", target: str = "blog:3000") -> Service:
    return Service(name=host, host=host, target=target, project=project)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.json"


def test_console_script_exists() -> None:
    assert EXE.exists(), f"{EXE} missing: is the package installed in the venv?"


# ---------------------------------------------------------------------------- happy paths


def test_luma_deploy_then_updatehealth(state: Path) -> None:
    out = ok(run(*DEPLOY_BLOG, state=state))
    assert out.startswith("✅")
    assert "blog.com" in out and "myproject-blog:3000" in out
    service = Store(state).read().services["blog.com"]
    assert service.target == "myproject-blog:3000"
    assert service.project == "myproject"
    assert service.health_path == "/up"
    assert service.ssl is True
    assert health_of(state, "blog.com").healthy is None
    before = routes(state)

    out = ok(run("updatehealth", "--host", "blog.com", "--healthy", "true", state=state))
    assert out.startswith("✅")
    health = health_of(state, "blog.com")
    assert health.healthy is True
    assert health.checked_at is not None and health.changed_at is not None

    ok(run("updatehealth", "--host", "blog.com", "--healthy", "false", state=state))
    health = health_of(state, "blog.com")
    assert health.healthy is False
    assert health.last_error
    # Health moves no routes: the proxy reloads no route for it.
    assert routes(state) == before
    assert Store(state).db_path.stat().st_mode & 0o777 == 0o600


def test_state_path_from_env(tmp_path: Path) -> None:
    env_path = tmp_path / "env" / "state.json"
    out = ok(run(*DEPLOY_BLOG, env_state=env_path))
    assert out.startswith("✅")
    assert list(Store(env_path).read().services) == ["blog.com"]
    # --state wins over the environment.
    flag_path = tmp_path / "flag" / "state.json"
    ok(run("deploy", "--host", "other.com", "--target", "o:1", "--project", "p",
           state=flag_path, env_state=env_path))
    assert list(Store(flag_path).read().services) == ["other.com"]
    assert list(Store(env_path).read().services) == ["blog.com"]
    # And list reads the env path too.
    assert "blog.com" in ok(run("list", env_state=env_path))


def test_ssl_flag_forms(tmp_path: Path) -> None:
    cases = [([], True), (["--ssl=false"], False), (["--ssl=true"], True), (["--no-ssl"], False),
             (["--ssl=FALSE"], False), (["--ssl=1"], True)]
    paths = [tmp_path / f"{i}.json" for i in range(len(cases))]
    results = run_all([
        lambda f=flags, p=path: run("deploy", "--host", "a.com", "--target", "a:1",
                                    "--project", "p", *f, state=p)
        for (flags, _), path in zip(cases, paths, strict=True)
    ])
    for (flags, expected), path, result in zip(cases, paths, results, strict=True):
        out = ok(result)
        assert ("http only" not in out) is expected, flags
        assert Store(path).read().services["a.com"].ssl is expected, flags


def test_hsts_flag_forms_stored_listed_and_kept_on_redeploy(tmp_path: Path) -> None:
    cases = [([], True), (["--no-hsts"], False), (["--hsts=false"], False),
             (["--hsts=true"], True), (["--hsts"], True)]
    paths = [tmp_path / f"{i}" / "state.json" for i in range(len(cases))]
    results = run_all([
        lambda f=flags, p=path: run("deploy", "--host", "a.com", "--target", "a:1",
                                    "--project", "p", *f, state=p)
        for (flags, _), path in zip(cases, paths, strict=True)
    ])
    for (flags, expected), path, result in zip(cases, paths, results, strict=True):
        out = ok(result)
        assert ("no HSTS" not in out) is expected, flags
        assert Store(path).read().services["a.com"].hsts is expected, flags
        shown = json.loads(ok(run("list", "--json", state=path)))["services"][0]
        assert shown["hsts"] is expected, flags
    # A re-deploy says it again: one without --no-hsts turns it back on.
    path = paths[1]
    data = routes(path)
    ok(run("deploy", "--host", "a.com", "--target", "a:1", "--project", "p", "--no-hsts",
           state=path))
    assert routes(path) == data
    ok(run("deploy", "--host", "a.com", "--target", "a:1", "--project", "p", state=path))
    assert Store(path).read().services["a.com"].hsts is True


def test_state_file_without_hsts_field_loads_with_hsts_on(state: Path) -> None:
    """Files written before --no-hsts existed: every service keeps the default, on."""
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"version": 1, "services": {"blog.com": {
        "name": "blog", "host": "blog.com", "target": "blog:3000", "project": "p",
        "ssl": True}}}))
    shown = json.loads(ok(run("list", "--json", state=state)))["services"][0]
    assert shown["hsts"] is True
    assert Store(state).read().services["blog.com"].hsts is True


def test_redeploy_updates_in_place(state: Path) -> None:
    ok(run(*DEPLOY_BLOG, state=state))
    ok(run("updatehealth", "--host", "blog.com", "--healthy", "true", state=state))
    first = Store(state).read().services["blog.com"]
    data = registry(state), routes(state)

    # Same deploy again: nothing changes, not even the routes generation.
    assert ok(run(*DEPLOY_BLOG, state=state)).startswith("✅")
    assert (registry(state), routes(state)) == data

    # New target: updated in place, creation time kept, health must be proven again.
    out = ok(run("deploy", "--host", "blog.com", "--target", "myproject-blog-v2:3000",
                 "--project", "myproject", state=state))
    assert out.startswith("✅ Updated")
    services = Store(state).read().services
    assert list(services) == ["blog.com"]
    second = services["blog.com"]
    assert second.target == "myproject-blog-v2:3000"
    assert second.created_at == first.created_at
    assert second.updated_at > first.updated_at
    assert health_of(state, "blog.com").healthy is None  # the entry was for the old target
    assert "pending" in ok(run("list", state=state))

    entries = Store(state).read_health()
    assert entries == {}  # the stale entry is gone: moving back starts pending too
    ok(run(*DEPLOY_BLOG, state=state))
    assert health_of(state, "blog.com").healthy is None


def test_other_projects_host_needs_force(state: Path) -> None:
    data = seed(state, svc("blog.com", project="alpha"))
    result = run("deploy", "--host", "Blog.com", "--target", "b:1", "--project", "beta",
                 state=state)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "--force" in result.stderr
    assert registry(state) == data

    ok(run("deploy", "--host", "blog.com", "--target", "b:1", "--project", "beta", "--force",
           state=state))
    service = Store(state).read().services["blog.com"]
    assert (service.project, service.target) == ("beta", "b:1")


def test_hostname_normalisation(state: Path) -> None:
    out = ok(run("deploy", "--host", "Blog.COM.:443", "--target", "Blog:3000", "--project", "p",
                 state=state))
    assert "blog.com" in out
    services = Store(state).read().services
    assert list(services) == ["blog.com"]
    assert services["blog.com"].target == "blog:3000"
    ok(run("updatehealth", "--host", "BLOG.com.", "--healthy", "false", state=state))
    assert health_of(state, "blog.com").healthy is False
    ok(run("remove", "--host", "blog.COM:80", state=state))
    assert Store(state).read().services == {}


def test_remove(state: Path) -> None:
    seed(state, svc("a.com"), svc("b.com"))
    out = ok(run("remove", "--host", "a.com", state=state))
    assert out.startswith("✅") and "a.com" in out
    assert list(Store(state).read().services) == ["b.com"]


def test_list_and_status(state: Path) -> None:
    assert ok(run("list", state=state)).strip() == "No hosts deployed."
    assert not state.parent.exists()  # reading never creates the registry
    seed(state, svc("z.com", project="alpha", target="z:1"),
         svc("a.com", project="beta", target="a:2"), svc("m.com", project="alpha", target="m:3"))
    ok(run("updatehealth", "--host", "m.com", "--healthy", "false", state=state))

    lines = ok(run("list", state=state)).splitlines()
    assert lines[0].split() == ["HOST", "TARGET", "PROJECT", "HEALTH", "LAST", "CHECK", "SSL",
                                "OPTIONS"]
    assert [line.split()[0] for line in lines[1:]] == ["m.com", "z.com", "a.com"]  # by project
    rows = {line.split()[0]: line for line in lines[1:]}
    assert "unhealthy" in rows["m.com"] and "m:3" in rows["m.com"]
    assert "pending" in rows["z.com"] and "never" in rows["z.com"]
    # Columns line up: every row's TARGET starts where the header's does.
    column = lines[0].index("TARGET")
    assert all(line[column:].startswith(t) for line, t in zip(lines[1:], ["m:3", "z:1", "a:2"],
                                                              strict=True))

    status = ok(run("status", state=state)).splitlines()
    # Same table (the LAST CHECK ages may have ticked in between).
    assert [line.split()[:3] for line in status[:-1]] == [line.split()[:3] for line in lines]
    assert status[-1] == "3 host(s), 2 serving"

    for command in ("list", "status"):
        data = json.loads(ok(run(command, "--json", state=state)))
        by_host = {s["host"]: s for s in data["services"]}
        assert set(by_host) == {"a.com", "m.com", "z.com"}
        assert by_host["m.com"]["health"]["healthy"] is False
        assert by_host["a.com"]["target"] == "a:2"
        datetime.fromisoformat(by_host["a.com"]["created_at"])


# ---------------------------------------------------------------------------- bad input


BAD = {
    "invalid hostname": ["deploy", "--host", "a b.com", "--target", "x:1", "--project", "p"],
    "hostname with empty label": ["deploy", "--host", "a..com", "--target", "x:1",
                                  "--project", "p"],
    "target without port": ["deploy", "--host", "new.com", "--target", "x", "--project", "p"],
    "port 0": ["deploy", "--host", "new.com", "--target", "x:0", "--project", "p"],
    "port 70000": ["deploy", "--host", "new.com", "--target", "x:70000", "--project", "p"],
    "empty project": ["deploy", "--host", "new.com", "--target", "x:1", "--project", ""],
    "blank project": ["deploy", "--host", "new.com", "--target", "x:1", "--project", "  "],
    "bad health path": ["deploy", "--host", "new.com", "--target", "x:1", "--project", "p",
                        "--health-path", "up"],
    "bad --ssl value": ["deploy", "--host", "new.com", "--target", "x:1", "--project", "p",
                        "--ssl=maybe"],
    "bad --hsts value": ["deploy", "--host", "new.com", "--target", "x:1", "--project", "p",
                         "--hsts=maybe"],
    "missing --target": ["deploy", "--host", "new.com", "--project", "p"],
    "unknown host on remove": ["remove", "--host", "unknown.com"],
    "unknown host on updatehealth": ["updatehealth", "--host", "unknown.com", "--healthy",
                                     "true"],
    "--healthy maybe": ["updatehealth", "--host", "blog.com", "--healthy", "maybe"],
    "unknown command": ["frobnicate"],
    # certs/account.key is the ACME account key: a host's directory would collide with it
    "host named like the account key": ["deploy", "--host", "Account.Key", "--target", "b:1",
                                        "--project", "p"],
}


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.endswith("\n")
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def bad_results(tmp_path_factory: pytest.TempPathFactory,
                ) -> dict[str, tuple[subprocess.CompletedProcess[str], Path, bytes]]:
    """Every BAD case against its own seeded state file, all run side by side."""
    prepared = {}
    for name in BAD:
        path = tmp_path_factory.mktemp("bad") / "state" / "state.json"
        prepared[name] = (path, seed(path, svc("blog.com")))
    results = run_all([lambda a=args, n=name: run(*a, state=prepared[n][0])
                       for name, args in BAD.items()])
    return {name: (result, *prepared[name])
            for name, result in zip(BAD, results, strict=True)}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_one_line_and_state_untouched(
    bad_results: dict[str, tuple[subprocess.CompletedProcess[str], Path, bytes]], name: str
) -> None:
    result, state, data = bad_results[name]
    assert_one_line_error(result)
    assert result.stderr.startswith("Error: ")
    assert registry(state) == data
    assert sorted(p.name for p in state.parent.iterdir() if "served" not in p.name) == [
        "state.db", "state.db-shm", "state.db-wal"][:len(list(state.parent.iterdir()))]


@pytest.mark.parametrize("args", [BAD["target without port"], BAD["unknown host on remove"]],
                         ids=["deploy", "remove"])
def test_bad_input_creates_no_state_file(state: Path, args: list[str]) -> None:
    assert_one_line_error(run(*args, state=state))
    assert not state.parent.exists() or list(state.parent.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        DEPLOY_BLOG,
        ["remove", "--host", "blog.com"],
        ["updatehealth", "--host", "blog.com", "--healthy", "true"],
        ["list"],
        ["status", "--json"],
    ],
    ids=["deploy", "remove", "updatehealth", "list", "status"],
)
def test_corrupt_state_file(state: Path, args: list[str]) -> None:
    state.parent.mkdir(parents=True)
    data = b'{"version": 1, "services": {"blog.com": {"host": '
    state.write_bytes(data)
    result = run(*args, state=state)
    assert_one_line_error(result)
    assert "state file" in result.stderr
    assert state.read_bytes() == data


def test_foreign_version_state_file(state: Path) -> None:
    state.parent.mkdir(parents=True)
    data = json.dumps({"version": 99, "services": {}}).encode()
    state.write_bytes(data)
    result = run(*DEPLOY_BLOG, state=state)
    assert_one_line_error(result)
    assert "version 99" in result.stderr
    assert state.read_bytes() == data


@pytest.mark.parametrize("args", [DEPLOY_BLOG, ["list"]], ids=["deploy", "list"])
def test_state_path_is_a_directory(state: Path, args: list[str]) -> None:
    state.mkdir(parents=True)
    (state / "keep").write_bytes(b"x")
    result = run(*args, state=state)
    assert_one_line_error(result)
    assert state.is_dir()
    assert [p.name for p in state.iterdir()] == ["keep"]
    assert (state / "keep").read_bytes() == b"x"


# ---------------------------------------------------------------------------- issue 16: routes


HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()  # low cost: behaviour, not strength


def run_stdin(data: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with ``data`` on its stdin (``hash-password``)."""
    env = {k: v for k, v in os.environ.items() if k != "LUMA_PROXY_STATE"}
    return subprocess.run([str(EXE), *args], input=data, env=env, capture_output=True,
                          text=True, timeout=30)


def listed(path: Path) -> dict[str, dict[str, object]]:
    """``list --json``'s rows by route key."""
    return {s["key"]: s for s in json.loads(ok(run("list", "--json", state=path)))["services"]}


def route(host: str, prefix: str = "", name: str = "web", project: str = "p") -> Service:
    return Service(name=name, host=host, target="web:80", project=project, path_prefix=prefix)


def test_deploy_several_hosts_makes_a_row_each(tmp_path: Path) -> None:
    plain, prefixed = tmp_path / "plain" / "state.json", tmp_path / "prefixed" / "state.json"
    results = run_all([
        lambda: run("deploy", "--host", "a.test,b.test", "--host", "c.test", "--target", "web:80",
                    "--project", "p", state=plain),
        lambda: run("deploy", "--host", "A.test,b.test,a.test", "--path-prefix", "/api/",
                    "--path-prefix", "/", "--target", "web:80", "--project", "p",
                    state=prefixed),
    ])
    lines = ok(results[0]).splitlines()
    assert len(lines) == 3 and all(line.startswith("✅ Deployed") for line in lines)
    rows = listed(plain)
    assert set(rows) == {"a.test", "b.test", "c.test"}
    assert {r["target"] for r in rows.values()} == {"web:80"}
    assert {r["name"] for r in rows.values()} == {"web"}  # one service, three rows
    # Host given twice (in any spelling) is one host; each host gets each prefix.
    assert len(ok(results[1]).splitlines()) == 4
    rows = listed(prefixed)
    assert set(rows) == {"a.test", "a.test/api", "b.test", "b.test/api"}
    assert rows["a.test/api"]["host"] == "a.test"
    assert rows["a.test/api"]["path_prefix"] == "/api"


def test_deploy_canonical_host_must_be_one_of_the_hosts(state: Path) -> None:
    data = seed(state, svc("blog.com"))
    result = run("deploy", "--host", "a.test,www.a.test", "--canonical-host", "b.test",
                 "--target", "web:80", "--project", "p", state=state)
    assert_one_line_error(result)
    assert "--canonical-host" in result.stderr
    assert registry(state) == data
    ok(run("deploy", "--host", "a.test,www.a.test", "--canonical-host", "WWW.a.test.",
           "--target", "web:80", "--project", "p", state=state))
    rows = listed(state)
    assert rows["a.test"]["canonical_host"] == rows["www.a.test"]["canonical_host"] == "www.a.test"


def test_deploy_wildcard_with_ssl_needs_a_custom_certificate(tmp_path: Path) -> None:
    fresh, seeded = tmp_path / "fresh" / "state.json", tmp_path / "seeded" / "state.json"
    data = seed(seeded, svc("blog.com"))
    wildcard = ["deploy", "--host", "a.test,*.a.test", "--target", "web:80", "--project", "p"]
    results = run_all([lambda: run(*wildcard, state=fresh), lambda: run(*wildcard, state=seeded),
                       lambda: run(*wildcard, "--ssl=true", state=seeded)])
    for result in results:
        assert_one_line_error(result)
        assert "*.a.test needs --tls-cert" in result.stderr
    assert not fresh.parent.exists()
    assert registry(seeded) == data
    # Without HTTPS a wildcard needs no certificate.
    ok(run(*wildcard, "--no-ssl", state=fresh))
    assert set(listed(fresh)) == {"a.test", "*.a.test"}


def test_remove_needs_a_selector(state: Path) -> None:
    data = seed(state, svc("a.com"))
    result = run("remove", state=state)
    assert_one_line_error(result)
    assert "--host, --service or --project" in result.stderr
    assert registry(state) == data


def test_remove_by_service_and_project(tmp_path: Path) -> None:
    rows = [route("a.test"), route("a.test", "/api"), route("b.test", name="api"),
            route("c.test", project="q"), route("d.test", name="api", project="q")]
    cases = {
        ("--service", "web"): {"a.test", "a.test/api", "c.test"},
        ("--project", "q"): {"c.test", "d.test"},
        ("--service", "api", "--project", "q"): {"d.test"},
        ("--service", "web", "--host", "b.test"): {"a.test", "a.test/api", "b.test", "c.test"},
    }
    paths = {args: tmp_path / str(i) / "state.json" for i, args in enumerate(cases)}
    for path in paths.values():
        seed(path, *rows)
    results = run_all([lambda a=args: run("remove", *a, state=paths[a]) for args in cases])
    everything = {r.key for r in rows}
    for (args, gone), result in zip(cases.items(), results, strict=True):
        lines = ok(result).splitlines()
        assert sorted(lines) == sorted(f"✅ Removed {key}" for key in gone), args
        assert set(Store(paths[args]).read().services) == everything - gone, args


def test_remove_by_service_matching_nothing_refuses(state: Path) -> None:
    data = seed(state, route("a.test"))
    for args in (["--service", "nope"], ["--project", "nope"], ["--service", "web",
                                                                "--project", "nope"]):
        result = run("remove", *args, state=state)
        assert_one_line_error(result)
        assert "no route matches" in result.stderr
    assert registry(state) == data


def test_stop_pause_resume_every_route_of_the_host(state: Path) -> None:
    host = {"a.test", "a.test/api", "a.test/api/v2"}
    others = {"a.testx", "x.a.test", "b.test", "*.a.test"}
    seed(state, route("a.test"), route("a.test", "/api"), route("a.test", "/api/v2"),
         route("a.testx"), route("x.a.test"), route("b.test"), route("*.a.test"))

    def modes() -> dict[str, tuple[object, object, object]]:
        return {k: (r["mode"], r["stop_message"], r["max_pause"]) for k, r in
                listed(state).items()}

    def assert_lines(out: str, verb: str) -> None:
        lines = out.splitlines()
        assert len(lines) == len(host)
        assert {line.split()[2] for line in lines} == host
        assert all(line.startswith(f"✅ {verb} ") for line in lines)

    assert_lines(ok(run("stop", "--host", "A.test.", "--message", "Back at 5 <b>", state=state)),
                 "Stopped")
    shown = modes()
    assert {k: shown[k] for k in host} == dict.fromkeys(host, ("stopped", "Back at 5 <b>", 30.0))
    assert {shown[k] for k in others} == {("serving", None, 30.0)}

    out = ok(run("pause", "--host", "a.test", "--max-pause", "2s", state=state))
    assert_lines(out, "Paused")
    assert "2s" in out
    shown = modes()
    assert {shown[k][0] for k in host} == {"paused"}
    assert {shown[k][2] for k in host} == {2.0}
    assert {shown[k] for k in others} == {("serving", None, 30.0)}

    assert_lines(ok(run("resume", "--host", "a.test", state=state)), "Resumed")
    shown = modes()
    assert {shown[k][:2] for k in host} == {("serving", None)}
    assert {shown[k] for k in others} == {("serving", None, 30.0)}


def test_stop_pause_resume_refuse_bad_input(state: Path) -> None:
    data = seed(state, route("a.test"))
    results = run_all([
        lambda: run("stop", "--host", "nope.test", state=state),
        lambda: run("pause", "--host", "nope.test", state=state),
        lambda: run("resume", "--host", "nope.test", state=state),
        lambda: run("pause", "--host", "a.test", "--max-pause", "25h", state=state),
        lambda: run("pause", "--host", "a.test", "--max-pause", "soon", state=state),
        lambda: run("stop", "--host", "a.test", "--message", "two\nlines", state=state),
    ])
    for result in results:
        assert_one_line_error(result)
    assert registry(state) == data


def test_hash_password() -> None:
    results = run_all([lambda: run_stdin("pässwort\n", "hash-password"),
                       lambda: run_stdin("pässwort", "hash-password", "--scheme", "argon2"),
                       lambda: run_stdin("", "hash-password"),
                       lambda: run_stdin("\n", "hash-password", "--scheme", "argon2")])
    bcrypt_out, argon2_out = ok(results[0]), ok(results[1])
    assert bcrypt_out.count("\n") == 1 and argon2_out.count("\n") == 1
    assert bcrypt.checkpw("pässwort".encode(), bcrypt_out.strip().encode())
    assert not bcrypt.checkpw(b"other", bcrypt_out.strip().encode())
    assert argon2_out.startswith("$argon2")
    assert PasswordHasher().verify(argon2_out.strip(), "pässwort")
    for result in results[2:]:
        assert_one_line_error(result)
        assert "no password" in result.stderr


def test_list_shows_basic_auth_users_and_export_keeps_hashes(tmp_path: Path) -> None:
    state, copy = tmp_path / "a" / "state.json", tmp_path / "b" / "state.json"
    other = bcrypt.hashpw(b"pw2", bcrypt.gensalt(4)).decode()
    ok(run("deploy", "--host", "a.test", "--path-prefix", "/admin", "--target", "web:80",
           "--project", "p", "--basic-auth", f"alice:{HASH}", "--basic-auth", f"bob:{other}",
           "--allow", "10.0.0.0/8", state=state))
    text = ok(run("list", "--json", state=state))
    assert HASH not in text and other not in text and "$2b$" not in text
    assert json.loads(text)["services"][0]["basic_auth"] == ["alice", "bob"]
    table_text = ok(run("list", state=state))
    assert "alice" in table_text and "$2b$" not in table_text

    exported = ok(run("export", state=state))
    data = json.loads(exported)
    assert data["services"]["a.test/admin"]["basic_auth"] == [f"alice:{HASH}", f"bob:{other}"]
    # Round trip: the imported registry has the same routes, hashes included.
    file = tmp_path / "export.json"
    file.write_text(exported)
    assert "Imported 1 host(s)" in ok(run("import", str(file), state=copy))
    assert Store(copy).read().services == Store(state).read().services
    assert json.loads(ok(run("export", state=copy)))["services"] == data["services"]
