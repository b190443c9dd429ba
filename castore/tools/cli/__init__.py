"""``castore``: inspect, compare, maintain, export and picture a store from the shell.

The commands are grouped in :mod:`._inspect` (read-only listings), :mod:`._maintain`
(tags, deletes, GC, compaction, branches, verify) and :mod:`._transfer` (export, import,
report, demo); each registers its subcommands and runs them.  This module parses, opens
nothing itself, and turns errors into one line and an exit status (docs/cli.md):

* 0: done (verify: no problem found);
* 1: problems found: damage (verify, or a read that met it), a store busy or locked by
  another writer, files that cannot be imported, any other castore error;
* 2: the command cannot run as typed: bad arguments, no such store, step, tag, branch or
  component, a refused request (deleting a tagged step, a step that exists);
* 141: stdout was closed by its reader (``castore ls | head``): no traceback.

``--debug`` shows the traceback of an error.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from ...errors import (
    CastoreError,
    SelectionError,
    StepExistsError,
    StepNotFoundError,
    StoreNotFoundError,
    UsageError,
)
from . import _inspect, _maintain, _transfer
from ._common import EXIT_PIPE, EXIT_PROBLEMS, EXIT_USAGE

_USAGE_ERRORS = (UsageError, StepNotFoundError, StoreNotFoundError, SelectionError, StepExistsError)

DESCRIPTION = """\
castore: a content-addressed, deduplicating checkpoint store.  Every command takes the
store's path first; read-only commands never create or change a store.

  look:      ls, show, diff, du, tags, branches, verify, report
  change:    tag, untag, delete, delete-branch, gc, compact, fork, rollback
  move:      export, import, import-elements, import-replay, push, pull

A bucket (s3://bucket/prefix) works wherever a store is only read: ls, show, diff, du,
tags, branches, verify, report, export; gc s3://... collects the bucket.
  try it:    demo

Listings take --json (one document, shape in docs/cli.md).  Exit status: 0 ok, 1 problems
found, 2 usage error.  `castore COMMAND --help` for a command's options.
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("castore")
    except PackageNotFoundError:
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document (see docs/cli.md)")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common.add_argument(
        "--allow-network-fs",
        action="store_true",
        help="open a store on NFS/SMB anyway (LMDB is unsafe there; see docs/guarantees.md)",
    )
    top = argparse.ArgumentParser(
        prog="castore", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    top.add_argument("--version", action="version", version=f"castore {_version()}")
    # also accepted before the command; other dests, as a subcommand's defaults would overwrite them
    top.add_argument("--debug", dest="top_debug", action="store_true", help=argparse.SUPPRESS)
    top.add_argument("--allow-network-fs", dest="top_allow_network_fs", action="store_true", help=argparse.SUPPRESS)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _inspect.add_parsers(sub, common)
    _maintain.add_parsers(sub, common)
    _transfer.add_parsers(sub, common)
    return top


def main(argv=None) -> int:
    """Run one command; returns its exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and argument errors (2)
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    args.argv = argv
    args.debug = getattr(args, "debug", False) or args.top_debug
    args.allow_network_fs = getattr(args, "allow_network_fs", False) or args.top_allow_network_fs
    try:
        code = args.run(args)
        if sys.stdout is not None:  # None: stdout was closed before we started (>&-)
            sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _pipe_closed()
    except CastoreError as exc:
        return _fail(args, exc, EXIT_USAGE if isinstance(exc, _USAGE_ERRORS) else EXIT_PROBLEMS)
    except KeyboardInterrupt:
        if sys.stderr is not None:
            print("castore: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line, the traceback with --debug
        return _fail(args, exc, EXIT_PROBLEMS, unexpected=True)


def _fail(args, exc: BaseException, code: int, *, unexpected: bool = False) -> int:
    if sys.stderr is None:  # stderr closed (2>&-): the exit status says it; never print to stdout
        return code
    try:
        if args.debug:
            traceback.print_exc()
        what = f"unexpected {type(exc).__name__}: " if unexpected else ""
        hint = " (run with --debug for the traceback, and please report it)" if unexpected and not args.debug else ""
        print(f"castore: {what}{exc}{hint}", file=sys.stderr)
    except BrokenPipeError:
        pass
    return code


def _pipe_closed() -> int:
    """The reader left: point stdout at /dev/null so the interpreter's final flush does not
    raise again (Python's documented recipe for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return EXIT_PIPE
