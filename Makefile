# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# The S3 tests' server: Ceph's RADOS Gateway from Debian (tests/rgw.py starts it).
S3_PACKAGES := radosgw ceph-mon ceph-osd

.PHONY: demo test s3-deps lint bench bench-real stress fuzz clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: this machine's disk holds its CPU build, while a plain `torch`
# requirement would download a CUDA build of several GB (the torch extra then asks for
# nothing more).  The framework extras make their tests run, not skip.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,torch,jax,elements,test-frameworks,report,s3]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/castore demo

test: lint s3-deps
	$(PY) -m pytest -q tests

# Nothing to do when the programs are there; as root (CI), apt-get install (then update and
# again if the package lists are stale); otherwise say how.  ~45 s the first time.
s3-deps:
	@if command -v radosgw >/dev/null && command -v radosgw-admin >/dev/null && command -v ceph-mon >/dev/null \
	    && command -v ceph-osd >/dev/null && command -v monmaptool >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "installing $(S3_PACKAGES) for the S3 tests"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(S3_PACKAGES) >/dev/null \
	  || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(S3_PACKAGES) >/dev/null; }; \
	else \
	  echo "the S3 tests need Ceph's RADOS Gateway: as root, run: apt-get install -y --no-install-recommends $(S3_PACKAGES)" >&2; \
	  exit 1; \
	fi

# The walls: lint and format check, the type check, the import layers (pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check castore tests bench stress examples
	$(VENV)/bin/ruff format --check castore tests bench stress examples
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-only --benchmark-json=bench/results/latest.json
	$(PY) bench/compare.py bench/results/latest.json
	$(PY) bench/alternatives.py --out bench/results/alternatives.md

# Issue 11's benchmarks on real observations (docs/benchmarks.md): castore against
# DreamerV3's own writer, np.savez and orbax; restore memory and the first save after a
# resume.  Renders and caches frames under bench/results/ the first time (~2 min).
bench-real: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) bench/real_run.py --out bench/results/real_run.md
	$(PY) bench/resume.py --out bench/results/resume.md
	$(PY) bench/steady_saves.py

# 1,000 SIGKILLs of a writer at random instants, the store checked after each (~5 min).
stress: $(STAMP)
	$(PY) stress/kill.py --kills 1000

# Coverage-guided fuzzing of the decoders with atheris (not a test dependency), 10 minutes.
fuzz: $(STAMP)
	$(PY) -m pip install --quiet atheris
	$(PY) stress/fuzz.py -max_total_time=600

clean:
	rm -rf $(VENV) demo-logdir .pytest_cache .hypothesis .benchmarks bench/results
