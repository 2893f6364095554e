"""raster.py: a scene file as the students read it (three 8-bit bands), and the mask TIFF on its grid.

Pillow reads 8-bit TIFFs of 1-4 bands and single-band 16-bit or float ones, but not what GIS exports
often are: it opens 3- and 4-band 16-bit TIFFs as 8-bit RGB(A) by keeping the high byte (12-bit
imagery turns almost black, silently) and refuses 5+ bands and multi-band float. So TIFFs are decoded
here, with numpy and zlib, in the layouts GDAL writes by default: uncompressed or Deflate (with or
without the horizontal predictor), strips or tiles, bands interleaved or planar, uint8 / uint16 /
int16 / float32 samples, TIFF or BigTIFF, first image only. Any other 8-bit TIFF (LZW, JPEG, palette)
goes through Pillow; anything else is a UserError that says how to convert it with gdal_translate.

The students read three bands (`bands`, 1-based as in GDAL). Samples become 0..255 by a stated rule,
recorded in the scene's `scaling`: 8-bit samples as stored; a fixed `scale` maps value * 255 / scale;
otherwise a per-band stretch maps the 2nd..98th percentile of the valid pixels to 0..255 (both clip
outside, and the share of clipped pixels is recorded). No-data: pixels whose selected bands all equal
the GDAL_NODATA tag (and non-finite float samples).

The georeferencing tags (GeoTIFF's model and GeoKey tags) are carried into the mask TIFF with their
types and values unchanged, so the mask lies on the input in a GIS. The one tag that changes is
GDAL_NODATA: the input's value (say 0) is a class index in the mask, whose no-data is 255.

Deliberately left out: LZW/JPEG/ZSTD decoding of non-8-bit data, 1-bit, 32-bit integer and 64-bit
samples, overviews and further images of the file, reading only a window of a file (the three
selected bands are held whole), .aux.xml and .prj sidecars.
"""
import math
import os
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, TiffImagePlugin

import files
from errors import UserError

# GeoTIFF 1.0 tags and GDAL's no-data tag: what puts a raster on the ground
GEO_TAGS = {33550: "ModelPixelScale", 33922: "ModelTiepoint", 34264: "ModelTransformation",
            34735: "GeoKeyDirectory", 34736: "GeoDoubleParams", 34737: "GeoAsciiParams",
            42113: "GDAL_NODATA"}
NODATA_TAG = 42113
MASK_NODATA = 255             # the mask's no-data value: the ignore label (losses.IGNORE)
PERCENTILES = (2, 98)         # the default stretch of non-8-bit samples
STRETCH_SAMPLES = 2 ** 20     # about this many pixels per band estimate the percentiles
ROWS = 1024                   # rows per block when converting, so float copies stay small

# TIFF field type -> (numpy type, values per count); 2 is ASCII, 5 and 10 are rationals (two values)
_FIELDS = {1: ("u1", 1), 2: ("u1", 1), 3: ("u2", 1), 4: ("u4", 1), 5: ("u4", 2), 6: ("i1", 1),
           7: ("u1", 1), 8: ("i2", 1), 9: ("i4", 1), 10: ("i4", 2), 11: ("f4", 1), 12: ("f8", 1),
           13: ("u4", 1), 16: ("u8", 1), 17: ("i8", 1), 18: ("u8", 1)}
_SAMPLES = {(8, 1): "u1", (16, 1): "u2", (16, 2): "i2", (32, 3): "f4"}  # (bits, SampleFormat) -> type
_DEFLATE = (8, 32946)         # Adobe Deflate and the old Deflate code, both zlib streams
_CODECS = {5: "LZW", 6: "old JPEG", 7: "JPEG", 32773: "PackBits", 34887: "LERC", 34925: "LZMA",
           50000: "ZSTD", 50001: "WebP"}


# --------------------------------------------------------------------------------------------
# TIFF: the tags of the first image, and its samples


def is_tiff(path):
    with open(path, "rb") as f:
        return f.read(4) in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")   # TIFF or BigTIFF


def _read_ifd(f, path):
    """(byte order, {code: (type, value)}) of the first IFD; value a str for ASCII, else a tuple."""
    head = f.read(16)
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    big = head[2:4] in (b"+\0", b"\0+")                # BigTIFF: 8-byte counts and offsets
    word = np.dtype(order + ("u8" if big else "u4"))
    f.seek(int(np.frombuffer(head, word, 1, 8 if big else 4)[0]))
    n = int(np.frombuffer(f.read(8 if big else 2), order + ("u8" if big else "u2"))[0])
    size = 20 if big else 12
    table, tags = f.read(n * size), {}
    for entry in (table[i:i + size] for i in range(0, n * size, size)):
        code, typ = np.frombuffer(entry, order + "u2", 2).tolist()
        if typ not in _FIELDS:
            continue                                  # unknown field type: readers skip it (TIFF 6.0)
        count = int(np.frombuffer(entry, word, 1, 4)[0])
        kind, per = _FIELDS[typ]
        dtype, field = np.dtype(order + kind), entry[4 + word.itemsize:]
        nbytes = dtype.itemsize * per * count
        if nbytes > len(field):                       # the value lives elsewhere: the field is its offset
            f.seek(int(np.frombuffer(field, word, 1)[0]))
            raw = f.read(nbytes)
        else:
            raw = field[:nbytes]
        if len(raw) < nbytes:
            raise UserError(f"{path}: TIFF tag {code} runs past the end of the file (truncated?)")
        value = np.frombuffer(raw, dtype).tolist()
        tags[code] = (typ, raw.rstrip(b"\0").decode("latin-1") if typ == 2 else tuple(value))
    return order, tags


def _first(tags, code, default=None):
    return tags[code][1][0] if code in tags else default


def _sample_type(tags):
    bits, fmt = set(tags.get(258, (3, (1,)))[1]), set(tags.get(339, (3, (1,)))[1])
    return _SAMPLES.get((bits.pop(), fmt.pop())) if len(bits) == len(fmt) == 1 else None


def _unsupported(tags):
    """Why _decode cannot read this image, or None."""
    codec, predictor = _first(tags, 259, 1), _first(tags, 317, 1)
    if codec not in (1, *_DEFLATE):
        return f"compression {_CODECS.get(codec, codec)}"
    if _sample_type(tags) is None:
        return f"samples of {tags.get(258, (0, (1,)))[1]} bits, format {tags.get(339, (0, (1,)))[1]}"
    if predictor not in (1, 2) or (predictor == 2 and _sample_type(tags) == "f4"):
        return f"predictor {predictor}"
    if _first(tags, 262, 1) in (0, 3, 6):             # min-is-white, palette, YCbCr: not bands as stored
        return f"photometric interpretation {_first(tags, 262)}"
    if not ({273, 279} <= set(tags) or {322, 323, 324, 325} <= set(tags)):
        return "neither strips nor tiles"
    return None


def _decode(f, order, tags, path):
    """(H, W, bands) samples, native byte order: every strip or tile read, inflated, un-predicted."""
    W, H, S = _first(tags, 256), _first(tags, 257), _first(tags, 277, 1)
    dtype, planar = np.dtype(order + _sample_type(tags)), _first(tags, 284, 1) == 2
    tiled = 322 in tags
    if tiled:
        cw, ch, offsets, counts = _first(tags, 322), _first(tags, 323), tags[324][1], tags[325][1]
    else:
        cw, ch, offsets, counts = W, min(_first(tags, 278, H), H), tags[273][1], tags[279][1]
    across, down, per = -(-W // cw), -(-H // ch), 1 if planar else S   # chunks per row / column
    out = np.empty((down * ch, across * cw, S), dtype.newbyteorder("="))
    for i, (offset, nbytes) in enumerate(zip(offsets, counts)):
        band, k = divmod(i, across * down)            # planar: all chunks of band 0, then band 1, ...
        y, x = k // across * ch, k % across * cw
        rows = ch if tiled else min(ch, H - y)         # the last strip may be short; tiles are padded
        f.seek(offset)
        try:
            raw = f.read(nbytes)
            raw = zlib.decompress(raw) if _first(tags, 259, 1) in _DEFLATE else raw
            chunk = np.frombuffer(raw, dtype, rows * cw * per).reshape(rows, cw, per)
        except (zlib.error, ValueError) as e:
            raise UserError(f"{path}: {'tile' if tiled else 'strip'} {i} is truncated or corrupt ({e})")
        if _first(tags, 317, 1) == 2:                 # horizontal predictor: each sample minus its left
            chunk = np.cumsum(chunk, axis=1, dtype=out.dtype)   # integer wrap-around is the rule
        out[y:y + rows, x:x + cw, band:band + per] = chunk
    return out[:H, :W]


def pillow_array(path):
    """(H, W, bands) uint8 of an image Pillow reads as 8-bit: L, RGB, RGBA, CMYK as stored, palette
    and 1-bit as RGB. Pillow's decompression-bomb limit is lifted: scenes are large on purpose."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as im:
            im = im.convert("RGB") if im.mode in ("P", "PA", "1", "LA") else im
            mode, a = im.mode, np.asarray(im)
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from e
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if mode not in ("L", "RGB", "RGBA", "CMYK"):
        raise UserError(f"cannot read {path}: image mode {mode} (8-bit images only, or a TIFF)")
    return a[..., None] if a.ndim == 2 else a


def read_tiff(path):
    """(samples (H, W, bands) in the file's type, tags {code: (type, value)}) of a TIFF's first image."""
    with open(path, "rb") as f:
        order, tags = _read_ifd(f, path)
        problem = _unsupported(tags)
        if problem is None:
            return _decode(f, order, tags, path), tags
    if _sample_type(tags) == "u1":                    # e.g. LZW or JPEG: Pillow decodes those at 8 bits
        return pillow_array(path), tags
    raise UserError(f"cannot read {path}: {problem} is not supported for non-8-bit TIFFs (this reader "
                    f"takes uncompressed or Deflate uint8/uint16/int16/float32); convert it with "
                    f"`gdal_translate -co COMPRESS=DEFLATE {path} out.tif`")


def write_mask(path, mask, palette, tags):
    """mask (H, W) uint8 as a Deflate palette TIFF: pixel values are the class indices (255 no-data),
    the palette is its colour map, and `tags` {code: (type, value)} are written with their types."""
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    for code, (typ, value) in tags.items():
        ifd[code] = value
        ifd.tagtype[code] = typ
    files.colorize(mask, palette).save(path, compression="tiff_adobe_deflate", tiffinfo=ifd)


# --------------------------------------------------------------------------------------------
# A scene: three bands, no-data, 0..255


@dataclass
class Scene:
    pixels: np.ndarray    # (H, W, 3) uint8: the selected bands as the students read them
    nodata: np.ndarray    # (H, W) bool: pixels the file marks as no-data; None if there are none
    geotags: dict         # {code: (type, value)} of GEO_TAGS the file holds; {} if none (or not a TIFF)
    tiff: bool            # the file is a TIFF: the mask is written as one
    bands: int            # bands in the file
    dtype: str            # sample type in the file
    scaling: dict         # how samples became 0..255: rule, low / high per band, share clipped


def stretch_limits(band, nodata=None):
    """(low, high): the PERCENTILES of the valid pixels, estimated on every k-th row and column so
    that about STRETCH_SAMPLES pixels are read (a 10k x 10k band: every 10th). high > low."""
    step = max(1, math.isqrt(band.size // STRETCH_SAMPLES))
    sample = band[::step, ::step]
    sample = sample[~nodata[::step, ::step]] if nodata is not None else sample.ravel()
    sample = sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample
    if sample.size == 0:                              # all no-data: any map will do
        return 0.0, 1.0
    low, high = np.percentile(sample, PERCENTILES).tolist()
    return low, max(high, low + 1e-6)                 # a constant band: everything at or above low -> 255


def to_uint8(band, low, high, out, nodata=None):
    """out[:] = round((band - low) * 255 / (high - low)) clipped to 0..255, in blocks of ROWS rows.
    Returns how many valid pixels were clipped."""
    clipped = 0
    for r in range(0, len(band), ROWS):
        v = band[r:r + ROWS].astype(np.float32)
        outside = (v < low) | (v > high)
        clipped += np.count_nonzero(outside if nodata is None else outside & ~nodata[r:r + ROWS])
        v = np.clip((v - low) * np.float32(255 / (high - low)), 0, 255)
        out[r:r + ROWS] = np.rint(np.nan_to_num(v))   # NaN (float no-data) -> 0
    return clipped


def _nodata(cols, tags):
    """(H, W) bool: all selected bands equal GDAL_NODATA, or a float sample is not finite; or None."""
    masks = []
    if NODATA_TAG in tags:
        try:
            value = float(tags[NODATA_TAG][1])
        except ValueError:
            raise UserError(f"GDAL_NODATA {tags[NODATA_TAG][1]!r} is not a number") from None
        masks.append(np.logical_and.reduce([np.isnan(c) if math.isnan(value) else c == value
                                            for c in cols]))
    if cols[0].dtype.kind == "f":
        masks.append(np.logical_or.reduce([~np.isfinite(c) for c in cols]))
    mask = np.logical_or.reduce(masks) if masks else None
    return mask if mask is not None and mask.any() else None


def read_scene(path, bands=(1, 2, 3), scale=None):
    """The Scene of an image file: a TIFF through read_tiff, anything else through Pillow (8-bit)."""
    if not os.path.isfile(path):
        raise UserError(f"image not found: {path}")
    tiff = is_tiff(path)
    raw, tags = read_tiff(path) if tiff else (pillow_array(path), {})
    n = raw.shape[2]
    if len(bands) != 3:
        raise UserError(f"bands {list(bands)}: the students read three bands (e.g. 1,2,3)")
    for b in bands:
        if not 1 <= b <= n:
            raise UserError(f"{path}: band {b} does not exist; the file has {n} band{'s' * (n != 1)} "
                            f"(bands are numbered from 1, as in GDAL)")
    if scale is not None and not scale > 0:
        raise UserError(f"scale {scale}: must be > 0 (a pixel value that maps to 255)")
    cols = [raw[..., b - 1] for b in bands]           # views, in the file's type
    nodata = _nodata(cols, tags)
    if raw.dtype == np.uint8 and scale is None:
        as_stored = n == 3 and tuple(bands) == (1, 2, 3)
        pixels = np.ascontiguousarray(raw) if as_stored else np.stack(cols, -1)
        scaling = dict(rule="none: 8-bit samples as stored")
    else:
        pixels, scaling = np.empty((*raw.shape[:2], 3), np.uint8), dict(low=[], high=[], clipped=[])
        valid = raw.shape[0] * raw.shape[1] - (0 if nodata is None else int(nodata.sum()))
        for j, band in enumerate(cols):
            low, high = (0.0, float(scale)) if scale else stretch_limits(band, nodata)
            clipped = to_uint8(band, low, high, pixels[..., j], nodata)
            for key, value in (("low", low), ("high", high), ("clipped", clipped / max(valid, 1))):
                scaling[key].append(value)
        scaling["rule"] = (f"fixed: value * 255 / {scale}, clipped to 0..255" if scale else
                           f"stretch: per band, percentile {PERCENTILES[0]}..{PERCENTILES[1]} of the "
                           f"valid pixels -> 0..255, clipped outside")
    geotags = {c: tags[c] for c in GEO_TAGS if c in tags}
    return Scene(pixels, nodata, geotags, tiff, n, str(raw.dtype), scaling)
