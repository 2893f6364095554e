"""eval.py: the evaluation protocol (mIoU of each student and of the fusion), and prediction of a
folder of images to coloured masks.

Evaluation as released (METHOD.md sections 5 and 7.5): the image is resized so its short side is
512 (all datasets but LoveDA, whose tiles are evaluated as stored; WHDLD's 256 px tiles at 512:
data.eval_resize), a window of the training crop slides over it with stride 5/6 of the crop, the
window logits are averaged per pixel and resized back to the label size (bilinear,
align_corners=True), and one confusion matrix is accumulated over the WHOLE split (not per
image), label 255 ignored. mIoU averages I / U over all classes as the release does (a class never
seen counts 0; `miou_present` leaves such classes out). Fusion (E10) comes AFTER the sliding
window: per student averaged logits -> softmax -> `fuse`, so both students are judged on the same
full-image probabilities. We report every student and the fused model (METHOD.md section 7.2).

  python eval.py runs/potsdam-1_8-...                  # best.pt of a run: val split, all + fused
  python eval.py runs/x/last.pt --student fused        # one checkpoint file, one prediction
  python eval.py runs/x --predict tiles/ --out masks/  # a folder of images -> palette PNG masks

Whole scenes with their georeferencing, the authors' released checkpoints, export, curves: tools/.
Deliberately left out: multi-scale and flip test-time augmentation (not in the paper).
"""

import argparse
import math
import os
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
from losses import IGNORE, at_least_fp32
from model import FUSED, fuse
from plumbing import atomic, runs
from plumbing.errors import UserError, cli
from plumbing.runtime import AMP, Stopped, autocast, is_master

# --------------------------------------------------------------------------------------------
# Sliding window (METHOD.md section 5) and the fused prediction (E10)


def window_stride(crop, stride=None):
    """The stride of the sliding window: METHOD.md section 5's 5/6 of the crop unless given."""
    stride = crop * 5 // 6 if stride is None else stride
    if not 0 < stride <= crop:
        raise UserError(f"stride {stride} must be in 1..crop ({crop}), or windows leave gaps")
    return stride


def window_starts(size, crop, stride):
    """Window offsets along one axis: every `stride`, the last window flush with the border
    (mmseg's slide)."""
    last = max(size - crop, 0)
    return [*range(0, last, stride), last]


BLACK = [-m / s for m, s in zip(data.IMAGENET_MEAN, data.IMAGENET_STD)]  # 0 pixels, normalised


def pad16(x):
    """Pad right/bottom to a multiple of 16 (the ViT patch) with black, the padding the students saw
    in training (data.weak_augment pads raw pixels with 0). Black is -mean/std after ImageNet
    normalisation."""
    ph, pw = -x.shape[-2] % 16, -x.shape[-1] % 16
    if ph == pw == 0:
        return x  # as is: x - black + black would round x
    black = x.new_tensor(BLACK).view(1, 3, 1, 1)
    return F.pad(x - black, (0, pw, 0, ph)) + black


def sliding_window(student, img, crop, stride=None):
    """Averaged logits (B, N, H, W) of one student over windows of `crop` (fp32 whatever the
    autocast; float64 for a float64 student).

    An image no larger than the crop is ONE forward (padded to a multiple of 16, cropped back); a
    side smaller than the crop gives windows of that side's length."""
    stride = window_stride(crop, stride)
    B, _, H, W = img.shape
    h, w = min(crop, H), min(crop, W)  # window size
    logits, count = None, torch.zeros(1, 1, H, W, device=img.device)
    for y in window_starts(H, crop, stride):
        for x in window_starts(W, crop, stride):
            out = at_least_fp32(student(pad16(img[..., y : y + h, x : x + w]))[..., :h, :w])
            if logits is None:  # (B, N, H, W) once the student said N
                logits = img.new_zeros(B, out.shape[1], H, W, dtype=out.dtype)
            logits[..., y : y + h, x : x + w] += out  # (B, N, h, w)
            count[..., y : y + h, x : x + w] += 1
    return logits / count  # every pixel is in >= 1 window


# no_grad rather than inference_mode: evaluate's confusion matrices stay normal tensors that
# train.py can all_reduce in place.
@torch.no_grad()
def predict(model, img, crop, stride=None, names=None, out_size=None):
    """Probabilities (B, N, H, W) by name: each student's, and 'fused' (E10) of all students.
    out_size: the label's (H, W) when the image was resized for evaluation (data.eval_resize): the
    averaged window logits are resized back to it (bilinear, align_corners=True, as the release)
    before the softmax."""
    names = model.check_names(names)
    probs = {}
    for s in [s for s in model.students if s.name in names or FUSED in names]:
        logits = sliding_window(s, img, crop, stride)
        if out_size is not None and tuple(out_size) != logits.shape[-2:]:
            logits = F.interpolate(logits, out_size, mode="bilinear", align_corners=True)
        probs[s.name] = logits.softmax(1)
    # E10 after the window averaging: per pixel the more confident student (or the mean)
    if FUSED in names:
        probs[FUSED] = fuse(list(probs.values()), model.fusion)
    return {n: probs[n] for n in names}


# --------------------------------------------------------------------------------------------
# Metrics: one confusion matrix per prediction, accumulated over the whole split


class ConfusionMatrix:
    """mat[label, pred] pixel counts; label 255 ignored. `mat` is a plain int64 tensor on `device`,
    so DDP ranks can `torch.distributed.all_reduce(cm.mat)` before reading the metrics."""

    def __init__(self, num_classes, device="cpu"):
        self.n = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred, label):
        """pred, label: class maps of the same shape (any batch); one bincount, no per-pixel
        Python."""
        keep = label != IGNORE  # the masked pixels, flattened
        counts = torch.bincount(label[keep].long() * self.n + pred[keep], minlength=self.n**2)
        if counts.numel() > self.n**2:
            raise ValueError(f"labels hold values >= {self.n} that are not {IGNORE} (ignore)")
        self.mat += counts.view(self.n, self.n)

    def iou(self, eps=0.0):
        """Per-class IoU = TP / (TP + FP + FN + eps), as fractions; NaN for a class absent from
        labels AND predictions unless eps > 0."""
        m = self.mat.double().cpu()
        tp = m.diag()
        return tp / (m.sum(0) + m.sum(1) - tp + eps)  # 0 / 0 = NaN

    def miou(self):
        """mIoU as the release computes it: I / (U + 1e-10) averaged over ALL classes, so a class
        absent from labels and predictions counts as 0 (the paper's numbers)."""
        return self.iou(1e-10).mean().item()

    def miou_present(self):
        """mIoU over the classes present in labels or predictions (mmseg's nanmean); equal to miou()
        unless some class never appears, as on small splits."""
        return torch.nanmean(self.iou()).item()

    def acc(self):
        return (self.mat.diag().sum() / self.mat.sum()).item()  # pixel accuracy (aAcc)

    def to_dict(self, class_names):
        """Fractions 0..1 (as mmseg; tables print %): {'miou' (the release's), 'miou_present',
        'acc', 'iou': {class: IoU, None if absent}, 'pixels': labelled pixels}. None, not NaN:
        standard JSON."""
        iou = {c: None if math.isnan(v) else v for c, v in zip(class_names, self.iou().tolist())}
        d = dict(miou=self.miou(), miou_present=self.miou_present(), acc=self.acc())
        return {**d, "iou": iou, "pixels": int(self.mat.sum())}


def format_table(cms, class_names):
    """Per-class IoU (%) with one column per prediction, then mIoU and pixel accuracy; '-' =
    class absent."""
    width = max(len(c) for c in [*class_names, "class"])
    row = lambda name, cells: f"{name:<{width}}" + "".join(f"{c:>9}" for c in cells)
    pct = lambda values: ["-" if math.isnan(v) else f"{100 * v:.2f}" for v in values]
    ious = zip(*(cm.iou().tolist() for cm in cms.values()))  # per class, one IoU per prediction
    lines = [row("class", cms)] + [row(c, pct(v)) for c, v in zip(class_names, ious)]
    lines.append(row("mIoU", pct(cm.miou() for cm in cms.values())))
    if any(abs(cm.miou() - cm.miou_present()) > 1e-9 for cm in cms.values()):  # a class never seen
        lines.append(row("mIoU present", pct(cm.miou_present() for cm in cms.values())))
    return "\n".join([*lines, row("aAcc", pct(cm.acc() for cm in cms.values()))])


def evaluate(model, loader, crop, names=None, amp=None, stop=None):
    """Confusion matrix per prediction name over the whole loader (batches of {'img', 'label'}), on
    the model's device. amp: an autocast context (runtime.autocast) or None; the window logits are
    averaged in fp32 anyway. stop: runtime.StopSignals, whose signal ends the evaluation at the
    next image (runtime.Stopped), so a cluster's grace period is never spent on a validation pass.
    Restores the model's train/eval mode. Only rank 0 of a DDP run shows progress."""
    emb = model.students[0].class_embeddings()  # (N, D) on the model's device
    cms = {n: ConfusionMatrix(len(emb), emb.device) for n in model.check_names(names)}
    was_training = model.training
    model.eval()
    for batch in tqdm(loader, "eval", disable=not is_master(), leave=False, dynamic_ncols=True):
        if stop is not None and stop.received():
            model.train(was_training)
            raise Stopped
        # (1, 3, H, W), (1, H, W) on the model's device
        img, label = batch["img"].to(emb.device), batch["label"].to(emb.device)
        with amp or nullcontext():
            probs = predict(model, img, crop, names=list(cms), out_size=label.shape[-2:])
        for n, p in probs.items():
            cms[n].update(p.argmax(1), label)
    model.train(was_training)
    return cms


# --------------------------------------------------------------------------------------------
# Prediction of a folder of images to coloured masks


def colorize(label, palette):
    """Class map -> palette PNG (mode 'P'): class k in palette[k], 255 (and anything unknown)
    black."""
    im = Image.fromarray(np.asarray(label).astype(np.uint8), mode="P")
    im.putpalette([v for rgb in palette for v in rgb] + [0] * (768 - 3 * len(palette)))
    return im


def predict_folder(model, palette, folder, out, crop, name=FUSED):
    """Predict every image of `folder` (or one image file) at its own resolution into
    `out`/<stem>_mask.png (palette PNG of class indices), with the same windows and fusion as the
    evaluation, under the caller's autocast. `out` never overwrites what eval.py did not write
    there: a file of that name is replaced only when `out`'s predictions.json lists it. Returns the
    files written."""
    paths = data.list_images(folder)
    if os.path.abspath(out) in {os.path.abspath(os.path.dirname(p)) for p in paths}:
        raise UserError(f"--out {out!r} is the folder of the images: pass another folder")
    manifest = os.path.join(out, "predictions.json")  # the files eval.py wrote there
    ours = set(atomic.read_json(manifest)["files"]) if os.path.isfile(manifest) else set()
    targets = [os.path.splitext(os.path.basename(p))[0] + "_mask.png" for p in paths]
    if foreign := [t for t in targets if os.path.exists(os.path.join(out, t)) and t not in ours]:
        raise UserError(f"--out {out!r} holds {foreign[:3]}, not written by eval.py: pass another")
    runs.check_writable(out, what="the prediction folder")  # also: `out` is a file
    for path, target in zip(tqdm(paths, desc="predict", dynamic_ncols=True), targets):
        img = data.normalize(data.load_image(path))[None].to(next(model.parameters()).device)
        mask = predict(model, img, crop, names=[name])[name][0].argmax(0).cpu()  # (H, W)
        try:
            colorize(mask, palette).save(os.path.join(out, target))
        except OSError as err:  # a full disk, a folder made read-only meanwhile
            raise UserError(f"--out {out}: cannot write {target} ({err.strerror or err})") from err
        ours.add(target)
        atomic.write_json(manifest, dict(model=name, crop=crop, files=sorted(ours)))
    return [os.path.join(out, t) for t in targets]


# --------------------------------------------------------------------------------------------
# The command line


def get_args(argv=None):
    doc = "Evaluate a Co2S run (mIoU per student and fused), or predict images to coloured masks."
    p = argparse.ArgumentParser(description=doc)
    a = p.add_argument
    a("path", help="run folder (best.pt, else last.pt), .pt file, exported folder or its hub id")
    a("--split", default="val", choices=["val", "labeled"], help="split of the run's lists")
    a("--student", default="all", help="a student name of the run, 'fused' (E10) or 'all'")
    a("--data-root", default=None, help="dataset folder, if it moved since training")
    a("--predict", default=None, metavar="PATH", help="instead: predict this image or folder")
    a("--out", default=None, metavar="DIR", help="with --predict: where the palette PNGs go")
    a("--amp", choices=AMP, default=None, help="CUDA autocast (default: the run's own); CPU: fp32")
    a("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu")
    a("--workers", type=int, default=2, help="data loader processes (0: in this process)")
    args = p.parse_args(argv)
    if bool(args.predict) != bool(args.out):
        p.error("--predict PATH and --out DIR go together")
    if args.predict and not os.path.exists(args.predict):
        p.error(f"--predict {args.predict!r} does not exist (an image file or a folder of images)")
    return args


def split_loader(info, cfg, split, data_root=None, splits_dir=None, workers=2):
    """The loader of one split of a run's lists: its own (splits_dir, what train.py wrote in the
    run folder) when present, else what its config names."""
    source = splits_dir if splits_dir and os.path.isdir(splits_dir) else cfg.get("splits")
    # an exported model keeps no path of the machine that trained it: data/<dataset> by default
    root = data_root or cfg.get("data_root") or os.path.join("data", cfg["dataset"])
    splits = data.make_splits(info, cfg["ratio"], root, source, seed=cfg["seed"])
    return data.val_loader(info, getattr(splits, split), workers=workers)


def main(argv=None):
    args = get_args(argv)
    args.checkpoint = runs.resolve_checkpoint(args.path)  # a bad path: before the (slow) load
    model, info, cfg = runs.load_run(args.checkpoint, args.device, args.data_root)
    valid, crop = model.names + ["all"], cfg["crop"]
    if args.student not in valid:
        raise UserError(f"--student {args.student!r} is not in this run; valid: {', '.join(valid)}")
    args.amp = args.amp or cfg.get("amp") or "auto"  # a release-recipe run: fp32, as it trained
    amp = autocast(args.device, args.amp)
    if args.predict:
        name = FUSED if args.student == "all" else args.student
        with amp:
            done = predict_folder(model, info.palette, args.predict, args.out, crop, name)
        print(f"predicted {len(done)} image(s) ({name} prediction) into {args.out}")
        return done
    folder = runs.run_folder(args.checkpoint)
    splits_dir = os.path.join(folder, "splits")
    loader = split_loader(info, cfg, args.split, args.data_root, splits_dir, args.workers)
    cms = evaluate(model, loader, crop, None if args.student == "all" else [args.student], amp)
    head = f"{args.checkpoint}: {args.split} split, {len(loader)} images, crop {crop}"
    print(f"{head}, fusion {model.fusion}, amp {args.amp}\n{format_table(cms, info.classes)}")
    # eval_<split>.json: checkpoint, split, crop, stride, fusion, amp, results (in that order)
    result = dict(checkpoint=os.path.abspath(args.checkpoint), split=args.split, crop=crop)
    result.update(stride=window_stride(crop), fusion=model.fusion, amp=args.amp)
    result["results"] = {n: cm.to_dict(info.classes) for n, cm in cms.items()}
    stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
    suffix = "" if os.path.isdir(args.checkpoint) or stem == "best" else f"_{stem}"
    out = os.path.join(folder, f"eval_{args.split}{suffix}.json")
    atomic.write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    cli(main)
