"""The single-writer lock of a store directory: an exclusive ``flock`` on ``writer.lock``.

The file holds the holder's PID, so a refused writer can be told who holds it.  A flock
belongs to the open file description: closing the descriptor (or dying) releases it, and
a forked child's copy of the descriptor is closed by the engine so that only the process
that took the lock holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time

from ..errors import StoreLockedError, StorePermissionError, UsageError

LOCK_FILE = "writer.lock"
POLL_SECONDS = 0.05  # how often a writer waiting for the lock tries again


def check_timeout(timeout) -> float | None:
    """None, or seconds >= 0 as a float; else :class:`UsageError`."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < float("inf"):
        raise UsageError(f"lock_timeout must be None or seconds >= 0, got {timeout!r}")
    return float(timeout)


class WriterLock:
    """``acquire`` at once or within a timeout; ``release``; ``drop_inherited`` after fork."""

    def __init__(self, directory: str):
        self.directory = directory
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self, timeout: float) -> None:
        """Take the lock, polling for up to ``timeout`` seconds; raises :class:`StoreLockedError`,
        and :class:`StorePermissionError` if this user may not write the lock file (or create
        it: a store copied without it into a directory this user may not write)."""
        path = os.path.join(self.directory, LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise StorePermissionError(
                f"no permission to write store {self.directory} ({exc.strerror}: {path}); "
                "open it with readonly=True to load from it"
            ) from None
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                        error = StoreLockedError(self.directory, int(holder) if holder.isdigit() else None)
                        if timeout:
                            error.args = (f"{error.args[0]}; gave up after waiting {timeout:g} s",)
                        raise error from None
                    time.sleep(min(POLL_SECONDS, left))
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def drop_inherited(self) -> None:
        """In a forked child: close our copy without touching the parent's lock or PID."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
