"""The ``luma-proxy`` command and ``python -m luma_proxy`` (how ``run --workers``
starts its workers): ``startup``'s decisions first, then the click CLI."""

from __future__ import annotations

import os
import sys

from luma_proxy.runtime.startup import (
    DEFAULT_IMAGE_USER,
    IMAGE_USER_ENV,
    drop_root,
    restart_optimized,
    wants_optimized_restart,
)


def main() -> None:
    """The ``luma-proxy`` command: restart for ``run`` before anything heavy is imported.

    Importing the CLI (click, pydantic, the registry) takes ~0.4 s; deciding
    here means ``run`` pays it once, in the optimized process.
    """
    try:
        drop_root(os.environ)
    except OSError as e:
        sys.stderr.write(f"Error: cannot drop root privileges to {IMAGE_USER_ENV}="
                         f"{os.environ.get(IMAGE_USER_ENV, DEFAULT_IMAGE_USER)}: {e.strerror}; "
                         "refusing to run as root\n")
        sys.exit(1)
    if wants_optimized_restart(sys.argv[1:], os.environ, sys.flags.optimize):
        restart_optimized()
    if sys.argv[1:2] != ["run"]:
        # The Luma CLI reads anything on stderr as a failure: a deprecation notice
        # (PYTHONWARNINGS, -X dev) must not turn a successful deploy into one.
        import warnings

        warnings.simplefilter("ignore")
    from luma_proxy.cli.commands import (
        main as cli_main,  # heavy: only after the decision above
    )

    cli_main()


if __name__ == "__main__":
    main()
