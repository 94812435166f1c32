"""Taking over the Go luma-proxy's state.json (pure conversion)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from luma_proxy.store.gostate import from_go, is_go_state

# A state.json written by the Go proxy's own code (see docs/docker.md, migration).
EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "go-state.example.json"


def go_host(target: str, created: str = "2026-12-02T06:51:14.267467197Z", **kw: object) -> dict:
    return {"target": target, "app": "", "health_path": "/up", "created_at": created,
            "ssl_enabled": True, "ssl_redirect": True, "forward_headers": True,
            "response_timeout": "30s", **kw}


def go_file(projects: dict[str, dict[str, dict]], **top: object) -> dict:
    return {"projects": {p: {"hosts": hosts} for p, hosts in projects.items()},
            "lets_encrypt": {"account_key_file": "/var/lib/luma-proxy/certs/account.key",
                             "directory_url": "https://acme-v02.api.letsencrypt.org/directory",
                             "email": "", "staging": False},
            "metadata": {"version": "2.0.0", "last_updated": "2026-12-02T06:51:14Z"}, **top}


@pytest.fixture
def example() -> dict:
    return json.loads(EXAMPLE.read_text())


def test_example_file_becomes_every_route(example: dict) -> None:
    assert is_go_state(example)
    state, notes = from_go(example)
    assert notes == []
    assert {h: (s.target, s.project, s.health_path, s.ssl) for h, s in state.services.items()} == {
        "api.example.com": ("myproject-api:8080", "myproject", "/health", False),
        "blog.example.com": ("myproject-web:3000", "myproject", "/up", True),
        "other.example.org": ("shop-web:80", "shop", "/up", True),
    }
    blog = state.services["blog.example.com"]
    assert blog.created_at.isoformat().startswith("2026-12-02T06:51:14.267461")
    assert state.settings.acme_staging is False and state.settings.acme_directory is None


def test_host_keys_are_normalised_and_a_duplicate_is_reported_latest_kept() -> None:
    raw = go_file({
        "old": {"Blog.Example.COM": go_host("old-web:80", created="2025-01-01T00:00:00Z")},
        "new": {"blog.example.com": go_host("new-web:3000", created="2026-01-01T00:00:00Z")},
    })
    state, notes = from_go(raw)
    assert list(state.services) == ["blog.example.com"]
    assert state.services["blog.example.com"].project == "new"
    assert len(notes) == 1 and "blog.example.com" in notes[0] and "kept project 'new'" in notes[0]


def test_a_bad_entry_is_skipped_with_a_note_not_the_whole_file() -> None:
    raw = go_file({"p": {"good.example.com": go_host("good:80"),
                         "bad host": go_host("x:80"),
                         "noport.example.com": go_host("noport")}})
    state, notes = from_go(raw)
    assert list(state.services) == ["good.example.com"]
    assert len(notes) == 2 and all(n.startswith("skipped host") for n in notes)


def test_go_zero_time_and_settings() -> None:
    raw = go_file({"p": {"a.example.com": go_host("a:80", created="0001-01-01T00:00:00Z")}})
    raw["lets_encrypt"].update(staging=True, email="ops@example.com")
    state, _ = from_go(raw)
    assert state.services["a.example.com"].created_at.year > 2000  # unset: now
    assert state.settings.acme_staging is True
    assert state.settings.acme_email == "ops@example.com"


def test_private_acme_directory_is_kept() -> None:
    raw = go_file({})
    raw["lets_encrypt"]["directory_url"] = "https://acme.internal/directory"
    assert from_go(raw)[0].settings.acme_directory == "https://acme.internal/directory"


@pytest.mark.parametrize("raw", [{"projects": []}, {"projects": {"p": {"hosts": 3}}}])
def test_go_layout_of_the_wrong_shape_raises(raw: dict) -> None:
    with pytest.raises(ValueError, match="Go state file"):
        from_go(raw)
