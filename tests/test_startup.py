"""luma-proxy run's start: restart under -O, and mitmproxy's addon registry left unimported."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from luma_proxy import startup


def test_only_run_restarts_and_only_once() -> None:
    assert startup.wants_optimized_restart(["run", "--http-port", "80"], {}, 0)
    assert not startup.wants_optimized_restart(["run"], {}, 1)  # already optimized
    assert not startup.wants_optimized_restart(["deploy", "--host", "a"], {}, 0)
    assert not startup.wants_optimized_restart([], {}, 0)
    assert not startup.wants_optimized_restart(["run"], {"LUMA_PROXY_OPTIMIZE": "0"}, 0)


def test_registry_is_left_alone_once_imported() -> None:
    modules: dict[str, types.ModuleType] = {"mitmproxy.addons": types.ModuleType("x")}
    assert not startup.skip_builtin_addon_registry(modules)


@pytest.mark.spawns
def test_submodules_import_without_the_registry() -> None:
    code = (
        "import sys\n"
        "from luma_proxy import startup\n"
        "assert startup.skip_builtin_addon_registry()\n"
        "import mitmproxy.master\n"
        "from mitmproxy.addons import core, next_layer, proxyserver, tlsconfig\n"
        "import luma_proxy.server\n"
        "print(sorted(m for m in ('flask', 'ldap3', 'mitmproxy.addons.onboarding')"
        " if m in sys.modules))\n"
        "print(hasattr(sys.modules['mitmproxy.addons'], 'default_addons'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "False"]


@pytest.mark.spawns
def test_without_the_skip_mitmproxy_imports_everything() -> None:
    """The control for the test above: the registry is what pulls flask in."""
    code = "import sys, mitmproxy.master; print('flask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_uvloop_by_default_and_asyncio_on_request() -> None:
    import uvloop

    assert startup.loop_factory({}) is uvloop.new_event_loop
    assert startup.loop_factory({"LUMA_PROXY_EVENT_LOOP": ""}) is uvloop.new_event_loop
    assert startup.loop_factory({"LUMA_PROXY_EVENT_LOOP": "asyncio"}) is None
    with pytest.raises(ValueError, match="LUMA_PROXY_EVENT_LOOP must be one of uvloop, asyncio"):
        startup.loop_factory({"LUMA_PROXY_EVENT_LOOP": "trio"})


@pytest.mark.spawns
def test_serving_without_an_order_does_not_import_the_acme_libraries() -> None:
    """acme/josepy (~6 MiB) load only when a certificate is ordered (tls.Https.issuer)."""
    code = (
        "import sys\n"
        "from luma_proxy import startup\n"
        "startup.skip_builtin_addon_registry()\n"
        "import luma_proxy.server, luma_proxy.tls, luma_proxy.certificates\n"
        "print(sorted(m for m in ('acme', 'josepy', 'luma_proxy.acme_client')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
