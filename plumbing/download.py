"""plumbing/download.py: put a dataset on disk where the loader reads it, or say exactly how.

`ensure(info, root, download=...)` is the one place that decides: a dataset already at `root` is
used as it is; the demo is generated (demo.py); with `--download` a paper dataset is fetched from
the authors' Hugging Face dataset repository (XavierJiezou/co2s-datasets, one folder per dataset:
POTSDAM/, LOVEDA/, WHDLD/, GID/, MER/, MSL/, each holding images/ and labels/); anything else is an
error naming the folder and the command. Nothing is downloaded without asking.

    python -m tools.download potsdam [--data-root data/potsdam]

A download goes to `<root>.download/` first (huggingface_hub resumes an interrupted one there), is
moved into `<root>/images`, `<root>/labels`, and is then checked against every file the paper's
split lists name.
"""

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from data import load_image, load_label
from plumbing.catalog import HUB_DATASETS, PAPER_SPLITS
from plumbing.demo import prepare_demo
from plumbing.errors import UserError, reason


def ensure(info, root, *, download=False):
    """Make sure `root` holds the dataset (images/ at least); see the module docstring."""
    if os.path.isdir(os.path.join(root, "images")):
        return
    if info.generated:
        return prepare_demo(root)
    if not (download and info.hub_folder):
        how = f"fetch it with `python -m tools.download {info.name} --data-root {root}` (or add --download to train.py), "
        what = f"no {info.name} data at {root!r} (expected {root}/images/<file> and {root}/labels/<file>): "
        raise UserError(f"{what}{how if info.hub_folder else ''}or pass --data-root to where it is")
    # --download: info.hub_folder of the authors' dataset repository into root, in the loader's
    # layout, then verified
    staging = os.path.abspath(root.rstrip("/")) + ".download"
    print(f"downloading {info.hub_folder}/ of hf://datasets/{HUB_DATASETS} into {staging}")
    snapshot(info.hub_folder, staging)
    arrange(os.path.join(staging, info.hub_folder), root)
    shutil.rmtree(staging, ignore_errors=True)
    verify(info, root)
    n = len(os.listdir(os.path.join(root, "images")))
    print(f"{info.name}: {n} images in {root}, every listed file present")


def snapshot(folder, dest):
    """The one call into huggingface_hub: files under `folder/` of the repository, with progress
    bars, resumable (finished files are skipped, partial ones continued)."""
    from huggingface_hub import snapshot_download as download

    try:
        download(HUB_DATASETS, repo_type="dataset", allow_patterns=[f"{folder}/*"], local_dir=dest)
    except Exception as e:  # offline, no such repository, interrupted: all the user can act on
        raise UserError(
            f"could not download {folder}/ of {HUB_DATASETS} ({reason(e)}). Without network access, "
            f"fetch it on another machine (`hf download {HUB_DATASETS} --repo-type dataset --include '{folder}/*' "
            f"--local-dir DIR`) and copy DIR/{folder}/images and DIR/{folder}/labels to the data root; run again to "
            f"resume an interrupted download"
        ) from e


def arrange(src, root):
    """Move a downloaded dataset folder (images/ + labels/, or archives holding them) into
    root/images, root/labels."""
    if not os.path.isdir(src):
        raise UserError(f"the download has no {src!r}: not the expected <DATASET>/images, labels")
    # archives: unpack them where they are
    if not os.path.isdir(os.path.join(src, "images")):
        for f in sorted(os.listdir(src)):
            if f.endswith((".zip", ".tar", ".tar.gz", ".tgz")):
                shutil.unpack_archive(os.path.join(src, f), src)
        inner = [d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d, "images"))]
        src = os.path.join(src, inner[0]) if len(inner) == 1 else src
    if not all(os.path.isdir(os.path.join(src, sub)) for sub in ("images", "labels")):
        held = sorted(os.listdir(src))[:8]
        raise UserError(f"the download {src!r} holds {held}, not images/ and labels/")
    os.makedirs(root, exist_ok=True)
    for sub in ("images", "labels"):
        if os.path.exists(os.path.join(root, sub)):
            raise UserError(f"{root}/{sub} exists already; move it away to download again")
        shutil.move(os.path.join(src, sub), os.path.join(root, sub))


def verify(info, root):
    """Every file named by the dataset's split lists (every ratio and val) is in root: else the
    count and the first names."""
    lists = Path(PAPER_SPLITS, info.name).rglob("*.txt")  # every ratio's lists and val.txt
    listed = {p for txt in lists for p in txt.read_text().split()}
    if missing := sorted(p for p in listed if not os.path.isfile(os.path.join(root, p))):
        raise UserError(
            f"{len(missing)} of the {len(listed)} files named by splits/{info.name}/ are missing under "
            f"{root}, e.g. {missing[:5]}; download again (it resumes) or copy them in"
        )


def _check_pair(info, image, label):
    """'' if an (image, label) pair loads as training loads it (data.load_image, load_label) and
    agrees in size, else what is wrong with it."""
    try:
        w, h = load_image(image).size  # decodes every pixel: catches truncated and corrupt files
        lh, lw = load_label(label, info).shape if label else (h, w)  # (H, W)
    except UserError as e:
        return str(e)
    except Exception as e:  # PIL raises many types for a bad file
        return f"cannot read image {image}: {type(e).__name__}: {e}"
    if (lh, lw) != (h, w):
        return f"size mismatch: image {image} is {w}x{h}, label {label} is {lw}x{lh}"
    return ""


def scan_files(splits, info, threads=8, progress=True):
    """Before the first step: every listed image opens, every label decodes to valid classes, and
    their sizes agree. A bad file stops the run here, in seconds, not at the first evaluation an
    epoch later."""
    items = splits.labeled + splits.unlabeled + splits.val
    bar = dict(desc="scan files", disable=not progress, leave=False, dynamic_ncols=True)
    with ThreadPoolExecutor(threads) as pool:
        checks = tqdm(pool.map(lambda it: _check_pair(info, *it), items), total=len(items), **bar)
        if problems := [p for p in checks if p]:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UserError(f"{problems[0]}{more}; fix or remove the file(s) from the split lists")
