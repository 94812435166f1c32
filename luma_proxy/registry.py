"""The registry on disk: the state file (routes) and the health file (observed health).

``state.json`` holds what the CLI desires: every host with its target. Only the
CLI writes it. ``state.json.health.json`` (``<state path>.health.json``) holds
what the proxy observed: each host's health, and the target it was observed
for. The running proxy's health leader writes it after each check round, and
``updatehealth`` sets an entry by hand. So the state file changes only when
routes change, and a health round costs the proxy a health reload, not a
route reload.

Every write happens under an exclusive ``flock`` on the file's own side lock
(``<file>.lock``) and re-reads the file inside the lock, so concurrent writers
never lose each other's change; the new content goes to a temp file that is
fsynced and renamed (mode 0600), so a reader (or a crash) never sees half a file.

Both files have one service per line (``dump_layout``): a reader that kept the
previous version parses and validates only the lines that changed, which is
what makes a reload of 10,000 services cheap. Any other layout (older files,
hand edits) is read too, entry by entry.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from . import gostate
from .atomic import write_atomic
from .models import STATE_VERSION, Health, HealthEntry, Service, Settings, State, one_line
from .paths import default_state_path as default_state_path
from .paths import legacy_state_path

HEALTH_SUFFIX = ".health.json"
IMPORT_SUFFIX = ".imported.json"  # the original of a state file taken over
HEALTH_VERSION = 1

_OPEN = b'  "services": {'
_CLOSE = [b"  }", b"}", b""]
_INDENT = b"    "


class RegistryError(Exception):
    """A registry file cannot be read or written; the message is one line."""


# ------------------------------------------------------------------ the layout
def member_line(key: str, value_json: bytes) -> bytes:
    """One ``"key": value`` line of the ``services`` object."""
    return _INDENT + orjson.dumps(key) + b": " + value_json


def dump_layout(head: Mapping[str, Any], members: list[bytes]) -> bytes:
    """A JSON object: ``head``'s fields one per line, then ``services``, one member per line."""
    lines = [b"{"]
    lines += [b"  " + orjson.dumps(k) + b": " + orjson.dumps(v) + b"," for k, v in head.items()]
    lines.append(_OPEN)
    body = b",\n".join(members)
    return b"\n".join(lines) + b"\n" + (body + b"\n" if members else b"") + b"  }\n}\n"


class _NotInLayout(ValueError):
    pass


def split_layout(data: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """The head fields and the member lines of a file in ``dump_layout``'s layout.

    Raises ``ValueError`` for anything else. When this returns, the whole file
    is the head, the members joined by commas, and the closing braces, so
    parsing the members one by one gives what parsing the file would.
    """
    lines = data.split(b"\n")
    try:
        start = lines.index(_OPEN)
    except ValueError:
        raise _NotInLayout("no services line") from None
    if lines[-3:] != _CLOSE or start > len(lines) - 4:
        raise _NotInLayout("no closing lines")
    try:
        head = orjson.loads(b"\n".join(lines[: start + 1]) + b"}}")
    except orjson.JSONDecodeError:
        raise _NotInLayout("head") from None
    if not isinstance(head, dict) or head.get("services") != {} or list(head)[-1] != "services":
        raise _NotInLayout("head")
    del head["services"]
    members = lines[start + 1 : -3]
    if members:
        last = members[-1]
        if last.endswith(b","):
            raise _NotInLayout("trailing comma")
        for i in range(len(members) - 1):
            line = members[i]
            if not line.endswith(b","):
                raise _NotInLayout("missing comma")
            members[i] = line[:-1]
    return head, members


def parse_member(line: bytes) -> tuple[str, Any]:
    """``"key": value`` -> (key, value); ``ValueError`` unless it is exactly one member.

    A line that is not a member by itself means the file is laid out otherwise
    (e.g. a member spread over lines), not that it is broken.
    """
    try:
        obj = orjson.loads(b"{" + line + b"}")
    except orjson.JSONDecodeError:
        raise _NotInLayout("not a member") from None
    if len(obj) != 1:
        raise _NotInLayout("not one member")
    ((key, value),) = obj.items()
    return key, value


def _loads(data: bytes, what: str) -> dict[str, Any]:
    if not data.strip():
        raise RegistryError(f"{what} is empty (truncated?)")
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise RegistryError(one_line(f"{what} is not valid JSON: {e}")) from None
    if not isinstance(raw, dict):
        raise RegistryError(f"{what} is not a JSON object")
    return raw


# ------------------------------------------------------------------ the state file
def _legacy(service: Service, entry: dict[str, Any]) -> HealthEntry | None:
    """Health kept inside a service entry by older versions, as an entry of the health file."""
    raw = entry.get("health")
    if not isinstance(raw, dict):
        return None
    try:
        health = Health.model_validate(raw)
    except ValidationError:
        return None  # only advisory: the first check replaces it anyway
    if health.healthy is None and health.checked_at is None:
        return None
    return HealthEntry.of(service.routing_key(), health)


def _service(key: str, entry: Any) -> tuple[Service, HealthEntry | None]:
    if not isinstance(entry, dict):
        raise ValueError("entry")
    service = Service.model_validate(entry)
    if service.host != key:
        raise ValueError("key")
    return service, _legacy(service, entry)


def parse_state(data: bytes) -> State:
    """Parse and validate everything; raise ``RegistryError`` saying what is wrong."""
    raw = _loads(data, "state file")
    if gostate.is_go_state(raw):
        try:
            state, notes = gostate.from_go(raw)
        except ValueError as e:
            raise RegistryError(one_line(str(e))) from None
        state.imported = notes
        return state
    unknown = sorted(set(raw) - {"version", "settings", "services"})
    if "services" not in raw and unknown:
        # Never read a file we do not understand as "no routes": the next deploy
        # would overwrite it, and every route in it would be lost.
        raise RegistryError(one_line(
            f"state file has an unknown layout (top-level keys: {', '.join(unknown)[:200]}); "
            "not reading it as an empty registry"))
    version = raw.get("version", STATE_VERSION)
    if version != STATE_VERSION:
        raise RegistryError(
            f"state file has version {version!r}, this luma-proxy understands {STATE_VERSION}"
        )
    raw.pop("legacy_health", None)  # not a field of the file
    try:
        state = State.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RegistryError(one_line(f"state file is invalid at {where}: {first['msg']}")) from None
    for key, service in state.services.items():
        if key != service.host:
            raise RegistryError(
                one_line(f"state file is invalid: key {key!r} != host {service.host!r}")
            )
        if (legacy := _legacy(service, raw["services"][key])) is not None:
            state.legacy_health[key] = legacy
    return state


_Parsed = tuple[str, Service, HealthEntry | None]


class StateReader:
    """Parses successive versions of one state file, validating only what changed.

    The running proxy re-reads the file after every change. A line (or, in
    another layout, an entry) that is the same as in the previous version keeps
    its ``Service`` object, so the caller can also tell what changed by identity.
    Anything unexpected falls back to ``parse_state``, which also words the errors.
    """

    def __init__(self) -> None:
        self._lines: dict[bytes, _Parsed] = {}
        self._entries: dict[str, tuple[Any, _Parsed]] = {}

    def parse(self, data: bytes) -> State:
        try:
            return self._by_line(data)
        except _NotInLayout:
            self._lines = {}
        except Exception:  # in the layout, but invalid: let parse_state say why
            self._lines, self._entries = {}, {}
            return parse_state(data)
        try:
            return self._by_entry(data)
        except Exception:
            self._entries = {}
        return parse_state(data)

    @staticmethod
    def _state(head: dict[str, Any], services: dict[str, Service],
               legacy: dict[str, HealthEntry]) -> State:
        if head.get("version", STATE_VERSION) != STATE_VERSION:
            raise ValueError("version")
        settings = Settings.model_validate(head.get("settings", {}))
        return State.model_construct(version=STATE_VERSION, services=services,
                                     settings=settings, legacy_health=legacy)

    def _by_line(self, data: bytes) -> State:
        head, lines = split_layout(data)
        previous = self._lines
        seen: dict[bytes, _Parsed] = {}
        services: dict[str, Service] = {}
        legacy: dict[str, HealthEntry] = {}
        for line in lines:
            parsed = previous.get(line)
            if parsed is None:
                key, entry = parse_member(line)
                parsed = (key, *_service(key, entry))
            seen[line] = parsed
            key, service, old = parsed
            services[key] = service
            if old is not None:
                legacy[key] = old
            else:
                legacy.pop(key, None)
        state = self._state(head, services, legacy)
        self._lines = seen
        return state

    def _by_entry(self, data: bytes) -> State:
        raw = orjson.loads(data)
        entries = raw.get("services")  # no services: another layout, parse_state decides
        if not isinstance(entries, dict):
            raise ValueError("services")
        previous = self._entries
        seen: dict[str, tuple[Any, _Parsed]] = {}
        services: dict[str, Service] = {}
        legacy: dict[str, HealthEntry] = {}
        for key, entry in entries.items():
            known = previous.get(key)
            if known is not None and known[0] == entry:
                parsed = known[1]
            else:
                parsed = (key, *_service(key, entry))
            seen[key] = (entry, parsed)
            services[key] = parsed[1]
            if parsed[2] is not None:
                legacy[key] = parsed[2]
        state = self._state({k: v for k, v in raw.items() if k != "services"}, services, legacy)
        self._entries = seen
        return state


def dump_state(state: State) -> bytes:
    """The state file's bytes: one service per line, health never included."""
    head = {"version": STATE_VERSION, "settings": state.settings.model_dump(mode="json")}
    return dump_layout(head, [member_line(host, service.model_dump_json().encode())
                              for host, service in state.services.items()])


# ------------------------------------------------------------------ the health file
_CHECKED_AT = b',"checked_at":'
_CHECKED_AT_LEN = len(_CHECKED_AT)


def health_line(host: str, entry: HealthEntry) -> bytes:
    """One entry of the health file; ``checked_at`` last (see ``HealthReader``)."""
    return member_line(host, orjson.dumps({
        "target": entry.target, "health_path": entry.health_path, "ssl": entry.ssl,
        "healthy": entry.healthy, "last_error": entry.last_error,
        "changed_at": entry.changed_at, "containers": entry.containers,
        "checked_at": entry.checked_at,
    }))


def _split_checked_at(line: bytes) -> tuple[bytes, bytes] | None:
    """``(the line without its checked_at, the checked_at value)`` of a line we wrote."""
    cut = line.rfind(_CHECKED_AT)
    if cut < 0 or not line.endswith(b"}"):
        return None
    return line[:cut], line[cut + len(_CHECKED_AT) : -1]


def _checked_at(value: bytes) -> datetime | None:
    """A ``checked_at`` value as ``health_line`` writes it; ``ValueError`` for anything else."""
    if value == b"null":
        return None
    if len(value) < 21 or value[0] != 34 or value[-1] != 34 or 92 in value:  # '"', '\\'
        raise ValueError(value)
    at = datetime.fromisoformat(value[1:-1].decode("ascii"))
    if at.tzinfo is None:
        raise ValueError(value)
    return at


def _health_entry(value: Any) -> HealthEntry | None:
    try:
        return HealthEntry.model_validate(value)
    except ValidationError:
        return None  # one bad entry costs its host its stored health, not the file


class HealthReader:
    """Parses successive versions of the health file, validating only the lines that changed.

    ``parse`` returns host -> entry. A check round rewrites every line, but
    usually changes only its ``checked_at`` (the last field): such a line keeps
    its ``HealthEntry`` object, whose ``checked_at`` is set in place; any other
    change gives a new object. So a round costs each process a few microseconds
    per service instead of a validation, and what changed shows by identity.
    ``lines`` is host -> line of the last file parsed (what a writer keeps).
    Entries that do not validate are left out.
    """

    def __init__(self) -> None:
        # The line without its checked_at -> (host, entry): valid entries only.
        self._lines: dict[bytes, tuple[str, HealthEntry]] = {}
        self.lines: dict[str, bytes] = {}
        # What a writer wrote last, and the file's signature right after.
        self.written: tuple[Signature | None, dict[str, HealthEntry]] = (None, {})

    def parse(self, data: bytes) -> dict[str, HealthEntry]:
        try:
            return self._by_line(data)
        except _NotInLayout:
            self._lines = {}
            return self._whole(data)

    def _by_line(self, data: bytes) -> dict[str, HealthEntry]:
        head, members = split_layout(data)
        self._check_version(head)
        previous = self._lines
        seen: dict[bytes, tuple[str, HealthEntry]] = {}
        entries: dict[str, HealthEntry] = {}
        lines: dict[str, bytes] = {}
        for line in members:  # the hot loop of a health round: _split_checked_at inlined
            cut = line.rfind(_CHECKED_AT)
            stem = line[:cut] if cut > 0 and line.endswith(b"}") else None
            known = previous.get(stem) if stem is not None else None
            entry: HealthEntry | None = None
            if known is not None:
                key, entry = known
                try:
                    at = _checked_at(line[cut + _CHECKED_AT_LEN : -1])
                except ValueError:
                    entry = None
                else:
                    if entry.checked_at != at:
                        entry.checked_at = at
            if entry is None:
                key, value = parse_member(line)
                entry = _health_entry(value)
                if entry is None:
                    entries.pop(key, None)
                    lines.pop(key, None)
                    continue
            if stem is not None:  # the same tuple when known: a round allocates little
                seen[stem] = known if known is not None and known[1] is entry else (key, entry)
            entries[key] = entry
            lines[key] = line
        self._lines, self.lines = seen, lines
        return entries

    def remember(self, lines: dict[str, bytes], entries: dict[str, HealthEntry],
                 signature: Signature | None) -> None:
        """What was just written (by this process), so reading it back costs little."""
        self._lines = {split[0]: (host, entries[host]) for host, line in lines.items()
                       if (split := _split_checked_at(line)) is not None}
        self.lines = lines
        self.written = (signature, entries)

    @staticmethod
    def _check_version(head: dict[str, Any]) -> None:
        version = head.get("version", HEALTH_VERSION)
        if version != HEALTH_VERSION:
            raise RegistryError(f"health file has version {version!r}, this luma-proxy "
                                f"understands {HEALTH_VERSION}")

    def _whole(self, data: bytes) -> dict[str, HealthEntry]:
        raw = _loads(data, "health file")
        self._check_version(raw)
        services = raw.get("services", {})
        if not isinstance(services, dict):
            raise RegistryError("health file is invalid at services: not an object")
        entries = {}
        for host, value in services.items():
            if (entry := _health_entry(value)) is not None:
                entries[host] = entry
        self.lines = {host: health_line(host, entry) for host, entry in entries.items()}
        return entries


def observed_health(state: State, entries: dict[str, HealthEntry] | None
                    ) -> dict[str, HealthEntry]:
    """The health in force per host: its entry, if observed for the service as deployed now.

    ``entries`` is the health file (``None``: there is none yet, so the health
    kept in an older state file counts).
    """
    source = state.legacy_health if entries is None else entries
    out = {}
    for host, entry in source.items():
        service = state.services.get(host)
        if service is not None and entry.matches(service):
            out[host] = entry
    return out


# ------------------------------------------------------------------ the files
Signature = tuple[int, int, int, int]


def _signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def hold_lock(path: str | os.PathLike[str], new: bool = False) -> int | None:
    """Open ``path`` (``new``: it must not exist yet) and take an exclusive ``flock``
    without waiting; the fd holds it until closed (or the process dies), None if not.

    Leadership of the health checks and each proxy's served-version file use it.
    """
    flags = os.O_RDWR | os.O_CREAT | (os.O_EXCL if new else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


class Store:
    """The state file and, next to it, its health file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.health_path = self.path.with_name(self.path.name + HEALTH_SUFFIX)
        self.health_lock_path = self.health_path.with_name(self.health_path.name + ".lock")
        self.last_import: list[str] | None = None  # notes, when the last update took a file over

    # ------------------------------------------------------------ reading
    def read(self, reader: StateReader | None = None) -> State:
        """The current state; a missing file is an empty registry.

        With no file yet, a state file an earlier install left where the
        registry used to be (``paths.legacy_state_path``) is read instead, and
        taken over by the next write.
        """
        data = self._read_bytes(self.path, "state file")
        if data is None and (legacy := legacy_state_path(self.path)) is not None:
            data = self._read_bytes(legacy, "state file")
            if data is not None:
                state = parse_state(data)
                state.imported = state.imported or []
                return state
        if data is None:
            return State()
        return reader.parse(data) if reader is not None else parse_state(data)

    def take_over(self) -> list[str] | None:
        """Write a state file of another layout (the Go proxy's) or place in ours, once.

        The original bytes are kept next to it (``<state>.imported.json``); the
        Go proxy's certificate directories named with upper case are renamed to
        the normalised host. Returns the notes of the import (hosts merged or
        skipped), or None when there was nothing to take over.
        """
        with self._locked(self.lock_path, "state file"):
            self.last_import = self._take_over(self.read())
            return self.last_import

    def _take_over(self, state: State) -> list[str] | None:
        """Under the lock: write ``state`` in this layout if it came from elsewhere."""
        if state.imported is None:
            return None
        notes = state.imported
        self._keep_original()
        state.imported = None
        _write(self.path, dump_state(state), "state file")
        return notes

    def _keep_original(self) -> None:
        """Under the lock: the file being taken over, kept as it was; Go's cert dirs renamed."""
        source = self.path if self.path.exists() else legacy_state_path(self.path)
        original = (self._read_bytes(source, "state file") if source else None) or b""
        _write(self.path.with_name(self.path.name + IMPORT_SUFFIX), original, "backup")
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
            _rename_cert_dirs(self.path, gostate.certificate_dirs(orjson.loads(original)))

    def read_health(self, reader: HealthReader | None = None) -> dict[str, HealthEntry] | None:
        """The health file's entries; ``None`` if there is no health file."""
        data = self._read_bytes(self.health_path, "health file")
        if data is None:
            return None
        return (reader or HealthReader()).parse(data)

    def observed(self, state: State) -> dict[str, HealthEntry]:
        """``observed_health`` of ``state`` from the files as they are now."""
        return observed_health(state, self.read_health())

    @staticmethod
    def _read_bytes(path: Path, what: str) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise RegistryError(f"cannot read {what} {path}: {e.strerror}") from None

    def signature(self) -> Signature | None:
        """Cheap change detector for the reloader: (inode, size, mtime_ns, ctime_ns)."""
        return _signature(self.path)

    def health_signature(self) -> Signature | None:
        return _signature(self.health_path)

    # ------------------------------------------------------------ writing
    @contextlib.contextmanager
    def _locked(self, lock_path: Path, what: str) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise RegistryError(f"cannot lock {what} {lock_path.with_suffix('')}: "
                                f"{e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def update[T](self, change: Callable[[State], T]) -> T:
        """Apply ``change`` to the freshest state and write it back atomically.

        ``change`` may raise (e.g. ``ValueError``) to abort: nothing is written.
        A state file of an older version that kept health inside the services
        gives that health to the health file first (if there is none yet), so
        the rewrite loses nothing.
        """
        with self._locked(self.lock_path, "state file"):
            state = self.read()
            before = b"" if state.imported is not None else dump_state(state)
            result = change(state)
            self.last_import = state.imported
            if state.imported is not None:  # taken over by this write
                self._keep_original()
                state.imported = None
            after = dump_state(state)
            if after != before:
                if state.legacy_health and not self.health_path.exists():
                    self.update_health(lambda _entries: None, seed=state.legacy_health)
                _write(self.path, after, "state file")
            return result

    def update_health[T](self, change: Callable[[dict[str, HealthEntry]], T],
                         seed: dict[str, HealthEntry] | None = None,
                         reader: HealthReader | None = None) -> T:
        """Apply ``change`` to the health file's entries (host -> entry) and write them back.

        Without a health file, the entries start from ``seed`` (an older state
        file's health). A health file that cannot be parsed is replaced. Only
        the lines of changed entries are encoded again (``reader`` keeps them
        between calls).
        """
        reader = reader or HealthReader()
        with self._locked(self.health_lock_path, "health file"):
            data = self._read_bytes(self.health_path, "health file")
            entries: dict[str, HealthEntry] = {}
            lines: dict[str, bytes] = {}
            if data is None:
                entries = dict(seed or {})
            elif reader.written[0] is not None and reader.written[0] == self.health_signature():
                entries, lines = dict(reader.written[1]), reader.lines  # ours, unchanged since
            else:
                with contextlib.suppress(RegistryError):
                    entries = reader.parse(data)
                    lines = reader.lines
            before = dict(entries)
            result = change(entries)
            out_lines = {host: lines[host] if host in lines and before.get(host) is entry
                         else health_line(host, entry) for host, entry in entries.items()}
            out = dump_layout({"version": HEALTH_VERSION}, list(out_lines.values()))
            if out != data and (data is not None or entries):
                _write(self.health_path, out, "health file")
            reader.remember(out_lines, entries, self.health_signature())
            return result


def _rename_cert_dirs(state_path: Path, dirs: dict[str, str]) -> None:
    """``certs/Blog.Example.com`` -> ``certs/blog.example.com`` (the Go proxy kept case)."""
    from .paths import certs_dir

    root = certs_dir(state_path)
    for host, original in dirs.items():
        source, dest = root / original, root / host
        if "/" in original or original.startswith("."):
            continue
        if source.is_dir() and not dest.exists():
            with contextlib.suppress(OSError):
                source.rename(dest)


def _write(path: Path, data: bytes, what: str) -> None:
    """Atomic, 0600 (``atomic.write_atomic``); one-line error. Caller holds the lock."""
    try:
        write_atomic(path, data, 0o600, stale_after=0)  # the lock: every temp file is stale
    except OSError as e:
        msg = "disk full" if e.errno == errno.ENOSPC else e.strerror
        raise RegistryError(f"cannot write {what} {path}: {msg}") from None
