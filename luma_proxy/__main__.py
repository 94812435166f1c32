"""``python -m luma_proxy``: the CLI; how the ``run --workers`` supervisor starts workers."""

from .startup import main

if __name__ == "__main__":
    main()
