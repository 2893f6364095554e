"""tools/scene.py: predict whole scenes of any size, read and written through rasterio (GDAL).

    python -m tools.scene runs/potsdam-1_16-... --input scene.tif --out masks/
    python -m tools.scene RUN --input ortho/ --out masks/ --bands 4,3,2 --scale 10000 --overlay

Input: anything GDAL reads, one file or a folder of them (GeoTIFF tiled or striped, COG, BigTIFF,
any codec and predictor, sparse files, JPEG 2000, VRT, PNG / JPEG with a world file and a .prj).
It is read window by window, never whole: each row of sliding windows (crop height x scene width x
the three bands) is read when its windows are due. Memory is bounded by that strip, the open-row
logit sums (students x classes x crop x width, fp32, only the columns windows ran in), one batch
of windows and one tile row of each output, whatever the height; GDAL's block cache is sized to
the input blocks two window rows share (its default, 5 % of the RAM, fills up on a big scene).

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
import json
import math
import os
import warnings
import xml.etree.ElementTree as ET
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import rasterio
import rasterio.features
import torch
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window
from tqdm import tqdm

import data
import eval as evaluation
from data import IMAGE_EXTS
from losses import IGNORE
from model import fuse
from plumbing import runs
from plumbing.errors import UserError, cli
from plumbing.runtime import AMP, autocast

TOOL = "co2s tools/scene.py"  # the summary's "tool": the files it lists were written here
SCENE_EXTS = IMAGE_EXTS + (".jp2", ".j2k", ".vrt")  # what a folder's listing picks up
PERCENTILES = (2, 98)  # the default stretch of non-8-bit samples
STRETCH_SAMPLES = 2**20  # about this many pixels per band estimate the percentiles
BLOCK = 256  # output tiles; overviews down to one tile
COLUMNS = 2048  # probabilities are computed this many columns at a time (small temporaries)
VECTOR_BLOCK = 1024  # the finished mask is read back in such blocks for the polygons


@dataclass
class SceneOptions:
    """How scenes are predicted and what is written; every number checked here (0 is no default)."""

    crop: int  # window size: the run's training crop
    stride: int = None  # window stride (None: 5/6 of the crop, as evaluation)
    batch: int = 8  # windows per forward
    device: str = "cpu"  # where the students run and the open rows are summed
    amp: object = None  # an autocast context (runtime.autocast) or None
    name: str = "fused"  # which prediction: 'fused' (E10) or a student's name
    bands: tuple = (1, 2, 3)  # the file's bands the students read as RGB, 1-based as in GDAL
    scale: float = None  # non-8-bit samples: value * 255 / scale (None: 2-98 % stretch)
    overlay: bool = False  # also write <stem>_overlay.tif
    vector: bool = False  # also write <stem>_polygons.geojson
    progress: bool = True  # a tqdm bar counting windows

    def __post_init__(self):
        for key in ("crop", "stride", "batch"):  # 0 is a mistake, not "the default"
            value = getattr(self, key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise UserError(f"{key} {value!r}: must be a whole number >= 1")
        self.stride = evaluation.window_stride(
            self.crop, self.stride
        )  # 5/6 of the crop, or 1..crop
        self.bands = tuple(self.bands)
        if len(self.bands) != 3 or not all(isinstance(b, int) and b >= 1 for b in self.bands):
            raise UserError(
                f"bands {list(self.bands)}: three band numbers >= 1 (GDAL's), e.g. 1,2,3"
            )
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise UserError(f"scale {self.scale}: must be > 0 (the pixel value that maps to 255)")


# --------------------------------------------------------------------------------------------
# A scene: the open dataset, its georeferencing, and how its bands become 0..255


@dataclass
class Scene:
    """An open raster as the students read it: its bands, how they become 0..255, where it lies."""

    src: object  # the open rasterio dataset
    bands: tuple  # the selected bands, 1-based
    low: list  # per band: (value - low) * 255 / (high - low); None: 8-bit samples as stored
    high: list
    scaling: dict  # the rule, low / high per band, share of valid samples clipped
    crs: object  # rasterio CRS or None
    transform: object  # Affine, or None when the file has no geotransform
    gcps: tuple  # (ground control points, their CRS) or ([], None)

    def to_uint8(self, raw):
        """(h, W, 3) uint8 of (3, h, W) samples by the scaling rule."""
        if self.low is None:
            return np.ascontiguousarray(raw.transpose(1, 2, 0))
        out = np.empty((*raw.shape[1:], 3), np.uint8)
        for j, (low, high) in enumerate(zip(self.low, self.high)):
            v = (raw[j].astype(np.float32) - np.float32(low)) * np.float32(255 / (high - low))
            out[..., j] = np.rint(np.nan_to_num(np.clip(v, 0, 255)))  # NaN (float no-data) -> 0
        return out


def _valid(src, bands, raw, **where):
    """(h, W) bool of the samples `raw` read `where` (a window or a decimated out_shape, and the
    masks' out buffer): some selected band valid by GDAL's masks (nodata value, alpha band or
    internal mask), every selected sample finite."""
    if all(src.mask_flag_enums[b - 1] == [MaskFlags.all_valid] for b in bands):
        valid = np.ones(raw.shape[1:], bool)  # no mask: nothing to read
    else:
        valid = np.any(src.read_masks(bands, **where), axis=0)
    if raw.dtype.kind in "fc":
        valid &= np.isfinite(raw).all(0)
    return valid


def _prj_crs(path):
    """The CRS of a .prj beside the file (GDAL's PNG and JPEG drivers read world files, not it)."""
    for prj in (os.path.splitext(path)[0] + ext for ext in (".prj", ".PRJ")):
        if os.path.isfile(prj):
            with open(prj) as f:
                text = f.read().strip()
            try:
                return CRS.from_user_input(text)
            except CRSError as e:
                raise UserError(
                    f"{prj}: not a coordinate reference system GDAL reads ({e})"
                ) from None
    return None


def _stretch(src, bands, scale):
    """(low, high, scaling) per band. The stretch's percentiles come from a decimated read of about
    STRETCH_SAMPLES pixels (GDAL reads an overview where the file has one), never the full raster;
    the clipped shares are estimated on the same samples."""
    step = max(1, math.isqrt(src.width * src.height // STRETCH_SAMPLES))
    shape = (3, max(1, src.height // step), max(1, src.width // step))
    raw = src.read(bands, out_shape=shape, resampling=Resampling.nearest)
    valid = _valid(src, bands, raw, out_shape=shape, resampling=Resampling.nearest)
    scaling = {"low": [], "high": [], "clipped": []}
    for band in raw:
        sample = band[valid].astype(np.float64)
        if scale:
            low, high = 0.0, float(scale)
        elif sample.size:
            low, high = np.percentile(sample, PERCENTILES).tolist()
            high = max(high, low + 1e-6)  # a constant band: at or above low -> 255
        else:
            low, high = 0.0, 1.0  # all no-data: any map will do
        clipped = np.count_nonzero((sample < low) | (sample > high)) / max(sample.size, 1)
        for key, value in (("low", low), ("high", high), ("clipped", float(clipped))):
            scaling[key].append(value)
    sampled = "all" if step == 1 else f"a decimated read, one pixel in {step} x {step}"
    scaling["rule"] = (
        f"fixed: value * 255 / {scale}, clipped to 0..255"
        if scale
        else f"stretch: per band, percentile {PERCENTILES[0]}..{PERCENTILES[1]} of the valid "
        f"pixels ({sampled}) -> 0..255, clipped outside"
    )
    return scaling["low"], scaling["high"], scaling


def describe(src, path, bands, scale=None):
    """The Scene of an open dataset: bands checked, scaling decided, georeferencing found."""
    n = src.count
    for b in bands:
        if not 1 <= b <= n:
            hint = " (--bands 1,1,1 for a grey image)" if n == 1 else ""
            raise UserError(
                f"{path}: band {b} does not exist; the file has {n} band{'s' * (n != 1)} "
                f"(bands are numbered from 1, as in GDAL){hint}"
            )
    if scale is None and all(src.dtypes[b - 1] == "uint8" for b in bands):
        low, high, scaling = None, None, {"rule": "none: 8-bit samples as stored"}
    else:
        low, high, scaling = _stretch(src, list(bands), scale)
    transform = None if src.transform.is_identity else src.transform
    return Scene(
        src, tuple(bands), low, high, scaling, src.crs or _prj_crs(path), transform, src.gcps
    )


def read_rows(scene, ys, h):
    """(y, pixels (h, W, 3) uint8, valid (h, W) bool) of each window row y: a window read of the
    file, no-data pixels black; pixels None where the row has no valid pixel."""
    src, W = scene.src, scene.src.width
    dtype = np.result_type(*(src.dtypes[b - 1] for b in scene.bands))
    # one buffer each, reused row after row: fewer strip-sized allocations for the heap to keep
    raw, masks = np.empty((3, h, W), dtype), np.empty((3, h, W), np.uint8)
    for y in ys:
        window = Window(0, y, W, h)
        src.read(scene.bands, window=window, out=raw)
        valid = _valid(src, scene.bands, raw, window=window, out=masks)
        if not valid.any():
            yield y, None, valid
            continue
        pixels = scene.to_uint8(raw)
        pixels[~valid] = 0  # black, as the padding the students saw in training
        yield y, pixels, valid


def array_rows(pixels, valid, opts):
    """read_rows of an (H, W, 3) uint8 image in memory as the students read it (valid None: all)."""
    H = pixels.shape[0]
    valid = np.ones(pixels.shape[:2], bool) if valid is None else valid
    h = min(opts.crop, H)
    for y in evaluation.window_starts(H, opts.crop, opts.stride):
        yield y, pixels[y : y + h], valid[y : y + h]


# --------------------------------------------------------------------------------------------
# The streamed sliding window


@dataclass
class Strip:
    """Finished rows of the scene. Its logits are read from the open-row buffer, which the stream
    goes on to reuse (no copy of a strip's logits is made): use a Strip before the next one."""

    top: int  # first scene row of the strip
    valid: np.ndarray  # (rows, W) bool
    pixels: np.ndarray  # (rows, W, 3) uint8 as the students read them (black where no-data)
    held: int  # rows the open-row buffer held: one window height, whatever the scene
    fusion: str  # the model's E10 rule
    sums: dict = None  # student -> (N, held, W) fp32 logit sums; None: no valid pixel here
    count: torch.Tensor = None  # (held, W) windows per pixel

    def logits(self, student, cols=slice(None)):
        """(N, rows, cols) fp32 window-averaged logits of `student`, as eval.sliding_window's."""
        rows = len(self.valid)
        count = self.count[:rows, cols].clamp(min=1)  # >= 1 at every valid pixel: the same quotient
        return self.sums[student][:, :rows, cols] / count

    def probs(self, name, cols=slice(None)):
        """(N, rows, cols) probabilities of `name`: softmax per student (eval's (1, N, H, W)
        layout), E10 over the students for 'fused'."""
        students = list(self.sums) if name == "fused" else [name]
        probs = [self.logits(s, cols)[None].softmax(1) for s in students]
        return (fuse(probs, self.fusion) if name == "fused" else probs[0])[0]

    def labels(self, name):
        """(rows, W) uint8 class indices of `name`, IGNORE where no-data; computed over the columns
        that hold valid pixels, COLUMNS at a time (small temporaries, whatever the width)."""
        out = np.full(self.valid.shape, IGNORE, np.uint8)
        if self.sums is not None:
            cols = np.flatnonzero(self.valid.any(0))
            for c in range(cols[0], cols[-1] + 1, COLUMNS):
                span = slice(c, min(c + COLUMNS, cols[-1] + 1))
                out[:, span] = self.probs(name, span).argmax(0).byte().cpu().numpy()
            out[~self.valid] = IGNORE
        return out


class OpenRows:
    """The fp32 logit sums and window counts of the rows windows still touch: one window height
    (h x W), whatever the scene. Windows are added in row-major order, as eval.sliding_window adds
    them; a window of a lower row finishes the rows above its top (no later window reaches them)."""

    def __init__(self, ys, h, W, fusion, device):
        self.next = dict(zip(ys, ys[1:] + [ys[-1] + h]))  # window row -> where the next starts
        self.h, self.W, self.end, self.fusion, self.device = h, W, ys[-1] + h, fusion, device
        self.sums, self.count = None, self._zeros(h, W)
        self.base = self.top = 0  # the buffer's first row; the first row not yet finished
        self.lo, self.hi = W, 0  # the columns windows wrote to since the buffer was last clear
        self.held = {}  # window row -> (pixels, valid) of rows with windows to run

    def _zeros(self, *shape):
        """Zeros of (..., W) stored column by column (a view of (W, ...) memory), so that a column
        range is one stretch of memory: on the CPU np.zeros (calloc) leaves the pages of columns
        no window touches unmapped, even as transparent huge pages, and a sparse scene's open
        rows hold only the columns with data. Additions are elementwise: the layout changes no
        value."""
        if self.device.type == "cpu":
            memory = torch.from_numpy(np.zeros(shape[::-1], np.float32))
        else:
            memory = torch.zeros(shape[::-1], device=self.device)
        return memory.permute(*range(len(shape) - 1, -1, -1))

    def add(self, y, x, outs):
        """Add one window's logits {student: (N, h, w)} at (y, x); yields the Strips it finishes."""
        if y > self.top:
            yield from self._advance(y)
        if self.sums is None:  # (N, h, W) per student: N is known now
            self.sums = {n: self._zeros(len(o), self.h, self.W) for n, o in outs.items()}
        w = next(iter(outs.values())).shape[-1]
        for n, o in outs.items():  # in eval.sliding_window's order of additions
            self.sums[n][:, :, x : x + w] += o
        self.count[:, x : x + w] += 1
        self.lo, self.hi = min(self.lo, x), max(self.hi, x + w)

    def close(self):
        """The Strips of the rows still open."""
        yield from self._advance(self.end)

    def _advance(self, y):
        """Finish the window rows that start above y; the buffer then starts at y. A row of windows
        that were all skipped has no valid pixel: its strip is empty."""
        while self.top < y:
            yield self._strip(self.next[self.top])
        if self.lo < self.hi and y < self.end:
            s, cols = y - self.base, slice(self.lo, self.hi)  # only the columns written to
            for t in [*self.sums.values(), self.count]:  # drop s finished rows, s zero rows below
                tail = t[..., s:, cols].clone()  # at most h - stride rows: no second buffer
                t[..., cols].zero_()
                t[..., : tail.shape[-2], cols] = tail
            if s >= self.h:
                self.lo, self.hi = self.W, 0
        self.base = y

    def _strip(self, end):
        top, rows = self.top, end - self.top
        pixels, valid = self.held.pop(top, (None, None))
        self.top = end
        if valid is None or not valid[:rows].any():
            empty = np.zeros((rows, self.W), bool)
            return Strip(top, empty, np.zeros((rows, self.W, 3), np.uint8), self.h, self.fusion)
        return Strip(top, valid[:rows], pixels[:rows], self.h, self.fusion, self.sums, self.count)


def _windows(rows, xs, w, held, stats):
    """(y, x) of the windows with a valid pixel, row-major; their rows' pixels go into `held`."""
    for y, pixels, valid in rows:
        run = [] if pixels is None else [x for x in xs if valid[:, x : x + w].any()]
        stats["skipped"] += len(xs) - len(run)
        if run:
            held[y] = (pixels, valid)
        yield from ((y, x) for x in run)


def _chunks(items, n):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _batch(held, starts, w):
    """(b, 3, h, w) windows padded to a multiple of 16, normalised one window at a time (no float
    copy of a strip); the same values as slicing data.normalize(image)."""
    windows = [data.normalize(held[y][0][:, x : x + w])[None] for y, x in starts]
    return torch.cat([evaluation.pad16(v) for v in windows])


@torch.no_grad()
def stream_strips(model, rows, shape, opts, names=None, stats=None):
    """Yield the Strips of a scene of `shape` (H, W), top to bottom, for `names` (default
    opts.name). rows: (y, pixels, valid) of every window row in order (read_rows, array_rows).
    Windows without a valid pixel are not run; stats (a dict) gets windows, skipped, forwards."""
    names = model.check_names(names or [opts.name])
    students = [s for s in model.students if "fused" in names or s.name in names]
    H, W = shape
    h, w = min(opts.crop, H), min(opts.crop, W)  # window size, as eval.sliding_window
    ys = evaluation.window_starts(H, opts.crop, opts.stride)
    xs = evaluation.window_starts(W, opts.crop, opts.stride)
    stats = {} if stats is None else stats
    stats.update(windows=len(ys) * len(xs), skipped=0, forwards=0)
    device = torch.device(opts.device)
    open_rows = OpenRows(ys, h, W, model.fusion, device)
    bar = tqdm(total=stats["windows"], unit="window", disable=not opts.progress, dynamic_ncols=True)
    done = 0  # windows run
    for starts in _chunks(_windows(rows, xs, w, open_rows.held, stats), opts.batch):
        x = _batch(open_rows.held, starts, w).to(device)
        with opts.amp or nullcontext():
            out = [s(x)[:, :, :h, :w].float() for s in students]  # (b, N, h, w) each
        stats["forwards"] += 1
        for k, (y, x0) in enumerate(starts):
            yield from open_rows.add(y, x0, {s.name: o[k] for s, o in zip(students, out)})
        done += len(starts)
        bar.update(done + stats["skipped"] - bar.n)
    yield from open_rows.close()
    bar.update(bar.total - bar.n)
    bar.close()


# --------------------------------------------------------------------------------------------
# Outputs: mask and overlay GeoTIFFs written strip by strip, category names, polygons, summary


def overview_factors(width, height):
    """2, 4, 8, ... until an overview fits in one BLOCK tile (gdaladdo's default levels)."""
    factors = []
    while max(width, height) / 2 ** len(factors) > BLOCK:
        factors.append(2 ** (len(factors) + 1))
    return factors


def blend(pixels, labels, colours):
    """(rows, W, 3) uint8: the pixels blended 50 % with their class colours; no-data as they are."""
    mixed = ((pixels + colours[labels] + 1) // 2).astype(np.uint8)
    return np.where((labels == IGNORE)[..., None], pixels, mixed)


def write_category_names(path, classes):
    """The class names as GDAL category names of band 1, in the PAM file <path>.aux.xml: where GDAL
    itself keeps a GeoTIFF's category names (GDALSetRasterCategoryNames writes this element), read
    by GDAL and QGIS (the legend). Merged into what GDAL may have written there."""
    aux = path + ".aux.xml"
    root = ET.parse(aux).getroot() if os.path.exists(aux) else ET.Element("PAMDataset")
    band = next((b for b in root.findall("PAMRasterBand") if b.get("band") == "1"), None)
    if band is None:
        band = ET.SubElement(root, "PAMRasterBand", band="1")
    for old in band.findall("CategoryNames"):
        band.remove(old)
    names = ET.SubElement(band, "CategoryNames")
    for c in classes:  # the k-th category names pixel value k
        ET.SubElement(names, "Category").text = c
    ET.indent(root)
    ET.ElementTree(root).write(aux, encoding="unicode")


class Outputs:
    """The mask (and overlay) GeoTIFFs of one scene, open while its strips are written. Strips are
    gathered into whole tile rows (BLOCK rows x the width) and written as such: every tile is
    compressed once, complete (a JPEG tile is never decoded and encoded again), and GDAL's cache
    holds no half-written tile."""

    def __init__(self, stem, scene, info, opts):
        self.stem, self.classes, self.scene = stem, list(info.classes), scene
        self.colours = np.zeros((256, 3), np.uint16)
        self.colours[: len(info.palette)] = info.palette
        self.counts = np.zeros(256, np.int64)
        self.done, self.rows = 0, []  # rows written; the (labels, pixels) strips gathered since
        # tiles wholly no-data are left out of the file (SPARSE_OK): a reader sees the nodata value
        self.mask = self._create("_mask.tif", 1, nodata=IGNORE, compress="deflate", sparse_ok=True)
        cmap = {k: (*map(int, c), 255) for k, c in enumerate(info.palette)}
        self.mask.write_colormap(1, cmap | {IGNORE: (0, 0, 0, 0)})  # no-data transparent
        self.mask.update_tags(1, CLASS_NAMES=json.dumps(self.classes))  # also readable by rasterio
        self.mask.set_band_description(1, f"class index ({IGNORE}: no data)")
        self.overlay = None
        if opts.overlay:
            jpeg = {"compress": "jpeg", "photometric": "ycbcr", "jpeg_quality": 90}
            self.overlay = self._create("_overlay.tif", 3, **jpeg)

    def _create(self, suffix, count, **options):
        src, scene = self.scene.src, self.scene
        profile = dict(driver="GTiff", width=src.width, height=src.height, count=count,
                       dtype="uint8", tiled=True, blockxsize=BLOCK, blockysize=BLOCK,
                       BIGTIFF="IF_SAFER", crs=scene.crs, **options)  # fmt: skip
        if scene.transform is not None:
            profile["transform"] = scene.transform
        dst = rasterio.open(self.stem + suffix, "w", **profile)
        if scene.transform is None and scene.gcps[0]:
            dst.gcps = scene.gcps  # georeferenced by ground control points: carried as they are
        return dst

    def write(self, top, labels, pixels):
        """One finished strip: rows top .. top + len(labels) of the scene, in order."""
        self.counts += np.bincount(labels.ravel(), minlength=256)
        self.rows.append((labels, pixels if self.overlay is not None else None))
        end = top + len(labels)
        if end // BLOCK > self.done // BLOCK or end == self.mask.height:
            self._flush(end if end == self.mask.height else end // BLOCK * BLOCK)

    def _flush(self, end):
        """Write the gathered rows down to `end` (a tile row's edge or the last row)."""
        labels = np.concatenate([r[0] for r in self.rows])
        n = end - self.done
        window = Window(0, self.done, labels.shape[1], n)
        self.mask.write(labels[:n], 1, window=window)
        if self.overlay is not None:
            pixels = np.concatenate([r[1] for r in self.rows])
            tinted = blend(pixels[:n], labels[:n], self.colours)
            self.overlay.write(tinted.transpose(2, 0, 1), window=window)
            self.rows = [(labels[n:], pixels[n:])]
        else:
            self.rows = [(labels[n:], None)]
        self.done = end

    def finish(self):
        """Overviews (mode for classes, average for the overlay), close, the category names."""
        factors = overview_factors(self.mask.width, self.mask.height)
        for dst, how in ((self.mask, Resampling.mode), (self.overlay, Resampling.average)):
            if dst is not None and factors:
                dst.build_overviews(factors, how)
                dst.update_tags(ns="rio_overview", resampling=how.name)
        self.close()
        write_category_names(self.stem + "_mask.tif", self.classes)

    def close(self):
        for dst in (self.mask, self.overlay):
            if dst is not None and not dst.closed:
                dst.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_polygons(mask_path, out_path, classes):
    """<stem>_polygons.geojson from the finished mask, read back in VECTOR_BLOCK blocks: a polygon
    per 4-connected class region of a block (cut at block edges), written feature by feature.
    Returns the number of polygons."""
    n, sep = 0, ""
    with rasterio.open(mask_path) as src, open(out_path, "w") as f:
        f.write('{"type": "FeatureCollection",\n')
        epsg = src.crs.to_epsg() if src.crs else None
        if epsg:  # GeoJSON 2008's member, which GDAL and QGIS honour
            crs = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}"}}
            f.write(f'"crs": {json.dumps(crs)},\n')
        f.write('"features": [\n')
        for y in range(0, src.height, VECTOR_BLOCK):
            for x in range(0, src.width, VECTOR_BLOCK):
                window = Window(
                    x, y, min(VECTOR_BLOCK, src.width - x), min(VECTOR_BLOCK, src.height - y)
                )
                block = src.read(1, window=window)
                found = rasterio.features.shapes(
                    block,
                    mask=block != IGNORE,
                    connectivity=4,
                    transform=src.window_transform(window),
                )
                for geometry, value in found:
                    k = int(value)
                    feature = {"type": "Feature", "properties": {"class": classes[k], "index": k}}
                    f.write(sep + json.dumps(feature | {"geometry": geometry}))
                    n, sep = n + 1, ",\n"
        f.write("\n]}\n")
    return n


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def targets(stem, opts):
    """The file names this tool writes for the input named `stem` (opts: .overlay, .vector)."""
    names = [f"{stem}_mask.tif", f"{stem}_mask.tif.aux.xml"]
    names += [f"{stem}_overlay.tif"] if opts.overlay else []
    names += [f"{stem}_polygons.geojson"] if opts.vector else []
    return names + [f"{stem}.json"]


def _ours(out_dir, stem):
    """The files that out_dir/<stem>.json, if a summary of this tool, says it wrote."""
    try:
        with open(os.path.join(out_dir, stem + ".json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return set()
    if not isinstance(summary, dict) or summary.get("tool") != TOOL:
        return set()
    return set(summary.get("files", []))


def check_outputs(paths, out_dir, opts):
    """Refuse an output folder that holds an input, or a file there that this tool did not write."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir!r} is a file; give a folder")
    for p in paths:
        if os.path.realpath(os.path.dirname(os.path.abspath(p))) == os.path.realpath(out_dir):
            raise UserError(
                f"--out {out_dir!r} holds the input {p!r}: give the outputs a folder of their own"
            )
    for p in paths:
        ours = _ours(out_dir, _stem(p))
        for name in targets(_stem(p), opts):
            if os.path.lexists(os.path.join(out_dir, name)) and name not in ours:
                raise UserError(
                    f"{os.path.join(out_dir, name)} exists and was not written by tools/scene.py "
                    f"(no summary {_stem(p)}.json of it lists it); not overwritten: move it or "
                    f"choose another --out"
                )


def _summary(path, scene, opts, stats, counts, classes):
    """The JSON summary; stats None: the one written before the prediction (the planned files)."""
    src, stats = scene.src, stats or {}
    valid = int(sum(counts[: len(classes)]))
    return {
        "tool": TOOL,
        "complete": bool(stats),
        "image": os.path.abspath(path),
        "width": src.width,
        "height": src.height,
        "bands": list(opts.bands),
        "file_bands": src.count,
        "dtype": src.dtypes[opts.bands[0] - 1],
        "scaling": scene.scaling,
        "prediction": opts.name,
        "crop": opts.crop,
        "stride": opts.stride,
        "batch": opts.batch,
        "crs": scene.crs.to_string() if scene.crs else None,
        "transform": list(scene.transform)[:6] if scene.transform else None,  # a, b, c, d, e, f
        "gcps": len(scene.gcps[0]),
        "windows": stats.get("windows"),
        "skipped_windows": stats.get("skipped"),
        "forwards": stats.get("forwards"),
        "polygons": stats.get("polygons"),
        "nodata_pixels": int(counts[IGNORE]),
        "class_shares": {c: int(counts[k]) / max(valid, 1) for k, c in enumerate(classes)},
        "files": targets(_stem(path), opts),
    }


def _write_json(path, summary):
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)


def _remove_stale(out_dir, stem, opts):
    """Outputs of an earlier run of ours that this one does not write (an overlay, polygons) would
    no longer match the new mask: removed."""
    every = targets(stem, argparse.Namespace(overlay=True, vector=True))
    for name in _ours(out_dir, stem) & set(every) - set(targets(stem, opts)):
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def _open(path):
    if not os.path.isfile(path):
        raise UserError(f"image not found: {path}")
    try:
        return rasterio.open(path)
    except RasterioIOError as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _cache_bytes(src, opts):
    """GDAL's block cache for one scene: the input block rows that consecutive window rows share
    (decoded once), 8 MB more (the outputs are written in whole tiles: Outputs). GDAL's default,
    5 % of the RAM, would fill up with a big scene's blocks."""
    block_rows = src.block_shapes[0][0]
    rows_in = (-(-(opts.crop - opts.stride) // block_rows) + 1) * block_rows
    sample = max(np.dtype(t).itemsize for t in src.dtypes)
    return min(rows_in * src.width * src.count * sample, 2**31) + 8 * 2**20


def predict_scene(model, info, path, out_dir, opts):
    """Predict one raster file into out_dir (what is written: the module docstring); its summary."""
    os.makedirs(out_dir, exist_ok=True)
    stem, classes, stats = os.path.join(out_dir, _stem(path)), list(info.classes), {}
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a plain PNG: pixel coordinates
        with _open(path) as src, rasterio.Env(GDAL_CACHEMAX=_cache_bytes(src, opts)):
            scene = describe(src, path, opts.bands, opts.scale)
            _remove_stale(out_dir, _stem(path), opts)
            planned = _summary(path, scene, opts, None, np.zeros(256, int), classes)
            _write_json(stem + ".json", planned)  # before any output: a rerun may replace them
            H, W = src.height, src.width
            ys = evaluation.window_starts(H, opts.crop, opts.stride)
            rows = read_rows(scene, ys, min(opts.crop, H))
            with Outputs(stem, scene, info, opts) as out:
                for strip in stream_strips(model, rows, (H, W), opts, stats=stats):
                    out.write(strip.top, strip.labels(opts.name), strip.pixels)
                out.finish()
            if opts.vector:
                polygons = stem + "_polygons.geojson"
                stats["polygons"] = write_polygons(stem + "_mask.tif", polygons, classes)
            summary = _summary(path, scene, opts, stats, out.counts, classes)
    _write_json(stem + ".json", summary)
    return summary


def list_scenes(path):
    """[path] for a file; the rasters of a folder (extensions SCENE_EXTS), sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"{path!r} does not exist (expected an image file or a folder of images)")
    names = sorted(f for f in os.listdir(path) if f.lower().endswith(SCENE_EXTS))
    if not names:
        raise UserError(f"no images in {path!r}; accepted extensions: {' '.join(SCENE_EXTS)}")
    stems = [_stem(f) for f in names]
    twins = sorted({s for s in stems if stems.count(s) > 1})
    if twins:
        raise UserError(
            f"{path!r}: images {twins} share a name in several formats; their outputs would "
            f"overwrite each other"
        )
    return [os.path.join(path, f) for f in names]


def predict_path(model, info, path, out_dir, opts):
    """predict_scene for a raster file or every raster of a folder; returns the summaries."""
    paths = list_scenes(path)
    valid = [s.name for s in model.students] + ["fused"]
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
    p = _Parser(
        prog="python -m tools.scene",
        description="Predict whole scenes of any size (anything GDAL reads) into GeoTIFF class "
        "masks, read and written window by window.",
    )
    a = p.add_argument
    a("model", metavar="RUN_OR_CHECKPOINT_OR_EXPORT", help="run, checkpoint, export or hub id")
    a("--input", required=True, metavar="PATH", help="a raster file, or a folder of them")
    a("--out", required=True, metavar="DIR", help="where the outputs go (not an input's folder)")
    a("--student", default="fused", help="'fused' (E10, default) or a student's name")
    a("--bands", default="1,2,3", help="the three bands the students read as RGB, 1-based")
    a("--scale", type=float, help="non-8-bit samples as value * 255 / SCALE (default: a per-band "
      "2-98 %% stretch over the valid pixels)")  # fmt: skip
    a("--batch", type=int, default=8, help="windows per forward")
    a("--crop", type=int, help="window size (default: the run's training crop)")
    a("--stride", type=int, help="window stride (default: 5/6 of the crop)")
    a("--overlay", action="store_true", help="also <stem>_overlay.tif, the image tinted by class")
    a("--vector", action="store_true", help="also <stem>_polygons.geojson, the class regions")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--amp", choices=AMP, default="auto", help="CUDA autocast of the forwards")
    return _checked(p.parse_args(argv))


def _checked(args):
    """The flags' values checked before the (slow) model load; 0 is a mistake, not a default."""
    parts = [b.strip() for b in args.bands.split(",")]
    if len(parts) != 3 or not all(b.isdigit() and int(b) >= 1 for b in parts):
        raise UserError(f"--bands {args.bands!r}: three band numbers from 1, e.g. 1,2,3")
    args.bands = tuple(int(b) for b in parts)
    for key in ("batch", "crop", "stride"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise UserError(f"--{key} {value}: must be >= 1 (leave it out for the default)")
    if args.crop and args.stride and args.stride > args.crop:
        raise UserError(f"--stride {args.stride} must be at most --crop {args.crop} (no gaps)")
    if args.scale is not None and not (math.isfinite(args.scale) and args.scale > 0):
        raise UserError(f"--scale {args.scale}: must be > 0 (the pixel value that maps to 255)")
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        raise UserError(f"--device {args.device!r}: {e}") from None
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible here (--device cpu)")
    return args


def main(argv=None):
    args = get_args(argv)
    check_outputs(list_scenes(args.input), args.out, args)  # before the (slow) model load
    model, info, cfg = runs.load_run(args.model, args.device)
    opts = SceneOptions(
        crop=args.crop or cfg["crop"],
        stride=args.stride,
        batch=args.batch,
        device=str(args.device),
        amp=autocast(args.device, args.amp),
        name=args.student,
        bands=args.bands,
        scale=args.scale,
        overlay=args.overlay,
        vector=args.vector,
    )
    done = predict_path(model, info, args.input, args.out, opts)
    for s in done:
        print(f"{s['image']}: {s['windows']} windows ({s['skipped_windows']} without a valid "
              f"pixel, skipped) -> {os.path.join(args.out, s['files'][0])}")  # fmt: skip
    return done


if __name__ == "__main__":
    cli(main)
