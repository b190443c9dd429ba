"""Compaction (space back to the filesystem) and per-step accounting."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_tree_equal

import castore


def blob(seed, n=1_000_000):
    return np.random.default_rng(seed).integers(0, 255, n, dtype=np.uint8)


def test_compact_gives_space_back_and_keeps_every_kept_step_bit_exact(tmp_path):
    with castore.Store(tmp_path / "s", chunk_bytes=4096) as store:
        for i in range(8):
            store.save(i, {"a": blob(i), "i": i})
        for i in range(6):
            store.delete(i)
        before, after = store.compact()
        assert after < before / 3, (before, after)
        assert store.stats().file_bytes == after
        for i in (6, 7):
            assert_tree_equal(store.load(i, verify=True), {"a": blob(i), "i": i})
        store.save(8, {"a": blob(8), "i": 8})  # the compacted store keeps working
        assert store.steps() == [6, 7, 8]
    with castore.Store(tmp_path / "s", readonly=True) as reader:  # and reopens
        assert_tree_equal(reader.load(8), {"a": blob(8), "i": 8})


def test_compact_refuses_while_another_process_has_the_store_open(tmp_path):
    path = tmp_path / "s"
    with castore.Store(path) as store:
        store.save(1, {"a": blob(1)})
        script = (
            f"import castore, sys, time; s = castore.Store({str(path)!r}, readonly=True); s.load(); "
            "print('ready', flush=True); sys.stdin.readline()"
        )
        reader = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert reader.stdout.readline().strip() == "ready"
            with pytest.raises(castore.StoreBusyError, match="another process"):
                store.compact()
            assert_tree_equal(store.load(1), {"a": blob(1)})  # refused, intact, usable
            store.save(2, {"a": blob(2)})
        finally:
            reader.stdin.close()
            reader.wait(timeout=30)
        store.compact()  # the reader is gone
        assert store.steps() == [1, 2]


def test_accounting_splits_each_steps_bytes_into_unique_and_shared(tmp_path):
    with castore.Store(tmp_path / "s", chunk_bytes=4096) as store:
        base = blob(0, 40 * 4096)
        changed = base.copy()
        changed[:4096] ^= 1  # one chunk differs
        store.save(1, {"a": base})
        store.save(2, {"a": changed})
        store.save(3, {"a": blob(3, 8 * 4096)})  # shares nothing
        accounts = {a.step: a for a in store.accounting()}
        assert accounts[1].unique_bytes == accounts[2].unique_bytes == 4096
        assert accounts[1].shared_bytes == accounts[2].shared_bytes == 39 * 4096
        assert accounts[3].unique_bytes == accounts[3].referenced_bytes == 8 * 4096
        assert all(a.logical_bytes == a.referenced_bytes for a in accounts.values())
        store.delete(1)
        assert store.plan_gc().freed_bytes == accounts[1].unique_bytes  # what deleting it freed
        assert store.stats().stored_bytes == sum(a.referenced_bytes for a in accounts.values()) - 39 * 4096
