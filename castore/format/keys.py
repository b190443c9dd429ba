"""Keys of the ``steps``, ``stepinfo`` and ``tags`` tables (pure: no I/O).

Step keys (format 3): a step of the ``main`` branch is keyed by its 8-byte big-endian
number (first byte < 0x80, as in formats 1 and 2); a step of branch ``name`` by
``0xff + name + 0x00 + number``.  So each branch is one contiguous key range of the
``steps`` table, main first, and ``stepinfo`` and ``tags`` use the same keys.
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import CorruptDataError, UsageError

MAIN = "main"
MAX_STEP = (1 << 63) - 1
MAX_TAG_BYTES = 256
MAX_BRANCH_CHARS = 200  # keys stay well within LMDB's 511 bytes
BRANCH_MARK = b"\xff"
_BRANCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@=/-]*")


def check_step(step) -> int:
    """A step number: an int (or numpy integer) in [0, 2**63); else :class:`UsageError`."""
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise UsageError(f"step must be an int, got {type(step).__name__}")
    if not 0 <= int(step) <= MAX_STEP:
        raise UsageError(f"step must be in [0, 2**63), got {step}")
    return int(step)


def check_branch(name) -> str:
    """A branch name: letters, digits and ``._+@=/-``, starting with a letter or digit."""
    if not isinstance(name, str) or not _BRANCH_NAME.fullmatch(name) or len(name) > MAX_BRANCH_CHARS:
        raise UsageError(
            f"a branch name is 1-{MAX_BRANCH_CHARS} letters, digits or ._+@=/- starting with a "
            f"letter or digit; got {name!r}"
        )
    return name


def branch_prefix(branch: str) -> bytes:
    """The common prefix of the step keys of ``branch`` (empty for main)."""
    return b"" if branch == MAIN else BRANCH_MARK + branch.encode() + b"\x00"


def branch_end(branch: str) -> bytes:
    """A key past every step key of ``branch`` and before the next branch's."""
    return BRANCH_MARK if branch == MAIN else BRANCH_MARK + branch.encode() + b"\x01"


def step_key(step: int, branch: str = MAIN) -> bytes:
    return branch_prefix(branch) + step.to_bytes(8, "big")


def step_of(key) -> int:
    return int.from_bytes(key[-8:], "big")


def branch_of(key) -> str:
    """The branch of a step key; raises :class:`CorruptDataError` for a malformed one."""
    key = bytes(key)
    if len(key) == 8 and key[0] < 0x80:
        return MAIN
    if len(key) < 11 or key[:1] != BRANCH_MARK or key[-9] != 0:
        raise CorruptDataError(f"malformed step key {key[:40]!r}")
    try:
        return check_branch(key[1:-9].decode())
    except (UnicodeDecodeError, UsageError):
        raise CorruptDataError(f"malformed branch name in step key {key[:40]!r}") from None


def in_branch(key, branch: str) -> bool:
    """True if ``key`` is a step key of ``branch``."""
    if branch == MAIN:
        return len(key) == 8 and key[0] < 0x80
    prefix = branch_prefix(branch)
    return bytes(key[: len(prefix)]) == prefix and len(key) == len(prefix) + 8


def describe_key(key: bytes) -> str:
    """``step 5``, or ``step 5 of branch 'x'`` for a step of another branch than main."""
    branch = branch_of(key)
    return f"step {step_of(key)}" if branch == MAIN else f"step {step_of(key)} of branch {branch!r}"


def tag_key(name: str) -> bytes:
    """The key of tag ``name``: its UTF-8; a tag is never all digits (those are steps)."""
    if not isinstance(name, str) or not name or name.isdigit():
        raise UsageError(f"a tag is a non-empty str that is not a step number, got {name!r}")
    key = name.encode("utf-8")
    if len(key) > MAX_TAG_BYTES:
        raise UsageError(f"tag {name[:40]!r}... is longer than {MAX_TAG_BYTES} bytes")
    return key


def trash_key(now_ns: int, key: bytes) -> bytes:
    """The trash key of a deleted step's manifest: deletion time, then its step key."""
    return now_ns.to_bytes(8, "big") + key


def prefix_stop(prefix: bytes) -> bytes | None:
    """The least key past every key starting with ``prefix`` (None: no such key, scan to the end)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])
