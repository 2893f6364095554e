"""scene.py: predict whole scenes (orthophotos of any size) into class masks that a GIS can overlay.

eval.predict runs the sliding window over a whole image at once: a (B, N, H, W) fp32 logit sum per
student, so memory grows with the image. Here the same windows (window_starts, padded by
pad16, stride 5/6 of the crop) are streamed: `batch` windows per forward, in row-major order;
their logits are summed in fp32 only for the rows that windows still touch (one window height per
student), and rows that no later window reaches are finished at once: divided by their window count,
softmax per student, E10 fusion for 'fused', argmax into a uint8 mask. The whole-image arrays are the
input pixels (3 bytes a pixel) and the mask (1 byte). With batch 1 the additions happen in
eval.sliding_window's order, so the probabilities are bit-identical to eval.predict; a larger batch
changes only the forward's rounding (a batched matmul sums in another order).

The scene is predicted at its NATIVE resolution: no data.eval_resize, which is the benchmark's
protocol for its tiles (short side to 512); a scene is seen at the ground resolution it has.
Inputs are normalised as in training (data.normalize: ImageNet mean / std on 0..255 RGB); how a
file's bands become those 0..255 values (band choice, 16-bit scaling, no-data) is raster.py's.

Outputs per input, in out_dir, named by the input's stem:
  <stem>_mask.png      palette PNG of the class indices (files.colorize), for non-TIFF inputs
  <stem>_mask.tif      for TIFF inputs: a palette TIFF (pixel value = class index, 255 = no-data, the
                       palette as colour map) with the input's georeferencing tags (raster.write_mask)
  <stem>_mask.tfw|pgw  a copy of the input's world file, if it has one (same pixel grid)
  <stem>_overlay.jpg   only with overlay=True: the image blended 50 % with the colour mask
  <stem>.json          class shares, size, bands, scaling, prediction name, crop, stride, geotags

Deliberately left out: test-time augmentation (as in eval.py), skipping windows that lie wholly in
no-data, reading the file window by window (the three selected bands are held whole).
"""
import json
import math
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import files
import raster
from errors import UserError
from losses import IGNORE
from model import check_names, fuse


@dataclass
class SceneOptions:
    crop: int                 # window size: the run's training crop
    stride: int = None        # window stride (None: 5/6 of the crop, as evaluation)
    batch: int = 8            # windows per forward
    device: str = "cpu"       # where the students run and the open rows are summed
    amp: object = None        # an autocast context (runs.autocast) or None
    name: str = "fused"       # which prediction: 'fused' (E10) or a student's name
    bands: tuple = (1, 2, 3)  # the file's bands the students read as RGB, 1-based as in GDAL
    scale: float = None       # non-8-bit samples: value * 255 / scale (None: 2-98 % stretch)
    overlay: bool = False     # also write <stem>_overlay.jpg (3 more image copies in memory)
    progress: bool = True     # a tqdm bar counting windows

    def __post_init__(self):
        self.stride = self.stride or self.crop * 5 // 6   # METHOD.md section 5: 5/6 of the crop
        if not 0 < self.stride <= self.crop:
            raise UserError(f"stride {self.stride} must be in 1..crop ({self.crop}), or windows leave gaps")
        if self.batch < 1:
            raise UserError(f"batch {self.batch}: at least one window per forward")


@dataclass
class Strip:
    top: int                  # first image row of the strip
    logits: dict              # student name -> (N, rows, W) fp32 window-averaged logits of these rows
    probs: dict               # prediction name -> (N, rows, W) fp32 probabilities
    held: int                 # rows the open-row buffer held: one window height, whatever the image


# --------------------------------------------------------------------------------------------
# The window grid, shared with eval.py's sliding window (METHOD.md section 5)


def window_starts(size, crop, stride):
    """Window offsets along one axis: every `stride`, the last window flush with the border
    (mmseg's slide)."""
    if size <= crop:
        return [0]
    n = math.ceil((size - crop) / stride) + 1
    return [min(i * stride, size - crop) for i in range(n)]


def pad16(x):
    """Pad right/bottom to a multiple of 16 (the ViT patch) with black, the padding the students saw
    in training (data.weak_augment pads raw pixels with 0). Black is -mean/std after ImageNet
    normalisation."""
    ph, pw = -x.shape[-2] % 16, -x.shape[-1] % 16
    if ph == 0 and pw == 0:
        return x
    black = torch.tensor([-m / s for m, s in zip(data.IMAGENET_MEAN, data.IMAGENET_STD)],
                         device=x.device, dtype=x.dtype)
    black = black.view(1, 3, 1, 1)
    return F.pad(x - black, (0, pw, 0, ph)) + black


# --------------------------------------------------------------------------------------------
# The streamed sliding window


def _finish(model, names, sums, count, top, rows):
    """The Strip of the first `rows` open rows, computed as eval.predict does for the whole image:
    summed logits / window count, softmax per student, then E10 over the students."""
    logits = {name: acc[:, :rows] / count[:rows] for name, acc in sums.items()}
    probs = {n: l[None].softmax(1) for n, l in logits.items()}   # (1, N, rows, W), as eval's layout
    if "fused" in names:
        probs["fused"] = fuse(list(probs.values()), model.fusion)
    held = max(acc.shape[1] for acc in sums.values())
    return Strip(top, logits, {n: probs[n][0] for n in names}, held)


def _batch(pixels, starts, h, w):
    """(b, 3, h, w) windows (padded to a multiple of 16), normalised one window at a time (no float
    copy of the image); the same values as slicing data.normalize(image)."""
    return torch.cat([pad16(data.normalize(pixels[y:y + h, x:x + w])[None]) for y, x in starts])


@torch.no_grad()
def stream_strips(model, pixels, opts, names=None):
    """Yield the Strips of an (H, W, 3) uint8 image, top to bottom, for `names` (default opts.name)."""
    names = check_names(model, names or [opts.name])
    students = [s for s in model.students if "fused" in names or s.name in names]
    H, W = pixels.shape[:2]
    h, w = min(opts.crop, H), min(opts.crop, W)       # window size, as eval.sliding_window
    windows = [(y, x) for y in window_starts(H, opts.crop, opts.stride)
               for x in window_starts(W, opts.crop, opts.stride)]
    device = torch.device(opts.device)
    sums, count, top = None, torch.zeros(h, W, device=device), 0   # open rows: [top, top + h)
    bar = tqdm(total=len(windows), unit="window", disable=not opts.progress, dynamic_ncols=True)
    for i in range(0, len(windows), opts.batch):
        starts = windows[i:i + opts.batch]
        x = _batch(pixels, starts, h, w).to(device)
        with opts.amp or nullcontext():
            out = [s(x)[:, :, :h, :w].float() for s in students]          # (b, N, h, w) each
        if sums is None:                              # (N, h, W) per student: N is known now
            sums = {s.name: torch.zeros(o.shape[1], h, W, device=device) for s, o in zip(students, out)}
        for k, (y, x0) in enumerate(starts):
            if y > top:   # a new row of windows: rows above y are final, no later window reaches them
                yield _finish(model, names, sums, count, top, y - top)
                sums = {n: torch.cat([acc[:, y - top:], acc.new_zeros(len(acc), y - top, W)], 1)
                        for n, acc in sums.items()}
                count = torch.cat([count[y - top:], count.new_zeros(y - top, W)])
                top = y
            for acc, o in zip(sums.values(), out):    # in eval.sliding_window's order of additions
                acc[:, :, x0:x0 + w] += o[k]
            count[:, x0:x0 + w] += 1
        bar.update(len(starts))
    bar.close()
    yield _finish(model, names, sums, count, top, h)


# --------------------------------------------------------------------------------------------
# One scene, a folder of scenes


def overlay(pixels, mask, palette):
    """(H, W, 3) uint8: the image blended 50 % with the mask's colours; no-data pixels as they are."""
    colours = np.zeros((256, 3), np.uint16)
    colours[:len(palette)] = palette
    out = np.empty_like(pixels)
    for r in range(0, len(mask), raster.ROWS):        # in blocks: no uint16 copy of the image
        px, m = pixels[r:r + raster.ROWS], mask[r:r + raster.ROWS]
        blend = ((px + colours[m] + 1) // 2).astype(np.uint8)
        out[r:r + raster.ROWS] = np.where((m == IGNORE)[..., None], px, blend)
    return out


def _world_file(path, stem, mask_ext):
    """Copy the input's world file (<name>.tfw, .pgw, .wld, ...) beside the mask; its name or None."""
    base, ext = os.path.splitext(path)
    if len(ext) < 2:
        return None
    # ESRI's naming: first and last letter of the extension + 'w' (.tfw, .pgw, .jgw), or ext + 'w'
    for side in (ext[1] + ext[-1] + "w", ext[1:] + "w", "wld"):
        for found in (f"{base}.{side}", f"{base}.{side.upper()}"):
            if os.path.isfile(found):
                out = f"{stem}_mask.{mask_ext[0] + mask_ext[-1] + 'w'}"
                shutil.copyfile(found, out)
                return out
    return None


def _write(scene, mask, info, path, out_dir, opts):
    """The mask file(s), the optional overlay and the JSON summary; returns the summary."""
    stem = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0])
    counts = torch.from_numpy(mask).view(-1).bincount(minlength=256).tolist()
    tags = dict(scene.geotags) if scene.tiff else {}
    if scene.tiff and (raster.NODATA_TAG in tags or scene.nodata is not None):
        tags[raster.NODATA_TAG] = (2, str(IGNORE))    # the input's value (say 0) is a class here
    ext = "tif" if scene.tiff else "png"
    written = [f"{stem}_mask.{ext}"]
    if scene.tiff:
        raster.write_mask(written[0], mask, info.palette, tags)
    else:
        files.colorize(mask, info.palette).save(written[0])
    written += [f for f in [_world_file(path, stem, ext)] if f]
    if opts.overlay:
        written.append(f"{stem}_overlay.jpg")
        Image.fromarray(overlay(scene.pixels, mask, info.palette)).save(written[-1], quality=90)
    valid = sum(counts[:len(info.classes)])
    summary = dict(
        image=os.path.abspath(path), width=mask.shape[1], height=mask.shape[0],
        bands=list(opts.bands), file_bands=scene.bands, dtype=scene.dtype, scaling=scene.scaling,
        prediction=opts.name, crop=opts.crop, stride=opts.stride,
        geotags=[raster.GEO_TAGS[c] for c in tags], nodata_pixels=counts[IGNORE],
        class_shares={c: counts[k] / max(valid, 1) for k, c in enumerate(info.classes)},
        files=[os.path.basename(f) for f in written] + [os.path.basename(stem) + ".json"])
    with open(stem + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def predict_scene(model, info, path, out_dir, opts):
    """Predict one image file (see the module docstring for what is written); returns its summary."""
    scene = raster.read_scene(path, opts.bands, opts.scale)
    mask = np.empty(scene.pixels.shape[:2], np.uint8)                  # (H, W), the only whole output
    model.eval()
    for strip in stream_strips(model, scene.pixels, opts):
        p = strip.probs[opts.name]                                     # (N, rows, W)
        mask[strip.top:strip.top + p.shape[1]] = p.argmax(0).byte().cpu().numpy()
    if scene.nodata is not None:
        mask[scene.nodata] = IGNORE
    os.makedirs(out_dir, exist_ok=True)
    return _write(scene, mask, info, path, out_dir, opts)


def list_scenes(path):
    """[path] for a file; the images of a folder (extensions files.IMAGE_EXTS), sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"{path!r} does not exist (expected an image file or a folder of images)")
    names = sorted(f for f in os.listdir(path) if f.lower().endswith(files.IMAGE_EXTS))
    if not names:
        raise UserError(f"no images in {path!r}; accepted extensions: {' '.join(files.IMAGE_EXTS)}")
    stems = [os.path.splitext(f)[0] for f in names]
    twins = sorted({s for s in stems if stems.count(s) > 1})
    if twins:
        raise UserError(f"{path!r}: images {twins} share a name in several formats; their outputs "
                        f"would overwrite each other")
    return [os.path.join(path, f) for f in names]


def predict_path(model, info, path, out_dir, opts):
    """predict_scene for an image file or every image of a folder; returns the summaries."""
    paths = list_scenes(path)
    check_names(model, [opts.name])               # a bad name fails before any file is read
    return [predict_scene(model, info, p, out_dir, opts) for p in paths]
