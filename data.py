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
MIX_SOURCES = ("partner", "same", "rolled")
# the streams' order: each its own seeded sampler (ours), or one shared by all (the release)
ORDERS = ("own", "shared")

# -----------------------------------------------------------------------------
# reading files


def list_images(folder):
    """The images of a folder (extensions IMAGE_EXTS), sorted; two formats of one stem would give
    one output name, so they are an error."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder!r} does not exist (expected an image file or a folder of images)")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
    if not names:
        raise UserError(f"no images in {folder!r}; accepted extensions: {' '.join(IMAGE_EXTS)}")
    stems = [os.path.splitext(f)[0] for f in names]
    twins = sorted({s for s in stems if stems.count(s) > 1})
    if twins:
        raise UserError(f"{folder!r}: images {twins} share a name in several formats")
    return [os.path.join(folder, f) for f in names]


def load_image(path):
    """RGB PIL image; an unreadable, truncated or non-RGB-like file is an error naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("RGB", "RGBA", "L", "P"):
                raise ValueError(f"unsupported image mode {im.mode} (expected RGB)")
            return im if im.mode == "RGB" else im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}") from e


def load_label(path, info):
    """(H, W) uint8 class map: 0..N-1, 255 = ignore. Index labels get reduce_zero_label when the
    dataset uses it (raw 0 -> 255, raw k -> k-1); RGB labels are decoded by exact palette colour
    (black -> 255). Any value outside the classes is an error naming the file and the value."""
    try:
        with Image.open(path) as im:
            im.load()
            mode, raw = im.mode, np.asarray(im.convert("RGB") if im.mode in ("RGB", "RGBA") else im)
    except FileNotFoundError:
        raise UserError(f"label not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read label {path}: {e}") from e
    n = len(info.classes)
    if mode in ("RGB", "RGBA"):  # colour-coded label (e.g. raw ISPRS): exact palette colours only
        code = (
            (raw[..., 0].astype(np.int64) << 16) | (raw[..., 1].astype(np.int64) << 8) | raw[..., 2]
        )
        lut = {0: 255} | {(r << 16) | (g << 8) | b: k for k, (r, g, b) in enumerate(info.palette)}
        colours, inverse = np.unique(code, return_inverse=True)
        bad = [
            (int(c) >> 16, (int(c) >> 8) & 255, int(c) & 255) for c in colours if int(c) not in lut
        ]
        if bad:
            raise UserError(
                f"label {path} has colour(s) {bad[:5]} that are not in the {info.name} palette "
                f"{info.palette} (black = ignore)"
            )
        return np.array([lut[int(c)] for c in colours], np.uint8)[inverse.reshape(code.shape)]
    if mode not in ("L", "P", "I", "I;16"):
        raise UserError(f"label {path} has mode {mode}; expected an 8-bit index PNG (mode L or P)")
    top = n + 1 if info.reduce_zero_label else n  # raw values 0..top-1 are valid, plus 255
    values = (
        np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
        if raw.dtype == np.uint8
        else np.unique(raw)
    )
    bad = values[((values >= top) & (values != 255)) | (values < 0)]
    if bad.size:
        zero = ", raw 0 = ignore too" if info.reduce_zero_label else ""
        raise UserError(
            f"label {path} has value(s) {bad[:10].tolist()} outside the {n} classes of {info.name} "
            f"(valid: 0..{top - 1} and 255 = ignore{zero})"
        )
    lut = np.arange(256, dtype=np.uint8)  # raw value -> class, in one pass
    if info.reduce_zero_label:
        lut = np.array([255] + list(range(254)) + [255], np.uint8)  # 0 -> 255, k -> k-1, 255 stays
    return lut[raw]


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


def _read_list(path, root):
    """Read one split file; lines `images/x labels/x` (or `images/x` for an image without a
    label)."""
    items = []
    with open(path) as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2:
            raise UserError(
                f"{path}:{n}: expected 'images/<file> labels/<file>', got '{line.strip()}'"
            )
        items.append(
            (
                os.path.abspath(os.path.join(root, parts[0])),
                os.path.abspath(os.path.join(root, parts[1])) if len(parts) == 2 else None,
            )
        )
    return items


# labels/<same name>, else labels/<stem>.png (e.g. mer: .jpg images)
def _find_label(root, image_name):
    for name in (image_name, os.path.splitext(image_name)[0] + ".png"):
        path = os.path.join(root, "labels", name)
        if os.path.isfile(path):
            return os.path.abspath(path)
    return None


def default_splits_dir(info, root):
    """Where the lists come from without --splits: the paper's (shipped) for its six datasets; for
    others labeled.txt / unlabeled.txt / val.txt in the data root when present; else None (a seeded
    draw)."""
    if os.path.isdir(os.path.join(PAPER_SPLITS, info.name)):
        return PAPER_SPLITS
    return root if os.path.isfile(os.path.join(root, "labeled.txt")) else None


def make_splits(info, ratio, data_root=None, splits_dir=None, seed=0, check=True):
    """Labelled / unlabelled / val lists. splits_dir:
    - None: default_splits_dir (the paper's lists for the paper's datasets);
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
    if splits_dir is None:
        splits_dir = default_splits_dir(info, root)
    if splits_dir in (None, SEEDED):
        if not os.path.isdir(os.path.join(root, "images")):
            raise UserError(
                f"data root '{root}' has no images/ folder to draw a {ratio.replace('_', '/')} split from "
                f"(expected {root}/images/<file>, {root}/labels/<file>); pass --data-root"
            )
        splits = _generate_splits(root, ratio, seed)
    else:
        splits = _read_splits(info, ratio, root, splits_dir)
    check_splits(splits, info, ratio, root, files=check)
    return splits


def check_splits(splits, info, ratio, root, files=True):
    """The same checks whatever the source: no empty set, labels where needed, no image in two
    sets, and (files) every listed file exists."""
    for name, items in (
        ("labelled", splits.labeled),
        ("unlabelled", splits.unlabeled),
        ("val", splits.val),
    ):
        if not items:
            raise UserError(
                f"the {name} set of {info.name} (ratio {ratio.replace('_', '/')}) is "
                f"empty; use another ratio or more images"
            )
    no_label = [img for img, lab in splits.labeled + splits.val if lab is None]
    if no_label:
        raise UserError(f"labelled / val entry {no_label[0]} has no label path")
    labeled, unlabeled, val = (
        {img for img, _ in x} for x in (splits.labeled, splits.unlabeled, splits.val)
    )
    overlap = (labeled & unlabeled) | ((labeled | unlabeled) & val)
    if overlap:
        raise UserError(
            f"{len(overlap)} image(s) are in two split lists, e.g. {sorted(overlap)[0]}"
        )
    missing = missing_files(splits) if files else []
    if missing:
        raise UserError(
            f"{len(missing)} file(s) listed in the splits ({splits.source}) are missing "
            f"under {root}, e.g. {missing[:3]}; check --data-root"
        )


def missing_files(splits):
    return [
        p
        for img, lab in splits.labeled + splits.unlabeled + splits.val
        for p in (img, lab)
        if p and not os.path.isfile(p)
    ]


def _read_splits(info, ratio, root, splits_dir):
    """Split files: flat <dir>/{labeled,unlabeled,val}.txt, or the paper's
    <dir>/<name>/<ratio>/..."""
    if not os.path.isdir(splits_dir):
        raise UserError(
            f"split folder '{splits_dir}' not found (--splits takes a folder, or '{SEEDED}')"
        )
    subdirs = lambda d: sorted(x for x in os.listdir(d) if os.path.isdir(os.path.join(d, x)))
    # flat: written by write_splits, or a user's own
    if os.path.isfile(os.path.join(splits_dir, "labeled.txt")):
        ratio_dir = val_dir = splits_dir
        source = os.path.abspath(splits_dir)
    else:
        val_dir, ratio_dir = (
            os.path.join(splits_dir, info.name),
            os.path.join(splits_dir, info.name, ratio),
        )
        if not os.path.isdir(val_dir):
            raise UserError(
                f"no split folder for '{info.name}' in {splits_dir}; "
                f"it has: {', '.join(subdirs(splits_dir)) or 'nothing'}"
            )
        if not os.path.isdir(ratio_dir):
            ratios = sorted((d for d in subdirs(val_dir) if d != "all"), key=parse_fraction)
            raise UserError(
                f"no ratio {ratio.replace('_', '/')} in the {info.name} split lists ({val_dir}); "
                f"they have: {', '.join(d.replace('_', '/') for d in ratios) or 'none'}"
            )
        paper = os.path.abspath(splits_dir) == os.path.abspath(PAPER_SPLITS)
        source = (
            f"the paper's lists (splits/{info.name}/{ratio})"
            if paper
            else os.path.abspath(ratio_dir)
        )
    files = [
        os.path.join(ratio_dir, "labeled.txt"),
        os.path.join(ratio_dir, "unlabeled.txt"),
        os.path.join(val_dir, "val.txt"),
    ]
    for f in files:
        if not os.path.isfile(f):
            raise UserError(f"split file {f} not found")
    return Splits(*(_read_list(f, root) for f in files), os.path.abspath(root), source)


def parse_fraction(ratio):
    num, den = ratio.split("_")
    return int(num) / int(den)


def _generate_splits(root, ratio, seed):
    names = sorted(
        f for f in os.listdir(os.path.join(root, "images")) if f.lower().endswith(IMAGE_EXTS)
    )
    if not names:
        raise UserError(f"no images ({' '.join(IMAGE_EXTS)}) in {root}/images")
    pairs = [
        (os.path.abspath(os.path.join(root, "images", f)), _find_label(root, f)) for f in names
    ]
    with_label = [p for p in pairs if p[1]]
    if os.path.isfile(os.path.join(root, "val.txt")):
        val = _read_list(os.path.join(root, "val.txt"), root)
    else:  # held-out val: 10% of the labelled images, drawn with a fixed seed
        held = with_label[:]
        random.Random(0).shuffle(held)
        val = sorted(held[: max(1, len(held) // 10)]) if held else []
    val_images = {img for img, _ in val}
    pool = [p for p in pairs if p[0] not in val_images]
    candidates = [p for p in pool if p[1]]
    if ratio == "1":
        n_labeled = len(candidates)
    else:
        num, den = map(int, ratio.split("_"))
        n_labeled = len(pool) * num // den  # floor(N_pool x ratio), METHOD.md section 6
    if n_labeled > len(candidates):
        raise UserError(
            f"ratio {ratio.replace('_', '/')} asks for {n_labeled} labelled images but only "
            f"{len(candidates)} pool images in {root} have a label; use a smaller ratio or --ratio 1"
        )
    random.Random(seed).shuffle(candidates)
    labeled = sorted(candidates[:n_labeled])
    chosen = {img for img, _ in labeled}
    return Splits(
        labeled,
        [p for p in pool if p[0] not in chosen],
        val,
        os.path.abspath(root),
        f"seeded draw of {ratio.replace('_', '/')} (seed {seed})",
    )


def write_splits(splits, folder):
    """Write labeled.txt / unlabeled.txt / val.txt (the paper's line format, relative to
    splits.root), each atomically, so that make_splits(info, ratio, root, splits_dir=folder)
    repeats the run exactly."""
    os.makedirs(folder, exist_ok=True)
    rel = lambda p: os.path.relpath(p, splits.root) if splits.root else p  # noqa: E731
    for name, items in (
        ("labeled", splits.labeled),
        ("unlabeled", splits.unlabeled),
        ("val", splits.val),
    ):
        lines = [f"{rel(img)} {rel(lab)}\n" if lab else f"{rel(img)}\n" for img, lab in items]
        with replacing(os.path.join(folder, f"{name}.txt")) as tmp, open(tmp, "w") as f:
            f.writelines(lines)


# -----------------------------------------------------------------------------
# augmentations (METHOD.md section 5); every random draw comes from `rng`, a random.Random


def _sample_seed(seed, epoch, index):  # augmentations are a pure function of (seed, epoch, index)
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch}/{index}".encode()).digest()[:8], "little")


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
        return (
            np.asarray(img.resize(size, Image.BILINEAR)),
            np.asarray(Image.fromarray(label).resize(size, Image.NEAREST)),
        )
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
    patch = im[y : y + crop, x : x + crop]
    ph, pw = patch.shape[:2]
    out_im[:ph, :pw], out_lab[:ph, :pw], pad[:ph, :pw] = (
        patch,
        lab[y : y + crop, x : x + crop],
        False,
    )
    if rng.random() < 0.5:
        out_im, out_lab, pad = out_im[:, ::-1], out_lab[:, ::-1], pad[:, ::-1]
    return (
        Image.fromarray(np.ascontiguousarray(out_im)),
        torch.from_numpy(out_lab.astype(np.int64)),
        torch.from_numpy(pad.copy()),
    )


def strong_augment(img, rng):
    """Strong view of a PIL image: photometric only, so the label and the padding mask stay valid.
    ColorJitter(0.5, 0.5, 0.5, 0.25) p 0.8 (factors and random order drawn like torchvision's),
    grayscale p 0.2, Gaussian blur sigma U(0.1, 2) p 0.5 (PIL's blur, as UniMatch/Co2S)."""
    if rng.random() < 0.8:
        b, c, s = rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5)
        h = rng.uniform(-0.25, 0.25)
        ops = [
            lambda x: TF.adjust_brightness(x, b),
            lambda x: TF.adjust_contrast(x, c),
            lambda x: TF.adjust_saturation(x, s),
            lambda x: TF.adjust_hue(x, h),
        ]
        for k in rng.sample(range(4), 4):
            img = ops[k](img)
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
    if rng.random() >= p:
        return torch.from_numpy(box)
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
    x = torch.nn.functional.interpolate(
        x, size=size[::-1], mode="bilinear", align_corners=False, antialias=False
    )
    # OpenCV's fixed point rounds halves up (torch.round would round them to even)
    return x[0].add_(0.5).floor_().clamp_(0, 255).byte().permute(1, 2, 0).numpy()


def resize_nearest(label, size):
    """(H, W) array -> size (w, h), as OpenCV's INTER_NEAREST: output pixel x reads source pixel
    floor(x * src / dst) (in OpenCV's double arithmetic), not the pixel under its centre as PIL."""
    h, w = label.shape
    ys = np.minimum(np.floor(np.arange(size[1]) * (1.0 / (size[1] / h))).astype(np.int64), h - 1)
    xs = np.minimum(np.floor(np.arange(size[0]) * (1.0 / (size[0] / w))).astype(np.int64), w - 1)
    return label[ys[:, None], xs[None, :]]


_MEAN255 = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
_STD255 = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255


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
        if mode not in ("labeled", "unlabeled", "val"):
            raise ValueError(f"unknown mode '{mode}'; valid: labeled, unlabeled, val")
        if not items:
            raise UserError(f"empty {mode} list for {info.name}")
        self.info, self.items, self.mode = info, list(items), mode
        self.crop, self.seed, self.length = crop or info.crop, seed, length or len(items)

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        epoch, index = key
        img_path, label_path = self.items[index % len(self.items)]
        img = load_image(img_path)
        if label_path is None and self.mode != "unlabeled":
            raise UserError(f"{self.mode} item {img_path} has no label")
        label = (
            load_label(label_path, self.info)
            if label_path
            else np.full((img.height, img.width), 255, np.uint8)
        )
        if label.shape != (img.height, img.width):
            raise UserError(
                f"size mismatch: image {img_path} is {img.width}x{img.height}, "
                f"label {label_path} is {label.shape[1]}x{label.shape[0]}"
            )
        # the full image at the evaluation size, the label as stored (eval.py)
        if self.mode == "val":
            return {
                "img": normalize(eval_resize(img, self.info.eval_size)),
                "label": torch.from_numpy(label.astype(np.int64)),
                "name": os.path.basename(img_path),
            }
        rng = random.Random(_sample_seed(self.seed, epoch, index))
        # (c, c) each
        info = self.info
        img, label, pad = weak_augment(img, label, rng, info.base_size, self.crop, info.resize)
        if self.mode == "labeled":
            return {"img": normalize(img), "label": label}
        # two independent strong views of the weak crop, each with its own CutMix box (E6 uses both)
        s1, box1 = strong_augment(img, rng), cutmix_box(self.crop, rng)
        s2, box2 = strong_augment(img, rng), cutmix_box(self.crop, rng)
        return {
            "img_w": normalize(img),
            "img_s1": normalize(s1),
            "img_s2": normalize(s2),
            "ignore": pad,
            # label: logging of pseudo-label quality only
            "box1": box1,
            "box2": box2,
            "label": label,
        }


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
    if streams.mix_source not in MIX_SOURCES:
        raise ValueError(f"unknown mix source {streams.mix_source!r}; valid: {MIX_SOURCES}")
    if streams.order not in ORDERS:
        raise ValueError(f"unknown order {streams.order!r}; valid: {ORDERS}")
    n, seed = len(splits.unlabeled), streams.seed
    own = lambda k: seed if streams.order == "shared" else seed * 3 + k  # noqa: E731
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
    for name, (mode, items, order_seed, aug_seed) in todo.items():
        ds = SemiDataset(info, items, mode, crop=streams.crop, seed=aug_seed, length=n)
        # own generator: the loader must not draw from (and so shift) the global torch RNG
        loaders[name] = DataLoader(
            ds,
            batch_size=layout.micro,
            sampler=RunSampler(n, layout, order_seed, steps),
            num_workers=streams.workers,
            pin_memory=streams.pin_memory,
            drop_last=True,
            generator=torch.Generator().manual_seed(order_seed),
            worker_init_fn=ignore_stop_signals,
        )
    return loaders


def val_loader(info, items, *, workers=2, rank=0, world_size=1):
    """Full val images of `items`, batch 1; under DDP rank r takes items r, r+W, ... (no padding
    duplicates). Its workers persist, so evaluating every epoch does not restart them."""
    items = items[rank::world_size]
    keys = [(0, i) for i in range(len(items))]
    kill_workers_at_exit()
    return DataLoader(
        SemiDataset(info, items, "val") if items else [],
        batch_size=1,
        sampler=keys,
        num_workers=workers,
        persistent_workers=workers > 0 and bool(items),
        worker_init_fn=ignore_stop_signals,
    )
