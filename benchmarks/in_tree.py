"""Run a benchmark script against another checkout's ``luma_proxy``, for A/B in one session.

Usage: .venv/bin/python benchmarks/in_tree.py TREE SCRIPT [ARGS...]
e.g.   git worktree add /tmp/before HEAD~3
       .venv/bin/python benchmarks/in_tree.py /tmp/before benchmarks/reload_scale.py --runs 9

The editable install's finder is dropped and TREE goes first on the path (as
``h2load_ab.py`` and ``tls_scale.py --tree`` launch the proxy), so the script
and the package it imports both come from TREE; SCRIPT is relative to it.
"""

import runpy
import sys

tree, script = sys.argv[1], sys.argv[2]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path.insert(0, tree)
sys.argv = [f"{tree}/{script}", *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
