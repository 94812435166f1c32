"""What the hot path reads, derived by one pure function from a snapshot of the registry.

``build_view(snapshot, previous)`` parses the rows of a ``registry.Snapshot``
into services, the health in force (an entry counts only if it was observed
for the service as it is now: same target, health path and ssl) and the
settings. ``previous`` is only a memo: a row whose generation it already
parsed keeps its object, so a deploy on a 10,000-service registry validates
one row, and what changed shows by identity. The event loop swaps the result
in whole (``addon.py``); nothing else reconciles health.

A row that does not validate (a hand edit, a newer writer) keeps the host's
last good version, if any, and is reported in ``errors``, once per version.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from luma_proxy.models import HealthEntry, Service, Settings
from luma_proxy.store.registry import Snapshot, Store, parse_health, parse_service


@dataclass(frozen=True, slots=True)
class View:
    """One consistent picture of the registry: never modified once built."""

    routes_gen: int = -1
    health_gen: int = -1
    services: dict[str, Service] = field(default_factory=dict)
    health: dict[str, HealthEntry] = field(default_factory=dict)  # in force only
    settings: Settings = field(default_factory=Settings)
    errors: tuple[str, ...] = ()  # rows that did not validate in this version
    # Memo for the next build: host -> (row generation, parsed or None).
    service_rows: dict[str, tuple[int, Service | None]] = field(default_factory=dict)
    health_rows: dict[str, tuple[int, HealthEntry | None]] = field(default_factory=dict)
    observed: dict[str, HealthEntry] = field(default_factory=dict)  # every valid entry
    registry_id: str = ""
    settings_data: str = ""  # as stored: the same text is not validated (or reported) again

    @property
    def generations(self) -> tuple[int, int, str]:
        """What the view was built from, as ``Store.generations()`` reads it."""
        return self.routes_gen, self.health_gen, self.registry_id


EMPTY = View()


def build_view(snapshot: Snapshot, previous: View = EMPTY) -> View:
    """The view of ``snapshot``; pure (``previous`` only saves parsing unchanged rows)."""
    errors: list[str] = []
    if snapshot.registry_id != previous.registry_id:
        previous = EMPTY  # another database (restored, re-created): nothing carries over
    if snapshot.routes_gen != previous.routes_gen:
        services, service_rows = _services(snapshot, previous, errors)
        settings = previous.settings
        if snapshot.settings != previous.settings_data:
            try:
                settings = Settings.model_validate_json(snapshot.settings)
            except ValidationError:
                errors.append("settings are invalid: keeping the last good ones")
    else:
        services, service_rows = previous.services, previous.service_rows
        settings = previous.settings
    if snapshot.health_gen != previous.health_gen:
        observed, health_rows = _health(snapshot, previous)
    else:
        observed, health_rows = previous.observed, previous.health_rows
    health = _in_force(services, observed, previous)
    return View(snapshot.routes_gen, snapshot.health_gen, services, health, settings,
                tuple(errors), service_rows, health_rows, observed, snapshot.registry_id,
                snapshot.settings)


def read_view(store: Store, base: View = EMPTY) -> View:
    """The registry's view after ``base`` (``base`` itself if nothing moved): the I/O edge
    of ``build_view``, reading only the rows newer than ``base``'s generations."""
    snapshot = store.snapshot(base.routes_gen, base.health_gen, base.registry_id)
    if (snapshot.routes_gen, snapshot.health_gen, snapshot.registry_id) == base.generations:
        return base
    return build_view(snapshot, base)


def _in_force(services: dict[str, Service], observed: dict[str, HealthEntry],
              previous: View) -> dict[str, HealthEntry]:
    """The entries observed for their service as it is now; per changed host when it can."""
    if services is previous.services and observed is previous.observed:
        return previous.health
    if previous is EMPTY or len(services) < 64:
        return {host: entry for host, entry in observed.items()
                if (service := services.get(host)) is not None and entry.matches(service)}
    old_services, old_observed = previous.services, previous.observed
    touched = {h for h, s in services.items() if old_services.get(h) is not s}
    touched.update(h for h in old_services if h not in services)
    if observed is not old_observed:
        touched.update(h for h, e in observed.items() if old_observed.get(h) is not e)
        touched.update(h for h in old_observed if h not in observed)
    health = dict(previous.health)
    for host in touched:
        service, entry = services.get(host), observed.get(host)
        if service is not None and entry is not None and entry.matches(service):
            health[host] = entry
        else:
            health.pop(host, None)
    return health


def _services(snapshot: Snapshot, previous: View, errors: list[str]
              ) -> tuple[dict[str, Service], dict[str, tuple[int, Service | None]]]:
    memo = previous.service_rows
    services: dict[str, Service] = {}
    rows: dict[str, tuple[int, Service | None]] = {}
    for host, gen, data in snapshot.services:
        known = memo.get(host)
        if known is not None and known[0] == gen:
            service = known[1]
            rows[host] = known
        elif data is None:  # older than the previous view, yet not in it: keep what was
            service = None
            errors.append(f"service {host!r} was not read; it is read again when it changes")
        else:
            try:
                service = parse_service(host, data)
            except ValueError as e:
                service = None
                errors.append(str(e))
            rows[host] = (gen, service)
        if service is None:  # invalid: the last good version stays in force
            service = previous.services.get(host)
        if service is not None:
            services[host] = service
    return services, rows


def _health(snapshot: Snapshot, previous: View
            ) -> tuple[dict[str, HealthEntry], dict[str, tuple[int, HealthEntry | None]]]:
    memo = previous.health_rows
    observed: dict[str, HealthEntry] = {}
    rows: dict[str, tuple[int, HealthEntry | None]] = {}
    for host, gen, data, checked_at in snapshot.health:
        known = memo.get(host)
        if known is not None and known[0] == gen:
            rows[host] = known
            entry = known[1]
        elif data is None:
            entry = None
        else:
            entry = parse_health(data, checked_at)
            rows[host] = (gen, entry)
        if entry is not None:
            observed[host] = entry
    return observed, rows


@dataclass(frozen=True, slots=True)
class Changes:
    """How ``new`` differs from the view it replaces: the loop's work is per change."""

    changed: dict[str, Service]  # new or different services
    removed: list[str]
    health: list[str]  # hosts whose health in force is another object
    failing: list[str]  # of those, the hosts with a container that failed its check


def diff(old: View, new: View) -> Changes:
    """Pure, so the thread that built ``new`` computes it: the loop only applies it."""
    if new.services is old.services:
        changed: dict[str, Service] = {}
        removed: list[str] = []
    else:
        changed = {h: s for h, s in new.services.items() if old.services.get(h) is not s}
        removed = [h for h in old.services if h not in new.services]
    if new.health is old.health:
        health: list[str] = []
    else:
        health = [h for h, e in new.health.items() if old.health.get(h) is not e]
    failing = [h for h in health if False in new.health[h].containers.values()]
    return Changes(changed, removed, health, failing)
