"""One rank of a multi-host job, for tests/test_multihost.py: ``python multihost_worker.py CONFIG``.

CONFIG is JSON: ``rank``, ``world``, ``url``, ``dir`` (the rank's local store), ``attempt``,
``steps`` to save, ``salt`` (changes the state), and optionally ``resume`` (continue from the
bucket's latest step), ``hang_at`` (a step whose part this rank never writes: it prints
``hanging`` and sleeps until killed), ``timeout_at`` (a step expected not to commit),
``barrier`` (a folder: every rank stops after writing its part, until ``go`` appears there).
Prints one JSON object per line: what happened, and a digest of every step it loaded back.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np

import castore
from castore.format.keys import step_key, step_of
from castore.mirror import MirrorOptions
from castore.mirror.multihost import PartCommitter


def tree(rank: int, step: int, salt: int) -> dict:
    """Rank ``rank``'s components of ``step``: its model shard and its replay."""
    rng = np.random.default_rng([rank, step, salt])
    return {
        f"agent/shard{rank}": {"w": rng.standard_normal(40_000).astype(np.float32), "step": step},
        f"replay/rank{rank}": np.arange(3_000, dtype=np.int64) * step + rank + 1000 * salt,
    }


def digest(state: dict) -> str:
    """The same hash for equal states: component names, leaf bytes and scalars, in order."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        value = state[name]
        leaves = [value] if isinstance(value, np.ndarray) else [value[k] for k in sorted(value)]
        for leaf in leaves:
            h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


def expected(world: int, step: int, salt: int) -> str:
    merged: dict = {}
    for rank in range(world):
        merged.update(tree(rank, step, salt))
    return digest(merged)


def say(**event) -> None:
    print(json.dumps(event), flush=True)


def main(config: dict) -> None:
    rank, world = config["rank"], config["world"]
    hang_at, barrier = config.get("hang_at"), config.get("barrier")
    publish, try_commit = PartCommitter.publish, PartCommitter.try_commit

    def hanging_publish(self, key, manifest, stepinfo):
        if hang_at is not None and step_of(key) == hang_at:
            say(event="hanging", step=hang_at)
            time.sleep(3600)  # killed here: packs uploaded, no part
        return publish(self, key, manifest, stepinfo)

    def waiting_try_commit(self, key):
        if barrier:  # every rank has its part written before any lists
            open(os.path.join(barrier, f"arrived-{rank}"), "w").close()
            while not os.path.exists(os.path.join(barrier, "go")):
                time.sleep(0.01)
        return try_commit(self, key)

    PartCommitter.publish = hanging_publish  # type: ignore[method-assign]
    PartCommitter.try_commit = waiting_try_commit  # type: ignore[method-assign]
    options = MirrorOptions(rank=rank, world=world, attempt=config["attempt"], pack_bytes=1 << 20)
    with castore.Store(config["dir"], mirror=config["url"], mirror_options=options) as store:
        if config.get("resume"):
            latest = store.mirror.latest_committed()
            say(event="resume", step=latest)
            store.continue_from(latest)
        for step in config["steps"]:
            store.save(step, tree(rank, step, config["salt"]), metrics={"loss": 1.0 / step, f"rank{rank}": rank})
            store.wait()
            say(event="uploaded", step=step, outcome=store.mirror.parts.outcomes.get(step_key(step, "main")))
            try:
                store.mirror.wait_committed(step, timeout=float(config.get("timeout", 40)))
            except castore.CommitTimeoutError as e:
                if step != config.get("timeout_at"):
                    raise
                say(event="timeout", step=step, missing=e.missing, message=str(e))
                continue
            say(event="committed", step=step)
        with castore.Store(config["url"], readonly=True) as bucket:
            for step in bucket.steps():
                say(event="loaded", step=step, digest=digest(bucket.load(step)), metrics=bucket.metrics(step))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
