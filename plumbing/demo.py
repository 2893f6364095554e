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
from pathlib import Path

import numpy as np
from PIL import Image

from plumbing.errors import UserError

DEMO_VERSION = 1
_GRASS = [(95, 140, 60), (120, 150, 70), (140, 140, 80), (80, 120, 55)]  # lush ... dry
# roofs: tiles, grey (like asphalt), then green (like grass), white, soil-brown
_ROOFS = [(175, 85, 60), (150, 70, 55), (120, 120, 125), (75, 75, 80)]
_ROOFS += [(95, 135, 70), (215, 215, 210), (150, 120, 90)]
_TREES = [(45, 85, 40), (60, 100, 45), (85, 125, 60)]  # the lightest overlaps grass
_CARS = [(230,) * 3, (30, 30, 35), (125, 125, 130), (170, 30, 30), (40, 60, 150), (190, 190, 200)]
_SOIL = (150, 120, 90)


class _Canvas:
    """One tile being painted: the image, its label, the shared texture field and the drawing tools.
    Every random draw comes from `rng`, in the order the painters below make them."""

    def __init__(self, rng, size):
        # s, the scene scale: the same objects at a different ground resolution
        self.rng, self.size, self.s = rng, size, rng.uniform(0.6, 1.5)
        self.yy, self.xx = np.mgrid[0:size, 0:size].astype(np.float32)
        self.noise = rng.standard_normal((size, size, 1)).astype(np.float32)  # one texture for all
        self.img = self.pick(_GRASS) + 18 * self.smooth(12)[..., None] + 8 * self.noise
        self.lab = np.full((size, size), 2, np.uint8)

    def pick(self, colours):  # one colour of a table, as float32
        return np.asarray(colours[self.rng.integers(len(colours))], np.float32)

    def smooth(self, cell):  # smooth noise, std ~1, blobs of about `cell` px
        k = self.size // cell + 2
        small = Image.fromarray(self.rng.standard_normal((k, k)).astype(np.float32))
        return np.asarray(small.resize((self.size, self.size), Image.BILINEAR))

    def frame(self, cy, cx, a):  # each pixel's (along, across) coordinates, axis a from (cy, cx)
        dx, dy = self.xx - cx, self.yy - cy
        return dx * math.cos(a) + dy * math.sin(a), -dx * math.sin(a) + dy * math.cos(a)

    def rect(self, cy, cx, h, w, a):  # rotated rectangle, w along angle a
        along, across = self.frame(cy, cx, a)
        return (np.abs(along) <= w / 2) & (np.abs(across) <= h / 2)

    def paint(self, mask, colour, cls, tex=6.0):  # fill with a noisy colour and set the class
        colour = np.asarray(colour, np.float32) * self.rng.uniform(0.9, 1.1)
        self.img[mask], self.lab[mask] = colour + tex * self.noise[mask], cls

    def shadow(self, mask, d):  # darken what lies to the bottom-right of an object (not its label)
        d = max(1, int(d))
        self.img[np.pad(mask[:-d, :-d], ((d, 0), (d, 0))) & ~mask] *= 0.55  # mask moved by (d, d)


def _at(cy, cx, a, t, v):  # the point t along and v across direction a from (cy, cx)
    return cy + t * math.sin(a) + v * math.cos(a), cx + t * math.cos(a) - v * math.sin(a)


# The painters of one object each, given the canvas, its generator and the scene scale.
def _soil_patch(c, rng, s):  # clutter: an irregular bare-soil patch
    cy, cx, r = rng.uniform(0, c.size), rng.uniform(0, c.size), rng.uniform(8, 22) * s
    c.paint((c.yy - cy) ** 2 + (c.xx - cx) ** 2 < r * r * (1 + 0.6 * c.smooth(6)), _SOIL, 5, tex=12)


def _road(c, rng, s):  # asphalt band, pavement on both sides, lane dashes, cars
    a = rng.choice([0.0, math.pi / 2]) + rng.normal(0, 0.2)
    cy, cx, w = rng.uniform(16, c.size - 16), rng.uniform(16, c.size - 16), rng.uniform(10, 18) * s
    along, across = c.frame(cy, cx, a)
    c.paint(np.abs(across) < w / 2 + rng.uniform(2, 5) * s, (175, 168, 155), 0)
    c.paint(np.abs(across) < w / 2, (rng.uniform(85, 135),) * 3, 0)
    c.paint((np.abs(across) < 0.7) & (along % (14 * s) < 7 * s), (230, 230, 225), 0)
    for _ in range(rng.integers(0, 6)):
        # a car somewhere along the road, in one of its two lanes
        ccy, ccx = _at(cy, cx, a, rng.uniform(-0.7, 0.7) * c.size, rng.choice([-1, 1]) * w / 4)
        c.paint(c.rect(ccy, ccx, 3.8 * s, 8 * s, a), c.pick(_CARS), 4, tex=4)
        c.img[c.rect(ccy, ccx, 3 * s, 3 * s, a)] *= 0.7  # windscreen / roof


def _parking_lot(c, rng, s):  # a paved lot (impervious) with rows of parked cars
    cy, cx = rng.uniform(0, c.size), rng.uniform(0, c.size)
    a = rng.choice([0.0, math.pi / 2]) + rng.normal(0, 0.2)
    h, w = rng.uniform(14, 30) * s, rng.uniform(20, 40) * s
    c.paint(c.rect(cy, cx, h, w, a), (rng.uniform(140, 200),) * 3, 0)
    for t in np.arange(-w / 2 + 3 * s, w / 2 - 3 * s, 5 * s):
        if rng.random() < 0.5:
            car = c.rect(*_at(cy, cx, a, t, rng.choice([-1, 1]) * h / 4), 8 * s, 3.8 * s, a)
            c.paint(car, c.pick(_CARS), 4, tex=4)


def _building(c, rng, s):  # a rectangle or L-shape, maybe rotated; gable roof, shadow
    cy, cx = rng.uniform(0, c.size), rng.uniform(0, c.size)
    h, w = rng.uniform(12, 26) * s, rng.uniform(16, 36) * s
    a = rng.choice([0.0, math.pi / 2]) + (rng.uniform(0, math.pi) if rng.random() < 0.3 else 0.0)
    m = c.rect(cy, cx, h, w, a)
    if rng.random() < 0.4:  # L-shape: a wing at one end of the long side
        h2 = rng.uniform(0.8, 1.6) * h
        m |= c.rect(*_at(cy, cx, a, w / 2 - h * 0.4, h / 2 + h2 / 2 - 1), h2, 0.8 * h, a)
    c.shadow(m, rng.uniform(3, 6) * s)
    c.paint(m, c.pick(_ROOFS), 1, tex=5)
    c.img[m & (c.frame(cy, cx, a)[1] > 0)] *= 0.8  # the ridge


def _clutter_object(c, rng, s):  # a container, a heap, in a random colour
    cy, cx, h = rng.uniform(0, c.size), rng.uniform(0, c.size), rng.uniform(3, 7) * s
    box = c.rect(cy, cx, h, rng.uniform(4, 12) * s, rng.uniform(0, math.pi))
    c.paint(box, rng.uniform(40, 220, 3), 5, tex=10)


def _trees(c, rng, s):  # a cluster of textured, shaded, shadow-casting crowns
    cy, cx = rng.uniform(0, c.size), rng.uniform(0, c.size)
    leaves = 22 * rng.standard_normal((c.size, c.size, 1)) + 12 * c.smooth(3)[..., None]
    for _ in range(rng.integers(2, 8)):
        ty, tx, r = cy + rng.normal(0, 10 * s), cx + rng.normal(0, 10 * s), rng.uniform(3, 8) * s
        d2 = ((c.yy - ty) ** 2 + (c.xx - tx) ** 2) / (r * r)
        m = d2 < 1
        c.shadow(m, r * 0.6)
        # darker towards the crown's edge, leafy texture
        c.img[m], c.lab[m] = c.pick(_TREES) * (1 - 0.35 * d2[m][:, None]) + leaves[m], 3


# What a tile holds, painted in this order: (painter, fewest, most + 1 objects)
_OBJECTS = [(_soil_patch, 0, 3), (_road, 1, 3), (_parking_lot, 0, 3), (_building, 2, 7)]
_OBJECTS += [(_clutter_object, 0, 4), (_trees, 1, 5)]


def _demo_scene(rng, size=128):
    """One tile: (size, size, 3) uint8 image, (size, size) uint8 label in potsdam's order: 0
    impervious (roads, pavement), 1 building, 2 low vegetation, 3 tree, 4 car, 5 clutter."""
    c = _Canvas(rng, size)
    for painter, lo, hi in _OBJECTS:
        for _ in range(rng.integers(lo, hi)):
            painter(c, rng, c.s)
    # imaging: exposure, illumination gradient, sensor noise
    img = c.img * rng.uniform(0.8, 1.2) + rng.uniform(-15, 15)
    img = img + rng.uniform(-15, 15) * (c.xx / size - 0.5)[..., None]
    return np.clip(img + 4 * rng.standard_normal(img.shape), 0, 255).astype(np.uint8), c.lab


def prepare_demo(root, seed=0, n_train=256, n_val=64):
    """Write the demo dataset to root (images/, labels/, val.txt listing the last n_val images, demo.json).
    Deterministic by seed; does nothing if demo.json already records the same settings."""
    marker = {"seed": seed, "n_train": n_train, "n_val": n_val, "version": DEMO_VERSION}
    marker_path = Path(root, "demo.json")
    if marker_path.is_file() and json.loads(marker_path.read_text()) == marker:
        return
    if not marker_path.is_file() and os.path.isdir(root) and os.listdir(root):
        raise UserError(f"{root} is not a demo folder (no demo.json); refusing to overwrite it")
    tmp = Path(f"{root}.tmp{os.getpid()}")  # written aside, then moved: no half-written demo
    names = [f"demo_{i:04d}.png" for i in range(n_train + n_val)]
    for i, name in enumerate(names):
        for sub, a in zip(("images", "labels"), _demo_scene(np.random.default_rng([seed, i]))):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(tmp / sub / name, compress_level=1)
    (tmp / "val.txt").write_text("".join(f"images/{n} labels/{n}\n" for n in names[n_train:]))
    (tmp / "demo.json").write_text(json.dumps(marker))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
