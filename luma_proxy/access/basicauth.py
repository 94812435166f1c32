"""HTTP Basic authentication per service, against bcrypt or argon2 hashes.

Verifying a hash costs 50-250 ms of CPU, so the checker is split in two: ``cached``
answers from memory on the event loop, ``verify`` does the slow work and is meant
for a thread (``asyncio.to_thread``). Results are remembered under an HMAC of the
raw header, never the password itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterable

import bcrypt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

type Verifier = Callable[[str, str], bool]
"""``verifier(password, hashed) -> bool``: the slow check, replaceable in tests."""

_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12]\d|3[01])\$[./A-Za-z0-9]{53}")
_ARGON2 = re.compile(
    r"\$argon2(id|i|d)\$(v=\d+\$)?m=\d+,t=\d+,p=\d+(,[a-z]+=[^$,]*)*"
    r"\$[A-Za-z0-9+/]+={0,2}\$[A-Za-z0-9+/]+={0,2}"
)
_BCRYPT_MAX_BYTES = 72
# Verification reads its parameters from the hash, so one default hasher serves all.
_ARGON2_HASHER = PasswordHasher()

DEFAULT_CACHE_SIZE = 1024


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


def _check_user(user: str) -> None:
    if not user:
        raise ValueError("basic auth: the user name is empty")
    if ":" in user or _has_control(user):
        msg = f"basic auth: user {user!r} must not contain ':' or control characters"
        raise ValueError(msg)


def is_password_hash(value: str) -> bool:
    """Whether ``value`` looks like a bcrypt ($2a$/$2b$/$2y$) or argon2 hash."""
    return bool(_BCRYPT.fullmatch(value) or _ARGON2.fullmatch(value))


def _check_hash(user: str, hashed: str) -> None:
    # The hash is never echoed: it is a secret too (offline guessing).
    if not is_password_hash(hashed):
        msg = (f"basic auth: the hash for user {user!r} is not a bcrypt ($2b$...) or argon2 "
               "($argon2id$...) hash (quote it in single quotes so the shell keeps the $ signs; "
               "make one with luma-proxy hash-password)")
        raise ValueError(msg)


def parse_credential(value: str) -> tuple[str, str]:
    """Split a ``--basic-auth USER:HASH`` value, refusing what could never authenticate."""
    user, colon, hashed = value.partition(":")
    if not colon:
        raise ValueError("basic auth: expected USER:HASH")
    _check_user(user)
    _check_hash(user, hashed)
    return user, hashed


def hash_password(password: str, scheme: str = "bcrypt") -> str:
    """A hash for ``--basic-auth`` (``luma-proxy hash-password``): bcrypt or argon2id."""
    if not password:
        raise ValueError("the password is empty")
    if scheme == "bcrypt":
        encoded = password.encode()
        if len(encoded) > _BCRYPT_MAX_BYTES:
            msg = (f"bcrypt uses at most {_BCRYPT_MAX_BYTES} bytes of a password "
                   f"(this one has {len(encoded)}); use argon2 for longer ones")
            raise ValueError(msg)
        return bcrypt.hashpw(encoded, bcrypt.gensalt()).decode("ascii")
    if scheme == "argon2":
        return _ARGON2_HASHER.hash(password)
    raise ValueError(f"unknown hash scheme {scheme!r}: expected bcrypt or argon2")


def verify_password(password: str, hashed: str) -> bool:
    """The slow check of one password against one bcrypt or argon2 hash.

    A bcrypt password is cut at 72 bytes, as htpasswd, nginx and Apache do (bcrypt 5
    would raise instead), so hashes made by those tools keep working.
    """
    if hashed.startswith("$argon2"):
        try:
            return _ARGON2_HASHER.verify(hashed, password)
        except (VerificationError, InvalidHashError):
            return False
    try:
        return bcrypt.checkpw(password.encode()[:_BCRYPT_MAX_BYTES], hashed.encode("ascii"))
    except ValueError:  # a malformed hash (parse_credential should have refused it)
        return False


def parse_authorization(header: str | None) -> tuple[str, str] | None:
    """``(user, password)`` from an ``Authorization: Basic ...`` value, or None if malformed."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except ValueError:  # binascii.Error, UnicodeDecodeError, non-ASCII token
        return None
    user, colon, password = decoded.partition(":")
    if not colon or not user:
        return None
    return user, password


def challenge(realm: str) -> str:
    """The ``WWW-Authenticate`` value asking for Basic credentials for ``realm``.

    Quotes, backslashes and control characters are dropped from the realm rather
    than escaped: few clients unescape, and none of them may end the quoted string.
    """
    safe = "".join(c for c in realm if c not in '"\\' and unicodedata.category(c) != "Cc")
    return f'Basic realm="{safe}", charset="UTF-8"'


class BasicAuth:
    """One service's users, and the verdicts on the Authorization headers already seen.

    On the event loop: ``answer = auth.cached(header)``; when it is None, run
    ``auth.verify(header)`` in a thread. ``check`` does both, for synchronous callers.
    Failures are cached too, so a client repeating a wrong password costs one hash.
    """

    def __init__(self, credentials: Iterable[tuple[str, str]], *,
                 cache_size: int = DEFAULT_CACHE_SIZE,
                 verifier: Verifier = verify_password) -> None:
        if cache_size < 1:
            raise ValueError("basic auth: the cache size must be at least 1")
        self._key = secrets.token_bytes(32)
        self._users: list[tuple[bytes, str]] = []
        seen: set[str] = set()
        for user, hashed in credentials:
            _check_user(user)
            _check_hash(user, hashed)
            if user in seen:
                raise ValueError(f"basic auth: user {user!r} is given twice")
            seen.add(user)
            self._users.append((self._mac(user), hashed))
        if not self._users:
            raise ValueError("basic auth: no credentials")
        # An unknown user is checked against a real hash, result ignored: the same cost,
        # so response times do not tell which user names exist.
        self._dummy_hash = self._users[0][1]
        self._verifier = verifier
        self._cache_size = cache_size
        self._cache: OrderedDict[bytes, bool] = OrderedDict()
        self._lock = threading.Lock()  # cached() on the loop, verify() in threads

    def _mac(self, text: str) -> bytes:
        # surrogatepass: any str (mitmproxy's surrogate-escaped bytes too) has a key.
        data = text.encode("utf-8", "surrogatepass")
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def cached(self, header: str | None) -> bool | None:
        """The verdict without hashing: True/False when known, None when ``verify`` must run."""
        if not header:
            return False
        key = self._mac(header)
        with self._lock:
            verdict = self._cache.get(key)
            if verdict is not None:
                self._cache.move_to_end(key)
                return verdict
        if parse_authorization(header) is None:
            return False  # malformed: refused without a hash, nothing to remember
        return None

    def verify(self, header: str | None) -> bool:
        """The slow verdict (one hash verification); run it off the event loop."""
        credentials = parse_authorization(header)
        if credentials is None:
            return False
        assert header is not None
        user, password = credentials
        wanted = self._mac(user)
        hashed = None
        for candidate, candidate_hash in self._users:  # no early exit: same time for any user
            if hmac.compare_digest(candidate, wanted):
                hashed = candidate_hash
        if hashed is None:
            self._verifier(password, self._dummy_hash)
            verdict = False
        else:
            verdict = bool(self._verifier(password, hashed))
        self._remember(self._mac(header), verdict)
        return verdict

    def check(self, header: str | None) -> bool:
        """``cached``, else ``verify``: for callers that may block."""
        verdict = self.cached(header)
        return self.verify(header) if verdict is None else verdict

    def _remember(self, key: bytes, verdict: bool) -> None:
        with self._lock:
            self._cache[key] = verdict
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def cache_len(self) -> int:
        """How many verdicts are remembered (at most the cache size)."""
        with self._lock:
            return len(self._cache)
