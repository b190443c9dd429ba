"""``castore``: inspect a store from the shell (read-only: the store is never written).

    castore steps PATH          committed steps, one per line
    castore stats PATH          totals and the dedup ratio
    castore show PATH [STEP]    components and leaves of a step (default: latest)
    castore export PATH STEP OUT_DIR [--keys NAME ...] [--overwrite]
                                a step (number or tag) as .npy files and JSON; see
                                castore/export.py for the layout
"""

from __future__ import annotations

import argparse
import sys

from . import codec
from .errors import CastoreError
from .export import export_step
from .manifest import ArrayLeaf, InlineBlob
from .store import Store


def _describe(node) -> str:
    if isinstance(node, ArrayLeaf):
        where = "inline" if isinstance(node.blob, InlineBlob) else f"{node.blob.nbytes} bytes"
        return f"array {node.dtype} {list(node.shape)} ({where})"
    return type(node).__name__.removesuffix("Leaf").lower()


def _step(text: str) -> int | str:
    return int(text) if text.isdigit() else text  # tags are never all digits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="castore", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("steps", "stats", "show"):
        cmd = sub.add_parser(name)
        cmd.add_argument("path")
        if name == "show":
            cmd.add_argument("step", type=int, nargs="?")
    cmd = sub.add_parser("export", help="write a step as .npy files and JSON")
    cmd.add_argument("path")
    cmd.add_argument("step", type=_step, help="a step number or a tag")
    cmd.add_argument("out_dir", help="an empty or new directory")
    cmd.add_argument("--keys", nargs="+", metavar="NAME", help="only these components")
    cmd.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    args = parser.parse_args(argv)
    try:
        with Store(args.path, create=False, readonly=True) as store:
            if args.command == "export":
                result = export_step(store, args.step, args.out_dir, keys=args.keys, overwrite=args.overwrite)
                print(f"step {result.step}: {result.components} components, {result.leaves} leaves, "
                      f"{result.files} files ({result.nbytes} bytes) in {result.out_dir}")
            elif args.command == "steps":
                print("\n".join(map(str, store.steps())))
            elif args.command == "stats":
                s = store.stats()
                print(f"steps {s.steps}\nchunks {s.chunks}\nstored_bytes {s.stored_bytes}\n"
                      f"logical_bytes {s.logical_bytes}\nfile_bytes {s.file_bytes}\ndedup_ratio {s.dedup_ratio:.3f}")
            else:
                manifest = store.manifest(args.step)
                print(f"step {manifest.step}: {manifest.logical_bytes} logical bytes")
                for name, node in manifest.components:
                    for path, leaf in codec.leaf_nodes(node):
                        print(f"  {f'{name}/{path}' if path else name}: {_describe(leaf)}")
    except CastoreError as exc:
        print(f"castore: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
