"""download.py and the paper's split lists as the default: offline (the hub is never reached; its one call is
replaced by a local folder shaped like the repository, and its failure path is exercised for real)."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import data as files
import train
from plumbing import catalog, download
from plumbing.errors import UserError

POTSDAM = catalog.DATASETS["potsdam"]


def listed_files(name):
    files = set()
    for dirpath, _, names in os.walk(os.path.join(catalog.PAPER_SPLITS, name)):
        for f in names:
            if f.endswith(".txt"):
                files.update(p for line in open(os.path.join(dirpath, f)) for p in line.split())
    return sorted(files)


def fake_repository(local_dir, folder, files, valid_images=False):
    """What snapshot_download leaves in local_dir: <folder>/images/..., <folder>/labels/..."""
    img, lab = (
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)),
        Image.fromarray(np.ones((16, 16), np.uint8)),
    )
    for rel in files:
        path = os.path.join(local_dir, folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if valid_images:
            (img if rel.startswith("images/") else lab).save(path)
        else:
            open(path, "wb").close()


def test_the_paper_splits_ship_with_the_code_and_are_the_default(tmp_path):
    s = files.make_splits(POTSDAM, "1/16", str(tmp_path), check=False)  # no --splits
    assert (len(s.labeled), len(s.unlabeled), len(s.val)) == (307, 4617, 548)
    assert s.source == "the paper's lists (splits/potsdam/1_16)"
    for name, counts in {
        "loveda": {"1_40": (94, 3677)},
        "whdld": {"1_24": (185, 4261)},
        "gid": {"1_8": (342, 2394)},
        "mer": {"1_8": (106, 745)},
        "msl": {"1_4": (785, 2356)},
    }.items():
        for ratio, (n_l, n_u) in counts.items():
            s = files.make_splits(catalog.DATASETS[name], ratio, str(tmp_path), check=False)
            assert (len(s.labeled), len(s.unlabeled)) == (n_l, n_u), name
    with pytest.raises(UserError, match="they have: 1/32, 1/24, 1/16, 1/8, 1/4"):
        files.make_splits(POTSDAM, "1/2", str(tmp_path), check=False)


def test_download_arranges_the_repository_folder_and_verifies_every_listed_file(
    tmp_path, monkeypatch, capsys
):
    files = listed_files("potsdam")
    assert len(files) == 2 * (4924 + 548)  # every pool and val image, with its label
    monkeypatch.setattr(
        download, "snapshot", lambda folder, local_dir: fake_repository(local_dir, folder, files)
    )
    root = str(tmp_path / "potsdam")
    download.ensure(POTSDAM, root, download=True)
    assert len(os.listdir(os.path.join(root, "images"))) == 5472 and not os.path.exists(
        root + ".download"
    )
    assert "every listed file present" in capsys.readouterr().out
    os.remove(os.path.join(root, files[0]))
    os.remove(os.path.join(root, files[-1]))
    with pytest.raises(
        UserError,
        match=f"2 of the 10944 files named by splits/potsdam/ are missing.*{os.path.basename(files[0])}",
    ):
        download.verify(POTSDAM, root)


def test_download_unpacks_archives_and_refuses_to_overwrite(tmp_path):
    src = tmp_path / "repo" / "WHDLD"
    fake_repository(tmp_path / "pack", "whdld", ["images/a.jpg", "labels/a.png"])
    src.mkdir(parents=True)
    shutil.make_archive(str(src / "whdld"), "zip", tmp_path / "pack")
    download.arrange(str(src), str(tmp_path / "root"))
    assert sorted(os.listdir(tmp_path / "root")) == ["images", "labels"]
    fake_repository(tmp_path / "again", "X", ["images/b.jpg", "labels/b.png"])
    with pytest.raises(UserError, match="exists already"):
        download.arrange(str(tmp_path / "again" / "X"), str(tmp_path / "root"))


def test_without_network_the_error_says_what_failed_and_how_to_copy_the_data_in(tmp_path):
    with pytest.raises(UserError) as e:  # HF_HUB_OFFLINE=1 (conftest): the real call
        download.ensure(POTSDAM, str(tmp_path / "potsdam"), download=True)
    msg = str(e.value)
    assert (
        "could not download POTSDAM/ of XavierJiezou/co2s-datasets" in msg
        and "hf download" in msg
        and "--include" in msg
    )


def test_missing_data_without_download_names_the_folder_and_the_command(tmp_path):
    with pytest.raises(
        UserError,
        match=r"no potsdam data at .*nope.*python -m tools.download potsdam --data-root .*nope",
    ):
        download.ensure(POTSDAM, str(tmp_path / "nope"))


def test_train_on_potsdam_reads_the_paper_lists_without_splits(tmp_path, monkeypatch, capsys):
    """`python train.py --dataset potsdam --ratio 1/16 --download ...` on a fresh machine: the data comes down,
    the paper's 307 / 4,617 / 548 lists are used, and config.json says where they came from."""
    monkeypatch.setattr(
        download,
        "snapshot",
        lambda folder, local_dir: fake_repository(local_dir, folder, listed_files("potsdam"), True),
    )
    out = tmp_path / "run"
    train.main(
        [
            "--dataset",
            "potsdam",
            "--ratio",
            "1/16",
            "--data-root",
            str(tmp_path / "potsdam"),
            "--download",
            "--size",
            "tiny",
            "--crop",
            "64",
            "--workers",
            "0",
            "--stop-at",
            "2",
            "--out",
            str(out),
        ]
    )
    assert "307 labelled / 4617 unlabelled / 548 val" in capsys.readouterr().out
    cfg = json.load(open(out / "config.json"))
    assert (
        cfg["splits_source"] == "the paper's lists (splits/potsdam/1_16)" and cfg["splits"] is None
    )
    assert sum(1 for _ in open(out / "splits" / "labeled.txt")) == 307
