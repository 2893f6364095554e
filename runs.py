"""runs.py: a run's plumbing: the checkpoint format, the run folder, RNG state, DDP and mixed
precision.

The checkpoint format is defined here once: `save_checkpoint` writes it (train.py's last.pt /
best.pt, a converted release), `read_checkpoint` reads it (and upgrades files of older versions),
and `model_from_checkpoint` rebuilds the model without a download (resume, --init, eval.py). A run
folder holds config.json, splits/, log.jsonl, last.pt, best.pt, metrics.json and curves.png; its
JSON files are written here too. Every write is atomic: a crash mid-write never leaves a truncated
file where a good one was.

Also here: the state of a run in training (`Run`), the RNG state a resume restores, the DDP setup
(torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; nothing else is needed) and the one mixed-precision
policy of train, eval and bench.
"""
import contextlib
import dataclasses
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import warnings

import numpy as np
import torch
import torch.distributed as dist

from backbones import vit_size
from catalog import DatasetInfo, dataset_info
from errors import UserError
from model import Co2S, ModelSpec, build_model

# 1: before the format was versioned (cfg["batch"] per process, epochs drop the remainder)
FORMAT = 2
AMP = ("auto", "bf16", "fp16", "off")
EXIT_STOPPED = 75   # stopped by a signal with last.pt written (sysexits' EX_TEMPFAIL: run it again)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@dataclasses.dataclass
class Run:
    """What a checkpoint holds: the config, what builds the model, the model, and (training) the
    optimizers, the scaler, the step reached and the best evaluation so far."""
    cfg: dict
    spec: ModelSpec
    model: Co2S
    optimizers: list = dataclasses.field(default_factory=list)
    scaler: object = None
    step: int = 0
    best: dict = dataclasses.field(default_factory=lambda: {"miou": -1.0})


# --------------------------------------------------------------------------------------------
# Files, written atomically


@contextlib.contextmanager
def replacing(path):
    """The one atomic write of the project: yields a temporary path beside `path`, renamed over it
    when the block succeeds and removed when it fails, so a reader never sees half a file."""
    tmp = f"{path}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomic(obj, path, keep_previous=False):
    """torch.save through `replacing`. keep_previous: the file it replaces stays as <name>.prev.pt.
    A failed write (disk full) leaves the previous files intact and is a UserError naming them."""
    previous = os.path.splitext(path)[0] + ".prev.pt"
    try:
        if keep_previous and os.path.isfile(previous) and os.path.isfile(path):
            # at most three checkpoints on disk while the new one is written
            os.remove(previous)
        with replacing(path) as tmp:
            torch.save(obj, tmp)
            if keep_previous and os.path.isfile(path):
                os.replace(path, previous)
    except OSError as e:
        kept = [f for f in (path, previous) if os.path.isfile(f)]
        raise UserError(f"could not write {path} ({e.strerror or e}); kept: {', '.join(kept) or 'nothing'}; "
                        f"free some space, then continue with --resume {os.path.dirname(path) or '.'}") from e


def write_json(path, obj):
    with replacing(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def run_info(world):
    """Versions and git revision for config.json."""
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        git = None
    versions = dict(python=platform.python_version(), torch=torch.__version__,
                    transformers=__import__("transformers").__version__)
    return dict(versions=versions, git=git, world_size=world)


# --------------------------------------------------------------------------------------------
# The checkpoint format


def save_checkpoint(run, path, keep_previous=False):
    """Everything to resume or evaluate the run, written atomically; never NaN weights over a good
    file (returns False then). keep_previous: the file it replaces stays as <name>.prev.pt
    (last.pt), in case the new one is lost to a failing disk. A failed write (disk full) leaves the
    previous files intact and is a UserError saying so."""
    if not all(torch.isfinite(p).all() for p in run.model.parameters()):
        return False
    state = dict(format=FORMAT, cfg=run.cfg, model_args=dataclasses.asdict(run.spec),
                 model=run.model.state_dict(), step=run.step, best=run.best, rng=rng_state(),
                 optimizers=[o.state_dict() for o in run.optimizers],
                 scaler=run.scaler.state_dict() if run.scaler is not None else None)
    save_atomic(state, path, keep_previous)
    return True


def checkpoint_bytes(model):
    """An estimate of one checkpoint's size: the state dict, plus AdamW's two fp32 moments for every
    trainable parameter."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return state + 2 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_room(out, model):
    """Before the first step: room in the run folder for three checkpoints (last.pt, last.prev.pt,
    best.pt), counting those already there (a resumed run replaces them)."""
    need = 3 * checkpoint_bytes(model) - sum(
        os.path.getsize(os.path.join(out, f)) for f in ("last.pt", "last.prev.pt", "best.pt")
        if os.path.isfile(os.path.join(out, f)))
    free = shutil.disk_usage(out).free
    if free < need:
        raise UserError(f"--out {out}: {free / 2**30:.2f} GiB free, a run of this model needs "
                        f"{need / 2**30:.2f} GiB (three checkpoints of {checkpoint_bytes(model) / 2**30:.2f} "
                        f"GiB); free some space or pass another --out")


def check_writable(out):
    """The run folder can be created and written (checked before any model is built or
    downloaded)."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create or write the run folder ({e.strerror or e}); "
                        f"pass a folder you can write to") from e


def read_checkpoint(path):
    """torch.load of one of our checkpoints, upgraded to the current format, or an exported folder;
    a clear error otherwise."""
    if os.path.isdir(path):
        return read_export(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, not a torch file, ...
        raise UserError(f"cannot read checkpoint {path!r} ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not {"cfg", "model", "model_args"} <= set(state):
        raise UserError(f"{path!r} is not a checkpoint of train.py (no cfg / model / model_args)")
    if state.get("format", 1) > FORMAT:
        raise UserError(f"{path!r} was written by a newer co2s (format {state['format']}); update the code")
    if state.get("format", 1) == 1:
        state = _upgrade_from_1(state)
    return state


def _upgrade_from_1(state):
    """Format 1: no train_backbone before it was a choice (attention); --batch counted per process
    and epochs dropped the remainder: kept as such, so that a resumed run continues as it
    started."""
    cfg, args = dict(state["cfg"]), dict(state["model_args"])
    cfg.setdefault("train_backbone", "attention")
    args.setdefault("train_backbone", "attention")
    if "batch" in cfg and "global_batch" not in cfg:
        cfg["batch_per_process"], cfg["epoch_rule"] = cfg.pop("batch"), "drop"
    return dict(state, format=FORMAT, cfg=cfg, model_args=args)


def spec_of(state):
    args = dict(state["model_args"])
    return ModelSpec(**dict(args, kinds=tuple(args["kinds"])))


def model_from_checkpoint(state, numerics=None):
    """The Co2S model of a checkpoint: built from its model_args (random backbones, no download),
    then every tensor (frozen backbone weights, CLIP text embeddings included) read from its state
    dict. numerics: run it with other numerics than it was trained with ('hf' | 'release')."""
    spec, sd = spec_of(state), state["model"]
    if numerics:
        spec = dataclasses.replace(spec, numerics=numerics)
    text = next((v for k, v in sd.items() if k.endswith(".text")), None)
    with warnings.catch_warnings():
        # "random backbone weights": they are overwritten just below
        warnings.simplefilter("ignore")
        try:
            model = build_model(spec, text=text)
        except ValueError as e:
            raise UserError(f"the checkpoint's model_args do not build its model ({e})") from e
    mine = model.state_dict()
    missing, extra = sorted(set(mine) - set(sd)), sorted(set(sd) - set(mine))
    wrong = [k for k in sd if k in mine and sd[k].shape != mine[k].shape]
    if missing or extra or wrong:
        raise UserError(f"the checkpoint's weights do not fit the model its model_args describe: missing "
                        f"{missing[:3]}, unexpected {extra[:3]}, other shapes {wrong[:3]}")
    model.load_state_dict(sd)
    return model


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def resolve_checkpoint(path, ckpt=None):
    """What a command was given -> what read_checkpoint reads: a run folder (its best.pt, else
    last.pt; or the one `ckpt` names), a .pt file, an exported model folder (config.json +
    model.safetensors), or the hub id of one (downloaded once into the Hugging Face cache)."""
    if is_export(path):
        return path
    if os.path.isdir(path):
        wanted = [f"{ckpt}.pt"] if ckpt else ["best.pt", "last.pt"]
        for f in wanted:
            if os.path.isfile(os.path.join(path, f)):
                return os.path.join(path, f)
        raise UserError(f"run folder {path!r} holds no {' or '.join(wanted)}; expected a folder "
                        f"written by train.py, an exported model folder or a .pt checkpoint file")
    if os.path.isfile(path) and path.endswith(".pt"):
        return path
    if not os.path.exists(path) and HUB_ID.fullmatch(path):
        return download_export(path)
    raise UserError(f"{path!r} is neither a run folder (with best.pt / last.pt), a .pt checkpoint, an "
                    f"exported model folder (config.json + model.safetensors) nor a hub id (user/name)")


def run_folder(checkpoint):
    """The folder holding a checkpoint's run files (splits/, eval JSON): an exported folder
    itself."""
    return checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)


def load_run(path, device="cpu", data_root=None, numerics=None):
    """(model in eval mode, dataset info, cfg) of anything resolve_checkpoint takes."""
    state = read_checkpoint(resolve_checkpoint(path))
    cfg = state["cfg"]
    if "dataset_info" in state:      # an exported model carries its classes and palette
        info = DatasetInfo(**state["dataset_info"])
    else:
        info = dataset_info(cfg["dataset"], data_root or cfg["data_root"])
    return model_from_checkpoint(state, numerics).to(device).eval(), info, cfg


# --------------------------------------------------------------------------------------------
# An exported model: the layout of the Hugging Face hub (config.json, model.safetensors, README.md)


EXPORT = "co2s-model"   # config.json's "format": what tells an exported folder from others


def is_export(path):
    config = os.path.join(path, "config.json")
    if not (os.path.isdir(path) and os.path.isfile(config) and
            os.path.isfile(os.path.join(path, "model.safetensors"))):
        return False
    return read_json(config).get("format") == EXPORT


def export(checkpoint, out_dir, info):
    """A self-contained model folder from a checkpoint: config.json (what rebuilds the model and how
    it was trained and evaluated), model.safetensors (the weights: no optimizer, no pickle), the
    run's split lists, and a README.md model card. `hf upload USER/NAME DIR` publishes it."""
    from safetensors.torch import save_file
    state = read_checkpoint(checkpoint)
    folder = run_folder(checkpoint)
    results = _results_of(state, folder)
    source = read_json(os.path.join(folder, "config.json")).get("text_source") if os.path.isfile(
        os.path.join(folder, "config.json")) else state.get("text_source")
    os.makedirs(out_dir, exist_ok=True)
    config = dict(format=EXPORT, version=1, model_args=state["model_args"], cfg=state["cfg"],
                  dataset_info=dataclasses.asdict(info), step=state["step"], results=results,
                  text_source=source)
    with replacing(os.path.join(out_dir, "model.safetensors")) as tmp:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state["model"].items()},
                  tmp,
                  metadata={"format": "pt"})
    write_json(os.path.join(out_dir, "config.json"), config)
    if os.path.isdir(os.path.join(folder, "splits")):
        shutil.copytree(os.path.join(folder, "splits"), os.path.join(out_dir, "splits"),
                        dirs_exist_ok=True)
    with replacing(os.path.join(out_dir, "README.md")) as tmp, open(tmp, "w") as f:
        f.write(model_card(config))
    return out_dir


def _results_of(state, folder):
    """The evaluation of the checkpoint's own step: best.pt's, or metrics.json's last (None if
    none)."""
    if state["best"].get("step") == state["step"] and "results" in state["best"]:
        return state["best"]["results"]
    metrics = os.path.join(folder, "metrics.json")
    last = read_json(metrics)["last"] if os.path.isfile(metrics) else {}
    return last.get("results") if last.get("step") == state["step"] else None


def read_export(folder):
    """An exported folder as a checkpoint state (read_checkpoint's form)."""
    from safetensors.torch import load_file
    config = read_json(os.path.join(folder, "config.json"))
    try:
        weights = load_file(os.path.join(folder, "model.safetensors"))
    except Exception as e:
        raise UserError(f"cannot read {folder}/model.safetensors ({type(e).__name__}: {e})") from e
    results = config.get("results") or {}
    best = dict(miou=max((r["miou"] for r in results.values()), default=-1.0), step=config["step"],
                results=results)
    return dict(format=FORMAT, cfg=config["cfg"], model_args=config["model_args"], model=weights,
                step=config["step"], best=best, dataset_info=config["dataset_info"],
                text_source=config.get("text_source"))


def download_export(repo_id):
    """A hub id -> the local folder of that exported model (downloaded once, then from the
    cache)."""
    from huggingface_hub import snapshot_download
    try:
        folder = snapshot_download(repo_id)
    except Exception as e:  # offline, no such repository, gated, ...
        raise UserError(f"could not fetch the model {repo_id!r} from the Hugging Face hub "
                        f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                        f"offline, download it elsewhere (`hf download {repo_id} --local-dir DIR`) and "
                        f"pass DIR") from e
    if not is_export(folder):
        raise UserError(f"the hub repository {repo_id!r} is not a model exported by eval.py --export "
                        f"(no config.json of format {EXPORT!r} with model.safetensors)")
    return folder


LICENCES = {"potsdam": "ISPRS 2D semantic labelling benchmark terms (research use)",
            "loveda": "CC BY-NC-SA 4.0", "demo": "synthetic (generated by demo.py)"}
WEIGHT_LICENCES = {"clip": "OpenAI CLIP ViT-B/16: MIT",
                   "dinov3": "Meta DINOv3 ViT-B/16: the DINOv3 License"}


def model_card(config):
    """README.md of an exported model: what it is, how good, how it was trained, under which
    terms."""
    cfg, args, res = config["cfg"], config["model_args"], config["results"] or {}
    names = list(res) or args["kinds"]
    miou = " | ".join(f"{100 * res[n]['miou']:.2f}" if n in res else "-" for n in names)
    command = cfg.get("command") or (f"python train.py --dataset {cfg['dataset']} --ratio "
                                     f"{cfg['ratio'].replace('_', '/')}")
    weights = "; ".join(WEIGHT_LICENCES[k] for k in dict.fromkeys(args["kinds"]))
    size = args["size"] if isinstance(args["size"], str) else "as released"
    classes = config["dataset_info"]["classes"]
    return f"""---
library_name: co2s
tags: [semantic-segmentation, remote-sensing, semi-supervised]
---
# Co2S: {cfg['dataset']} {cfg['ratio'].replace('_', '/')}

Co2S model (students {', '.join(args['kinds'])}, size {size}, {args['numerics']} numerics) for \
{len(classes)} classes: {', '.join(classes)}. Trained with co2s for {config['step']} steps. Class \
embeddings of the CLIP student: {config.get('text_source') or 'stored in the weights'}.

| prediction | {' | '.join(names)} |
|---|{'---|' * len(names)}
| mIoU (%) at step {config['step']} | {miou} |

Trained with `{command}`.

- predict: `python eval.py FOLDER_OR_HUB_ID --predict scene.tif --out masks/`
- evaluate: `python eval.py FOLDER_OR_HUB_ID`
- fine-tune: `python train.py --init FOLDER_OR_HUB_ID ...`

Licences: data: {LICENCES.get(cfg['dataset'], "the dataset's own terms (see its page)")}. Backbone \
weights: {weights}; the fine-tuned weights inherit these terms.
"""


def save_release(model, cfg, run_dir):
    """A converted release (release.load_release) as one of our run folders (best.pt): eval.py,
    --predict and train.py --init read it like any run."""
    os.makedirs(run_dir, exist_ok=True)
    kinds = tuple(s.kind for s in model.students)
    num_classes = len(model.students[0].class_embeddings())
    spec = ModelSpec(kinds, num_classes,
                     size=vit_size([(s.kind, s.backbone) for s in model.students]),
                     numerics="release", fusion=model.fusion)
    cfg = dict(cfg, students=",".join(kinds), numerics="release", fusion=model.fusion,
               train_backbone=spec.train_backbone)
    save_checkpoint(Run(cfg, spec, model), os.path.join(run_dir, "best.pt"))


# --------------------------------------------------------------------------------------------
# RNG state, DDP, mixed precision


def rng_state():
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def setup_ddp(device=None):
    """(rank, world, device): torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without it, one
    process."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def amp_dtype(device, amp="auto"):
    """The one mixed-precision policy (train, eval, bench), amp one of AMP: on CUDA bf16 ('auto';
    fp16 where the GPU has no bf16, or asked for); fp32 on the CPU (bf16 there is many times slower)
    and with 'off'."""
    if amp not in AMP:
        raise UserError(f"unknown amp {amp!r}; valid: {', '.join(AMP)}")
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def frozen_dtype(device, amp, frozen_bf16):
    """The dtype --frozen-bf16 stores the frozen backbone weights in: bf16 where the run autocasts
    to bf16, else None: fp32 runs are unaffected, and so are fp16 runs (a lever not built for them)."""
    return torch.bfloat16 if frozen_bf16 and amp_dtype(device, amp) == torch.bfloat16 else None


def autocast(device, amp="auto"):
    """torch.autocast for amp_dtype(device, amp): disabled (a no-op) where that is fp32."""
    dtype = amp_dtype(device, amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


class StopSignals:
    """SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (SLURM's warning before the time limit) ask the loop to
    stop after the current optimizer step; a second Ctrl-C stops at once. `requested()` is the same
    on every rank of a DDP run (the flag is all-reduced), so all ranks stop at the same step. A
    context manager: the previous handlers come back on exit."""

    def __init__(self, world=1, device="cpu"):
        self.world, self.device, self.name, self.previous = world, device, None, {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.name == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt      # the second Ctrl-C
        self.name = signal.Signals(signum).name

    def requested(self):
        if self.world == 1:
            return self.name is not None
        flag = torch.tensor([self.name is not None], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)     # one tiny collective per step
        return bool(flag.item())
