"""Write the golden stores that ``tests/test_versions.py`` reads, and define their content.

A store written by an old castore must stay readable forever.  The golden stores were
written once by the castore of a fixed commit and are committed as they are; never
regenerate them with a newer castore (that would test nothing).

``store-v1/`` (store format 1) was written by commit 164d0d9 (castore 0.2.0, "Hash up to 8
chunks per pool task", the commit just before dbb1a7f introduced format 2)::

    git worktree add /tmp/castore-v1 164d0d9
    PYTHONPATH=/tmp/castore-v1 .venv/bin/python tests/data/make_golden.py 1 tests/data/store-v1

``store-v2/`` (store format 2) was written by commit 38f830a (castore 0.3.0)::

    git worktree add /tmp/castore-v2 38f830a
    PYTHONPATH=/tmp/castore-v2 .venv/bin/python tests/data/make_golden.py 2 tests/data/store-v2

``store-v3/`` (store format 3) was written by commit 061472b (castore 0.4.0, the last
commit before format 4)::

    git worktree add /tmp/castore-v3 061472b
    PYTHONPATH=/tmp/castore-v3 .venv/bin/python tests/data/make_golden.py 3 tests/data/store-v3

``store-v4/`` (store format 4) was written by commit 149083b (castore 0.5.0, "Format 4:
per-chunk zstd compression, auto mode per leaf"), with the default ``compression="auto"``::

    git worktree add /tmp/castore-v4 149083b
    PYTHONPATH=/tmp/castore-v4 .venv/bin/python tests/data/make_golden.py 4 tests/data/store-v4

Content (``chunk_bytes`` 4096, the smallest castore allows, so small arrays span chunks):

* steps :data:`STEPS`, each ``state(version, step)``: components ``agent`` (nested dicts
  and a list; float32 of 6 chunks, float64, float16, bfloat16, bool), ``opt`` (a tuple of
  int8 and big-endian uint16 arrays, complex64, datetime64, a numpy int64 scalar, a
  float), ``meta`` (str, int, a 71-bit int, bool, None, bytes of 2 chunks, unicode and
  bytes-string arrays, an empty array, a 0-d array, a float16 scalar) and ``replay``, a
  sharded component (saved from a generator, one more shard each step);
* format 1 only: ``table``, 66 rows of 4000 bytes in every step: 66 chunks, more than a
  manifest lists inline, so its ids live in chunk-list pages;
* format 2 and later: metrics ``{"loss", "return"}`` on every step, tag ``"best"`` on
  step 100, and step 150 saved then deleted without garbage collection (its manifest is in
  ``trash``, its chunks are garbage);
* format 3 and later: branch :data:`BRANCH` ``"explore"`` forked from main's step 100,
  then step 120 saved on it (with metrics), tag ``"explore-best"`` on that step;
* format 4 only, component ``video`` in every step (of every branch): ``frames``, 72 rows
  of 4096 sparse bytes (mostly zero: auto mode stores them zstd-encoded; 72 chunks, so
  chunk-list pages), ``noise``, bytes that begin with the encoded-value MAGIC then random
  bytes (stored raw, hence escaped), and ``weights``, random float32 of 3 chunks
  (stored raw).  The other random leaves are stored raw too.

Every number comes from PCG64's raw output (fixed by the algorithm, unlike numpy's
distribution methods), turned into floats by exact arithmetic and casts, so the expected
state is rebuilt bit-exact from the seeds by any numpy.

The stores are written to a scratch directory, then copied with LMDB's compacting copy:
castore writers use a writable map, whose data file is sparse and as long as the map
(1 GiB); the copy holds only the used pages, and no ``lock.mdb`` (LMDB recreates it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import ml_dtypes
import numpy as np

CHUNK_BYTES = 4096
STEPS = (0, 100, 200)
DELETED_STEP = 150  #: format 2: saved, then deleted (left in the trash)
TAG = ("best", 100)  #: format 2 and later
BRANCH = ("explore", 100, 120)  #: format 3 and later: the branch, the main step forked, its new step
BRANCH_TAG = ("explore-best", 120)  #: format 3 and later: a tag on the branch's new step
MAGIC = b"\x89CZ\x1a"  #: format 4's encoded-value header (castore.format.compression.MAGIC)
SHARDED = "replay"  #: the component saved from a generator; loads as an iterator


def uniform(seed: int, n: int) -> np.ndarray:
    """``n`` float64 in [0, 1), the top 53 bits of PCG64(seed)'s raw 64-bit outputs."""
    raw = np.random.PCG64(seed).random_raw(n).astype(np.uint64)
    return (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53


def signed(seed: int, shape, dtype) -> np.ndarray:
    """Values in [-1, 1) of ``shape``, cast to ``dtype`` (float16/bfloat16 round exactly)."""
    n = int(np.prod(shape))
    return (uniform(seed, n) * 2.0 - 1.0).astype(dtype).reshape(shape)


def byte_rows(seed: int, rows: int, width: int) -> np.ndarray:
    return (uniform(seed, rows * width) * 256.0).astype(np.uint8).reshape(rows, width)


def shard(index: int) -> dict:
    """Shard ``index`` of the sharded component; the same in every step that holds it."""
    return {
        "obs": byte_rows(1000 + index, 8, 500),  # 4000 bytes: one chunk
        "reward": signed(1100 + index, (8,), np.float32),
        "index": index,
    }


def shards(step: int) -> list[dict]:
    return [shard(i) for i in range(STEPS.index(step) + 2 if step in STEPS else 2)]


def state(version: int, step: int) -> dict:
    """The state saved as ``step`` in the golden store of ``version`` (shards as a list)."""
    k = step + 1  # seed salt: every step's weights differ
    tree = {
        "agent": {
            "encoder": {
                "w": signed(k * 100 + 1, (96, 60), np.float32),  # rows of 240 B: chunks of 17 rows, 6 chunks
                "b": signed(k * 100 + 2, (64,), np.float64),
            },
            "heads": [
                {"w": signed(k * 100 + 3, (16, 8), np.float16)},
                {"w": signed(k * 100 + 4, (16, 8), ml_dtypes.bfloat16)},
            ],
            "mask": uniform(k * 100 + 5, 40) < 0.5,
        },
        "opt": {
            "count": np.int64(step * 7),
            "lr": 3e-4 * 0.5 ** (step // 100),
            "moments": (
                (uniform(k * 100 + 6, 48) * 256.0 - 128.0).astype(np.int8).reshape(6, 8),
                (uniform(k * 100 + 7, 10) * 65536.0).astype(">u2"),
            ),
            "phase": (signed(k * 100 + 8, (4, 2), np.float32)).view(np.complex64).reshape(4),
            "times": np.array([0, 1_700_000_000_000_000_000 + step], "<M8[ns]"),
        },
        "meta": {
            "name": f"run-{step}-ü",
            "step": step,
            "big": 2**70 + step,
            "done": step == STEPS[-1],
            "none": None,
            "raw": bytes(byte_rows(k * 100 + 9, 1, 6000)[0]),  # 6000 bytes: two chunks
            "labels": np.array(["ab", "cde", "f"], "<U3"),
            "codes": np.array([b"x", b"yz"], "S2"),
            "empty": np.zeros((0, 3), np.float32),
            "zero_d": np.array(step / 8.0, "<f8"),
            "half": np.float16(0.5),
        },
        SHARDED: shards(step),
    }
    if version == 1:
        tree["table"] = byte_rows(7, 66, 4000)
    if version >= 4:
        tree["video"] = {
            # sparse bytes (~5% 255s): zstd shrinks them ~5x; 72 chunks of one row each
            "frames": ((uniform(k * 100 + 10, 72 * 4096) < 0.05).astype(np.uint8) * 255).reshape(72, 4096),
            # random bytes after MAGIC: incompressible, so stored raw, i.e. escaped
            "noise": MAGIC + bytes(byte_rows(k * 100 + 11, 1, 3000)[0]),
            "weights": signed(k * 100 + 12, (3, 1024), np.float32),  # 3 chunks, stored raw
        }
    return tree


def metrics(step: int) -> dict:
    return {"loss": 1.0 / (step + 1), "return": float(step) * 2.5}


def _write(version: int, path: str) -> str:
    """Write the golden store of ``version`` into ``path``; returns the castore used."""
    import castore  # whichever castore is first on the path: the one being archived

    def saved(step):
        tree = state(version, step)
        tree[SHARDED] = iter(tree[SHARDED])
        return tree

    with castore.Store(path, chunk_bytes=CHUNK_BYTES) as store:
        if version == 1:
            for step in STEPS:
                store.save(step, saved(step))
        else:
            for step in sorted((*STEPS, DELETED_STEP)):
                store.save(step, saved(step), metrics=metrics(step))
            store.delete(DELETED_STEP)
            store.tag(*TAG)
        if version >= 3:
            name, forked, new_step = BRANCH
            store.fork(name, forked)
    if version >= 3:
        with castore.Store(path, branch=name) as store:
            store.save(new_step, saved(new_step), metrics=metrics(new_step))
            store.tag(*BRANCH_TAG)
    return os.path.dirname(castore.__file__)


def _check_format(path: str, version: int) -> None:
    import lmdb
    import msgpack

    env = lmdb.open(path, readonly=True, lock=False, max_dbs=8, subdir=True)
    try:
        with env.begin(db=env.open_db(b"meta", create=False)) as txn:
            config = msgpack.unpackb(txn.get(b"config"), raw=False)
    finally:
        env.close()
    if config["format"] != version:
        sys.exit(f"the castore on the path wrote format {config['format']}, not {version}: see the docstring")


def main(argv=None) -> None:
    import lmdb

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("version", type=int, choices=(1, 2, 3, 4))
    parser.add_argument("out", help="directory to (re)create, e.g. tests/data/store-v1")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        source = _write(args.version, scratch)
        _check_format(scratch, args.version)
        shutil.rmtree(args.out, ignore_errors=True)
        os.makedirs(args.out)
        env = lmdb.open(scratch, readonly=True, lock=False, max_dbs=8, subdir=True)
        try:
            env.copy(args.out, compact=True)
        finally:
            env.close()
    size = os.path.getsize(os.path.join(args.out, "data.mdb"))
    print(f"{args.out}: format {args.version}, data.mdb {size} bytes, written by {source}")


if __name__ == "__main__":
    main()
