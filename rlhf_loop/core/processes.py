"""Children that do not outlive the process that started them.

`rlhf up`, the tests and the benches start the broker, the service and the trainer as
children, each in a session of its own, so that a terminal's Ctrl-C reaches only the parent,
which then stops them in order (app/loop.py). If the parent dies without doing that (SIGKILL,
the OOM killer, a crash), the kernel sends each child SIGTERM: Linux's parent-death signal,
set in the child between fork and exec.

    subprocess.Popen(cmd, start_new_session=True, preexec_fn=die_with_parent)

The signal follows the *thread* that forked the child: start children from a thread that
lives as long as they should (the main thread, as everything here does).
"""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """(preexec_fn) SIGTERM this child when its parent dies; a no-op off Linux."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
