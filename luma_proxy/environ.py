"""Option defaults from ``LUMA_PROXY_*`` environment variables.

Every addon option can be set from the environment, so that the same settings
work under ``luma-proxy run``, ``mitmdump -s`` and inside the Docker image.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("luma_proxy")

# Set for each worker of ``run --workers N``: its metrics go to that directory.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def env_float(name: str, default: float) -> float:
    """The variable as a number; a malformed value is ignored (and said so), not fatal."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        logger.warning("ignoring %s=%r: not a number", name, raw)
        return default


def env_int(name: str, default: int) -> int:
    """The variable as a whole number; a malformed value is ignored (and said so), not fatal."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        logger.warning("ignoring %s=%r: not a whole number", name, raw)
        return default


def env_bool(name: str, default: bool) -> bool:
    """The variable as yes or no (1/0, true/false, yes/no, on/off); a malformed value is
    ignored (and said so), not fatal."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    logger.warning("ignoring %s=%r: not true or false", name, raw)
    return default


# Seconds a stopping proxy lets in-flight requests finish: drain.py's option default,
# and what the supervisor adds its grace to (one definition for both).
DRAIN_TIMEOUT = 30.0


def drain_timeout() -> float:
    return env_float("LUMA_PROXY_DRAIN_TIMEOUT", DRAIN_TIMEOUT)
