"""The commands that change a store (tag, untag, delete, gc, compact, fork, rollback) and verify."""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys

from ...errors import StepNotFoundError, UsageError
from ...maintenance.retention import Keep
from ...mirror import bucket_gc
from ...storage.bucket import Bucket
from ...storage.objects import open_object_store
from ._common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    all_tags,
    clean,
    emit_json,
    fraction_arg,
    human,
    is_bucket,
    locate,
    open_store,
    positive_arg,
    progress,
    step_arg,
    step_label,
    step_number_arg,
)


def add_parsers(sub, common) -> None:
    tag = sub.add_parser("tag", parents=[common], help="name a step; tagged steps survive retention")
    tag.add_argument("store")
    tag.add_argument("step", type=step_arg, help="a step number (or a tag)")
    tag.add_argument("name", help="the tag (not all digits)")
    tag.add_argument("--branch", help="the step's branch (default: main)")
    tag.add_argument("--move", action="store_true", help="move the tag if it names another step")
    tag.set_defaults(run=run_tag)

    untag = sub.add_parser("untag", parents=[common], help="remove a tag (the step stays)")
    untag.add_argument("store")
    untag.add_argument("name")
    untag.set_defaults(run=run_untag)

    delete = sub.add_parser("delete", parents=[common], help="delete steps (their chunks stay until gc)")
    delete.add_argument("store")
    delete.add_argument("steps", type=step_number_arg, nargs="+", metavar="STEP")
    delete.add_argument("--branch", help="the steps' branch (default: main)")
    delete.add_argument("--gc", action="store_true", help="collect the garbage afterwards")
    delete.set_defaults(run=run_delete)

    delete_branch = sub.add_parser("delete-branch", parents=[common], help="delete every step of a branch")
    delete_branch.add_argument("store")
    delete_branch.add_argument("name")
    delete_branch.set_defaults(run=run_delete_branch)

    gc = sub.add_parser("gc", parents=[common], help="free the chunks no kept step references")
    gc.add_argument("store")
    gc.add_argument(
        "--keep",
        type=keep_arg,
        metavar="POLICY",
        help="apply retention first: N (the last N steps) or last=N,every=N,interval=SECONDS,best=N,metric=NAME,mode=min|max",
    )
    gc.add_argument("--branch", help="the branch --keep applies to (default: main)")
    gc.add_argument("--dry-run", action="store_true", help="say what would be deleted and freed; change nothing")
    gc.set_defaults(run=run_gc)

    compact = sub.add_parser(
        "compact", parents=[common], help="collect garbage, then rewrite the file to its used size"
    )
    compact.add_argument("store")
    compact.set_defaults(run=run_compact)

    verify = sub.add_parser("verify", parents=[common], help="check steps down to their chunks; exit 1 on damage")
    verify.add_argument("store")
    verify.add_argument("--step", type=step_arg, action="append", help="only this step (repeatable; default: all)")
    verify.add_argument("--branch", help="the --step's branch (default: main)")
    verify.add_argument(
        "--sample",
        type=fraction_arg,
        default=1.0,
        metavar="FRACTION",
        help="hash only this part of the chunks, e.g. 5%% (presence and length are always checked)",
    )
    verify.add_argument("--seed", type=int, help="pick the sample reproducibly")
    verify.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    verify.set_defaults(run=run_verify)

    fork = sub.add_parser("fork", parents=[common], help="start a branch at a step (writes no chunk)")
    fork.add_argument("store")
    fork.add_argument("name", help="the new branch")
    fork.add_argument("step", type=step_arg, nargs="?", help="the step it starts at (default: the latest)")
    fork.add_argument("--branch", help="the step's branch (default: main)")
    fork.set_defaults(run=run_fork)

    rollback = sub.add_parser(
        "rollback", parents=[common], help="make a step the latest; later steps move to a new branch"
    )
    rollback.add_argument("store")
    rollback.add_argument("step", type=step_arg, help="a step number or a tag")
    rollback.add_argument("--branch", help="the branch to roll back (default: main)")
    rollback.set_defaults(run=run_rollback)


def keep_arg(text: str) -> Keep:
    """``3`` or ``last=3,every=1000,interval=3600,best=2,metric=loss,mode=min``."""
    if text.isdigit():
        return Keep(last=positive_arg(text))
    fields: dict = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in ("last", "every", "interval", "best", "metric", "mode") or name in fields:
            raise argparse.ArgumentTypeError(f"not a retention policy: {text!r} (e.g. 3 or last=3,every=1000)")
        if name in ("last", "every", "best"):
            fields[name] = positive_arg(value)
        elif name == "interval":
            try:
                fields[name] = float(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"interval is seconds, got {value!r}") from None
        else:
            fields[name] = value
    try:
        return Keep(**fields)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@contextlib.contextmanager
def on_branch(store, args, branch: str):
    """``store`` if it is on ``branch``, else a writable Store on that branch (same engine)."""
    if branch == store.branch:
        yield store
        return
    with open_store(args, store.path, write=True, branch=branch) as there:
        yield there


def run_tag(args) -> int:
    with open_store(args, write=True, branch=args.branch) as store:
        branch, step = locate(store, args.step, args.branch)
        if args.name.isdigit():
            raise UsageError(f"a tag is not all digits (that reads as a step number): {args.name!r}")
        target = all_tags(store).get(args.name)
        if target is not None and target != (branch, step) and not args.move:
            raise UsageError(f"tag {args.name!r} names step {step_label(*target)} already; pass --move to move it")
        with on_branch(store, args, branch) as there:  # a tag or BRANCH:STEP may name another branch
            there.tag(args.name, step)
    if args.json:
        emit_json("tag", {"store": store.path, "name": args.name, "branch": branch, "step": step})
    else:
        print(f"tagged step {step_label(branch, step)} {args.name!r}")
    return EXIT_OK


def run_untag(args) -> int:
    with open_store(args, write=True) as store:
        target = all_tags(store).get(args.name)
        if target is None:
            tags = clean(", ".join(all_tags(store)) or "none")
            raise StepNotFoundError(f"no tag {args.name!r} in {store.path}; tags: {tags}")
        store.untag(args.name)
    if args.json:
        emit_json("untag", {"store": store.path, "name": args.name, "branch": target[0], "step": target[1]})
    else:
        print(f"untagged {args.name!r} (step {step_label(*target)} stays)")
    return EXIT_OK


def run_delete(args) -> int:
    branch = args.branch or "main"
    with open_store(args, write=True, branch=branch) as store:
        steps = list(dict.fromkeys(args.steps))
        for step in steps:
            locate(store, step, branch)  # names what exists if one is missing
        store.delete(steps)  # one transaction: all of them or none (a tagged one refuses all)
        freed = store.gc() if args.gc else None
    if args.json:
        emit_json(
            "delete",
            {
                "store": store.path,
                "branch": branch,
                "deleted": steps,
                "gc": None if freed is None else {"freed_bytes": freed.freed_bytes, "chunks": len(freed.chunks)},
            },
        )
    else:
        print(f"deleted {len(steps)} steps of {branch}: {', '.join(map(str, steps))}")
        if freed is not None:
            print(f"freed {human(freed.freed_bytes)} ({len(freed.chunks) + len(freed.pages)} chunks and pages)")
        else:
            print("their chunks stay until `castore gc`")
    return EXIT_OK


def run_delete_branch(args) -> int:
    with open_store(args, write=True, branch=args.name) as store:
        if args.name == "main":
            raise UsageError("the main branch cannot be deleted; delete its steps instead")
    with open_store(args, write=True) as store:
        steps = store.delete_branch(args.name)
    if args.json:
        emit_json("delete-branch", {"store": store.path, "branch": args.name, "deleted": steps})
    else:
        print(f"deleted branch {args.name} ({len(steps)} steps); their chunks stay until `castore gc`")
    return EXIT_OK


def run_gc(args) -> int:
    if is_bucket(args.store):
        return _gc_bucket(args)
    branch = args.branch or "main"
    with open_store(args, write=not args.dry_run, branch=branch) as store:
        doomed: list[int] = []
        if args.keep is not None and args.keep.metric is not None:  # a typo would keep only latest and tagged
            recorded = sorted(
                {name for step in store.steps(branch=branch) for name in store.metrics(step, branch=branch)}
            )
            if args.keep.metric not in recorded:
                raise UsageError(
                    f"no step of {branch} records metric {args.keep.metric!r}; recorded: {clean(', '.join(recorded)) or 'none'}"
                )
        if args.dry_run:
            doomed = store.plan_retain(args.keep) if args.keep is not None else []
            plan = store.plan_gc(keep=args.keep)
            freed = plan.freed_bytes
        else:
            held = store.stats().stored_bytes
            if args.keep is not None:
                doomed = store.retain(args.keep)  # deletes, then collects
            with progress(None, "gc") as bar:

                def on_progress(done: int, total: int) -> None:
                    bar.unit, bar.total, bar.n = "ids", total, done
                    bar.refresh()

                plan = store.gc(progress=on_progress)
            freed = held - store.stats().stored_bytes  # measured: retain's collection included
    verb = "would free" if args.dry_run else "freed"
    if args.json:
        emit_json(
            "gc",
            {
                "store": store.path,
                "dry_run": args.dry_run,
                "branch": branch,
                "deleted_steps": doomed,
                "freed_bytes": freed,
            },
        )
        return EXIT_OK
    if args.keep is not None:
        deleted = ", ".join(map(str, doomed)) if doomed else "none"
        print(f"retention {'would delete' if args.dry_run else 'deleted'} steps of {branch}: {deleted}")
    print(f"{verb} {human(freed)}")
    if args.dry_run:
        print("nothing was changed (--dry-run)")
    return EXIT_OK


def _gc_bucket(args) -> int:
    """``castore gc s3://...``: the bucket's GC (packs no step needs, repacking), under its lock."""
    if args.keep is not None:
        raise UsageError("gc --keep applies to a local store; a mirror applies its store's keep policy itself")
    bucket = Bucket(open_object_store(args.store), create=False)
    try:
        plan = bucket_gc.collect(bucket, dry_run=args.dry_run)
    finally:
        bucket.close()
    if args.json:
        emit_json(
            "gc",
            {
                "store": args.store,
                "dry_run": args.dry_run,
                "branch": None,
                "deleted_steps": [],
                "freed_bytes": plan.freed_bytes,
                "packs_deleted": len(plan.delete) + len(plan.orphan_packs),
                "packs_repacked": len(plan.repack),
                "moved_bytes": plan.moved_bytes,
            },
        )
        return EXIT_OK
    verb = "would free" if args.dry_run else "freed"
    print(
        f"{verb} {human(plan.freed_bytes)}: {len(plan.delete) + len(plan.orphan_packs)} packs deleted, "
        f"{len(plan.repack)} repacked ({human(plan.moved_bytes)} copied); {plan.steps} steps keep "
        f"{human(plan.live_bytes)}"
    )
    if args.dry_run:
        print("nothing was changed (--dry-run)")
    return EXIT_OK


def run_compact(args) -> int:
    with open_store(args, write=True) as store:
        before, after = store.compact()
    if args.json:
        emit_json("compact", {"store": store.path, "file_bytes_before": before, "file_bytes_after": after})
    else:
        print(f"{store.path}: {human(before)} -> {human(after)}")
    return EXIT_OK


def run_fork(args) -> int:
    branch = args.branch or "main"
    with open_store(args, write=True, branch=branch) as store:
        source, step = locate(store, args.step, branch)
        with on_branch(store, args, source) as there:
            there.fork(args.name, step)
    if args.json:
        emit_json("fork", {"store": store.path, "branch": args.name, "from": {"branch": source, "step": step}})
    else:
        print(f"branch {args.name} starts at step {step_label(source, step)}")
    return EXIT_OK


def run_rollback(args) -> int:
    branch = args.branch or "main"
    with open_store(args, write=True, branch=branch) as store:
        located = locate(store, args.step, branch)
        if located[0] != branch:
            raise UsageError(f"{args.step!r} names step {step_label(*located)}, not a step of {branch}")
        moved = store.rollback(located[1])
        later = store.steps(branch=moved) if moved else []
    if args.json:
        emit_json(
            "rollback", {"store": store.path, "branch": branch, "step": located[1], "moved_to": moved, "moved": later}
        )
    elif moved is None:
        print(f"step {located[1]} is the latest of {branch} already: nothing moved")
    else:
        print(f"{branch} now ends at step {located[1]}; steps {', '.join(map(str, later))} moved to branch {moved}")
    return EXIT_OK


def run_verify(args) -> int:
    if not args.in_process:
        return _verify_isolated(args.argv)
    with open_store(args, branch=args.branch) as store:
        steps = None
        if args.step:
            steps = [locate(store, step, args.branch) for step in args.step]
        with progress(None, "verify") as bar:

            def on_progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            report = store.verify(args.sample, seed=args.seed, steps=steps, progress=on_progress)
    if args.json:
        emit_json(
            "verify",
            {
                "store": store.path,
                "ok": report.ok,
                "steps": report.steps,
                "chunks": report.chunks,
                "hashed_chunks": report.hashed_chunks,
                "hashed_bytes": report.hashed_bytes,
                "sample": report.sample,
                "problems": [
                    {
                        "kind": p.kind,
                        "detail": p.detail,
                        "branch": p.branch,
                        "step": p.step,
                        "component": p.component,
                        "path": p.path,
                        "chunk": p.chunk,
                    }
                    for p in report.problems
                ],
                "affected_steps": [{"branch": b, "step": s} for b, s in report.affected_steps],
            },
        )
        return EXIT_OK if report.ok else EXIT_PROBLEMS
    for problem in report.problems:
        print(problem)
    part = "all" if report.sample == 1 else f"a {report.sample:.1%} sample:"
    print(
        f"checked {report.steps} steps, {report.chunks} chunks present; hashed {part} "
        f"{report.hashed_chunks} chunks, {report.hashed_bytes} bytes"
    )
    if report.ok:
        print("no problems found")
        return EXIT_OK
    print(
        f"{len(report.problems)} problems; {len(report.affected_steps)} steps affected: "
        + ", ".join(f"{s}" if b == "main" else f"{b}:{s}" for b, s in report.affected_steps[:50])
    )
    return EXIT_PROBLEMS


def _verify_isolated(argv: list[str]) -> int:
    """Run verify in a child process: LMDB trusts its B-tree, and a damaged one can kill the
    reading process (SIGBUS/SIGSEGV) before castore sees any bytes.  That is reported too."""
    child = subprocess.run([sys.executable, "-m", "castore", *argv, "--in-process"], check=False)
    if child.returncode >= 0:
        return child.returncode
    name = signal.Signals(-child.returncode).name if -child.returncode in signal.valid_signals() else "a signal"
    if sys.stderr is None:
        return EXIT_PROBLEMS
    print(
        f"castore: reading the store killed the verifying process ({name}): LMDB's own structure in "
        "data.mdb is damaged. Restore the store from a backup, or copy intact steps out with "
        "`castore export` (in a child process, step by step).",
        file=sys.stderr,
    )
    return EXIT_PROBLEMS
