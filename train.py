"""train.py: one readable Co2S training loop, from `python train.py` (the offline demo) to the paper's recipe.

    python train.py                                    # demo: synthetic data, tiny students, CPU, minutes
    python train.py --dataset potsdam --ratio 1/16     # the paper: two ViT-B/16 students, METHOD.md section 5
    torchrun --nproc_per_node 4 train.py --dataset potsdam --ratio 1/16   # DDP, same script

The loop: set lr (poly) -> one Co2S step (co2s.py) -> log every N steps -> at each epoch end evaluate
(sliding window, eval.py) and checkpoint atomically (last.pt, best.pt). `--resume RUN_DIR` continues
the same run: step counter, lr, optimizer, RNG and data order. Only rank 0 prints, logs and saves.
Left out on purpose: EMA teachers, schedulers with warmup, multi-crop evaluation (not in the paper).
"""
import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import eval as evaluation
from co2s import METHODS, STABILITY, train_step
from demo import demo_text_embeddings
from model import DEFAULT_WEIGHTS, KINDS, SIZES, Co2S, build_student, student_names


PAPER_RECIPE = dict(lr=1e-4, backbone_lr_mult=0.01, head_lr_mult=10.0)  # METHOD.md section 5
DEMO_RECIPE = dict(lr=5e-4, backbone_lr_mult=0.5, head_lr_mult=1.0)     # random-init tiny students


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # data (defaults per dataset come from data.DATASETS: crop, epochs, batch)
    a("--dataset", default="demo", help="one of: " + ", ".join(list(data.DATASETS) + ["custom"]))
    a("--ratio", default="1/16", help="labelled ratio, 1/16 or 1_16")
    a("--data-root", default=None, help="default data/<dataset>")
    a("--splits", default=None, help="folder of the paper's split lists (<dir>/<dataset>/<ratio>/labeled.txt ...)")
    a("--crop", type=int, default=None, help="training crop and eval window (paper: 512, whdld 256)")
    a("--batch", type=int, default=None, help="labelled (and unlabelled) images per GPU (released: 1, whdld 2)")
    a("--workers", type=int, default=2)
    # students (E1-E4)
    a("--students", default="clip,dinov3", help="comma list of clip|dinov3: clip,dinov3 (paper), clip,clip, dinov3,dinov3, or one")
    a("--size", default=None, choices=["base", "tiny"], help="ViT-B/16 (paper; default) or the tiny CPU preset (demo default)")
    a("--clip-weights", default=None, help=f"hub id or local folder (base default {DEFAULT_WEIGHTS['clip']}); 'none' = random")
    a("--dinov3-weights", default=None, help=f"hub id or local folder (base default {DEFAULT_WEIGHTS['dinov3']}); 'none' = random")
    a("--clip-guidance", default="text", choices=["text", "queries"], help="ablation: CLIP student with learnable queries instead of text (E2)")
    a("--text-embeddings", default=None, help="precomputed [N, 512] .npy/.pt class embeddings for the CLIP student")
    a("--grad-checkpoint", action="store_true", help="recompute the trainable blocks in backward (memory)")
    # method (co2s.py switches)
    a("--method", default="co2s", choices=METHODS, help="co2s (E5-E8) | unimatch (no E8) | supervised (E5 only)")
    a("--stability", default="grad", choices=STABILITY, help="E8: grad (paper) | released (authors' code: no gradient) | off")
    a("--tau", type=float, default=0.95, help="confidence threshold of pseudo-labels and stability masks")
    a("--no-fp", action="store_true", help="ablation: drop the feature-perturbation branch (E4)")
    a("--strong-views", type=int, default=2, choices=[1, 2])
    a("--mix-source", default="partner", choices=["partner", "rolled"], help="CutMix partners: a second unlabelled stream (paper) or the batch rolled by one")
    a("--fusion", default="confidence", choices=["confidence", "mean"], help="E10 fusion rule at inference")
    # optimisation (METHOD.md section 5)
    a("--lr", type=float, default=None, help="base lr (paper 1e-4; demo 5e-4)")
    a("--weight-decay", type=float, default=0.01)
    a("--backbone-lr-mult", type=float, default=None, help="attention projections (paper 0.01; demo 0.5)")
    a("--head-lr-mult", type=float, default=None, help="decoder head (paper 10; demo 1); class queries x1")
    a("--epochs", type=int, default=None, help="paper: 80 (mer 150); one epoch = one pass over the unlabelled list")
    a("--iters", type=int, default=None, help="total iterations (overrides --epochs)")
    a("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="CUDA autocast (auto: bf16, else fp16); CPU runs fp32")
    a("--seed", type=int, default=0)
    # run folder
    a("--out", default=None, help="run folder (default runs/<dataset>-<ratio>-<time>)")
    a("--resume", default=None, help="run folder to continue with its own config (only --iters / --stop-at may change)")
    a("--eval-every", type=int, default=1, help="epochs between evaluations")
    a("--best-by", default="fused", help="student name (or fused) whose mIoU picks best.pt")
    a("--log-every", type=int, default=10)
    a("--save-every", type=int, default=0, help="also write last.pt every N steps (0: only at epoch ends)")
    a("--stop-at", type=int, default=None, help="stop after this step (checkpointed): split a run across jobs")
    a("--device", default=None, help="cuda or cpu (default: cuda if available)")
    args = p.parse_args(argv)
    if args.dataset not in data.DATASETS and args.dataset != "custom":
        p.error(f"--dataset {args.dataset!r} unknown; valid: {', '.join(list(data.DATASETS) + ['custom'])}")
    kinds = args.students.split(",")
    if not 1 <= len(kinds) <= 2 or any(k not in KINDS for k in kinds):
        p.error(f"--students {args.students!r}: one or two of {', '.join(KINDS)}, comma separated")
    valid_best = student_names(kinds) + ["fused"]
    if args.best_by not in valid_best:
        p.error(f"--best-by {args.best_by!r}; valid for these students: {', '.join(valid_best)}")
    return args


def resolve(args):
    """Fill the dataset-dependent defaults; the result is what config.json records."""
    cfg = vars(args).copy()
    info = data.dataset_info(args.dataset, args.data_root)
    cfg["data_root"] = args.data_root or os.path.join("data", args.dataset)
    cfg["ratio"] = data.parse_ratio(args.ratio)
    cfg["size"] = args.size or ("tiny" if args.dataset == "demo" else "base")
    for k in ("crop", "batch", "epochs"):
        cfg[k] = cfg[k] or getattr(info, k)
    # The paper fine-tunes PRETRAINED ViTs, so the backbone barely moves (lr x0.01). The demo's tiny
    # students start from random weights and must learn their attention from scratch in minutes.
    recipe = DEMO_RECIPE if args.dataset == "demo" else PAPER_RECIPE
    for k, v in recipe.items():
        cfg[k] = v if cfg[k] is None else cfg[k]
    for kind in KINDS:
        w = cfg[f"{kind}_weights"]
        w = w or (DEFAULT_WEIGHTS[kind] if cfg["size"] == "base" else "none")
        cfg[f"{kind}_weights"] = None if w == "none" else w
    cfg["text_embeddings"] = cfg["text_embeddings"] or demo_text_file(cfg)
    return cfg, info


def demo_text_file(cfg):
    """Where the demo keeps the class embeddings of a random-init CLIP student with text guidance, else
    None. A random CLIP text tower maps every prompt to nearly the same vector; the demo stands in for
    a pretrained one with fixed, well-separated class embeddings (demo.demo_text_embeddings)."""
    if (cfg["dataset"] == "demo" and "clip" in cfg["students"].split(",") and cfg["clip_guidance"] == "text"
            and cfg["clip_weights"] is None):
        return os.path.join(cfg["data_root"], f"text_embeddings_{SIZES[cfg['size']].proj}d.npy")
    return None


def build_model(cfg, info, pretrained=True, text=None):
    """The students of cfg (E1-E4) inside the fusion head (E10). pretrained=False skips every download
    (the weights then come from a checkpoint); `text` gives the CLIP class embeddings directly."""
    kinds = cfg["students"].split(",")
    students = []
    for kind, name in zip(kinds, student_names(kinds)):
        guidance = cfg["clip_guidance"] if kind == "clip" else "queries"
        with warnings.catch_warnings():
            if not pretrained:
                warnings.simplefilter("ignore")
            s = build_student(kind, len(info.classes), size=cfg["size"], guidance=guidance, name=name,
                              weights=cfg[f"{kind}_weights"] if pretrained else None,
                              concepts=info.concepts, text_embeddings_file=cfg["text_embeddings"],
                              text=None if text is None else text.get(name))
        s.grad_checkpoint = cfg["grad_checkpoint"]
        students.append(s)
    return Co2S(students, fusion=cfg["fusion"])


def param_groups(student, cfg):
    """Explicit AdamW groups (METHOD.md section 5). The only trainable backbone parameters are the
    attention projections and every backbone norm is frozen, so 'no decay on norms outside the head'
    leaves nothing to exempt."""
    lr, wd = cfg["lr"], cfg["weight_decay"]
    groups = [dict(name=f"{student.name}.backbone.attention", lr=lr * cfg["backbone_lr_mult"], weight_decay=wd,
                   params=[p for p in student.backbone.parameters() if p.requires_grad]),
              dict(name=f"{student.name}.head", lr=lr * cfg["head_lr_mult"], weight_decay=wd,
                   params=list(student.head.parameters()))]
    if student.queries is not None:
        groups.append(dict(name=f"{student.name}.queries", lr=lr, weight_decay=wd, params=[student.queries.weight]))
    for g in groups:
        g["initial_lr"] = g["lr"]
    return groups


def set_lr(optimizers, step, total):
    """Poly schedule (1 - t/T)^0.9, no warmup."""
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * (1 - step / total) ** 0.9


def precision(cfg, device):
    """(autocast factory, GradScaler or None): bf16 on CUDA when supported, else fp16 with a scaler; CPU fp32."""
    if device.type != "cuda" or cfg["amp"] == "off":
        return nullcontext, None
    dtype = torch.bfloat16 if cfg["amp"] == "bf16" or (cfg["amp"] == "auto" and torch.cuda.is_bf16_supported()) else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def save_atomic(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash mid-write never leaves a truncated checkpoint


def rng_state():
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s):
    torch.set_rng_state(s["torch"]); np.random.set_state(s["numpy"]); random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def load_run(path, device="cpu", ckpt=None):
    """(model, info, cfg) from a run folder (best.pt, else last.pt) or a checkpoint file: for eval.py."""
    path = evaluation.resolve_checkpoint(path, ckpt)
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = state["cfg"]
    info = data.dataset_info(cfg["dataset"], cfg["data_root"])
    names = student_names(cfg["students"].split(","))
    text = {n: state["model"][f"students.{i}.text"] for i, n in enumerate(names) if f"students.{i}.text" in state["model"]}
    model = build_model(cfg, info, pretrained=False, text=text)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), info, cfg


def git_revision():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None


def main(argv=None):
    args = get_args(argv)
    # DDP: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without it this is one process.
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = 0, 1
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    master = rank == 0

    if args.resume:  # the run's own config, except where the user asks to go further (--iters/--stop-at)
        if not os.path.isfile(os.path.join(args.resume, "last.pt")):
            sys.exit(f"--resume {args.resume!r}: no last.pt there (a run folder of train.py holds one after its first epoch)")
        state = torch.load(os.path.join(args.resume, "last.pt"), map_location="cpu", weights_only=False)
        cfg = state["cfg"]
        cfg.update(resume=args.resume, stop_at=args.stop_at, iters=args.iters or cfg["iters"])
        info = data.dataset_info(cfg["dataset"], cfg["data_root"])
        out = args.resume
    else:
        state = None
        cfg, info = resolve(args)
        out = cfg["out"] or os.path.join("runs", f"{cfg['dataset']}-{cfg['ratio']}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg["out"] = out
    torch.manual_seed(cfg["seed"]); np.random.seed(cfg["seed"]); random.seed(cfg["seed"])

    # Data: splits (the paper's lists with --splits, else a seeded split), written into the run folder.
    if cfg["dataset"] == "demo" and not os.path.isdir(os.path.join(cfg["data_root"], "images")) and master:
        data.prepare_demo(cfg["data_root"], seed=0)
    stand_in = demo_text_file(cfg)
    if master and stand_in and cfg["text_embeddings"] == stand_in:  # only the demo's own file, never a user's
        demo_text_embeddings(stand_in, len(info.classes), SIZES[cfg["size"]].proj)
    if ddp:
        dist.barrier()
    splits_dir = os.path.join(out, "splits") if state else cfg["splits"]
    splits = data.make_splits(info, cfg["ratio"], cfg["data_root"], splits_dir=splits_dir, seed=cfg["seed"])
    ipe = data.iters_per_epoch(splits, cfg["batch"], world)
    total = cfg["iters"] or cfg["epochs"] * ipe

    model = build_model(cfg, info).to(device)
    if ddp:  # identical start on every rank
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    optimizers = [torch.optim.AdamW(param_groups(s, cfg), lr=cfg["lr"], weight_decay=cfg["weight_decay"]) for s in model.students]
    autocast, scaler = precision(cfg, device)
    step, best = 0, {"miou": -1.0}
    if state:
        model.load_state_dict(state["model"])
        for opt, s in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        step, best = state["step"], state["best"]
        set_rng_state(state["rng"])
    if master:
        os.makedirs(out, exist_ok=True)
        if not state:
            data.write_splits(splits, os.path.join(out, "splits"))
            meta = dict(versions=dict(python=platform.python_version(), torch=torch.__version__,
                                      transformers=__import__("transformers").__version__), git=git_revision(), world_size=world)
            json.dump(dict(cfg, **meta), open(os.path.join(out, "config.json"), "w"), indent=2)
        print(f"run folder: {out}\n{len(splits.labeled)} labelled / {len(splits.unlabeled)} unlabelled / "
              f"{len(splits.val)} val; {ipe} iterations per epoch, {total} in all, device {device}, world {world}")
        for opt in optimizers:
            for g in opt.param_groups:
                print(f"  group {g['name']:<28} lr {g['initial_lr']:.2e}  wd {g['weight_decay']}  "
                      f"params {sum(p.numel() for p in g['params']):,}")
    log_file = open(os.path.join(out, "log.jsonl"), "a") if master else None

    def sync_grads():  # DDP without the wrapper: average the gradients of every trainable tensor
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= world
        for g, f in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(f.view_as(g))

    def checkpoint(name, logs=None):
        if logs is not None and not bool(logs["finite"]):
            return  # never overwrite a good checkpoint with non-finite weights
        if master:
            save_atomic(dict(cfg=cfg, step=step, best=best, model=model.state_dict(), rng=rng_state(),
                             optimizers=[o.state_dict() for o in optimizers],
                             scaler=scaler.state_dict() if scaler else None), os.path.join(out, name))

    def run_eval():
        loader = data.val_loader(info, splits, workers=cfg["workers"], rank=rank, world_size=world)
        mats = evaluation.evaluate(model, loader, cfg["crop"], len(info.classes), device=device, amp=autocast,
                                   progress=master)
        result = {}
        for name, cm in mats.items():
            if ddp:
                dist.all_reduce(cm.mat)
            result[name] = cm.to_dict(info.classes)
            if master:
                print(f"\n[{name}] step {step}\n{cm.table(info.classes)}")
        model.train()
        return result

    pbar = tqdm(total=total, initial=step, disable=not master, dynamic_ncols=True)
    logs, t_last = None, time.time()
    model.train()
    while step < total:
        epoch, it = divmod(step, ipe)
        loaders = data.train_loaders(info, splits, crop=cfg["crop"], batch=cfg["batch"], seed=cfg["seed"], epoch=epoch,
                                     start_iter=it, workers=cfg["workers"], rank=rank, world_size=world,
                                     pin_memory=device.type == "cuda")
        streams = loaders if cfg["mix_source"] == "partner" else loaders[:2]
        for batches in zip(*streams):
            batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in batches]
            bl, bu, bm = (batches + [None])[:3]
            set_lr(optimizers, step, total)
            logs = train_step(list(model.students), optimizers, bl, bu, bm, step=step, total_steps=total,
                              method=cfg["method"], stability=cfg["stability"], tau=cfg["tau"], fp=not cfg["no_fp"],
                              strong_views=cfg["strong_views"], autocast=autocast, scaler=scaler,
                              fusion=cfg["fusion"], log=(step + 1) % cfg["log_every"] == 0,
                              sync_grads=sync_grads if ddp else None)
            step += 1
            pbar.update(1)
            if step % cfg["log_every"] == 0 or step == total:
                vals = {k: round(v.item(), 5) for k, v in logs.items()}
                if not vals.pop("finite"):
                    sys.exit(f"non-finite loss at step {step}: {vals}\nstopped; the last good checkpoint "
                             f"({out}/last.pt) is kept. Try a lower --lr or --amp off.")
                dt, t_last = (time.time() - t_last) / cfg["log_every"], time.time()
                rec = dict(type="train", step=step, epoch=epoch, lr=cfg["lr"] * (1 - (step - 1) / total) ** 0.9,
                           step_s=round(dt, 4), **vals)
                if master:
                    log_file.write(json.dumps(rec) + "\n"); log_file.flush()
                    pbar.set_postfix({k: f"{v:.3f}" for k, v in vals.items() if k.endswith("/loss") or k == "lambda"})
            if cfg["save_every"] and step % cfg["save_every"] == 0:
                checkpoint("last.pt", logs)
            if step == total or step == cfg["stop_at"]:
                break
        epoch_end = step % ipe == 0 or step == total
        if epoch_end and ((step // ipe) % cfg["eval_every"] == 0 or step == total):
            result = run_eval()
            key = cfg["best_by"]
            if master:
                log_file.write(json.dumps(dict(type="eval", step=step, epoch=step / ipe, **result)) + "\n"); log_file.flush()
                if result[key]["miou"] > best["miou"]:
                    best = dict(miou=result[key]["miou"], step=step, by=key, results=result)
                    checkpoint("best.pt", logs)
                metrics = dict(last=dict(step=step, results=result), best=best, best_by=key)
                json.dump(metrics, open(os.path.join(out, "metrics.json"), "w"), indent=2)
        if epoch_end or step == cfg["stop_at"]:
            checkpoint("last.pt", logs)
        if step == cfg["stop_at"]:
            break
    pbar.close()
    if master:
        if step == total:
            last = json.load(open(os.path.join(out, "metrics.json")))["last"]["results"]
            print("\nmIoU (%) at the end: " + ", ".join(f"{k} {100 * v['miou']:.2f}" for k, v in last.items()))
        print(f"run folder: {out}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
