"""curves.py: the drift plot of a run, or an overlay of several runs, from log.jsonl (Pillow only).

    python curves.py runs/co2s                               # -> runs/co2s/curves.png
    python curves.py runs/supervised runs/unimatch runs/co2s --out drift.png

Co2S exists to curb pseudo-label drift, so this is the picture of it. One PNG, four panels over the
training steps, read from the records train.py appends to <run>/log.jsonl:
  (a) pseudo-label accuracy: of each student's confident weak predictions (E6, at tau) and of the
      fused map (E10), against the unlabelled images' never-trained-on labels. A point whose
      coverage is 0 is left out: the accuracy of no pixels is undefined (train.py logs it as 0).
      Its y axis ends at 100% and starts at a round value below the lowest point, so a drift of a
      few points is visible (the other panels start at 0).
  (b) pseudo-label coverage: the fraction of those pixels that are confident.
  (c) the losses, a strip per term, per student: supervised (E5); unsupervised, the logged E6 terms
      combined with E7's weights at the paper defaults, 0.25 s1 + 0.25 s2 + 0.5 fp (one strong view:
      0.5 s1 + 0.5 fp), so that <student>/loss = (sup + unsup) / 2 + lambda sta; stability (E8,
      before the E9 ramp) where the run logged it. A --no-fp run logs fp = 0: its curve is half its
      strong-view loss.
  (d) validation mIoU at each evaluation (a marker per evaluation), per student and fused.
One run: a colour per series (student 1 blue, student 2 orange, fused green, as ablate.py's chart).
Several runs: a colour per run, a line style per series (solid student 1, dashed student 2, dotted
fused). A key a run did not log is simply not drawn; a panel with nothing to draw says "no data".
The drawing helpers ablate.py shares (font, colours, ticks, swatches) live here too.
Left out on purpose: smoothing (a record is already the mean of --log-every steps), per-class IoU.
"""
import argparse
import json
import math
import os
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from errors import UserError, cli
from runs import replacing

W, H = 1400, 1000                                     # the picture, in pixels
COLOURS = [(90, 140, 200), (240, 160, 60), (70, 160, 90), (200, 70, 80), (140, 110, 190),
           (150, 105, 75), (220, 120, 180), (110, 110, 110), (170, 170, 50), (60, 175, 185)]
STYLES = [None, (12, 7), (2, 6)]                      # solid, dashed, dotted: (on, off) pixels
INK, GRID = (0, 0, 0), (232, 232, 232)
LEGEND = (0, H - 70, W, H)                            # the legend strip at the bottom
CELL_H = (H - 70) // 2
# the four plot areas (left, top, right, bottom): (a) (b) on top, (c) (d) below
PANELS = {k: (x + 80, y + 55, x + 670, y + CELL_H - 55)
          for k, (x, y) in zip("abcd", [(0, 0), (700, 0), (0, CELL_H), (700, CELL_H)])}
LOSSES = [("sup", "supervised, E5"), ("unsup", "unsupervised, E6: 0.25 s1 + 0.25 s2 + 0.5 fp"),
          ("sta", "stability, E8 (before the lambda ramp)")]


# ----------------------------------------------------------------------------------------------
# drawing helpers (ablate.py's chart uses font, ytick and swatch too)

def font(size=10):
    """Pillow's built-in typeface (no font file to ship); size 10 is ablate.py's chart."""
    return ImageFont.load_default(size)


def ytick(d, x, y, label, f):
    """A tick left of the y axis at x, with its number right-aligned beside it."""
    d.line([(x - 4, y), (x, y)], fill=INK)
    d.text((x - 8, y), label, fill=INK, font=f, anchor="rm")


def xtick(d, x, y, label, f):
    """A tick below the x axis at y, with its number centred under it."""
    d.line([(x, y), (x, y + 4)], fill=INK)
    d.text((x, y + 8), label, fill=INK, font=f, anchor="mt")


def swatch(d, x, y, colour, label, f):
    """A legend entry: a filled square centred on y, its label to the right."""
    d.rectangle([x, y - 6, x + 12, y + 6], fill=colour)
    d.text((x + 18, y), label, fill=INK, font=f, anchor="lm")


def dashed(d, points, fill, width, pattern):
    """Pillow has no dashed lines: walk the polyline drawing `on` pixels, skipping `off`; the
    pattern carries over the vertices, so a bend in the curve does not restart it."""
    on, off = pattern
    walked = 0.0                                          # distance along the whole polyline
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length, t = math.hypot(x1 - x0, y1 - y0), 0.0
        while t < length:
            phase = walked % (on + off)
            t_end = min(length, t + (on - phase if phase < on else on + off - phase))
            if phase < on:   # multiply first: a dash ending on a vertex ends exactly there
                at = lambda u: (x0 + (x1 - x0) * u / length, y0 + (y1 - y0) * u / length)
                d.line([at(t), at(t_end)], fill=fill, width=width)
            walked += t_end - t
            t = t_end


def polyline(d, points, colour, dash, width=3):
    """A curve, solid (dash None) or dashed; a single point is drawn as a dot so it is not lost."""
    if len(points) == 1:
        (x, y), r = points[0], width
        d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif dash is None:
        d.line(points, fill=colour, width=width, joint="curve")
    else:
        dashed(d, points, colour, width, dash)


def nice_step(span, n=5):
    """A tick spacing of 1, 2 or 5 times a power of ten giving about n intervals over span."""
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * 0.999)


def nice_top(hi, n=5):
    """The axis limit: hi rounded up to a whole tick, so the top tick is the axis end."""
    hi = hi if hi > 0 else 1.0
    step = nice_step(hi, n)
    return step * math.ceil(hi / step - 1e-9)


@dataclass
class Axes:
    """A plot area: box (left, top, right, bottom) in pixels showing xlim x ylim in data units,
    with about y_ticks intervals on the y axis."""
    box: tuple
    xlim: tuple
    ylim: tuple
    y_ticks: int = 5

    def px(self, x, y):
        """Data (x, y) -> pixel; y grows upwards, the image's y downwards."""
        l, t, r, b = self.box
        fx = (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0])
        fy = (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        return l + fx * (r - l), b - fy * (b - t)


def frame(d, ax, fmt, f, x_numbers=True):
    """Grid, axes and ticks of ax; fmt turns a y value into its tick label."""
    l, t, r, b = ax.box
    for v in _ticks(ax.ylim, ax.y_ticks):
        y = ax.px(ax.xlim[0], v)[1]
        d.line([(l, y), (r, y)], fill=GRID)
        ytick(d, l, y, fmt(v), f)
    for v in _ticks(ax.xlim):
        x = ax.px(v, ax.ylim[0])[0]
        d.line([(x, t), (x, b)], fill=GRID)
        if x_numbers:
            xtick(d, x, b, f"{v:g}", f)
    d.line([(l, t), (l, b), (r, b)], fill=INK)


def _ticks(lim, n=5):
    step = nice_step(lim[1] - lim[0], n)
    return [lim[0] + i * step for i in range(int((lim[1] - lim[0]) / step + 1e-6) + 1)]


# ----------------------------------------------------------------------------------------------
# reading runs

@dataclass
class Run:
    """One run folder's log: its label, its students in logging order, and its records."""
    label: str
    students: list
    train: list
    evals: list


def read_log(run_dir):
    """The records of <run_dir>/log.jsonl; a torn last line (a run still writing) is skipped."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; pass a run folder written by train.py")
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UserError(f"{path}: line {i + 1} is not JSON; the log is corrupt") from None
    return records


def load(run_dir, label):
    """A Run; its students are named by the '<student>/loss' keys, or by the evals' result dicts."""
    records = [r for r in read_log(run_dir) if _has_step(r)]
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    names = [k[:-5] for r in train for k in r if k.endswith("/loss")]
    names += [k for r in evals for k, v in r.items() if isinstance(v, dict) and k != "fused"]
    return Run(label, list(dict.fromkeys(names)), train, evals)


def default_labels(run_dirs):
    """Each run's folder name; parent/name where two names clash (ablate's <row>/seed0)."""
    names = [os.path.basename(os.path.normpath(p)) for p in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [os.path.join(*os.path.normpath(p).split(os.sep)[-2:]) for p in run_dirs]


def _has_step(record):
    return isinstance(record, dict) and _number(record.get("step")) is not None


def _number(v):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return v if ok else None


def value(record, name, quantity):
    """One logged number of a train record (None if absent); 'unsup' is the E7-weighted E6 terms."""
    get = lambda q: _number(record.get(f"{name}/{q}"))
    if quantity == "unsup":
        strong = [v for v in (get("s1"), get("s2")) if v is not None]
        return 0.5 * sum(strong) / len(strong) + 0.5 * (get("fp") or 0.0) if strong else None
    if quantity == "pl_acc" and get("pl_cov") == 0:
        return None                                        # nothing confident: no accuracy
    return get(quantity)


def series(run, name, quantity):
    """[(step, value)] of one quantity of one student (or 'fused'); 'miou' comes from the evals."""
    if quantity == "miou":
        results = [(r["step"], r.get(name)) for r in run.evals]
        pts = [(s, _number(v.get("miou")) if isinstance(v, dict) else None) for s, v in results]
    else:
        pts = [(r["step"], value(r, name, quantity)) for r in run.train]
    return [(s, v) for s, v in pts if v is not None]


# ----------------------------------------------------------------------------------------------
# the picture

def y_limits(quantity, values, n):
    """0 .. a round top; fractions end at 1; accuracy starts at a round value below its lowest
    point: it lives near the top of 0..1, where its drift would be a few pixels."""
    if quantity == "pl_acc":
        lo = min(values)
        step = nice_step(max(1 - lo, 0.05), n)
        return min(step * math.floor(lo / step + 1e-9), 1 - step), 1.0   # never an empty axis
    return 0.0, 1.0 if quantity == "pl_cov" else nice_top(max(values), n)


def pens(runs):
    """[(run, name, colour, dash)] for every series slot: student 1, student 2, fused."""
    out = []
    for i, run in enumerate(runs):
        for j, name in enumerate(run.students + ["fused"]):
            slot = 2 if name == "fused" else min(j, 1)     # fused keeps its slot with one student
            colour = COLOURS[slot] if len(runs) == 1 else COLOURS[i % len(COLOURS)]
            out.append((run, name, colour, None if len(runs) == 1 else STYLES[slot]))
    return out


def draw_panel(d, box, title, quantities, runs, xmax):
    """One panel: a strip per (quantity, strip title, y format); nothing logged -> 'no data'."""
    f, ft = font(14), font(17)
    l, t, r, b = box
    d.text((l - 70, t - 42), title, fill=INK, font=ft)
    found = [(q, name, fmt) for q, name, fmt in quantities
             if any(series(run, n, q) for run, n, _, _ in pens(runs))]
    if not found:
        d.line([(l, t), (l, b), (r, b)], fill=INK)
        d.text(((l + r) / 2, (t + b) / 2), "no data", fill=INK, font=ft, anchor="mm")
        return
    gap = 30                                              # room for the next strip's title
    height = (b - t - gap * (len(found) - 1)) / len(found)
    n = 5 if len(found) == 1 else 3                       # y ticks: fewer on a short strip
    for k, (q, name, fmt) in enumerate(found):
        lines = [(series(run, n, q), c, dash) for run, n, c, dash in pens(runs)]
        ylim = y_limits(q, [v for pts, _, _ in lines for _, v in pts], n)
        st = t + k * (height + gap)
        ax = Axes((l, st, r, st + height), (0, xmax), ylim, n)
        frame(d, ax, fmt, f, x_numbers=k == len(found) - 1)
        d.text((l + 6, st - 4), name, fill=INK, font=f, anchor="ls")   # above its strip
        for pts, colour, dash in lines:
            xy = [ax.px(s, v) for s, v in pts]
            if xy:
                polyline(d, xy, colour, dash)
            if q == "miou":
                for x, y in xy:
                    d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour, outline=INK)
    d.text((r, b + 26), "step", fill=INK, font=f, anchor="rt")


def legend(d, runs):
    """One run: a swatch per series. Several: a swatch per run (wrapping), then a line per style."""
    f, (l, t, r, b) = font(14), LEGEND
    x, y = 80, t + 14
    if len(runs) == 1:
        for _, name, colour, _ in pens(runs):
            swatch(d, x, y + 8, colour, name, f)
            x += 40 + d.textlength(name, font=f)
        return
    same = all(run.students == runs[0].students for run in runs)    # else name them per run
    for i, run in enumerate(runs):
        students = "" if same or not run.students else f" ({', '.join(run.students)})"
        label = run.label + students
        if x + 18 + d.textlength(label, font=f) > r - 20:
            x, y = 80, y + 20
        swatch(d, x, y, COLOURS[i % len(COLOURS)], label, f)
        x += 40 + d.textlength(label, font=f)
    names = runs[0].students if same else ["student 1", "student 2"]
    x, y = 80, y + 24
    for name, dash in [*zip(names[:2], STYLES), ("fused", STYLES[2])]:
        polyline(d, [(x, y), (x + 40, y)], INK, dash, width=2)
        d.text((x + 48, y), name, fill=INK, font=f, anchor="lm")
        x += 80 + d.textlength(name, font=f)


def plot(run_dirs, out_path, labels=None):
    """Draw the runs' curves (one run: its drift plot; several: their overlay) to out_path; returns
    out_path. labels name the runs in the legend (default: their folder names)."""
    runs = [load(p, label) for p, label in zip(run_dirs, labels or default_labels(run_dirs))]
    xmax = nice_top(max([r["step"] for run in runs for r in run.train + run.evals] + [1]))
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    pct = lambda v: f"{100 * v:.0f}"
    num = lambda v: f"{v:g}"
    draw_panel(d, PANELS["a"], "(a) pseudo-label accuracy (%): confident pixels vs. hidden labels",
               [("pl_acc", "", pct)], runs, xmax)
    draw_panel(d, PANELS["b"], "(b) pseudo-label coverage (%): confident pixels at tau",
               [("pl_cov", "", pct)], runs, xmax)
    draw_panel(d, PANELS["c"], "(c) training losses", [(q, name, num) for q, name in LOSSES],
               runs, xmax)
    draw_panel(d, PANELS["d"], "(d) validation mIoU (%)", [("miou", "", pct)], runs, xmax)
    legend(d, runs)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with replacing(out_path) as tmp:
        img.save(tmp, format="PNG")
    return out_path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders written by train.py (each holds log.jsonl)")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN/curves.png for one run, "
                                               "./curves.png for several)")
    p.add_argument("--labels", default=None, help="comma list naming the runs (default: folders)")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(args.runs):
        p.error(f"--labels: {len(labels)} names for {len(args.runs)} runs")
    one = os.path.join(args.runs[0], "curves.png")
    out = args.out or (one if len(args.runs) == 1 else "curves.png")
    print(plot(args.runs, out, labels))


if __name__ == "__main__":
    cli(main)
