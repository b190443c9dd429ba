"""A picture of a store's storage: ``castore report STORE --out report.png|report.html``.

:func:`write_report` reads :meth:`Store.usage`, :meth:`Store.stats` and :meth:`Store.plan_gc`
(no chunk is read, nothing is written to the store) and draws one figure, a 3 x 2 grid:

=====================================  ========================================
cumulative logical vs stored bytes     logical / stored ratio over steps
bytes written per save                 new bytes per step, stacked by component
logical vs stored bytes per component  save durations (seconds, blocked seconds)
=====================================  ========================================

under a title with the store path, the steps, the totals, the dedup and compression ratios
and what GC would free.  Tagged steps are marked on every step axis and named on the top
row's upper axis.

Branches: the per-step panels show one branch, ``branch=`` (default: the store's own,
``main`` unless opened otherwise).  With ``branch=None`` the two cumulative panels add one
thin line per other branch, which continues the shown branch's line from its last step
before the other branch's first step (a fork or an abandoned future shares that past).
Stored bytes count at the first step that references them in the store's key order (main
first, see :mod:`castore.maintenance.usage`), so a fork's line rises only by what it added.
With ``branch="name"`` only that branch is drawn and tabulated.

Components: the 8 with the most stored bytes by name, the rest summed as ``other``.  Many
steps stay fast: above :data:`BAR_LIMIT` steps the per-step panels are drawn as one filled
step area or line per series instead of one bar per step.  A store with no steps gets a
figure saying so (the friendlier answer to ``castore report`` on a fresh store).

``.html`` writes one self-contained file: the same figure as an inline base64 PNG (no
external reference at all: matplotlib's SVG carries namespace and DTD URLs and would put
untrusted names into markup), a summary, and tables of every step and component, every
name escaped.  Component names, tags, metrics and branch names are untrusted: the figure
is drawn with ``text.parse_math`` off, so a ``$`` in a name is text, never mathtext.

matplotlib is an optional dependency (``pip install 'castore[report]'``); the figure is
drawn on a ``Figure`` with an Agg canvas, so pyplot and the process's backend are left
alone.  The module is past ~400 lines by its tables and panels; each is a short function.
"""

from __future__ import annotations

import base64
import datetime
import html
import os
import secrets
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import CastoreError, GcPlan, Store, StoreStats, UsageError

if TYPE_CHECKING:  # not exported by castore (yet): only Store.usage() returns it
    from ..maintenance.usage import StepUsage, StoreUsage

__all__ = ["BAR_LIMIT", "TOP_COMPONENTS", "ReportResult", "write_report"]

BAR_LIMIT = 200  #: above this many steps, per-step panels are filled step areas and lines, not bars
TOP_COMPONENTS = 8  #: components drawn by name; the rest are summed as "other"
MAX_TAG_LABELS = 16  #: tags named on the top axis (all are marked with a line)
WIDTH_IN, HEIGHT_IN, DPI = 16.0, 13.5, 100  # 1600 x 1350 px: readable in a browser tab
FORMATS = {".png": "png", ".html": "html", ".htm": "html"}
STORED, LOGICAL, WRITTEN, GUESSED = "#d62728", "#1f77b4", "#2ca02c", "#9ecae1"


@dataclass(frozen=True, slots=True)
class ReportResult:
    """What :func:`write_report` wrote."""

    path: str  #: the file written
    format: str  #: ``"png"`` or ``"html"``
    steps: int  #: steps covered (every branch's with ``branch=None``, else that branch's)
    width: int  #: figure width in pixels
    height: int  #: figure height in pixels
    bytes: int  #: size of the file written


def write_report(
    store: Store, out: str | os.PathLike, *, branch: str | None = None, title: str | None = None
) -> ReportResult:
    """Draw the storage of ``store`` into ``out`` (``.png``, or ``.html``/``.htm``); returns a
    :class:`ReportResult`.

    ``branch``: the branch of the per-step panels (default: ``store.branch``, with the other
    branches as extra lines in the cumulative panels); naming one leaves the others out.
    ``title`` replaces the first title line (default: the store path).  Works on a store
    opened ``readonly=True`` and changes nothing in the store; where GC cannot be planned
    (a read-only store), the title says so.  ``out`` is replaced atomically.

    Raises :class:`UsageError` for another suffix, a branch with no steps, or when
    matplotlib is not installed; ``OSError`` if ``out`` cannot be written.
    """
    out = os.fspath(out)
    fmt = FORMATS.get(os.path.splitext(out)[1].lower())
    if fmt is None:
        raise UsageError(f"castore report writes .png, .html or .htm files, not {out!r}")
    try:
        import matplotlib  # noqa: F401  (an extra: castore[report])
    except ImportError:
        raise UsageError("castore report needs matplotlib: pip install 'castore[report]'") from None
    usage, stats = store.usage(), store.stats()
    gc: GcPlan | str
    try:
        gc = store.plan_gc()
    except CastoreError as e:  # read-only: planning takes the writer's gate
        gc = "unknown (store open read-only)" if store.readonly else f"unknown ({type(e).__name__}: {e})"
    focus = store.branch if branch is None else branch
    steps = [s for s in usage.steps if branch is None or s.branch == branch]
    if branch is not None and not steps and usage.steps:
        names = sorted({s.branch for s in usage.steps})
        raise UsageError(f"branch {branch!r} has no steps in {store.path}; branches: {', '.join(names)}")
    data = _Data(usage, stats, gc, focus, steps, store.path if title is None else title, store.path)
    png = _render_png(data)
    body = png if fmt == "png" else _html(data, png).encode()
    _write_atomic(out, body)
    return ReportResult(out, fmt, len(steps), int(WIDTH_IN * DPI), int(HEIGHT_IN * DPI), len(body))


# -- data ---------------------------------------------------------------------------------------


class _Data:
    """The numbers behind the panels, as arrays over the focus branch's steps in order."""

    def __init__(self, usage: StoreUsage, stats: StoreStats, gc, focus: str, steps: list, title: str, path: str):
        self.usage, self.stats, self.gc, self.focus, self.steps = usage, stats, gc, focus, steps
        self.title, self.path = title, path
        self.own: list[StepUsage] = sorted((s for s in steps if s.branch == focus), key=lambda s: s.step)
        if not self.own and steps:  # e.g. a store of imported branches only: show the first
            self.focus = min(s.branch for s in steps)
            self.own = sorted((s for s in steps if s.branch == self.focus), key=lambda s: s.step)
        own = self.own
        self.x = np.array([s.step for s in own], dtype=np.int64)
        self.logical = np.array([s.logical_bytes for s in own], dtype=np.float64)
        self.new = np.array([s.new_bytes for s in own], dtype=np.float64)
        self.recorded = np.array([s.save is not None for s in own], dtype=bool)
        self.written = np.array([s.save.written_bytes if s.save else s.new_bytes for s in own], dtype=np.float64)
        self.seconds = np.array([s.save.seconds if s.save else np.nan for s in own])
        self.blocked = np.array([s.save.blocked_seconds if s.save else np.nan for s in own])
        totals = sorted(usage.components, key=lambda c: (-c.stored_bytes, -c.logical_bytes, c.name))
        keep = totals if len(totals) <= TOP_COMPONENTS + 1 else totals[:TOP_COMPONENTS]
        self.names = [c.name for c in keep]
        index = {name: i for i, name in enumerate(self.names)}
        self.totals = [(c.name, c.logical_bytes, c.stored_bytes) for c in keep]
        rest = totals[len(keep) :]
        self.has_other = bool(rest)
        if rest:
            self.names.append(f"other ({len(rest)})")
            self.totals.append((self.names[-1], sum(c.logical_bytes for c in rest), sum(c.stored_bytes for c in rest)))
        self.parts = np.zeros((len(self.names), len(own)))
        for j, s in enumerate(own):
            for c in s.components:
                self.parts[index.get(c.name, len(self.names) - 1), j] += c.new_bytes
        self.tags = [(s.step, name) for s in own for name in s.tags]

    def other_branches(self):
        """``(name, steps, cumulative logical, cumulative stored)`` of each other branch shown."""
        by_branch: dict[str, list] = {}
        for s in self.steps:
            if s.branch != self.focus:
                by_branch.setdefault(s.branch, []).append(s)
        cum_logical, cum_new = np.cumsum(self.logical), np.cumsum(self.new)
        for name in sorted(by_branch):
            own = sorted(by_branch[name], key=lambda s: s.step)
            before = int(np.searchsorted(self.x, own[0].step)) - 1  # the focus step it continues
            base_l, base_n = (cum_logical[before], cum_new[before]) if before >= 0 else (0.0, 0.0)
            x = np.array([s.step for s in own])
            yield (
                name,
                x,
                base_l + np.cumsum([s.logical_bytes for s in own]),
                base_n + np.cumsum([s.new_bytes for s in own]),
            )

    def gc_text(self) -> str:
        if isinstance(self.gc, str):
            return self.gc
        return f"{_human(self.gc.freed_bytes)} ({len(self.gc.chunks)} chunks, {len(self.gc.pages)} pages)"

    def summary(self) -> str:
        u, s = self.usage, self.stats
        if not u.steps:
            return "no steps"
        branches = sorted({st.branch for st in u.steps})
        extra = s.stored_bytes - u.live_bytes  # chunks no kept step references, until GC
        garbage = f" (+{_human(extra)} garbage)" if extra > 0 else ""
        span = f"steps {self.x[0]}-{self.x[-1]} of {self.focus!r}" if len(self.x) else f"{len(u.steps)} steps"
        text = (
            f"{len(u.steps)} steps on {len(branches)} branch{'es' if len(branches) > 1 else ''} ({span}); "
            f"logical {_human(u.logical_bytes)}, stored {_human(u.live_bytes)} live{garbage}, "
            f"{_human(s.file_bytes)} on disk; "
            f"dedup {u.dedup_ratio:.2f}x, compression {u.compression_ratio:.2f}x; GC would free {self.gc_text()}"
        )
        if u.missing:
            text += f"; {u.missing} referenced chunks MISSING (run castore verify)"
        return text


def _human(n: float) -> str:
    """``n`` bytes as B, KiB, MiB, GiB, TiB or PiB (three significant digits)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"


def _ratio_text(logical: float, stored: float) -> str:
    ratio = logical / stored
    return f"{ratio:,.0f}x" if ratio >= 100 else f"{ratio:.3g}x"


def _plain(text: str, limit: int = 48) -> str:
    """An untrusted name as one line of figure text, cut to ``limit`` characters (matplotlib
    draws it as it is: the figure is drawn with ``text.parse_math`` off, so no mathtext)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- figure -----------------------------------------------------------------------------------------


def _render_png(data: _Data) -> bytes:
    import io

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    style: Any = {  # Any: matplotlib's stubs type the keys as a Literal of every rcParam
        "text.parse_math": False,
        "font.size": 9,
        "axes.titlesize": 10,
        "legend.fontsize": 8,
        "axes.grid": True,
        "grid.alpha": 0.3,
    }
    with matplotlib.rc_context(style):  # our look, not the user's rcParams; restored after
        fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        summary = textwrap.fill(_plain(data.summary(), 600), 190, break_on_hyphens=False)
        fig.suptitle(f"castore report: {_plain(data.title, 150)}\n{summary}", fontsize=11)
        if not len(data.x):
            ax = fig.add_subplot()
            ax.set_axis_off()
            ax.text(0.5, 0.5, "no steps saved yet", ha="center", va="center", fontsize=24, color="grey")
        else:
            axes = fig.subplots(3, 2)
            _cumulative(axes[0, 0], data)
            _ratio(axes[0, 1], data)
            _written(axes[1, 0], data)
            _per_component(axes[1, 1], data)
            _component_totals(axes[2, 0], data)
            _durations(axes[2, 1], data)
            for ax in (axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1], axes[2, 1]):
                _mark_tags(ax, data, name_them=ax in (axes[0, 0], axes[0, 1]))
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": "castore report"})
    return buffer.getvalue()


def _bytes_axis(axis, values) -> None:
    """Human byte labels at round numbers of one unit; a log scale when the positive values
    span over 1000x."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    class BytesLocator(MaxNLocator):
        def tick_values(self, vmin, vmax):
            unit = 1024 ** max(0, int(np.log(max(abs(vmin), abs(vmax), 1)) // np.log(1024)))
            return super().tick_values(vmin / unit, vmax / unit) * unit

    positive = np.asarray(values, dtype=np.float64)
    positive = positive[np.isfinite(positive) & (positive > 0)]
    if len(positive) and positive.max() > 1000 * positive.min():
        (axis.axes.set_yscale if axis is axis.axes.yaxis else axis.axes.set_xscale)("log", nonpositive="clip")
        axis.set_major_locator(LogLocator(base=32))  # 1 B, 32 B, 1 KiB, 32 KiB, 1 MiB, ...: round labels
        axis.set_minor_formatter(NullFormatter())  # the default labels minor ticks in powers of 10
    else:
        axis.set_major_locator(BytesLocator(nbins=8, steps=[1, 2, 2.5, 5, 10]))
    axis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))


def _step_axis(ax, data: _Data) -> None:
    ax.set_xlabel("step")
    if len(data.x) == 1:
        ax.set_xlim(data.x[0] - 1, data.x[0] + 1)


def _bars(ax, data: _Data, heights, bottom=None, **style):
    """One bar per step (few steps) or one filled step area (many): never thousands of patches."""
    if len(data.x) <= BAR_LIMIT:
        gaps = np.diff(data.x)
        width = 0.8 * (gaps.min() if len(gaps) else 1)
        return ax.bar(data.x, heights, width=width, bottom=bottom, **style)
    # fill_between makes one PolyCollection; a StepPatch (ax.stairs) costs a Bezier walk of
    # every vertex for the data limits, seconds at thousands of steps
    base = np.zeros(len(data.x)) if bottom is None else bottom
    style.pop("hatch", None)
    return ax.fill_between(data.x, base, base + heights, step="mid", lw=0, **style)


def _cumulative(ax, data: _Data) -> None:
    cum_l, cum_n = np.cumsum(data.logical), np.cumsum(data.new)
    branch = _plain(data.focus)
    ax.plot(data.x, cum_l, color=LOGICAL, lw=2, label=f"logical ({branch})", drawstyle="steps-post")
    ax.plot(data.x, cum_n, color=STORED, lw=2, label=f"stored ({branch})", drawstyle="steps-post")
    values = [cum_l, cum_n]
    for i, (name, x, logical, stored) in enumerate(data.other_branches()):
        label = _plain(name, 32) if i < 6 else None
        ax.plot(x, logical, color=LOGICAL, lw=0.8, ls="--", alpha=0.7, drawstyle="steps-post")
        ax.plot(x, stored, color=STORED, lw=0.8, ls="--", alpha=0.7, drawstyle="steps-post")
        if label:
            ax.annotate(
                label, (x[-1], stored[-1]), fontsize=7, color="dimgrey", xytext=(3, 0), textcoords="offset points"
            )
        values += [logical, stored]
    if len(values) > 2:
        ax.plot([], [], color="grey", lw=0.8, ls="--", label="other branches (dashed)")
    _bytes_axis(ax.yaxis, np.concatenate(values))
    ax.set_title("cumulative logical vs stored bytes")
    _step_axis(ax, data)
    ax.legend(loc="best")


def _ratio(ax, data: _Data) -> None:
    cum_l, cum_n = np.cumsum(data.logical), np.cumsum(data.new)
    ratio = np.divide(cum_l, cum_n, out=np.full_like(cum_l, np.nan), where=cum_n > 0)
    ax.plot(data.x, ratio, color="purple", lw=1.5, label=f"cumulative logical / stored ({_plain(data.focus)})")
    u = data.usage
    if u.live_bytes:
        whole = u.logical_bytes / u.live_bytes
        ax.axhline(whole, color="grey", ls=":", label=f"whole store {whole:.2f}x = dedup x compression")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}x")
    ax.set_title("dedup ratio over steps (logical bytes per stored byte)")
    _step_axis(ax, data)
    ax.legend(loc="best")


def _written(ax, data: _Data) -> None:
    recorded = data.recorded
    if recorded.any():
        _bars(ax, data, np.where(recorded, data.written, 0), color=WRITTEN, label="written by the save (recorded)")
    if not recorded.all():
        guessed = np.where(recorded, 0, data.written)
        _bars(ax, data, guessed, color=GUESSED, hatch="//", label="new bytes (save not recorded)")
    _bytes_axis(ax.yaxis, data.written)
    ax.set_title("bytes written per save")
    _step_axis(ax, data)
    ax.legend(loc="best")


def _colors(names: list[str], has_other: bool) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    colors = [cmap(i % 10) for i in range(len(names))]
    if has_other:
        colors[-1] = (0.6, 0.6, 0.6, 1.0)  # "other" is grey
    return colors


def _per_component(ax, data: _Data) -> None:
    bottom = np.zeros(len(data.x))
    for name, heights, color in zip(data.names, data.parts, _colors(data.names, data.has_other)):
        _bars(ax, data, heights, bottom=bottom.copy(), color=color, label=_plain(name, 32))
        bottom += heights
    ax.use_sticky_edges = False  # a zero-height bar on top of the stack would pin the y limit to it
    ax.set_ylim(bottom=0)
    _bytes_axis(ax.yaxis, [bottom.max(initial=0)])
    ax.set_title("new stored bytes per step, by component")
    _step_axis(ax, data)
    handles, labels = ax.get_legend_handles_labels()  # top of the stack first, as drawn
    ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.0, 1.0), title="component")


def _component_totals(ax, data: _Data) -> None:
    names = [_plain(name, 28) for name, _, _ in data.totals][::-1]
    logical = np.array([t[1] for t in data.totals], dtype=np.float64)[::-1]
    stored = np.array([t[2] for t in data.totals], dtype=np.float64)[::-1]
    y = np.arange(len(names))
    ax.barh(y + 0.2, logical, height=0.4, color=LOGICAL, label="logical (summed over steps)")
    ax.barh(y - 0.2, stored, height=0.4, color=STORED, label="stored (unique chunks)")
    for yi, lg, st in zip(y, logical, stored):
        text = _ratio_text(lg, st) if st else "inline only"
        ax.annotate(text, (max(lg, st), yi), xytext=(3, -3), textcoords="offset points", fontsize=7)
    ax.set_yticks(y, names)
    _bytes_axis(ax.xaxis, np.concatenate([logical, stored]))
    right = max(logical.max(initial=1), stored.max(initial=1))
    ax.set_xlim(right=right * (6 if ax.get_xscale() == "log" else 1.15))  # room for the ratios
    ax.set_title("per component: logical vs stored bytes")
    ax.grid(axis="y", visible=False)
    ax.legend(loc="best")


def _durations(ax, data: _Data) -> None:
    ax.set_title("save durations")
    if not data.recorded.any():
        ax.text(0.5, 0.5, "save durations not recorded\n(steps saved before castore 0.6, or imported)",
                ha="center", va="center", transform=ax.transAxes, color="grey", fontsize=12)  # fmt: skip
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        return
    marker = "o" if len(data.x) <= BAR_LIMIT else None
    x = data.x[data.recorded]
    ax.plot(x, data.seconds[data.recorded], marker=marker, ms=3, lw=1, color="black", label="seconds (call to commit)")
    ax.plot(x, data.blocked[data.recorded], marker=marker, ms=3, lw=1, color="orange", label="caller blocked")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("seconds")
    missing = int((~data.recorded).sum())
    if missing:
        ax.plot([], [], " ", label=f"{missing} steps not recorded")
    _step_axis(ax, data)
    ax.legend(loc="best")


def _mark_tags(ax, data: _Data, *, name_them: bool) -> None:
    """A dotted line at each tagged step; the top row names the first MAX_TAG_LABELS above."""
    if not data.tags:
        return
    for step in sorted({s for s, _ in data.tags}):
        ax.axvline(step, color="grey", ls=":", lw=0.8, zorder=0)
    if name_them:
        named: dict[int, list[str]] = {}
        for step, name in data.tags:
            named.setdefault(step, []).append(name)
        shown = sorted(named)[:MAX_TAG_LABELS]
        top = ax.secondary_xaxis("top")
        labels = [_plain(", ".join(named[s]), 24) for s in shown]
        if len(named) > len(shown):
            labels[-1] += f" (+{len(named) - len(shown)} more)"
        top.set_xticks(shown, labels, rotation=30, ha="left", fontsize=7)
        top.tick_params(length=2)


# -- html -------------------------------------------------------------------------------------------

CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
img{max-width:100%;height:auto;border:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:2px 6px}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3;position:sticky;top:0}
tr:nth-child(even){background:#fafafa}"""


def _html(data: _Data, png: bytes) -> str:
    e = html.escape
    u = data.usage

    def cells(values: list[Any]) -> str:
        return "".join(f'<td class="n">{e(v)}</td>' if isinstance(v, _Num) else f"<td>{e(str(v))}</td>" for v in values)

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>castore report: {e(data.title)}</title><style>{CSS}</style></head><body>",
        f"<h1>castore report: {e(data.title)}</h1>",
        f"<p>{e(data.summary())}</p>",
        f'<img alt="storage of {e(data.path)}" width="{int(WIDTH_IN * DPI)}" height="{int(HEIGHT_IN * DPI)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">',
        "<h2>Components</h2>",
        '<table id="components"><thead><tr><th>component</th><th>steps</th><th>logical</th><th>raw</th>'
        "<th>stored</th><th>logical / stored</th></tr></thead><tbody>",
    ]
    for c in sorted(u.components, key=lambda c: (-c.stored_bytes, c.name)):
        ratio = _ratio_text(c.logical_bytes, c.stored_bytes) if c.stored_bytes else "-"
        row = [c.name, _Num(c.steps), _Num.of(c.logical_bytes), _Num.of(c.raw_bytes), _Num.of(c.stored_bytes)]
        parts.append(f"<tr>{cells([*row, _Num(ratio)])}</tr>")
    parts += [
        "</tbody></table>",
        "<h2>Steps</h2>",
        '<table id="steps"><thead><tr><th>branch</th><th>step</th><th>saved (UTC)</th><th>tags</th><th>logical</th>'
        "<th>referenced</th><th>unique</th><th>new</th><th>written</th><th>seconds</th><th>blocked</th>"
        "<th>metrics</th></tr></thead><tbody>",
    ]
    for s in data.steps:
        when = datetime.datetime.fromtimestamp(s.created, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        save = s.save
        row = [s.branch, _Num(s.step), when, ", ".join(s.tags), _Num.of(s.logical_bytes)]
        row += [_Num.of(s.referenced_bytes), _Num.of(s.unique_bytes), _Num.of(s.new_bytes)]
        row += (
            [_Num.of(save.written_bytes), _Num(f"{save.seconds:.3f}"), _Num(f"{save.blocked_seconds:.3f}")]
            if save
            else ["-"] * 3
        )
        row.append(", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.metrics.items()))
        parts.append(f"<tr>{cells(row)}</tr>")
    parts += ["</tbody></table>", "</body></html>", ""]
    return "\n".join(parts)


class _Num(str):
    """A table cell aligned right."""

    @classmethod
    def of(cls, n: int) -> _Num:
        return cls(_human(n))


def _write_atomic(path: str, body: bytes) -> None:
    """Write ``body`` to ``path`` whole or not at all: a new file beside it, then a rename
    (created with the umask's permissions, as ``open`` would)."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
