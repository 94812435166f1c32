"""The registry: one SQLite database for routes, observed health and settings.

``<state>.db`` (``state.db`` beside the configured ``state.json`` path) is
shared by the CLI, every proxy worker and the health leader. SQLite gives what
the files needed locks, temp files and line-by-line parsers for: transactions
(``BEGIN IMMEDIATE``: concurrent writers queue, none loses another's change),
atomic commits in WAL mode (a writer killed mid-transaction leaves the last
commit intact) and readers that never block writers.

Ordering is by **generation**, never by wall clock: every commit that changes
routes or settings bumps ``routes``; one that changes an observation bumps
``health``. Each row carries the generation that last changed it, so a reader
that kept the previous snapshot parses only the rows that moved (``view.py``).
A health round that only moves ``checked_at`` (its own column) bumps nothing:
no proxy re-reads anything for it.

JSON stays for people: ``export_json``/``import_json`` (``luma-proxy export``,
``import``), and a JSON state file found where the registry used to be (this
project's layouts, or the Go proxy's ``state.json``) is imported once, when
the database is created, and kept beside it as ``<name>.imported.json``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
from pydantic import ValidationError

from luma_proxy.models import STATE_VERSION, Health, HealthEntry, Service, Settings, State, one_line
from luma_proxy.store import jsonstate
from luma_proxy.store.jsonstate import IMPORT_SUFFIX as IMPORT_SUFFIX
from luma_proxy.store.paths import default_state_path as default_state_path

SCHEMA = 1
BUSY_TIMEOUT_MS = 30_000  # a writer waits this long for another's transaction

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS services (host TEXT PRIMARY KEY, gen INTEGER NOT NULL,
                                     data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS health (host TEXT PRIMARY KEY, gen INTEGER NOT NULL,
                                   data TEXT NOT NULL, checked_at TEXT);
"""


class RegistryError(Exception):
    """The registry cannot be read or written; the message is one line."""


def init_schema(db: sqlite3.Connection) -> None:
    """The tables and the schema version, in a database being created."""
    for statement in _SCHEMA_SQL.split(";"):
        db.execute(statement)
    db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA),))


def db_path(state_path: str | os.PathLike[str]) -> Path:
    """``/x/state.json`` -> ``/x/state.db``; any other name gets ``.db`` appended."""
    path = Path(state_path)
    if path.suffix in (".json", ".db"):
        return path.with_suffix(".db")
    return path.with_name(path.name + ".db")


# ------------------------------------------------------------------ rows
def service_row(service: Service) -> str:
    return service.model_dump_json()


def health_row(entry: HealthEntry) -> tuple[str, str | None]:
    """(the observation without ``checked_at``, ``checked_at``): a round that only moves
    the time changes the second column alone."""
    return observation_row((entry.target, entry.health_path, "", entry.ssl), entry)


def observation_row(key: tuple[str, str, str, bool], health: Health) -> tuple[str, str | None]:
    """``health_row`` of ``health`` observed under ``key`` (a ``Service.routing_key()``),
    built without a model: the health leader writes one per service per round."""
    target, health_path, _host, ssl = key
    changed = health.changed_at
    data = {"target": target, "health_path": health_path, "ssl": ssl,
            "healthy": health.healthy, "last_error": health.last_error,
            "changed_at": changed.isoformat() if changed is not None else None,
            "containers": health.containers}
    at = health.checked_at.isoformat() if health.checked_at is not None else None
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS).decode(), at


def parse_service(host: str, data: str) -> Service:
    """A row of ``services``; ``ValueError`` (one line) if it does not validate."""
    try:
        service = Service.model_validate_json(data)
    except ValidationError as e:
        raise ValueError(one_line(f"service {host!r} is invalid: {e.errors()[0]['msg']}")) from None
    if service.key != host:
        raise ValueError(f"service {host!r} is invalid: its host is {service.key!r}")
    return service


def parse_health(data: str, checked_at: str | None) -> HealthEntry | None:
    try:
        return HealthEntry.model_validate({**orjson.loads(data), "checked_at": checked_at})
    except (ValidationError, orjson.JSONDecodeError, TypeError):
        return None  # one bad entry costs its host its stored health, nothing more


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one read transaction saw: generations and raw rows (parsed by ``view.py``)."""

    routes_gen: int
    health_gen: int
    settings: str
    # (host, gen, data): data is None for rows not newer than the reader's generation
    services: list[tuple[str, int, str | None]]
    health: list[tuple[str, int, str | None, str | None]]  # (host, gen, data, checked_at)
    # Random per database: generations of a restored or re-created one start again,
    # so a reader seeing another id starts from scratch.
    registry_id: str = ""


# ------------------------------------------------------------------ transactions
class Tx:
    """One write transaction: row-level reads and writes, generations bumped on commit."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.routes_changed = False
        self.health_changed = False
        self._gens = dict(db.execute("SELECT key, value FROM meta WHERE key IN "
                                     "('routes', 'health')").fetchall())

    def _gen(self, kind: str) -> int:
        return int(self._gens.get(kind, 0)) + 1

    # routes
    def service(self, host: str) -> Service | None:
        row = self.db.execute("SELECT data FROM services WHERE host = ?", (host,)).fetchone()
        return parse_service(host, row[0]) if row else None

    def routes_of(self, host: str) -> dict[str, Service]:
        """Every route of ``host``: its own row and its path-prefix rows (``host/...``),
        read by a range of the primary key, not a scan of every service."""
        rows = self.db.execute(
            "SELECT host, data FROM services WHERE host = ? OR (host >= ? AND host < ?)"
            " ORDER BY host", (host, host + "/", host + "0")).fetchall()
        return {key: parse_service(key, data) for key, data in rows}

    def services(self) -> dict[str, Service]:
        rows = self.db.execute("SELECT host, data FROM services ORDER BY rowid").fetchall()
        return {host: parse_service(host, data) for host, data in rows}

    def put(self, service: Service) -> None:
        data = service_row(service)
        row = self.db.execute("SELECT data FROM services WHERE host = ?",
                              (service.key,)).fetchone()
        if row is not None and row[0] == data:
            return
        self.db.execute("INSERT INTO services (host, gen, data) VALUES (?, ?, ?) ON CONFLICT(host)"
                        " DO UPDATE SET gen = excluded.gen, data = excluded.data",
                        (service.key, self._gen("routes"), data))
        self.routes_changed = True

    def delete(self, host: str) -> bool:
        gone = self.db.execute("DELETE FROM services WHERE host = ?", (host,)).rowcount > 0
        self.routes_changed |= gone
        return gone

    def settings(self) -> Settings:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
        return Settings.model_validate_json(row[0]) if row else Settings()

    def set_settings(self, settings: Settings) -> None:
        data = settings.model_dump_json()
        if data != self.settings().model_dump_json():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('settings', ?)", (data,))
            self.routes_changed = True

    # health
    def health(self, host: str) -> HealthEntry | None:
        row = self.db.execute("SELECT data, checked_at FROM health WHERE host = ?",
                              (host,)).fetchone()
        return parse_health(*row) if row else None

    def all_health(self) -> dict[str, HealthEntry]:
        out = {}
        for host, data, at in self.db.execute("SELECT host, data, checked_at FROM health"):
            if (entry := parse_health(data, at)) is not None:
                out[host] = entry
        return out

    def put_health(self, host: str, entry: HealthEntry) -> None:
        self._put_rows([(host, *health_row(entry))])

    def put_observations(self, rows: Iterable[tuple[str, tuple[str, str, str, bool], Health]]
                         ) -> None:
        """``put_health(host, HealthEntry.of(key, health))`` for each (host, key, health), in
        one statement: the health leader writes a row per service per round."""
        self._put_rows([(host, *observation_row(key, health)) for host, key, health in rows])

    def _put_rows(self, rows: list[tuple[str, str, str | None]]) -> None:
        """(host, data, checked_at) each: a row whose data is unchanged keeps its generation
        (only the time moved: nobody re-reads it)."""
        gen = self._gen("health")
        self.db.executemany(
            "INSERT INTO health VALUES (?, ?, ?, ?) ON CONFLICT(host) DO UPDATE SET gen = CASE"
            " WHEN data = excluded.data THEN gen ELSE excluded.gen END, data = excluded.data,"
            " checked_at = excluded.checked_at",
            [(host, gen, data, at) for host, data, at in rows])
        self.health_changed |= self.db.execute(
            "SELECT 1 FROM health WHERE gen = ? LIMIT 1", (gen,)).fetchone() is not None

    def delete_health(self, host: str) -> bool:
        gone = self.db.execute("DELETE FROM health WHERE host = ?", (host,)).rowcount > 0
        self.health_changed |= gone
        return gone

    def delete_unrouted_health(self) -> None:
        """Entries of hosts no longer routed go."""
        self.health_changed |= self.db.execute(
            "DELETE FROM health WHERE host NOT IN (SELECT host FROM services)").rowcount > 0

    def routing_keys(self) -> dict[str, tuple[str, str, str, bool]]:
        """host -> ``Service.routing_key()``, read by SQLite: no service is validated."""
        return {host: (target, path, host, bool(ssl) if ssl is not None else None)
                for host, target, path, ssl in self.db.execute(
                    "SELECT host, json_extract(data, '$.target'), json_extract(data,"
                    " '$.health_path'), json_extract(data, '$.ssl') FROM services")}

    def put_imported(self, state: State, health: dict[str, HealthEntry]) -> None:
        """The services of an imported JSON state, each with its health if it was observed
        for the service as imported."""
        for service in state.services.values():
            self.put(service)
            entry = health.get(service.key)
            if entry is not None and entry.matches(service):
                self.put_health(service.key, entry)

    def commit_generations(self) -> None:
        for kind, changed in (("routes", self.routes_changed), ("health", self.health_changed)):
            if changed:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                (kind, str(self._gen(kind))))


# ------------------------------------------------------------------ the store
class Store:
    """The registry of one state path: its database, created (and fed) on first use.

    ``create=False`` (``list``, ``status``, ``export``): a registry with no
    database yet is read without creating one; a JSON file there is read as
    it would be imported, and left alone. ``adopt=False`` (``import``): a new
    database starts empty, whatever JSON file lies where the registry used to be.
    """

    def __init__(self, path: str | os.PathLike[str], create: bool = True,
                 adopt: bool = True) -> None:
        self.path = Path(path)
        self.create, self.adopt = create, adopt
        self.db_path = db_path(self.path)
        self.last_import: list[str] | None = None  # notes, when opening took a JSON file over
        self._local = threading.local()
        self._read_only: sqlite3.Connection | None = None  # a JSON file served as read
        # A JSON file that could not be imported, by its (inode, size, mtime): not parsed
        # again (five times a second per proxy process) until it changes.
        self._failed: tuple[Path, tuple[int, int, int] | None, RegistryError] | None = None

    # ------------------------------------------------------------ connections
    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is not None:
            if getattr(self._local, "inode", None) == _inode(self.db_path):
                return db
            db.close()  # the file was replaced (a restore) or removed: open what is there now
            self._local.db = None
        if self._read_only is not None:
            return self._read_only
        exists = self.db_path.exists()
        if not exists and self._failed is not None \
                and self._failed[1] == _file_id(self._failed[0]):
            raise self._failed[2]  # the same file that failed to import: not parsed again
        self._failed = None
        if not exists and not self.create:
            db = self._serve_json_read_only(None)
        else:
            try:
                if not exists:
                    self._create()
                db = self._open()
            except sqlite3.Error as e:
                if exists:  # a database that is there but broken is never replaced
                    raise RegistryError(one_line(
                        f"cannot open the registry {self.db_path}: {e}")) from None
                db = self._serve_json_read_only(e)  # none can be created (read-only disk)
        self._local.db = db
        self._local.inode = _inode(self.db_path) if db is not self._read_only else None
        return db

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_MS / 1000,
                             isolation_level=None, check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                raise sqlite3.DatabaseError("not a luma-proxy registry (no WAL journal)")
            db.execute("PRAGMA synchronous = FULL")
            if self._schema(db) is None:
                raise sqlite3.DatabaseError("not a luma-proxy registry (no schema)")
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _schema(db: sqlite3.Connection) -> int | None:
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.OperationalError:
            return None
        return int(row[0]) if row else None

    def _create(self) -> None:
        """Create the database whole (schema, WAL, the one-time import) under a temporary
        name, then link it into place: a reader never sees a half-made registry, a failed
        import leaves nothing behind, and of two processes creating it at once one wins
        (``link`` fails for the other) and the JSON file is imported exactly once.
        """
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise sqlite3.OperationalError(e.strerror) from None
        sources = self._json_sources() if self.adopt else None
        temp = self.db_path.with_name(f".{self.db_path.name}.{os.urandom(6).hex()}.new")
        try:
            os.close(os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))  # WAL copies
        except OSError as e:
            raise sqlite3.OperationalError(e.strerror) from None
        try:
            with contextlib.closing(sqlite3.connect(temp, isolation_level=None)) as db:
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = FULL")
                db.execute("BEGIN IMMEDIATE")
                init_schema(db)
                db.execute("INSERT INTO meta VALUES ('id', ?)", (os.urandom(8).hex(),))
                if sources is not None:
                    self._import(db, *sources)
                db.execute("COMMIT")
            try:
                os.link(temp, self.db_path)
            except FileExistsError:
                self.last_import = None  # another process created it first: its import
                return
            except OSError:  # no hard links on this file system: rename, if still free
                if self.db_path.exists():
                    self.last_import = None
                    return
                os.rename(temp, self.db_path)
            if sources is not None:
                jsonstate.set_aside(sources[3], self.path)
        finally:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.unlink(f"{temp}{suffix}")

    def _json_sources(self) -> tuple[State, dict[str, HealthEntry], list[str], Path] | None:
        """A JSON state file where the registry used to be, parsed; None if there is none."""
        for source in jsonstate.candidates(self.path):
            try:
                found = jsonstate.read(source)
            except ValueError as e:
                error = RegistryError(str(e))
                self._failed = (source, _file_id(source), error)
                raise error from None
            if found is not None:
                return (*found, source)
        return None

    def _import(self, db: sqlite3.Connection, state: State, health: dict[str, HealthEntry],
                notes: list[str], source: Path) -> None:
        tx = Tx(db)
        tx.put_imported(state, health)
        tx.set_settings(state.settings)
        tx.routes_changed = True
        tx.commit_generations()
        self.last_import = notes

    def _serve_json_read_only(self, error: sqlite3.Error | None) -> sqlite3.Connection:
        """No database (read-only disk, or ``create=False``): the JSON file as read, or empty."""
        sources = self._json_sources()
        if sources is None and error is not None:
            raise RegistryError(one_line(f"cannot open the registry {self.db_path}: {error}"))
        db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        init_schema(db)
        if sources is not None:
            self._import(db, *sources)
        self.last_import = None  # nothing was taken over
        reason = "no registry yet" if error is None else one_line(str(error))
        db.execute("INSERT INTO meta VALUES ('read_only', ?)", (reason,))
        self._read_only = db
        return db

    def open(self) -> list[str] | None:
        """Open (create, import) the registry now; the import's notes if it took a file over."""
        self._db()
        return self.last_import

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None and db is not self._read_only:
            db.close()
        self._local.db = None

    # ------------------------------------------------------------ transactions
    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A write transaction; an exception inside rolls everything back."""
        db = self._db()
        if self._read_only is not None:
            raise RegistryError(f"cannot write the registry {self.db_path}: "
                                f"{self.read_only_reason()}")
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise RegistryError(one_line(f"cannot write the registry {self.db_path}: {e}")) \
                from None
        try:
            tx = Tx(db)
            yield tx
            tx.commit_generations()
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def dry_run[T](self, change: Callable[[Tx], T]) -> T:
        """``change`` in a transaction that is always rolled back (works read-only too)."""
        db = self._db()
        db.execute("BEGIN")
        try:
            return change(Tx(db))
        finally:
            db.execute("ROLLBACK")

    def _db(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as e:
            raise RegistryError(one_line(f"cannot open the registry {self.db_path}: {e}")) \
                from None

    def read_only_reason(self) -> str | None:
        """Why this registry is a JSON file served as read (no database), or None."""
        db = self._db()
        row = db.execute("SELECT value FROM meta WHERE key = 'read_only'").fetchone()
        return row[0] if row else None

    def update[T](self, change: Callable[[State], T]) -> T:
        """Apply ``change`` to the whole state in one transaction (``ValueError`` etc. abort)."""
        with self.transaction() as tx:
            try:
                state = State(services=tx.services(), settings=tx.settings())
            except ValueError as e:
                raise RegistryError(str(e)) from None
            before = {h: service_row(s) for h, s in state.services.items()}
            result = change(state)
            for host in before.keys() - state.services.keys():
                tx.delete(host)
                tx.delete_health(host)
            for host, service in state.services.items():
                if before.get(host) != service_row(service):
                    tx.put(service)
            tx.set_settings(state.settings)
            return result

    # ------------------------------------------------------------ reading
    def _read_tx[T](self, read: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db()
        try:
            db.execute("BEGIN")
            try:
                return read(db)
            finally:
                db.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            raise RegistryError(one_line(f"cannot read the registry {self.db_path}: {e}")) \
                from None

    def read(self) -> State:
        """The whole state, validated (``list``, ``export``)."""
        def read(db: sqlite3.Connection) -> State:
            tx = Tx(db)
            try:
                return State(services=tx.services(), settings=tx.settings())
            except ValueError as e:
                raise RegistryError(str(e)) from None
        return self._read_tx(read)

    def read_health(self) -> dict[str, HealthEntry]:
        return self._read_tx(lambda db: Tx(db).all_health())

    def observed(self, state: State) -> dict[str, HealthEntry]:
        """The health in force per host: its entry, if observed for the service as it is."""
        entries = self.read_health()
        return {host: entry for host, entry in entries.items()
                if (service := state.services.get(host)) is not None and entry.matches(service)}

    def networks(self) -> set[str]:
        """Every Docker network a route was deployed on, read by SQLite: at 10,000 services,
        validating each to read this field cost 0.4 s of CPU while the proxy started."""
        return {name for (name,) in self._read_tx(lambda db: db.execute(
            "SELECT DISTINCT value FROM services, json_each(services.data, '$.networks')"
            " WHERE type = 'text'").fetchall())}

    def generation(self) -> int:
        """The routes generation: what ``deploy`` waits for every proxy to serve."""
        return self.generations()[0]

    def generations(self) -> tuple[int, int, str]:
        """(routes, health, registry id): one small read, to see whether anything moved."""
        gens = dict(self._read_tx(lambda db: db.execute(
            "SELECT key, value FROM meta WHERE key IN ('routes', 'health', 'id')").fetchall()))
        return int(gens.get("routes", 0)), int(gens.get("health", 0)), gens.get("id", "")

    def snapshot(self, routes_since: int = -1, health_since: int = -1,
                 registry_id: str | None = None) -> Snapshot:
        """The generations, and the rows of whichever of routes and health moved since
        (every row, with data only for those changed after ``*_since``). The ``*_since``
        are of the database ``registry_id`` names; another one is read whole."""
        def read(db: sqlite3.Connection) -> Snapshot:
            nonlocal routes_since, health_since
            gens = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if registry_id is not None and gens.get("id", "") != registry_id:
                routes_since = health_since = -1
            routes, health = int(gens.get("routes", 0)), int(gens.get("health", 0))
            # Rows older than what the reader has come without their data: it parsed
            # them already (view.py), so a deploy costs the reader one row's parse.
            services = db.execute(
                "SELECT host, gen, CASE WHEN gen > ? THEN data END FROM services",
                (routes_since,)).fetchall() if routes != routes_since else []
            entries = db.execute(
                "SELECT host, gen, CASE WHEN gen > ? THEN data END, checked_at FROM health",
                (health_since,)).fetchall() if health != health_since else []
            return Snapshot(routes, health, gens.get("settings", "{}"), services, entries,
                            gens.get("id", ""))
        return self._read_tx(read)

    # ------------------------------------------------------------ JSON for people
    def export_json(self) -> bytes:
        """Routes, settings and the health in force, as one JSON document."""
        state = self.read()
        health = self.observed(state)
        return orjson.dumps({
            "version": STATE_VERSION,
            "settings": state.settings.model_dump(mode="json"),
            "services": {h: s.model_dump(mode="json") for h, s in state.services.items()},
            "health": {h: e.model_dump(mode="json") for h, e in health.items()},
        }, option=orjson.OPT_INDENT_2) + b"\n"

    def import_json(self, data: bytes, replace: bool = False) -> tuple[list[str], int]:
        """Add (or, ``replace``: set) the routes of a JSON document: (notes, hosts)."""
        try:
            state, health, notes = jsonstate.parse_json(data)
        except ValueError as e:
            raise RegistryError(str(e)) from None
        with self.transaction() as tx:
            if replace:
                for host in set(tx.routing_keys()) - set(state.services):
                    tx.delete(host)
                    tx.delete_health(host)
                tx.set_settings(state.settings)
            tx.put_imported(state, health)
        return notes, len(state.services)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def _file_id(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
