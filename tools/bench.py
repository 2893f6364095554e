"""tools/bench.py: how fast is one Co2S step, how much arithmetic is it, and where does the time go?

    python -m tools.bench --size tiny --crop 128 --batch 2 --train-backbone all   # CPU, the demo's
    python -m tools.bench --size base --crop 256 --batch 1                        # CPU, paper students
    python -m tools.bench --size base --crop 512 --batch 4 --device cuda --amp bf16 [--compile] [--profile]

Runs warm-up and timed steps of the work of one train.py optimizer step with one micro-batch
(co2s.iteration under autocast, backward, one AdamW step per student, fused on CUDA as in train.py)
on synthetic tensors: no dataset, no download, no lr schedule or logging (random-init students of
the paper's shapes). Prints one JSON line and a short table:
  step_s       median seconds of one full step (both students, every loss, both optimizer steps)
  img_per_s    labelled + unlabelled images per second
  tflop        arithmetic of one step (forward + backward), counted by torch's FlopCounterMode
  tflop_s      tflop / step_s: the throughput achieved
  floor_s      in the same run, the unavoidable backbone work of one step: per student, forward +
               backward of the backbone alone (same trainable parameters) on [x_l; x_w] and
               [x_s1; x_s2], plus a no-grad forward on the CutMix partners ('partner' mix source)
  ratio        step_s / floor_s: what heads, losses, data movement and bookkeeping add
  peak_mem_mb  CUDA max allocated, else the process's peak RSS
  compile_s    with --compile: the first step's time over a steady step's (the compilation)
With --eval: sliding-window inference images/s (all students + fusion) on crop-sized images.
With --profile: the top operators of one step by device time (CPU time on a CPU).
"""

import argparse
import json
import resource
import statistics
import time
import warnings

import torch
from torch.profiler import ProfilerActivity
from torch.utils.flop_counter import FlopCounterMode

import co2s
from eval import predict
from model import TRAIN_BACKBONE, ModelSpec, build_model, stand_in_embeddings
from plumbing.runtime import AMP, amp_dtype, autocast, compile_model, frozen_dtype, store_frozen
from train import HYPER, PAPER_RECIPE, number, param_groups

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
pos = number(int, 1)  # argparse types: a number out of range is the user's mistake (exit 2)
p.add_argument("--size", default="tiny", choices=["tiny", "base"])
p.add_argument("--crop", type=number(int, 16), default=128)
p.add_argument("--batch", type=pos, default=4, help="labelled images per step (as many unlabelled)")
p.add_argument("--classes", type=pos, default=6)
p.add_argument("--students", default="clip,dinov3")
p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
p.add_argument("--amp", default="auto", choices=AMP)
mix_help = "'same' costs what 'partner' does"
p.add_argument("--mix-source", default="partner", choices=["partner", "rolled"], help=mix_help)
p.add_argument("--grad-checkpoint", action="store_true")
help_ = "the paper's trainable set, or all of it (train.py's default for random students)"
p.add_argument("--train-backbone", default="attention", choices=TRAIN_BACKBONE, help=help_)
help_ = "torch.compile blocks and heads (train.py --compile); compile time reported apart"
p.add_argument("--compile", action="store_true", help=help_)
help_ = "frozen backbone weights stored in bf16 under bf16 autocast (train.py --frozen-bf16)"
p.add_argument("--frozen-bf16", action="store_true", help=help_)
p.add_argument("--warmup", type=number(int, 0), default=2)
p.add_argument("--steps", type=pos, default=5)
p.add_argument("--eval", action="store_true", help="also time sliding-window inference")
p.add_argument("--profile", action="store_true", help="print the top operators of one step")
args = p.parse_args()
device = torch.device(args.device)
cuda = device.type == "cuda"
if cuda and not torch.cuda.is_available():
    p.error("--device cuda: no CUDA device is visible")
torch.manual_seed(0)

# Random-init students of the requested size; the CLIP class embeddings are the stand-in unit rows.
B, C, N = args.batch, args.crop, args.classes
options = dict(grad_checkpoint=args.grad_checkpoint, train_backbone=args.train_backbone)
with warnings.catch_warnings(action="ignore"):
    spec = ModelSpec(tuple(args.students.split(",")), N, size=args.size, **options)
    text = stand_in_embeddings(N, 512 if args.size == "base" else 128)
    model = build_model(spec, text=text).to(device).train()
store_frozen(model, frozen_dtype(device, args.amp, args.frozen_bf16))
if args.compile:
    compile_model(model)
students = list(model.students)
# the paper's recipe; weight_decay, which it leaves to train.py's default: 0.01
hyper = {k: PAPER_RECIPE.get(k, 0.01) for k in HYPER}
optimizers = [torch.optim.AdamW(param_groups(s, **hyper), fused=cuda) for s in students]
amp = autocast(device, args.amp)
scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device, args.amp) == torch.float16)

image = lambda: torch.randn(B, 3, C, C, device=device)
label = lambda: torch.randint(0, N, (B, C, C), device=device)


def unlabelled():
    box = torch.zeros(B, C, C, dtype=torch.bool, device=device)
    box[:, C // 4 : C // 2, C // 4 : 3 * C // 4] = True
    views = dict(img_w=image(), img_s1=image(), img_s2=image())
    return dict(views, ignore=torch.zeros_like(box), box1=box, box2=box.flip(-1), label=label())


batch_l, batch_u = dict(img=image(), label=label()), unlabelled()
batch = co2s.Batch(batch_l, batch_u, unlabelled() if args.mix_source == "partner" else None)


sync = torch.cuda.synchronize if cuda else lambda: None


def once(fn):
    """Seconds of one call of fn, the device's queue drained before and after."""
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def timed(fn, n, warmup=0):
    """The median seconds of n calls of fn, after `warmup` calls that are not counted."""
    return statistics.median([once(fn) for _ in range(warmup + n)][warmup:])


def step():
    """train.py's optimizer step. tau 0: every pseudo-label and stability mask is full, the worst
    case."""
    model.zero_grad()  # every student's gradients: what the optimizers' zero_grad clears
    with amp:
        out = co2s.iteration(students, batch, stability_weight=0.5, method=co2s.Method(tau=0.0))
    scaler.scale(sum(out.losses)).backward()
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()


def floor():
    """The backbone work a step cannot avoid (features() = the backbone alone, blocks up to the
    last tap)."""
    for s in students:
        with amp:
            for x in ([batch_l["img"], batch_u["img_w"]], [batch_u["img_s1"], batch_u["img_s2"]]):
                sum(f.float().mean() for f in s.features(torch.cat(x))).backward()
            if batch.partner is not None:
                with torch.no_grad():
                    s.features(batch.partner["img_w"])
    model.zero_grad()


if cuda:
    torch.cuda.reset_peak_memory_stats()
first_s = timed(step, 1)  # with --compile: the compilation of the step's shapes
step_s = timed(step, args.steps, args.warmup)
floor_s = timed(floor, args.steps, 1)
with FlopCounterMode(display=False) as counter:
    step()
tflop = counter.get_total_flops() / 1e12
# the run's settings, then its figures, in this order in the JSON line and the table
gpu = torch.cuda.get_device_name() if cuda else "cpu"
precision = str(amp_dtype(device, args.amp) or "fp32").replace("torch.", "")
res = dict(size=args.size, crop=C, batch=f"{B}+{B}", device=gpu, amp=precision)
flags = ("mix_source", "grad_checkpoint", "train_backbone", "compile", "frozen_bf16")
res.update({k: vars(args)[k] for k in flags}, threads=torch.get_num_threads())
res.update(torch=torch.__version__, compile_s=round(first_s - step_s, 2) if args.compile else 0)
res.update(step_s=round(step_s, 4), img_per_s=round(2 * B / step_s, 2), tflop=round(tflop, 3))
res.update(tflop_s=round(tflop / step_s, 2), floor_s=round(floor_s, 4))
res["ratio"] = round(step_s / floor_s, 3)
if args.eval:
    model.eval()
    imgs = torch.randn(1, 3, C, C, device=device)
    with amp:
        res["eval_img_per_s"] = round(1 / timed(lambda: predict(model, imgs, C), args.steps), 2)
    model.train()
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak
res["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mb, 1)
print(json.dumps(res))
print("\n".join(f"  {k:<15} {v}" for k, v in res.items()))
if args.profile:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        once(step)
    key = f"self_{device.type}_time_total"  # CUDA time on CUDA, CPU time on a CPU
    print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60))
