"""castore against DreamerV3's own writer and others, on a run of real rendered observations.

    python bench/real_run.py [--frames 36864] [--saves 8] [--out FILE.md] [--env crafter|atari]

The run (issue 11, item 5), DreamerV3-like:

* a replay of real 64x64x3 frames rendered on the CPU by an environment package
  (``bench/frames.py``: Crafter by default, or Ms. Pac-Man through ``ale-py``; cached
  under ``bench/results/``), with DreamerV3's row layout (obs uint8, action float32
  one-hot, reward float32, is_first / is_terminal bool), held in a ``castore.RingBuffer``
  of ``frames - saves * rows_per_save`` rows that is full at the first save; each later
  save follows ``rows_per_save`` (default 1024) new rows, which overwrite the oldest;
* an agent: float32 weights (``--agent-mb``) and their Adam first and second moments, all
  of them updated between saves; a step counter.

Each writer saves the same sequence of states (the first save, then ``--saves``
incremental ones) in its own child process and fresh directory; nothing is deleted
between saves (no retention), so growth per save is what a save adds:

1. castore, ``compression="auto"``; 2. castore, ``compression="none"`` (castore's default);
   on a castore without the keyword, "auto" is reported as not available and "none" falls
   back to plain ``Store(path)``, labelled so.  Even saves block, odd saves are
   ``save_async``: "save s" is the median blocking save, "block s" the median time until
   ``save_async`` returns.
3. DreamerV3's own writer, emulated: embodied's replay writes each completed 1024-step
   chunk as one ``np.savez_compressed`` file with every key; ``elements.Checkpoint`` pickles
   each component's ``save()`` (the agent's arrays; the replay's small state; the step) into
   a folder per step, then ``done`` and ``latest``.
4. ``np.savez`` (uncompressed) of the whole state, one file per step.
5. orbax-checkpoint's ``CheckpointManager`` with ``StandardSave`` (async: "block s" is
   until ``save`` returns, "save s" until ``wait_until_finished``), if installed.

Every writer fsyncs what it writes (castore commits durably, so the others must too) and
``os.sync()`` runs before each timed save.  Disk is measured as allocated blocks under
the writer's directory.  Restores of the latest step run in a fresh child process each:
"restore s" (castore: verified reads, then ``RingBuffer.load``), the peak RSS above the
child's RSS before loading, and a bit-exact check of every array against xxh3 digests
taken at save time (replay fields in insertion order).  The np.load baseline is the
restore of the ``np.savez`` writer: ``np.load`` of one uncompressed ``.npz`` of the state.

A second case repeats everything with incompressible state (random bits as float32 in the
replay and the agent).  Ratios are against baselines measured in the same run; with
``--rounds R`` the writers run R times, in rotated order.  Results go to stdout (and
``--out``); stores live in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid

import frames as frames_  # bench/frames.py (the script's folder is on sys.path)
import measure
import numpy as np
import xxhash
from measure import emit  # bench/measure.py

CHUNK_ROWS = 1024  # embodied's replay chunk length
MB = 1e6
WRITERS = ("castore-auto", "castore-none", "dreamerv3", "savez", "orbax")
CASES = ("real", "random")


# --- the run: the same state sequence in every child ---------------------------------------------


class Run:
    """Replay, agent and step, advanced deterministically from ``spec``."""

    def __init__(self, spec: dict):
        import castore

        self.case, self.seed = spec["case"], spec["seed"]
        self.capacity, self.per_save = spec["capacity"], spec["rows_per_save"]
        self.source = (
            frames_.frames(spec["env"], spec["frames"], spec["seed"], log=sys.stderr) if self.case == "real" else None
        )
        self.replay = castore.RingBuffer(self.capacity, fields=self._fields())
        self.rng = np.random.default_rng(self.seed)
        self.agent = Agent(spec["agent_mb"], self.rng, random_bits=self.case == "random")
        self.step = 0
        self.batches = 0  # 1024-row batches added so far

    def _fields(self) -> dict:
        if self.source is not None:
            return {name: (array.shape[1:], array.dtype) for name, array in self.source.items()}
        return {
            "obs": ((32, 32, 3), np.float32),  # 12,288 bytes a row, as a 64x64x3 uint8 frame
            "action": ((17,), np.float32),
            "reward": ((), np.float32),
            "is_first": ((), bool),
            "is_terminal": ((), bool),
        }

    def batch(self, index: int) -> dict:
        """Rows ``index * 1024 ...`` of the run's sequence (the same in every child)."""
        if self.source is not None:
            rows = slice(index * CHUNK_ROWS, (index + 1) * CHUNK_ROWS)
            return {name: np.array(array[rows]) for name, array in self.source.items()}
        rng = np.random.default_rng((self.seed, index))
        out = {}
        for name, (shape, dtype) in self._fields().items():
            if dtype is bool:
                out[name] = rng.random(CHUNK_ROWS) < 0.005
            else:
                out[name] = _random_bits(rng, (CHUNK_ROWS, *shape))
        return out

    def add(self, rows: int) -> list[dict]:
        """Add ``rows`` new rows; returns them as 1024-row batches."""
        added = [self.batch(self.batches + i) for i in range(rows // CHUNK_ROWS)]
        for batch in added:
            self.replay.add(batch)
        self.batches += len(added)
        self.step += rows
        return added

    def fill(self) -> list[dict]:
        for _ in range(3):
            self.agent.train()  # moments that have seen a few gradients
        return self.add(self.capacity)

    def advance(self) -> list[dict]:
        self.agent.train()
        return self.add(self.per_save)

    def tree(self) -> dict:
        return {"replay": self.replay.save(), "agent": self.agent.save(), "step": np.int64(self.step)}


class Agent:
    """Float32 weights and two Adam moments of the same shapes; ``train()`` changes them all."""

    def __init__(self, weight_mb: int, rng: np.random.Generator, random_bits: bool):
        self.rng, self.random_bits = rng, random_bits
        shapes = {}
        for i in range(max(1, (weight_mb << 20) // (4 << 20))):  # 1024x1024 kernels, 4 MiB each
            shapes[f"layer{i}_kernel"], shapes[f"layer{i}_bias"] = (1024, 1024), (1024,)
        if random_bits:
            self.params = {k: _random_bits(rng, s) for k, s in shapes.items()}
            self.m = {k: _random_bits(rng, s) for k, s in shapes.items()}
            self.v = {k: _random_bits(rng, s) for k, s in shapes.items()}
        else:
            self.params = {k: rng.standard_normal(s, np.float32) * np.float32(0.03) for k, s in shapes.items()}
            self.m = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
            self.v = {k: np.zeros(s, np.float32) for k, s in shapes.items()}

    def train(self) -> None:
        for key, param in self.params.items():
            if self.random_bits:
                for tree in (self.params, self.m, self.v):
                    tree[key][...] = _random_bits(self.rng, param.shape)
                continue
            grad = self.rng.standard_normal(param.shape, np.float32) * np.float32(0.01)
            self.m[key] *= np.float32(0.9)
            self.m[key] += np.float32(0.1) * grad
            self.v[key] *= np.float32(0.999)
            self.v[key] += np.float32(0.001) * grad * grad
            param -= np.float32(4e-5) * self.m[key] / (np.sqrt(self.v[key]) + np.float32(1e-8))

    def save(self) -> dict:
        return {"params": self.params, "m": self.m, "v": self.v}


def _random_bits(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    count = int(np.prod(shape))
    return np.frombuffer(rng.bytes(4 * count), np.float32).reshape(shape).copy()


# --- digests (bit-exact checks without holding a second copy) -------------------------------------


def _hash(array) -> str:
    array = np.asarray(array)
    return f"{array.dtype.str}{array.shape}:{xxhash.xxh3_128_hexdigest(np.ascontiguousarray(array))}"


def digest(tree: dict) -> dict:
    """Per-leaf digests; replay fields hashed in insertion order (oldest row first)."""
    replay, out = tree["replay"], {"step": int(tree["step"])}
    capacity, head, size = len(next(iter(replay["fields"].values()))), int(replay["head"]), int(replay["size"])
    start = (head - size) % capacity
    for name, field in replay["fields"].items():
        field = np.asarray(field)
        h = xxhash.xxh3_128()
        for lo, hi in ((start, min(start + size, capacity)), (0, max(0, start + size - capacity))):
            if hi > lo:
                h.update(np.ascontiguousarray(field[lo:hi]))
        out[f"replay/{name}"] = f"{field.dtype.str}{field.shape[1:]}x{size}:{h.hexdigest()}"
    out["replay/added"] = int(replay["added"])
    for group, leaves in tree["agent"].items():
        for key, value in leaves.items():
            out[f"agent/{group}/{key}"] = _hash(value)
    return out


def state_bytes(tree: dict) -> int:
    fields = sum(np.asarray(a).nbytes for a in tree["replay"]["fields"].values())
    return fields + sum(np.asarray(a).nbytes for leaves in tree["agent"].values() for a in leaves.values())


# --- disk helpers ---------------------------------------------------------------------------------


def disk_bytes(path: str) -> int:
    """Bytes allocated on disk under ``path`` (like ``du``; sparse files count what they use)."""
    if os.path.isfile(path):
        return os.stat(path).st_blocks * 512
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_blocks * 512
            except FileNotFoundError:  # a writer's temporary file, gone
                pass
    return total


def fsync_write(path: str, data) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flatten(tree, prefix: str = "") -> dict:
    """``{"a/b/c": leaf}`` of nested dicts; TrackedArrays as plain arrays."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}/{key}" if prefix else key))
        return out
    return {prefix: np.asarray(tree)}


def unflatten(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return out


class NotAvailable(Exception):
    """The writer cannot run here (reported in its row, not an error)."""


# --- the writers ----------------------------------------------------------------------------------


class CastoreWriter:
    def __init__(self, path: str, compression: str):
        import castore

        self.castore, self.path, self.compression = castore, path, compression
        self.label = f'castore compression="{compression}"'
        try:
            self.store = castore.Store(path, compression=compression)
            self.kwargs = {"compression": compression}
        except TypeError as exc:
            shutil.rmtree(path, ignore_errors=True)
            if compression != "none":
                raise NotAvailable(f"not available in this castore ({exc})") from None
            self.store = castore.Store(path)
            self.kwargs = {}
            self.label = "castore Store(path) (no compression keyword in this castore: stores raw)"
        self.saves = 0
        self.new_bytes: list[int] = []

    def save(self, step: int, tree: dict, fresh: list) -> tuple[float, float, str]:
        self.saves += 1
        started = time.perf_counter()
        if self.saves % 2:  # the first save and every other: blocking
            result = self.store.save(step, tree)
            blocked = seconds = time.perf_counter() - started
            kind = "blocking"
        else:
            handle = self.store.save_async(step, tree)
            blocked = time.perf_counter() - started
            result = handle.result()
            seconds = time.perf_counter() - started
            kind = "async"
        self.new_bytes.append(result.new_bytes)
        return blocked, seconds, kind

    def finish(self, tree: dict) -> dict:
        """Close; then the replay alone in a fresh store of the same settings: stored vs raw."""
        self.store.close()
        path = self.path + "-replay-only"
        with self.castore.Store(path, **self.kwargs) as store:
            store.save(0, {"replay": tree["replay"]})
            stats = store.stats()
        out = {
            "replay_raw": sum(np.asarray(a).nbytes for a in tree["replay"]["fields"].values()),
            "replay_stored": stats.stored_bytes,
            "replay_disk": disk_bytes(path),
            "median_new_bytes": statistics.median(self.new_bytes[1:]),
        }
        shutil.rmtree(path, ignore_errors=True)
        return out


def restore_castore(path: str, spec: dict) -> dict:
    import castore

    with castore.Store(path, readonly=True) as store:
        state = store.load(verify=True)
    replay = castore.RingBuffer(spec["capacity"])
    replay.load(state["replay"])
    state["replay"] = replay.save()
    return state


class DreamerWriter:
    """embodied's replay chunks (``np.savez_compressed``, 1024 rows, every key) plus
    ``elements.Checkpoint``'s pickles of each component's ``save()``, a folder per step."""

    label = "DreamerV3 writer (savez_compressed chunks + pickled agent)"
    wants_rows = True

    def __init__(self, path: str):
        self.path = path
        self.replay_dir, self.ckpt_dir = os.path.join(path, "replay"), os.path.join(path, "ckpt")
        os.makedirs(self.replay_dir)
        os.makedirs(self.ckpt_dir)
        self.chunks: list[str] = []
        self.chunk_bytes = 0
        self.added = 0

    def _write_chunk(self, batch: dict) -> None:
        length = len(next(iter(batch.values())))
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{len(self.chunks):08d}-{uuid.uuid4().hex}-{length}.npz"
        with io.BytesIO() as stream:  # as embodied's Chunk.save: into memory, then one write
            np.savez_compressed(stream, **batch)
            data = stream.getvalue()
        fsync_write(os.path.join(self.replay_dir, name), data)
        self.chunks.append(name)
        self.chunk_bytes += len(data)
        self.added += length

    def save(self, step: int, tree: dict, fresh: list) -> tuple[float, float, str]:
        started = time.perf_counter()
        for batch in fresh:
            self._write_chunk(batch)
        fsync_dir(self.replay_dir)
        folder = os.path.join(self.ckpt_dir, f"{step:012d}")
        os.makedirs(folder)
        components = {
            "agent": tree["agent"],
            "replay": {"added": self.added, "chunks": list(self.chunks)},  # embodied's replay.save(): small
            "step": int(step),
        }
        for name, value in components.items():
            fsync_write(os.path.join(folder, f"{name}.pkl"), pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        fsync_write(os.path.join(folder, "done"), b"")
        fsync_dir(folder)
        fsync_write(os.path.join(self.ckpt_dir, "latest"), os.path.basename(folder).encode())
        seconds = time.perf_counter() - started
        return seconds, seconds, "blocking"

    def finish(self, tree: dict) -> dict:
        fields = tree["replay"]["fields"].values()
        row_bytes = sum(np.asarray(a).nbytes // len(a) for a in fields)
        raw = row_bytes * self.added  # every row ever written, as the chunk files hold them
        return {"replay_raw": raw, "replay_stored": self.chunk_bytes, "replay_disk": disk_bytes(self.replay_dir)}


def restore_dreamer(path: str, spec: dict) -> dict:
    ckpt = os.path.join(path, "ckpt")
    with open(os.path.join(ckpt, "latest")) as f:
        folder = os.path.join(ckpt, f.read().strip())
    state = {}
    for name in ("agent", "replay", "step"):
        with open(os.path.join(folder, f"{name}.pkl"), "rb") as f:
            state[name] = pickle.load(f)
    capacity, fields, filled = spec["capacity"], {}, 0
    wanted, total = [], 0  # the newest chunks that fill the capacity, like embodied's replay load
    for name in reversed(sorted(state["replay"]["chunks"])):
        if total >= capacity:
            break
        wanted.append(name)
        total += int(name.rsplit("-", 1)[1].removesuffix(".npz"))
    skip = total - capacity  # rows of the oldest loaded chunk that no longer fit
    for name in reversed(wanted):
        with np.load(os.path.join(path, "replay", name)) as npz:
            data = {key: npz[key][skip:] for key in npz.files}
        skip = 0
        length = len(data["obs"])
        for key, array in data.items():
            if key not in fields:
                fields[key] = np.zeros((capacity, *array.shape[1:]), array.dtype)
            fields[key][filled : filled + length] = array
        filled += length
    state["replay"] = {"fields": fields, "head": filled % capacity, "size": filled, "added": state["replay"]["added"]}
    return state


class SavezWriter:
    label = "np.savez of the whole state per step"

    def __init__(self, path: str):
        self.path = path
        os.makedirs(path)

    def save(self, step: int, tree: dict, fresh: list) -> tuple[float, float, str]:
        started = time.perf_counter()
        arrays = flatten(tree)
        target = os.path.join(self.path, f"{step:012d}.npz")
        with open(target, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.path)
        seconds = time.perf_counter() - started
        return seconds, seconds, "blocking"

    def finish(self, tree: dict) -> dict:
        return {}


def restore_savez(path: str, spec: dict) -> dict:
    latest = max(name for name in os.listdir(path) if name.endswith(".npz"))
    with np.load(os.path.join(path, latest)) as npz:
        return unflatten({key: npz[key] for key in npz.files})


class OrbaxWriter:
    label = "orbax-checkpoint CheckpointManager (StandardSave)"

    def __init__(self, path: str):
        try:
            import orbax.checkpoint as ocp
        except ImportError as exc:
            raise NotAvailable(f"not installed: {exc}") from None
        self.label += f" {getattr(ocp, '__version__', '')}".rstrip()
        self.ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(path, options=options)

    def save(self, step: int, tree: dict, fresh: list) -> tuple[float, float, str]:
        started = time.perf_counter()
        arrays = unflatten(flatten(tree))  # TrackedArrays and ints as numpy arrays
        self.manager.save(step, args=self.ocp.args.StandardSave(arrays))
        blocked = time.perf_counter() - started
        self.manager.wait_until_finished()
        return blocked, time.perf_counter() - started, "async"

    def finish(self, tree: dict) -> dict:
        self.manager.close()
        return {}


def restore_orbax(path: str, spec: dict) -> dict:
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(path) as manager:
        return manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())


def make_writer(name: str, path: str):
    if name.startswith("castore-"):
        return CastoreWriter(path, name.split("-", 1)[1])
    return {"dreamerv3": DreamerWriter, "savez": SavezWriter, "orbax": OrbaxWriter}[name](path)


RESTORERS = {
    "castore-auto": restore_castore,
    "castore-none": restore_castore,
    "dreamerv3": restore_dreamer,
    "savez": restore_savez,
    "orbax": restore_orbax,
}


# --- the child processes --------------------------------------------------------------------------


def child_save(spec: dict) -> dict:
    path = spec["dir"]
    try:
        writer = make_writer(spec["writer"], path)
    except NotAvailable as exc:
        return {"unavailable": str(exc)}
    run = Run(spec)
    wants_rows = getattr(writer, "wants_rows", False)
    fresh = run.fill()
    first = None
    saves: dict[str, list] = {"blocking": [], "async": []}
    blocks, disk = [], []
    for i in range(spec["saves"] + 1):
        if i:
            fresh = run.advance()
        tree = run.tree()
        os.sync()
        blocked, seconds, kind = writer.save(run.step, tree, fresh if wants_rows else [])
        fresh = []
        disk.append(disk_bytes(path))
        if i == 0:
            first = seconds
            continue
        saves[kind].append(seconds)
        if kind == "async":
            blocks.append(blocked)
    tree = run.tree()
    extra = writer.finish(tree)
    return {
        "label": writer.label,
        "first_s": first,
        "save_s": saves["blocking"] or saves["async"],
        "block_s": blocks or saves["blocking"],
        # the mean over the incremental saves: castore's LMDB keeps disk blocks allocated a
        # write ahead, which moves single-save differences around but not their sum
        "growth": (disk[-1] - disk[0]) / max(1, len(disk) - 1),
        "growth_each": [b - a for a, b in zip(disk, disk[1:])],
        "total_disk": disk_bytes(path),
        "state_bytes": state_bytes(tree),
        "digest": digest(tree),
        **extra,
    }


def _rss() -> tuple[int, int]:
    """(current RSS, peak RSS) in bytes.

    On Linux, ``/proc/self/status`` after resetting the peak (``clear_refs`` 5):
    ``getrusage().ru_maxrss`` survives ``exec`` and would start at the parent's RSS at fork.
    Elsewhere ``ru_maxrss`` (the peak) for both.
    """
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = rss if sys.platform == "darwin" else rss * 1024
        return rss, rss


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def child_restore(spec: dict) -> dict:
    restorer = RESTORERS[spec["writer"]]
    if spec["writer"] == "orbax":
        import orbax.checkpoint  # noqa: F401  (imports are not the restore's memory or time)
    else:
        import castore  # noqa: F401
    os.sync()
    _reset_peak_rss()
    baseline, _ = _rss()
    started = time.perf_counter()
    state = restorer(spec["dir"], spec)
    seconds = time.perf_counter() - started
    _, peak = _rss()
    got, want = digest(state), spec["digest"]
    bad = sorted(key for key in want.keys() | got.keys() if got.get(key) != want.get(key))
    return {"restore_s": seconds, "baseline_rss": baseline, "peak_rss": peak, "exact": not bad, "mismatch": bad[:5]}


def run_child(kind: str, spec: dict) -> dict:
    return measure.run_child(__file__, kind, spec)


# --- the report -----------------------------------------------------------------------------------


def _med(values) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value, digits: int = 3, scale: float = 1.0) -> str:
    if value is None:
        return "n/a"
    return f"{value / scale:,.{digits}f}"


def _ratio(num, den) -> float | None:
    return num / den if num is not None and den else None


def summarize(rounds: list[dict]) -> dict:
    """Merge the rounds of one writer: medians over every sample of every round."""
    ok = [r for r in rounds if "error" not in r and "unavailable" not in r]
    if not ok:
        return {"missing": rounds[0].get("unavailable") or rounds[0].get("error")}
    first = ok[0]
    out = {
        "label": first["label"],
        "growth": _med([r["growth"] for r in ok]),
        "total_disk": _med([r["total_disk"] for r in ok]),
        "save_s": _med([s for r in ok for s in r["save_s"]]),
        "block_s": _med([s for r in ok for s in r["block_s"]]),
        "first_s": _med([r["first_s"] for r in ok]),
        "state_bytes": first["state_bytes"],
        "replay_raw": first.get("replay_raw"),
        "replay_stored": first.get("replay_stored"),
        "replay_disk": first.get("replay_disk"),
        "median_new_bytes": first.get("median_new_bytes"),
    }
    restores = [r["restore"] for r in ok if "restore" in r]
    good = [r for r in restores if "error" not in r]
    out["restore_error"] = next((r["error"] for r in restores if "error" in r), None)
    out["restore_s"] = _med([r["restore_s"] for r in good])
    out["peak_delta"] = _med([r["peak_rss"] - r["baseline_rss"] for r in good])
    out["peak_rss"] = _med([r["peak_rss"] for r in good])
    out["exact"] = all(r["exact"] for r in good) if good else None
    out["mismatch"] = next((r["mismatch"] for r in good if r["mismatch"]), [])
    return out


def table(case: str, results: dict, meta: dict) -> list[str]:
    title = {
        "real": f"real observations ({meta['env_label']})",
        "random": "incompressible state (random bits as float32: replay obs 32x32x3 float32 rows, agent)",
    }[case]
    state = next((r["state_bytes"] for r in results.values() if "state_bytes" in r), 0)
    lines = [
        f"### Case: {title}",
        "",
        f"State {state / MB:,.0f} MB: replay {meta['capacity']:,} rows (+{meta['rows_per_save']:,} new rows per save), "
        f"agent {meta['agent_mb']} MiB of weights + 2 Adam moments; first save, then {meta['saves']} incremental "
        f"saves; {meta['rounds']} round(s).",
        "",
        "| writer | growth / save MB | total disk MB | save s | block s | restore s | restore peak RSS MB (+over baseline / absolute) | bit-exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in WRITERS:
        r = results.get(name)
        if r is None:
            continue
        if "missing" in r:
            lines.append(f"| {name} | {r['missing']} | | | | | | |")
            continue
        exact = "n/a" if r["exact"] is None else ("True" if r["exact"] else f"False {r['mismatch']}")
        restore = _fmt(r["restore_s"]) if not r["restore_error"] else r["restore_error"]
        lines.append(
            f"| {r['label']} | {_fmt(r['growth'], 1, MB)} | {_fmt(r['total_disk'], 0, MB)} | {_fmt(r['save_s'])} | "
            f"{_fmt(r['block_s'])} | {restore} | +{_fmt(r['peak_delta'], 0, MB)} / {_fmt(r['peak_rss'], 0, MB)} | "
            f"{exact} |"
        )
    news = [f"{n} {r['median_new_bytes'] / MB:,.1f} MB" for n, r in results.items() if r.get("median_new_bytes")]
    if news:
        lines += ["", f"castore SaveResult.new_bytes per incremental save (median): {', '.join(news)}."]
    lines += [
        "",
        "Replay component, stored vs raw (castore: the final replay saved alone into a fresh store of the same "
        "settings, stored = StoreStats.stored_bytes, on disk includes LMDB's preallocated blocks; DreamerV3: "
        "every chunk file written):",
        "",
        "| writer | raw MB | stored MB | on disk MB | raw / stored |",
    ]
    lines.append("|---|---|---|---|---|")
    for name in ("castore-auto", "castore-none", "dreamerv3"):
        r = results.get(name, {})
        if r.get("replay_raw"):
            lines.append(
                f"| {name} | {_fmt(r['replay_raw'], 0, MB)} | {_fmt(r['replay_stored'], 1, MB)} | "
                f"{_fmt(r['replay_disk'], 1, MB)} | {_fmt(_ratio(r['replay_raw'], r['replay_stored']), 1)}x |"
            )
    lines += ["", *checks(case, results), ""]
    return lines


def checks(case: str, results: dict) -> list[str]:
    def get(name, key):
        return results.get(name, {}).get(key)

    auto, none = "castore-auto", "castore-none"
    rows = []
    if case == "real":
        state = get(auto, "state_bytes") or get("savez", "state_bytes")
        rss_budget = 1.1 * state + (256 << 20) if state else None
        replay_share = _ratio(get(auto, "replay_stored"), get(auto, "replay_raw"))
        rows = [
            (
                "disk growth per save, castore auto / DreamerV3 writer",
                _ratio(get(auto, "growth"), get("dreamerv3", "growth")),
                1.2,
            ),
            ("replay stored / raw, castore auto", replay_share, 1 / 8),
            ("incremental save, castore auto / castore none", _ratio(get(auto, "save_s"), get(none, "save_s")), 0.8),
            (
                "verified restore, castore auto / np.load of one .npz",
                _ratio(get(auto, "restore_s"), get("savez", "restore_s")),
                0.35,
            ),
            (
                "restore peak RSS above baseline, castore auto / (1.1 x state + 256 MiB)",
                _ratio(get(auto, "peak_delta"), rss_budget),
                1.0,
            ),
            (
                "disk growth per save, castore none / DreamerV3 writer (reference)",
                _ratio(get(none, "growth"), get("dreamerv3", "growth")),
                None,
            ),
            (
                "verified restore, castore none / np.load of one .npz (reference)",
                _ratio(get(none, "restore_s"), get("savez", "restore_s")),
                None,
            ),
        ]
        base = get("savez", "restore_s")
        head = [f"np.load baseline (one uncompressed .npz of the latest state): {_fmt(base)} s", ""]
    else:
        rows = [
            ("incremental save, castore auto / castore none", _ratio(get(auto, "save_s"), get(none, "save_s")), 1.05),
            (
                "disk growth per save, castore auto / castore none",
                _ratio(get(auto, "growth"), get(none, "growth")),
                1.0,
            ),
            ("total disk, castore auto / castore none", _ratio(get(auto, "total_disk"), get(none, "total_disk")), 1.0),
        ]
        head = []
    out = [*head, "| check (same run) | ratio | target | met |", "|---|---|---|---|"]
    for label, value, target in rows:
        met = "n/a" if value is None or target is None else ("yes" if value <= target else "NO")
        out.append(f"| {label} | {_fmt(value)} | {'' if target is None else f'<= {target:.3g}'} | {met} |")
    return out


# --- main -----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=36 * CHUNK_ROWS, help="real frames rendered and added in the run")
    parser.add_argument("--saves", type=int, default=8, help="incremental saves after the first")
    parser.add_argument("--rows-per-save", type=int, default=CHUNK_ROWS, help="new replay rows per save (x1024)")
    parser.add_argument("--agent-mb", type=int, default=32, help="MiB of float32 weights (the moments add 2x)")
    parser.add_argument("--env", choices=frames_.ENVS, default="crafter")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--writers", default=",".join(WRITERS), help=f"comma-separated subset of {','.join(WRITERS)}")
    parser.add_argument("--cases", default=",".join(CASES), help="real,random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", default=None, help="parent of the temporary directory (a local filesystem)")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, spec = args.child[0], json.loads(args.child[1])
        print(json.dumps(child_save(spec) if kind == "save" else child_restore(spec)))
        return 0

    if args.rows_per_save % CHUNK_ROWS or args.frames % CHUNK_ROWS:
        parser.error(f"--frames and --rows-per-save must be multiples of {CHUNK_ROWS}")
    capacity = args.frames - args.saves * args.rows_per_save
    if capacity < CHUNK_ROWS:
        parser.error("--frames must exceed --saves * --rows-per-save by at least 1024")
    writers = [w for w in args.writers.split(",") if w]
    cases = [c for c in args.cases.split(",") if c]
    if not set(writers) <= set(WRITERS) or not set(cases) <= set(CASES):
        parser.error(f"writers are {WRITERS}, cases {CASES}")
    started = time.perf_counter()
    meta_frames = {}
    if "real" in cases:
        frames_.frames(args.env, args.frames, args.seed)  # render now if not cached, outside any timing
        with open(os.path.join(frames_.cache_dir(args.env, args.frames, args.seed), "meta.json")) as f:
            meta_frames = json.load(f)
    env_label = {"crafter": "Crafter, crafter.Env() 64x64", "atari": "Atari Ms. Pac-Man via ale-py, resized 64x64"}[
        args.env
    ]
    meta = {
        "env_label": f"{env_label}, {args.frames:,} frames, random actions",
        "capacity": capacity,
        "rows_per_save": args.rows_per_save,
        "agent_mb": args.agent_mb,
        "saves": args.saves,
        "rounds": args.rounds,
    }
    scratch = tempfile.mkdtemp(prefix="castore-realrun-", dir=args.tmp)
    out_lines = [
        "## bench/real_run.py",
        "",
        f"{os.cpu_count()} cores; temp dir {scratch}; frames cache {meta_frames or 'n/a'}.",
        "growth / save: disk bytes the incremental saves added, per save (mean; no retention); save s: median incremental save "
        "(castore: blocking saves; orbax: until wait_until_finished); block s: until the call returns "
        "(castore: save_async; orbax: save; others block for the whole save); restore: latest step in a "
        "fresh child, page cache warm for every writer alike.",
        "",
    ]
    try:
        for case in cases:
            samples: dict[str, list] = {w: [] for w in writers}
            for round_ in range(args.rounds):
                order = writers[round_ % len(writers) :] + writers[: round_ % len(writers)]
                for writer in order:
                    spec = {
                        "case": case,
                        "writer": writer,
                        "dir": os.path.join(scratch, f"{case}-{writer}-{round_}"),
                        "env": args.env,
                        "frames": args.frames,
                        "capacity": capacity,
                        "rows_per_save": args.rows_per_save,
                        "saves": args.saves,
                        "agent_mb": args.agent_mb,
                        "seed": args.seed,
                    }
                    t0 = time.perf_counter()
                    saved = run_child("save", spec)
                    if "digest" in saved:
                        saved["restore"] = run_child("restore", {**spec, "digest": saved.pop("digest")})
                    shutil.rmtree(spec["dir"], ignore_errors=True)
                    samples[writer].append(saved)
                    status = saved.get("unavailable") or saved.get("error") or "ok"
                    print(
                        f"[{case}] {writer} round {round_}: {status} ({time.perf_counter() - t0:.0f} s)",
                        file=sys.stderr,
                    )
            results = {w: summarize(s) for w, s in samples.items()}
            out_lines += table(case, results, meta)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out_lines.append(f"Total wall time {time.perf_counter() - started:.0f} s.")
    emit(out_lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
