"""co2s.py: one Co2S iteration (METHOD.md section 4) on two tiny students and a fixed 2+2 batch at 64 px."""

import copy

import helpers
import pytest
import torch

import co2s
import model
from losses import IGNORE, pseudo_label_loss, stability_loss, stability_weight, supervised_loss
from model import stand_in_embeddings
from plumbing import weights

N, PX, NL = 6, 64, 2  # classes, crop, labelled images per batch
NAMES = ["impervious_surface", "building", "low_vegetation", "tree", "car", "clutter"]
COLOURS = (
    torch.rand(N, 3, generator=torch.Generator().manual_seed(5)) * 4 - 2
)  # one colour per class


@pytest.fixture(scope="module")
def students():
    torch.manual_seed(0)
    return [
        helpers.student(
            "clip", N, size="tiny", text=stand_in_embeddings(N, weights.SIZES["tiny"].proj)
        ),
        helpers.student("dinov3", N, size="tiny"),
    ]


def fresh(students):
    """Deep copies of the students with their own AdamW (lr 1e-3) on the trainable parameters."""
    copies = copy.deepcopy(students)
    return copies, [
        torch.optim.AdamW([p for p in s.parameters() if p.requires_grad], lr=1e-3) for s in copies
    ]


def scene(n, g):
    """Images whose 16x16 cells are coloured by class (+ noise): labels a student can learn in a few steps."""
    cells = torch.randint(0, N, (n, PX // 16, PX // 16), generator=g)
    label = cells.repeat_interleave(16, 1).repeat_interleave(16, 2)  # (n, PX, PX)
    return COLOURS[label].permute(0, 3, 1, 2) + 0.1 * torch.randn(n, 3, PX, PX, generator=g), label


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x_l, y_l = scene(NL, g)
    y_l[:, :4] = IGNORE  # an unlabelled strip
    x_w, gt = scene(NL, g)
    empty = torch.zeros(NL, PX, PX, dtype=torch.bool)
    ignore, box1, box2 = empty.clone(), empty.clone(), empty.clone()
    ignore[0, :, -8:] = True  # crop padding on image 0
    box1[0, 8:40, 16:48], box1[1, 30:60, 0:20] = True, True
    box2[0, 32:64, 32:64], box2[1, 0:24, 24:56] = True, True
    batch_u = {
        "img_w": x_w,
        "img_s1": 1.2 * x_w + 0.2 * torch.randn(x_w.shape, generator=g),
        "img_s2": 0.8 * x_w + 0.2 * torch.randn(x_w.shape, generator=g),
        "ignore": ignore,
        "label": gt,
        "box1": box1,
        "box2": box2,
    }
    return {"img": x_l, "label": y_l}, batch_u


def step(
    students,
    optimizers,
    batch_l,
    batch_u,
    seed=0,
    batch_mix=None,
    t=100,
    total=100,
    log=False,
    **switches,
):
    """co2s.iteration and its diagnostics, then what train.py does with its losses: one backward, one
    AdamW step per student. t / total: the step and the run's length for E9 (past the ramp: 0.5)."""
    method = co2s.Method(**switches)
    torch.manual_seed(seed)  # the FP dropout draws
    batch = co2s.Batch(batch_l, batch_u, batch_mix)
    out = co2s.iteration(
        students, batch, stability_weight=stability_weight(t, total), method=method
    )
    logs = co2s.diagnostics(out, batch, method, quality=log)
    losses = out.losses
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    sum(losses).backward()
    for opt in optimizers:
        opt.step()
    return dict(logs, finite=torch.isfinite(sum(losses)))


def weak_logits(students, batch_l, batch_u, seed=0):
    """The clean weak logits z_w of each student exactly as train_step computes them (same calls, same RNG)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return [
            s(torch.cat([batch_l["img"], batch_u["img_w"]]), fp_from=NL)[NL : 2 * NL]
            for s in students
        ]


def params(s):
    return {n: p.detach().clone() for n, p in s.named_parameters()}


def uni(logs, name):
    """E7 from the logged terms: (L_sup + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2."""
    return (
        logs[f"{name}/sup"]
        + 0.25 * (logs[f"{name}/s1"] + logs[f"{name}/s2"])
        + 0.5 * logs[f"{name}/fp"]
    ) / 2


def sup_eval(students, batch_l):
    out = []
    for s in students:
        s.eval()
        with torch.no_grad():
            out.append(supervised_loss(s(batch_l["img"]), batch_l["label"]).item())
        s.train()
    return out


# --------------------------------------------------------------------------------------------


def test_cutmix_pastes_the_same_box_into_image_labels_confidences_and_ignore():
    g = torch.Generator().manual_seed(0)
    box = torch.zeros(2, 8, 8, dtype=torch.bool)
    box[0, 1:4, 2:7], box[1, 5:8, 0:3] = True, True
    img_d, img_s = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    lab_d, lab_s = torch.zeros(2, 8, 8, dtype=torch.long), torch.ones(2, 8, 8, dtype=torch.long)
    conf_d, conf_s = torch.full((2, 8, 8), 0.1), torch.full((2, 8, 8), 0.9)
    ign_d, ign_s = torch.zeros(2, 8, 8, dtype=torch.bool), torch.ones(2, 8, 8, dtype=torch.bool)
    img = co2s.cutmix(img_d, img_s, box)
    for c in range(3):
        assert torch.equal(img[:, c][box], img_s[:, c][box]) and torch.equal(
            img[:, c][~box], img_d[:, c][~box]
        )
    assert torch.equal(co2s.cutmix(lab_d, lab_s, box), box.long())  # 1 exactly inside the box
    assert torch.equal(co2s.cutmix(conf_d, conf_s, box) == 0.9, box)
    assert torch.equal(co2s.cutmix(ign_d, ign_s, box), box)


def test_a_box_over_the_whole_view_takes_the_partners_valid_mask(students):
    """Pasting carries the partner's padding: a box covering the whole strong view of a partner that
    is all padding leaves E6 no valid pixel there (L_s = 0); the other view, without a box, trains."""
    ss, opts = fresh(students[:1])
    batch_l, batch_u = make_batch()
    full, none = torch.ones_like(batch_u["box1"]), torch.zeros_like(batch_u["box2"])
    mix = {**batch_u, "ignore": torch.ones_like(batch_u["ignore"])}
    logs = step(
        ss,
        opts,
        batch_l,
        {**batch_u, "box1": full, "box2": none},
        batch_mix=mix,
        method="unimatch",
        tau=0.0,
    )
    assert logs["clip/s1"].item() == 0.0 and logs["clip/s2"].item() > 0


def test_unknown_method_stability_or_views_are_errors_listing_the_choices(students):
    batch_l, batch_u = make_batch()
    with pytest.raises(ValueError, match="valid: co2s, unimatch, supervised"):
        co2s.Method(method="fixmatch")
    with pytest.raises(ValueError, match="valid: grad, released, off"):
        co2s.Method(stability="on")
    with pytest.raises(ValueError, match="strong_views must be 1 or 2"):
        co2s.Method(strong_views=3)


@pytest.fixture(scope="module")
def one_step(students):
    """One co2s step from the same weights and seed for each stability mode; tau 0 so every E8 mask is non-empty."""
    batch_l, batch_u = make_batch()
    runs = {}
    for mode in co2s.STABILITY:
        ss, opts = fresh(students)
        logs = step(ss, opts, batch_l, batch_u, stability=mode, tau=0.0)
        runs[mode] = ([params(s) for s in ss], logs)
    return runs


def test_released_stability_is_logged_but_changes_no_weight(one_step):
    (p_rel, logs_rel), (p_off, logs_off) = one_step["released"], one_step["off"]
    for a, b in zip(p_rel, p_off):
        assert all(torch.equal(a[n], b[n]) for n in a), (
            "the released E8 term must carry no gradient"
        )
    for name in ("clip", "dinov3"):
        assert logs_rel[f"{name}/sta"] > 0 and f"{name}/sta" not in logs_off
        assert (
            logs_rel[f"{name}/loss"] > logs_off[f"{name}/loss"]
        )  # counted in the loss, trains nothing


def test_grad_stability_changes_the_update_of_both_students(one_step):
    (p_grad, _), (p_rel, _) = one_step["grad"], one_step["released"]
    for a, b in zip(p_grad, p_rel):
        assert any(not torch.equal(a[n], b[n]) for n in a)


def test_logged_losses_are_e7_plus_lambda_times_e8_of_the_weak_logits(students):
    # float64: the step's E8 and E7 + lambda E8 re-computed from the logs differ only by rounding
    batch_l, batch_u = (helpers.f64(b) for b in make_batch())
    ss, opts = fresh(students)
    ss = [helpers.float64(s) for s in ss]
    z = weak_logits(ss, batch_l, batch_u)  # from the weights before the step
    logs = step(ss, opts, batch_l, batch_u, stability="grad", tau=0.0)
    assert logs["lambda"] == 0.5
    for k, name in enumerate(["clip", "dinov3"]):
        sta = logs[f"{name}/sta"]
        assert sta.dtype == torch.float64
        helpers.assert_close(sta, stability_loss(z[k], z[1 - k], 0.0), what=f"{name} E8")
        e7 = uni(logs, name)
        helpers.assert_close(logs[f"{name}/loss"], e7 + 0.5 * sta, what=f"{name} E7 + lambda E8")
        assert logs[f"{name}/s1"] > 0 and logs[f"{name}/fp"] > 0  # tau 0: every valid pixel counts


@pytest.fixture(scope="module")
def trained(students):
    """The students after 30 co2s steps on the fixed batch, with the supervised loss (eval mode) before, and
    per student its lowest over the last 10 steps (Adam at lr 1e-3 on one batch is noisy step to step)."""
    ss, opts = fresh(students)
    batch_l, batch_u = make_batch()
    before, after, finite = sup_eval(ss, batch_l), [], []
    for t in range(30):
        finite.append(step(ss, opts, batch_l, batch_u, seed=t, t=t, total=30)["finite"])
        if t >= 20:
            after.append(sup_eval(ss, batch_l))
    return ss, before, [min(a) for a in zip(*after)], finite


def test_training_lowers_the_supervised_loss_of_both_students(trained):
    _, before, after, finite = trained
    assert all(finite)
    for b, a in zip(before, after):
        assert a < b - 0.1, (before, after)


def test_unimatch_terms_are_e5_and_e6_on_the_pasted_strong_views_and_the_fp_branch(trained):
    """Steps 2-5 of METHOD.md section 4 written out by hand (rolled partners), against the logged
    terms, in float64 (helpers.F64_BOUND)."""
    ss, opts = fresh(trained[0])  # trained: structured pseudo-labels
    ss = [helpers.float64(s) for s in ss]
    batch_l, batch_u = (helpers.f64(b) for b in make_batch())
    valid = ~batch_u["ignore"]
    # tau: the lower of the students' median weak confidences, so that (by construction, on any
    # machine) each student has confident pixels and every term below is live; halfway to the next
    # confidence up, so that no pixel sits on the threshold for rounding to move across
    confs = [z.softmax(1).amax(1)[valid].sort().values for z in weak_logits(ss, batch_l, batch_u)]
    tau = min(((c[len(c) // 2] + c[len(c) // 2 + 1]) / 2).item() for c in confs)
    expected = []
    torch.manual_seed(0)  # the same FP dropout draws as the step below
    with torch.no_grad():
        for s in ss:
            out = s(torch.cat([batch_l["img"], batch_u["img_w"]]), fp_from=NL)
            z, z_fp = out[: 2 * NL], out[2 * NL :]
            conf, label = z[NL:].softmax(1).max(1)
            terms = {
                "sup": supervised_loss(z[:NL], batch_l["label"]),
                "fp": pseudo_label_loss(z_fp, label, conf, valid, tau),
            }
            boxes = [batch_u["box1"], batch_u["box2"]]
            strong = [
                co2s.cutmix(batch_u[f"img_s{j}"], batch_u[f"img_s{j}"].roll(1, 0), box)
                for j, box in zip((1, 2), boxes)
            ]
            for j, (z_s, box) in enumerate(zip(s(torch.cat(strong)).chunk(2), boxes), 1):

                def paste(m):  # the partner (the image before in the batch) inside the box
                    return torch.where(box, m.roll(1, 0), m)

                terms[f"s{j}"] = pseudo_label_loss(
                    z_s, paste(label), paste(conf), paste(valid), tau
                )
            expected.append(terms)
    logs = step(ss, opts, batch_l, batch_u, seed=0, tau=tau)
    for s, terms in zip(ss, expected):
        for k, v in terms.items():
            helpers.assert_close(logs[f"{s.name}/{k}"], v, what=f"by hand vs step {s.name}/{k}")
    assert all(terms[k] > 0 for terms in expected for k in ("s1", "s2", "fp"))  # the terms are live


def test_supervised_method_never_touches_unlabelled_data(students):
    class Untouchable:
        """An unlabelled batch that fails the test on any access."""

        def __getitem__(self, key):
            raise AssertionError(f"method='supervised' read batch_u[{key!r}]")

        def __getattr__(self, name):
            raise AssertionError(f"method='supervised' used batch_u.{name}")

    batch_l, _ = make_batch()
    runs = []
    for unlabelled in (Untouchable(), None):
        ss, opts = fresh(students)
        logs = step(ss, opts, batch_l, unlabelled, batch_mix=unlabelled, method="supervised")
        runs.append([params(s) for s in ss])
        assert (
            set(logs) == {"clip/sup", "clip/loss", "dinov3/sup", "dinov3/loss", "finite"}
            and logs["finite"]
        )
    for a, b, before in zip(*runs, [params(s) for s in students]):
        assert all(torch.isfinite(p).all() for p in a.values())
        assert all(torch.equal(a[n], b[n]) for n in a)
        assert any(not torch.equal(a[n], before[n]) for n in a)


def test_rolled_partners_equal_an_explicit_partner_batch_rolled_by_one(trained):
    # trained students: their pseudo-labels have structure, so the losses depend on what is pasted
    # in float64: the explicit partners' pseudo-labels come from another forward (a batch of B in
    # eval mode, not the [labelled; weak] batch of 2B), which rounds otherwise (helpers.F64_BOUND)
    batch_l, batch_u = (helpers.f64(b) for b in make_batch())
    rolled = {k: v.roll(1, 0) for k, v in batch_u.items()}
    logs = []
    for mix in (None, rolled, {**rolled, "img_w": rolled["img_w"].flip(-1)}):
        ss, opts = fresh(trained[0])
        ss = [helpers.float64(s) for s in ss]
        logs.append(
            step(ss, opts, batch_l, batch_u, batch_mix=mix, tau=0.0)
        )  # tau 0: every pasted label counts
    for k in logs[0]:
        helpers.assert_close(logs[1][k], logs[0][k], what=f"explicit vs rolled partners {k}")
    # the partner's pseudo-labels really come from batch_mix: other partner labels, other losses
    assert not torch.allclose(logs[2]["dinov3/s1"], logs[1]["dinov3/s1"], atol=1e-2)


def test_unimatch_has_no_stability_term_and_weights_losses_by_e7(students):
    # float64: the loss and E7 re-summed from the logged terms differ only by rounding
    ss, opts = fresh(students)
    ss = [helpers.float64(s) for s in ss]
    batch_l, batch_u = (helpers.f64(b) for b in make_batch())
    logs = step(ss, opts, batch_l, batch_u, method="unimatch", tau=0.0)
    assert not any(k.endswith("/sta") for k in logs) and "lambda" not in logs
    for name in ("clip", "dinov3"):
        assert logs[f"{name}/loss"].dtype == torch.float64
        helpers.assert_close(logs[f"{name}/loss"], uni(logs, name), what=f"{name} loss vs E7")


def test_a_single_student_runs_co2s_without_e8_and_without_fp_the_strong_view_takes_its_half(
    students,
):
    ss, opts = fresh(students[:1])
    ss = [helpers.float64(s) for s in ss]  # float64: E7 re-summed differs only by rounding
    batch_l, batch_u = (helpers.f64(b) for b in make_batch())
    logs = step(ss, opts, batch_l, batch_u, tau=0.0, fp=False, strong_views=1)
    assert not any(k.endswith("/sta") for k in logs) and logs["finite"]
    assert "clip/s2" not in logs and "clip/fp" not in logs  # no FP branch, no FP term
    e7 = (logs["clip/sup"] + logs["clip/s1"]) / 2
    helpers.assert_close(logs["clip/loss"], e7, what="E7 without FP")
    assert torch.equal(logs["clip/uni"], logs["clip/loss"])  # E7 logged as computed: no E8 here


def test_pseudo_label_accuracy_is_one_against_the_students_own_argmax_and_coverage_counts_confident_pixels(
    students,
):
    ss, opts = fresh(students[:1])
    batch_l, batch_u = make_batch()
    conf, label = weak_logits(ss, batch_l, batch_u)[0].softmax(1).max(1)
    gt = label.clone()
    gt[:, :, :5] = IGNORE  # unlabelled ground-truth pixels
    tau = conf.median().item()
    logs = step(ss, opts, batch_l, {**batch_u, "label": gt}, seed=0, tau=tau, log=True)
    known = ~batch_u["ignore"] & (gt != IGNORE)
    assert logs["clip/pl_acc"].item() == 1.0
    coverage = ((conf >= tau) & known).sum() / known.sum()
    # a ratio of integer counts (below 2^24, so exact in fp32) divided once, and IEEE division
    # is correctly rounded: the same bits whatever the order the pixels were counted in
    assert 0.2 < coverage < 0.8 and logs["clip/pl_cov"].item() == coverage.item()


def test_fused_pseudo_label_accuracy_is_one_against_the_fused_argmax(students):
    ss, opts = fresh(students)
    batch_l, batch_u = make_batch()
    z = weak_logits(ss, batch_l, batch_u)
    fused = model.fuse([zk.softmax(1) for zk in z]).argmax(1)
    logs = step(ss, opts, batch_l, {**batch_u, "label": fused}, seed=0, tau=0.0, log=True)
    assert logs["fused/pl_acc"].item() == 1.0 and logs["fused/pl_cov"].item() == 1.0
    agree = [(zk.argmax(1) == fused)[~batch_u["ignore"]].float().mean().item() for zk in z]
    for name, a in zip(["clip", "dinov3"], agree):
        assert logs[f"{name}/pl_acc"].item() == a  # a ratio of exact counts: the same bits
