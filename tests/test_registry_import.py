"""State files of other layouts: taken over once, kept as a backup, never read as empty."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from luma_proxy.models import Service
from luma_proxy.registry import IMPORT_SUFFIX, RegistryError, Store
from tests.test_gostate import EXAMPLE, go_file, go_host


def write_go(path: Path, raw: dict | None = None) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = EXAMPLE.read_bytes() if raw is None else json.dumps(raw, indent=2).encode()
    path.write_bytes(data)
    return data


def test_store_reads_a_go_state_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    original = write_go(path)
    state = Store(path).read()
    assert sorted(state.services) == ["api.example.com", "blog.example.com", "other.example.org"]
    assert path.read_bytes() == original  # reading changes nothing


def test_take_over_writes_our_layout_and_keeps_the_original(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    original = write_go(path)
    store = Store(path)
    assert store.take_over() == []
    assert (tmp_path / f"state.json{IMPORT_SUFFIX}").read_bytes() == original
    raw = json.loads(path.read_bytes())
    assert "projects" not in raw and sorted(raw["services"]) == sorted(
        ["api.example.com", "blog.example.com", "other.example.org"])
    assert store.take_over() is None  # once


def test_first_cli_write_takes_over_and_keeps_every_route(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_go(path)
    store = Store(path)

    def add(state) -> None:
        state.services["new.example.com"] = Service(
            name="new", host="new.example.com", target="new:80", project="p")

    store.update(add)
    assert store.last_import == []
    assert sorted(store.read().services) == [
        "api.example.com", "blog.example.com", "new.example.com", "other.example.org"]
    assert (tmp_path / f"state.json{IMPORT_SUFFIX}").exists()


def test_a_failed_change_takes_nothing_over(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    original = write_go(path)

    def refuse(_state) -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        Store(path).update(refuse)
    assert path.read_bytes() == original
    assert not (tmp_path / f"state.json{IMPORT_SUFFIX}").exists()


def test_go_certificate_directory_with_upper_case_is_renamed(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_go(path, go_file({"p": {"Blog.Example.com": go_host("web:3000")}}))
    certs = tmp_path / "certs" / "Blog.Example.com"
    certs.mkdir(parents=True)
    (certs / "cert.pem").write_text("chain")
    Store(path).take_over()
    assert (tmp_path / "certs" / "blog.example.com" / "cert.pem").read_text() == "chain"


@pytest.mark.parametrize("raw", [{"routes": {"a.com": "a:80"}}, {"hosts": []},
                                 {"projects": "nope"}])
def test_unknown_layout_is_an_error_never_an_empty_registry(tmp_path: Path, raw: dict) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps(raw))
    store = Store(path)
    with pytest.raises(RegistryError) as e:
        store.read()
    assert "\n" not in str(e.value)
    with pytest.raises(RegistryError):
        store.update(lambda state: None)
    assert json.loads(path.read_text()) == raw


def test_registry_in_a_certs_dir_takes_over_the_old_data_dir_file(tmp_path: Path) -> None:
    """The image under the Luma CLI's mounts: the registry moved into certs/.luma-proxy/."""
    old = tmp_path / "state.json"
    write_go(old)
    store = Store(tmp_path / "certs" / ".luma-proxy" / "state.json")
    assert sorted(store.read().services) == [
        "api.example.com", "blog.example.com", "other.example.org"]
    assert store.take_over() == []
    assert store.path.exists() and old.exists()
    assert sorted(Store(store.path).read().services) == [
        "api.example.com", "blog.example.com", "other.example.org"]
