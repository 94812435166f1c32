#!/usr/bin/env bash
# Install everything luma-proxy's development needs on a fresh Debian machine:
# Debian packages (pebble for ACME tests, wrk/nginx for benchmarks), a Python
# >= 3.12 virtualenv in .venv with the project and its test tools.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pkg in pebble wrk nginx curl nghttp2-client; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${need_apt[*]}" >&2
    apt-get update -qq
    # Install only: no package may start a service (nginx would take port 80).
    policy=/usr/sbin/policy-rc.d
    made_policy=
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
      trap 'rm -f "$policy"' EXIT
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    [ -z "$made_policy" ] || { rm -f "$policy"; trap - EXIT; }
  else
    echo "setup: please install Debian packages: ${need_apt[*]} (needs root)" >&2
  fi
fi

find_python() {
  local candidates=()
  command -v pyenv >/dev/null 2>&1 && candidates+=("$(pyenv which python 2>/dev/null || true)")
  for v in 3.13 3.12; do
    candidates+=("$(command -v "python$v" 2>/dev/null || true)")
    for d in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v"*/bin/python; do candidates+=("$d"); done
  done
  candidates+=("$(command -v python3 2>/dev/null || true)")
  for py in "${candidates[@]}"; do
    [ -n "$py" ] && [ -x "$py" ] || continue
    if "$py" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
  py=$(find_python) || { echo "setup: Python >= 3.12 not found (try: pyenv install 3.12)" >&2; exit 1; }
  echo "setup: creating .venv with $py" >&2
  rm -rf .venv
  "$py" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test]'
  # `luma-proxy run` restarts itself under PYTHONOPTIMIZE=1 (luma_proxy/startup.py):
  # pip compiled only the plain .pyc files, so add the -O ones once here rather
  # than at every start (PYTHONDONTWRITEBYTECODE may forbid writing them later).
  .venv/bin/python -m compileall -q -j 0 -o 1 .venv/lib >/dev/null || true
  touch "$stamp"
fi
