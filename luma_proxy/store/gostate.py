"""Taking over a ``state.json`` written by the Go luma-proxy.

Its layout (``../shared/luma-cli/go-state.example.json`` in the project's
notes): ``{"projects": {P: {"hosts": {H: {target, app, health_path,
created_at, ssl_enabled, ...}}}}, "lets_encrypt": {...}, "metadata": {...}}``.
Host keys are kept as the user typed them (case included) and the same host
may appear in two projects; health is never stored. Its certificates are
already where this proxy looks for them (``certs/<host>/cert.pem``,
``key.pem``, ``certs/account.key``), so nothing is re-ordered.

``from_go`` is pure: it returns the state and the notes a user should read
(hosts merged or skipped), and raises ``ValueError`` for a file that has the
Go layout's top level but not its shape.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from luma_proxy.models import (
    Service,
    Settings,
    State,
    normalize_host,
    one_line,
    parse_name,
    parse_target,
)

GO_LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
GO_LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"


def is_go_state(raw: dict[str, Any]) -> bool:
    return "projects" in raw and "services" not in raw


def _time(value: Any) -> datetime | None:
    """Go's zero time (``0001-01-01T00:00:00Z``) and anything unreadable are "unset"."""
    if not isinstance(value, str):
        return None
    head, dot, rest = value.partition(".")
    if dot:  # Go writes nanoseconds; Python takes at most microseconds
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits):]
        value = f"{head}.{digits[:6]}{zone}"
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return None if at.year <= 1 else at


def from_go(raw: dict[str, Any]) -> tuple[State, list[str]]:
    """The Go file as a ``State``, and one note per host that was merged or skipped."""
    projects = raw.get("projects")
    if not isinstance(projects, dict):
        raise ValueError("Go state file: 'projects' is not an object")
    notes: list[str] = []
    chosen: dict[str, tuple[datetime | None, str, Service]] = {}
    for project, body in projects.items():
        hosts = body.get("hosts") if isinstance(body, dict) else None
        if not isinstance(hosts, dict):
            raise ValueError(f"Go state file: project {project!r} has no 'hosts' object")
        for key, entry in hosts.items():
            try:
                service, created = _service(project, key, entry)
            except ValidationError as e:  # pydantic's text is several lines: its first error
                first = e.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                notes.append(one_line(f"skipped host {key!r} of project {project!r}: "
                                      f"{where}: {first['msg']}"))
                continue
            except ValueError as e:
                notes.append(one_line(f"skipped host {key!r} of project {project!r}: {e}"))
                continue
            previous = chosen.get(service.host)
            if previous is not None:
                # The Go proxy kept one entry per spelling and per project; one host
                # routes to one service here. The latest deploy is what it served.
                keep_new = (created or datetime.min.replace(tzinfo=UTC)) > (
                    previous[0] or datetime.min.replace(tzinfo=UTC))
                kept = (project, key) if keep_new else (previous[1], previous[2].host)
                notes.append(f"host {service.host} is in the Go state more than once "
                             f"({previous[1]!r} and {project!r}); kept project {kept[0]!r}")
                if not keep_new:
                    continue
            chosen[service.host] = (created, project, service)
    settings = _settings(raw.get("lets_encrypt"))
    services = {host: service for host, (_c, _p, service) in chosen.items()}
    return State(services=services, settings=settings), notes


def _service(project: str, key: str, entry: Any) -> tuple[Service, datetime | None]:
    if not isinstance(entry, dict):
        raise ValueError("not an object")
    host = normalize_host(key)
    target = entry.get("target")
    if not isinstance(target, str):
        raise ValueError("no target")
    alias, _port = parse_target(target)
    app = entry.get("app") or ""
    if app:
        app = parse_name(str(app), "app")
    created = _time(entry.get("created_at"))
    fields: dict[str, Any] = {
        "name": app or alias, "host": host, "target": target, "project": project, "app": app,
        "health_path": entry.get("health_path") or "/up",
        "ssl": bool(entry.get("ssl_enabled", True)),
    }
    if created is not None:
        fields["created_at"] = fields["updated_at"] = created
    return Service(**fields), created


def _settings(raw: Any) -> Settings:
    if not isinstance(raw, dict):
        return Settings()
    url = raw.get("directory_url") or ""
    staging = bool(raw.get("staging")) or url == GO_LETS_ENCRYPT_STAGING
    directory = url if url and url not in (GO_LETS_ENCRYPT, GO_LETS_ENCRYPT_STAGING) else None
    return Settings(acme_staging=staging, acme_directory=directory,
                    acme_email=raw.get("email") or None)


def certificate_dirs(raw: dict[str, Any]) -> dict[str, str]:
    """Normalised host -> the directory name the Go proxy used, where they differ (case)."""
    out = {}
    projects = raw.get("projects")
    for body in projects.values() if isinstance(projects, dict) else ():
        hosts = body.get("hosts") if isinstance(body, dict) else None
        for key in hosts if isinstance(hosts, dict) else ():
            try:
                host = normalize_host(key)
            except ValueError:
                continue
            if host != key:
                out[host] = key
    return out
