"""train.py end to end at micro size: run folder, resume, DDP (gloo), errors, optimizer groups."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import train
from demo import demo_text_embeddings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def micro_root(tmp_path_factory):
    """A micro demo dataset: 16 training tiles, 2 val tiles (same generator as `python train.py`)."""
    root = str(tmp_path_factory.mktemp("demo"))
    data.prepare_demo(root, seed=0, n_train=16, n_val=2)
    return root


def micro_args(root, out, *extra):
    return ["--data-root", root, "--out", str(out), "--ratio", "1/4", "--crop", "64", "--batch", "2",
            "--workers", "0", "--log-every", "1", *extra]


def weights(run):
    return torch.load(os.path.join(run, "last.pt"), map_location="cpu", weights_only=False)


def test_run_folder_has_every_file(micro_root, tmp_path):
    out = tmp_path / "run"
    train.main(micro_args(micro_root, out, "--iters", "3"))
    for name in ("config.json", "log.jsonl", "last.pt", "best.pt", "metrics.json",
                 "splits/labeled.txt", "splits/unlabeled.txt", "splits/val.txt"):
        assert (out / name).is_file(), name
    cfg = json.load(open(out / "config.json"))
    assert cfg["size"] == "tiny" and cfg["tau"] == 0.95 and cfg["versions"]["torch"] == torch.__version__
    metrics = json.load(open(out / "metrics.json"))
    assert set(metrics["last"]["results"]) == {"clip", "dinov3", "fused"}
    assert set(metrics["last"]["results"]["fused"]["iou"]) == set(data.DATASETS["demo"].classes)
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    train_recs = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3]
    for key in ("clip/sup", "clip/s1", "clip/s2", "clip/fp", "clip/sta", "dinov3/sta", "lambda",
                "clip/conf_ratio", "fused/pl_acc", "fused/pl_cov", "lr", "step_s"):
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


def test_param_groups_and_poly_lr():
    """The paper's groups (METHOD.md section 5): attention x0.01, head x10, queries x1 of lr 1e-4."""
    args = train.get_args(["--dataset", "potsdam", "--size", "tiny"])
    cfg, info = train.resolve(args)
    assert (cfg["crop"], cfg["epochs"], cfg["batch"], cfg["tau"]) == (512, 80, 1, 0.95)
    model = train.build_model(cfg, info)
    groups = {g["name"]: g for g in train.param_groups(model.students[1], cfg)}
    assert groups["dinov3.backbone.attention"]["lr"] == pytest.approx(1e-6)
    assert groups["dinov3.head"]["lr"] == pytest.approx(1e-3)
    assert groups["dinov3.queries"]["lr"] == pytest.approx(1e-4)
    n_trainable = sum(p.numel() for p in model.students[1].parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == n_trainable
    opt = torch.optim.AdamW(list(groups.values()))
    train.set_lr([opt], 50, 100)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-3 * 0.5 ** 0.9)
    demo, _ = train.resolve(train.get_args([]))  # the demo's own recipe (random-init students), flags still win
    assert (demo["lr"], demo["backbone_lr_mult"], demo["head_lr_mult"], demo["size"]) == (5e-4, 0.5, 1.0, "tiny")
    assert train.resolve(train.get_args(["--lr", "1e-4"]))[0]["lr"] == 1e-4


def test_demo_clip_student_reads_separated_class_embeddings(micro_root, tmp_path):
    """A random text tower gives near-identical class embeddings; the demo's random CLIP student reads
    fixed, well-separated ones instead, and only when no real CLIP weights or queries are asked for."""
    cfg, info = train.resolve(train.get_args(["--data-root", micro_root]))
    assert cfg["text_embeddings"] == os.path.join(micro_root, "text_embeddings_128d.npy")
    path = demo_text_embeddings(str(tmp_path / "t.npy"), 6, 128)
    t = torch.from_numpy(np.load(path))
    assert torch.allclose(t.norm(dim=1), torch.ones(6), atol=1e-5)
    assert (t @ t.T - torch.eye(6)).abs().max() < 0.4  # distinct directions (a random tower: > 0.9)
    assert torch.equal(torch.from_numpy(np.load(demo_text_embeddings(str(tmp_path / "u.npy"), 6, 128))), t)
    demo_text_embeddings(cfg["text_embeddings"], 6, 128)  # as train.main does (once; later calls read it)
    model = train.build_model(cfg, info)
    assert torch.allclose(model.students[0].text, torch.from_numpy(np.load(cfg["text_embeddings"])))
    for flags in (["--clip-guidance", "queries"], ["--clip-weights", "some/clip-folder"], ["--dataset", "potsdam"]):
        assert train.resolve(train.get_args(flags))[0]["text_embeddings"] is None, flags
    # a user's own (missing) file is an error, never silently replaced by the demo's stand-in
    with pytest.raises(FileNotFoundError, match="mine.npy"):
        train.main(micro_args(micro_root, tmp_path / "r", "--iters", "1", "--text-embeddings", str(tmp_path / "mine.npy")))
    assert not (tmp_path / "mine.npy").exists()


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "potsdm"], "valid: potsdam"),
    (["--students", "clip,resnet"], "one or two of clip, dinov3"),
    (["--best-by", "dinov3"], "valid for these students: clip1, clip2, fused"),
    (["--method", "fixmatch"], "invalid choice"),
])
def test_bad_flags_are_clear(argv, message, capsys):
    if argv[0] == "--best-by":
        argv = ["--students", "clip,clip"] + argv
    with pytest.raises(SystemExit):
        train.get_args(argv)
    assert message in capsys.readouterr().err


def test_resume_without_checkpoint_is_clear(tmp_path):
    with pytest.raises(SystemExit, match="no last.pt"):
        train.main(["--resume", str(tmp_path)])


def test_bad_ratio_names_valid_forms(micro_root, tmp_path):
    with pytest.raises(ValueError, match="1/16"):
        train.main(micro_args(micro_root, tmp_path / "r", "--ratio", "one-sixteenth"))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(micro_root, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match="non-finite loss"):
        train.main(micro_args(micro_root, out, "--iters", "6", "--save-every", "1", "--lr", "1e30",
                              "--students", "dinov3", "--best-by", "dinov3"))
    state = weights(out)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_torchrun_two_processes_gloo(micro_root, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           os.path.join(ROOT, "train.py"), *micro_args(micro_root, out, "--iters", "2", "--mix-source", "rolled")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.load(open(out / "config.json"))
    assert cfg["world_size"] == 2
    metrics = json.load(open(out / "metrics.json"))
    assert set(metrics["last"]["results"]) == {"clip", "dinov3", "fused"}
    # 2 val tiles split over 2 ranks, then all-reduced: every val pixel is counted once
    assert metrics["last"]["results"]["fused"]["pixels"] == 2 * 128 * 128
    assert proc.stdout.count("run folder:") == 2  # only rank 0 prints (start and end)
