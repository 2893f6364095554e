"""tools/scene.py: predict whole scenes of any size, read and written through rasterio (GDAL).

    python -m tools.scene runs/potsdam-1_16-... --input scene.tif --out masks/
    python -m tools.scene RUN --input ortho/ --out masks/ --bands 4,3,2 --scale 10000 --overlay

Input: anything GDAL reads, one file or a folder of them (GeoTIFF tiled or striped, COG, BigTIFF,
any codec and predictor, sparse files, JPEG 2000, VRT, PNG / JPEG with a world file and a .prj).
It is read in units of its own blocks (whole blocks, READ pixels a side at least; a striped file
whole rows), never whole: each unit once, when the first window row that needs it is due, kept
only while window rows still need it and only if it holds a valid pixel. Memory is bounded by one
row of units (of a sparse scene only its units with data), one window row of pixels (crop height
x scene width x the three bands), the open-row logit sums (students x classes x crop x width,
fp32, only the columns windows ran in), one batch of windows and one tile row of each output,
whatever the height; GDAL's block cache holds one unit (its default, 5 % of the RAM, fills up on
a big scene).

Pixels: `bands` (1-based, as GDAL) become the students' 0..255 RGB: 8-bit samples as stored; with
`scale` value * 255 / scale; otherwise a per-band stretch maps the 2nd..98th percentile of the
valid pixels, estimated on a decimated read, to 0..255, both clipped outside. No-data: GDAL's
masks of the selected bands (the nodata value, an alpha band or an internal mask; rasterio's
read_masks covers all three) and non-finite samples; a pixel is no-data where every selected band
is. The students see no-data as black (the padding they saw in training); the mask has 255
(losses.IGNORE) there, and a window without one valid pixel is not run (counted as skipped).

Prediction: the benchmark's sliding window (eval.window_starts, eval.pad16, stride 5/6 of the
crop), streamed as scene.py did: `batch` windows per forward in row-major order, logits summed in
fp32 for the rows windows still touch (one window height), rows no later window reaches finished
at once (window average, softmax per student, E10 fusion, argmax). A valid pixel lies only in
windows that are run, so skipping changes nothing there: at batch 1 its logits are bit-identical
to eval.predict's on the whole image. At the native resolution (no data.eval_resize).

Outputs per input, in `out`, named by the input's stem, written a tile row at a time:
  <stem>_mask.tif          class indices, uint8, 255 = no-data (the nodata value); tiled 256 x 256,
                           Deflate, sparse (wholly no-data tiles left out), the colour table,
                           overviews (mode), the input's CRS and transform (a PNG / JPEG: its world
                           file's transform, its .prj's CRS) or ground control points
  <stem>_mask.tif.aux.xml  the class names as GDAL category names, in GDAL's PAM file: where GDAL
                           itself keeps a GeoTIFF's category names, and what QGIS labels a paletted
                           raster's legend with; also the band tag CLASS_NAMES (JSON) in the TIFF
  <stem>_overlay.tif       only with overlay: the image blended 50 % with the class colours, an
                           RGB GeoTIFF (JPEG in YCbCr, tiled, overviews); no-data pixels black
  <stem>_polygons.geojson  only with vector: a polygon per 4-connected class region (rasterio
                           .features.shapes) with class name and index, in the scene's CRS (the
                           legacy "crs" member GDAL and QGIS read, not RFC 7946's WGS 84); regions
                           are cut at the edges of the VECTOR_BLOCK blocks the mask is read in
  <stem>.json              class shares, size, bands, scaling, prediction, crop, stride, CRS,
                           transform, windows run and skipped, files; "tool" marks the files ours

The output folder never holds inputs, and no file is overwritten that no summary of this tool lists
(one listing the planned files is written first, so an interrupted run can be rerun); an overlay or
polygons of an earlier run that this one does not write are removed, as they no longer match.

Deliberately left out: test-time augmentation (as eval.py), RPC georeferencing (GCPs are carried),
palette-indexed inputs (their indices are read as grey values), polygons merged across blocks.
"""

import argparse
import itertools
import json
import math
import os
import pathlib
import sys
import warnings
import xml.etree.ElementTree as ET
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import rasterio.features
import torch
from rasterio.enums import Resampling
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window, subdivide
from tqdm import tqdm

import data
import eval as evaluation
from losses import IGNORE
from model import fuse
from plumbing import runs
from plumbing.errors import UserError, cli
from plumbing.runtime import AMP, autocast

TOOL = "co2s tools/scene.py"  # the summary's "tool": the files it lists were written here
SCENE_EXTS = data.IMAGE_EXTS + (".jp2", ".j2k", ".vrt")  # what a folder's listing picks up
OPTIONAL = {"overlay": "_overlay.tif", "vector": "_polygons.geojson"}  # flag -> its extra output
PERCENTILES = (2, 98)  # the default stretch of non-8-bit samples
STRETCH_SAMPLES = 2**20  # about this many pixels per band estimate the percentiles
BLOCK = 256  # output tiles; overviews down to one tile
READ = 256  # input is read in whole blocks, at least this many rows and columns at a time
COLUMNS = 2048  # probabilities are computed this many columns at a time (small temporaries)
VECTOR_BLOCK = 1024  # the finished mask is read back in such blocks for the polygons


@dataclass
class SceneOptions:
    """How scenes are predicted and what is written: the command line's flags, each checked here
    (the messages name the flags; 0 is a mistake, not "the default")."""

    crop: int = None  # window size (None until the run's training crop is known)
    stride: int = None  # window stride (None: 5/6 of the crop, as evaluation)
    batch: int = 8  # windows per forward
    device: str = "cpu"  # where the students run and the open rows are summed
    amp: str = "off"  # CUDA autocast of the forwards (runtime.AMP)
    name: str = "fused"  # which prediction: 'fused' (E10) or a student's name
    bands: tuple = (1, 2, 3)  # the bands read as RGB, 1-based as in GDAL (or the flag's "4,3,2")
    scale: float = None  # non-8-bit samples: value * 255 / scale (None: 2-98 % stretch)
    overlay: bool = False  # also write <stem>_overlay.tif
    vector: bool = False  # also write <stem>_polygons.geojson
    progress: bool = True  # a tqdm bar counting windows

    def __post_init__(self):
        for key in ("crop", "stride", "batch"):
            if (v := getattr(self, key)) is not None and not (isinstance(v, int) and v >= 1):
                raise UserError(f"--{key} {v}: must be >= 1 (leave it out for the default)")
        if self.crop and self.stride and self.stride > self.crop:
            raise UserError(f"--stride {self.stride} must be at most --crop {self.crop} (no gaps)")
        if self.crop:
            self.stride = evaluation.window_stride(self.crop, self.stride)
        text = self.bands if isinstance(self.bands, str) else ",".join(map(str, self.bands))
        self.bands = tuple(int(b) if b.strip().isdigit() else 0 for b in text.split(","))
        if len(self.bands) != 3 or 0 in self.bands:
            raise UserError(f"--bands {text!r}: three band numbers from 1 (GDAL's), e.g. 1,2,3")
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise UserError(f"--scale {self.scale}: must be > 0 (the pixel value that maps to 255)")
        try:  # torch raises a RuntimeError for an unknown device (a UserError is none: it passes)
            if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
                raise UserError("--device cuda: no CUDA GPU is visible here (--device cpu)")
        except RuntimeError as e:
            raise UserError(f"--device {self.device!r}: {e}") from None


# --------------------------------------------------------------------------------------------
# A scene: the open dataset, how its bands become 0..255, its window rows


@dataclass
class Scene:
    """An open raster as the students read it: its bands, how they become 0..255, its CRS."""

    src: object  # the open rasterio dataset
    bands: list  # the selected bands, 1-based
    # the rule; low / high per band, (value - low) * 255 / (high - low), none for 8-bit samples as
    # stored; the share of valid samples clipped
    scaling: dict
    crs: object  # the file's CRS, else its .prj's (GDAL's PNG / JPEG read world files only)
    unit: tuple  # (rows, columns) of a read: whole blocks, READ a side at least (read_unit)


def _read(src, bands, **where):
    """(samples (3, h, w), valid (h, w) bool) read `where` (a window, or a decimated out_shape):
    valid where some selected band is by GDAL's masks (the nodata value, an alpha band or an
    internal mask: read_masks covers all three) and every selected sample is finite."""
    raw = src.read(bands, **where)
    valid = src.read_masks(bands, **where).any(0)
    return raw, valid & np.isfinite(raw).all(0) if raw.dtype.kind in "fc" else valid


def _prj_crs(path):
    """The CRS of a .prj beside the file (GDAL's PNG and JPEG drivers read world files, not it)."""
    for prj in (pathlib.Path(path).with_suffix(ext) for ext in (".prj", ".PRJ")):
        if prj.is_file():
            try:
                return rasterio.crs.CRS.from_user_input(prj.read_text().strip())
            except CRSError as e:
                raise UserError(f"{prj}: not a coordinate reference system GDAL reads ({e})")


def _stretch(src, bands, scale):
    """The scaling of non-8-bit samples (or with `scale`): low, high, clipped share per band, the
    rule. The stretch's percentiles come from a decimated read of about STRETCH_SAMPLES pixels (GDAL
    reads an overview where the file has one), never the full raster; the clipped shares too."""
    step = max(1, math.isqrt(src.width * src.height // STRETCH_SAMPLES))
    shape = (3, max(1, src.height // step), max(1, src.width // step))
    raw, valid = _read(src, bands, out_shape=shape, resampling=Resampling.nearest)
    sample = raw[:, valid].astype(np.float64)  # (3, valid samples)
    if scale or not sample.size:  # all no-data: any map will do
        low, high = np.zeros(3), np.full(3, float(scale or 1))
    else:  # a constant band: at or above low -> 255
        low, high = np.percentile(sample, PERCENTILES, axis=1)
        high = np.maximum(high, low + 1e-6)
    outside = (sample < low[:, None]) | (sample > high[:, None])
    clipped = outside.mean(1).tolist() if sample.size else [0.0] * 3
    sampled = "all" if step == 1 else f"a decimated read, one pixel in {step} x {step}"
    rule = f"stretch: per band, percentile {PERCENTILES[0]}..{PERCENTILES[1]} of the valid pixels"
    rule = f"fixed: value * 255 / {scale}" if scale else f"{rule} ({sampled}) -> 0..255"
    suffix = ", clipped to 0..255" if scale else ", clipped outside"
    return {"low": low.tolist(), "high": high.tolist(), "clipped": clipped, "rule": rule + suffix}


def describe(src, path, bands, scale=None):
    """The Scene of an open dataset: bands checked, scaling decided, the CRS found."""
    n, bands = src.count, list(bands)
    if bad := [b for b in bands if not 1 <= b <= n]:
        hint = " (--bands 1,1,1 for a grey image)" if n == 1 else ""
        has = f"the file has {n} band{'s' * (n != 1)} (bands are numbered from 1, as in GDAL)"
        raise UserError(f"{path}: band {bad[0]} does not exist; {has}{hint}")
    stretch = scale is not None or any(src.dtypes[b - 1] != "uint8" for b in bands)
    scaling = _stretch(src, bands, scale) if stretch else {"rule": "none: 8-bit samples as stored"}
    return Scene(src, bands, scaling, src.crs or _prj_crs(path), _unit(src))


def _pixels(scene, raw, valid):
    """The students' (h, w, 3) uint8 of samples `raw` (3, h, w): stretched or as stored, no-data
    black (the padding the students saw in training)."""
    pixels = np.empty((*valid.shape, 3), np.uint8)
    for j, band in enumerate(raw):
        if "low" in scene.scaling:  # (value - low) * 255 / (high - low), clipped; NaN -> 0
            low, high = scene.scaling["low"][j], scene.scaling["high"][j]
            v = (band.astype(np.float32) - np.float32(low)) * np.float32(255 / (high - low))
            band = np.rint(np.nan_to_num(np.clip(v, 0, 255)))
        pixels[..., j] = band
    pixels[~valid] = 0
    return pixels


def read_unit(scene, top):
    """[(x, pixels, valid)] of the read units from row `top` (one unit row) that hold a valid
    pixel: the file's own blocks, READ pixels a side at least (a striped file: whole rows)."""
    src, (uh, uw) = scene.src, scene.unit
    row = subdivide(Window(0, top, src.width, min(uh, src.height - top)), uh, uw)  # left to right
    units = ((w.col_off, *_read(src, scene.bands, window=w)) for w in row)  # read one at a time
    return [(x, _pixels(scene, raw, valid), valid) for x, raw, valid in units if valid.any()]


def read_rows(scene, ys, h):
    """(y, pixels (h, W, 3) uint8, valid (h, W) bool) of each window row y, no-data pixels black;
    pixels None where the row has no valid pixel. The file is read in units of its blocks, each
    once: the window rows a unit row spans reuse it, and only units with a valid pixel are kept
    (a sparse scene holds its data, not its width; GDAL's cache needs one unit)."""
    units, uh, W = {}, scene.unit[0], scene.src.width  # unit row's top -> read_unit of it
    for y in ys:
        tops = range(y // uh * uh, y + h, uh)
        units = {t: units[t] if t in units else read_unit(scene, t) for t in tops}
        # (zeros from calloc: the pages of columns without data are never touched)
        valid, pixels = np.zeros((h, W), bool), np.zeros((h, W, 3), np.uint8)
        for t, found in units.items():
            a, b = max(t, y), min(t + uh, y + h)  # the window row's rows in this unit row
            for x, p, v in found:
                pixels[a - y : b - y, x : x + v.shape[1]] = p[a - t : b - t]
                valid[a - y : b - y, x : x + v.shape[1]] = v[a - t : b - t]
        yield y, pixels if valid.any() else None, valid


# --------------------------------------------------------------------------------------------
# The streamed sliding window


@dataclass
class Strip:
    """Finished rows of the scene. Its logits are read from the open-row buffer, which the stream
    goes on to reuse (no copy of a strip's logits is made): use a Strip before the next one."""

    top: int  # first scene row of the strip
    valid: np.ndarray  # (rows, W) bool
    pixels: np.ndarray  # (rows, W, 3) uint8 as the students read them (black where no-data)
    buffer: "OpenRows"  # its logit sums and window counts: one window height, whatever the scene

    def logits(self, student, cols=slice(None)):
        """(N, rows, cols) fp32 window-averaged logits of `student`, as eval.sliding_window's."""
        rows, b = len(self.valid), self.buffer
        # count >= 1 at every valid pixel: the clamp changes no quotient there
        return b.sums[student][:, :rows, cols] / b.count[:rows, cols].clamp(min=1)

    def probs(self, name, cols=slice(None)):
        """(N, rows, cols) probabilities of `name`: softmax per student (eval's (1, N, H, W)
        layout), E10 over the students for 'fused'."""
        students = list(self.buffer.sums) if name == "fused" else [name]
        probs = [self.logits(s, cols)[None].softmax(1) for s in students]
        return (fuse(probs, self.buffer.fusion) if name == "fused" else probs[0])[0]

    def labels(self, name):
        """(rows, W) uint8 class indices of `name`, IGNORE where no-data; computed over the columns
        that hold valid pixels, COLUMNS at a time (small temporaries, whatever the width)."""
        out = np.full(self.valid.shape, IGNORE, np.uint8)
        cols = np.flatnonzero(self.valid.any(0))
        for c in range(cols[0], cols[-1] + 1, COLUMNS) if cols.size else ():
            span = slice(c, min(c + COLUMNS, cols[-1] + 1))
            out[:, span] = self.probs(name, span).argmax(0).byte().cpu().numpy()
        out[~self.valid] = IGNORE
        return out


def _zeros(shape, device):
    """Zeros of `shape` stored column by column (a view of reversed-shape memory), so that a range
    of the last axis is one stretch of memory: np.zeros (calloc) leaves the pages of columns no
    window touches unmapped, even as transparent huge pages, and a sparse scene's open rows hold
    only the columns with data (on a GPU the zeros are copied there, once a scene). Additions
    are elementwise: the layout changes no value."""
    return torch.from_numpy(np.zeros(shape[::-1], np.float32).T).to(device)


class OpenRows:
    """The fp32 logit sums and window counts of the rows windows still touch: one window height
    (h x W), whatever the scene. Windows are added in row-major order, as eval.sliding_window adds
    them; a window of a lower row finishes the rows above its top (no later window reaches them)."""

    def __init__(self, ys, h, W, fusion, device):
        self.next = dict(zip(ys, ys[1:] + [ys[-1] + h]))  # window row -> where the next starts
        self.end, self.h, self.W, self.fusion, self.device = ys[-1] + h, h, W, fusion, device
        self.sums, self.count = None, _zeros((h, W), device)  # {student: (N, h, W)}, windows
        self.top = 0  # the buffer's first row, the first not yet finished
        self.lo, self.hi = W, 0  # the columns windows wrote to since the buffer was last clear
        self.held = {}  # window row -> (pixels, valid) of rows with windows to run
        self.blank = np.zeros((h, W, 3), np.uint8), np.zeros((h, W), bool)  # rows of no run window

    def add(self, y, x, outs):
        """Add one window's logits {student: (N, h, w)} at (y, x); yields the Strips it finishes."""
        yield from self.advance(y)
        if self.sums is None:  # (N, h, W) per student: N is known now
            self.sums = {n: _zeros((len(o), self.h, self.W), self.device) for n, o in outs.items()}
        w = next(iter(outs.values())).shape[-1]
        for n, o in outs.items():  # in eval.sliding_window's order of additions
            self.sums[n][:, :, x : x + w] += o
        self.count[:, x : x + w] += 1
        self.lo, self.hi = min(self.lo, x), max(self.hi, x + w)

    def advance(self, y):
        """Yield the Strips of the window rows that start above y, then move the buffer down to y.
        Only the first can hold logits: a later one's windows were all skipped (no valid pixel)."""
        base = self.top
        while self.top < y:
            top, self.top = self.top, self.next[self.top]
            n, (pixels, valid) = self.top - top, self.held.pop(top, self.blank)  # n: its rows
            yield Strip(top, valid[:n], pixels[:n], self)
        if base < y and self.lo < self.hi:
            s, cols = y - base, slice(self.lo, self.hi)  # only the columns written to
            for t in [*self.sums.values(), self.count]:  # drop s finished rows, s zero rows below
                tail = t[..., s:, cols].clone()  # at most h - stride rows: no second buffer
                t[..., cols].zero_()
                t[..., : tail.shape[-2], cols] = tail
            if s >= self.h:
                self.lo, self.hi = self.W, 0


def _windows(rows, xs, w, held, stats):
    """(y, x) of the windows with a valid pixel, row-major; their rows' pixels go into `held`."""
    for y, pixels, valid in rows:
        run = [] if pixels is None else [x for x in xs if valid[:, x : x + w].any()]
        stats["skipped"] += len(xs) - len(run)
        if run:
            held[y] = (pixels, valid)
        yield from ((y, x) for x in run)


@torch.no_grad()
def stream_strips(model, rows, shape, opts, names=None, stats=None):
    """Yield the Strips of a scene of `shape` (H, W), top to bottom, for `names` (default
    opts.name). rows: (y, pixels, valid) of every window row in order (read_rows; the tests'
    array_rows for an image in memory). Windows without a valid pixel are not run; stats (a
    dict) gets windows, skipped, forwards."""
    names = model.check_names(names or [opts.name])
    students = [s for s in model.students if "fused" in names or s.name in names]
    (H, W), device = shape, torch.device(opts.device)
    h, w = min(opts.crop, H), min(opts.crop, W)  # window size, as eval.sliding_window
    ys, xs = (evaluation.window_starts(n, opts.crop, opts.stride) for n in shape)
    stats = {} if stats is None else stats
    stats.update(windows=len(ys) * len(xs), skipped=0, forwards=0)
    buffer = OpenRows(ys, h, W, model.fusion, device)
    bar = tqdm(total=stats["windows"], unit="window", disable=not opts.progress, dynamic_ncols=True)
    windows, done = _windows(rows, xs, w, buffer.held, stats), 0  # done: windows run
    while starts := list(itertools.islice(windows, opts.batch)):
        # (b, 3, h, w) padded to a multiple of 16, normalised one window at a time (no float copy
        # of a strip): the same values as slicing data.normalize(image)
        tiles = [data.normalize(buffer.held[y][0][:, x : x + w])[None] for y, x in starts]
        batch = torch.cat([evaluation.pad16(t) for t in tiles]).to(device)
        with autocast(device, opts.amp):
            out = [s(batch)[:, :, :h, :w].float() for s in students]  # (b, N, h, w) each
        stats["forwards"] += 1
        for k, (y, x) in enumerate(starts):
            yield from buffer.add(y, x, {s.name: o[k] for s, o in zip(students, out)})
        done += len(starts)
        bar.update(done + stats["skipped"] - bar.n)
    yield from buffer.advance(buffer.end)
    bar.update(bar.total - bar.n)
    bar.close()


# --------------------------------------------------------------------------------------------
# Outputs: mask and overlay GeoTIFFs written tile row by tile row, category names, polygons


def _create(path, scene, count, **options):
    """A tiled uint8 GeoTIFF on the scene's grid: its CRS and transform (a PNG / JPEG: its world
    file's, its .prj's), or its ground control points, carried as they are."""
    src = scene.src
    grid = {"width": src.width, "height": src.height, "crs": scene.crs, "transform": src.transform}
    tiles = {"tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK, "BIGTIFF": "IF_SAFER"}
    dst = rasterio.open(path, "w", "GTiff", dtype="uint8", count=count, **grid, **tiles, **options)
    if src.gcps[0]:
        dst.gcps = src.gcps
    return dst


def _tile_rows(strips, name, H, overlay, counts):
    """(top, labels, pixels) of whole tile rows (BLOCK rows, the last one shorter) gathered from the
    strips (pixels without channels unless overlay): every tile is then compressed once, complete
    (a JPEG tile is never decoded and encoded again), and GDAL's cache holds no half-written tile.
    The classes are counted into `counts` strip by strip (bincount's int64 copy stays small)."""
    done, parts = 0, []
    for s in strips:
        labels = s.labels(name)
        counts += np.bincount(labels.ravel(), minlength=256)
        parts.append((labels, s.pixels if overlay else s.pixels[:, :0].copy()))
        # n: the rows from `done` (a tile row's top) to the last whole tile row gathered, or to H
        end = s.top + len(s.valid)
        if (n := (end if end == H else end // BLOCK * BLOCK) - done) > 0:
            labels, pixels = (np.concatenate(p) for p in zip(*parts))
            yield done, labels[:n], pixels[:n]
            parts, done = [(labels[n:], pixels[n:])], done + n


def write_masks(stem, scene, strips, info, opts):
    """<stem>_mask.tif (and <stem>_overlay.tif) from the strips; the class counts (256 values)."""
    colours, counts = np.zeros((256, 3), np.uint16), np.zeros(256, np.int64)
    colours[: len(info.palette)] = info.palette
    jpeg = {"compress": "jpeg", "photometric": "ycbcr", "jpeg_quality": 90}
    # tiles wholly no-data are left out of the file (SPARSE_OK): a reader sees the nodata value
    mask = _create(stem + "_mask.tif", scene, 1, nodata=IGNORE, compress="deflate", sparse_ok=True)
    overlay = _create(stem + "_overlay.tif", scene, 3, **jpeg) if opts.overlay else None
    with mask, overlay or nullcontext():
        cmap = {k: (*map(int, c), 255) for k, c in enumerate(info.palette)}
        mask.write_colormap(1, cmap | {IGNORE: (0, 0, 0, 0)})  # no-data transparent
        mask.update_tags(1, CLASS_NAMES=json.dumps(list(info.classes)))  # also for rasterio
        mask.set_band_description(1, f"class index ({IGNORE}: no data)")
        for top, labels, pixels in _tile_rows(strips, opts.name, mask.height, opts.overlay, counts):
            window = Window(0, top, mask.width, len(labels))
            mask.write(labels, 1, window=window)
            if overlay:  # the pixels blended 50 % with their class colours; no-data stays black
                mixed = ((pixels + colours[labels] + 1) // 2).astype(np.uint8)  # colours[IGNORE]: 0
                overlay.write(mixed.transpose(2, 0, 1), window=window)
        # overviews 2, 4, 8, ... until one fits in a tile (gdaladdo's levels): mode for classes
        levels = ((max(mask.shape) - 1) // BLOCK).bit_length()
        for dst, how in ((mask, Resampling.mode), (overlay, Resampling.average)):
            if dst and levels:
                dst.build_overviews([2**k for k in range(1, levels + 1)], how)
                dst.update_tags(ns="rio_overview", resampling=how.name)
    # the class names as GDAL category names of band 1, in the PAM file .aux.xml: where GDAL keeps
    # a GeoTIFF's (GDALSetRasterCategoryNames writes this element), what QGIS's legend shows.
    # GDAL itself writes no .aux.xml for the mask: the file is ours alone.
    root = ET.Element("PAMDataset")
    names = ET.SubElement(ET.SubElement(root, "PAMRasterBand", band="1"), "CategoryNames")
    for c in info.classes:  # the k-th category names pixel value k
        ET.SubElement(names, "Category").text = c
    ET.indent(root)
    ET.ElementTree(root).write(stem + "_mask.tif.aux.xml", encoding="unicode")
    return counts


def write_polygons(stem, classes):
    """<stem>_polygons.geojson from <stem>_mask.tif, read back in VECTOR_BLOCK blocks: a polygon
    per 4-connected class region of a block (cut at block edges), written feature by feature.
    Returns the number of polygons."""
    n = 0
    with rasterio.open(stem + "_mask.tif") as src, open(stem + "_polygons.geojson", "w") as f:
        epsg = src.crs.to_epsg() if src.crs else None
        crs = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}"}}
        # GeoJSON 2008's "crs" member, which GDAL and QGIS honour
        head = f'"crs": {json.dumps(crs)},\n' if epsg else ""
        f.write(f'{{"type": "FeatureCollection",\n{head}"features": [\n')
        # the blocks row-major, smaller at the right and bottom edges
        for window in subdivide(Window(0, 0, src.width, src.height), VECTOR_BLOCK, VECTOR_BLOCK):
            block, t = src.read(1, window=window), src.window_transform(window)
            for geometry, k in rasterio.features.shapes(block, block != IGNORE, transform=t):
                properties = {"class": classes[int(k)], "index": int(k)}
                feature = {"type": "Feature", "properties": properties, "geometry": geometry}
                f.write(",\n" * (n > 0) + json.dumps(feature))
                n += 1
        f.write("\n]}\n")
    return n


# --------------------------------------------------------------------------------------------
# Files: which are ours, the summary, one scene, a folder of them


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def targets(stem, opts):
    """The file names this tool writes for the input named `stem` (opts: .overlay, .vector)."""
    extra = [stem + suffix for flag, suffix in OPTIONAL.items() if getattr(opts, flag)]
    return [f"{stem}_mask.tif", f"{stem}_mask.tif.aux.xml", *extra, f"{stem}.json"]


def _ours(out_dir, stem):
    """The files that out_dir/<stem>.json, if a summary of this tool, says it wrote."""
    try:
        summary = json.loads(pathlib.Path(out_dir, stem + ".json").read_text())
    except (OSError, ValueError):
        return set()
    is_ours = isinstance(summary, dict) and summary.get("tool") == TOOL
    return set(summary.get("files", [])) if is_ours else set()


def check_outputs(paths, out_dir, opts):
    """Refuse an output folder that holds an input, or a file there that this tool did not write."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir!r} is a file; give a folder")
    for p in paths:
        if os.path.realpath(os.path.dirname(os.path.abspath(p))) == os.path.realpath(out_dir):
            msg = f"--out {out_dir!r} holds the input {p!r}: give the outputs a folder of their own"
            raise UserError(msg)
        stem, ours = _stem(p), _ours(out_dir, _stem(p))
        for where in (os.path.join(out_dir, n) for n in targets(stem, opts) if n not in ours):
            if os.path.lexists(where):
                raise UserError(
                    f"{where} exists and was not written by tools/scene.py (no summary {stem}.json "
                    "of it lists it); not overwritten: move it or choose another --out"
                )


def _summary(path, scene, opts, classes, stats, counts):
    """The JSON summary; stats {}: the one written before the prediction (the planned files)."""
    src, valid = scene.src, max(int(sum(counts[: len(classes)])), 1)
    summary = {"tool": TOOL, "complete": bool(stats), "image": os.path.abspath(path)}
    summary |= {"width": src.width, "height": src.height, "bands": list(opts.bands)}
    summary |= {"file_bands": src.count, "dtype": src.dtypes[opts.bands[0] - 1]}
    summary |= {"scaling": scene.scaling, "prediction": opts.name, "crop": opts.crop}
    summary |= {"stride": opts.stride, "batch": opts.batch}
    summary["crs"] = scene.crs.to_string() if scene.crs else None
    summary["transform"] = None if src.transform.is_identity else list(src.transform)[:6]
    summary |= {"gcps": len(src.gcps[0]), "windows": stats.get("windows")}
    summary |= {"skipped_windows": stats.get("skipped"), "forwards": stats.get("forwards")}
    summary |= {"polygons": stats.get("polygons"), "nodata_pixels": int(counts[IGNORE])}
    summary["class_shares"] = {c: int(counts[k]) / valid for k, c in enumerate(classes)}
    return summary | {"files": targets(_stem(path), opts)}


def _unit(src):
    """(rows, columns) read at a time: whole blocks (of band 1; GDAL's formats block all bands
    alike), READ a side at least, at most 2 READ rows (a file of one giant strip)."""
    bh, bw = src.block_shapes[0]
    return min(bh * -(-READ // bh), 2 * READ), bw * -(-READ // bw)


def _cache_bytes(src):
    """GDAL's block cache for one scene: the blocks of one read unit (GDAL reads them for the
    samples, then for the masks: decoded once), 8 MB more (the outputs are written in whole tiles:
    _tile_rows). GDAL's default, 5 % of the RAM, would fill up with a big scene's blocks; the
    window rows that share a unit reuse read_rows' copy of it, not GDAL's."""
    sample = max(np.dtype(t).itemsize for t in src.dtypes)
    return math.prod(_unit(src)) * src.count * sample + 8 * 2**20


def predict_scene(model, info, path, out_dir, opts):
    """Predict one raster file into out_dir (what is written: the module docstring); its summary."""
    os.makedirs(out_dir, exist_ok=True)
    stem, classes, stats = os.path.join(out_dir, _stem(path)), list(info.classes), {}
    ours = _ours(out_dir, _stem(path))  # an earlier run's overlay / polygons no longer match
    for name in (_stem(path) + s for flag, s in OPTIONAL.items() if not getattr(opts, flag)):
        if name in ours and os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    model.eval()
    # a plain PNG: pixel coordinates, no warning
    with warnings.catch_warnings(action="ignore", category=NotGeoreferencedWarning):
        try:
            src = rasterio.open(path)
        except RasterioIOError as e:  # a missing file too
            raise UserError(f"cannot read {path}: {e}") from None
        with src, rasterio.Env(GDAL_CACHEMAX=_cache_bytes(src)):
            scene = describe(src, path, opts.bands, opts.scale)
            planned = _summary(path, scene, opts, classes, {}, np.zeros(256, int))
            # written before any output: a rerun after a crash may replace what this lists
            pathlib.Path(stem + ".json").write_text(json.dumps(planned, indent=2))
            ys = evaluation.window_starts(src.height, opts.crop, opts.stride)
            rows = read_rows(scene, ys, min(opts.crop, src.height))
            strips = stream_strips(model, rows, src.shape, opts, stats=stats)
            counts = write_masks(stem, scene, strips, info, opts)
            if opts.vector:
                stats["polygons"] = write_polygons(stem, classes)
            summary = _summary(path, scene, opts, classes, stats, counts)
    pathlib.Path(stem + ".json").write_text(json.dumps(summary, indent=2))
    return summary


def predict_path(model, info, path, out_dir, opts):
    """predict_scene for a raster file or every raster of a folder; returns the summaries."""
    paths = data.list_images(path, SCENE_EXTS)  # a file, or a folder's rasters
    valid = model.names  # the students' and 'fused'
    if opts.name not in valid:  # a bad name fails before any file is read
        raise UserError(f"--student {opts.name!r} is not in this model; valid: {', '.join(valid)}")
    check_outputs(paths, out_dir, opts)
    return [predict_scene(model, info, p, out_dir, opts) for p in paths]


# --------------------------------------------------------------------------------------------
# The command line


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors: one line under cli(), exit status 2."""

    def error(self, message):
        raise UserError(f"{message} (see python -m tools.scene --help)")


def get_args(argv=None):
    """(model, input, out, SceneOptions) of the command line, checked before the (slow) load."""
    about = "Predict whole scenes (anything GDAL reads) into GeoTIFF class masks, window by window."
    p = _Parser(prog="python -m tools.scene", description=about)
    a = p.add_argument
    a("model", metavar="RUN_OR_CHECKPOINT_OR_EXPORT", help="run, checkpoint, export or hub id")
    a("--input", required=True, metavar="PATH", help="a raster file, or a folder of them")
    a("--out", required=True, metavar="DIR", help="where the outputs go (not an input's folder)")
    a("--student", dest="name", metavar="STUDENT", help="'fused' (E10, default) or a student")
    a("--bands", help="the three bands the students read as RGB, 1-based (default 1,2,3)")
    a("--scale", type=float, help="non-8-bit samples as value * 255 / SCALE (default: a per-band "
      "2-98 %% stretch over the valid pixels)")  # fmt: skip
    a("--batch", type=int, help="windows per forward (default 8)")
    a("--crop", type=int, help="window size (default: the run's training crop)")
    a("--stride", type=int, help="window stride (default: 5/6 of the crop)")
    a("--overlay", action="store_true", help="also <stem>_overlay.tif, the image tinted by class")
    a("--vector", action="store_true", help="also <stem>_polygons.geojson, the class regions")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--amp", choices=AMP, default="auto", help="CUDA autocast of the forwards")
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}  # else defaults
    return args.pop("model"), args.pop("input"), args.pop("out"), SceneOptions(**args)


def main(argv=None):
    model_path, path, out_dir, opts = get_args(argv)
    check_outputs(data.list_images(path, SCENE_EXTS), out_dir, opts)  # before the (slow) load
    model, info, cfg = runs.load_run(model_path, torch.device(opts.device))
    opts = replace(opts, crop=opts.crop or cfg["crop"])
    done = predict_path(model, info, path, out_dir, opts)
    for s in done:
        print(f"{s['image']}: {s['windows']} windows ({s['skipped_windows']} without a valid "
              f"pixel, skipped) -> {os.path.join(out_dir, s['files'][0])}")  # fmt: skip
    return done


if __name__ == "__main__":
    cli(main)
    # every output is written and closed: skip the interpreter's teardown, in which torch's
    # libraries page ~130 MB of their code and data back in (measured here: `import torch` alone
    # peaks at 519 MB until exit, 647 MB through it): it would be the process's peak memory
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
