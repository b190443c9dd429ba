"""Moving state in and out: export, import, import-elements, import-replay; report and demo."""

from __future__ import annotations

import argparse

from ...errors import StepNotFoundError
from ...format.keys import branch_of, step_of
from ...store import Store
from ..export import export_nbytes, export_step
from ..migrate import import_elements, import_replay
from ._common import (
    EXIT_OK,
    emit_json,
    human,
    locate,
    open_store,
    positive_arg,
    progress,
    step_arg,
    step_label,
    step_number_arg,
)


def add_parsers(sub, common) -> None:
    export = sub.add_parser("export", parents=[common], help="write a step as .npy, .npz or .safetensors files")
    export.add_argument("store")
    export.add_argument("step", type=step_arg, help="a step number or a tag")
    export.add_argument("out_dir", help="an empty or new directory")
    export.add_argument("--format", choices=("npy", "npz", "safetensors"), default="npy", help="(default: npy)")
    export.add_argument("--branch", help="the step's branch (default: main)")
    export.add_argument("--keys", nargs="+", metavar="NAME", help="only these components")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    export.set_defaults(run=run_export)

    imp = sub.add_parser(
        "import", parents=[common], help="save an export (or .npz / .safetensors files) as a step of a store"
    )
    imp.add_argument(
        "source", help="a directory `castore export` wrote, or .npz / .safetensors files or a folder of them"
    )
    imp.add_argument("store", help="the castore store (created if absent)")
    imp.add_argument("--step", type=step_number_arg, help="the step to save as (default: the exported step, or 0)")
    imp.add_argument("--keys", nargs="+", metavar="NAME", help="only these components")
    imp.add_argument("--branch", help="the branch to save to (default: main)")
    imp.add_argument("--overwrite", action="store_true", help="replace a step of that number with other content")
    imp.set_defaults(run=run_import)

    elements = sub.add_parser(
        "import-elements", parents=[common], help="import the complete steps of an elements.Checkpoint directory"
    )
    elements.add_argument("directory", help="the elements.Checkpoint directory (DreamerV3: logdir/ckpt)")
    elements.add_argument("store", help="the castore store (created if absent)")
    elements.add_argument(
        "--allow-pickle",
        action="store_true",
        help="unpickle the checkpoint's .pkl files (runs the code they name: only for checkpoints you trust)",
    )
    elements.add_argument(
        "--step-key",
        metavar="NAME",
        help="number each folder by the int its component NAME holds (DreamerV3: step) instead of its name",
    )
    elements.set_defaults(run=run_import_elements)
    replay = sub.add_parser(
        "import-replay", parents=[common], help="import an embodied replay directory as a RingBuffer"
    )
    replay.add_argument("directory", help="the directory of .npz chunks (DreamerV3: logdir/replay)")
    replay.add_argument("store", help="the castore store (created if absent)")
    replay.add_argument("--step", type=step_number_arg, default=0, help="the step to save it as (default: 0)")
    replay.add_argument("--name", default="replay", help="the component name (default: replay)")
    replay.add_argument(
        "--capacity", type=positive_arg, help="rows of the RingBuffer (default: every row; fewer keeps the newest)"
    )
    replay.add_argument(
        "--merge", action="store_true", help="keep the step's other components (e.g. an imported agent)"
    )
    replay.set_defaults(run=run_import_replay)
    for cmd in (elements, replay):
        cmd.add_argument("--branch", help="the branch to save to (default: main)")
        cmd.add_argument("--overwrite", action="store_true", help="replace steps the store holds with other content")

    push = sub.add_parser("push", parents=[common], help="upload a store's steps to a bucket (only what it lacks)")
    push.add_argument("store")
    push.add_argument("url", help="s3://bucket/prefix (AWS_* variables, AWS_ENDPOINT_URL for a non-AWS server)")
    push.add_argument("--branch", action="append", help="only this branch (repeatable; default: every branch)")
    push.set_defaults(run=run_push)

    pull = sub.add_parser("pull", parents=[common], help="copy a step from a bucket into a store (created if absent)")
    pull.add_argument("url", help="s3://bucket/prefix")
    pull.add_argument("store")
    pull.add_argument("--step", type=step_arg, help="a step number or a tag (default: the branch's latest)")
    pull.add_argument("--branch", help="the step's branch (default: main)")
    pull.set_defaults(run=run_pull)

    report = sub.add_parser("report", parents=[common], help="a picture of the store's storage (PNG or HTML)")
    report.add_argument("store")
    report.add_argument("--out", required=True, help="report.png or report.html (self-contained)")
    report.add_argument("--branch", help="only this branch (default: every branch)")
    report.set_defaults(run=run_report)

    demo = sub.add_parser("demo", help="the main job: a DreamerV3-like run, killed and resumed (what make demo runs)")
    demo.add_argument("demo_args", nargs=argparse.REMAINDER, help="passed on (see castore demo -- --help)")
    demo.set_defaults(run=run_demo, json=False)


def run_export(args) -> int:
    with open_store(args, branch=args.branch) as store:
        branch, step = locate(store, args.step, args.branch)
        total = export_nbytes(store, args.step, keys=args.keys)
        with progress(total, "export") as bar:
            result = export_step(
                store,
                args.step,
                args.out_dir,
                keys=args.keys,
                overwrite=args.overwrite,
                format=args.format,
                progress=bar.update,
            )
    if args.json:
        emit_json(
            "export",
            {
                "store": store.path,
                "branch": branch,
                "step": result.step,
                "format": args.format,
                "out_dir": result.out_dir,
                "components": result.components,
                "leaves": result.leaves,
                "files": result.files,
                "nbytes": result.nbytes,
            },
        )
    else:
        print(
            f"step {result.step}: {result.components} components, {result.leaves} leaves, "
            f"{result.files} files ({human(result.nbytes)}) in {result.out_dir}"
        )
    return EXIT_OK


def run_import(args) -> int:
    from ..importer import import_dir

    with progress(None, "import") as bar:
        result = import_dir(
            args.source,
            args.store,
            step=args.step,
            branch=args.branch,
            overwrite=args.overwrite,
            keys=args.keys,
            progress=bar.update,
            allow_network_fs=args.allow_network_fs,
        )
    if args.json:
        emit_json(
            "import",
            {
                "store": result.store,
                "branch": result.branch,
                "layout": result.layout,
                "step": result.step,
                "components": list(result.components),
                "leaves": result.leaves,
                "nbytes": result.nbytes,
                "new_bytes": result.new_bytes,
                "unchanged": result.unchanged,
            },
        )
    else:
        what = "stored already" if result.unchanged else f"{human(result.new_bytes)} new"
        print(
            f"step {result.step} <- {args.source}: {len(result.components)} components, {result.leaves} leaves, "
            f"{human(result.nbytes)} ({what})"
        )
    return EXIT_OK


def run_import_elements(args) -> int:
    result = import_elements(
        args.directory,
        args.store,
        allow_pickle=args.allow_pickle,
        step_key=args.step_key,
        branch=args.branch,
        overwrite=args.overwrite,
        allow_network_fs=args.allow_network_fs,
    )
    if args.json:
        emit_json(
            "import-elements",
            {
                "store": result.store,
                "branch": result.branch,
                "imported": [
                    {
                        "step": s.step,
                        "folder": s.folder,
                        "components": list(s.components),
                        "new_bytes": s.new_bytes,
                        "unchanged": s.unchanged,
                    }
                    for s in result.imported
                ],
                "skipped": [{"folder": s.folder, "reason": s.reason} for s in result.skipped],
            },
        )
        return EXIT_OK
    for step in result.imported:
        what = "stored already" if step.unchanged else f"{', '.join(step.components)}; {step.new_bytes} new bytes"
        print(f"step {step.step} <- {step.folder} ({what})")
    for skip in result.skipped:
        print(f"skipped {skip.folder}: {skip.reason}")
    fresh = sum(not step.unchanged for step in result.imported)
    print(
        f"{fresh} steps imported, {len(result.imported) - fresh} stored already, {len(result.skipped)} folders "
        f"skipped; store {result.store}, branch {result.branch}"
    )
    return EXIT_OK


def run_import_replay(args) -> int:
    result = import_replay(
        args.directory,
        args.store,
        step=args.step,
        name=args.name,
        capacity=args.capacity,
        merge=args.merge,
        branch=args.branch,
        overwrite=args.overwrite,
        allow_network_fs=args.allow_network_fs,
    )
    if args.json:
        emit_json(
            "import-replay",
            {
                "store": result.store,
                "branch": result.branch,
                "step": result.step,
                "name": result.name,
                "rows": result.rows,
                "files": result.files,
                "streams": len(result.stream_starts),
                "dropped_rows": result.dropped_rows,
                "capacity": result.capacity,
                "fields": list(result.fields),
                "new_bytes": result.new_bytes,
                "unchanged": result.unchanged,
            },
        )
        return EXIT_OK
    dropped = f", {result.dropped_rows} older rows left out" if result.dropped_rows else ""
    what = "stored already" if result.unchanged else f"{result.new_bytes} new bytes"
    print(
        f"{result.rows} rows of {result.files} chunk files in {len(result.stream_starts)} streams{dropped}, "
        f"capacity {result.capacity}, fields {', '.join(result.fields)}"
    )
    print(f"saved as {result.name!r} of step {result.step} ({what}); store {result.store}, branch {result.branch}")
    return EXIT_OK


def run_push(args) -> int:
    with open_store(args, write=True) as store:
        results = store.push(args.url, branches=args.branch)
    sent = sum(r.object_bytes for r in results)
    if args.json:
        emit_json(
            "push",
            {
                "store": store.path,
                "url": args.url,
                "steps": [
                    {"branch": branch_of(r.key), "step": step_of(r.key), "bytes": r.object_bytes} for r in results
                ],
                "values": sum(r.values for r in results),
                "bytes": sent,
            },
        )
        return EXIT_OK
    for r in results:
        print(f"{step_label(branch_of(r.key), step_of(r.key))}: {r.values} chunks and pages, {human(r.object_bytes)}")
    print(
        f"pushed {len(results)} steps, {human(sent)} to {args.url}" if results else f"{args.url} has every step already"
    )
    return EXIT_OK


def run_pull(args) -> int:
    branch = args.branch or "main"
    with Store(args.store, branch=branch, allow_network_fs=args.allow_network_fs) as store:
        before = store.stats().stored_bytes
        step = store.pull(args.step, branch=branch, url=args.url)
        if step is None:
            raise StepNotFoundError(f"{args.url} has no step of branch {branch!r}")
        fetched = store.stats().stored_bytes - before
    if args.json:
        emit_json("pull", {"url": args.url, "store": store.path, "branch": branch, "step": step, "bytes": fetched})
        return EXIT_OK
    print(f"pulled {step_label(branch, step)} into {store.path}: {human(fetched)} new")
    return EXIT_OK


def run_report(args) -> int:
    from ..report import write_report

    with open_store(args, branch=args.branch) as store:
        result = write_report(store, args.out, branch=args.branch)
    if args.json:
        emit_json(
            "report",
            {"store": store.path, "out": result.path, "format": result.format, "steps": result.steps},
        )
    else:
        print(f"wrote {result.path} ({result.format}, {result.steps} steps)")
    return EXIT_OK


def run_demo(args) -> int:
    from .. import demo

    rest = args.demo_args[1:] if args.demo_args[:1] == ["--"] else args.demo_args
    demo.main(rest)
    return EXIT_OK
