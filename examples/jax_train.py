"""A JAX / optax training loop whose params and optimizer state are plain values.

Shows: a params dict of ``jax.Array`` and optax's ``opt_state`` (a tuple of NamedTuples
such as ``ScaleByAdamState``) registered as they are, ``cp.params = params``.  A plain
value is stored as it is when saved, so the loop assigns the new values before each save;
after ``cp.load_or_save()`` the attribute holds the loaded value, restored with the types
of the value it replaced (``ScaleByAdamState``, ``EmptyState``, jax arrays).  The update
is jitted; batches depend only on the step, so stopping after N steps and running again
with more gives what one uninterrupted run gives.

    python examples/jax_train.py --logdir /tmp/run --steps 100
    python examples/jax_train.py --logdir /tmp/run --steps 200   # resumes at 100
"""

import argparse
import os

import jax
import jax.numpy as jnp
import optax

import castore

optimizer = optax.adam(1e-2)


def init_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "hidden": {"w": jax.random.normal(k1, (4, 16)) * 0.5, "b": jnp.zeros(16)},
        "out": {"w": jax.random.normal(k2, (16, 1)) * 0.25, "b": jnp.zeros(1)},
    }


def batch(step: int, size: int = 64):
    """The batch of ``step``: the same on every run, resumed or not."""
    x = jax.random.normal(jax.random.fold_in(jax.random.key(1), step), (size, 4))
    return x, jnp.sin(x @ jnp.array([[1.0], [-2.0], [0.5], [3.0]]))


def loss_fn(params, x, y):
    hidden = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
    return jnp.mean((hidden @ params["out"]["w"] + params["out"]["b"] - y) ** 2)


@jax.jit
def update(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--save-every", type=int, default=50)
    args = parser.parse_args()

    cp = castore.Checkpoint(os.path.join(args.logdir, "ckpt"), keep=3)
    cp.step = castore.Counter()
    cp.params = init_params(jax.random.key(0))
    cp.opt_state = optimizer.init(cp.params)
    resuming = cp.exists()
    start = cp.load_or_save()
    step, params, opt_state = cp.step, cp.params, cp.opt_state  # the loaded values after a resume
    kinds = ", ".join(type(part).__name__ for part in opt_state)
    print(f"{'resumed at' if resuming else 'started at'} step {start}; opt_state is ({kinds})")

    should_save = castore.Every(args.save_every)
    loss = float("nan")
    while int(step) < args.steps:
        params, opt_state, loss = update(params, opt_state, *batch(int(step)))
        step.increment()
        if should_save(step):
            cp.params, cp.opt_state = params, opt_state  # plain values: hand over the new ones
            cp.save()
    cp.params, cp.opt_state = params, opt_state
    cp.save()  # the final step (nothing new if it was just saved)
    print(f"step {int(step)}: loss {float(loss):.5f}, adam count {int(opt_state[0].count)}, steps kept {cp.steps()}")
    cp.close()


if __name__ == "__main__":
    main()
