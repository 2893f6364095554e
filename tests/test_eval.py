"""eval.py: confusion-matrix mIoU, the sliding window, E10 fusion after it, folder prediction, CLI errors."""

import copy
import json
import math
import os
import types

import helpers
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import student as build_student
from PIL import Image

import data
import eval as ev
from model import Co2S, stand_in_embeddings
from plumbing import catalog
from plumbing.errors import UserError, cli

CLASSES = ["a", "b", "c", "d"]
PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


class Local(nn.Module):
    """A fake student whose logits at a pixel depend only on that pixel: windows must agree where they overlap."""

    def __init__(self, name="local", n=3):
        super().__init__()
        self.name, self.n, self.calls = name, n, []

    def class_embeddings(self):
        return torch.zeros(self.n, 1)

    def forward(self, x):
        self.calls.append(tuple(x.shape[-2:]))
        return torch.stack(
            [x[:, 0] * (k + 1) + x[:, 1].sin() * k - x[:, 2] for k in range(self.n)], 1
        )


class Fixed(nn.Module):
    """A fake student predicting the same logit map (N, H, W) for every input of that size."""

    def __init__(self, name, logits):
        super().__init__()
        self.name, self.logits = name, logits

    def class_embeddings(self):
        return torch.zeros(len(self.logits), 1)

    def forward(self, x):
        return self.logits[None].expand(len(x), -1, -1, -1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_student("dinov3", 6, size="tiny").eval()


# ---------------------------------------------------------------------------------------------
# ConfusionMatrix


def test_confusion_matrix_hand_computed_miou():
    cm = ev.ConfusionMatrix(4)
    label = torch.tensor([[0, 0, 0, 1, 1, 255, 255, 2]])
    pred = torch.tensor([[0, 0, 1, 1, 2, 3, 0, 2]])
    # two updates accumulate like one (mIoU over the whole split, not per image)
    cm.update(pred[:, :4], label[:, :4])
    cm.update(pred[:, 4:], label[:, 4:])
    # ignore pixels (255) do not count, whatever was predicted there (3 and 0)
    assert cm.mat.sum() == 6 and cm.mat[3].sum() == 0 and cm.mat[:, 3].sum() == 0
    # class 0: TP 2, FN 1 (-> 1), FP 0 -> 2/3; class 1: TP 1, FP 1, FN 1 -> 1/3; class 2: TP 1, FP 1 -> 1/2
    # class 3: absent from labels and predictions: IoU NaN (shown '-'); the release's mIoU counts it as 0,
    # miou_present leaves it out (mmseg's nanmean)
    iou = cm.iou()
    assert torch.allclose(iou[:3], torch.tensor([2 / 3, 1 / 3, 1 / 2], dtype=torch.float64))
    assert math.isnan(iou[3])
    assert cm.miou() == pytest.approx((2 / 3 + 1 / 3 + 1 / 2 + 0) / 4)
    assert cm.miou_present() == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    assert cm.acc() == pytest.approx(4 / 6)
    d = cm.to_dict(CLASSES)
    assert d["iou"]["d"] is None and d["iou"]["a"] == pytest.approx(2 / 3) and d["pixels"] == 6
    assert d["miou"] == pytest.approx(0.375) and d["miou_present"] == pytest.approx(
        0.5
    )  # fractions (train prints %)
    json.dumps(d)  # JSON-safe (no NaN for the absent class)
    table = ev.format_table({"IoU": cm}, CLASSES)
    assert (
        "37.50" in table
        and "66.67" in table
        and "mIoU present" in table
        and "50.00" in table
        and "aAcc" in table
    )
    full = ev.ConfusionMatrix(2)
    full.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert "mIoU present" not in ev.format_table(
        {"IoU": full}, ["a", "b"]
    )  # shown only when it differs


def test_confusion_matrix_predicted_but_absent_class_counts_zero():
    cm = ev.ConfusionMatrix(3)
    cm.update(
        torch.tensor([0, 2]), torch.tensor([0, 0])
    )  # class 2 predicted, never labelled: a false positive
    assert cm.iou()[2] == 0 and cm.miou_present() == pytest.approx(
        (0.5 + 0) / 2
    )  # class 1 NaN, class 2 counts as 0
    assert cm.miou() == pytest.approx((0.5 + 0 + 0) / 3)  # the release: class 1 counts 0 too


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="255"):
        ev.ConfusionMatrix(3).update(torch.tensor([0, 1]), torch.tensor([0, 7]))


# ---------------------------------------------------------------------------------------------
# Sliding window


def test_sliding_window_small_image_is_one_forward(tiny):
    img = torch.randn(1, 3, 96, 96)  # a multiple of 16, smaller than the crop
    with torch.no_grad():
        assert torch.equal(ev.sliding_window(tiny, img, crop=128), tiny(img))


def test_sliding_window_pads_to_16_with_black_and_crops_back(tiny):
    """In float64 (helpers.F64_BOUND): pad16 pads x - black with 0 and adds black back, which
    rounds x, and the student sums a padded window otherwise than the test's padded image."""
    tiny = helpers.float64(copy.deepcopy(tiny))
    img = torch.randn(1, 3, 100, 120, dtype=torch.float64)  # one forward on 112x128, black padding
    black = torch.tensor(
        [-m / s for m, s in zip(data.IMAGENET_MEAN, data.IMAGENET_STD)], dtype=torch.float64
    ).view(1, 3, 1, 1)
    padded = black.expand(1, 3, 112, 128).clone()
    padded[..., :100, :120] = img
    with torch.no_grad():
        out = ev.sliding_window(tiny, img, crop=128)
        assert out.shape == (1, 6, 100, 120)
        assert out.dtype == torch.float64  # the window sums stay float64
        helpers.assert_close(out, tiny(padded)[..., :100, :120], what="padded window vs image")


def test_sliding_window_large_image_covers_every_pixel_and_averages():
    """In float64: the mean of k equal window values is that value only up to rounding."""
    img = torch.randn(2, 3, 160, 224, dtype=torch.float64)
    student = Local()
    out = ev.sliding_window(student, img, crop=128)  # stride 106: windows at y 0, 32 and x 0, 96
    assert student.calls == [(128, 128)] * 4
    # a purely local function: the average of agreeing windows is the function on the whole image
    helpers.assert_close(out, Local()(img), what="windows vs whole image")
    # every pixel is covered: a constant student averages to exactly that constant everywhere
    ones = Fixed("one", torch.ones(2, 128, 128))
    assert torch.equal(ev.sliding_window(ones, img, crop=128), torch.ones(2, 2, 160, 224))


def test_sliding_window_stride_and_last_window_flush():
    student = Local()
    ev.sliding_window(student, torch.randn(1, 3, 200, 64), crop=64, stride=60)
    # H: starts 0, 60, 120, 136 (the last flush with the border); W: one window
    assert len(student.calls) == 4 and ev.window_starts(200, 64, 60) == [0, 60, 120, 136]
    with pytest.raises(ValueError, match="stride"):
        ev.sliding_window(student, torch.randn(1, 3, 200, 64), crop=64, stride=65)


# ---------------------------------------------------------------------------------------------
# predict(): E10 after the sliding window


def test_predict_fused_takes_the_more_confident_student_per_pixel():
    H = W = 32
    a = torch.zeros(3, H, W)
    b = torch.zeros(3, H, W)
    a[0, :, :16] = 5.0  # student a: confident class 0 on the left, unsure on the right
    a[1, :, 16:] = 0.5
    b[2, :, 16:] = 5.0  # student b: confident class 2 on the right, unsure on the left
    b[1, :, :16] = 0.5
    model = Co2S([Fixed("a", a), Fixed("b", b)], fusion="confidence")
    probs = ev.predict(model, torch.zeros(1, 3, H, W), crop=64)
    assert list(probs) == ["a", "b", "fused"]
    pa, pb, fused = probs["a"], probs["b"], probs["fused"]
    assert torch.equal(fused[..., :16], pa[..., :16]) and torch.equal(fused[..., 16:], pb[..., 16:])
    assert (fused.argmax(1)[..., :16] == 0).all() and (fused.argmax(1)[..., 16:] == 2).all()
    model.fusion = "mean"
    # exact: the mean of two is one rounded sum and a halving (a power of two, exact)
    assert torch.equal(ev.predict(model, torch.zeros(1, 3, H, W), 64)["fused"], (pa + pb) / 2)
    assert list(ev.predict(model, torch.zeros(1, 3, H, W), 64, names=["b"])) == ["b"]
    with pytest.raises(ValueError, match="valid here: a, b, fused"):
        ev.predict(model, torch.zeros(1, 3, H, W), 64, names=["clip"])


def test_evaluate_accumulates_each_prediction_over_the_split():
    logits = torch.zeros(2, 8, 8)
    logits[1, :, 4:] = 1.0  # predicts class 0 left, class 1 right
    model = Co2S([Fixed("s", logits), Fixed("t", logits.flip(0))])
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    label[:, :2] = 255
    loader = [dict(img=torch.zeros(1, 3, 8, 8), label=label)] * 3
    cms = ev.evaluate(model, loader, crop=8)
    assert set(cms) == {"s", "t", "fused"}
    assert cms["s"].mat.tolist() == [
        [3 * 24, 3 * 24],
        [0, 0],
    ]  # 48 valid pixels per image, half right
    assert cms["s"].miou() == pytest.approx(
        0.25
    )  # class 0 IoU 1/2; class 1 predicted, never labelled: IoU 0
    # the protocol: a 256 px image evaluated at 512 (windows of 256, stride 213 -> 3 x 3), logits back at 256
    seen, grid = [], torch.arange(256.0).view(1, 1, 1, 256).expand(1, 1, 256, 256)
    probe = Local("p", 2)
    probe.forward = lambda x: (
        seen.append(tuple(x.shape[-2:])) or torch.cat([x[:, :1], -x[:, :1]], 1)
    )
    img = data.normalize(data.eval_resize(Image.fromarray(np.zeros((256, 256, 3), np.uint8)), 512))[
        None
    ]
    assert img.shape[-2:] == (512, 512)
    out = ev.predict(Co2S([probe]), img, 256, names=["p"], out_size=(256, 256))["p"]
    assert out.shape == (1, 2, 256, 256) and seen == [(256, 256)] * 9
    logits = ev.sliding_window(
        lambda x: x.mean(1, keepdim=True).expand(-1, 2, -1, -1), grid.expand(1, 3, -1, -1), 256
    )
    assert torch.equal(logits, grid.expand(1, 2, -1, -1))
    back = F.interpolate(
        torch.arange(512.0).view(1, 1, 1, 512).expand(1, 2, 512, 512),
        size=(256, 256),
        mode="bilinear",
        align_corners=True,
    )
    assert torch.allclose(
        back[0, 0, 0, [0, -1]], torch.tensor([0.0, 511.0])
    )  # align_corners: the corners map
    assert model.training  # train mode restored


# ---------------------------------------------------------------------------------------------
# predict_folder and the CLI


def _tiny_model():
    torch.manual_seed(0)
    return Co2S(
        [
            build_student("dinov3", 4, size="tiny"),
            build_student("clip", 4, size="tiny", text=stand_in_embeddings(4, 128)),
        ]
    ).eval()


def test_predict_folder_writes_palette_masks_of_the_input_size(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"wide.png": (100, 140), "small.jpg": (64, 64)}  # (H, W)
    for f, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    done = ev.predict_folder(_tiny_model(), PALETTE, str(folder), str(out), 64)
    assert sorted(os.path.basename(d) for d in done) == ["small_mask.png", "wide_mask.png"]
    for f, (h, w) in sizes.items():
        mask = Image.open(out / (os.path.splitext(f)[0] + "_mask.png"))
        assert mask.mode == "P" and mask.size == (w, h)
        assert mask.getpalette()[:12] == [v for c in PALETTE for v in c]
        assert set(np.unique(np.asarray(mask))) <= set(range(4))
    # again into the same folder: its own masks are replaced; a file it did not write is not
    ev.predict_folder(_tiny_model(), PALETTE, str(folder), str(out), 64)
    (out / "predictions.json").unlink()
    with pytest.raises(UserError, match="not written by eval.py"):
        ev.predict_folder(_tiny_model(), PALETTE, str(folder), str(out), 64)
    with pytest.raises(UserError, match="folder of the images"):
        ev.predict_folder(_tiny_model(), PALETTE, str(folder), str(folder), 64)


def _fake_run(monkeypatch, model, info, cfg):
    """eval.load_run stand-in, so the CLI is tested without a trained run."""
    monkeypatch.setattr(ev.runs, "load_run", lambda path, *a, **kw: (model, info, cfg))


def test_main_errors_name_the_bad_input(tmp_path, capsys, monkeypatch):
    def error(argv):
        with pytest.raises(SystemExit) as e:
            cli(lambda: ev.main(argv))
        assert e.value.code == 2
        return capsys.readouterr().err

    missing = str(tmp_path / "nope")
    assert missing in error([missing]) and ".pt" in error([missing])
    run = tmp_path / "run"
    run.mkdir()
    assert "holds no best.pt or last.pt" in error([str(run)])
    (run / "best.pt").write_bytes(b"")
    assert "go together" in error([str(run), "--out", str(tmp_path)])
    empty = tmp_path / "empty"
    empty.mkdir()
    _fake_run(
        monkeypatch,
        _tiny_model(),
        types.SimpleNamespace(classes=CLASSES, palette=PALETTE, crop=64, eval_size=None),
        {"crop": 64},
    )
    err = error([str(run), "--student", "dino"])
    assert "'dino'" in err and "dinov3, clip, fused, all" in err


def test_main_evaluates_the_split_and_writes_json(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for n in ("l", "u", "v1", "v2"):
        Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(
            root / "images" / f"{n}.png"
        )
        lab = rng.integers(0, 4, (48, 80)).astype(np.uint8)
        lab[:8] = 255
        Image.fromarray(lab).save(root / "labels" / f"{n}.png")
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    (root / "labeled.txt").write_text("images/l.png labels/l.png\n")
    (root / "unlabeled.txt").write_text("images/u.png\n")
    (root / "val.txt").write_text("images/v1.png labels/v1.png\nimages/v2.png labels/v2.png\n")
    info = catalog.dataset_info("custom", str(root))
    cfg = dict(dataset="custom", data_root=str(root), splits=None, ratio="1", seed=0, crop=64)
    _fake_run(monkeypatch, _tiny_model(), info, cfg)
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"")

    result = ev.main([str(run), "--device", "cpu", "--workers", "0"])
    saved = json.load(open(run / "eval_val.json"))
    assert saved == json.loads(json.dumps(result))
    assert set(saved["results"]) == {"dinov3", "clip", "fused"} and saved[
        "stride"
    ] == ev.window_stride(64)
    for r in saved["results"].values():
        assert r["pixels"] == 2 * 40 * 80  # both val images, ignore rows excluded
        present = [v for v in r["iou"].values() if v is not None]
        assert r["miou_present"] == pytest.approx(sum(present) / len(present))
        assert r["miou"] == pytest.approx(sum(present) / len(CLASSES))
    assert "mIoU" in capsys.readouterr().out

    ev.main([str(run / "best.pt"), "--student", "clip", "--split", "labeled", "--workers", "0"])
    labeled = json.load(open(run / "eval_labeled.json"))
    assert list(labeled["results"]) == ["clip"] and labeled["results"]["clip"]["pixels"] == 40 * 80

    out = tmp_path / "pred"
    done = ev.main([str(run), "--predict", str(root / "images"), "--out", str(out)])
    assert len(done) == 4 and Image.open(out / "v1_mask.png").size == (80, 48)
