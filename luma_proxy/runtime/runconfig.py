"""What ``luma-proxy run`` was asked for: shared by the server and the worker supervisor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunConfig:
    listen_host: str = "0.0.0.0"
    http_port: int = 80
    https_port: int = 0  # 0: no HTTPS listener
    http3: bool = False  # also HTTP/3 (QUIC over UDP) on https_port
    options: dict[str, Any] = field(default_factory=dict)
    worker_index: int | None = None  # set in the workers of `run --workers N` (workers.py)
