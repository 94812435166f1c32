"""Unit tests for luma_proxy.routing.router: Host header -> service, and admission."""

from __future__ import annotations

import pytest

from luma_proxy.models import Health, Service
from luma_proxy.routing import router
from luma_proxy.routing.router import (
    _MAX_CACHED_HOSTS,
    HostTable,
    Reject,
    admit,
    canonical_target,
    routing_path,
    strip_prefix,
)


def svc(host: str) -> Service:
    return Service(name=host, host=host, target="blog:3000", project="p")


@pytest.fixture
def table() -> HostTable:
    return HostTable({"blog.com": svc("blog.com"), "xn--bcher-kva.example": svc("bücher.example")})


@pytest.mark.parametrize("raw", [None, ""])
def test_missing_host_is_400(table: HostTable, raw: str | None) -> None:
    assert table.lookup(raw) == Reject(400, "missing Host header")


@pytest.mark.parametrize("raw", ["a b", "blog..com", "-blog.com", "blog.com:x", "[::1", "::1"])
def test_invalid_host_is_400(table: HostTable, raw: str) -> None:
    assert table.lookup(raw) == Reject(400, "invalid Host header")


@pytest.mark.parametrize("raw", ["other.com", "www.blog.com", "blog.co", "[::1]:80", "10.0.0.1"])
def test_unknown_host_is_404(table: HostTable, raw: str) -> None:
    assert table.lookup(raw) == Reject(404, "unknown host")


@pytest.mark.parametrize(
    "raw", ["blog.com", "BLOG.COM", "Blog.Com", "blog.com.", "blog.com:80", "blog.com:443",
            "BLOG.com.:8443"],
)
def test_variants_find_the_service(table: HostTable, raw: str) -> None:
    result = table.lookup(raw)
    assert isinstance(result, Service)
    assert result.host == "blog.com"


def test_idna_variants_find_the_service(table: HostTable) -> None:
    for raw in ("bücher.example", "BÜCHER.example.", "xn--bcher-kva.example:443"):
        result = table.lookup(raw)
        assert isinstance(result, Service) and result.host == "xn--bcher-kva.example"


def test_replace_swaps_services(table: HostTable) -> None:
    assert isinstance(table.lookup("blog.com"), Service)
    table.replace({"new.com": svc("new.com")})
    assert table.lookup("blog.com") == Reject(404, "unknown host")
    assert isinstance(table.lookup("new.com"), Service)


def test_empty_table() -> None:
    assert HostTable().lookup("blog.com") == Reject(404, "unknown host")


def counting_normalize(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every raw Host string the table normalises (the work its memo saves)."""
    calls: list[str] = []
    real = router.normalize_host
    monkeypatch.setattr(router, "normalize_host", lambda raw: calls.append(raw) or real(raw))
    return calls


def test_canonical_is_memoised(table: HostTable, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_normalize(monkeypatch)
    assert table.canonical("Blog.COM.:443") == "blog.com"
    assert table.canonical("a b") is None
    # A second lookup answers from the memo, invalid ones included.
    assert table.canonical("Blog.COM.:443") == "blog.com"
    assert table.canonical("a b") is None
    assert calls == ["Blog.COM.:443", "a b"]


def test_canonical_cache_is_bounded(table: HostTable, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_normalize(monkeypatch)
    table.canonical("first.example")
    for i in range(3 * _MAX_CACHED_HOSTS):
        raw = f"host{i}.example" if i % 2 else f"bad host {i}"
        assert table.lookup(raw).status in (400, 404)
    calls.clear()
    table.canonical("first.example")  # flushed long ago: normalised again
    assert calls == ["first.example"]
    # Still correct after the cache was flushed.
    assert isinstance(table.lookup("BLOG.com"), Service)
    assert table.lookup("a b") == Reject(400, "invalid Host header")


def test_admit() -> None:
    assert admit(None) is None
    assert admit(Health()) is None  # not checked yet: routed
    assert admit(Health(healthy=True)) is None
    assert admit(Health(healthy=False)) == Reject(503, "service unhealthy")
    # One dead container does not refuse the service.
    assert admit(Health(healthy=True, containers={"10.0.0.1": False, "10.0.0.2": True})) is None


def test_target_is_parsed_once_per_view() -> None:
    table = HostTable({"blog.com": svc("blog.com")})
    service = table.services["blog.com"]
    assert table.target(service) == (service.alias, service.port)
    assert table.target(service) is table.target(service)
    moved = service.model_copy(update={"target": "other:4000"})
    table.replace({"blog.com": moved})
    assert table.target(moved) == ("other", 4000)


@pytest.mark.parametrize("target", ["blog:3000", "Blog.Internal:80", "10.0.0.7:8080",
                                    "[fd00::7]:3000", "[::1]:1"])
def test_target_split_matches_the_model(target: str) -> None:
    service = Service(name="x", host="blog.com", target=target, project="p")
    assert HostTable({"blog.com": service}).target(service) == (service.alias, service.port)


def test_a_reload_keeps_targets_of_unchanged_services() -> None:
    table = HostTable({"blog.com": svc("blog.com"), "shop.com": svc("shop.com")})
    blog, shop = table.services["blog.com"], table.services["shop.com"]
    first = table.target(blog)
    table.replace({"blog.com": blog})  # shop.com removed, blog.com the same object
    assert table.target(blog) is first
    assert table.target(shop) == (shop.alias, shop.port)


def test_update_touches_only_what_changed_and_reports_unused_aliases() -> None:
    a, b = svc("a.com"), svc("b.com")  # both on blog:3000
    c = Service(name="c", host="c.com", target="shop:1", project="p")
    table = HostTable({"a.com": a, "b.com": b, "c.com": c})
    first = table.target(a)
    moved = c.model_copy(update={"target": "cart:1"})
    services = {"a.com": a, "b.com": b, "c.com": moved}
    assert table.update(services, {"c.com": moved}, []) == {"shop"}
    assert table.services is services  # taken as it is, not copied
    assert table.target(a) is first  # untouched
    assert table.target(moved) == ("cart", 1)
    # blog is still routed for b.com after a.com leaves; gone once b.com leaves too.
    assert table.update({"b.com": b, "c.com": moved}, {}, ["a.com"]) == set()
    assert table.update({"c.com": moved}, {}, ["b.com"]) == {"blog"}
    assert table.routed_aliases() == {"cart"}
    # An alias that leaves one service and arrives with another stays in use.
    back = moved.model_copy(update={"target": "blog:3000"})
    d = svc("d.com").model_copy(update={"target": "cart:2"})
    assert table.update({"c.com": back, "d.com": d}, {"c.com": back, "d.com": d}, []) == set()
    assert table.routed_aliases() == {"blog", "cart"}
    assert table.replace({}) == {"blog", "cart"}


# ---------------------------------------------------------------------------- issue 16


def route(host: str, prefix: str = "", target: str = "blog:3000", **fields: object) -> Service:
    """A route of ``host`` under ``prefix``; its target names it, to tell routes apart."""
    return Service(name=host, host=host, target=target, project="p", path_prefix=prefix,
                   **fields)


def table_of(*services: Service) -> HostTable:
    return HostTable({s.key: s for s in services})


def key_of(found: Service | Reject) -> str:
    """The route a lookup chose, or its refusal, as a comparable string."""
    return found.key if isinstance(found, Service) else f"{found.status} {found.reason}"


NOT_FOUND = "404 unknown host"


@pytest.fixture
def wild() -> HostTable:
    return table_of(route("*.example.com"), route("exact.example.com"))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("exact.example.com", "exact.example.com"),  # exact beats wildcard
        ("EXACT.example.com.:443", "exact.example.com"),
        ("a.example.com", "*.example.com"),
        ("A.Example.COM:8080", "*.example.com"),
        ("bücher.example.com", "*.example.com"),
        ("example.com", NOT_FOUND),  # not the parent
        ("a.b.example.com", NOT_FOUND),  # exactly one label
        ("aexample.com", NOT_FOUND),
        ("a.example.org", NOT_FOUND),
        ("*.example.com", "400 invalid Host header"),  # the pattern itself is no Host
    ],
)
def test_wildcard_lookup(wild: HostTable, raw: str, expected: str) -> None:
    assert key_of(wild.lookup(raw)) == expected


@pytest.fixture
def prefixed() -> HostTable:
    return table_of(route("a.com"), route("a.com", "/api"), route("a.com", "/api/v2"),
                    route("a.com", "/static"))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", "a.com"),
        ("/other", "a.com"),
        ("/api", "a.com/api"),
        ("/api/", "a.com/api"),
        ("/api/x", "a.com/api"),
        ("/api?q=1", "a.com/api"),
        ("/apix", "a.com"),  # /api is not a prefix of /apix
        ("/api/v2", "a.com/api/v2"),  # the longest prefix wins
        ("/api/v2/users?x=1", "a.com/api/v2"),
        ("/api/v2x", "a.com/api"),
        ("/api/v20", "a.com/api"),
        ("/API", "a.com"),  # paths are case-sensitive
        ("/static/app.css", "a.com/static"),
    ],
)
def test_longest_path_prefix_wins(prefixed: HostTable, path: str, expected: str) -> None:
    assert key_of(prefixed.lookup("a.com", path)) == expected


def test_longest_prefix_wins_in_any_insertion_order() -> None:
    routes = [route("a.com", "/api/v2"), route("a.com"), route("a.com", "/api")]
    for order in (routes, routes[::-1], [routes[1], routes[0], routes[2]]):
        table = table_of(*order)
        assert key_of(table.lookup("a.com", "/api/v2/x")) == "a.com/api/v2"
        assert key_of(table.lookup("a.com", "/api/x")) == "a.com/api"
        assert key_of(table.lookup("a.com", "/x")) == "a.com"


def test_host_with_only_prefixed_routes_is_404_elsewhere() -> None:
    table = table_of(route("a.com", "/api"))
    assert key_of(table.lookup("a.com", "/api/x")) == "a.com/api"
    for path in ("/", "/apix", "/other", "/ap"):
        assert key_of(table.lookup("a.com", path)) == NOT_FOUND, path


def test_exact_host_without_a_matching_prefix_falls_back_to_the_wildcard() -> None:
    """lookup tries the exact host's routes, then the wildcard's: a path none of the
    exact host's prefixes takes goes to the wildcard's routes."""
    table = table_of(route("a.example.com", "/api", target="exact:1"),
                     route("*.example.com", target="wild:1"),
                     route("*.example.com", "/admin", target="wildadmin:1"))
    assert key_of(table.lookup("a.example.com", "/api/x")) == "a.example.com/api"
    assert key_of(table.lookup("a.example.com", "/")) == "*.example.com"
    assert key_of(table.lookup("a.example.com", "/admin/x")) == "*.example.com/admin"
    assert key_of(table.lookup("b.example.com", "/api/x")) == "*.example.com"
    # With no wildcard route for the path either: 404.
    only_prefixed = table_of(route("a.example.com", "/api"),
                             route("*.example.com", "/admin"))
    assert key_of(only_prefixed.lookup("a.example.com", "/other")) == NOT_FOUND


def test_update_removed_route_stops_matching() -> None:
    root, api = route("a.com"), route("a.com", "/api")
    table = table_of(root, api)
    assert key_of(table.lookup("a.com", "/api/x")) == "a.com/api"
    table.update({"a.com": root}, {}, ["a.com/api"])
    assert key_of(table.lookup("a.com", "/api/x")) == "a.com"
    table.update({}, {}, ["a.com"])
    assert key_of(table.lookup("a.com", "/api/x")) == NOT_FOUND
    assert table.hosts == {}


def test_update_route_moved_from_one_prefix_to_another() -> None:
    a = route("a.com", "/a", target="app:1")
    table = table_of(a)
    b = route("a.com", "/b", target="app:1")
    table.update({b.key: b}, {b.key: b}, [a.key])
    assert key_of(table.lookup("a.com", "/a/x")) == NOT_FOUND
    assert key_of(table.lookup("a.com", "/b/x")) == "a.com/b"
    assert table.hosts == {"a.com": b}
    assert table.routed_aliases() == {"app"}


def test_update_replacing_a_route_in_place_leaves_no_stale_copy() -> None:
    old = route("a.com", "/api", target="old:1")
    table = table_of(route("a.com"), old)
    new = old.model_copy(update={"target": "new:1"})
    assert table.update({"a.com": table.services["a.com"], new.key: new}, {new.key: new},
                        []) == {"old"}
    found = table.lookup("a.com", "/api")
    assert found is new
    assert table.target(found) == ("new", 1)


def test_hosts_holds_the_shortest_prefix_route_per_host() -> None:
    root, api, v2 = route("a.com", target="root:1"), route("a.com", "/api"), \
        route("a.com", "/api/v2")
    wildcard_api = route("*.b.com", "/api")
    table = table_of(v2, api, wildcard_api)
    assert table.hosts == {"a.com": api, "*.b.com": wildcard_api}
    table.update({s.key: s for s in (v2, api, root, wildcard_api)}, {root.key: root}, [])
    assert table.hosts["a.com"] is root
    table.update({s.key: s for s in (v2, wildcard_api)}, {}, [root.key, api.key])
    assert table.hosts["a.com"] is v2


def test_hosts_is_replaced_not_modified() -> None:
    """HTTPS reads ``hosts`` from other threads: a change builds a new dict."""
    a, b = route("a.com"), route("b.com")
    table = table_of(a)
    first = table.hosts
    snapshot = dict(first)
    table.update({a.key: a, b.key: b}, {b.key: b}, [])
    assert table.hosts is not first
    assert first == snapshot
    assert set(table.hosts) == {"a.com", "b.com"}
    second = table.hosts
    table.update({b.key: b}, {}, [a.key])
    assert table.hosts is not second
    assert set(second) == {"a.com", "b.com"}
    assert set(table.hosts) == {"b.com"}


def test_route_of_host_exact_then_wildcard() -> None:
    exact = route("a.example.com", "/api")
    wildcard = route("*.example.com")
    table = table_of(exact, wildcard)
    assert table.route_of_host("a.example.com") is exact
    assert table.route_of_host("b.example.com") is wildcard
    assert table.route_of_host("example.com") is None
    assert table.route_of_host("x.b.example.com") is None
    assert table.route_of_host("other.com") is None
    assert table.route_of_host("localhost") is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/api", "/api"),
        ("/%61pi", "/api"),  # unreserved escapes decoded
        ("/%41%7A%30%2d%2E%5f%7e", "/Az0-._~"),
        ("/a%2Fb", "/a%2Fb"),  # a reserved one is kept
        ("/a%2fb", "/a%2fb"),
        ("/a%20b", "/a%20b"),
        ("/a%3Fb", "/a%3Fb"),
        ("/x/../api", "/api"),  # dot segments removed
        ("/a/./b", "/a/b"),
        ("/%2e%2e/api", "/api"),
        ("/x/%2E%2E/api", "/api"),
        ("/..", "/"),
        ("/../../api", "/api"),
        ("/a/b/..", "/a/"),
        ("/api/.", "/api/"),
        ("/a//b/../c", "/a//c"),
        ("/x/../a?q=/../&b=%61", "/a?q=/../&b=%61"),  # the query is untouched
        ("/a?%2e%2e", "/a?%2e%2e"),
    ],
)
def test_routing_path(raw: str, expected: str) -> None:
    assert routing_path(raw) == expected


def test_routing_path_chooses_what_the_plain_path_does(prefixed: HostTable) -> None:
    for raw in ("/%61pi/x", "/x/../api/x", "/api/./x", "/%2e/api/x"):
        assert key_of(prefixed.lookup("a.com", routing_path(raw))) == "a.com/api", raw
    assert key_of(prefixed.lookup("a.com", routing_path("/api/../static/x"))) == "a.com/static"


@pytest.mark.parametrize("raw", ["/caf%C3%A9", "/%AA", "/%C0", "/%B2"])
def test_routing_path_keeps_non_ascii_escapes(raw: str) -> None:
    """RFC 3986 2.3: only ASCII letters, digits and -._~ are unreserved."""
    assert routing_path(raw) == raw
    assert strip_prefix(routing_path("/api" + raw), "/api") == raw


@pytest.mark.parametrize(
    ("path", "prefix", "expected"),
    [
        ("/api/users?x", "/api", "/users?x"),
        ("/api/users/", "/api", "/users/"),
        ("/api", "/api", "/"),
        ("/api/", "/api", "/"),
        ("/api?x", "/api", "/?x"),
        ("/api?x=/y", "/api", "/?x=/y"),
        ("/api/v2/z", "/api/v2", "/z"),
        ("/", "", "/"),
        ("/x?y", "", "/x?y"),
    ],
)
def test_strip_prefix(path: str, prefix: str, expected: str) -> None:
    assert strip_prefix(path, prefix) == expected


@pytest.mark.parametrize(
    "raw", ["www.a.com", "WWW.A.COM", "www.a.com.", "www.a.com:8443", "Www.A.Com.:443"])
def test_canonical_target_none_when_asked_for_already(raw: str) -> None:
    service = route("www.a.com", canonical_host="www.a.com")
    assert canonical_target(service, raw) is None


@pytest.mark.parametrize("raw", ["a.com", "A.com:80", "b.com", "bücher.com"])
def test_canonical_target_other_names(raw: str) -> None:
    service = route("a.com", canonical_host="WWW.a.com")
    assert canonical_target(service, raw) == "www.a.com"


@pytest.mark.parametrize("raw", [None, "", "a b"])
def test_canonical_target_none_without_a_valid_host(raw: str | None) -> None:
    assert canonical_target(route("a.com", canonical_host="www.a.com"), raw) is None


def test_canonical_target_none_without_a_canonical_host() -> None:
    assert canonical_target(route("a.com"), "a.com") is None
    assert canonical_target(route("a.com"), "other.com") is None
