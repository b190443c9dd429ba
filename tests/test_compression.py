"""Per-chunk codecs (format 4): the decoder against hostile values, and round trips.

``castore.format.compression.decode_into`` reads bytes from a store: whatever they are, it
fills its ``out`` buffer exactly or raises :class:`ChunkCorruptError`, writes nothing past
``out`` and allocates nothing near a size the value claims (no decompression bombs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import zstandard

from castore.format import compression
from castore.format.compression import MAGIC, ZSTD

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def header(codec: int, nbytes: int) -> bytes:
    return MAGIC + bytes([codec]) + nbytes.to_bytes(4, "little")


def decode(value: bytes, nbytes: int) -> bytes:
    out = bytearray(nbytes)
    compression.decode_into(value, memoryview(out), {}, "c")
    return bytes(out)


# --- decompression bombs -------------------------------------------------------------------------

#: run in a child (a fresh process, so its peak is this decode's): decode each bomb named
#: on the command line into a 1 MiB buffer, print the growth of the peak virtual size
#: (VmPeak: what zstd asked the allocator for, touched or not) and resident size (VmHWM)
_BOMB_CHILD = textwrap.dedent(
    """
    import sys
    from castore.errors import ChunkCorruptError
    from castore.format import compression

    def peak(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith(field))

    warm = compression.stored_value(bytes(1 << 20), 1)  # the decoder's own buffers, once
    compression.decode_into(warm, memoryview(bytearray(1 << 20)), {}, "warm")
    for name in sys.argv[1:]:
        with open(name, "rb") as f:
            value = f.read()
        out = bytearray(1 << 20)
        before = peak("VmPeak"), peak("VmHWM")
        try:
            compression.decode_into(value, memoryview(out), {}, "bomb")
        except ChunkCorruptError:
            outcome = "refused"
        else:
            outcome = "decoded"
        print(outcome, peak("VmPeak") - before[0], peak("VmHWM") - before[1])
    """
)


def _bombs(tmp_path) -> list[str]:
    """Encoded values for a 1 MiB chunk whose zstd frame holds 100 MB of zeros: one as zstd
    writes it (a 2 MiB window), one declaring a 100 MB window, one without a content size."""
    zeros = bytes(100 * MiB)
    wide = zstandard.ZstdCompressionParameters.from_level(3, window_log=27)
    frames = {
        "default": zstandard.ZstdCompressor(level=3).compress(zeros),
        "wide-window": zstandard.ZstdCompressor(compression_params=wide).compress(zeros),
        "no-size": zstandard.ZstdCompressor(level=3, write_content_size=False).compress(zeros),
    }
    names = []
    for name, frame in frames.items():
        path = tmp_path / name
        path.write_bytes(header(ZSTD, MiB) + frame)
        names.append(str(path))
    return names


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc/self/status")
def test_a_decompression_bomb_is_refused_without_allocating_its_size(tmp_path):
    bombs = _bombs(tmp_path)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    done = subprocess.run(
        [sys.executable, "-c", _BOMB_CHILD, *bombs], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for bomb, line in zip(bombs, done.stdout.splitlines(), strict=True):
        outcome, virtual, resident = line.split()
        assert outcome == "refused", bomb
        # a few MiB of decoder state at most, never the 100 MB the frame claims
        assert int(virtual) < 16 * MiB and int(resident) < 16 * MiB, (bomb, line)


@pytest.mark.parametrize("level", [level for level in compression.ZSTD_LEVELS if level])
def test_every_level_writes_frames_the_bounded_decoder_reads(level):
    """The window bound refuses no frame castore writes: zstd fits the window to the chunk."""
    sizes = [1, 1023, 1024, 1025, 4097, 65537] + ([MiB + 1] if level in (-7, 1, 3, 22) else [])
    for nbytes in sizes:
        raw = bytes(i % 7 for i in range(nbytes))
        value = header(ZSTD, nbytes) + compression._compressor(level).compress(raw)
        assert decode(value, nbytes) == raw, (level, nbytes)
