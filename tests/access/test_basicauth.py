"""Basic auth: credentials parsing, hashing, header parsing, verdicts and their cache."""

from __future__ import annotations

import asyncio
import base64

import bcrypt
import pytest
from argon2 import PasswordHasher

from luma_proxy.access.basicauth import (
    BasicAuth,
    challenge,
    hash_password,
    is_password_hash,
    parse_authorization,
    parse_credential,
    verify_password,
)

# Low costs: the tests check behaviour, not the hashes' strength.
BCRYPT_HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
ARGON2_HASH = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("pässwörd")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Counting:
    """A verifier that counts its calls and remembers the hashes it was given."""

    def __init__(self) -> None:
        self.hashes: list[str] = []

    def __call__(self, password: str, hashed: str) -> bool:
        self.hashes.append(hashed)
        return verify_password(password, hashed)

    @property
    def calls(self) -> int:
        return len(self.hashes)


@pytest.fixture
def counting() -> Counting:
    return Counting()


@pytest.fixture
def auth(counting: Counting) -> BasicAuth:
    return BasicAuth([("alice", BCRYPT_HASH), ("bob", ARGON2_HASH)], verifier=counting)


# --- parse_credential ------------------------------------------------------------------


@pytest.mark.parametrize("hashed", [
    BCRYPT_HASH,
    BCRYPT_HASH.replace("$2b$", "$2a$", 1),
    BCRYPT_HASH.replace("$2b$", "$2y$", 1),
    ARGON2_HASH,
    ARGON2_HASH.replace("$argon2id$", "$argon2i$", 1),
    ARGON2_HASH.replace("$argon2id$", "$argon2d$", 1),
])
def test_parse_credential_accepts_bcrypt_and_argon2(hashed: str) -> None:
    assert parse_credential(f"alice:{hashed}") == ("alice", hashed)
    assert is_password_hash(hashed)


@pytest.mark.parametrize(("value", "message"), [
    ("alice", "expected USER:HASH"),
    ("", "expected USER:HASH"),
    (f":{BCRYPT_HASH}", "user name is empty"),
    (f"al:ice:{BCRYPT_HASH}", "is not a bcrypt"),  # split at the first ':' -> bad hash
    (f"al\nice:{BCRYPT_HASH}", "control characters"),
    (f"al\x7fice:{BCRYPT_HASH}", "control characters"),
    ("alice:", "is not a bcrypt"),
    ("alice:s3cret", "is not a bcrypt"),  # a plaintext password
    ("alice:/FcfSv8anoZIhSeMvStlhLufn0Q7n3Njl6SBNbHbqJmkkmBBDGXEIa", "single quotes"),
    ("alice:$2b$04$short", "is not a bcrypt"),
    (f"alice:{BCRYPT_HASH.replace('$04$', '$03$')}", "is not a bcrypt"),  # cost < 4
    (f"alice:{BCRYPT_HASH.replace('$2b$', '$2x$')}", "is not a bcrypt"),
    (f"alice:{BCRYPT_HASH}\n", "is not a bcrypt"),
    ("alice:$argon2id$v=19$m=8,t=1,p=1$", "is not a bcrypt"),
    ("alice:$argon2x$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA", "is not a bcrypt"),
])
def test_parse_credential_refuses_with_one_line(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_credential(value)
    text = str(info.value)
    assert "\n" not in text
    hashed = value.partition(":")[2]
    if len(hashed) > 6:
        assert hashed.strip() not in text, "the hash must not be echoed"


def test_parse_credential_names_the_user() -> None:
    with pytest.raises(ValueError, match="'alice'"):
        parse_credential("alice:plaintext")


# --- hash_password / verify_password ----------------------------------------------------


def test_hash_password_bcrypt_default() -> None:
    hashed = hash_password("correct horse")
    assert hashed.startswith("$2b$")
    assert parse_credential(f"u:{hashed}") == ("u", hashed)
    assert verify_password("correct horse", hashed)
    assert not verify_password("correct horsf", hashed)


def test_hash_password_argon2() -> None:
    hashed = hash_password("correct horse " * 10, "argon2")  # long passwords are fine
    assert hashed.startswith("$argon2id$")
    assert parse_credential(f"u:{hashed}") == ("u", hashed)
    assert verify_password("correct horse " * 10, hashed)
    assert not verify_password("correct horse", hashed)


@pytest.mark.parametrize(("password", "scheme", "message"), [
    ("", "bcrypt", "empty"),
    ("", "argon2", "empty"),
    ("x" * 73, "bcrypt", "at most 72 bytes"),
    ("é" * 37, "bcrypt", "at most 72 bytes"),  # 74 bytes in UTF-8
    ("pw", "md5", "unknown hash scheme 'md5'"),
])
def test_hash_password_refuses(password: str, scheme: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hash_password(password, scheme)


def test_verify_password_variants() -> None:
    assert verify_password("s3cret", BCRYPT_HASH.replace("$2b$", "$2y$", 1))
    assert verify_password("pässwörd", ARGON2_HASH)
    assert not verify_password("passwort", ARGON2_HASH)
    assert not verify_password("s3cret", "$2b$04$garbage")
    assert not verify_password("s3cret", "$argon2id$garbage")


def test_verify_password_cuts_bcrypt_at_72_bytes_like_htpasswd() -> None:
    long = "y" * 72
    hashed = bcrypt.hashpw(long.encode(), bcrypt.gensalt(rounds=4)).decode()
    assert verify_password(long + "anything", hashed)  # bcrypt 5 alone would raise
    assert not verify_password(long[:-1], hashed)


# --- parse_authorization / challenge ------------------------------------------------------


@pytest.mark.parametrize("header", [
    None,
    "",
    "Basic",
    "Basic ",
    "Bearer " + base64.b64encode(b"alice:s3cret").decode(),
    "Basicx " + base64.b64encode(b"alice:s3cret").decode(),
    "Basic !!!!",
    "Basic YWxpY2U6czNjcmU",  # missing padding (alice:s3cre)
    "Basic YWxpY2U6czNjcmV0=x",
    "Basic " + base64.b64encode(b"alice").decode(),  # no colon
    "Basic " + base64.b64encode(b":s3cret").decode(),  # no user
    "Basic " + base64.b64encode(b"alice:\xff\xfe").decode(),  # not UTF-8
    "Basic YWxp\u00e9Y2U6czNjcmV0",  # a non-ASCII token
])
def test_parse_authorization_malformed(header: str | None) -> None:
    assert parse_authorization(header) is None


def test_parse_authorization_well_formed() -> None:
    token = base64.b64encode("alice:pa:ss wörd".encode()).decode()
    assert parse_authorization(f"Basic {token}") == ("alice", "pa:ss wörd")
    assert parse_authorization(f"bAsIc {token}") == ("alice", "pa:ss wörd")
    assert parse_authorization(f"  Basic   {token}  ") == ("alice", "pa:ss wörd")
    empty_password = base64.b64encode(b"alice:").decode()
    assert parse_authorization(f"Basic {empty_password}") == ("alice", "")


@pytest.mark.parametrize(("realm", "expected"), [
    ("admin", 'Basic realm="admin", charset="UTF-8"'),
    ('say "hi"\\', 'Basic realm="say hi", charset="UTF-8"'),
    ("a\r\nSet-Cookie: x=1\x00\x7f\x85", 'Basic realm="aSet-Cookie: x=1", charset="UTF-8"'),
    ("app.example.com", 'Basic realm="app.example.com", charset="UTF-8"'),
    ("café", 'Basic realm="café", charset="UTF-8"'),
])
def test_challenge(realm: str, expected: str) -> None:
    assert challenge(realm) == expected


# --- BasicAuth ---------------------------------------------------------------------------


def test_valid_and_invalid_credentials_bcrypt_and_argon2(auth: BasicAuth) -> None:
    assert auth.check(basic("alice", "s3cret"))
    assert not auth.check(basic("alice", "S3cret"))
    assert auth.check(basic("bob", "pässwörd"))
    assert not auth.check(basic("bob", "passwörd"))
    assert not auth.check(basic("alice", "pässwörd"))  # bob's password, alice's name
    assert not auth.check(basic("Alice", "s3cret"))  # names are case-sensitive


@pytest.mark.parametrize("header", [
    None, "", "Basic", "Basic !!!!", "Bearer abc", "Basic " + base64.b64encode(b"alice").decode(),
])
def test_malformed_header_refused_without_hashing(
    auth: BasicAuth, counting: Counting, header: str | None
) -> None:
    assert auth.cached(header) is False
    assert auth.verify(header) is False
    assert auth.check(header) is False
    assert counting.calls == 0


def test_unknown_user_costs_one_hash_too(auth: BasicAuth, counting: Counting) -> None:
    assert auth.cached(basic("mallory", "s3cret")) is None
    assert auth.verify(basic("mallory", "s3cret")) is False  # alice's password
    assert counting.calls == 1
    assert counting.hashes == [BCRYPT_HASH]  # a real hash: the same cost as a known user
    assert auth.cached(basic("mallory", "s3cret")) is False


def test_second_check_answered_from_cache(auth: BasicAuth, counting: Counting) -> None:
    good, bad = basic("alice", "s3cret"), basic("alice", "wrong")
    assert auth.cached(good) is None
    assert auth.check(good)
    assert auth.check(bad) is False
    assert counting.calls == 2
    for _ in range(3):
        assert auth.cached(good) is True
        assert auth.cached(bad) is False  # failures are remembered too
        assert auth.check(good) and not auth.check(bad)
    assert counting.calls == 2


def test_cache_key_is_the_raw_header(auth: BasicAuth, counting: Counting) -> None:
    token = base64.b64encode(b"alice:s3cret").decode()
    assert auth.check(f"Basic {token}")
    assert auth.cached(f"basic {token}") is None  # another spelling: verified once more
    assert auth.check(f"basic {token}")
    assert counting.calls == 2


def test_cache_is_bounded_lru(counting: Counting) -> None:
    auth = BasicAuth([("alice", BCRYPT_HASH)], cache_size=3, verifier=counting)
    headers = [basic("alice", f"wrong{i}") for i in range(5)]
    for header in headers[:3]:
        auth.verify(header)
    assert auth.cached(headers[0]) is False  # touched: now the most recent
    auth.verify(headers[3])
    auth.verify(headers[4])
    assert auth.cache_len() == 3
    assert auth.cached(headers[0]) is False
    assert auth.cached(headers[1]) is None  # the least recently used went first
    assert auth.cached(headers[2]) is None
    assert auth.cached(headers[4]) is False
    assert counting.calls == 5


async def test_verify_off_the_event_loop(auth: BasicAuth, counting: Counting) -> None:
    header = basic("bob", "pässwörd")
    verdict = auth.cached(header)
    if verdict is None:
        verdict = await asyncio.to_thread(auth.verify, header)
    assert verdict is True
    results = await asyncio.gather(*(asyncio.to_thread(auth.check, header) for _ in range(8)))
    assert results == [True] * 8
    assert counting.calls == 1


def test_headers_with_lone_surrogates_do_not_crash(auth: BasicAuth) -> None:
    assert auth.cached("Basic \udcff") is False
    assert auth.check("Basic \udcff\ud800") is False


@pytest.mark.parametrize(("credentials", "kwargs", "message"), [
    ([], {}, "no credentials"),
    ([("alice", BCRYPT_HASH), ("alice", ARGON2_HASH)], {}, "'alice' is given twice"),
    ([("alice", "plaintext")], {}, "is not a bcrypt"),
    ([("", BCRYPT_HASH)], {}, "empty"),
    ([("a:b", BCRYPT_HASH)], {}, "must not contain"),
    ([("alice", BCRYPT_HASH)], {"cache_size": 0}, "cache size"),
])
def test_basicauth_refuses_bad_configuration(
    credentials: list[tuple[str, str]], kwargs: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        BasicAuth(credentials, **kwargs)
