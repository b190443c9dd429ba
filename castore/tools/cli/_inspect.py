"""The read-only commands: ls, show, diff, du, tags, branches (and the older steps, stats)."""

from __future__ import annotations

from typing import Any

from ...errors import CastoreError, StepNotFoundError
from ...format.codec import leaf_nodes, node_nbytes
from ._common import (
    EXIT_OK,
    all_tags,
    check_branch_exists,
    clean,
    describe,
    emit_json,
    human,
    iso,
    json_value,
    leaf_record,
    locate,
    open_store,
    ratio,
    step_arg,
    step_label,
    table,
    when,
)


def add_parsers(sub, common) -> None:
    ls = sub.add_parser("ls", parents=[common], help="steps with time, branch, tags, metrics, sizes")
    ls.add_argument("store")
    ls.add_argument("--branch", help="only this branch (default: every branch)")
    ls.set_defaults(run=run_ls)

    show = sub.add_parser("show", parents=[common], help="the component tree of a step")
    show.add_argument("store")
    show.add_argument("step", type=step_arg, nargs="?", help="a step number or a tag (default: the latest)")
    show.add_argument("--branch", help="the step's branch (default: main)")
    show.add_argument("--keys", nargs="+", metavar="NAME", help="only these components")
    show.set_defaults(run=run_show)

    diff = sub.add_parser("diff", parents=[common], help="which leaves, chunks and bytes changed between two steps")
    diff.add_argument("store")
    diff.add_argument("a", type=step_arg, help="the earlier step (a number or a tag)")
    diff.add_argument("b", type=step_arg, nargs="?", help="the later step (default: the latest)")
    diff.add_argument("--branch", help="the steps' branch (default: main)")
    diff.add_argument("--branch-b", metavar="BRANCH", help="B's branch, if not --branch")
    diff.add_argument("--all", action="store_true", help="list unchanged leaves too (as 'same')")
    diff.set_defaults(run=run_diff)

    du = sub.add_parser("du", parents=[common], help="logical vs stored bytes, ratios, per component and step")
    du.add_argument("store")
    du.set_defaults(run=run_du)

    tags = sub.add_parser("tags", parents=[common], help="tags and the steps they name")
    tags.add_argument("store")
    tags.set_defaults(run=run_tags)

    branches = sub.add_parser("branches", parents=[common], help="branches and their steps")
    branches.add_argument("store")
    branches.set_defaults(run=run_branches)

    # castore 0.6's names, kept for scripts: steps is ls's step numbers, stats is du's totals
    steps = sub.add_parser("steps", parents=[common], help="(older) the step numbers of a branch, one per line")
    steps.add_argument("store")
    steps.add_argument("--branch", default="main")
    steps.set_defaults(run=run_steps)
    stats = sub.add_parser("stats", parents=[common], help="(older) store totals")
    stats.add_argument("store")
    stats.set_defaults(run=run_stats)


def _step_record(s) -> dict:
    return {
        "step": s.step,
        "branch": s.branch,
        "created": s.created,
        "created_utc": iso(s.created),
        "tags": list(s.tags),
        "metrics": {k: json_value(v) for k, v in s.metrics.items()},
        "logical_bytes": s.logical_bytes,
        "new_bytes": s.new_bytes,
        "referenced_bytes": s.referenced_bytes,
        "unique_bytes": s.unique_bytes,
        "save": None
        if s.save is None
        else {
            "seconds": s.save.seconds,
            "blocked_seconds": s.save.blocked_seconds,
            "written_bytes": s.save.written_bytes,
        },
        "components": [
            {"name": c.name, "logical_bytes": c.logical_bytes, "new_bytes": c.new_bytes} for c in s.components
        ],
    }


def run_ls(args) -> int:
    with open_store(args, branch=args.branch) as store:
        usage = store.usage()
    steps = [s for s in usage.steps if args.branch is None or s.branch == args.branch]
    if args.json:
        emit_json("ls", {"store": store.path, "steps": [_step_record(s) for s in steps]})
        return EXIT_OK
    if not steps:
        print(f"{store.path}: no steps")
        return EXIT_OK
    rows = []
    for s in steps:
        metrics = " ".join(f"{k}={v:.4g}" for k, v in s.metrics.items())
        seconds = f"{s.save.seconds:.2f}s" if s.save is not None else "-"
        rows.append(
            [
                str(s.step),
                s.branch,
                when(s.created),
                human(s.logical_bytes),
                human(s.new_bytes),
                seconds,
                ",".join(s.tags),
                metrics,
            ]
        )
    print(table(rows, ["STEP", "BRANCH", "SAVED", "LOGICAL", "NEW", "SAVE", "TAGS", "METRICS"], right={0, 3, 4, 5}))
    return EXIT_OK


def run_show(args) -> int:
    with open_store(args, branch=args.branch) as store:
        branch, step = locate(store, args.step, args.branch)
        manifest = store.manifest(step, branch=branch)
        tags = [name for name, (b, s) in all_tags(store).items() if (b, s) == (branch, step)]
        metrics = store.metrics(step, branch=branch)
    names = manifest.names if args.keys is None else args.keys
    missing = [name for name in names if name not in manifest.names]
    if missing:
        raise _no_component(missing, manifest.names, step)
    components: list[dict[str, Any]] = []
    for name in names:
        node = manifest.component(name)
        leaves = [leaf_record(f"{name}/{path}" if path else name, leaf) for path, leaf in leaf_nodes(node)]
        components.append({"name": name, "logical_bytes": node_nbytes(node), "leaves": leaves})
    if args.json:
        emit_json(
            "show",
            {
                "store": store.path,
                "step": step,
                "branch": branch,
                "created": manifest.created,
                "created_utc": iso(manifest.created),
                "tags": tags,
                "metrics": {k: json_value(v) for k, v in metrics.items()},
                "logical_bytes": manifest.logical_bytes,
                "components": components,
            },
        )
        return EXIT_OK
    extra = f", tags {clean(', '.join(tags))}" if tags else ""
    print(f"step {step_label(branch, step)}, saved {when(manifest.created)}: {human(manifest.logical_bytes)}{extra}")
    if metrics:
        print("metrics: " + clean(" ".join(f"{k}={v:.6g}" for k, v in metrics.items())))
    for component in components:
        print(f"{clean(component['name'])}: {len(component['leaves'])} leaves, {human(component['logical_bytes'])}")
        for leaf in component["leaves"]:
            print(f"  {clean(leaf['path'])}: {describe(leaf)}")
    return EXIT_OK


def _no_component(missing, names, step) -> CastoreError:
    return StepNotFoundError(
        f"step {step} has no component {', '.join(map(repr, missing))}; it has {', '.join(map(repr, names))}"
    )


def run_diff(args) -> int:
    with open_store(args, branch=args.branch) as store:
        a = locate(store, args.a, args.branch)
        if args.branch_b is not None:
            check_branch_exists(store, args.branch_b)
        b = locate(store, args.b, args.branch_b or args.branch)
        result = store.diff(a[1], b[1], branch=a[0], branch_b=b[0])
        if args.all:
            manifest_b = store.manifest(b[1], branch=b[0])
    changes: list[dict[str, Any]] = [
        {
            "path": c.path,
            "component": c.component,
            "leaf": c.leaf,
            "change": c.change,
            "a": None if c.a is None else leaf_record(c.path, c.a),
            "b": None if c.b is None else leaf_record(c.path, c.b),
            "chunks": c.chunks,
            "changed_chunks": c.changed_chunks,
            "changed_bytes": c.changed_bytes,
        }
        for c in result.changes
    ]
    same = []
    if args.all:
        changed = {(c.component, c.leaf) for c in result.changes}
        for name, node in manifest_b.components:
            for path, _leaf in leaf_nodes(node):
                if (name, path) not in changed:
                    same.append(f"{name}/{path}" if path else name)
    if args.json:
        body = {
            "store": store.path,
            "a": {"branch": a[0], "step": a[1]},
            "b": {"branch": b[0], "step": b[1]},
            "changes": changes,
            "same_leaves": result.same_leaves,
            "changed_chunks": result.changed_chunks,
            "changed_bytes": result.changed_bytes,
            "new_chunks": result.new_chunks,
            "new_bytes": result.new_bytes,
        }
        if args.all:
            body["same"] = same
        emit_json("diff", body)
        return EXIT_OK
    for c in changes:
        if c["change"] == "changed" and c["chunks"]:
            detail = f"{c['changed_chunks']} of {c['chunks']} chunks, {human(c['changed_bytes'])}"
            if (
                c["a"]
                and c["b"]
                and (c["a"].get("shape"), c["a"].get("dtype")) != (c["b"].get("shape"), c["b"].get("dtype"))
            ):
                detail = f"{describe(c['a'])} -> {describe(c['b'])}; {detail}"
        elif c["change"] == "changed":
            detail = f"{describe(c['a'])} -> {describe(c['b'])}"
        elif c["change"] == "added":
            detail = describe(c["b"])
        else:
            detail = describe(c["a"])
        print(f"{ {'changed': 'M', 'added': 'A', 'removed': 'D'}[c['change']] } {clean(c['path'])}: {detail}")
    for path in same:
        print(f"  {clean(path)}: same")
    print(
        f"{step_label(*a)} -> {step_label(*b)}: {len(changes)} leaves changed, {result.same_leaves} same; "
        f"{result.changed_chunks} chunks changed ({human(result.changed_bytes)}); "
        f"{human(result.new_bytes)} stored that {step_label(*a)} does not reference"
    )
    return EXIT_OK


def run_du(args) -> int:
    with open_store(args) as store:
        usage = store.usage()
        stats = store.stats()
        plan = store.plan_gc()
    gc_bytes = plan.freed_bytes
    body: dict[str, Any] = {
        "store": store.path,
        "steps": len(usage.steps),
        "logical_bytes": usage.logical_bytes,
        "raw_bytes": usage.raw_bytes,
        "stored_bytes": usage.live_bytes,
        "held_bytes": stats.stored_bytes,
        "file_bytes": stats.file_bytes,
        "dedup_ratio": usage.dedup_ratio,
        "compression_ratio": usage.compression_ratio,
        "total_ratio": usage.logical_bytes / usage.live_bytes if usage.live_bytes else 1.0,
        "gc_bytes": gc_bytes,
        "gc_chunks": len(plan.chunks) + len(plan.pages),
        "missing": usage.missing,
        "components": [
            {
                "name": c.name,
                "steps": c.steps,
                "logical_bytes": c.logical_bytes,
                "raw_bytes": c.raw_bytes,
                "stored_bytes": c.stored_bytes,
            }
            for c in usage.components
        ],
        "per_step": [
            {
                "step": s.step,
                "branch": s.branch,
                "logical_bytes": s.logical_bytes,
                "new_bytes": s.new_bytes,
                "referenced_bytes": s.referenced_bytes,
                "unique_bytes": s.unique_bytes,
            }
            for s in usage.steps
        ],
    }
    if args.json:
        emit_json("du", body)
        return EXIT_OK
    print(f"{store.path}: {len(usage.steps)} steps")
    print(f"  logical   {human(usage.logical_bytes):>10}  the state of every kept step, summed")
    print(f"  deduped   {human(usage.raw_bytes):>10}  after deduplication ({ratio(usage.dedup_ratio)})")
    print(f"  stored    {human(usage.live_bytes):>10}  after compression ({ratio(usage.compression_ratio)})")
    print(f"  overall   {ratio(body['total_ratio']):>10}  logical per stored byte")
    print(f"  held      {human(stats.stored_bytes):>10}  chunks held, garbage included")
    print(f"  gc frees  {human(gc_bytes):>10}  ({body['gc_chunks']} chunks and pages no kept step references)")
    print(f"  file      {human(stats.file_bytes):>10}  on disk (castore compact returns free pages)")
    if usage.missing:
        print(f"  missing   {usage.missing:>10}  referenced chunks not found: run castore verify")
    if usage.components:
        print()
        rows = [
            [c.name, str(c.steps), human(c.logical_bytes), human(c.raw_bytes), human(c.stored_bytes)]
            for c in usage.components
        ]
        print(table(rows, ["COMPONENT", "STEPS", "LOGICAL", "DEDUPED", "STORED"], right={1, 2, 3, 4}))
    if usage.steps:
        print()
        rows = [
            [step_label(s.branch, s.step), human(s.logical_bytes), human(s.new_bytes), human(s.unique_bytes)]
            for s in usage.steps
        ]
        print(table(rows, ["STEP", "LOGICAL", "NEW", "ONLY HERE"], right={0, 1, 2, 3}))
    return EXIT_OK


def run_tags(args) -> int:
    with open_store(args) as store:
        tags = all_tags(store)
    if args.json:
        emit_json(
            "tags", {"store": store.path, "tags": [{"name": n, "branch": b, "step": s} for n, (b, s) in tags.items()]}
        )
        return EXIT_OK
    if not tags:
        print(f"{store.path}: no tags")
    for name, (branch, step) in tags.items():
        print(f"{clean(name)}\t{step_label(branch, step)}")
    return EXIT_OK


def run_branches(args) -> int:
    with open_store(args) as store:
        records = []
        for name in store.branches():
            steps = store.steps(branch=name)
            records.append(
                {
                    "name": name,
                    "steps": len(steps),
                    "first": steps[0] if steps else None,
                    "latest": steps[-1] if steps else None,
                }
            )
    if args.json:
        emit_json("branches", {"store": store.path, "branches": records})
        return EXIT_OK
    for r in records:
        span = f"{r['steps']} steps, {r['first']}..{r['latest']}" if r["steps"] else "no steps"
        print(f"{r['name']}: {span}")
    return EXIT_OK


def run_steps(args) -> int:
    with open_store(args, branch=args.branch) as store:
        steps = store.steps(branch=args.branch)
    if args.json:
        emit_json("steps", {"store": store.path, "branch": args.branch, "steps": steps})
    elif steps:
        print("\n".join(map(str, steps)))
    return EXIT_OK


def run_stats(args) -> int:
    with open_store(args) as store:
        s = store.stats()
    if args.json:
        emit_json(
            "stats",
            {
                "store": store.path,
                "steps": s.steps,
                "chunks": s.chunks,
                "stored_bytes": s.stored_bytes,
                "logical_bytes": s.logical_bytes,
                "file_bytes": s.file_bytes,
                "dedup_ratio": s.dedup_ratio,
            },
        )
        return EXIT_OK
    print(
        f"steps {s.steps}\nchunks {s.chunks}\nstored_bytes {s.stored_bytes}\n"
        f"logical_bytes {s.logical_bytes}\nfile_bytes {s.file_bytes}\ndedup_ratio {s.dedup_ratio:.3f}"
    )
    return EXIT_OK
