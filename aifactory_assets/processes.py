"""Child processes that must not outlive their parent (Linux)."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent(parent: int) -> None:
    """Run in the child (a data-loader worker, a test's server): a parent killed outright (scancel, the
    OOM killer, SIGKILL) runs no exit handler, and a child left behind would hold its memory, ports or
    GPU ring. Linux kills this process when its parent dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
