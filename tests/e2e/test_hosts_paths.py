"""Issue 16, routing: several hosts, wildcard hosts, path prefixes, the canonical host.

Each through a real ``luma-proxy run`` and a real container double; HTTP/2 where the
protocol decides what the proxy reads (``:authority``, ``:path``).
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import wait_until
from tests.e2e.docker_double import free_port
from tests.e2e.test_http2 import h2_connect, h2_exchange, req
from tests.e2e.test_https import cert_args


def seen(reply) -> dict:
    """What the container saw: its name, the request target, the headers (lower case)."""
    body = json.loads(reply.body)
    return {"container": body["container"], "path": body["path"],
            "headers": {k.lower(): v for k, v in body["headers"]}}


@pytest.fixture
def app(dns, containers):
    """Three services' containers: blog, api, docs (each answers with its name)."""
    port = free_port()
    made = {}
    for name in ("blog", "api", "docs"):
        made[name] = containers(f"{name}-1", port=port)
        dns.set_alias(name, [made[name].ip])
    return port


def test_several_hosts_one_service_each_routed_checked_once(app, cli, start_proxy, dns):
    out = cli("deploy", "--host", "a.test", "--host", "b.test,c.test", "--target",
              f"blog:{app}", "--project", "p", "--no-ssl").stdout
    assert [line.split()[2] for line in out.splitlines()] == ["a.test", "b.test", "c.test"]
    proxy = start_proxy("run")
    for host in ("a.test", "b.test", "c.test"):
        assert proxy.get(host).text == "blog-1"
    assert proxy.get("d.test").status == 404
    listed = json.loads(cli("list", "--json").stdout)["services"]
    assert sorted(s["host"] for s in listed) == ["a.test", "b.test", "c.test"]
    # remove --host takes one host away, the others stay
    assert cli("remove", "--host", "b.test").stdout.strip() == "✅ Removed b.test"
    assert wait_until(lambda: proxy.get("b.test").status == 404)
    assert proxy.get("a.test").text == "blog-1"
    # remove --service / --project take more
    cli("deploy", "--host", "other.test", "--target", f"docs:{app}", "--project", "q",
        "--no-ssl")
    assert cli("remove", "--service", "blog").stdout.split() == [
        "✅", "Removed", "a.test", "✅", "Removed", "c.test"]
    assert cli("remove", "--project", "q").stdout.strip() == "✅ Removed other.test"
    assert wait_until(lambda: proxy.get("other.test").status == 404)


def test_health_is_probed_once_per_target_for_many_hosts(dns, containers, cli, start_proxy):
    port = free_port()
    container = containers("multi-1", port=port)
    dns.set_alias("multi", [container.ip])
    hosts = ",".join(f"h{i}.test" for i in range(8))
    cli("deploy", "--host", hosts, "--target", f"multi:{port}", "--project", "p", "--no-ssl")
    proxy = start_proxy("run")
    wait_until(lambda: all(s["health"]["healthy"] for s in
                           json.loads(cli("list", "--json").stdout)["services"]))

    def probes() -> int:
        return container.requests - container.served

    before = probes()
    time.sleep(3)  # about three rounds at the tests' 1 s interval
    during = probes() - before
    # One check is 2 probes (the alias and its one container). Checked host by host,
    # the 8 hosts would cost 16 a round, 48 in three; checked once, about 6.
    assert 2 <= during <= 12, during
    assert proxy.get("h3.test").text == "multi-1"


def test_wildcard_host_one_label_and_exact_wins(app, cli, start_proxy):
    cli("deploy", "--host", "*.apps.test", "--target", f"blog:{app}", "--project", "p",
        "--no-ssl")
    cli("deploy", "--host", "special.apps.test", "--target", f"docs:{app}", "--project", "p",
        "--no-ssl")
    proxy = start_proxy("run")
    assert proxy.get("one.apps.test").text == "blog-1"
    assert proxy.get("TWO.Apps.Test.:80").text == "blog-1"
    assert proxy.get("special.apps.test").text == "docs-1"  # exact beats wildcard
    assert proxy.get("apps.test").status == 404  # the parent itself is not covered
    assert proxy.get("a.b.apps.test").status == 404  # exactly one more label


def test_wildcard_needs_a_custom_certificate_for_https(app, cli, tmp_path: Path, start_proxy):
    refused = cli("deploy", "--host", "*.apps.test", "--target", f"blog:{app}", "--project",
                  "p", check=False)
    assert refused.returncode != 0 and refused.stdout == ""
    assert refused.stderr.strip().splitlines()[-1].endswith(
        "ACME's HTTP-01 challenge cannot issue wildcard certificates")
    assert json.loads(cli("list", "--json").stdout)["services"] == []  # changed nothing
    tls = cert_args(tmp_path, ["*.apps.test"])
    cli("deploy", "--host", "*.apps.test", "--target", f"blog:{app}", "--project", "p", *tls)
    https_port = free_port()
    proxy = start_proxy("run", args=("--https-port", str(https_port)))
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", https_port), timeout=10),
                         server_hostname="x.apps.test") as s:
        der = s.getpeercert(binary_form=True)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x.apps.test\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    from cryptography import x509
    names = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == ["*.apps.test"]
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"blog-1")
    assert proxy.get("x.apps.test").status == 301  # plain HTTP goes to HTTPS


def test_path_prefixes_longest_wins_strip_and_forwarded_prefix(app, cli, start_proxy):
    cli("deploy", "--host", "site.test", "--target", f"blog:{app}", "--project", "p",
        "--no-ssl")
    cli("deploy", "--host", "site.test", "--path-prefix", "/api", "--target", f"api:{app}",
        "--project", "p", "--no-ssl")
    cli("deploy", "--host", "site.test", "--path-prefix", "/api/docs", "--target",
        f"docs:{app}", "--project", "p", "--no-ssl", "--no-strip-path-prefix")
    proxy = start_proxy("run")
    root = seen(proxy.get("site.test", "/headers"))
    assert root["container"] == "blog-1" and "x-forwarded-prefix" not in root["headers"]
    api = seen(proxy.get("site.test", "/api/headers?x=1"))
    assert (api["container"], api["path"]) == ("api-1", "/headers?x=1")
    assert api["headers"]["x-forwarded-prefix"] == "/api"
    assert proxy.get("site.test", "/api").text == "api-1"  # the prefix itself: "/"
    assert proxy.get("site.test", "/apix").text == "blog-1"  # not under /api
    docs = seen(proxy.get("site.test", "/api/docs/headers"))
    assert (docs["container"], docs["path"]) == ("docs-1", "/api/docs/headers")  # kept
    assert docs["headers"]["x-forwarded-prefix"] == "/api/docs"
    # Other spellings of the same path choose the same route.
    assert seen(proxy.get("site.test", "/%61pi/headers"))["container"] == "api-1"
    assert seen(proxy.get("site.test", "/x/../api/headers"))["container"] == "api-1"
    # A client's own X-Forwarded-Prefix never reaches a container as ours.
    spoofed = seen(proxy.get("site.test", "/api/headers",
                             headers={"X-Forwarded-Prefix": "/evil"}))
    assert spoofed["headers"]["x-forwarded-prefix"] == "/api"
    spoofed = seen(proxy.get("site.test", "/headers", headers={"X-Forwarded-Prefix": "/evil"}))
    assert "x-forwarded-prefix" not in spoofed["headers"]  # no prefix route: none at all
    listed = json.loads(cli("list", "--json").stdout)["services"]
    assert sorted(s["key"] for s in listed) == ["site.test", "site.test/api",
                                                "site.test/api/docs"]
    assert "prefix kept" in cli("list").stdout
    cli("remove", "--host", "site.test", "--path-prefix", "/api")
    assert wait_until(
        lambda: seen(proxy.get("site.test", "/api/headers"))["container"] == "blog-1")


def test_path_prefix_over_http2(app, cli, start_proxy, tmp_path: Path):
    tls = cert_args(tmp_path, ["site.test"])
    cli("deploy", "--host", "site.test", "--target", f"blog:{app}", "--project", "p", *tls)
    cli("deploy", "--host", "site.test", "--path-prefix", "/api", "--target", f"api:{app}",
        "--project", "p", *tls)
    https_port = free_port()
    start_proxy("run", args=("--https-port", str(https_port)))
    s, conn = h2_connect(https_port, "site.test")
    try:
        api = h2_exchange(s, conn, 1, req("/api/headers", "site.test"))
        root = h2_exchange(s, conn, 3, req("/headers", "site.test"))
    finally:
        s.close()
    assert api.status == 200 and json.loads(api.body)["container"] == "api-1"
    assert json.loads(api.body)["path"] == "/headers"
    assert json.loads(root.body)["container"] == "blog-1"


def test_canonical_host_one_redirect(app, cli, start_proxy, tmp_path: Path):
    bad = cli("deploy", "--host", "example.test", "--target", f"blog:{app}", "--project", "p",
              "--canonical-host", "elsewhere.test", "--no-ssl", check=False)
    assert bad.returncode != 0 and "must be one of the --host values" in bad.stderr
    cli("deploy", "--host", "example.test,www.example.test", "--target", f"blog:{app}",
        "--project", "p", "--canonical-host", "www.example.test", "--no-ssl")
    proxy = start_proxy("run")
    moved = proxy.get("example.test", "/a/b?c=1")
    assert moved.status == 301
    assert moved.headers["location"] == "http://www.example.test/a/b?c=1"
    with_port = proxy.get(f"example.test:{proxy.port}", "/")  # the port the client named
    assert with_port.headers["location"] == f"http://www.example.test:{proxy.port}/"
    assert proxy.get("www.example.test").text == "blog-1"
    # The ACME challenge path is answered by the proxy, never redirected.
    challenge = proxy.get("example.test", "/.well-known/acme-challenge/abc")
    assert challenge.status == 404
    assert "canonical www.example.test" in cli("list").stdout


def test_canonical_host_with_https_in_one_hop(app, cli, start_proxy, tmp_path: Path):
    tls = cert_args(tmp_path, ["example.test", "www.example.test"])
    cli("deploy", "--host", "example.test,www.example.test", "--target", f"blog:{app}",
        "--project", "p", "--canonical-host", "www.example.test", *tls)
    https_port = free_port()
    proxy = start_proxy("run", args=("--https-port", str(https_port)))
    first = wait_until(lambda: (r := proxy.get("example.test", "/x?y")).status == 301 and r)
    assert first.headers["location"] == f"https://www.example.test:{https_port}/x?y"
    # over HTTPS, the other host is sent to the canonical one
    s, conn = h2_connect(https_port, "example.test")
    try:
        # a browser names the port in :authority when it is not 443
        answer = h2_exchange(s, conn, 1, req("/x", f"example.test:{https_port}"))
    finally:
        s.close()
    assert answer.status == 301
    assert answer.headers[b"location"] == f"https://www.example.test:{https_port}/x".encode()


def test_bad_input_changes_nothing(app, cli):
    for args in (["--host", "*"], ["--host", "a.*.test"], ["--host", "*.test"],
                 ["--host", "a.test", "--path-prefix", "api"],
                 ["--host", "a.test", "--path-prefix", "/a/../b"],
                 ["--host", "a.test", "--allow", "10.0.0.0/33"],
                 ["--host", "a.test", "--basic-auth", "admin:plaintext"],
                 ["--host", "a.test", "--error-pages", "/nonexistent/dir"]):
        result = cli("deploy", *args, "--target", f"blog:{app}", "--project", "p",
                     "--no-ssl", check=False)
        assert result.returncode != 0, args
        assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, args
    assert json.loads(cli("list", "--json").stdout)["services"] == []
    for args in (["remove"], ["remove", "--path-prefix", "/x"], ["stop", "--host", "no.test"],
                 ["pause", "--host", "no.test"], ["pause", "--host", "a.test",
                                                  "--max-pause", "soon"]):
        result = cli(*args, check=False)
        assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, args
