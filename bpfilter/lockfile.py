"""The bpfilter lock file: one flock serialises every command that changes the state."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_PATH = Path("/run/bpfilter/lock")
LOCK_ENV = "BPFILTER_LOCK"  # another lock file (separate test runs on one machine)


def lock_path() -> Path:
    """The lock file: $BPFILTER_LOCK, else /run/bpfilter/lock."""
    return Path(os.environ.get(LOCK_ENV) or LOCK_PATH)


def open_lock(path: Path | None = None) -> int:
    """An fd of the lock file (created root-only when missing); closing it unlocks."""
    path = lock_path() if path is None else path
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def try_lock(fd: int) -> bool:
    """Take the lock on ``fd`` when it is free; False at once when another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


__all__ = ["LOCK_ENV", "LOCK_PATH", "lock_path", "open_lock", "try_lock"]
