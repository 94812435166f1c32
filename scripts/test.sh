#!/usr/bin/env bash
# Set everything up, then run the whole test suite and the linter.
# Extra arguments go to pytest (e.g. scripts/test.sh -k routing).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
