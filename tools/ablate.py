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

import train
from plumbing.errors import cli
from tools.plot import ablation_chart, plot

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


def get_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="other flags are passed to train.py"
    )
    p.add_argument("--dataset", default="demo")
    p.add_argument("--ratio", default="1/16")
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="optimizer steps per run (default: train.py's epochs)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per row")
    p.add_argument("--rows", default=",".join(ROWS), help="comma list of: " + ", ".join(ROWS))
    p.add_argument(
        "--out", default=None, help="table folder (default: runs/ablate-<dataset>-<ratio>)"
    )
    args, train_flags = p.parse_known_args(argv)
    args.rows = args.rows.split(",")
    bad = [r for r in args.rows if r not in ROWS]
    if bad:
        p.error(f"--rows: unknown {', '.join(bad)}; valid: {', '.join(ROWS)}")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    args.out = args.out or os.path.join(
        "runs", f"ablate-{args.dataset}-{args.ratio.replace('/', '_')}"
    )
    return args, train_flags


def run_argv(args, train_flags, row, seed, out):
    """The train.py command line of one run: the table's dataset and budget, the user's flags,
    the row's flags."""
    argv = [
        "--dataset",
        args.dataset,
        "--ratio",
        args.ratio,
        "--seed",
        str(seed),
        "--out",
        out,
        *train_flags,
        *ROWS[row],
    ]
    return argv + (["--iters", str(args.iters)] if args.iters else [])


def run_once(argv, out):
    """One train.py run; a finished one (metrics.json says done) is reused, an interrupted one
    resumed."""
    metrics = os.path.join(out, "metrics.json")
    if os.path.isfile(metrics):
        with open(metrics) as f:
            if json.load(f).get("done"):
                return "reused"
    if os.path.isfile(os.path.join(out, "last.pt")):
        train.main(["--resume", out])
        return "resumed"
    train.main(argv)
    return "ran"


def read_run(out):
    """What the table needs from a finished run folder: final mIoU per prediction, last
    pseudo-label quality."""
    with open(os.path.join(out, "metrics.json")) as f:
        results = json.load(f)["last"]["results"]
    with open(os.path.join(out, "log.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    pl = [r for r in logged if r["type"] == "train" and "fused/pl_acc" in r]
    return dict(
        run=out,
        miou={k: v["miou"] for k, v in results.items()},
        pl_acc=pl[-1]["fused/pl_acc"] if pl else None,
        pl_cov=pl[-1]["fused/pl_cov"] if pl else None,
    )


def mean_std(values):
    """'mean +- std' in % over seeds (sample std; '-' if the row has no such value)."""
    values = [100 * v for v in values if v is not None]
    if not values:
        return "-", None, None
    m, s = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.2f} ± {s:.2f}", m, s


def summarise(rows):
    """Per row: the students' names and, for each column, (text, mean, std)."""
    table = {}
    for row, runs in rows.items():
        names = [n for n in runs[0]["miou"] if n != "fused"]
        table[row] = dict(
            students=names,
            student1=mean_std([r["miou"][names[0]] for r in runs]),
            student2=mean_std([r["miou"][names[1]] for r in runs])
            if len(names) > 1
            else mean_std([]),
            fused=mean_std([r["miou"]["fused"] for r in runs]),
            pl_acc=mean_std([r["pl_acc"] for r in runs]),
            pl_cov=mean_std([r["pl_cov"] for r in runs]),
        )
    return table


def markdown(table, seeds):
    lines = [
        "| row | students | mIoU student 1 | mIoU student 2 | mIoU fused | PL accuracy | PL coverage |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, t in table.items():
        lines.append(
            f"| {row} | {', '.join(t['students'])} | "
            + " | ".join(t[k][0] for k in ("student1", "student2", "fused", "pl_acc", "pl_cov"))
            + " |"
        )
    lines.append(
        f"\nmIoU (%) at the end of training, mean ± std over {seeds} seed(s); PL: the fused pseudo-labels "
        f"(E10 of the weak predictions) at tau, against the unlabelled images' labels, at the last logged step."
    )
    return "\n".join(lines)


def overlay(runs, path):
    """curves.png: seed 0 of every row (its first run), one colour per row, labelled by the row."""
    return plot([r[0]["run"] for r in runs.values()], path, list(runs))


def main(argv=None):
    args, train_flags = get_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start, runs = time.time(), {}
    for row in args.rows:
        for seed in range(args.seeds):
            out = os.path.join(args.out, row, f"seed{seed}")
            t = time.time()
            how = run_once(run_argv(args, train_flags, row, seed, out), out)
            runs.setdefault(row, []).append(
                dict(read_run(out), seed=seed, how=how, wall_s=round(time.time() - t, 1))
            )
            print(f"[ablate] {row} seed {seed}: {how} ({runs[row][-1]['wall_s']} s) -> {out}")
    table = summarise(runs)
    command = "python -m tools.ablate " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        f"{markdown(table, args.seeds)}\n\nCommand: `{command}`; wall time {time.time() - start:.0f} s "
        f"(runs reused from an earlier call count 0 s).\n"
    )
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(
            dict(
                command=command,
                train_flags=train_flags,
                rows={r: ROWS[r] for r in args.rows},
                runs=runs,
                table={r: {k: v for k, v in t.items()} for r, t in table.items()},
            ),
            f,
            indent=2,
        )
    ablation_chart(table, os.path.join(args.out, "chart.png"))
    overlay(runs, os.path.join(args.out, "curves.png"))
    print(text)
    return table


if __name__ == "__main__":
    cli(main)
