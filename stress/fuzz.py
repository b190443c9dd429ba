"""Coverage-guided fuzzing of castore's decoders with atheris (outside ``make test``).

    make fuzz                                   # 10 minutes, installs atheris into .venv
    .venv/bin/python stress/fuzz.py -max_total_time=60 -atheris_runs=0

Targets the same decoders as ``tests/test_fuzz.py`` (a manifest decoded to its values as
``Store.load`` would, a retention policy run over it, a chunk-list page, the config record,
a metrics record), seeded with the bodies of valid manifests.  Any exception that is not
a ``castore`` error, or a decode that allocates far beyond its input, is a crash that
atheris reports with the input that caused it (saved as ``crash-*``).
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

with atheris.instrument_imports():
    import castore.format.codec
    import castore.format.config
    import castore.format.manifest  # noqa: F401

from test_fuzz import MANIFESTS, load_manifest, parse, read_metrics

from castore.errors import CastoreError
from castore.format.manifest import page_ids_in


def one_input(data: bytes) -> None:
    target, body = data[:1], data[1:]
    for decode in (
        (load_manifest, parse, read_metrics, page_ids_in)
        if not target
        else ((load_manifest, parse, read_metrics, page_ids_in)[target[0] % 4],)
    ):
        try:
            decode(body)
        except CastoreError:
            pass


def main() -> None:
    corpus = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz-corpus")
    os.makedirs(corpus, exist_ok=True)
    for index, manifest in enumerate(MANIFESTS):
        with open(os.path.join(corpus, f"seed-{index}"), "wb") as f:
            f.write(b"\0" + manifest)
    atheris.Setup([sys.argv[0], corpus, *sys.argv[1:]], one_input)
    atheris.Fuzz()  # libFuzzer prints "Done N runs" and exits


if __name__ == "__main__":
    main()
