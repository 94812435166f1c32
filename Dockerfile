# syntax=docker/dockerfile:1
#
# luma-proxy: drop-in replacement for the Go luma-proxy container that the
# Luma CLI starts (see docs/docker.md for the exact `docker run`).
#
#   docker build -t luma-proxy .
#
# Two stages. "build" creates the virtualenv /opt/luma-proxy with
# docker/install.sh (pip, its isolated setuptools build, the source tree);
# the final stage copies only that venv onto a fresh slim base, so no
# installer, build frontend or source checkout ships. Every dependency is
# installed from a wheel (install.sh passes --only-binary=:all:), so no
# compiler is involved in either stage; the build needs the package index,
# the image needs nothing from the network at run time.

FROM python:3.12-slim-bookworm AS build

WORKDIR /src
# Only what the package is built from (no .dockerignore needed for speed).
COPY pyproject.toml README*.md ./
COPY luma_proxy/ luma_proxy/
COPY docker/install.sh docker/install.sh
# The venv is created at its final path: its scripts' shebangs point to
# /opt/luma-proxy/bin/python, which links to /usr/local/bin/python3 of the
# same base image in the final stage.
RUN sh docker/install.sh /opt/luma-proxy /src


FROM python:3.12-slim-bookworm

LABEL org.opencontainers.image.title="luma-proxy" \
      org.opencontainers.image.description="Zero-downtime reverse proxy for Docker network aliases (mitmproxy addon)" \
      org.opencontainers.image.licenses="MIT"

# curl: the Luma CLI health-checks apps *from inside this container*
#   (docker exec luma-proxy sh -c "... curl ... http://IP:PORT/up"), and the
#   HEALTHCHECK below uses it. sh is the base image's dash.
# The unprivileged user owns only the data directory (and its certs/ child,
#   so a fresh named volume mounted there by the Luma CLI is writable too).
# Debian versions are not pinned (DL3008): bookworm drops superseded ones.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 luma \
    && useradd --system --no-log-init --uid 10001 --gid 10001 \
       --home-dir /var/lib/luma-proxy --no-create-home --shell /usr/sbin/nologin luma \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/luma-proxy /var/lib/luma-proxy/certs

COPY --from=build /opt/luma-proxy /opt/luma-proxy
# On PATH for `docker exec luma-proxy luma-proxy deploy|remove|list ...`.
RUN ln -s /opt/luma-proxy/bin/luma-proxy /usr/local/bin/luma-proxy \
    && luma-proxy --version

# Everything the process writes lives under the volume, so the container
# runs with --read-only (plus the volume; a --tmpfs /tmp is optional: Python
# falls back to the working directory for temp files):
#   LUMA_PROXY_STATE  the route registry (the CLI writes it), and next to it
#                     the health file <state>.health.json (the proxy writes it)
#   HOME              mitmproxy's default confdir is ~/.mitmproxy (its CA)
#   XDG_*             any library that follows the XDG base directories
# PYTHONDONTWRITEBYTECODE: the venv is precompiled (unchecked-hash .pyc) and
# read-only; never try to write __pycache__.
ENV LUMA_PROXY_STATE=/var/lib/luma-proxy/state.json \
    HOME=/var/lib/luma-proxy \
    XDG_CONFIG_HOME=/var/lib/luma-proxy/.config \
    XDG_DATA_HOME=/var/lib/luma-proxy/.local/share \
    XDG_STATE_HOME=/var/lib/luma-proxy/.local/state \
    XDG_CACHE_HOME=/var/lib/luma-proxy/.cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /var/lib/luma-proxy
VOLUME /var/lib/luma-proxy

# Ports 80/443 as a non-root user: no file capability, no root. The kernel
# lets anyone bind below net.ipv4.ip_unprivileged_port_start, a per-network-
# namespace sysctl that Docker (>= 20.10) and Podman already set to 0 for
# every container with its own network; docs/docker.md passes
# `--sysctl net.ipv4.ip_unprivileged_port_start=0` explicitly anyway.
# Not `setcap cap_net_bind_service=+ep` on the interpreter: the venv's python
# is a symlink (setcap needs the real file, i.e. /usr/local/bin/python3.12,
# which would give the capability to every Python program in the image),
# file capabilities are lost by some COPY/export paths, ignored under
# no-new-privileges, and make execve fail outright under --cap-drop ALL.
# With the sysctl the container needs no capability at all.
USER 10001:10001
EXPOSE 80 443

# Liveness of the HTTP listener. Without -f, curl exits 0 for *any* HTTP
# response: the proxy answers 404 for a host it does not route, and that is
# the answer expected here (the .invalid name can never be deployed). A
# refused connection (7) or a hang (28, --max-time) marks it unhealthy.
# Assumes the default --http-port 80.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["curl", "-sS", "-o", "/dev/null", "--max-time", "4", "-H", "Host: healthcheck.luma-proxy.invalid", "http://127.0.0.1:80/"]

# `docker run IMAGE` serves; `docker run IMAGE list` (or any subcommand) and
# `docker exec luma-proxy luma-proxy ...` run the CLI.
ENTRYPOINT ["luma-proxy"]
CMD ["run", "--http-port", "80", "--https-port", "443", "--log-format", "json"]
