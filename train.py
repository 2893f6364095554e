"""train.py: one readable Co2S training loop, from the offline demo to the paper's runs.

    python train.py                                    # demo: synthetic data, tiny students, CPU
    python train.py --dataset potsdam --ratio 1/16     # the paper on one GPU (METHOD.md section 5)
    torchrun --nproc_per_node 4 train.py --dataset potsdam --ratio 1/16   # the release's own shape

The loop: set lr (poly) and E9's weight -> the losses of one Co2S iteration (co2s.py) ->
backward -> one AdamW step per student -> log every N steps -> at each epoch end write last.pt,
then evaluate (sliding window, eval.py) and keep best.pt. `--batch` is the GLOBAL batch (the
release's by default); one GPU computes it as one micro-batch, `--accum` splits it as the
release's processes did. `--resume RUN_DIR` continues the same run: step, lr, optimizer, RNG and
data order. Only rank 0 prints, logs and saves. The run folder and checkpoint format, DDP / AMP /
signals and the datasets' catalog are plumbing/'s. Left out on purpose: EMA teachers, schedulers
with warmup, multi-crop evaluation (not in the paper).
"""

import argparse
import dataclasses
import math
import os
import random
import shlex
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import co2s
import data
import eval as evaluation
from losses import stability_weight
from model import (
    FUSIONS,
    KINDS,
    TRAIN_BACKBONE,
    ModelSpec,
    build_model,
    class_embeddings,
    prediction_names,
)
from plumbing import atomic, recipes, runs, runtime
from plumbing.batches import BatchLayout
from plumbing.catalog import CHOICES, dataset_info, parse_ratio
from plumbing.download import ensure, scan_files
from plumbing.errors import UserError, cli
from plumbing.weights import DEFAULT_WEIGHTS, NUMERICS

# METHOD.md section 5: the paper fine-tunes PRETRAINED ViTs: only their attention trains, barely.
PAPER_RECIPE = dict(lr=1e-4, backbone_lr_mult=0.01, head_lr_mult=10.0, train_backbone="attention")
# Students with random weights (the tiny preset, or 'none' weights) learn the whole backbone.
SCRATCH_RECIPE = dict(lr=5e-4, backbone_lr_mult=0.5, head_lr_mult=1.0, train_backbone="all")
HYPER = ("lr", "weight_decay", "backbone_lr_mult", "head_lr_mult")
# what a new run started with --config SAVED takes from it: every flag but these (its own)
FRESH = ("out", "resume", "stop_at", "config")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # real defaults only; a None default is explained
        return action.help if action.default is None else super()._get_help_string(action)


# fmt: off
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=Help)
    a = p.add_argument
    a("--recipe", default="paper", choices=recipes.RECIPES, help="paper: the method as the "
      "paper states it | release: the authors' code as they ran it, every switch of METHOD.md "
      "section 7 at once (a flag of its own, given, still wins)")
    a("--config", default=None, help="start a NEW run with the settings of a saved run or "
      "exported model (its folder, config.json or hub id); the flags given here override them")
    # data (the defaults per dataset come from plumbing/catalog.py: crop, epochs, batch, size)
    a("--dataset", default="demo", help="one of: " + ", ".join(CHOICES))
    a("--ratio", default="1/16", help="labelled ratio, 1/16 or 1_16")
    a("--data-root", default=None, help="dataset folder (default: data/<dataset>)")
    a("--download", action="store_true", help="fetch a missing paper dataset from the hub")
    a("--splits", default=None, help="split lists: a folder (paper layout or labeled/unlabeled/"
      "val.txt), or 'seeded' for a seeded draw (default: the paper's lists in splits/)")
    a("--crop", type=int, default=None, help="training crop and eval window (default: the "
      "dataset's; paper 512, whdld 256)")
    a("--batch", type=int, default=None, help="GLOBAL labelled (and unlabelled) images per step "
      "(default: the release's: 4 = 4 GPUs x 1, whdld 8 = 4 x 2; demo 2; custom data 4)")
    a("--accum", type=int, default=None, help="micro-batches per step and process: --accum 4 on "
      "one GPU is a 4-process run of this code (slower); default 1, the batch at once (faster); "
      "release recipe: 4, their processes")
    a("--workers", type=int, default=None, help="data loader processes per stream (default: a "
      "quarter of the CPU cores, 1 to 4; up to three streams run at once)")
    # students (E1-E4)
    a("--students", default="clip,dinov3", help="one or two of clip|dinov3, comma separated: "
      "clip,dinov3 (paper), clip,clip, dinov3,dinov3, clip, dinov3")
    a("--size", default=None, choices=["base", "tiny"], help="ViT-B/16 (the paper) or the tiny "
      "CPU preset (default: the dataset's; tiny for the demo)")
    for kind in KINDS:
        extra = "; 'release-init': as the release trains it" if kind == "dinov3" else ""
        a(f"--{kind}-weights", default=None, help=f"hub id or local folder (base default "
          f"{DEFAULT_WEIGHTS[kind]}); 'none' = random{extra}")
    a("--clip-guidance", default="text", choices=["text", "queries"], help="ablation: the CLIP "
      "student with learnable queries instead of text (E2)")
    a("--text-embeddings", default=None, help="precomputed [N, 512] .npy/.pt class embeddings")
    a("--numerics", default=None, choices=NUMERICS, help="backbone numerics: the transformers "
      "checkpoints as they are (hf, the default), or as the authors' code ran them (release)")
    a("--init", default=None, help="start from the weights of a checkpoint (ours, or a converted "
      "release: python -m tools.release); its students, size and numerics are used")
    a("--grad-checkpoint", action="store_true", help="recompute the trainable blocks (memory)")
    a("--compile", action="store_true", help="torch.compile the backbone blocks and the heads "
      "with static shapes; off by default until measured on a GPU")
    a("--frozen-bf16", action="store_true", help="under bf16 autocast, store the frozen backbone "
      "weights in bf16 (what trains stays fp32); no effect on fp32 runs")
    # method (co2s.Method)
    a("--method", default="co2s", choices=co2s.METHODS, help="co2s (E5-E8) | unimatch (no E8) "
      "| supervised (E5 only)")
    a("--stability", default=None, choices=co2s.STABILITY, help="E8: grad (paper, the default) "
      "| released (the authors' code: no gradient) | off")
    a("--tau", type=float, default=0.95, help="confidence threshold of E6 and E8")
    a("--no-fp", action="store_true", help="ablation: drop the feature-perturbation branch (E4)")
    a("--strong-views", type=int, default=2, choices=[1, 2], help="ablation: one strong view")
    a("--mix-source", default=None, choices=data.MIX_SOURCES, help="CutMix partners: another "
      "unlabelled image (partner, the default), the same image augmented again (same, the "
      "release), the batch rolled")
    a("--data-order", default=None, choices=data.ORDERS, help="own: each stream its own seeded "
      "order (the default) | shared: one sampler orders the labelled and unlabelled lists (the "
      "release)")
    a("--fusion", default="confidence", choices=FUSIONS, help="E10 fusion rule at inference")
    # optimisation (METHOD.md section 5)
    a("--lr", type=float, default=None, help="base lr (default: 1e-4 pretrained, 5e-4 scratch)")
    a("--weight-decay", type=float, default=0.01)
    a("--backbone-lr-mult", type=float, default=None, help="trainable backbone weights "
      "(default: 0.01 pretrained, 0.5 scratch)")
    a("--train-backbone", default=None, choices=TRAIN_BACKBONE, help="which backbone weights "
      "train (default: attention for pretrained students, the paper; all from scratch)")
    a("--head-lr-mult", type=float, default=None, help="decoder head (default: 10 pretrained, "
      "1 scratch); queries x1")
    a("--epochs", type=int, default=None, help="one epoch = one pass over the unlabelled list "
      "(default: the dataset's; 80, mer 150)")
    a("--iters", type=int, default=None, help="total optimizer steps (overrides --epochs)")
    a("--round-iters", action=argparse.BooleanOptionalAction, default=None, help="round --iters "
      "up to whole epochs, as the release does (default: only under --recipe release)")
    a("--amp", default=None, choices=runtime.AMP, help="CUDA autocast (auto, the default: bf16, "
      "else fp16; off: fp32, the release); CPU runs fp32")
    a("--seed", type=int, default=0)
    # run folder
    a("--out", default=None, help="run folder (default: runs/<dataset>-<ratio>-<time>)")
    a("--resume", default=None, help="run folder to continue with its own config (only --iters "
      "/ --stop-at may change)")
    a("--eval-every", type=int, default=1, help="epochs between evaluations")
    a("--best-by", default="fused", help="student name (or fused) whose mIoU picks best.pt")
    a("--best-per-student", action=argparse.BooleanOptionalAction, default=None, help="also "
      "keep best_<student>.pt, each on its own mIoU, as the release keeps best_clip.pth (default: "
      "only under --recipe release)")
    a("--log-every", type=int, default=10)
    a("--save-every", type=int, default=0, help="also write last.pt every N steps (0: at epoch "
      "ends)")
    a("--stop-at", type=int, default=None, help="stop after this step (checkpointed)")
    a("--device", default=None, help="cuda or cpu (default: cuda if available)")
    args = p.parse_args(argv)
    if args.config:  # the saved run's flags become the defaults: those given here still win
        saved = runs.saved_settings(args.config)
        dests = {x.dest for x in p._actions}
        p.set_defaults(**{k: v for k, v in saved.items() if k in dests and k not in FRESH})
        args = p.parse_args(argv)
    if args.dataset not in CHOICES:
        p.error(f"--dataset {args.dataset!r} unknown; valid: {', '.join(CHOICES)}")
    kinds = args.students.split(",")
    if not 1 <= len(kinds) <= 2 or any(k not in KINDS for k in kinds):
        p.error(f"--students {args.students!r}: one or two of {', '.join(KINDS)}, comma separated")
    if args.best_by not in prediction_names(kinds):
        valid = ", ".join(prediction_names(kinds))
        p.error(f"--best-by {args.best_by!r}; valid for these students: {valid}")
    # every number by its range (0 is a value, not "the default"; None is)
    ranges = dict(crop=(16, "16"), batch=(1, "1"), accum=(1, "1"), workers=(0, "0"),
                  epochs=(1, "1"), iters=(1, "1"), log_every=(1, "1"), eval_every=(1, "1"),
                  save_every=(0, "0"), stop_at=(0, "0"), lr=(0, "above 0"), seed=(0, "0"),
                  weight_decay=(0, "0"), backbone_lr_mult=(0, "0"), head_lr_mult=(0, "0"))
    for k, (low, text) in ranges.items():
        v = getattr(args, k)
        if v is not None and (v < low or (k == "lr" and v <= 0) or v != v):
            p.error(f"--{k.replace('_', '-')} {v}: must be {text if k == 'lr' else f'>= {text}'}")
    if not 0 < args.tau <= 1:
        p.error(f"--tau {args.tau}: a confidence threshold in (0, 1]")
    return args
# fmt: on


def resolve(args, init=None, world=1):
    """The run's config: every flag, with the dataset's defaults, the --recipe's switches and the
    hyper-parameters filled in (a flag given wins over each). init: the state of the --init
    checkpoint, whose students it takes; world: the processes (the release's 4 are --accum 4 /
    world). The schedule's figures are added by `schedule` once the data is counted; after that
    the config never changes (config.json)."""
    cfg = vars(args).copy()
    info = dataset_info(args.dataset, args.data_root)
    cfg["data_root"] = args.data_root or os.path.join("data", args.dataset)
    cfg["ratio"] = parse_ratio(args.ratio)
    for k in ("crop", "batch", "epochs", "size"):
        cfg[k] = cfg[k] or getattr(info, k)
    if cfg["workers"] is None:
        cfg["workers"] = min(4, max(1, (os.cpu_count() or 4) // 4))
    switches = recipes.switches(cfg["recipe"], cfg["batch"], world)
    for k, v in {**recipes.PAPER, **switches}.items():
        cfg[k] = v if cfg[k] is None else cfg[k]
    for kind in KINDS:
        w = cfg[f"{kind}_weights"] or (DEFAULT_WEIGHTS[kind] if cfg["size"] == "base" else "none")
        cfg[f"{kind}_weights"] = None if w == "none" else w
    if init:  # fine-tuning: the checkpoint decides what the students are
        spec = init["model_args"]
        cfg.update(
            students=",".join(spec["kinds"]),
            size=spec["size"],
            numerics=spec["numerics"],
            clip_guidance=spec["clip_guidance"],
            clip_weights=None,
            dinov3_weights=None,
        )
    kinds = cfg["students"].split(",")
    scratch = not init and all(cfg[f"{k}_weights"] is None for k in kinds)
    cfg["hyper"] = (
        "scratch: every student has random weights"
        if scratch
        else "paper: METHOD.md section 5's, for students that fine-tune (pretrained, release-init)"
    )
    for k, v in (SCRATCH_RECIPE if scratch else PAPER_RECIPE).items():
        cfg[k] = v if cfg[k] is None else cfg[k]
    cfg["epoch_rule"] = "release"  # epochs counted as the release's DistributedSampler counts them
    # what the recipe switched, and where the run's value differs from it (a flag given, --init)
    cfg["recipe_switches"] = switches
    cfg["recipe_overrides"] = {k: cfg[k] for k, v in switches.items() if cfg[k] != v}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfg["out"] = cfg["out"] or os.path.join("runs", f"{cfg['dataset']}-{cfg['ratio']}-{stamp}")
    return cfg


def layout_of(cfg, world, rank):
    """How the global batch splits over the processes and --accum (BatchLayout)."""
    pad = cfg["epoch_rule"] == "release"
    return BatchLayout(cfg["batch"], world, cfg["accum"], rank, pad=pad)


def schedule(cfg, layout, n_unlabeled):
    """The config with the schedule's figures (config.json records them): the batch layout,
    steps per epoch (one pass over the unlabelled list) and the total: --epochs of them, or
    --iters, rounded up to whole epochs under --round-iters as the release does (Co2S.py
    l.243-247: epochs = ceil(iters / steps per epoch), then epochs x steps per epoch)."""
    steps_per_epoch = layout.steps_per_epoch(n_unlabeled)
    if steps_per_epoch == 0:
        raise UserError(
            f"{n_unlabeled} unlabelled images are fewer than one {layout.describe()}; lower --batch"
        )
    epochs, total = cfg["epochs"], cfg["iters"] or cfg["epochs"] * steps_per_epoch
    if cfg["iters"] and cfg["round_iters"]:
        epochs = math.ceil(cfg["iters"] / steps_per_epoch)
        total = epochs * steps_per_epoch
    return dict(
        cfg,
        epochs=epochs,
        global_batch=layout.global_batch,
        micro_batch=layout.micro,
        world_size=layout.world,
        iters_per_epoch=steps_per_epoch,
        total_iters=total,
    )


def spec_of(cfg, num_classes):
    """What builds the model (saved in every checkpoint, so eval.py and --resume rebuild it)."""
    return ModelSpec(
        tuple(cfg["students"].split(",")),
        num_classes,
        size=cfg["size"],
        numerics=cfg["numerics"],
        clip_guidance=cfg["clip_guidance"],
        fusion=cfg["fusion"],
        grad_checkpoint=cfg["grad_checkpoint"],
        train_backbone=cfg["train_backbone"],
    )


def method_of(cfg):
    """The co2s.iteration switches of this run."""
    return co2s.Method(
        method=cfg["method"],
        stability=cfg["stability"],
        tau=cfg["tau"],
        fp=not cfg["no_fp"],
        strong_views=cfg["strong_views"],
    )


def new_model(cfg, info, init=None):
    """(model, text source) of a new run: pretrained backbones and the CLIP student's class
    embeddings (E2); or the weights of the --init checkpoint's state `init`."""
    spec = spec_of(cfg, len(info.classes))
    if init:
        n = init["model_args"]["num_classes"]
        if n != len(info.classes):
            raise UserError(
                f"--init {cfg['init']!r} predicts {n} classes, {cfg['dataset']} has "
                f"{len(info.classes)}"
            )
        state = dict(init, model_args=dataclasses.asdict(spec))
        return runs.model_from_checkpoint(state), f"the checkpoint {cfg['init']}"
    text, source = None, None
    if "clip" in spec.kinds and cfg["clip_guidance"] == "text":
        text, source = class_embeddings(
            info.concepts,
            size=cfg["size"],
            clip_weights=cfg["clip_weights"],
            file=cfg["text_embeddings"],
        )
    weights = {k: cfg[f"{k}_weights"] for k in KINDS}
    return build_model(spec, weights=weights, text=text), source


def param_groups(student, *, lr, weight_decay, backbone_lr_mult, head_lr_mult):
    """Explicit AdamW groups (METHOD.md section 5). In the paper's recipe the only trainable
    backbone parameters are the attention projections and every backbone norm is frozen, so 'no
    decay on norms outside the head' leaves nothing to exempt (from scratch, --train-backbone all,
    the norms decay too)."""
    backbone = [p for p in student.backbone.parameters() if p.requires_grad]
    groups = [
        dict(name=f"{student.name}.backbone", lr=lr * backbone_lr_mult, params=backbone),
        dict(
            name=f"{student.name}.head",
            lr=lr * head_lr_mult,
            params=list(student.head.parameters()),
        ),
    ]
    if student.queries is not None:
        groups.append(dict(name=f"{student.name}.queries", lr=lr, params=[student.queries.weight]))
    for g in groups:
        g.update(initial_lr=g["lr"], weight_decay=weight_decay)
    return groups


def poly(step, total):
    """The lr factor of step `step` (0-based): (1 - t/T)^0.9, no warmup, with t = step - 1 as
    released (the authors set the lr after each step from the index of the step just taken; step
    0: the base lr)."""
    return (1 - max(step - 1, 0) / total) ** 0.9


@dataclasses.dataclass
class Loop:
    """The training loop's state: the run (runs.Run: config, model, optimizers, scaler, step,
    best), its batch layout and where it computes; each rule of the loop written once below."""

    run: runs.Run
    info: object  # plumbing.catalog.DatasetInfo
    layout: BatchLayout
    device: torch.device
    students: list = None  # as the step calls them: in their DDP wrappers on several processes
    window: dict = dataclasses.field(default_factory=dict)  # log key -> (sum, count)
    stop: runtime.StopSignals = None  # the stop signals (set by main)
    t_last: float = dataclasses.field(default_factory=time.time)

    @property
    def master(self):
        return self.layout.rank == 0

    @property
    def cfg(self):
        return self.run.cfg

    @property
    def total_steps(self):
        return self.cfg["total_iters"]

    def epoch(self, step):
        return step / self.cfg["iters_per_epoch"]  # epochs completed after `step` steps

    def ends_after(self, step):  # the one rule for when the run ends
        return step == self.total_steps or step == self.cfg["stop_at"]

    def logs_after(self, step):  # ... for when a log record is written
        return step % self.cfg["log_every"] == 0 or self.ends_after(step)

    def saves_after(self, step):  # ... for when last.pt is written
        every, per_epoch = self.cfg["save_every"], self.cfg["iters_per_epoch"]
        return step % per_epoch == 0 or self.ends_after(step) or (every and step % every == 0)

    def evaluates_after(self, step):  # ... and for when the model is evaluated
        per_epoch = self.cfg["iters_per_epoch"]
        if step == self.total_steps:
            return True
        return step % per_epoch == 0 and (step // per_epoch) % self.cfg["eval_every"] == 0


def main(argv=None):
    args = get_args(argv)
    rank, world, device = runtime.setup_ddp(args.device)
    cfg, state, init, lock = configure(args, argv, rank, world)
    try:  # the folder's lock is released however the run ends (a kill -9: by the kernel)
        run_training(cfg, state, init, rank, world, device)
    finally:
        if lock is not None:
            lock.close()


def run_training(cfg, state, init, rank, world, device):
    """main's work once the run folder is decided and locked."""
    layout = layout_of(cfg, world, rank)  # a --batch that does not split fails here, at once
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    random.seed(cfg["seed"])
    info = dataset_info(cfg["dataset"], cfg["data_root"])
    splits = prepare_data(cfg, info, os.path.join(cfg["out"], "splits") if state else None, world)
    cfg = schedule(cfg, layout, len(splits.unlabeled))  # the config is final from here on
    loop, text_source = build_loop(cfg, state, info, layout, device, init)
    if loop.master:
        best = len(loop.run.model.students) if cfg["best_per_student"] else 0
        runs.check_room(cfg["out"], loop.run.model, copies=3 + best)
        start_run(loop, splits, text_source, fresh=state is None)
    run, method, amp = loop.run, method_of(cfg), runtime.autocast(device, cfg["amp"])
    streams = data.Streams(
        cfg["crop"],
        cfg["seed"],
        cfg["mix_source"],
        cfg["workers"],
        pin_memory=device.type == "cuda",
        order=cfg["data_order"],
    )
    steps = range(run.step, loop.total_steps)  # one sampler for the run: workers start once
    loaders = data.train_loaders(info, splits, layout, streams, steps, method.method)
    streams = {name: iter(loader) for name, loader in loaders.items()}
    val = data.val_loader(
        info, splits.val, workers=min(cfg["workers"], 2), rank=rank, world_size=world
    )

    pbar = tqdm(
        total=loop.total_steps, initial=run.step, disable=not loop.master, dynamic_ncols=True
    )
    run.model.train()
    with runtime.StopSignals(world, device) as stop:
        loop.stop = stop
        if state and loop.evaluates_after(run.step) and not evaluated(loop):
            evaluate_and_keep_best(loop, val, amp)  # stopped during it: the evaluation again
        while run.step < loop.total_steps and run.step != cfg["stop_at"]:
            train_step(loop, streams, method, amp)
            pbar.update(1)
            after_step(loop, val, amp, pbar)
            if stop.requested() and run.step < loop.total_steps:  # a finished run just ends
                stopped(loop, stop.name)
    pbar.close()
    finish(loop)


def configure(args, argv, rank, world):
    """(config, the state to resume or None, the --init state or None, the run folder's lock):
    a new run, the same command again on its folder (a requeued job continues), or --resume."""
    command = "python train.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    init, state, lock = None, None, None
    if args.resume:
        check_resume_flags(args)
    else:
        init = runs.read_checkpoint(runs.resolve_checkpoint(args.init)) if args.init else None
        cfg = dict(resolve(args, init, world), command=command)
    out = args.resume or cfg["out"]
    requeue = not args.resume and os.path.isfile(os.path.join(out, "last.pt"))
    if rank == 0:  # before any model is built or downloaded; one training per folder at a time
        runs.check_writable(out)
        if not args.resume and not requeue:
            runs.check_fresh(out, cfg)
        lock = runs.lock_run(out)
    if args.resume:
        cfg, state = runs.resume(args.resume, args.iters, args.stop_at, world)
    elif requeue:  # the same command again on its folder (a requeued job): continue it
        cfg, state = runs.requeued(cfg, args.iters, args.stop_at, world)
    return cfg, state, init, lock


def check_resume_flags(args):
    """--resume continues a run with its own config: a flag that would change it is an error."""
    defaults, free = (
        vars(get_args([])),
        (
            "resume",
            "iters",
            "stop_at",
            "workers",
            "device",
            "log_every",
            "save_every",
            "download",
            "compile",
        ),
    )
    changed = [k for k, v in vars(args).items() if k not in free and v != defaults[k]]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in changed)
        raise UserError(
            f"--resume {args.resume}: {flags} cannot change a run in progress (it "
            f"continues with its own config.json); start a new run with another --out"
        )


def train_step(loop, streams, method, amp):
    """One optimizer step: lr and E9's weight from the step, the iteration's losses over the
    micro-batches, backward (DDP averages the gradients over the ranks on the last micro-batch),
    one AdamW step per student."""
    run, device = loop.run, loop.device
    set_lr(run, loop.total_steps)
    weight_e9 = stability_weight(run.step, loop.total_steps)  # E9's lambda(t)
    rng = runtime.rng_state() if loop.layout.accum > 1 else None
    for micro in range(loop.layout.accum):
        # Every rank of a DDP run draws the same dropout masks (same seed, same calls);
        # micro-batch j replays the step's RNG state to draw what rank j of the --accum-process
        # run would.
        if micro:
            runtime.set_rng_state(rng)
        named = {
            n: {k: v.to(device, non_blocking=True) for k, v in next(s).items()}
            for n, s in streams.items()
        }
        batch = co2s.Batch(**named)
        last = micro == loop.layout.accum - 1
        with amp, runtime.syncing(loop.students, sync=last):
            out = co2s.iteration(loop.students, batch, stability_weight=weight_e9, method=method)
            # The students' graphs are disjoint (E8 targets are detached): one backward of the
            # sum gives every student the gradient of its own loss; / accum averages
            # micro-batches as DDP averages ranks.
            run.scaler.scale(sum(out.losses) / loop.layout.accum).backward()
        quality = loop.logs_after(run.step + 1)
        accumulate(loop, co2s.diagnostics(out, batch, method, loop.cfg["fusion"], quality))
    for opt in run.optimizers:
        run.scaler.step(opt)
    run.scaler.update()
    run.step += 1


def after_step(loop, val, amp, pbar):
    """Log, checkpoint, evaluate: each on its own rule (Loop), last.pt before the evaluation, so a
    crash during it loses nothing."""
    run, step = loop.run, loop.run.step
    if loop.logs_after(step):
        log_train(loop, pbar)
    if loop.master and loop.saves_after(step):
        runs.save_checkpoint(run, os.path.join(run.cfg["out"], "last.pt"), keep_previous=True)
    if loop.evaluates_after(step):
        evaluate_and_keep_best(loop, val, amp)


def evaluate_and_keep_best(loop, val, amp):
    """The evaluation of the step, and best.pt. A stop signal during it ends it at the next image
    (runtime.Stopped): last.pt of the step is already written, and the resumed run repeats it."""
    try:
        result = run_eval(loop, val, amp)
    except runtime.Stopped:
        stopped(loop, loop.stop.name)
    if loop.master:
        keep_best(loop, result)


def evaluated(loop):
    """Whether metrics.json records the evaluation of the step the run resumed at."""
    path = os.path.join(loop.cfg["out"], "metrics.json")
    return os.path.isfile(path) and atomic.read_json(path)["last"]["step"] == loop.run.step


def stopped(loop, signal_name):
    """A stop signal: every rank stops after the same step; rank 0 writes last.pt of that step."""
    run, out = loop.run, loop.cfg["out"]
    if loop.master:
        if not loop.saves_after(run.step):  # (already written when the step was a save step)
            runs.save_checkpoint(run, os.path.join(out, "last.pt"), keep_previous=True)
        print(
            f"\nstopped by {signal_name} after step {run.step}; last.pt is written. Continue "
            f"with: python train.py --resume {out} (or the same command with --out {out})",
            flush=True,
        )
    if loop.layout.world > 1:
        dist.destroy_process_group()
    raise SystemExit(runtime.EXIT_STOPPED)


def set_lr(run, total):
    for opt in run.optimizers:
        opt.zero_grad(set_to_none=True)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * poly(run.step, total)


def build_loop(cfg, state, info, layout, device, init=None):
    """The Loop of a new or resumed run: model, one AdamW per student (METHOD.md section 4, step
    8), scaler. Returns (loop, the source of the class embeddings)."""
    model, text_source = (
        (runs.model_from_checkpoint(state), None) if state else new_model(cfg, info, init)
    )
    model.to(device)
    runtime.store_frozen(model, runtime.frozen_dtype(device, cfg["amp"], cfg["frozen_bf16"]))
    if cfg["compile"]:
        runtime.compile_model(model)
    hyper = {k: cfg[k] for k in HYPER}
    optimizers = [
        torch.optim.AdamW(param_groups(s, **hyper), fused=device.type == "cuda")
        for s in model.students
    ]
    fp16 = runtime.amp_dtype(device, cfg["amp"]) == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    run = runs.Run(cfg, spec_of(cfg, len(info.classes)), model, optimizers, scaler, info=info)
    if state:
        for opt, s in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        scaler.load_state_dict(state["scaler"])
        runtime.set_rng_state(state["rng"])
        run.step, run.best = state["step"], best_of(state, cfg["out"])
    students = runtime.replicate(model.students, layout.world)
    return Loop(run, info, layout, device, students), text_source


def best_of(state, out):
    """The best evaluation so far of a resumed run: its checkpoint's, or metrics.json's when that
    one is better (an evaluation that ended after last.pt was written, then a kill)."""
    path, best = os.path.join(out, "metrics.json"), state["best"]
    saved = atomic.read_json(path)["best"] if os.path.isfile(path) else {}
    if saved.get("step", state["step"] + 1) <= state["step"] and saved["miou"] > best["miou"]:
        return saved
    return best


def prepare_data(cfg, info, splits_dir, world):
    """The data on disk (generated, downloaded or already there), the split lists (a resumed run
    reads its own, splits_dir), and a scan of every listed file before the first step."""
    if runtime.is_master():
        ensure(info, cfg["data_root"], download=cfg["download"])
    if world > 1:
        dist.barrier()
    splits = data.make_splits(
        info, cfg["ratio"], cfg["data_root"], splits_dir or cfg["splits"], seed=cfg["seed"]
    )
    if runtime.is_master():
        scan_files(splits, info)
    return splits


def accumulate(loop, logs):
    """Add one micro-batch's diagnostics to the record being built (no host sync)."""
    for k, v in logs.items():
        total, n = loop.window.get(k, (0, 0))
        loop.window[k] = (total + v.detach(), n + 1)


def log_train(loop, pbar):
    """Stop on a non-finite loss, else one log.jsonl record (rank 0) of the means over the steps
    since the last record, with the lr each optimizer group stepped with."""
    step, cfg = loop.run.step, loop.cfg
    vals = {k: round(float(v / n), 5) for k, (v, n) in loop.window.items()}
    loop.window = {}
    if not all(np.isfinite(list(vals.values()))):
        raise SystemExit(
            f"non-finite loss at step {step}: {vals}\nstopped; the last good "
            f"checkpoint ({cfg['out']}/last.pt) is kept. Try a lower --lr or --amp off."
        )
    now, steps = time.time(), step - (step - 1) // cfg["log_every"] * cfg["log_every"]
    if loop.master:
        lrs = {f"lr/{g['name']}": g["lr"] for opt in loop.run.optimizers for g in opt.param_groups}
        record = dict(
            type="train",
            step=step,
            epoch=round(loop.epoch(step), 4),
            **lrs,
            step_s=round((now - loop.t_last) / steps, 4),
            **vals,
        )
        atomic.append_jsonl(os.path.join(cfg["out"], "log.jsonl"), record)
        shown = {k: f"{v:.3f}" for k, v in vals.items() if k.endswith("/loss") or k == "lambda"}
        pbar.set_postfix(shown)
    loop.t_last = now


def run_eval(loop, loader, amp):
    """Sliding-window mIoU of every student and the fusion (eval.py); under DDP each rank takes
    its share of the images and the confusion matrices are summed."""
    run = loop.run
    mats = evaluation.evaluate(run.model, loader, run.cfg["crop"], amp=amp, stop=loop.stop)
    result = {}
    for name, cm in mats.items():
        if loop.layout.world > 1:
            dist.all_reduce(cm.mat)
        result[name] = cm.to_dict(loop.info.classes)
    if loop.master:
        print(f"\nstep {run.step}\n{evaluation.format_table(mats, loop.info.classes)}")
    run.model.train()
    return result


def keep_best(loop, result):
    """Log an evaluation, keep best.pt by --best-by and, under --best-per-student, best_<student>.pt
    by each student's own mIoU (the release's best_clip.pth / best_dinov3.pth: it has no fusion);
    write metrics.json (done: the run ended). Each is a whole checkpoint of the run at its step."""
    run, out, key = loop.run, loop.cfg["out"], loop.cfg["best_by"]
    epoch = round(loop.epoch(run.step), 4)
    atomic.append_jsonl(
        os.path.join(out, "log.jsonl"), dict(type="eval", step=run.step, epoch=epoch, **result)
    )
    per_student = loop.cfg["best_per_student"]
    each = dict(run.best.get("each", {}))  # student -> the miou and step of its best_<name>.pt
    better = [
        s.name
        for s in run.model.students
        if per_student and result[s.name]["miou"] > each.get(s.name, {"miou": -1.0})["miou"]
    ]
    each.update({name: dict(miou=result[name]["miou"], step=run.step) for name in better})
    new_best = result[key]["miou"] > run.best["miou"]
    if new_best:
        run.best = dict(miou=result[key]["miou"], step=run.step, by=key, results=result)
    if per_student:
        run.best["each"] = each
    for name in (["best"] if new_best else []) + [f"best_{n}" for n in better]:
        runs.save_checkpoint(run, os.path.join(out, f"{name}.pt"))
    atomic.write_json(
        os.path.join(out, "metrics.json"),
        dict(
            last=dict(step=run.step, results=result),
            best=run.best,
            best_by=key,
            total=loop.total_steps,
            done=run.step == loop.total_steps,
        ),
    )


def start_run(loop, splits, text_source, fresh):
    """Rank 0, before the first step: the run folder (splits, config.json) and a summary."""
    cfg = loop.cfg
    os.makedirs(cfg["out"], exist_ok=True)
    if fresh:
        data.write_splits(splits, os.path.join(cfg["out"], "splits"))
        open(os.path.join(cfg["out"], "log.jsonl"), "w").close()  # a fresh run, a fresh log
        atomic.write_json(
            os.path.join(cfg["out"], "config.json"),
            dict(cfg, splits_source=splits.source, text_source=text_source, **runs.run_info()),
        )
    print(
        f"run folder: {cfg['out']}\nsplits: {splits.source}: {len(splits.labeled)} labelled / "
        f"{len(splits.unlabeled)} unlabelled / {len(splits.val)} val\n"
        f"{loop.layout.describe()}; {cfg['iters_per_epoch']} iterations per epoch, "
        f"{loop.total_steps} in all, device {loop.device}\n"
        f"hyper-parameters: {cfg['hyper']}; backbone weights that train: {cfg['train_backbone']}"
        f"\n{recipes.summary(cfg)}"
    )
    if text_source:
        print(f"CLIP class embeddings: {text_source}")
    for opt in loop.run.optimizers:
        for g in opt.param_groups:
            n = sum(p.numel() for p in g["params"])
            print(
                f"  group {g['name']:<28} lr {g['initial_lr']:.2e}  wd {g['weight_decay']}  "
                f"params {n:,}"
            )


def finish(loop):
    run, out = loop.run, loop.cfg["out"]
    if loop.master:
        if run.step == loop.total_steps:
            last = atomic.read_json(os.path.join(out, "metrics.json"))["last"]["results"]
            print(
                "\nmIoU (%) at the end: "
                + ", ".join(f"{k} {100 * v['miou']:.2f}" for k, v in last.items())
            )
        print(f"run folder: {out}\ncurves: python -m tools.plot {out}")
    if loop.layout.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    cli(main)
