"""Child processes that must not outlive their parent (Linux; elsewhere they may, unless they watch it).

A parent killed outright (scancel, the OOM killer, SIGKILL) runs no exit handler, and a child left behind
would hold its memory, ports or GPU ring. Two ways, for two kinds of child:

- `end_with_parent`, for a child that execs another program (`preexec_fn` of a test's server): the kernel
  kills it (PR_SET_PDEATHSIG) when the *thread* that started it ends, so start it from a thread that lives
  as long as the process (the main thread).
- `watch_parent`, for a forked child that goes on running Python (a data-loader worker), possibly forked
  from a thread that ends long before the parent (a loader first iterated on a prefetch thread): a thread
  of its own ends it once its parent is gone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Looked up now, not in a forked child: dlsym there could wait forever on a loader lock another thread held.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
WATCH_S = 0.5  # how often `watch_parent` looks: how long a child outlives its parent, at most


def end_with_parent(parent: int) -> None:
    """Run in the child before it execs (the signal outlives exec, a thread would not): Linux kills it
    when the thread that started it ends (PR_SET_PDEATHSIG)."""
    if _PRCTL is None:
        return
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def watch_parent(parent: int) -> None:
    """Run in a forked child that runs Python until it is told to stop: it exits once `parent` is gone (the
    child is then adopted, and its parent's id changes), whichever of the parent's threads forked it."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_S)
        os._exit(1)

    threading.Thread(target=watch, name="watch_parent", daemon=True).start()
