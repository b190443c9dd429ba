"""What every command shares: opening stores, naming steps, sizes, tables, JSON, progress."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import numpy as np

from ...errors import StepNotFoundError
from ...format.chunker import chunk_count
from ...format.codec import dtype_from_name
from ...format.manifest import ArrayLeaf, BytesLeaf, InlineBlob, PickleLeaf, ScalarLeaf, TypedNode, ValueLeaf
from ...store import Store

EXIT_OK = 0  #: done; for verify, no problem found
EXIT_PROBLEMS = 1  #: problems found: damage (verify), or an operation failed on the store's data or state
EXIT_USAGE = 2  #: the command cannot run as typed: bad arguments, no such store, step, tag or branch
EXIT_PIPE = 141  #: the reader of stdout went away (128 + SIGPIPE, as a shell reports it)

JSON_VERSION = 1  #: the ``"castore_json"`` field of every --json document (docs/cli.md)


# -- arguments -----------------------------------------------------------------------------


def step_arg(text: str) -> int | str:
    """A step number or a tag (tags are never all digits)."""
    return int(text) if text.isdigit() else text


def fraction_arg(text: str) -> float:
    """``5%`` or ``0.05``."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a fraction or percentage: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 100%]: {text!r}")
    return value


def positive_arg(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return int(text)


def step_number_arg(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a step number: {text!r}")
    return int(text)


# -- opening and naming --------------------------------------------------------------------


def is_bucket(location: str) -> bool:
    """True for an ``s3://`` URL (a bucket), not a local path."""
    return location[:5].lower() == "s3://"


def open_store(args, path: str | None = None, *, write: bool = False, branch: str | None = None) -> Store:
    """An existing store: read-only unless ``write`` (a read-only command never creates or
    changes one).  A ``branch`` that holds no step is an error listing the branches."""
    store = Store(
        args.store if path is None else path,
        create=False,
        readonly=not write,
        branch=branch or "main",
        allow_network_fs=args.allow_network_fs,
    )
    try:
        if branch is not None:
            check_branch_exists(store, branch)
    except BaseException:
        store.close()
        raise
    return store


def check_branch_exists(store: Store, branch: str) -> None:
    names = store.branches()
    if branch not in names:
        raise StepNotFoundError(f"no branch {branch!r} in {store.path}; branches: {', '.join(names)}")


def all_tags(store: Store) -> dict[str, tuple[str, int]]:
    """``{tag: (branch, step)}`` over every branch, by tag name."""
    out = {}
    for branch in store.branches():
        for name, step in store.tags(branch=branch).items():
            out[name] = (branch, step)
    return dict(sorted(out.items()))


def _listing(values, limit: int = 12) -> str:
    values = list(values)
    if len(values) <= limit:
        return ", ".join(map(str, values))
    head = ", ".join(map(str, values[: limit // 2]))
    tail = ", ".join(map(str, values[-limit // 2 :]))
    return f"{head}, ... {tail} ({len(values)} in all)"


def locate(store: Store, step: int | str | None, branch: str | None = None) -> tuple[str, int]:
    """``(branch, step)`` of a step number, a tag, or None (the latest); an unknown one is a
    StepNotFoundError that lists what exists."""
    branch = branch or "main"
    if isinstance(step, str):
        try:
            return store.locate(step)
        except StepNotFoundError:
            named, sep, number = step.rpartition(":")
            if sep and number.isdigit() and named in store.branches():  # BRANCH:STEP, as output writes it
                return locate(store, int(number), named)
            tags = all_tags(store)
            known = clean(", ".join(tags)) if tags else "none"
            raise StepNotFoundError(f"no tag {step!r} in {store.path}; tags: {known}") from None
    steps = store.steps(branch=branch)
    if step is None:
        if not steps:
            raise StepNotFoundError(f"branch {branch!r} of {store.path} has no steps")
        return branch, steps[-1]
    if step not in steps:
        what = _listing(steps) if steps else "none"
        raise StepNotFoundError(f"no step {step} in branch {branch!r} of {store.path}; its steps: {what}")
    return branch, step


def step_label(branch: str, step: int) -> str:
    return str(step) if branch == "main" else f"{branch}:{step}"


# -- output ----------------------------------------------------------------------------------


def clean(text: str) -> str:
    """``text`` safe for a terminal: control and format characters (newlines, ANSI escapes,
    bidi overrides) of untrusted names are shown as ``\\xNN`` / ``\\uNNNN`` escapes, so a
    component name can neither fake a line of output nor drive the terminal."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return "".join(out)


def human(nbytes: float) -> str:
    """``1.5 MiB``: powers of 1024, three significant digits."""
    if nbytes < 1024:
        return f"{int(nbytes)} B"
    value = float(nbytes)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def ratio(value: float) -> str:
    return f"{value:.2f}x" if math.isfinite(value) else "-"


def when(created: float) -> str:
    """Local time, to the second."""
    try:
        return datetime.datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return f"{created!r}"


def iso(created: float) -> str | None:
    try:
        return datetime.datetime.fromtimestamp(created, datetime.UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return None


def table(rows: list[list[str]], headers: list[str], right: set[int] = frozenset()) -> str:  # type: ignore[assignment]
    """Columns aligned; ``right`` holds the indices of right-aligned (number) columns."""
    cells = [headers, *([clean(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def emit_json(kind: str, body: dict) -> None:
    """One JSON document on stdout: ``{"castore_json": 1, "kind": ..., ...}``."""
    document = {"castore_json": JSON_VERSION, "kind": kind, **body}
    print(json.dumps(document, indent=1, ensure_ascii=False, allow_nan=False, default=_json_default))


def _json_default(value):
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    raise TypeError(f"not JSON: {type(value).__name__}")


def json_value(value):
    """A plain value as strict JSON: non-finite floats as the strings ``nan``, ``inf``, ``-inf``."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def progress(total: int | None, description: str):
    """A byte progress bar on stderr, shown only when stderr is a terminal.

    tqdm (not rich): one small pure-Python package without dependencies, which turns itself
    off when its stream is not a TTY (``disable=None``), so pipes and logs stay clean.
    """
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=True if sys.stderr is None else None,  # stderr closed (2>&-): no bar at all
        file=sys.stderr if sys.stderr is not None else open(os.devnull, "w"),
        leave=False,
        dynamic_ncols=True,
    )


# -- describing manifest leaves ------------------------------------------------------------------


def leaf_record(path: str, node) -> dict:
    """A leaf of a manifest as the JSON of ``show`` and ``diff`` describe it."""
    record: dict = {"path": path}
    if isinstance(node, TypedNode):  # a torch tensor or jax array around its array leaf
        record["framework"] = node.kind
        for name in ("dtype", "device"):
            if node.attr(name) is not None:
                record[f"{node.kind}_{name}"] = str(node.attr(name))
        node = node.node
    if isinstance(node, ValueLeaf):
        record.update(kind="value", type=type(node.value).__name__, value=json_value(node.value))
        record["nbytes"] = len(node.value) if isinstance(node.value, str) else 8
    elif isinstance(node, ScalarLeaf):
        record.update(kind="scalar", dtype=_dtype(node.dtype), nbytes=len(node.data))
        value = _scalar_value(node)
        if value is not None:
            record["value"] = value
    elif isinstance(node, ArrayLeaf):
        record.update(kind="array", dtype=_dtype(node.dtype), shape=list(node.shape))
        record.update(_blob_record(node.blob))
    elif isinstance(node, BytesLeaf):
        record.update(kind="bytes", **_blob_record(node.blob))
    elif isinstance(node, PickleLeaf):
        record.update(kind="pickle", **_blob_record(node.blob))
    else:
        record["kind"] = type(node).__name__
    return record


def _blob_record(blob) -> dict:
    if isinstance(blob, InlineBlob):
        return {"nbytes": len(blob.data), "stored": "inline", "chunks": 0}
    count = chunk_count(blob.nbytes, blob.chunk_nbytes)
    return {"nbytes": blob.nbytes, "stored": "chunks", "chunks": count, "chunk_bytes": blob.chunk_nbytes}


def _dtype(name: str) -> str:
    try:
        return dtype_from_name(name).name
    except Exception:  # an unknown name (ml_dtypes missing): show it as stored
        return name


def _scalar_value(node: ScalarLeaf):
    try:
        dtype = dtype_from_name(node.dtype)
        if dtype.kind not in "biuf" or dtype.itemsize != len(node.data):
            return None
        value = np.frombuffer(node.data, dtype)[0].item()
    except Exception:
        return None
    return json_value(value)


def describe(record: dict) -> str:
    """One line for a leaf record: ``array float32 [100, 10]  3.91 KiB (1 chunk)``."""
    kind = record["kind"]
    prefix = f"{record['framework']} " if "framework" in record else ""
    if kind == "value":
        value = record["value"]
        shown = value if record["type"] == "float" and isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        return f"{prefix}{record['type']} = {clean(shown[:120])}"
    if kind == "scalar":
        shown = f" = {record['value']}" if "value" in record else ""
        return f"{prefix}scalar {record['dtype']}{shown}"
    if kind in ("array", "bytes", "pickle"):
        shape = f" {record['dtype']} {record['shape']}" if kind == "array" else ""
        where = "inline" if record["stored"] == "inline" else f"{record['chunks']} chunk{'s' * (record['chunks'] != 1)}"
        device = f" on {record['torch_device']}" if record.get("torch_device") else ""
        return f"{prefix}{kind}{shape}{device}  {human(record['nbytes'])} ({where})"
    return kind
