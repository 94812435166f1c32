"""The registry's data model: what the CLI desires and what the proxy observed.

Both live in the registry (``registry.py``): ``Service`` rows written by the
CLI, ``HealthEntry`` rows written by the proxy's health leader and by
``updatehealth``; ``State`` is the whole of the routes and settings.

Parsing functions are pure and raise ``ValueError`` with a one-line message, so
the CLI, the addon and the tests share one definition of "valid".
"""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

STATE_VERSION = 1

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_ALIAS = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,252}$")


def now() -> datetime:
    return datetime.now(UTC)


def one_line(text: str) -> str:
    """Control characters escaped, so that a message is always exactly one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def normalize_host(value: str) -> str:
    """Canonical form of a Host: lower case, IDNA, no port, no trailing dot.

    Requests and the registry both go through this, so ``Blog.COM.:443`` and
    ``blog.com`` are the same key.
    """
    host = value.strip()
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"invalid hostname {value!r}")
    if host.startswith("["):  # [v6]:port
        end = host.find("]")
        if end == -1:
            raise ValueError(f"invalid hostname {value!r}")
        rest = host[end + 1 :]
        if rest and not re.fullmatch(r":\d{1,5}", rest):
            raise ValueError(f"invalid hostname {value!r}")
        host = host[1:end]
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"invalid hostname {value!r}") from None
    if host.count(":") == 1:
        host, _, port = host.partition(":")
        if not port.isdigit():
            raise ValueError(f"invalid hostname {value!r}")
    if host.endswith("."):
        host = host[:-1]
    host = host.lower()
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise ValueError(f"invalid hostname {value!r}") from None
    if len(host) > 253 or not all(_LABEL.match(label) for label in host.split(".")):
        raise ValueError(f"invalid hostname {value!r}")
    return host


def parse_host_pattern(value: str) -> str:
    """A deployable host: a hostname (``normalize_host``) or ``*.example.com``.

    A wildcard stands for exactly one more label, and needs at least two labels
    after it (``*.com`` would claim a whole top-level domain).
    """
    text = value.strip()
    if text.startswith("*."):
        rest = normalize_host(text[2:])
        if ip_literal(rest) is not None or "." not in rest:
            raise ValueError(f"invalid wildcard host {value!r}: expected *.example.com")
        return "*." + rest
    if "*" in text:
        raise ValueError(f"invalid host {value!r}: a wildcard must be the whole first "
                         "label, as in *.example.com")
    return normalize_host(text)


def is_wildcard(host: str) -> bool:
    return host.startswith("*.")


def parse_path_prefix(value: str) -> str:
    """``/api`` (no trailing slash); ``/`` or empty means the whole host ("")."""
    text = value.strip()
    if not text.startswith("/") or not text.isascii() or any(
            c.isspace() or ord(c) < 32 or c in "?#%\\" for c in text):
        raise ValueError(f"invalid path prefix {value!r}: must start with / and be ASCII "
                         "without spaces, ?, #, % or backslash")
    parts = [p for p in text.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"invalid path prefix {value!r}: no . or .. segments")
    return "".join(f"/{p}" for p in parts)


def route_key(host: str, path_prefix: str = "") -> str:
    """The registry key of one route: the host, and its path prefix if any."""
    return host + path_prefix


def parse_duration(value: str) -> float:
    """``30``, ``30s``, ``500ms``, ``2m`` -> seconds (kamal-proxy's spelling)."""
    text = value.strip().lower()
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix):
            number, factor = text[: -len(suffix)], scale
            break
    else:
        number, factor = text, 1.0
    try:
        seconds = float(number) * factor
    except ValueError:
        raise ValueError(f"invalid duration {value!r}: e.g. 30s, 500ms, 2m") from None
    if not 0 <= seconds <= 86400 or seconds != seconds:
        raise ValueError(f"invalid duration {value!r}: must be 0 to 24h")
    return seconds


def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address an IP host names (``10.0.0.1``, ``::1``, ``[::1]``); None for a DNS name.

    For a host from ``normalize_host``: certificates and ACME treat IP hosts apart.
    """
    try:
        return ipaddress.ip_address(host.strip().strip("[]"))
    except ValueError:
        return None


def parse_target(value: str) -> tuple[str, int]:
    """Split ``alias:port`` and check both parts; the port is mandatory."""
    alias, sep, port_text = value.strip().rpartition(":")
    if not sep or not alias:
        raise ValueError(f"invalid target {value!r}: expected ALIAS:PORT, e.g. blog:3000")
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"invalid target {value!r}: port must be 1-65535")
    alias = alias.lower()
    if alias.startswith("[") and alias.endswith("]"):
        alias = alias[1:-1]
    try:
        ipaddress.ip_address(alias)
    except ValueError:
        if not _ALIAS.match(alias):
            raise ValueError(f"invalid target {value!r}: bad alias {alias!r}") from None
    return alias, int(port_text)


def parse_health_path(value: str) -> str:
    if not value.startswith("/") or any(c.isspace() or ord(c) < 32 for c in value):
        raise ValueError(f"invalid health path {value!r}: must start with / and have no spaces")
    return value


def parse_name(value: str, what: str) -> str:
    value = value.strip()
    if not value or len(value) > 200 or any(ord(c) < 32 for c in value):
        raise ValueError(f"invalid {what} {value!r}: must be 1-200 printable characters")
    return value


def _target(value: str) -> str:
    alias, port = parse_target(value)
    return f"[{alias}]:{port}" if ":" in alias else f"{alias}:{port}"


Host = Annotated[str, AfterValidator(parse_host_pattern)]
PathPrefix = Annotated[str, AfterValidator(lambda v: parse_path_prefix(v) if v else "")]
Target = Annotated[str, AfterValidator(_target)]
HealthPath = Annotated[str, AfterValidator(parse_health_path)]


class Health(BaseModel):
    """What the proxy last observed about a service (``updatehealth`` may set it by hand)."""

    model_config = ConfigDict(extra="ignore")

    # None: not checked yet. A new service is routed until its first check
    # (which runs at once) says otherwise, as the Go proxy did.
    healthy: bool | None = None
    checked_at: datetime | None = None
    last_error: str | None = None
    changed_at: datetime | None = None
    # Per container IP behind the alias, as of the last check.
    containers: dict[str, bool] = Field(default_factory=dict)


UNCHECKED = Health()  # the health of a service never checked
SET_BY_HAND = "set by hand"  # last_error of `updatehealth --healthy false`


class Service(BaseModel):
    """One routed host. The desired part is written by the CLI."""

    model_config = ConfigDict(extra="ignore")

    name: str
    host: Host
    target: Target
    project: Annotated[str, AfterValidator(lambda v: parse_name(v, "project"))]
    app: str = ""
    health_path: HealthPath = "/up"
    ssl: bool = True
    # Strict-Transport-Security on this host's HTTPS answers once its certificate is
    # active (tls.py); ``deploy --no-hsts`` turns it off. Files written before the
    # field existed load with it on, the default.
    hsts: bool = True
    # "custom": a pair given with deploy --tls-cert/--tls-key, copied under certs/<host>/;
    # "acme": the proxy gets and renews the certificate itself.
    cert_source: str = "acme"
    renew_requested_at: datetime | None = None
    # Docker networks the target's alias was found on at deploy time (with the
    # engine's socket mounted), so a re-created proxy container can rejoin them.
    networks: list[str] = Field(default_factory=list)
    # Issue 16. Several hosts of one service are several rows sharing ``name`` and
    # ``project``; several path prefixes too. The row's key is ``route_key``.
    path_prefix: PathPrefix = ""
    strip_path_prefix: bool = True
    canonical_host: Annotated[str | None, AfterValidator(
        lambda v: normalize_host(v) if v else None)] = None
    # "serving", or "stopped" (503 with ``stop_message``) or "paused" (requests held
    # up to ``max_pause`` seconds each, until resumed).
    mode: Literal["serving", "stopped", "paused"] = "serving"
    stop_message: str | None = None
    max_pause: float = 30.0
    error_pages: str | None = None
    basic_auth: list[str] = Field(default_factory=list)  # USER:HASH (bcrypt, argon2)
    allow: list[str] = Field(default_factory=list)  # CIDRs; empty: everyone
    compress: bool = True
    created_at: datetime = Field(default_factory=now)
    updated_at: datetime = Field(default_factory=now)

    @property
    def key(self) -> str:
        """This route's key in the registry (and in the view's dictionaries): ``route_key``,
        inlined, as the hot path asks for it several times a request."""
        return self.host + self.path_prefix

    @property
    def alias(self) -> str:
        return parse_target(self.target)[0]

    @property
    def port(self) -> int:
        return parse_target(self.target)[1]

    def routing_key(self) -> tuple[str, str, str, bool]:
        """The fields whose change needs a fresh health check."""
        return (self.target, self.health_path, self.key, self.ssl)


class HealthEntry(Health):
    """A host's health in the registry, and what it was observed for.

    Health is kept per host; the fields below are the rest of the service's
    ``routing_key`` at the time of the check. An entry whose service has been
    deployed since with another target, health path or ``ssl`` is ignored
    (a new target must prove itself), without anyone having to delete it.
    """

    target: str
    health_path: str = "/up"
    ssl: bool = True

    def matches(self, service: Service) -> bool:
        return (self.target == service.target and self.health_path == service.health_path
                and self.ssl == service.ssl)

    @classmethod
    def of(cls, key: tuple[str, str, str, bool], health: Health) -> HealthEntry:
        """The entry for ``health`` observed under ``key`` (a ``Service.routing_key()``)."""
        target, health_path, _host, ssl = key
        return cls.model_validate({  # faster than model_construct, and checked
            "target": target, "health_path": health_path, "ssl": ssl, "healthy": health.healthy,
            "checked_at": health.checked_at, "last_error": health.last_error,
            "changed_at": health.changed_at, "containers": health.containers})

    def health(self) -> Health:
        """The observation alone (``list --json`` shows this part)."""
        return Health.model_validate({
            "healthy": self.healthy, "checked_at": self.checked_at,
            "last_error": self.last_error, "changed_at": self.changed_at,
            "containers": self.containers})


class Settings(BaseModel):
    model_config = ConfigDict(extra="ignore")

    acme_staging: bool = False
    acme_directory: str | None = None
    acme_email: str | None = None


class State(BaseModel):
    """Every route and the settings (``list``, ``export``; JSON imports)."""

    model_config = ConfigDict(extra="ignore")

    version: int = STATE_VERSION
    services: dict[str, Service] = Field(default_factory=dict)
    settings: Settings = Field(default_factory=Settings)

    def find(self, host: str) -> Service | None:
        return self.services.get(parse_host_pattern(host))
