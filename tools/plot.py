"""tools/plot.py: the training curves of a run (its drift plot), an overlay of several runs, and
ablate.py's bar chart, drawn with matplotlib.

    python -m tools.plot runs/co2s                                 # -> runs/co2s/curves.png
    python -m tools.plot runs/supervised runs/co2s --out drift.svg --labels sup,co2s

Co2S exists to curb pseudo-label drift, so this is the picture of it: nine panels over the training
steps, read from the records train.py appends to <run>/log.jsonl ("type": "train" records carry
flat "<student>/<term>" keys, "type": "eval" records a {"miou": ...} dict per prediction):
  (a) pseudo-label accuracy, "<student>/pl_acc" and "fused/pl_acc": the share of confident weak
      predictions (E6 at tau; E10 for the fused map) that match the unlabelled images' hidden
      labels. A point whose coverage is 0 is left out (the accuracy of no pixels is undefined; it
      is logged as 0). The y axis ends at 100 % and starts at a round value below the lowest point,
      so that a drift of a few points shows.
  (b) pseudo-label coverage, "<student>/pl_cov" and "fused/pl_cov": the share of labelled pixels
      that are confident.
  (c) confident share, "<student>/conf_ratio": the share of valid unlabelled pixels at tau, the
      mean over every step (not only the quality steps of (a) and (b)).
  (d) validation mIoU, eval records' "<student>"["miou"] and "fused"["miou"]: a marker per eval.
  (e) stability loss "<student>/sta" (E8, before the ramp) and (f) its weight "lambda" (E9).
  (g) supervised loss "<student>/sup" (E5), (h) "<student>/uni", L_uni as the training loop
      computed it (E7), (i) the student's loss "<student>/loss" = L_uni + lambda L_sta.
L_uni is drawn only where the log holds it: it is never re-derived from the E6 terms, whose weights
depend on the run's flags (--no-fp, --strong-views); an older run's panel (h) says "no data".
One run: a colour per series (student 1 blue, student 2 orange, fused green). Several runs: a
colour per run, a line style per series (solid student 1, dashed student 2, dotted fused). A key a
run did not log is not drawn; a panel with nothing to draw says so. A line that is not a JSON
record (a run killed mid-write, a torn last line while training still writes) and a value that is
missing, null or not finite are skipped. Left out on purpose: smoothing (a record is already the
mean of --log-every steps), per-class IoU, lr and step time.
"""

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

# The Agg canvas is attached to each figure explicitly rather than through pyplot: no global
# backend switch for whoever imports this (ablate.py, a notebook), no pyplot figure registry that
# would keep every redrawn figure alive, and it renders without a display.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, PercentFormatter

from plumbing.atomic import replacing
from plumbing.errors import UserError, cli

# (log key, title, y axis): "acc" zoomed percent ending at 100 %, "share" percent 0..100 %,
# "pct" percent from 0 up to the data, "num" a number from 0 up to the data
PANELS = [
    ("pl_acc", "(a) pseudo-label accuracy (%): confident pixels vs. hidden labels", "acc"),
    ("pl_cov", "(b) pseudo-label coverage (%): labelled pixels confident at tau", "share"),
    ("conf_ratio", "(c) confident share (%): valid unlabelled pixels at tau", "share"),
    ("miou", "(d) validation mIoU (%), a marker per evaluation", "pct"),
    ("sta", "(e) stability loss L_sta (E8), before the lambda ramp", "num"),
    ("lambda", "(f) stability weight lambda (E9 ramp)", "num"),
    ("sup", "(g) supervised loss L_sup (E5)", "num"),
    ("uni", "(h) UniMatch loss L_uni (E7), as logged", "num"),
    ("loss", "(i) student loss L_k = L_uni + lambda L_sta", "num"),
]
NO_DATA = {"uni": "no data\n(<student>/uni is not in the log)"}
STYLES = ["-", "--", ":"]  # overlay: student 1, student 2, fused
# every curve's line and markers; a panel's "no data" note
LINE = dict(linewidth=1.6, markersize=5, markeredgecolor="black", markeredgewidth=0.5)
NOTE = dict(ha="center", va="center", color="0.4")
LEGEND = dict(loc="outside lower center", frameon=False)  # below the panels, up to 8 a row
BAR = dict(capsize=3, error_kw={"ecolor": "black", "elinewidth": 1})  # a bar and its whisker
# ablate.summarise's columns, in the ablation chart's colours and order
COLUMNS = [("student1", "student 1"), ("student2", "student 2"), ("fused", "fused")]


# ----------------------------------------------------------------------------------------------
# reading a log


@dataclass
class Log:
    """One run folder's log.jsonl: train and eval records in file order, the students in logging
    order, and the numbers (1-based) of the lines skipped as unreadable."""

    path: str
    train: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    label: str = ""

    @property
    def students(self):
        """Named by the '<student>/loss' keys, then by the evals' result dicts (not 'fused')."""
        names = [k.removesuffix("/loss") for r in self.train for k in r if k.endswith("/loss")]
        results = [(k, v) for r in self.evals for k, v in r.items() if isinstance(v, dict)]
        names += [k for k, v in results if "miou" in v and k != "fused"]
        return list(dict.fromkeys(names))


def read_log(run_dir, label=""):
    """The records of <run_dir>/log.jsonl. A line that is not UTF-8, not JSON, not an object or
    has no finite step is skipped (its number kept in .skipped): the log is read while a training
    appends to it, and a killed run can leave a torn line anywhere."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; pass a run folder written by train.py")
    try:
        # bytes: a line that is not UTF-8 must not fail the decoding of the others
        lines = Path(path).read_bytes().split(b"\n")
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from e
    log = Log(path, label=label)
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:  # not JSON (nor is a blank line), or not UTF-8 (UnicodeDecodeError)
            record = None
        kind = record.get("type") if isinstance(record, dict) else None
        if kind in ("train", "eval") and _number(record.get("step")) is not None:
            (log.train if kind == "train" else log.evals).append(record)
        elif line.strip():  # a blank line is no record, and not a skipped one
            log.skipped.append(i)
    return log


def _number(v):
    """v if it is a finite number, else None (null, NaN, a string, a bool)."""
    return v if type(v) in (int, float) and math.isfinite(v) else None  # JSON's numbers


def series(log, name, key):
    """[(step, value)] of one quantity: 'miou' of prediction `name` from the evals, 'lambda' of the
    run (name ignored), else the train records' '<name>/<key>'; missing values left out."""
    pts = [(r["step"], _value(r, name, key)) for r in (log.evals if key == "miou" else log.train)]
    return [(s, v) for s, v in pts if v is not None]


def _value(record, name, key):
    if key == "miou":
        return _number(record[name].get("miou")) if isinstance(record.get(name), dict) else None
    if key == "pl_acc" and _number(record.get(f"{name}/pl_cov")) == 0:
        return None  # nothing confident: train.py logs 0, but no accuracy exists
    return _number(record.get("lambda" if key == "lambda" else f"{name}/{key}"))


def default_labels(run_dirs):
    """Each run's folder name; parent/name where two names clash (ablate's <row>/seed0)."""
    parts = [os.path.normpath(p).split(os.sep) for p in run_dirs]
    names = [p[-1] for p in parts]
    return names if len(set(names)) == len(names) else ["/".join(p[-2:]) for p in parts]


# ----------------------------------------------------------------------------------------------
# the drift plot


def y_limits(kind, values):
    """The y range of a panel. Accuracy lives near 100 %, where a drift of a few points would be
    flat on 0..100 %: its axis starts at a round value below the lowest point and ends at 100 %.
    A small margin keeps a line on 0 or 100 % off the frame."""
    if kind == "share":
        return -0.02, 1.02
    if kind == "acc":
        # a round tick below the lowest point; all at 100 %: still an axis, from 95 %
        lo = min(MaxNLocator(5).tick_values(min(min(values), 0.95), 1.0)[0], min(values))
        return lo - 0.03 * (1.0 - lo), 1.0 + 0.03 * (1.0 - lo)
    lo, hi = min(min(values), 0.0), max(max(values), 0.0)
    hi = hi if hi > lo else lo + 1.0
    return lo - 0.03 * (hi - lo), hi + 0.08 * (hi - lo)


def _draw_panel(ax, logs, key, title, kind):
    """One panel (key, title, kind: a PANELS row): every run's series of one log key (slot 0, 1
    the students, 2 fused; lambda is one series per run), or 'no data'. One run: a colour per
    series; several: a colour per run, a line style per series."""
    ax.set_title(title, loc="left", fontsize=10)
    # the tests (and any reader of the figure object) find a panel by its log key
    ax.set_label(key)
    ax.grid(True, color="0.9")
    ax.spines[["top", "right"]].set_visible(False)
    one = len(logs) == 1
    styles = ["-"] * 3 if one else STYLES
    for i, log in enumerate(logs):
        slots = [(0, "lambda")] if key == "lambda" else [*enumerate(log.students[:2]), (2, "fused")]
        for slot, name in slots:
            if pts := series(log, name, key):
                # one run: a colour per series, lambda (the run's, no series) dark grey
                colour = (f"C{slot}" if key != "lambda" else "0.25") if one else f"C{i % 10}"
                # a marker per evaluation; a series of one point would be no line at all
                fmt = styles[slot] + ("o" if key == "miou" or len(pts) == 1 else "")
                ax.plot(*zip(*pts), fmt, color=colour, label=f"{log.label}/{name}", **LINE)
    if not ax.lines:
        ax.text(0.5, 0.5, NO_DATA.get(key, "no data"), transform=ax.transAxes, **NOTE)
        ax.set_yticks([])
        return
    ax.set_ylim(*y_limits(kind, [y for line in ax.lines for y in line.get_ydata()]))
    if kind != "num":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))


def _legend(fig, logs):
    """One run: a line per series. Several: a patch per run, then a line per style (students
    named when every run has the same ones, else 'student 1', 'student 2')."""
    fused = any(series(g, "fused", k) for g in logs for k in ("pl_acc", "pl_cov", "miou"))
    same = all(g.students == logs[0].students for g in logs)
    names = list(enumerate(logs[0].students[:2] if same else ["student 1", "student 2"]))
    names += [(2, "fused")] if fused else []
    if len(logs) == 1:
        handles = [Line2D([], [], color=f"C{j}", label=n) for j, n in names]
    else:
        # a run's students after its label, where they differ between runs
        who = [", ".join(g.students) for g in logs]
        runs = [g.label + (f" ({w})" if w and not same else "") for g, w in zip(logs, who)]
        handles = [Patch(color=f"C{i % 10}", label=r) for i, r in enumerate(runs)]
        handles += [Line2D([], [], color="black", linestyle=STYLES[j], label=n) for j, n in names]
    if handles:
        fig.legend(handles=handles, ncols=min(len(handles), 8), **LEGEND)


def _new_figure(size):
    # the canvas attaches itself as fig.canvas
    return FigureCanvasAgg(Figure(figsize=size, layout="constrained")).figure


def drift_figure(run_dirs, labels=None):
    """The figure of the runs' curves: one run its drift plot, several their overlay. labels name
    the runs in the legend (default: their folder names)."""
    labels = labels or default_labels(run_dirs)
    # a label per run (main checks --labels; a caller's mismatch is a bug, not a user's mistake)
    logs = [read_log(d, label) for d, label in zip(run_dirs, labels, strict=True)]
    fig = _new_figure((16, 12))
    grid = fig.subplots(3, 3, sharex=True)
    for ax, panel in zip(grid.flat, PANELS):
        _draw_panel(ax, logs, *panel)
        ax.tick_params(labelbottom=True)  # every panel keeps its step numbers
    for ax in grid[-1]:
        ax.set_xlabel("step")
    # shared by all panels: up to the last step of any run
    grid[0, 0].set_xlim(0, 1.02 * max([1] + [r["step"] for g in logs for r in g.train + g.evals]))
    one = f"{labels[0]}: training curves ({logs[0].path})"
    several = f"training curves of {len(logs)} runs: {', '.join(labels)}"
    fig.suptitle(one if len(logs) == 1 else several, fontsize=12)
    _legend(fig, logs)
    return fig


# ----------------------------------------------------------------------------------------------
# the ablation chart


def ablation_figure(table):
    """Grouped bars per ablate.py row (student 1, student 2, fused): the mean mIoU over seeds with
    a whisker of one std. table: ablate.py's {row: summarise(its runs)}, each {students, student1:
    (text, mean, std), student2, fused, ...}, means in %; a column without a mean (one student)
    has no bar."""
    rows, width = list(table), 0.27
    fig = _new_figure((max(6.0, 2.0 + 1.4 * len(rows)), 4.8))
    ax = fig.add_subplot(label="ablation")
    for j, (key, name) in enumerate(COLUMNS):
        cells = [(i + (j - 1) * width, *table[r][key][1:]) for i, r in enumerate(rows)]
        if bars := [(x, mean, std or 0.0) for x, mean, std in cells if mean is not None]:
            xs, means, stds = zip(*bars)
            low = [min(s, m) for m, s in zip(means, stds)]  # an mIoU below 0 is no whisker
            ax.bar(xs, means, 0.92 * width, yerr=(low, stds), color=f"C{j}", label=name, **BAR)
    ax.set_xticks(range(len(rows)), [f"{r}\n{', '.join(table[r]['students'])}" for r in rows])
    # from 0 (applied after the bars: the top stays theirs; no bars: the empty axis' 0..1)
    ax.set(ylabel="mIoU (%) at the end of training", axisbelow=True, ylim=(0, None))
    ax.set_title("ablation: mIoU per row, mean ± std over seeds", loc="left", fontsize=11)
    ax.grid(True, axis="y", color="0.9")
    ax.spines[["top", "right"]].set_visible(False)
    if ax.containers:
        ax.legend(frameon=False)
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="0.4")
    return fig


# ----------------------------------------------------------------------------------------------
# writing


def save(fig, path):
    """fig to path, in the format its suffix names (PNG without one), atomically: a temporary file
    beside it renamed over it, so a crash never leaves half a picture and a reader (a browser
    refreshing curves.png) sees the old one or the new one. Unwritable: a UserError naming path."""
    fmt = os.path.splitext(path)[1][1:].lower() or "png"
    if fmt not in (formats := fig.canvas.get_supported_filetypes()):
        valid = ", ".join(f".{k}" for k in sorted(formats))
        raise UserError(f"{path}: matplotlib cannot write a .{fmt} picture; use one of {valid}")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with replacing(path) as tmp:  # the project's one atomic write (plumbing/atomic.py)
            fig.savefig(tmp, format=fmt)
    except OSError as e:
        raise UserError(f"{path}: cannot write it ({e.strerror or e})") from e
    return path


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.plot", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders written by train.py (each holds log.jsonl)")
    out = "picture to write, its format from the suffix: .png, .svg, .pdf, ... "
    out += "(default: RUN/curves.png for one run, ./curves.png for several)"
    p.add_argument("--out", help=out)
    p.add_argument("--labels", help="comma list naming the runs (default: folders)")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(args.runs):
        p.error(f"--labels: {len(labels)} names for {len(args.runs)} runs")
    default = os.path.join(args.runs[0], "curves.png") if len(args.runs) == 1 else "curves.png"
    print(save(drift_figure(args.runs, labels), args.out or default))


if __name__ == "__main__":
    cli(main)
