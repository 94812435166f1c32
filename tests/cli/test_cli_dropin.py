"""The CLI as the Luma CLI meets it: Go state taken over, ``switch``, nothing on stderr.

Run for real as subprocesses, the way ``docker exec luma-proxy luma-proxy ...`` does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from luma_proxy.store.registry import IMPORT_SUFFIX
from tests.cli.test_cli import EXE
from tests.store.test_gostate import EXAMPLE

pytestmark = pytest.mark.spawns  # runs the CLI / builds as real processes

as_root = pytest.mark.skipif(os.getuid() != 0, reason="dropping privileges needs root "
                             "(CI and the image run as root)")


def luma(*args: str, state: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LUMA_PROXY_")}
    full.update(env)
    return subprocess.run([str(EXE), *args, "--state", str(state)], env=full,
                          capture_output=True, text=True, timeout=30)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    return result.stdout


def failed(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def test_deploy_over_a_go_state_file_keeps_every_route(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    shutil.copy(EXAMPLE, state)
    out = ok(luma("deploy", "--host", "new.example.com", "--target", "p-new:80",
                  "--project", "p", "--health-path", "/up", "--ssl", state=state))
    assert out.startswith("✅ Took over the existing state file")
    assert "✅ Deployed new.example.com" in out
    listed = json.loads(ok(luma("list", "--json", state=state)))["services"]
    assert sorted(s["host"] for s in listed) == [
        "api.example.com", "blog.example.com", "new.example.com", "other.example.org"]
    assert (tmp_path / f"state.json{IMPORT_SUFFIX}").read_bytes() == EXAMPLE.read_bytes()


def test_list_reads_a_go_state_file_without_writing(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    shutil.copy(EXAMPLE, state)
    out = ok(luma("list", state=state))
    assert "blog.example.com" in out and "myproject-web:3000" in out
    assert state.read_bytes() == EXAMPLE.read_bytes()


def test_state_file_of_unknown_layout_is_refused_and_left_alone(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text('{"routes": {"blog.com": "blog:3000"}}')
    err = failed(luma("deploy", "--host", "a.com", "--target", "a:80", "--project", "p",
                      state=state))
    assert "unknown layout" in err
    failed(luma("list", state=state))
    assert state.read_text() == '{"routes": {"blog.com": "blog:3000"}}'


def test_switch_changes_only_the_target(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    ok(luma("deploy", "--host", "blog.com", "--target", "blog-blue:3000", "--project", "p",
            "--health-path", "/health", "--ssl=false", state=state))
    assert ok(luma("switch", "--host", "Blog.com", "--target", "blog-green:3000",
                   state=state)).startswith("✅ Switched blog.com -> blog-green:3000")
    (service,) = json.loads(ok(luma("list", "--json", state=state)))["services"]
    assert (service["target"], service["health_path"], service["ssl"]) == (
        "blog-green:3000", "/health", False)
    assert "not deployed" in failed(luma("switch", "--host", "x.com", "--target", "x:1",
                                         state=state))
    assert "invalid target" in failed(luma("switch", "--host", "blog.com", "--target", "nope",
                                           state=state))


def test_success_writes_nothing_to_stderr_even_with_every_warning_on(tmp_path: Path) -> None:
    """The Luma CLI reads any stderr as failure: deprecation notices must not reach it."""
    state = tmp_path / "state.json"
    noisy = {"PYTHONWARNINGS": "always", "PYTHONDEVMODE": "1"}
    for args in (
        ("deploy", "--host", "blog.com", "--target", "p-blog:3000", "--project", "p",
         "--health-path", "/up", "--ssl"),
        ("updatehealth", "--host", "blog.com", "--healthy", "true"),
        ("switch", "--host", "blog.com", "--target", "p-blog:3001"),
        ("list",), ("status",), ("cert-status",), ("set-staging", "--enabled", "false"),
        ("remove", "--host", "blog.com"),
    ):
        out = ok(luma(*args, state=state, **noisy))
        if args[0] in ("deploy", "updatehealth", "switch", "set-staging", "remove"):
            assert out.startswith("✅"), (args, out)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another uid can reach (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="luma-dropin-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def in_child(body) -> int:
    """Run ``body`` in a forked child (privileges dropped there stay there); its exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            code = body()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@as_root
def test_in_the_image_root_becomes_the_proxy_user(shared_dir: Path) -> None:
    """``docker exec`` arrives as root; what it writes must stay the proxy user's.

    (In-process: this machine's interpreter lives under /root, which the proxy
    user cannot read; tests/docker runs the same through ``docker exec``.)
    """
    from luma_proxy.runtime.startup import drop_root

    def body() -> int:
        assert drop_root({"LUMA_PROXY_IMAGE": "1", "LUMA_PROXY_USER": "54321:54322"})
        (shared_dir / "written").write_text("x")
        return 0 if (os.getuid(), os.getgid(), os.geteuid()) == (54321, 54322, 54321) else 1

    assert in_child(body) == 0
    st = (shared_dir / "written").stat()
    assert (st.st_uid, st.st_gid) == (54321, 54322)


def test_outside_the_image_root_stays_root() -> None:
    from luma_proxy.runtime.startup import drop_root

    assert drop_root({"LUMA_PROXY_USER": "54321:54322"}) is False
    assert drop_root({"LUMA_PROXY_IMAGE": "0"}) is False


@as_root
def test_cert_status_says_why_no_certificate_can_be_written(shared_dir: Path) -> None:
    from luma_proxy.cli.commands import unwritable_reason
    from luma_proxy.runtime.startup import drop_root

    certs = shared_dir / "certs"
    certs.mkdir(mode=0o755)  # root's: the proxy user cannot write there
    assert unwritable_reason(certs) is None  # root can

    def body() -> int:
        drop_root({"LUMA_PROXY_IMAGE": "1", "LUMA_PROXY_USER": "54321:54321"})
        reason = unwritable_reason(certs)
        ok = reason is not None and "not writable" in reason and str(certs) in reason
        mine = shared_dir / "mine"
        mine.mkdir()
        return 0 if ok and unwritable_reason(mine) is None else 1

    assert in_child(body) == 0
