"""``rejoin_networks`` without an engine: what ``run`` says at start (no engine needed)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from luma_proxy.docker.engine import rejoin_networks
from luma_proxy.models import Service
from luma_proxy.store.registry import Store


def seeded(tmp_path: Path) -> str:
    state = tmp_path / "state.json"
    with Store(state).transaction() as tx:
        for host, networks in (("a.test", ["front", "kamal"]), ("b.test", ["kamal"])):
            tx.put(Service(name="s", host=host, target="blog:3000", project="p",
                           networks=networks))
    return str(state)


def test_image_without_socket_names_the_networks_to_connect(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("LUMA_PROXY_IMAGE", "1")
    with caplog.at_level(logging.WARNING, logger="luma_proxy"):
        rejoin_networks(seeded(tmp_path), str(tmp_path / "no-docker.sock"))
    [record] = caplog.records
    assert "not mounted" in record.getMessage() and "(front, kamal)" in record.getMessage()


def test_outside_the_image_without_an_engine_says_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("LUMA_PROXY_IMAGE", raising=False)
    with caplog.at_level(logging.DEBUG, logger="luma_proxy"):
        rejoin_networks(seeded(tmp_path), str(tmp_path / "no-docker.sock"))
    assert caplog.records == []
