#!/usr/bin/env bash
# Set everything up and start the proxy on http://127.0.0.1:8080 in front of a
# demo "container" reachable through the alias `demo` (Docker's DNS is played by
# a small local DNS server, as in the tests). Then, in another shell:
#   curl -H 'Host: demo.localhost' http://127.0.0.1:8080/
# Ctrl-C stops everything. PORT=9090 scripts/demo.sh picks another port.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python scripts/demo.py --port "${PORT:-8080}"
