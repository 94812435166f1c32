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

# BASE: the official slim image. The real-engine tests (tests/docker/), which
# have no registry, pass a stand-in built offline; production never changes it.
ARG BASE=python:3.12-slim-bookworm

FROM ${BASE} AS build

# pip's own settings for the build only (e.g. the tests' offline wheelhouse:
# --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=http://127.0.0.1:PORT/).
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS

WORKDIR /src
# Only what the package is built from (no .dockerignore needed for speed).
COPY pyproject.toml README*.md ./
COPY luma_proxy/ luma_proxy/
COPY docker/install.sh docker/install.sh
# The venv is created at its final path: its scripts' shebangs point to
# /opt/luma-proxy/bin/python, which links to /usr/local/bin/python3 of the
# same base image in the final stage.
RUN sh docker/install.sh /opt/luma-proxy /src


FROM ${BASE}

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
COPY docker/entrypoint.sh /usr/local/bin/luma-proxy-entrypoint
# On PATH for `docker exec luma-proxy luma-proxy deploy|remove|list ...`.
RUN ln -s /opt/luma-proxy/bin/luma-proxy /usr/local/bin/luma-proxy \
    && chmod 0755 /usr/local/bin/luma-proxy-entrypoint \
    && luma-proxy --version

# Everything the process writes lives under /var/lib/luma-proxy, so the
# container runs with --read-only (plus a volume there):
#   LUMA_PROXY_IMAGE  tells luma-proxy it is this image: it picks the registry
#                     by what is mounted (luma_proxy/store/paths.py: with only certs/
#                     mounted, the Luma CLI's run, the registry lives in
#                     certs/.luma-proxy/ so that `luma proxy update` keeps it), and
#                     any command started as root (docker exec) becomes
#                     LUMA_PROXY_USER first (luma_proxy/runtime/startup.py: drop_root)
#   HOME              mitmproxy's default confdir is ~/.mitmproxy (its CA)
#   XDG_*             any library that follows the XDG base directories
# PYTHONDONTWRITEBYTECODE: the venv is precompiled (unchecked-hash .pyc) and
# read-only; never try to write __pycache__.
ENV LUMA_PROXY_IMAGE=1 \
    LUMA_PROXY_USER=10001:10001 \
    HOME=/var/lib/luma-proxy \
    XDG_CONFIG_HOME=/var/lib/luma-proxy/.config \
    XDG_DATA_HOME=/var/lib/luma-proxy/.local/share \
    XDG_STATE_HOME=/var/lib/luma-proxy/.local/state \
    XDG_CACHE_HOME=/var/lib/luma-proxy/.cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /var/lib/luma-proxy
# No VOLUME: an anonymous volume there would look like a mount to luma-proxy
# (luma_proxy/store/paths.py) and hide that, under the Luma CLI's run, only certs/
# survives `luma proxy update`. Mount a named volume there yourself
# (docs/docker.md) to keep everything.

# No USER line: the container starts as root only so that the entry point can
# hand the Luma CLI's host-owned bind mounts (certs/, /tmp) to uid 10001, as
# the official database images do; luma-proxy then drops to 10001:10001 before
# it does anything else, and refuses to serve as root if it cannot. Under
# `--user 10001:10001` (the hardened run in docs/docker.md) nothing is changed.
# Ports 80/443 need no capability: Docker (>= 20.10) sets the per-namespace
# sysctl net.ipv4.ip_unprivileged_port_start=0 for every container with its
# own network, and docs/docker.md passes it explicitly anyway.
# 443/udp: HTTP/3 (QUIC), served only with `run --http3` or LUMA_PROXY_HTTP3=1
# (then publish it too: -p 443:443/udp).
EXPOSE 80 443 443/udp

# Liveness of the HTTP listener. Without -f, curl exits 0 for *any* HTTP
# response: the proxy answers 404 for a host it does not route, and that is
# the answer expected here (the .invalid name can never be deployed). A
# refused connection (7) or a hang (28, --max-time) marks it unhealthy.
# Assumes the default --http-port 80.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["curl", "-sS", "-o", "/dev/null", "--max-time", "4", "-H", "Host: healthcheck.luma-proxy.invalid", "http://127.0.0.1:80/"]

# `docker run IMAGE` serves; `docker run IMAGE list` (or any subcommand) and
# `docker exec luma-proxy luma-proxy ...` run the CLI.
ENTRYPOINT ["luma-proxy-entrypoint"]
# --workers auto: one process per core. Measured on a real engine (docs/docker.md):
# every deploy flow still lost nothing, with 1.3-1.6x the requests served.
CMD ["run", "--http-port", "80", "--https-port", "443", "--log-format", "json", "--workers", "auto"]
