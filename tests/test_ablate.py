"""ablate.py: each row is the train.py run it names; a small table end to end; a rerun reuses finished runs."""

import json
import os

import pytest
from PIL import Image

import train
from plumbing.demo import prepare_demo
from tools import ablate


def cfg_of(row, *extra):
    return train.resolve(train.get_args(["--dataset", "demo", *extra, *ablate.ROWS[row]]))


@pytest.mark.parametrize(
    "row, expected",
    [
        ("supervised", dict(method="supervised")),
        ("unimatch", dict(method="unimatch", stability="grad")),
        (
            "co2s",
            dict(
                method="co2s",
                stability="grad",
                no_fp=False,
                strong_views=2,
                students="clip,dinov3",
                clip_guidance="text",
                fusion="confidence",
            ),
        ),
        ("co2s-released", dict(method="co2s", stability="released")),
        ("no-fp", dict(method="co2s", no_fp=True)),
        ("one-view", dict(method="co2s", strong_views=1)),
        ("clip-queries", dict(method="co2s", clip_guidance="queries", students="clip,dinov3")),
        ("clip+clip", dict(method="co2s", students="clip,clip")),
        ("dinov3+dinov3", dict(method="co2s", students="dinov3,dinov3")),
        ("fusion-mean", dict(method="co2s", fusion="mean")),
    ],
)
def test_each_row_is_the_train_settings_it_names(row, expected):
    cfg = cfg_of(row, "--lr", "3e-4")  # the user's flags pass through; the row's win
    assert {k: cfg[k] for k in expected} == expected and cfg["lr"] == 3e-4
    others = {k: v for k, v in cfg_of("co2s").items() if k not in expected and k != "out"}
    assert all(cfg_of(row)[k] == v for k, v in others.items())  # and nothing else changes


def test_a_small_table_end_to_end_and_a_rerun_reuses_it(tmp_path, capsys, monkeypatch):
    root = str(tmp_path / "demo")
    prepare_demo(root, seed=0, n_train=16, n_val=2)
    argv = [
        "--rows",
        "supervised,co2s",
        "--seeds",
        "1",
        "--iters",
        "2",
        "--out",
        str(tmp_path / "table"),
        "--data-root",
        root,
        "--ratio",
        "1/4",
        "--crop",
        "64",
        "--workers",
        "0",
    ]
    ablate.main(argv)
    md = open(tmp_path / "table" / "table.md").read().splitlines()
    assert (
        md[0]
        == "| row | students | mIoU student 1 | mIoU student 2 | mIoU fused | PL accuracy | PL coverage |"
    )
    assert md[2].startswith("| supervised | clip, dinov3 | ") and md[2].endswith(
        "| - | - |"
    )  # no pseudo-labels
    assert md[3].startswith("| co2s | clip, dinov3 | ") and md[3].count("±") == 5
    results = json.load(open(tmp_path / "table" / "results.json"))
    run = results["runs"]["co2s"][0]
    assert (
        run["how"] == "ran"
        and os.path.isfile(os.path.join(run["run"], "last.pt"))
        and 0 <= run["pl_cov"] <= 1
    )
    assert Image.open(tmp_path / "table" / "chart.png").size[0] > 300
    assert Image.open(tmp_path / "table" / "curves.png").format == "PNG"  # the overlay
    calls = []
    monkeypatch.setattr(train, "main", lambda argv: calls.append(argv))
    ablate.main(argv)  # everything finished: nothing runs again
    assert calls == [] and "reused" in capsys.readouterr().out
    assert (
        json.load(open(tmp_path / "table" / "results.json"))["runs"]["co2s"][0]["how"] == "reused"
    )
    # an interrupted run (its last.pt, but metrics.json not done) is resumed from its own folder
    path = tmp_path / "table" / "co2s" / "seed0" / "metrics.json"
    json.dump(dict(json.load(open(path)), done=False), open(path, "w"))
    ablate.main(argv)
    assert calls == [["--resume", str(tmp_path / "table" / "co2s" / "seed0")]]


def test_the_curves_overlay_is_seed_0_of_each_row_labelled_by_row(tmp_path, monkeypatch):
    runs = {
        row: [dict(run=str(tmp_path / row / f"seed{k}"), seed=k) for k in range(2)]
        for row in ("unimatch", "co2s")
    }
    seen, figure = [], object()
    monkeypatch.setattr(
        ablate, "drift_figure", lambda dirs, labels: seen.append((dirs, labels)) or figure
    )
    monkeypatch.setattr(ablate, "save", lambda fig, path: seen.append((fig, path)))
    ablate.overlay(runs, "curves.png")
    assert seen == [
        (
            [str(tmp_path / "unimatch" / "seed0"), str(tmp_path / "co2s" / "seed0")],
            ["unimatch", "co2s"],
        ),
        (figure, "curves.png"),
    ]
