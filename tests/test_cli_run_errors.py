"""``luma-proxy run`` at start-up: bad input is one line, a fault also leaves its stack."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from luma_proxy import server
from luma_proxy.cli import cli


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
    from luma_proxy.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "--http-port", "1", "--hsts-max-age", "-1",
              "--state", str(tmp_path / "state.json")])
    assert exit_.value.code != 0
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--hsts-max-age" in err, err
    assert not (tmp_path / "state.json").exists()
