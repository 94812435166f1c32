"""Figures of the image on a real engine: size, time to serve, `docker stop` time.

    .venv/bin/python benchmarks/docker_image.py [--runs 3]

Runs the image as the Luma CLI does (tests/docker/scenarios.py ``Bed``) and
prints one table (minimum / median / maximum over --runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.docker.engine import Engine
from tests.docker.scenarios import Bed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    engine = Engine().ensure()
    images = engine.images()
    size = engine.docker("image", "inspect", "-f", "{{.Size}}", images["proxy"]).stdout
    serve, stop = [], []
    try:
        for i in range(args.runs):
            bed = Bed(engine, images, tag=f"fig{i}")
            t0 = time.monotonic()
            bed.setup()  # docker run ... then until HTTP answers on the published port
            serve.append(time.monotonic() - t0)
            t0 = time.monotonic()
            engine.docker("stop", bed.proxy)
            stop.append(time.monotonic() - t0)
            bed.close()
    finally:
        engine.cleanup()
        engine.stop()

    def row(xs: list[float]) -> str:
        return f"{min(xs):.2f} / {statistics.median(xs):.2f} / {max(xs):.2f}"

    print("| figure | value |")
    print("|---|---|")
    print(f"| image size (stand-in base) | {int(size) / 1e6:.0f} MB |")
    print(f"| `docker run` to serving HTTP, s (min / median / max of {args.runs}) | {row(serve)} |")
    print(f"| `docker stop`, s (min / median / max of {args.runs}) | {row(stop)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
