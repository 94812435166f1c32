"""Unit tests for luma_proxy.proxy.gate: what a route asks of a request (issue 16)."""

from __future__ import annotations

import asyncio
import base64
import html
import time
from collections.abc import Iterator
from typing import Any

import bcrypt
import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from luma_proxy.models import Service
from luma_proxy.proxy import pages
from luma_proxy.proxy.gate import Broken, Gate, gate_of, hold_paused

# Low cost: the tests check behaviour, not the hash's strength.
HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
CLIENT = "203.0.113.7"


@pytest.fixture(autouse=True)
def _builtin_pages() -> Iterator[None]:
    """The built-in pages, whatever LUMA_PROXY_ERROR_PAGES says."""
    before = pages.default_pages_dir()
    pages.set_default_pages_dir(None)
    yield
    pages.set_default_pages_dir(before)


def service(host: str = "a.com", **fields: Any) -> Service:
    return Service(name="app", host=host, target="app:3000", project="p", **fields)


def flow(path: str = "/", *headers: tuple[str, str]) -> http.HTTPFlow:
    f = tflow.tflow()
    f.request.path = path
    for name, value in headers:
        f.request.headers.add(name, value)
    return f


def basic(user: str, password: str) -> tuple[str, str]:
    return "Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def check(gate: Gate, f: http.HTTPFlow | None = None, client: str = CLIENT,
          raw_host: str = "a.com", https: bool = False) -> Any:
    return gate.check(f or flow(), client, raw_host, https)


def status(verdict: object) -> int | None:
    """The verdict's status; None when the request is to be forwarded."""
    if verdict is None:
        return None
    assert isinstance(verdict, http.Response), verdict
    return verdict.status_code


# ---------------------------------------------------------------------------- gate_of


def test_gate_of_plain_service_is_none() -> None:
    assert gate_of(service()) is None
    # Paused routes are held by the addon, not gated; path options need no gate either.
    assert gate_of(service(mode="paused")) is None
    assert gate_of(service(path_prefix="/api", strip_path_prefix=False, compress=False)) is None


@pytest.mark.parametrize(
    "fields",
    [{"canonical_host": "www.a.com"}, {"allow": ["10.0.0.0/8"]},
     {"basic_auth": [f"u:{HASH}"]}, {"mode": "stopped"},
     {"mode": "stopped", "stop_message": "back soon"}],
)
def test_gate_of_service_with_checks_is_a_gate(fields: dict[str, Any]) -> None:
    gate = gate_of(service(**fields))
    assert isinstance(gate, Gate)
    assert status(check(gate)) is not None  # it does refuse something


@pytest.mark.parametrize(
    "fields", [{"basic_auth": ["u:not-a-hash"]}, {"basic_auth": ["nocolon"]},
               {"allow": ["10.0.0.0/33"]}, {"allow": ["nope"]}],
)
def test_gate_of_refuses_rows_that_do_not_compile(fields: dict[str, Any]) -> None:
    """A hand-edited row raises ValueError: the addon then answers it with ``Broken``."""
    with pytest.raises(ValueError):
        gate_of(service(**fields))


def test_broken_answers_500() -> None:
    gate = Broken(service(basic_auth=["u:not-a-hash"]))
    for f in (flow(), flow("/x", basic("u", "pw"))):
        verdict = check(gate, f)
        assert status(verdict) == 500


# ---------------------------------------------------------------------------- canonical host


@pytest.mark.parametrize(
    ("raw_host", "path", "https", "location"),
    [
        ("a.com", "/", False, "http://www.a.com/"),
        ("a.com", "/x/y?q=1&r=%2F", True, "https://www.a.com/x/y?q=1&r=%2F"),
        ("A.com:8443", "/p?q", True, "https://www.a.com:8443/p?q"),
        ("a.com:8080", "/", False, "http://www.a.com:8080/"),
        ("b.com.", "/b", False, "http://www.a.com/b"),
    ],
)
def test_canonical_redirect(raw_host: str, path: str, https: bool, location: str) -> None:
    gate = gate_of(service(canonical_host="www.a.com"))
    assert gate is not None
    verdict = check(gate, flow(path), raw_host=raw_host, https=https)
    assert status(verdict) == 301
    assert verdict.headers["Location"] == location
    assert verdict.content == b""


@pytest.mark.parametrize("raw_host", ["www.a.com", "WWW.A.com.", "www.a.com:8443"])
def test_canonical_host_itself_is_forwarded(raw_host: str) -> None:
    gate = gate_of(service(canonical_host="www.a.com"))
    assert gate is not None
    assert check(gate, raw_host=raw_host) is None


def test_canonical_redirect_comes_before_the_other_checks() -> None:
    """One 301 first: the credentials and the allow-list apply on the canonical host."""
    gate = gate_of(service(canonical_host="www.a.com", allow=["10.0.0.0/8"],
                           basic_auth=[f"u:{HASH}"], mode="stopped"))
    assert gate is not None
    assert status(check(gate, raw_host="a.com")) == 301


# ---------------------------------------------------------------------------- allow-list


@pytest.mark.parametrize(
    ("client", "allowed"),
    [("10.1.2.3", True), ("::ffff:10.1.2.3", True), ("2001:db8::5", True),
     ("11.0.0.1", False), ("2001:db9::1", False), (CLIENT, False), ("garbage", False),
     ("", False)],
)
def test_allow_list(client: str, allowed: bool) -> None:
    gate = gate_of(service(allow=["10.0.0.0/8", "2001:db8::/32"]))
    assert gate is not None
    assert status(check(gate, client=client)) == (None if allowed else 403)


def test_allow_list_comes_before_basic_auth() -> None:
    gate = gate_of(service(allow=["10.0.0.0/8"], basic_auth=[f"u:{HASH}"]))
    assert gate is not None
    # Good credentials from elsewhere: 403, and no password hash is computed for it.
    assert status(check(gate, flow("/", basic("u", "pw")), client=CLIENT)) == 403


# ---------------------------------------------------------------------------- basic auth


@pytest.fixture
def auth_gate() -> Gate:
    gate = gate_of(service("Auth.example", basic_auth=[f"u:{HASH}"]))
    assert gate is not None
    return gate


def assert_challenge(verdict: object) -> None:
    assert status(verdict) == 401
    assert isinstance(verdict, http.Response)
    assert verdict.headers["WWW-Authenticate"] == 'Basic realm="auth.example", charset="UTF-8"'


@pytest.mark.parametrize(
    "headers",
    [(), (("Authorization", "Bearer abc"),), (("Authorization", "Basic !!!"),),
     (("Authorization", ""),), (basic("u", "pw"), basic("u", "pw"))],
    ids=["none", "other scheme", "bad base64", "empty", "two headers"],
)
def test_basic_auth_challenges_without_valid_header(auth_gate: Gate,
                                                    headers: tuple[tuple[str, str], ...]) -> None:
    assert_challenge(check(auth_gate, flow("/", *headers)))


async def test_basic_auth_verifies_once_then_forwards(auth_gate: Gate) -> None:
    f = flow("/", basic("u", "pw"))
    pending = check(auth_gate, f)
    assert asyncio.iscoroutine(pending)  # not hashed on the event loop
    await pending
    assert check(auth_gate, f) is None
    assert check(auth_gate, flow("/other", basic("u", "pw"))) is None  # cached per header


@pytest.mark.parametrize(("user", "password"), [("u", "wrong"), ("nobody", "pw")])
async def test_basic_auth_wrong_credentials_are_verified_then_refused(
        auth_gate: Gate, user: str, password: str) -> None:
    f = flow("/", basic(user, password))
    pending = check(auth_gate, f)
    assert asyncio.iscoroutine(pending)
    await pending
    assert_challenge(check(auth_gate, f))
    assert_challenge(check(auth_gate, f))  # the refusal is remembered: no new hash


async def test_basic_auth_comes_before_stopped() -> None:
    gate = gate_of(service("auth.example", basic_auth=[f"u:{HASH}"], mode="stopped",
                           stop_message="later"))
    assert gate is not None
    assert_challenge(check(gate))
    f = flow("/", basic("u", "pw"))
    pending = check(gate, f)
    assert asyncio.iscoroutine(pending)
    await pending
    assert status(check(gate, f)) == 503


# ---------------------------------------------------------------------------- stopped


def test_stopped_answers_503_with_the_escaped_message() -> None:
    message = 'Back at 5 <b>"soon"</b> & later'
    gate = gate_of(service(mode="stopped", stop_message=message))
    assert gate is not None
    verdict = check(gate)
    assert status(verdict) == 503
    assert html.escape(message) in verdict.text
    assert "<b>" not in verdict.text
    assert "Retry-After" in verdict.headers


def test_stopped_without_message_answers_the_builtin_503() -> None:
    gate = gate_of(service(mode="stopped"))
    assert gate is not None
    verdict = check(gate)
    assert status(verdict) == 503
    assert verdict.content == pages.page(503).content


# ---------------------------------------------------------------------------- hold_paused


class Toggle:
    """The view's route: paused until ``at`` seconds from now, then ``after``."""

    def __init__(self, at: float, after: Service | None) -> None:
        self.deadline = time.monotonic() + at
        self.paused = service(mode="paused")
        self.after = after
        self.calls = 0

    def __call__(self) -> Service | None:
        self.calls += 1
        return self.paused if time.monotonic() < self.deadline else self.after


@pytest.mark.parametrize("after", [service(), service(mode="stopped"), None],
                         ids=["resumed", "stopped", "removed"])
async def test_hold_paused_ends_when_the_route_stops_being_paused(after: Service | None,
                                                                  ) -> None:
    current = Toggle(0.1, after)
    started = time.monotonic()
    assert await hold_paused(current, 5.0) is True
    elapsed = time.monotonic() - started
    assert 0.09 <= elapsed < 1.0
    assert current.calls > 1  # it polled


async def test_hold_paused_gives_up_at_the_bound() -> None:
    current = Toggle(60.0, service())
    started = time.monotonic()
    assert await hold_paused(current, 0.2) is False
    assert 0.19 <= time.monotonic() - started < 1.0


async def test_hold_paused_not_paused_returns_at_once() -> None:
    started = time.monotonic()
    assert await hold_paused(lambda: service(), 5.0) is True
    assert await hold_paused(lambda: None, 5.0) is True
    assert time.monotonic() - started < 0.1


async def test_hold_paused_zero_bound_looks_once() -> None:
    assert await hold_paused(Toggle(60.0, service()), 0.0) is False
    assert await hold_paused(lambda: service(), 0.0) is True
