#!/bin/sh
# Install luma-proxy into a self-contained virtualenv.
#
# Usage: docker/install.sh [VENV] [SOURCE_DIR]
#   VENV        target virtualenv, created here; must not exist or be empty
#               (default /opt/luma-proxy)
#   SOURCE_DIR  the project checkout holding pyproject.toml
#               (default: the directory above this script)
#
# The Dockerfile's build stage runs this; tests/test_image.py runs it into a
# throw-away venv. It uses the `python3` found on PATH (set PYTHON to use
# another interpreter), which must be Python >= 3.12.
#
# Only wheels are accepted for the dependencies (--only-binary=:all:), so no
# compiler or -dev package is ever needed: a dependency without a wheel for
# this platform fails the install loudly instead of silently building. The
# project itself is pure Python and is built by pip's isolated build (a
# setuptools wheel from the index). Network: the package index, at install
# time only. Nothing here is needed at run time.
set -eu

VENV=${1:-/opt/luma-proxy}
SCRIPT_DIR=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
SRC=${2:-$SCRIPT_DIR/..}
PYTHON=${PYTHON:-python3}

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null 2>&1 \
    || die "$PYTHON not found on PATH; luma-proxy needs Python >= 3.12"

# One call prints the version and exits non-zero when it is too old.
if ! version=$("$PYTHON" -c 'import sys
print("%d.%d.%d" % sys.version_info[:3])
sys.exit(sys.version_info < (3, 12))' 2>&1); then
    die "$(command -v "$PYTHON") is Python ${version:-(unknown)}; luma-proxy needs Python >= 3.12"
fi

[ -f "$SRC/pyproject.toml" ] || die "no pyproject.toml in $SRC (pass the source dir as 2nd argument)"
SRC=$(CDPATH='' cd -- "$SRC" && pwd)

if [ -e "$VENV" ] && [ -n "$(ls -A -- "$VENV" 2>/dev/null)" ]; then
    die "$VENV already exists and is not empty; remove it first"
fi

# pip builds a local directory in place (build/, *.egg-info): build from a
# private copy of just what the package needs so the checkout stays untouched
# (it may be read-only, or someone's work tree).
BUILD=$(mktemp -d "${TMPDIR:-/tmp}/luma-proxy-build.XXXXXX")
trap 'rm -rf "$BUILD"' EXIT
trap 'exit 130' INT TERM
for f in pyproject.toml setup.cfg setup.py MANIFEST.in README.md README.rst LICENSE; do
    if [ -f "$SRC/$f" ]; then cp "$SRC/$f" "$BUILD/"; fi
done
cp -R "$SRC/luma_proxy" "$BUILD/luma_proxy"
find "$BUILD" -name __pycache__ -type d -prune -exec rm -rf {} +

say "python: $(command -v "$PYTHON") ($version)"
say "creating venv $VENV"
"$PYTHON" -m venv "$VENV"

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore
say "installing luma-proxy from $SRC"
"$VENV/bin/python" -m pip install --no-cache-dir --no-compile --only-binary=:all: "$BUILD"

# A runtime venv installs nothing: drop the installer (pip skips, with a
# warning, whichever of these is not there).
"$VENV/bin/python" -m pip uninstall --yes --quiet pip setuptools wheel

# Compile once, in unchecked-hash mode: the .pyc files stay valid whatever
# the sources' mtimes become (COPY --from, a read-only root), and Python never
# tries to rewrite them (the image also sets PYTHONDONTWRITEBYTECODE=1).
say "compiling bytecode"
# Both optimization levels: the CLI runs plain, and `luma-proxy run` restarts
# itself under PYTHONOPTIMIZE=1 (luma_proxy/startup.py).
"$VENV/bin/python" -m compileall -q -j 0 -o 0 -o 1 --invalidation-mode unchecked-hash \
    "$VENV/lib" >/dev/null

# Caches: pip kept none (--no-cache-dir); the build copy holds setuptools'
# build/ and *.egg-info leftovers. (The user's own ~/.cache/pip is left alone.)
rm -rf "$BUILD"

say "checking: $("$VENV/bin/luma-proxy" --version)"
say "done: $VENV/bin/luma-proxy"
