"""castore.tools.report: the PNG and HTML pictures of a store's storage."""

import base64
import hashlib
import html
import io
import os
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import castore
from castore.format.stepinfo import SaveTimes
from castore.maintenance.usage import ComponentTotal, ComponentUsage, StepUsage, StoreUsage
from castore.tools.report import ReportResult, write_report

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

HOSTILE = "<script>alert(1)</script>"
MATH = r"$\frac{$ a & b"  # mathtext that would not parse: drawn as text


def make_run(path, *, hostile=False) -> Path:
    """A small run: three components changing at different rates, a tag, a deleted step
    (garbage for GC), an async save, and a branch forked from main with a save of its own."""
    rng = np.random.default_rng(0)
    weights = rng.standard_normal(100_000).astype(np.float32)
    moments = np.zeros(50_000, np.float32)
    extra = {HOSTILE: {"x": np.arange(1000.0)}} if hostile else {}
    with castore.Store(path, chunk_bytes=16 << 10) as store:
        for step in range(0, 50, 10):
            weights[step * 500 : step * 500 + 4000] += 1
            moments += 1
            tree = {"model": {"w": weights}, "opt": {"m": moments}, "config": {"lr": 0.1}, **extra}
            store.save(step, tree, metrics={HOSTILE if hostile else "loss": 1.0 / (step + 1)})
        store.tag(MATH if hostile else "best", 20)
        if hostile:
            store.tag(HOSTILE, 30)
        store.save_async(50, {"model": {"w": weights * 2}, "opt": {"m": moments}, "config": {"lr": 0.05}}).result()
        store.delete(10)
        store.fork("exp", 30)
    with castore.Store(path, branch="exp") as exp:
        exp.save(40, {"model": {"w": weights * 3}, "opt": {"m": moments}, "config": {"lr": 0.2}})
    return Path(path)


@pytest.fixture
def run(tmp_path) -> Path:
    return make_run(tmp_path / "store")


def check_png(data: bytes):
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    width, height = image.size
    assert 800 <= width <= 4000 and 500 <= height <= 4000, image.size
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 20, "a blank image"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100, "too few colours for a figure"
    return image


class Page(HTMLParser):
    """The tags, image sources and table rows of a page; fails on unbalanced tables."""

    def __init__(self):
        super().__init__()
        self.tags, self.images, self.rows, self.open = [], [], {}, []
        self.table = None
        self.text = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "table":
            self.table = attrs.get("id")
        if tag == "tr":
            self.rows[self.table] = self.rows.get(self.table, 0) + 1
        if tag in ("table", "tbody", "thead", "tr", "td", "th"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        if tag in ("table", "tbody", "thead", "tr", "td", "th"):
            assert self.open and self.open.pop() == tag, f"unbalanced </{tag}>"

    def handle_data(self, data):
        self.text.append(data)


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    assert not page.open, page.open
    return page


def assert_self_contained(text: str):
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower()
    assert "<link" not in text.lower() and "@import" not in text and "url(" not in text


def test_png_of_a_run(run, tmp_path):
    with castore.Store(run) as store:
        steps = len(store.usage().steps)
        result = write_report(store, tmp_path / "report.png")
    assert isinstance(result, ReportResult)
    assert result.format == "png" and result.path == str(tmp_path / "report.png")
    assert result.steps == steps == 7  # main 0, 20..50 and exp 30, 40
    data = (tmp_path / "report.png").read_bytes()
    assert result.bytes == len(data)
    image = check_png(data)
    assert image.size == (result.width, result.height)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_html_is_self_contained_and_tabulates_every_step(run, tmp_path):
    with castore.Store(run) as store:
        usage = store.usage()
        result = write_report(store, tmp_path / "report.html", title="my run")
    text = (tmp_path / "report.html").read_text()
    assert result.format == "html" and result.bytes == len(text.encode())
    assert_self_contained(text)
    page = parse(text)
    assert page.tags[:3] == ["html", "head", "meta"]
    (src,) = page.images
    assert src.startswith("data:image/png;base64,")
    check_png(base64.b64decode(src.split(",", 1)[1]))
    assert page.rows["steps"] == 1 + result.steps  # a header row, then one per step
    assert page.rows["components"] == 1 + len(usage.components)
    assert "my run" in "".join(page.text)


def test_hostile_names_are_escaped_and_drawn_as_text(tmp_path):
    path = make_run(tmp_path / "store", hostile=True)
    with castore.Store(path) as store:
        check_png(Path(write_report(store, tmp_path / "r.png").path).read_bytes())
        text = Path(write_report(store, tmp_path / "r.html").path).read_text()
    assert HOSTILE not in text and "<script" not in text
    assert html.escape(HOSTILE) in text  # as a component, a tag and a metric
    assert html.escape(MATH) in text
    assert_self_contained(text)
    parse(text)


@pytest.mark.parametrize("name", ["report.svg", "report.pdf", "report", "report.png.txt"])
def test_another_suffix_is_refused(run, tmp_path, name):
    with castore.Store(run, readonly=True) as store, pytest.raises(castore.UsageError, match=r"\.png, \.html"):
        write_report(store, tmp_path / name)
    assert list(tmp_path.iterdir()) == [run]


def test_suffixes_are_case_blind(run, tmp_path):
    with castore.Store(run, readonly=True) as store:
        assert write_report(store, tmp_path / "R.PNG").format == "png"
        assert write_report(store, tmp_path / "r.htm").format == "html"


def tree_hashes(top: Path) -> dict:
    """Every file's hash, but lock.mdb's is only its name: it is LMDB's reader table, where
    every reader (any read-only open, ``castore ls`` too) takes a slot, not store data."""
    return {
        p.relative_to(top): p.name == "lock.mdb" or hashlib.sha256(p.read_bytes()).hexdigest()
        for p in top.rglob("*")
        if p.is_file()
    }


def test_a_read_only_store_is_left_byte_identical(run, tmp_path):
    before = tree_hashes(run)
    with castore.Store(run, readonly=True) as store:
        write_report(store, tmp_path / "r.png")
        write_report(store, tmp_path / "r.html")
    assert tree_hashes(run) == before
    # GC is planned read-only too (a dry run): the title names what it would free
    assert re.search(r"GC would free [0-9.]+ (B|KiB|MiB)", (tmp_path / "r.html").read_text())


def test_a_writable_store_names_what_gc_would_free(run, tmp_path):
    with castore.Store(run) as store:
        freed = store.plan_gc().freed_bytes
        write_report(store, tmp_path / "r.html")
    assert freed > 0  # step 10's chunks
    assert "GC would free " in (text := (tmp_path / "r.html").read_text()) and "unknown" not in text


def test_branch_option_keeps_to_that_branch(run, tmp_path):
    with castore.Store(run, readonly=True) as store:
        result = write_report(store, tmp_path / "r.html", branch="exp")
        assert result.steps == 2
        assert parse((tmp_path / "r.html").read_text()).rows["steps"] == 1 + 2
        with pytest.raises(castore.UsageError, match="nope.*branches: exp, main"):
            write_report(store, tmp_path / "x.png", branch="nope")
    with castore.Store(run, readonly=True, branch="exp") as exp:  # the store's own branch leads
        assert write_report(exp, tmp_path / "e.png").steps == 7


def test_an_empty_store_gets_a_figure_saying_so(tmp_path):
    with castore.Store(tmp_path / "store") as store:
        result = write_report(store, tmp_path / "r.png")
        write_report(store, tmp_path / "r.html")
    assert result.steps == 0
    image = Image.open(tmp_path / "r.png")
    assert image.format == "PNG" and image.size == (result.width, result.height)
    text = (tmp_path / "r.html").read_text()
    assert "no steps" in text and parse(text).rows["steps"] == 1


def test_one_step(tmp_path):
    with castore.Store(tmp_path / "store") as store:
        store.save(7, {"model": {"w": np.arange(10_000.0)}})
        result = write_report(store, tmp_path / "r.png")
    assert result.steps == 1
    check_png((tmp_path / "r.png").read_bytes())


def test_without_matplotlib_the_error_says_what_to_install(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with castore.Store(run, readonly=True) as store:
        with pytest.raises(castore.UsageError, match=r"pip install 'castore\[report\]'"):
            write_report(store, tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()


def test_the_process_backend_and_pyplot_are_left_alone(run, tmp_path):
    child = f"""
import sys, matplotlib
matplotlib.use("svg")
import castore
from castore.tools.report import write_report
with castore.Store({str(run)!r}, readonly=True) as store:
    write_report(store, {str(tmp_path / "r.png")!r})
assert matplotlib.get_backend().lower() == "svg", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
assert matplotlib.rcParams["text.parse_math"] and matplotlib.rcParams["font.size"] == 10.0
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(castore.__file__).parents[1]), *sys.path])}
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    check_png((tmp_path / "r.png").read_bytes())


class FakeStore:
    """What write_report reads of a Store, with a usage built in memory (5,000 steps of
    real saves would take minutes of fsyncs)."""

    path = "/runs/fake"
    branch = "main"
    readonly = False

    def __init__(self, usage: StoreUsage):
        self._usage = usage

    def usage(self):
        return self._usage

    def stats(self):
        u = self._usage
        return castore.StoreStats(len(u.steps), 1000, u.live_bytes, u.logical_bytes, 2 * u.live_bytes)

    def plan_gc(self):
        return castore.GcPlan((), (), (), (), 0, (), (), 0, 0)


def synthetic_usage(steps: int, components: int) -> StoreUsage:
    names = [f"component{i}" for i in range(components)]
    rows = []
    for i in range(steps):
        parts = tuple(
            ComponentUsage(n, 1 << 20, (j + 1) * 1000 * (1 + i % 5) if i else 1 << 20) for j, n in enumerate(names)
        )
        save = SaveTimes(0.5 + i % 7 / 10, 0.1, sum(p.new_bytes for p in parts)) if i % 4 else None
        logical, new = sum(p.logical_bytes for p in parts), sum(p.new_bytes for p in parts)
        tags = (f"tag{i}",) if i % 250 == 0 else ()
        rows.append(
            StepUsage(i * 100, "main", 1.7e9 + i * 60, logical, new, 0, new, parts, tags, {"loss": 1 / (i + 1)}, save)
        )
    totals = tuple(
        ComponentTotal(
            n, steps, sum(r.components[j].logical_bytes for r in rows), 0, sum(r.components[j].new_bytes for r in rows)
        )
        for j, n in enumerate(names)
    )
    live = sum(r.new_bytes for r in rows)
    return StoreUsage(tuple(rows), totals, sum(r.logical_bytes for r in rows), live, live, 0)


def test_five_thousand_steps_and_many_components_render_in_seconds(tmp_path):
    fake = FakeStore(synthetic_usage(5000, 20))
    start = time.perf_counter()
    result = write_report(fake, tmp_path / "r.png")  # type: ignore[arg-type]
    elapsed = time.perf_counter() - start
    check_png((tmp_path / "r.png").read_bytes())
    assert result.steps == 5000
    assert elapsed < 60, f"{elapsed:.1f} s"  # ~3 s here; one bar per step would take minutes
    write_report(fake, tmp_path / "r.html")  # type: ignore[arg-type]
    page = parse((tmp_path / "r.html").read_text())
    assert page.rows["steps"] == 1 + 5000 and page.rows["components"] == 1 + 20
