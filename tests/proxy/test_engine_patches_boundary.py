"""Every touch of mitmproxy internals is in proxy/engine_patches.py: no other module imports
one; and only the ``proxy`` subpackage imports mitmproxy at all.

"Internal" is anything beyond the public addon API: the proxy engine
(``mitmproxy.proxy``, its layers, commands, events, server and mode servers),
``mitmproxy.net`` and ``mitmproxy.utils``. The addon API (``from mitmproxy import
ctx, http, connection, ...``), the hook data classes (``mitmproxy.proxy.server_hooks``)
and the built-in addons (``mitmproxy.addons``) may be imported anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import luma_proxy

PACKAGE = Path(luma_proxy.__file__).parent
BOUNDARY = PACKAGE / "proxy" / "engine_patches.py"
INTERNAL_PACKAGES = ("mitmproxy.proxy", "mitmproxy.net", "mitmproxy.utils")
PUBLIC_IN_PROXY = ("mitmproxy.proxy.server_hooks", "mitmproxy.proxy.mode_specs")


def is_internal(name: str) -> bool:
    def within(prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    return any(within(p) for p in INTERNAL_PACKAGES) and not any(
        within(p) for p in PUBLIC_IN_PROXY)


def imported_names(source: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every absolute import, at any depth (lazy imports too).

    ``from a.b import c`` counts as ``a.b.c``: ``c`` may be a module or a name in ``a.b``.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def internal_imports(path: Path) -> list[str]:
    return [f"{path.relative_to(PACKAGE)}:{line}: {name}"
            for line, name in imported_names(path.read_text(encoding="utf-8"))
            if is_internal(name)]


@pytest.mark.parametrize("name, internal", [
    ("mitmproxy.proxy.layers.http._http1.Http1Server", True),
    ("mitmproxy.proxy.commands", True),
    ("mitmproxy.proxy.events", True),
    ("mitmproxy.proxy.mode_servers", True),
    ("mitmproxy.proxy.server", True),
    ("mitmproxy.proxy", True),  # from mitmproxy import proxy
    ("mitmproxy.net.http.http1", True),
    ("mitmproxy.utils.human", True),
    ("mitmproxy.proxy.server_hooks", False),
    ("mitmproxy.proxy.server_hooks.ServerConnectionHookData", False),
    ("mitmproxy.http", False),
    ("mitmproxy.addons.proxyserver", False),
    ("mitmproxy.connection", False),
    ("mitmproxy.networking", False),  # not mitmproxy.net
])
def test_what_counts_as_internal(name: str, internal: bool) -> None:
    assert is_internal(name) is internal


def test_imports_are_found_at_any_depth() -> None:
    source = ("from mitmproxy import ctx\n"
              "from mitmproxy.proxy import commands, server_hooks\n"
              "def f():\n"
              "    from mitmproxy.net.http import http1\n"
              "    import mitmproxy.utils.human as human\n"
              "from . import engine_patches\n")
    assert [n for _, n in imported_names(source) if is_internal(n)] == [
        "mitmproxy.proxy.commands", "mitmproxy.net.http.http1", "mitmproxy.utils.human"]


def test_engine_patches_is_where_they_are() -> None:
    """The check sees engine_patches' own imports (it is not vacuous)."""
    assert internal_imports(BOUNDARY)


def test_no_other_module_imports_mitmproxy_internals() -> None:
    modules = sorted(p for p in PACKAGE.rglob("*.py") if p != BOUNDARY)
    assert len(modules) > 10
    offenders = [hit for path in modules for hit in internal_imports(path)]
    assert offenders == [], ("mitmproxy internals outside engine_patches.py (move the "
                             "touch there, with a docstring saying why):\n" + "\n".join(offenders))


def test_only_the_proxy_subpackage_imports_mitmproxy() -> None:
    """The rest (routing, health, store, acme, docker, runtime, cli) reads and tests
    without mitmproxy; ``run`` reaches it through ``luma_proxy.proxy`` alone."""
    outside = sorted(p for p in PACKAGE.rglob("*.py") if "proxy" not in p.relative_to(
        PACKAGE).parts[:1])
    assert len(outside) > 10
    offenders = [f"{path.relative_to(PACKAGE)}:{line}: {name}" for path in outside
                 for line, name in imported_names(path.read_text(encoding="utf-8"))
                 if name == "mitmproxy" or name.startswith("mitmproxy.")]
    assert offenders == [], "mitmproxy imported outside luma_proxy/proxy:\n" + "\n".join(
        offenders)
