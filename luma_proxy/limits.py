"""What clients send over HTTP/1: the head's size (431) and syntax (400), the body's size (413).

mitmproxy buffers a request head until it is complete, without any bound
(its own source says "FIXME: protect against header size DoS"), accepts bare
LF line ends, control characters and obs-fold in it, and reads a whole
request body before it sends an answer an addon set. So the head is checked
inside its HTTP/1 reader, before any body byte is read, and a chunked body
(no declared length) is counted as its reader decodes it: over the limit, the
client gets 413 and the upstream connection is closed mid-body, so a cut
request never looks complete to the container.

This module holds the rules (``HeadScanner``, ``head_status``) and the options;
the readers that apply them inside mitmproxy's ``Http1Server`` are in
``engine_patches`` (``install_http1_limits``), with every other touch of
mitmproxy internals.
"""

from __future__ import annotations

import os
import re
from typing import Any

from mitmproxy import ctx, exceptions

from .environ import env_int

DEFAULT_MAX_HEADER = "64k"
DEFAULT_MAX_BODY = "1g"
# Per HTTP/2 client connection and container: h2load -c 10 -m 100 then opens at most
# 80 connections at once, not 1,000 (docs/performance.md, HTTP/2 row).
DEFAULT_H2_POOL = 8
# The start of flow.error.msg for a body over the limit (flowinfo.error_status: 413).
# The flow.error.msg of a body cut by its deadline (flowinfo.error_status: 408).
BODY_TIMEOUT = "request body timeout"


def parse_size(value: str, name: str) -> int:
    from . import engine_patches  # it imports this module's rules

    try:
        size = engine_patches.human_size(value)
    except ValueError:
        size = None
    if size is None or size <= 0:
        raise ValueError(f"invalid {name} {value!r}: expected a size like 64k, 10m, 1g")
    return size


_HEAD_END = re.compile(rb"\n\r?\n")  # how h11, mitmproxy's reader, finds it


class HeadScanner:
    """Finds the end of a request head arriving in pieces, looking at each byte once.

    ``examined`` counts the bytes looked at: a head sent one byte per segment
    costs as much as one sent whole (the old reader searched the whole buffer
    again on every segment).
    """

    __slots__ = ("examined", "scanned", "tail")

    def __init__(self) -> None:
        self.scanned = 0  # bytes of the stream fed so far
        self.tail = b""  # the last two of them: an end may straddle segments
        self.examined = 0

    def feed(self, data: bytes) -> int | None:
        """The head's length (its end offset in the stream) once it is complete, else None."""
        text = self.tail + data
        self.examined += len(text)
        match = _HEAD_END.search(text)
        start = self.scanned - len(self.tail)
        self.scanned += len(data)
        if match is not None:
            return start + match.end()
        self.tail = text[-2:]
        return None


# Controls other than HT, CR, LF, and DEL: never valid in a request line or a field.
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*(\d+)", re.IGNORECASE)


def head_status(head: bytes, body_limit: int) -> int | None:
    """400 or 413 for a complete request head that must not go on; None when it may.

    400 (RFC 9112 §2.2, §5.2, RFC 9110 §5.5): a control character or DEL, a
    bare CR, a bare LF (a line end other recipients may read differently), or
    obs-fold (a line starting with SP or HT). 413: a Content-Length over the
    body limit. Plain byte counts and one character class: no per-byte Python.
    """
    crlf = head.count(b"\r\n")
    if (crlf != head.count(b"\r") or crlf != head.count(b"\n") or b"\n " in head
            or b"\n\t" in head or _CONTROL.search(head) is not None):
        return 400
    match = _CONTENT_LENGTH.search(head)
    if match is not None and int(match.group(1)) > body_limit:
        return 413
    return None


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
        from . import engine_patches  # it imports this module's rules

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
