"""train.py: one readable Co2S training loop, from `python train.py` (the offline demo) to the paper's recipe.

    python train.py                                    # demo: synthetic data, tiny students, CPU, minutes
    python train.py --dataset potsdam --ratio 1/16     # the paper: two ViT-B/16 students, METHOD.md section 5
    torchrun --nproc_per_node 4 train.py --dataset potsdam --ratio 1/16   # DDP, same script

The loop: set lr (poly) -> the losses of one Co2S iteration (co2s.py) -> backward -> one AdamW step
per student -> log every N steps -> at each epoch end write last.pt, then evaluate (sliding window,
eval.py) and keep best.pt. `--resume RUN_DIR` continues the same run: step counter, lr, optimizer,
RNG and data order. Only rank 0 prints, logs and saves.
Left out on purpose: EMA teachers, schedulers with warmup, multi-crop evaluation (not in the paper).
"""
import argparse
import json
import os
import platform
import random
import subprocess
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import co2s
import data
import eval as evaluation
from catalog import CHOICES, dataset_info, parse_ratio
from download import ensure
from errors import UserError, cli
from model import DEFAULT_WEIGHTS, KINDS, NUMERICS, TRAIN_BACKBONE, build_model, student_names
from text import class_embeddings

# METHOD.md section 5: the paper fine-tunes PRETRAINED ViTs: only their attention trains, and barely (lr x0.01).
PAPER_RECIPE = dict(lr=1e-4, backbone_lr_mult=0.01, head_lr_mult=10.0, train_backbone="attention")
# Students with random weights (the tiny preset, or 'none' weights) learn the whole backbone from scratch.
SCRATCH_RECIPE = dict(lr=5e-4, backbone_lr_mult=0.5, head_lr_mult=1.0, train_backbone="all")
HYPER = ("lr", "weight_decay", "backbone_lr_mult", "head_lr_mult")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # show real defaults only; a None default is explained in the help text
        return action.help if action.default is None else super()._get_help_string(action)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=Help)
    a = p.add_argument
    # data (defaults per dataset come from catalog.DATASETS: crop, epochs, batch, size)
    a("--dataset", default="demo", help="one of: " + ", ".join(CHOICES))
    a("--ratio", default="1/16", help="labelled ratio, 1/16 or 1_16")
    a("--data-root", default=None, help="dataset folder (default: data/<dataset>)")
    a("--download", action="store_true", help="fetch a missing paper dataset from the authors' Hugging Face repository")
    a("--splits", default=None, help="split lists: a folder (paper layout or labeled/unlabeled/val.txt), or 'seeded' "
                                     "for a seeded draw (default: the paper's lists in splits/ for its datasets)")
    a("--crop", type=int, default=None, help="training crop and eval window (default: the dataset's; paper 512, whdld 256)")
    a("--batch", type=int, default=None, help="labelled (and unlabelled) images per GPU per micro-batch (default: the "
                                              "dataset's released batch, 1; whdld 2)")
    a("--accum", type=int, default=1, help="micro-batches per optimizer step: --batch 1 --accum 4 is exactly the "
                                           "released 4-GPU run on one GPU")
    a("--workers", type=int, default=None, help="data loader processes per stream (default: a quarter of the CPU cores, "
                                                 "1 to 4; three streams run at once)")
    # students (E1-E4)
    a("--students", default="clip,dinov3", help="comma list of clip|dinov3: clip,dinov3 (paper), clip,clip, dinov3,dinov3, or one")
    a("--size", default=None, choices=["base", "tiny"], help="ViT-B/16 (the paper) or the tiny CPU preset "
                                                            "(default: the dataset's; tiny for the demo)")
    a("--clip-weights", default=None, help=f"hub id or local folder (base default {DEFAULT_WEIGHTS['clip']}); 'none' = random")
    a("--dinov3-weights", default=None, help=f"hub id or local folder (base default {DEFAULT_WEIGHTS['dinov3']}); 'none' = random")
    a("--clip-guidance", default="text", choices=["text", "queries"], help="ablation: CLIP student with learnable queries instead of text (E2)")
    a("--text-embeddings", default=None, help="precomputed [N, 512] .npy/.pt class embeddings for the CLIP student")
    a("--numerics", default="hf", choices=NUMERICS, help="backbone numerics: the transformers checkpoints as they are "
      "(hf), or as the authors' code ran them (release: exact GELU, LayerNorm eps 1e-6, bf16 RoPE)")
    a("--init", default=None, help="start from the weights of a checkpoint (ours, or a converted release: eval.py "
                                   "--release DIR --save RUN_DIR); its students, size and numerics are used")
    a("--grad-checkpoint", action="store_true", help="recompute the trainable blocks in backward (memory)")
    # method (co2s.py switches)
    a("--method", default="co2s", choices=co2s.METHODS, help="co2s (E5-E8) | unimatch (no E8) | supervised (E5 only)")
    a("--stability", default="grad", choices=co2s.STABILITY, help="E8: grad (paper) | released (authors' code: no gradient) | off")
    a("--tau", type=float, default=0.95, help="confidence threshold of pseudo-labels and stability masks")
    a("--no-fp", action="store_true", help="ablation: drop the feature-perturbation branch (E4)")
    a("--strong-views", type=int, default=2, choices=[1, 2], help="ablation: one strong view instead of two")
    a("--mix-source", default="partner", choices=data.MIX_SOURCES, help="CutMix partners: another unlabelled image "
      "(ours), the same image under another augmentation (the released code), or the batch rolled by one")
    a("--fusion", default="confidence", choices=["confidence", "mean"], help="E10 fusion rule at inference")
    # optimisation (METHOD.md section 5)
    a("--lr", type=float, default=None, help="base lr (default: 1e-4 for pretrained students, 5e-4 from scratch)")
    a("--weight-decay", type=float, default=0.01)
    a("--backbone-lr-mult", type=float, default=None, help="trainable backbone weights (default: 0.01 pretrained, 0.5 scratch)")
    a("--train-backbone", default=None, choices=TRAIN_BACKBONE, help="which backbone weights train: the attention "
      "projections (default for pretrained students, the paper) or all (default from scratch)")
    a("--head-lr-mult", type=float, default=None, help="decoder head (default: 10 pretrained, 1 scratch); queries x1")
    a("--epochs", type=int, default=None, help="one epoch = one pass over the unlabelled list (default: the dataset's; 80, mer 150)")
    a("--iters", type=int, default=None, help="total optimizer steps (overrides --epochs)")
    a("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="CUDA autocast (auto: bf16, else fp16); CPU runs fp32")
    a("--seed", type=int, default=0)
    # run folder
    a("--out", default=None, help="run folder (default: runs/<dataset>-<ratio>-<time>)")
    a("--resume", default=None, help="run folder to continue with its own config (only --iters / --stop-at may change)")
    a("--eval-every", type=int, default=1, help="epochs between evaluations")
    a("--best-by", default="fused", help="student name (or fused) whose mIoU picks best.pt")
    a("--log-every", type=int, default=10)
    a("--save-every", type=int, default=0, help="also write last.pt every N steps (0: only at epoch ends)")
    a("--stop-at", type=int, default=None, help="stop after this step (checkpointed): split a run across jobs")
    a("--device", default=None, help="cuda or cpu (default: cuda if available)")
    args = p.parse_args(argv)
    if args.dataset not in CHOICES:
        p.error(f"--dataset {args.dataset!r} unknown; valid: {', '.join(CHOICES)}")
    kinds = args.students.split(",")
    if not 1 <= len(kinds) <= 2 or any(k not in KINDS for k in kinds):
        p.error(f"--students {args.students!r}: one or two of {', '.join(KINDS)}, comma separated")
    valid_best = student_names(kinds) + ["fused"]
    if args.best_by not in valid_best:
        p.error(f"--best-by {args.best_by!r}; valid for these students: {', '.join(valid_best)}")
    if args.accum < 1 or (args.batch is not None and args.batch < 1):
        p.error("--batch and --accum must be >= 1")
    return args


def resolve(args):
    """The run's config: every flag, with the dataset's defaults and the recipe filled in (config.json)."""
    cfg = vars(args).copy()
    info = dataset_info(args.dataset, args.data_root)
    cfg["data_root"] = args.data_root or os.path.join("data", args.dataset)
    cfg["ratio"] = parse_ratio(args.ratio)
    for k in ("crop", "batch", "epochs", "size"):
        cfg[k] = cfg[k] or getattr(info, k)
    cfg["workers"] = cfg["workers"] if cfg["workers"] is not None else min(4, max(1, (os.cpu_count() or 4) // 4))
    for kind in KINDS:
        w = cfg[f"{kind}_weights"] or (DEFAULT_WEIGHTS[kind] if cfg["size"] == "base" else "none")
        cfg[f"{kind}_weights"] = None if w == "none" else w
    if args.init:   # fine-tuning: the checkpoint decides what the students are
        init = evaluation.read_checkpoint(evaluation.resolve_checkpoint(args.init))["model_args"]
        cfg.update(students=",".join(init["kinds"]), size=init["size"], clip_guidance=init["clip_guidance"],
                   numerics=init["numerics"], clip_weights=None, dinov3_weights=None)
    random_students = not args.init and all(cfg[f"{k}_weights"] is None for k in cfg["students"].split(","))
    recipe = SCRATCH_RECIPE if random_students else PAPER_RECIPE
    cfg["recipe"] = ("scratch: every student has random weights" if random_students else
                     "paper: pretrained students (METHOD.md section 5)")
    for k, v in recipe.items():
        cfg[k] = v if cfg[k] is None else cfg[k]
    cfg["out"] = cfg["out"] or os.path.join("runs", f"{cfg['dataset']}-{cfg['ratio']}-{time.strftime('%Y%m%d-%H%M%S')}")
    return cfg


def model_args(cfg, num_classes):
    """What builds the model (saved in every checkpoint, so eval.py and --resume rebuild it without downloads)."""
    return dict(kinds=cfg["students"].split(","), num_classes=num_classes, size=cfg["size"], numerics=cfg["numerics"],
                clip_guidance=cfg["clip_guidance"], fusion=cfg["fusion"], grad_checkpoint=cfg["grad_checkpoint"],
                train_backbone=cfg["train_backbone"])


def new_model(cfg, info):
    """(model, text source) of a new run: pretrained backbones, and the CLIP student's class embeddings;
    or (--init) the weights of a checkpoint."""
    if cfg["init"]:
        state = evaluation.read_checkpoint(evaluation.resolve_checkpoint(cfg["init"]))
        if state["model_args"]["num_classes"] != len(info.classes):
            raise UserError(f"--init {cfg['init']!r} predicts {state['model_args']['num_classes']} classes, "
                            f"{cfg['dataset']} has {len(info.classes)}")
        model = evaluation.model_from_checkpoint(dict(state, model_args=model_args(cfg, len(info.classes))))
        return model, f"the checkpoint {cfg['init']}"
    kinds, text, source = cfg["students"].split(","), None, None
    if "clip" in kinds and cfg["clip_guidance"] == "text":
        text, source = class_embeddings(info.concepts, size=cfg["size"], clip_weights=cfg["clip_weights"],
                                        file=cfg["text_embeddings"])
    weights = {k: cfg[f"{k}_weights"] for k in KINDS}
    return build_model(**model_args(cfg, len(info.classes)), weights=weights, text=text), source


def param_groups(student, *, lr, weight_decay, backbone_lr_mult, head_lr_mult):
    """Explicit AdamW groups (METHOD.md section 5). In the paper's recipe the only trainable backbone parameters
    are the attention projections and every backbone norm is frozen, so 'no decay on norms outside the head'
    leaves nothing to exempt (from scratch, --train-backbone all, the norms decay too)."""
    groups = [dict(name=f"{student.name}.backbone", lr=lr * backbone_lr_mult,
                   params=[p for p in student.backbone.parameters() if p.requires_grad]),
              dict(name=f"{student.name}.head", lr=lr * head_lr_mult, params=list(student.head.parameters()))]
    if student.queries is not None:
        groups.append(dict(name=f"{student.name}.queries", lr=lr, params=[student.queries.weight]))
    for g in groups:
        g.update(initial_lr=g["lr"], weight_decay=weight_decay)
    return groups


def poly(step, total):
    """The lr factor of step `step` (0-based): (1 - t/T)^0.9, no warmup, with t = step - 1 as released (the
    authors set the lr after each step from the index of the step just taken; step 0 runs at the base lr)."""
    return (1 - max(step - 1, 0) / total) ** 0.9


def average_gradients(params, world):
    """DDP by hand. Not DistributedDataParallel: each student runs several forwards per step (the partner,
    [labelled; weak], the strong views) before one backward, and some parameters get no gradient (the
    last CLIP block's q/k); the wrapper expects one forward per backward and every parameter used.
    Each gradient is all-reduced in place: no second copy of the gradients is held."""
    grads = [p.grad for p in params if p.grad is not None]
    for work in [dist.all_reduce(g, async_op=True) for g in grads]:
        work.wait()
    for g in grads:
        g.div_(world)


def rng_state():
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s):
    torch.set_rng_state(s["torch"]); np.random.set_state(s["numpy"]); random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def run_info(world):
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        git = None
    return dict(versions=dict(python=platform.python_version(), torch=torch.__version__,
                              transformers=__import__("transformers").__version__), git=git, world_size=world)


def setup(args):
    """(rank, world, device): torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without it, one process."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def load_resume(args):
    """(config, state) of the run folder to continue: its own config, except --iters / --stop-at."""
    path = os.path.join(args.resume, "last.pt")
    if not os.path.isfile(path):
        raise UserError(f"--resume {args.resume!r}: no last.pt there (a run folder of train.py holds one after its "
                        f"first epoch, or after --save-every / --stop-at steps)")
    state = evaluation.read_checkpoint(path)
    cfg = {"train_backbone": "attention", **state["cfg"], "resume": args.resume, "stop_at": args.stop_at}  # (older runs)
    cfg["iters"] = args.iters or cfg["iters"]
    return cfg, state


def main(argv=None):
    args = get_args(argv)
    rank, world, device = setup(args)
    master, ddp = rank == 0, world > 1
    cfg, state = load_resume(args) if args.resume else (resolve(args), None)
    out = cfg["out"]
    torch.manual_seed(cfg["seed"]); np.random.seed(cfg["seed"]); random.seed(cfg["seed"])

    info = dataset_info(cfg["dataset"], cfg["data_root"])
    splits = prepare_data(cfg, info, os.path.join(out, "splits") if state else cfg["splits"], master, ddp)
    ipe = data.iters_per_epoch(splits, cfg["batch"], world, cfg["accum"])
    total = cfg["iters"] or cfg["epochs"] * ipe

    # Model, one AdamW per student (METHOD.md section 4, step 8), precision, and a resumed run's state.
    model, text_source = (evaluation.model_from_checkpoint(state), None) if state else new_model(cfg, info)
    model.to(device)
    for t in model.state_dict().values() if ddp else []:
        dist.broadcast(t, 0)  # identical start on every rank
    optimizers = [torch.optim.AdamW(param_groups(s, **{k: cfg[k] for k in HYPER}), fused=device.type == "cuda")
                  for s in model.students]
    amp = evaluation.autocast(device, cfg["amp"])
    scaler = torch.amp.GradScaler(device.type, enabled=evaluation.amp_dtype(device, cfg["amp"]) == torch.float16)
    step, best = restore(state, optimizers, scaler) if state else (0, {"miou": -1.0})
    if master:
        start_run(cfg, out, splits, state, text_source, optimizers, ipe, total, device, world)
    streams = [iter(loader) for loader in data.train_loaders(  # one iterator for the whole run: workers start once
        info, splits, crop=cfg["crop"], batch=cfg["batch"], seed=cfg["seed"], start=step, total=total,
        workers=cfg["workers"], rank=rank, world_size=world, accum=cfg["accum"], mix_source=cfg["mix_source"],
        pin_memory=device.type == "cuda")]
    val = data.val_loader(info, splits, workers=min(cfg["workers"], 2), rank=rank, world_size=world)
    params = [p for p in model.parameters() if p.requires_grad]

    pbar = tqdm(total=total, initial=step, disable=not master, dynamic_ncols=True)
    model.train()
    stop, t_last, window = step >= total, time.time(), {}
    while not stop:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * poly(step, total)
        rng = rng_state() if cfg["accum"] > 1 else None
        for micro in range(cfg["accum"]):
            # Every rank of a DDP run draws the same dropout masks (same seed, same calls); micro-batch j
            # replays the step's RNG state to draw exactly what rank j of the --accum-process run would.
            if micro:
                set_rng_state(rng)
            batches = [{k: v.to(device, non_blocking=True) for k, v in next(s).items()} for s in streams]
            with amp:
                losses, micro_logs = co2s.iteration(model.students, *batches, step=step, total_steps=total, log=(
                    step + 1) % cfg["log_every"] == 0 or step + 1 in (total, cfg["stop_at"]), **method_args(cfg))
            # The students' graphs are disjoint (E8 targets are detached): one backward of the sum gives every
            # student exactly the gradient of its own loss; / accum averages micro-batches as DDP averages ranks.
            scaler.scale(sum(losses) / cfg["accum"]).backward()
            for k, v in micro_logs.items():  # a record: the mean over the micro-batches since the last one (no sync)
                total_k, n = window.get(k, (0, 0))
                window[k] = (total_k + v.detach(), n + 1)
        if ddp:
            average_gradients(params, world)
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
        step += 1
        pbar.update(1)

        stop = step == total or step == cfg["stop_at"]   # the one place that decides when the run ends
        epoch_end = step % ipe == 0 or step == total
        if step % cfg["log_every"] == 0 or stop:
            t_last, window = log_train(out if master else None, window, step, total, ipe, cfg, t_last, pbar), {}
        if master and (epoch_end or stop or (cfg["save_every"] and step % cfg["save_every"] == 0)):
            save_checkpoint(os.path.join(out, "last.pt"), cfg, info, model, optimizers, scaler, step, best)
        if epoch_end and ((step // ipe) % cfg["eval_every"] == 0 or step == total):  # after last.pt: a crash here loses nothing
            result = run_eval(model, val, cfg, info, device, amp, master, ddp, step)
            if master:
                best = keep_best(out, result, cfg, info, model, optimizers, scaler, step, best, ipe, total)
    pbar.close()
    finish(out, step, total, master, ddp)


def prepare_data(cfg, info, splits_dir, master, ddp):
    """The data on disk (generated, downloaded or already there), the split lists (a resumed run reads its
    own), and a scan of every listed file before the first step."""
    if master:
        ensure(info, cfg["data_root"], download=cfg["download"])
    if ddp:
        dist.barrier()
    splits = data.make_splits(info, cfg["ratio"], cfg["data_root"], splits_dir, seed=cfg["seed"])
    if master:
        data.scan_files(splits, info)
    return splits


def method_args(cfg):
    """The co2s.iteration switches of this run."""
    return dict(method=cfg["method"], stability=cfg["stability"], tau=cfg["tau"], fp=not cfg["no_fp"],
                strong_views=cfg["strong_views"], fusion=cfg["fusion"])


def restore(state, optimizers, scaler):
    """Optimizer, scaler and RNG state of a resumed run; (step, best)."""
    for opt, s in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(s)
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state["step"], state["best"]


def save_checkpoint(path, cfg, info, model, optimizers, scaler, step, best):
    """Everything to resume or evaluate the run, written atomically; never NaN weights over a good file."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        return
    evaluation.save_atomic(dict(cfg=cfg, model_args=model_args(cfg, len(info.classes)), step=step, best=best,
                     model=model.state_dict(), rng=rng_state(), optimizers=[o.state_dict() for o in optimizers],
                     scaler=scaler.state_dict()), path)


def log_train(log_dir, window, step, total, ipe, cfg, t_last, pbar):
    """Every --log-every steps: stop on a non-finite loss, else one log.jsonl record (rank 0) of the means over the
    steps since the last record (window: key -> (sum, count)). Returns the time."""
    vals = {k: round(float(v / n), 5) for k, (v, n) in window.items()}
    if not all(np.isfinite(list(vals.values()))):
        raise SystemExit(f"non-finite loss at step {step}: {vals}\nstopped; the last good checkpoint "
                         f"({cfg['out']}/last.pt) is kept. Try a lower --lr or --amp off.")
    now = time.time()
    if log_dir:
        append_jsonl(os.path.join(log_dir, "log.jsonl"), dict(type="train", step=step, epoch=(step - 1) // ipe,
                     lr=cfg["lr"] * poly(step - 1, total), step_s=round((now - t_last) / cfg["log_every"], 4), **vals))
        pbar.set_postfix({k: f"{v:.3f}" for k, v in vals.items() if k.endswith("/loss") or k == "lambda"})
    return now


def keep_best(out, result, cfg, info, model, optimizers, scaler, step, best, ipe, total):
    """Log an evaluation, keep best.pt by --best-by, write metrics.json (done: the run has ended); the best so far."""
    key = cfg["best_by"]
    append_jsonl(os.path.join(out, "log.jsonl"), dict(type="eval", step=step, epoch=step / ipe, **result))
    if result[key]["miou"] > best["miou"]:
        best = dict(miou=result[key]["miou"], step=step, by=key, results=result)
        save_checkpoint(os.path.join(out, "best.pt"), cfg, info, model, optimizers, scaler, step, best)
    write_json(os.path.join(out, "metrics.json"), dict(last=dict(step=step, results=result), best=best, best_by=key,
                                                        total=total, done=step == total))
    return best


def start_run(cfg, out, splits, state, text_source, optimizers, ipe, total, device, world):
    """Rank 0, before the first step: the run folder (splits, config.json) and a summary on the console."""
    os.makedirs(out, exist_ok=True)
    if not state:
        data.write_splits(splits, os.path.join(out, "splits"))
        write_json(os.path.join(out, "config.json"), dict(cfg, splits_source=splits.source, text_source=text_source,
                                                          **run_info(world)))
    print(f"run folder: {out}\nsplits: {splits.source}: {len(splits.labeled)} labelled / {len(splits.unlabeled)} "
          f"unlabelled / {len(splits.val)} val; {ipe} iterations per epoch, {total} in all, device {device}, "
          f"world {world} x accum {cfg['accum']} x batch {cfg['batch']}\nrecipe: {cfg['recipe']}; backbone weights that "
          f"train: {cfg['train_backbone']}")
    if text_source:
        print(f"CLIP class embeddings: {text_source}")
    for opt in optimizers:
        for g in opt.param_groups:
            print(f"  group {g['name']:<28} lr {g['initial_lr']:.2e}  wd {g['weight_decay']}  "
                  f"params {sum(p.numel() for p in g['params']):,}")


def run_eval(model, loader, cfg, info, device, amp, master, ddp, step):
    """Sliding-window mIoU of every student and the fusion (eval.py); under DDP each rank takes its share
    of the images and the confusion matrices are summed."""
    mats = evaluation.evaluate(model, loader, cfg["crop"], len(info.classes), device=device, amp=amp, progress=master)
    result = {}
    for name, cm in mats.items():
        if ddp:
            dist.all_reduce(cm.mat)
        result[name] = cm.to_dict(info.classes)
    if master:
        print(f"\nstep {step}\n{evaluation.format_table(mats, info.classes)}")
    model.train()
    return result


def finish(out, step, total, master, ddp):
    if master:
        if step == total:
            with open(os.path.join(out, "metrics.json")) as f:
                last = json.load(f)["last"]["results"]
            print("\nmIoU (%) at the end: " + ", ".join(f"{k} {100 * v['miou']:.2f}" for k, v in last.items()))
        print(f"run folder: {out}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    cli(main)
