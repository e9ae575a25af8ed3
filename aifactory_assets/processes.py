"""Child processes that must not outlive their parent (Linux; elsewhere they may)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Looked up now, not in a forked child: dlsym there could wait forever on a loader lock another thread held.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def end_with_parent(parent: int) -> None:
    """Run in the child (a data-loader worker, a test's server): a parent killed outright (scancel, the
    OOM killer, SIGKILL) runs no exit handler, and a child left behind would hold its memory, ports or
    GPU ring. Linux kills this process when the thread that started it ends (PR_SET_PDEATHSIG)."""
    if _PRCTL is None:
        return
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
