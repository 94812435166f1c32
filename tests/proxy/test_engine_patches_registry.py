"""engine_patches.skip_addon_registry: ``luma-proxy run`` never imports mitmproxy's ~36
built-in addons (flask, ldap3, ...), only the submodules its lean master uses."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from luma_proxy.proxy import engine_patches


def test_registry_is_left_alone_once_imported() -> None:
    modules: dict[str, types.ModuleType] = {"mitmproxy.addons": types.ModuleType("x")}
    assert not engine_patches.skip_addon_registry(modules)


@pytest.mark.spawns
def test_submodules_import_without_the_registry() -> None:
    code = (
        "import sys\n"
        "from luma_proxy.proxy import engine_patches\n"
        "assert engine_patches.skip_addon_registry()\n"
        "import mitmproxy.master\n"
        "from mitmproxy.addons import core, next_layer, proxyserver, tlsconfig\n"
        "import luma_proxy.proxy.server\n"
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


@pytest.mark.spawns
def test_serving_without_an_order_does_not_import_the_acme_libraries() -> None:
    """acme/josepy (~6 MiB) load only when a certificate is ordered (tls.Https.issuer)."""
    code = (
        "import sys\n"
        "from luma_proxy.proxy import engine_patches\n"
        "engine_patches.skip_addon_registry()\n"
        "import luma_proxy.proxy.server, luma_proxy.proxy.tls, luma_proxy.proxy.certificates\n"
        "print(sorted(m for m in ('acme', 'josepy', 'luma_proxy.acme.client')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
