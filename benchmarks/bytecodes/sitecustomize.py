"""Counts the bytecodes each code object runs between SIGUSR1 and SIGUSR2.

Put on ``PYTHONPATH`` of a proxy process by ``benchmarks/bytecodes.py``; not for
production. ``sys.monitoring`` (Python 3.12) counts every thread's bytecodes;
the counts go to ``$BYTECODES_OUT``, one ``count<TAB>file:line(name)`` per line.
"""

import collections
import os
import signal
import sys

_counts: collections.Counter = collections.Counter()
_monitoring = sys.monitoring
_TOOL = 5  # a free tool id (0-5); 5 is not used by debuggers or coverage


def _instruction(code, offset):  # type: ignore[no-untyped-def]
    _counts[code] += 1


def _start(*_):  # type: ignore[no-untyped-def]
    _counts.clear()
    _monitoring.use_tool_id(_TOOL, "bytecodes")
    _monitoring.register_callback(_TOOL, _monitoring.events.INSTRUCTION, _instruction)
    _monitoring.set_events(_TOOL, _monitoring.events.INSTRUCTION)


def _stop(*_):  # type: ignore[no-untyped-def]
    _monitoring.set_events(_TOOL, 0)
    _monitoring.free_tool_id(_TOOL)
    with open(os.environ["BYTECODES_OUT"], "w") as out:
        for code, n in _counts.most_common():
            out.write(f"{n}\t{code.co_filename}:{code.co_firstlineno}({code.co_qualname})\n")


signal.signal(signal.SIGUSR1, _start)
signal.signal(signal.SIGUSR2, _stop)
