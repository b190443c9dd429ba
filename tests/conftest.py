import shutil

import pytest
from workload import assert_state_equal as assert_tree_equal  # noqa: F401  (one bit-exact check)

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
