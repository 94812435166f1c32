"""``luma-proxy export`` and ``import`` through the CLI, against a running proxy.

The registry is a database; JSON is for people: an export is a complete,
importable copy (routes, settings, the health in force), an import of it puts
a removed host back in front of the running proxy at once, and an import that
cannot be read changes nothing and says why in one line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from luma_proxy.store.registry import Store
from tests.e2e.conftest import wait_until
from tests.e2e.docker_double import free_port


def deploy(dns, containers, cli, host: str, alias: str) -> None:
    port = free_port()
    c = containers(f"{alias}-1", port=port)
    dns.set_alias(alias, [c.ip])
    cli("deploy", "--host", host, "--target", f"{alias}:{port}", "--project", "p", "--no-ssl")


def registry(cli) -> dict:
    """``export``'s document, but for when health was last checked (each round moves it)."""
    data = json.loads(cli("export").stdout)
    for entry in data["health"].values():
        entry.pop("checked_at")
    return data


def hosts(cli) -> list[str]:
    return sorted(s["host"] for s in json.loads(cli("list", "--json").stdout)["services"])


def test_export_then_import_serves_a_removed_host_again(
        dns, containers, cli, start_proxy, state_path, tmp_path: Path) -> None:
    deploy(dns, containers, cli, "blog.test", "blog")
    deploy(dns, containers, cli, "shop.test", "shop")
    proxy = start_proxy("run")  # health every 1 s
    wait_until(lambda: proxy.get("blog.test").text == "blog-1")
    wait_until(lambda: Store(state_path).read_health().get("blog.test"))  # observed, exported

    exported = tmp_path / "export.json"
    assert "Exported" in cli("export", "-o", str(exported)).stdout
    data = json.loads(exported.read_bytes())
    assert sorted(data["services"]) == ["blog.test", "shop.test"]
    assert data["services"]["blog.test"]["target"].startswith("blog:")
    assert data["health"]["blog.test"]["healthy"] is True
    assert json.loads(cli("export").stdout)["services"] == data["services"]  # stdout too

    cli("remove", "--host", "blog.test")
    assert proxy.get("blog.test").status == 404  # remove returns once the proxy serves it
    assert hosts(cli) == ["shop.test"]

    result = cli("import", str(exported))
    imported = time.monotonic()
    assert "Imported 2 host(s)" in result.stdout
    wait_until(lambda: proxy.get("blog.test").text == "blog-1", timeout=1)
    assert time.monotonic() - imported < 1.0
    assert proxy.get("shop.test").text == "shop-1"
    assert hosts(cli) == ["blog.test", "shop.test"]

    # --replace also removes what the file does not have.
    only_shop = tmp_path / "shop.json"
    only_shop.write_text(json.dumps({**data, "services": {"shop.test": data["services"]
                                                          ["shop.test"]}, "health": {}}))
    cli("import", "--replace", str(only_shop))
    assert proxy.get("blog.test").status == 404
    assert hosts(cli) == ["shop.test"]
    assert "Traceback" not in proxy.logs()


def test_import_of_invalid_json_changes_nothing(
        dns, containers, cli, start_proxy, state_path, tmp_path: Path) -> None:
    deploy(dns, containers, cli, "blog.test", "blog")
    proxy = start_proxy("run")
    wait_until(lambda: proxy.get("blog.test").text == "blog-1")
    wait_until(lambda: Store(state_path).read_health().get("blog.test"))
    before = registry(cli)
    assert before["services"]["blog.test"] and before["health"]["blog.test"]
    generation = Store(state_path).generation()

    broken = tmp_path / "broken.json"
    broken.write_text('{"version": 1, "services": {"blog.test": ')  # cut short
    for path, why in ((broken, "not valid JSON"), (tmp_path / "missing.json", "cannot read")):
        result = cli("import", "--replace", str(path), check=False)
        assert result.returncode == 1, result
        assert why in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.stderr and result.stdout == ""
        assert registry(cli) == before
        assert Store(state_path).generation() == generation
    assert proxy.get("blog.test").text == "blog-1"
