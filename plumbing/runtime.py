"""plumbing/runtime.py: where and how a run computes: RNG state, DDP, mixed precision, signals.

One process or many: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (`setup_ddp`), and `is_master`
is the one test of "am I rank 0". The one mixed-precision policy of train, eval and the tools
(`amp_dtype`, `autocast`), the two speed levers that leave the arithmetic alone (`compile_model`,
`store_frozen`), the RNG state a resume restores, and the stop signals a cluster sends
(`StopSignals`): the loop stops after the step in hand with last.pt written and exits 75.
"""

import atexit
import contextlib
import multiprocessing
import os
import random
import re
import signal

import numpy as np
import torch
import torch.distributed as dist

from plumbing.errors import UserError

AMP = ("auto", "bf16", "fp16", "off")
EXIT_STOPPED = 75  # stopped by a signal with last.pt written (sysexits' EX_TEMPFAIL: run it again)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def is_master():
    """Rank 0 of a torchrun job, or a single process: the one that prints, logs and saves."""
    return int(os.environ.get("RANK", 0)) == 0


def rng_state():
    """Every generator a step draws from, as tensors and plain numbers only (so that checkpoints
    load with torch.load(weights_only=True), which runs no pickled code)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    keys = torch.from_numpy(keys.astype(np.int64))
    numpy = dict(name=name, keys=keys, pos=int(pos), has_gauss=int(has_gauss), cached=float(cached))
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return dict(torch=torch.get_rng_state(), numpy=numpy, python=random.getstate(), cuda=cuda)


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    n = s["numpy"]  # a dict (since checkpoints load weights_only), or numpy's own tuple (before)
    if isinstance(n, dict):
        n = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    np.random.set_state(n)
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def from_slurm():
    """`srun --ntasks N python train.py` starts N processes without torchrun: each takes its rank,
    the world size and its local rank from SLURM's variables, and the rendezvous from the job's
    first node (MASTER_PORT: the user's, else one derived from the job id), so the N tasks are
    one N-process run, never N runs on one folder."""
    env, tasks = os.environ, int(os.environ.get("SLURM_NTASKS", "1"))
    if "RANK" in env or tasks <= 1 or "SLURM_PROCID" not in env:
        return
    nodes = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", ""))
    # its first host: 'gpu[03-05,09],cpu1' -> 'gpu03'
    if not (m := re.match(r"([^,\[]+)(?:\[([0-9]+)[^\]]*\])?", nodes.strip())):
        raise UserError(
            "srun with several tasks, but SLURM_JOB_NODELIST names no host: run one task per node "
            "with `srun --ntasks-per-node 1 torchrun --nproc_per_node N train.py ...` instead"
        )
    env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", 0)) % 1000))
    host, local = m[1] + (m[2] or ""), env.get("SLURM_LOCALID", "0")
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=str(tasks), LOCAL_RANK=local, MASTER_ADDR=host)


def setup_ddp(device=None):
    """(rank, world, device): torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (or srun: from_slurm);
    without either, one process."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from_slurm()
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


class Replica(torch.nn.parallel.DistributedDataParallel):
    """A student under torch's DistributedDataParallel that still answers to its name. Gradients
    are averaged in buckets while the backward pass runs. find_unused_parameters: some trainable
    weights get no gradient by design (the last CLIP block's q and k: its main path is never
    used, only its value path), and each student runs several forwards before one backward (the
    release wraps its students the same way and calls them three times a step)."""

    @property
    def name(self):
        return self.module.name


def replicate(students, world):
    """The students as the step calls them: each in its DDP wrapper on several processes (the
    wrapper broadcasts rank 0's weights: every rank starts alike), as they are on one."""
    return [Replica(s, find_unused_parameters=True) if world > 1 else s for s in students]


def syncing(students, sync):
    """The context of one micro-batch: on all but the last of a step (sync False) DDP keeps the
    gradients to itself (no_sync), so a step communicates once, as --accum on one process sums."""
    stack = contextlib.ExitStack()
    for s in [s for s in students if isinstance(s, Replica) and not sync]:
        stack.enter_context(s.no_sync())
    return stack


def amp_dtype(device, amp="auto"):
    """The one mixed-precision policy (train, eval, bench), amp one of AMP: on CUDA bf16 ('auto';
    fp16 where the GPU has no bf16, or asked for); fp32 on the CPU (bf16 there is many times slower)
    and with 'off'."""
    if amp not in AMP:
        raise UserError(f"unknown amp {amp!r}; valid: {', '.join(AMP)}")
    if device.type != "cuda" or amp == "off":
        return None
    fp16 = amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported())
    return torch.float16 if fp16 else torch.bfloat16


def frozen_dtype(device, amp, frozen_bf16):
    """The dtype --frozen-bf16 stores the frozen backbone weights in: bf16 where the run autocasts
    to bf16, else None: fp32 runs are unaffected, and so are fp16 runs (a lever not built for them)."""
    return torch.bfloat16 if frozen_bf16 and amp_dtype(device, amp) == torch.bfloat16 else None


def autocast(device, amp="auto"):
    """torch.autocast for amp_dtype(device, amp): disabled (a no-op) where that is fp32."""
    dtype = amp_dtype(device, amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def ignore_stop_signals(worker_id):
    """A loader worker's init: it ignores the stop signals (a cluster sends them to every process
    of the job), since the main process stops after the step in hand and needs its workers until
    then. So that such workers never outlive their parent, whatever ends it (an error, a second
    Ctrl-C, a worker's exception), the parent kills them at exit (kill_workers_at_exit)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _kill_children():
    # multiprocessing's own exit handler would SIGTERM them (ignored) and wait for ever; torch's
    # SIGCHLD handler would turn the first death into an exception here
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    for child in children:
        child.join(5)


def kill_workers_at_exit():
    """Called where loaders with such workers are made: at exit, the process SIGKILLs its
    remaining children (loader workers hold nothing that must be saved). Registered once."""
    atexit.unregister(_kill_children)
    atexit.register(_kill_children)  # atexit runs last-in first: before multiprocessing's


class Stopped(Exception):
    """Raised where work can stop early (an evaluation, at its next image) once a stop signal
    came: the caller writes what it must and exits with EXIT_STOPPED."""


class StopSignals:
    """SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (SLURM's warning before the time limit) ask the loop to
    stop after the current optimizer step; a second Ctrl-C stops at once. `requested()` is the same
    on every rank of a DDP run (the flag is all-reduced), so all ranks stop at the same step. A
    context manager: the previous handlers come back on exit."""

    def __init__(self, world=1, device="cpu"):
        self.world, self.device, self.name, self.previous = world, device, None, {}

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.name == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.name = signal.Signals(signum).name

    def received(self):
        """This process got a stop signal (no collective: every rank of a job gets the signal)."""
        return self.name is not None

    def requested(self):
        if self.world == 1:
            return self.name is not None
        flag = torch.tensor([self.name is not None], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one tiny collective per step
        return bool(flag.item())


def compile_model(model):
    """--compile: torch.compile each student's transformer block function (one graph serves all its
    blocks: their weights are inputs) and its decoder head, with static shapes. So each distinct
    (batch, height, width, grad mode) compiles once: in training the [labelled; weak] and strong
    passes (2 x the micro-batch), the CutMix partners (1 x, no grad) and, for the head, the clean +
    FP batch (3 x); at evaluation the window batch. The rest (embeddings, E1's value path, the
    losses) runs eagerly."""
    for s in model.students:
        s.run_block = torch.compile(s.run_block, dynamic=False)
        s.head.compile(dynamic=False)
    return model


def store_frozen(model, dtype):
    """--frozen-bf16: the frozen matrix weights of the backbones (every Linear and Conv2d none of
    whose parameters trains: with the paper's trainable set, the MLPs, the patch embeddings and
    CLIP's projection) stored in the autocast dtype, so autocast does not cast them at every step.
    Autocast would round them to the same values, so the arithmetic is unchanged; norms, layer
    scales, tokens and position tables stay fp32 (autocast runs their ops in fp32). What trains
    keeps its fp32 master weights. dtype None (frozen_dtype of an fp32 run): nothing changes."""
    for m in (m for s in model.students for m in s.backbone.modules() if dtype is not None):
        frozen = not any(p.requires_grad for p in m.parameters())
        if frozen and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.to(dtype)
    return model
