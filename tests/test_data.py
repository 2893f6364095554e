"""Tests of data.py: class maps, splits, augmentations, loaders, the demo dataset and the errors.
Real crops and the paper's split lists are read from ../shared/data (never copied into the repo)."""

import inspect
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

import train  # noqa: E402
from data import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    SemiDataset,
    Splits,
    Streams,  # noqa: E402
    cutmix_box,
    list_images,
    load_label,
    make_splits,
    rescale,
    rescale_size,
    resize_bilinear,
    resize_nearest,
    train_loaders,
    val_loader,
    weak_augment,
    write_splits,
)
from eval import colorize  # noqa: E402
from plumbing.batches import BatchLayout, RunSampler  # noqa: E402
from plumbing.catalog import DATASETS, DatasetInfo, dataset_info, parse_ratio  # noqa: E402
from plumbing.demo import prepare_demo  # noqa: E402
from plumbing.errors import UserError  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
REAL = os.path.join(SHARED, "real_crops")
SPLITS = os.path.join(SHARED, "co2s_splits")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data not present")

# four saturated, non-black colours: a pixel's class can be read back from its colour
TOY = DatasetInfo(
    "toy",
    ["a", "b", "c", "d"],
    [["a"], ["b"], ["c"], ["d"]],
    [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)],
    False,
    [],
    crop=64,
    base_size=64,
)


def make_dataset(root, n, size=(96, 128), n_unlabeled_only=0, seed=0, cell=32):
    """images/ + labels/ with blocky random labels and the image = the label painted in TOY's palette."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "labels"), exist_ok=True)
    for i in range(n + n_unlabeled_only):
        w, h = size
        lab = (
            rng.integers(0, 4, (h // cell + 1, w // cell + 1))
            .repeat(cell, 0)
            .repeat(cell, 1)[:h, :w]
            .astype(np.uint8)
        )
        Image.fromarray(np.array(TOY.palette, np.uint8)[lab]).save(
            os.path.join(root, "images", f"{i:03d}.png")
        )
        if i < n:
            Image.fromarray(lab).save(os.path.join(root, "labels", f"{i:03d}.png"))
    return str(root)


def to_rgb255(x):  # undo ImageNet normalisation: (3, H, W) -> (H, W, 3) in 0..255
    x = x * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    return (x * 255).permute(1, 2, 0).numpy()


def colour_to_class(rgb):  # nearest TOY palette colour per pixel
    pal = np.array(TOY.palette, np.float32)
    return np.argmin(((rgb[:, :, None, :] - pal[None, None]) ** 2).sum(-1), -1)


# ----------------------------------------------------------------------------- class maps


@needs_shared
def test_real_potsdam_crop_reduce_zero_label():
    path = os.path.join(REAL, "potsdam", "labels", "2_10_0_0_512_512.png")
    raw = np.array(Image.open(path))
    label = load_label(path, DATASETS["potsdam"])
    assert set(np.unique(label)) <= set(range(6)) | {255}
    assert (label[raw == 0] == 255).all() and (raw == 0).any()  # the eroded boundary is ignored
    assert (label[raw > 0] == raw[raw > 0] - 1).all()  # raw k -> class k-1


@needs_shared
@pytest.mark.parametrize("name", ["0.png", "1.png", "2.png"])
def test_real_loveda_crops(name):
    path = os.path.join(REAL, "loveda", "labels", name)
    raw = np.array(Image.open(path))
    label = load_label(path, DATASETS["loveda"])
    assert set(np.unique(label)) <= set(range(7)) | {255}
    assert (label[raw > 0] == raw[raw > 0] - 1).all()


def opencv_linear(src, dw, dh):
    """The scalar reference path of OpenCV's INTER_LINEAR on uint8, stated independently from its
    source (imgproc/resize.cpp): per axis fx = (d + 0.5) * scale - 0.5, sx = floor(fx), clamped at
    the edges with weight 0; weights rounded to 11 bits (INTER_RESIZE_COEF_SCALE 2048); horizontal
    sums in int, the vertical pass rounded once by >> 22. cv2.resize itself runs vector code that
    truncates in between, so it differs from this by one grey level in ~12 % of the values (the
    test against cv2 below)."""

    def taps(ssize, dsize):
        scale = 1.0 / (dsize / ssize)
        f = (np.arange(dsize) + 0.5) * scale - 0.5
        s = np.floor(f).astype(np.int64)
        f = f - s
        low = s < 0
        s[low], f[low] = 0, 0.0
        high = s >= ssize - 1
        s[high], f[high] = ssize - 1, 0.0
        a1 = np.round(f * 2048).astype(np.int64)
        return s, np.minimum(s + 1, ssize - 1), 2048 - a1, a1

    h, w = src.shape[:2]
    x0, x1, ax0, ax1 = taps(w, dw)
    y0, y1, by0, by1 = taps(h, dh)
    img = src.astype(np.int64)
    rows = img[:, x0] * ax0[None, :, None] + img[:, x1] * ax1[None, :, None]  # (h, dw, 3)
    out = rows[y0] * by0[:, None, None] + rows[y1] * by1[:, None, None]
    return np.clip((out + (1 << 21)) >> 22, 0, 255).astype(np.uint8)


def opencv_nearest(src, dw, dh):
    """OpenCV's INTER_NEAREST, one pixel at a time as its loop: sx = floor(dx * ifx), ifx = 1 /
    (dsize / ssize) in double."""
    h, w = src.shape
    ifx, ify = 1.0 / (dw / w), 1.0 / (dh / h)
    out = np.empty((dh, dw), src.dtype)
    for dy in range(dh):
        sy = min(int(np.floor(dy * ify)), h - 1)
        for dx in range(dw):
            out[dy, dx] = src[sy, min(int(np.floor(dx * ifx)), w - 1)]
    return out


@needs_shared
@pytest.mark.parametrize("scale", [0.5, 0.61, 0.9, 1.37, 2.0])
def test_training_rescale_is_opencvs_arithmetic_on_the_real_potsdam_crop(scale):
    """The release rescales with mmseg's Resize (OpenCV bilinear, no antialiasing; labels OpenCV
    nearest): ours is within one grey level of the arithmetic of OpenCV's scalar path (95 % equal),
    the labels are equal, and it is not PIL's antialiased filter."""
    img = np.array(Image.open(os.path.join(REAL, "potsdam", "images", "2_10_0_0_512_512.png")))
    lab = np.array(Image.open(os.path.join(REAL, "potsdam", "labels", "2_10_0_0_512_512.png")))
    dw = dh = int(512 * scale + 0.5)
    ours, ref = resize_bilinear(img, (dw, dh)).astype(int), opencv_linear(img, dw, dh).astype(int)
    diff = np.abs(ours - ref)
    assert ours.shape == (dh, dw, 3) and diff.max() <= 1 and (diff == 0).mean() > 0.95
    # not PIL's: its bilinear antialiases when shrinking, so it moves pixels by more than 1
    pil = np.array(Image.fromarray(img).resize((dw, dh), Image.BILINEAR)).astype(int)
    if scale < 1:
        assert np.abs(pil - ref).max() > 1
    assert np.array_equal(resize_nearest(lab, (dw, dh)), opencv_nearest(lab, dw, dh))
    wide = resize_nearest(lab, (dw, int(384 * scale + 0.5)))  # non-square
    assert np.array_equal(wide, opencv_nearest(lab, dw, int(384 * scale + 0.5)))


def cv2_shares(ours, ref):
    """(share of values equal, share within one grey level) of two uint8 images."""
    diff = np.abs(ours.astype(int) - ref.astype(int))
    return (diff == 0).mean(), (diff <= 1).mean()


RESCALES = [0.5, 0.61, 0.9, 1.37, 2.0]


@pytest.mark.parametrize("scale", RESCALES)
@pytest.mark.parametrize("source", ["potsdam", "random"])
def test_training_rescale_against_opencv_itself(scale, source):
    """resize_bilinear against cv2.resize(INTER_LINEAR), where OpenCV is installed, on the real
    Potsdam crop and on random noise (the hardest case for rounding): every value within one grey
    level, about 7 in 8 equal (exact 2x shrinking of an even size: all equal, OpenCV averages 2x2
    blocks there); labels: resize_nearest IS cv2's INTER_NEAREST. Measured with opencv-python
    5.1.0: equal 100 / 87.6 / 87.7 / 87.7 / 90.8 % (potsdam) and 100 / 87.0 / 87.2 / 87.1 / 90.6 %
    (random), within one grey level 100 % at x0.5, 0.61, 0.9, 1.37, 2.0."""
    cv2 = pytest.importorskip("cv2")
    if source == "potsdam":
        if not os.path.isdir(SHARED):
            pytest.skip("../shared/data not present")
        folder = os.path.join(REAL, "potsdam")
        img = np.array(Image.open(os.path.join(folder, "images", "2_10_0_0_512_512.png")))
        lab = np.array(Image.open(os.path.join(folder, "labels", "2_10_0_0_512_512.png")))
    else:
        rng = np.random.default_rng(0)
        img = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
        lab = rng.integers(0, 7, (300, 400), dtype=np.uint8)
    h, w = lab.shape
    size = (int(w * scale + 0.5), int(h * scale + 0.5))
    ref = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
    equal, within_one = cv2_shares(resize_bilinear(img, size), ref)
    assert within_one == 1.0 and equal > (0.999 if scale == 0.5 else 0.86), (equal, within_one)
    labels = cv2.resize(lab, size, interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(resize_nearest(lab, size), labels)


def mmseg_size(w, h, r, base):
    """mmseg 0.24 Resize(img_scale=(4 base, base), ratio_range) for the ratio r, stated apart:
    random_sample_ratio truncates the target, int(4 base r), int(base r); mmcv's rescale_size takes
    factor = min(long target / long, short target / short) and rounds: int(side * factor + 0.5)."""
    long_target, short_target = int(4 * base * r), int(base * r)
    factor = min(long_target / max(w, h), short_target / min(w, h))
    return int(w * factor + 0.5), int(h * factor + 0.5)


@pytest.mark.parametrize("shape", [(512, 512), (1024, 1024), (256, 256), (700, 300)])
def test_rescale_size_truncates_the_target_as_mmseg_then_rounds_as_mmcv(shape):
    """The training size of every dataset but LoveDA: mmseg's, for the same ratio (a 512 px tile
    becomes floor(512 r), not round(512 r))."""
    w, h = shape
    for seed in range(200):
        r = random.Random(seed).uniform(0.5, 2.0)
        assert rescale_size(w, h, random.Random(seed), 512, "cv2") == mmseg_size(w, h, r, 512)
        if shape == (512, 512):
            assert rescale_size(w, h, random.Random(seed), 512, "cv2") == (int(512 * r),) * 2


def unimatch_resize(img, mask, rng):
    """UniMatch's resize (third_party/unimatch/dataset/transform.py, the release's LoveDA),
    stated apart: the long side an integer in [int(L / 2), int(2 L)], PIL bilinear and nearest."""
    w, h = img.size
    long_side = rng.randint(int(max(h, w) * 0.5), int(max(h, w) * 2.0))
    if h > w:
        oh, ow = long_side, int(1.0 * w * long_side / h + 0.5)
    else:
        ow, oh = long_side, int(1.0 * h * long_side / w + 0.5)
    return img.resize((ow, oh), Image.BILINEAR), mask.resize((ow, oh), Image.NEAREST)


@pytest.mark.parametrize("shape", [(1024, 1024), (300, 200), (200, 300)])
def test_loveda_trains_through_unimatchs_pil_resize(shape):
    """LoveDA's released pipeline (img_scale None) is UniMatch's resize: PIL bilinear (which
    antialiases when shrinking) and PIL nearest, at its integer long side; the weak view is that,
    cropped and flipped as every dataset's."""
    assert DATASETS["loveda"].resize == "pil"
    assert {i.resize for n, i in DATASETS.items() if n != "loveda"} == {"cv2"}
    rng = np.random.default_rng(1)
    w, h = shape
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    label = rng.integers(0, 7, (h, w), dtype=np.uint8)
    for seed in range(6):
        im_ref, lab_ref = unimatch_resize(img, Image.fromarray(label), random.Random(seed))
        size = rescale_size(w, h, random.Random(seed), 1024, "pil")
        im, lab = rescale(img, label, size, "pil")
        assert size == im_ref.size
        assert np.array_equal(im, np.asarray(im_ref)) and np.array_equal(lab, np.asarray(lab_ref))
        if size[0] < w:  # shrinking: PIL's antialiased pixels are not OpenCV's
            assert np.abs(im.astype(int) - resize_bilinear(np.asarray(img), size)).max() > 1
    # the weak view of a LoveDA sample: that resize, then the crop and the flip
    crop, rng_a = 256, random.Random(3)
    out, out_lab, _ = weak_augment(img, label, rng_a, 1024, crop, "pil")
    rng_b = random.Random(3)
    im_ref, lab_ref = (np.asarray(x) for x in unimatch_resize(img, Image.fromarray(label), rng_b))
    x = rng_b.randint(0, max(im_ref.shape[1] - crop, 0))
    y = rng_b.randint(0, max(im_ref.shape[0] - crop, 0))
    ref, ref_lab = np.zeros((crop, crop, 3), np.uint8), np.full((crop, crop), 255, np.uint8)
    patch = im_ref[y : y + crop, x : x + crop]
    ph, pw = patch.shape[:2]
    ref[:ph, :pw], ref_lab[:ph, :pw] = patch, lab_ref[y : y + crop, x : x + crop]
    if rng_b.random() < 0.5:
        ref, ref_lab = ref[:, ::-1], ref_lab[:, ::-1]
    assert np.array_equal(np.asarray(out), ref) and np.array_equal(out_lab.numpy(), ref_lab)


@needs_shared
def test_real_crop_val_sample_and_palette_roundtrip(tmp_path):
    info = DATASETS["potsdam"]
    img, lab = (
        os.path.join(REAL, "potsdam", d, "2_10_0_0_512_512.png") for d in ("images", "labels")
    )
    sample = SemiDataset(info, [(img, lab)], "val")[(0, 0)]
    label = load_label(lab, info)
    assert sample["img"].shape == (3, 512, 512) and torch.equal(
        sample["label"], torch.from_numpy(label.astype(np.int64))
    )
    pal = colorize(label, info.palette)
    assert pal.mode == "P" and np.array_equal(np.array(pal), label)  # palette PNG keeps the indices
    rgb = np.array(pal.convert("RGB"))
    assert (rgb[label == 1] == (0, 0, 255)).all() and (
        rgb[label == 255] == 0
    ).all()  # building blue, ignore black
    pal.convert("RGB").save(tmp_path / "rgb.png")  # a colour-coded label decodes back
    assert np.array_equal(load_label(tmp_path / "rgb.png", info), label)


def test_bad_label_values_and_colours(tmp_path):
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(
        tmp_path / "l.png"
    )  # potsdam raw values: 0..6, 255
    with pytest.raises(ValueError, match=r"l\.png.*\[7\]"):
        load_label(tmp_path / "l.png", DATASETS["potsdam"])
    Image.fromarray(np.full((8, 8), 6, np.uint8)).save(
        tmp_path / "l6.png"
    )  # gid has 15 classes, 0 is a class
    assert (load_label(tmp_path / "l6.png", DATASETS["gid"]) == 6).all()
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"c\.png.*\(7, 7, 7\)"):
        load_label(tmp_path / "c.png", DATASETS["potsdam"])


# ----------------------------------------------------------------------------- splits


@needs_shared
def test_paper_splits_potsdam_1_16(tmp_path):
    s = make_splits(
        DATASETS["potsdam"],
        "1/16",
        data_root=str(tmp_path / "potsdam"),
        splits_dir=SPLITS,
        check=False,
    )
    assert (len(s.labeled), len(s.unlabeled), len(s.val)) == (307, 4617, 548)
    assert len(s.labeled) == 4924 // 16  # floor(pool x ratio)
    img, lab = s.labeled[0]
    assert os.path.isabs(img) and img.startswith(str(tmp_path / "potsdam" / "images"))
    assert lab.startswith(str(tmp_path / "potsdam" / "labels"))
    assert (
        make_splits(
            DATASETS["potsdam"], "1_16", str(tmp_path / "potsdam"), SPLITS, check=False
        ).labeled
        == s.labeled
    )


@needs_shared
def test_unknown_ratio_or_split_folder_lists_valid(tmp_path):
    with pytest.raises(UserError, match="1/32.*1/8"):
        make_splits(DATASETS["potsdam"], "1/3", str(tmp_path), SPLITS, check=False)
    with pytest.raises(UserError, match="gid.*potsdam"):
        make_splits(
            DatasetInfo("custom", ["a"], [["a"]], [(1, 2, 3)], False, []),
            "1/8",
            str(tmp_path),
            SPLITS,
            check=False,
        )


def test_parse_ratio():
    assert parse_ratio("1/16") == parse_ratio("1_16") == "1_16" and parse_ratio("1") == "1"
    for bad in ("16", "3/2", "0/4", "a/b", "1-16"):
        with pytest.raises(ValueError, match="'1/16' or '1_16'"):
            parse_ratio(bad)


def test_generated_splits_floor_disjoint_seeded(tmp_path):
    root = make_dataset(tmp_path / "ds", 41, size=(16, 16), n_unlabeled_only=5)
    s = make_splits(TOY, "1/8", root, seed=0)
    assert len(s.val) == 41 // 10  # fixed hold-out: 10% of labelled images
    pool = 46 - len(s.val)
    assert len(s.labeled) == pool // 8 and len(s.unlabeled) == pool - pool // 8
    sets = [{i for i, _ in x} for x in (s.labeled, s.unlabeled, s.val)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(lab is None for _, lab in s.unlabeled) == 5  # label-less images are unlabelled
    assert make_splits(TOY, "1/8", root, seed=0) == s  # same seed -> same lists
    other = make_splits(TOY, "1/8", root, seed=1)
    assert (
        other.labeled != s.labeled and other.val == s.val
    )  # the val hold-out does not follow the seed
    with open(os.path.join(root, "val.txt"), "w") as f:  # a val.txt in the root wins
        f.write("images/000.png labels/000.png\nimages/001.png labels/001.png\n")
    assert [os.path.basename(i) for i, _ in make_splits(TOY, "1/8", root).val] == [
        "000.png",
        "001.png",
    ]


def test_write_splits_reads_back(tmp_path):
    root = make_dataset(tmp_path / "ds", 20, size=(16, 16), n_unlabeled_only=2)
    s = make_splits(TOY, "1/4", root, seed=3)
    write_splits(s, tmp_path / "run" / "splits")
    first = open(tmp_path / "run" / "splits" / "labeled.txt").readline().split()
    assert first[0].startswith("images/") and first[1].startswith(
        "labels/"
    )  # the paper's line format
    assert make_splits(TOY, "1/4", root, splits_dir=str(tmp_path / "run" / "splits"), seed=99) == s


def test_empty_sets_are_errors(tmp_path):
    root = make_dataset(tmp_path / "ds", 11, size=(16, 16))
    with pytest.raises(ValueError, match="labelled set.*empty"):
        make_splits(TOY, "1/16", root)  # floor(10 / 16) = 0
    with pytest.raises(ValueError, match="unlabelled set.*empty"):
        make_splits(TOY, "1", root)  # every image labelled, none left


def test_missing_root_and_missing_listed_file(tmp_path):
    with pytest.raises(
        UserError, match=r"(?s)nope.*images/.*labels/.*python -m tools.download potsdam"
    ):
        make_splits(DATASETS["potsdam"], "1/16", str(tmp_path / "nope"))
    root = make_dataset(tmp_path / "ds", 4, size=(16, 16))
    for name, lines in (
        ("labeled", "images/000.png labels/000.png\n"),
        ("unlabeled", "images/gone.png\n"),
        ("val", "images/001.png labels/001.png\n"),
    ):
        open(os.path.join(root, f"{name}.txt"), "w").write(lines)
    with pytest.raises(UserError, match="gone.png"):
        make_splits(TOY, "1/8", root)


def test_unknown_dataset_and_custom_classes(tmp_path):
    with pytest.raises(ValueError, match="potsdam.*msl.*demo.*custom"):
        dataset_info("vaihingen")
    root = make_dataset(tmp_path / "c", 10, size=(16, 16), n_unlabeled_only=3)
    with pytest.raises(UserError, match="classes.txt"):
        dataset_info("custom", root)
    open(os.path.join(root, "classes.txt"), "w").write(
        "# my classes\nred roof 255,0,0 | tile roof, clay roof\ngrass 0,255,0\nriver\nroad 255,255,0\n"
    )
    info = dataset_info("custom", root)
    assert info.classes == ["red roof", "grass", "river", "road"]
    assert info.concepts[0] == ["red roof", "tile roof", "clay roof"] and info.concepts[2] == [
        "river"
    ]
    assert info.palette[:2] == [(255, 0, 0), (0, 255, 0)] and len(set(info.palette)) == 4
    assert (
        info.base_size is None and info.eval_size is None
    )  # trained around, and evaluated at, own size
    s = make_splits(info, "1", root)  # all labelled images, label-less ones unlabelled
    assert (
        len(s.labeled) == 9 and len(s.unlabeled) == 3 and all(lab is None for _, lab in s.unlabeled)
    )


# ----------------------------------------------------------------------------- reading errors


def test_truncated_image_and_size_mismatch(tmp_path):
    root = make_dataset(tmp_path / "ds", 2)
    img0 = os.path.join(root, "images", "000.png")
    raw = open(img0, "rb").read()
    open(img0, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="000.png"):
        SemiDataset(TOY, [(img0, os.path.join(root, "labels", "000.png"))], "labeled")[(0, 0)]
    Image.fromarray(np.zeros((40, 32), np.uint8)).save(os.path.join(root, "labels", "001.png"))
    with pytest.raises(ValueError, match="size mismatch.*001.png"):
        SemiDataset(
            TOY,
            [(os.path.join(root, "images", "001.png"), os.path.join(root, "labels", "001.png"))],
            "val",
        )[(0, 0)]


def test_list_images_of_a_file_a_folder_and_its_mistakes(tmp_path):
    """What eval.py --predict and tools/scene.py --input take: a file as itself, a folder's images
    by extension and sorted; a missing path, no image, two formats of one stem are UserErrors."""
    for name in ("b.png", "a.tif", "c.jp2", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert list_images(str(tmp_path / "notes.txt")) == [str(tmp_path / "notes.txt")]
    assert list_images(str(tmp_path)) == [str(tmp_path / n) for n in ("a.tif", "b.png")]
    assert list_images(str(tmp_path), (".jp2", ".png"))[0] == str(tmp_path / "b.png")
    with pytest.raises(UserError, match="does not exist"):
        list_images(str(tmp_path / "gone"))
    with pytest.raises(UserError, match=r"no images in .*accepted extensions: \.bmp"):
        list_images(str(tmp_path), (".bmp",))
    (tmp_path / "b.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"images \['b'\] share a name"):
        list_images(str(tmp_path))


# ----------------------------------------------------------------------------- augmentations


def _items(root, n):
    return [
        (os.path.join(root, "images", f"{i:03d}.png"), os.path.join(root, "labels", f"{i:03d}.png"))
        for i in range(n)
    ]


def test_weak_view_keeps_image_and_label_aligned_and_marks_padding(tmp_path):
    items = _items(make_dataset(tmp_path / "ds", 6), 6)
    ds_l, ds_u = (
        SemiDataset(TOY, items, "labeled", seed=5),
        SemiDataset(TOY, items, "unlabeled", seed=5),
    )
    padded = 0
    for i in range(30):
        s = ds_l[(0, i)]
        img, label = to_rgb255(s["img"]), s["label"].numpy()
        assert s["img"].shape == (3, 64, 64) and s["label"].dtype == torch.int64
        pad = label == 255  # the source labels have no 255: padding only
        assert np.abs(img[pad]).max(initial=0) < 1e-3  # image padded with 0
        interior = ~pad
        for d in ((0, 1), (1, 0), (0, -1), (-1, 0)):  # away from class boundaries
            interior &= np.roll(label, d, (0, 1)) == label
        assert (colour_to_class(img)[interior] == label[interior]).mean() > 0.99
        u = ds_u[(0, i)]
        assert torch.equal(
            u["ignore"], torch.from_numpy(pad)
        )  # the ignore mask is exactly the padding
        padded += pad.any()
    assert padded > 0  # the test did exercise padding


def test_custom_data_trains_around_its_own_size():
    """Custom images are evaluated as stored, so training rescales them around their OWN size (x U(0.5, 2.0)),
    whatever the tile size; a fixed short side of 512 would zoom 128 px tiles 2-8x (never smaller)."""
    img, label = Image.new("RGB", (128, 96)), np.zeros((96, 128), np.uint8)
    for seed in range(20):
        scale = random.Random(seed).uniform(0.5, 2.0)
        _, _, pad = weak_augment(img, label, random.Random(seed), None, 128)
        w, h = mmseg_size(128, 96, scale, 96)  # base: its own short side
        assert int((~pad).sum()) == min(w, 128) * min(h, 128)


def test_strong_views_never_touch_label_or_geometry(tmp_path):
    items = _items(make_dataset(tmp_path / "ds", 4, cell=48), 4)
    ds_l, ds_u = (
        SemiDataset(TOY, items, "labeled", seed=1),
        SemiDataset(TOY, items, "unlabeled", seed=1),
    )
    changed = 0
    for i in range(12):
        l, u = ds_l[(0, i)], ds_u[(0, i)]
        # the weak view and the label are those of the labelled pipeline: strong draws come after geometry
        assert torch.equal(u["img_w"], l["img"]) and torch.equal(u["label"], l["label"])
        # strong views are photometric: well inside each class region (constant colour) they are constant
        for k in u["label"].unique().tolist():
            if k == 255:
                continue
            inside = (
                1 - torch.nn.functional.max_pool2d(1 - (u["label"] == k).float()[None], 15, 1, 7)[0]
                > 0
            )
            if inside.sum() > 1:
                assert max(u[v][:, inside].std(1).max() for v in ("img_s1", "img_s2")) < 0.05
        changed += (not torch.equal(u["img_s1"], u["img_w"])) + (
            not torch.equal(u["img_s1"], u["img_s2"])
        )
    assert changed > 12  # the strong views do differ


def test_unlabeled_without_label_carries_all_ignore(tmp_path):
    root = make_dataset(tmp_path / "ds", 0, n_unlabeled_only=1)
    u = SemiDataset(TOY, [(os.path.join(root, "images", "000.png"), None)], "unlabeled")[(0, 0)]
    assert (u["label"] == 255).all()


def test_cutmix_box_limits():
    import random

    rng, size, boxes = random.Random(0), 512, 0
    for _ in range(400):
        box = cutmix_box(size, rng).numpy()
        if not box.any():
            continue
        boxes += 1
        rows, cols = np.where(box.any(1))[0], np.where(box.any(0))[0]
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert box.sum() == h * w  # one solid rectangle inside the crop
        assert 0.019 <= h * w / size**2 <= 0.4  # area U(0.02, 0.4), minus int rounding
        assert 0.3 * 0.95 <= h / w <= (1 / 0.3) * 1.05  # aspect U(0.3, 1/0.3)
    assert 150 <= boxes <= 250  # the p = 0.5 coin (5 sigma)


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path):
    items = _items(make_dataset(tmp_path / "ds", 3), 3)
    ds = SemiDataset(TOY, items, "unlabeled", seed=0, length=7)
    assert len(ds) == 7 and torch.equal(
        ds[(0, 1)]["label"], SemiDataset(TOY, items, "unlabeled", seed=0)[(0, 1)]["label"]
    )
    a = ds[(0, 4)]
    assert all(torch.equal(a[k], ds[(0, 4)][k]) for k in a)  # the same key, the same sample
    assert not torch.equal(a["img_w"], ds[(1, 4)]["img_w"])  # another epoch, another draw


# ----------------------------------------------------------------------------- loaders


def test_train_loaders_resume_and_workers(tmp_path):
    items = _items(make_dataset(tmp_path / "ds", 14), 14)
    splits = Splits(items[:3], items[3:], items[:1])
    one = BatchLayout(2, pad=False)  # 12 steps = 2 epochs of 5, and 2 more
    loaders = lambda layout, start, workers: train_loaders(
        TOY, splits, layout, Streams(32, 0, workers=workers), range(start, 12)
    )
    torch.manual_seed(123)
    full = [list(ld) for ld in loaders(one, 0, 0).values()]
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))  # the loaders leave the global RNG alone
    assert one.steps_per_epoch(11) == 5 and all(
        len(b) == 12 for b in full
    )  # 11 // 2, labelled list repeated
    l, u, mix = full[0][0], full[1][0], full[2][0]
    assert (
        l["img"].shape == (2, 3, 32, 32)
        and u["box1"].dtype == torch.bool
        and u["ignore"].shape == (2, 32, 32)
    )
    assert not torch.equal(u["img_w"], mix["img_w"])  # the partner stream is a different draw
    resumed = [list(ld) for ld in loaders(one, 3, 2).values()]
    for stream, tail in zip(full, resumed):  # from step 3: same data, with workers
        assert len(tail) == 9 and all(
            torch.equal(a[k], b[k]) for a, b in zip(stream[3:], tail) for k in a
        )
    ranks = [loaders(BatchLayout(4, 2, rank=r, pad=False), 0, 0)["unlabeled"] for r in (0, 1)]
    assert (
        all(len(ld) == 12 for ld in ranks) and BatchLayout(4, 2, pad=False).steps_per_epoch(11) == 2
    )
    assert [len(val_loader(TOY, items[:5], workers=0, rank=r, world_size=2)) for r in (0, 1)] == [
        3,
        2,
    ]


def sampler(n, batch, seed, total, rank=0, world_size=1, accum=1, pad=False):
    """RunSampler with a per-process batch, as the tests below were first written (pad=False: the
    epoch rule that drops the remainder; the release's padding is tested further down)."""
    layout = BatchLayout(batch * world_size * accum, world_size, accum, rank, pad=pad)
    return RunSampler(n, layout, seed, range(0, total))


def test_run_sampler_spans_epochs_and_accum_deals_what_the_ranks_of_a_bigger_run_get():
    n, kw = 23, dict(batch=2, seed=4, total=7)
    one = list(sampler(n, **kw))
    assert len(one) == 7 * 2 and sampler(n, **kw).steps_per_epoch == 11
    epochs = [e for e, _ in one]
    assert epochs == [0] * 14  # 7 steps < 11 per epoch
    two = list(sampler(n, **dict(kw, total=13)))
    assert [e for e, _ in two[22:]] == [1] * 4  # steps 11, 12 are epoch 1
    assert sorted(i for _, i in two[:22]) == sorted(
        set(i for _, i in two[:22])
    )  # an epoch repeats no sample
    # --accum 2 on one process = ranks 0 and 1 of a 2-process run, micro-batch j = rank j, step by step
    accum = list(sampler(n, **dict(kw, accum=2)))
    r0, r1 = (list(sampler(n, **dict(kw, rank=r, world_size=2))) for r in (0, 1))
    for step in range(7):
        assert (
            accum[4 * step : 4 * step + 4]
            == r0[2 * step : 2 * step + 2] + r1[2 * step : 2 * step + 2]
        )
    # and rank 1 of 2 processes with --accum 2 = virtual ranks 2 and 3 of 4
    v2, v3 = (list(sampler(n, **dict(kw, rank=r, world_size=4))) for r in (2, 3))
    mine = list(sampler(n, **dict(kw, rank=1, world_size=2, accum=2)))
    assert mine[:4] == v2[:2] + v3[:2]
    with pytest.raises(UserError, match="fewer than one global batch"):  # train.py refuses it
        train.schedule(dict(iters=None, epochs=1), BatchLayout(4, 2, pad=False), 3)


@pytest.mark.parametrize(
    "n, batch, steps", [(4617, 4, 1155), (4261, 8, 533), (240, 2, 120), (11, 2, 6)]
)
def test_an_epoch_has_the_steps_of_the_releases_4_process_sampler(n, batch, steps):
    """The release's DistributedSampler over 4 processes pads the list to a multiple of 4 by repeating
    its start: floor(ceil(n / 4) / per-GPU batch) steps (potsdam 1/16: 1,155; whdld 1/24: 533), in every
    form of the same global batch."""
    forms = [(1, 1), (1, 4), (4, 1), (2, 2)] if batch % 4 == 0 else [(1, 1), (1, 2)]
    for world, accum in forms:
        assert BatchLayout(batch, world, accum).steps_per_epoch(n) == steps, (world, accum)
    perm = list(range(n))
    order = BatchLayout(batch).epoch_order(perm)
    assert (
        len(order) == -(-n // 4) * 4 and order[n:] == perm[: len(order) - n]
    )  # the start, repeated


def test_the_fast_form_sees_the_images_of_the_4_processes_at_every_step():
    """One micro-batch of 4 = the 4 processes' micro-batches of 1, step by step (the same 4 images)."""
    n, steps = 4617, 1160  # past the end of epoch 0
    fast = list(RunSampler(n, BatchLayout(4), 7, range(steps)))
    twin = list(RunSampler(n, BatchLayout(4, 1, 4), 7, range(steps)))
    ranks = [list(RunSampler(n, BatchLayout(4, 4, 1, r), 7, range(steps))) for r in range(4)]
    for t in range(steps):
        step = fast[4 * t : 4 * t + 4]
        assert step == twin[4 * t : 4 * t + 4] == [r[t] for r in ranks]
    assert {e for e, _ in fast[4 * 1155 :]} == {1}  # 1,155 steps per epoch


def test_a_batch_that_does_not_split_lists_the_valid_accum():
    with pytest.raises(UserError, match="--batch 4 .* 3 micro-batches; valid --accum: 1, 2, 4"):
        BatchLayout(4, 1, 3)
    with pytest.raises(UserError, match="valid --accum: 1, 2"):
        BatchLayout(8, 4, 4)
    with pytest.raises(UserError, match="multiple of the processes"):
        BatchLayout(4, 3, 1)


def test_the_supervised_method_builds_no_unlabelled_stream(tmp_path):
    items = _items(make_dataset(tmp_path / "ds", 10), 10)
    splits = Splits(items[:2], items[2:], items[:1])
    streams = Streams(32, 0, "partner", workers=0)
    loaders = train_loaders(TOY, splits, BatchLayout(2), streams, range(3), method="supervised")
    assert list(loaders) == ["labeled"] and len(loaders["labeled"]) == 3  # 3 steps of 2 images


def test_same_image_partners_follow_the_unlabelled_order_with_their_own_augmentation(tmp_path):
    items = _items(make_dataset(tmp_path / "ds", 10), 10)
    splits = Splits(items[:2], items[2:], items[:1])
    make = lambda mix: train_loaders(
        TOY, splits, BatchLayout(2), Streams(32, 0, mix, workers=0), range(3)
    )
    same, partner = make("same"), make("partner")
    assert list(same["partner"].sampler) == list(same["unlabeled"].sampler)
    assert list(same["partner"].sampler) != list(partner["partner"].sampler)
    u, m = next(iter(same["unlabeled"])), next(iter(same["partner"]))
    assert not torch.equal(u["img_w"], m["img_w"])  # the same images, augmented differently
    assert list(make("rolled")) == ["labeled", "unlabeled"]


def test_the_release_order_is_one_sampler_for_the_labelled_and_unlabelled_lists(tmp_path):
    """--recipe release (order 'shared'): the labelled and unlabelled streams (and the same-image
    partners) visit the same indices in the same order at every step, as the release's two
    DistributedSamplers of one length and one seed, zipped; the labelled list is repeated, so
    index i is labelled image i mod n_l. Our own order gives each stream its own."""
    items = _items(make_dataset(tmp_path / "ds", 11), 11)
    splits = Splits(items[:3], items[3:], items[:1])  # 3 labelled, 8 unlabelled
    layout, steps = BatchLayout(2, 1, 2), range(9)  # 2 micro-batches per step, past an epoch
    make = lambda order, mix="same": train_loaders(
        TOY, splits, layout, Streams(32, 5, mix, workers=0, order=order), steps
    )
    shared, own = make("shared"), make("own")
    keys = {name: list(ld.sampler) for name, ld in shared.items()}
    assert keys["labeled"] == keys["unlabeled"] == keys["partner"]
    assert len(keys["labeled"]) == 9 * 2 and {e for e, _ in keys["labeled"]} == {0, 1, 2}
    assert list(own["labeled"].sampler) != list(own["unlabeled"].sampler)
    # another image as partner keeps an order of its own, shared or not
    assert list(make("shared", "partner")["partner"].sampler) != keys["unlabeled"]
    lab, unl = next(iter(shared["labeled"])), next(iter(shared["unlabeled"]))
    i = keys["labeled"][0][1]  # the first step's first index: labelled i mod 3, unlabelled i
    first = SemiDataset(TOY, splits.labeled, "labeled", crop=32, seed=15, length=8)[(0, i)]
    assert torch.equal(lab["img"][0], first["img"]) and i < 8 and unl["img_w"].shape[0] == 1


def test_the_shared_order_at_seed_0_is_the_releases_distributed_sampler():
    """What the release's 4 processes draw: DistributedSampler(shuffle, seed 0) over the
    unlabelled list (padded to a multiple of 4), set_epoch(e), batches of 1; --accum 4 on one
    process deals the same indices to its 4 micro-batches, step by step, epoch by epoch."""
    from torch.utils.data.distributed import DistributedSampler

    n, steps = 10, 7  # 3 steps per epoch (10 padded to 12, / 4): epochs 0, 1 and 2
    ours = list(RunSampler(n, BatchLayout(4, 1, 4), 0, range(steps)))
    theirs = []
    for epoch in range(3):
        ranks = []
        for r in range(4):
            sampler = DistributedSampler(range(n), num_replicas=4, rank=r, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            ranks.append(list(sampler))
        theirs += [(epoch, ranks[r][t]) for t in range(3) for r in range(4)]
    assert ours == theirs[: 4 * steps]


# ----------------------------------------------------------------------------- demo


def test_demo_dataset(tmp_path):
    """A small demo (40 tiles; the real one is 256 + 64, the same generator), its splits and recipe."""
    root = str(tmp_path / "demo")
    prepare_demo(root, seed=0, n_train=32, n_val=8)
    labels = [
        np.array(Image.open(os.path.join(root, "labels", f)))
        for f in sorted(os.listdir(os.path.join(root, "labels")))
    ]
    assert len(labels) == 40 and labels[0].shape == (128, 128)
    assert set(np.unique(np.concatenate([l.ravel() for l in labels]))) == set(
        range(6)
    )  # all six classes
    assert (
        np.mean([len(np.unique(l)) >= 4 for l in labels]) > 0.9
    )  # most tiles hold several classes
    stamp = os.path.getmtime(os.path.join(root, "images", "demo_0000.png"))
    prepare_demo(root, seed=0, n_train=32, n_val=8)  # idempotent: nothing rewritten
    assert os.path.getmtime(os.path.join(root, "images", "demo_0000.png")) == stamp
    info = DATASETS["demo"]
    s = make_splits(info, "1/16", root)
    assert (len(s.labeled), len(s.unlabeled), len(s.val)) == (2, 30, 8)  # floor(32 / 16) labelled
    defaults = inspect.signature(prepare_demo).parameters
    n_train, n_val = defaults["n_train"].default, defaults["n_val"].default
    assert (n_train, n_val) == (256, 64)  # the demo run: 16 / 240 / 64 at 1/16
    assert (
        BatchLayout(info.batch).steps_per_epoch(n_train - n_train // 16) * info.epochs == 240
    )  # 2 x 120
    small = [str(tmp_path / n) for n in ("a", "b", "c")]
    for r, seed in zip(small, (0, 0, 1)):
        prepare_demo(r, seed=seed, n_train=3, n_val=1)
    read = lambda r: open(os.path.join(r, "images", "demo_0001.png"), "rb").read()
    assert read(small[0]) == read(small[1]) and read(small[0]) != read(
        small[2]
    )  # deterministic by seed
    assert open(os.path.join(root, "images", "demo_0001.png"), "rb").read() == read(small[0])
