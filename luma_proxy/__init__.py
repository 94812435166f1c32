"""luma-proxy: a zero-downtime reverse proxy for Docker network aliases, on mitmproxy."""

__version__ = "0.1.0"
