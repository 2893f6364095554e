"""An exported model (eval.py --export): a hub-layout folder that evaluates, predicts and fine-tunes
like the run it came from; a hub id of one is downloaded, and offline is a clear error."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import train
from plumbing import runs
from plumbing.demo import prepare_demo
from plumbing.errors import cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    prepare_demo(root, seed=0, n_train=16, n_val=2)
    out = tmp_path_factory.mktemp("runs") / "run"
    train.main(
        [
            "--data-root",
            root,
            "--out",
            str(out),
            "--ratio",
            "1/4",
            "--crop",
            "64",
            "--batch",
            "2",
            "--workers",
            "0",
            "--iters",
            "2",
        ]
    )
    return root, out


def test_an_exported_folder_evaluates_predicts_and_fine_tunes_like_its_run(run, tmp_path):
    root, out = run
    folder = tmp_path / "export"
    ev.main([str(out), "--export", str(folder)])
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors", "splits"]
    config = json.load(open(folder / "config.json"))
    assert config["format"] == runs.EXPORT and config["model_args"]["kinds"] == ["clip", "dinov3"]
    assert config["dataset_info"]["palette"][0] == [255, 255, 255] and config["text_source"]
    card = (folder / "README.md").read_text()
    assert "mIoU (%)" in card and config["cfg"]["command"] in card and "Licences" in card
    # the same numbers as the run it came from, on the run's own split lists
    a = ev.main([str(out), "--workers", "0"])["results"]
    b = ev.main([str(folder), "--workers", "0"])["results"]
    assert a == b
    # the same masks
    image = tmp_path / "in" / "x.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(
        image
    )
    ev.main([str(out), "--predict", str(image), "--out", str(tmp_path / "m1")])
    ev.main([str(folder), "--predict", str(image), "--out", str(tmp_path / "m2")])
    assert np.array_equal(
        np.array(Image.open(tmp_path / "m1" / "x_mask.png")),
        np.array(Image.open(tmp_path / "m2" / "x_mask.png")),
    )
    # and train.py starts from its weights
    train.main(
        [
            "--data-root",
            root,
            "--init",
            str(folder),
            "--out",
            str(tmp_path / "ft"),
            "--ratio",
            "1/4",
            "--crop",
            "64",
            "--batch",
            "2",
            "--workers",
            "0",
            "--iters",
            "1",
            "--eval-every",
            "100",
        ]
    )
    assert runs.read_checkpoint(str(tmp_path / "ft" / "last.pt"))["step"] == 1
    weights = runs.read_checkpoint(str(folder))["model"]
    best = runs.read_checkpoint(str(out / "best.pt"))["model"]
    assert all(torch.equal(weights[k], best[k]) for k in best)


def test_a_hub_id_offline_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        cli(lambda: runs.load_run("nobody/co2s-not-cached"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "nobody/co2s-not-cached" in err and "--local-dir" in err


def test_a_hub_id_resolves_to_its_downloaded_folder(run, tmp_path, monkeypatch):
    _, out = run
    folder = tmp_path / "snapshot"
    ev.main([str(out), "--export", str(folder)])
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id: str(folder))
    model, info, cfg = runs.load_run("someone/co2s-demo")
    assert info.classes[0] == "impervious_surface" and len(model.students) == 2
