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
import contextlib
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
import model
from losses import stability_weight
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
# the flags of the config that build the model (ModelSpec's, besides the students and classes)
SPEC = ("size", "numerics", "clip_guidance", "fusion", "grad_checkpoint", "train_backbone")
# ... and those of co2s.Method, the switches of co2s.iteration (besides fp = not --no-fp)
METHOD = ("method", "stability", "tau", "strong_views")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # real defaults only; a None default is explained
        return action.help if action.default is None else super()._get_help_string(action)


def number(convert, low, strict=False):
    """An argparse type: a number >= low (> low if strict). 0 is a value, not "the default" (a
    flag not given, None, is never checked); NaN is in no range."""

    def parse(text):
        v = convert(text)
        if not (v > low if strict else v >= low):
            raise argparse.ArgumentTypeError(f"{text}: must be {'>' if strict else '>='} {low}")
        return v

    parse.__name__ = convert.__name__  # argparse's "invalid int value: 'x'"
    return parse


# fmt: off
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=Help)
    a, count, whole, rate = p.add_argument, number(int, 1), number(int, 0), number(float, 0)
    flag = argparse.BooleanOptionalAction
    a("--recipe", default="paper", choices=recipes.RECIPES, help="paper: the method as the paper "
      "states it | release: the authors' code as they ran it (METHOD.md section 7; flags win)")
    a("--config", help="a NEW run with the settings of a saved run or export (folder, config.json "
      "or hub id); flags win")
    # data (the defaults per dataset come from plumbing/catalog.py: crop, epochs, batch, size)
    a("--dataset", default="demo", help="one of: " + ", ".join(CHOICES))
    a("--ratio", default="1/16", help="labelled ratio, 1/16 or 1_16")
    a("--data-root", help="dataset folder (default: data/<dataset>)")
    a("--download", action="store_true", help="fetch a missing paper dataset from the hub")
    a("--splits", help="a folder of split lists, or 'seeded' (default: the paper's, in splits/)")
    a("--crop", type=number(int, 16), help="training crop and eval window (default: the dataset's)")
    a("--batch", type=count, help="GLOBAL labelled (and unlabelled) images per step (default: the "
      "release's, 4 = 4 GPUs x 1)")
    a("--accum", type=count, help="micro-batches per step and process (default 1; --accum 4 on one "
      "GPU: the release's 4 processes)")
    a("--workers", type=whole, help="loader processes per stream (default: CPU cores / 4, 1 to 4)")
    # students (E1-E4)
    a("--students", default="clip,dinov3", help="one or two of clip|dinov3, comma separated")
    a("--size", choices=["base", "tiny"], help="ViT-B/16 (paper) or the tiny CPU preset (default: "
      "the dataset's)")
    for kind in model.KINDS:
        extra = "; 'release-init': as the release trains it" if kind == "dinov3" else ""
        a(f"--{kind}-weights", help=f"hub id or folder (base default {DEFAULT_WEIGHTS[kind]}); "
          f"'none' = random{extra}")
    a("--clip-guidance", default="text", choices=["text", "queries"], help="ablation: the CLIP "
      "student with learnable queries instead of text (E2)")
    a("--text-embeddings", help="precomputed [N, 512] .npy/.pt class embeddings")
    a("--numerics", choices=NUMERICS, help="backbone numerics: transformers' (hf, the default) or "
      "the authors' code's (release)")
    a("--init", help="start from a checkpoint's weights, students, size and numerics")
    a("--grad-checkpoint", action="store_true", help="recompute the trainable blocks (memory)")
    a("--compile", action="store_true", help="torch.compile the backbone blocks and the heads")
    a("--frozen-bf16", action="store_true", help="store frozen backbone weights in bf16 (bf16 AMP)")
    # method (co2s.Method)
    a("--method", default="co2s", choices=co2s.METHODS, help="co2s (E5-E8) | unimatch (no E8) "
      "| supervised (E5 only)")
    a("--stability", choices=co2s.STABILITY, help="E8: grad (paper, the default) | released (the "
      "authors' code: no gradient) | off")
    a("--tau", type=float, default=0.95, help="confidence threshold of E6 and E8")
    a("--no-fp", action="store_true", help="ablation: drop the feature-perturbation branch (E4)")
    a("--strong-views", type=int, default=2, choices=[1, 2], help="ablation: one strong view")
    a("--mix-source", choices=data.MIX_SOURCES, help="CutMix partners: another unlabelled image "
      "(partner, the default), the same one again (the release), the batch rolled")
    a("--data-order", choices=data.ORDERS, help="own: a seeded order per stream (the default) | "
      "shared: one for both lists (the release)")
    a("--fusion", default="confidence", choices=model.FUSIONS, help="E10 fusion rule at inference")
    # optimisation (METHOD.md section 5)
    a("--lr", type=number(float, 0, strict=True), help="base lr (default: 1e-4, scratch 5e-4)")
    a("--weight-decay", type=rate, default=0.01)
    a("--backbone-lr-mult", type=rate, help="trainable backbone (default: 0.01, scratch 0.5)")
    a("--train-backbone", choices=model.TRAIN_BACKBONE, help="which backbone weights train "
      "(default: attention, the paper; scratch: all)")
    a("--head-lr-mult", type=rate, help="decoder head (default: 10, scratch 1); queries x1")
    a("--epochs", type=count, help="passes over the unlabelled list (default: the dataset's)")
    a("--iters", type=count, help="total optimizer steps (overrides --epochs)")
    a("--round-iters", action=flag, help="round --iters up to whole epochs (default: release)")
    a("--amp", choices=runtime.AMP, help="CUDA autocast (auto, the default: bf16, else fp16)")
    a("--seed", type=whole, default=0)
    # run folder
    a("--out", help="run folder (default: runs/<dataset>-<ratio>-<time>)")
    a("--resume", help="run folder to continue (only --iters / --stop-at may change)")
    a("--eval-every", type=count, default=1, help="epochs between evaluations")
    a("--best-by", default="fused", help="student name (or fused) whose mIoU picks best.pt")
    a("--best-per-student", action=flag, help="also keep best_<student>.pt, each by its own mIoU "
      "(default: release)")
    a("--log-every", type=count, default=10)
    a("--save-every", type=whole, default=0, help="also write last.pt every N steps (0: epochs)")
    a("--stop-at", type=whole, help="stop after this step (checkpointed)")
    a("--device", help="cuda or cpu (default: cuda if available)")
    args = p.parse_args(argv)
    if args.config:  # the saved run's flags become the defaults: those given here still win
        saved = runs.saved_settings(args.config).items()
        p.set_defaults(**{k: v for k, v in saved if k in vars(args) and k not in FRESH})
        args = p.parse_args(argv)
    if args.dataset not in CHOICES:
        p.error(f"--dataset {args.dataset!r} unknown; valid: {', '.join(CHOICES)}")
    kinds, valid = args.students.split(","), ", ".join(model.KINDS)
    if not 1 <= len(kinds) <= 2 or any(k not in model.KINDS for k in kinds):
        p.error(f"--students {args.students!r}: one or two of {valid}, comma separated")
    if args.best_by not in (names := model.prediction_names(kinds)):
        p.error(f"--best-by {args.best_by!r}; valid for these students: {', '.join(names)}")
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
    cfg.update(data_root=args.data_root or f"data/{args.dataset}", ratio=parse_ratio(args.ratio))
    cfg.update({k: getattr(info, k) for k in ("crop", "batch", "epochs", "size") if not cfg[k]})
    if cfg["workers"] is None:
        cfg["workers"] = min(4, max(1, (os.cpu_count() or 4) // 4))
    switches = recipes.switches(cfg["recipe"], cfg["batch"], world)
    cfg.update({k: v for k, v in {**recipes.PAPER, **switches}.items() if cfg[k] is None})
    for kind in model.KINDS:
        w = cfg[f"{kind}_weights"] or (DEFAULT_WEIGHTS[kind] if cfg["size"] == "base" else "none")
        cfg[f"{kind}_weights"] = None if w == "none" else w
    if init:  # fine-tuning: the checkpoint decides what the students are
        spec = init["model_args"]
        cfg.update({k: spec[k] for k in ("size", "numerics", "clip_guidance")})
        cfg.update(students=",".join(spec["kinds"]), clip_weights=None, dinov3_weights=None)
    scratch = not init and all(cfg[f"{k}_weights"] is None for k in cfg["students"].split(","))
    paper = "paper: METHOD.md section 5's, for students that fine-tune (pretrained, release-init)"
    cfg["hyper"] = "scratch: every student has random weights" if scratch else paper
    hyper = SCRATCH_RECIPE if scratch else PAPER_RECIPE
    cfg.update({k: v for k, v in hyper.items() if cfg[k] is None})
    # epochs counted as the release's DistributedSampler counts them; what the recipe switched, and
    # where the run's value differs from it (a flag given, --init)
    overrides = {k: cfg[k] for k, v in switches.items() if cfg[k] != v}
    cfg.update(epoch_rule="release", recipe_switches=switches, recipe_overrides=overrides)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfg["out"] = cfg["out"] or os.path.join("runs", f"{cfg['dataset']}-{cfg['ratio']}-{stamp}")
    return cfg


def schedule(cfg, lay, n):
    """The config with the schedule's figures (config.json records them): the batch layout,
    steps per epoch (one pass over the n unlabelled images) and the total: --epochs of them, or
    --iters, rounded up to whole epochs under --round-iters as the release does (Co2S.py
    l.243-247: epochs = ceil(iters / steps per epoch), then epochs x steps per epoch)."""
    per_epoch = lay.steps_per_epoch(n)
    if per_epoch == 0:
        raise UserError(f"{n} unlabelled images are fewer than one {lay.describe()}; lower --batch")
    epochs, total = cfg["epochs"], cfg["iters"] or cfg["epochs"] * per_epoch
    if cfg["iters"] and cfg["round_iters"]:
        epochs = math.ceil(cfg["iters"] / per_epoch)
        total = epochs * per_epoch
    sizes = dict(global_batch=lay.global_batch, micro_batch=lay.micro, world_size=lay.world)
    return dict(cfg, epochs=epochs, **sizes, iters_per_epoch=per_epoch, total_iters=total)


def spec_of(cfg, n):
    """What builds the model of n classes (saved in every checkpoint, so eval.py and --resume
    rebuild it)."""
    return model.ModelSpec(tuple(cfg["students"].split(",")), n, **{k: cfg[k] for k in SPEC})


def new_model(cfg, info, init=None):
    """(model, text source) of a new run: pretrained backbones and the CLIP student's class
    embeddings (E2); or the weights of the --init checkpoint's state `init`."""
    n = len(info.classes)
    spec = spec_of(cfg, n)
    if init and (m := init["model_args"]["num_classes"]) != n:
        raise UserError(f"--init {cfg['init']!r} predicts {m} classes, {cfg['dataset']} has {n}")
    if init:
        state = dict(init, model_args=dataclasses.asdict(spec))
        return runs.model_from_checkpoint(state), f"the checkpoint {cfg['init']}"
    text, source = None, None
    if "clip" in spec.kinds and cfg["clip_guidance"] == "text":
        where = dict(clip_weights=cfg["clip_weights"], file=cfg["text_embeddings"])
        text, source = model.class_embeddings(info.concepts, size=cfg["size"], **where)
    weights = {k: cfg[f"{k}_weights"] for k in model.KINDS}
    return model.build_model(spec, weights=weights, text=text), source


def param_groups(student, *, lr, weight_decay, backbone_lr_mult, head_lr_mult):
    """Explicit AdamW groups (METHOD.md section 5). In the paper's recipe the only trainable
    backbone parameters are the attention projections and every backbone norm is frozen, so 'no
    decay on norms outside the head' leaves nothing to exempt (from scratch, --train-backbone all,
    the norms decay too)."""
    backbone = [p for p in student.backbone.parameters() if p.requires_grad]
    head = list(student.head.parameters())
    parts = [("backbone", lr * backbone_lr_mult, backbone), ("head", lr * head_lr_mult, head)]
    if student.queries is not None:  # the learnable queries (--clip-guidance queries): lr x1
        parts.append(("queries", lr, [student.queries.weight]))
    # (group, its lr, its parameters); initial_lr: the base of the poly schedule (train_step)
    return [
        dict(name=f"{student.name}.{g}", lr=r, initial_lr=r, weight_decay=weight_decay, params=ps)
        for g, r, ps in parts
    ]


def poly(step, total):
    """The lr factor of step `step` (0-based): (1 - t/T)^0.9, no warmup, with t = step - 1 as
    released (the authors set the lr after each step from the index of the step just taken; step
    0: the base lr)."""
    return (1 - max(step - 1, 0) / total) ** 0.9


@dataclasses.dataclass
class Loop:
    """The training loop's state: the run (runs.Run: config, model, optimizers, scaler, step,
    best, dataset info), its batch layout and where it computes; each rule of the loop written
    once below."""

    run: runs.Run
    layout: BatchLayout
    device: torch.device
    students: list = None  # as the step calls them: in their DDP wrappers on several processes
    window: dict = dataclasses.field(default_factory=dict)  # log key -> the micro-batches' values
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
        every = self.cfg["iters_per_epoch"] * self.cfg["eval_every"]
        return step == self.total_steps or step % every == 0


def main(argv=None):
    args = get_args(argv)
    rank, world, device = runtime.setup_ddp(args.device)
    # a new run, the same command again on its folder (a requeued job continues), or --resume
    if args.resume:  # it continues with its own config: a flag that would change it is an error
        runs.check_resume_flags(args, vars(get_args([])))  # (--init among them)
    init = runs.read_checkpoint(runs.resolve_checkpoint(args.init)) if args.init else None
    command = "python train.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    cfg = None if args.resume else dict(resolve(args, init, world), command=command)
    # the config, the state to resume or None, the lock of the run folder (rank 0's)
    out = args.resume or cfg["out"]
    cfg, state, lock = runs.open_run(out, cfg, args.iters, args.stop_at, world, rank)
    # the folder's lock is released however the run ends (a kill -9: by the kernel)
    with lock or contextlib.nullcontext():
        run_training(cfg, state, init, rank, world, device)


def run_training(cfg, state, init, rank, world, device):
    """main's work once the run folder is decided and locked: the data, the model, the loop."""
    # how the global batch splits over the processes and --accum: one that does not fails at once;
    # pad: epochs counted as the release counts them (runs older than that rule drop the remainder)
    layout = BatchLayout(cfg["batch"], world, cfg["accum"], rank, cfg["epoch_rule"] == "release")
    for seed in (torch.manual_seed, np.random.seed, random.seed):
        seed(cfg["seed"])
    info = dataset_info(cfg["dataset"], cfg["data_root"])
    if rank == 0:  # the data on disk: generated, downloaded or already there
        ensure(info, cfg["data_root"], download=cfg["download"])
    if world > 1:
        dist.barrier()
    # the split lists (a resumed run reads its own), and a scan of every listed file
    where = os.path.join(cfg["out"], "splits") if state else cfg["splits"]
    splits = data.make_splits(info, cfg["ratio"], cfg["data_root"], where, seed=cfg["seed"])
    if rank == 0:
        scan_files(splits, info)
    cfg = schedule(cfg, layout, len(splits.unlabeled))  # the config is final from here on
    loop, text_source = build_loop(cfg, state, info, layout, device, init)
    run, total = loop.run, loop.total_steps
    if loop.master:
        best = len(run.model.students) if cfg["best_per_student"] else 0
        runs.check_room(cfg["out"], run.model, copies=3 + best)
        start_run(loop, splits, text_source, fresh=state is None)
    method = co2s.Method(**{k: cfg[k] for k in METHOD}, fp=not cfg["no_fp"])
    amp = runtime.autocast(device, cfg["amp"])
    pin, order = device.type == "cuda", cfg["data_order"]
    streams = data.Streams(cfg["crop"], cfg["seed"], cfg["mix_source"], cfg["workers"], pin, order)
    steps = range(run.step, total)  # one sampler for the run: workers start once
    loaders = data.train_loaders(info, splits, layout, streams, steps, method.method)
    to_device = lambda batch: {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    streams = {name: map(to_device, loader) for name, loader in loaders.items()}  # batches there
    workers = min(cfg["workers"], 2)
    val = data.val_loader(info, splits.val, workers=workers, rank=rank, world_size=world)

    pbar = tqdm(total=total, initial=run.step, disable=not loop.master, dynamic_ncols=True)
    run.model.train()
    with runtime.StopSignals(world, device) as stop:
        loop.stop = stop
        if state and loop.evaluates_after(run.step) and not runs.evaluated(cfg["out"], run.step):
            evaluate(loop, val, amp)  # stopped during it: the evaluation again
        while run.step < total and run.step != cfg["stop_at"]:
            train_step(loop, streams, method, amp)
            pbar.update(1)
            # log, checkpoint, evaluate: each on its own rule (Loop), last.pt before the
            # evaluation, so a crash during it loses nothing
            if loop.logs_after(run.step):
                log_train(loop, pbar)
            if loop.master and loop.saves_after(run.step):
                save_last(loop)
            if loop.evaluates_after(run.step):
                evaluate(loop, val, amp)
            if stop.requested() and run.step < total:  # a finished run just ends
                stopped(loop, stop.name)
    pbar.close()
    finish(loop)


def train_step(loop, streams, method, amp):
    """One optimizer step: lr and E9's weight from the step, the iteration's losses over the
    micro-batches, backward (DDP averages the gradients over the ranks on the last micro-batch),
    one AdamW step per student."""
    run, accum = loop.run, loop.layout.accum
    for opt in run.optimizers:  # this step's lr (poly), and no gradient yet
        opt.zero_grad(set_to_none=True)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * poly(run.step, loop.total_steps)
    weight_e9 = stability_weight(run.step, loop.total_steps)  # E9's lambda(t)
    rng = runtime.rng_state() if accum > 1 else None
    for micro in range(accum):
        # Every rank of a DDP run draws the same dropout masks (same seed, same calls);
        # micro-batch j replays the step's RNG state to draw what rank j of the --accum-process
        # run would.
        if micro:
            runtime.set_rng_state(rng)
        batch = co2s.Batch(**{name: next(s) for name, s in streams.items()})
        with amp, runtime.syncing(loop.students, sync=micro == accum - 1):
            out = co2s.iteration(loop.students, batch, stability_weight=weight_e9, method=method)
            # The students' graphs are disjoint (E8 targets are detached): one backward of the
            # sum gives every student the gradient of its own loss; / accum averages
            # micro-batches as DDP averages ranks.
            run.scaler.scale(sum(out.losses) / accum).backward()
        quality = loop.logs_after(run.step + 1)  # (a log step: the pseudo-labels' quality too)
        # kept for the next log record (no host sync)
        for k, v in co2s.diagnostics(out, batch, method, loop.cfg["fusion"], quality).items():
            loop.window.setdefault(k, []).append(v.detach())
    for opt in run.optimizers:
        run.scaler.step(opt)
    run.scaler.update()
    run.step += 1


def save_last(loop):
    runs.save_checkpoint(loop.run, os.path.join(loop.cfg["out"], "last.pt"), keep_previous=True)


def evaluate(loop, val, amp):
    """Sliding-window mIoU of every student and the fusion (eval.py), then best.pt (rank 0); under
    DDP each rank takes its share of the images and the confusion matrices are summed. A stop
    signal during it ends it at the next image (runtime.Stopped): last.pt of the step is already
    written, and the resumed run repeats it."""
    run, classes = loop.run, loop.run.info.classes
    try:
        mats = evaluation.evaluate(run.model, val, run.cfg["crop"], amp=amp, stop=loop.stop)
    except runtime.Stopped:
        stopped(loop, loop.stop.name)
    if loop.layout.world > 1:
        for cm in mats.values():
            dist.all_reduce(cm.mat)
    run.model.train()
    if loop.master:
        print(f"\nstep {run.step}\n{evaluation.format_table(mats, classes)}")
        keep_best(loop, {name: cm.to_dict(classes) for name, cm in mats.items()})


def stopped(loop, signal_name):
    """A stop signal: every rank stops after the same step; rank 0 writes last.pt of that step."""
    run, out = loop.run, loop.cfg["out"]
    if loop.master:
        if not loop.saves_after(run.step):  # (already written when the step was a save step)
            save_last(loop)
        print(
            f"\nstopped by {signal_name} after step {run.step}; last.pt is written. Continue "
            f"with: python train.py --resume {out} (or the same command with --out {out})",
            flush=True,
        )
    if loop.layout.world > 1:
        dist.destroy_process_group()
    raise SystemExit(runtime.EXIT_STOPPED)


def build_loop(cfg, state, info, layout, device, init=None):
    """The Loop of a new or resumed run: model, one AdamW per student (METHOD.md section 4, step
    8), scaler. Returns (loop, the source of the class embeddings)."""
    net, source = (runs.model_from_checkpoint(state), None) if state else new_model(cfg, info, init)
    net.to(device)
    runtime.store_frozen(net, runtime.frozen_dtype(device, cfg["amp"], cfg["frozen_bf16"]))
    if cfg["compile"]:
        runtime.compile_model(net)
    hyper, fused = {k: cfg[k] for k in HYPER}, device.type == "cuda"
    optimizers = [torch.optim.AdamW(param_groups(s, **hyper), fused=fused) for s in net.students]
    fp16 = runtime.amp_dtype(device, cfg["amp"]) == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    run = runs.Run(cfg, spec_of(cfg, len(info.classes)), net, optimizers, scaler, info=info)
    if state:
        runs.restore(run, state)
    return Loop(run, layout, device, runtime.replicate(net.students, layout.world)), source


def log_train(loop, pbar):
    """Stop on a non-finite loss, else one log.jsonl record (rank 0) of the means over the steps
    since the last record, with the lr each optimizer group stepped with."""
    step, cfg = loop.run.step, loop.cfg
    vals = {k: round(float(sum(v) / len(v)), 5) for k, v in loop.window.items()}
    loop.window = {}
    if not all(np.isfinite(list(vals.values()))):
        raise SystemExit(
            f"non-finite loss at step {step}: {vals}\nstopped; the last good "
            f"checkpoint ({cfg['out']}/last.pt) is kept. Try a lower --lr or --amp off."
        )
    now, steps = time.time(), step - (step - 1) // cfg["log_every"] * cfg["log_every"]
    if loop.master:
        lrs = {f"lr/{g['name']}": g["lr"] for opt in loop.run.optimizers for g in opt.param_groups}
        timing = dict(step_s=round((now - loop.t_last) / steps, 4))
        record = dict(type="train", step=step, epoch=round(loop.epoch(step), 4), **lrs, **timing)
        atomic.append_jsonl(os.path.join(cfg["out"], "log.jsonl"), dict(record, **vals))
        shown = {k: f"{v:.3f}" for k, v in vals.items() if k.endswith("/loss") or k == "lambda"}
        pbar.set_postfix(shown)
    loop.t_last = now


def keep_best(loop, result):
    """Log an evaluation, keep best.pt by --best-by and, under --best-per-student, best_<student>.pt
    by each student's own mIoU (the release's best_clip.pth / best_dinov3.pth: it has no fusion);
    write metrics.json (done: the run ended). Each is a whole checkpoint of the run at its step."""
    run, out, key = loop.run, loop.cfg["out"], loop.cfg["best_by"]
    record = dict(type="eval", step=run.step, epoch=round(loop.epoch(run.step), 4), **result)
    atomic.append_jsonl(os.path.join(out, "log.jsonl"), record)
    each = dict(run.best.get("each", {}))  # student -> the miou and step of its best_<name>.pt
    names = [s.name for s in run.model.students] if loop.cfg["best_per_student"] else []
    better = [n for n in names if result[n]["miou"] > each.get(n, {"miou": -1.0})["miou"]]
    each.update({name: dict(miou=result[name]["miou"], step=run.step) for name in better})
    if new_best := result[key]["miou"] > run.best["miou"]:
        run.best = dict(miou=result[key]["miou"], step=run.step, by=key, results=result)
    if names:  # --best-per-student
        run.best["each"] = each
    for name in (["best"] if new_best else []) + [f"best_{n}" for n in better]:
        runs.save_checkpoint(run, os.path.join(out, f"{name}.pt"))
    last, done = dict(step=run.step, results=result), run.step == loop.total_steps
    metrics = dict(last=last, best=run.best, best_by=key, total=loop.total_steps, done=done)
    atomic.write_json(os.path.join(out, "metrics.json"), metrics)


def start_run(loop, splits, text_source, fresh):
    """Rank 0, before the first step: the run folder (splits, config.json) and a summary."""
    cfg, out = loop.cfg, loop.cfg["out"]
    os.makedirs(out, exist_ok=True)
    if fresh:
        data.write_splits(splits, os.path.join(out, "splits"))
        open(os.path.join(out, "log.jsonl"), "w").close()  # a fresh run, a fresh log
        saved = dict(cfg, splits_source=splits.source, text_source=text_source, **runs.run_info())
        atomic.write_json(os.path.join(out, "config.json"), saved)
    print(
        f"run folder: {out}\nsplits: {splits.source}: {len(splits.labeled)} labelled / "
        f"{len(splits.unlabeled)} unlabelled / {len(splits.val)} val\n{loop.layout.describe()}; "
        f"{cfg['iters_per_epoch']} iterations per epoch, {loop.total_steps} in all, device "
        f"{loop.device}\nhyper-parameters: {cfg['hyper']}; backbone weights that train: "
        f"{cfg['train_backbone']}\n{recipes.summary(cfg)}"
    )
    if text_source:
        print(f"CLIP class embeddings: {text_source}")
    for g in (g for opt in loop.run.optimizers for g in opt.param_groups):
        n, lr = sum(p.numel() for p in g["params"]), g["initial_lr"]
        print(f"  group {g['name']:<28} lr {lr:.2e}  wd {g['weight_decay']}  params {n:,}")


def finish(loop):
    out = loop.cfg["out"]
    if loop.master:
        if loop.run.step == loop.total_steps:
            last = atomic.read_json(os.path.join(out, "metrics.json"))["last"]["results"]
            mious = ", ".join(f"{k} {100 * v['miou']:.2f}" for k, v in last.items())
            print(f"\nmIoU (%) at the end: {mious}")
        print(f"run folder: {out}\ncurves: python -m tools.plot {out}")
    if loop.layout.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    cli(main)
