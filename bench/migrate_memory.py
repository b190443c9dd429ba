"""Peak memory of ``castore import-replay`` (issue 12, item 4): target ~1x the replay + one chunk.

    python bench/migrate_memory.py [--mb 400] [--chunk-rows 1024] [--workers 3]

Writes a synthetic embodied replay directory (``--mb`` MiB of rows: 64x64x3 uint8 frames of
noise on a gradient, float32 one-hot actions, float32 rewards, bool flags, 20-byte stepids;
chunks of ``--chunk-rows`` rows over ``--workers`` linked streams, written as
``Chunk.save`` does), then imports it in a fresh child process and reports, from
``/proc/self/status``: the RSS before the import, the peak while the RingBuffer is built
(up to the call of ``Store.save``), the peak over the whole import (save included), and of
that how much is anonymous memory (RssAnon) vs file-backed (RssFile: LMDB's map pages).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import subprocess
import sys
import tempfile
import threading

import numpy as np

MiB = 1 << 20
FRAME = (64, 64, 3)


def _row_nbytes() -> int:
    return int(np.prod(FRAME)) + 17 * 4 + 4 + 3 + 20


def write_replay(directory: str, mb: int, chunk_rows: int, workers: int) -> tuple[int, int]:
    """Returns (rows, bytes of one full chunk in memory)."""
    import elements

    rows = mb * MiB // _row_nbytes()
    per_worker = -(-rows // workers)
    rng = np.random.default_rng(0)
    start = datetime.datetime(2024, 1, 1)
    gradient = np.arange(64, dtype=np.uint8)[None, :, None, None]
    written = 0
    for w in range(workers):
        count = min(per_worker, rows - written)
        lengths = [chunk_rows] * (count // chunk_rows) + ([count % chunk_rows] if count % chunk_rows else [])
        ids = [elements.UUID() for _ in lengths] + [elements.UUID(0)]
        for i, length in enumerate(lengths):
            frames = rng.integers(0, 16, (length, *FRAME), dtype=np.uint8) + gradient
            data = {
                "image": frames,
                "action": np.eye(17, dtype=np.float32)[rng.integers(0, 17, length)],
                "reward": rng.standard_normal(length).astype(np.float32),
                "is_first": np.zeros(length, bool),
                "is_last": np.zeros(length, bool),
                "is_terminal": np.zeros(length, bool),
                "stepid": rng.integers(0, 256, (length, 20), dtype=np.uint8),
            }
            time = elements.timestamp(start + datetime.timedelta(seconds=60 * i + w), millis=True)
            with io.BytesIO() as stream:
                np.savez_compressed(stream, **data)
                with open(os.path.join(directory, f"{time}-{ids[i]}-{ids[i + 1]}-{length}.npz"), "wb") as f:
                    f.write(stream.getvalue())
        written += count
    return rows, chunk_rows * _row_nbytes()


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def child(replay: str, store_path: str) -> dict:
    import castore
    from castore.tools.migrate import import_replay

    marks: dict[str, int] = {}
    peak_anon = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak_anon[0] = max(peak_anon[0], _status()["RssAnon"])

    class Marking(castore.Store):
        def save(self, *args, **kwargs):
            marks["built_peak"] = _status()["VmHWM"]
            marks["built_anon"] = peak_anon[0]
            return super().save(*args, **kwargs)

    before = _status()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with Marking(store_path) as store:
        result = import_replay(replay, store)
    done.set()
    sampler.join()
    after = _status()
    return {
        "before": before["VmRSS"],
        "built_peak": marks["built_peak"],
        "built_anon_peak": marks["built_anon"],
        "peak": after["VmHWM"],
        "anon_peak": peak_anon[0],
        "rows": result.rows,
        "new_bytes": result.new_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=400)
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        replay = os.path.join(tmp, "replay")
        os.mkdir(replay)
        rows, chunk = write_replay(replay, args.mb, args.chunk_rows, args.workers)
        on_disk = sum(os.path.getsize(os.path.join(replay, n)) for n in os.listdir(replay))
        out = subprocess.run(
            [sys.executable, __file__, "--child", replay, os.path.join(tmp, "store")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        m = json.loads(out.splitlines()[-1])
    replay_bytes = rows * _row_nbytes()
    print(f"replay: {rows} rows, {replay_bytes / MiB:.0f} MiB in memory, {on_disk / MiB:.0f} MiB of .npz files")
    print(f"one chunk: {chunk / MiB:.1f} MiB; RSS before the import: {m['before'] / MiB:.0f} MiB")
    for label, key in [
        ("peak RSS while building the buffer", "built_peak"),
        ("  of it anonymous (sampled)", "built_anon_peak"),
        ("peak RSS over the whole import", "peak"),
        ("  of it anonymous (sampled)", "anon_peak"),
    ]:
        above = m[key] - m["before"]
        ratio = above / (replay_bytes + chunk)
        print(f"{label}: {m[key] / MiB:.0f} MiB, {above / MiB:.0f} MiB above before = {ratio:.2f}x (replay + chunk)")
    print(f"new bytes stored: {m['new_bytes'] / MiB:.0f} MiB")


if __name__ == "__main__":
    main()
