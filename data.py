"""data.py: from files on disk to the tensors one training step consumes (METHOD.md section 5).

The weak and strong augmentations with the CutMix boxes, the datasets and the loaders. The split
lists, the file scan and the reading of images and labels are files.py's; what each dataset is
(classes, palettes, recipe) is catalog.py's.

No equation is computed here; an unlabelled sample carries what the step needs for them: the weak
view (pseudo-labels, E6), two strong views with their CutMix boxes (METHOD.md section 4, step 2) and
the padding mask (the valid pixels V of E6). The label of an unlabelled image is for logging only.

Batches are counted in global terms, as the release counts them (its 4 processes x per-GPU batch):
`BatchLayout` splits a global batch over processes and accumulation steps, and an epoch has as many
steps as the release's DistributedSampler gives (the unlabelled list padded to a multiple of 4).

Choices, where the sources leave room: the rescale follows the released configs (short side to
base_size x U(0.5, 2.0), not UniMatch's scaling of the image's own size); augmentations are a pure
function of (seed, epoch, index), so a resumed or re-run epoch sees the same samples whatever the
workers. Deliberately left out: photometric distortion of the labelled view (off in the released
runs), mmseg's cat_max_ratio crop rule (not in METHOD.md).
"""
import hashlib
import math
import os
import random
import signal
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, Sampler

from catalog import RELEASE_PROCESSES
from errors import UserError
from files import load_image, load_label
from runs import STOP_SIGNALS

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # both students take ImageNet-normalised images (METHOD.md 2)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIX_SOURCES = ('partner', 'same', 'rolled')

# -----------------------------------------------------------------------------
# augmentations (METHOD.md section 5); every random draw comes from `rng`, a random.Random

def _sample_seed(seed, epoch, index):  # augmentations are a pure function of (seed, epoch, index)
    return int.from_bytes(hashlib.sha256(f'{seed}/{epoch}/{index}'.encode()).digest()[:8], 'little')

def weak_augment(img, label, rng, base_size, crop):
    """Rescale (short side base_size x U(0.5, 2.0), long side capped at 4x base, as mmseg's
    img_scale (2048, 512) in the released configs; base_size None: the image's own size x U(0.5,
    2.0), for custom data evaluated as stored; image and label as OpenCV resizes them, the release's
    mmseg Resize: resize_bilinear, resize_nearest), pad right/bottom to
    the crop (image 0, label 255), random crop, horizontal flip p 0.5. Returns PIL image, (c, c)
    long label, (c, c) bool padding."""
    w, h = img.size
    base_size = base_size or min(w, h)
    scale = rng.uniform(0.5, 2.0) * min(base_size / min(w, h), 4 * base_size / max(w, h))
    size = (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5)))
    im, lab = resize_bilinear(np.asarray(img), size), resize_nearest(label, size)
    x, y = rng.randint(0, max(size[0] - crop, 0)), rng.randint(0, max(size[1] - crop, 0))
    out_im, out_lab = np.zeros((crop, crop, 3), np.uint8), np.full((crop, crop), 255, np.uint8)
    pad = np.ones((crop, crop), bool)  # True where the crop window runs past the rescaled image
    patch = im[y:y + crop, x:x + crop]
    ph, pw = patch.shape[:2]
    out_im[:ph, :pw], out_lab[:ph, :pw], pad[:ph, :pw] = patch, lab[y:y + crop, x:x + crop], False
    if rng.random() < 0.5:
        out_im, out_lab, pad = out_im[:, ::-1], out_lab[:, ::-1], pad[:, ::-1]
    return (Image.fromarray(np.ascontiguousarray(out_im)),
            torch.from_numpy(out_lab.astype(np.int64)),
            torch.from_numpy(pad.copy()))

def strong_augment(img, rng):
    """Strong view of a PIL image: photometric only, so the label and the padding mask stay valid.
    ColorJitter(0.5, 0.5, 0.5, 0.25) p 0.8 (factors and random order drawn like torchvision's),
    grayscale p 0.2, Gaussian blur sigma U(0.1, 2) p 0.5 (PIL's blur, as UniMatch/Co2S)."""
    if rng.random() < 0.8:
        b, c, s = rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5)
        h = rng.uniform(-0.25, 0.25)
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
    box[y:y + h, x:x + w] = True
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
    (PIL's bilinear filter widens with the scale). OpenCV rounds its 11-bit fixed-point weights;
    this float arithmetic is within one grey level of it (tests/test_data.py)."""
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float()     # a writable copy
    x = torch.nn.functional.interpolate(x, size=size[::-1], mode='bilinear', align_corners=False,
                                        antialias=False)
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
        if mode not in ('labeled', 'unlabeled', 'val'):
            raise ValueError(f"unknown mode '{mode}'; valid: labeled, unlabeled, val")
        if not items:
            raise UserError(f'empty {mode} list for {info.name}')
        self.info, self.items, self.mode = info, list(items), mode
        self.crop, self.seed, self.length = crop or info.crop, seed, length or len(items)

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        epoch, index = key
        img_path, label_path = self.items[index % len(self.items)]
        img = load_image(img_path)
        if label_path is None and self.mode != 'unlabeled':
            raise UserError(f'{self.mode} item {img_path} has no label')
        label = (load_label(label_path, self.info) if label_path else
                 np.full((img.height, img.width), 255, np.uint8))
        if label.shape != (img.height, img.width):
            raise UserError(f'size mismatch: image {img_path} is {img.width}x{img.height}, '
                            f'label {label_path} is {label.shape[1]}x{label.shape[0]}')
        # the full image at the evaluation size, the label as stored (eval.py)
        if self.mode == 'val':
            return {'img': normalize(eval_resize(img, self.info.eval_size)),
                    'label': torch.from_numpy(label.astype(np.int64)), 'name': os.path.basename(img_path)}
        rng = random.Random(_sample_seed(self.seed, epoch, index))
        # (c, c) each
        img, label, pad = weak_augment(img, label, rng, self.info.base_size, self.crop)
        if self.mode == 'labeled':
            return {'img': normalize(img), 'label': label}
        # two independent strong views of the weak crop, each with its own CutMix box (E6 uses both)
        s1, box1 = strong_augment(img, rng), cutmix_box(self.crop, rng)
        s2, box2 = strong_augment(img, rng), cutmix_box(self.crop, rng)
        return {'img_w': normalize(img), 'img_s1': normalize(s1), 'img_s2': normalize(s2),
                'ignore': pad,
                # label: logging of pseudo-label quality only
                'box1': box1, 'box2': box2, 'label': label}

# -----------------------------------------------------------------------------
# batches in global terms, and loaders: one sampler for the whole run, so the workers start once

@dataclass(frozen=True)
class BatchLayout:
    """A global batch (labelled images per optimizer step, and as many unlabelled) computed by
    `world` processes x `accum` micro-batches of `micro` images: world x accum virtual ranks, each
    exactly one process of a (world x accum)-process run. The release: global 4 = 4 processes x 1
    (whdld 8 = 4 x 2). pad: epochs as the release counts them, the unlabelled list padded by
    repeating its start to a multiple of its 4 processes (and of ours), as its DistributedSampler
    does. False: the rule of runs made before it (the remainder dropped), kept so that they resume
    as they were started."""
    global_batch: int
    world: int = 1
    accum: int = 1
    rank: int = 0
    pad: bool = True

    def __post_init__(self):
        if self.global_batch < 1 or self.accum < 1 or self.global_batch % (self.world * self.accum):
            per = self.global_batch // self.world if self.global_batch % self.world == 0 else 0
            valid = [str(a) for a in range(1, per + 1) if per % a == 0]
            raise UserError(f'--batch {self.global_batch} (global) does not split into {self.world} '
                            f'process(es) x --accum {self.accum} micro-batches; valid --accum: '
                            f'{", ".join(valid) or "none (make --batch a multiple of the processes)"}')

    @property
    def ranks(self):
        return self.world * self.accum

    @property
    def micro(self):
        return self.global_batch // self.ranks

    def epoch_order(self, perm):
        """An epoch's permutation of the unlabelled list as it is dealt to the virtual ranks."""
        if not self.pad:
            return perm[:len(perm) // self.ranks * self.ranks]
        multiple = math.lcm(RELEASE_PROCESSES, self.ranks)
        length = -(-len(perm) // multiple) * multiple        # ceil(n / multiple) * multiple
        return (perm * -(-length // max(len(perm), 1)))[:length]

    def steps_per_epoch(self, n):
        """Optimizer steps per pass over n unlabelled images (potsdam 1/16: 1,155; whdld 1/24:
        533)."""
        return len(self.epoch_order(list(range(n)))) // self.global_batch

    def describe(self):
        return (f'global batch {self.global_batch} = {self.world} process{"es" if self.world > 1 else ""} '
                f'x accum {self.accum} x micro-batch {self.micro}')

class RunSampler(Sampler):
    """(epoch, index) keys for the optimizer steps of `steps` (a range), layout.accum micro-batches
    of layout.micro keys per step on this rank. Epoch e's order is a permutation seeded by seed + e,
    dealt like DistributedSampler to the layout's virtual ranks: micro-batch j of a step on rank r
    is what rank r x accum + j of a (world x accum)-process run gets. So --accum 4 on one GPU sees
    the samples of the 4-GPU recipe in the same order, and one micro-batch of 4 sees the same 4
    images per step."""
    def __init__(self, n, layout, seed, steps):
        self.n, self.layout, self.seed, self.steps = n, layout, seed, steps
        self.steps_per_epoch = layout.steps_per_epoch(n)
        if self.steps_per_epoch == 0:
            raise UserError(f'{n} unlabelled images are fewer than one {layout.describe()}; lower --batch')

    def __iter__(self):
        order, lay = None, self.layout
        for step in self.steps:
            epoch, it = divmod(step, self.steps_per_epoch)
            if order is None or order[0] != epoch:
                gen = torch.Generator().manual_seed(self.seed + epoch)
                order = (epoch, lay.epoch_order(torch.randperm(self.n, generator=gen).tolist()))
            for j in range(lay.accum):
                mine = order[1][lay.rank * lay.accum + j::lay.ranks]
                yield from ((epoch, i) for i in mine[it * lay.micro:(it + 1) * lay.micro])

    def __len__(self):
        return len(self.steps) * self.layout.accum * self.layout.micro

@dataclass(frozen=True)
class Streams:
    """How the training streams are drawn: crop, seed, CutMix partners (MIX_SOURCES), loader
    workers."""
    crop: int
    seed: int = 0
    mix_source: str = 'partner'
    workers: int = 2
    pin_memory: bool = False

def _ignore_stop_signals(worker_id):
    """A loader worker ignores the stop signals (a cluster sends them to every process of the job):
    the main process stops after the step in hand (runs.StopSignals), and needs its workers until
    then."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)

def train_loaders(info, splits, layout, streams, steps):
    """Loaders of labelled crops, unlabelled weak + strong views and (mix_source) CutMix partners
    for the optimizer steps of `steps` (a range); each yields layout.accum micro-batches per step.
    Stream k has its own seed (seed*3 + k) for its order and its augmentations. Partners: 'partner'
    another unlabelled image (ours), 'same' the same image under another augmentation (the released
    code iterates one sampler twice), 'rolled' none (co2s.py rolls the batch)."""
    if streams.mix_source not in MIX_SOURCES:
        raise ValueError(f"unknown mix source '{streams.mix_source}'; valid: {', '.join(MIX_SOURCES)}")
    n, seed = len(splits.unlabeled), streams.seed
    todo = [('labeled', splits.labeled, seed * 3, seed * 3),
            ('unlabeled', splits.unlabeled, seed * 3 + 1, seed * 3 + 1)]
    if streams.mix_source != 'rolled':
        order_seed = seed * 3 + 2 if streams.mix_source == 'partner' else seed * 3 + 1
        todo.append(('unlabeled', splits.unlabeled, order_seed, seed * 3 + 2))
    loaders = []
    for mode, items, order_seed, aug_seed in todo:
        ds = SemiDataset(info, items, mode, crop=streams.crop, seed=aug_seed, length=n)
        # own generator: the loader must not draw from (and so shift) the global torch RNG
        loaders.append(DataLoader(ds, batch_size=layout.micro,
                                  sampler=RunSampler(n, layout, order_seed, steps),
                                  num_workers=streams.workers, pin_memory=streams.pin_memory, drop_last=True,
                                  generator=torch.Generator().manual_seed(order_seed),
                                  worker_init_fn=_ignore_stop_signals))
    return tuple(loaders)

def val_loader(info, items, *, workers=2, rank=0, world_size=1):
    """Full val images of `items`, batch 1; under DDP rank r takes items r, r+W, ... (no padding
    duplicates). Its workers persist, so evaluating every epoch does not restart them."""
    items = items[rank::world_size]
    keys = [(0, i) for i in range(len(items))]
    return DataLoader(SemiDataset(info, items, 'val') if items else [], batch_size=1, sampler=keys,
                      num_workers=workers, persistent_workers=workers > 0 and bool(items),
                      worker_init_fn=_ignore_stop_signals)
