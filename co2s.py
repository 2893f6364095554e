"""co2s.py: one Co2S training iteration (METHOD.md section 4), for a list of students.

Reads top to bottom like the paper: partner pseudo-labels -> CutMix -> joint [labelled; weak]
forward with FP -> [strong1; strong2] forward -> pseudo-labels -> E5-E7 per student -> E8 between
students, weighted by the E9 ramp. Every student goes through the SAME lines (a loop), so a change
to the method is made in one place. It returns each student's loss; the backward pass and the
optimizer steps (METHOD.md section 4, step 8: each student its own AdamW) are train.py's, as in
nanoGPT. What is logged about a step (the terms, the confident share, the pseudo-labels' quality
against the never-trained-on labels) is computed afterwards, in one place: `diagnostics`.

The method's switches are one small frozen dataclass, `Method` (paper defaults; train.py exposes
each as a flag). Left out on purpose: backward, optimizers, mixed precision and DDP (train.py), the
schedules of lr and of E9's weight (train.py computes both from the step), data (data.py).
"""
from dataclasses import dataclass

import torch

from losses import IGNORE, pseudo_label_loss, stability_loss, supervised_loss
from model import fuse

METHODS = ("co2s", "unimatch", "supervised")
STABILITY = ("grad", "released", "off")


@dataclass(frozen=True)
class Method:
    """method: 'co2s' (E5-E8) | 'unimatch' (each student alone, E5-E7) | 'supervised' (E5 only).
    stability: 'grad' (paper: gradient into the student side) | 'released' (the authors' code: E8 on
    detached logits, so it is logged but trains nothing) | 'off'. tau: confidence threshold of the
    pseudo-labels (E6) and the stability masks (E8). fp: the feature-perturbation branch (E4) and
    its loss. strong_views: 2 (paper) or 1."""
    method: str = "co2s"
    stability: str = "grad"
    tau: float = 0.95
    fp: bool = True
    strong_views: int = 2

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.stability not in STABILITY:
            raise ValueError(f"unknown stability mode {self.stability!r}; valid: {', '.join(STABILITY)}")
        if self.strong_views not in (1, 2):
            raise ValueError(f"strong_views must be 1 or 2, got {self.strong_views}")


@dataclass
class Outcome:
    """What one iteration computed, per student: its loss L_k (with its graph), its terms (E5, E6 on
    each strong view and FP, E8), its clean weak logits and their pseudo-labels (confidence,
    label)."""
    names: list
    losses: list
    terms: list
    weak: list
    pseudo: list
    stability_weight: float


def cutmix(dst, src, box):
    """Paste src into dst inside box (B, H, W) bool: the SAME pixels for images (B, C, H, W) and
    maps (B, H, W)."""
    return torch.where(box[:, None] if dst.dim() == 4 else box, src, dst)


def confidence(logits):
    """(confidence, argmax label) of detached logits (B, N, H, W), from an fp32 softmax."""
    return logits.detach().float().softmax(1).max(1)


@torch.no_grad()
def partner_pseudo_labels(student, x):
    """Step 1: the student's (confidence, label) of the CutMix partners, in eval mode."""
    student.eval()
    out = confidence(student(x))
    student.train()
    return out


def iteration(students, batch_l, batch_u=None, batch_mix=None, *, stability_weight, method=Method()):
    """One Co2S iteration -> Outcome. stability_weight: lambda(t) of E9 (losses.stability_weight).
    batch_mix: a second unlabelled batch of CutMix partners, or None: the same batch rolled by one
    ('rolled'), which reuses the weak predictions and saves a no-grad forward. Run it under the
    caller's autocast: every mask statistic is computed in fp32 anyway (losses.py)."""
    x_l, y_l = batch_l["img"], batch_l["label"]
    names = [s.name for s in students]
    if method.method == "supervised":  # E5 only: no unlabelled image is even loaded onto the device
        losses = [supervised_loss(s(x_l), y_l) for s in students]
        return Outcome(names, losses, [{"sup": loss} for loss in losses], [], [], stability_weight)

    x_w, valid = batch_u["img_w"], ~batch_u["ignore"]                       # (B, H, W) non-padding
    views = [(batch_u["img_s1"], batch_u["box1"], "img_s1"),
             (batch_u["img_s2"], batch_u["box2"], "img_s2")][:method.strong_views]
    mix = batch_mix if batch_mix is not None else {k: v.roll(1, 0) for k, v in batch_u.items()}

    # 1. Partner pseudo-labels p'_k (no grad, eval mode); with 'rolled' they come from step 4 below.
    partners = [partner_pseudo_labels(s, batch_mix["img_w"]) if batch_mix is not None else None
                for s in students]
    # 2. CutMix: paste the partners' strong views into ours, inside the boxes b1, b2.
    x_s = torch.cat([cutmix(x, mix[key], box) for x, box, key in views])

    weak, pseudo, terms = [], [], []
    for s, partner in zip(students, partners):
        # 3. Joint forward [x_l; x_w] (FP on the weak part only: one backbone pass), strong views.
        n_l = len(x_l)
        if method.fp:
            z, z_fp = s.forward_fp(torch.cat([x_l, x_w]), fp_from=n_l)
        else:
            z, z_fp = s(torch.cat([x_l, x_w])), None
        z_l, z_w = z[:n_l], z[n_l:]
        z_strong = s(x_s).chunk(method.strong_views)
        # 4. Pseudo-labels from the student's own detached weak logits; inside box j, the partner's.
        conf_w, label_w = confidence(z_w)
        conf_p, label_p = partner or (conf_w.roll(1, 0), label_w.roll(1, 0))
        # 5. E5, and E6 on each mixed strong view and on the FP branch.
        t = {"sup": supervised_loss(z_l, y_l)}
        for j, (z_sj, (_, box, _)) in enumerate(zip(z_strong, views), 1):
            t[f"s{j}"] = pseudo_label_loss(z_sj, cutmix(label_w, label_p, box), cutmix(conf_w, conf_p, box),
                                           cutmix(valid, ~mix["ignore"], box), method.tau)
        t["fp"] = pseudo_label_loss(z_fp, label_w, conf_w, valid, method.tau) if method.fp else 0 * t["sup"]
        weak.append(z_w)
        pseudo.append((conf_w, label_w))
        terms.append(t)
    losses = [student_loss(k, terms, weak, stability_weight, method) for k in range(len(students))]
    return Outcome(names, losses, terms, weak, pseudo, stability_weight)


def student_loss(k, terms, weak, stability_weight, method):
    """L_k of student k: E7 on its terms, plus (co2s, two students) lambda(t) E8 towards the other."""
    t = terms[k]
    # E7: (L_sup + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2; without FP the strong views take its half.
    strong_weight = (0.5 if method.fp else 1.0) / method.strong_views
    strong = sum(t[f"s{j}"] for j in range(1, method.strong_views + 1))
    loss_unimatch = (t["sup"] + strong_weight * strong + 0.5 * t["fp"]) / 2
    if method.method != "co2s" or method.stability == "off" or len(weak) != 2:
        return loss_unimatch
    # 6-7. E8 between the two students on their clean weak predictions, weighted by E9's lambda(t).
    z_self = weak[k] if method.stability == "grad" else weak[k].detach()
    t["sta"] = stability_loss(z_self, weak[1 - k], method.tau)
    return loss_unimatch + stability_weight * t["sta"]


def pseudo_label_quality(conf, label, gt, valid, tau):
    """Accuracy of confident pseudo-labels against the (never trained on) ground truth, and
    coverage."""
    known = valid & (gt != IGNORE)
    confident = known & (conf >= tau)
    acc = ((label == gt) & confident).sum() / confident.sum().clamp(min=1)
    coverage = confident.sum() / known.sum().clamp(min=1)
    return acc, coverage


def diagnostics(out, batch_u, method, fusion="confidence", quality=False):
    """What a log record holds about one iteration: a flat dict '<student>/<term>' of detached 0-d
    tensors (no host sync here). Every step: the loss terms, L_k, lambda and the share of confident
    valid pixels; with quality (log steps): the pseudo-labels' accuracy and coverage against the
    labels of the unlabelled images, per student and for the fused map (E10) of two students."""
    logs = {}
    for name, terms, loss in zip(out.names, out.terms, out.losses):
        logs.update({f"{name}/{k}": v.detach() for k, v in terms.items()})
        logs[f"{name}/loss"] = loss.detach()
    if any("sta" in t for t in out.terms):
        logs["lambda"] = torch.tensor(out.stability_weight)
    if not out.pseudo:
        return logs
    valid, gt, tau = ~batch_u["ignore"], batch_u["label"], method.tau
    for name, (conf, label) in zip(out.names, out.pseudo):
        logs[f"{name}/conf_ratio"] = ((conf >= tau) & valid).sum() / valid.sum().clamp(min=1)
        if quality:
            logs[f"{name}/pl_acc"], logs[f"{name}/pl_cov"] = pseudo_label_quality(conf, label, gt,
                                                                                  valid, tau)
    if quality and len(out.weak) == 2:  # the map the fusion head would give
        conf_f, label_f = fuse([z.detach().float().softmax(1) for z in out.weak], fusion).max(1)
        logs["fused/pl_acc"], logs["fused/pl_cov"] = pseudo_label_quality(conf_f, label_f, gt,
                                                                          valid, tau)
    return logs
