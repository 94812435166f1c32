"""The ``luma-proxy`` command: edits the registry the running proxy follows.

Drop-in for the Go luma-proxy as the Luma CLI drives it
(``docker exec luma-proxy luma-proxy deploy --host ... --target ... --project ...``):
same commands and flags, success lines start with ``✅``, and any bad input
gives one line on stderr, a non-zero exit, and an untouched state file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from luma_proxy.access.allowlist import parse_cidr
from luma_proxy.access.basicauth import hash_password, parse_credential
from luma_proxy.models import (
    SET_BY_HAND,
    UNCHECKED,
    Health,
    HealthEntry,
    Service,
    State,
    is_wildcard,
    normalize_host,
    now,
    one_line,
    parse_duration,
    parse_health_path,
    parse_host_pattern,
    parse_name,
    parse_path_prefix,
    parse_target,
    route_key,
)
from luma_proxy.runtime import startup
from luma_proxy.runtime.supervisor import workers_option
from luma_proxy.store.paths import RESERVED_HOSTS
from luma_proxy.store.registry import IMPORT_SUFFIX, RegistryError, Store, Tx, default_state_path

TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off")


class CliError(click.ClickException):
    """One line on stderr, exit 1."""


def parse_bool(value: str, flag: str) -> bool:
    lowered = value.strip().lower()
    if lowered in TRUE:
        return True
    if lowered in FALSE:
        return False
    raise CliError(f"invalid value for {flag}: {value!r} (expected true or false)")


def go_style_bools(args: Sequence[str], flags: Sequence[str]) -> list[str]:
    """Accept the Go flag forms ``--ssl=false``/``--ssl=true`` next to click's ``--no-ssl``."""
    out = []
    for arg in args:
        name, eq, value = arg.partition("=")
        if eq and name in flags:
            out.append(name if parse_bool(value, name) else "--no-" + name.removeprefix("--"))
        else:
            out.append(arg)
    return out


class GoBoolCommand(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        flags = [o for p in self.params if isinstance(p, click.Option) and p.is_bool_flag
                 for o in p.opts]
        return super().parse_args(ctx, go_style_bools(args, flags))


def state_option(f: Any) -> Any:
    return click.option(
        "--state", "state_path", default=default_state_path, show_default="$LUMA_PROXY_STATE or "
        "/var/lib/luma-proxy/state.json", help="Path of the state file.",
    )(f)


def store_for(state_path: str, create: bool = True) -> Store:
    """The registry; ``create=False`` for commands that only read (they create nothing)."""
    return Store(state_path, create=create)


def checked(parse: Any, *args: Any) -> Any:
    try:
        return parse(*args)
    except ValueError as e:
        raise CliError(str(e)) from None


def transaction[T](store: Store, change: Callable[[Tx], T], needs_host: bool = False) -> T:
    """``change(tx)`` on the rows it names, in one transaction: a deploy on a
    10,000-service registry reads and writes one row, not every service.

    ``needs_host``: the change fails on a host that is not deployed; with no
    registry yet it is tried on a read-only one first, so it creates nothing.
    """
    try:
        if needs_host and not store.db_path.exists():
            Store(store.path, create=False).dry_run(change)
        with store.transaction() as tx:
            result = change(tx)
    except RegistryError as e:
        raise CliError(str(e)) from None
    except ValueError as e:  # a stored row that does not validate
        raise CliError(str(e)) from None
    print_import_notes(store)
    return result


def read(store: Store) -> State:
    try:
        return store.read()
    except RegistryError as e:
        raise CliError(str(e)) from None


def observed(store: Store, state: State) -> dict[str, HealthEntry]:
    try:
        return store.observed(state)
    except RegistryError as e:
        raise CliError(str(e)) from None


def drop_stale_health(tx: Tx, host: str, service: Service | None) -> None:
    """Remove ``host``'s health entry unless it was observed for ``service`` as it is now.

    Such an entry is ignored anyway; dropping it keeps a host that is removed
    and deployed again, or moved back to its old target, "pending" until its
    first check.
    """
    entry = tx.health(host)
    if entry is not None and (service is None or not entry.matches(service)):
        tx.delete_health(host)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="luma-proxy")
def cli() -> None:
    """Reverse proxy that routes each Host to a Docker network alias (alias:port)."""


def split_hosts(values: Sequence[str]) -> list[str]:
    """``--host a.com --host b.com`` and ``--host a.com,b.com``, checked, in order, once each."""
    hosts: list[str] = []
    for value in values:
        for part in value.split(","):
            host = checked(parse_host_pattern, part)
            if host in RESERVED_HOSTS:
                raise CliError(f"host {host} is reserved: its certificate directory would be "
                               "the ACME account key's file")
            if host not in hosts:
                hosts.append(host)
    return hosts


@cli.command(cls=GoBoolCommand)
@click.option("--host", "hosts", required=True, multiple=True,
              help="Public hostname, e.g. blog.com; repeat it (or a,b) for several; "
                   "*.example.com for every name one label under example.com.")
@click.option("--target", required=True, help="Docker network alias and port, e.g. blog:3000.")
@click.option("--project", required=True, help="Project that owns the host.")
@click.option("--health-path", default="/up", show_default=True, help="Health check path.")
@click.option("--app", default="", help="App name (informational).")
@click.option("--ssl/--no-ssl", default=True, show_default=True,
              help="Serve HTTPS with an automatic certificate (--ssl=false also works).")
@click.option("--hsts/--no-hsts", default=True, show_default=True,
              help="Send Strict-Transport-Security on HTTPS answers once the certificate "
                   "is active (--hsts=false also works).")
@click.option("--force", is_flag=True, help="Take over a host that belongs to another project.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None,
              help="Use this certificate (PEM, full chain) instead of ACME.")
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None,
              help="Private key (PEM) of --tls-cert.")
@click.option("--path-prefix", "path_prefixes", multiple=True, metavar="PATH",
              help="Route only requests under PATH (repeatable); the longest prefix wins.")
@click.option("--strip-path-prefix/--no-strip-path-prefix", default=True, show_default=True,
              help="Remove the prefix before the container sees the path.")
@click.option("--canonical-host", default=None, metavar="HOST",
              help="One of --host: the others answer 301 to it.")
@click.option("--error-pages", default=None, metavar="DIR",
              help="Directory of <status>.html pages for the proxy's own answers.")
@click.option("--basic-auth", "basic_auth", multiple=True, metavar="USER:HASH",
              help="Require this user (bcrypt or argon2 hash: luma-proxy hash-password); "
                   "repeatable.")
@click.option("--allow", "allow", multiple=True, metavar="CIDR",
              help="Serve only clients from CIDR (repeatable); others get 403.")
@click.option("--compress/--no-compress", default=True, show_default=True,
              help="Compress responses (zstd, br, gzip) the client accepts.")
@click.option("--wait", is_flag=True,
              help="Also wait until TARGET passes a health check (exit 1 if it does not).")
@click.option("--wait-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds --wait waits for a passing health check.")
@state_option
def deploy(hosts: tuple[str, ...], target: str, project: str, health_path: str, app: str,
           ssl: bool, hsts: bool, force: bool, tls_cert: str | None, tls_key: str | None,
           path_prefixes: tuple[str, ...], strip_path_prefix: bool, canonical_host: str | None,
           error_pages: str | None, basic_auth: tuple[str, ...], allow: tuple[str, ...],
           compress: bool, wait: bool, wait_timeout: float, state_path: str) -> None:
    """Route HOST to TARGET (creates it, or updates it in place).

    Every HOST and path prefix is a route of its own in the registry; routes not
    named here are left as they are (``remove`` takes one away).
    Returns once every running proxy process serves the change, so the old
    containers may be stopped right after it.
    """
    host_list = split_hosts(hosts)
    alias, port = checked(parse_target, target)
    project = checked(parse_name, project, "project")
    health_path = checked(parse_health_path, health_path)
    if app:
        app = checked(parse_name, app, "app")
    prefixes = sorted({checked(parse_path_prefix, p) for p in path_prefixes}) or [""]
    if canonical_host is not None:
        canonical_host = checked(normalize_host, canonical_host)
        if canonical_host not in host_list:
            raise CliError(f"--canonical-host {canonical_host} must be one of the --host values")
    if error_pages is not None:
        from luma_proxy.proxy.pages import parse_error_pages_dir

        error_pages = checked(parse_error_pages_dir, error_pages)
    credentials = [checked(parse_credential, c) for c in basic_auth]
    if len({user for user, _hash in credentials}) != len(credentials):
        raise CliError("--basic-auth names a user twice")
    networks_allowed = [str(checked(parse_cidr, c)) for c in allow]
    custom = read_custom_pair(host_list, tls_cert, tls_key)
    if custom and not ssl:
        raise CliError("--tls-cert needs --ssl: a certificate is only used for HTTPS")
    if ssl and not custom and (wild := [h for h in host_list if is_wildcard(h)]):
        raise CliError(f"{wild[0]} needs --tls-cert and --tls-key (or --no-ssl): "
                       "ACME's HTTP-01 challenge cannot issue wildcard certificates")
    networks = route_networks(alias)

    def change(tx: Tx) -> list[tuple[str, Service]]:
        done = []
        for host in host_list:
            for prefix in prefixes:
                done.append(deploy_route(tx, host, prefix, {
                    "name": app or alias, "host": host, "target": f"{alias}:{port}",
                    "project": project, "app": app, "health_path": health_path, "ssl": ssl,
                    "hsts": hsts, "path_prefix": prefix, "strip_path_prefix": strip_path_prefix,
                    "canonical_host": canonical_host, "error_pages": error_pages,
                    "basic_auth": [f"{u}:{h}" for u, h in credentials],
                    "allow": networks_allowed, "compress": compress,
                    **({"cert_source": "custom"} if custom else {}),
                }, networks, force))
        if custom:
            from luma_proxy.proxy.certificates import certs_dir, store_pair

            for host in host_list:  # inside the transaction: files and routes change together
                store_pair(certs_dir(state_path), host, *custom)
        return done

    store = store_for(state_path)
    done = transaction(store, change)
    await_proxies(store)
    if wait:
        wait_healthy(store, done[0][1], wait_timeout)
    scheme = ("https" if hsts else "https, no HSTS") if ssl else "http only"
    for verb, service in done:
        click.echo(f"✅ {verb} {service.key} -> {alias}:{port} (project {project}, {scheme})")


def deploy_route(tx: Tx, host: str, prefix: str, fields: dict[str, Any],
                 networks: list[str] | None, force: bool) -> tuple[str, Service]:
    """Create or update the route ``host`` + ``prefix``: ("Deployed" or "Updated", it)."""
    key = route_key(host, prefix)
    try:
        existing = tx.service(key)
    except ValueError as e:  # a row that does not validate (a hand edit)
        if not force:
            raise CliError(f"{e}; use --force to replace it") from None
        existing = None
    project = fields["project"]
    if existing and existing.project != project and not force:
        raise CliError(f"host {key} belongs to project {existing.project!r}; "
                       "use --force to move it")
    if networks is not None:
        fields = {**fields, "networks": networks}
    if existing is None:
        service = Service(**fields)
        verb = "Deployed"
    else:
        same = existing.model_copy(update=fields)  # maintenance stays until ``resume``
        if same.model_dump(exclude={"updated_at"}) != existing.model_dump(
                exclude={"updated_at"}):
            same.updated_at = now()
        service = Service.model_validate(same.model_dump())
        verb = "Updated"
    tx.put(service)
    # A new target must prove itself: the entry observed for the old one goes.
    drop_stale_health(tx, key, service)
    return verb, service


def await_proxies(store: Store) -> None:
    """Return once every running proxy process serves what is on disk now (served.py).

    A proxy that does not within the bound gets a warning on stdout (the Luma
    CLI reads stderr as failure, and the change is saved all the same).
    """
    from luma_proxy.environ import env_float
    from luma_proxy.runtime.served import wait_served

    timeout = env_float("LUMA_PROXY_SERVED_TIMEOUT", 5.0)
    pending = wait_served(store.path, store.generation, timeout)
    if pending:
        click.echo(f"⚠️  saved, but {pending} running proxy process(es) did not take the "
                   f"change within {timeout:g}s; they serve it once they reload")


def wait_healthy(store: Store, service: Service, timeout: float) -> None:
    """``deploy --wait``: probe the new target as the proxy would until it passes.

    The passing result is written to the health file, so the proxy routes to
    the target at once instead of waiting for its own next check.
    """
    import asyncio

    from luma_proxy.health.checker import HealthChecker
    from luma_proxy.routing.resolver import Resolver, parse_dns_server

    dns = os.environ.get("LUMA_PROXY_DNS")
    resolver = Resolver(checked(parse_dns_server, dns) if dns else None, 0)
    checker = HealthChecker(resolver, lambda _results: None, min(5.0, max(timeout, 0.1)))

    async def until_healthy() -> Health:
        deadline = time.monotonic() + timeout
        health = UNCHECKED
        while True:
            health = await checker.check(service, health)
            if health.healthy or time.monotonic() >= deadline:
                return health
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    health = asyncio.run(until_healthy())
    if not health.healthy:
        raise CliError(f"{service.host}: {service.target} did not pass a health check within "
                       f"{timeout:g}s ({health.last_error})")

    def change(tx: Tx) -> None:
        if tx.service(service.host) == service:  # not deployed elsewhere meanwhile
            tx.put_health(service.host, HealthEntry.of(service.routing_key(), health))

    transaction(store, change)


def route_networks(alias: str) -> list[str] | None:
    """The Docker networks ``alias`` lives on, if the engine's socket is mounted.

    None when it cannot be asked (no socket, not in a container): the networks
    recorded by an earlier deploy are kept then.
    """
    from luma_proxy.docker import engine as dockerengine

    if not dockerengine.available():
        return None
    try:
        return dockerengine.alias_networks(alias) or None
    except dockerengine.EngineUnavailable:
        return None


def print_import_notes(store: Store) -> None:
    """What taking over another layout's state file (the Go proxy's) did, on stdout."""
    notes = store.last_import
    if notes is None:
        return
    click.echo(f"✅ Took over the existing state file (original kept as "
               f"{store.path.name}{IMPORT_SUFFIX})")
    for note in notes:
        click.echo(f"  note: {note}")


def read_custom_pair(hosts: list[str], cert: str | None, key: str | None,
                     ) -> tuple[bytes, bytes] | None:
    """Read and check a --tls-cert/--tls-key pair before anything is written."""
    if cert is None and key is None:
        return None
    from luma_proxy.proxy.certificates import check_pair  # cryptography: only imported when needed

    if cert is None or key is None:
        raise CliError("--tls-cert and --tls-key go together")
    try:
        cert_pem, key_pem = Path(cert).read_bytes(), Path(key).read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {e.filename}: {e.strerror}") from None
    for host in hosts:
        checked(check_pair, cert_pem, key_pem, host)
    return cert_pem, key_pem


@cli.command()
@click.option("--host", "hosts", multiple=True, help="Hostname to stop routing (repeatable).")
@click.option("--path-prefix", default=None, metavar="PATH",
              help="Only this path prefix of --host.")
@click.option("--service", default=None, metavar="NAME",
              help="Every route of this service (its --app, else its alias).")
@click.option("--project", default=None, help="Every route of this project.")
@state_option
def remove(hosts: tuple[str, ...], path_prefix: str | None, service: str | None,
           project: str | None, state_path: str) -> None:
    """Stop routing HOST (every path prefix of it), or a whole service or project."""
    if not (hosts or service or project):
        raise CliError("give --host, --service or --project")
    host_list = split_hosts(hosts) if hosts else []
    prefix = checked(parse_path_prefix, path_prefix) if path_prefix is not None else None
    if prefix is not None and not host_list:
        raise CliError("--path-prefix goes with --host")

    def change(tx: Tx) -> list[str]:
        keys: list[str] = []
        for host in host_list:
            if prefix is None:
                found = list(tx.routes_of(host))
            else:
                key = route_key(host, prefix)
                found = [key] if tx.service(key) is not None else []
            if not found:
                raise CliError(f"host {route_key(host, prefix or '')} is not deployed")
            keys += found
        if service is not None or project is not None:
            matched = [k for k, s in tx.services().items()
                       if (service is None or s.name == service)
                       and (project is None or s.project == project)]
            if not matched:
                raise CliError("no route matches " + " and ".join(
                    f"{flag} {value}" for flag, value in (("--service", service),
                                                          ("--project", project)) if value))
            keys += matched
        keys = list(dict.fromkeys(keys))  # a route named twice is removed once
        for key in keys:
            tx.delete(key)
            tx.delete_health(key)
        return keys

    store = store_for(state_path)
    removed = transaction(store, change, needs_host=True)
    await_proxies(store)
    for key in removed:
        click.echo(f"✅ Removed {key}")


def set_mode(host: str, update: dict[str, Any], state_path: str) -> list[str]:
    """Put every route of ``host`` in a maintenance mode; their keys."""
    host = checked(parse_host_pattern, host)

    def change(tx: Tx) -> list[str]:
        routes = tx.routes_of(host)
        if not routes:
            raise CliError(f"host {host} is not deployed")
        for service in routes.values():
            tx.put(Service.model_validate(service.model_copy(update=update).model_dump()))
        return list(routes)

    store = store_for(state_path)
    keys = transaction(store, change, needs_host=True)
    await_proxies(store)
    return keys


@cli.command()
@click.option("--host", required=True, help="Deployed hostname.")
@click.option("--message", default=None, help="Shown on the 503 page.")
@state_option
def stop(host: str, message: str | None, state_path: str) -> None:
    """Answer HOST's requests with 503 and MESSAGE (maintenance); checks continue."""
    if message is not None:
        message = checked(parse_message, message)
    for key in set_mode(host, {"mode": "stopped", "stop_message": message}, state_path):
        click.echo(f"✅ Stopped {key}")


@cli.command()
@click.option("--host", required=True, help="Deployed hostname.")
@click.option("--max-pause", default="30s", show_default=True, metavar="DURATION",
              help="Longest a request is held (e.g. 30s, 2m); then 503.")
@state_option
def pause(host: str, max_pause: str, state_path: str) -> None:
    """Hold HOST's requests until ``resume`` (each up to --max-pause)."""
    bound = checked(parse_duration, max_pause)
    for key in set_mode(host, {"mode": "paused", "max_pause": bound}, state_path):
        click.echo(f"✅ Paused {key} (requests held up to {bound:g}s)")


@cli.command()
@click.option("--host", required=True, help="Deployed hostname.")
@state_option
def resume(host: str, state_path: str) -> None:
    """Serve HOST again after ``stop`` or ``pause``."""
    for key in set_mode(host, {"mode": "serving", "stop_message": None}, state_path):
        click.echo(f"✅ Resumed {key}")


@cli.command(name="hash-password")
@click.option("--scheme", type=click.Choice(["bcrypt", "argon2"]), default="bcrypt",
              show_default=True)
def hash_password_(scheme: str) -> None:
    """Read a password from stdin, print its hash for --basic-auth USER:HASH."""
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise CliError("no password on stdin (e.g. printf %s 'secret' | luma-proxy "
                       "hash-password)")
    click.echo(checked(hash_password, password, scheme))


def parse_message(value: str) -> str:
    if len(value) > 1000 or any(ord(c) < 32 and c not in "\t" for c in value):
        raise ValueError("invalid --message: at most 1000 characters, one line")
    return value


@cli.command()
@click.option("--host", required=True, help="Deployed hostname.")
@click.option("--target", required=True, help="New Docker network alias and port.")
@state_option
def switch(host: str, target: str, state_path: str) -> None:
    """Point HOST at another TARGET, keeping everything else (the Go proxy's switch)."""
    host = checked(normalize_host, host)
    alias, port = checked(parse_target, target)
    networks = route_networks(alias)
    def change(tx: Tx) -> None:
        existing = tx.service(host)
        if existing is None:
            raise CliError(f"host {host} is not deployed")
        fields: dict[str, Any] = {"target": f"{alias}:{port}"}
        if networks is not None:
            fields["networks"] = networks
        if existing.target != fields["target"]:
            fields["updated_at"] = now()
        service = Service.model_validate(existing.model_copy(update=fields).model_dump())
        tx.put(service)
        drop_stale_health(tx, host, service)

    store = store_for(state_path)
    transaction(store, change, needs_host=True)
    await_proxies(store)
    click.echo(f"✅ Switched {host} -> {alias}:{port}")


@cli.command(cls=GoBoolCommand)
@click.option("--host", required=True)
@click.option("--healthy", required=True, help="true or false.")
@state_option
def updatehealth(host: str, healthy: str, state_path: str) -> None:
    """Set a host's health by hand (the next health check decides again)."""
    host = checked(normalize_host, host)
    value = parse_bool(healthy, "--healthy")
    def change(tx: Tx) -> None:
        service = tx.service(host)
        if service is None:
            raise CliError(f"host {host} is not deployed")
        entry = tx.health(host)
        previous: Health = entry if entry is not None and entry.matches(service) else UNCHECKED
        at = now()
        changed = previous.healthy is not value
        # The entry names the target it is for: a later deploy elsewhere makes it void.
        tx.put_health(host, HealthEntry.of(service.routing_key(), previous.model_copy(update={
            "healthy": value, "checked_at": at, "last_error": None if value else SET_BY_HAND,
            "changed_at": at if changed else previous.changed_at,
        })))

    transaction(store_for(state_path), change, needs_host=True)
    click.echo(f"✅ Health of {host} set to {'healthy' if value else 'unhealthy'}")


def _ago(at: datetime | None) -> str:
    if at is None:
        return "never"
    seconds = max(0, int((now() - at).total_seconds()))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def _health_word(health: Health) -> str:
    healthy = health.healthy
    word = "pending" if healthy is None else "healthy" if healthy else "unhealthy"
    if healthy is False and health.last_error:
        word += f" ({health.last_error})"
    return word


def service_rows(state: State, health: dict[str, HealthEntry]) -> list[list[str]]:
    rows = []
    for s in sorted(state.services.values(), key=lambda s: (s.project, s.key)):
        h = health.get(s.key, UNCHECKED)
        rows.append([s.key, s.target, s.project, _health_word(h), _ago(h.checked_at),
                     "yes" if s.ssl else "no", ", ".join(route_options(s)) or "-"])
    return rows


def auth_users(service: Service) -> list[str]:
    """The user names of ``--basic-auth USER:HASH`` (what ``list`` shows; never the hash)."""
    return [credential.split(":", 1)[0] for credential in service.basic_auth]


def route_options(s: Service) -> list[str]:
    """What a route does beyond forwarding (``list``'s OPTIONS column)."""
    shown = []
    if s.mode == "stopped":
        shown.append(f"stopped ({s.stop_message})" if s.stop_message else "stopped")
    elif s.mode == "paused":
        shown.append(f"paused (up to {s.max_pause:g}s)")
    if s.path_prefix and not s.strip_path_prefix:
        shown.append("prefix kept")
    if s.canonical_host:
        shown.append(f"canonical {s.canonical_host}")
    if s.basic_auth:
        shown.append("basic auth: " + " ".join(auth_users(s)))
    if s.allow:
        shown.append("allow " + " ".join(s.allow))
    if s.error_pages:
        shown.append(f"error pages {s.error_pages}")
    if not s.compress:
        shown.append("no compression")
    return shown


def service_json(service: Service, health: HealthEntry | None) -> dict[str, Any]:
    """A service as ``list --json`` shows it: its fields and its health in force."""
    shown = health.health() if health is not None else UNCHECKED
    fields = service.model_dump(mode="json")
    # The users, not their hashes: ``export`` is the one place the hashes are printed.
    fields["basic_auth"] = auth_users(service)
    return {**fields, "key": service.key, "health": shown.model_dump(mode="json")}


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    return "\n".join(lines)


@cli.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@state_option
def list_(as_json: bool, state_path: str) -> None:
    """Show every routed host with its target and health."""
    store = store_for(state_path, create=False)
    state = read(store)
    health = observed(store, state)
    if as_json:
        services = [service_json(s, health.get(h)) for h, s in state.services.items()]
        click.echo(json.dumps({"services": services}, indent=2))
    elif not state.services:
        click.echo("No hosts deployed.")
    else:
        click.echo(table(["HOST", "TARGET", "PROJECT", "HEALTH", "LAST CHECK", "SSL", "OPTIONS"],
                         service_rows(state, health)))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@state_option
@click.pass_context
def status(ctx: click.Context, as_json: bool, state_path: str) -> None:
    """Same as list, with a summary line."""
    ctx.invoke(list_, as_json=as_json, state_path=state_path)
    if not as_json:
        store = store_for(state_path, create=False)
        state = read(store)
        health = observed(store, state)
        healthy = sum(1 for h, s in state.services.items()
                      if health.get(h, UNCHECKED).healthy is not False and s.mode == "serving")
        click.echo(f"{len(state.services)} host(s), {healthy} serving")


@cli.command(name="export")
@click.option("--output", "-o", default="-", type=click.Path(dir_okay=False, allow_dash=True),
              show_default=True, help="Write the JSON here (-: stdout).")
@state_option
def export(output: str, state_path: str) -> None:
    """Print the registry (routes, settings, health in force) as JSON."""
    try:
        data = store_for(state_path, create=False).export_json()
    except RegistryError as e:
        raise CliError(str(e)) from None
    if output == "-":
        click.echo(data.decode(), nl=False)
        return
    from luma_proxy.store.atomic import write_atomic

    try:
        write_atomic(Path(output), data, 0o600)
    except OSError as e:
        raise CliError(f"cannot write {output}: {e.strerror}") from None
    click.echo(f"✅ Exported to {output}")


@cli.command(name="import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--replace", is_flag=True,
              help="Remove the hosts FILE does not have, and take its settings.")
@state_option
def import_(file: str, replace: bool, state_path: str) -> None:
    """Add the routes of a JSON file (``export``'s, an older state.json, the Go proxy's)."""
    try:
        data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {file}: {e.strerror}") from None
    # A new registry starts from FILE alone: a state file of unknown layout lying
    # where the registry used to be is not taken over (and does not stop the import).
    store = Store(state_path, adopt=False)
    try:
        notes, count = store.import_json(data, replace)
    except RegistryError as e:
        raise CliError(str(e)) from None
    print_import_notes(store)
    await_proxies(store)
    click.echo(f"✅ Imported {count} host(s) from {file}")
    for note in notes:
        click.echo(f"  note: {note}")


@cli.command(cls=GoBoolCommand)
@click.option("--enabled", required=True, help="true: use Let's Encrypt's staging server.")
@state_option
def set_staging(enabled: str, state_path: str) -> None:
    """Use Let's Encrypt's staging server (true) or production (false) for new certificates."""
    from luma_proxy.proxy.certificates import directory_url

    value = parse_bool(enabled, "--enabled")

    def change(tx: Tx) -> None:
        tx.set_settings(tx.settings().model_copy(update={"acme_staging": value}))

    transaction(store_for(state_path), change)
    click.echo(f"✅ ACME {'staging' if value else 'production'}: "
               f"{directory_url('', value)}")


@cli.command()
@click.option("--host", default=None, help="Only this host.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@state_option
def cert_status(host: str | None, as_json: bool, state_path: str) -> None:
    """Certificate state of each HTTPS host: active, pending or failed, and expiry."""
    from luma_proxy.proxy.certificates import certs_dir, load_pair, read_status, status_line

    state = read(store_for(state_path, create=False))
    services = sorted(state.services.values(), key=lambda s: s.host)
    if host is not None:
        wanted = checked(normalize_host, host)
        services = [s for s in services if s.host == wanted]
        if not services:
            raise CliError(f"host {wanted} is not deployed")
    root = certs_dir(state_path)
    unwritable = unwritable_reason(root)
    rows = []
    for service in services:
        loaded = load_pair(root, service.host) if service.ssl else None
        line = status_line(read_status(root, service.host), loaded.not_after if loaded else None)
        line["host"] = service.host
        line["source"] = service.cert_source
        if not service.ssl:
            line["state"] = "no ssl"
        elif loaded is not None:
            line["state"] = "active" if line.get("days_left", -1) >= 0 else "expired"
        elif unwritable and service.cert_source == "acme":
            # No status.json can be written there either: say why nothing is issued.
            line["state"] = "failed"
            line["last_error"] = unwritable
        rows.append(line)
    if as_json:
        click.echo(json.dumps({"certificates": rows}, indent=2))
        return
    if not rows:
        click.echo("No hosts deployed.")
        return
    click.echo(table(["HOST", "STATE", "SOURCE", "EXPIRES", "DAYS LEFT", "LAST ERROR"], [
        [r["host"], r["state"], r["source"], (r.get("not_after") or "-")[:10],
         str(r.get("days_left", "-")), (r.get("last_error") or "")[:80]] for r in rows]))


def unwritable_reason(root: Path) -> str | None:
    """Why certificates cannot be stored under ``root`` by this user, or None if they can."""
    directory = root
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    if os.access(directory, os.W_OK | os.X_OK):
        return None
    return f"certificates directory {root} is not writable by uid {os.getuid()}: " \
           "permission denied"


@cli.command()
@click.option("--host", required=True)
@click.option("--wait", type=click.FloatRange(min=0), default=120.0, show_default=True,
              help="Seconds to wait for the running proxy to renew (0: do not wait).")
@state_option
def cert_renew(host: str, wait: float, state_path: str) -> None:
    """Ask the running proxy to renew HOST's certificate now."""
    host = checked(normalize_host, host)
    asked = now()

    def change(tx: Tx) -> None:
        service = tx.service(host)
        if service is None:
            raise CliError(f"host {host} is not deployed")
        if not service.ssl:
            raise CliError(f"host {host} is deployed with --no-ssl")
        if service.cert_source != "acme":
            raise CliError(f"host {host} uses a custom certificate; deploy a new one instead")
        tx.put(service.model_copy(update={"renew_requested_at": asked}))

    transaction(store_for(state_path), change, needs_host=True)
    from luma_proxy.proxy.certificates import certs_dir, read_status

    root = certs_dir(state_path)
    deadline = time.monotonic() + wait
    while wait and time.monotonic() < deadline:
        status = read_status(root, host)
        if status and status.issued_at and status.issued_at >= asked:
            click.echo(f"✅ Renewed {host}, valid until {status.not_after:%Y-%m-%d}")
            return
        if status and status.state != "active" and status.last_error and status.next_attempt_at \
                and status.next_attempt_at > asked:
            raise CliError(f"renewal of {host} failed: {status.last_error}")
        time.sleep(0.5)
    if wait:
        raise CliError(f"the proxy did not renew {host} within {wait:g}s (is it running?)")
    click.echo(f"✅ Renewal of {host} requested")


@cli.command()
@click.option("--http-port", default=80, show_default=True, type=click.IntRange(1, 65535))
@click.option("--https-port", default=0, type=click.IntRange(0, 65535),
              help="Serve HTTPS on this port (0: off; the Docker image uses 443).")
@click.option("--http3/--no-http3", default=None,
              help="Also serve HTTP/3 (QUIC, UDP) on --https-port, advertised with Alt-Svc; "
                   "one process serves it under --workers (default off; env "
                   "LUMA_PROXY_HTTP3=1).")
@click.option("--acme-directory", default=None,
              help="ACME directory URL (env LUMA_PROXY_ACME_DIRECTORY; default Let's Encrypt).")
@click.option("--acme-email", default=None, help="Contact e-mail for the ACME account.")
@click.option("--acme-ca-bundle", default=None, type=click.Path(dir_okay=False),
              help="CA bundle for the ACME server's HTTPS (env LUMA_PROXY_ACME_CA_BUNDLE).")
@click.option("--listen-host", default="0.0.0.0", show_default=True)
@click.option("--dns", default=None, help="DNS server for aliases (IP:PORT); env LUMA_PROXY_DNS.")
@click.option("--health-interval", type=click.FloatRange(min=0.01), default=None,
              help="Seconds between health checks (default 30; env LUMA_PROXY_HEALTH_INTERVAL).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="Access log and log lines: text or json (env LUMA_PROXY_LOG_FORMAT).")
@click.option("--log-query/--no-log-query", default=None,
              help="Put query strings in the access log (off: they may carry tokens).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus metrics on this port (default 0: off).")
@click.option("--metrics-host", default=None, help="Address of --metrics-port (default 127.0.0.1).")
@click.option("--workers", default="1", show_default=True, metavar="N|auto",
              callback=workers_option,
              help="Processes sharing the ports (SO_REUSEPORT); 0 or auto: one per core.")
@click.option("--worker-index", type=int, default=None, hidden=True)  # set by the supervisor
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=None,
              help="On SIGTERM, seconds to let in-flight requests finish (default 30).")
@click.option("--trusted-proxies", default=None, metavar="CIDR,...",
              help="Peers whose X-Forwarded-* headers are kept (default: none).")
@click.option("--max-header-size", default=None, help="Largest request head (default 64k).")
@click.option("--max-body-size", default=None, help="Largest request body (default 1g).")
@click.option("--connect-timeout", type=click.FloatRange(min=0.001), default=None,
              help="Seconds to connect to a container (default 5).")
@click.option("--response-timeout", type=click.FloatRange(min=0.001), default=None,
              help="Seconds for a container's response headers (default 60).")
@click.option("--header-timeout", type=click.FloatRange(min=0.001), default=None,
              help="Seconds for a client's request head / idle keep-alive (default 30).")
@click.option("--body-timeout", type=click.FloatRange(min=0.001), default=None,
              help="Seconds for a client's whole request body (default 120).")
@click.option("--body-idle-timeout", type=click.FloatRange(min=0.001), default=None,
              help="Seconds a request body may pause between bytes (default 10).")
@click.option("--hsts-max-age", type=click.IntRange(min=0), default=None,
              help="max-age of Strict-Transport-Security on HTTPS answers (default one "
                   "year; 0: off; env LUMA_PROXY_HSTS_MAX_AGE).")
@click.option("--error-pages", default=None, metavar="DIR",
              help="Default directory of <status>.html pages for the proxy's own answers "
                   "(a service's --error-pages comes first; env LUMA_PROXY_ERROR_PAGES).")
@state_option
def run(http_port: int, https_port: int, acme_directory: str | None, acme_email: str | None,
        acme_ca_bundle: str | None, listen_host: str, dns: str | None,
        health_interval: float | None, state_path: str, log_format: str | None = None,
        log_query: bool | None = None, metrics_port: int | None = None,
        metrics_host: str | None = None, workers: int = 1,
        worker_index: int | None = None, error_pages: str | None = None,
        http3: bool | None = None, **limits: Any) -> None:
    """Serve: route requests on the HTTP (and HTTPS) port by Host."""
    try:
        loop_factory = startup.loop_factory(os.environ)
        log_level = startup.log_level(os.environ)
    except ValueError as e:
        raise CliError(str(e)) from None
    asked = "--http3"
    if http3 is None:  # not on the command line: the environment's, else off
        from luma_proxy.environ import env_bool

        http3, asked = env_bool("LUMA_PROXY_HTTP3", False), "LUMA_PROXY_HTTP3=1"
    if http3 and not https_port:
        raise CliError(f"{asked} needs --https-port: HTTP/3 is served on the HTTPS port (UDP)")
    from luma_proxy.proxy import pages

    if error_pages is None and os.environ.get(pages.PAGES_ENV):
        error_pages = os.environ[pages.PAGES_ENV]
    if error_pages is not None:
        error_pages = checked(pages.parse_error_pages_dir, error_pages)
    pages.set_default_pages_dir(error_pages)
    from luma_proxy.proxy.engine_patches import skip_addon_registry

    skip_addon_registry()  # before the lean master imports mitmproxy's addons
    from luma_proxy.proxy.server import serve, setup_logging
    from luma_proxy.runtime.runconfig import RunConfig

    opts: dict[str, Any] = {"luma_state": state_path}
    for name, value in (("luma_acme_directory", acme_directory), ("luma_acme_email", acme_email),
                        ("luma_acme_ca_bundle", acme_ca_bundle)):
        if value is not None:
            opts[name] = value
    if dns is not None:
        opts["luma_dns"] = dns
    if health_interval is not None:
        opts["luma_health_interval"] = health_interval
    for name, value in (("luma_log_format", log_format), ("luma_log_query", log_query),
                        ("luma_metrics_port", metrics_port), ("luma_metrics_host", metrics_host)):
        if value is not None:
            opts[name] = value
    for flag, value in limits.items():  # --drain-timeout -> luma_drain_timeout, ...
        if value is not None:
            opts[f"luma_{flag}"] = value
    setup_logging(log_level)
    from luma_proxy.proxy.accesslog import configure_logging, default_log_format

    configure_logging(log_format or default_log_format())  # json: every log line as JSON
    if worker_index is None:  # once per proxy, not per worker
        import threading

        from luma_proxy.docker.engine import rejoin_networks

        threading.Thread(target=rejoin_networks, args=(state_path,), name="docker networks",
                         daemon=True).start()
    config = RunConfig(listen_host=listen_host, http_port=http_port, https_port=https_port,
                       http3=http3, options=opts, worker_index=worker_index)
    if workers > 1 and worker_index is None:
        from luma_proxy.runtime.supervisor import supervise

        def metrics_registry(multiproc_dir: str, state: str) -> Any:
            from luma_proxy.proxy.metrics import supervisor_registry  # mitmproxy: only if asked

            return supervisor_registry(multiproc_dir, state)

        sys.exit(supervise(config, workers, click.get_current_context(), metrics_registry))
    try:
        import asyncio

        code = asyncio.run(serve(config), loop_factory=loop_factory)
    except Exception as e:
        import logging

        from luma_proxy.proxy.server import OptionsError  # the engine's word for bad options

        # The stack always goes to the log: for a fault at once; for bad input
        # (options, a port in use, an unreadable file) as a debug line, so that
        # stderr keeps its one line unless LUMA_PROXY_LOG_LEVEL=debug.
        bad_input = isinstance(e, OptionsError | ValueError | OSError)
        logging.getLogger("luma_proxy").log(logging.DEBUG if bad_input else logging.ERROR,
                                            "start-up failed", exc_info=True)
        # The one line a user reads.
        raise CliError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """click's errors as one line (``Error: ...``), not a usage block."""
    try:
        cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as e:
        message = one_line(e.format_message().replace("\n", " "))
        if isinstance(e, click.UsageError) and e.ctx is not None:
            message += f" (see '{e.ctx.command_path} --help')"
        click.echo(f"Error: {message}", err=True)
        sys.exit(e.exit_code)
