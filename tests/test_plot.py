"""tools/plot.py: what the figure holds is what the log says (synthetic logs; the data of the
matplotlib artists, never pixels)."""

import json
import math
import os
import subprocess
import sys

import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from plumbing import errors
from plumbing.errors import UserError
from tools import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = list(range(10, 210, 10))
EVAL_STEPS = [100, 200]


def write_run(root, name, records, tail=b""):
    """A run folder holding only log.jsonl, one JSON record per line (then raw bytes `tail`)."""
    run = os.path.join(root, name)
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "log.jsonl"), "wb") as f:
        f.write(b"".join(json.dumps(r).encode() + b"\n" for r in records) + tail)
    return run


def co2s_log(acc_a=lambda t: 0.5, acc_b=lambda t: 0.5, uni=True):
    """A co2s-like log: students a and b, pl_acc as a function of t in 0..1, two evals. Every
    value differs by student and step, so a line holding the wrong key or step would show."""
    recs = []
    for i, step in enumerate(STEPS):
        t = i / (len(STEPS) - 1)
        rec = dict(type="train", step=step, epoch=t, lr=1e-4, step_s=0.1, **{"lambda": t})
        for k, (s, acc) in enumerate((("a", acc_a(t)), ("b", acc_b(t)))):
            rec.update(
                {
                    f"{s}/sup": 1 - t / 2 + k,
                    f"{s}/s1": 0.2,
                    f"{s}/s2": 0.3,
                    f"{s}/fp": 0.1,
                    f"{s}/sta": 0.05 * t + k,
                    f"{s}/loss": 0.6 + t + k,
                    f"{s}/pl_acc": acc,
                    f"{s}/pl_cov": 0.5 - t / 4 + k / 10,
                    f"{s}/conf_ratio": 0.4 + t / 5 + k / 20,
                }
            )
            if uni:
                rec[f"{s}/uni"] = 0.7 - t / 3 + k
        rec.update({"fused/pl_acc": 0.7 + t / 10, "fused/pl_cov": 0.6})
        recs.append(rec)
    return recs + [evaluation(s, v) for s, v in zip(EVAL_STEPS, (0.3, 0.4))]


def evaluation(step, v):
    res = lambda x: {"miou": x, "acc": x, "iou": {"c0": x}, "pixels": 10}
    return {
        "type": "eval",
        "step": step,
        "epoch": step / 100,
        "a": res(v),
        "b": res(v + 0.01),
        "fused": res(v + 0.05),
    }


def supervised_log():
    losses = {
        "a/sup": 1.0,
        "a/uni": 0.5,
        "a/loss": 0.5,
        "b/sup": 0.9,
        "b/uni": 0.45,
        "b/loss": 0.45,
    }  # no pseudo-label keys, no stability
    recs = [dict(type="train", step=s, epoch=0, **losses) for s in STEPS]
    return recs + [evaluation(200, 0.2)]


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def panel(fig, key):
    (ax,) = [ax for ax in fig.axes if ax.get_label() == key]
    return ax


def lines(fig, key):
    """{line label ('<run>/<series>'): (steps, values)} of one panel."""
    return {
        ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata()))
        for ln in panel(fig, key).get_lines()
    }


def texts(ax):
    return [t.get_text() for t in ax.texts]


def legend(fig):
    return [t.get_text() for lg in fig.legends for t in lg.get_texts()]


def test_each_panel_holds_exactly_the_logged_steps_and_values(tmp_path):
    log = co2s_log(acc_a=lambda t: 0.2 + 0.7 * t, acc_b=lambda t: 0.9 - 0.7 * t)
    fig = plot.drift_figure([write_run(tmp_path, "co2s", log)])
    train = [r for r in log if r["type"] == "train"]
    for key in ("pl_acc", "pl_cov", "conf_ratio", "sta", "sup", "uni", "loss"):
        got = lines(fig, key)
        for s in "ab":
            assert got.pop(f"co2s/{s}") == (STEPS, [r[f"{s}/{key}"] for r in train]), key
        if key in ("pl_acc", "pl_cov"):
            assert got.pop("co2s/fused") == (STEPS, [r[f"fused/{key}"] for r in train])
        assert got == {}, key  # nothing else drawn there
    assert lines(fig, "lambda") == {"co2s/lambda": (STEPS, [r["lambda"] for r in train])}
    a_acc = lines(fig, "pl_acc")["co2s/a"][1]
    assert a_acc[-1] > a_acc[0] and lines(fig, "pl_acc")["co2s/b"][1][-1] < 0.3  # the drift
    assert len(fig.axes) == 9 and {ax.get_label() for ax in fig.axes} == {
        k for k, *_ in plot.PANELS
    }


def test_eval_miou_is_a_marker_at_each_eval_step_per_student_and_fused(tmp_path):
    fig = plot.drift_figure([write_run(tmp_path, "co2s", co2s_log())])
    got = lines(fig, "miou")
    assert got == {
        "co2s/a": (EVAL_STEPS, [0.3, 0.4]),
        "co2s/b": (EVAL_STEPS, [0.3 + 0.01, 0.4 + 0.01]),
        "co2s/fused": (EVAL_STEPS, [0.3 + 0.05, 0.4 + 0.05]),
    }
    assert all(ln.get_marker() == "o" for ln in panel(fig, "miou").get_lines())


def test_l_uni_is_drawn_when_logged_and_never_re_derived_when_absent(tmp_path):
    fig = plot.drift_figure([write_run(tmp_path, "old", co2s_log(uni=False))])
    assert lines(fig, "uni") == {} and "no data" in texts(panel(fig, "uni"))[0]
    train = [r for r in co2s_log() if r["type"] == "train"]
    derived = [
        (r["a/sup"] + 0.25 * r["a/s1"] + 0.25 * r["a/s2"] + 0.5 * r["a/fp"]) / 2 for r in train
    ]  # E7 from the terms: what curves.py drew, wrong for --no-fp
    unsup = [0.25 * r["a/s1"] + 0.25 * r["a/s2"] + 0.5 * r["a/fp"] for r in train]
    for ax in fig.axes:
        for ln in ax.get_lines():
            ys = list(ln.get_ydata())
            assert ys != pytest.approx(derived) and ys != pytest.approx(unsup), ax.get_label()
    new = plot.drift_figure([write_run(tmp_path, "new", co2s_log())])
    assert lines(new, "uni")["new/a"] == (STEPS, [r["a/uni"] for r in train])


def test_one_run_a_colour_per_series_and_its_legend(tmp_path):
    fig = plot.drift_figure([write_run(tmp_path, "co2s", co2s_log())])
    acc = {ln.get_label(): ln for ln in panel(fig, "pl_acc").get_lines()}
    assert [acc[f"co2s/{s}"].get_color() for s in ("a", "b", "fused")] == ["C0", "C1", "C2"]
    assert {ln.get_linestyle() for ln in acc.values()} == {"-"}
    assert legend(fig) == ["a", "b", "fused"]
    assert fig._suptitle.get_text().startswith("co2s: ")


def test_an_overlay_has_both_runs_a_colour_per_run_and_a_style_per_series(tmp_path):
    runs = [write_run(tmp_path, n, co2s_log()) for n in ("r1", "r2")]
    fig = plot.drift_figure(runs, labels=["first", "second"])
    acc = {ln.get_label(): ln for ln in panel(fig, "pl_acc").get_lines()}
    assert set(acc) == {f"{r}/{s}" for r in ("first", "second") for s in ("a", "b", "fused")}
    for run, colour in (("first", "C0"), ("second", "C1")):
        styles = [acc[f"{run}/{s}"].get_linestyle() for s in ("a", "b", "fused")]
        assert styles == ["-", "--", ":"]
        assert {acc[f"{run}/{s}"].get_color() for s in ("a", "b", "fused")} == {colour}
    assert lines(fig, "miou")["second/fused"] == (EVAL_STEPS, [0.3 + 0.05, 0.4 + 0.05])
    assert legend(fig) == ["first", "second", "a", "b", "fused"]  # runs, then line styles


def test_the_overlay_legend_names_students_per_run_when_they_differ(tmp_path):
    other = [{k.replace("a/", "c/"): v for k, v in r.items()} for r in co2s_log()]
    other = [{("c" if k == "a" else k): v for k, v in r.items()} for r in other]
    runs = [write_run(tmp_path, "r1", co2s_log()), write_run(tmp_path, "r2", other)]
    names = legend(plot.drift_figure(runs))
    assert names == ["r1 (a, b)", "r2 (c, b)", "student 1", "student 2", "fused"]


def test_a_supervised_run_in_an_overlay_has_no_pseudo_label_lines(tmp_path):
    runs = [
        write_run(tmp_path, "supervised", supervised_log()),
        write_run(tmp_path, "co2s", co2s_log()),
    ]
    fig = plot.drift_figure(runs)
    for key in ("pl_acc", "pl_cov", "conf_ratio", "sta", "lambda"):
        assert {k.split("/")[0] for k in lines(fig, key)} == {"co2s"}, key
    for key in ("miou", "sup", "uni", "loss"):
        assert {k.split("/")[0] for k in lines(fig, key)} == {"supervised", "co2s"}, key


def test_a_panel_without_any_data_says_so_and_draws_no_line(tmp_path):
    fig = plot.drift_figure([write_run(tmp_path, "supervised", supervised_log())])
    for key in ("pl_acc", "pl_cov", "conf_ratio", "sta", "lambda"):
        assert lines(fig, key) == {} and texts(panel(fig, key)) == ["no data"], key
    assert texts(panel(fig, "sup")) == [] and lines(fig, "sup")
    assert legend(fig) == ["a", "b", "fused"]  # its eval has a fused mIoU


def test_accuracy_without_coverage_is_left_out_and_its_axis_zooms_in(tmp_path):
    log = co2s_log(acc_a=lambda t: 0.86 + 0.11 * t, acc_b=lambda t: 0.97 - 0.11 * t)
    log[0]["a/pl_cov"], log[0]["a/pl_acc"] = 0.0, 0.0  # nothing confident: logged as 0
    for r in log[: len(STEPS)]:
        r["fused/pl_acc"] = 0.9
    fig = plot.drift_figure([write_run(tmp_path, "r", log)])
    steps, values = lines(fig, "pl_acc")["r/a"]
    assert steps == STEPS[1:] and min(values) > 0.85
    lo, hi = panel(fig, "pl_acc").get_ylim()
    assert 0.8 <= lo < 0.86 and hi >= 1.0  # the 0 logged for no pixels is no point at all
    lo, hi = plot.y_limits("acc", [0.86, 0.97])
    assert 0.8 <= lo < 0.86 and 1.0 <= hi < 1.01  # 100 % on top, a round bottom
    assert plot.y_limits("acc", [1.0, 1.0])[0] < 1.0  # all perfect: still an axis
    assert plot.y_limits("share", [0.1, 0.2]) == (-0.02, 1.02)  # shares: all of 0..100 %
    assert panel(fig, "pl_cov").get_ylim() == (-0.02, 1.02)


def test_bad_lines_and_values_are_skipped(tmp_path):
    good = co2s_log()
    train = [r for r in good if r["type"] == "train"]
    broken = dict(train[3], **{"a/sup": None, "b/sup": "x", "a/pl_cov": True})
    lines_ = [json.dumps(r).encode() for r in good]
    lines_[3] = json.dumps(broken).encode()
    lines_[5] = lines_[5].replace(b'"a/sup": ', b'"a/sup": NaN, "_": ')  # json.dumps' NaN
    bad = [
        b"\xff\xfe not utf-8",
        b'{"type": "train", "st',
        b"[1, 2]",
        b'{"type": "train"}',
        b'{"type": "other", "step": 5}',
        b'{"type": "train", "step": Infinity}',
    ]
    raw = b"\n".join(lines_[:10] + bad + lines_[10:]) + b'\n{"type": "eval", "step": 3'  # torn
    run = os.path.join(tmp_path, "r")
    os.makedirs(run)
    with open(os.path.join(run, "log.jsonl"), "wb") as f:
        f.write(raw)
    log = plot.read_log(run)
    assert len(log.train) == len(train) and len(log.evals) == len(EVAL_STEPS)
    assert log.skipped == list(range(11, 17)) + [len(good) + len(bad) + 1]
    assert log.students == ["a", "b"]
    fig = plot.drift_figure([run])
    steps, values = lines(fig, "sup")["r/a"]
    assert steps == [s for i, s in enumerate(STEPS) if i not in (3, 5)]
    assert all(math.isfinite(v) for v in values)
    assert lines(fig, "sup")["r/b"][0] == [s for i, s in enumerate(STEPS) if i != 3]
    assert lines(fig, "miou")["r/a"][0] == EVAL_STEPS


def test_a_run_still_writing_its_log_is_plotted(tmp_path):
    run = write_run(tmp_path, "r", co2s_log(), tail=b'{"type": "train", "step": 210, "a/s')
    out = plot.save(plot.drift_figure([run]), str(tmp_path / "c.png"))
    assert read_bytes(out)[:8] == b"\x89PNG\r\n\x1a\n"
    assert lines(plot.drift_figure([run]), "sup")["r/a"][0] == STEPS


@pytest.mark.parametrize(
    "suffix, magic",
    [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF-"), ("", b"\x89PNG")],
)
def test_the_suffix_picks_the_format(tmp_path, suffix, magic):
    run = write_run(tmp_path, "r", co2s_log()[:3])
    out = str(tmp_path / f"curves{suffix}")
    assert plot.save(plot.drift_figure([run]), out) == out
    assert read_bytes(out)[: len(magic)] == magic
    assert sorted(os.listdir(tmp_path)) == sorted(["r", f"curves{suffix}"])  # no temporary


def test_an_unknown_suffix_is_a_user_error_listing_the_valid_ones(tmp_path):
    run = write_run(tmp_path, "r", co2s_log()[:3])
    with pytest.raises(UserError, match=r"curves\.txt.*\.pdf.*\.png.*\.svg"):
        plot.save(plot.drift_figure([run]), str(tmp_path / "curves.txt"))
    assert sorted(os.listdir(tmp_path)) == ["r"]


def test_a_missing_log_is_a_user_error_naming_the_path(tmp_path, capsys):
    missing = str(tmp_path / "not-a-run")
    with pytest.raises(UserError, match="not-a-run"):
        plot.save(plot.drift_figure([missing]), str(tmp_path / "c.png"))
    with pytest.raises(SystemExit) as e:
        errors.cli(lambda: plot.main([missing]))
    assert e.value.code == 2 and os.path.join(missing, "log.jsonl") in capsys.readouterr().err


def test_an_unwritable_output_is_a_user_error_naming_it(tmp_path):
    run = write_run(tmp_path, "r", co2s_log()[:3])
    (tmp_path / "file").write_text("not a folder")
    out = str(tmp_path / "file" / "c.png")
    with pytest.raises(UserError, match=r"file/c\.png: cannot write it"):
        plot.save(plot.drift_figure([run]), out)


def test_writing_is_atomic(tmp_path, monkeypatch):
    run = write_run(tmp_path, "r", co2s_log()[:3])
    out = tmp_path / "pics" / "c.png"
    assert plot.save(plot.drift_figure([run]), str(out)) == str(out)
    before = out.read_bytes()

    def broken_savefig(fig, path, format=None):
        with open(path, "wb") as f:
            f.write(b"half a png")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(UserError, match="No space left"):
        plot.save(plot.drift_figure([run]), str(out))
    assert out.read_bytes() == before and os.listdir(out.parent) == ["c.png"]  # old file, no tmp


def test_cli_default_output_is_beside_one_run_or_here_for_several(tmp_path, monkeypatch, capsys):
    runs = [write_run(tmp_path, n, co2s_log()[:3]) for n in ("r1", "r2")]
    plot.main([runs[0]])
    assert os.path.isfile(os.path.join(runs[0], "curves.png"))
    monkeypatch.chdir(tmp_path)
    plot.main([*runs, "--labels", "x,y"])
    assert os.path.isfile(tmp_path / "curves.png")
    assert capsys.readouterr().out.splitlines() == [
        os.path.join(runs[0], "curves.png"),
        "curves.png",
    ]
    with pytest.raises(SystemExit) as e:
        plot.main([*runs, "--labels", "x"])
    assert e.value.code == 2


def test_python_m_tools_plot_runs_from_the_root_and_a_user_error_is_one_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    missing = str(tmp_path / "nothing")
    p = subprocess.run(
        [sys.executable, "-m", "tools.plot", missing],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and p.stderr.splitlines() == [
        f"error: {os.path.join(missing, 'log.jsonl')}: no such file; pass a run folder "
        + "written by train.py"
    ]


def test_default_labels_are_folder_names_or_parent_and_name_when_they_clash():
    assert plot.default_labels(["x/co2s", "x/unimatch/"]) == ["co2s", "unimatch"]
    assert plot.default_labels(["t/co2s/seed0", "t/no-fp/seed0"]) == ["co2s/seed0", "no-fp/seed0"]


def summary(mean, std):
    """One ablate.summarise column: (text, mean, std) in %, or ('-', None, None)."""
    return ("-", None, None) if mean is None else (f"{mean:.2f} ± {std:.2f}", mean, std)


TABLE = {
    "supervised": {
        "students": ["clip", "dinov3"],
        "student1": summary(20.0, 1.0),
        "student2": summary(22.0, 0.5),
        "fused": summary(24.0, 2.0),
        "pl_acc": summary(None, None),
        "pl_cov": summary(None, None),
    },
    "co2s": {
        "students": ["clip", "dinov3"],
        "student1": summary(30.0, 0.0),
        "student2": summary(31.0, 1.5),
        "fused": summary(33.0, 0.25),
        "pl_acc": summary(95.0, 1.0),
        "pl_cov": summary(40.0, 2.0),
    },
    "one-student": {
        "students": ["clip"],
        "student1": summary(1.0, 3.0),
        "student2": summary(None, None),
        "fused": summary(2.0, 0.0),
        "pl_acc": summary(90.0, 0.0),
        "pl_cov": summary(30.0, 0.0),
    },
}


def bar_groups(ax):
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def test_the_ablation_bars_are_the_tables_means_with_a_std_whisker(tmp_path):
    fig = plot.ablation_figure(TABLE)
    (ax,) = fig.axes
    bars = {c.get_label(): c for c in bar_groups(ax)}
    assert list(bars) == ["student 1", "student 2", "fused"]
    for label, key in (("student 1", "student1"), ("student 2", "student2"), ("fused", "fused")):
        rows = [r for r, t in TABLE.items() if t[key][1] is not None]
        c = bars[label]
        assert [p.get_height() for p in c.patches] == [TABLE[r][key][1] for r in rows]
        (whiskers,) = c.errorbar.lines[2]
        ends = [y for seg in whiskers.get_segments() for y in (seg[0][1], seg[1][1])]
        want = [
            y
            for r in rows
            for y in (
                max(TABLE[r][key][1] - TABLE[r][key][2], 0),
                TABLE[r][key][1] + TABLE[r][key][2],
            )
        ]
        assert ends == pytest.approx(want)  # one std each way, clipped at 0 (one-student: 1 - 3)
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["supervised\nclip, dinov3", "co2s\nclip, dinov3", "one-student\nclip"]
    centres = [p.get_x() + p.get_width() / 2 for c in bar_groups(ax) for p in c.patches]
    assert len({round(x, 6) for x in centres}) == len(centres)  # no two bars on each other
    out = plot.save(plot.ablation_figure(TABLE), str(tmp_path / "chart.svg"))
    assert read_bytes(out)[:5] == b"<?xml"


def test_an_ablation_table_read_back_from_results_json_is_charted_too(tmp_path):
    table = json.loads(json.dumps(TABLE))  # results.json holds the tuples as lists
    heights = [
        p.get_height() for c in bar_groups(plot.ablation_figure(table).axes[0]) for p in c.patches
    ]
    assert heights == [20.0, 30.0, 1.0, 22.0, 31.0, 24.0, 33.0, 2.0]
    empty = plot.ablation_figure({})
    assert [t.get_text() for t in empty.axes[0].texts] == ["no data"]
