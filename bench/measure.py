"""What the benchmarks measure alike: resident memory (current, peak, file-backed) and the
report they print and write."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import numpy as np

MiB = 1 << 20


def _status(*keys: str) -> tuple[int, ...]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return tuple(int(fields[key].split()[0]) * 1024 for key in keys or ("VmRSS", "VmHWM"))


def rss_file() -> int | None:
    """File-backed resident bytes (mapped files, here LMDB's map), if /proc says."""
    try:
        return _status("RssFile")[0]
    except (OSError, KeyError, ValueError):
        return None


class Rss:
    """Current and peak RSS; the peak reset by ``clear_refs`` 5 if that works here (checked
    by touching and freeing 64 MiB), else ``ru_maxrss`` (the process's peak so far)."""

    def __init__(self):
        self.method = "getrusage ru_maxrss (peak not resettable)"
        try:
            probe = np.ones(64 * MiB, np.uint8)
            del probe
            self._clear()
            rss, hwm = _status()
            if hwm - rss < 8 * MiB:
                self.method = "/proc/self/status VmHWM after clear_refs 5"
        except (OSError, KeyError, ValueError):
            pass

    @staticmethod
    def _clear() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def reset(self) -> int:
        """Reset the peak (if possible); returns the current RSS."""
        if self.method.startswith("/proc"):
            self._clear()
            return _status()[0]
        try:
            return _status()[0]
        except (OSError, KeyError, ValueError):
            return self.peak()

    def peak(self) -> int:
        if self.method.startswith("/proc"):
            return _status()[1]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def emit(lines: list[str], out: str | None) -> None:
    """Print the report, and write it to ``out`` too if given."""
    text = "\n".join(lines)
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")


def run_child(script: str, kind: str, spec: dict) -> dict:
    """Run ``script --child kind SPEC`` in a fresh interpreter; its last stdout line is JSON."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(script), "--child", kind, json.dumps(spec)], capture_output=True, text=True
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{kind} child exited {proc.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])
