"""bench.py: how fast is one Co2S step, and how close is it to what the two backbones must cost?

    python bench.py --size tiny --crop 128 --batch 4              # CPU, the demo's setting
    python bench.py --size base --crop 256 --batch 1              # CPU, paper students
    python bench.py --size base --crop 512 --batch 4 --device cuda --amp bf16 --grad-checkpoint

Runs warm-up and timed Co2S steps (co2s.train_step, the same code train.py runs) on synthetic
tensors: no dataset, no download (random-init students of the paper's shapes). Prints one JSON line
and a short table:
  step_s     median seconds of one full step (both students, every loss, both optimizer steps)
  img_per_s  labelled + unlabelled images per second
  floor_s    in the same run, the unavoidable backbone work of one step: per student, forward +
             backward of the backbone alone (same trainable parameters) on [x_l; x_w] and
             [x_s1; x_s2], plus a no-grad forward on the CutMix partners ('partner' mix source)
  ratio      step_s / floor_s: what heads, losses, data movement and bookkeeping add
  peak_mem_mb  CUDA max allocated, else the process's peak RSS
With --eval: sliding-window inference images/s (all students + fusion) on crop-sized images.
"""
import argparse
import json
import resource
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from co2s import train_step
from model import Co2S, build_student, student_names
from train import param_groups, precision

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--size", default="tiny", choices=["tiny", "base"])
p.add_argument("--crop", type=int, default=128)
p.add_argument("--batch", type=int, default=4, help="labelled images per step (the same again unlabelled)")
p.add_argument("--classes", type=int, default=6)
p.add_argument("--students", default="clip,dinov3")
p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
p.add_argument("--mix-source", default="partner", choices=["partner", "rolled"])
p.add_argument("--grad-checkpoint", action="store_true")
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--steps", type=int, default=5)
p.add_argument("--eval", action="store_true", help="also time sliding-window inference")
args = p.parse_args()
device = torch.device(args.device)
if device.type == "cuda" and not torch.cuda.is_available():
    sys.exit("--device cuda: no CUDA device is visible")
torch.manual_seed(0)
cfg = dict(lr=1e-4, weight_decay=0.01, backbone_lr_mult=0.01, head_lr_mult=10.0, amp=args.amp)

# Random-init students of the requested size; the CLIP text embeddings are random unit rows.
kinds = args.students.split(",")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    students = [build_student(k, args.classes, size=args.size, name=n,
                              text=F.normalize(torch.randn(args.classes, 512 if args.size == "base" else 128), dim=-1) if k == "clip" else None)
                for k, n in zip(kinds, student_names(kinds))]
model = Co2S(students).to(device).train()
for s in students:
    s.grad_checkpoint = args.grad_checkpoint
optimizers = [torch.optim.AdamW(param_groups(s, cfg), lr=cfg["lr"]) for s in students]
autocast, scaler = precision(cfg, device)

B, C, N = args.batch, args.crop, args.classes


def unlabelled():
    box = torch.zeros(B, C, C, dtype=torch.bool, device=device)
    box[:, C // 4: C // 2, C // 4: 3 * C // 4] = True
    return dict(img_w=torch.randn(B, 3, C, C, device=device), img_s1=torch.randn(B, 3, C, C, device=device),
                img_s2=torch.randn(B, 3, C, C, device=device), ignore=torch.zeros(B, C, C, dtype=torch.bool, device=device),
                box1=box, box2=box.flip(-1), label=torch.randint(0, N, (B, C, C), device=device))


batch_l = dict(img=torch.randn(B, 3, C, C, device=device), label=torch.randint(0, N, (B, C, C), device=device))
batch_u, batch_mix = unlabelled(), unlabelled() if args.mix_source == "partner" else None


def timed(fn, n):
    times = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def step():
    logs = train_step(students, optimizers, batch_l, batch_u, batch_mix, step=1000, total_steps=1000,
                      autocast=autocast, scaler=scaler, tau=0.0)  # tau 0: every mask is full, the worst case
    return logs["finite"].item()


def floor():
    """The backbone work a step cannot avoid (features() = the backbone alone, blocks up to the last tap)."""
    for s in students:
        with autocast():
            for x in (torch.cat([batch_l["img"], batch_u["img_w"]]), torch.cat([batch_u["img_s1"], batch_u["img_s2"]])):
                sum(f.float().mean() for f in s.features(x)).backward()
            if batch_mix is not None:
                with torch.no_grad():
                    s.features(batch_mix["img_w"])
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)


if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
timed(step, args.warmup)
step_s = timed(step, args.steps)
timed(floor, 1)
floor_s = timed(floor, args.steps)
res = dict(size=args.size, crop=C, batch=f"{B}+{B}", device=device.type,
           amp="fp32" if autocast is not None and device.type == "cpu" or args.amp == "off" else args.amp,
           mix_source=args.mix_source, grad_checkpoint=args.grad_checkpoint, threads=torch.get_num_threads(),
           step_s=round(step_s, 4), img_per_s=round(2 * B / step_s, 2), floor_s=round(floor_s, 4),
           ratio=round(step_s / floor_s, 3))
if args.eval:
    from eval import predict
    model.eval()
    imgs = torch.randn(1, 3, C, C, device=device)
    with autocast():
        res["eval_img_per_s"] = round(1 / timed(lambda: predict(model, imgs, C), args.steps), 2)
res["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
print(json.dumps(res))
for k, v in res.items():
    print(f"  {k:<15} {v}")
