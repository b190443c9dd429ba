import shutil

import numpy as np
import pytest

import castore


@pytest.fixture
def drop_big_stores_of_passing_tests(request, tmp_path):
    """Stores of the crash and concurrency tests take tens to hundreds of MB: keep them
    only for tests that failed, for a post-mortem."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture
def store(tmp_path):
    with castore.Store(tmp_path / "store", chunk_bytes=64 << 10) as s:
        yield s


def assert_tree_equal(a, b, path=""):
    """Bit-exact equality of state trees: structure, types, dtypes, shapes, bytes."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}/{i}")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and np.shape(a) == np.shape(b), path
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), path
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, path
