"""Writer sessions, and the chunk ids GC must not free while a save may reuse them.

A save reuses the ids that the last committed save of a leaf stored (its *baseline*)
without looking them up.  That is sound only while those chunks cannot have been freed:

* a baseline is trusted only within the *writer session* it was recorded in: from this
  process taking the store's writer lock until the backend is closed (no other process
  can free chunks while the lock is held);
* within a session, GC frees no chunk a baseline names: every holder of baselines
  registers here, and GC reads :meth:`WriterState.pinned_ids` and defers those ids.

One :class:`WriterState` per backend: every ``Store`` on one path in a process shares the
backend, its writer lock and so its session.
"""

from __future__ import annotations

import threading
import weakref

from ..errors import UsageError
from ..format.ids import split_ids
from ..storage.base import Backend


class WriterState:
    """The session token of a backend's writer, and who holds remembered ids."""

    def __init__(self, backend: Backend):
        self._backend = weakref.ref(backend)
        self.session: object | None = None  #: None until this process takes the writer lock
        self._holders: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()

    def take_writer(self) -> object:
        """Take the backend's writer lock (once per session); returns the session token.

        Raises :class:`StoreLockedError` if another process writes the store.
        """
        backend = self._backend()
        if backend is None:
            raise UsageError("the store was closed")
        with self._lock:
            if backend.acquire_writer() or self.session is None:
                self.session = object()
            return self.session

    def add_holder(self, holder) -> None:
        """Register an object with ``pinned_ids(session) -> bytes`` (concatenated ids)."""
        self._holders.add(holder)

    def pinned_ids(self) -> set[bytes]:
        """Chunk ids remembered by baselines of the current session: GC must keep them."""
        pinned: set[bytes] = set()
        backend = self._backend()
        if self.session is None or backend is None or not backend.is_writer():
            return pinned  # the session ended with the writer lock: its ids pin nothing
        for holder in list(self._holders):
            pinned.update(split_ids(holder.pinned_ids(self.session)))
        return pinned


_STATES: weakref.WeakKeyDictionary[Backend, WriterState] = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def writer_state(backend: Backend) -> WriterState:
    """The one :class:`WriterState` of ``backend``."""
    with _STATES_LOCK:
        state = _STATES.get(backend)
        if state is None:
            state = _STATES[backend] = WriterState(backend)
        return state
