"""A DreamerV3-style loop: elements' habits with castore underneath.

Written as DreamerV3's ``embodied/run/train.py`` is: an ``elements.Counter`` step, an
``elements.Path`` logdir, the agent (``save()`` / ``load(data, regex=None)``), the replay
and the step registered on ``castore.Checkpoint(logdir / 'ckpt')``, ``--from_checkpoint``
loading only the agent through ``castore.load`` (the agent applies
``--from_checkpoint_regex`` itself), ``cp.load_or_save()``, and ``should_save(step)``.
The replay is a ``castore.RingBuffer`` of 64x64x3 uint8 frames, actions and rewards: each
save writes only the rows added since the last one, and a resume fills it in place.

    python examples/dreamer_style.py --logdir /tmp/dv3 --steps 200
    python examples/dreamer_style.py --logdir /tmp/ft --from_checkpoint /tmp/dv3/ckpt
"""

import argparse
import re
from functools import partial as bind

import elements
import numpy as np

import castore


class Agent:
    """A stand-in for DreamerV3's agent: named parameters and DreamerV3's save/load."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        shapes = {"enc/kernel": (64 * 64 * 3 // 64, 8), "dyn/kernel": (8, 8), "actor/kernel": (8, 4)}
        self.params = {name: rng.normal(0, 0.1, shape).astype(np.float32) for name, shape in shapes.items()}
        self.updates = 0

    def policy(self, image, rng):
        features = image.reshape(-1, 64).mean(1, dtype=np.float32) / 255 @ self.params["enc/kernel"]
        logits = np.tanh(features @ self.params["dyn/kernel"]) @ self.params["actor/kernel"]
        return int(np.argmax(logits + rng.gumbel(size=4)))

    def train(self, batch):
        for value in self.params.values():  # a fake, deterministic update
            value += 1e-3 * np.float32(batch["reward"].mean()) * np.sign(value)
        self.updates += 1

    def save(self):
        return {"params": dict(self.params), "counters": {"updates": self.updates}}

    def load(self, data, regex=None):
        params = data["params"]
        if regex:
            params = {k: v for k, v in params.items() if re.match(regex, k)}
            print("Loaded pretrained checkpoint with keys:", list(params))
        else:
            self.updates = int(data["counters"]["updates"])
        self.params.update({k: np.array(v) for k, v in params.items()})


def observe(step: int):
    """The environment: a square moving over a gray frame, the same for the same step."""
    image = np.full((64, 64, 3), 96, np.uint8)
    x, y = (step * 3) % 56, (step * 5) % 56
    image[y : y + 8, x : x + 8] = (255, 64, 32)
    return image, np.float32((x + y) % 7 == 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--save_every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from_checkpoint", default="")
    parser.add_argument("--from_checkpoint_regex", default=r"^enc/")
    args = parser.parse_args()

    agent = Agent(args.seed)
    replay = castore.RingBuffer(1000)
    logdir = elements.Path(args.logdir)
    step = elements.Counter()
    should_save = castore.Every(args.save_every)

    cp = castore.Checkpoint(logdir / "ckpt")
    cp.step = step
    cp.agent = agent
    cp.replay = replay
    if args.from_checkpoint:
        castore.load(args.from_checkpoint, dict(agent=bind(agent.load, regex=args.from_checkpoint_regex)))
    cp.load_or_save()
    print(f"Start training loop at step {int(step)} with {len(replay)} replay rows")

    while step < args.steps:
        for _ in range(10):  # driver(policy, steps=10)
            rng = np.random.default_rng([args.seed, int(step)])
            image, reward = observe(int(step))
            action = agent.policy(image, rng)
            replay.append({"image": image, "action": np.int32(action), "reward": reward})
            step.increment()
        agent.train(replay.sample(16, rng))
        if should_save(step):
            cp.save()
    print(f"step {int(step)}: {len(replay)} replay rows, {agent.updates} updates, steps saved {cp.steps()}")
    cp.close()


if __name__ == "__main__":
    main()
