"""Issue 11's resume targets: restore in place at ~1x memory, and a first save after a
resume that costs what changed since the loaded step.

    python bench/resume.py [--mb 1024] [--rounds 3] [--compression auto,none] [--out FILE.md] [--keep]

The state (``--mb`` MiB), DreamerV3-like, built deterministically in every child:

* ``replay``: a ``castore.RingBuffer`` of ~3/4 of the state, full, write head at row 0:
  ``obs`` 64x64x3 uint8 frames (the cached Crafter frames of ``bench/frames.py``,
  ``bench/results/frames-crafter-36864-s0``, looped to fill, each further pass shifted by
  +1 per pixel value so passes do not deduplicate against each other; random bytes if the
  cache is absent), ``action`` float32 one-hot (17), ``reward`` float32;
* ``agent``: float32 leaves of 1024x1024 (4 MiB each), ~1/4 of the state;
* ``step``: a ``castore.Counter``.

It is saved as step 1 into a fresh ``castore.Checkpoint(path, compression=...)``, one store
per ``--compression`` setting.  Then, each in a fresh child process (so its RSS is clean):

* ``restore``: the components constructed as a resumed training script does, then
  ``ck.load()`` (verified reads).  Variant "in place": ``RingBuffer(capacity, fields=...)``
  and an agent whose ``load_targets()`` offers its pre-allocated arrays; variant
  "allocating": a bare ``RingBuffer(capacity)`` and an agent without ``load_targets``.
  Both variants' pre-allocated arrays are ``np.zeros`` whose pages are untouched before
  the load, so "peak above pre-load RSS" counts the restored state itself: the target is
  peak <= 1.1 x state + 256 MiB.  Every array is checked bit-exact (xxh3) afterwards.
* ``first save after resume``: an in-place restore, then a known change: 1% of the
  replay's capacity in new rows (rows ``[0, n)``) and one agent leaf (``+= 1e-3``), then
  (a) a blocking ``ck.save()``: ``SaveResult.changed_bytes`` (hashed) and ``new_bytes``
  (written) against the bytes changed, raw (the rows' bytes of every field + the leaf) and
  rounded up to whole chunks (``castore.format.chunker``'s cut of each leaf at
  ``store.chunk_bytes``); target <= 2x raw changed bytes;
  (b) in another child, ``ck.save(block=False)``: seconds until it returns against an
  ``np.copyto`` of the raw changed bytes (from replay rows the change did not touch) into
  fresh anonymous pages (cold: each page faulted on first write, as a first save's new
  staging buffers are) and again into the same pages (warm), both timed in the same
  process after the save; target <= 3x the cold copy.  Also the peak RSS the async save
  adds over the RSS after load and change (until ``handle.result()``), and how much of
  the RSS it left behind is file-backed (``RssFile``: pages of LMDB's map); target <= 5%
  of the state.
* ``contrast``: the same first save in a process that did NOT load: it opens the store,
  builds the same changed state from scratch and saves (castore 0.4.0's first save:
  every byte hashed).  Reported beside the resumed figures, no target.

Each save child works on its own copy of the step-1 store (``cp --sparse=always``), so
every one of them saves step 2 on top of step 1 alone.  Peak RSS is ``VmHWM`` of
``/proc/self/status`` after resetting it (``clear_refs`` 5, checked to work in each child);
otherwise ``getrusage`` ``ru_maxrss`` (a peak that cannot be reset: the method is printed).
The page cache holds the store (it was just written).  Every figure is the median of
``--rounds`` (default 3) samples, the measurements of a round in rotated order; ratios are
of medians measured in the same run; no assertions.  Results go to stdout (and ``--out``);
stores live in a temporary directory removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import measure
import numpy as np
import xxhash
from measure import MiB, Rss, emit, rss_file  # bench/measure.py (the script's folder is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
FRAMES_DIR = os.path.join(HERE, "results", "frames-crafter-36864-s0")
OBS_SHAPE, ACTIONS = (64, 64, 3), 17
ROW_BYTES = int(np.prod(OBS_SHAPE)) + 4 * ACTIONS + 4  # obs + action + reward
LEAF_SHAPE = (1024, 1024)  # float32: 4 MiB
BATCH_ROWS = 4096
CHANGED_LEAF = "layer0"
RSS_SLACK = 256 * MiB


# --- the state, the same in every child -----------------------------------------------------------


def layout(mb: int) -> dict:
    """Capacity and agent leaves of a ``mb`` MiB state: 3/4 replay, 1/4 agent."""
    agent_leaves = max(1, (mb * MiB // 4) // (4 * MiB))
    capacity = (mb * MiB - agent_leaves * 4 * MiB) // ROW_BYTES
    return {"capacity": int(capacity), "agent_leaves": agent_leaves, "new_rows": max(1, capacity // 100)}


class Source:
    """Frames, actions and rewards of sequence index ``i``: cached real frames looped (pass
    ``k`` adds ``k`` to each pixel value), or random frames if the cache is absent."""

    def __init__(self, seed: int):
        path = os.path.join(FRAMES_DIR, "obs.npy")
        if os.path.exists(path):
            self.obs = np.load(path, mmap_mode="r")
            self.action = np.load(os.path.join(FRAMES_DIR, "action.npy"), mmap_mode="r")
            self.reward = np.load(os.path.join(FRAMES_DIR, "reward.npy"), mmap_mode="r")
            self.label = f"Crafter frames ({FRAMES_DIR}, {len(self.obs):,} looped)"
        else:
            rng = np.random.default_rng(seed)
            count = 8192
            self.obs = rng.integers(0, 256, (count, *OBS_SHAPE), dtype=np.uint8)
            self.action = np.eye(ACTIONS, dtype=np.float32)[rng.integers(0, ACTIONS, count)]
            self.reward = (rng.random(count) < 0.01).astype(np.float32)
            self.label = f"random bytes (no frame cache at {FRAMES_DIR}; {count:,} frames looped)"
        assert self.obs.shape[1:] == OBS_SHAPE and self.action.shape[1:] == (ACTIONS,)

    def rows(self, start: int, count: int) -> dict:
        n, out = len(self.obs), {"obs": [], "action": [], "reward": []}
        index = start
        while index < start + count:
            lo = index % n
            hi = min(n, lo + start + count - index)
            shift = np.uint8((index // n) % 256)
            out["obs"].append(self.obs[lo:hi] + shift if shift else np.array(self.obs[lo:hi]))
            out["action"].append(np.asarray(self.action[lo:hi], np.float32))
            out["reward"].append(np.asarray(self.reward[lo:hi], np.float32))
            index += hi - lo
        return {name: np.concatenate(parts) for name, parts in out.items()}


def replay_fields() -> dict:
    return {"obs": (OBS_SHAPE, np.uint8), "action": ((ACTIONS,), np.float32), "reward": ((), np.float32)}


class Agent:
    """``{"params": {name: float32 array}}``; with ``targets``, pre-allocated (untouched zeros)
    and offered to the load through ``load_targets()``, else allocated by the load."""

    def __init__(self, leaves: int, targets: bool):
        self.targets = targets
        self.params = {f"layer{i}": np.zeros(LEAF_SHAPE, np.float32) for i in range(leaves)} if targets else {}

    def fill(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        for key in self.params:
            self.params[key] = rng.standard_normal(LEAF_SHAPE, np.float32) * np.float32(0.03)

    def save(self) -> dict:
        return {"params": self.params}

    def load_targets(self):
        return {"params": self.params} if self.targets else None

    def load(self, state: dict) -> None:
        self.params = state["params"]


def build(spec: dict, source: Source):
    """The step-1 state: components as a freshly started run has them."""
    import castore

    capacity = spec["capacity"]
    replay = castore.RingBuffer(capacity, fields=replay_fields())
    for start in range(0, capacity, BATCH_ROWS):
        replay.add(source.rows(start, min(BATCH_ROWS, capacity - start)))
    agent = Agent(spec["agent_leaves"], targets=True)
    agent.fill(spec["seed"])
    return replay, agent, castore.Counter(1)


def change(spec: dict, source: Source, replay, agent, counter) -> None:
    """What training did after step 1: new rows at the head (rows [0, n)), one leaf, the step."""
    assert replay.added == spec["capacity"] and len(replay) == spec["capacity"]
    replay.add(source.rows(spec["capacity"], spec["new_rows"]))
    agent.params[CHANGED_LEAF] += np.float32(1e-3)
    counter.increment()


def components(spec: dict, in_place: bool):
    """The components as a resumed training script constructs them, before ``load``."""
    import castore

    replay = castore.RingBuffer(spec["capacity"], fields=replay_fields() if in_place else None)
    return replay, Agent(spec["agent_leaves"], targets=in_place), castore.Counter(0)


def register(ck, replay, agent, counter) -> None:
    ck.replay, ck.agent, ck.step = replay, agent, counter


def digest(replay, agent, counter) -> dict:
    out = {"step": int(counter), "head": replay.save()["head"], "size": len(replay), "added": replay.added}
    for name in replay.fields:
        out[f"replay/{name}"] = xxhash.xxh3_128_hexdigest(np.ascontiguousarray(replay[name]))
    for key, value in agent.params.items():
        out[f"agent/{key}"] = xxhash.xxh3_128_hexdigest(np.ascontiguousarray(value))
    return out


def state_bytes(replay, agent) -> int:
    return sum(replay[n].nbytes for n in replay.fields) + sum(v.nbytes for v in agent.params.values())


def changed_bytes(spec: dict, chunk_bytes: int) -> tuple[int, int]:
    """(raw, rounded up to whole chunks) bytes the change touched in the chunked leaves."""
    from castore.format.chunker import chunk_nbytes_for, chunks_covering

    rows, capacity = spec["new_rows"], spec["capacity"]
    raw = rounded = 0
    leaves = [(OBS_SHAPE, 1), ((ACTIONS,), 4), ((), 4)]
    for shape, itemsize in leaves:
        row = int(np.prod(shape)) * itemsize
        nbytes = row * capacity
        stride = chunk_nbytes_for(nbytes, row, itemsize, chunk_bytes)
        raw += row * rows
        rounded += sum(min(nbytes, (i + 1) * stride) - i * stride for i in chunks_covering(0, row * rows, stride))
    leaf = int(np.prod(LEAF_SHAPE)) * 4
    return raw + leaf, rounded + leaf  # a whole leaf is whole chunks


# --- memory ---------------------------------------------------------------------------------------


# --- the children ---------------------------------------------------------------------------------


def child_build(spec: dict) -> dict:
    import castore

    source = Source(spec["seed"])
    replay, agent, counter = build(spec, source)
    with castore.Checkpoint(spec["dir"], compression=spec["compression"]) as ck:
        register(ck, replay, agent, counter)
        result = ck.save()
        stats = ck.store.stats()
        chunk_bytes = ck.store.chunk_bytes
    return {
        "castore": f"castore {getattr(castore, '__version__', '?')} from {os.path.dirname(castore.__file__)}",
        "source": source.label,
        "state_bytes": state_bytes(replay, agent),
        "digest": digest(replay, agent, counter),
        "save_s": result.seconds,
        "stored_bytes": stats.stored_bytes,
        "chunk_bytes": chunk_bytes,
    }


def child_restore(spec: dict) -> dict:
    import castore

    rss = Rss()
    replay, agent, counter = components(spec, spec["variant"] == "in place")
    with castore.Checkpoint(spec["dir"], compression=spec["compression"]) as ck:
        register(ck, replay, agent, counter)
        os.sync()
        before = rss.reset()
        started = time.perf_counter()
        step = ck.load()
        seconds = time.perf_counter() - started
        peak = rss.peak()
        replay, agent, counter = ck.replay, ck.agent, ck.step
    got, want = digest(replay, agent, counter), spec["digest"]
    bad = sorted(k for k in want.keys() | got.keys() if got.get(k) != want.get(k))
    in_place = spec["variant"] == "in place" and all(
        type(f) is castore.TrackedArray for f in replay.save()["fields"].values()
    )
    return {
        "step": step,
        "seconds": seconds,
        "before": before,
        "peak": peak,
        "exact": not bad,
        "mismatch": bad[:5],
        "rss_method": rss.method,
        "in_place": in_place,
    }


def _copy_seconds(src: np.ndarray, nbytes: int) -> tuple[float, float]:
    """(cold, warm) seconds of ``np.copyto`` of ``nbytes`` from ``src``, best of 3 each: cold
    into fresh anonymous pages (``mmap``: each page faulted on first write), warm into the
    same pages again."""
    src = src[:nbytes]
    cold, warm = [], []
    for _ in range(3):
        with mmap.mmap(-1, nbytes) as pages:
            dst = np.frombuffer(pages, np.uint8)
            t = time.perf_counter()
            np.copyto(dst, src)
            cold.append(time.perf_counter() - t)
            t = time.perf_counter()
            np.copyto(dst, src)
            warm.append(time.perf_counter() - t)
            del dst
    return min(cold), min(warm)


def child_save(spec: dict) -> dict:
    """A first save of the changed state: after a load ("resumed") or without ("scratch")."""
    import castore

    rss = Rss()
    source = Source(spec["seed"])
    if spec["mode"] == "resumed":
        replay, agent, counter = components(spec, in_place=True)
    else:
        replay, agent, counter = build(spec, source)
    with castore.Checkpoint(spec["dir"], compression=spec["compression"]) as ck:
        register(ck, replay, agent, counter)
        if spec["mode"] == "resumed":
            ck.load()
            replay, agent, counter = ck.replay, ck.agent, ck.step
        change(spec, source, replay, agent, counter)
        raw, rounded = changed_bytes(spec, ck.store.chunk_bytes)
        os.sync()
        file_before = rss_file()
        before = rss.reset()
        started = time.perf_counter()
        if spec["block"]:
            result = ck.save()
            blocked = time.perf_counter() - started
        else:
            handle = ck.save(block=False)
            blocked = time.perf_counter() - started
            result = handle.result()
        seconds = time.perf_counter() - started
        peak = rss.peak()
        file_after = rss_file()
        flat = np.asarray(replay["obs"]).reshape(-1)  # resident: loaded or built
        flat = flat[len(flat) // 2 :]  # rows the change did not touch
        cold_raw, warm_raw = _copy_seconds(flat, raw)
        cold_rounded, _ = _copy_seconds(flat, rounded)
    return {
        "step": result.step,
        "changed_bytes": result.changed_bytes,
        "new_bytes": result.new_bytes,
        "logical_bytes": result.logical_bytes,
        "blocked_s": blocked,
        "capture_s": result.capture_seconds,
        "seconds": seconds,
        "before": before,
        "peak": peak,
        "raw": raw,
        "rounded": rounded,
        "copy_cold_s": cold_raw,
        "copy_warm_s": warm_raw,
        "copy_cold_rounded_s": cold_rounded,
        "rss_method": rss.method,
        "file_added": None if file_before is None or file_after is None else file_after - file_before,
    }


CHILDREN = {"build": child_build, "restore": child_restore, "save": child_save}


def run_child(kind: str, spec: dict) -> dict:
    return measure.run_child(__file__, kind, spec)


def copy_store(src: str, dst: str) -> None:
    """A copy of the store directory; LMDB's data file is sparse, keep it so."""
    try:
        subprocess.run(["cp", "-a", "--sparse=always", src, dst], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


# --- the report -----------------------------------------------------------------------------------


def merge(runs: list[dict]) -> dict:
    """One result of a measurement's rounds: the median of each number, the first error."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    for key, value in ok[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
            out[key] = statistics.median(values)
    if "exact" in out:
        out["exact"] = all(r["exact"] for r in ok)
        out["mismatch"] = next((r["mismatch"] for r in ok if r["mismatch"]), [])
        out["in_place"] = all(r["in_place"] for r in ok)
    out["rounds"] = len(ok)
    return out


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / MiB:,.1f} MiB"


def _met(value, limit) -> str:
    if value is None or limit is None:
        return "n/a"
    return "met" if value <= limit else "NOT met"


def _file_note(r: dict) -> str:
    added = r.get("file_added")
    return "" if added is None else f"; RssFile (mapped store pages) +{_mib(added)} by the end of the save"


def table(compression: str, built: dict, results: dict, meta: dict) -> list[str]:
    state = built["state_bytes"]
    lines = [
        f'### compression="{compression}"',
        "",
        f"State {state / MiB:,.0f} MiB: replay {meta['capacity']:,} rows of {ROW_BYTES:,} B "
        f"(obs 64x64x3 uint8 from {built['source']}; action 17 float32; reward float32), "
        f"agent {meta['agent_leaves']} float32 leaves of 4 MiB; step 1 saved in {built['save_s']:.2f} s, "
        f"stored {_mib(built['stored_bytes'])}; chunk_bytes {built['chunk_bytes']:,}; {built['castore']}.",
        "",
        "| measurement | figure | ratio | target | |",
        "|---|---|---|---|---|",
    ]
    budget = 1.1 * state + RSS_SLACK
    methods = set()
    for variant in ("in place", "allocating"):
        r = results.get(f"restore {variant}", {})
        if "error" in r:
            lines.append(f"| restore, {variant} | {r['error']} | | | |")
            continue
        methods.add(r["rss_method"])
        delta = r["peak"] - r["before"]
        label = {
            "in place": "RingBuffer(capacity, fields=) + agent with load_targets()",
            "allocating": "bare RingBuffer(capacity) + agent without load_targets",
        }[variant]
        note = "" if variant != "in place" or r["in_place"] else " (fields NOT kept in place)"
        lines += [
            f"| restore ({label}): seconds | {r['seconds']:.2f} s | | | |",
            f"| restore ({label}): peak RSS above pre-load RSS{note} | {_mib(delta)} "
            f"(pre-load {_mib(r['before'])}); bit-exact: {'yes' if r['exact'] else 'NO ' + str(r['mismatch'])} "
            f"| {delta / state:.3f}x state; {delta / budget:.3f}x budget | <= 1.1x state + 256 MiB "
            f"(= {_mib(budget)}) | {_met(delta, budget)} |",
        ]
    block, scratch = results.get("resumed block", {}), results.get("scratch block", {})
    if "error" in block:
        lines.append(f"| first save after resume, blocking | {block['error']} | | | |")
    else:
        methods.add(block["rss_method"])
        raw, rounded = block["raw"], block["rounded"]
        lines.append(
            f"| changed by training after the load: {meta['new_rows']:,} new replay rows + leaf "
            f"agent/params/{CHANGED_LEAF} | raw {_mib(raw)}; rounded up to whole chunks {_mib(rounded)} | | | |"
        )
        for key, what in (("changed_bytes", "hashed (SaveResult.changed_bytes)"), ("new_bytes", "written (new_bytes)")):
            value = block[key]
            lines.append(
                f"| first save after resume, blocking: {what} | {_mib(value)} | {value / raw:.3f}x raw changed; "
                f"{value / rounded:.3f}x chunk-rounded | <= 2x raw changed | {_met(value, 2 * raw)} |"
            )
        added = block["peak"] - block["before"]
        lines += [
            f"| first save after resume, blocking: seconds | {block['seconds']:.3f} s | | | |",
            f"| first save after resume, blocking: peak RSS added over post-load RSS | {_mib(added)}"
            f"{_file_note(block)} | {added / state:.2%} of state | (reference) | |",
        ]
    if "error" in scratch:
        lines.append(f"| contrast (no load), blocking | {scratch['error']} | | | |")
    elif "error" not in block:
        for key, what in (("changed_bytes", "hashed"), ("new_bytes", "written")):
            value = scratch[key]
            lines.append(
                f"| contrast, first save without a load (0.4.0 behaviour), blocking: {what} | {_mib(value)} | "
                f"{value / block['raw']:.1f}x raw changed | (reference) | |"
            )
        lines.append(
            f"| contrast, blocking: seconds | {scratch['seconds']:.3f} s | "
            f"resumed / contrast {block['seconds'] / scratch['seconds']:.3f} | (reference) | |"
        )
    asave, ascratch = results.get("resumed async", {}), results.get("scratch async", {})
    if "error" in asave:
        lines.append(f"| first save after resume, save(block=False) | {asave['error']} | | | |")
    else:
        methods.add(asave["rss_method"])
        cold, warm = asave["copy_cold_s"], asave["copy_warm_s"]
        lines += [
            f"| np.copyto of the raw changed bytes ({_mib(asave['raw'])}), same process | cold (fresh pages) "
            f"{cold * 1e3:.2f} ms; warm (same pages again) {warm * 1e3:.2f} ms; cold, chunk-rounded bytes "
            f"{asave['copy_cold_rounded_s'] * 1e3:.2f} ms | | | |",
            f"| first save after resume, save(block=False): until it returns | {asave['blocked_s'] * 1e3:.1f} ms "
            f"(changed_bytes {_mib(asave['changed_bytes'])}; commit after {asave['seconds']:.3f} s) | "
            f"{asave['blocked_s'] / cold:.2f}x cold copy ({asave['blocked_s'] / warm:.1f}x warm) | "
            f"<= 3x cold copy | {_met(asave['blocked_s'], 3 * cold)} |",
        ]
        added = asave["peak"] - asave["before"]
        lines.append(
            f"| first save after resume, save(block=False): peak RSS added over post-load RSS, until result() | "
            f"{_mib(added)} (post-load {_mib(asave['before'])}){_file_note(asave)} | {added / state:.2%} of state "
            "| <= 5% of state "
            f"| {_met(added, 0.05 * state)} |"
        )
    if "error" in ascratch:
        lines.append(f"| contrast (no load), save(block=False) | {ascratch['error']} | | | |")
    elif "error" not in asave:
        added = ascratch["peak"] - ascratch["before"]
        lines += [
            f"| contrast, save(block=False) without a load: until it returns | {ascratch['blocked_s'] * 1e3:.1f} ms "
            f"(changed_bytes {_mib(ascratch['changed_bytes'])}) | {ascratch['blocked_s'] / asave['copy_cold_s']:.1f}x "
            f"cold copy of the raw changed bytes | (reference) | |",
            f"| contrast, save(block=False): peak RSS added | {_mib(added)}{_file_note(ascratch)} | "
            f"{added / state:.2%} of state "
            "| (reference) | |",
        ]
    lines += ["", f"RSS: {'; '.join(sorted(methods)) or 'n/a'}.", ""]
    return lines


# --- main -----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=1024, help="state size in MiB (3/4 replay, 1/4 agent)")
    parser.add_argument("--compression", default="auto,none", help="comma-separated store settings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="samples of each measurement (medians reported)")
    parser.add_argument("--tmp", default=None, help="parent of the temporary directory (a local filesystem)")
    parser.add_argument("--out", default=None, help="also write the markdown tables here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary stores (their path is printed)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, spec = args.child[0], json.loads(args.child[1])
        print(json.dumps(CHILDREN[kind](spec)))
        return 0
    if args.mb < 16:
        parser.error("--mb must be at least 16")

    started = time.perf_counter()
    meta = {**layout(args.mb), "seed": args.seed}
    scratch_dir = tempfile.mkdtemp(prefix="castore-resume-", dir=args.tmp)
    out = [
        "## bench/resume.py",
        "",
        f"{os.cpu_count()} cores (load average {os.getloadavg()[0]:.2f} at the start); state {args.mb} MiB; "
        f"each figure the median of {args.rounds} round(s), every sample in a fresh child process, rounds in "
        f"rotated order; temp dir {scratch_dir}{' (kept)' if args.keep else ''}.",
        "",
    ]
    try:
        for compression in [c for c in args.compression.split(",") if c]:
            base = {**meta, "compression": compression}
            store = os.path.join(scratch_dir, f"store-{compression}")
            t0 = time.perf_counter()
            built = run_child("build", {**base, "dir": store})
            print(
                f"[{compression}] build: {built.get('error', 'ok')} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr
            )
            if "error" in built:
                out += [f'### compression="{compression}"', "", built["error"], ""]
                continue
            jobs = [("restore", f"restore {variant}", {"variant": variant}) for variant in ("in place", "allocating")]
            jobs += [
                ("save", f"{mode} {'block' if block else 'async'}", {"mode": mode, "block": block})
                for mode in ("resumed", "scratch")
                for block in (True, False)
            ]
            samples: dict[str, list] = {name: [] for _, name, _ in jobs}
            for round_ in range(args.rounds):
                shift = round_ % len(jobs)  # rotated, so drift of this shared machine hits each alike
                for kind, name, extra in jobs[shift:] + jobs[:shift]:
                    t0 = time.perf_counter()
                    spec = {**base, **extra, "dir": store, "digest": built["digest"]}
                    if kind == "save":  # its own copy of the step-1 store
                        spec["dir"] = os.path.join(
                            scratch_dir, f"store-{compression}-{name.replace(' ', '-')}-{round_}"
                        )
                        copy_store(store, spec["dir"])
                    samples[name].append(run_child(kind, spec))
                    if kind == "save" and not args.keep:
                        shutil.rmtree(spec["dir"], ignore_errors=True)
                    status = samples[name][-1].get("error", "ok")
                    print(
                        f"[{compression}] round {round_} {name}: {status} ({time.perf_counter() - t0:.0f} s)",
                        file=sys.stderr,
                    )
            results = {name: merge(runs) for name, runs in samples.items()}
            out += table(compression, built, results, meta)
    finally:
        if not args.keep:
            shutil.rmtree(scratch_dir, ignore_errors=True)
    out.append(f"Total wall time {time.perf_counter() - started:.0f} s.")
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
