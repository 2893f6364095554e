"""eval.py: sliding-window evaluation (mIoU per student and fused) and prediction of a folder of images.

Evaluation as released (METHOD.md sections 5 and 7.5): the image is resized so its short side is 512
(all datasets but LoveDA, whose tiles are evaluated as stored; WHDLD's 256 px tiles at 512), a window
of the training crop slides over it with stride 5/6 of the crop, the window logits are averaged per
pixel and resized back to the label size (bilinear, align_corners=True), and one confusion matrix is
accumulated over the WHOLE split (not per image), label 255 ignored. mIoU averages I / U over all
classes as the release does (a class never seen counts 0; `miou_present` leaves such classes out).
Fusion (E10) comes AFTER the sliding window: per student averaged logits -> softmax -> `fuse`, so both
students are judged on the same full-image probabilities. We report every student and the fused model
(METHOD.md section 7.2). Also here: our checkpoints (read, save, rebuild the model), the one
mixed-precision policy, and the authors' released experiments (--release).

  python eval.py runs/potsdam-1_8-...            # best.pt of a run, val split, all students + fused
  python eval.py runs/x/last.pt --student fused  # one checkpoint file, one prediction
  python eval.py runs/x --predict photos/ --out masks/   # palette masks + overlays for any images
  python eval.py --release POTSDAM/1_32-74.30 --dataset potsdam   # the authors' checkpoints, their way

Deliberately left out: multi-scale and flip test-time augmentation (not in the paper).
"""
import argparse
import dataclasses
import json
import math
import os
import re
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
from catalog import CHOICES, dataset_info
from errors import UserError, cli
from losses import IGNORE
from model import NUMERICS, Co2S, build_model, from_release, fuse, vit_size
from text import load_text_embeddings


# --------------------------------------------------------------------------------------------
# Sliding window (METHOD.md section 5) and the fused prediction (E10)


def _window_starts(size, crop, stride):
    """Window offsets along one axis: every `stride`, the last window flush with the border (mmseg's slide)."""
    if size <= crop:
        return [0]
    n = math.ceil((size - crop) / stride) + 1
    return [min(i * stride, size - crop) for i in range(n)]


def _pad16(x):
    """Pad right/bottom to a multiple of 16 (the ViT patch) with black, the padding the students saw in
    training (data.weak_augment pads raw pixels with 0). Black is -mean/std after ImageNet normalisation."""
    ph, pw = -x.shape[-2] % 16, -x.shape[-1] % 16
    if ph == 0 and pw == 0:
        return x
    black = torch.tensor([-m / s for m, s in zip(data.IMAGENET_MEAN, data.IMAGENET_STD)], device=x.device, dtype=x.dtype)
    black = black.view(1, 3, 1, 1)
    return F.pad(x - black, (0, pw, 0, ph)) + black


def sliding_window(student, img, crop, stride=None, num_classes=None):
    """Averaged logits (B, N, H, W) of one student over windows of `crop` (fp32 whatever the autocast).

    An image no larger than the crop is ONE forward (padded to a multiple of 16, cropped back); a side
    smaller than the crop gives windows of that side's length."""
    stride = stride or crop * 5 // 6                      # METHOD.md section 5: stride 5/6 of the crop
    if not 0 < stride <= crop:
        raise ValueError(f"stride {stride} must be in 1..crop ({crop}), or windows would leave gaps")
    B, _, H, W = img.shape
    h, w = min(crop, H), min(crop, W)                     # window size
    logits, count = None, torch.zeros(1, 1, H, W, device=img.device)
    for y in _window_starts(H, crop, stride):
        for x in _window_starts(W, crop, stride):
            out = student(_pad16(img[:, :, y:y + h, x:x + w]))[:, :, :h, :w].float()   # (B, N, h, w)
            if logits is None:
                logits = torch.zeros(B, out.shape[1], H, W, device=img.device)
            logits[:, :, y:y + h, x:x + w] += out
            count[:, :, y:y + h, x:x + w] += 1
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"the student predicts {logits.shape[1]} classes, the dataset has {num_classes}")
    return logits / count                                 # every pixel is in >= 1 window


def amp_dtype(device, amp="auto"):
    """The one mixed-precision policy (train, eval, bench): on CUDA bf16 ('auto'; fp16 where the GPU has
    no bf16, or asked for); fp32 on the CPU (bf16 there is many times slower) and with amp 'off'."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def autocast(device, amp="auto"):
    """torch.autocast for amp_dtype(device, amp): disabled (a no-op) where that is fp32."""
    dtype = amp_dtype(device, amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def check_names(model, names):
    """names: which predictions to compute (student names and/or 'fused'); None = all of them."""
    valid = [s.name for s in model.students] + ["fused"]
    names = list(names or valid)
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"unknown prediction(s) {bad}; valid for this model: {', '.join(valid)}")
    return names


@torch.no_grad()
def predict(model, img, crop, stride=None, names=None, out_size=None):
    """Probabilities (B, N, H, W) by name: each student's, and 'fused' (E10) of all students. out_size: the
    label's (H, W) when the image was resized for evaluation (data.eval_resize): the averaged window
    logits are resized back to it (bilinear, align_corners=True, as the release) before the softmax."""
    names = check_names(model, names)
    needed = [s.name for s in model.students] if "fused" in names else names
    probs = {}
    for s in model.students:
        if s.name in needed:
            logits = sliding_window(s, img, crop, stride)
            if out_size is not None and tuple(out_size) != tuple(logits.shape[-2:]):
                logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=True)
            probs[s.name] = logits.softmax(1)
    if "fused" in names:  # E10 after the window averaging: per pixel the more confident student (or the mean)
        probs["fused"] = fuse(list(probs.values()), model.fusion)
    return {n: probs[n] for n in names}


# --------------------------------------------------------------------------------------------
# Metrics: one confusion matrix per prediction, accumulated over the whole split


class ConfusionMatrix:
    """mat[label, pred] pixel counts; label 255 ignored. `mat` is a plain int64 tensor on `device`, so
    DDP ranks can `torch.distributed.all_reduce(cm.mat)` before reading the metrics."""

    def __init__(self, num_classes, device="cpu"):
        self.n = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred, label):
        """pred, label: class maps of the same shape (any batch); one bincount, no per-pixel Python."""
        label, pred = label.reshape(-1).long(), pred.reshape(-1).long()
        keep = label != IGNORE
        counts = torch.bincount(label[keep] * self.n + pred[keep], minlength=self.n * self.n)
        if counts.numel() > self.n * self.n:
            raise ValueError(f"labels hold values >= {self.n} that are not {IGNORE} (ignore)")
        self.mat += counts.view(self.n, self.n)

    def iou(self):
        """Per-class IoU = TP / (TP + FP + FN), as fractions; NaN for a class absent from labels AND predictions."""
        m = self.mat.double().cpu()
        tp = m.diag()
        return tp / (m.sum(0) + m.sum(1) - tp)            # 0 / 0 = NaN

    def miou(self):
        """mIoU as the release computes it: I / (U + 1e-10) averaged over ALL classes, so a class absent from
        labels and predictions counts as 0 (the paper's numbers)."""
        m = self.mat.double().cpu()
        tp = m.diag()
        return (tp / (m.sum(0) + m.sum(1) - tp + 1e-10)).mean().item()

    def miou_present(self):
        """mIoU over the classes present in labels or predictions (mmseg's nanmean); equal to miou() unless
        some class never appears, as on small splits."""
        return torch.nanmean(self.iou()).item()

    def acc(self):
        return (self.mat.diag().sum() / self.mat.sum()).item()   # pixel accuracy (aAcc)

    def to_dict(self, class_names):
        """Fractions 0..1 (as mmseg; tables print %): {'miou' (the release's), 'miou_present', 'acc',
        'iou': {class: IoU, None if absent}, 'pixels': labelled pixels}. None, not NaN: standard JSON."""
        iou = [None if math.isnan(v) else v for v in self.iou().tolist()]
        return dict(miou=self.miou(), miou_present=self.miou_present(), acc=self.acc(), iou=dict(zip(class_names, iou)),
                    pixels=int(self.mat.sum()))

    def table(self, class_names):
        return format_table({"IoU": self}, class_names)


def format_table(cms, class_names):
    """Per-class IoU (%) with one column per prediction, then mIoU and pixel accuracy; '-' = class absent."""
    width = max(len(c) for c in list(class_names) + ["class"])
    cell = lambda v: f"{'-' if math.isnan(v) else f'{100 * v:.2f}':>9}"
    lines = [f"{'class':<{width}}" + "".join(f"{n:>9}" for n in cms)]
    ious = {n: cm.iou().tolist() for n, cm in cms.items()}
    lines += [f"{c:<{width}}" + "".join(cell(ious[n][k]) for n in cms) for k, c in enumerate(class_names)]
    lines.append(f"{'mIoU':<{width}}" + "".join(cell(cm.miou()) for cm in cms.values()))
    if any(abs(cm.miou() - cm.miou_present()) > 1e-9 for cm in cms.values()):  # some class never appears
        lines.append(f"{'mIoU present':<{width}}" + "".join(cell(cm.miou_present()) for cm in cms.values()))
    lines.append(f"{'aAcc':<{width}}" + "".join(cell(cm.acc()) for cm in cms.values()))
    return "\n".join(lines)


def evaluate(model, loader, crop, num_classes, names=None, device="cpu", amp=None, progress=True, stride=None):
    """Confusion matrix per prediction name over the whole loader (batches of {'img', 'label'}).

    amp: an autocast context (see autocast()) or None; the window logits are averaged in fp32 anyway.
    Restores the model's train/eval mode."""
    names = check_names(model, names)
    cms = {n: ConfusionMatrix(num_classes, device) for n in names}
    ctx = amp or nullcontext()
    was_training = model.training
    model.eval()
    # no_grad rather than inference_mode: cm.mat must stay a normal tensor that train.py can all_reduce in place.
    with torch.no_grad():
        for batch in tqdm(loader, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
            img, label = batch["img"].to(device), batch["label"].to(device)          # (1, 3, H, W), (1, H, W)
            with ctx:
                probs = predict(model, img, crop, stride, names, out_size=label.shape[-2:])
            for n, p in probs.items():
                cms[n].update(p.argmax(1), label)
    model.train(was_training)
    return cms


# --------------------------------------------------------------------------------------------
# Prediction of a folder of images (any size): palette masks and overlays


def list_images(folder):
    if not os.path.isdir(folder):
        raise UserError(f"--predict folder {folder!r} does not exist")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(data.IMAGE_EXTS))
    if not files:
        raise UserError(f"no images in {folder!r}; accepted extensions: {' '.join(data.IMAGE_EXTS)}")
    return [os.path.join(folder, f) for f in files]


def predict_folder(model, info, folder, out_dir, crop, device="cpu", stride=None, name="fused", amp=None):
    """For every image of `folder`: <stem>_mask.png (palette PNG, input size) and <stem>_overlay.png
    (the image | the image blended with the colour mask). Returns the written paths."""
    paths, name = list_images(folder), check_names(model, [name])[0]
    os.makedirs(out_dir, exist_ok=True)
    ctx = amp or nullcontext()
    model.eval()
    written = []
    for path in tqdm(paths, desc="predict", dynamic_ncols=True):
        image = data.load_image(path)                                     # RGB, any size
        x = data.normalize(data.eval_resize(image, info.eval_size))[None].to(device)
        with ctx:
            probs = predict(model, x, crop, stride, [name], out_size=(image.height, image.width))[name]
        mask = data.colorize(probs[0].argmax(0).byte().cpu().numpy(), info.palette)   # 'P', (H, W)
        overlay = Image.new("RGB", (2 * image.width, image.height))
        overlay.paste(image, (0, 0))
        overlay.paste(Image.blend(image, mask.convert("RGB"), 0.5), (image.width, 0))
        stem = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0])
        mask.save(stem + "_mask.png")
        overlay.save(stem + "_overlay.png")
        written += [stem + "_mask.png", stem + "_overlay.png"]
    return written


# --------------------------------------------------------------------------------------------
# Checkpoints, the authors' released experiments, and the command line


def resolve_checkpoint(path, ckpt=None):
    """A run folder (its best.pt, else last.pt; or the one --ckpt names) or a .pt file -> the .pt path."""
    if os.path.isdir(path):
        wanted = [f"{ckpt}.pt"] if ckpt else ["best.pt", "last.pt"]
        for f in wanted:
            if os.path.isfile(os.path.join(path, f)):
                return os.path.join(path, f)
        raise UserError(f"run folder {path!r} holds no {' or '.join(wanted)}; expected a folder written by "
                        f"train.py or a .pt checkpoint file")
    if os.path.isfile(path) and path.endswith(".pt"):
        return path
    raise UserError(f"{path!r} is neither a run folder (with best.pt / last.pt) nor a .pt checkpoint file")


def save_atomic(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash mid-write never leaves a truncated checkpoint


def read_checkpoint(path):
    """torch.load of one of our checkpoints (train.py's dict), with a clear error for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, not a torch file, ...
        raise UserError(f"cannot read checkpoint {path!r} ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not {"cfg", "model", "model_args"} <= set(state):
        raise UserError(f"{path!r} is not a checkpoint of train.py (no cfg / model / model_args)")
    return state


def model_from_checkpoint(state, numerics=None):
    """The Co2S model of a checkpoint: built from its model_args (random backbones, no download), then
    every tensor (frozen backbone weights, CLIP text embeddings included) read from its state dict.
    numerics: run it with other numerics than it was trained with ('hf' | 'release')."""
    args, sd = dict(state["model_args"], numerics=numerics or state["model_args"]["numerics"]), state["model"]
    text = next((v for k, v in sd.items() if k.endswith(".text")), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random backbone weights": they are overwritten just below
        model = build_model(**args, text=text)
    model.load_state_dict(sd)
    return model


def load_run(path, device="cpu", data_root=None, numerics=None):
    """(model in eval mode, dataset info, cfg) of a checkpoint file or run folder (best.pt, else last.pt)."""
    state = read_checkpoint(resolve_checkpoint(path))
    cfg = state["cfg"]
    info = dataset_info(cfg["dataset"], data_root or cfg["data_root"])
    return model_from_checkpoint(state, numerics).to(device).eval(), info, cfg


def load_release(folder, dataset, data_root=None, text_embeddings=None, fusion="confidence"):
    """(model, info, cfg, published mIoU or None) of one of the authors' experiment folders (e.g.
    POTSDAM/1_32-74.30/ with best_clip.pth and/or best_dinov3.pth), converted by model.from_release."""
    files = [(k, os.path.join(folder, f"best_{k}.pth")) for k in ("clip", "dinov3")]
    files = [(k, f) for k, f in files if os.path.isfile(f)]
    if not files:
        raise UserError(f"--release {folder!r} holds neither best_clip.pth nor best_dinov3.pth")
    info = dataset_info(dataset, data_root)
    text = load_text_embeddings(text_embeddings, len(info.classes), 512) if text_embeddings else None
    students = [from_release(f, text=text) for _, f in files]
    for s in students:
        n = len(s.class_embeddings())
        if n != len(info.classes):
            raise UserError(f"the released {s.kind} student predicts {n} classes, {dataset} has {len(info.classes)}: "
                            f"check --dataset")
    m = re.search(r"(\d+_\d+)-(\d+(?:\.\d+)?)$", os.path.basename(os.path.normpath(folder)))
    clip = next((s for s in students if s.kind == "clip"), None)
    cfg = dict(dataset=dataset, data_root=data_root or os.path.join("data", dataset), splits=None, seed=0,
               ratio=m.group(1) if m else info.ratios[0].replace("/", "_"), release=os.path.abspath(folder),
               crop=clip.backbone.config.image_size if clip else info.crop)   # a release stores its crop's position grid
    return Co2S(students, fusion=fusion), info, cfg, float(m.group(2)) if m else None


def save_release(model, cfg, info, run_dir):
    """A converted release as one of our run folders (best.pt): eval.py, --predict and train.py --init read it."""
    os.makedirs(run_dir, exist_ok=True)
    kinds = [s.kind for s in model.students]
    model_args = dict(kinds=kinds, num_classes=len(info.classes), size=vit_size(model.students), clip_guidance="text",
                      fusion=model.fusion, grad_checkpoint=False, numerics="release")
    cfg = dict(cfg, students=",".join(kinds), numerics="release", fusion=model.fusion)
    save_atomic(dict(cfg=cfg, model_args=model_args, model=model.state_dict(), step=0, best={"miou": -1.0}),
                os.path.join(run_dir, "best.pt"))


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a Co2S run or one of the authors' released experiments "
                                            "(mIoU per student and fused), or predict a folder.")
    p.add_argument("path", nargs="?", help="run folder (best.pt / last.pt) or a .pt checkpoint")
    p.add_argument("--release", metavar="DIR", help="instead: an experiment folder of the authors' release "
                   "(best_clip.pth / best_dinov3.pth, e.g. POTSDAM/1_32-74.30), evaluated their way")
    p.add_argument("--dataset", choices=CHOICES, help="with --release: the dataset it was trained on")
    p.add_argument("--text-embeddings", help="with --release: [N, 512] CLIP class embeddings, if the file lacks them")
    p.add_argument("--save", metavar="RUN_DIR", help="with --release: write the converted model as a run folder of ours")
    p.add_argument("--ckpt", choices=["best", "last"], default=None, help="checkpoint of a run folder (default: best, else last)")
    p.add_argument("--split", default="val", choices=["val", "labeled"], help="split of the run's lists to evaluate")
    p.add_argument("--student", default="all", help="a student name of the run, 'fused' (E10) or 'all' (each + fused)")
    p.add_argument("--crop", type=int, default=None, help="window size (default: the run's training crop)")
    p.add_argument("--stride", type=int, default=None, help="window stride (paper: 5/6 of the crop)")
    p.add_argument("--numerics", choices=NUMERICS, default=None, help="forward numerics (default: the run's; a release "
                   "always runs 'release')")
    p.add_argument("--data-root", default=None, help="dataset folder, if it moved since training")
    p.add_argument("--predict", default=None, metavar="FOLDER", help="predict every image of FOLDER instead of evaluating")
    p.add_argument("--out", default=None, metavar="DIR", help="where --predict writes masks and overlays")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA (the averaging is fp32 anyway)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if bool(args.predict) != bool(args.out):
        p.error("--predict FOLDER and --out DIR go together")
    if bool(args.path) == bool(args.release) or bool(args.release) != bool(args.dataset):
        p.error("give a run folder / checkpoint, or --release DIR with --dataset D")
    try:  # check what can be checked before the (slow) model load
        ckpt = resolve_checkpoint(args.path, args.ckpt) if args.path else None
        if args.predict:
            list_images(args.predict)
    except UserError as e:
        p.error(str(e))

    device, published = torch.device(args.device), None
    if args.release:
        model, info, cfg, published = load_release(args.release, args.dataset, args.data_root, args.text_embeddings)
        if args.save:
            save_release(model, cfg, info, args.save)
            print(f"wrote {os.path.join(args.save, 'best.pt')}")
        model.to(device)
    else:
        model, info, cfg = load_run(ckpt, device=device, data_root=args.data_root, numerics=args.numerics)
    valid = [s.name for s in model.students] + ["fused", "all"]
    if args.student not in valid:
        p.error(f"--student {args.student!r} is not in this run; valid: {', '.join(valid)}")
    crop = args.crop or cfg["crop"]
    amp = autocast(device, "off" if args.fp32 else "auto")

    if args.predict:
        name = "fused" if args.student == "all" else args.student
        files = predict_folder(model, info, args.predict, args.out, crop, device, args.stride, name, amp)
        print(f"wrote {len(files)} files ({name} prediction) to {args.out}")
        return files

    # The run's own split lists when train.py wrote them (<run>/splits), else the config's source.
    run_splits = os.path.join(os.path.dirname(ckpt), "splits") if ckpt else ""
    splits = data.make_splits(info, cfg["ratio"], args.data_root or cfg["data_root"],
                              run_splits if os.path.isdir(run_splits) else cfg["splits"], seed=cfg["seed"])
    loader = data.val_loader(info, dataclasses.replace(splits, val=getattr(splits, args.split)), workers=args.workers)
    names = None if args.student == "all" else [args.student]
    cms = evaluate(model, loader, crop, len(info.classes), names, device, amp, stride=args.stride)
    print(f"{ckpt or args.release}: {args.split} split, {len(loader)} images, crop {crop}, fusion {model.fusion}\n"
          f"{format_table(cms, info.classes)}")
    if published is not None:  # the folder name carries the authors' figure (their students were never fused)
        print(f"published {published:.2f} | ours: " + ", ".join(f"{n} {100 * cm.miou():.2f}" for n, cm in cms.items()))
    result = dict(checkpoint=os.path.abspath(ckpt or args.release), split=args.split, crop=crop,
                  stride=args.stride or crop * 5 // 6, fusion=model.fusion, published=published,
                  results={n: cm.to_dict(info.classes) for n, cm in cms.items()})
    out_dir = args.save if args.release else os.path.dirname(ckpt)
    if out_dir:
        stem = "best" if args.release else os.path.splitext(os.path.basename(ckpt))[0]
        out = os.path.join(out_dir, f"eval_{args.split}" + ("" if stem == "best" else f"_{stem}") + ".json")
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    cli(main)
