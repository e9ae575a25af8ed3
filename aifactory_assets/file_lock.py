"""flock(2) where the filesystem has it: the loader's shard cache and the local store's pointer updates."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path


def lock(fd: int, operation: int) -> bool:
    """flock(2); False only when a conflicting lock is held through another open file (non-blocking).
    Where the filesystem has no flock (Lustre mounted without `-o flock`), True: nothing is protected."""
    try:
        fcntl.flock(fd, operation)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
            return True
        raise


def open_to_lock(path: Path) -> int | None:
    """For an exclusive lock: NFS grants one to a writer only; another user's copy in a shared cache opens
    read-only (a local flock needs no write access). None when it is gone."""
    for flags in (os.O_RDWR, os.O_RDONLY):
        try:
            return os.open(path, flags)
        except PermissionError:
            continue
        except FileNotFoundError:
            return None
    return None
