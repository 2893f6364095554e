"""curves.py: what a reader takes from the picture is what the log says (synthetic logs only)."""
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

import curves
import errors
from curves import COLOURS, LEGEND, PANELS
from errors import UserError

STEPS = range(10, 210, 10)


def write_run(root, name, records):
    """A run folder holding only log.jsonl, one JSON record per line."""
    run = os.path.join(root, name)
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return run


def co2s_log(acc_a=lambda t: 0.5, acc_b=lambda t: 0.5, fused=0.7):
    """A co2s-like log: students a and b, pl_acc given as a function of t in 0..1, two evals."""
    recs = []
    for i, step in enumerate(STEPS):
        t = i / (len(STEPS) - 1)
        rec = dict(type="train", step=step, epoch=0, lr=1e-4, **{"lambda": 0.5})
        for s, acc in (("a", acc_a(t)), ("b", acc_b(t))):
            rec.update({f"{s}/sup": 1 - t / 2, f"{s}/s1": 0.2, f"{s}/s2": 0.3, f"{s}/fp": 0.1,
                        f"{s}/sta": 0.05, f"{s}/loss": 0.6, f"{s}/pl_acc": acc, f"{s}/pl_cov": 0.5})
        rec.update({"fused/pl_acc": fused, "fused/pl_cov": 0.6})
        recs.append(rec)
    miou = lambda v: dict(miou=v, acc=v, iou={}, pixels=10)
    recs += [dict(type="eval", step=s, epoch=s / 100, a=miou(v), b=miou(v), fused=miou(v + 0.05))
             for s, v in ((100, 0.3), (200, 0.4))]
    return recs


def supervised_log():
    losses = {"a/sup": 1.0, "a/loss": 1.0, "b/sup": 0.9, "b/loss": 0.9}   # no pl_* keys
    recs = [dict(type="train", step=s, epoch=0, **losses) for s in STEPS]
    miou = dict(miou=0.2, acc=0.5, iou={}, pixels=10)
    return recs + [dict(type="eval", step=200, epoch=2.0, a=miou, b=miou, fused=miou)]


def pixels(img, box, colour):
    """[(x, y)] of the pixels of exactly this colour inside box (left, top, right, bottom)."""
    l, t, r, b = (int(v) for v in box)
    crop = np.asarray(img.convert("RGB"))[t:b + 1, l:r + 1]
    return [(l + x, t + y) for y, x in np.argwhere((crop == colour).all(-1))]


def mean_y(pts, x_from, x_to):
    ys = [y for x, y in pts if x_from <= x < x_to]
    assert ys, "no pixels of that colour there"
    return sum(ys) / len(ys)


def test_drift_plot_draws_a_rising_student_higher_on_the_right(tmp_path):
    log = co2s_log(acc_a=lambda t: 0.2 + 0.7 * t, acc_b=lambda t: 0.9 - 0.7 * t)
    run = write_run(tmp_path, "co2s", log)
    img = Image.open(curves.plot([run], str(tmp_path / "c.png")))
    l, t, r, b = PANELS["a"]
    third = (r - l) / 3
    a, bb = pixels(img, PANELS["a"], COLOURS[0]), pixels(img, PANELS["a"], COLOURS[1])
    assert mean_y(a, l + 2 * third, r) < mean_y(a, l, l + third)        # a rises: smaller y right
    assert mean_y(bb, l + 2 * third, r) > mean_y(bb, l, l + third)      # b drifts down
    assert pixels(img, PANELS["a"], COLOURS[2])                         # and the fused map is drawn


def test_coordinates_are_monotonic_and_0_and_1_are_the_axis_limits(tmp_path):
    ax = curves.Axes((100, 50, 500, 350), (0, 200), (0, 1))
    xs = [ax.px(s, 0.5)[0] for s in range(0, 201, 20)]
    ys = [ax.px(100, v / 10)[1] for v in range(11)]
    assert xs == sorted(xs) and ys == sorted(ys, reverse=True)          # right with step, up with v
    assert ax.px(0, 0) == (100, 350) and ax.px(200, 1) == (500, 50)
    # in the picture: accuracy 1 sits on the top of panel (a), accuracy 0 on its bottom
    run = write_run(tmp_path, "r", co2s_log(acc_a=lambda t: 1.0, acc_b=lambda t: 0.0))
    img = Image.open(curves.plot([run], str(tmp_path / "c.png")))
    top, bottom = PANELS["a"][1], PANELS["a"][3]
    rows = lambda c: {y for _, y in pixels(img, PANELS["a"], c)}
    assert rows(COLOURS[0]) <= set(range(top - 2, top + 3))            # a line 3 px wide
    assert rows(COLOURS[1]) <= set(range(bottom - 2, bottom + 3))


def test_the_accuracy_axis_zooms_in_so_a_drift_of_a_few_points_shows(tmp_path):
    log = co2s_log(acc_a=lambda t: 0.86 + 0.11 * t, acc_b=lambda t: 0.97 - 0.11 * t, fused=0.9)
    img = Image.open(curves.plot([write_run(tmp_path, "r", log)], str(tmp_path / "c.png")))
    ys = [y for _, y in pixels(img, PANELS["a"], COLOURS[0])]
    assert max(ys) - min(ys) > 0.5 * (PANELS["a"][3] - PANELS["a"][1])   # 11 points: half the panel
    lo, hi = curves.y_limits("pl_acc", [0.86, 0.97], 5)
    assert hi == 1.0 and 0.8 <= lo <= 0.86                              # 100% on top, round bottom
    assert curves.y_limits("pl_acc", [1.0, 1.0], 5)[0] < 1.0   # all perfect: still an axis
    assert curves.y_limits("pl_cov", [0.1, 0.2], 5) == (0.0, 1.0)         # coverage: all of 0..1


def test_a_supervised_run_in_an_overlay_has_no_pseudo_label_lines(tmp_path):
    runs = [write_run(tmp_path, "supervised", supervised_log()),
            write_run(tmp_path, "co2s", co2s_log())]
    img = Image.open(curves.plot(runs, str(tmp_path / "c.png")))
    sup, co2s = COLOURS[0], COLOURS[1]                                  # a colour per run, in order
    for k in "ab":
        assert not pixels(img, PANELS[k], sup) and pixels(img, PANELS[k], co2s)
    for k in "cd":
        assert pixels(img, PANELS[k], sup) and pixels(img, PANELS[k], co2s)


def test_an_overlay_tells_students_apart_by_line_style(tmp_path):
    log = co2s_log(acc_a=lambda t: 0.8, acc_b=lambda t: 0.45)          # fused is 0.7
    ax = curves.Axes(PANELS["a"], (0, 1), curves.y_limits("pl_acc", [0.8, 0.45, 0.7], 5))

    def inked(img, colour, v):
        """The fraction of the curve's x-span that a horizontal curve at value v inks."""
        y = round(ax.px(0, v)[1])
        xs = {x for x, yy in pixels(img, PANELS["a"], colour) if abs(yy - y) <= 1}
        return len(xs) / (max(xs) - min(xs) + 1)
    runs = [write_run(tmp_path, n, log) for n in ("r1", "r2")]
    two = Image.open(curves.plot(runs, str(tmp_path / "two.png")))
    solid, dashes, dots = (inked(two, COLOURS[1], v) for v in (0.8, 0.45, 0.7))   # r2, on top
    assert solid > 0.95 and 0.5 < dashes < 0.8 and dots < 0.5    # student 1, student 2, fused
    one = Image.open(curves.plot(runs[:1], str(tmp_path / "one.png")))
    assert all(inked(one, COLOURS[k], v) > 0.95 for k, v in ((0, 0.8), (1, 0.45), (2, 0.7)))


def test_a_panel_without_any_data_says_so_and_draws_no_line(tmp_path):
    run = write_run(tmp_path, "supervised", supervised_log())
    img = Image.open(curves.plot([run], str(tmp_path / "c.png")))
    assert not any(pixels(img, PANELS["a"], c) for c in COLOURS[:3])
    l, t, r, b = (int(v) for v in PANELS["a"])
    mid = np.asarray(img.convert("L"))[(t + b) // 2 - 10:(t + b) // 2 + 10, l + 1:r]
    assert mid.min() < 100                                              # the "no data" text


def test_the_overlay_legend_has_one_swatch_per_run(tmp_path):
    runs = [write_run(tmp_path, n, co2s_log()) for n in ("r1", "r2", "r3")]
    img = Image.open(curves.plot(runs, str(tmp_path / "c.png")))
    for c in COLOURS[:3]:
        assert len(pixels(img, LEGEND, c)) == 13 * 13                   # one 13x13 square each
    assert not pixels(img, LEGEND, COLOURS[3])


def test_unsupervised_loss_is_the_E7_weighting_of_the_logged_terms():
    rec = {"a/sup": 0.8, "a/s1": 0.2, "a/s2": 0.4, "a/fp": 0.1, "a/sta": 0.3, "lambda": 0.5}
    rec["a/loss"] = (0.8 + 0.25 * 0.2 + 0.25 * 0.4 + 0.5 * 0.1) / 2 + 0.5 * 0.3   # co2s.py's L_k
    unsup = curves.value(rec, "a", "unsup")
    assert (rec["a/sup"] + unsup) / 2 + rec["lambda"] * rec["a/sta"] == pytest.approx(rec["a/loss"])
    one_view = curves.value({"a/s1": 0.2, "a/fp": 0.1}, "a", "unsup")
    assert one_view == pytest.approx(0.5 * 0.2 + 0.5 * 0.1)
    assert curves.value({"a/sup": 1.0}, "a", "unsup") is None           # supervised: no such curve
    nothing_confident = {"a/pl_acc": 0.0, "a/pl_cov": 0.0}
    assert curves.value(nothing_confident, "a", "pl_acc") is None


def test_dashes_continue_across_a_bend_and_cover_on_over_period():
    def draw(points):
        img = Image.new("L", (120, 20))
        curves.dashed(ImageDraw.Draw(img), points, 255, 1, (12, 7))
        return img
    straight, bent = draw([(0, 10), (100, 10)]), draw([(0, 10), (43, 10), (100, 10)])
    assert (np.asarray(straight) == np.asarray(bent)).all()           # a vertex does not restart it
    lit = (np.asarray(straight) > 0).sum()
    assert 0.55 < lit / 101 < 0.75                                      # about 12 / 19 of it


def test_a_missing_log_is_a_user_error_naming_the_path(tmp_path, capsys):
    missing = str(tmp_path / "not-a-run")
    with pytest.raises(UserError, match="not-a-run"):
        curves.plot([missing], str(tmp_path / "c.png"))
    with pytest.raises(SystemExit) as e:
        errors.cli(lambda: curves.main([missing]))
    assert e.value.code == 2 and os.path.join(missing, "log.jsonl") in capsys.readouterr().err


def test_a_torn_last_line_is_skipped_but_a_corrupt_one_is_an_error(tmp_path):
    run = write_run(tmp_path, "r", co2s_log())
    with open(os.path.join(run, "log.jsonl"), "a") as f:
        f.write('{"type": "train", "st')                                # a run still writing
    assert len(curves.read_log(run)) == len(co2s_log())
    with open(os.path.join(run, "log.jsonl"), "a") as f:
        f.write("\n" + json.dumps(co2s_log()[0]) + "\n")
    with pytest.raises(UserError, match="line 23"):
        curves.read_log(run)


def test_writing_is_atomic(tmp_path, monkeypatch):
    run = write_run(tmp_path, "r", co2s_log())
    out = tmp_path / "pics" / "c.png"
    assert curves.plot([run], str(out)) == str(out)
    assert os.listdir(out.parent) == ["c.png"] and Image.open(out).size == (curves.W, curves.H)
    before = out.read_bytes()

    def broken_save(img, path, format=None):
        open(path, "wb").write(b"half a png")
        raise OSError("disk full")
    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        curves.plot([run], str(out))
    assert out.read_bytes() == before and os.listdir(out.parent) == ["c.png"]   # old file, no .tmp


def test_cli_default_output_is_beside_one_run_or_here_for_several(tmp_path, monkeypatch):
    runs = [write_run(tmp_path, n, co2s_log()) for n in ("r1", "r2")]
    curves.main([runs[0]])
    assert os.path.isfile(os.path.join(runs[0], "curves.png"))
    monkeypatch.chdir(tmp_path)
    curves.main(runs)
    assert os.path.isfile(tmp_path / "curves.png")
