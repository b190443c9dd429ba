"""The examples in examples/ run, crash, resume and load as their docstrings say.

Each example runs in a subprocess (a real process: it can be SIGKILLed, and its imports
are its own).  Timeouts are generous for a loaded machine; no test asserts wall time.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import castore

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300


def run(example: str, *args, expect: int = 0) -> str:
    """Run ``examples/<example>`` with ``args``; returns its stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def read(path, step=None) -> tuple[list[int], dict]:
    """The steps of the store at ``path`` and the state of ``step`` (default: latest),
    after checking that the whole store verifies clean."""
    with castore.Store(path, readonly=True) as store:
        report = store.verify()
        assert report.ok, report.problems
        return store.steps(), store.load(step)


def as_numpy(leaf):
    if hasattr(leaf, "detach"):  # a torch tensor
        return leaf.detach().numpy()
    return np.asarray(leaf)


def assert_same(a, b, path="") -> None:
    """``a`` and ``b`` are the same tree with bit-identical arrays."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}/{i}")
    elif hasattr(a, "shape"):
        x, y = as_numpy(a), as_numpy(b)
        assert (x.dtype, x.shape, x.tobytes()) == (y.dtype, y.shape, y.tobytes()), path
    else:
        assert a == b, path


def test_torch_train_resumes_bit_exact_after_sigkill(tmp_path):
    import torch  # make test installs it: a missing torch is a failure, not a skip

    run("torch_train.py", "--logdir", tmp_path / "whole", "--steps", 300)
    out = run(
        "torch_train.py", "--logdir", tmp_path / "crash", "--steps", 300, "--kill-at", 150, expect=-signal.SIGKILL
    )
    assert "step 300" not in out
    steps, _ = read(tmp_path / "crash" / "ckpt")  # the kill left it consistent
    assert steps[-1] in (100, 150)  # the save submitted just before the kill may have committed
    out = run("torch_train.py", "--logdir", tmp_path / "crash", "--steps", 300)
    assert f"resumed at step {steps[-1]}" in out

    assert read(tmp_path / "whole" / "ckpt")[0] == read(tmp_path / "crash" / "ckpt")[0] == [200, 250, 300]
    for step in (200, 250, 300):  # Keep(last=3); 200 and 250 were captured while training went on
        _, whole = read(tmp_path / "whole" / "ckpt", step)
        _, resumed = read(tmp_path / "crash" / "ckpt", step)
        assert resumed["step"] == step and isinstance(resumed["model"]["0.weight"], torch.Tensor)
        assert_same(whole, resumed)  # weights, Adam moments and step counts, scheduler


def test_jax_train_continued_equals_uninterrupted(tmp_path):
    import jax  # make test installs jax and optax: a missing one fails here, it does not skip
    import optax

    run("jax_train.py", "--logdir", tmp_path / "whole", "--steps", 200)
    run("jax_train.py", "--logdir", tmp_path / "parts", "--steps", 120)
    out = run("jax_train.py", "--logdir", tmp_path / "parts", "--steps", 200)
    assert "resumed at step 120; opt_state is (ScaleByAdamState, EmptyState)" in out

    _, whole = read(tmp_path / "whole" / "ckpt")
    steps, parts = read(tmp_path / "parts" / "ckpt")
    assert steps == [120, 150, 200]
    assert_same(whole, parts)  # exact: same jitted computation on the same CPU
    adam, empty = parts["opt_state"]  # optax is imported here, so its stored types come back
    assert isinstance(adam, optax.ScaleByAdamState) and isinstance(empty, optax.EmptyState)
    assert int(adam.count) == 200
    assert isinstance(parts["params"]["hidden"]["w"], jax.Array)


def test_dreamer_style_resume_and_from_checkpoint(tmp_path):
    pytest.importorskip("elements")
    first = tmp_path / "first" / "ckpt"
    run("dreamer_style.py", "--logdir", tmp_path / "first", "--steps", 100)
    out = run("dreamer_style.py", "--logdir", tmp_path / "first", "--steps", 200)
    assert "Start training loop at step 100 with 100 replay rows" in out
    steps, resumed = read(first)
    assert steps == [0, 50, 100, 150, 200]  # no extra save right after the resume
    run("dreamer_style.py", "--logdir", tmp_path / "whole", "--steps", 200)
    _, whole = read(tmp_path / "whole" / "ckpt")
    assert_same(whole, resumed)  # replay rows, agent and step all came back
    assert resumed["replay"]["size"] == 200 and resumed["replay"]["fields"]["image"].dtype == np.uint8

    out = run("dreamer_style.py", "--logdir", tmp_path / "tune", "--steps", 20, "--seed", 1, "--from_checkpoint", first)
    assert "Loaded pretrained checkpoint with keys: ['enc/kernel']" in out
    assert "Start training loop at step 0 with 0 replay rows" in out
    steps, start = read(tmp_path / "tune" / "ckpt", step=0)  # saved by load_or_save
    assert start["step"] == 0 and start["replay"]["size"] == 0 and not start["replay"]["fields"]
    params, loaded = start["agent"]["params"], resumed["agent"]["params"]
    assert_same(params["enc/kernel"], loaded["enc/kernel"])
    for name in ("dyn/kernel", "actor/kernel"):  # not matched by the regex: the fresh seed-1 values
        assert not np.array_equal(params[name], loaded[name])
    assert start["agent"]["counters"]["updates"] == 0
