"""The short pages the proxy answers itself. None of them says anything internal.

**Custom pages.** A directory of ``<status>.html`` files (``--error-pages DIR``
per service, and a default for all: ``run --error-pages DIR`` or
``LUMA_PROXY_ERROR_PAGES``) replaces the built-in page for the statuses in
``CUSTOM_STATUSES``; ``maintenance.html`` is the page of a host stopped with a
message (503). A page is looked for in the service's directory, then in the
default one; anything else falls back to the built-in page:

* only ``<status>.html`` for a status in ``CUSTOM_STATUSES`` and
  ``maintenance.html`` are ever opened: the name is ours, never the request's;
* the directory is resolved once (``realpath``: it may itself be a symlink), and
  the page is opened relative to it with ``O_NOFOLLOW``: a symlink is never
  followed, not even to a file inside the directory, so nothing outside it is read;
* only a regular, non-empty file of at most ``MAX_PAGE_BYTES`` is served (a FIFO,
  a device or a directory is never opened; an unreadable file is skipped);
* the literal ``{{message}}`` in a custom page is replaced by the maintenance
  message, HTML-escaped, or by the built-in page's sentence for that status.

Pages are served from memory; a page's file is looked at again at most once per
``RECHECK_SECONDS`` (an edited page is served without a restart, and the proxy's
own answers, on the event loop, almost never touch the disk).
"""

from __future__ import annotations

import errno
import html
import logging
import os
import stat
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, Literal

from mitmproxy import http

logger = logging.getLogger("luma_proxy")

RETRY_AFTER = "5"
PAGES_ENV: Final = "LUMA_PROXY_ERROR_PAGES"
CUSTOM_STATUSES: Final = frozenset({400, 403, 404, 405, 408, 413, 429, 431, 500, 502, 503, 504})
MAINTENANCE: Final = "maintenance"
PLACEHOLDER: Final = b"{{message}}"
MAX_PAGE_BYTES: Final = 1024 * 1024
RECHECK_SECONDS: Final = 1.0
_MAX_CACHED = 1024  # (directory, page) entries; the directories come from the configuration

_TEXT = {
    400: "The request could not be understood.",
    404: "No site is configured for this host.",
    405: "This method is not allowed here.",
    413: "The request body is too large.",
    431: "The request headers are too large.",
    500: "The proxy could not handle this request.",
    502: "The site did not answer properly. Please try again.",
    503: "The site is temporarily unavailable. Please try again shortly.",
    504: "The site took too long to answer.",
}
DEFAULT_TEXT = "The request could not be completed."

PageName = int | Literal["maintenance"]
# The only file names ever opened: built here, never from anything a request carries.
_FILES: dict[PageName, str] = {status: f"{status}.html" for status in CUSTOM_STATUSES}
_FILES[MAINTENANCE] = "maintenance.html"


def _env_default() -> str | None:
    return os.environ.get(PAGES_ENV) or None


_state: dict[str, str | None] = {"default": _env_default()}


# ------------------------------------------------------------ built-in pages
def page_text(status: int) -> str:
    """The built-in page's sentence for ``status``."""
    return _TEXT.get(status, DEFAULT_TEXT)


def builtin_page_body(status: int, message: str | None = None) -> bytes:
    """The built-in page; a non-empty ``message`` (escaped) replaces its sentence."""
    try:
        title = f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        title = str(status)
    text = message or page_text(status)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title></head>\n"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>\n"
    ).encode(errors="replace")


# -------------------------------------------------------------- custom pages
@dataclass(slots=True)
class _Entry:
    checked: float  # monotonic time of the last look at the file
    key: tuple[int, ...] | None  # what the file was then (None: not there)
    body: bytes | None  # what is served from it (None: the built-in page)


_cache: dict[tuple[str, str], _Entry] = {}
_roots: dict[str, str] = {}  # a configured directory -> its realpath, resolved once
_warned: set[str] = set()
_now = time.monotonic  # tests move the clock


def clear_cache() -> None:
    """Forget every page and resolved directory (they are read again on next use)."""
    _cache.clear()
    _roots.clear()
    _warned.clear()


def _warn_once(text: str) -> None:
    if text not in _warned:
        if len(_warned) >= _MAX_CACHED:
            _warned.clear()
        _warned.add(text)
        logger.warning("%s", text)


def _root(directory: str) -> str:
    root = _roots.get(directory)
    if root is None:
        if len(_roots) >= _MAX_CACHED:
            _roots.clear()
        root = _roots[directory] = os.path.realpath(directory)
    return root


def _file_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _refused(st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size > MAX_PAGE_BYTES:
        return f"larger than {MAX_PAGE_BYTES} bytes"
    if st.st_size == 0:
        return "empty"
    return None


def _read(root: str, name: str, known: _Entry | None) -> tuple[tuple[int, ...] | None,
                                                                bytes | None]:
    """The file's key and the page it gives (None: use the built-in page).

    ``lstat`` first, so that a symlink, FIFO or device is never opened; the open
    (``O_NOFOLLOW``, ``O_NONBLOCK``) is checked again with ``fstat`` in case the
    file was swapped in between. An unchanged file is not read again.
    """
    path = os.path.join(root, name)
    try:
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        _warn_once(f"error pages: cannot open directory {root}: {e.strerror}")
        return None, None
    try:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.ENOENT:
                _warn_once(f"error pages: {path} ignored: {e.strerror}")
            return None, None
        key = _file_key(st)
        if known is not None and known.key == key:
            return key, known.body
        if (reason := _refused(st)) is not None:
            _warn_once(f"error pages: {path} ignored: {reason}")
            return key, None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except OSError as e:
            _warn_once(f"error pages: {path} ignored: {e.strerror}")
            return key, None
        try:
            st = os.fstat(fd)
            if (reason := _refused(st)) is not None:
                _warn_once(f"error pages: {path} ignored: {reason}")
                return key, None
            chunks: list[bytes] = []
            size = 0
            while size <= MAX_PAGE_BYTES and (chunk := os.read(fd, MAX_PAGE_BYTES + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
        except OSError as e:
            _warn_once(f"error pages: {path} ignored: {e.strerror}")
            return key, None
        finally:
            os.close(fd)
        body = b"".join(chunks)
        if not body or len(body) > MAX_PAGE_BYTES:  # it changed while being read
            return key, None
        return _file_key(st), body
    finally:
        os.close(dir_fd)


def load_page(directory: str | None, status: PageName) -> bytes | None:
    """The custom page ``<directory>/<status>.html`` as it is on disk, or None.

    ``status`` is a status in ``CUSTOM_STATUSES`` or ``MAINTENANCE``; anything
    else is None without touching the disk. Cached: the file is looked at again
    at most once per ``RECHECK_SECONDS``.
    """
    try:
        name = _FILES.get(status)
    except TypeError:  # unhashable: not a page name
        return None
    if not directory or name is None:
        return None
    root = _root(directory)
    now = _now()
    entry = _cache.get((root, name))
    if entry is not None and now - entry.checked < RECHECK_SECONDS:
        return entry.body
    key, body = _read(root, name, entry)
    if entry is None:
        if len(_cache) >= _MAX_CACHED:
            _cache.clear()
        _cache[(root, name)] = _Entry(now, key, body)
    else:
        entry.checked, entry.key, entry.body = now, key, body
    return body


def set_default_pages_dir(path: str | None) -> None:
    """The directory every service without its own page uses (``run --error-pages``);
    None: ``$LUMA_PROXY_ERROR_PAGES`` when set, else the built-in pages."""
    _state["default"] = path or _env_default()


def default_pages_dir() -> str | None:
    return _state["default"]


def parse_error_pages_dir(value: str) -> str:
    """``--error-pages DIR``: its absolute path; ValueError (one line) when it is not
    an existing, readable directory."""
    if not value or not value.strip():
        raise ValueError("error pages directory must not be empty")
    path = os.path.abspath(value)
    if not os.path.exists(path):
        raise ValueError(f"error pages directory {path} does not exist")
    if not os.path.isdir(path):
        raise ValueError(f"error pages directory {path} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ValueError(f"error pages directory {path} is not readable")
    return path


def custom_page_body(status: int, pages_dir: str | None = None,
                     message: str | None = None) -> bytes | None:
    """The custom page for ``status``, ``{{message}}`` filled in; None: none applies.

    Looked for in ``pages_dir`` (the service's), then in the default directory; in
    each, a maintenance answer (503 with a ``message``) takes ``maintenance.html``,
    else ``503.html``.
    """
    default = _state["default"]
    if not pages_dir and not default:
        return None
    names: tuple[PageName, ...] = (
        (MAINTENANCE, status) if message is not None and status == 503 else (status,))
    for directory in (pages_dir, default) if pages_dir != default else (pages_dir,):
        for name in names:
            body = load_page(directory, name)
            if body is not None:
                if PLACEHOLDER in body:
                    text = html.escape(message or page_text(status))
                    body = body.replace(PLACEHOLDER, text.encode(errors="replace"))
                return body
    return None


def page_body(status: int, pages_dir: str | None = None, message: str | None = None) -> bytes:
    """The page for ``status``: a custom one (``custom_page_body``), else the built-in one.

    mitmproxy's own error answers (``engine_patches``) come through here, so the
    default directory applies to them too.
    """
    custom = custom_page_body(status, pages_dir, message)
    return custom if custom is not None else builtin_page_body(status, message)


def page(status: int, headers: dict[str, str] | None = None, pages_dir: str | None = None,
         message: str | None = None) -> http.Response:
    """A response for ``flow.response``; 503 carries ``Retry-After``.

    ``pages_dir``: the service's error pages directory. ``message``: a maintenance
    503's text (``stop --host H --message TEXT``; "" for the maintenance page
    with its default text).
    """
    all_headers = {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"}
    if status == 503:
        all_headers["Retry-After"] = RETRY_AFTER
    all_headers.update(headers or {})
    return http.Response.make(status, page_body(status, pages_dir, message), all_headers)
