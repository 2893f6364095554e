"""tools/export.py: a run's model as a self-contained folder the Hugging Face hub understands.

    python -m tools.export runs/potsdam-1_16-... co2s-potsdam-1_16   # config.json, weights, card
    hf upload USER/co2s-potsdam-1_16 co2s-potsdam-1_16                # publish it
    python eval.py USER/co2s-potsdam-1_16 --predict tiles/ --out masks/   # anyone: cached once

    from plumbing.runs import load_model; model = load_model("USER/co2s-potsdam-1_16")

The folder: config.json (what rebuilds the model: model_args, the dataset's classes and palette
with id2label / label2id, the run's settings WITHOUT the paths of the machine that trained it, the
results of the exported step), model.safetensors (the weights: no optimizer, no pickle), the run's
split lists (relative paths) and README.md, a model card whose metadata is written through
huggingface_hub's ModelCardData: the licence of the weights actually used, base_model when
pretrained backbones were used, pipeline_tag image-segmentation, the dataset, and the mIoU of each
student and of the fusion as results the hub indexes. Every file is readable by all (0644). Every
command that takes a run folder takes the exported folder or its hub id (plumbing/runs.py reads it).
An --out that holds anything but a previous export of this tool is refused.
"""

import argparse
import dataclasses
import os
import shutil
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors.torch import save_file

from plumbing import runs
from plumbing.atomic import read_json, replacing, write_json
from plumbing.catalog import DatasetInfo, dataset_info
from plumbing.errors import UserError, cli
from plumbing.weights import DEFAULT_WEIGHTS

# the settings of a run that are paths of the machine that trained it (dropped from config.json)
PATHS = ("out", "resume", "data_root", "splits", "init", "text_embeddings", "command")
DATA_LICENCES = {
    "potsdam": "ISPRS 2D semantic labelling benchmark terms (research use)",
    "loveda": "CC BY-NC-SA 4.0",
    "demo": "synthetic (plumbing/demo.py)",
}
# the licence of the pretrained weights a student starts from, as the card names it; on the hub
# CLIP's is "mit" (https://github.com/openai/CLIP/blob/main/LICENSE), DINOv3's is "other" with
# this name and link
DINOV3_LICENCE = "https://ai.meta.com/resources/models-and-libraries/dinov3-license/"
WEIGHT_LICENCES = dict(clip="MIT (OpenAI CLIP)", dinov3="DINOv3 License (Meta)")
TASK = "image-segmentation"  # the hub's pipeline tag, and the task of the results
TAGS = ["semantic-segmentation", "remote-sensing", "semi-supervised"]


def export(checkpoint, out_dir):
    """Write the export of `checkpoint` (a run folder or .pt file) into out_dir; returns out_dir."""
    state, folder = runs.read_checkpoint(checkpoint), runs.run_folder(checkpoint)
    cfg, stored = state["cfg"], state.get("dataset_info")  # older checkpoints: the catalog's
    info = DatasetInfo(**stored) if stored else dataset_info(cfg["dataset"], cfg.get("data_root"))
    check_target(out_dir, folder)
    run_config = os.path.join(folder, "config.json")
    try:
        saved = read_json(run_config) if os.path.isfile(run_config) else {}
    except ValueError as e:  # a config.json edited by hand, or truncated
        raise UserError(f"{run_config} is not valid JSON ({e}); restore it from the run") from e
    cfg = {k: v for k, v in cfg.items() if k not in PATHS}
    # a hub id says what the weights are; a local folder says nothing
    for k in [f"{kind}_weights" for kind in DEFAULT_WEIGHTS]:
        cfg[k] = runs.LOCAL_FOLDER if cfg.get(k) and os.path.exists(cfg[k]) else cfg.get(k)
    # config.json, in this order: what rebuilds the model, the step and its results, the labels
    config = dict(format=runs.EXPORT, version=2, model_args=state["model_args"], cfg=cfg)
    config.update(dataset_info=dataclasses.asdict(info), step=state["step"])
    config.update(total_steps=saved.get("total_iters"), chosen_by=state["best"].get("by"))
    config["results"] = results_of(state, folder)
    config["text_source"] = public(saved.get("text_source") or state.get("text_source"))
    config["id2label"] = {str(i): c for i, c in enumerate(info.classes)}
    config["label2id"] = {c: i for i, c in enumerate(info.classes)}
    os.makedirs(out_dir, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in state["model"].items()}
    with replacing(os.path.join(out_dir, "model.safetensors")) as tmp:
        save_file(weights, tmp, metadata={"format": "pt"})
    write_json(os.path.join(out_dir, "config.json"), config)
    splits = os.path.join(folder, "splits")
    if os.path.isdir(splits):
        shutil.copytree(splits, os.path.join(out_dir, "splits"), dirs_exist_ok=True)
    with replacing(os.path.join(out_dir, "README.md")) as tmp:
        model_card(config).save(tmp)
    # readable by all, whatever wrote them
    for f in [f for f in Path(out_dir).rglob("*") if f.is_file()]:
        f.chmod(0o644)
    return out_dir


def check_target(out_dir, run_dir):
    """An export never overwrites what it did not write: out_dir is new, empty or a previous
    export, and not the run folder itself."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"export target {out_dir!r} is a file: pass a new folder")
    if os.path.abspath(out_dir) == os.path.abspath(run_dir):
        raise UserError(f"export target {out_dir!r} is the run folder itself: pass a new folder")
    held = sorted(os.listdir(out_dir))[:4] if os.path.isdir(out_dir) else []
    if held and not runs.is_export(out_dir):
        why = f"holds files that are not an export: {held}"
        raise UserError(f"export target {out_dir!r} {why}; pass a new or empty folder")


def public(text):
    """A text_source without the machine's paths: 'file /home/x/t.npy' -> 'file t.npy'."""
    words = (os.path.basename(w) if os.path.isabs(w) else w for w in (text or "").split(" "))
    return text and " ".join(words)


def results_of(state, folder):
    """The evaluation of the checkpoint's own step: best.pt's, or metrics.json's last (None if
    none)."""
    if state["best"].get("step") == state["step"] and "results" in state["best"]:
        return state["best"]["results"]
    metrics = os.path.join(folder, "metrics.json")
    last = read_json(metrics)["last"] if os.path.isfile(metrics) else {}
    return last.get("results") if last.get("step") == state["step"] else None


def model_card(config):
    """The README.md of an export: metadata the hub indexes (ModelCardData), then what the model
    is, how good, how it was trained and under which terms; every sentence true of this model."""
    cfg, args, res = config["cfg"], config["model_args"], config["results"] or {}
    dataset, ratio = cfg["dataset"], cfg["ratio"].replace("_", "/")
    pretrained = {k: cfg.get(f"{k}_weights") for k in dict.fromkeys(args["kinds"])}
    pretrained = {k: w for k, w in pretrained.items() if w and w != "release-init"}
    # the metadata as the hub parses it: licence, base models, task, dataset, results
    # (DINOv3's licence is the hub's "other", named and linked; with CLIP's alone it is "mit")
    dinov3 = dict(license="other", license_name="dinov3-license", license_link=DINOV3_LICENCE)
    hub = dinov3 if "dinov3" in pretrained else dict(license="mit" if pretrained else "unknown")
    hub.update(library_name="co2s", pipeline_tag=TASK, datasets=[dataset], tags=TAGS)
    hub["base_model"] = [w for w in pretrained.values() if w != runs.LOCAL_FOLDER] or None
    # each result: mean IoU of one prediction on the dataset's val split
    on = dict(task_type=TASK, dataset_type=dataset, dataset_name=dataset, metric_type="mean_iou")
    on["dataset_split"] = "val"
    scores = {f"mIoU ({name})": round(100 * r["miou"], 2) for name, r in res.items()}
    results = [EvalResult(**on, metric_name=n, metric_value=v) for n, v in scores.items()] or None
    data = ModelCardData(**hub, model_name=f"co2s-{dataset}-{cfg['ratio']}", eval_results=results)
    # the card: what the model is, how good, how it was trained, under which terms
    names = list(res) or args["kinds"]
    miou = " | ".join(f"{100 * res[n]['miou']:.2f}" if n in res else "-" for n in names)
    step, total, by = config["step"], config.get("total_steps"), config.get("chosen_by")
    when = f"the checkpoint of step {step}" + (f" of a {total}-step run" if total else "")
    when += f" (the best by {by} mIoU)" if by else ""
    weights = "; ".join(f"{k}: {w} ({WEIGHT_LICENCES[k]})" for k, w in pretrained.items())
    weights = weights or "none: every backbone started from random weights"
    size = args["size"] if isinstance(args["size"], str) else "as released"
    body = f"""
# Co2S: {dataset} {ratio}

Co2S model (students {", ".join(args["kinds"])}, size {size}, {args["numerics"]} numerics) for
{len(config["id2label"])} classes: {", ".join(config["id2label"].values())}. This is {when}.
Class embeddings of the CLIP student: {config.get("text_source") or "none (no CLIP student)"}.

| prediction | {" | ".join(names)} |
|---|{"---|" * len(names)}
| mIoU (%), {dataset} val, step {step} | {miou} |

- in Python (from the co2s repository): `from plumbing.runs import load_model; model = load_model("FOLDER_OR_HUB_ID")`
- predict: `python eval.py FOLDER_OR_HUB_ID --predict tiles/ --out masks/`
- evaluate: `python eval.py FOLDER_OR_HUB_ID`
- fine-tune: `python train.py --init FOLDER_OR_HUB_ID ...`

Pretrained weights it started from: {weights}. Data: {DATA_LICENCES.get(dataset, "the dataset's own terms")}.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a run's model as a hub-layout folder.")
    p.add_argument("path", help="run folder (its best.pt, else last.pt) or a .pt checkpoint")
    p.add_argument("out", help="the folder to write (new, empty, or a previous export)")
    args = p.parse_args(argv)
    checkpoint = runs.resolve_checkpoint(args.path)
    if runs.is_export(checkpoint):
        raise UserError(f"{args.path!r} is an export already: copy the folder instead")
    try:
        print(f"wrote {export(checkpoint, args.out)}")
    except OSError as e:  # a read-only or full target
        raise UserError(f"export to {args.out!r} failed: {e.strerror or e}") from e


if __name__ == "__main__":
    cli(main)
