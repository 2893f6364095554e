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

from losses import IGNORE, at_least_fp32, pseudo_label_loss, stability_loss, supervised_loss
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
            raise ValueError(f"unknown stability {self.stability!r}; valid: {', '.join(STABILITY)}")
        if self.strong_views not in (1, 2):
            raise ValueError(f"strong_views must be 1 or 2, got {self.strong_views}")


@dataclass
class Batch:
    """One micro-batch of a step, by name (data.train_loaders' streams): the labelled crops
    {'img', 'label'}; the unlabelled views {'img_w', 'img_s1', 'img_s2', 'box1', 'box2', 'ignore',
    'label'} (None for 'supervised'); and the CutMix partners, a second unlabelled batch (None:
    the unlabelled batch rolled by one, 'rolled')."""

    labeled: dict
    unlabeled: dict = None
    partner: dict = None


@dataclass
class StrongView:
    """A strong view after CutMix (step 2): the image, and the box b_j where the partner's pixels
    (and so the partner's pseudo-labels and padding) were pasted."""

    img: torch.Tensor  # (B, 3, H, W)
    box: torch.Tensor  # (B, H, W) bool


@dataclass
class Outcome:
    """What one iteration computed, per student: its loss L_k (with its graph), its terms (E5, E6
    on each strong view and FP, E7's L_uni, E8, L_k), its clean weak logits and their pseudo-labels
    (confidence, label). stability_weight: E9's lambda(t) where E8 ran, else None."""

    names: list
    losses: list
    terms: list
    weak: list
    pseudo: list
    stability_weight: float = None


def cutmix(dst, src, box):
    """Paste src into dst inside box (B, H, W) bool: the SAME pixels for images (B, C, H, W) and
    maps (B, H, W)."""
    return torch.where(box[:, None] if dst.dim() == 4 else box, src, dst)


def confidence(logits):
    """(confidence, argmax label) of detached logits (B, N, H, W): softmax in fp32 at least."""
    return at_least_fp32(logits.detach()).softmax(1).max(1)


@torch.no_grad()
def partner_pseudo_labels(student, x):
    """Step 1: the student's (confidence, label) of the CutMix partners, in eval mode."""
    student.eval()
    out = confidence(student(x))
    student.train()
    return out


def uses_stability(method, n_students):
    """Whether E8 runs: Co2S with its stability term on, between two students."""
    return method.method == "co2s" and method.stability != "off" and n_students == 2


def iteration(students, batch, *, stability_weight, method=Method()):
    """One Co2S iteration on a Batch -> Outcome. stability_weight: lambda(t) of E9
    (losses.stability_weight). Run it under the caller's autocast: every mask statistic is
    computed in fp32 anyway (losses.py)."""
    x_l, y_l = batch.labeled["img"], batch.labeled["label"]
    names = [s.name for s in students]
    if method.method == "supervised":  # E5 only (data.train_loaders loads no unlabelled image)
        losses = [supervised_loss(s(x_l), y_l) for s in students]
        return Outcome(names, losses, [{"sup": sup, "loss": sup} for sup in losses], [], [])

    u = batch.unlabeled
    x_w, valid = u["img_w"], ~u["ignore"]  # (B, H, W) non-padding
    # The CutMix partners: a partner batch, or ('rolled', no partner batch) our own batch rolled
    # by one, whose pseudo-labels are then our own weak ones rolled the same way (step 1 below).
    rolled = batch.partner is None
    mix = {k: v.roll(1, 0) for k, v in u.items()} if rolled else batch.partner
    # 2. CutMix: paste the partners' strong views into ours, inside the boxes b1, b2.
    pasted = lambda j: cutmix(u[f"img_s{j}"], mix[f"img_s{j}"], u[f"box{j}"])
    views = [StrongView(pasted(j), u[f"box{j}"]) for j in range(1, method.strong_views + 1)]
    x_s = torch.cat([v.img for v in views])

    weak, pseudo, terms = [], [], []
    for s in students:
        # 1. Partner pseudo-labels p'_k (no grad, eval mode), or ours rolled.
        partner = None if rolled else partner_pseudo_labels(s, mix["img_w"])
        # 3. Joint forward [x_l; x_w] (FP on the weak part only: one backbone pass), strong views.
        n_l, n = len(x_l), len(x_l) + len(x_w)
        z = s(torch.cat([x_l, x_w]), fp_from=n_l if method.fp else None)
        z_l, z_w, z_fp = z[:n_l], z[n_l:n], z[n:]  # z_fp: the FP logits of the weak views (E4)
        z_strong = s(x_s).chunk(method.strong_views)
        # 4. Pseudo-labels from the student's own detached weak logits; inside box j, the partner's.
        conf_w, label_w = confidence(z_w)
        conf_p, label_p = (conf_w.roll(1, 0), label_w.roll(1, 0)) if rolled else partner
        # 5. E5, and E6 on each mixed strong view and on the FP branch.
        t = {"sup": supervised_loss(z_l, y_l)}
        for j, (z_sj, view) in enumerate(zip(z_strong, views), 1):
            y_hat, c = cutmix(label_w, label_p, view.box), cutmix(conf_w, conf_p, view.box)
            v = cutmix(valid, ~mix["ignore"], view.box)
            t[f"s{j}"] = pseudo_label_loss(z_sj, y_hat, c, v, method.tau)
        if method.fp:
            t["fp"] = pseudo_label_loss(z_fp, label_w, conf_w, valid, method.tau)
        weak.append(z_w)
        pseudo.append((conf_w, label_w))
        terms.append(t)
    # 6-7. E7 per student, and E8 between the two, weighted by E9's lambda(t).
    e8 = uses_stability(method, len(students))
    for k, t in enumerate(terms):
        t.update(student_loss(t, weak[k], weak[1 - k] if e8 else None, stability_weight, method))
    weight = stability_weight if e8 else None
    return Outcome(names, [t["loss"] for t in terms], terms, weak, pseudo, weight)


def student_loss(t, z_self, z_other, stability_weight, method):
    """L_k of one student from its terms t (E5, E6): {'uni': E7, 'sta': E8 towards the other
    student (when z_other is given), 'loss': L_k}. Pure: it edits nothing."""
    # E7: (L_sup + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2; without FP the strong views take its half.
    strong_weight = (0.5 if method.fp else 1.0) / method.strong_views
    strong = sum(t[f"s{j}"] for j in range(1, method.strong_views + 1))
    fp = 0.5 * t["fp"] if method.fp else 0
    uni = (t["sup"] + strong_weight * strong + fp) / 2
    if z_other is None:
        return {"uni": uni, "loss": uni}
    # E8 on the clean weak predictions; 'released': on detached logits, so it trains nothing.
    z_self = z_self if method.stability == "grad" else z_self.detach()
    sta = stability_loss(z_self, z_other, method.tau)
    return {"uni": uni, "sta": sta, "loss": uni + stability_weight * sta}


def pseudo_label_quality(conf, label, gt, valid, tau):
    """Accuracy of confident pseudo-labels against the (never trained on) ground truth, and
    coverage."""
    known = valid & (gt != IGNORE)
    confident = known & (conf >= tau)
    acc = ((label == gt) & confident).sum() / confident.sum().clamp(min=1)
    coverage = confident.sum() / known.sum().clamp(min=1)
    return acc, coverage


def diagnostics(out, batch, method, fusion="confidence", quality=False):
    """What a log record holds about one iteration: a flat dict '<student>/<term>' of detached 0-d
    tensors (no host sync here). Every step: the loss terms (E5, E6, E7's 'uni', E8's 'sta', the
    student loss 'loss'), lambda where E8 ran and the share of confident valid pixels; with
    quality (log steps): the pseudo-labels' accuracy and coverage against the labels of the
    unlabelled images, per student and for the fused map (E10) of two students."""
    logs = {f"{n}/{k}": v.detach() for n, t in zip(out.names, out.terms) for k, v in t.items()}
    if out.stability_weight is not None:
        logs["lambda"] = torch.tensor(out.stability_weight)
    if not out.pseudo:
        return logs
    valid, gt, tau = ~batch.unlabeled["ignore"], batch.unlabeled["label"], method.tau
    for name, (conf, label) in zip(out.names, out.pseudo):
        logs[f"{name}/conf_ratio"] = ((conf >= tau) & valid).sum() / valid.sum().clamp(min=1)
        if quality:
            acc, cov = pseudo_label_quality(conf, label, gt, valid, tau)
            logs[f"{name}/pl_acc"], logs[f"{name}/pl_cov"] = acc, cov
    if quality and len(out.weak) == 2:  # the map the fusion head would give
        probs = [at_least_fp32(z.detach()).softmax(1) for z in out.weak]
        conf_f, label_f = fuse(probs, fusion).max(1)
        acc, cov = pseudo_label_quality(conf_f, label_f, gt, valid, tau)
        logs["fused/pl_acc"], logs["fused/pl_cov"] = acc, cov
    return logs
