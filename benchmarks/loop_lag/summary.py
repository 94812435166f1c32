"""The loop's stalls after it started serving, from proxy logs kept by ``tls_scale.py --keep``.

Usage: .venv/bin/python benchmarks/loop_lag/summary.py /tmp/luma-tls-scale-*/proxy.log

Per log: the ``LOOPLAG`` lines (``sitecustomize.py`` beside this file) after the
"listening on" line, as milliseconds late and seconds after listening; the longest.
"""

from __future__ import annotations

import datetime
import re
import sys

LISTENING = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO luma_proxy: listening on")
LAG = re.compile(r"LOOPLAG (\d+\.\d+) (\d+(?:\.\d+)?)ms")


def stalls(text: str) -> tuple[float, list[tuple[float, float]]] | None:
    """(listening at, [(seconds after it, ms late), ...]); None without a listening line."""
    listening = None
    for line in text.splitlines():
        if (m := LISTENING.search(line)) is not None:
            at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
            listening = at.replace(tzinfo=datetime.UTC).timestamp()
            break
    if listening is None:
        return None
    after = [(float(at) - listening, float(ms)) for at, ms in LAG.findall(text)
             if float(at) > listening]
    return listening, after


def main(paths: list[str]) -> None:
    for path in paths:
        with open(path, errors="replace") as f:
            found = stalls(f.read())
        if found is None:
            print(f"{path}: no listening line")
            continue
        _, after = found
        longest = max((ms for _, ms in after), default=0.0)
        listed = ", ".join(f"{ms:g} ms at +{t:.2f} s" for t, ms in after) or "none of 5 ms or more"
        print(f"{path}: longest {longest:g} ms; {listed}")


if __name__ == "__main__":
    main(sys.argv[1:])
