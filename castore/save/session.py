"""Writer sessions, and the chunk ids GC must not free while a save may reuse them.

A save reuses the ids that the last committed save of a leaf stored (its *baseline*)
without looking them up.  That is sound only while those chunks cannot have been freed:

* a baseline is trusted only within the *writer session* it was recorded in: from this
  process taking the store's writer lock until the backend is closed (no other process
  can free chunks while the lock is held);
* within a session, GC frees no chunk a baseline names: every holder of baselines
  registers here, and GC reads :meth:`WriterState.pinned_ids` and defers those ids.

One :class:`WriterState` per backend: every ``Store`` on one path in a process shares the
backend, its writer lock and so its session.  It also knows every saver of the backend, so
that what frees chunks through one ``Store`` waits for the saves of all of them
(:class:`SharedGate`): a save in flight through another ``Store`` on the same path (another
branch, a second ``Checkpoint``) may reuse or have written chunks no committed step names yet.
"""

from __future__ import annotations

import contextlib
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
        self._savers: weakref.WeakSet = weakref.WeakSet()
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

    def add_saver(self, saver) -> None:
        """Register a saver (``quiesced()``, ``locked()``, ``try_lock()``, ``in_flight()``)."""
        self._savers.add(saver)

    def discard_saver(self, saver) -> None:
        self._savers.discard(saver)

    def savers(self) -> list:
        """The live savers of this backend, in one fixed order (locks are taken in it)."""
        return sorted(list(self._savers), key=id)

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


class SharedGate:
    """The gate of what frees chunks (see ``castore.maintenance.maintainer.SaveGate``) over
    every saver of one backend: ``own`` (the saver of the ``Store`` maintaining) and the
    others registered in ``writer``.  Savers' locks are taken in one global order, so two
    gates never deadlock."""

    def __init__(self, writer: WriterState, own):
        self._writer = writer
        self._own = own

    def _all(self) -> list:
        savers = self._writer.savers()
        return savers if self._own in savers else sorted([*savers, self._own], key=id)

    def _refuse_inside_a_save(self) -> None:
        # the savers' locks are re-entrant: a thread inside a save (a shard generator that
        # calls gc()) would pass every gate and free what that save has written so far
        if any(saver.is_saving_here() for saver in self._all()):
            raise UsageError("gc, retain, compact, delete and tags cannot run inside a save (a shard generator?)")

    @contextlib.contextmanager
    def _held(self, quiet: bool):
        self._refuse_inside_a_save()
        with contextlib.ExitStack() as stack:
            for saver in self._all():
                if saver is self._own:  # takes the writer lock; its own errors are raised here
                    stack.enter_context(saver.quiesced() if quiet else saver.locked())
                else:
                    stack.enter_context(saver.held_for_other(quiet=quiet))
            yield

    def quiesced(self):
        """Writer lock held; no save of any Store on the backend captured or in flight."""
        return self._held(quiet=True)

    def locked(self):
        """Writer lock held; no save of any Store on the backend being captured."""
        return self._held(quiet=False)

    @contextlib.contextmanager
    def quiet_after_commit(self):
        """True if nothing else is being saved through any saver of the backend (the save
        committing now is the only one in flight, of ``own``)."""
        if any(saver.is_saving_here() for saver in self._all() if saver is not self._own):
            yield False  # a save nested in another's shard generator: that one is mid-way
            return
        held = []
        try:
            for saver in self._all():
                if not saver.try_lock():
                    yield False
                    return
                held.append(saver)
            yield all(saver.in_flight() <= (1 if saver is self._own else 0) for saver in held)
        finally:
            for saver in held:
                saver.unlock()
