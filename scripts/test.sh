#!/usr/bin/env bash
# Set everything up, then run the whole test suite and the linter.
#   scripts/test.sh            everything (CI runs this)
#   scripts/test.sh --fast     the fast tier: no subprocess, no engine (under a minute)
# Extra arguments go to pytest (e.g. scripts/test.sh -k routing).
set -euo pipefail
cd "$(dirname "$0")/.."
fast=
if [ "${1:-}" = "--fast" ]; then fast=1; shift; fi
scripts/setup.sh
.venv/bin/ruff check .
if [ -n "$fast" ]; then
  LUMA_TEST_FAST=1 exec .venv/bin/python -m pytest -q -m "not spawns" "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
