"""tools/ablate.py: the paper's ablation table on any dataset in one command.

    python -m tools.ablate --dataset demo --ratio 1/16 --iters 480 --seeds 3
    python -m tools.ablate --dataset potsdam --ratio 1/16 --rows supervised,unimatch,co2s --seeds 1

Every row is a set of train.py flags (ROWS below, named like the paper's ablations); each row runs
with every seed through train.py itself (in this process), into <out>/<row>/seed<k>. Then one
markdown table: per row the mIoU of each student and of the fused prediction (E10) at the end of
training, and the fused pseudo-labels' accuracy and coverage on the unlabelled images (against their
never-used labels), as mean +- std over seeds. Written to <out>/table.md, <out>/results.json (every
run's metrics and folder), <out>/chart.png (the table as bars) and <out>/curves.png (tools/plot.py's
overlay of the training curves of seed 0 of every row, a colour per row: one seed per row keeps the
picture readable; the table holds the spread over seeds). Flags ablate.py does not know go to
train.py for every row (e.g. --lr, --batch, --size); a row's own flags win.

A rerun reuses every finished run and resumes an interrupted one from its last.pt, so an interrupted
table continues where it stopped.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import train
from plumbing.errors import cli
from tools.plot import ablation_figure, drift_figure, read_log, save

# row name -> the train.py flags that make it (the paper's default for everything else)
ROWS = {
    "supervised": ["--method", "supervised"],  # E5 only: the labelled images alone
    "unimatch": ["--method", "unimatch"],  # each student alone (E5-E7), no E8
    # the paper: E8 with gradient into the student side
    "co2s": ["--method", "co2s"],
    # the authors' code: E8 computed on detached logits
    "co2s-released": ["--stability", "released"],
    # without the feature-perturbation branch (E4)
    "no-fp": ["--no-fp"],
    "one-view": ["--strong-views", "1"],  # one strong view instead of two
    # implicit guidance for the CLIP student too
    "clip-queries": ["--clip-guidance", "queries"],
    "clip+clip": ["--students", "clip,clip"],  # two CLIP students
    "dinov3+dinov3": ["--students", "dinov3,dinov3"],  # two DINOv3 students
    "fusion-mean": ["--fusion", "mean"],  # E10 as the mean of the two students
}


# table.md: its columns, summarise's keys of the figures in them, its footnote (seeds)
COLUMNS = "row|students|mIoU student 1|mIoU student 2|mIoU fused|PL accuracy|PL coverage".split("|")
FIGURES = ("student1", "student2", "fused", "pl_acc", "pl_cov")
NOTE = "mIoU (%) at the end of training, mean ± std over {} seed(s); PL: the fused pseudo-labels (E10 of the weak predictions) at tau, against the unlabelled images' labels, at the last logged step."


def get_args(argv=None):
    epilog = "other flags are passed to train.py"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=epilog)
    p.add_argument("--dataset", default="demo")
    p.add_argument("--ratio", default="1/16")
    p.add_argument("--iters", type=int, help="optimizer steps per run (default: train.py's epochs)")
    p.add_argument("--seeds", type=train.number(int, 1), default=3, help="seeds 0 .. N-1 per row")
    p.add_argument("--rows", default=",".join(ROWS), help="comma list of: " + ", ".join(ROWS))
    p.add_argument("--out", help="table folder (default: runs/ablate-<dataset>-<ratio>)")
    args, train_flags = p.parse_known_args(argv)
    args.rows = args.rows.split(",")
    if bad := [r for r in args.rows if r not in ROWS]:
        p.error(f"--rows: unknown {', '.join(bad)}; valid: {', '.join(ROWS)}")
    args.out = args.out or f"runs/ablate-{args.dataset}-{args.ratio.replace('/', '_')}"
    return args, train_flags


def run_argv(args, train_flags, row, seed, out):
    """The train.py command line of one run: the table's dataset and budget, the user's flags,
    the row's flags."""
    argv = ["--dataset", args.dataset, "--ratio", args.ratio, "--seed", str(seed), "--out", out]
    return argv + train_flags + ROWS[row] + (["--iters", str(args.iters)] if args.iters else [])


def run_once(argv, out):
    """One train.py run; a finished one (metrics.json says done) is reused, an interrupted one
    resumed."""
    metrics = Path(out, "metrics.json")
    if metrics.is_file() and json.loads(metrics.read_text()).get("done"):
        return "reused"
    resume = Path(out, "last.pt").is_file()
    train.main(["--resume", out] if resume else argv)
    return "resumed" if resume else "ran"


def read_run(out):
    """What the table needs from a finished run folder: final mIoU per prediction, last
    pseudo-label quality."""
    results = json.loads(Path(out, "metrics.json").read_text())["last"]["results"]
    # the last record with pseudo-label quality; a supervised run logs none
    last = next((r for r in read_log(out).train[::-1] if "fused/pl_acc" in r), {})
    miou = {k: v["miou"] for k, v in results.items()}
    return dict(run=out, miou=miou, **{k: last.get(f"fused/{k}") for k in ("pl_acc", "pl_cov")})


def mean_std(values):
    """'mean +- std' in % over seeds (sample std; '-' if the row has no such value)."""
    values = [100 * v for v in values if v is not None]
    if not values:
        return "-", None, None
    m, s = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.2f} ± {s:.2f}", m, s


def summarise(runs):
    """One row of the table from its runs (one per seed): the students' names and, for each
    column, (text, mean, std)."""
    names = [n for n in runs[0]["miou"] if n != "fused"]
    # the prediction of each mIoU figure; one student: no student-2 figure
    preds = dict(zip(FIGURES, [names[0], names[1] if len(names) > 1 else None, "fused"]))
    figures = [dict(r, **{k: r["miou"].get(n) for k, n in preds.items()}) for r in runs]
    return dict(students=names, **{k: mean_std([f[k] for f in figures]) for k in FIGURES})


def markdown(table, seeds):
    rows = [[r, ", ".join(t["students"])] + [t[k][0] for k in FIGURES] for r, t in table.items()]
    lines = ["| " + " | ".join(cells) + " |" for cells in [COLUMNS, *rows]]
    # the header, its rule, the rows
    return "\n".join(lines[:1] + ["|---" * 7 + "|"] + lines[1:] + ["\n" + NOTE.format(seeds)])


def overlay(runs, path):
    """curves.png: seed 0 of every row (its first run), one colour per row, labelled by the row."""
    return save(drift_figure([r[0]["run"] for r in runs.values()], list(runs)), path)


def main(argv=None):
    args, train_flags = get_args(argv)
    start, runs = time.time(), {}
    for row in args.rows:
        for seed in range(args.seeds):
            out, t = os.path.join(args.out, row, f"seed{seed}"), time.time()
            how = run_once(run_argv(args, train_flags, row, seed, out), out)
            wall_s = round(time.time() - t, 1)
            runs.setdefault(row, []).append(dict(read_run(out), seed=seed, how=how, wall_s=wall_s))
            print(f"[ablate] {row} seed {seed}: {how} ({wall_s} s) -> {out}")
    table = {row: summarise(row_runs) for row, row_runs in runs.items()}
    command = "python -m tools.ablate " + " ".join(argv if argv is not None else sys.argv[1:])
    wall = f"wall time {time.time() - start:.0f} s (runs reused from an earlier call count 0 s)"
    text = f"{markdown(table, args.seeds)}\n\nCommand: `{command}`; {wall}.\n"
    Path(args.out, "table.md").write_text(text)
    rows = {r: ROWS[r] for r in args.rows}
    results = dict(command=command, train_flags=train_flags, rows=rows, runs=runs, table=table)
    Path(args.out, "results.json").write_text(json.dumps(results, indent=2))
    save(ablation_figure(table), os.path.join(args.out, "chart.png"))
    overlay(runs, os.path.join(args.out, "curves.png"))
    print(text)
    return table


if __name__ == "__main__":
    cli(main)
