"""--compile and --frozen-bf16 (issue 18), on the CPU at tiny size: the compiled step computes the
eager step's losses and gradients (compared in float64: torch.compile's CPU kernels run it, and
the generated kernels' other summation orders then sit at 1e-14, not at fp32's 1e-3 after a
softmax saturates), its later steps compile nothing new, and frozen weights stored in bf16 give
autocast's own arithmetic."""

import copy

import helpers
import pytest
import torch
import torch._dynamo

import co2s
from model import ModelSpec, build_model, stand_in_embeddings
from plumbing import runtime
from plumbing.runtime import compile_model, store_frozen

N, B, C = 4, 2, 64


def tiny_model(train_backbone="attention"):
    torch.manual_seed(0)
    spec = ModelSpec(("clip", "dinov3"), N, size="tiny", train_backbone=train_backbone)
    return build_model(spec, text=stand_in_embeddings(N, 128)).train()


def batches(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    box = torch.zeros(B, C, C, dtype=torch.bool)
    box[:, 16:40, 8:48] = True

    def unlabelled():
        return dict(
            img_w=torch.randn(B, 3, C, C, generator=g),
            img_s1=torch.randn(B, 3, C, C, generator=g),
            img_s2=torch.randn(B, 3, C, C, generator=g),
            ignore=torch.zeros(B, C, C, dtype=torch.bool),
            box1=box,
            box2=box.flip(-1),
            label=torch.randint(0, N, (B, C, C), generator=g),
        )

    # 2 x B labelled: a supervised step runs the shapes of the [labelled; weak] and strong passes
    labelled = dict(
        img=torch.randn(2 * B, 3, C, C, generator=g),
        label=torch.randint(0, N, (2 * B, C, C), generator=g),
    )
    cast = (lambda d: d) if dtype == torch.float32 else helpers.f64
    return cast(labelled), cast(unlabelled())


def losses_and_grads(model, seed, method, optimizers=()):
    """One train.py step on fixed batches (CutMix partners 'rolled': fewer graphs to compile), in
    the model's dtype."""
    torch.manual_seed(seed)  # the same FP dropout masks on both sides
    model.zero_grad(set_to_none=True)
    dtype = next(model.parameters()).dtype
    out = co2s.iteration(
        list(model.students), co2s.Batch(*batches(seed, dtype)), stability_weight=0.5, method=method
    )
    sum(out.losses).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for opt in optimizers:
        opt.step()
    return torch.stack([loss.detach() for loss in out.losses]), grads


def test_compiled_step_gives_the_eager_losses_and_gradients_and_later_steps_do_not_recompile():
    """In float64 (the students, the batches): inductor's CPU kernels run it, and a generated
    kernel's other order of summation is then rounding at 1e-14 relative, where in fp32 it reached
    2.6e-3 on a key projection near softmax saturation (helpers.F64_BOUND: why 1e-10). Gradients
    are compared on E5 (a labelled batch of 2 x B: the shapes of the co2s passes, so nothing more
    compiles): the pseudo-labels of a random-init student are argmaxes of nearly equal logits, a
    discontinuity that the last bit of rounding may cross even in float64, so co2s gradients are
    compared through their losses (continuous in the logits)."""
    torch._dynamo.reset()
    eager = helpers.float64(tiny_model())
    compiled = compile_model(copy.deepcopy(eager))
    co2s_step, supervised = co2s.Method(tau=0.0), co2s.Method(method="supervised")
    loss_e, _ = losses_and_grads(eager, 1, co2s_step)
    loss_c, _ = losses_and_grads(compiled, 1, co2s_step)  # compiles here
    assert loss_c.dtype == torch.float64
    helpers.assert_close(loss_c, loss_e, what="compiled vs eager co2s losses")
    loss_e, grad_e = losses_and_grads(eager, 2, supervised)
    loss_c, grad_c = losses_and_grads(compiled, 2, supervised)
    helpers.assert_close(loss_c, loss_e, what="compiled vs eager E5 losses")
    helpers.assert_same_gradients(grad_c, grad_e, what="compiled vs eager E5 gradients")
    optimizers = [
        torch.optim.AdamW([p for p in s.parameters() if p.requires_grad], lr=1e-3)
        for s in compiled.students
    ]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompilation raises
        for seed in (3, 4, 5):  # new data, new weights, same shapes
            losses_and_grads(compiled, seed, co2s_step, optimizers)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_frozen_weights_in_bf16_give_autocasts_arithmetic_and_keep_fp32_masters():
    """Autocast casts the fp32 frozen matrices to bf16 at every op; stored in bf16 they enter the
    same kernels with the same bits. This stays in bf16 (it is the point), so the bound is 10x a
    noise floor measured here: the same autocast step at another thread count (helpers)."""
    fp32 = tiny_model()
    lean = store_frozen(copy.deepcopy(fp32), torch.bfloat16)
    for name, p in lean.named_parameters():
        frozen_matrix = not p.requires_grad and (
            ".mlp." in name or "patch_embed" in name or "visual_projection" in name
        )
        assert p.dtype == (torch.bfloat16 if frozen_matrix else torch.float32), name
    assert any(p.dtype == torch.bfloat16 for p in lean.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_a, _ = losses_and_grads(fp32, 1, co2s.Method(tau=0.0))
        loss_b, grad_b = losses_and_grads(lean, 1, co2s.Method(tau=0.0))
        loss_t, _ = helpers.at_threads(
            helpers.other_thread_count(), losses_and_grads, fp32, 1, co2s.Method(tau=0.0)
        )
    floor = (loss_t - loss_a).abs().max()
    bound = helpers.floor_bound(floor, loss_a.abs().max())
    helpers.assert_close(loss_b, loss_a, scale=1.0, bound=bound, what="bf16-stored vs autocast")
    assert all(g.dtype == torch.float32 for g in grad_b.values())  # masters stay fp32


@pytest.mark.parametrize(
    "device,amp,dtype", [("cpu", "auto", None), ("cpu", "bf16", None), ("cuda", "off", None)]
)
def test_frozen_bf16_is_off_wherever_the_run_is_fp32(device, amp, dtype):
    """--frozen-bf16 only applies under bf16 autocast; --amp off and CPU runs keep fp32 weights."""
    assert runtime.frozen_dtype(torch.device(device), amp, True) is dtype
    assert runtime.frozen_dtype(torch.device("cpu"), "auto", False) is None
