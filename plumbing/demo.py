"""demo.py: the built-in `demo` dataset, a synthetic Potsdam-like aerial scene generator.

So that `python train.py` runs offline on a fresh machine: Potsdam's six classes and palette at
128 px, roofs of several colours and shapes, roads and pavement, grass, textured trees with shadows,
cars on roads, clutter; noise, shadows and scale changes, and colour overlap between classes (grey
roofs vs asphalt, green roofs vs grass), so that colour alone does not solve it. Deterministic by
seed. Written to disk once (images/, labels/ index PNGs, val.txt) and then read like any dataset;
its recipe (crop, epochs, batch, tiny students) is its entry in catalog.py.
"""

import json
import math
import os
import shutil

import numpy as np
from PIL import Image

from plumbing.errors import UserError

DEMO_VERSION = 1
_GRASS = [(95, 140, 60), (120, 150, 70), (140, 140, 80), (80, 120, 55)]  # lush ... dry
_ROOFS = [
    (175, 85, 60),
    (150, 70, 55),
    (120, 120, 125),
    (75, 75, 80),  # tiles, grey (like asphalt)
    (95, 135, 70),
    (215, 215, 210),
    (150, 120, 90),
]  # green (like grass), white, soil-brown
_TREES = [(45, 85, 40), (60, 100, 45), (85, 125, 60)]  # the lightest overlaps grass
_CARS = [
    (230, 230, 230),
    (30, 30, 35),
    (125, 125, 130),
    (170, 30, 30),
    (40, 60, 150),
    (190, 190, 200),
]
_SOIL = (150, 120, 90)


class _Canvas:
    """One tile being painted: the image, its label, the shared texture field and the drawing tools.
    Every random draw comes from `rng`, in the order the painters below make them."""

    def __init__(self, rng, size):
        self.rng, self.size = rng, size
        self.yy, self.xx = np.mgrid[0:size, 0:size].astype(np.float32)
        self.s = rng.uniform(
            0.6, 1.5
        )  # scene scale: the same objects at a different ground resolution
        self.noise = rng.standard_normal((size, size, 1)).astype(np.float32)  # one texture for all
        grass = np.asarray(_GRASS[rng.integers(len(_GRASS))], np.float32)
        self.img = grass + 18 * self.smooth(12)[..., None] + 8 * self.noise
        self.lab = np.full((size, size), 2, np.uint8)

    def smooth(self, cell):  # smooth noise, std ~1, blobs of about `cell` px
        k = self.size // cell + 2
        small = Image.fromarray(self.rng.standard_normal((k, k)).astype(np.float32))
        return np.asarray(small.resize((self.size, self.size), Image.BILINEAR))

    def rect(self, cy, cx, h, w, a):  # rotated rectangle, w along angle a
        dx, dy = self.xx - cx, self.yy - cy
        u, v = dx * math.cos(a) + dy * math.sin(a), -dx * math.sin(a) + dy * math.cos(a)
        return (np.abs(u) <= w / 2) & (np.abs(v) <= h / 2)

    def paint(self, mask, colour, cls, tex=6.0):  # fill with a noisy colour and set the class
        self.img[mask] = (
            np.asarray(colour, np.float32) * self.rng.uniform(0.9, 1.1) + tex * self.noise[mask]
        )
        self.lab[mask] = cls

    def shadow(
        self, mask, d
    ):  # darken what lies to the bottom-right of an object (the label stays)
        d = max(1, int(d))
        cast = np.zeros_like(mask)
        cast[d:, d:] = mask[:-d, :-d]
        self.img[cast & ~mask] *= 0.55


def _clutter_patches(c):  # clutter: irregular bare-soil patches
    rng, s, yy, xx = c.rng, c.s, c.yy, c.xx
    for _ in range(rng.integers(0, 3)):
        cy, cx, r = rng.uniform(0, c.size), rng.uniform(0, c.size), rng.uniform(8, 22) * s
        c.paint((yy - cy) ** 2 + (xx - cx) ** 2 < r * r * (1 + 0.6 * c.smooth(6)), _SOIL, 5, tex=12)


def _roads(c):  # asphalt band, pavement on both sides, lane dashes, cars
    rng, s, size = c.rng, c.s, c.size
    for _ in range(rng.integers(1, 3)):
        a = rng.choice([0.0, math.pi / 2]) + rng.normal(0, 0.2)
        cy, cx, w = rng.uniform(16, size - 16), rng.uniform(16, size - 16), rng.uniform(10, 18) * s
        across = -(c.xx - cx) * math.sin(a) + (c.yy - cy) * math.cos(a)
        along = (c.xx - cx) * math.cos(a) + (c.yy - cy) * math.sin(a)
        c.paint(np.abs(across) < w / 2 + rng.uniform(2, 5) * s, (175, 168, 155), 0)
        c.paint(np.abs(across) < w / 2, (rng.uniform(85, 135),) * 3, 0)
        c.paint((np.abs(across) < 0.7) & (along % (14 * s) < 7 * s), (230, 230, 225), 0)
        for _ in range(rng.integers(0, 6)):
            t, lane = rng.uniform(-0.7, 0.7) * size, rng.choice([-1, 1]) * w / 4
            ccx = cx + t * math.cos(a) - lane * math.sin(a)
            ccy = cy + t * math.sin(a) + lane * math.cos(a)
            c.paint(c.rect(ccy, ccx, 3.8 * s, 8 * s, a), _CARS[rng.integers(len(_CARS))], 4, tex=4)
            c.img[c.rect(ccy, ccx, 3 * s, 3 * s, a)] *= 0.7  # windscreen / roof


def _parking_lots(c):  # paved lots (impervious) with rows of parked cars
    rng, s = c.rng, c.s
    for _ in range(rng.integers(0, 3)):
        cy, cx = rng.uniform(0, c.size), rng.uniform(0, c.size)
        a = rng.choice([0.0, math.pi / 2]) + rng.normal(0, 0.2)
        h, w = rng.uniform(14, 30) * s, rng.uniform(20, 40) * s
        c.paint(c.rect(cy, cx, h, w, a), (rng.uniform(140, 200),) * 3, 0)
        for t in np.arange(-w / 2 + 3 * s, w / 2 - 3 * s, 5 * s):
            if rng.random() < 0.5:
                v = rng.choice([-1, 1]) * h / 4
                car = c.rect(
                    cy + t * math.sin(a) + v * math.cos(a),
                    cx + t * math.cos(a) - v * math.sin(a),
                    8 * s,
                    3.8 * s,
                    a,
                )
                c.paint(car, _CARS[rng.integers(len(_CARS))], 4, tex=4)


def _buildings(c):  # rectangles, L-shapes, rotated; gable roofs, shadows
    rng, s = c.rng, c.s
    for _ in range(rng.integers(2, 7)):
        cy, cx = rng.uniform(0, c.size), rng.uniform(0, c.size)
        h, w = rng.uniform(12, 26) * s, rng.uniform(16, 36) * s
        a = rng.choice([0.0, math.pi / 2]) + (
            rng.uniform(0, math.pi) if rng.random() < 0.3 else 0.0
        )
        m = c.rect(cy, cx, h, w, a)
        if rng.random() < 0.4:  # L-shape: a wing at one end of the long side
            h2 = rng.uniform(0.8, 1.6) * h
            u, v = w / 2 - h * 0.4, h / 2 + h2 / 2 - 1
            m |= c.rect(
                cy + u * math.sin(a) + v * math.cos(a),
                cx + u * math.cos(a) - v * math.sin(a),
                h2,
                0.8 * h,
                a,
            )
        c.shadow(m, rng.uniform(3, 6) * s)
        c.paint(m, _ROOFS[rng.integers(len(_ROOFS))], 1, tex=5)
        c.img[m & (-(c.xx - cx) * math.sin(a) + (c.yy - cy) * math.cos(a) > 0)] *= 0.8  # the ridge


def _clutter_objects(c):  # containers, heaps in random colours
    rng, s = c.rng, c.s
    for _ in range(rng.integers(0, 4)):
        box = c.rect(
            rng.uniform(0, c.size),
            rng.uniform(0, c.size),
            rng.uniform(3, 7) * s,
            rng.uniform(4, 12) * s,
            rng.uniform(0, math.pi),
        )
        c.paint(box, rng.uniform(40, 220, 3), 5, tex=10)


def _trees(c):  # clusters of textured, shaded, shadow-casting crowns
    rng, s, size = c.rng, c.s, c.size
    for _ in range(rng.integers(1, 5)):
        cy, cx = rng.uniform(0, size), rng.uniform(0, size)
        leaves = 22 * rng.standard_normal((size, size, 1)) + 12 * c.smooth(3)[..., None]
        for _ in range(rng.integers(2, 8)):
            ty, tx = cy + rng.normal(0, 10 * s), cx + rng.normal(0, 10 * s)
            r = rng.uniform(3, 8) * s
            d2 = ((c.yy - ty) ** 2 + (c.xx - tx) ** 2) / (r * r)
            m = d2 < 1
            c.shadow(m, r * 0.6)
            crown = np.asarray(_TREES[rng.integers(len(_TREES))], np.float32) * (
                1 - 0.35 * d2[m][:, None]
            )
            c.img[m] = crown + leaves[m]  # darker towards the crown's edge, leafy texture
            c.lab[m] = 3


def _demo_scene(rng, size=128):
    """One tile: (size, size, 3) uint8 image, (size, size) uint8 label in potsdam's order: 0
    impervious (roads, pavement), 1 building, 2 low vegetation, 3 tree, 4 car, 5 clutter."""
    c = _Canvas(rng, size)
    for painter in (_clutter_patches, _roads, _parking_lots, _buildings, _clutter_objects, _trees):
        painter(c)
    # imaging: exposure, illumination gradient, sensor noise
    img = c.img * rng.uniform(0.8, 1.2) + rng.uniform(-15, 15)
    img = img + rng.uniform(-15, 15) * (c.xx / size - 0.5)[..., None]
    img = img + 4 * rng.standard_normal(img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), c.lab


def prepare_demo(root, seed=0, n_train=256, n_val=64):
    """Write the demo dataset to root (images/, labels/, val.txt listing the last n_val images, demo.json).
    Deterministic by seed; does nothing if demo.json already records the same settings."""
    marker = {"seed": seed, "n_train": n_train, "n_val": n_val, "version": DEMO_VERSION}
    marker_path = os.path.join(root, "demo.json")
    if os.path.isfile(marker_path):
        with open(marker_path) as f:
            if json.load(f) == marker:
                return
    elif os.path.isdir(root) and os.listdir(root):
        raise UserError(
            f"{root} exists and is not a demo folder (no demo.json); refusing to overwrite it"
        )
    tmp = (
        f"{root}.tmp{os.getpid()}"  # write aside, then move into place: no half-written demo folder
    )
    os.makedirs(os.path.join(tmp, "images"), exist_ok=True)
    os.makedirs(os.path.join(tmp, "labels"), exist_ok=True)
    names = [f"demo_{i:04d}.png" for i in range(n_train + n_val)]
    for i, name in enumerate(names):
        img, lab = _demo_scene(np.random.default_rng([seed, i]))
        Image.fromarray(img).save(os.path.join(tmp, "images", name), compress_level=1)
        Image.fromarray(lab).save(os.path.join(tmp, "labels", name), compress_level=1)
    with open(os.path.join(tmp, "val.txt"), "w") as f:
        f.writelines(f"images/{n} labels/{n}\n" for n in names[n_train:])
    with open(os.path.join(tmp, "demo.json"), "w") as f:
        json.dump(marker, f)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    os.replace(tmp, root)
