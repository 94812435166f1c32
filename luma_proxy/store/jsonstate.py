"""JSON state files: read once into the registry (``registry.py``), and written for people.

The layouts a registry may be created from, where they were kept (the state
path, or the data directory an earlier install used), and what becomes of
them once imported: moved aside as ``<name>.imported.json``, nothing reads
them again. ``luma-proxy import`` reads the same layouts, and ``export``'s
output too. Pure parsing raises ``ValueError`` with a one-line message.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import orjson
from pydantic import ValidationError

from luma_proxy.models import STATE_VERSION, HealthEntry, State, one_line
from luma_proxy.store import gostate
from luma_proxy.store.paths import certs_dir, legacy_state_path

IMPORT_SUFFIX = ".imported.json"  # the original of a JSON state file taken over
HEALTH_SUFFIX = ".health.json"  # this project's health file before the database


def parse_json(data: bytes) -> tuple[State, dict[str, HealthEntry], list[str]]:
    """A JSON state (this project's, older ones, the Go proxy's): state, health, notes.

    Raises ``ValueError`` (one line) saying what is wrong; never reads a file it
    does not understand as an empty registry.
    """
    if not data.strip():
        raise ValueError("state file is empty (truncated?)")
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ValueError(one_line(f"state file is not valid JSON: {e}")) from None
    if not isinstance(raw, dict):
        raise ValueError("state file is not a JSON object")
    if gostate.is_go_state(raw):
        try:
            state, notes = gostate.from_go(raw)
        except ValueError as e:
            raise ValueError(one_line(str(e))) from None
        return state, {}, notes
    unknown = sorted(set(raw) - {"version", "settings", "services", "health"})
    if "services" not in raw and unknown:
        raise ValueError(one_line(
            f"state file has an unknown layout (top-level keys: {', '.join(unknown)[:200]}); "
            "not reading it as an empty registry"))
    version = raw.get("version", STATE_VERSION)
    if version != STATE_VERSION:
        raise ValueError(
            f"state file has version {version!r}, this luma-proxy understands {STATE_VERSION}")
    try:
        state = State.model_validate({k: v for k, v in raw.items() if k != "health"})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(one_line(f"state file is invalid at {where}: {first['msg']}")) from None
    health: dict[str, HealthEntry] = {}
    for key, service in state.services.items():
        if key != service.key:
            raise ValueError(
                one_line(f"state file is invalid: key {key!r} != host {service.key!r}"))
        entry = raw["services"][key].get("health")  # kept inside entries by early versions
        if isinstance(entry, dict):
            with contextlib.suppress(ValidationError):
                health[key] = HealthEntry.model_validate(
                    {**entry, "target": service.target, "health_path": service.health_path,
                     "ssl": service.ssl})
    exported = raw.get("health") or {}  # what export_json writes
    if not isinstance(exported, dict):
        raise ValueError("state file is invalid at health: not an object")
    for key, entry in exported.items():
        with contextlib.suppress(ValidationError, TypeError):
            health[key] = HealthEntry.model_validate(entry)
    return state, health, []


def parse_health_json(data: bytes) -> dict[str, HealthEntry]:
    """This project's former health file; entries that do not validate are left out."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {}
    out = {}
    services = raw.get("services") if isinstance(raw, dict) else None
    for host, value in (services or {}).items():
        with contextlib.suppress(ValidationError, TypeError):
            out[host] = HealthEntry.model_validate(value)
    return out


def candidates(state_path: Path) -> list[Path]:
    """Where a JSON state file may be: the state path, then an earlier install's place."""
    found = [state_path] if state_path.suffix != ".db" else [state_path.with_suffix(".json")]
    if (legacy := legacy_state_path(state_path)) is not None:
        found.append(legacy)
    return found


def read(source: Path) -> tuple[State, dict[str, HealthEntry], list[str]] | None:
    """``source`` parsed, with the health file beside it (``None``: there is no file)."""
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"cannot read state file {source}: {e.strerror}") from None
    try:
        state, health, notes = parse_json(data)
    except ValueError as e:
        raise ValueError(f"{e} (at {source}: move it aside, or start the registry with "
                         "`luma-proxy import FILE`)") from None
    sidecar = source.with_name(source.name + HEALTH_SUFFIX)
    with contextlib.suppress(OSError):
        health = {**health, **parse_health_json(sidecar.read_bytes())}
    return state, health, notes


def set_aside(source: Path, state_path: Path) -> None:
    """The JSON files taken over move aside (``<name>.imported.json``): nobody edits a
    file that is no longer read; the Go proxy's upper-case cert dirs are renamed."""
    with contextlib.suppress(OSError):
        original = source.read_bytes()
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
            _rename_cert_dirs(state_path, gostate.certificate_dirs(orjson.loads(original)))
        source.rename(source.with_name(source.name + IMPORT_SUFFIX))
    sidecar = source.with_name(source.name + HEALTH_SUFFIX)
    with contextlib.suppress(OSError):
        sidecar.rename(sidecar.with_name(sidecar.name + IMPORT_SUFFIX))


def _rename_cert_dirs(state_path: Path, dirs: dict[str, str]) -> None:
    """``certs/Blog.Example.com`` -> ``certs/blog.example.com`` (the Go proxy kept case)."""
    root = certs_dir(state_path)
    for host, original in dirs.items():
        source, dest = root / original, root / host
        if "/" in original or original.startswith("."):
            continue
        if source.is_dir() and not dest.exists():
            with contextlib.suppress(OSError):
                source.rename(dest)
