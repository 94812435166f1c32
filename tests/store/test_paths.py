"""Where the registry lives: in the image it follows what is mounted."""

from __future__ import annotations

from pathlib import Path

from luma_proxy.store.paths import certs_dir, default_state_path, legacy_state_path

CLI_STATE = "/var/lib/luma-proxy/certs/.luma-proxy/state.json"


def mounts(*paths: str):
    return lambda p: p in paths


def test_explicit_state_wins() -> None:
    env = {"LUMA_PROXY_STATE": "/x/state.json", "LUMA_PROXY_IMAGE": "1"}
    assert default_state_path(env, mounts("/var/lib/luma-proxy/certs")) == "/x/state.json"


def test_outside_the_image_the_default_path() -> None:
    assert default_state_path({}, mounts("/var/lib/luma-proxy/certs")) == \
        "/var/lib/luma-proxy/state.json"


def test_image_with_a_volume_on_the_data_dir_keeps_todays_layout() -> None:
    env = {"LUMA_PROXY_IMAGE": "1"}
    both = mounts("/var/lib/luma-proxy", "/var/lib/luma-proxy/certs")
    assert default_state_path(env, both) == "/var/lib/luma-proxy/state.json"
    assert default_state_path(env, mounts("/var/lib/luma-proxy")) == \
        "/var/lib/luma-proxy/state.json"


def test_image_under_the_luma_cli_run_keeps_the_registry_in_the_certs_mount() -> None:
    env = {"LUMA_PROXY_IMAGE": "1"}
    assert default_state_path(env, mounts("/var/lib/luma-proxy/certs", "/tmp")) == CLI_STATE
    # ... and the certificates stay where the Go proxy kept them.
    assert certs_dir(CLI_STATE) == Path("/var/lib/luma-proxy/certs")
    assert legacy_state_path(CLI_STATE) == Path("/var/lib/luma-proxy/state.json")


def test_ordinary_layout() -> None:
    assert certs_dir("/srv/p/state.json") == Path("/srv/p/certs")
    assert legacy_state_path("/srv/p/state.json") is None
