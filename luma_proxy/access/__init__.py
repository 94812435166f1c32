"""Per-service access control (Basic auth, IP allow-lists): pure, no mitmproxy import."""
