"""``ml_dtypes`` (bfloat16, float8...), imported the first time a value needs it.

Importing it costs ~0.65 s on this machine, more than castore and numpy together, so a
process that never meets such a dtype (a CLI command, a reader of float32 weights) never
pays it.  A program holding a bfloat16 array has imported it already.
"""

from __future__ import annotations

import importlib

_module = None
_missing = False


def module():
    """The ``ml_dtypes`` module, or None if it is not installed."""
    global _module, _missing
    if _module is None and not _missing:
        try:
            _module = importlib.import_module("ml_dtypes")
        except ImportError:  # pragma: no cover - exercised only without ml_dtypes
            _missing = True
    return _module
