"""Unit tests for luma_proxy.routing.router: Host header -> service, and admission."""

from __future__ import annotations

import pytest

from luma_proxy.models import Health, Service
from luma_proxy.routing import router
from luma_proxy.routing.router import _MAX_CACHED_HOSTS, HostTable, Reject, admit


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
