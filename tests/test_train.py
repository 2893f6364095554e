"""train.py end to end at micro size: run folder, resume, DDP (gloo), errors, optimizer groups."""

import json
import os
import re
import subprocess
import sys
import types

import helpers
import numpy as np
import pytest
import torch
from PIL import Image
from toy_data import custom_root

import model as text
import train
from plumbing import catalog, recipes, runs
from plumbing.batches import BatchLayout
from plumbing.errors import UserError, cli
from plumbing.weights import DEFAULT_WEIGHTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bad_label_value(root):
    Image.fromarray(np.full((64, 64), 9, np.uint8)).save(os.path.join(root, "labels", "03.png"))
    return "03.png"


def truncate_image(root, split="train"):
    name = "11.png" if split == "val" else "04.png"
    path = os.path.join(root, "images", name)
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])
    return name


def resize_label(root):
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(os.path.join(root, "labels", "05.png"))
    return "05.png"


def npy(path, shape):
    np.save(path, np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    return str(path)


def micro_args(root, out, *extra):
    return helpers.micro_args(root, out, "--log-every", "1", *extra)


def custom_flags(data_root, *extra):
    """The flags of a tiny-size run on the custom dataset in `data_root` (toy_data.custom_root)."""
    return ["--dataset", "custom", "--size", "tiny", "--data-root", data_root, *extra]


def weights(run):
    return torch.load(os.path.join(run, "last.pt"), map_location="cpu", weights_only=False)


def test_run_folder_has_every_file(micro_root, tmp_path):
    out = tmp_path / "run"
    train.main(micro_args(micro_root, out, "--iters", "3"))
    for name in (
        "config.json",
        "log.jsonl",
        "last.pt",
        "best.pt",
        "metrics.json",
        "splits/labeled.txt",
        "splits/unlabeled.txt",
        "splits/val.txt",
    ):
        assert (out / name).is_file(), name
    cfg = json.load(open(out / "config.json"))
    assert (
        cfg["size"] == "tiny"
        and cfg["tau"] == 0.95
        and cfg["versions"]["torch"] == torch.__version__
    )
    metrics = json.load(open(out / "metrics.json"))
    assert set(metrics["last"]["results"]) == {"clip", "dinov3", "fused"}
    assert set(metrics["last"]["results"]["fused"]["iou"]) == set(catalog.DATASETS["demo"].classes)
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    train_recs = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3]
    for key in (
        "clip/sup",
        "clip/s1",
        "clip/s2",
        "clip/fp",
        "clip/sta",
        "dinov3/sta",
        "lambda",
        "clip/conf_ratio",
        "fused/pl_acc",
        "fused/pl_cov",
        "lr/clip.backbone",
        "lr/clip.head",
        "step_s",
    ):
        assert key in train_recs[-1], key
    assert any(r["type"] == "eval" for r in records)
    # the lists written into the run folder are exactly the ones used (4 = floor(16 / 4) labelled)
    assert len(open(out / "splits/labeled.txt").read().split("\n")) - 1 == 4


def test_resume_matches_uninterrupted_run(micro_root, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    train.main(micro_args(micro_root, full, "--iters", "5"))
    train.main(micro_args(micro_root, split, "--iters", "5", "--stop-at", "2"))
    assert weights(split)["step"] == 2
    train.main(["--resume", str(split)])
    a, b = weights(full), weights(split)
    assert a["step"] == b["step"] == 5
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ma, mb = json.load(open(full / "metrics.json")), json.load(open(split / "metrics.json"))
    assert ma["last"]["results"] == mb["last"]["results"]
    la = [json.loads(x) for x in open(full / "log.jsonl")]
    lb = [json.loads(x) for x in open(split / "log.jsonl")]
    drop = lambda r: {k: v for k, v in r.items() if k != "step_s"}
    assert [drop(r) for r in la] == [drop(r) for r in lb]  # same losses at every step
    # --log-every 2: each record is the mean of the steps since the last one (steps 1-2, 3-4, then 5)
    train.main(micro_args(micro_root, tmp_path / "every2", "--iters", "5", "--log-every", "2"))
    l2 = [json.loads(x) for x in open(tmp_path / "every2" / "log.jsonl") if '"train"' in x]
    la = [r for r in la if r["type"] == "train"]
    assert [r["step"] for r in l2] == [2, 4, 5]
    # The steps' losses are the same bits in both runs (the records above are equal); the records
    # are rounded to 5 decimals, so the mean of two rounded values and the rounded mean differ by
    # at most 0.5e-5 + 0.5e-5 (+ fp32 rounding of the mean, 2e-7): 2e-5 is twice that, not a fit.
    for rec, steps in zip(l2, ([0, 1], [2, 3], [4])):
        for k in ("clip/sup", "dinov3/loss", "clip/s1"):
            assert rec[k] == pytest.approx(sum(la[i][k] for i in steps) / len(steps), abs=2e-5), (
                rec["step"],
                k,
            )


def test_param_groups_and_poly_lr():
    """The paper's groups (METHOD.md section 5): attention x0.01, head x10, queries x1 of lr 1e-4."""
    cfg = train.resolve(
        train.get_args(
            ["--dataset", "potsdam", "--size", "tiny", "--dinov3-weights", "some/folder"]
        )
    )
    assert (cfg["crop"], cfg["epochs"], cfg["batch"], cfg["tau"]) == (
        512,
        80,
        4,
        0.95,
    )  # global batch 4
    whdld = train.resolve(train.get_args(["--dataset", "whdld"]))
    assert (whdld["batch"], whdld["crop"]) == (8, 256)  # the release's 4 GPUs x 2
    assert cfg["hyper"].startswith("paper")  # a pretrained student: the paper's recipe
    hyper = {k: cfg[k] for k in train.HYPER}
    s = helpers.student("dinov3", 6, size="tiny")
    groups = {g["name"]: g for g in train.param_groups(s, **hyper)}
    assert groups["dinov3.backbone"]["lr"] == pytest.approx(1e-6)
    assert groups["dinov3.head"]["lr"] == pytest.approx(1e-3)
    assert groups["dinov3.queries"]["lr"] == pytest.approx(1e-4)
    n_trainable = sum(p.numel() for p in s.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == n_trainable
    assert (
        train.poly(51, 100) == pytest.approx(0.5**0.9)
        and train.poly(0, 100) == train.poly(1, 100) == 1
    )
    demo = train.resolve(
        train.get_args([])
    )  # random students: the from-scratch recipe, flags still win
    assert (demo["lr"], demo["backbone_lr_mult"], demo["head_lr_mult"], demo["size"]) == (
        5e-4,
        0.5,
        1.0,
        "tiny",
    )
    assert demo["train_backbone"] == "all"  # random weights: the whole backbone learns
    assert demo["hyper"].startswith("scratch")
    assert train.resolve(train.get_args(["--lr", "1e-4"]))["lr"] == 1e-4
    tiny = train.resolve(
        train.get_args(["--dataset", "potsdam", "--size", "tiny"])
    )  # any dataset, random students
    assert tiny["lr"] == 5e-4 and tiny["hyper"].startswith("scratch")
    paper = train.resolve(train.get_args(["--dataset", "potsdam"]))  # base: pretrained by default
    assert paper["lr"] == 1e-4 and paper["train_backbone"] == "attention"
    assert (
        train.resolve(train.get_args(["--train-backbone", "attention"]))["train_backbone"]
        == "attention"
    )
    released = train.resolve(
        train.get_args(["--dataset", "potsdam", "--dinov3-weights", "release-init"])
    )
    assert released["hyper"].startswith("paper") and released["train_backbone"] == "attention"
    s = helpers.student("dinov3", 6, size="tiny", train_backbone="all")
    assert all(p.requires_grad for p in s.backbone.parameters())


def test_a_random_clip_student_gets_the_stand_in_class_embeddings_on_any_dataset(
    micro_root, tmp_path, capsys
):
    """A random text tower gives near-identical class embeddings; a CLIP student without weights reads
    fixed, well-separated stand-in rows instead, on every dataset, and the run says so once."""
    train.main(
        micro_args(
            micro_root,
            tmp_path / "r",
            "--iters",
            "1",
            "--dataset",
            "custom",
            "--size",
            "tiny",
            "--data-root",
            custom_root(tmp_path / "c"),
        )
    )
    out = capsys.readouterr().out
    assert out.count("CLIP class embeddings: stand-in") == 1
    cfg = json.load(open(tmp_path / "r" / "config.json"))
    assert cfg["text_source"].startswith("stand-in") and cfg["hyper"].startswith("scratch")
    clip = torch.load(tmp_path / "r" / "last.pt", weights_only=False)["model"]["students.0.text"]
    assert torch.equal(clip, text.stand_in_embeddings(5, 128))
    # a user's own (missing) file is an error, never silently replaced by the stand-in
    with pytest.raises(UserError, match="mine.npy"):
        train.main(
            micro_args(
                micro_root,
                tmp_path / "r2",
                "--iters",
                "1",
                "--text-embeddings",
                str(tmp_path / "mine.npy"),
            )
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "potsdm"], "valid: potsdam"),
        (["--students", "clip,resnet"], "one or two of clip, dinov3"),
        (["--best-by", "dinov3"], "valid for these students: clip1, clip2, fused"),
        (["--method", "fixmatch"], "invalid choice"),
    ],
)
def test_bad_flags_are_clear(argv, message, capsys):
    if argv[0] == "--best-by":
        argv = ["--students", "clip,clip"] + argv
    with pytest.raises(SystemExit):
        train.get_args(argv)
    assert message in capsys.readouterr().err


def test_help_shows_no_none_defaults(capsys):
    with pytest.raises(SystemExit):
        train.get_args(["--help"])
    out = capsys.readouterr().out
    assert "default: None" not in out and "default: 0.95" in out


def user_error(main, argv, capsys):
    """What a user sees from the command line: exit status 2, one message, no traceback."""
    with pytest.raises(SystemExit) as e:
        cli(lambda: main(argv))
    err = capsys.readouterr().err
    lines = [
        line for line in re.split(r"[\r\n]", err) if line.strip()
    ]  # progress bars rewrite their line with \r
    assert e.value.code == 2 and "Traceback" not in err and lines[-1].startswith("error: "), err
    assert sum("error" in line for line in lines) == 1, err
    return lines[-1]


def test_user_mistakes_exit_2_with_one_message_and_no_traceback(micro_root, tmp_path, capsys):
    root = custom_root(tmp_path / "c")
    run = lambda *extra: micro_args(micro_root, tmp_path / "r", "--iters", "1", *extra)
    err = user_error(
        train.main, run("--dataset", "potsdam", "--data-root", str(tmp_path / "no-such")), capsys
    )
    assert "no-such" in err and "python -m tools.download potsdam" in err
    assert "they have: 1/32, 1/24, 1/16, 1/8, 1/4" in user_error(
        train.main, run("--dataset", "potsdam", "--ratio", "1/2", "--data-root", root), capsys
    )
    assert "no last.pt" in user_error(train.main, ["--resume", str(tmp_path)], capsys)
    assert "shape (3, 7), expected (5, 128)" in user_error(
        train.main,
        run(*custom_flags(root, "--text-embeddings", npy(tmp_path / "t.npy", (3, 7)))),
        capsys,
    )
    # bad files: each is found by the scan before the first step, and named
    for damage, message in (
        (bad_label_value, "value(s) [9]"),
        (truncate_image, "cannot read image"),
        (resize_label, "size mismatch"),
    ):
        broken = custom_root(tmp_path / damage.__name__)
        name = damage(broken)
        err = user_error(
            train.main,
            run(*custom_flags(broken, "--out", str(tmp_path / damage.__name__ / "run"))),
            capsys,
        )
        assert message in err and name in err, err
        assert not os.path.exists(
            tmp_path / damage.__name__ / "run" / "log.jsonl"
        )  # stopped before any step


def test_eval_of_a_missing_checkpoint_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "eval.py"), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "run" in proc.stderr


def test_a_corrupt_val_image_stops_the_cli_in_seconds_with_exit_2(micro_root, tmp_path):
    """A bad validation file is found before training (not at the first evaluation an epoch later)."""
    root = custom_root(tmp_path / "c")
    name = truncate_image(root, split="val")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            *micro_args(micro_root, tmp_path / "r", *custom_flags(root)),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and name in proc.stderr, (
        proc.stderr[-2000:]
    )
    assert not os.path.exists(tmp_path / "r" / "log.jsonl")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(micro_root, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match="non-finite loss"):
        train.main(
            micro_args(
                micro_root,
                out,
                "--iters",
                "6",
                "--save-every",
                "1",
                "--lr",
                "1e30",
                "--students",
                "dinov3",
                "--best-by",
                "dinov3",
            )
        )
    state = weights(out)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def torchrun(port, *argv):
    """train.py under a 2-process torchrun (gloo), one thread each, run to its end; the process."""
    cmd, env = helpers.torchrun_cmd(port, *argv), dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_torchrun_two_processes_gloo(micro_root, tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun(29517, *micro_args(micro_root, out, "--iters", "2", "--mix-source", "rolled"))
    cfg = json.load(open(out / "config.json"))
    assert cfg["world_size"] == 2
    metrics = json.load(open(out / "metrics.json"))
    assert set(metrics["last"]["results"]) == {"clip", "dinov3", "fused"}
    # 2 val tiles split over 2 ranks, then all-reduced: every val pixel is counted once
    assert metrics["last"]["results"]["fused"]["pixels"] == 2 * 128 * 128
    assert proc.stdout.count("run folder:") == 2  # only rank 0 prints (start and end)


def assert_within_the_floor(a, b, c, what):
    """Each weight tensor of a and b equal within 10x the noise floor |c - b| (c: b's run at another
    thread count; helpers.floor_bound, at least 4 fp32 eps of the tensor's size)."""
    margins = {}
    for k in a:
        x, y, floor = a[k].double(), b[k].double(), (c[k].double() - b[k].double()).abs().max()
        diff = (x - y).abs().max().item()  # 0 for a tensor of zeros on both sides
        margins[k] = diff and diff / helpers.floor_bound(floor, y.abs().max())
    worst = max(margins, key=margins.get)
    print(f"margin {what}: {margins[worst]:.2e} of its bound ({worst})")
    assert margins[worst] < 1, worst


def two_processes_and_one(root, ddp, single, port, *args, single_extra=()):
    """The same train.py flags under torchrun with 2 processes (gloo) and on this process (plus
    single_extra), both at one thread, so that their reductions round alike; the two last.pt."""
    torchrun(port, *micro_args(root, ddp, *args))
    helpers.at_threads(1, train.main, micro_args(root, single, *args, *single_extra))
    return weights(ddp)["model"], weights(single)["model"]


def test_accum_on_one_process_is_the_two_process_run(micro_root, tmp_path):
    """A global batch of 2 as --accum 2 on one process = 2 processes x 1 (gloo): same samples, same order,
    same dropout draws, gradients averaged: the same weights after a few steps."""
    ddp, accum = tmp_path / "ddp", tmp_path / "accum"
    common = ["--iters", "3", "--batch", "2", "--eval-every", "100", "--students", "clip,dinov3"]
    a, b = two_processes_and_one(
        micro_root, ddp, accum, 29519, *common, single_extra=["--accum", "2"]
    )
    # This goes through train.py's fp32 data pipeline, so it stays in fp32 against a noise floor
    # measured per weight tensor: the same --accum run at another thread count (helpers.floor_bound:
    # 10x the floor, at least 4 fp32 eps). Per tensor, as AdamW divides by sqrt(v): a gradient that
    # is rounding noise (zero in exact arithmetic) still moves its weight by up to lr a step, and
    # the floor measures that too.
    other = tmp_path / "accum_threads"
    helpers.at_threads(2, train.main, micro_args(micro_root, other, *common, "--accum", "2"))
    assert_within_the_floor(a, b, weights(other)["model"], "--accum vs 2 processes")
    torch.manual_seed(0)  # the start both runs shared: the steps did move the weights
    start = train.new_model(
        train.resolve(train.get_args(micro_args(micro_root, accum, *common))),
        catalog.DATASETS["demo"],
    )[0].state_dict()
    assert torch.equal(start["students.0.text"], a["students.0.text"])
    moved = [k for k in start if not torch.allclose(start[k], a[k])]
    assert len(moved) > 50 and any(
        ".mlp." in k for k in moved
    )  # random students: the whole backbone trains


# ----------------------------------------------------------------------------- --recipe


# Each difference of METHOD.md section 7: (the value its flag had before --recipe, the release's).
SWITCHES = dict(
    stability=("grad", "released"),
    dinov3_weights=(DEFAULT_WEIGHTS["dinov3"], "release-init"),
    numerics=("hf", "release"),
    amp=("auto", "off"),
    mix_source=("partner", "same"),
    accum=(1, 4),
    data_order=("own", "shared"),
    round_iters=(False, True),
    best_per_student=(False, True),
)
OLD_DEFAULTS = {k: old for k, (old, _) in SWITCHES.items()}
RELEASED = {k: new for k, (_, new) in SWITCHES.items()}


def resolved(*argv, world=1):
    return train.resolve(train.get_args(["--dataset", "potsdam", *argv]), world=world)


def test_the_paper_recipe_is_the_old_defaults_and_the_release_sets_every_switch():
    """--recipe paper (the default) keeps every value the flags had before --recipe; release sets
    each difference of METHOD.md section 7 at once and config.json records them."""
    paper = resolved()
    assert {k: paper[k] for k in OLD_DEFAULTS} == OLD_DEFAULTS and paper["recipe_switches"] == {}
    release = resolved("--recipe", "release")
    assert {k: release[k] for k in RELEASED} == RELEASED == release["recipe_switches"]
    assert release["recipe_overrides"] == {} and set(RELEASED) == set(recipes.RELEASE)
    # their 4 processes: 2 x --accum 2 under a 2-process torchrun; the demo's batch of 2: 2 x 1
    assert resolved("--recipe", "release", world=2)["accum"] == 2
    assert train.resolve(train.get_args(["--recipe", "release"]))["accum"] == 2


def test_a_single_flag_overrides_the_recipe_and_says_so():
    cfg = resolved(
        "--recipe", "release", "--amp", "bf16", "--stability", "grad", "--no-best-per-student"
    )
    assert (cfg["amp"], cfg["stability"], cfg["best_per_student"]) == ("bf16", "grad", False)
    assert cfg["recipe_overrides"] == dict(amp="bf16", stability="grad", best_per_student=False)
    assert cfg["numerics"] == "release" and cfg["data_order"] == "shared"  # the rest: the recipe's
    summary = recipes.summary(cfg)
    assert "--amp off" in summary and "overridden here: --amp bf16" in summary
    assert "overridden here: --no-best-per-student" in summary
    # on the paper's recipe one flag switches one difference, and nothing else
    one = resolved("--mix-source", "same")
    assert one["mix_source"] == "same" and one["stability"] == "grad" and one["accum"] == 1


def test_the_release_rounds_iters_up_to_whole_epochs():
    """Co2S.py l.243-247: epochs = ceil(iters / steps per epoch), then whole epochs."""
    layout, n = BatchLayout(4), 4617  # potsdam 1/16: 1,155 steps per epoch
    cfg = dict(iters=1000, epochs=80, round_iters=True)
    assert (
        train.schedule(cfg, layout, n)["total_iters"],
        train.schedule(cfg, layout, n)["epochs"],
    ) == (1155, 1)
    assert train.schedule(dict(cfg, iters=1156), layout, n)["total_iters"] == 2310
    assert train.schedule(dict(cfg, round_iters=False), layout, n)["total_iters"] == 1000
    assert train.schedule(dict(cfg, iters=None), layout, n)["total_iters"] == 80 * 1155


def test_stop_at_0_with_the_release_recipe_prints_and_records_each_switch(
    micro_root, tmp_path, capsys
):
    out = tmp_path / "r"
    train.main(micro_args(micro_root, out, "--recipe", "release", "--stop-at", "0"))
    printed = capsys.readouterr().out
    cfg = json.load(open(out / "config.json"))
    assert cfg["recipe"] == "release" and set(cfg["recipe_switches"]) == set(recipes.RELEASE)
    assert "recipe: release" in printed
    for k, v in cfg["recipe_switches"].items():
        assert cfg[k] == v and f"{recipes.as_flag(k, v)} " in printed, k
    assert "--accum 2 " in printed and "--round-iters " in printed  # the demo's batch of 2


def test_the_release_keeps_each_students_best_on_its_own_miou(monkeypatch, tmp_path):
    """best_<student>.pt follows that student's own mIoU (the release has no fusion), best.pt the
    fused one; without --best-per-student only best.pt is written."""
    saved = []
    monkeypatch.setattr(
        runs,
        "save_checkpoint",
        lambda run, path, **kw: saved.append((os.path.basename(path), run.step)),
    )
    students = [types.SimpleNamespace(name="clip"), types.SimpleNamespace(name="dinov3")]
    evals = [(0.5, 0.2, 0.4), (0.4, 0.3, 0.45), (0.6, 0.1, 0.3)]  # clip, dinov3, fused mIoU
    for per_student in (True, False):
        saved.clear()
        run = runs.Run({}, None, types.SimpleNamespace(students=students))
        cfg = dict(out=str(tmp_path), best_by="fused", best_per_student=per_student)
        loop = types.SimpleNamespace(run=run, cfg=cfg, epoch=float, total_steps=9)
        for step, mious in enumerate(evals, 1):
            run.step = step
            result = {n: {"miou": m} for n, m in zip(("clip", "dinov3", "fused"), mious)}
            train.keep_best(loop, result)
        if per_student:
            assert saved == [
                ("best.pt", 1), ("best_clip.pt", 1), ("best_dinov3.pt", 1),
                ("best.pt", 2), ("best_dinov3.pt", 2), ("best_clip.pt", 3),
            ]  # fmt: skip
            each = json.load(open(tmp_path / "metrics.json"))["best"]["each"]
            assert each == {"clip": dict(miou=0.6, step=3), "dinov3": dict(miou=0.3, step=2)}
        else:
            assert saved == [("best.pt", 1), ("best.pt", 2)] and "each" not in run.best


def test_the_release_recipe_on_one_process_is_its_own_two_process_run(micro_root, tmp_path):
    """--recipe release makes the global batch its 4 processes as far as it splits: a batch of 2 is
    --accum 2 on one process, and 1 per process under a 2-process torchrun; the two are the same
    run (shared order, same-image partners, released E8, the release's numerics and DINOv3): the
    same weights; each keeps best_<student>.pt."""
    ddp, accum = tmp_path / "ddp", tmp_path / "accum"
    common = ["--iters", "3", "--no-round-iters", "--batch", "2", "--eval-every", "100"]
    a, b = two_processes_and_one(micro_root, ddp, accum, 29521, *common, "--recipe", "release")
    other = tmp_path / "accum_threads"  # the noise floor: the one-process run at 2 threads
    helpers.at_threads(2, train.main, micro_args(micro_root, other, *common, "--recipe", "release"))
    assert_within_the_floor(a, b, weights(other)["model"], "--recipe release vs 2 processes")
    for run, (world, accum_) in ((ddp, (2, 1)), (accum, (1, 2))):
        cfg = json.load(open(run / "config.json"))
        assert (cfg["world_size"], cfg["accum"], cfg["data_order"]) == (world, accum_, "shared")
        assert (run / "best_clip.pt").is_file() and (run / "best_dinov3.pt").is_file()


def test_config_starts_a_new_run_with_the_settings_of_a_saved_one(micro_root, tmp_path):
    """train.py --config RUN/config.json (or RUN, or an exported model) is that run's config again
    in a new run folder; flags given override it."""
    first = tmp_path / "first"
    flags = ("--recipe", "release", "--amp", "bf16", "--tau", "0.9", "--seed", "3")
    train.main(micro_args(micro_root, first, *flags, "--stop-at", "0"))
    fresh = ("out", "command", "config", "versions", "git")
    same = lambda c: {k: v for k, v in c.items() if k not in fresh}
    a = json.load(open(first / "config.json"))
    for i, source in enumerate((first / "config.json", first)):
        again = tmp_path / f"again{i}"
        train.main(["--config", str(source), "--out", str(again), "--stop-at", "0"])
        b = json.load(open(again / "config.json"))
        assert same(a) == same(b) and b["config"] == str(source) and b["out"] == str(again)
    train.main(
        ["--config", str(first), "--out", str(tmp_path / "c"), "--tau", "0.8", "--stop-at", "0"]
    )
    c = json.load(open(tmp_path / "c" / "config.json"))
    assert {k for k in same(a) if a[k] != c[k]} == {"tau"} and c["recipe_overrides"] == {
        "amp": "bf16"
    }
    # an exported model: its settings, its own split lists, the data where the flags say
    from tools.export import PATHS, export

    trained = tmp_path / "trained"
    train.main(micro_args(micro_root, trained, *flags, "--iters", "1", "--no-round-iters"))
    folder = export(runs.resolve_checkpoint(str(trained)), str(tmp_path / "export"))
    out = tmp_path / "from-export"
    train.main(["--config", folder, "--data-root", micro_root, "--out", str(out), "--stop-at", "0"])
    d, e = (json.load(open(f / "config.json")) for f in (trained, out))
    differ = {k for k in d if d[k] != e.get(k)} - set(PATHS) - set(fresh) - {"stop_at"}
    assert differ == {"splits_source"} and e["splits"] == os.path.join(folder, "splits")
    assert (
        open(out / "splits" / "labeled.txt").read()
        == open(trained / "splits" / "labeled.txt").read()
    )
    (tmp_path / "other.json").write_text('{"step": 3}')
    with pytest.raises(UserError, match="neither the config.json"):
        train.get_args(["--config", str(tmp_path / "other.json")])
