"""The command line on a bucket (a real RADOS Gateway): push, pull, read-only commands given
an ``s3://`` URL, verify naming a bucket's damage, and the bucket's GC.

Each command runs in a child process with the gateway's ``AWS_*`` variables, as a user's
shell would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import castore

ROWS, WIDTH = 256, 256  # 256 KiB of float32: 4 chunks of 64 KiB


def weights(step: int) -> np.ndarray:
    w = np.arange(ROWS * WIDTH, dtype=np.float32).reshape(ROWS, WIDTH)
    w[:8] += step  # only the first chunk changes between steps
    return w


def state(step: int) -> dict:
    return {"agent": {"w": weights(step), "step": step}, "replay": np.full((128, 16, 16, 3), 9, np.uint8)}


@pytest.fixture
def env(s3_server):
    return {**os.environ, **s3_server.env}


@pytest.fixture
def local(tmp_path):
    path = tmp_path / "store"
    with castore.Store(path, chunk_bytes=64 * 1024) as store:
        for step in (0, 10, 20):
            store.save(step, state(step), metrics={"loss": 1.0 / (step + 1)})
        store.tag("best", 10)
    return path


def run(env, *args, check: int | None = 0) -> subprocess.CompletedProcess:
    child = subprocess.run(
        [sys.executable, "-m", "castore", *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )
    if check is not None:
        assert child.returncode == check, f"castore {args}: exit {child.returncode}\n{child.stdout}\n{child.stderr}"
    return child


def run_json(env, *args, check: int = 0) -> dict:
    document = json.loads(run(env, *args, "--json", check=check).stdout)
    assert document["castore_json"] == 1 and document["kind"] == str(args[0])
    return document


def bucket_objects(s3_admin, bucket: str) -> dict[str, int]:
    pages = s3_admin.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def test_push_then_the_bucket_reads_like_the_store(env, local, bucket, s3_admin, monkeypatch):
    url = f"s3://{bucket}/runs/a"
    pushed = run_json(env, "push", local, url)
    assert [s["step"] for s in pushed["steps"]] == [0, 10, 20]
    objects = bucket_objects(s3_admin, bucket)
    assert sum(objects.values()) >= pushed["bytes"] > 0
    kinds: dict[str, int] = {}
    for key in objects:
        kind = key.split("/")[2]
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds["config"] == 1 and kinds["steps"] == 3 and kinds["tags"] == 1
    assert kinds["packs"] == kinds["index"] >= 1 and set(kinds) == {"config", "index", "packs", "steps", "tags"}
    again = run_json(env, "push", local, url)
    assert again["steps"] == [] and again["bytes"] == 0  # nothing the bucket lacks
    assert bucket_objects(s3_admin, bucket) == objects

    local_ls, remote_ls = run_json(env, "ls", local), run_json(env, "ls", url)
    strip = ("store",)
    assert {k: v for k, v in remote_ls.items() if k not in strip} == {
        k: v for k, v in local_ls.items() if k not in strip
    }
    assert run_json(env, "tags", url)["tags"] == run_json(env, "tags", local)["tags"]
    assert run_json(env, "show", url, "best")["components"] == run_json(env, "show", local, "best")["components"]
    diff = run_json(env, "diff", url, 0, 20)
    assert diff == {**run_json(env, "diff", local, 0, 20), "store": diff["store"]}

    report = run_json(env, "verify", url)
    assert report["ok"] and report["steps"] == 3 and report["hashed_chunks"] == report["chunks"] > 0

    monkeypatch.setenv("AWS_ENDPOINT_URL", env["AWS_ENDPOINT_URL"])
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, env[key])
    with castore.Store(url, readonly=True) as remote, castore.Store(local, readonly=True) as mine:
        for step in (0, 10, 20):
            got, want = remote.load(step), mine.load(step)
            np.testing.assert_array_equal(got["agent"]["w"], want["agent"]["w"])
            np.testing.assert_array_equal(got["replay"], want["replay"])


def test_pull_copies_one_step_and_only_what_is_missing(env, local, bucket, tmp_path):
    url = f"s3://{bucket}/p"
    run(env, "push", local, url)
    fresh = tmp_path / "fresh"
    first = run_json(env, "pull", url, fresh, "--step", "best")
    assert first["step"] == 10 and first["bytes"] > 0
    second = run_json(env, "pull", url, fresh)  # the latest: shares every chunk but the changed one
    assert second["step"] == 20 and 0 < second["bytes"] < first["bytes"] / 2
    assert run_json(env, "pull", url, fresh, "--step", 20)["bytes"] == 0  # there already
    with castore.Store(fresh, readonly=True) as store:
        assert store.steps() == [10, 20]
        np.testing.assert_array_equal(store.load(10)["agent"]["w"], weights(10))
        np.testing.assert_array_equal(store.load(20)["agent"]["w"], weights(20))
        assert store.verify().ok
    missing = run(env, "pull", url, fresh, "--step", 7, check=2)
    assert "step 7 does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_verify_names_a_damaged_pack_and_gc_frees_deleted_steps(env, local, bucket, s3_admin, tmp_path):
    url = f"s3://{bucket}/p"
    run(env, "push", local, url)
    packs = sorted(k for k in bucket_objects(s3_admin, bucket) if "/packs/" in k)
    assert packs
    body = bytearray(s3_admin.get_object(Bucket=bucket, Key=packs[0])["Body"].read())
    body[100] ^= 0xFF  # one flipped bit in a stored value
    s3_admin.put_object(Bucket=bucket, Key=packs[0], Body=bytes(body))
    damaged = run_json(env, "verify", url, check=1)
    assert not damaged["ok"] and damaged["affected_steps"]
    assert any(p["kind"] == "chunk-corrupt" for p in damaged["problems"])
    text = run(env, "verify", url, check=1).stdout
    assert "chunk-corrupt" in text and "steps affected" in text

    # deleting a pack outright: verify says which pack, not just which chunks
    s3_admin.delete_object(Bucket=bucket, Key=packs[0])
    gone = run_json(env, "verify", url, check=1)
    assert any(p["kind"] == "bucket" and packs[0].split("/", 1)[1] in p["detail"] for p in gone["problems"])


def test_gc_of_a_bucket_frees_the_packs_of_deleted_steps(env, bucket, s3_admin, tmp_path, s3_server, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    url = f"s3://{bucket}/p"
    rng = np.random.default_rng(1)
    with castore.Store(tmp_path / "s", chunk_bytes=64 * 1024, keep=1, mirror=url) as store:
        for step in range(4):
            store.save(step, {"w": rng.standard_normal(100_000).astype(np.float32)})  # nothing shared
            store.wait()  # uploaded before the next save's retention deletes it locally
    before = sum(bucket_objects(s3_admin, bucket).values())
    dry = run_json(env, "gc", url, "--dry-run")
    assert dry["dry_run"] and dry["freed_bytes"] > 0
    assert sum(bucket_objects(s3_admin, bucket).values()) == before  # a dry run changes nothing
    done = run_json(env, "gc", url)
    after = sum(size for key, size in bucket_objects(s3_admin, bucket).items() if key != "p/gc-epoch")
    assert bucket_objects(s3_admin, bucket)["p/gc-epoch"] == 32  # the GC's epoch, written before it deleted
    assert done["freed_bytes"] == dry["freed_bytes"] == before - after
    assert run_json(env, "verify", url)["ok"]
    with castore.Store(url, readonly=True) as remote:
        assert remote.steps() == [3]
    refused = run(env, "delete", url, 3, check=2)
    assert "opens read-only" in refused.stderr and "castore push" in refused.stderr
