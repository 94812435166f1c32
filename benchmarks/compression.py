"""What response compression costs and saves, per encoding, as the proxy does it.

Bodies: a generated ~60 KB HTML page (a news/docs-style listing whose prose is
CPython's own documentation text, so the words are real, not repeated filler),
plus, as real files a site serves, mitmproxy's web UI stylesheet and script
from site-packages; ``--page FILE`` adds any file of your own.

For each body and encoding: ``luma_proxy.proxy.compression.compress_body`` (a
buffered body) and ``StreamEncoder`` fed 16 KiB chunks, flushed after each (a
streamed body), N times; CPU time per request from ``time.process_time``; the
ratio is compressed/original bytes. ``--sweep`` adds other levels of each
library, one-shot, to show where the chosen ones sit.

Usage: .venv/bin/python benchmarks/compression.py [-n 200] [--chunk 16384] [--page FILE] [--sweep]
"""

from __future__ import annotations

import argparse
import html
import random
import re
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import brotli
import mitmproxy
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from luma_proxy.proxy import compression  # noqa: E402
from luma_proxy.proxy.compression import PREFERENCE, StreamEncoder, compress_body  # noqa: E402

LEVELS = {"gzip": compression.GZIP_LEVEL, "br": compression.BROTLI_QUALITY,
          "zstd": compression.ZSTD_LEVEL}
HEADER = ("| body | bytes | encoding | {} | compressed | ratio | saved | CPU µs/req | MB/s |\n"
          "|---|---:|---|---|---:|---:|---:|---:|---:|")
SWEEP = {"gzip": (1, 4, 5, 6, 9), "br": (1, 2, 3, 4, 5, 11), "zstd": (1, 3, 6, 9)}


def html_page(target: int = 60_000, seed: int = 1) -> bytes:
    """A deterministic page of about ``target`` bytes: head, inline CSS, nav, cards, footer."""
    from pydoc_data.topics import topics  # real English prose, shipped with CPython

    rng = random.Random(seed)
    sentences = [s.strip() for text in topics.values()
                 for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
                 if 40 < len(s.strip()) < 220]
    words = sorted({w.lower() for s in sentences for w in re.findall(r"[A-Za-z]{4,12}", s)})
    css = "\n".join(
        f".{name} {{ margin: {rng.randint(0, 24)}px; padding: {rng.randint(0, 16)}px "
        f"{rng.randint(0, 32)}px; color: #{rng.randrange(0x1000000):06x}; "
        f"font-size: {rng.choice(('0.875rem', '1rem', '1.125rem', '1.5rem'))}; }}"
        for name in ("site-header", "nav", "nav a", "card", "card h2", "card p", "meta",
                     "tags", "tag", "sidebar", "footer", "btn", "btn-primary", "grid"))
    nav = "".join(f'<li><a href="/section/{w}" class="nav-link">{w.title()}</a></li>'
                  for w in rng.sample(words, 24))
    head = (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        "<title>Latest articles | Example Docs</title>\n"
        '<link rel="stylesheet" href="/static/site.3f9a2c.css">\n'
        f"<style>\n{css}\n</style>\n</head>\n<body>\n"
        f'<header class="site-header"><nav class="nav"><ul>{nav}</ul></nav></header>\n'
        '<main class="grid">\n')
    tail = (
        '</main>\n<footer class="footer"><p>&copy; 2025 Example Docs. '
        '<a href="/privacy">Privacy</a> · <a href="/terms">Terms</a></p></footer>\n'
        '<script src="/static/app.8c1d0e.js" defer></script>\n</body>\n</html>\n')
    cards: list[str] = []
    size = len(head) + len(tail)
    n = 0
    while size < target:
        n += 1
        title = " ".join(rng.sample(words, rng.randint(3, 7))).capitalize()
        slug = "-".join(title.lower().split()[:5])
        body = "".join(f"<p>{html.escape(' '.join(rng.sample(sentences, rng.randint(2, 4))))}</p>"
                       for _ in range(rng.randint(1, 3)))
        tags = "".join(f'<a class="tag" href="/tag/{t}">{t}</a>' for t in rng.sample(words, 3))
        card = (
            f'<article class="card" id="post-{1000 + n}">\n'
            f'  <h2><a href="/{2025 - n % 3}/{slug}">{html.escape(title)}</a></h2>\n'
            f'  <div class="meta">By <a href="/author/{rng.choice(words)}">'
            f"{rng.choice(words).title()} {rng.choice(words).title()}</a> · "
            f'<time datetime="2025-{1 + n % 12:02d}-{1 + n % 28:02d}">'
            f"{1 + n % 28} {('Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun')[n % 6]} 2025</time> · "
            f"{rng.randint(2, 14)} min read</div>\n"
            f"  {body}\n"
            f'  <div class="tags">{tags}</div>\n'
            f'  <a class="btn btn-primary" href="/{2025 - n % 3}/{slug}">Read more</a>\n'
            "</article>\n")
        cards.append(card)
        size += len(card)
    return (head + "".join(cards) + tail).encode()


def bodies(extra: list[Path]) -> list[tuple[str, bytes]]:
    out = [("generated HTML page", html_page())]
    static = Path(mitmproxy.__file__).parent / "tools" / "web" / "static"
    for pattern, label in (("index-*.css", "mitmweb CSS"), ("index-*.js", "mitmweb JS")):
        found = sorted(static.glob(pattern))
        if found:
            out.append((label, found[0].read_bytes()))
    out += [(p.name, p.read_bytes()) for p in extra]
    return out


def cpu_per_call(fn: Callable[[], object], n: int) -> float:
    """Seconds of CPU per call, over ``n`` calls (after one warm-up call)."""
    fn()
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n


def streamed(encoding: str, data: bytes, chunk: int) -> bytes:
    """What a client gets of ``data`` sent through ``StreamEncoder`` in ``chunk``-byte pieces."""
    encoder = StreamEncoder(encoding)
    out = []
    for i in range(0, len(data), chunk):
        piece = encoder(data[i:i + chunk])
        out.append(piece if isinstance(piece, bytes) else b"".join(piece))
    piece = encoder(b"")
    out.append(piece if isinstance(piece, bytes) else b"".join(piece))
    return b"".join(out)


def one_shot(encoding: str, level: int) -> Callable[[bytes], bytes]:
    if encoding == "gzip":
        return lambda d: zlib.compress(d, level, 31)
    if encoding == "br":
        return lambda d: brotli.compress(d, quality=level)
    zc = zstandard.ZstdCompressor(level=level)
    return zc.compress


def row(name: str, size: int, encoding: str, mode: str, out: int, cpu: float) -> str:
    return (f"| {name} | {size:,} | {encoding} | {mode} | {out:,} | {out / size:.3f} | "
            f"{100 * (1 - out / size):.1f} % | {cpu * 1e6:,.0f} | {size / cpu / 1e6:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=200, help="compressions per cell")
    parser.add_argument("--chunk", type=int, default=16384, help="streamed chunk size")
    parser.add_argument("--page", type=Path, action="append", default=[], help="another body")
    parser.add_argument("--sweep", action="store_true", help="also other levels, one-shot")
    args = parser.parse_args()

    print(f"N={args.n} per cell; CPU = time.process_time per request; ratio = compressed/original;"
          f" stream = {args.chunk:,}-byte chunks, flushed after each.")
    print(f"Levels: gzip {LEVELS['gzip']}, br quality {LEVELS['br']}, zstd {LEVELS['zstd']}"
          f" (brotli {brotli.version}, zstandard {zstandard.__version__},"
          f" zlib {zlib.ZLIB_RUNTIME_VERSION}).\n")
    print(HEADER.format("mode"))
    for name, data in bodies(args.page):
        for encoding in PREFERENCE:
            whole = compress_body(encoding, data)
            cpu = cpu_per_call(lambda e=encoding, d=data: compress_body(e, d), args.n)
            print(row(name, len(data), encoding, "buffered", len(whole), cpu))
            sent = streamed(encoding, data, args.chunk)
            cpu = cpu_per_call(lambda e=encoding, d=data: streamed(e, d, args.chunk), args.n)
            print(row(name, len(data), encoding, "stream", len(sent), cpu))
    if args.sweep:
        name, data = bodies([])[0]
        print(f"\nOther levels, one-shot, {name}:\n")
        print(HEADER.format("level"))
        for encoding, levels in SWEEP.items():
            for level in levels:
                fn = one_shot(encoding, level)
                cpu = cpu_per_call(lambda f=fn: f(data), args.n)
                print(row(name, len(data), encoding, str(level), len(fn(data)), cpu))


if __name__ == "__main__":
    main()
