"""A deterministic training-like workload for the crash and concurrency tests.

``state_for(step)`` is the state a training run would checkpoint at ``step``: a replay
buffer of which a ring-buffer window plus a few scattered rows change per step, agent
weights of which some change every step and some never do, small leaves of every plain
type castore stores, and the step itself.  The same step gives bit-identical state in
every process, so a subprocess can save it and another process can check what it loads.

Run as a script it is the subprocess side of those tests (the repository root must be
importable; the script adds it to ``sys.path`` itself)::

    python tests/workload.py writer STORE [--count N] [--pause SECONDS] [--wait-go] [--batch-bytes B]
                                          [--tiny-map] [--report-map] [--until-map-sizes K]
                                          [--max-seconds T]
    python tests/workload.py reader STORE [--until-step S] [--tiny-map] [--max-seconds T]
                                          [--epoch E] [--sizes small|full] [--announce]
    python tests/workload.py holder STORE [--max-seconds T]

Every line a script prints is flushed at once, so a parent that SIGKILLs it has read
everything it printed before dying.  :class:`Child` runs a script from a test and
:func:`fingerprint` digests a state for cheap repeated bit-exact comparisons.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass

if __name__ == "__main__":  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

WORKLOAD_PATH = os.path.abspath(__file__)
REPO_ROOT = os.path.dirname(os.path.dirname(WORKLOAD_PATH))


@dataclass(frozen=True)
class Sizes:
    """The shapes of a workload state (``state_for(step, sizes=...)``)."""

    replay_rows: int  #: rows of 16*16*3 = 768 bytes
    window_rows: int  #: ring-buffer rows written per step
    dense_shape: tuple[int, int]  #: float32, new every step
    embed_shape: tuple[int, int]  #: float32, never changes (deduplicated after the first save)
    head_shape: tuple[int, int]  #: float32, new every step


#: About 23 MB of state per step, of which about 6 MB is new each step.
FULL = Sizes(
    replay_rows=16384, window_rows=512, dense_shape=(512, 1024), embed_shape=(4096, 512), head_shape=(1024, 64)
)
#: About 6 MB per step, 1.2 MB new: the kill harness saves and checks thousands of steps.
SMALL = Sizes(replay_rows=4096, window_rows=128, dense_shape=(256, 1024), embed_shape=(1024, 512), head_shape=(256, 64))
SIZES = {"full": FULL, "small": SMALL}

REPLAY_ROW_SHAPE = (16, 16, 3)
SCATTERED_ROWS = 2  # plus a few rows anywhere (prioritised replay updates)
BASE_SEED = 0xC0FFEE

TINY_MAP_BYTES = 1 << 20


# --- the state ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=len(SIZES))
def _base(sizes: Sizes = FULL):
    """The step-independent arrays (cached; callers copy before changing them)."""
    rng = np.random.default_rng(BASE_SEED)
    replay = rng.integers(0, 256, (sizes.replay_rows, *REPLAY_ROW_SHAPE), dtype=np.uint8)
    embed = rng.standard_normal(sizes.embed_shape, dtype=np.float32)
    replay.flags.writeable = False
    embed.flags.writeable = False
    return replay, embed


def changed_rows(step: int, sizes: Sizes = FULL) -> np.ndarray:
    """Replay rows that differ from the base at ``step`` (sorted, unique)."""
    start = (step * sizes.window_rows) % sizes.replay_rows
    window = (start + np.arange(sizes.window_rows)) % sizes.replay_rows
    scattered = np.random.default_rng([BASE_SEED, step, 1]).integers(0, sizes.replay_rows, SCATTERED_ROWS)
    return np.unique(np.concatenate([window, scattered]))


def state_for(step: int, *, epoch: int | None = None, sizes: Sizes = FULL) -> dict:
    """The deterministic state tree saved at ``step``.

    ``epoch`` names a lineage: after a rollback the same step numbers are trained again
    and hold other values.  With an epoch, the tree has a fourth component ``epoch`` (so a
    writer that resumes can tell which lineage it continues) and every value drawn for
    the step depends on it; without one the tree is the one the older tests know.
    """
    step = int(step)
    base_replay, embed = _base(sizes)
    rng = np.random.default_rng([BASE_SEED, step] if epoch is None else [BASE_SEED, step, 2, int(epoch)])
    replay = base_replay.copy()
    rows = changed_rows(step, sizes)
    replay[rows] = rng.integers(0, 256, (len(rows), *REPLAY_ROW_SHAPE), dtype=np.uint8)
    agent = {
        "w": {
            "dense0": rng.standard_normal(sizes.dense_shape, dtype=np.float32),
            "embed": embed.copy(),
            "head": rng.standard_normal(sizes.head_shape, dtype=np.float32),
        },
        "b": {
            "dense0": rng.standard_normal(sizes.dense_shape[1], dtype=np.float32),
            "head": np.full(sizes.head_shape[1], step % 7 - 3, dtype=np.float16),
        },
        "opt": {
            "count": np.int64(step),
            "lr": 1e-3 * 0.99**step,
            "beta": (np.float32(0.9), np.float32(0.999)),
            "nan": math.nan if step % 2 else -0.0,
        },
        "meta": ["run-α", step, None, step % 3 == 0, b"\x00tag\xff" * (step % 4), ("t", 1.5)],
    }
    state = {"replay": replay, "agent": agent, "step": step}
    if epoch is not None:
        state["epoch"] = int(epoch)
    return state


def state_nbytes(state) -> int:
    """Bytes of every array leaf of ``state``."""
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return state.nbytes if isinstance(state, (np.ndarray, np.generic)) else 0


def assert_state_equal(a, b, path: str = "") -> None:
    """Bit-exact equality: same structure, key order, exact types, dtypes, shapes, bytes."""
    where = path or "<root>"
    assert type(a) is type(b), f"{where}: type {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_state_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for index, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{path}/{index}")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert np.shape(a) == np.shape(b), f"{where}: shape {np.shape(a)} != {np.shape(b)}"
        if np.asarray(a).tobytes() != np.asarray(b).tobytes():
            diff = np.flatnonzero(np.asarray(a).reshape(-1).view(np.uint8) != np.asarray(b).reshape(-1).view(np.uint8))
            raise AssertionError(f"{where}: {len(diff)} bytes differ, first at byte {diff[0]}")
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{where}: {a!r} != {b!r} (bitwise)"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def fingerprint(state) -> str:
    """A digest of ``state`` that differs whenever :func:`assert_state_equal` would fail.

    It covers structure, key order, exact types, dtypes, shapes and bytes; use it to check
    many loads cheaply against digests of ``state_for`` computed once.
    """
    import blake3

    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)

    def feed(value) -> None:
        kind = type(value)
        digest.update(f"<{kind.__module__}.{kind.__qualname__}".encode())
        if kind is dict:
            digest.update(str(len(value)).encode())
            for key, item in value.items():
                feed(key)
                feed(item)
        elif kind in (list, tuple):
            digest.update(str(len(value)).encode())
            for item in value:
                feed(item)
        elif isinstance(value, (np.ndarray, np.generic)):
            data = np.ascontiguousarray(value)
            digest.update(f"{data.dtype.str}{data.shape}{data.nbytes}:".encode())
            digest.update(data.reshape(-1).view(np.uint8).data if data.size else b"")
        elif kind is float:
            digest.update(struct.pack("<d", value))
        elif kind is bytes:
            digest.update(f"{len(value)}:".encode() + value)
        elif kind is str:
            data = value.encode("utf-8", "surrogatepass")
            digest.update(f"{len(data)}:".encode() + data)
        else:  # None, bool, int
            digest.update(repr(value).encode())
        digest.update(b">")

    feed(state)
    return digest.hexdigest()


# --- running the scripts from a test --------------------------------------------------------


class Child:
    """A workload script in a subprocess; a thread collects its stdout lines as they come.

    Use as a context manager: leaving it SIGKILLs the process if it still runs and reaps
    it, so no test leaves a child behind.
    """

    def __init__(
        self, command: str, store, *args: str, stdin: bool = False, env: dict | None = None, script: str | None = None
    ):
        """Run ``tests/workload.py command store *args``, or ``script`` (``python -c``) with them."""
        child_env = dict(os.environ, **(env or {}))
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, child_env.get("PYTHONPATH")]))
        self._stderr = tempfile.TemporaryFile()
        self.started = time.monotonic()
        self.command = command
        program = ["-c", script] if script is not None else [WORKLOAD_PATH]
        self.proc = subprocess.Popen(
            [sys.executable, *program, command, os.fspath(store), *map(str, args)],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=child_env,
            text=True,
            encoding="utf-8",
        )
        self.pid = self.proc.pid
        self.lines: list[tuple[float, str]] = []  # (time.monotonic() when read, line)
        self._cond = threading.Condition()
        self._eof = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self._cursor = 0

    def _read(self) -> None:
        for line in self.proc.stdout:
            if not line.endswith("\n"):  # torn by a kill (say() makes that unlikely)
                continue
            with self._cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def expect(self, word: str, timeout: float, nth: int = 1) -> list[str]:
        """Wait for the ``nth`` next line starting with ``word``; returns its words."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._cursor < len(self.lines):
                    words = self.lines[self._cursor][1].split()
                    self._cursor += 1
                    if words and words[0] == word:
                        nth -= 1
                        if nth == 0:
                            return words
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    break
                self._cond.wait(left)
        raise AssertionError(
            f"{'exited' if self._eof else f'no {word!r} line within {timeout}s'} waiting for {word!r} "
            f"from {self.describe()}"
        )

    def words(self, word: str) -> list[list[str]]:
        """Every line read so far that starts with ``word``, as words."""
        with self._cond:
            return [line.split() for _, line in self.lines if line.split()[:1] == [word]]

    def kill(self) -> int:
        """SIGKILL the process (if it still runs), reap it, read the rest of its output."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        return self.finish(10)

    def finish(self, timeout: float) -> int:
        """Wait for the process to exit (SIGKILL it after ``timeout``); returns its exit code."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._thread.join(10)
        return self.proc.returncode

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def send_eof(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def describe(self) -> str:
        with self._cond:
            out = "\n".join(line for _, line in self.lines[-20:])
        return (
            f"{self.command} PID {self.pid} (exit {self.proc.returncode}); last stdout:\n{out}\n"
            f"stderr:\n{self.stderr()[-3000:]}"
        )

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.kill()
        finally:
            self.send_eof()
            self.proc.stdout.close()
            self._stderr.close()


# --- subprocess scripts -------------------------------------------------------------------------


def say(*words) -> None:
    """Print one line in a single write, so a kill cannot tear it (a pipe write is atomic)."""
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()


def _options(args: list[str]) -> dict:
    """``--name value`` and bare ``--flag`` options."""
    options, index = {}, 0
    while index < len(args):
        name = args[index]
        if not name.startswith("--"):
            raise SystemExit(f"unexpected argument {name!r}")
        name = name[2:].replace("-", "_")
        if index + 1 < len(args) and not args[index + 1].startswith("--"):
            options[name] = args[index + 1]
            index += 2
        else:
            options[name] = True
            index += 1
    return options


def _map_size(store) -> int:
    """The LMDB map size of the store's environment (castore internals; 0 if unavailable)."""
    try:
        return store.inspect().map_size()
    except Exception:
        return 0


def _configure(options: dict) -> None:
    import castore.save.pipeline
    import castore.storage.lmdb_engine

    if options.get("tiny_map"):
        castore.storage.lmdb_engine.INITIAL_MAP_BYTES = TINY_MAP_BYTES  # read when the store is opened
    if "batch_bytes" in options:
        castore.save.pipeline.BATCH_BYTES = int(options["batch_bytes"])


def _wait_for_line(word: str, deadline: float) -> None:
    """Block until stdin gives a line starting with ``word`` (or EOF, or the deadline)."""
    import select

    while time.monotonic() < deadline:
        if select.select([sys.stdin], [], [], 0.1)[0]:
            line = sys.stdin.readline()
            if not line or line.split()[:1] == [word]:
                return


def _scribble(state) -> None:
    """Overwrite every array of a state in place (it belongs to the caller after capture)."""
    if isinstance(state, dict):
        for value in state.values():
            _scribble(value)
    elif isinstance(state, np.ndarray) and state.flags.writeable:
        state.view(np.uint8)[...] = 0x5A


def run_writer(path: str, options: dict) -> int:
    """Save steps after the store's latest until ``--count`` saves, a time limit or a kill.

    ``--pause`` sleeps between saves; ``--wait-go`` waits after the first save until stdin
    gives a line ``go``; ``--until-map-sizes K`` stops once the environment
    went through K map sizes; ``--tiny-map`` opens with a 1 MiB initial LMDB map and
    ``--batch-bytes`` sets the chunk transaction size; ``--async`` saves with
    ``save_async`` and overwrites the state's arrays right after the call returns.

    Prints ``open <pid> <latest or -1>``, then per step ``saving <step>`` before the save
    and ``committed <step> <seconds>`` once it returned; ``map <bytes>`` after each save
    with ``--report-map``; ``locked <seconds> <message>`` (exit 3) if another process
    holds the writer lock; ``done`` at a normal end.
    """
    import castore

    _configure(options)
    count = int(options.get("count", 1 << 62))
    deadline = time.monotonic() + float(options.get("max_seconds", 120))
    until_map_sizes = int(options.get("until_map_sizes", 0))
    with castore.Store(path) as store:
        latest = store.latest()
        say("open", os.getpid(), -1 if latest is None else latest)
        sizes = {_map_size(store)}
        if options.get("report_map"):
            say("map", _map_size(store))
        step = 0 if latest is None else latest + 1
        saved = 0
        while saved < count and time.monotonic() < deadline:
            if until_map_sizes and len(sizes) >= until_map_sizes:
                break
            state = state_for(step)
            say("saving", step)
            started = time.monotonic()
            try:
                if options.get("async"):
                    handle = store.save_async(step, state)
                    _scribble(state)  # the save must hold the state as it was at the call
                    handle.result()
                else:
                    store.save(step, state)
            except castore.StoreLockedError as exc:
                say("locked", f"{time.monotonic() - started:.6f}", exc)
                return 3
            say("committed", step, f"{time.monotonic() - started:.6f}")
            sizes.add(_map_size(store))
            if options.get("report_map"):
                say("map", _map_size(store))
            step += 1
            saved += 1
            if saved == 1 and options.get("wait_go"):
                _wait_for_line("go", deadline)
            time.sleep(float(options.get("pause", 0)))
    say("done")
    return 0


def run_reader(path: str, options: dict) -> int:
    """Load the latest step over and over, checking it bit-exact against ``state_for``.

    Stops once it loaded step ``--until-step`` (or a later one), or, without that option,
    the step named by a line ``until <step>`` on stdin; or at the time limit.  Prints
    ``reading <pid>`` once the store is open, then one line ``result <json>`` with the
    number of loads, the steps seen in order of loading, the map sizes its environment
    went through and the tracebacks of any errors.  ``--epoch E`` and ``--sizes small``
    name the state the writer saves (see ``state_for``); ``--announce`` prints
    ``loading <n>`` before the n-th load, so a test can kill the reader inside one.
    """
    import select

    import castore

    _configure(options)
    until = int(options["until_step"]) if "until_step" in options else None
    deadline = time.monotonic() + float(options.get("max_seconds", 60))
    epoch = int(options["epoch"]) if "epoch" in options else None
    sizes = SIZES[options.get("sizes", "full")]
    digests: dict[int, str] = {}  # step -> fingerprint of state_for(step): one full comparison per step
    loads, seen, errors, sizes_seen = 0, [], [], []
    with castore.Store(path, create=False) as store:
        sizes_seen.append(_map_size(store))
        say("reading", os.getpid())
        while time.monotonic() < deadline and len(errors) < 5:
            if until is None and select.select([sys.stdin], [], [], 0)[0]:
                words = sys.stdin.readline().split()
                if words[:1] == ["until"]:
                    until = int(words[1])
            try:
                if options.get("announce"):
                    say("loading", loads + 1)
                tree = store.load(verify=True)
                step = tree["step"]
                if step not in digests:
                    expected = state_for(step, epoch=epoch, sizes=sizes)
                    assert_state_equal(tree, expected, f"<step {step}>")
                    digests[step] = fingerprint(expected)
                elif fingerprint(tree) != digests[step]:
                    assert_state_equal(tree, state_for(step, epoch=epoch, sizes=sizes), f"<step {step}>")
                    raise AssertionError(f"step {step}: fingerprint differs")
                if seen and step < seen[-1]:
                    raise AssertionError(f"latest step went back from {seen[-1]} to {step}")
            except Exception:  # reported to the test, which fails on any
                errors.append(traceback.format_exc())
                continue
            loads += 1
            if not seen or seen[-1] != step:
                seen.append(step)
            if _map_size(store) != sizes_seen[-1]:
                sizes_seen.append(_map_size(store))
            if until is not None and step >= until:
                break
    say("result", json.dumps({"loads": loads, "seen": seen, "map_sizes": sizes_seen, "errors": errors}))
    return 0


def run_holder(path: str, options: dict) -> int:
    """Take the writer lock by saving step 0, print ``holding <pid>``, wait for stdin EOF."""
    import castore

    _configure(options)
    with castore.Store(path) as store:
        store.save(0, state_for(0))
        say("holding", os.getpid())
        deadline = time.monotonic() + float(options.get("max_seconds", 60))
        import select

        while time.monotonic() < deadline:
            ready, _, _ = select.select([sys.stdin], [], [], 0.1)
            if ready and not sys.stdin.readline():
                break
    say("released")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("writer", "reader", "holder"):
        print(__doc__, file=sys.stderr)
        return 2
    command, path, options = argv[0], argv[1], _options(argv[2:])
    return {"writer": run_writer, "reader": run_reader, "holder": run_holder}[command](path, options)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
