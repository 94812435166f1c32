"""What clients send over HTTP/1: the head's size (431) and syntax (400), the body's size (413).

mitmproxy buffers a request head until it is complete, without any bound
(its own source says "FIXME: protect against header size DoS"), accepts bare
LF line ends, control characters and obs-fold in it, and reads a whole
request body before it sends an answer an addon set. So the head is checked
inside its HTTP/1 reader, before any body byte is read, and a chunked body
(no declared length) is counted as its reader decodes it: over the limit, the
client gets 413 and the upstream connection is closed mid-body, so a cut
request never looks complete to the container.

This module holds the options; the rules are ``headrules`` (pure), and the
readers that apply them inside mitmproxy's ``Http1Server`` are in
``engine_patches`` (``install_http1_limits``), with every other touch of
mitmproxy internals.
"""

from __future__ import annotations

import os
from typing import Any

from mitmproxy import ctx, exceptions

from luma_proxy.environ import env_int
from luma_proxy.proxy import engine_patches

DEFAULT_MAX_HEADER = "64k"
DEFAULT_MAX_BODY = "1g"
# Per HTTP/2 client connection and container: h2load -c 10 -m 100 then opens at most
# 80 connections at once, not 1,000 (docs/performance.md, HTTP/2 row).
DEFAULT_H2_POOL = 8


def parse_size(value: str, name: str) -> int:
    try:
        size = engine_patches.human_size(value)
    except ValueError:
        size = None
    if size is None or size <= 0:
        raise ValueError(f"invalid {name} {value!r}: expected a size like 64k, 10m, 1g")
    return size


class Limits:
    def __init__(self) -> None:
        self.max_body = parse_size(DEFAULT_MAX_BODY, "size")

    def load(self, loader: Any) -> None:
        loader.add_option("luma_max_header_size", str,
                          os.environ.get("LUMA_PROXY_MAX_HEADER_SIZE", DEFAULT_MAX_HEADER),
                          "Largest request head (request line and headers) accepted; more: 431.")
        loader.add_option("luma_max_body_size", str,
                          os.environ.get("LUMA_PROXY_MAX_BODY_SIZE", DEFAULT_MAX_BODY),
                          "Largest request body accepted; more: 413.")
        loader.add_option("luma_h2_upstream_connections", int,
                          env_int("LUMA_PROXY_H2_UPSTREAM_CONNECTIONS", DEFAULT_H2_POOL),
                          "Most HTTP/1 connections one HTTP/2 client connection opens to one "
                          "container (reused across its streams; more streams wait).")

    def configure(self, updated: set[str]) -> None:
        if "luma_h2_upstream_connections" in updated:
            try:
                engine_patches.set_pool_size(ctx.options.luma_h2_upstream_connections)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
        if not updated & {"luma_max_header_size", "luma_max_body_size"}:
            return
        try:
            head = parse_size(ctx.options.luma_max_header_size, "luma_max_header_size")
            self.max_body = parse_size(ctx.options.luma_max_body_size, "luma_max_body_size")
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None
        engine_patches.install_http1_limits(head, self.max_body)
        engine_patches.install(self.max_body)  # HTTP/2 bodies are counted there
