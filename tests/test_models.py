"""Unit tests for luma_proxy.models: host/target/path parsing and the pydantic models."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from luma_proxy.models import (
    STATE_VERSION,
    Health,
    HealthEntry,
    Service,
    State,
    ip_literal,
    normalize_host,
    parse_duration,
    parse_health_path,
    parse_host_pattern,
    parse_name,
    parse_path_prefix,
    parse_target,
    route_key,
)

# ---------------------------------------------------------------------------- normalize_host


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("blog.com", "blog.com"),
        ("Blog.COM", "blog.com"),
        ("BLOG.COM", "blog.com"),
        ("blog.com.", "blog.com"),
        ("blog.com:443", "blog.com"),
        ("blog.com:8080", "blog.com"),
        ("Blog.COM.:443", "blog.com"),
        ("  blog.com  ", "blog.com"),
        ("localhost", "localhost"),
        ("a-b.c-d.example", "a-b.c-d.example"),
        ("123.example", "123.example"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example.", "xn--bcher-kva.example"),
        ("bücher.example:8443", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("[::1]", "::1"),
        ("[::1]:443", "::1"),
        ("[2001:DB8:0:0::1]", "2001:db8::1"),
        ("[2001:db8::1]:8080", "2001:db8::1"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
    ],
)
def test_normalize_host_canonical_form(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


def test_normalize_host_is_idempotent() -> None:
    for raw in ("Blog.COM.:443", "bücher.example", "[2001:DB8::1]:80"):
        once = normalize_host(raw)
        assert normalize_host(once if ":" not in once else f"[{once}]") == once


@pytest.mark.parametrize(
    "raw",
    [
        "",
        " ",
        "\t",
        "a b",
        "blog .com",
        "blog\n.com",
        "..",
        ".",
        "a..b",
        ".blog.com",
        "blog.com..",
        "a" * 64 + ".com",
        "-blog.com",
        "blog-.com",
        "blog.-com",
        "under_score.com",
        "blog.com:",
        "blog.com:http",
        "blog.com:-1",
        "::1",  # IPv6 must be bracketed
        "[::1",
        "[::1]x",
        "[::1]:",
        "[::1]:http",
        "[not-v6]",
        "[1.2.3.4]",
        "blog/com",
        "blog.com/path",
        "user@blog.com",
        "b" * 254,
        ".".join(["a" * 63] * 4) + ".com",  # > 253 characters in total
    ],
)
def test_normalize_host_rejects(raw: str) -> None:
    with pytest.raises(ValueError) as info:
        normalize_host(raw)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("invalid hostname")


# ---------------------------------------------------------------------------- parse_target


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("blog:3000", ("blog", 3000)),
        ("myproject-blog:3000", ("myproject-blog", 3000)),
        ("Blog:80", ("blog", 80)),
        ("my_app.v2:8080", ("my_app.v2", 8080)),
        ("blog:1", ("blog", 1)),
        ("blog:65535", ("blog", 65535)),
        (" blog:3000 ", ("blog", 3000)),
        ("10.0.0.7:3000", ("10.0.0.7", 3000)),
        ("[::1]:8080", ("::1", 8080)),
        ("[2001:DB8::1]:443", ("2001:db8::1", 443)),
    ],
)
def test_parse_target_ok(raw: str, expected: tuple[str, int]) -> None:
    assert parse_target(raw) == expected


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("blog", "expected ALIAS:PORT"),
        ("", "expected ALIAS:PORT"),
        (":3000", "expected ALIAS:PORT"),
        ("blog:", "port must be 1-65535"),
        ("blog:0", "port must be 1-65535"),
        ("blog:70000", "port must be 1-65535"),
        ("blog:65536", "port must be 1-65535"),
        ("blog:abc", "port must be 1-65535"),
        ("blog:-1", "port must be 1-65535"),
        ("blog: 80", "port must be 1-65535"),
        ("blog:3.0", "port must be 1-65535"),
        ("-blog:80", "bad alias"),
        ("bl og:80", "bad alias"),
        ("blog/x:80", "bad alias"),
        ("[::1:80", "bad alias"),
        ("blog:²", "port must be 1-65535"),  # str.isdigit() is true for these
        ("blog:٣", "port must be 1-65535"),
    ],
)
def test_parse_target_rejects(raw: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_target(raw)
    message = str(info.value)
    assert message.startswith("invalid target")
    assert why in message
    assert "\n" not in message


# ---------------------------------------------------------------------------- others


@pytest.mark.parametrize("path", ["/", "/up", "/health?full=1", "/a/b/c", "/ünï"])
def test_parse_health_path_ok(path: str) -> None:
    assert parse_health_path(path) == path


@pytest.mark.parametrize("path", ["", "up", "http://x/up", "/u p", "/up\r\nX: y", "/up\t", "/\x00"])
def test_parse_health_path_rejects(path: str) -> None:
    with pytest.raises(ValueError, match="invalid health path"):
        parse_health_path(path)


def test_parse_name() -> None:
    assert parse_name("  myproject ", "project") == "myproject"
    assert parse_name("x" * 200, "project") == "x" * 200
    for bad in ("", "   ", "x" * 201, "a\x1bb"):
        with pytest.raises(ValueError, match="invalid project"):
            parse_name(bad, "project")


# ---------------------------------------------------------------------------- models


def test_service_normalises_host_and_target() -> None:
    s = Service(name="blog", host="Blog.COM.:443", target="MyProject-Blog:3000", project=" p ")
    assert s.host == "blog.com"
    assert s.target == "myproject-blog:3000"
    assert s.project == "p"
    assert (s.alias, s.port) == ("myproject-blog", 3000)
    assert s.health_path == "/up"
    assert s.ssl is True


def test_service_ipv6_target_is_bracketed() -> None:
    s = Service(name="x", host="a.com", target="[2001:DB8::1]:8080", project="p")
    assert s.target == "[2001:db8::1]:8080"
    assert (s.alias, s.port) == ("2001:db8::1", 8080)
    # The stored form parses back to the same thing.
    assert Service.model_validate(s.model_dump()).target == s.target


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("host", "a b"),
        ("host", ""),
        ("target", "blog"),
        ("target", "blog:0"),
        ("project", ""),
        ("health_path", "up"),
    ],
)
def test_service_rejects_invalid_fields(field: str, value: str) -> None:
    fields = {"name": "x", "host": "a.com", "target": "blog:80", "project": "p", field: value}
    with pytest.raises(ValidationError) as info:
        Service(**fields)
    assert info.value.errors()[0]["loc"] == (field,)


def test_service_routing_key_covers_routing_fields() -> None:
    base = Service(name="x", host="a.com", target="blog:80", project="p")
    same = base.model_copy(update={"project": "q", "app": "other"})
    assert same.routing_key() == base.routing_key()
    for update in ({"target": "blog:81"}, {"health_path": "/h"}, {"ssl": False}):
        assert base.model_copy(update=update).routing_key() != base.routing_key()


def test_health_defaults() -> None:
    h = Health()
    assert h.healthy is None
    assert h.checked_at is None and h.changed_at is None and h.last_error is None
    assert h.containers == {}
    assert Health().containers is not h.containers  # no shared mutable default
    s = Service(name="x", host="a.com", target="blog:80", project="p")
    assert not hasattr(s, "health")  # observed health lives in the health file
    assert s.created_at.tzinfo is not None
    assert abs((s.created_at - datetime.now(UTC)).total_seconds()) < 5


def test_health_entry_matches_only_the_service_it_was_observed_for() -> None:
    s = Service(name="x", host="a.com", target="blog:80", project="p")
    entry = HealthEntry.of(s.routing_key(), Health(healthy=False, containers={"10.0.0.2": False}))
    assert (entry.target, entry.health_path, entry.ssl) == ("blog:80", "/up", True)
    assert entry.matches(s)
    assert entry.matches(s.model_copy(update={"project": "q", "app": "other"}))
    for update in ({"target": "blog:81"}, {"health_path": "/h"}, {"ssl": False}):
        assert not entry.matches(s.model_copy(update=update)), update
    assert entry.health() == Health(healthy=False, containers={"10.0.0.2": False})
    assert type(entry.health()) is Health


def test_state_find_normalises() -> None:
    s = Service(name="x", host="blog.com", target="blog:80", project="p")
    state = State(services={"blog.com": s})
    assert state.version == STATE_VERSION
    assert state.find("BLOG.com.:443") is s
    assert state.find("other.com") is None
    with pytest.raises(ValueError):
        state.find("a b")


def test_unknown_fields_are_ignored() -> None:
    raw = {"name": "x", "host": "a.com", "target": "b:1", "project": "p", "future": 1}
    assert not hasattr(Service.model_validate(raw), "future")


def test_hsts_defaults_on_and_older_entries_load() -> None:
    """A service written before the field existed (or by the Go proxy) keeps HSTS on."""
    raw = {"name": "x", "host": "a.com", "target": "b:1", "project": "p", "ssl": True}
    assert Service.model_validate(raw).hsts is True
    off = Service.model_validate({**raw, "hsts": False})
    assert off.hsts is False
    assert Service.model_validate_json(off.model_dump_json()).hsts is False
    assert off.routing_key() == Service.model_validate(raw).routing_key()  # no new check


@pytest.mark.parametrize(
    ("host", "ip"),
    [("10.0.0.1", "10.0.0.1"), ("::1", "::1"), ("[::1]", "::1"), (" 10.0.0.1 ", "10.0.0.1"),
     ("blog.test", None), ("10.0.0.1.test", None), ("[::1]:443", None), ("", None)],
)
def test_ip_literal(host: str, ip: str | None) -> None:
    """Certificates and ACME tell IP hosts apart with it, on normalize_host's output."""
    found = ip_literal(host)
    assert (str(found) if found is not None else None) == ip
    if ip is not None and host.strip().startswith("["):
        assert ip_literal(normalize_host(host)) == found


# ---------------------------------------------------------------------------- issue 16: routes


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Blog.COM.:443", "blog.com"),  # a plain host is normalize_host's
        ("bücher.example", "xn--bcher-kva.example"),
        ("[::1]", "::1"),
        ("*.example.com", "*.example.com"),
        ("*.Example.COM.", "*.example.com"),
        (" *.example.com ", "*.example.com"),
        ("*.a.b.example.com", "*.a.b.example.com"),
        ("*.bücher.de", "*.xn--bcher-kva.de"),
        ("*.BÜCHER.de", "*.xn--bcher-kva.de"),
    ],
)
def test_parse_host_pattern_ok(raw: str, expected: str) -> None:
    assert parse_host_pattern(raw) == expected


def test_parse_host_pattern_plain_hosts_agree_with_normalize_host() -> None:
    for raw in ("Blog.COM.:443", "BÜCHER.example.", "[2001:DB8::1]:80", "a-b.c-d.example"):
        assert parse_host_pattern(raw) == normalize_host(raw)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("*", "whole first label"),
        ("*.com", "expected *.example.com"),  # a whole top-level domain
        ("*.localhost", "expected *.example.com"),
        ("a.*.com", "whole first label"),
        ("*a.example.com", "whole first label"),
        ("**.a.com", "whole first label"),
        ("*.*.com", "invalid"),
        ("*.1.2.3.4", "expected *.example.com"),  # "every name under an IP address"
        ("*.[::1]", "expected *.example.com"),
        ("*.", "invalid"),
        ("*.a..com", "invalid"),
        ("*.a b.com", "invalid"),
        ("a b.com", "invalid hostname"),
        ("", "invalid hostname"),
    ],
)
def test_parse_host_pattern_rejects(raw: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_host_pattern(raw)
    assert why in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/api", "/api"),
        ("/api/", "/api"),
        (" /api ", "/api"),
        ("/", ""),
        ("//", ""),
        ("//a//b/", "/a/b"),
        ("/a/b/c", "/a/b/c"),
        ("/v1.2", "/v1.2"),
        ("/..a", "/..a"),  # only whole . and .. segments are dot segments
        ("/API", "/API"),  # paths are case-sensitive
    ],
)
def test_parse_path_prefix_ok(raw: str, expected: str) -> None:
    assert parse_path_prefix(raw) == expected


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("api", "must start with /"),
        ("", "must start with /"),
        ("/a b", "without spaces"),
        ("/a\tb", "without spaces"),
        ("/a\x01", "without spaces"),
        ("/caf\u00e9", "be ASCII"),
        ("/a?x", "?"),
        ("/a#x", "#"),
        ("/a%2F", "%"),
        ("/a\\b", "backslash"),
        ("/a/../b", "no . or .. segments"),
        ("/./a", "no . or .. segments"),
        ("/a/..", "no . or .. segments"),
        ("/a/.", "no . or .. segments"),
    ],
)
def test_parse_path_prefix_rejects(raw: str, why: str) -> None:
    with pytest.raises(ValueError, match="invalid path prefix") as info:
        parse_path_prefix(raw)
    assert why in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("30", 30.0),
        ("30s", 30.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (" 2M ", 120.0),
        ("0", 0.0),
        ("24h", 86400.0),
    ],
)
def test_parse_duration_ok(raw: str, seconds: float) -> None:
    assert parse_duration(raw) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("-1s", "must be 0 to 24h"),
        ("25h", "must be 0 to 24h"),
        ("86401", "must be 0 to 24h"),
        ("nan", "must be 0 to 24h"),
        ("inf", "must be 0 to 24h"),
        ("soon", "e.g. 30s"),
        ("", "e.g. 30s"),
        ("ms", "e.g. 30s"),
        ("1d", "e.g. 30s"),
        ("0x10", "e.g. 30s"),
    ],
)
def test_parse_duration_rejects(raw: str, why: str) -> None:
    with pytest.raises(ValueError, match="invalid duration") as info:
        parse_duration(raw)
    assert why in str(info.value)
    assert "\n" not in str(info.value)


def test_route_key() -> None:
    assert route_key("blog.com") == "blog.com"
    assert route_key("blog.com", "") == "blog.com"
    assert route_key("blog.com", "/api") == "blog.com/api"
    assert route_key("*.blog.com", "/api/v1") == "*.blog.com/api/v1"


def test_service_key_is_host_and_path_prefix() -> None:
    plain = Service(name="x", host="Blog.COM", target="blog:80", project="p")
    assert plain.key == "blog.com" == route_key(plain.host, plain.path_prefix)
    api = Service(name="x", host="Blog.COM", target="blog:80", project="p",
                  path_prefix="//api/v1/")
    assert api.path_prefix == "/api/v1"
    assert api.key == "blog.com/api/v1" == route_key(api.host, api.path_prefix)
    root = Service(name="x", host="blog.com", target="blog:80", project="p", path_prefix="/")
    assert root.path_prefix == "" and root.key == "blog.com"
    wild = Service(name="x", host="*.Blog.com", target="blog:80", project="p",
                   path_prefix="/api")
    assert wild.key == "*.blog.com/api"


def test_service_key_is_part_of_the_routing_key() -> None:
    """Moving a route to another path prefix needs a fresh health check of its row."""
    base = Service(name="x", host="a.com", target="blog:80", project="p")
    assert base.model_copy(update={"path_prefix": "/api"}).routing_key() != base.routing_key()


def test_service_route_defaults() -> None:
    s = Service(name="x", host="a.com", target="blog:80", project="p")
    assert s.path_prefix == ""
    assert s.strip_path_prefix is True
    assert s.canonical_host is None
    assert s.mode == "serving"
    assert s.stop_message is None
    assert s.max_pause == 30.0
    assert s.error_pages is None
    assert s.basic_auth == [] and s.allow == []
    assert s.compress is True
    other = Service(name="y", host="b.com", target="blog:80", project="p")
    assert other.basic_auth is not s.basic_auth and other.allow is not s.allow


def test_service_canonical_host_is_normalised() -> None:
    s = Service(name="x", host="a.com", target="blog:80", project="p",
                canonical_host="WWW.A.com.:443")
    assert s.canonical_host == "www.a.com"
    assert Service(name="x", host="a.com", target="blog:80", project="p",
                   canonical_host="").canonical_host is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("host", "*.com"),
        ("host", "a.*.com"),
        ("path_prefix", "api"),
        ("path_prefix", "/a b"),
        ("path_prefix", "/a/../b"),
        ("path_prefix", "/a?x"),
        ("mode", "maintenance"),
        ("mode", "Paused"),
        ("canonical_host", "*.a.com"),
        ("canonical_host", "a b"),
    ],
)
def test_service_rejects_invalid_route_fields(field: str, value: str) -> None:
    fields = {"name": "x", "host": "a.com", "target": "blog:80", "project": "p", field: value}
    with pytest.raises(ValidationError) as info:
        Service(**fields)
    assert info.value.errors()[0]["loc"] == (field,)


def test_service_route_fields_survive_a_round_trip() -> None:
    s = Service(name="x", host="*.a.com", target="blog:80", project="p", path_prefix="/api",
                strip_path_prefix=False, mode="paused", max_pause=2.5, compress=False)
    again = Service.model_validate_json(s.model_dump_json())
    assert again == s
    assert again.key == "*.a.com/api"
