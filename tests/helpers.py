"""Short builders for tests: one student or a two-student model from a few keywords; float64 copies
and the bound of the equivalence tests; train.py's flags of a micro run and its torchrun command."""

import itertools
import os
import sys

import torch

import model

# The equivalence tests (two computations of the same quantity: compiled vs eager, windows vs one
# forward, our blocks vs transformers', the release's network vs ours) run in float64, where
# rounding cannot decide them. float64 rounds at 2^-53 = 1.1e-16 relative per operation. The
# longest sums here have ~1e5 terms (a conv weight's gradient over B * N * H * W positions): their
# worst-case error, every rounding adding up, is 1e5 * 1.1e-16 = 1.1e-11 of the magnitudes summed;
# the typical one grows as sqrt(n) (3e-14), and the tests measure 1e-15 to 4e-14. 1e-10 relative
# is ten times that worst case and 1e3 to 1e5 times what is measured, and still six orders below
# the smallest real difference the tests look for (a dropped term, a tap off by one block: > 1e-4).
F64_BOUND = 1e-10

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Where a comparison must stay in fp32 (bf16 autocast; a run of train.py through its fp32 data
# pipeline), its bound is a stated multiple of a noise floor the test measures: the same
# computation at another thread count (another order of the parallel sums), the floor taken as at
# least 4 float32 eps of the compared magnitudes (two thread counts may happen to sum alike).
FP32_EPS = torch.finfo(torch.float32).eps  # 1.2e-7
FLOOR_FACTOR = 10


def other_thread_count():
    """A thread count other than the current one: 1, or 2 where the run is at 1."""
    return 2 if torch.get_num_threads() == 1 else 1


def at_threads(n, fn, *args, **kwargs):
    """fn(*args, **kwargs) with n intra-op threads; the thread count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def floor_bound(floor, scale):
    """The bound of an fp32 comparison: FLOOR_FACTOR times its measured noise floor, the floor at
    least 4 float32 eps of `scale`."""
    return FLOOR_FACTOR * max(float(floor), 4 * FP32_EPS * float(scale))


def float64(module):
    """`module` with its float32 parameters and buffers in float64, in place (the same Parameter
    objects, so optimizers built on them still hold them). bf16 tensors (the release's RoPE
    periods) stay bf16: their rounding is part of the arithmetic compared."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.dtype == torch.float32:
            t.data = t.data.double()
    return module


def f64(x):
    """A float tensor, or a dict of tensors (a batch), in float64; other tensors as they are."""
    if isinstance(x, dict):
        return {k: f64(v) for k, v in x.items()}
    return x.double() if x.is_floating_point() else x


def margin(a, b, *, scale=None, bound=F64_BOUND, what=""):
    """max |a - b| / (bound * scale), scale = max |b| unless given (the size of what was summed,
    for quantities that cancel): < 1 passes. Printed, so that `pytest -s` shows every margin."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    scale = b.abs().max() if scale is None else torch.as_tensor(scale).double()
    m = ((a - b).abs().max() / (bound * scale.clamp(min=1e-300))).item()
    print(f"margin {what}: {m:.2e} of bound {bound:.0e}")
    return m


def assert_close(a, b, *, scale=None, bound=F64_BOUND, what=""):
    m = margin(a, b, scale=scale, bound=bound, what=what)
    assert m < 1, (what, m)


def assert_same_gradients(ga, gb, *, bound=F64_BOUND, what="grad"):
    """Two {name: gradient} dicts agree: each gradient relative to the larger of its own size and
    1e-3 of the whole gradient's. Rounding errors scale with the terms summed, not with what is
    left after they cancel: some gradients are zero in exact arithmetic (the key projections'
    biases: the softmax over keys is shift-invariant; the head's output bias: so is CE over the
    class maps) or nearly so (key weights where the softmax saturates), and their own size is
    rounding noise."""
    assert ga.keys() == gb.keys() and len(ga) > 0
    whole = torch.cat([g.flatten() for g in gb.values()]).double().norm()
    worst = max(
        (ga[n] - gb[n]).double().norm() / torch.maximum(gb[n].double().norm(), 1e-3 * whole)
        for n in gb
    )
    m = (worst / bound).item()
    print(f"margin {what}: {m:.2e} of bound {bound:.0e}")
    assert m < 1, (what, m)


def student(
    kind,
    num_classes,
    *,
    size="tiny",
    weights=None,
    text=None,
    guidance="text",
    numerics="hf",
    train_backbone="attention",
):
    """model.build_student with a ModelSpec of one student (guidance: the CLIP student's)."""
    spec = model.ModelSpec(
        (kind,),
        num_classes,
        size=size,
        numerics=numerics,
        clip_guidance=guidance,
        train_backbone=train_backbone,
    )
    return model.build_student(kind, spec, weights=weights, text=text)


def micro_args(root, out, *extra):
    """train.py's flags of a micro run on `root` (tests' micro_root): 64 px crops, 2 + 2 images a
    step, no loader processes; later flags win."""
    common = ["--data-root", root, "--out", str(out), "--ratio", "1/4", "--crop", "64"]
    return common + ["--batch", "2", "--workers", "0", *extra]


def torchrun_cmd(port, *argv):
    """The command line of `train.py argv` under torchrun: 2 processes on this machine (gloo on
    CPU), meeting at `port` (one port per test, so that tests never meet each other's ranks)."""
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return [*head, "--master_port", str(port), os.path.join(ROOT, "train.py"), *argv]
