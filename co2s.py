"""co2s.py: one Co2S training iteration (METHOD.md section 4), for a list of students.

Reads top to bottom like the paper: partner pseudo-labels -> CutMix -> joint [labelled; weak] forward
with FP -> [strong1; strong2] forward -> pseudo-labels -> E5-E7 per student -> E8 between students
with the E9 ramp. Every student goes through the SAME lines (a loop), so a change to the method is
made in one place. It returns each student's loss; the backward pass and the optimizer steps
(METHOD.md section 4, step 8: each student its own AdamW) are train.py's, as in nanoGPT.

Switches (keyword arguments, paper defaults; train.py exposes each as a flag):
  method       'co2s' (E5-E8) | 'unimatch' (each student alone, E5-E7) | 'supervised' (E5 only)
  stability    'grad' (paper: gradient into the student side) | 'released' (the authors' code: E8 on
               detached logits, so it is logged but trains nothing) | 'off'
  tau          confidence threshold of the pseudo-labels (E6) and the stability masks (E8)
  fp           the feature-perturbation branch (E4) and its loss
  strong_views 2 (paper) or 1
  batch_mix    a second unlabelled batch of CutMix partners (paper), or None: the same batch rolled
               by one ('rolled'), which reuses the weak predictions and saves a no-grad forward
Left out on purpose: backward, optimizers, mixed precision and DDP (train.py), data (data.py).
"""
import torch

from losses import IGNORE, pseudo_label_loss, stability_loss, stability_weight, supervised_loss
from model import fuse

METHODS = ("co2s", "unimatch", "supervised")
STABILITY = ("grad", "released", "off")


def cutmix(dst, src, box):
    """Paste src into dst inside box (B, H, W) bool: the SAME pixels for images (B, C, H, W) and maps (B, H, W)."""
    return torch.where(box[:, None] if dst.dim() == 4 else box, src, dst)


def confidence(logits):
    """fp32 softmax statistics of detached logits: (probabilities, confidence, argmax label)."""
    probs = logits.detach().float().softmax(1)
    conf, label = probs.max(1)
    return probs, conf, label


def pseudo_label_quality(conf, label, gt, valid, tau):
    """Accuracy of confident pseudo-labels against the (never trained on) ground truth, and coverage."""
    known = valid & (gt != IGNORE)
    confident = known & (conf >= tau)
    acc = ((label == gt) & confident).sum() / confident.sum().clamp(min=1)
    coverage = confident.sum() / known.sum().clamp(min=1)
    return acc, coverage


def iteration(students, batch_l, batch_u=None, batch_mix=None, *, step, total_steps, method="co2s",
              stability="grad", tau=0.95, fp=True, strong_views=2, fusion="confidence", log=False):
    """One Co2S iteration: (losses, logs). losses[k] is student k's loss L_k (E7 + lambda E8), a 0-d tensor
    with its graph; logs is a flat dict of detached 0-d tensors '<student>/<term>' (no host sync here).
    Run it under the caller's autocast: every mask statistic is computed in fp32 anyway (losses.py)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if stability not in STABILITY:
        raise ValueError(f"unknown stability mode {stability!r}; valid: {', '.join(STABILITY)}")
    if strong_views not in (1, 2):
        raise ValueError(f"strong_views must be 1 or 2, got {strong_views}")
    x_l, y_l = batch_l["img"], batch_l["label"]
    n_l = x_l.shape[0]
    logs, losses = {}, []

    if method == "supervised":  # E5 only: no unlabelled image is even loaded onto the device
        for s in students:
            loss = supervised_loss(s(x_l), y_l)
            losses.append(loss)
            logs[f"{s.name}/sup"] = logs[f"{s.name}/loss"] = loss.detach()
        return losses, logs

    x_w, ignore, gt = batch_u["img_w"], batch_u["ignore"], batch_u["label"]
    valid = ~ignore                                                        # (B, H, W) non-padding pixels
    views = [("s1", batch_u["img_s1"], batch_u["box1"]), ("s2", batch_u["img_s2"], batch_u["box2"])][:strong_views]
    mix = batch_mix if batch_mix is not None else {k: v.roll(1, 0) for k, v in batch_u.items()}

    # 1. Partner pseudo-labels p'_k (no grad, eval mode); with 'rolled' they come from step 3 below.
    partner = [None] * len(students)
    if batch_mix is not None:
        with torch.no_grad():
            for k, s in enumerate(students):
                s.eval()
                partner[k] = confidence(s(batch_mix["img_w"]))[1:]        # (conf, label), (B, H, W) each
                s.train()

    # 2. CutMix: paste the partners' strong views into ours, inside the boxes b1, b2.
    x_s = torch.cat([cutmix(x, mix[f"img_{name}"], box) for name, x, box in views])

    weak, terms = [], []
    for k, s in enumerate(students):
        # 3. Joint forward [x_l; x_w] with FP on the weak part only (one backbone pass), then the strong views.
        if fp:
            z, z_fp = s(torch.cat([x_l, x_w]), fp=True, fp_from=n_l)
        else:
            z, z_fp = s(torch.cat([x_l, x_w])), None
        z_l, z_w = z[:n_l], z[n_l:]
        z_s = s(x_s).chunk(strong_views)
        # 4. Pseudo-labels from the student's own detached weak logits; inside box j, the partner's.
        _, conf_w, label_w = confidence(z_w)
        conf_p, label_p = partner[k] if partner[k] is not None else (conf_w.roll(1, 0), label_w.roll(1, 0))
        # 5. E5 + E6 on each mixed strong view and on the FP branch, then E7.
        sup = supervised_loss(z_l, y_l)
        l_s = []
        for (name, _, box), z_sj in zip(views, z_s):
            label_j, conf_j = cutmix(label_w, label_p, box), cutmix(conf_w, conf_p, box)
            valid_j = cutmix(valid, ~mix["ignore"], box)
            l_s.append(pseudo_label_loss(z_sj, label_j, conf_j, valid_j, tau))
            logs[f"{s.name}/{name}"] = l_s[-1].detach()
        l_fp = pseudo_label_loss(z_fp, label_w, conf_w, valid, tau) if fp else z_w.new_zeros(())
        # E7: (L_sup + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2; without FP the strong views take its half.
        w_s = (0.5 if fp else 1.0) / strong_views
        uni = (sup + w_s * sum(l_s) + 0.5 * l_fp) / 2
        weak.append(z_w)
        terms.append(uni)
        logs.update({f"{s.name}/sup": sup.detach(), f"{s.name}/fp": l_fp.detach(),
                     f"{s.name}/conf_ratio": ((conf_w >= tau) & valid).sum() / valid.sum().clamp(min=1)})
        if log:
            logs[f"{s.name}/pl_acc"], logs[f"{s.name}/pl_cov"] = pseudo_label_quality(conf_w, label_w, gt, valid, tau)

    # 6-7. E8 between the two students on their clean weak predictions, weighted by the E9 ramp.
    lam = stability_weight(step, total_steps)
    for k, s in enumerate(students):
        loss = terms[k]
        if method == "co2s" and stability != "off" and len(students) == 2:
            z_self, z_other = weak[k], weak[1 - k]
            sta = stability_loss(z_self if stability == "grad" else z_self.detach(), z_other, tau)
            loss = loss + lam * sta
            logs[f"{s.name}/sta"] = sta.detach()
            logs["lambda"] = torch.tensor(lam)
        logs[f"{s.name}/loss"] = loss.detach()
        losses.append(loss)

    if log and len(students) == 2:  # E10 fused pseudo-labels: the map the fusion head would give
        conf_f, label_f = fuse([z.detach().float().softmax(1) for z in weak], fusion).max(1)
        logs["fused/pl_acc"], logs["fused/pl_cov"] = pseudo_label_quality(conf_f, label_f, gt, valid, tau)
    return losses, logs
