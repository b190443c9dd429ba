"""The S3 mirror against plain boto3, as ratios measured in one process (issue 14's targets).

    python bench/mirror.py [--rows 12288] [--weights-mib 112] [--rounds 3] [--steps 6]
                           [--compute 1.0] [--check] [--json PATH]

Against the gateway the AWS variables name (``AWS_ENDPOINT_URL`` ...), or else a fresh
local RADOS Gateway (``tests/rgw.py``, stopped after); one new bucket, emptied and deleted
at the end.  A default run (a 256 MiB state) puts ~3.5 GB, and RGW frees deleted objects'
data only after its GC delay (hours by default): a gateway started here gets a 7 GiB
memstore (``CASTORE_RGW_MEMSTORE_BYTES``; ``tests/rgw.py``'s 4 GiB fills up, and a shared
one can).  The state is a replay of image-like uint8 frames (smooth frames plus a little
noise: zstd stores them in well under half) and float32 weights (random: incompressible).

* **push**: ``Store.push(url)`` of a store holding the state as one step, into a new
  prefix, against boto3's ``upload_file`` of the same arrays as one uncompressed ``.npz``
  (``TransferConfig``: 8 MiB parts, 8 in parallel), in turns, ``--rounds`` times each;
* **pull**: ``Store(new dir).pull(0, url=)`` against boto3's ``download_file`` of the
  ``.npz``; and ``Store(url, readonly=True).load()`` against ``download_fileobj`` into
  memory plus ``np.load`` of every array;
* both with ``compression="auto"`` (the default: the replay is stored compressed, so fewer
  bytes cross the wire) and ``"none"`` (the same bytes as the ``.npz``: the client's own
  efficiency).  Throughput is *logical* bytes (the state's) per second unless a column
  says *stored* (the bytes actually put or got);
* **growth**: a store with ``mirror=`` saving incremental steps (1% of the replay rows and
  ``--changed-weights-mib`` of weights new), waiting for each upload: the bucket's listed
  object bytes after minus before, over ``SaveResult.new_bytes``;
* **blocking**: a training-like loop (change rows and weights, a fixed amount of numpy
  work, save), ``--steps`` saves per run, runs with and without ``mirror=`` in turns; the
  wall time each ``save()`` blocked (the first, full save is waited for and not counted).

Medians over rounds; a table, then a JSON summary on the last line (and in ``--json``).
With ``--check`` the exit status is 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import numpy as np
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

import castore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import rgw  # the project's gateway setup, beside the tests

MiB = 1 << 20
FRAME = (64, 64, 3)
#: boto3's multipart settings: castore's S3 store uses the same part size and parallelism
TRANSFER = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=8)
#: (name, ratio key, bound, "ge" or "le")
TARGETS = [
    ("push throughput / boto3 upload of the .npz (logical bytes)", "push_auto", 0.8, "ge"),
    ("pull throughput / boto3 download of the .npz (logical bytes)", "pull_auto", 0.8, "ge"),
    ("bucket growth per incremental step / SaveResult.new_bytes", "growth", 1.1, "le"),
    ("save blocking with mirror= / without", "blocking", 1.1, "le"),
]


def make_state(rows: int, weights_mib: int, seed: int = 15) -> dict:
    """``replay``: ``rows`` image-like frames (64 maps of 8x8-pixel tiles in 16 colours, 5%
    of pixels noise: zstd stores them at ~8x, like real 64x64 game frames), actions,
    rewards; ``agent``: float32 weights of ``weights_mib`` MiB in 4 MiB layers (random)."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    tiles = np.kron(rng.integers(0, 16, (64, FRAME[0] // 8, FRAME[1] // 8)), np.ones((1, 8, 8), np.int64))
    obs = palette[tiles][rng.integers(0, 64, rows)]
    noisy = rng.random(obs.shape[:3]) < 0.05
    obs[noisy] = rng.integers(0, 256, (int(noisy.sum()), 3), dtype=np.uint8)
    layers = max(1, weights_mib // 4)
    agent = {f"layer{i}": rng.standard_normal((1024, 1024), dtype=np.float32) for i in range(layers)}
    return {
        "replay": {
            "obs": obs,
            "action": rng.integers(0, 18, rows, dtype=np.int32),
            "reward": rng.standard_normal(rows, dtype=np.float32),
        },
        "agent": agent,
    }


def flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def nbytes(tree: dict) -> int:
    return sum(a.nbytes for a in flat(tree).values())


class Gateway:
    """boto3 on one bucket of the gateway, with the helpers the cases need."""

    def __init__(self, env: dict[str, str]):
        self.s3 = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
            config=Config(s3={"addressing_style": "path"}, max_pool_connections=32, retries={"mode": "standard"}),
        )
        self.bucket = f"bench-mirror-{uuid.uuid4().hex[:12]}"
        self.s3.create_bucket(Bucket=self.bucket)

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def keys(self, prefix: str = "") -> list[tuple[str, int]]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [(o["Key"], o["Size"]) for p in pages for o in p.get("Contents", [])]

    def total_bytes(self, prefix: str) -> int:
        return sum(size for _, size in self.keys(prefix + "/"))

    def delete_prefix(self, prefix: str = "") -> None:
        keys = [k for k, _ in self.keys(prefix)]
        for i in range(0, len(keys), 1000):
            self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})

    def close(self) -> None:
        self.delete_prefix()
        self.s3.delete_bucket(Bucket=self.bucket)


def timed(fn: Callable[..., object], *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def equal(a: dict, b: dict) -> bool:
    fa, fb = flat(a), flat(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def transfer_cases(gw: Gateway, state: dict, scratch: str, rounds: int) -> dict:
    """Push, pull and bucket load against boto3, per compression; medians of seconds."""
    logical = nbytes(state)
    npz = os.path.join(scratch, "state.npz")
    np.savez(npz, **flat(state))
    npz_bytes = os.path.getsize(npz)
    gw.s3.upload_file(npz, gw.bucket, "npz/state.npz", Config=TRANSFER)  # warm the connection pool
    times: dict[str, list[float]] = {}
    stored: dict[str, int] = {}
    put: dict[str, int] = {}
    sources = {}
    for compression in ("auto", "none"):
        src = os.path.join(scratch, f"src-{compression}")
        with castore.Store(src, compression=compression) as store:
            stored[compression] = store.save(0, state).new_bytes
        sources[compression] = src
    for r in range(rounds):
        t, _ = timed(gw.s3.upload_file, npz, gw.bucket, f"npz/{r}.npz", Config=TRANSFER)
        times.setdefault("boto3 upload", []).append(t)
        for compression, src in sources.items():
            prefix = f"push-{compression}-{r}"
            with castore.Store(src) as store:
                t, results = timed(store.push, gw.url(prefix))
            put[compression] = sum(x.object_bytes for x in results)
            times.setdefault(f"push {compression}", []).append(t)
        dest = os.path.join(scratch, f"npz-{r}.npz")
        t, _ = timed(gw.s3.download_file, gw.bucket, f"npz/{r}.npz", dest, Config=TRANSFER)
        times.setdefault("boto3 download", []).append(t)
        os.remove(dest)
        for compression in sources:
            dest = os.path.join(scratch, f"pull-{compression}-{r}")
            with castore.Store(dest) as store:
                t, _ = timed(store.pull, 0, url=gw.url(f"push-{compression}-{r}"))
                if r == 0 and not equal(store.load(0), state):
                    raise SystemExit(f"pulled step of {compression} differs from the state")
            shutil.rmtree(dest)
            times.setdefault(f"pull {compression}", []).append(t)

        def boto_load(key=f"npz/{r}.npz"):
            buf = io.BytesIO()
            gw.s3.download_fileobj(gw.bucket, key, buf, Config=TRANSFER)
            buf.seek(0)
            with np.load(buf) as f:
                return {k: f[k] for k in f.files}

        t, _ = timed(boto_load)
        times.setdefault("boto3 download + np.load", []).append(t)
        for compression in sources:

            def bucket_load(prefix=f"push-{compression}-{r}"):
                with castore.Store(gw.url(prefix), readonly=True) as store:
                    return store.load(0)

            t, loaded = timed(bucket_load)
            if r == 0 and not equal(loaded, state):
                raise SystemExit(f"step loaded from the bucket ({compression}) differs from the state")
            del loaded
            times.setdefault(f"bucket load {compression}", []).append(t)
    gw.delete_prefix("push-")
    gw.delete_prefix("npz/")
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "logical_bytes": logical,
        "npz_bytes": npz_bytes,
        "stored_bytes": stored,
        "put_bytes": put,
        "seconds": med,
        "all_seconds": times,
    }


def mutate(state: dict, step: int, rows: int, weights_mib: int, rng: np.random.Generator) -> None:
    """New content in ``rows`` replay rows (a block moving forward, as a ring buffer
    writes) and in ``weights_mib`` MiB of weights (whole layers, in turn)."""
    obs = state["replay"]["obs"]
    n = len(obs)
    start = (step * rows) % n
    idx = np.arange(start, start + rows) % n
    obs[idx] = obs[(idx + n // 2) % n] ^ np.uint8(1)
    state["replay"]["reward"][idx] = rng.standard_normal(rows, dtype=np.float32)
    layers = list(state["agent"])
    for j in range(max(1, weights_mib // 4)):
        layer = state["agent"][layers[(step + j) % len(layers)]]
        layer += np.float32(1e-3) * rng.standard_normal(layer.shape, dtype=np.float32)


def growth_case(gw: Gateway, state: dict, scratch: str, steps: int, rows: int, weights_mib: int) -> dict:
    """Bucket bytes added per incremental step, over what the local store added."""
    state = {k: {n: a.copy() for n, a in v.items()} for k, v in state.items()}
    rng = np.random.default_rng(1)
    prefix = "growth"
    path = os.path.join(scratch, "growth")
    ratios, new, grown = [], [], []
    with castore.Store(path, mirror=gw.url(prefix)) as store:
        store.save(0, state)
        store.wait()
        before = gw.total_bytes(prefix)
        for step in range(1, steps + 1):
            mutate(state, step, rows, weights_mib, rng)
            result = store.save(step, state)
            store.wait()
            after = gw.total_bytes(prefix)
            new.append(result.new_bytes)
            grown.append(after - before)
            ratios.append((after - before) / result.new_bytes)
            before = after
    shutil.rmtree(path)
    gw.delete_prefix(prefix + "/")
    return {"ratio": statistics.median(ratios), "ratios": ratios, "new_bytes": new, "bucket_bytes": grown}


def matmuls(a: np.ndarray, n: int) -> None:
    for _ in range(n):
        a @ a


def calibrate(seconds: float) -> int:
    """Matmul iterations taking about ``seconds`` here now (the same count for every run):
    the fastest of a few warm trials."""
    a = np.random.default_rng(0).standard_normal((384, 384), dtype=np.float32)
    n = 64
    for _ in range(2):  # a short trial, then one of about the right length
        best = min(timed(matmuls, a, n)[0] for _ in range(3))
        n = max(1, round(n * seconds / best))
    return n


def training_run(
    gw: Gateway | None, state: dict, scratch: str, tag: str, steps: int, rows: int, weights_mib: int, work: int
) -> dict:
    """One training-like run; ``gw`` None: no mirror.  Blocking and compute seconds per save."""
    state = {k: {n: a.copy() for n, a in v.items()} for k, v in state.items()}
    rng = np.random.default_rng(2)
    a = np.random.default_rng(0).standard_normal((384, 384), dtype=np.float32)
    path = os.path.join(scratch, tag)
    mirror = None if gw is None else gw.url(tag)
    blocked, compute = [], []
    with castore.Store(path, mirror=mirror) as store:
        store.save(0, state)
        store.wait()  # the first, full upload is not part of the steady state
        for step in range(1, steps + 1):
            t, _ = timed(matmuls, a, work)
            compute.append(t)
            mutate(state, step, rows, weights_mib, rng)
            t, _ = timed(store.save, step, state)
            blocked.append(t)
        t_wait, _ = timed(store.wait)
    shutil.rmtree(path)
    if gw is not None:
        gw.delete_prefix(tag + "/")
    return {"blocked": blocked, "compute": compute, "final_wait": t_wait}


def blocking_case(gw: Gateway, state: dict, scratch: str, rounds: int, steps: int, rows, weights_mib, compute):
    work = calibrate(compute)
    runs: dict[str, list[dict]] = {"without": [], "with": []}
    for r in range(rounds):
        for kind in ("without", "with") if r % 2 == 0 else ("with", "without"):
            mirror = gw if kind == "with" else None
            runs[kind].append(training_run(mirror, state, scratch, f"train-{kind}-{r}", steps, rows, weights_mib, work))

    def med(kind: str, field: str) -> float:
        return statistics.median(statistics.median(run[field]) for run in runs[kind])

    return {
        "matmuls": work,
        "blocked_without": med("without", "blocked"),
        "blocked_with": med("with", "blocked"),
        "compute_without": med("without", "compute"),
        "compute_with": med("with", "compute"),
        "final_wait_with": statistics.median(run["final_wait"] for run in runs["with"]),
        "ratio": med("with", "blocked") / med("without", "blocked"),
        "runs": runs,
    }


def report(args, transfer: dict, growth: dict, blocking: dict) -> tuple[list[str], dict]:
    s = transfer["seconds"]
    logical = transfer["logical_bytes"]

    def mibs(nbytes: int, seconds: float) -> str:
        return f"{nbytes / MiB / seconds:.0f}"

    ratios = {
        "push_auto": s["boto3 upload"] / s["push auto"],
        "push_none": s["boto3 upload"] / s["push none"],
        "pull_auto": s["boto3 download"] / s["pull auto"],
        "pull_none": s["boto3 download"] / s["pull none"],
        "load_auto": s["boto3 download + np.load"] / s["bucket load auto"],
        "load_none": s["boto3 download + np.load"] / s["bucket load none"],
        # stored bytes over the wire per second, against boto3's bytes per second
        "push_auto_stored": (transfer["put_bytes"]["auto"] / s["push auto"])
        / (transfer["npz_bytes"] / s["boto3 upload"]),
        "growth": growth["ratio"],
        "blocking": blocking["ratio"],
    }
    lines = [
        f"state {logical / MiB:.0f} MiB ({args.rows} image-like frames + {args.weights_mib} MiB float32); "
        f"stored {transfer['stored_bytes']['auto'] / MiB:.0f} MiB with compression='auto'; "
        f"medians of {args.rounds} rounds",
        "",
        "| case | seconds | logical MiB/s | stored MiB/s | throughput / boto3 |",
        "|---|---|---|---|---|",
    ]
    rows = [
        ("boto3 upload_file of the .npz", "boto3 upload", transfer["npz_bytes"], None),
        ("push, compression='auto'", "push auto", transfer["put_bytes"]["auto"], "push_auto"),
        ("push, compression='none'", "push none", transfer["put_bytes"]["none"], "push_none"),
        ("boto3 download_file of the .npz", "boto3 download", transfer["npz_bytes"], None),
        ("pull, compression='auto'", "pull auto", transfer["stored_bytes"]["auto"], "pull_auto"),
        ("pull, compression='none'", "pull none", transfer["stored_bytes"]["none"], "pull_none"),
        ("boto3 download_fileobj + np.load", "boto3 download + np.load", transfer["npz_bytes"], None),
        ("Store(s3://, readonly).load(), 'auto'", "bucket load auto", transfer["stored_bytes"]["auto"], "load_auto"),
        ("Store(s3://, readonly).load(), 'none'", "bucket load none", transfer["stored_bytes"]["none"], "load_none"),
    ]
    for label, key, wire, ratio in rows:
        cell = f"{ratios[ratio]:.2f}" if ratio else "(baseline)"
        lines.append(f"| {label} | {s[key]:.2f} | {mibs(logical, s[key])} | {mibs(wire, s[key])} | {cell} |")
    lines += [
        "",
        f"growth: bucket bytes / new_bytes per step {', '.join(f'{x:.3f}' for x in growth['ratios'])} "
        f"(new_bytes median {statistics.median(growth['new_bytes']) / MiB:.1f} MiB)",
        f"blocking: save() {blocking['blocked_without'] * 1e3:.0f} ms without, {blocking['blocked_with'] * 1e3:.0f} ms "
        f"with mirror=; compute between saves {blocking['compute_without']:.2f} s without, "
        f"{blocking['compute_with']:.2f} s with; final wait for uploads {blocking['final_wait_with']:.2f} s",
        "",
        "| target | measured | bound | met |",
        "|---|---|---|---|",
    ]
    met = {}
    for name, key, bound, how in TARGETS:
        ok = ratios[key] >= bound if how == "ge" else ratios[key] <= bound
        met[key] = ok
        lines.append(
            f"| {name} | {ratios[key]:.2f} | {'>=' if how == 'ge' else '<='} {bound} | {'yes' if ok else 'no'} |"
        )
    summary = {
        "ratios": ratios,
        "met": met,
        "seconds": s,
        "logical_bytes": logical,
        "npz_bytes": transfer["npz_bytes"],
        "stored_bytes": transfer["stored_bytes"],
        "put_bytes": transfer["put_bytes"],
        "growth": {k: growth[k] for k in ("ratios", "new_bytes", "bucket_bytes")},
        "blocking": {k: v for k, v in blocking.items() if k != "runs"},
        "config": vars(args),
    }
    return lines, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=12288, help="replay frames of 64x64x3 (12 KiB each)")
    parser.add_argument("--weights-mib", type=int, default=112, help="MiB of float32 weights")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="incremental saves per run")
    parser.add_argument("--changed-rows", type=float, default=0.01, help="fraction of replay rows new per step")
    parser.add_argument("--changed-weights-mib", type=int, default=16, help="MiB of weights new per step")
    parser.add_argument("--compute", type=float, default=1.0, help="seconds of numpy work between saves")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--json", help="also write the JSON summary here")
    args = parser.parse_args()
    server = None
    if "AWS_ENDPOINT_URL" in os.environ:
        env = dict(os.environ)
    else:
        t0 = time.monotonic()
        os.environ.setdefault("CASTORE_RGW_MEMSTORE_BYTES", str(7 << 30))
        server = rgw.start(owner=os.getpid())
        print(f"started a RADOS Gateway in {time.monotonic() - t0:.1f} s at {server.endpoint}", file=sys.stderr)
        env = {**os.environ, **server.env}
        os.environ.update(server.env)  # castore's S3 store reads them
    started = time.monotonic()
    state = make_state(args.rows, args.weights_mib)
    rows = max(1, int(args.rows * args.changed_rows))
    scratch = tempfile.mkdtemp(prefix="castore-bench-mirror-")
    gw = Gateway(env)
    try:
        transfer = transfer_cases(gw, state, scratch, args.rounds)
        growth = growth_case(gw, state, scratch, args.steps, rows, args.changed_weights_mib)
        blocking = blocking_case(
            gw, state, scratch, args.rounds, args.steps, rows, args.changed_weights_mib, args.compute
        )
    finally:
        gw.close()
        shutil.rmtree(scratch, ignore_errors=True)
        if server is not None:
            server.stop()
    lines, summary = report(args, transfer, growth, blocking)
    summary["seconds_total"] = time.monotonic() - started
    print("\n".join(lines))
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 1 if args.check and not all(summary["met"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
