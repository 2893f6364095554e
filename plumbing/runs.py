"""plumbing/runs.py: the run folder and the checkpoint format, defined once.

`save_checkpoint` writes a checkpoint (train.py's last.pt / best.pt, a converted release),
`read_checkpoint` reads it (and upgrades files of older versions), `model_from_checkpoint`
rebuilds the model without a download (resume, --init, eval.py), and `resolve_checkpoint` /
`load_run` take whatever a user points at: a run folder, a .pt file, an exported model folder
(tools/export.py writes it) or the hub id of one. A run folder holds config.json, splits/,
log.jsonl, last.pt (and last.prev.pt), best.pt and metrics.json. Checkpoints and JSON files are
written atomically (`replacing`): a crash mid-write never leaves a truncated file where a good one
was; log.jsonl is appended to, one record per line.
"""

import dataclasses
import fcntl
import os
import pathlib
import platform
import re
import shutil
import subprocess
import tempfile
import warnings

import numpy as np
import torch

from model import Co2S, ModelSpec, build_model
from plumbing.atomic import read_json, save_atomic
from plumbing.catalog import DatasetInfo, dataset_info
from plumbing.errors import UserError, reason
from plumbing.runtime import is_master, rng_state, set_rng_state

# what the numpy RNG state of checkpoints written before the weights_only format pickled
_core = getattr(np, "_core", None) or np.core  # numpy 2 renamed it; 1.x pickles name numpy.core
OLD_RNG = [_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
# 1: before the format was versioned (cfg["batch"] per process, epochs drop the remainder)
FORMAT = 2


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
    info: DatasetInfo = None  # classes and palette: a prediction reads them from the checkpoint


# --------------------------------------------------------------------------------------------
# The run folder


def run_info():
    """Versions and git revision for config.json."""
    here, git = os.path.dirname(os.path.abspath(__file__)), ["git", "rev-parse", "HEAD"]
    try:
        git = subprocess.run(git, capture_output=True, text=True, cwd=here).stdout.strip() or None
    except OSError:
        git = None
    versions = dict(python=platform.python_version(), torch=torch.__version__)
    versions["transformers"] = __import__("transformers").__version__
    return dict(versions=versions, git=git)


# flags that may change between the runs of one job (--resume, a requeued job) without changing it
FREE = ("resume", "stop_at", "workers", "device", "download", "log_every", "save_every", "compile")


def resume(folder, iters=None, stop_at=None, world=1):
    """(config, state) of the run folder to continue: its own config, but for --iters / --stop-at.
    One read of last.pt; a missing or unreadable one is an error that says what to do."""
    path, previous = os.path.join(folder, "last.pt"), os.path.join(folder, "last.prev.pt")
    try:  # a missing or unreadable last.pt: last.prev.pt, when it is readable, is the way on
        if not os.path.isfile(path):
            raise UserError(
                f"--resume {folder!r}: no last.pt there (a run folder of train.py holds one after "
                f"its first epoch, or after --save-every / --stop-at steps)"
            )
        state = read_checkpoint(path)
    except UserError as e:
        if not os.path.isfile(previous):
            raise
        step = read_checkpoint(previous)["step"]  # itself an error if that one is bad too
        raise UserError(
            f"{e}. The previous checkpoint {previous} (step {step}) is readable: `mv {previous} "
            f"{path}` and resume again to continue from it"
        ) from e
    # the folder being resumed is the run folder, wherever it was started (moved, copied)
    cfg = dict(state["cfg"], resume=folder, stop_at=stop_at, out=folder)
    cfg["iters"] = iters or cfg["iters"]
    if "batch_per_process" in cfg:  # format 1 counted --batch per process: as a global batch
        cfg["batch"] = cfg.pop("batch_per_process") * world * cfg["accum"]
    return cfg, state


def differences(saved, cfg):
    """What a saved config sets otherwise than `cfg` (FREE flags and the command aside), as a
    readable list; empty: the same run."""
    differ = sorted(k for k in cfg.keys() & saved.keys() - {*FREE, "command"} if saved[k] != cfg[k])
    return ", ".join(f"{k}: {saved[k]!r} there, {cfg[k]!r} here" for k in differ[:4])


def open_run(out, cfg, iters, stop_at, world, rank):
    """The folder `out` of a new run (cfg: its config), of the same command again on its folder (a
    requeued job: continued when its config is the same) or of --resume (cfg None): checked before
    any model is built or downloaded, and locked (one training per folder at a time). Returns
    (config, the state to continue or None, the lock rank 0 holds or None)."""
    again, lock = cfg is not None and os.path.isfile(os.path.join(out, "last.pt")), None
    if rank == 0:
        check_writable(out)
        if cfg is not None and not again:
            check_fresh(out, cfg)
        lock = lock_run(out)
    if cfg is not None and not again:
        return cfg, None, lock
    old, state = resume(out, iters, stop_at, world)
    if again and (what := differences(state["cfg"], cfg)):
        raise UserError(
            f"--out {out} holds a run with another config ({what}); continue it with "
            f"--resume {out}, or pass another --out"
        )
    if again and is_master():
        print(f"{out} holds last.pt of this command's run (step {state['step']}): continuing it")
    return old, state, lock


def check_resume_flags(args, defaults):
    """--resume continues a run with its own config: a flag given otherwise than its `defaults`
    value (FREE ones and --iters aside) would change it, and is an error."""
    changed = [k for k, v in vars(args).items() if k not in (*FREE, "iters") and v != defaults[k]]
    if flags := ", ".join(f"--{k.replace('_', '-')}" for k in changed):
        raise UserError(
            f"--resume {args.resume}: {flags} cannot change a run in progress (it continues with "
            f"its own config.json); start a new run with another --out"
        )


def restore(run, state):
    """A resumed run as its checkpoint left it: optimizers, scaler, RNG, step, and the best
    evaluation so far: the checkpoint's, or metrics.json's when that one is better (an evaluation
    that ended after last.pt was written, then a kill)."""
    for opt, s in zip(run.optimizers, state["optimizers"]):
        opt.load_state_dict(s)
    run.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    path, step, best = os.path.join(run.cfg["out"], "metrics.json"), state["step"], state["best"]
    saved = read_json(path)["best"] if os.path.isfile(path) else {}
    newer = saved.get("step", step + 1) <= step and saved["miou"] > best["miou"]
    run.step, run.best = step, saved if newer else best


def evaluated(out, step):
    """Whether metrics.json records the evaluation of `step` (the step a run resumed at)."""
    path = os.path.join(out, "metrics.json")
    return os.path.isfile(path) and read_json(path)["last"]["step"] == step


def check_fresh(out, cfg):
    """A new run's --out holds nothing, or only this command's own run killed before its first
    checkpoint (the same config.json): never another run, an export or a user's files."""
    # (open_run made the folder; .write-test: the probe of an older check_writable, left by a kill)
    found = sorted(set(os.listdir(out)) - {".lock", ".write-test"})
    config = os.path.join(out, "config.json")
    run = os.path.isfile(config)  # (an export holds model.safetensors too, a killed run never)
    mine = run and set(found) <= {"config.json", "log.jsonl", "splits"}
    if not found or (mine and not differences(read_json(config), cfg)):
        return
    stray = f"files not written by train.py: {found[:3]}"
    what = "an exported model" if is_export(out) else "another run" if run else stray
    hint = f"pass a new folder (or --resume {out} to continue a run there)"
    raise UserError(f"--out {out} holds {what}; {hint}")


def lock_run(out):
    """One training per run folder: an OS lock on <out>/.lock for the life of the process (the
    kernel drops it when the process dies, so a kill -9 leaves no stale lock). Returns the open
    file: keep it. Evaluation and prediction of a running folder take no lock."""
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        holder = pathlib.Path(f.name).read_text().strip() or "another process"
        raise UserError(
            f"--out {out} is in use by the training of {holder}; wait for it or stop it, or pass "
            f"another --out"
        ) from None
    pathlib.Path(f.name).write_text(f"host {platform.node()} pid {os.getpid()}\n")
    return f


def check_room(out, model, copies=3):
    """Before the first step: room in the run folder for `copies` checkpoints (last.pt,
    last.prev.pt, best.pt, and best_<student>.pt under --best-per-student), counting those already
    there (a resumed run replaces them). One checkpoint: the state dict, plus AdamW's two fp32
    moments for every trainable parameter."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    one = state + 2 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    need = copies * one - sum(f.stat().st_size for f in pathlib.Path(out).glob("*.pt"))
    free, gib = shutil.disk_usage(out).free, 2**30
    if free < need:
        raise UserError(
            f"--out {out}: {free / gib:.2f} GiB free, this run needs {need / gib:.2f} GiB "
            f"({copies} checkpoints of {one / gib:.2f} GiB); free some space or pass another --out"
        )


def check_writable(out, what="the run folder"):
    """A folder can be created and written (a run folder: checked before any model is built or
    downloaded)."""
    try:
        os.makedirs(out, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # a file can be created there (and is gone again)
    except OSError as e:
        raise UserError(
            f"--out {out}: cannot create or write {what} ({e.strerror or e}); pass a folder you "
            f"can write to"
        ) from e


# --------------------------------------------------------------------------------------------
# The checkpoint format


def save_checkpoint(run, path, keep_previous=False):
    """Everything to resume or evaluate the run, written atomically; never NaN weights over a good
    file (returns False then). keep_previous: the file it replaces stays as <name>.prev.pt
    (last.pt), in case the new one is lost to a failing disk. A failed write (disk full) leaves the
    previous files intact and is a UserError saying so."""
    if not all(torch.isfinite(p).all() for p in run.model.parameters()):
        return False
    scaler = run.scaler.state_dict() if run.scaler is not None else None
    state = dict(format=FORMAT, cfg=run.cfg, model_args=dataclasses.asdict(run.spec))
    state.update(model=run.model.state_dict(), step=run.step, best=run.best, rng=rng_state())
    state.update(optimizers=[o.state_dict() for o in run.optimizers], scaler=scaler)
    if run.info is not None:
        state["dataset_info"] = dataclasses.asdict(run.info)
    save_atomic(state, path, keep_previous)
    return True


def read_checkpoint(path, mmap=False):
    """torch.load of one of our checkpoints, upgraded to the current format, or an exported folder;
    a clear error otherwise. mmap: the tensors stay in the file until read (a model loaded for
    prediction never brings the optimizers' moments, twice the weights, into memory)."""
    if os.path.isdir(path):
        return read_export(path)
    try:  # weights_only: a checkpoint from anywhere can never run code when it is read
        with torch.serialization.safe_globals(OLD_RNG):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, not a torch file, a pickle that wants to run code, ...
        raise UserError(f"cannot read checkpoint {path!r} ({reason(e)})") from e
    if not isinstance(state, dict) or not {"cfg", "model", "model_args"} <= set(state):
        raise UserError(f"{path!r} is not a checkpoint of train.py (no cfg / model / model_args)")
    version = state.get("format", 1)
    if version > FORMAT:
        raise UserError(f"{path!r} was written by a newer co2s (format {version}); update the code")
    if version == 1:
        # no train_backbone before it was a choice (attention); --batch counted per process and
        # epochs dropped the remainder: kept as such, so that a resumed run continues as it started
        cfg = {"train_backbone": "attention", **state["cfg"]}
        args = {"train_backbone": "attention", **state["model_args"]}
        if "batch" in cfg and "global_batch" not in cfg:
            cfg["batch_per_process"], cfg["epoch_rule"] = cfg.pop("batch"), "drop"
        state = dict(state, format=FORMAT, cfg=cfg, model_args=args)
    return dict(state, cfg=upgrade_cfg(state["cfg"]))


# flags and records added while the format stayed 2: their values in the runs made before them
ADDED = dict(compile=False, frozen_bf16=False, round_iters=False, best_per_student=False)
ADDED |= dict(epoch_rule="release", recipe="paper", data_order="own")
ADDED |= dict(recipe_switches={}, recipe_overrides={})


def upgrade_cfg(cfg):
    """A config of an older run in today's keys, as that run was trained: ADDED's values, and
    the description of its hyper-parameters, once called `recipe`, as `hyper`."""
    cfg = dict(cfg)
    if ":" in str(cfg.get("recipe", "")):  # "paper: pretrained students ..." / "scratch: ..."
        cfg["hyper"] = cfg.pop("recipe")
    return {**ADDED, **cfg}


# what tools/export.py writes for a backbone loaded from a folder of the machine that trained it
LOCAL_FOLDER = "a local folder"


def saved_settings(path):
    """The config of a saved run or exported model (train.py --config): its config.json, a folder
    holding one, or an exported model's hub id (downloaded once). An export keeps no path of the
    machine that trained it: the weights it names as LOCAL_FOLDER are left to the defaults, and its
    own split lists are used."""
    path = download_export(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        config = read_json(file)
    except (OSError, ValueError) as e:
        raise UserError(f"--config {path!r}: cannot read {file} ({e})") from e
    if isinstance(config, dict) and config.get("format") == EXPORT:
        splits = os.path.join(os.path.dirname(os.path.abspath(file)), "splits")
        cfg = {k: v for k, v in config["cfg"].items() if v != LOCAL_FOLDER}
        if os.path.isdir(splits):
            cfg.setdefault("splits", splits)
        return upgrade_cfg(cfg)
    if isinstance(config, dict) and {"dataset", "ratio", "students"} <= set(config):
        return upgrade_cfg(config)
    raise UserError(
        f"--config {path!r}: {file} is neither the config.json of a train.py run folder nor that "
        f"of an exported model"
    )


def model_from_checkpoint(state, numerics=None):
    """The Co2S model of a checkpoint: built from its model_args (random backbones, no download),
    then every tensor (frozen backbone weights, CLIP text embeddings included) read from its state
    dict. numerics: run it with other numerics than it was trained with ('hf' | 'release')."""
    args, sd = state["model_args"], state["model"]
    spec = ModelSpec(**dict(args, kinds=tuple(args["kinds"])))
    spec = dataclasses.replace(spec, numerics=numerics) if numerics else spec
    text = next((v for k, v in sd.items() if k.endswith(".text")), None)
    # "random backbone weights": they are overwritten just below
    with warnings.catch_warnings(action="ignore"):
        try:
            model = build_model(spec, text=text)
        except ValueError as e:
            raise UserError(f"the checkpoint's model_args do not build its model ({e})") from e
    mine = model.state_dict()
    missing, extra = sorted(set(mine) - set(sd)), sorted(set(sd) - set(mine))
    wrong = [k for k in sd if k in mine and sd[k].shape != mine[k].shape]
    if missing or extra or wrong:
        raise UserError(
            f"the checkpoint's weights do not fit the model its model_args describe: missing "
            f"{missing[:3]}, unexpected {extra[:3]}, other shapes {wrong[:3]}"
        )
    model.load_state_dict(sd)
    return model


def resolve_checkpoint(path, ckpt=None):
    """What a command was given -> what read_checkpoint reads: a run folder (its best.pt, else
    last.pt; or the one `ckpt` names), a .pt file, an exported model folder (config.json +
    model.safetensors), or the hub id of one (downloaded once into the Hugging Face cache)."""
    path = download_export(path)
    if is_export(path) or (os.path.isfile(path) and path.endswith(".pt")):
        return path
    if os.path.isdir(path):
        wanted = [f"{ckpt}.pt"] if ckpt else ["best.pt", "last.pt"]
        if found := [f for f in wanted if os.path.isfile(os.path.join(path, f))]:
            return os.path.join(path, found[0])
        raise UserError(
            f"run folder {path!r} holds no {' or '.join(wanted)}; expected a folder written by "
            f"train.py, an exported model folder or a .pt checkpoint file"
        )
    raise UserError(
        f"{path!r} is neither a run folder (with best.pt / last.pt), a .pt checkpoint, an "
        f"exported model folder (config.json + model.safetensors) nor a hub id (user/name)"
    )


def run_folder(checkpoint):
    """The folder holding a checkpoint's run files (splits/, eval JSON): an exported folder
    itself."""
    return checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)


def load_run(path, device="cpu", data_root=None, numerics=None):
    """(model in eval mode, dataset info, cfg) of anything resolve_checkpoint takes."""
    state = read_checkpoint(resolve_checkpoint(path), mmap=True)
    cfg, info = state["cfg"], state.get("dataset_info")
    root = data_root or cfg.get("data_root")  # (an export's cfg holds none)
    # a checkpoint (or an export) carries its classes and palette; an older one: the catalog's
    info = DatasetInfo(**info) if info else dataset_info(cfg["dataset"], root)
    return model_from_checkpoint(state, numerics).to(device).eval(), info, cfg


def load_model(path, device="cpu"):
    """A trained Co2S model in one line, in eval mode: a run folder, a .pt checkpoint, an exported
    folder or its hub id (downloaded once into the hub's cache)."""
    return load_run(path, device)[0]


# --------------------------------------------------------------------------------------------
# An exported model: the layout of the Hugging Face hub (config.json, model.safetensors, README.md)


EXPORT = "co2s-model"  # config.json's "format": what tells an exported folder from others


def is_export(path):
    config = os.path.join(path, "config.json")
    both = os.path.isfile(config) and os.path.isfile(os.path.join(path, "model.safetensors"))
    return both and read_json(config).get("format") == EXPORT


def read_export(folder):
    """An exported folder as a checkpoint state (read_checkpoint's form)."""
    from safetensors.torch import load_file

    config = read_json(os.path.join(folder, "config.json"))
    try:
        weights = load_file(os.path.join(folder, "model.safetensors"))
    except Exception as e:
        raise UserError(f"cannot read {folder}/model.safetensors ({type(e).__name__}: {e})") from e
    results = config.get("results") or {}
    miou = max((r["miou"] for r in results.values()), default=-1.0)
    state = {k: config[k] for k in ("cfg", "model_args", "step", "dataset_info")}
    state["best"] = dict(miou=miou, step=config["step"], results=results)
    return dict(state, format=FORMAT, model=weights, text_source=config.get("text_source"))


def download_export(repo_id):
    """A hub id (user/name, no local path) -> the local folder of that exported model (downloaded
    once, then from the cache); any other path as it is."""
    if os.path.exists(repo_id) or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        return repo_id
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id)
    except Exception as e:  # offline, no such repository, gated, ...
        raise UserError(
            f"could not fetch the model {repo_id!r} from the Hugging Face hub ({reason(e)}); "
            f"offline, download it elsewhere (`hf download {repo_id} --local-dir DIR`) and pass DIR"
        ) from e
    if not is_export(folder):
        raise UserError(
            f"the hub repository {repo_id!r} is not a model exported by tools/export.py "
            f"(no config.json of format {EXPORT!r} with model.safetensors)"
        )
    return folder
