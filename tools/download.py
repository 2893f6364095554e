"""tools/download.py: fetch a paper dataset from the authors' hub repository into the loader's layout.

    python -m tools.download potsdam [--data-root data/potsdam]

The same as `train.py --download` (plumbing/download.py does both); a dataset already on disk is
checked against every file the paper's split lists name.
"""

import argparse
import os

from plumbing.catalog import DATASETS, HUB_DATASETS
from plumbing.download import ensure, verify
from plumbing.errors import cli


def main(argv=None):
    p = argparse.ArgumentParser(description=f"Download a paper dataset from {HUB_DATASETS}.")
    p.add_argument("dataset", choices=[d for d in DATASETS if DATASETS[d].hub_folder])
    p.add_argument("--data-root", help="default data/<dataset>")
    args = p.parse_args(argv)
    info = DATASETS[args.dataset]
    root = args.data_root or os.path.join("data", info.name)
    if not os.path.isdir(os.path.join(root, "images")):
        return ensure(info, root, download=True)
    verify(info, root)
    print(f"{info.name} is already in {root}: every file the split lists name is there")


if __name__ == "__main__":
    cli(main)
