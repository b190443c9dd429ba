"""Saves that commit in the background: handles, commit order, errors that are never lost.

One daemon worker thread per store runs the write phases of async saves in the order
they were submitted, so steps commit in order and each save's baselines build on the
last.  At most ``max_pending`` saves are in flight; submitting another first waits for
the oldest.  A failed save's error is raised by its handle's ``result()``, or else by the
next ``submit``/``wait`` — never dropped.  At interpreter exit, pending saves are waited
for (a process that exits normally does not lose a save it started; one that is killed
loses at most the saves not yet committed, never half a step).
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures.thread  # noqa: F401 - registers its exit hook before ours (see below)
import logging
import queue
import threading
import weakref
from concurrent.futures import Future

log = logging.getLogger(__name__)


class SaveHandle:
    """A save committing in the background.

    ``result(timeout=None)`` waits and returns the :class:`SaveResult` or raises the save's
    error (the error then counts as seen and is not raised again elsewhere).
    """

    def __init__(self, step: int):
        self.step = step
        self._future: Future = Future()
        self._seen = False

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None):
        self._seen = True
        return self._future.result(timeout)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the save to end, without raising its error."""
        self._future.exception(timeout)  # returns the error (kept for result()) or times out

    def unseen_error(self) -> BaseException | None:
        """The error of a finished save that nobody has been shown, else None."""
        if self._seen or not self._future.done():
            return None
        return self._future.exception()

    def claim_error(self) -> BaseException | None:
        """The unseen error, which from now on counts as seen (raised by the caller)."""
        error = self.unseen_error()
        self._seen = True
        return error

    # -- what the worker does with it ---------------------------------------------------------

    def start(self) -> bool:
        """Mark the save running; False if it was cancelled."""
        return self._future.set_running_or_notify_cancel()

    def finish(self, result) -> None:
        self._future.set_result(result)

    def fail(self, error: BaseException) -> None:
        self._future.set_exception(error)

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"SaveHandle(step={self.step}, {state})"


class Background:
    """A worker thread that runs submitted write phases in order."""

    def __init__(self, name: str, max_pending: int = 1):
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.name = name
        self.max_pending = max_pending
        self._queue: queue.Queue = queue.Queue()
        self._handles: collections.deque[SaveHandle] = collections.deque()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        _LIVE.add(self)

    def submit(self, handle: SaveHandle, fn, *args) -> SaveHandle:
        """Queue ``fn(*args)`` as ``handle``'s save once fewer than ``max_pending`` are in flight."""
        while True:
            with self._lock:
                pending = [h for h in self._handles if not h.done()]
                if len(pending) < self.max_pending:
                    self._handles.append(handle)
                    self._start()
                    self._queue.put((handle, fn, args))
                    return handle
            pending[0].wait()

    def wait(self, *, raise_errors: bool = True) -> None:
        """Wait for every submitted save; then raise the first error no handle has shown."""
        for handle in list(self._handles):
            handle.wait()
        if raise_errors:
            self.raise_failed()

    def raise_failed(self) -> None:
        """Raise the error of the oldest finished save whose error nobody has seen yet.

        Later unseen errors stay for the next call: each is raised once.
        """
        with self._lock:
            failed = next((h for h in self._handles if h.unseen_error() is not None), None)
            error = None if failed is None else failed.claim_error()
            self._handles = collections.deque(h for h in self._handles if not h.done() or h.unseen_error() is not None)
        if error is not None:
            raise error

    def in_flight(self) -> int:
        return sum(not h.done() for h in list(self._handles))

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"castore-save:{self.name}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            handle, fn, args = self._queue.get()
            if not handle.start():
                continue
            try:
                handle.finish(fn(*args))
            except BaseException as exc:  # kept for the handle / next wait
                log.debug("background save of step %s failed: %r", handle.step, exc)
                handle.fail(exc)


_LIVE: weakref.WeakSet[Background] = weakref.WeakSet()


def wait_all_at_exit() -> None:
    """Let every background save of the process finish (errors logged); run at exit, and by
    the mirrors' exit hook before theirs (their uploads follow these commits)."""
    for background in list(_LIVE):
        try:
            background.wait(raise_errors=False)
        except BaseException:
            pass
        for handle in list(background._handles):
            error = handle.unseen_error()
            if error is not None:
                log.error("background save of step %s failed and nobody waited for it: %s", handle.step, error)


# Run before concurrent.futures shuts its executors down at exit (the hashing pool is one),
# so saves still in flight can finish; plain atexit handlers run too late for that.
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(wait_all_at_exit)
else:  # pragma: no cover - CPython has it since 3.9
    atexit.register(wait_all_at_exit)
