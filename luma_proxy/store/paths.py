"""Where the registry and the certificates live.

Outside the image: ``$LUMA_PROXY_STATE`` or ``/var/lib/luma-proxy/state.json``,
certificates in ``certs/`` beside it (the Go proxy's layout).

In the Docker image (``LUMA_PROXY_IMAGE=1``) the answer depends on what is
mounted. The Luma CLI's ``docker run`` mounts only ``/var/lib/luma-proxy/certs``
(and ``/tmp``), so a registry kept in ``/var/lib/luma-proxy`` would be lost on
every ``luma proxy update`` (the Go proxy's own bug). There the registry lives
inside the certs mount, in ``certs/.luma-proxy/`` (no host name starts with a
dot, so it cannot collide with a host's directory), and the certificates stay
where the Go proxy put them. A volume on ``/var/lib/luma-proxy`` itself keeps
today's layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

# The ACME account key, in certs/ beside the hosts' directories (the Go layout).
# A host of that name would have its directory collide with it: refused.
ACCOUNT_KEY = "account.key"
RESERVED_HOSTS = frozenset({ACCOUNT_KEY})

DATA_DIR = Path("/var/lib/luma-proxy")
DEFAULT_STATE = str(DATA_DIR / "state.json")
REGISTRY_SUBDIR = ".luma-proxy"  # inside a certs directory


def default_state_path(environ: Mapping[str, str] | None = None,
                       ismount: Callable[[str], bool] = os.path.ismount) -> str:
    environ = os.environ if environ is None else environ
    explicit = environ.get("LUMA_PROXY_STATE")
    if explicit:
        return explicit
    certs = DATA_DIR / "certs"
    if environ.get("LUMA_PROXY_IMAGE") == "1" and not ismount(str(DATA_DIR)) \
            and ismount(str(certs)):
        return str(certs / REGISTRY_SUBDIR / "state.json")
    return DEFAULT_STATE


def certs_dir(state_path: str | os.PathLike[str]) -> Path:
    """``certs/`` beside the state file, or the certs directory that holds the registry."""
    parent = Path(state_path).parent
    if parent.name == REGISTRY_SUBDIR:
        return parent.parent
    return parent / "certs"


def legacy_state_path(state_path: str | os.PathLike[str]) -> Path | None:
    """A state file an earlier install may have left where the registry used to be.

    Only for a registry kept in a certs directory: the Go proxy (and this one
    before it knew about the Luma CLI's mounts) wrote ``<data dir>/state.json``.
    """
    parent = Path(state_path).parent
    if parent.name != REGISTRY_SUBDIR:
        return None
    return parent.parent.parent / "state.json"
