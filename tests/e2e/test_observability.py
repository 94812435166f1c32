"""Access log, X-Request-ID and metrics, end to end through a real proxy process."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from luma_proxy.models import Service, State
from luma_proxy.store.registry import Store
from tests.e2e.conftest import Proxy, wait_until
from tests.e2e.docker_double import free_port, wait_for_port


def deploy(dns, containers, state_path: Path, host: str, alias: str, names: list[str]):
    """As `luma-proxy deploy --no-ssl` would (tested elsewhere), without a CLI process."""
    port = free_port()
    cs = [containers(n, port=port) for n in names]
    dns.set_alias(alias, [c.ip for c in cs])

    def add(state: State) -> None:
        state.services[host] = Service(name=alias, host=host, target=f"{alias}:{port}",
                                       project="p", ssl=False)

    Store(state_path).update(add)
    return cs


def log_lines(proxy: Proxy) -> list[dict]:
    """Every line the proxy wrote; with --log-format json each one must be JSON."""
    return [json.loads(line) for line in proxy.logs().splitlines() if line.strip()]


def access_lines(proxy: Proxy, **match: object) -> list[dict]:
    return [e for e in log_lines(proxy) if e.get("msg") == "request"
            and all(e.get(k) == v for k, v in match.items())]


def seen_request_id(body: bytes) -> list[str]:
    """The X-Request-ID values the container received (its /headers echo)."""
    return [v for k, v in json.loads(body)["headers"] if k.lower() == "x-request-id"]


def test_json_access_log_and_request_ids(dns, containers, state_path, start_proxy) -> None:
    (c,) = deploy(dns, containers, state_path, "blog.test", "blog", ["blog-1"])
    proxy = start_proxy("run", args=("--log-format", "json"),
                        env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    reply = proxy.get("blog.test", "/headers?token=s3cr3t", headers={"User-Agent": "e2e/1"})
    assert reply.status == 200
    request_id = reply.headers["x-request-id"]
    assert seen_request_id(reply.body) == [request_id]

    (line,) = wait_until(lambda: access_lines(proxy, request_id=request_id), timeout=5)
    assert line["host"] == "blog.test" and line["method"] == "GET"
    assert line["path"] == "/headers" and line["status"] == 200
    assert line["container_ip"] == c.ip and line["service"] == "blog.test"
    assert line["project"] == "p" and line["client"] == "127.0.0.1"
    assert line["user_agent"] == "e2e/1" and line["bytes_out"] == len(reply.body)
    assert line["time"].endswith("Z") and line["duration_ms"] >= 0

    streamed = proxy.get("blog.test", "/sse?n=3&interval=0.01")  # streamed, counted on the way
    (line,) = wait_until(
        lambda: access_lines(proxy, request_id=streamed.headers["x-request-id"]), timeout=5)
    assert line["bytes_out"] == len(streamed.body) > 0

    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.request("POST", "/upload", body=iter([b"abc", b"de"]), encode_chunked=True,
                 headers={"Host": "blog.test", "Transfer-Encoding": "chunked"})
    upload = conn.getresponse()
    assert json.loads(upload.read())["received"] == 5
    conn.close()
    (line,) = wait_until(
        lambda: access_lines(proxy, request_id=upload.headers["x-request-id"]), timeout=5)
    assert (line["method"], line["bytes_in"]) == ("POST", 5)

    missing = proxy.get("other.test", "/x?key=k3y")
    assert missing.status == 404
    (line,) = wait_until(
        lambda: access_lines(proxy, request_id=missing.headers["x-request-id"]), timeout=5)
    assert (line["status"], line["host"], line["path"]) == (404, "other.test", "/x")
    assert line["container_ip"] == "" and line["service"] == ""

    assert "s3cr3t" not in proxy.logs() and "k3y" not in proxy.logs()
    assert len(access_lines(proxy)) == 4
    # The proxy's other log records are one-line JSON on stdout too.
    assert any(e.get("logger") == "luma_proxy" and e.get("level") == "info"
               for e in log_lines(proxy))

    check_request_ids(proxy)
    wait_until(lambda: len(access_lines(proxy)) == 4 + 6, timeout=5)
    assert len(access_lines(proxy, request_id="client-req_1.2:3@x/y+z==")) == 3


def test_upstream_failure_is_logged_and_counted(dns, containers, state_path, start_proxy) -> None:
    (c,) = deploy(dns, containers, state_path, "blog.test", "blog", ["blog-1"])
    metrics_port = free_port()
    proxy = start_proxy("run", args=("--log-format", "json", "--metrics-port", str(metrics_port)),
                        env={"LUMA_PROXY_HEALTH_INTERVAL": "600"})
    assert proxy.get("blog.test").status == 200
    wait_for_port("127.0.0.1", metrics_port, timeout=10)
    c.kill()
    reply = proxy.get("blog.test")
    assert reply.status == 502
    (line,) = wait_until(lambda: access_lines(proxy, status=502), timeout=5)
    assert line["container_ip"] == c.ip and line["service"] == "blog.test" and line["error"]
    values = scrape(metrics_port)
    assert values[("luma_upstream_connect_errors_total", (("service", "blog.test"),))] == 1
    assert values[("luma_http_requests_total",
                   (("service", "blog.test"), ("status_class", "5xx")))] == 1


def check_request_ids(proxy: Proxy) -> None:
    """Sane client ids are kept, others replaced; the container and the client see the same."""
    sane = "client-req_1.2:3@x/y+z=="
    reply = proxy.get("blog.test", "/headers", headers={"X-Request-ID": sane})
    assert reply.headers["x-request-id"] == sane
    assert seen_request_id(reply.body) == [sane]

    for insane in ("a" * 500, "has spaces in it", "<script>"):
        reply = proxy.get("blog.test", "/headers", headers={"X-Request-ID": insane})
        returned = reply.headers["x-request-id"]
        assert returned != insane and len(returned) == 32
        assert seen_request_id(reply.body) == [returned]

    assert proxy.get("other.test", headers={"X-Request-ID": sane}).headers["x-request-id"] == sane
    streamed = proxy.get("blog.test", "/sse?n=2&interval=0.01", headers={"X-Request-ID": sane})
    assert streamed.body.count(b"data:") == 2 and streamed.headers["x-request-id"] == sane


def test_request_id_under_mitmdump(dns, containers, state_path, start_proxy) -> None:
    deploy(dns, containers, state_path, "blog.test", "blog", ["blog-1"])
    check_request_ids(start_proxy("mitmdump", env={"LUMA_PROXY_HEALTH_INTERVAL": "600"}))


def scrape(port: int, host: str = "127.0.0.1") -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_on_loopback_with_counters_and_health(dns, containers, state_path,
                                                      start_proxy) -> None:
    a, b = deploy(dns, containers, state_path, "blog.test", "blog", ["blog-1", "blog-2"])
    metrics_port = free_port()
    proxy = start_proxy("run", args=("--metrics-port", str(metrics_port)))  # health every 1 s
    wait_for_port("127.0.0.1", metrics_port, timeout=10)  # comes up just after the proxy port
    with pytest.raises(OSError):  # not on 0.0.0.0: another local address is refused
        socket.create_connection(("127.0.0.2", metrics_port), timeout=2).close()

    ok = ("luma_http_requests_total", (("service", "blog.test"), ("status_class", "2xx")))
    unknown = ("luma_http_requests_total", (("service", ""), ("status_class", "4xx")))
    before = scrape(metrics_port)
    for _ in range(3):
        assert proxy.get("blog.test").status == 200
    assert proxy.get("other.test").status == 404
    after = scrape(metrics_port)
    assert after[ok] - before.get(ok, 0) == 3
    assert after[unknown] - before.get(unknown, 0) == 1
    assert after[("luma_http_requests_in_flight", ())] == 0
    assert after[("luma_http_request_duration_seconds_count", (("service", "blog.test"),))] >= 3

    healthy = ("luma_service_healthy", (("service", "blog.test"),))

    def container(c) -> tuple:
        return ("luma_container_healthy", (("ip", c.ip), ("service", "blog.test")))

    wait_until(lambda: (v := scrape(metrics_port)).get(healthy) == 1
               and v.get(container(a)) == 1 and v.get(container(b)) == 1, timeout=10)
    b.healthy = False
    wait_until(lambda: (v := scrape(metrics_port)).get(container(b)) == 0
               and v.get(container(a)) == 1, timeout=10)
