"""data.py: from files on disk to the tensors one training step consumes (METHOD.md sections 5-6).

Images and labels (`load_image`, `load_label`: 8-bit index PNGs with the dataset's
reduce_zero_label, or RGB images in its palette colours), the split lists (the paper's, shipped in
splits/; a folder of the user's; or a seeded draw), the weak and strong augmentations with the
CutMix boxes, the datasets and the loaders. What each dataset is (classes, palette, recipe) is
plumbing/catalog.py's.

No equation is computed here; an unlabelled sample carries what the step needs for them: the weak
view (pseudo-labels, E6), two strong views with their CutMix boxes (METHOD.md section 4, step 2)
and the padding mask (the valid pixels V of E6). The label of an unlabelled image is for logging
only. On disk (the authors' prepared release): <root>/images/<file>, <root>/labels/<file>; split
lists hold one `images/<file> labels/<file>` line per sample (`images/<file>` alone for an image
without a label), relative to the data root.

Batches are counted in global terms, as the release counts them (plumbing/batches.py: its 4
processes x per-GPU batch, its DistributedSampler's order and epoch length). The training rescale
is each dataset's released pipeline (mmseg's Resize, short side to base_size x U(0.5, 2.0); LoveDA
UniMatch's PIL resize: plumbing/catalog.py's `resize`). Choices, where the sources leave room:
augmentations are a pure function of (seed, epoch, index), so a resumed or re-run epoch sees the
same samples whatever the workers. Deliberately left out: photometric distortion of the labelled
view (off in the released runs), mmseg's cat_max_ratio crop rule (not in METHOD.md).
"""

import hashlib
import math
import os
import random
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset

from plumbing.atomic import replacing
from plumbing.batches import RunSampler
from plumbing.catalog import PAPER_SPLITS, parse_ratio
from plumbing.errors import UserError
from plumbing.runtime import ignore_stop_signals, kill_workers_at_exit

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
# --splits seeded: draw the labelled set with the run's seed instead of reading lists
SEEDED = "seeded"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # both students take ImageNet-normalised images (METHOD.md 2)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN255, _STD255 = (torch.tensor(v).view(3, 1, 1) * 255 for v in (IMAGENET_MEAN, IMAGENET_STD))
MIX_SOURCES = ("partner", "same", "rolled")
# the streams' order: each its own seeded sampler (ours), or one shared by all (the release)
ORDERS = ("own", "shared")
# the lists of a Splits (each written as <name>.txt), as the messages spell them
SETS = {"labeled": "labelled", "unlabeled": "unlabelled", "val": "val"}

# -----------------------------------------------------------------------------
# reading files


def _images(folder, exts=IMAGE_EXTS):
    """The names of a folder's images (extensions `exts`), sorted."""
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(exts))


def list_images(path, exts=IMAGE_EXTS):
    """[path] for an image file; the images of a folder (extensions `exts`), sorted. Two formats of
    one stem would give one output name, so they are an error (eval.py's masks, tools/scene.py's
    outputs are named by the stem)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"{path!r} does not exist (expected an image file or a folder of images)")
    if not (names := _images(path, exts)):
        raise UserError(f"no images in {path!r}; accepted extensions: {' '.join(exts)}")
    stems = [os.path.splitext(f)[0] for f in names]
    if twins := sorted({s for s in stems if stems.count(s) > 1}):
        raise UserError(f"{path!r}: images {twins} share a name in several formats (one output)")
    return [os.path.join(path, f) for f in names]


def _open(path, what):
    """The PIL image at `path`, loaded; a missing, unreadable or truncated file is an error naming it
    (`what`: image or label)."""
    try:
        with Image.open(path) as im:
            im.load()
        return im
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read {what} {path}: {e}") from e


def load_image(path):
    """RGB PIL image; an unreadable, truncated or non-RGB-like file is an error naming it."""
    im = _open(path, "image")
    if im.mode not in ("RGB", "RGBA", "L", "P"):
        raise UserError(f"cannot read image {path}: mode {im.mode} (expected RGB)")
    return im if im.mode == "RGB" else im.convert("RGB")


def load_label(path, info):
    """(H, W) uint8 class map: 0..N-1, 255 = ignore. Index labels get reduce_zero_label when the
    dataset uses it (raw 0 -> 255, raw k -> k-1); RGB labels are decoded by exact palette colour
    (black -> 255). Any value outside the classes is an error naming the file and the value."""
    im, n, zero = _open(path, "label"), len(info.classes), info.reduce_zero_label
    mode, raw = im.mode, np.asarray(im.convert("RGB") if im.mode in ("RGB", "RGBA") else im)
    if mode in ("RGB", "RGBA"):  # colour-coded label (e.g. raw ISPRS): exact palette colours only
        code = raw.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])  # (H, W): 0xRRGGBB
        lut = {0: 255} | {(r << 16) | (g << 8) | b: k for k, (r, g, b) in enumerate(info.palette)}
        colours, inverse = np.unique(code, return_inverse=True)
        bad = [tuple(int(c) >> s & 255 for s in (16, 8, 0)) for c in colours if int(c) not in lut]
        if bad:
            raise UserError(
                f"label {path} has colour(s) {bad[:5]} that are not in the {info.name} palette "
                f"{info.palette} (black = ignore)"
            )
        return np.array([lut[int(c)] for c in colours], np.uint8)[inverse.reshape(code.shape)]
    if mode not in ("L", "P", "I", "I;16"):
        raise UserError(f"label {path} has mode {mode}; expected an 8-bit index PNG (mode L or P)")
    top = n + 1 if zero else n  # raw values 0..top-1 are valid, plus 255
    values = np.unique(raw) if raw.dtype != np.uint8 else np.flatnonzero(np.bincount(raw.ravel()))
    bad = values[((values >= top) & (values != 255)) | (values < 0)]
    if bad.size:
        raise UserError(
            f"label {path} has value(s) {bad[:10].tolist()} outside the {n} classes of {info.name} "
            f"(valid: 0..{top - 1} and 255 = ignore{', raw 0 = ignore too' if zero else ''})"
        )
    # raw value -> class in one pass; reduce_zero_label: 0 -> 255, k -> k-1, 255 stays
    return np.array([255, *range(254), 255] if zero else range(256), np.uint8)[raw]


# -----------------------------------------------------------------------------
# splits (METHOD.md section 6)


@dataclass
class Splits:
    labeled: list  # [(image_path, label_path)], absolute paths
    # [(image_path, label_path or None)]: the label, when one exists, is only for logging
    unlabeled: list
    val: list  # [(image_path, label_path)]
    root: str = ""  # data root the lists are relative to when written (write_splits)
    # where the lists came from (recorded in config.json)
    source: str = field(default="", compare=False)


def _read_list(path, root, labelled=True):
    """Read one split file; lines `images/x labels/x` (or, unless `labelled`, `images/x` for an
    image without a label)."""
    if not os.path.isfile(path):
        raise UserError(f"split file {path} not found")
    rows = [line.split() for line in Path(path).read_text().splitlines()]
    for n, row in enumerate(rows, 1):
        if len(row) > 2 or (labelled and len(row) == 1):
            raise UserError(f"{path}:{n}: expected 'images/<file> labels/<file>', got {row}")
    full = lambda p: os.path.abspath(os.path.join(root, p))
    return [(full(p[0]), full(p[1]) if len(p) == 2 else None) for p in rows if p]


# labels/<same name>, else labels/<stem>.png (e.g. mer: .jpg images)
def _find_label(root, name):
    paths = (os.path.join(root, "labels", n) for n in (name, os.path.splitext(name)[0] + ".png"))
    return next((os.path.abspath(p) for p in paths if os.path.isfile(p)), None)


def make_splits(info, ratio, data_root=None, splits_dir=None, seed=0, check=True):
    """Labelled / unlabelled / val lists. splits_dir:
    - None: the paper's lists for its six datasets; for others labeled.txt / unlabeled.txt / val.txt
      in the data root when present; else a seeded draw;
    - a folder in the paper's layout, <dir>/<name>/<ratio>/{labeled,unlabeled}.txt and
      <dir>/<name>/val.txt, or holding labeled.txt, unlabeled.txt, val.txt itself (what write_splits
      wrote for a run): ratio ignored;
    - 'seeded': pool = images/* (sorted) minus val; val = <root>/val.txt if present, else a hold-out of
      10% of the labelled images drawn with a FIXED seed (0), so runs with different seeds share it;
      labelled = floor(pool x ratio) images drawn from the pool's labelled images with `seed`;
      unlabelled = the rest of the pool, images without a label file included. ratio '1' = all
      labelled.
    check=True verifies that every listed file exists (check=False: lists only)."""
    ratio = parse_ratio(ratio)
    root = data_root or os.path.join("data", info.name)
    if check and not os.path.isdir(root):
        raise UserError(
            f"data root '{root}' not found: expected {root}/images/<file> and {root}/labels/<file>; pass "
            f"--data-root{f', or fetch it with `python -m tools.download {info.name}`' if info.hub_folder else ''}"
        )
    if splits_dir is None and os.path.isdir(os.path.join(PAPER_SPLITS, info.name)):
        splits_dir = PAPER_SPLITS  # the paper's lists, for its six datasets
    elif splits_dir is None and os.path.isfile(os.path.join(root, "labeled.txt")):
        splits_dir = root  # else the data root's own lists, else (None) a seeded draw
    seeded = splits_dir in (None, SEEDED)
    splits = _draw(root, ratio, seed) if seeded else _read_splits(info, ratio, root, splits_dir)
    # the same checks whatever the source: no empty set, no image in two sets, and (check) every
    # listed file exists (labels where needed: _read_list; a draw labels only what has a label)
    for name, spelled in SETS.items():
        if not getattr(splits, name):
            raise UserError(
                f"the {spelled} set of {info.name} (ratio {ratio.replace('_', '/')}) is empty; "
                "use another ratio or more images"
            )
    labeled, unlabeled, val = ({img for img, _ in getattr(splits, name)} for name in SETS)
    overlap = (labeled & unlabeled) | ((labeled | unlabeled) & val)
    if overlap:
        raise UserError(f"{len(overlap)} image(s) are in two split lists, e.g. {min(overlap)}")
    listed = splits.labeled + splits.unlabeled + splits.val
    missing = [p for pair in listed for p in pair if p and not os.path.isfile(p)] if check else []
    if missing:
        raise UserError(
            f"{len(missing)} file(s) listed in the splits ({splits.source}) are missing "
            f"under {root}, e.g. {missing[:3]}; check --data-root"
        )
    return splits


def _read_splits(info, ratio, root, splits_dir):
    """Split files: flat <dir>/{labeled,unlabeled,val}.txt (written by write_splits, or a user's
    own), or the paper's <dir>/<name>/<ratio>/..."""
    if not os.path.isdir(splits_dir):
        raise UserError(f"split folder '{splits_dir}' not found (--splits: a folder or '{SEEDED}')")
    subdirs = lambda d: sorted(x for x in os.listdir(d) if os.path.isdir(os.path.join(d, x)))
    ratio_dir = val_dir = splits_dir
    if not os.path.isfile(os.path.join(splits_dir, "labeled.txt")):  # the paper's layout
        val_dir = os.path.join(splits_dir, info.name)
        ratio_dir = os.path.join(val_dir, ratio)
        if not os.path.isdir(val_dir):
            have = ", ".join(subdirs(splits_dir)) or "nothing"
            raise UserError(f"no split folder for '{info.name}' in {splits_dir}; it has: {have}")
        if not os.path.isdir(ratio_dir):
            ratios = [d.replace("_", "/") for d in subdirs(val_dir) if d != "all"]
            raise UserError(
                f"no ratio {ratio.replace('_', '/')} in the {info.name} split lists ({val_dir}); "
                f"they have: {', '.join(sorted(ratios, key=Fraction)) or 'none'}"
            )
    source = os.path.abspath(ratio_dir)
    if os.path.abspath(splits_dir) == os.path.abspath(PAPER_SPLITS):
        source = f"the paper's lists (splits/{info.name}/{ratio})"
    files = [os.path.join(d, f"{s}.txt") for d, s in zip((ratio_dir, ratio_dir, val_dir), SETS)]
    lists = [_read_list(f, root, labelled=s != "unlabeled") for f, s in zip(files, SETS)]
    return Splits(*lists, os.path.abspath(root), source)


def _draw(root, ratio, seed):
    """The seeded draw of make_splits."""
    shown = ratio.replace("_", "/")
    folder = os.path.join(root, "images")
    names = _images(folder) if os.path.isdir(folder) else []
    if not names:
        raise UserError(
            f"data root '{root}' has no images ({' '.join(IMAGE_EXTS)}) in images/ to draw a {shown} "
            f"split from (expected {root}/images/<file>, {root}/labels/<file>); pass --data-root"
        )
    pairs = [(os.path.abspath(os.path.join(folder, f)), _find_label(root, f)) for f in names]
    if os.path.isfile(os.path.join(root, "val.txt")):
        val = _read_list(os.path.join(root, "val.txt"), root)
    else:  # held-out val: 10% of the labelled images, drawn with a fixed seed
        held = [p for p in pairs if p[1]]
        random.Random(0).shuffle(held)
        val = sorted(held[: max(1, len(held) // 10)])
    val_images = {img for img, _ in val}
    pool = [p for p in pairs if p[0] not in val_images]
    candidates = [p for p in pool if p[1]]
    # floor(N_pool x ratio), METHOD.md section 6; ratio 1: every labelled image of the pool
    n = len(candidates) if ratio == "1" else int(len(pool) * Fraction(shown))
    if n > len(candidates):
        raise UserError(
            f"ratio {shown} asks for {n} labelled images but only {len(candidates)} pool images "
            f"in {root} have a label; use a smaller ratio or --ratio 1"
        )
    random.Random(seed).shuffle(candidates)
    rest = sorted(set(pool) - set(candidates[:n]))  # in the pool's order: by image path
    source = f"seeded draw of {shown} (seed {seed})"
    return Splits(sorted(candidates[:n]), rest, val, os.path.abspath(root), source)


def write_splits(splits, folder):
    """Write labeled.txt / unlabeled.txt / val.txt (the paper's line format, relative to
    splits.root), each atomically, so that make_splits(info, ratio, root, splits_dir=folder)
    repeats the run exactly."""
    os.makedirs(folder, exist_ok=True)
    rel = lambda p: os.path.relpath(p, splits.root) if splits.root else p
    for name in SETS:
        with replacing(os.path.join(folder, f"{name}.txt")) as tmp, open(tmp, "w") as f:
            f.writelines(" ".join(rel(p) for p in row if p) + "\n" for row in getattr(splits, name))


# -----------------------------------------------------------------------------
# augmentations (METHOD.md section 5); every random draw comes from `rng`, a random.Random


def rescale_size(w, h, rng, base_size, resize="cv2"):
    """The training rescale's output size (w, h), drawn from rng as the released pipeline draws it.
    'cv2', mmseg 0.24's Resize(img_scale=(4 base, base), ratio_range=(0.5, 2.0)): r ~ U(0.5, 2.0),
    the target edges TRUNCATED (random_sample_ratio: int(4 base r), int(base r)), then mmcv's
    rescale_size: factor min(long target / long side, short target / short side), each side
    rounded half up (int(side x factor + 0.5)); base_size None: the image's own short side. So a
    512 px tile becomes floor(512 r). 'pil', UniMatch's resize (the release's LoveDA, img_scale
    None): the long side an integer drawn in [int(L / 2), int(2 L)] of the image's own long side
    L, the other side rounded half up."""
    if resize == "pil":
        long = rng.randint(int(max(w, h) * 0.5), int(max(w, h) * 2.0))
        return (int(w * long / h + 0.5), long) if h > w else (long, int(h * long / w + 0.5))
    base, r = base_size or min(w, h), rng.uniform(0.5, 2.0)
    factor = min(int(4 * base * r) / max(w, h), int(base * r) / min(w, h))
    return max(1, int(w * factor + 0.5)), max(1, int(h * factor + 0.5))


def rescale(img, label, size, resize="cv2"):
    """(H, W, 3) uint8 image and (H, W) label at `size` (w, h): 'cv2' as mmseg's Resize does
    (OpenCV bilinear, labels OpenCV nearest: resize_bilinear, resize_nearest), 'pil' as UniMatch's
    (PIL bilinear, which antialiases when shrinking, and PIL nearest)."""
    if resize == "pil":
        lab = Image.fromarray(label).resize(size, Image.NEAREST)
        return np.asarray(img.resize(size, Image.BILINEAR)), np.asarray(lab)
    return resize_bilinear(np.asarray(img), size), resize_nearest(label, size)


def weak_augment(img, label, rng, base_size, crop, resize="cv2"):
    """Rescale (rescale_size and rescale: the dataset's released pipeline, `resize` of its
    DatasetInfo), pad right/bottom to the crop (image 0, label 255), random crop, horizontal flip
    p 0.5. Returns PIL image, (c, c) long label, (c, c) bool padding."""
    size = rescale_size(*img.size, rng, base_size, resize)
    im, lab = rescale(img, label, size, resize)
    x, y = rng.randint(0, max(size[0] - crop, 0)), rng.randint(0, max(size[1] - crop, 0))
    out_im, out_lab = np.zeros((crop, crop, 3), np.uint8), np.full((crop, crop), 255, np.uint8)
    pad = np.ones((crop, crop), bool)  # True where the crop window runs past the rescaled image
    window = np.s_[y : y + crop, x : x + crop]
    ph, pw = lab[window].shape
    out_im[:ph, :pw], out_lab[:ph, :pw], pad[:ph, :pw] = im[window], lab[window], False
    if rng.random() < 0.5:
        out_im, out_lab, pad = out_im[:, ::-1], out_lab[:, ::-1], pad[:, ::-1]
    out_im = Image.fromarray(np.ascontiguousarray(out_im))
    return out_im, torch.from_numpy(out_lab.astype(np.int64)), torch.from_numpy(pad.copy())


def strong_augment(img, rng):
    """Strong view of a PIL image: photometric only, so the label and the padding mask stay valid.
    ColorJitter(0.5, 0.5, 0.5, 0.25) p 0.8 (factors and random order drawn like torchvision's),
    grayscale p 0.2, Gaussian blur sigma U(0.1, 2) p 0.5 (PIL's blur, as UniMatch/Co2S)."""
    if rng.random() < 0.8:
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        factors = [rng.uniform(0.5, 1.5) for _ in range(3)] + [rng.uniform(-0.25, 0.25)]
        for k in rng.sample(range(4), 4):
            img = ops[k](img, factors[k])
    if rng.random() < 0.2:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    return img


def cutmix_box(size, rng, p=0.5, area=(0.02, 0.4), aspect=(0.3, 1 / 0.3)):
    """(size, size) bool CutMix box, drawn as the release does: with probability p, an area U(0.02,
    0.4) of the crop, then (aspect h/w U(0.3, 1/0.3), top-left corner uniform in the crop) redrawn
    TOGETHER until the box fits inside; else all False. Redrawing both favours squarer boxes (they
    fit in more places)."""
    box = np.zeros((size, size), bool)
    if rng.random() < p:
        target = rng.uniform(*area) * size * size
        while True:
            r = rng.uniform(*aspect)
            w, h = int(math.sqrt(target / r)), int(math.sqrt(target * r))
            x, y = rng.randint(0, size - 1), rng.randint(0, size - 1)
            if x + w <= size and y + h <= size:
                break
        box[y : y + h, x : x + w] = True
    return torch.from_numpy(box)


def eval_resize(img, short):
    """The release's test-time resize (mmseg Resize with keep_ratio, cv2 bilinear on the uint8
    image): the short side to `short`, sizes rounded half up, bilinear with half-pixel centres and
    no antialiasing. short None: the image as stored. Only the image is resized; predictions go back
    to the label's size."""
    w, h = img.size
    size = (int(w * short / min(w, h) + 0.5), int(h * short / min(w, h) + 0.5)) if short else (w, h)
    return img if size == (w, h) else Image.fromarray(resize_bilinear(np.asarray(img), size))


def resize_bilinear(im, size):
    """(H, W, 3) uint8 -> size (w, h), as OpenCV's INTER_LINEAR (mmcv.imresize, the release's
    train and test resize): half-pixel centres, edge pixels repeated, NO antialiasing when shrinking
    (PIL's bilinear filter widens with the scale). In float, rounded half up: OpenCV's own
    fixed-point arithmetic rounds otherwise, so about one value in eight differs from
    cv2.resize by one grey level (never more; shares measured in tests/test_data.py)."""
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float()  # a writable copy
    # (antialias False by default)
    x = torch.nn.functional.interpolate(x, size=size[::-1], mode="bilinear", align_corners=False)
    # OpenCV's fixed point rounds halves up (torch.round would round them to even)
    return x[0].add_(0.5).floor_().clamp_(0, 255).byte().permute(1, 2, 0).numpy()


def resize_nearest(label, size):
    """(H, W) array -> size (w, h), as OpenCV's INTER_NEAREST: output pixel x reads source pixel
    floor(x * src / dst) (in OpenCV's double arithmetic), not the pixel under its centre as PIL."""
    # source index of each output index (dst of them, from n); astype truncates: floor, as >= 0
    src = lambda dst, n: np.minimum((np.arange(dst) * (1.0 / (dst / n))).astype(np.int64), n - 1)
    return label[src(size[1], label.shape[0])[:, None], src(size[0], label.shape[1])[None, :]]


def normalize(img):
    """PIL RGB -> (3, H, W) float32, ImageNet mean/std (in place on one copy: this is a hot
    path)."""
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))).float()
    return x.sub_(_MEAN255).div_(_STD255)


class SemiDataset(Dataset):
    """One list of (image, label) items in one mode: 'labeled', 'unlabeled' or 'val' (see
    __getitem__), indexed by (epoch, index) keys (RunSampler's; val_loader's are epoch 0). length >
    len(items) repeats the list cyclically (the labelled list repeated to match the unlabelled one).
    The augmentation of item i in epoch e depends only on (seed, e, i): the same whatever
    num_workers."""

    def __init__(self, info, items, mode, *, crop=None, seed=0, length=None):
        assert mode in ("labeled", "unlabeled", "val"), f"unknown mode {mode!r}"  # never a fallback
        self.info, self.items, self.mode = info, list(items), mode
        self.crop, self.seed, self.length = crop or info.crop, seed, length or len(items)

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        epoch, index = key
        img_path, lab_path = self.items[index % len(self.items)]
        # (a labelled or val item has a label: _read_list, _draw)
        img, info = load_image(img_path), self.info
        label = load_label(lab_path, info) if lab_path else np.full(img.size[::-1], 255, np.uint8)
        if label.shape != img.size[::-1]:
            raise UserError(
                f"size mismatch: image {img_path} is {img.width}x{img.height}, "
                f"label {lab_path} is {label.shape[1]}x{label.shape[0]}"
            )
        # val: the full image at the evaluation size, the label as stored (eval.py)
        if self.mode == "val":
            img, name = normalize(eval_resize(img, info.eval_size)), os.path.basename(img_path)
            return {"img": img, "label": torch.from_numpy(label).long(), "name": name}
        # augmentations are a pure function of (seed, epoch, index)
        digest = hashlib.sha256(f"{self.seed}/{epoch}/{index}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        # (c, c) each
        img, label, pad = weak_augment(img, label, rng, info.base_size, self.crop, info.resize)
        if self.mode == "labeled":
            return {"img": normalize(img), "label": label}
        # two independent strong views of the weak crop, each with its own CutMix box (E6 uses both)
        s1, box1 = strong_augment(img, rng), cutmix_box(self.crop, rng)
        s2, box2 = strong_augment(img, rng), cutmix_box(self.crop, rng)
        views = {"img_w": normalize(img), "img_s1": normalize(s1), "img_s2": normalize(s2)}
        # label: logging of pseudo-label quality only
        return views | {"ignore": pad, "box1": box1, "box2": box2, "label": label}


# -----------------------------------------------------------------------------
# batches in global terms, and loaders: one sampler for the whole run, so the workers start once


@dataclass(frozen=True)
class Streams:
    """How the training streams are drawn: crop, seed, CutMix partners (MIX_SOURCES), loader
    workers, the streams' order (ORDERS)."""

    crop: int
    seed: int = 0
    mix_source: str = "partner"
    workers: int = 2
    pin_memory: bool = False
    order: str = "own"


def train_loaders(info, splits, layout, streams, steps, method="co2s"):
    """The loaders of one run's optimizer steps `steps` (a range), by name: 'labeled' crops, and
    unless `method` is 'supervised' (E5 only: no unlabelled image is even loaded) 'unlabeled' weak
    + strong views and, unless mix_source is 'rolled', their CutMix 'partner's. Each yields
    layout.accum micro-batches per step. Stream k has its own seed (seed*3 + k) for its
    augmentations and, with order 'own', for its order. Order 'shared' (the release: two
    DistributedSamplers of one length and one seed, zipped) gives every stream the same order,
    seeded by `seed` itself: step t visits index i of each list (the labelled list repeated), and
    at seed 0 the release's own DistributedSampler order. Partners: 'partner' another unlabelled
    image (ours), 'same' the same image under another augmentation (the released code iterates
    one sampler twice), 'rolled' none (co2s.py rolls the batch)."""
    for name, valid in (("mix_source", MIX_SOURCES), ("order", ORDERS)):
        if getattr(streams, name) not in valid:
            raise ValueError(f"unknown {name} {getattr(streams, name)!r}; valid: {valid}")
    n, seed = len(splits.unlabeled), streams.seed
    own = lambda k: seed if streams.order == "shared" else seed * 3 + k
    # name: (mode, items, seed of the order, seed of the augmentations)
    todo = {"labeled": ("labeled", splits.labeled, own(0), seed * 3)}
    if method != "supervised":
        todo["unlabeled"] = ("unlabeled", splits.unlabeled, own(1), seed * 3 + 1)
    if method != "supervised" and streams.mix_source != "rolled":
        # another image's partner keeps an order of its own, shared or not
        order_seed = seed * 3 + 2 if streams.mix_source == "partner" else own(1)
        todo["partner"] = ("unlabeled", splits.unlabeled, order_seed, seed * 3 + 2)
    loaders = {}
    kill_workers_at_exit()
    kw = dict(num_workers=streams.workers, pin_memory=streams.pin_memory, drop_last=True)
    kw["worker_init_fn"] = ignore_stop_signals  # stop signals: the main process stops them
    for name, (mode, items, order_seed, aug_seed) in todo.items():
        ds = SemiDataset(info, items, mode, crop=streams.crop, seed=aug_seed, length=n)
        sampler = RunSampler(n, layout, order_seed, steps)
        # own generator: the loader must not draw from (and so shift) the global torch RNG
        gen = torch.Generator().manual_seed(order_seed)
        loaders[name] = DataLoader(ds, layout.micro, sampler=sampler, generator=gen, **kw)
    return loaders


def val_loader(info, items, *, workers=2, rank=0, world_size=1):
    """Full val images of `items`, batch 1; under DDP rank r takes items r, r+W, ... (no padding
    duplicates). Its workers persist, so evaluating every epoch does not restart them."""
    items = items[rank::world_size]
    kill_workers_at_exit()
    ds = SemiDataset(info, items, "val") if items else []
    kw = dict(persistent_workers=workers > 0 and bool(items), worker_init_fn=ignore_stop_signals)
    return DataLoader(ds, sampler=[(0, i) for i in range(len(items))], num_workers=workers, **kw)
