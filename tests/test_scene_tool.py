"""tools/scene.py: the streamed window equals eval's whole-image one; every raster layout GDAL reads
gives the mask that the same pixels give in memory; no-data (nodata value, alpha, internal mask,
sparse tiles, NaN) is 255 and its windows are not run; the mask GeoTIFF's grid, colour table,
category names, overviews and tiles; reads are windows, never the whole raster; the command line
refuses mistakes and foreign files in one line."""

import copy
import ctypes
import json
import os
import warnings
import zlib

import helpers
import numpy as np
import pytest
import rasterio
import rasterio.features
import rasterio.shutil
import torch
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine, from_origin

import data
import eval as ev
from model import ModelSpec, build_model, stand_in_embeddings
from plumbing import catalog, runs
from plumbing.errors import cli
from tools import scene as tool

CROP = 64
EPS = 2.0**-24  # fp32 unit roundoff
UTM32 = CRS.from_epsg(25832)
GRID = from_origin(368000.0, 5810000.0, 0.5, 0.5)  # 0.5 m pixels, top-left corner

warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random backbone weights"
        spec = ModelSpec(("clip", "dinov3"), 6, size="tiny")
        return build_model(spec, text=stand_in_embeddings(6, 128)).eval()


@pytest.fixture(scope="module")
def model64(model):
    """The same students in float64 (helpers.float64): their forwards then round at 1e-14, so a
    batched stream differs from the whole image by the stream's own fp32 arithmetic only."""
    return helpers.float64(copy.deepcopy(model))


@pytest.fixture(scope="module")
def info():
    return catalog.dataset_info("demo")  # potsdam's six classes and palette


def options(**kw):
    return tool.SceneOptions(**({"crop": CROP, "progress": False} | kw))


def array_rows(pixels, valid, opts):
    """What tools.scene.read_rows yields, of an (H, W, 3) uint8 image in memory (valid None: all)."""
    valid = np.ones(pixels.shape[:2], bool) if valid is None else valid
    h = min(opts.crop, len(pixels))
    for y in ev.window_starts(len(pixels), opts.crop, opts.stride):
        yield y, pixels[y : y + h], valid[y : y + h]


def streamed_labels(model, pixels, valid, opts):
    """The mask the streamed window gives for an (H, W, 3) uint8 image held in memory."""
    rows = array_rows(pixels, valid, opts)
    strips = tool.stream_strips(model, rows, pixels.shape[:2], opts)
    return np.concatenate([s.labels(opts.name) for s in strips])


def window_grid(H, W, crop, stride):
    return [
        (y, x) for y in ev.window_starts(H, crop, stride) for x in ev.window_starts(W, crop, stride)
    ]


class CountForwards:
    """Wraps each student's forward: how many windows (batch rows) it ran."""

    def __init__(self, model, mp):
        self.windows = {s.name: 0 for s in model.students}
        for s in model.students:
            mp.setattr(s, "forward", self._wrap(s.name, s.forward))

    def _wrap(self, name, forward):
        def counted(x):
            self.windows[name] += x.shape[0]
            return forward(x)

        return counted


def gdal_category_names(path):
    """Band 1's category names as GDAL reads them (GDALGetRasterCategoryNames) through the libgdal
    that rasterio loaded: rasterio has no call of its own for them. None if it is not found."""
    with open("/proc/self/maps") as f:
        libs = {line.split()[-1] for line in f if "libgdal" in line.split()[-1]}
    if not libs:
        return None
    gdal = ctypes.CDLL(min(libs))
    gdal.GDALOpen.restype, gdal.GDALOpen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
    gdal.GDALGetRasterBand.restype = ctypes.c_void_p
    gdal.GDALGetRasterBand.argtypes = [ctypes.c_void_p, ctypes.c_int]
    gdal.GDALGetRasterCategoryNames.restype = ctypes.POINTER(ctypes.c_char_p)
    gdal.GDALGetRasterCategoryNames.argtypes = [ctypes.c_void_p]
    gdal.GDALGetRasterColorTable.restype = ctypes.c_void_p
    gdal.GDALGetRasterColorTable.argtypes = [ctypes.c_void_p]
    gdal.GDALClose.argtypes = [ctypes.c_void_p]
    with rasterio.Env():  # drivers registered
        handle = gdal.GDALOpen(path.encode(), 0)
        band = gdal.GDALGetRasterBand(handle, 1)
        # QGIS's order (QgsGdalProviderBase::colorTable): the colour table, then the labels. GDAL
        # 3.10's GTiff loads the .aux.xml lazily, and GetCategoryNames alone does not trigger it.
        assert gdal.GDALGetRasterColorTable(band)
        names = gdal.GDALGetRasterCategoryNames(band)
        out = []
        while names and names[len(out)] is not None:
            out.append(names[len(out)].decode())
        gdal.GDALClose(handle)
    return out


# ---------------------------------------------------------------------------------------------
# The streamed sliding window equals eval.predict's whole-image one (ported from test_scene.py)


@pytest.fixture(scope="module")
def reference(model):
    """(pixels, window-averaged logits per student, eval.predict probabilities) of a random image;
    eval.sliding_window's calls are recorded to get the logits too."""
    cache = {}

    def get(H, W, model=model):
        key = (H, W, next(model.parameters()).dtype)
        if key not in cache:
            pixels = np.random.default_rng([H, W]).integers(0, 256, (H, W, 3), dtype=np.uint8)
            logits, real = {}, ev.sliding_window

            def record(student, img, *args, **kwargs):
                logits[student.name] = real(student, img, *args, **kwargs)[0]
                return logits[student.name][None]

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(ev, "sliding_window", record)
                img = data.normalize(pixels)[None]
                probs = ev.predict(model, img, CROP, None, ["fused", "dinov3"])
            cache[key] = pixels, logits, {n: p[0] for n, p in probs.items()}
        return cache[key]

    return get


@pytest.mark.parametrize(
    "H, W, batch", [(256, 256, 5), (200, 330, 1), (200, 330, 4), (40, 50, 1), (60, 300, 2)]
)
def test_streamed_probabilities_equal_the_whole_image_sliding_window(
    model, model64, reference, H, W, batch
):
    """Batch 1: the same fp32 forwards, bit-identical. Batched: a batch of b windows rounds its
    sums unlike one window, so the students run in float64 (model64), the reference (eval's
    window sums, float64 with them) too, and what is left is the stream's fp32 (below)."""
    model = model if batch == 1 else model64
    pixels, ref_logits, ref_probs = reference(H, W, model)
    opts = options(batch=batch)
    rows = array_rows(pixels, None, opts)
    logits, probs = {n: [] for n in ref_logits}, {n: [] for n in ref_probs}
    for strip in tool.stream_strips(model, rows, (H, W), opts, ["fused", "dinov3"]):
        for n in ref_logits:  # a strip is read before the next: the stream reuses its buffer
            logits[n].append(strip.logits(n))
        for n in ref_probs:
            probs[n].append(strip.probs(n))
    logits = {n: torch.cat(v, 1) for n, v in logits.items()}
    probs = {n: torch.cat(v, 1) for n, v in probs.items()}
    if batch == 1:  # the same forwards, the same order of fp32 additions: bit-identical averages
        assert all(torch.equal(logits[n], ref_logits[n]) for n in ref_logits)
    # Batched: the stream rounds each window's float64 logits to fp32 (EPS of the largest |logit|,
    # `scale`), adds them in fp32 over the n <= 9 windows of a pixel (stride 5/6 of the crop: <= 2
    # windows per axis and the flush one; partial sums up to j * scale, j = 2..n) and divides by
    # n: at most (n + n(n+1)/2 - 1) / n + 1 = 6.9 EPS of scale; 8 EPS bounds it (the forwards' 1e-14
    # is far below). A misplaced window is O(1). Softmax then moves a probability by at most
    # delta / 2, and its own rounding (a strip's vector tail is not the image's) by a few eps.
    delta = max((logits[n] - ref_logits[n]).abs().max().item() for n in ref_logits)
    scale = max(ref_logits[n].abs().max().item() for n in ref_logits)
    print(f"margin streamed vs whole image, batch {batch}: {delta / (8 * EPS * scale):.2e}")
    assert delta <= 8 * EPS * scale
    tol = delta / 2 + 8 * EPS
    clip, dino = (ref_logits[s.name].softmax(0).amax(0) for s in model.students)
    gap = (clip - dino).abs()  # near 0: E10 could pick the other student
    for n in ("fused", "dinov3"):
        top2 = ref_probs[n].topk(2, 0).values
        sure = top2[0] - top2[1] > 2 * tol
        if n == "fused":
            sure &= gap > 2 * tol
        assert sure.float().mean() > 0.99  # the check below covers nearly every pixel
        assert ((probs[n] - ref_probs[n]).abs().amax(0)[sure] <= tol).all()
        assert torch.equal(probs[n].argmax(0)[sure], ref_probs[n].argmax(0)[sure])
        if batch == 1:
            assert torch.equal(probs[n].argmax(0), ref_probs[n].argmax(0))


def test_open_row_buffer_holds_one_window_height_and_strips_tile_the_image(model):
    H, W = 600, 100  # tall: 11 rows of windows
    pixels = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    opts = options(batch=3)
    strips = list(tool.stream_strips(model, array_rows(pixels, None, opts), (H, W), opts))
    assert len(strips) == len(ev.window_starts(H, CROP, opts.stride))
    assert max(len(s.buffer.count) for s in strips) == CROP <= CROP + opts.stride
    rows = [s.valid.shape[0] for s in strips]
    assert [s.top for s in strips] == np.cumsum([0] + rows[:-1]).tolist() and sum(rows) == H


def test_windows_without_a_valid_pixel_are_not_run_and_valid_pixels_keep_their_logits(model):
    H, W = 330, 300
    pixels = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    valid = np.zeros((H, W), bool)
    valid[150:175, 20:90] = True  # one patch: a few windows see it
    valid[300:, 280:] = True  # and a corner
    pixels[~valid] = 0
    opts = options(batch=1)  # the same forwards as with every window run: comparable bit for bit

    def run(mask, stats=None):
        """(labels, logits of the valid pixels per strip) of the stream with `mask` as valid."""
        labels, logits = [], []
        rows = array_rows(pixels, mask, opts)
        for s in tool.stream_strips(model, rows, (H, W), opts, stats=stats):
            labels.append(s.labels("fused"))
            keep = valid[s.top : s.top + len(s.valid)]
            logits.append(
                {n: s.logits(n)[:, keep] for n in ("clip", "dinov3")} if keep.any() else {}
            )
        return np.concatenate(labels), logits

    full_labels, full_logits = run(None)
    stats = {}
    with pytest.MonkeyPatch.context() as mp:
        count = CountForwards(model, mp)
        labels, logits = run(valid, stats)
    grid = window_grid(H, W, CROP, opts.stride)
    run_windows = sum(valid[y : y + CROP, x : x + CROP].any() for y, x in grid)
    assert count.windows == {s.name: run_windows for s in model.students}
    assert 0 < run_windows < len(grid)
    skipped = len(grid) - run_windows
    assert stats == {"windows": len(grid), "skipped": skipped, "forwards": run_windows}
    assert np.array_equal(labels == 255, ~valid)
    # a valid pixel lies only in windows that were run: the same logits as with every window run
    for a, b in zip(logits, full_logits):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert np.array_equal(labels[valid], full_labels[valid])


# ---------------------------------------------------------------------------------------------
# Raster layouts: the mask equals the streamed prediction of the same pixels in memory


def write(path, a, **profile):
    """(bands, H, W) array `a` into `path` with rasterio, on GRID in UTM 32N unless told."""
    base = {"driver": "GTiff", "width": a.shape[2], "height": a.shape[1], "count": a.shape[0]}
    base |= {"dtype": a.dtype, "crs": UTM32, "transform": GRID}
    mask = profile.pop("mask", None)
    with rasterio.open(path, "w", **(base | profile)) as dst:
        dst.write(a)
        if mask is not None:
            dst.write_mask(mask)  # an internal mask (GDAL_TIFF_INTERNAL_MASK, GDAL's default)
    return str(path)


def world_file(path, ext):
    """<name>.<ext> (pixel centre of the top-left pixel, as world files have it) and <name>.prj."""
    base = os.path.splitext(path)[0]
    with open(f"{base}.{ext}", "w") as f:
        f.write("0.5\n0.0\n0.0\n-0.5\n368000.25\n5809999.75\n")
    with open(f"{base}.prj", "w") as f:
        f.write(UTM32.to_wkt(version="WKT1_ESRI"))


def rgb(rng, H, W, dtype=np.uint8, high=256):
    return rng.integers(1, high, (3, H, W)).astype(dtype)


def vrt_mosaic(tmp_path, a):
    """Two GeoTIFF halves (left, right) and a VRT that puts them side by side."""
    H, W = a.shape[1:]
    half = W // 2
    left = write(tmp_path / "left.tif", a[:, :, :half])
    right = write(
        tmp_path / "right.tif", a[:, :, half:], transform=GRID @ Affine.translation(half, 0)
    )
    bands = ""
    for b in range(1, 4):
        sources = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="1">{os.path.basename(f)}'
            f"</SourceFilename><SourceBand>{b}</SourceBand>"
            f"<SrcRect xOff='0' yOff='0' xSize='{w}' ySize='{H}'/>"
            f"<DstRect xOff='{x}' yOff='0' xSize='{w}' ySize='{H}'/></SimpleSource>"
            for f, x, w in ((left, 0, half), (right, half, W - half))
        )
        bands += f'<VRTRasterBand dataType="Byte" band="{b}">{sources}</VRTRasterBand>'
    gt = ", ".join(str(v) for v in GRID.to_gdal())
    xml = (
        f'<VRTDataset rasterXSize="{W}" rasterYSize="{H}"><SRS>{UTM32.to_wkt()}</SRS>'
        f"<GeoTransform>{gt}</GeoTransform>{bands}</VRTDataset>"
    )
    (tmp_path / "scene.vrt").write_text(xml)
    return str(tmp_path / "scene.vrt")


TILES = {"tiled": True, "blockxsize": 32, "blockysize": 32}
PLAIN = {  # layout -> (sample type, values below, creation options): three bands, all valid
    "tiled-uint16-lzw": (np.uint16, 4096, {"compress": "lzw", "predictor": 2, **TILES}),
    "striped-uint8": (np.uint8, 256, {"tiled": False, "blockysize": 7}),
    "bigtiff-zstd": (np.uint16, 60000, {"bigtiff": "YES", "compress": "zstd", **TILES}),
    "packbits": (np.uint8, 256, {"compress": "packbits", "tiled": False, "blockysize": 16}),
    "jpeg-ycbcr": (np.uint8, 256, {"compress": "jpeg", "photometric": "ycbcr", **TILES}),
}


def make(layout, tmp_path, H=150, W=190):
    """(path, bands, valid) of a scene in `layout`; valid: the pixels that are not no-data."""
    rng = np.random.default_rng(zlib.crc32(layout.encode()))
    valid, p, bands = np.ones((H, W), bool), tmp_path / "scene.tif", (1, 2, 3)
    if layout in PLAIN:
        dtype, high, profile = PLAIN[layout]
        return write(p, rgb(rng, H, W, dtype, high), **profile), bands, valid
    if layout == "rgba-alpha":
        a = np.concatenate([rgb(rng, H, W), np.full((1, H, W), 255, np.uint8)])
        a[3, :, :40] = 0  # transparent on the left
        valid[:, :40] = False
        return write(p, a, photometric="RGB", alpha="YES", compress="deflate"), bands, valid
    if layout == "nodata-rgbi16":  # RGB + infrared, NIR-R-G chosen, 0 = no-data
        a = np.concatenate([rgb(rng, H, W, np.uint16, 4000), rgb(rng, H, W, np.uint16, 4000)[:1]])
        a[:, :20], a[:, :, -11:] = 0, 0
        a[:2, 60, 60] = 0  # not no-data: band 4 is not 0
        valid[:20], valid[:, -11:] = False, False
        return write(p, a, nodata=0, compress="deflate", **TILES), (4, 1, 2), valid
    if layout == "internal-mask":
        valid[100:, 50:150] = False
        return write(p, rgb(rng, H, W), mask=valid, compress="deflate", **TILES), bands, valid
    if layout == "sparse":  # only the tiles of one region are written; the others are absent
        valid[:] = False
        valid[32:96, 64:128] = True
        base = {"driver": "GTiff", "width": W, "height": H, "count": 3, "dtype": "uint8"}
        with rasterio.open(p, "w", **base, crs=UTM32, transform=GRID, nodata=0, sparse_ok=True,
                           **TILES) as dst:  # fmt: skip
            dst.write(rgb(rng, 64, 64), window=rasterio.windows.Window(64, 32, 64, 64))
        return str(p), bands, valid
    if layout == "float32-predictor3-nan":
        a = rng.standard_normal((3, H, W)).astype(np.float32) * 100
        a[1, 70:80, :] = np.nan  # non-finite: no-data, without a nodata value
        valid[70:80] = False
        return write(p, a, compress="deflate", predictor=3, **TILES), bands, valid
    if layout in ("cog", "jp2"):  # GDAL's CreateCopy-only drivers, from a plain GeoTIFF
        plain = write(tmp_path / "plain.tif", rgb(rng, H, W))
        out = tmp_path / ("scene.tif" if layout == "cog" else "scene.jp2")
        jp2 = {"driver": "JP2OpenJPEG", "reversible": "YES", "quality": 100}  # lossless
        rasterio.shutil.copy(
            plain, out, **({"driver": "COG", "blocksize": 64} if layout == "cog" else jp2)
        )
        os.remove(plain)
        return str(out), bands, valid
    if layout == "vrt-mosaic":
        return vrt_mosaic(tmp_path, rgb(rng, H, W)), bands, valid
    if layout in ("png-world", "jpeg-world"):  # no georeferencing inside: the world file, the .prj
        driver, ext, world = (
            ("PNG", "png", "pgw") if layout == "png-world" else ("JPEG", "jpg", "jgw")
        )
        path = write(
            tmp_path / f"scene.{ext}", rgb(rng, H, W), driver=driver, crs=None, transform=None
        )
        world_file(path, world)
        return path, bands, valid
    raise ValueError(layout)


def expected_pixels(path, bands, valid, scale=None):
    """(H, W, 3) uint8 as the students should read the file: the whole raster read at once (this
    test only), 8-bit as stored or the stated stretch over the valid pixels, no-data black."""
    with rasterio.open(path) as src:
        raw = src.read(list(bands))
    if raw.dtype == np.uint8 and scale is None:
        out = raw.transpose(1, 2, 0).copy()
    else:
        out = np.empty((*raw.shape[1:], 3), np.uint8)
        for j, band in enumerate(raw):
            low, high = (
                (0.0, scale) if scale else np.percentile(band[valid].astype(np.float64), (2, 98))
            )
            v = (band.astype(np.float32) - np.float32(low)) * np.float32(255 / (high - low))
            out[..., j] = np.rint(np.nan_to_num(np.clip(v, 0, 255)))
    out[~valid] = 0
    return out


NO_DATA = ["rgba-alpha", "nodata-rgbi16", "internal-mask", "sparse", "float32-predictor3-nan"]
LAYOUTS = [*PLAIN, *NO_DATA, "cog", "jp2", "vrt-mosaic", "png-world", "jpeg-world"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_gives_the_mask_of_its_pixels_in_memory(model, info, tmp_path, layout):
    path, bands, valid = make(layout, tmp_path)
    opts = options(bands=bands, batch=4)
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        count = CountForwards(model, mp)
        [summary] = tool.predict_path(model, info, path, str(out), opts)
    with rasterio.open(path) as src:  # GDAL's masks are the no-data the layout was built with
        assert np.array_equal(src.read_masks(list(bands)).any(0), valid) or layout.endswith("nan")
        crs, transform, profile = src.crs, src.transform, src.profile
    if layout in PLAIN:  # the file is laid out as asked
        options_asked = PLAIN[layout][2]
        assert profile["tiled"] == options_asked["tiled"]
        assert profile.get("compress", "none") == options_asked.get("compress", "none")
    with open(path, "rb") as f:
        assert (f.read(4) == b"II+\0") == (layout == "bigtiff-zstd")  # BigTIFF's magic number
    with rasterio.open(out / "scene_mask.tif") as m:
        mask = m.read(1)
        grid = (m.crs, m.transform, m.nodata, m.dtypes[0])
    assert grid == (crs or UTM32, transform, 255, "uint8")
    if layout.endswith(
        "world"
    ):  # the world file's grid (corner = centre - half a pixel), .prj's CRS
        assert transform == GRID and crs is None and summary["crs"] == "EPSG:25832"
    expected = streamed_labels(model, expected_pixels(path, bands, valid), valid, opts)
    assert np.array_equal(mask, expected)
    assert np.array_equal(mask == 255, ~valid)
    grid = window_grid(*valid.shape, CROP, opts.stride)
    run = sum(valid[y : y + CROP, x : x + CROP].any() for y, x in grid)
    assert count.windows == {s.name: run for s in model.students}
    assert (summary["windows"], summary["skipped_windows"]) == (len(grid), len(grid) - run)
    assert summary["skipped_windows"] > 0 or layout != "sparse"


def test_sparse_file_really_is_sparse(tmp_path):
    path, _, _ = make("sparse", tmp_path)
    with rasterio.open(path) as src:  # 2 x 2 tiles of 5 x 6 written: the others have no offset
        written = [int(src.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=1) or 0) > 0
                   for y in range(5) for x in range(6)]  # fmt: skip
    assert sum(written) == 4


# ---------------------------------------------------------------------------------------------
# The mask GeoTIFF and the other outputs


def test_mask_geotiff_has_grid_colours_category_names_overviews_and_tiles(model, info, tmp_path):
    path, bands, valid = make("nodata-rgbi16", tmp_path, H=300, W=280)
    opts = options(bands=bands, overlay=True, vector=True)
    out = tmp_path / "out"
    [summary] = tool.predict_path(model, info, path, str(out), opts)
    files = ["scene_mask.tif", "scene_mask.tif.aux.xml", "scene_overlay.tif",
             "scene_polygons.geojson", "scene.json"]  # fmt: skip
    assert sorted(os.listdir(out)) == sorted(files) and summary["files"] == files
    for f in files:  # readable by all, writable by the owner only (umask permitting)
        assert os.stat(out / f).st_mode & 0o444 == 0o444
    with rasterio.open(out / "scene_mask.tif") as m:
        assert m.block_shapes == [(256, 256)] and m.compression.name == "deflate"
        assert m.overviews(1) == [2] and m.nodata == 255
        assert json.loads(m.tags(1)["CLASS_NAMES"]) == info.classes
        cmap = m.colormap(1)
        assert [cmap[k][:3] for k in range(6)] == [tuple(c) for c in info.palette]
        assert m.read(1, out_shape=(150, 140)).shape == (150, 140)  # from the overview
        mask = m.read(1)
    assert summary["crs"] == "EPSG:25832" and summary["transform"] == list(GRID)[:6]
    names = gdal_category_names(str(out / "scene_mask.tif"))
    if names is not None:  # GDAL reads the PAM file's category names (what QGIS's legend shows)
        assert names == info.classes
    counts = np.bincount(mask.ravel(), minlength=256)
    assert summary["nodata_pixels"] == (~valid).sum() == counts[255]
    assert list(summary["class_shares"].values()) == (counts[:6] / counts[:6].sum()).tolist()
    with rasterio.open(out / "scene_overlay.tif") as o:  # RGB, JPEG, same grid
        assert (o.count, o.compression.name, o.transform, o.crs) == (3, "jpeg", GRID, UTM32)
        assert (o.read()[:, :16] < 8).all()  # no-data black (JPEG rounding aside)
    with open(out / "scene_polygons.geojson") as f:
        polygons = json.load(f)
    assert polygons["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::25832"
    assert len(polygons["features"]) == summary["polygons"] > 0
    shapes = [(f["geometry"], f["properties"]["index"]) for f in polygons["features"]]
    assert all(
        info.classes[f["properties"]["index"]] == f["properties"]["class"]
        for f in polygons["features"]
    )
    burnt = rasterio.features.rasterize(shapes, out_shape=mask.shape, transform=GRID, fill=255)
    assert np.array_equal(burnt, mask)  # the polygons cover exactly the mask's classes


def test_reads_are_whole_block_units_each_once_never_the_whole_raster(tmp_path):
    """read_rows reads the file in units of its 32 x 32 tiles (READ = 256 a side), each unit once
    (samples, then masks) however many window rows it spans, and assembles every window row
    exactly as the whole raster read at once would give it."""
    path, bands, valid = make("nodata-rgbi16", tmp_path, H=2100, W=2100)  # > 2**22 pixels
    calls = []

    class Recorder:
        def __init__(self, src):
            self.src = src

        def __getattr__(self, name):
            return getattr(self.src, name)

        def read(self, *args, **kw):
            calls.append(kw)
            return self.src.read(*args, **kw)

        def read_masks(self, *args, **kw):
            calls.append(kw)
            return self.src.read_masks(*args, **kw)

    with rasterio.open(path) as src:
        scene = tool.describe(Recorder(src), path, bands)
        stride = ev.window_stride(CROP)
        ys = ev.window_starts(2100, CROP, stride)
        rows = list(tool.read_rows(scene, ys, CROP))
        full = src.read(list(bands))
    decimated = [c for c in calls if "out_shape" in c]
    assert len(decimated) == 2 and all(c["out_shape"] == (3, 1050, 1050) for c in decimated)
    assert scene.unit == (256, 256) == (tool.READ, tool.READ)
    windows = [c["window"] for c in calls if "window" in c]
    units = {(w.row_off, w.col_off, w.height, w.width) for w in windows}
    edges = [(o, min(256, 2100 - o)) for o in range(0, 2100, 256)]
    assert units == {(y, x, h, w) for y, h in edges for x, w in edges}  # block-aligned, all
    assert len(windows) == 2 * len(units)  # each unit read once: its samples and its masks
    # every window row as the whole raster gives it (a valid pixel's value, no-data black)
    whole = tool._pixels(scene, full, valid)
    for y, pixels, row_valid in rows:
        assert np.array_equal(row_valid, valid[y : y + CROP])
        assert np.array_equal(pixels, whole[y : y + CROP])
    # the stretch from every 2nd pixel: within 1 % of the percentiles of all valid pixels
    p2, p98 = np.percentile(full[:, valid], (2, 98), axis=1)
    assert np.allclose(scene.scaling["low"], p2, atol=0.01 * (p98 - p2).max())
    assert np.allclose(scene.scaling["high"], p98, atol=0.01 * (p98 - p2).max())
    assert "one pixel in 2 x 2" in scene.scaling["rule"]
    assert [r[0] for r in rows] == ys and rows[1][1].shape == (CROP, 2100, 3)


def test_units_without_a_valid_pixel_are_not_kept(tmp_path):
    """A sparse scene: read_unit keeps only the units that hold a valid pixel (what read_rows holds
    is the data, not the scene's width); a window row of no valid pixel has pixels None."""
    H, W = 600, 2000
    base = {"driver": "GTiff", "width": W, "height": H, "count": 3, "dtype": "uint8"}
    path = tmp_path / "sparse.tif"
    with rasterio.open(path, "w", **base, nodata=0, sparse_ok=True, **TILES) as dst:
        dst.write(
            np.full((3, 32, 32), 7, np.uint8), window=rasterio.windows.Window(1024, 288, 32, 32)
        )
    with rasterio.open(path) as src:
        scene = tool.describe(src, str(path), (1, 2, 3))
        assert [x for x, _, _ in tool.read_unit(scene, 256)] == [1024]
        assert tool.read_unit(scene, 0) == [] == tool.read_unit(scene, 512)
        rows = dict((y, (p, v)) for y, p, v in tool.read_rows(scene, [0, 260, 536], 64))
    assert rows[0][0] is None and rows[536][0] is None and not rows[0][1].any()
    assert rows[260][1].sum() == 32 * 32 and (rows[260][0][28:60, 1024:1056] == 7).all()


def test_fixed_scale_maps_scale_to_255_and_estimates_the_clipped_share(model, info, tmp_path):
    a = np.zeros((3, 40, 50), np.uint16)
    a[:, 0, :10] = 600
    a[:, 0, 10:20] = 3000  # above the scale: clipped, and said so
    path = write(tmp_path / "s.tif", a)
    with rasterio.open(path) as src:
        scene = tool.describe(src, path, (1, 2, 3), scale=1000)
        _, pixels, _ = next(tool.read_rows(scene, [0], 40))
    assert pixels[0, [0, 10, 20], 0].tolist() == [153, 255, 0]
    assert scene.scaling["clipped"] == [10 / 2000] * 3 and scene.scaling["rule"].startswith("fixed")


def test_an_ungeoreferenced_png_gives_a_plain_mask_and_a_summary_without_crs(model, info, tmp_path):
    path = write(tmp_path / "tile.png", rgb(np.random.default_rng(5), 80, 150), driver="PNG",
                 crs=None, transform=None)  # fmt: skip
    [summary] = tool.predict_path(model, info, path, str(tmp_path / "o"), options(name="clip"))
    with rasterio.open(tmp_path / "o" / "tile_mask.tif") as m:
        assert m.crs is None and m.transform.is_identity and m.shape == (80, 150)
    assert (
        summary["crs"] is None and summary["transform"] is None and summary["prediction"] == "clip"
    )
    assert abs(sum(summary["class_shares"].values()) - 1) < 1e-9 and summary["stride"] == 53


# ---------------------------------------------------------------------------------------------
# The command line: mistakes in one line, exit 2; no foreign file overwritten


def run_cli(argv, capsys):
    """(exit status, stderr) of `python -m tools.scene ARGV`."""
    try:
        cli(lambda: tool.main(argv))
    except SystemExit as e:
        return e.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


@pytest.fixture
def fake_load(model, info, monkeypatch):
    """runs.load_run -> the tiny model (its loading is runs.py's, tested there)."""
    calls = []

    def load(path, device):
        calls.append((path, device))
        return model, info, {"crop": CROP}

    monkeypatch.setattr(runs, "load_run", load)
    return calls


def test_cli_predicts_a_folder_and_reruns_into_its_own_outputs(fake_load, tmp_path, capsys):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for name in ("a", "b"):
        write(scenes / f"{name}.tif", rgb(np.random.default_rng(7), 70, 90))
    argv = ["RUN", "--input", str(scenes), "--out", str(tmp_path / "out"), "--device", "cpu",
            "--batch", "3", "--student", "dinov3"]  # fmt: skip
    assert run_cli(argv, capsys)[0] == 0
    assert run_cli(argv + ["--overlay"], capsys)[0] == 0  # our own files: overwritten
    assert os.path.exists(tmp_path / "out" / "b_overlay.tif")
    assert run_cli(argv, capsys)[0] == 0  # the stale overlay of the earlier run is removed
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        f"{n}{s}" for n in "ab" for s in ("_mask.tif", "_mask.tif.aux.xml", ".json")
    )
    summary = json.loads((tmp_path / "out" / "a.json").read_text())
    assert (summary["prediction"], summary["batch"], summary["complete"]) == ("dinov3", 3, True)
    assert fake_load == [("RUN", torch.device("cpu"))] * 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--stride", "0"], "--stride 0: must be >= 1"),
        (["--batch", "0"], "--batch 0: must be >= 1"),
        (["--crop", "0"], "--crop 0: must be >= 1"),
        (["--crop", "32", "--stride", "40"], "--stride 40 must be at most --crop 32"),
        (["--bands", "1,2"], "--bands '1,2': three band numbers"),
        (["--bands", "0,1,2"], "three band numbers from 1"),
        (["--scale", "0"], "--scale 0.0: must be > 0"),
        (["--scale", "nan"], "--scale nan: must be > 0"),
        (["--batch", "two"], "invalid int value"),
        (["--device", "gpu7"], "--device 'gpu7'"),
    ],
)
def test_cli_flag_mistakes_are_one_line_before_the_model_loads(
    fake_load, tmp_path, capsys, extra, message
):
    scene = write(tmp_path / "s.tif", rgb(np.random.default_rng(0), 20, 20))
    code, err = run_cli(["RUN", "--input", scene, "--out", str(tmp_path / "o")] + extra, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert fake_load == []


def test_cli_refuses_input_folder_foreign_files_and_unknown_students(fake_load, tmp_path, capsys):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    scene = write(scenes / "s.tif", rgb(np.random.default_rng(0), 20, 20))
    base = ["RUN", "--input", str(scenes), "--device", "cpu"]
    code, err = run_cli(base + ["--out", str(scenes)], capsys)
    assert code == 2 and "holds the input" in err
    code, err = run_cli(["RUN", "--input", scene, "--out", str(scenes)], capsys)
    assert code == 2 and "holds the input" in err
    out = tmp_path / "out"
    out.mkdir()
    (out / "s.json").write_text('{"notes": "mine"}')  # a file of the user's, named like a summary
    code, err = run_cli(base + ["--out", str(out)], capsys)
    assert code == 2 and "s.json exists and was not written by tools/scene.py" in err
    assert (out / "s.json").read_text() == '{"notes": "mine"}' and fake_load == []
    (out / "s.json").unlink()
    (out / "s_overlay.tif").write_bytes(b"someone's")
    assert run_cli(base + ["--out", str(out)], capsys)[0] == 0  # no overlay asked: not touched
    code, err = run_cli(base + ["--out", str(out), "--overlay"], capsys)
    assert (
        code == 2
        and "s_overlay.tif exists" in err
        and (out / "s_overlay.tif").read_bytes() == b"someone's"
    )
    code, err = run_cli(base + ["--out", str(tmp_path / "o2"), "--student", "nope"], capsys)
    assert code == 2 and "--student 'nope' is not in this model" in err
    code, err = run_cli(base + ["--out", str(tmp_path / "o3"), "--bands", "1,2,4"], capsys)
    assert code == 2 and "band 4 does not exist; the file has 3 bands" in err
    code, err = run_cli(["RUN", "--input", str(tmp_path / "nope"), "--out", str(out)], capsys)
    assert code == 2 and "does not exist" in err
