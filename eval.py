"""eval.py: sliding-window evaluation (mIoU per student and fused); the command line of prediction
(scene.py), training curves (curves.py) and model export (runs.export).

Evaluation as released (METHOD.md sections 5 and 7.5): the image is resized so its short side is 512
(all datasets but LoveDA, whose tiles are evaluated as stored; WHDLD's 256 px tiles at 512), a
window of the training crop slides over it with stride 5/6 of the crop, the window logits are
averaged per pixel and resized back to the label size (bilinear, align_corners=True), and one
confusion matrix is accumulated over the WHOLE split (not per image), label 255 ignored. mIoU
averages I / U over all classes as the release does (a class never seen counts 0; `miou_present`
leaves such classes out). Fusion (E10) comes AFTER the sliding window: per student averaged logits
-> softmax -> `fuse`, so both students are judged on the same full-image probabilities. We report
every student and the fused model (METHOD.md section 7.2). Checkpoints and the authors' released
experiments are read by runs.py and release.py; this file is the evaluation protocol and prediction.

  python eval.py runs/potsdam-1_8-...            # best.pt of a run, val split, all students + fused
  python eval.py runs/x/last.pt --student fused  # one checkpoint file, one prediction
  python eval.py runs/x --predict scene.tif --out masks/   # any size, GeoTIFF in and out (scene.py)
  python eval.py runs/a runs/b --plot --out drift.png     # training curves overlaid (curves.py)
  python eval.py runs/x --export model/                   # a hub-layout model folder (runs.export)
  python eval.py --release POTSDAM/1_32-74.30 --dataset potsdam   # the authors' checkpoints, their
  way

Deliberately left out: multi-scale and flip test-time augmentation (not in the paper).
"""
import argparse
import itertools
import json
import math
import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import curves
import data
import files
import runs
from backbones import NUMERICS
from catalog import CHOICES
from errors import UserError, cli
from losses import IGNORE
from model import check_names, compile_model, fuse
from release import load_release
from scene import SceneOptions, list_scenes, pad16, predict_path, window_starts


# --------------------------------------------------------------------------------------------
# Sliding window (METHOD.md section 5) and the fused prediction (E10)


def sliding_window(student, img, crop, stride=None, num_classes=None):
    """Averaged logits (B, N, H, W) of one student over windows of `crop` (fp32 whatever the
    autocast).

    An image no larger than the crop is ONE forward (padded to a multiple of 16, cropped back); a
    side smaller than the crop gives windows of that side's length."""
    # METHOD.md section 5: stride 5/6 of the crop
    stride = stride or crop * 5 // 6
    if not 0 < stride <= crop:
        raise ValueError(f"stride {stride} must be in 1..crop ({crop}), or windows would leave gaps")
    B, _, H, W = img.shape
    h, w = min(crop, H), min(crop, W)                     # window size
    logits, count = None, torch.zeros(1, 1, H, W, device=img.device)
    for y in window_starts(H, crop, stride):
        for x in window_starts(W, crop, stride):
            out = student(pad16(img[:, :, y:y + h, x:x + w]))[:, :, :h, :w].float()   # (B, N, h, w)
            if logits is None:
                logits = torch.zeros(B, out.shape[1], H, W, device=img.device)
            logits[:, :, y:y + h, x:x + w] += out
            count[:, :, y:y + h, x:x + w] += 1
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"the student predicts {logits.shape[1]} classes, the dataset has {num_classes}")
    return logits / count                                 # every pixel is in >= 1 window


@torch.no_grad()
def predict(model, img, crop, stride=None, names=None, out_size=None):
    """Probabilities (B, N, H, W) by name: each student's, and 'fused' (E10) of all students.
    out_size: the label's (H, W) when the image was resized for evaluation (data.eval_resize): the
    averaged window logits are resized back to it (bilinear, align_corners=True, as the release)
    before the softmax."""
    names = check_names(model, names)
    needed = [s.name for s in model.students] if "fused" in names else names
    probs = {}
    for s in model.students:
        if s.name in needed:
            logits = sliding_window(s, img, crop, stride)
            if out_size is not None and tuple(out_size) != tuple(logits.shape[-2:]):
                logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear",
                                       align_corners=True)
            probs[s.name] = logits.softmax(1)
    # E10 after the window averaging: per pixel the more confident student (or the mean)
    if "fused" in names:
        probs["fused"] = fuse(list(probs.values()), model.fusion)
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
        label, pred = label.reshape(-1).long(), pred.reshape(-1).long()
        keep = label != IGNORE
        counts = torch.bincount(label[keep] * self.n + pred[keep], minlength=self.n * self.n)
        if counts.numel() > self.n * self.n:
            raise ValueError(f"labels hold values >= {self.n} that are not {IGNORE} (ignore)")
        self.mat += counts.view(self.n, self.n)

    def iou(self):
        """Per-class IoU = TP / (TP + FP + FN), as fractions; NaN for a class absent from labels
        AND predictions."""
        m = self.mat.double().cpu()
        tp = m.diag()
        return tp / (m.sum(0) + m.sum(1) - tp)            # 0 / 0 = NaN

    def miou(self):
        """mIoU as the release computes it: I / (U + 1e-10) averaged over ALL classes, so a class
        absent from labels and predictions counts as 0 (the paper's numbers)."""
        m = self.mat.double().cpu()
        tp = m.diag()
        return (tp / (m.sum(0) + m.sum(1) - tp + 1e-10)).mean().item()

    def miou_present(self):
        """mIoU over the classes present in labels or predictions (mmseg's nanmean); equal to miou()
        unless some class never appears, as on small splits."""
        return torch.nanmean(self.iou()).item()

    def acc(self):
        return (self.mat.diag().sum() / self.mat.sum()).item()   # pixel accuracy (aAcc)

    def to_dict(self, class_names):
        """Fractions 0..1 (as mmseg; tables print %): {'miou' (the release's), 'miou_present',
        'acc', 'iou': {class: IoU, None if absent}, 'pixels': labelled pixels}. None, not NaN:
        standard JSON."""
        iou = [None if math.isnan(v) else v for v in self.iou().tolist()]
        return dict(miou=self.miou(), miou_present=self.miou_present(), acc=self.acc(),
                    iou=dict(zip(class_names, iou)),
                    pixels=int(self.mat.sum()))

    def table(self, class_names):
        return format_table({"IoU": self}, class_names)


def format_table(cms, class_names):
    """Per-class IoU (%) with one column per prediction, then mIoU and pixel accuracy; '-' =
    class absent."""
    width = max(len(c) for c in list(class_names) + ["class"])
    cell = lambda v: f"{'-' if math.isnan(v) else f'{100 * v:.2f}':>9}"
    lines = [f"{'class':<{width}}" + "".join(f"{n:>9}" for n in cms)]
    ious = {n: cm.iou().tolist() for n, cm in cms.items()}
    lines += [f"{c:<{width}}" + "".join(cell(ious[n][k]) for n in cms) for k,
              c in enumerate(class_names)]
    lines.append(f"{'mIoU':<{width}}" + "".join(cell(cm.miou()) for cm in cms.values()))
    # some class never appears
    if any(abs(cm.miou() - cm.miou_present()) > 1e-9 for cm in cms.values()):
        lines.append(f"{'mIoU present':<{width}}" + "".join(cell(cm.miou_present()) for cm in cms.values()))
    lines.append(f"{'aAcc':<{width}}" + "".join(cell(cm.acc()) for cm in cms.values()))
    return "\n".join(lines)


def evaluate(model, loader, crop, stride=None, names=None, amp=None):
    """Confusion matrix per prediction name over the whole loader (batches of {'img', 'label'}), on
    the model's device. amp: an autocast context (runs.autocast) or None; the window logits are
    averaged in fp32 anyway. Restores the model's train/eval mode. Only rank 0 of a DDP run shows
    progress."""
    names = check_names(model, names)
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    num_classes = len(model.students[0].class_embeddings())
    cms = {n: ConfusionMatrix(num_classes, device) for n in names}
    progress = int(os.environ.get("RANK", 0)) == 0
    ctx = amp or nullcontext()
    was_training = model.training
    model.eval()
    # no_grad rather than inference_mode: cm.mat must stay a normal tensor that train.py can
    # all_reduce in place.
    with torch.no_grad():
        for batch in tqdm(loader, desc="eval", disable=not progress, leave=False,
                          dynamic_ncols=True):
            # (1, 3, H, W), (1, H, W)
            img, label = batch["img"].to(device), batch["label"].to(device)
            with ctx:
                probs = predict(model, img, crop, stride, names, out_size=label.shape[-2:])
            for n, p in probs.items():
                cms[n].update(p.argmax(1), label)
    model.train(was_training)
    return cms


# --------------------------------------------------------------------------------------------
# The command line


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a Co2S run or one of the authors' released "
                                "experiments (mIoU per student and fused), or predict a folder.")
    a = p.add_argument
    a("path", nargs="*",
      help="run folder (best.pt / last.pt) or a .pt checkpoint; with --plot one or "
      "more run folders")
    a("--release", metavar="DIR", help="instead: an experiment folder of the authors' release "
      "(best_clip.pth / best_dinov3.pth, e.g. POTSDAM/1_32-74.30), evaluated their way")
    a("--dataset", choices=CHOICES, help="with --release: the dataset it was trained on")
    a("--text-embeddings",
      help="with --release: [N, 512] CLIP class embeddings, if the file lacks them")
    a("--save", metavar="RUN_DIR",
      help="with --release: write the converted model as a run folder of ours")
    a("--ckpt", choices=["best", "last"], default=None, help="checkpoint of a run folder "
      "(default: best, else last)")
    a("--split", default="val", choices=["val", "labeled"],
      help="split of the run's lists to evaluate")
    a("--student", default="all",
      help="a student name of the run, 'fused' (E10) or 'all' (each + fused)")
    a("--crop", type=int, default=None, help="window size (default: the run's training crop)")
    a("--stride", type=int, default=None, help="window stride (paper: 5/6 of the crop)")
    a("--numerics", choices=NUMERICS, default=None, help="forward numerics (default: the run's; a "
      "release always runs 'release')")
    a("--data-root", default=None, help="dataset folder, if it moved since training")
    a("--predict", default=None, metavar="PATH", help="predict an image of any size, or every image of "
      "a folder, at native resolution (streamed windows; GeoTIFF in, GeoTIFF out), not evaluate")
    a("--out", default=None, metavar="DIR", help="where --predict writes masks, class shares, overlays")
    a("--batch", type=int, default=8, help="with --predict: windows per forward")
    a("--bands", default="1,2,3", help="with --predict: the three bands the students read, 1-based (GDAL)")
    a("--scale", type=float, default=None, help="with --predict: non-8-bit inputs as value * 255 / SCALE "
      "(default: a per-band 2-98 %% stretch over the valid pixels)")
    a("--overlay", action="store_true", help="with --predict: also the image blended with the colour mask")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--amp", choices=runs.AMP, default=None,
      help="CUDA autocast of the forwards (default: auto = bf16 "
      "for our runs, off = fp32 for --release, as the authors evaluate); the averaging is fp32 anyway")
    a("--fp32", action="store_true", help="the same as --amp off")
    a("--compile", action="store_true", help="torch.compile the blocks and heads (model.compile_model): "
      "one compilation per window batch shape; worth it for long evaluations on a GPU")
    a("--plot", action="store_true",
      help="draw the runs' training curves (curves.py): RUN/curves.png "
      "for one run, an overlay of several into --out FILE (default ./curves.png)")
    a("--export", metavar="DIR",
      help="write the run's model as a self-contained folder (config.json, "
      "model.safetensors, README.md model card) that every command takes, as does the hub (hf upload)")
    a("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if args.plot:
        if not args.path:
            p.error("--plot needs one or more run folders")
        return args
    if len(args.path) > 1:
        p.error("give one run folder / checkpoint (several only with --plot)")
    args.path = args.path[0] if args.path else None
    if bool(args.predict) != bool(args.out):
        p.error("--predict FOLDER and --out DIR go together")
    if bool(args.path) == bool(args.release) or bool(args.release) != bool(args.dataset):
        p.error("give a run folder / checkpoint, or --release DIR with --dataset D")
    args.amp = "off" if args.fp32 else args.amp or ("off" if args.release else "auto")
    try:  # check what can be checked before the (slow) model load
        args.checkpoint = runs.resolve_checkpoint(args.path, args.ckpt) if args.path else None
        if args.predict:
            list_scenes(args.predict)
            if not all(b.strip().isdigit() for b in args.bands.split(",")):
                raise UserError(f"--bands {args.bands!r}: band numbers, 1-based, e.g. 1,2,3")
            args.bands = tuple(int(b) for b in args.bands.split(","))
    except UserError as e:
        p.error(str(e))
    return args


def load(args):
    """(model on the device, info, cfg, published mIoU or None) of a run or a release."""
    device = torch.device(args.device)
    if not args.release:
        model, info, cfg = runs.load_run(args.checkpoint, device, args.data_root, args.numerics)
        return model, info, cfg, None
    model, info, cfg, published = load_release(args.release, args.dataset, args.data_root,
                                               args.text_embeddings)
    if args.save:
        runs.save_release(model, cfg, args.save)
        print(f"wrote {os.path.join(args.save, 'best.pt')}")
    return model.to(device), info, cfg, published


def evaluate_split(args, model, info, cfg, published):
    """Evaluate the run's split, print the table, write eval_<split>.json beside the checkpoint."""
    crop = args.crop or cfg["crop"]
    # The run's own split lists when train.py wrote them (<run>/splits), else the config's source.
    run_splits = os.path.join(runs.run_folder(args.checkpoint), "splits") if args.checkpoint else ""
    splits = files.make_splits(info, cfg["ratio"], args.data_root or cfg["data_root"],
                               run_splits if os.path.isdir(run_splits) else cfg["splits"], seed=cfg["seed"])
    loader = data.val_loader(info, getattr(splits, args.split), workers=args.workers)
    names = None if args.student == "all" else [args.student]
    amp = runs.autocast(next(model.parameters()).device, args.amp)
    cms = evaluate(model, loader, crop, args.stride, names, amp)
    source = args.checkpoint or args.release
    print(f"{source}: {args.split} split, {len(loader)} images, crop {crop}, fusion {model.fusion}, "
          f"amp {args.amp}\n{format_table(cms, info.classes)}")
    # the folder name carries the authors' figure (their students were never fused)
    if published is not None:
        print(f"published {published:.2f} | ours: " + ", ".join(f"{n} {100 * cm.miou():.2f}" for n,
                                                                cm in cms.items()))
    result = dict(checkpoint=os.path.abspath(source), split=args.split, crop=crop,
                  stride=args.stride or crop * 5 // 6, fusion=model.fusion, amp=args.amp, published=published,
                  results={n: cm.to_dict(info.classes) for n, cm in cms.items()})
    out_dir = args.save if args.release else runs.run_folder(args.checkpoint)
    if out_dir:
        stem = "best" if args.release or os.path.isdir(args.checkpoint) else \
            os.path.splitext(os.path.basename(args.checkpoint))[0]
        out = os.path.join(out_dir,
                           f"eval_{args.split}" + ("" if stem == "best" else f"_{stem}") + ".json")
        runs.write_json(out, result)
        print(f"wrote {out}")
    return result


def main(argv=None):
    args = get_args(argv)
    if args.export:
        if not args.checkpoint:
            raise UserError("--export needs a run folder or checkpoint")
        info = runs.load_run(args.checkpoint, "cpu", args.data_root)[1]
        print(f"wrote {runs.export(args.checkpoint, args.export, info)}")
        return args.export
    if args.plot:
        one = os.path.join(args.path[0], "curves.png")
        out = curves.plot(args.path, args.out or (one if len(args.path) == 1 else "curves.png"))
        print(f"wrote {out}")
        return out
    model, info, cfg, published = load(args)
    if args.compile:
        compile_model(model)
    valid = [s.name for s in model.students] + ["fused", "all"]
    if args.student not in valid:
        raise UserError(f"--student {args.student!r} is not in this run; valid: {', '.join(valid)}")
    if args.predict:
        name = "fused" if args.student == "all" else args.student
        opts = SceneOptions(args.crop or cfg["crop"], args.stride, args.batch, args.device,
                            runs.autocast(torch.device(args.device), args.amp), name, args.bands,
                            args.scale, args.overlay)
        done = predict_path(model, info, args.predict, args.out, opts)
        print(f"predicted {len(done)} image(s) ({name} prediction) into {args.out}")
        return done
    return evaluate_split(args, model, info, cfg, published)


if __name__ == "__main__":
    cli(main)
