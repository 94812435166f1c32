"""``luma-proxy run`` at start-up: bad input is one line (its stack a debug log line), a fault
also leaves its stack."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from luma_proxy.cli.commands import cli
from luma_proxy.proxy import server


def run_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: Exception) -> str:
    async def failing(_config: object) -> int:
        raise error

    monkeypatch.setattr(server, "serve", failing)
    monkeypatch.setenv("LUMA_PROXY_EVENT_LOOP", "asyncio")
    result = CliRunner().invoke(cli, ["run", "--http-port", "1", "--state",
                                      str(tmp_path / "state.json")])
    assert result.exit_code == 1
    return result.stderr


def test_a_fault_keeps_the_one_line_and_logs_the_stack(monkeypatch, tmp_path: Path) -> None:
    stderr = run_with(monkeypatch, tmp_path, RuntimeError("boom\nmore"))
    assert "Traceback (most recent call last)" in stderr and "start-up failed" in stderr
    assert stderr.rstrip().splitlines()[-1] == "Error: boom"


def test_bad_input_is_one_line_only(monkeypatch, tmp_path: Path) -> None:
    from mitmproxy.exceptions import OptionsError

    stderr = run_with(monkeypatch, tmp_path, OptionsError("luma_dns_ttl must be >= 0"))
    assert stderr == "Error: luma_dns_ttl must be >= 0\n"


def test_negative_hsts_max_age_is_one_line(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from luma_proxy.cli.commands import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "--http-port", "1", "--hsts-max-age", "-1",
              "--state", str(tmp_path / "state.json")])
    assert exit_.value.code != 0
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--hsts-max-age" in err, err
    assert not (tmp_path / "state.json").exists()


@pytest.fixture
def restore_logging():
    """``run`` sets the process's logging up; put it back for the next test."""
    import logging

    root, ours = logging.getLogger(), logging.getLogger("luma_proxy")
    saved = root.handlers[:], root.level, ours.level
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    ours.setLevel(saved[2])


PORT_IN_USE = OSError(98, "address already in use")


def test_bad_input_stack_is_a_debug_line(monkeypatch, tmp_path: Path, restore_logging) -> None:
    assert run_with(monkeypatch, tmp_path, PORT_IN_USE) == \
        "Error: [Errno 98] address already in use\n"
    monkeypatch.setenv("LUMA_PROXY_LOG_LEVEL", "debug")
    stderr = run_with(monkeypatch, tmp_path, PORT_IN_USE)
    assert "DEBUG luma_proxy: start-up failed" in stderr and "Traceback" in stderr
    assert "OSError: [Errno 98]" in stderr
    assert stderr.rstrip().splitlines()[-1] == "Error: [Errno 98] address already in use"


def test_json_log_takes_the_stack_and_stderr_keeps_one_line(monkeypatch, tmp_path: Path,
                                                            restore_logging) -> None:
    import json

    async def failing(_config: object) -> int:
        raise PermissionError(13, "Permission denied", str(tmp_path / "key.pem"))

    monkeypatch.setattr(server, "serve", failing)
    monkeypatch.setenv("LUMA_PROXY_EVENT_LOOP", "asyncio")
    monkeypatch.setenv("LUMA_PROXY_LOG_LEVEL", "debug")
    result = CliRunner().invoke(cli, ["run", "--http-port", "1", "--log-format", "json",
                                      "--state", str(tmp_path / "state.json")])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: [Errno 13]")
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    [failed] = [line for line in lines if line["msg"] == "start-up failed"]
    assert failed["level"] == "debug" and "PermissionError" in failed["exc"]


def test_a_bad_log_level_is_one_line(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LUMA_PROXY_LOG_LEVEL", "loud")
    result = CliRunner().invoke(cli, ["run", "--http-port", "1", "--state",
                                      str(tmp_path / "state.json")])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "LUMA_PROXY_LOG_LEVEL" in result.stderr


def test_a_port_in_use_leaves_its_stack_in_the_debug_log(monkeypatch, tmp_path: Path,
                                                         restore_logging) -> None:
    import socket

    monkeypatch.setenv("LUMA_PROXY_EVENT_LOOP", "asyncio")
    monkeypatch.setenv("LUMA_PROXY_LOG_LEVEL", "debug")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["run", "--listen-host", "127.0.0.1", "--http-port",
                                          str(port), "--state", str(tmp_path / "state.json")])
    assert result.exit_code == 1
    assert "DEBUG luma_proxy: cannot listen" in result.stderr
    assert "Traceback" in result.stderr and "address already in use" in result.stderr


@pytest.mark.parametrize(("args", "env", "line"), [
    (["--http3"], {}, "Error: --http3 needs --https-port: HTTP/3 is served on the HTTPS port "
                      "(UDP)"),
    ([], {"LUMA_PROXY_HTTP3": "1"}, "Error: LUMA_PROXY_HTTP3=1 needs --https-port: HTTP/3 is "
                                    "served on the HTTPS port (UDP)"),
])
def test_http3_without_an_https_port_is_one_line(monkeypatch, tmp_path: Path, args: list[str],
                                                 env: dict[str, str], line: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(cli, ["run", "--http-port", "1", *args, "--state",
                                      str(tmp_path / "state.json")])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [line]


@pytest.mark.parametrize(("args", "env", "http3"), [
    ([], None, False),
    (["--http3"], None, True),
    ([], "1", True),
    ([], "off", False),
    (["--no-http3"], "1", False),  # the command line over the environment
])
def test_http3_is_asked_by_flag_or_environment(monkeypatch, tmp_path: Path, restore_logging,
                                               args: list[str], env: str | None,
                                               http3: bool) -> None:
    seen = []

    async def serve(config) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr(server, "serve", serve)
    monkeypatch.setenv("LUMA_PROXY_EVENT_LOOP", "asyncio")
    if env is None:
        monkeypatch.delenv("LUMA_PROXY_HTTP3", raising=False)
    else:
        monkeypatch.setenv("LUMA_PROXY_HTTP3", env)
    result = CliRunner().invoke(cli, ["run", "--http-port", "1", "--https-port", "2", *args,
                                      "--state", str(tmp_path / "state.json")])
    assert result.exit_code == 0, result.stderr
    assert [(c.https_port, c.http3) for c in seen] == [(2, http3)]
