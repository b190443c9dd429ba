"""The edges a new user hits when opening a store (issue 12, item 5).

A path that holds no store is never written to unless the caller creates one; URLs are
refused before anything is created; another process's store reads read-only while its
writer saves, and without permission to write it; every order of ``Store`` objects on one
path in one process works; a file in the way, a missing parent or a missing permission is
a one-line ``castore`` error that says what to do.

Real LMDB stores in temporary directories; what needs another process (a writer, a user
without root's rights) runs in a child, and every wait is on a pipe, bounded by
``PATIENCE``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from workload import REPO_ROOT, Child, assert_state_equal

import castore
from castore import (
    CastoreError,
    StoreLockedError,
    StoreNotFoundError,
    StorePermissionError,
    UnsupportedLocationError,
    UsageError,
)
from castore.storage.lmdb_engine import LmdbBackend

#: seconds: the bound on "at once" a loaded 2-core machine keeps (a passing test waits far less)
PATIENCE = 30

#: the state saved at a step, by this process and by the children (one definition for both)
TREE_CODE = """
import numpy as np

def tree(step):
    rng = np.random.default_rng(step)
    return {
        "model": {"w": rng.standard_normal((128, 64), np.float32), "step": np.int64(step)},
        "notes": ["run", int(step), b"\\x00\\xff"],
    }
"""
_tree_namespace: dict = {}
exec(TREE_CODE, _tree_namespace)
tree = _tree_namespace["tree"]


def saved_store(path: Path, steps=(1, 2)) -> Path:
    with castore.Store(path) as store:
        for step in steps:
            store.save(step, tree(step))
    return path


def snapshot(top: Path) -> dict:
    """Every entry under ``top`` (``top`` itself too): kind, mode, size and content digest."""
    entries = {}
    for path in [top, *sorted(top.rglob("*"))] if top.exists() else []:
        info = path.lstat()
        digest = content_digest(path) if stat.S_ISREG(info.st_mode) else None
        entries[str(path.relative_to(top))] = (
            stat.S_IFMT(info.st_mode),
            stat.S_IMODE(info.st_mode),
            info.st_size,
            digest,
        )
    return entries


def content_digest(path: Path, block: int = 1 << 20) -> str:
    """A digest of the file's bytes that reads only its data, not its holes (a store's
    data.mdb is a sparse file as large as the LMDB map).  Holes read as zeros and the
    filesystem may report a run of zeros either way, so the digest is over the size and
    the aligned blocks that are not all zeros, with their offsets: equal iff the bytes are."""
    digest = hashlib.blake2b()
    with open(path, "rb") as file:
        fd = file.fileno()
        end = os.fstat(fd).st_size
        digest.update(end.to_bytes(8, "little"))
        offset, seen = 0, set()
        while offset < end:
            try:
                offset = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            stop = os.lseek(fd, offset, os.SEEK_HOLE)
            for start in range(offset // block * block, stop, block):
                if start not in seen:
                    seen.add(start)
                    data = os.pread(fd, block, start)
                    if data.count(0) != len(data):
                        digest.update(start.to_bytes(8, "little") + data)
            offset = stop
    return digest.hexdigest()


def assert_one_line_error(exc: BaseException, kind: type = CastoreError) -> str:
    """A castore error of ``kind`` on one line, with no OSError or lmdb.Error chained to it."""
    assert isinstance(exc, kind), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert message and "\n" not in message, message
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__), repr(exc.__context__)
    return message


def run_child(code: str, *args, user=(), timeout: float = 120) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (as ``user``, a command prefix), given ``tree`` too."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.path.dirname(__file__)]))
    return subprocess.run(
        [*user, sys.executable, "-c", TREE_CODE + textwrap.dedent(code), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- 1. a path that holds no store is never written to -------------------------------------------


def make_missing(path: Path) -> None:
    pass


def make_empty(path: Path) -> None:
    path.mkdir()


def make_unrelated(path: Path) -> None:
    path.mkdir()
    (path / "notes.txt").write_text("someone else's files")
    (path / "sub").mkdir()
    (path / "sub" / "weights.npy").write_bytes(b"\x93NUMPY" + bytes(100))


def make_empty_data_file(path: Path) -> None:  # a creation killed before LMDB wrote a page
    path.mkdir()
    (path / "data.mdb").write_bytes(b"")


NOT_A_STORE = {
    "missing": make_missing,
    "empty": make_empty,
    "unrelated": make_unrelated,
    "empty_data": make_empty_data_file,
}
NOT_CREATING = {
    "create=False": dict(create=False),
    "readonly=True": dict(readonly=True),
    "readonly=True, create=False": dict(readonly=True, create=False),
}


@pytest.mark.parametrize("options", NOT_CREATING.values(), ids=NOT_CREATING.keys())
@pytest.mark.parametrize("kind", NOT_A_STORE)
def test_a_path_without_a_store_is_refused_and_left_byte_for_byte(tmp_path, kind, options):
    path = tmp_path / "parent" / "run"
    path.parent.mkdir()
    NOT_A_STORE[kind](path)
    before = snapshot(tmp_path)
    with pytest.raises(StoreNotFoundError) as caught:
        castore.Store(path, **options)
    message = assert_one_line_error(caught.value, StoreNotFoundError)
    assert str(path) in message and "check the path" in message, message
    assert snapshot(tmp_path) == before  # no data.mdb, no lock.mdb, no directory made
    assert not (path / "lock.mdb").exists() and not (path / "writer.lock").exists()
    with pytest.raises(StoreNotFoundError):  # nor does a second try, or Checkpoint
        castore.Checkpoint(path, **options)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["empty", "unrelated"])
def test_loading_from_a_folder_that_is_not_a_store_leaves_it_alone(tmp_path, kind):
    other = tmp_path / "pretrained"
    NOT_A_STORE[kind](other)
    before = snapshot(other)
    ckpt = castore.Checkpoint(tmp_path / "run")
    ckpt.model = {"w": np.zeros(4, np.float32)}
    with pytest.raises(StoreNotFoundError, match="check the path"):
        ckpt.load(other)
    assert snapshot(other) == before
    ckpt.close()


def test_a_store_whose_creation_stopped_before_its_config_is_not_opened_without_create(tmp_path):
    path = tmp_path / "store"
    backend = castore.storage.open_backend(path)  # the tables, as a creator killed before its config left them
    backend.close()
    before = snapshot(path)
    for options in NOT_CREATING.values():
        with pytest.raises(StoreNotFoundError, match="create=True") as caught:
            castore.Store(path, **options)
        assert_one_line_error(caught.value)
    assert snapshot(path)["data.mdb"] == before["data.mdb"]
    with castore.Store(path) as store:  # create=True finishes the job
        store.save(1, tree(1))
        assert_state_equal(store.load(1), tree(1))


# --- 2. URLs are refused, nothing is created -----------------------------------------------------

URLS = [
    "gs://bucket/run",
    "http://example.com/store",
    "https://example.com/store",
    "hdfs://namenode/run",
    "az://container/run",
    "ftp://example.com/run",
    "file:///tmp/run",
    str(Path("gs://bucket/run")),  # pathlib collapses the slashes: 'gs:/bucket/run'
    Path("s3://bucket/run"),
]


@pytest.mark.parametrize("url", URLS, ids=str)
def test_a_url_is_refused_with_a_typed_error_and_nothing_is_created(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    for opener in (castore.Store, castore.Checkpoint):
        for options in ({}, {"create": False}, {"readonly": True}):
            with pytest.raises(UnsupportedLocationError) as caught:
                opener(url, **options)
            message = assert_one_line_error(caught.value, UsageError)
            scheme = os.fspath(url).split(":", 1)[0]
            assert caught.value.scheme == scheme and caught.value.location == os.fspath(url)
            if scheme in ("gs", "s3", "http", "https", "hdfs", "az"):
                assert "is not supported" in message and "mirror='s3://" in message, message
            if scheme == "file":
                assert "'/tmp/run'" in message, message  # the local path to pass instead
    assert list(tmp_path.iterdir()) == []  # no 'gs:' folder


@pytest.mark.parametrize("url", ["s3://bucket/run/ckpt", "S3://bucket/run"])
def test_an_s3_url_opens_only_read_only_and_says_how_to_write_to_it(tmp_path, monkeypatch, url):
    """A bucket is written through a local store's mirror; a writable open of one is refused
    before any request (the read-only open is tested against a real server in test_mirror)."""
    monkeypatch.chdir(tmp_path)
    for opener in (castore.Store, castore.Checkpoint):
        for options in ({}, {"create": False}):
            with pytest.raises(UsageError) as caught:
                opener(url, **options)
            message = assert_one_line_error(caught.value, UsageError)
            assert "opens read-only" in message and "mirror=" in message and "castore push" in message, message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", ["run:3/ckpt", "C:/runs/exp", "./gs:/bucket", "a:b//c", "x:", "memory://edges"])
def test_paths_with_a_colon_but_no_url_stay_plain_paths(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    with castore.Store(path) as store:
        store.save(1, tree(1))
    with castore.Store(path, readonly=True) as store:
        assert_state_equal(store.load(1), tree(1))
    if not path.startswith("memory://"):
        assert (tmp_path / path / "data.mdb").is_file()


# --- 3. another store opens read-only: beside its writer, without write permission ---------------

WRITER = """
    import sys, threading, castore
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    with castore.Store(sys.argv[2], keep=castore.Keep(last=3)) as store:
        step = 0
        while not stop.is_set() and step < 20000:
            store.save(step, tree(step))
            print("committed", step, flush=True)
            step += 1
    print("done", step, flush=True)
"""


def committed_after(writer: Child, step: int) -> int:
    """Wait for the writer to commit a step after ``step``; returns it."""
    while True:
        later = int(writer.expect("committed", PATIENCE)[1])
        if later > step:
            return later


def test_a_read_only_open_loads_the_latest_step_while_another_process_saves(tmp_path):
    path = tmp_path / "store"
    with Child("writer", path, stdin=True, script=TREE_CODE + textwrap.dedent(WRITER)) as writer:
        writer.expect("committed", PATIENCE)  # the store exists, and its writer holds the lock
        with castore.Store(path, readonly=True, create=False) as reader:
            seen = []
            for _ in range(3):
                state = reader.load()  # the latest committed step, resolved in the same snapshot
                step = int(state["model"]["step"])
                assert_state_equal(state, tree(step))
                seen.append(step)
                committed_after(writer, step)  # the writer goes on past what was read
            with reader.backend.read():  # a reader's snapshot does not hold the writer up either
                committed_after(writer, committed_after(writer, seen[-1]))
            later = reader.load()
            assert int(later["model"]["step"]) > seen[-1] and seen == sorted(seen)
            assert_state_equal(later, tree(int(later["model"]["step"])))
            with castore.Store(path, create=False) as second, pytest.raises(StoreLockedError, match=str(writer.pid)):
                second.save(10**6, tree(0))  # one writer per store: this process only reads
        writer.send("stop")
        writer.expect("done", PATIENCE)
        assert writer.finish(PATIENCE) == 0, writer.describe()
    with castore.Store(path, readonly=True) as store:
        assert store.verify().ok


READ_AS_OTHER_USER = """
    import json, logging, sys, castore
    logging.basicConfig(level=logging.WARNING)
    def attempt(fn):
        try:
            return ["ok", fn()]
        except Exception as exc:
            return [type(exc).__name__, str(exc), isinstance(exc, castore.CastoreError)]
    def load(path, **options):
        with castore.Store(path, **options) as store:
            state = store.load()
            same = all(bool((state[k]["w"] == tree(2)[k]["w"]).all()) for k in ["model"]) and state["notes"] == tree(2)["notes"]
            return [store.latest(), same]
    def save(path, **options):
        with castore.Store(path, **options) as store:
            store.save(3, tree(3))
            return "saved"
    def checkpoint(path):
        ckpt = castore.Checkpoint(path, readonly=True)
        ckpt.model = {}
        step = ckpt.load(keys=["model"])
        ckpt.close()
        return step
    out = {}
    for name in sys.argv[1:]:
        out[name] = {
            "readonly": attempt(lambda: load(name, readonly=True, create=False)),
            "readonly_default": attempt(lambda: load(name, readonly=True)),
            "checkpoint": attempt(lambda: checkpoint(name)),
            "writable_open": attempt(lambda: load(name)),
            "save": attempt(lambda: save(name, create=False)),
        }
    print(json.dumps(out))
"""


def test_a_store_this_user_cannot_write_loads_read_only_and_says_so_when_written(as_other_user):
    user, top = as_other_user
    # read-only files in a read-only directory; and LMDB's files writable (a copy that kept
    # their modes) in a read-only directory without writer.lock, which a save must create
    locked, lockable = saved_store(top / "readonly"), saved_store(top / "lockable")
    (lockable / "writer.lock").unlink()
    for file in locked.iterdir():
        file.chmod(0o444)
    locked.chmod(0o555)
    lockable.chmod(0o555)
    before = {name: snapshot(top / name) for name in ("readonly", "lockable")}
    child = run_child(READ_AS_OTHER_USER, locked, lockable, user=user)
    assert child.returncode == 0, child.stderr[-3000:]
    outcome = json.loads(child.stdout)
    for name in (str(locked), str(lockable)):
        results = outcome[name]
        assert results["readonly"] == ["ok", [2, True]], results
        assert results["readonly_default"] == ["ok", [2, True]], results
        assert results["checkpoint"] == ["ok", 2], results
        kind, message, typed = results["save"]
        assert (kind, typed) == ("StorePermissionError", True) and "readonly=True" in message, results
        assert "\n" not in message
    # opening writable fails at once where LMDB's files cannot be written, with the advice;
    # where they can, it loads, and the first save says what the missing writer.lock needs
    kind, message, typed = outcome[str(locked)]["writable_open"]
    assert (kind, typed) == ("StorePermissionError", True) and "open it with readonly=True" in message
    assert outcome[str(lockable)]["writable_open"] == ["ok", [2, True]]
    assert "writer.lock" in outcome[str(lockable)]["save"][1]
    # without write permission to lock.mdb, LMDB runs without its lock file (and says so)
    assert "takes no reader slot" in child.stderr
    assert snapshot(locked) == before["readonly"], "a read-only open changed the store"
    # LMDB's reader table in lock.mdb is the only thing a reader of the other one writes
    assert {k: v for k, v in snapshot(lockable).items() if k != "lock.mdb"} == {
        k: v for k, v in before["lockable"].items() if k != "lock.mdb"
    }


# --- 4. every order of Store objects on one path in one process ----------------------------------

OPENERS = {
    "writable": dict(),
    "readonly": dict(readonly=True, create=False),
    "create_false": dict(create=False),
    "branch": dict(branch="side"),
}


def use(store: castore.Store, step: int, saved: dict) -> None:
    """Load from ``store`` and, if it may write, save ``step`` to its branch and load it back
    (noted in ``saved``: branch -> steps)."""
    assert_state_equal(store.load(0, branch="main"), tree(0))
    if store.readonly:
        with pytest.raises(UsageError, match="read-only"):
            store.save(step, tree(step))
        return
    store.save(step, tree(step))
    saved.setdefault(store.branch, set()).add(step)
    assert_state_equal(store.load(step), tree(step))


@pytest.mark.parametrize("close_first", ["first", "second"])
@pytest.mark.parametrize("second", OPENERS)
@pytest.mark.parametrize("first", OPENERS)
def test_every_order_of_store_objects_on_one_path_works(tmp_path, first, second, close_first):
    path = saved_store(tmp_path / "store", steps=(0,))
    saved: dict = {"main": {0}}
    a = castore.Store(path, **OPENERS[first])
    b = castore.Store(path, **OPENERS[second])
    try:
        use(a, 1, saved)
        use(b, 2, saved)
        use(a, 3, saved)  # the first goes on working beside the second
        gone, left = (a, b) if close_first == "first" else (b, a)
        gone.close()
        use(left, 4, saved)  # and after the other one closed
    finally:
        a.close()
        b.close()
    # all closed: the engine is gone and its writer lock free (a flock of the closed
    # environment would refuse this new one), and every step saved is there
    assert os.path.realpath(path) not in LmdbBackend._open
    with castore.Store(path, create=False) as store:
        store.save(100, tree(100))
        saved["main"].add(100)
        assert {branch: store.steps(branch=branch) for branch in store.branches()} == {
            branch: sorted(steps) for branch, steps in saved.items()
        }
        assert store.verify().ok


def test_three_stores_opened_read_only_first_then_writable_close_in_every_order(tmp_path):
    path = saved_store(tmp_path / "store", steps=(0,))
    saved: dict = {}
    for order in ([0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]):
        base = 10 * len(saved.get("main", ())) + 10
        stores: list = [
            castore.Store(path, readonly=True, create=False),
            castore.Store(path, create=False),
            castore.Store(path, branch="side"),
        ]
        for round, index in enumerate(order):
            for store in filter(None, stores):
                use(store, base + round, saved)
            stores[index].close()
            stores[index] = None
    with castore.Store(path, readonly=True) as store:
        assert store.steps() == sorted({0} | saved["main"]) and store.steps(branch="side") == sorted(saved["side"])
        assert store.verify().ok


HOLD_AND_SAVE = """
    import sys, castore
    with castore.Store(sys.argv[1], create=False) as store:
        store.save(int(sys.argv[2]), tree(int(sys.argv[2])))
    print("saved", flush=True)
"""


def test_the_writer_lock_goes_with_the_last_writable_store_while_readers_stay(tmp_path):
    path = saved_store(tmp_path / "store", steps=(0,))
    reader = castore.Store(path, readonly=True, create=False)
    writer = castore.Store(path)
    writer.save(1, tree(1))
    held = run_child(HOLD_AND_SAVE, path, 2)
    assert "StoreLockedError" in held.stderr, held.stderr[-2000:]  # this process writes
    writer.close()
    free = run_child(HOLD_AND_SAVE, path, 2)  # the reader left open does not hold the lock
    assert free.returncode == 0 and free.stdout == "saved\n", free.stderr[-2000:]
    assert_state_equal(reader.load(), tree(2))  # and it reads on, the other process's step too
    again = castore.Store(path)  # a writable open takes the lock again
    again.save(3, tree(3))
    assert_state_equal(reader.load(), tree(3))
    again.close()
    reader.close()


def test_a_writable_open_inside_a_read_only_snapshot_of_the_same_thread_is_refused(tmp_path):
    path = saved_store(tmp_path / "store", steps=(0,))
    with castore.Store(path, readonly=True) as reader:
        with reader.backend.read(), pytest.raises(UsageError, match="end the snapshot") as caught:
            castore.Store(path)
        assert_one_line_error(caught.value)
        with castore.Store(path) as writer:  # once the snapshot ended it opens
            writer.save(1, tree(1))
        assert_state_equal(reader.load(), tree(1))


# --- 5. a file in the way, a missing parent, a missing permission --------------------------------


@pytest.mark.parametrize(
    "options", [{}, {"create": False}, {"readonly": True}], ids=["create", "create=False", "readonly"]
)
def test_a_path_that_is_a_file_or_lies_under_one_is_a_one_line_error(tmp_path, options):
    somefile = tmp_path / "somefile"
    somefile.write_text("not a store")
    before = snapshot(tmp_path)
    for path, blocker in ((somefile, "it is a file"), (somefile / "store", f"{somefile} is a file")):
        with pytest.raises(StoreNotFoundError) as caught:
            castore.Store(path, **options)
        message = assert_one_line_error(caught.value, StoreNotFoundError)
        assert blocker in message and "directory" in message, message
    assert snapshot(tmp_path) == before


def test_a_missing_parent_is_refused_without_create_and_made_with_it(tmp_path):
    path = tmp_path / "runs" / "exp1" / "store"
    for options in NOT_CREATING.values():
        with pytest.raises(StoreNotFoundError, match="no such directory") as caught:
            castore.Store(path, **options)
        assert_one_line_error(caught.value)
    assert list(tmp_path.iterdir()) == []
    with castore.Store(path) as store:  # create=True (the default) makes the parents too, as mkdir -p
        store.save(1, tree(1))
    with castore.Store(path, create=False, readonly=True) as store:
        assert_state_equal(store.load(1), tree(1))


PERMISSION_CASES = """
    import json, sys, castore
    out = {}
    for path, options in json.loads(sys.argv[1]):
        try:
            with castore.Store(path, **options) as store:
                store.load()
            out[f"{path} {options}"] = ["ok"]
        except Exception as exc:
            out[f"{path} {options}"] = [type(exc).__name__, str(exc), isinstance(exc, castore.CastoreError)]
    print(json.dumps(out))
"""


def test_missing_permissions_are_one_line_errors_that_say_what_to_do(as_other_user):
    user, top = as_other_user
    shut = saved_store(top / "shut")  # a store in a directory the user may not enter at all
    shut.chmod(0)
    unreadable = saved_store(top / "unreadable")  # its data file may not be read
    (unreadable / "data.mdb").chmod(0)
    (top / "parent").mkdir(mode=0o555)  # a parent in which no store may be made
    cases = [
        [str(shut), {"readonly": True}],
        [str(shut), {}],
        [str(unreadable), {"readonly": True}],
        [str(unreadable), {}],
        [str(top / "parent" / "store"), {}],
        [str(top / "parent" / "deeper" / "store"), {}],
        [str(top / "parent" / "store"), {"create": False}],
    ]
    child = run_child(PERMISSION_CASES, json.dumps(cases), user=user)
    assert child.returncode == 0, child.stderr[-3000:]
    outcome = json.loads(child.stdout)
    results = [outcome[f"{path} {options}"] for path, options in cases]
    for result in results[:6]:
        assert result[0] == "StorePermissionError" and result[2], result
        assert "\n" not in result[1] and "Traceback" not in result[1]
    for result in results[:4]:  # reading would not work either: no readonly=True advice then
        assert "no permission to read" in result[1] and "read permission" in result[1], result
        assert "readonly=True" not in result[1], result
    for result in results[4:6]:
        assert "cannot create store" in result[1] and "choose a directory this user may write" in result[1], result
    assert results[6][0] == "StoreNotFoundError" and "no such directory" in results[6][1], results[6]
    assert not (top / "parent" / "store").exists()
    assert issubclass(StorePermissionError, PermissionError) and issubclass(StorePermissionError, CastoreError)


@pytest.mark.parametrize(
    "options", [dict(readonly=True), dict(create=False), dict()], ids=["readonly", "create=False", "create"]
)
def test_someone_elses_lmdb_file_is_refused_and_left_byte_for_byte(tmp_path, options):
    """An LMDB environment castore did not make (no lock.mdb: copied, or its writer
    cleaned up): the look at it takes no lock, so not even a lock.mdb appears."""
    import lmdb

    path = tmp_path / "theirs"
    env = lmdb.open(str(path), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v")
    env.close()
    (path / "lock.mdb").unlink()
    before = snapshot(tmp_path)
    with pytest.raises(castore.FormatError, match="not a castore store"):
        castore.Store(path, **options)
    assert snapshot(tmp_path) == before


def test_a_writable_open_waiting_for_snapshots_does_not_hold_up_other_stores(tmp_path):
    """A writable open after read-only ones waits until this process's snapshots of that
    store end; opens of other stores meanwhile go on (they used to wait with it)."""
    import threading

    with castore.Store(tmp_path / "a") as a:
        a.save(0, {"x": np.zeros(2)})
    with castore.Store(tmp_path / "b") as b:
        b.save(0, {"x": np.ones(2)})
    reader = castore.Store(tmp_path / "a", readonly=True)
    holding, release = threading.Event(), threading.Event()
    other_opened = threading.Event()

    def hold_snapshot():
        with reader.backend.read():
            holding.set()
            release.wait(60)

    def open_writable():
        with castore.Store(tmp_path / "a") as writable:
            writable.save(1, {"x": np.full(2, 2.0)})

    def open_other():
        with castore.Store(tmp_path / "b", readonly=True) as other:
            assert other.steps() == [0]
        other_opened.set()

    threads = [threading.Thread(target=hold_snapshot)]
    threads[0].start()
    assert holding.wait(30)
    threads.append(threading.Thread(target=open_writable))
    threads[1].start()
    threads.append(threading.Thread(target=open_other))
    threads[2].start()
    try:
        assert other_opened.wait(30), "an open of another store waited for this store's snapshot"
    finally:
        release.set()
        for thread in threads:
            thread.join(60)
    assert reader.steps() == [0, 1]
    reader.close()
