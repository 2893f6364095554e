"""download.py: put a dataset on disk where the loader reads it, or say exactly how.

`ensure(info, root, download=...)` is the one place that decides: a dataset already at `root` is used
as it is; the demo is generated (demo.py); with `--download` a paper dataset is fetched from the
authors' Hugging Face dataset repository; anything else is an error naming the folder and the command.

    python download.py potsdam [--data-root data/potsdam]
"""
import argparse
import os

from catalog import DATASETS, HUB_DATASETS, dataset_info
from demo import prepare_demo
from errors import UserError, cli


def ensure(info, root, *, download=False):
    """Make sure `root` holds the dataset (images/ at least); see the module docstring."""
    if os.path.isdir(os.path.join(root, "images")):
        return
    if info.generated:
        prepare_demo(root)
        return
    if download and info.hub_folder:
        fetch(info, root)
        return
    how = (f"fetch it with `python download.py {info.name} --data-root {root}` (or add --download to train.py), "
           if info.hub_folder else "")
    raise UserError(f"no {info.name} data at {root!r} (expected {root}/images/<file> and {root}/labels/<file>): "
                    f"{how}or pass --data-root to where it is")


def fetch(info, root):
    raise UserError(f"downloading {info.name} from {HUB_DATASETS} is not available yet")


def main(argv=None):
    p = argparse.ArgumentParser(description=f"Download a paper dataset from {HUB_DATASETS} into the loader's layout.")
    p.add_argument("dataset", choices=[d for d in DATASETS if DATASETS[d].hub_folder])
    p.add_argument("--data-root", default=None, help="default data/<dataset>")
    args = p.parse_args(argv)
    info = dataset_info(args.dataset)
    ensure(info, args.data_root or os.path.join("data", info.name), download=True)


if __name__ == "__main__":
    cli(main)
