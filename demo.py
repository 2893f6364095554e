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

from errors import UserError


DEMO_VERSION = 1
_GRASS = [(95, 140, 60), (120, 150, 70), (140, 140, 80), (80, 120, 55)]         # lush ... dry
_ROOFS = [(175, 85, 60), (150, 70, 55), (120, 120, 125), (75, 75, 80),         # tiles, grey (like asphalt)
          (95, 135, 70), (215, 215, 210), (150, 120, 90)]                      # green (like grass), white, soil-brown
_TREES = [(45, 85, 40), (60, 100, 45), (85, 125, 60)]                           # the lightest overlaps grass
_CARS = [(230, 230, 230), (30, 30, 35), (125, 125, 130), (170, 30, 30), (40, 60, 150), (190, 190, 200)]
_SOIL = (150, 120, 90)

def _demo_scene(rng, size=128):
    """One tile: (size, size, 3) uint8 image, (size, size) uint8 label in potsdam's order: 0 impervious
    (roads, pavement), 1 building, 2 low vegetation, 3 tree, 4 car, 5 clutter."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    s = rng.uniform(0.6, 1.5)  # scene scale: the same objects at a different ground resolution

    def smooth(cell):  # smooth noise, std ~1, blobs of about `cell` px
        k = size // cell + 2
        small = Image.fromarray(rng.standard_normal((k, k)).astype(np.float32))
        return np.asarray(small.resize((size, size), Image.BILINEAR))

    def rect(cy, cx, h, w, a):  # rotated rectangle, w along angle a
        u, v = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a), -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
        return (np.abs(u) <= w / 2) & (np.abs(v) <= h / 2)

    def paint(mask, colour, cls, tex=6.0):  # fill with a noisy colour and set the class
        img[mask] = np.asarray(colour, np.float32) * rng.uniform(0.9, 1.1) + tex * noise[mask]
        lab[mask] = cls

    def shadow(mask, d):  # darken what lies to the bottom-right of an object (the label underneath stays)
        d = max(1, int(d))
        cast = np.zeros_like(mask)
        cast[d:, d:] = mask[:-d, :-d]
        img[cast & ~mask] *= 0.55

    noise = rng.standard_normal((size, size, 1)).astype(np.float32)  # one texture field, shared by all objects
    g = np.asarray(_GRASS[rng.integers(len(_GRASS))], np.float32)
    img = g + 18 * smooth(12)[..., None] + 8 * noise
    lab = np.full((size, size), 2, np.uint8)
    for _ in range(rng.integers(0, 3)):  # clutter: irregular bare-soil patches
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(8, 22) * s
        paint((yy - cy) ** 2 + (xx - cx) ** 2 < r * r * (1 + 0.6 * smooth(6)), _SOIL, 5, tex=12)
    for _ in range(rng.integers(1, 3)):  # roads: asphalt band, pavement on both sides, lane dashes, cars
        a = rng.choice([0.0, math.pi / 2]) + rng.normal(0, 0.2)
        cy, cx, w = rng.uniform(16, size - 16), rng.uniform(16, size - 16), rng.uniform(10, 18) * s
        across = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
        along = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)
        paint(np.abs(across) < w / 2 + rng.uniform(2, 5) * s, (175, 168, 155), 0)
        paint(np.abs(across) < w / 2, (rng.uniform(85, 135),) * 3, 0)
        paint((np.abs(across) < 0.7) & (along % (14 * s) < 7 * s), (230, 230, 225), 0)
        for _ in range(rng.integers(0, 6)):
            t, lane = rng.uniform(-0.7, 0.7) * size, rng.choice([-1, 1]) * w / 4
            ccx, ccy = cx + t * math.cos(a) - lane * math.sin(a), cy + t * math.sin(a) + lane * math.cos(a)
            paint(rect(ccy, ccx, 3.8 * s, 8 * s, a), _CARS[rng.integers(len(_CARS))], 4, tex=4)
            img[rect(ccy, ccx, 3 * s, 3 * s, a)] *= 0.7  # windscreen / roof
    for _ in range(rng.integers(0, 3)):  # paved lots (impervious) with rows of parked cars
        cy, cx, a = rng.uniform(0, size), rng.uniform(0, size), rng.choice([0.0, math.pi / 2]) + rng.normal(0, 0.2)
        h, w = rng.uniform(14, 30) * s, rng.uniform(20, 40) * s
        paint(rect(cy, cx, h, w, a), (rng.uniform(140, 200),) * 3, 0)
        for t in np.arange(-w / 2 + 3 * s, w / 2 - 3 * s, 5 * s):
            if rng.random() < 0.5:
                v = rng.choice([-1, 1]) * h / 4
                paint(rect(cy + t * math.sin(a) + v * math.cos(a), cx + t * math.cos(a) - v * math.sin(a),
                           8 * s, 3.8 * s, a), _CARS[rng.integers(len(_CARS))], 4, tex=4)
    for _ in range(rng.integers(2, 7)):  # buildings: rectangles, L-shapes, rotated; gable roofs, shadows
        cy, cx = rng.uniform(0, size), rng.uniform(0, size)
        h, w = rng.uniform(12, 26) * s, rng.uniform(16, 36) * s
        a = rng.choice([0.0, math.pi / 2]) + (rng.uniform(0, math.pi) if rng.random() < 0.3 else 0.0)
        m = rect(cy, cx, h, w, a)
        if rng.random() < 0.4:  # L-shape: a wing at one end of the long side
            h2 = rng.uniform(0.8, 1.6) * h
            u, v = w / 2 - h * 0.4, h / 2 + h2 / 2 - 1
            m |= rect(cy + u * math.sin(a) + v * math.cos(a), cx + u * math.cos(a) - v * math.sin(a), h2, 0.8 * h, a)
        shadow(m, rng.uniform(3, 6) * s)
        paint(m, _ROOFS[rng.integers(len(_ROOFS))], 1, tex=5)
        img[m & (-(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a) > 0)] *= 0.8  # the ridge splits the roof
    for _ in range(rng.integers(0, 4)):  # clutter objects: containers, heaps in random colours
        paint(rect(rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, 7) * s, rng.uniform(4, 12) * s,
                   rng.uniform(0, math.pi)), rng.uniform(40, 220, 3), 5, tex=10)
    for _ in range(rng.integers(1, 5)):  # trees: clusters of textured, shaded, shadow-casting crowns
        cy, cx = rng.uniform(0, size), rng.uniform(0, size)
        leaves = 22 * rng.standard_normal((size, size, 1)) + 12 * smooth(3)[..., None]
        for _ in range(rng.integers(2, 8)):
            ty, tx, r = cy + rng.normal(0, 10 * s), cx + rng.normal(0, 10 * s), rng.uniform(3, 8) * s
            d2 = ((yy - ty) ** 2 + (xx - tx) ** 2) / (r * r)
            m = d2 < 1
            shadow(m, r * 0.6)
            crown = np.asarray(_TREES[rng.integers(len(_TREES))], np.float32) * (1 - 0.35 * d2[m][:, None])
            img[m] = crown + leaves[m]  # darker towards the crown's edge, leafy texture
            lab[m] = 3
    # imaging: exposure, illumination gradient, sensor noise
    img = img * rng.uniform(0.8, 1.2) + rng.uniform(-15, 15) + rng.uniform(-15, 15) * (xx / size - 0.5)[..., None]
    img = img + 4 * rng.standard_normal(img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), lab

def prepare_demo(root, seed=0, n_train=256, n_val=64):
    """Write the demo dataset to root (images/, labels/, val.txt listing the last n_val images, demo.json).
    Deterministic by seed; does nothing if demo.json already records the same settings."""
    marker = {'seed': seed, 'n_train': n_train, 'n_val': n_val, 'version': DEMO_VERSION}
    marker_path = os.path.join(root, 'demo.json')
    if os.path.isfile(marker_path):
        with open(marker_path) as f:
            if json.load(f) == marker:
                return
    elif os.path.isdir(root) and os.listdir(root):
        raise UserError(f'{root} exists and is not a demo folder (no demo.json); refusing to overwrite it')
    tmp = f'{root}.tmp{os.getpid()}'  # write aside, then move into place: no half-written demo folder
    os.makedirs(os.path.join(tmp, 'images'), exist_ok=True)
    os.makedirs(os.path.join(tmp, 'labels'), exist_ok=True)
    names = [f'demo_{i:04d}.png' for i in range(n_train + n_val)]
    for i, name in enumerate(names):
        img, lab = _demo_scene(np.random.default_rng([seed, i]))
        Image.fromarray(img).save(os.path.join(tmp, 'images', name), compress_level=1)
        Image.fromarray(lab).save(os.path.join(tmp, 'labels', name), compress_level=1)
    with open(os.path.join(tmp, 'val.txt'), 'w') as f:
        f.writelines(f'images/{n} labels/{n}\n' for n in names[n_train:])
    with open(os.path.join(tmp, 'demo.json'), 'w') as f:
        json.dump(marker, f)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    os.replace(tmp, root)

