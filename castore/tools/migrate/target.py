"""The store an import writes to: a path opened (and closed) here, or a caller's open Store."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from ...errors import StepExistsError, UnsupportedValueError, UsageError
from ...save.saver import SaveResult
from ...store import Store


@contextlib.contextmanager
def open_target(store: str | os.PathLike | Store, branch: str | None, allow_network_fs: bool) -> Iterator[Store]:
    """``store`` as an open :class:`Store` writing to ``branch``.

    A path is opened (created if absent) with ``branch`` (default ``main``) and closed on
    exit; an open Store is used as it is and stays open, so ``branch`` must be None or
    its own.
    """
    if isinstance(store, Store):
        if branch is not None and branch != store.branch:
            raise UsageError(
                f"the store given writes to branch {store.branch!r}, not {branch!r}: open it with that branch"
            )
        yield store
        return
    with Store(store, branch=branch or "main", allow_network_fs=allow_network_fs) as opened:
        yield opened


def save_step(
    target: Store,
    step: int,
    tree_of: Callable[[], dict],
    *,
    overwrite: bool,
    source: str,
    created=None,
    carry=None,
) -> SaveResult:
    """Save ``tree_of()`` as ``step``, leaving a step that holds this very state as it is.

    ``Store.save(overwrite=True)`` commits again even when nothing changed, so the replace
    is a second save, made only once the first found other content; its chunks are
    stored by then, so it hashes again but writes only the manifest.  ``tree_of`` is
    called once per attempt (shards are iterators, read once).
    """
    try:
        try:
            return target.save(step, tree_of(), created=created, carry=carry)
        except StepExistsError:
            if not overwrite:
                raise StepExistsError(
                    f"step {step} of {target.path} holds other content than {source}: pass "
                    "overwrite=True (--overwrite) to replace it"
                ) from None
        return target.save(step, tree_of(), overwrite=True, created=created, carry=carry)
    except UnsupportedValueError as exc:
        raise unsupported_in(exc, source) from None


def unsupported_in(exc: UnsupportedValueError, where: str) -> UnsupportedValueError:
    """``exc`` restated for an import: where the value came from, and what to do.

    The store's own hint (``allow_pickle=True``) is about storing pickled leaves, which an
    import's ``allow_pickle`` (reading the source) does not turn on."""
    detail = str(exc).removeprefix(f"at {exc.path or '<root>'!r}: ")
    detail = detail.removesuffix(" (or opt in with allow_pickle=True)")
    return UnsupportedValueError(
        exc.path,
        f"{detail}, read from {where}: convert it to numpy arrays and plain containers in the "
        "component's save(), or pass an open castore.Store(path, allow_pickle=True) as the store "
        "to keep it pickled",
    )
