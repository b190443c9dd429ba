"""``castore``: inspect a store from the shell (read-only), or import checkpoints into one.

castore steps PATH [--branch B]     committed steps, one per line
castore stats PATH                  totals and the dedup ratio
castore show PATH [STEP]            components and leaves of a step (default: latest)
castore branches PATH               branches and their steps
castore verify PATH [--sample 5%]   check every step down to its chunks; exit 1 on damage
castore export PATH STEP OUT_DIR [--keys NAME ...] [--overwrite]
                            a step (number or tag) as .npy files and JSON; see
                            castore/tools/export.py for the layout

These two write to STORE (created if absent):

castore import-elements DIR STORE --allow-pickle [--step-key NAME] [--branch B] [--overwrite]
                            every complete step of an elements.Checkpoint directory
                            (DreamerV3's logdir/ckpt); the .pkl files are unpickled, so
                            only for checkpoints you trust
castore import-replay DIR STORE [--step N] [--name replay] [--capacity N] [--merge]
                      [--branch B] [--overwrite]
                            an embodied replay directory of .npz chunks (DreamerV3's
                            logdir/replay) as one RingBuffer component of step N
See castore/tools/migrate/ for numbering, row order and what is skipped.

Exit status: 0 on success; 1 for an error (one line on stderr) or, for verify, damage
found; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

from ..errors import CastoreError
from ..format import codec
from ..format.manifest import ArrayLeaf, InlineBlob, TypedNode
from ..store import Store
from .export import export_step
from .migrate import import_elements, import_replay


def _describe(node) -> str:
    if isinstance(node, TypedNode) and isinstance(node.node, ArrayLeaf):  # a torch / jax array
        extra = {"torch": f" {node.attr('dtype')} on {node.attr('device')}"}.get(node.kind, "")
        return f"{node.kind}{extra}: {_describe(node.node)}"
    if isinstance(node, ArrayLeaf):
        where = "inline" if isinstance(node.blob, InlineBlob) else f"{node.blob.nbytes} bytes"
        return f"array {node.dtype} {list(node.shape)} ({where})"
    return type(node).__name__.removesuffix("Leaf").lower()


def _step(text: str) -> int | str:
    return int(text) if text.isdigit() else text  # tags are never all digits


def _fraction(text: str) -> float:
    """``5%`` or ``0.05``."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a fraction or percentage: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 100%]: {text!r}")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return int(text)


def _step_number(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a step number: {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="castore", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--allow-network-fs",
        action="store_true",
        help="open a store on NFS/SMB anyway (LMDB is unsafe there; see docs/guarantees.md)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "steps": "committed steps of a branch",
        "stats": "store totals",
        "show": "components and leaves of a step",
        "branches": "branches and their steps",
        "verify": "check every step down to its chunks",
        "export": "write a step as .npy files and JSON",
    }
    for name, text in commands.items():
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("path")
        if name in ("steps", "show", "export"):
            cmd.add_argument("--branch", default="main")
        if name == "show":
            cmd.add_argument("step", type=_step, nargs="?", help="a step number or a tag (default: latest)")
    verify = sub.choices["verify"]
    verify.add_argument(
        "--sample",
        type=_fraction,
        default=1.0,
        metavar="FRACTION",
        help="hash only this part of the chunks, e.g. 5%% (presence is always checked)",
    )
    verify.add_argument("--seed", type=int, help="pick the sample reproducibly")
    verify.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    export = sub.choices["export"]
    export.add_argument("step", type=_step, help="a step number or a tag")
    export.add_argument("out_dir", help="an empty or new directory")
    export.add_argument("--keys", nargs="+", metavar="NAME", help="only these components")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    _import_parsers(sub)
    return parser


def _import_parsers(sub) -> None:
    elements = sub.add_parser("import-elements", help="import the complete steps of an elements.Checkpoint directory")
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
    replay = sub.add_parser("import-replay", help="import an embodied replay directory as a RingBuffer")
    replay.add_argument("directory", help="the directory of .npz chunks (DreamerV3: logdir/replay)")
    replay.add_argument("store", help="the castore store (created if absent)")
    replay.add_argument("--step", type=_step_number, default=0, help="the step to save it as (default: 0)")
    replay.add_argument("--name", default="replay", help="the component name (default: replay)")
    replay.add_argument(
        "--capacity", type=_positive, help="rows of the RingBuffer (default: every row; fewer keeps the newest)"
    )
    replay.add_argument(
        "--merge", action="store_true", help="keep the step's other components (e.g. an imported agent)"
    )
    for cmd in (elements, replay):
        cmd.add_argument("--branch", help="the branch to save to (default: main)")
        cmd.add_argument("--overwrite", action="store_true", help="replace steps the store holds with other content")


def main(argv=None) -> int:
    """Run a command; exit status 0, or 1 for an error or (verify) any problem found."""
    args = _parser().parse_args(argv)
    if args.command == "verify" and not args.in_process:
        return _verify_isolated(argv if argv is not None else sys.argv[1:])
    if args.command in _IMPORTS:
        try:
            return _IMPORTS[args.command](args)
        except CastoreError as exc:
            print(f"castore: {exc}", file=sys.stderr)
            return 1
    try:
        with Store(
            args.path,
            create=False,
            readonly=True,
            branch=getattr(args, "branch", "main"),
            allow_network_fs=args.allow_network_fs,
        ) as store:
            return _COMMANDS[args.command](store, args)
    except CastoreError as exc:
        print(f"castore: {exc}", file=sys.stderr)
        return 1


def _steps(store: Store, args) -> int:
    print("\n".join(map(str, store.steps())))
    return 0


def _stats(store: Store, args) -> int:
    s = store.stats()
    print(
        f"steps {s.steps}\nchunks {s.chunks}\nstored_bytes {s.stored_bytes}\n"
        f"logical_bytes {s.logical_bytes}\nfile_bytes {s.file_bytes}\ndedup_ratio {s.dedup_ratio:.3f}"
    )
    return 0


def _show(store: Store, args) -> int:
    manifest = store.manifest(args.step)
    print(f"step {manifest.step}: {manifest.logical_bytes} logical bytes")
    for name, node in manifest.components:
        for path, leaf in codec.leaf_nodes(node):
            print(f"  {f'{name}/{path}' if path else name}: {_describe(leaf)}")
    return 0


def _branches(store: Store, args) -> int:
    for name in store.branches():
        steps = store.steps(branch=name)
        span = f"{len(steps)} steps, {steps[0]}..{steps[-1]}" if steps else "no steps"
        print(f"{name}: {span}")
    return 0


def _verify(store: Store, args) -> int:
    report = store.verify(args.sample, seed=args.seed)
    for problem in report.problems:
        print(problem)
    part = "all" if report.sample == 1 else f"a {report.sample:.1%} sample:"
    print(
        f"checked {report.steps} steps, {report.chunks} chunks present; hashed {part} "
        f"{report.hashed_chunks} chunks, {report.hashed_bytes} bytes"
    )
    if report.ok:
        print("no problems found")
        return 0
    print(
        f"{len(report.problems)} problems; {len(report.affected_steps)} steps affected: "
        + ", ".join(f"{s}" if b == "main" else f"{b}:{s}" for b, s in report.affected_steps[:50])
    )
    return 1


def _verify_isolated(argv: list[str]) -> int:
    """Run verify in a child process: LMDB trusts its B-tree, and a damaged one can kill the
    reading process (SIGBUS/SIGSEGV) before castore sees any bytes.  That is reported too."""
    child = subprocess.run([sys.executable, "-m", "castore", *argv, "--in-process"], check=False)
    if child.returncode >= 0:
        return child.returncode
    name = signal.Signals(-child.returncode).name if -child.returncode in signal.valid_signals() else "a signal"
    print(
        f"castore: reading the store killed the verifying process ({name}): LMDB's own structure in "
        "data.mdb is damaged. Restore the store from a backup, or copy intact steps out with "
        "`castore export` (in a child process, step by step).",
        file=sys.stderr,
    )
    return 1


def _export(store: Store, args) -> int:
    result = export_step(store, args.step, args.out_dir, keys=args.keys, overwrite=args.overwrite)
    print(
        f"step {result.step}: {result.components} components, {result.leaves} leaves, "
        f"{result.files} files ({result.nbytes} bytes) in {result.out_dir}"
    )
    return 0


def _import_elements(args) -> int:
    result = import_elements(
        args.directory,
        args.store,
        allow_pickle=args.allow_pickle,
        step_key=args.step_key,
        branch=args.branch,
        overwrite=args.overwrite,
        allow_network_fs=args.allow_network_fs,
    )
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
    return 0


def _import_replay(args) -> int:
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
    dropped = f", {result.dropped_rows} older rows left out" if result.dropped_rows else ""
    what = "stored already" if result.unchanged else f"{result.new_bytes} new bytes"
    print(
        f"{result.rows} rows of {result.files} chunk files in {len(result.stream_starts)} streams{dropped}, "
        f"capacity {result.capacity}, fields {', '.join(result.fields)}"
    )
    print(f"saved as {result.name!r} of step {result.step} ({what}); store {result.store}, branch {result.branch}")
    return 0


_IMPORTS = {"import-elements": _import_elements, "import-replay": _import_replay}

_COMMANDS = {
    "steps": _steps,
    "stats": _stats,
    "show": _show,
    "branches": _branches,
    "verify": _verify,
    "export": _export,
}


if __name__ == "__main__":
    sys.exit(main())
