"""Real 64x64x3 observations rendered on the CPU by an environment package, cached on disk.

    frames(env, count) -> {"obs", "action", "reward", "is_first", "is_terminal"} (read-only memmaps)

* ``crafter`` (the ``crafter`` package; one of DreamerV3's benchmarks): ``crafter.Env()``
  renders 64x64 frames itself.  17 discrete actions.
* ``atari`` (``ale-py``, ROMs ship in the package): Ms. Pac-Man, action repeat 4 with the
  max over the last two screens, sticky actions 0.25, the 210x160 screen resized to 64x64
  with bilinear resampling (PIL), as DreamerV3's Atari wrapper does.

Actions are a mix of random choices: each is held for a random 1-8 steps, drawn half the
time from the movement actions and otherwise uniformly.  Rows follow DreamerV3's replay
layout: ``obs`` is the observation, ``action`` (float32 one-hot) the action that led to it
(zeros on the first step of an episode), ``reward`` what that step earned, ``is_first`` /
``is_terminal`` the episode boundaries.

Frames are generated in ``workers`` child processes (one seed each) and cached as ``.npy``
files under ``bench/results/frames-<env>-<count>-s<seed>/`` (gitignored); an absent or
incomplete cache is regenerated.  Crafter renders ~150 frames/s per idle core here (most of
it world generation at each of the ~180-step random-play episodes), so the default 36,864
frames take 2-5 minutes, once; Atari takes seconds.  Frames of this action mix compress
~7x with zstd level 1 and ~9x with zlib level 6 (Crafter), far more on Atari.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FIELDS = ("obs", "action", "reward", "is_first", "is_terminal")
ENVS = ("crafter", "atari")


class _Crafter:
    moves = (1, 2, 3, 4)  # move left/right/up/down

    def __init__(self, seed: int):
        import crafter

        self.env = crafter.Env(seed=seed)
        self.actions = self.env.action_space.n

    def reset(self) -> np.ndarray:
        return self.env.reset()

    def step(self, action: int):
        obs, reward, done, info = self.env.step(action)
        return obs, reward, done, bool(done and info.get("discount", 1.0) == 0.0)


class _Atari:
    repeat, sticky, rom = 4, 0.25, "ms_pacman"

    def __init__(self, seed: int):
        from ale_py import ALEInterface, LoggerMode, roms
        from PIL import Image

        self._image = Image
        ALEInterface.setLoggerMode(LoggerMode.Error)
        self.ale = ALEInterface()
        self.ale.setInt("random_seed", seed)
        self.ale.setFloat("repeat_action_probability", self.sticky)
        self.ale.loadROM(roms.get_rom_path(self.rom))
        self.action_set = self.ale.getMinimalActionSet()
        self.actions = len(self.action_set)
        self.moves = tuple(range(1, min(5, self.actions)))
        self._screens = [np.zeros((210, 160, 3), np.uint8) for _ in range(2)]

    def _obs(self) -> np.ndarray:
        screen = np.maximum(self._screens[0], self._screens[1])
        return np.asarray(self._image.fromarray(screen).resize((64, 64), self._image.BILINEAR))

    def reset(self) -> np.ndarray:
        self.ale.reset_game()
        self.ale.getScreenRGB(self._screens[0])
        self._screens[1][:] = self._screens[0]
        return self._obs()

    def step(self, action: int):
        reward = 0.0
        for i in range(self.repeat):
            reward += self.ale.act(self.action_set[action])
            if i >= self.repeat - 2:
                self.ale.getScreenRGB(self._screens[i - self.repeat + 2])
            if self.ale.game_over():
                break
        done = self.ale.game_over()
        return self._obs(), reward, done, done


def _render(env: str, count: int, seed: int) -> dict:
    """``count`` rows from one environment instance (runs in a worker process)."""
    game = _Crafter(seed) if env == "crafter" else _Atari(seed)
    rng = np.random.default_rng(seed)
    out = {
        "obs": np.zeros((count, 64, 64, 3), np.uint8),
        "action": np.zeros((count, game.actions), np.float32),
        "reward": np.zeros(count, np.float32),
        "is_first": np.zeros(count, bool),
        "is_terminal": np.zeros(count, bool),
    }
    done, action, hold = True, 0, 0
    for row in range(count):
        if done:
            out["obs"][row] = game.reset()
            out["is_first"][row] = True
            done = False
            continue
        if hold == 0:
            action = int(rng.choice(game.moves)) if rng.random() < 0.5 else int(rng.integers(game.actions))
            hold = int(rng.integers(1, 9))
        hold -= 1
        obs, reward, done, terminal = game.step(action)
        out["obs"][row], out["reward"][row], out["is_terminal"][row] = obs, reward, terminal
        out["action"][row, action] = 1.0
    return out


def cache_dir(env: str, count: int, seed: int = 0) -> str:
    return os.path.join(RESULTS, f"frames-{env}-{count}-s{seed}")


def frames(env: str, count: int, seed: int = 0, workers: int | None = None, log=sys.stderr) -> dict:
    """The cached rows (memory-mapped, read-only); rendered first if the cache is absent."""
    if env not in ENVS:
        raise ValueError(f"env must be one of {ENVS}, got {env!r}")
    folder = cache_dir(env, count, seed)
    if not os.path.exists(os.path.join(folder, "meta.json")):
        generate(env, count, seed, workers or os.cpu_count() or 1, folder, log)
    return {name: np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r") for name in FIELDS}


def generate(env: str, count: int, seed: int, workers: int, folder: str, log) -> None:
    started = time.perf_counter()
    print(f"rendering {count:,} {env} frames in {workers} processes (cached in {folder}) ...", file=log, flush=True)
    sizes = [count // workers + (i < count % workers) for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_render, [env] * workers, sizes, [seed * 1000 + i for i in range(workers)]))
    temp = folder + ".partial"
    shutil.rmtree(temp, ignore_errors=True)
    os.makedirs(temp)
    for name in FIELDS:
        np.save(os.path.join(temp, f"{name}.npy"), np.concatenate([part[name] for part in parts]))
    seconds = time.perf_counter() - started
    meta = {"env": env, "count": count, "seed": seed, "workers": workers, "seconds": round(seconds, 1)}
    with open(os.path.join(temp, "meta.json"), "w") as f:
        json.dump(meta, f)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(temp, folder)
    print(f"rendered {count:,} frames in {seconds:.0f} s", file=log, flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", choices=ENVS, default="crafter")
    parser.add_argument("--frames", type=int, default=2048)
    args = parser.parse_args()
    rows = frames(args.env, args.frames)
    print({name: (array.shape, array.dtype.str) for name, array in rows.items()})
