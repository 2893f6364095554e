"""files.py: what is on disk: the split lists, the file scan before step 1, reading images and
labels.

The labelled / unlabelled / val splits come from the paper's lists (shipped in splits/), a folder of
the user's, or a seeded draw (METHOD.md section 6). Before the first step every listed file is
opened and checked, so a bad file stops a run in seconds. Labels are decoded to class maps (0..N-1,
255 = ignore): 8-bit index PNGs, with the dataset's reduce_zero_label, or RGB images in its palette
colours.

On-disk layout (the authors' prepared release): <root>/images/<file> and <root>/labels/<file>. Split
lists: one `images/<file> labels/<file>` line per sample (`images/<file>` alone for an image without
a label), paths relative to the data root. What each dataset is lives in catalog.py; the
augmentations and loaders in data.py.
"""
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from tqdm import tqdm

from catalog import PAPER_SPLITS, parse_ratio
from errors import UserError

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp', '.webp')
# --splits seeded: draw the labelled set with the run's seed instead of reading lists
SEEDED = 'seeded'

# -----------------------------------------------------------------------------
# splits (METHOD.md section 6)

@dataclass
class Splits:
    labeled: list    # [(image_path, label_path)], absolute paths
    # [(image_path, label_path or None)]: the label, when one exists, is only for logging
    unlabeled: list
    val: list        # [(image_path, label_path)]
    root: str = ''   # data root the lists are relative to when written (write_splits)
    # where the lists came from (recorded in config.json)
    source: str = field(default='', compare=False)

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
            raise UserError(f"{path}:{n}: expected 'images/<file> labels/<file>', got '{line.strip()}'")
        items.append((os.path.abspath(os.path.join(root, parts[0])),
                      os.path.abspath(os.path.join(root, parts[1])) if len(parts) == 2 else None))
    return items

# labels/<same name>, else labels/<stem>.png (e.g. mer: .jpg images)
def _find_label(root, image_name):
    for name in (image_name, os.path.splitext(image_name)[0] + '.png'):
        path = os.path.join(root, 'labels', name)
        if os.path.isfile(path):
            return os.path.abspath(path)
    return None

def default_splits_dir(info, root):
    """Where the lists come from without --splits: the paper's (shipped) for its six datasets; for
    others labeled.txt / unlabeled.txt / val.txt in the data root when present; else None (a seeded
    draw)."""
    if os.path.isdir(os.path.join(PAPER_SPLITS, info.name)):
        return PAPER_SPLITS
    return root if os.path.isfile(os.path.join(root, 'labeled.txt')) else None

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
    # the same checks whatever the source: no empty set, labels where needed, no image in two sets,
    # files exist
    for name, items in (('labelled', splits.labeled), ('unlabelled', splits.unlabeled),
                        ('val', splits.val)):
        if not items:
            raise UserError(f'the {name} set of {info.name} (ratio {ratio.replace("_", "/")}) is empty; '
                            f'use another ratio or more images')
    no_label = [img for img, lab in splits.labeled + splits.val if lab is None]
    if no_label:
        raise UserError(f'labelled / val entry {no_label[0]} has no label path')
    labeled, unlabeled, val = ({img for img, _ in x} for x in (splits.labeled, splits.unlabeled,
                                                               splits.val))
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
    """Split files: flat <dir>/{labeled,unlabeled,val}.txt, or the paper's
    <dir>/<name>/<ratio>/..."""
    if not os.path.isdir(splits_dir):
        raise UserError(f"split folder '{splits_dir}' not found (--splits takes a folder, or '{SEEDED}')")
    subdirs = lambda d: sorted(x for x in os.listdir(d) if os.path.isdir(os.path.join(d, x)))
    # flat: written by write_splits, or a user's own
    if os.path.isfile(os.path.join(splits_dir, 'labeled.txt')):
        ratio_dir = val_dir = splits_dir
        source = os.path.abspath(splits_dir)
    else:
        val_dir, ratio_dir = os.path.join(splits_dir, info.name), os.path.join(splits_dir,
                                                                               info.name, ratio)
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
    names = sorted(f for f in os.listdir(os.path.join(root,
                                                      'images')) if f.lower().endswith(IMAGE_EXTS))
    if not names:
        raise UserError(f'no images ({" ".join(IMAGE_EXTS)}) in {root}/images')
    pairs = [(os.path.abspath(os.path.join(root, 'images', f)),
              _find_label(root, f)) for f in names]
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
    """Write labeled.txt / unlabeled.txt / val.txt (paper line format, relative to splits.root) so
    that make_splits(info, ratio, root, splits_dir=folder) repeats the run exactly."""
    os.makedirs(folder, exist_ok=True)
    rel = lambda p: os.path.relpath(p, splits.root) if splits.root else p
    for name, items in (('labeled', splits.labeled), ('unlabeled', splits.unlabeled),
                        ('val', splits.val)):
        with open(os.path.join(folder, f'{name}.txt'), 'w') as f:
            f.writelines(f'{rel(img)} {rel(lab)}\n' if lab else f'{rel(img)}\n' for img,
                         lab in items)

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
    """Before the first step: every listed image opens, every label decodes to valid classes, and
    their sizes agree. A bad file stops the run here, in seconds, not at the first evaluation an
    epoch later."""
    items = splits.labeled + splits.unlabeled + splits.val
    with ThreadPoolExecutor(threads) as pool:
        problems = [p for p in tqdm(pool.map(lambda it: _check_pair(it, info), items),
                                    total=len(items),
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
    """(H, W) uint8 class map: 0..N-1, 255 = ignore. Index labels get reduce_zero_label when the
    dataset uses it (raw 0 -> 255, raw k -> k-1); RGB labels are decoded by exact palette colour
    (black -> 255). Any value outside the classes is an error naming the file and the value."""
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
        code = (raw[..., 0].astype(np.int64) << 16) | (raw[...,
                                                           1].astype(np.int64) << 8) | raw[..., 2]
        lut = {0: 255} | {(r << 16) | (g << 8) | b: k for k, (r, g, b) in enumerate(info.palette)}
        colours, inverse = np.unique(code, return_inverse=True)
        bad = [(int(c) >> 16, (int(c) >> 8) & 255,
                int(c) & 255) for c in colours if int(c) not in lut]
        if bad:
            raise UserError(f'label {path} has colour(s) {bad[:5]} that are not in the {info.name} palette '
                             f'{info.palette} (black = ignore)')
        return np.array([lut[int(c)] for c in colours], np.uint8)[inverse.reshape(code.shape)]
    if mode not in ('L', 'P', 'I', 'I;16'):
        raise UserError(f'label {path} has mode {mode}; expected an 8-bit index PNG (mode L or P)')
    top = n + 1 if info.reduce_zero_label else n  # raw values 0..top-1 are valid, plus 255
    values = np.flatnonzero(np.bincount(raw.ravel(),
                                        minlength=256)) if raw.dtype == np.uint8 else np.unique(raw)
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
    """Class map -> palette PNG (mode 'P'): class k in palette[k], 255 (and anything unknown)
    black."""
    flat = [v for colour in palette for v in colour]
    im = Image.fromarray(np.asarray(label).astype(np.uint8), mode='P')
    im.putpalette(flat + [0] * (768 - len(flat)))
    return im

