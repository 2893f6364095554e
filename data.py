"""
data.py: from files on disk to the tensors one training step consumes (shared/METHOD.md sections 5-6).

Holds the labelled / unlabelled / val splits (the paper's lists, shipped in splits/, a folder of the
user's, or a seeded draw), the file scan that runs before the first step, the reading of images and
labels, the weak and strong augmentations with the CutMix boxes, and the loaders. What each dataset
is (classes, palettes, recipe) lives in catalog.py; getting it onto disk in download.py.

On-disk layout (the authors' prepared release): <root>/images/<file> and <root>/labels/<file>, labels
as 8-bit index PNGs (a label may also be an RGB image in the dataset's palette colours: exact palette
colours map to their class, black to 255). Split lists: one `images/<file> labels/<file>` line per
sample (`images/<file>` alone for an image without a label), paths relative to the data root.

No equation is computed here; an unlabelled sample carries what the step needs for them: the weak view
(pseudo-labels, E6), two strong views with their CutMix boxes (METHOD.md section 4, step 2) and the
padding mask (the valid pixels V of E6). The label of an unlabelled image is for logging only.

Choices, where the sources leave room: the rescale follows the released configs (short side to
base_size x U(0.5, 2.0), not UniMatch's scaling of the image's own size); augmentations are a pure
function of (seed, epoch, index), so a resumed or re-run epoch sees the same samples whatever the workers.
Deliberately left out: photometric distortion of the labelled view (off in the released runs), mmseg's
cat_max_ratio crop rule (not in METHOD.md).
"""
import hashlib
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from catalog import PAPER_SPLITS, parse_ratio
from errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # both students take ImageNet-normalised images (METHOD.md section 2)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp', '.webp')
SEEDED = 'seeded'  # --splits seeded: draw the labelled set with the run's seed instead of reading lists

# -----------------------------------------------------------------------------
# splits (METHOD.md section 6)

@dataclass
class Splits:
    labeled: list    # [(image_path, label_path)], absolute paths
    unlabeled: list  # [(image_path, label_path or None)]: the label, when one exists, is only for logging
    val: list        # [(image_path, label_path)]
    root: str = ''   # data root the lists are relative to when written (write_splits)
    source: str = field(default='', compare=False)  # where the lists came from (recorded in config.json)

def _read_list(path, root):
    """Read one split file; lines `images/x labels/x` (or `images/x` for an image without a label)."""
    items = []
    with open(path) as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2:
            raise UserError(f"{path}:{n}: expected 'images/<file> labels/<file>', got '{line.strip()}'")
        items.append((os.path.abspath(os.path.join(root, parts[0])),
                      os.path.abspath(os.path.join(root, parts[1])) if len(parts) == 2 else None))
    return items

def _find_label(root, image_name):  # labels/<same name>, else labels/<stem>.png (e.g. mer: .jpg images)
    for name in (image_name, os.path.splitext(image_name)[0] + '.png'):
        path = os.path.join(root, 'labels', name)
        if os.path.isfile(path):
            return os.path.abspath(path)
    return None

def default_splits_dir(info, root):
    """Where the lists come from without --splits: the paper's (shipped) for its six datasets; for others
    labeled.txt / unlabeled.txt / val.txt in the data root when present; else None (a seeded draw)."""
    if os.path.isdir(os.path.join(PAPER_SPLITS, info.name)):
        return PAPER_SPLITS
    return root if os.path.isfile(os.path.join(root, 'labeled.txt')) else None

def make_splits(info, ratio, data_root=None, splits_dir=None, seed=0, check=True):
    """Labelled / unlabelled / val lists. splits_dir:
    - None: default_splits_dir (the paper's lists for the paper's datasets);
    - a folder in the paper's layout, <dir>/<name>/<ratio>/{labeled,unlabeled}.txt and <dir>/<name>/val.txt,
      or holding labeled.txt, unlabeled.txt, val.txt itself (what write_splits wrote for a run): ratio ignored;
    - 'seeded': pool = images/* (sorted) minus val; val = <root>/val.txt if present, else a hold-out of
      10% of the labelled images drawn with a FIXED seed (0), so runs with different seeds share it;
      labelled = floor(pool x ratio) images drawn from the pool's labelled images with `seed`;
      unlabelled = the rest of the pool, images without a label file included. ratio '1' = all labelled.
    check=True verifies that every listed file exists (check=False: lists only)."""
    ratio = parse_ratio(ratio)
    root = data_root or os.path.join('data', info.name)
    if check and not os.path.isdir(root):
        raise UserError(f"data root '{root}' not found: expected {root}/images/<file> and {root}/labels/<file>; pass "
                        f"--data-root{f', or fetch it with `python download.py {info.name}`' if info.hub_folder else ''}")
    if splits_dir is None:
        splits_dir = default_splits_dir(info, root)
    if splits_dir in (None, SEEDED):
        if not os.path.isdir(os.path.join(root, 'images')):
            raise UserError(f"data root '{root}' has no images/ folder to draw a {ratio.replace('_', '/')} split from "
                            f"(expected {root}/images/<file>, {root}/labels/<file>); pass --data-root")
        splits = _generate_splits(root, ratio, seed)
    else:
        splits = _read_splits(info, ratio, root, splits_dir)
    # the same checks whatever the source: no empty set, labels where needed, no image in two sets, files exist
    for name, items in (('labelled', splits.labeled), ('unlabelled', splits.unlabeled), ('val', splits.val)):
        if not items:
            raise UserError(f'the {name} set of {info.name} (ratio {ratio.replace("_", "/")}) is empty; '
                            f'use another ratio or more images')
    no_label = [img for img, lab in splits.labeled + splits.val if lab is None]
    if no_label:
        raise UserError(f'labelled / val entry {no_label[0]} has no label path')
    labeled, unlabeled, val = ({img for img, _ in x} for x in (splits.labeled, splits.unlabeled, splits.val))
    overlap = (labeled & unlabeled) | ((labeled | unlabeled) & val)
    if overlap:
        raise UserError(f'{len(overlap)} image(s) are in two split lists, e.g. {sorted(overlap)[0]}')
    if check:
        missing = missing_files(splits)
        if missing:
            raise UserError(f'{len(missing)} file(s) listed in the splits ({splits.source}) are missing under '
                            f'{root}, e.g. {missing[:3]}; check --data-root')
    return splits

def missing_files(splits):
    return [p for img, lab in splits.labeled + splits.unlabeled + splits.val for p in (img, lab)
            if p and not os.path.isfile(p)]

def _read_splits(info, ratio, root, splits_dir):
    """Split files: flat <dir>/{labeled,unlabeled,val}.txt, or the paper's <dir>/<name>/<ratio>/..."""
    if not os.path.isdir(splits_dir):
        raise UserError(f"split folder '{splits_dir}' not found (--splits takes a folder, or '{SEEDED}')")
    subdirs = lambda d: sorted(x for x in os.listdir(d) if os.path.isdir(os.path.join(d, x)))
    if os.path.isfile(os.path.join(splits_dir, 'labeled.txt')):  # flat: written by write_splits, or a user's own
        ratio_dir = val_dir = splits_dir
        source = os.path.abspath(splits_dir)
    else:
        val_dir, ratio_dir = os.path.join(splits_dir, info.name), os.path.join(splits_dir, info.name, ratio)
        if not os.path.isdir(val_dir):
            raise UserError(f"no split folder for '{info.name}' in {splits_dir}; "
                            f"it has: {', '.join(subdirs(splits_dir)) or 'nothing'}")
        if not os.path.isdir(ratio_dir):
            ratios = sorted((d for d in subdirs(val_dir) if d != 'all'), key=parse_fraction)
            raise UserError(f"no ratio {ratio.replace('_', '/')} in the {info.name} split lists ({val_dir}); "
                            f"they have: {', '.join(d.replace('_', '/') for d in ratios) or 'none'}")
        paper = os.path.abspath(splits_dir) == os.path.abspath(PAPER_SPLITS)
        source = f"the paper's lists (splits/{info.name}/{ratio})" if paper else os.path.abspath(ratio_dir)
    files = [os.path.join(ratio_dir, 'labeled.txt'), os.path.join(ratio_dir, 'unlabeled.txt'),
             os.path.join(val_dir, 'val.txt')]
    for f in files:
        if not os.path.isfile(f):
            raise UserError(f'split file {f} not found')
    return Splits(*(_read_list(f, root) for f in files), os.path.abspath(root), source)

def parse_fraction(ratio):
    num, den = ratio.split('_')
    return int(num) / int(den)

def _generate_splits(root, ratio, seed):
    names = sorted(f for f in os.listdir(os.path.join(root, 'images')) if f.lower().endswith(IMAGE_EXTS))
    if not names:
        raise UserError(f'no images ({" ".join(IMAGE_EXTS)}) in {root}/images')
    pairs = [(os.path.abspath(os.path.join(root, 'images', f)), _find_label(root, f)) for f in names]
    with_label = [p for p in pairs if p[1]]
    if os.path.isfile(os.path.join(root, 'val.txt')):
        val = _read_list(os.path.join(root, 'val.txt'), root)
    else:  # held-out val: 10% of the labelled images, drawn with a fixed seed
        held = with_label[:]
        random.Random(0).shuffle(held)
        val = sorted(held[:max(1, len(held) // 10)]) if held else []
    val_images = {img for img, _ in val}
    pool = [p for p in pairs if p[0] not in val_images]
    candidates = [p for p in pool if p[1]]
    if ratio == '1':
        n_labeled = len(candidates)
    else:
        num, den = map(int, ratio.split('_'))
        n_labeled = len(pool) * num // den  # floor(N_pool x ratio), METHOD.md section 6
    if n_labeled > len(candidates):
        raise UserError(f'ratio {ratio.replace("_", "/")} asks for {n_labeled} labelled images but only '
                        f'{len(candidates)} pool images in {root} have a label; use a smaller ratio or --ratio 1')
    random.Random(seed).shuffle(candidates)
    labeled = sorted(candidates[:n_labeled])
    chosen = {img for img, _ in labeled}
    return Splits(labeled, [p for p in pool if p[0] not in chosen], val, os.path.abspath(root),
                  f'seeded draw of {ratio.replace("_", "/")} (seed {seed})')

def write_splits(splits, folder):
    """Write labeled.txt / unlabeled.txt / val.txt (paper line format, relative to splits.root) so that
    make_splits(info, ratio, root, splits_dir=folder) repeats the run exactly."""
    os.makedirs(folder, exist_ok=True)
    rel = lambda p: os.path.relpath(p, splits.root) if splits.root else p
    for name, items in (('labeled', splits.labeled), ('unlabeled', splits.unlabeled), ('val', splits.val)):
        with open(os.path.join(folder, f'{name}.txt'), 'w') as f:
            f.writelines(f'{rel(img)} {rel(lab)}\n' if lab else f'{rel(img)}\n' for img, lab in items)

def _check_pair(item, info):
    """'' if an (image, label) pair opens and agrees in size, else what is wrong with it."""
    img_path, label_path = item
    try:
        with Image.open(img_path) as im:
            size = im.size
            im.load()                   # decodes every pixel: catches truncated and corrupt files
        if label_path:
            label = load_label(label_path, info)
            if label.shape != size[::-1]:
                return f'size mismatch: image {img_path} is {size[0]}x{size[1]}, label {label_path} is ' \
                       f'{label.shape[1]}x{label.shape[0]}'
    except UserError as e:
        return str(e)
    except Exception as e:  # PIL raises many types for a bad file
        return f'cannot read image {img_path}: {type(e).__name__}: {e}'
    return ''

def scan_files(splits, info, threads=8, progress=True):
    """Before the first step: every listed image opens, every label decodes to valid classes, and their
    sizes agree. A bad file stops the run here, in seconds, not at the first evaluation an epoch later."""
    items = splits.labeled + splits.unlabeled + splits.val
    with ThreadPoolExecutor(threads) as pool:
        problems = [p for p in tqdm(pool.map(lambda it: _check_pair(it, info), items), total=len(items),
                                    desc='scan files', disable=not progress, leave=False, dynamic_ncols=True) if p]
    if problems:
        more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
        raise UserError(f'{problems[0]}{more}; fix or remove the file(s) from the split lists')

# -----------------------------------------------------------------------------
# reading files

def load_image(path):
    """RGB PIL image; an unreadable, truncated or non-RGB-like file is an error naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ('RGB', 'RGBA', 'L', 'P'):
                raise ValueError(f'unsupported image mode {im.mode} (expected RGB)')
            return im if im.mode == 'RGB' else im.convert('RGB')
    except FileNotFoundError:
        raise UserError(f'image not found: {path}') from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f'cannot read image {path}: {e}') from e

def load_label(path, info):
    """(H, W) uint8 class map: 0..N-1, 255 = ignore. Index labels get reduce_zero_label when the dataset
    uses it (raw 0 -> 255, raw k -> k-1); RGB labels are decoded by exact palette colour (black -> 255).
    Any value outside the classes is an error naming the file and the value."""
    try:
        with Image.open(path) as im:
            im.load()
            mode, raw = im.mode, np.asarray(im.convert('RGB') if im.mode in ('RGB', 'RGBA') else im)
    except FileNotFoundError:
        raise UserError(f'label not found: {path}') from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f'cannot read label {path}: {e}') from e
    n = len(info.classes)
    if mode in ('RGB', 'RGBA'):  # colour-coded label (e.g. raw ISPRS): exact palette colours only
        code = (raw[..., 0].astype(np.int64) << 16) | (raw[..., 1].astype(np.int64) << 8) | raw[..., 2]
        lut = {0: 255} | {(r << 16) | (g << 8) | b: k for k, (r, g, b) in enumerate(info.palette)}
        colours, inverse = np.unique(code, return_inverse=True)
        bad = [(int(c) >> 16, (int(c) >> 8) & 255, int(c) & 255) for c in colours if int(c) not in lut]
        if bad:
            raise UserError(f'label {path} has colour(s) {bad[:5]} that are not in the {info.name} palette '
                             f'{info.palette} (black = ignore)')
        return np.array([lut[int(c)] for c in colours], np.uint8)[inverse.reshape(code.shape)]
    if mode not in ('L', 'P', 'I', 'I;16'):
        raise UserError(f'label {path} has mode {mode}; expected an 8-bit index PNG (mode L or P)')
    top = n + 1 if info.reduce_zero_label else n  # raw values 0..top-1 are valid, plus 255
    values = np.flatnonzero(np.bincount(raw.ravel(), minlength=256)) if raw.dtype == np.uint8 else np.unique(raw)
    bad = values[((values >= top) & (values != 255)) | (values < 0)]
    if bad.size:
        zero = ', raw 0 = ignore too' if info.reduce_zero_label else ''
        raise UserError(f'label {path} has value(s) {bad[:10].tolist()} outside the {n} classes of {info.name} '
                         f'(valid: 0..{top - 1} and 255 = ignore{zero})')
    lut = np.arange(256, dtype=np.uint8)  # raw value -> class, in one pass
    if info.reduce_zero_label:
        lut = np.array([255] + list(range(254)) + [255], np.uint8)  # 0 -> 255, k -> k-1, 255 stays
    return lut[raw]

def colorize(label, palette):
    """Class map -> palette PNG (mode 'P'): class k in palette[k], 255 (and anything unknown) black."""
    flat = [v for colour in palette for v in colour]
    im = Image.fromarray(np.asarray(label).astype(np.uint8), mode='P')
    im.putpalette(flat + [0] * (768 - len(flat)))
    return im

# -----------------------------------------------------------------------------
# augmentations (METHOD.md section 5); every random draw comes from `rng`, a random.Random

def _sample_seed(seed, epoch, index):  # augmentations are a pure function of (seed, epoch, index)
    return int.from_bytes(hashlib.sha256(f'{seed}/{epoch}/{index}'.encode()).digest()[:8], 'little')

def weak_augment(img, label, rng, base_size, crop):
    """Rescale (short side base_size x U(0.5, 2.0), long side capped at 4x base, as mmseg's img_scale
    (2048, 512) in the released configs; base_size None: the image's own size x U(0.5, 2.0), for custom data
    evaluated as stored; image bilinear, label nearest), pad right/bottom to the crop (image 0,
    label 255), random crop, horizontal flip p 0.5. Returns PIL image, (c, c) long label, (c, c) bool padding."""
    w, h = img.size
    base_size = base_size or min(w, h)
    scale = rng.uniform(0.5, 2.0) * min(base_size / min(w, h), 4 * base_size / max(w, h))
    size = (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5)))
    im = np.asarray(img.resize(size, Image.BILINEAR))
    lab = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    x, y = rng.randint(0, max(size[0] - crop, 0)), rng.randint(0, max(size[1] - crop, 0))
    out_im, out_lab = np.zeros((crop, crop, 3), np.uint8), np.full((crop, crop), 255, np.uint8)
    pad = np.ones((crop, crop), bool)  # True where the crop window runs past the rescaled image
    patch = im[y:y + crop, x:x + crop]
    ph, pw = patch.shape[:2]
    out_im[:ph, :pw], out_lab[:ph, :pw], pad[:ph, :pw] = patch, lab[y:y + crop, x:x + crop], False
    if rng.random() < 0.5:
        out_im, out_lab, pad = out_im[:, ::-1], out_lab[:, ::-1], pad[:, ::-1]
    return (Image.fromarray(np.ascontiguousarray(out_im)), torch.from_numpy(out_lab.astype(np.int64)),
            torch.from_numpy(pad.copy()))

def strong_augment(img, rng):
    """Strong view of a PIL image: photometric only, so the label and the padding mask stay valid.
    ColorJitter(0.5, 0.5, 0.5, 0.25) p 0.8 (factors and random order drawn like torchvision's),
    grayscale p 0.2, Gaussian blur sigma U(0.1, 2) p 0.5 (PIL's blur, as UniMatch/Co2S)."""
    if rng.random() < 0.8:
        b, c, s, h = rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5), rng.uniform(-0.25, 0.25)
        ops = [lambda x: TF.adjust_brightness(x, b), lambda x: TF.adjust_contrast(x, c),
               lambda x: TF.adjust_saturation(x, s), lambda x: TF.adjust_hue(x, h)]
        for k in rng.sample(range(4), 4):
            img = ops[k](img)
    if rng.random() < 0.2:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    return img

def cutmix_box(size, rng, p=0.5, area=(0.02, 0.4), aspect=(0.3, 1 / 0.3)):
    """(size, size) bool CutMix box, drawn as the release does: with probability p, an area U(0.02, 0.4) of
    the crop, then (aspect h/w U(0.3, 1/0.3), top-left corner uniform in the crop) redrawn TOGETHER until the
    box fits inside; else all False. Redrawing both favours squarer boxes (they fit in more places)."""
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
    box[y:y + h, x:x + w] = True
    return torch.from_numpy(box)

def eval_resize(img, short):
    """The release's test-time resize (mmseg Resize with keep_ratio, cv2 bilinear on the uint8 image): the
    short side to `short`, sizes rounded half up, bilinear with half-pixel centres and no antialiasing.
    short None: the image as stored. Only the image is resized; predictions go back to the label's size."""
    w, h = img.size
    size = (int(w * short / min(w, h) + 0.5), int(h * short / min(w, h) + 0.5)) if short else (w, h)
    if size == (w, h):
        return img
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
    x = torch.nn.functional.interpolate(x, size=size[::-1], mode='bilinear', align_corners=False)
    return Image.fromarray(x[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy())

_MEAN255 = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
_STD255 = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255

def normalize(img):
    """PIL RGB -> (3, H, W) float32, ImageNet mean/std (in place on one copy: this is a hot path)."""
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))).float()
    return x.sub_(_MEAN255).div_(_STD255)

class SemiDataset(Dataset):
    """One list of (image, label) items in one mode: 'labeled', 'unlabeled' or 'val' (see __getitem__).
    Indexed by (epoch, index) (what RunSampler yields) or by index (epoch 0). length > len(items) repeats
    the list cyclically (the labelled list repeated to match the unlabelled one). The augmentation of
    item i in epoch e depends only on (seed, e, i): same samples whatever num_workers."""
    def __init__(self, info, items, mode, *, crop=None, seed=0, length=None):
        if mode not in ('labeled', 'unlabeled', 'val'):
            raise ValueError(f"unknown mode '{mode}'; valid: labeled, unlabeled, val")
        if not items:
            raise UserError(f'empty {mode} list for {info.name}')
        self.info, self.items, self.mode = info, list(items), mode
        self.crop, self.seed, self.length = crop or info.crop, seed, length or len(items)

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        img_path, label_path = self.items[index % len(self.items)]
        img = load_image(img_path)
        if label_path is None and self.mode != 'unlabeled':
            raise UserError(f'{self.mode} item {img_path} has no label')
        label = load_label(label_path, self.info) if label_path else np.full((img.height, img.width), 255, np.uint8)
        if label.shape != (img.height, img.width):
            raise UserError(f'size mismatch: image {img_path} is {img.width}x{img.height}, '
                            f'label {label_path} is {label.shape[1]}x{label.shape[0]}')
        if self.mode == 'val':  # the full image at the evaluation size, the label as stored (eval.py)
            return {'img': normalize(eval_resize(img, self.info.eval_size)),
                    'label': torch.from_numpy(label.astype(np.int64)), 'name': os.path.basename(img_path)}
        rng = random.Random(_sample_seed(self.seed, epoch, index))
        img, label, pad = weak_augment(img, label, rng, self.info.base_size, self.crop)  # (c, c) each
        if self.mode == 'labeled':
            return {'img': normalize(img), 'label': label}
        # two independent strong views of the weak crop, each with its own CutMix box (E6 uses both)
        s1, box1 = strong_augment(img, rng), cutmix_box(self.crop, rng)
        s2, box2 = strong_augment(img, rng), cutmix_box(self.crop, rng)
        return {'img_w': normalize(img), 'img_s1': normalize(s1), 'img_s2': normalize(s2), 'ignore': pad,
                'box1': box1, 'box2': box2, 'label': label}  # label: logging of pseudo-label quality only

# -----------------------------------------------------------------------------
# loaders: one sampler for the whole run, so the workers start once (not once per epoch)

def iters_per_epoch(splits, batch, world_size=1, accum=1):
    """Optimizer steps per epoch: one pass over the unlabelled list at a global batch of batch x world x accum."""
    return len(splits.unlabeled) // (batch * world_size * accum)

class RunSampler(Sampler):
    """(epoch, index) keys for optimizer steps start..total-1 of a run, `accum` micro-batches of `batch`
    keys per step. Epoch e's order is a permutation seeded by seed + e, dealt like DistributedSampler
    (drop_last) to world x accum virtual ranks: micro-batch j of a step on rank r is exactly what rank
    r x accum + j of a (world x accum)-process run gets. So `--batch 1 --accum 4` on one GPU sees the
    samples of the 4-GPU recipe, in the same order."""
    def __init__(self, n, *, batch, seed, start, total, rank=0, world_size=1, accum=1):
        self.n, self.batch, self.seed, self.start, self.total = n, batch, seed, start, total
        self.rank, self.ranks, self.accum = rank, world_size * accum, accum
        self.ipe = n // (batch * self.ranks)
        if self.ipe == 0:
            raise UserError(f'{n} unlabelled images are fewer than one global batch ({batch} x {world_size} '
                            f'GPUs x {accum} accumulation steps); lower --batch or --accum')

    def __iter__(self):
        order = None
        for step in range(self.start, self.total):
            epoch, it = divmod(step, self.ipe)
            if order is None or order[0] != epoch:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
                order = (epoch, perm[:self.n // self.ranks * self.ranks])
            for j in range(self.accum):
                mine = order[1][self.rank * self.accum + j::self.ranks]
                yield from ((epoch, i) for i in mine[it * self.batch:(it + 1) * self.batch])

    def __len__(self):
        return (self.total - self.start) * self.accum * self.batch

MIX_SOURCES = ('partner', 'same', 'rolled')

def train_loaders(info, splits, *, crop, batch, seed, start, total, workers=2, rank=0, world_size=1, accum=1,
                  mix_source='partner', pin_memory=False):
    """Loaders of labelled crops, unlabelled weak + strong views and (mix_source) CutMix partners, for
    optimizer steps start..total-1; each yields `accum` micro-batches per step. Stream k has its own seed
    (seed*3 + k) for its order and its augmentations. Partners: 'partner' another unlabelled image (ours),
    'same' the same image under another augmentation (the released code iterates one sampler twice),
    'rolled' none (co2s.py rolls the batch)."""
    if mix_source not in MIX_SOURCES:
        raise ValueError(f"unknown mix source '{mix_source}'; valid: {', '.join(MIX_SOURCES)}")
    n = len(splits.unlabeled)
    streams = [('labeled', splits.labeled, seed * 3, seed * 3), ('unlabeled', splits.unlabeled, seed * 3 + 1, seed * 3 + 1)]
    if mix_source != 'rolled':
        order_seed = seed * 3 + 2 if mix_source == 'partner' else seed * 3 + 1
        streams.append(('unlabeled', splits.unlabeled, order_seed, seed * 3 + 2))
    loaders = []
    for mode, items, order_seed, aug_seed in streams:
        ds = SemiDataset(info, items, mode, crop=crop, seed=aug_seed, length=n)
        sampler = RunSampler(n, batch=batch, seed=order_seed, start=start, total=total, rank=rank,
                             world_size=world_size, accum=accum)
        # own generator: the loader must not draw from (and so shift) the global torch RNG
        loaders.append(DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                                  drop_last=True, generator=torch.Generator().manual_seed(order_seed)))
    return tuple(loaders)

def val_loader(info, splits, *, workers=2, rank=0, world_size=1):
    """Full val images, batch 1; under DDP rank r takes items r, r+W, ... (no padding duplicates). Its
    workers persist, so evaluating every epoch does not restart them."""
    items = splits.val[rank::world_size]
    return DataLoader(SemiDataset(info, items, 'val') if items else [], batch_size=1, shuffle=False,
                      num_workers=workers, persistent_workers=workers > 0 and bool(items))
