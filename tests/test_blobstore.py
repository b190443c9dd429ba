"""The LMDB layer on its own: refusing truncated data files, creating databases only when
allowed, reading without write permission, stale reader slots, waiting for the writer lock,
and fork().

Every test uses real stores in temporary directories; what could kill a process (a damaged
file) or needs another process (locks, reader slots, users) runs in a child process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
from workload import assert_state_equal

import castore
from castore.errors import FormatError, StoreLockedError, UsageError
from castore.format.schema import Table, missing_tables
from castore.storage.lmdb_engine import LmdbBackend as BlobStore

LATER_TABLES = missing_tables(1)

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN_V1 = Path(__file__).parent / "data" / "store-v1"
#: seconds: the bound on "at once" or "soon" that a loaded 2-core machine keeps (no test
#: here waits this long when it passes; what it tells apart takes far longer or forever)
PATIENCE = 30


def state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {
        "model": {"w": rng.standard_normal((64, 32), np.float32), "step": np.int64(step)},
        "notes": ["run", step, b"\x00\xff"],
    }


def saved_store(path: Path, steps=(1, 2)) -> Path:
    with castore.Store(path, chunk_bytes=4096) as store:
        for step in steps:
            store.save(step, state(step))
    return path


def lmdb_facts(path: Path) -> dict:
    """Used bytes, page size and last transaction id, read without LMDB's lock file."""
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=16)
    try:
        info, psize = env.info(), env.stat()["psize"]
        with env.begin() as txn:
            names = sorted(bytes(key) for key, _ in txn.cursor())
        return {"used": (info["last_pgno"] + 1) * psize, "page": psize, "txnid": info["last_txnid"], "names": names}
    finally:
        env.close()


def python(code: str, *args, user: list[str] = (), timeout: float = 60, **popen) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (as ``user``, a command prefix) and wait for it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")]))
    return subprocess.run(
        [*user, sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def spawn(code: str, *args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def expect_line(child: subprocess.Popen, word: str) -> str:
    line = child.stdout.readline()  # every child prints its line within a second or dies
    assert line.startswith(word), f"child said {line!r}; stderr: {child.stderr.read()[-2000:]}"
    return line


def stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
    child.wait(10)


def reader_pids(blobs: BlobStore) -> set[int]:
    """PIDs in LMDB's reader table (``env.readers()``: a header line, then pid thread txnid)."""
    return blobs.reader_pids()


# --- a truncated data file is refused before LMDB touches a page -----------------------------------

OPEN_AND_LOAD = """
    import sys, castore
    try:
        with castore.Store(sys.argv[1], create=False, readonly=sys.argv[2] == "ro") as store:
            store.load()
        print("ok")
    except castore.CastoreError as exc:
        print(type(exc).__name__, exc)
"""


@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_truncated_data_file_is_refused_with_both_sizes(tmp_path, mode):
    path = saved_store(tmp_path / "store")
    facts = lmdb_facts(path)
    short = facts["used"] - facts["page"]  # the last used page is missing
    os.truncate(path / "data.mdb", short)
    child = python(OPEN_AND_LOAD, path, mode)
    assert child.returncode == 0, f"the opener died: {child.returncode} {child.stderr[-2000:]}"
    assert child.stdout.startswith("CorruptDataError"), child.stdout
    assert f"truncated: {short} bytes, LMDB needs {facts['used']}" in child.stdout
    assert "restore" in child.stdout
    assert os.path.getsize(path / "data.mdb") == short, "a refused open padded the file"


def test_data_file_holding_exactly_its_used_pages_opens(tmp_path):
    path = saved_store(tmp_path / "store")
    os.truncate(path / "data.mdb", lmdb_facts(path)["used"])  # as a compacted copy is
    with castore.Store(path, create=False, readonly=True) as store:
        assert_state_equal(store.load(2), state(2))
    with castore.Store(path, create=False) as store:  # the writable map grows the file again
        store.save(3, state(3))
        assert_state_equal(store.load(2), state(2))


# --- named databases: created in a new store, or by the writer only ---------------------------------


def test_a_new_store_gets_every_database_in_one_transaction(tmp_path):
    blobs = BlobStore.open(str(tmp_path / "store"))
    try:
        assert all(blobs.has_table(t) for t in Table)
        assert blobs.generation() == 1
    finally:
        blobs.close()


def test_opening_an_existing_store_writes_nothing(tmp_path):
    path = saved_store(tmp_path / "store")
    before = lmdb_facts(path)
    with castore.Store(path) as store:
        assert_state_equal(store.load(), state(2))
    assert lmdb_facts(path)["txnid"] == before["txnid"]


def test_format1_store_gets_its_later_databases_only_from_the_writer(tmp_path):
    path = tmp_path / "store"
    path.mkdir()
    shutil.copyfile(GOLDEN_V1 / "data.mdb", path / "data.mdb")
    before = lmdb_facts(path)
    blobs = BlobStore.open(str(path))
    try:
        assert not any(blobs.has_table(t) for t in LATER_TABLES)
        assert blobs.generation() == before["txnid"]  # a writable open wrote nothing
        with blobs.read():  # a reader of this process is open meanwhile: creation waits for it
            done = threading.Event()
            worker = threading.Thread(target=lambda: (blobs.acquire_writer(), done.set()))
            worker.start()
            assert not done.wait(0.3), "databases were created while a transaction was open"
        worker.join(30)
        assert done.is_set()
        assert all(blobs.has_table(t) for t in LATER_TABLES)
        with blobs.read() as txn:
            assert txn.count(Table.TAGS) == 0
    finally:
        blobs.close()
    assert {t.value.encode() for t in LATER_TABLES} <= set(lmdb_facts(path)["names"])


@pytest.mark.parametrize("readonly", [False, True])
def test_lmdb_file_without_a_meta_database_is_refused_and_left_alone(tmp_path, readonly):
    path = tmp_path / "other"
    env = lmdb.open(str(path), max_dbs=2)
    with env.begin(write=True) as txn:
        txn.put(b"someone", b"else's data")
    env.close()
    before = lmdb_facts(path)
    with pytest.raises(FormatError, match="not a castore store"):
        BlobStore.open(str(path), readonly=readonly)
    assert lmdb_facts(path) == before
    assert str(path) not in BlobStore._open, "a refused open stayed registered"


# --- reading without write permission ---------------------------------------------------------------


READ_CASES = """
    import json, logging, sys, castore
    logging.basicConfig(level=logging.WARNING)
    for path, readonly in json.loads(sys.argv[1]):
        try:
            with castore.Store(path, create=False, readonly=readonly) as store:
                state = store.load(2)
            print(json.dumps([path, "ok", float(state["model"]["w"].sum())]), flush=True)
        except castore.CastoreError as exc:
            print(json.dumps([path, type(exc).__name__, str(exc)]), flush=True)
"""


def test_read_only_open_without_write_permission_reads_without_a_lock_file(as_other_user):
    user, top = as_other_user
    expected = float(state(2)["model"]["w"].sum())
    paths = {name: saved_store(top / name) for name in ("lockfile", "nolockfile", "writable", "unreadable")}
    (paths["nolockfile"] / "lock.mdb").unlink()
    (paths["unreadable"] / "data.mdb").chmod(0)
    for path in paths.values():
        for file in path.iterdir():
            file.chmod(file.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        path.chmod(0o555)
    cases = [
        [str(paths["lockfile"]), True],
        [str(paths["nolockfile"]), True],
        [str(paths["writable"]), False],
        [str(paths["unreadable"]), True],
    ]
    child = python(READ_CASES, json.dumps(cases), user=user)
    assert child.returncode == 0, child.stderr[-3000:]
    outcome = {path: rest for path, *rest in map(json.loads, child.stdout.splitlines())}
    for name in ("lockfile", "nolockfile"):
        assert outcome[str(paths[name])] == ["ok", expected], (name, outcome)
    assert child.stderr.count("takes no reader slot") == 2, child.stderr
    kind, message = outcome[str(paths["writable"])]
    assert kind == "StorePermissionError" and "no permission to write" in message and "readonly=True" in message
    kind, message = outcome[str(paths["unreadable"])]
    assert kind == "StorePermissionError" and "no permission to read" in message
    assert not (paths["nolockfile"] / "lock.mdb").exists()


# --- stale reader slots -------------------------------------------------------------------------------

HOLD_A_READ = """
    import sys, time, castore
    store = castore.Store(sys.argv[1], readonly=True)
    with store.backend.read() as txn:
        print("reading", flush=True)
        time.sleep(60)
"""


def killed_reader(path: Path) -> int:
    """The PID of a reader process SIGKILLed inside a read transaction."""
    child = spawn(HOLD_A_READ, path)
    try:
        expect_line(child, "reading")
    finally:
        stop(child)
    assert child.returncode == -signal.SIGKILL
    return child.pid


# The stale slot outlives its reader only while another process has the store open: the
# first process to open it resets LMDB's reader table.


def test_clear_stale_readers_frees_the_slot_of_a_killed_reader(tmp_path):
    path = saved_store(tmp_path / "store")
    blobs = BlobStore.open(str(path))
    try:
        pid = killed_reader(path)
        assert pid in reader_pids(blobs)
        assert blobs.clear_stale_readers() >= 1
        assert pid not in reader_pids(blobs)
        assert blobs.clear_stale_readers() == 0
    finally:
        blobs.close()


def test_taking_the_writer_lock_frees_stale_reader_slots(tmp_path):
    path = saved_store(tmp_path / "store")
    blobs = BlobStore.open(str(path))
    try:
        pid = killed_reader(path)
        assert pid in reader_pids(blobs)
        blobs.acquire_writer()
        assert pid not in reader_pids(blobs)
    finally:
        blobs.close()


# --- waiting for the writer lock ------------------------------------------------------------------------

HOLD_THE_LOCK = """
    import sys
    from castore.storage.lmdb_engine import LmdbBackend
    blobs = LmdbBackend.open(sys.argv[1])
    blobs.acquire_writer()
    print("locked", flush=True)
    sys.stdin.readline()  # until the test sends a line (or goes: EOF)
    blobs.close()
    print("released", flush=True)
"""


@pytest.fixture
def store_path(tmp_path):
    return saved_store(tmp_path / "store", steps=(1,))


@contextlib.contextmanager
def locked_by_another_process(store_path, **open_options):
    """``(holder process, BlobStore)``: the holder has taken the writer lock and holds it
    until a line on its stdin (``let_go(holder)``) or the end of the block."""
    holder = spawn(HOLD_THE_LOCK, store_path)
    try:
        expect_line(holder, "locked")
        blobs = BlobStore.open(str(store_path), **open_options)
        try:
            yield holder, blobs
        finally:
            blobs.close()
    finally:
        stop(holder)


def let_go(holder: subprocess.Popen) -> None:
    holder.stdin.write("let go\n")
    holder.stdin.flush()


def test_waiting_writer_gets_the_lock_once_the_holder_lets_go(store_path):
    with locked_by_another_process(store_path, lock_timeout=PATIENCE) as (holder, blobs):
        asked, outcome = threading.Event(), []

        def wait_for_the_lock() -> None:
            try:
                blobs.acquire_writer()
                outcome.append("after the holder was asked to let go" if asked.is_set() else "while held")
            except BaseException as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=wait_for_the_lock)
        waiter.start()
        waiter.join(0.5)  # meanwhile it waits (a slow machine only waits less of it)
        asked.set()
        let_go(holder)
        waiter.join(PATIENCE + 30)
        assert outcome == ["after the holder was asked to let go"], outcome
        assert (store_path / "writer.lock").read_text() == str(os.getpid())
        assert holder.wait(PATIENCE) == 0
        assert holder.stdout.read() == "released\n"


def test_waiting_writer_gives_up_after_its_timeout_naming_the_holder(store_path):
    with locked_by_another_process(store_path, lock_timeout=0.5) as (holder, blobs):
        start = time.monotonic()
        with pytest.raises(StoreLockedError) as info:
            blobs.acquire_writer()
        waited = time.monotonic() - start
        assert 0.45 <= waited < 0.5 + PATIENCE, waited
        assert info.value.pid == holder.pid
        assert f"PID {holder.pid}" in str(info.value) and "waiting 0.5 s" in str(info.value)
        start = time.monotonic()
        with pytest.raises(StoreLockedError) as info:
            blobs.acquire_writer(timeout=0)  # an explicit 0 overrides lock_timeout
        assert time.monotonic() - start < PATIENCE
        assert "gave up" not in str(info.value)  # it did not wait
        assert holder.poll() is None  # the lock was held all along


def test_without_a_timeout_a_locked_store_raises_at_once(store_path):
    with locked_by_another_process(store_path) as (holder, blobs):
        start = time.monotonic()
        with pytest.raises(StoreLockedError) as info:
            blobs.acquire_writer()
        assert time.monotonic() - start < PATIENCE  # the holder holds it until the block ends
        assert "gave up" not in str(info.value)  # it did not wait
        assert info.value.pid == holder.pid


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "1", True])
def test_lock_timeout_must_be_seconds(store_path, bad):
    with pytest.raises(UsageError, match="lock_timeout"):
        BlobStore.open(str(store_path), lock_timeout=bad)
    assert str(store_path) not in BlobStore._open


# --- fork() ---------------------------------------------------------------------------------------------

FAILED_IN_CHILD = 99


def run_in_fork(child) -> int:
    """Run ``child()`` in a forked process; returns its exit code (``child``'s result)."""
    pid = os.fork()
    if pid == 0:
        code = FAILED_IN_CHILD
        try:
            code = child()
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120  # a child stuck on a lock some parent thread held at the fork
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child hung for 120 s (a lock held across the fork?)")
        time.sleep(0.05)
    assert os.WIFEXITED(status), f"the child died by signal {os.WTERMSIG(status)}"
    return os.WEXITSTATUS(status)


# Python 3.12+ warns about fork() in a process with threads (the store's hashing pool), and
# so does JAX once the framework tests imported it into this process: the child here only
# opens stores and exits, touching neither, and run_in_fork bounds its wait.
pytestmark_fork = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning",
    "ignore:os.fork\\(\\) was called:RuntimeWarning",
)


@pytestmark_fork
def test_forked_child_refuses_the_parents_store_and_opens_its_own(tmp_path):
    path = tmp_path / "store"
    store = castore.Store(path, chunk_bytes=4096)
    try:
        store.save(1, state(1))  # the parent holds the writer lock from here on

        def child() -> int:
            try:
                store.load()
                return 10  # the parent's environment was used
            except UsageError as exc:
                if "fork" not in str(exc):
                    return 11
            with castore.Store(path) as fresh:
                assert_state_equal(fresh.load(1), state(1))
                try:
                    fresh.save(2, state(2))
                    return 12  # two writers
                except StoreLockedError as exc:
                    if exc.pid != os.getppid():
                        return 13
            store.close()  # must leave the parent's writer lock and reader table alone
            return 0

        assert run_in_fork(child) == 0
        assert (path / "writer.lock").read_text() == str(os.getpid())
        assert_state_equal(store.load(1), state(1))
        store.save(2, state(2))
        assert store.steps() == [1, 2]
    finally:
        store.close()
    with castore.Store(path, readonly=True) as again:
        assert_state_equal(again.load(2), state(2))


@pytestmark_fork
def test_fork_while_a_thread_reads_refuses_to_reopen_in_the_child(tmp_path):
    path = saved_store(tmp_path / "store")
    store = castore.Store(path)
    reading, done = threading.Event(), threading.Event()

    def read() -> None:
        with store.backend.read() as txn:
            txn.get(Table.META, b"config")
            reading.set()
            done.wait(30)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert reading.wait(10)

        def child() -> int:
            try:
                castore.Store(path)
                return 10
            except UsageError as exc:
                return 0 if "another thread" in str(exc) else 11

        assert run_in_fork(child) == 0
        # The child left the parent's reader slot alone: it still pins its snapshot.
        assert os.getpid() in reader_pids(store.backend)
    finally:
        done.set()
        reader.join(30)
        store.close()
