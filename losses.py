"""losses.py: the loss terms of Co2S (METHOD.md E5-E9), each a small pure function.

E5 supervised CE, E6 confidence-masked pseudo-label CE (divided by ALL valid pixels, as UniMatch),
E8 the cross-student stability (co-guidance) term and E9 its cosine ramp-up. E7, the UniMatch
weighting of E5/E6, lives in co2s.py next to the forward passes it weights.

Every statistic that decides a mask (softmax, confidence, thresholds) is computed in fp32 (float64
stays float64: at_least_fp32), whatever autocast the caller runs under. No function here syncs with
the host.
"""

import math

import torch
import torch.nn.functional as F

IGNORE = 255


def at_least_fp32(x):
    """x in float32 at least: bf16 / fp16 go up to fp32, float64 stays float64 (the equivalence
    tests run in float64; `.float()` would round them down). An fp32 tensor is returned as is."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def supervised_loss(logits, labels):
    """E5: cross-entropy over labelled pixels, ignore index 255. logits (B, N, H, W), labels (B, H,
    W).

    Written as sum / count (count clamped to 1) so a crop with no labelled pixel gives 0, not
    NaN."""
    # (B, H, W), 0 on ignore
    ce = F.cross_entropy(at_least_fp32(logits), labels, ignore_index=IGNORE, reduction="none")
    return ce.sum() / (labels != IGNORE).sum().clamp(min=1)


def pseudo_label_loss(logits, pseudo, conf, valid, tau=0.95):
    """E6: sum over valid pixels of [conf >= tau] * CE(logits, pseudo), divided by |valid|.

    The denominator counts ALL valid (non-padding) pixels, not the confident ones: as confidence
    grows during training, the unlabelled loss grows with it (UniMatch's choice)."""
    ce = F.cross_entropy(at_least_fp32(logits), pseudo, reduction="none")  # (B, H, W)
    return (ce * ((conf >= tau) & valid)).sum() / valid.sum().clamp(min=1)


def stability_mask(conf_self, conf_other, tau=0.95):
    """E8 mask for the student owning conf_self: where max(c_self, c_other) >= tau, the
    LOWER-confidence student learns (both on an exact tie). M_self = (h_other & ~h_self) | (h_self &
    h_other & c_other >= c_self), with h = (c >= tau)."""
    h_self, h_other = conf_self >= tau, conf_other >= tau
    return (h_other & ~h_self) | (h_self & h_other & (conf_other >= conf_self))


def stability_loss(logits_self, logits_other, tau=0.95):
    """E8: sum over M_self of sum_c (p_self - stopgrad(p_other))^2 / (C * |M_self|); 0 if M_self is
    empty.

    The gradient flows into logits_self only: logits_other is the detached target. (The released
    code detached logits_self too, so the term never trained anything: pass logits_self.detach()
    to reproduce that.)"""
    p_self = at_least_fp32(logits_self).softmax(1)  # (B, C, H, W)
    p_other = at_least_fp32(logits_other.detach()).softmax(1)
    mask = stability_mask(p_self.detach().amax(1), p_other.amax(1), tau)  # (B, H, W)
    sq = (p_self - p_other).pow(2).sum(1)  # (B, H, W)
    return (sq * mask).sum() / (p_self.shape[1] * mask.sum().clamp(min=1))


def stability_weight(step, total_steps, up_ratio=0.2, peak=0.5):
    """E9: lambda(t) = peak * (1 - cos(pi * t / (T_up - 1))) / 2 for t < T_up = round(up_ratio *
    T), then peak."""
    t_up = round(up_ratio * total_steps)
    if step >= t_up or t_up <= 1:
        return peak
    return peak * (1 - math.cos(math.pi * step / (t_up - 1))) / 2
