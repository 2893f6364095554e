"""scene.py and raster.py: the streamed window equals eval's whole-image one, GeoTIFF tags reach the
mask, bands / no-data / 16-bit scaling, the JSON summary, and the bounded open-row buffer."""
import json
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, TiffImagePlugin

import catalog
import data
import eval as ev
import raster
import scene
from errors import UserError
from model import ModelSpec, build_model
from text import stand_in_embeddings

CROP = 128          # the streamed-vs-whole windows; 64 for the small files of the other tests
EPS = 2.0 ** -24    # fp32 unit roundoff
GEO = {33550: (12, (0.5, 0.5, 0.0)),                                   # ModelPixelScale
       33922: (12, (0.0, 0.0, 0.0, 368000.0, 5810000.0, 0.0)),         # ModelTiepoint
       34735: (3, (1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 1, 2049, 34737, 7, 0,
                   3072, 0, 1, 25832)),                                # GeoKeyDirectory: UTM 32N
       34737: (2, "ETRS89 / UTM zone 32N|")}                           # GeoAsciiParams


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "random backbone weights"
        return build_model(ModelSpec(("clip", "dinov3"), 6, size="tiny"), text=stand_in_embeddings(6, 128)).eval()


@pytest.fixture(scope="module")
def info():
    return catalog.dataset_info("demo")   # potsdam's six classes and palette


def write_tiff(path, a, tags=None, *, rows=None, tile=None, planar=False, deflate=False,
               predictor=False, order="<"):
    """A minimal TIFF writer for (H, W, S) arrays: strips of `rows` rows or (h, w) tiles, bands
    interleaved or planar, raw or Deflate, with the horizontal predictor; extra tags {code: (type, v)}."""
    H, W, S = a.shape
    ch, cw = tile or (rows or H, W)
    chunks = []
    for p in ([a[..., s:s + 1] for s in range(S)] if planar else [a]):
        for y in range(0, H, ch):
            for x in range(0, W, cw):
                b = p[y:y + ch, x:x + cw]
                if tile:
                    b = np.pad(b, ((0, ch - b.shape[0]), (0, cw - b.shape[1]), (0, 0)))
                if predictor:
                    b = np.diff(b, axis=1, prepend=np.zeros_like(b[:, :1]))   # wraps, as the rule
                raw = b.astype(a.dtype.newbyteorder(order)).tobytes()
                chunks.append(zlib.compress(raw) if deflate else raw)
    offsets = np.cumsum([8] + [len(c) for c in chunks[:-1]]).tolist()
    e = {256: (4, [W]), 257: (4, [H]), 258: (3, [a.itemsize * 8] * S), 259: (3, [8 if deflate else 1]),
         262: (3, [2 if S >= 3 else 1]), 277: (3, [S]), 284: (3, [2 if planar else 1]),
         317: (3, [2 if predictor else 1]), 339: (3, [{"u": 1, "i": 2, "f": 3}[a.dtype.kind]] * S)}
    counts = [len(c) for c in chunks]
    e |= ({322: (3, [cw]), 323: (3, [ch]), 324: (4, offsets), 325: (4, counts)} if tile else
          {278: (4, [ch]), 273: (4, offsets), 279: (4, counts)})
    e |= tags or {}
    ifd_at = 8 + sum(counts) + sum(counts) % 2
    extra_at = ifd_at + 2 + 12 * len(e) + 4                     # out-of-line values follow the IFD
    ifd, extra = struct.pack(order + "H", len(e)), b""
    for code in sorted(e):
        typ, v = e[code]
        value = v.encode() + b"\0" if typ == 2 else struct.pack(order + {3: "H", 4: "I", 12: "d"}[typ] * len(v), *v)
        n = len(value) if typ == 2 else len(v)
        if len(value) > 4:
            field, extra = struct.pack(order + "I", extra_at + len(extra)), extra + value + b"\0" * (len(value) % 2)
        else:
            field = value.ljust(4, b"\0")
        ifd += struct.pack(order + "HHI", code, typ, n) + field
    with open(path, "wb") as f:
        f.write((b"II" if order == "<" else b"MM") + struct.pack(order + "HI", 42, ifd_at))
        f.write(b"".join(chunks) + b"\0" * (ifd_at - 8 - sum(counts)) + ifd + b"\0\0\0\0" + extra)


def pillow_geotiff(path, a):
    """An RGB uint8 GeoTIFF written by Pillow (tiffinfo with tag types), not by our writer."""
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    for code, (typ, value) in GEO.items():
        ifd[code], ifd.tagtype[code] = value, typ
    Image.fromarray(a).save(path, tiffinfo=ifd)


# ---------------------------------------------------------------------------------------------
# The streamed sliding window equals eval.predict's whole-image one


@pytest.fixture(scope="module")
def reference(model):
    """(pixels, window-averaged logits per student, eval.predict probabilities) of a random image,
    one eval.predict per shape; its sliding_window calls are recorded to get the logits too."""
    cache = {}

    def get(H, W):
        if (H, W) not in cache:
            pixels = np.random.default_rng([H, W]).integers(0, 256, (H, W, 3), dtype=np.uint8)
            logits, real = {}, ev.sliding_window

            def record(student, img, *args, **kwargs):
                logits[student.name] = real(student, img, *args, **kwargs)[0]
                return logits[student.name][None]

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(ev, "sliding_window", record)
                probs = ev.predict(model, data.normalize(pixels)[None], CROP, None, ["fused", "dinov3"])
            cache[(H, W)] = pixels, logits, {n: p[0] for n, p in probs.items()}
        return cache[(H, W)]
    return get


@pytest.mark.parametrize("H, W, batch", [(1024, 1024, 5), (700, 1030, 1), (700, 1030, 4),
                                         (40, 50, 1), (60, 300, 2)])
def test_streamed_mask_equals_the_whole_image_sliding_window(model, reference, H, W, batch):
    pixels, ref_logits, ref_probs = reference(H, W)
    opts = scene.SceneOptions(crop=CROP, batch=batch, progress=False)
    strips = list(scene.stream_strips(model, pixels, opts, ["fused", "dinov3"]))
    logits = {n: torch.cat([s.logits[n] for s in strips], 1) for n in ref_logits}
    probs = {n: torch.cat([s.probs[n] for s in strips], 1) for n in ref_probs}
    if batch == 1:  # the same forwards, the same order of fp32 additions: bit-identical averages
        assert all(torch.equal(logits[n], ref_logits[n]) for n in ref_logits)
    # A batched forward rounds differently (delta, a few ulp of the logits); softmax moves a
    # probability by at most delta / 2, and its own rounding (torch's CPU kernel computes a map's
    # last pixels in a scalar tail, so a strip's tail is not the image's) by a few eps.
    delta = max((logits[n] - ref_logits[n]).abs().max().item() for n in ref_logits)
    scale = max(ref_logits[n].abs().max().item() for n in ref_logits)
    assert delta < 1e-5 * max(scale, 1.0)             # rounding, not a misplaced window (that is O(1))
    tol = delta / 2 + 8 * EPS
    clip, dino = (ref_logits[s.name].softmax(0).amax(0) for s in model.students)
    gap = (clip - dino).abs()                         # near 0: E10 could pick the other student
    for n in ("fused", "dinov3"):
        top2 = ref_probs[n].topk(2, 0).values
        sure = top2[0] - top2[1] > 2 * tol
        if n == "fused":
            sure &= gap > 2 * tol
        assert sure.float().mean() > 0.99             # the check below covers nearly every pixel
        assert ((probs[n] - ref_probs[n]).abs().amax(0)[sure] <= tol).all()
        assert torch.equal(probs[n].argmax(0)[sure], ref_probs[n].argmax(0)[sure])
        if batch == 1:
            assert torch.equal(probs[n].argmax(0), ref_probs[n].argmax(0))


def test_open_row_buffer_holds_one_window_height_and_strips_tile_the_image(model):
    H, W, crop = 600, 100, 64                         # tall: 11 rows of windows
    pixels = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    opts = scene.SceneOptions(crop=crop, batch=3, progress=False)
    strips = list(scene.stream_strips(model, pixels, opts))
    assert len(strips) == len(scene.window_starts(H, crop, opts.stride))
    assert max(s.held for s in strips) == crop <= crop + opts.stride
    rows = [s.probs["fused"].shape[1] for s in strips]
    assert [s.top for s in strips] == np.cumsum([0] + rows[:-1]).tolist() and sum(rows) == H


# ---------------------------------------------------------------------------------------------
# GeoTIFF in, GeoTIFF out


@pytest.mark.parametrize("kind", ["rgb8-pillow", "4band16-nodata"])
def test_geotiff_tags_reach_the_mask_aligned_with_nodata_255(model, info, tmp_path, kind):
    rng = np.random.default_rng(1)
    path = tmp_path / "scene.tif"
    if kind == "rgb8-pillow":
        a = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
        pillow_geotiff(path, a)
        bands, nodata = (1, 2, 3), np.zeros((70, 90), bool)
    else:   # an RGBIR uint16 scene with a no-data collar, planar Deflate strips, NIR-R-G chosen
        a = rng.integers(100, 4000, (70, 90, 4), dtype=np.uint16)
        a[:10], a[:, -7:] = 0, 0
        a[40, 40, :3] = 0                             # not no-data: band 4 is not 0
        write_tiff(path, a, GEO | {42113: (2, "0")}, rows=16, planar=True, deflate=True)
        bands, nodata = (4, 1, 2), (a[..., [3, 0, 1]] == 0).all(-1)
    opts = scene.SceneOptions(crop=64, bands=bands, progress=False)
    summary = scene.predict_scene(model, info, str(path), str(tmp_path / "out"), opts)
    out = tmp_path / "out" / "scene_mask.tif"
    _, tags_in = raster.read_tiff(str(path))
    tags_out = raster.read_tiff(str(out))[1]
    for code in GEO:                                  # same types, same values
        assert tags_out[code] == tags_in[code] == (GEO[code][0], tuple(GEO[code][1])
                                                   if GEO[code][0] != 2 else GEO[code][1])
    with Image.open(out) as im:                       # and as another reader sees them
        assert im.mode == "P" and {c: im.tag_v2[c] for c in GEO} == {c: v for c, (_, v) in GEO.items()}
        mask = np.asarray(im)                         # the class indices
    assert mask.shape == (70, 90)                     # the input's grid
    assert np.array_equal(mask == 255, nodata)
    assert tags_out.get(42113) == ((2, "255") if nodata.any() else None)
    assert summary["geotags"][:4] == ["ModelPixelScale", "ModelTiepoint", "GeoKeyDirectory",
                                      "GeoAsciiParams"]


@pytest.mark.parametrize("layout", [dict(rows=7), dict(rows=5, deflate=True, predictor=True),
                                    dict(tile=(16, 32), planar=True), dict(tile=(32, 16), deflate=True),
                                    dict(rows=9, order=">"), dict(planar=True, dtype="int16"),
                                    dict(rows=4, deflate=True, dtype="float32")])
def test_tiff_reader_decodes_each_supported_layout_exactly(tmp_path, layout):
    layout = dict(layout)
    dtype = np.dtype(layout.pop("dtype", "uint16"))
    rng = np.random.default_rng(2)
    a = (rng.standard_normal((37, 45, 5)) * 3000).astype(dtype)   # 5 bands: Pillow cannot open it
    write_tiff(tmp_path / "t.tif", a, **layout)
    got, _ = raster.read_tiff(str(tmp_path / "t.tif"))
    assert got.dtype == dtype and np.array_equal(got, a)


def test_pillow_written_rgb_tiff_reads_as_pillow_reads_it(tmp_path):
    a = np.random.default_rng(3).integers(0, 256, (33, 47, 3), dtype=np.uint8)
    pillow_geotiff(tmp_path / "p.tif", a)
    assert np.array_equal(raster.read_tiff(str(tmp_path / "p.tif"))[0], a)


def test_lzw_16_bit_tiff_is_a_user_error_suggesting_gdal_translate(tmp_path):
    write_tiff(tmp_path / "t.tif", np.zeros((8, 8, 3), np.uint16), {259: (3, [5])})   # claims LZW
    with pytest.raises(UserError, match="LZW.*gdal_translate -co COMPRESS=DEFLATE"):
        raster.read_scene(str(tmp_path / "t.tif"))


def test_missing_band_is_a_user_error_naming_file_band_and_count(tmp_path):
    write_tiff(tmp_path / "rgbi.tif", np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(UserError, match=r"rgbi\.tif: band 5 does not exist; the file has 4 bands"):
        raster.read_scene(str(tmp_path / "rgbi.tif"), bands=(1, 2, 5))


# ---------------------------------------------------------------------------------------------
# 16-bit scaling


def test_stretch_maps_the_2nd_and_98th_percentiles_to_0_and_255_ignoring_nodata():
    rng = np.random.default_rng(4)
    band = rng.gamma(2.0, 500.0, (1200, 1100)).astype(np.uint16)
    nodata = np.zeros(band.shape, bool)
    nodata[:300] = True
    band[nodata] = 0                                  # a no-data quarter must not move the percentiles
    low, high = raster.stretch_limits(band, nodata)   # from a strided subsample
    p2, p98 = np.percentile(band[~nodata], [2, 98])
    assert abs(low - p2) < 0.02 * (p98 - p2) and abs(high - p98) < 0.02 * (p98 - p2)
    ramp = np.array([[low - 10, low, low + 0.2 * (high - low), high, high + 10]], np.float32)
    out = np.empty(ramp.shape, np.uint8)
    clipped = raster.to_uint8(ramp, low, high, out)
    assert out.tolist() == [[0, 0, 51, 255, 255]] and clipped == 2


def test_fixed_scale_maps_scale_to_255_and_records_the_clipped_share(tmp_path):
    a = np.zeros((4, 5, 3), np.uint16)
    a[0, 0], a[0, 1], a[0, 2] = 600, 1000, 3000       # 3000 > scale: clipped, and said so
    write_tiff(tmp_path / "t.tif", a)
    s = raster.read_scene(str(tmp_path / "t.tif"), scale=1000)
    assert s.pixels[0, :3, 0].tolist() == [153, 255, 255]
    assert s.scaling["clipped"] == [1 / 20] * 3 and s.scaling["rule"].startswith("fixed")


# ---------------------------------------------------------------------------------------------
# Outputs and paths


def test_png_scene_writes_palette_mask_and_class_shares_summing_to_one(model, info, tmp_path):
    a = np.random.default_rng(5).integers(0, 256, (80, 150, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "tile.png")
    opts = scene.SceneOptions(crop=64, name="clip", overlay=True, progress=False)
    [summary] = scene.predict_path(model, info, str(tmp_path / "tile.png"), str(tmp_path / "o"), opts)
    with Image.open(tmp_path / "o" / "tile_mask.png") as im:
        assert im.mode == "P" and im.size == (150, 80)
        counts = np.bincount(np.asarray(im).ravel(), minlength=6)
    with open(tmp_path / "o" / "tile.json") as f:
        saved = json.load(f)
    assert saved == summary and summary["files"] == ["tile_mask.png", "tile_overlay.jpg", "tile.json"]
    assert abs(sum(summary["class_shares"].values()) - 1) < 1e-9
    assert list(summary["class_shares"].values()) == (counts / counts.sum()).tolist()
    assert (summary["width"], summary["height"], summary["prediction"], summary["stride"],
            summary["geotags"]) == (150, 80, "clip", 53, [])


def test_overlay_blends_half_and_keeps_nodata_pixels():
    pixels = np.full((2, 2, 3), 100, np.uint8)
    mask = np.array([[0, 1], [255, 0]], np.uint8)
    out = scene.overlay(pixels, mask, [(200, 0, 0), (0, 0, 50)])
    assert out[0, 0].tolist() == [150, 50, 50] and out[0, 1].tolist() == [50, 50, 75]
    assert out[1, 0].tolist() == [100, 100, 100]


def test_paths_missing_empty_or_clashing_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        scene.list_scenes(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no images"):
        scene.list_scenes(str(tmp_path))
    for name in ("b.png", "a.tif", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert scene.list_scenes(str(tmp_path)) == [str(tmp_path / "a.tif"), str(tmp_path / "b.png")]
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(UserError, match="share a name"):
        scene.list_scenes(str(tmp_path))
