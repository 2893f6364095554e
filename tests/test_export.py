"""An exported model (eval.py --export): a hub-layout folder that evaluates, predicts and fine-tunes
like the run it came from; a hub id of one is downloaded, and offline is a clear error."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import micro_args
from PIL import Image

import eval as ev
import train
from plumbing import runs
from plumbing.errors import cli
from tools import export


@pytest.fixture(scope="module")
def run(micro_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    train.main(micro_args(micro_root, out, "--iters", "2"))
    return micro_root, out


def test_an_exported_folder_evaluates_predicts_and_fine_tunes_like_its_run(run, tmp_path):
    root, out = run
    folder = tmp_path / "export"
    export.main([str(out), str(folder)])
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors", "splits"]
    config = json.load(open(folder / "config.json"))
    assert config["format"] == runs.EXPORT and config["model_args"]["kinds"] == ["clip", "dinov3"]
    assert config["dataset_info"]["palette"][0] == [255, 255, 255] and config["text_source"]
    card = (folder / "README.md").read_text()
    assert "mIoU (%)" in card and "Pretrained weights it started from: none" in card
    # the same numbers as the run it came from, on the run's own split lists
    a = ev.main([str(out), "--workers", "0"])["results"]
    b = ev.main([str(folder), "--workers", "0", "--data-root", root])["results"]
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
    ft = micro_args(
        root, tmp_path / "ft", "--init", str(folder), "--iters", "1", "--eval-every", "100"
    )
    train.main(ft)
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
    export.main([str(out), str(folder)])
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id: str(folder))
    model, info, cfg = runs.load_run("someone/co2s-demo")
    assert info.classes[0] == "impervious_surface" and len(model.students) == 2


def test_the_card_and_config_pass_the_hubs_parsing_hold_no_local_path_and_load_in_one_line(
    run, tmp_path
):
    from huggingface_hub import ModelCard

    root, out = run
    folder = tmp_path / "export"
    export.main([str(out), str(folder)])
    card = ModelCard.load(folder / "README.md")  # the hub's own parser
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "image-segmentation" and data["datasets"] == ["demo"]
    assert data["license"] == "unknown" and "base_model" not in data  # random weights: no base
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    best = json.load(open(out / "metrics.json"))["best"]["results"]
    assert results == {f"mIoU ({k})": round(100 * v["miou"], 2) for k, v in best.items()}
    text = "".join(
        open(os.path.join(d, f)).read()
        for d, _, fs in os.walk(folder)
        for f in fs
        if f.endswith((".json", ".md", ".txt"))
    )
    assert str(tmp_path) not in text and root not in text and str(out) not in text  # no local path
    config = json.load(open(folder / "config.json"))
    assert config["id2label"]["0"] == "impervious_surface" and config["label2id"]["car"] == 4
    assert all(
        os.stat(os.path.join(d, f)).st_mode & 0o777 == 0o644
        for d, _, fs in os.walk(folder)
        for f in fs
    )
    from plumbing.runs import load_model

    model = load_model(str(folder))  # one line
    assert not model.training and model.names == ["clip", "dinov3", "fused"]
    # an export never overwrites what it did not write
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("x")
    with pytest.raises(SystemExit):
        cli(lambda: export.main([str(out), str(tmp_path / "other")]))
