"""A PyTorch training loop that survives being killed mid-save and resumes bit-exact.

Shows: a torch module, its Adam optimizer and LR scheduler registered on a
``castore.Checkpoint`` as they are (``state_dict`` / ``load_state_dict``; the module's
tensors are filled in place on load), a ``castore.Counter`` as the step, background saves
(``cp.save(block=False)``) every ``--save-every`` steps through ``castore.Every``,
``keep=castore.Keep(last=3)``, and ``cp.load_or_save()`` at start.  ``--kill-at STEP``
SIGKILLs the process right after it submits the save of that step (a multiple of
``--save-every``), as a crash would.  Run the same command again and it resumes from the
last committed step; the final weights equal an uninterrupted run's bit for bit, because
the batches depend only on the step and torch runs deterministically on one thread.

    python examples/torch_train.py --logdir /tmp/run --steps 300 --kill-at 150
    python examples/torch_train.py --logdir /tmp/run --steps 300
"""

import argparse
import os
import signal

import torch
from torch import nn

import castore


def batch(step: int, size: int = 64):
    """The batch of ``step``: the same on every run, resumed or not."""
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(size, 8, generator=generator)
    return x, torch.sin(x.sum(dim=1, keepdim=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--kill-at", type=int, default=None, help="SIGKILL after submitting this step's save")
    args = parser.parse_args()
    if args.kill_at is not None and args.kill_at % args.save_every:
        parser.error("--kill-at must be a multiple of --save-every (it kills right after that step's save)")

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100, gamma=0.5)
    step = castore.Counter()

    cp = castore.Checkpoint(os.path.join(args.logdir, "ckpt"), keep=castore.Keep(last=3))
    cp.step = step  # saves are numbered by it
    cp.model = model
    cp.optimizer = optimizer
    cp.scheduler = scheduler
    resuming = cp.exists()
    start = cp.load_or_save()  # the latest committed step, or step 0 saved now
    print(f"{'resumed at' if resuming else 'started at'} step {start}")

    should_save = castore.Every(args.save_every)
    loss = torch.tensor(float("nan"))
    while int(step) < args.steps:
        x, y = batch(int(step))
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        step.increment()
        if should_save(step):
            cp.save(block=False)  # captures the state now; commits while training goes on
            if int(step) == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    cp.save()  # the final step (nothing new if the last async save was of this step)
    print(f"step {int(step)}: loss {loss.item():.5f}, lr {scheduler.get_last_lr()[0]:g}, steps kept {cp.steps()}")
    cp.close()


if __name__ == "__main__":
    main()
