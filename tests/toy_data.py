"""A small custom dataset on disk, in the layout a user brings (images/, labels/, classes.txt, val.txt)."""

import os

import numpy as np
from PIL import Image

CLASSES = ["road", "roof", "grass", "tree", "water"]


def custom_root(root, n=12, size=64, seed=0):
    """n random tiles of size x size px, 5 classes; the last 2 tiles in val.txt. Returns the folder."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "labels"), exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(root, "images", f"{i:02d}.png")
        )
        Image.fromarray(rng.integers(0, 5, (size, size), dtype=np.uint8)).save(
            os.path.join(root, "labels", f"{i:02d}.png")
        )
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.writelines(f"{c}\n" for c in CLASSES)
    with open(os.path.join(root, "val.txt"), "w") as f:
        f.writelines(f"images/{i:02d}.png labels/{i:02d}.png\n" for i in range(n - 2, n))
    return str(root)
