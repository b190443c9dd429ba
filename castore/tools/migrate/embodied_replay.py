"""Import a DreamerV3 / embodied ``replay/`` folder of ``.npz`` chunks as a RingBuffer state.

embodied's ``Replay`` writes each chunk of a worker's stream (``embodied/core/chunk.py``)
as ``{time}-{uuid}-{succ}-{length}.npz`` with ``np.savez_compressed``: ``length`` rows of
every key (``image``, ``action``, ``reward``, ``is_first``, ..., ``stepid``); ``time`` is
when the chunk's first row came (``%Y%m%dT%H%M%SF`` and microseconds), ``uuid`` its id,
``succ`` the id of the next chunk of the same stream (all ``0``: none yet).

Row order.  :meth:`RingBuffer.sample_sequences` draws runs of consecutive rows, so rows
are laid out stream by stream: each stream's chunks follow their ``succ`` links, and a run
crosses from one worker's stream into another only at the few stream boundaries
(:attr:`ReplayImport.stream_starts`), never at the chunk boundaries of plain time order
(every ``chunksize`` rows, with several workers).  Streams are ordered by the time of their
newest chunk: the buffer overwrites its oldest rows first, so the stream whose data ends
earliest goes first and the one holding the newest rows goes last.  A ``succ`` naming no
file (the chunk after a crash, or one not kept) ends its stream.

Capacity.  By default the buffer holds every row.  With a smaller ``capacity`` the newest
rows are kept, newest by chunk time: whole chunks, newest first, and the last rows of the
oldest chunk kept (a stream keeps its newest part, so the rows kept stay consecutive).

Memory: the buffer's fields are allocated once, then filled chunk by chunk, so an import
holds about the replay once plus one chunk.  Files are read with
``np.load(allow_pickle=False)``: an object array is refused, never unpickled.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from ...errors import MigrationError, UsageError
from ...format.codec import dtype_name
from ...replay import RingBuffer
from ...store import Store
from .target import open_target, save_step

__all__ = ["ReplayImport", "import_replay"]

log = logging.getLogger("castore.migrate")

_NAME = re.compile(r"(?P<time>[0-9A-Za-z]+)-(?P<uuid>[0-9A-Za-z]+)-(?P<succ>[0-9A-Za-z]+)-(?P<length>[0-9]+)\.npz")
_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)


@dataclass(frozen=True, slots=True)
class ReplayImport:
    """What :func:`import_replay` saved."""

    store: str  #: the store's path
    branch: str
    step: int
    name: str  #: the component holding the RingBuffer state
    files: int  #: chunk files read (all of them are checked; those of dropped rows only by header)
    rows: int  #: rows in the buffer
    dropped_rows: int  #: older rows left out for ``capacity``
    capacity: int
    fields: tuple[str, ...]
    stream_starts: tuple[int, ...]  #: the row (oldest first) each stream begins at; ``len`` is the stream count
    new_bytes: int  #: bytes the save added to the store
    unchanged: bool  #: the store held this step with this very state already


@dataclass(frozen=True, slots=True)
class _Chunk:
    path: str
    time: str
    uuid: str
    succ: str | None  #: None: no successor
    length: int


def _chunks(directory: str) -> list[_Chunk]:
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".npz"))
    except FileNotFoundError:
        raise UsageError(f"{directory} does not exist: pass an embodied replay directory") from None
    except NotADirectoryError:
        raise UsageError(f"{directory} is not a directory: pass an embodied replay directory") from None
    except OSError as exc:
        raise MigrationError(directory, f"cannot list: {exc.strerror or exc}") from None
    if not names:
        raise UsageError(f"{directory} holds no .npz chunk files")
    chunks: list[_Chunk] = []
    seen: dict[str, str] = {}
    for name in names:
        path = os.path.join(directory, name)
        match = _NAME.fullmatch(name)
        if not match:
            raise MigrationError(path, "is not named {time}-{uuid}-{succ}-{length}.npz as embodied's chunks are")
        uuid, succ = match["uuid"].lstrip("0"), match["succ"].lstrip("0")  # ids: all zeros is "none"
        if not uuid:
            raise MigrationError(path, "has the chunk id 0, which embodied gives no chunk")
        if uuid in seen:
            raise MigrationError(path, f"has the chunk id of {seen[uuid]}")
        seen[uuid] = name
        chunks.append(_Chunk(path, match["time"], uuid, succ or None, int(match["length"])))
    return sorted(chunks, key=lambda c: (c.time, c.uuid))


def _header(member: zipfile.ZipInfo, archive: zipfile.ZipFile) -> tuple[tuple, np.dtype]:
    with archive.open(member) as file:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(file)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(file)
    return shape, dtype


def _fields(chunks: list[_Chunk]) -> dict[str, tuple[tuple, np.dtype]]:
    """The fields' row shapes and dtypes, from each file's array headers (a few bytes each):
    every file must hold the same fields, ``length`` rows each, before anything is copied."""
    fields: dict[str, tuple[tuple, np.dtype]] = {}
    for index, chunk in enumerate(chunks):
        try:
            with zipfile.ZipFile(chunk.path) as archive:
                members = archive.infolist()
                if not all(m.filename.endswith(".npy") for m in members):
                    raise MigrationError(chunk.path, "holds files other than .npy arrays: not written by np.savez")
                found = {m.filename.removesuffix(".npy"): _header(m, archive) for m in members}
        except MigrationError:
            raise
        except _READ_ERRORS as exc:
            raise MigrationError(chunk.path, f"is not a readable .npz file ({type(exc).__name__}: {exc})") from None
        for key, (shape, dtype) in found.items():
            if dtype.hasobject:
                raise MigrationError(chunk.path, f"field {key!r} is an object array, which only unpickling reads")
            if shape[:1] != (chunk.length,):
                raise MigrationError(chunk.path, f"field {key!r} has shape {shape}, not {chunk.length} rows")
        rows = {key: (shape[1:], dtype) for key, (shape, dtype) in found.items()}
        if index == 0:
            fields = rows
        elif rows != fields:
            raise MigrationError(chunk.path, f"has fields {_describe(rows)}, the chunks before it {_describe(fields)}")
    return fields


def _describe(fields: dict) -> str:
    return ", ".join(f"{key} {dtype}{list(shape)}" for key, (shape, dtype) in sorted(fields.items()))


def _keep_newest(chunks: list[_Chunk], capacity: int) -> dict[str, int]:
    """``{uuid: rows kept}`` of the newest chunks holding ``capacity`` rows (the oldest of
    them partly: its last rows)."""
    kept, total = {}, 0
    for chunk in reversed(chunks):  # newest first
        if total >= capacity:
            break
        kept[chunk.uuid] = min(chunk.length, capacity - total)
        total += kept[chunk.uuid]
    return kept


def _streams(chunks: list[_Chunk]) -> list[list[_Chunk]]:
    """The chunks as streams, each in ``succ`` order, ordered by their newest chunk's time."""
    by_uuid = {c.uuid: c for c in chunks}
    targets = {c.succ for c in chunks if c.succ in by_uuid}
    streams, placed = [], set()
    # heads first, then whatever a damaged chain (a cycle, two chunks naming one successor) left
    for start in [c for c in chunks if c.uuid not in targets] + chunks:
        stream: list[_Chunk] = []
        chunk: _Chunk | None = start
        while chunk is not None and chunk.uuid not in placed:
            placed.add(chunk.uuid)
            stream.append(chunk)
            chunk = by_uuid.get(chunk.succ) if chunk.succ else None
        if stream:
            streams.append(stream)
    return sorted(streams, key=lambda s: (max(c.time for c in s), s[0].time, s[0].uuid))


def _read(chunk: _Chunk, fields: dict, rows: int) -> dict[str, np.ndarray]:
    """The last ``rows`` rows of every field of a chunk."""
    try:
        with np.load(chunk.path, allow_pickle=False) as data:
            arrays = {key: data[key][chunk.length - rows :] for key in fields}
    except (*_READ_ERRORS, KeyError) as exc:
        raise MigrationError(chunk.path, f"cannot be read ({type(exc).__name__}: {exc})") from None
    for key, array in arrays.items():  # the header pass read the same file: only a change under us differs
        if (array.shape[1:], array.dtype) != fields[key]:
            raise MigrationError(chunk.path, f"field {key!r} changed while it was imported")
    return arrays


def import_replay(
    directory: str | os.PathLike,
    store: str | os.PathLike | Store,
    *,
    step: int = 0,
    name: str = "replay",
    capacity: int | None = None,
    merge: bool = False,
    branch: str | None = None,
    overwrite: bool = False,
    allow_network_fs: bool = False,
) -> ReplayImport:
    """Save the chunks of an embodied replay directory as one ``RingBuffer`` state.

    The state is saved as component ``name`` of ``step`` in ``store`` (a path, created if
    absent and closed afterwards, or an open :class:`Store`); load it with
    ``RingBuffer(capacity).load(store.load(step)[name])``, or register a
    ``RingBuffer(capacity)`` as ``name`` on a :class:`castore.Checkpoint`.  Row order and
    capacity are as the module docstring says.  ``merge=True`` keeps the other components
    of an existing ``step`` (e.g. an agent imported by :func:`import_elements`) and sets
    ``name`` among them, replacing a component of that name (DreamerV3 checkpoints hold a
    ``replay`` of None); without it, the step holds the buffer alone.  Saving the same
    state again is a no-op.

    Raises :class:`UsageError` for a missing directory, one without ``.npz`` files, a bad
    capacity; :class:`MigrationError` (with the file) for a misnamed, unreadable or
    truncated file, object arrays, or fields that differ between files;
    :class:`UnsupportedValueError` for a dtype castore does not store;
    :class:`StepExistsError` if ``step`` holds other content, unless ``overwrite`` (or
    ``merge``).
    """
    directory = os.fspath(directory)
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0):
        raise UsageError(f"capacity must be a positive int, got {capacity!r}")
    chunks = _chunks(directory)
    fields = _fields(chunks)
    for key, (_, dtype) in fields.items():
        dtype_name(dtype, f"{name}/fields/{key}")  # refuse before allocating the buffer
    total = sum(c.length for c in chunks)
    capacity = capacity or total
    if capacity <= 0:
        raise UsageError(f"the chunks in {directory} hold no rows")
    kept = _keep_newest(chunks, capacity)
    streams = _streams([c for c in chunks if c.uuid in kept])
    buffer = RingBuffer(capacity, fields={key: (shape, dtype) for key, (shape, dtype) in fields.items()})
    starts = []
    for stream in streams:
        if not any(kept[chunk.uuid] for chunk in stream):
            continue  # chunks of no rows only (embodied saves none, but a file may say 0)
        starts.append(len(buffer))
        for chunk in stream:
            if kept[chunk.uuid]:
                buffer.add(_read(chunk, fields, kept[chunk.uuid]))
    state = buffer.save()
    state["added"] = total  # rows ever added, as far as the files tell
    with open_target(store, branch, allow_network_fs) as target:
        others = []
        if merge and target.has_step(step):
            others = [n for n, _ in target.manifest(step).components if n != name]

        # the other components go into the new record by reference: nothing of them is read,
        # so a component this machine could not load (pickled, a tensor on a missing device) stays as it is
        carry = (step, others) if others else None
        result = save_step(
            target, step, lambda: {name: state}, overwrite=overwrite or merge, source=directory, carry=carry
        )
        log.info(
            "replay %s: %d rows of %d chunk files as %r of step %d", directory, len(buffer), len(chunks), name, step
        )
        return ReplayImport(
            store=target.path,
            branch=target.branch,
            step=step,
            name=name,
            files=len(chunks),
            rows=len(buffer),
            dropped_rows=total - len(buffer),
            capacity=capacity,
            fields=tuple(fields),
            stream_starts=tuple(starts),
            new_bytes=result.new_bytes,
            unchanged=result.manifest_bytes == 0,
        )
