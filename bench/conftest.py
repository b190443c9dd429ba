"""Shared fixtures: the deterministic state, scratch store directories, saved stores."""

from __future__ import annotations

import numpy as np
import pytest
from workloads import ScratchDirs, copy_state, flat_arrays, make_state

import castore


def pytest_configure(config):
    """Create the folder of --benchmark-json (bench/results/ is gitignored, so may be absent)."""
    json_path = config.getoption("benchmark_json", None)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="session")
def state() -> dict:
    """The benchmark state (read-only: copy it with ``mutable_state`` to change it)."""
    return make_state()


@pytest.fixture
def mutable_state(state) -> dict:
    return copy_state(state)


@pytest.fixture(scope="session")
def arrays(state) -> dict[str, np.ndarray]:
    """The state's arrays flattened to {"replay.obs": array, ...}."""
    return flat_arrays(state)


@pytest.fixture
def dirs(tmp_path) -> ScratchDirs:
    return ScratchDirs(tmp_path)


@pytest.fixture(scope="session")
def session_dirs(tmp_path_factory) -> ScratchDirs:
    return ScratchDirs(tmp_path_factory.mktemp("session"))


@pytest.fixture(scope="session")
def saved_store(state, session_dirs):
    """A store at the default chunk size holding ``state`` as step 0."""
    store = castore.Store(session_dirs.fresh())
    store.save(0, state)
    yield store
    store.close()
    session_dirs.remove(store.path)


@pytest.fixture(scope="session")
def npz_path(arrays, session_dirs):
    """The same arrays in one uncompressed .npz file."""
    folder = session_dirs.fresh("npz")
    np.savez(f"{folder}/state.npz", **arrays)
    yield f"{folder}/state.npz"
    session_dirs.remove(folder)
