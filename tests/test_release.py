"""model.from_release against an independent statement of the authors' released students (release_reference.py),
the base-size key table of their checkpoints, and eval.py --release end to end."""

import copy
import json
import os

import helpers
import numpy as np
import pytest
import torch
from PIL import Image
from release_reference import ReleasedStudent, randomise, save_like_the_authors
from toy_data import custom_root

import data
import eval as ev
import model
import train
from plumbing.errors import UserError
from tools import release

N, CROP = 5, 64


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Both released students at width 128 (2 heads), depth 12 (the real taps), random non-trivial weights,
    saved as the authors' Co2S.py saves them."""
    folder = tmp_path_factory.mktemp("release") / "1_8-61.25"
    folder.mkdir()
    refs = {}
    for seed, kind in enumerate(("clip", "dinov3")):
        torch.manual_seed(seed)
        refs[kind] = randomise(ReleasedStudent(kind, N, crop=CROP), seed).eval()
        save_like_the_authors(refs[kind], folder / f"best_{kind}.pth")
    return folder, refs


@pytest.mark.parametrize("kind", ["clip", "dinov3"])
def test_from_release_gives_the_released_networks_logits(released, kind):
    """In float64 (helpers.F64_BOUND), both networks, but for the release's bf16 RoPE periods: the
    rotation of q and k stays in bf16 on both sides (the release's numerics), and inputs that
    agree to 1e-16 round to the same bf16 values but with a chance of ~1e-16 / 2^-8 per element
    (about 1e-8 over the ~1e5 elements rotated). In fp32 that chance is 1e-7 / 2^-8 per element,
    so some elements do round apart, and the logits differ by 1e-5."""
    folder, refs = released
    s = release.from_release(str(folder / f"best_{kind}.pth"))
    assert s.kind == kind and not s.training and s.numerics == "release"
    s, ref = helpers.float64(s), helpers.float64(copy.deepcopy(refs[kind]))
    x = torch.randn(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(3)).double()
    with torch.no_grad():
        ours, theirs = s(x), ref(x)
    assert ours.dtype == theirs.dtype == torch.float64 and theirs.std() > 0.1
    helpers.assert_close(ours, theirs, what=f"{kind} release conversion vs re-statement")


def test_release_numerics_are_what_the_file_says(released):
    folder, refs = released
    clip, dino = (release.from_release(str(folder / f"best_{k}.pth")) for k in ("clip", "dinov3"))
    cfg = clip.backbone.config
    assert (
        cfg.hidden_act,
        cfg.layer_norm_eps,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.image_size,
    ) == ("gelu", 1e-6, 128, 2, CROP)
    assert dino.backbone.config.layer_norm_eps == 1e-6
    assert dino.rope_periods.dtype == torch.bfloat16  # used as stored, not recomputed
    assert torch.equal(dino.rope_periods, refs["dinov3"].backbone.rope_embed.periods)
    assert torch.equal(
        clip.text, refs["clip"]._cached_text
    )  # the class embeddings come from the file
    assert torch.equal(dino.queries.weight, refs["dinov3"].text_provider.emb.weight)


def test_hf_numerics_differ_from_the_release_at_this_precision(released):
    """The numerics choice is not cosmetic: the same weights under 'hf' numerics give other logits."""
    folder, refs = released
    s = release.from_release(str(folder / "best_dinov3.pth"))
    hf = model.Student("dinov3", s.backbone, N, numerics="hf").eval()
    hf.load_state_dict(
        {k: v for k, v in s.state_dict().items()}
    )  # bf16 periods copied into fp32 ones
    x = torch.randn(1, 3, CROP, CROP)
    with torch.no_grad():
        assert (hf(x) - s(x)).abs().max() > 1e-3


def test_wrong_or_truncated_checkpoints_are_clear_errors(released, tmp_path):
    folder, _ = released
    raw = (folder / "best_clip.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="cannot read the released checkpoint.*cut.pth"):
        release.from_release(str(tmp_path / "cut.pth"))
    torch.save({"model": {"module.encoder.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a released Co2S student.*encoder.weight"):
        release.from_release(str(tmp_path / "other.pth"))
    sd = torch.load(folder / "best_dinov3.pth", weights_only=True)
    sd["model"]["module.decode_head.extra.weight"] = torch.zeros(1)
    del sd["model"]["module.backbone.norm.bias"]
    torch.save(sd, tmp_path / "edited.pth")
    with pytest.raises(
        UserError,
        match=r"not understood \['decode_head.extra.weight'\].*not filled \['backbone.norm.bias'\]",
    ):
        release.from_release(str(tmp_path / "edited.pth"))
    sd = torch.load(folder / "best_clip.pth", weights_only=True)
    del sd["model"]["module._cached_text"]
    torch.save(sd, tmp_path / "no_text.pth")
    with pytest.raises(UserError, match="--text-embeddings"):
        release.from_release(str(tmp_path / "no_text.pth"))
    text = torch.nn.functional.normalize(torch.randn(N, 64), dim=-1)
    assert torch.equal(release.from_release(str(tmp_path / "no_text.pth"), text=text).text, text)


# --------------------------------------------------------------------------------------------
# Base size: the keys and shapes of the released checkpoints, written from the authors' code


def release_table(kind, n=6):
    """Release key -> shape at ViT-B/16, crop 512, n classes (the head's 68 keys included)."""
    C, F = 768, 3072
    t = {}
    if kind == "clip":
        t.update(
            {
                "backbone.cls_token": (1, 1, C),
                "backbone.pos_embed": (1, 1025, C),
                "backbone.patch_embed.projection.weight": (C, 3, 16, 16),
                "backbone.ln0.weight": (C,),
                "backbone.ln0.bias": (C,),
                "backbone.ln1.weight": (C,),
                "backbone.ln1.bias": (C,),
                "backbone.proj.weight": (512, C, 1, 1),
                "_cached_text": (n, 512),
            }
        )
        for i in range(12):
            p = f"backbone.layers.{i}."
            t.update(
                {
                    p + "ln1.weight": (C,),
                    p + "ln1.bias": (C,),
                    p + "ln2.weight": (C,),
                    p + "ln2.bias": (C,),
                    p + "attn.attn.in_proj_weight": (3 * C, C),
                    p + "attn.attn.in_proj_bias": (3 * C,),
                    p + "attn.attn.out_proj.weight": (C, C),
                    p + "attn.attn.out_proj.bias": (C,),
                    p + "ffn.layers.0.0.weight": (F, C),
                    p + "ffn.layers.0.0.bias": (F,),
                    p + "ffn.layers.1.weight": (C, F),
                    p + "ffn.layers.1.bias": (C,),
                }
            )
    else:
        t.update(
            {
                "backbone.cls_token": (1, 1, C),
                "backbone.storage_tokens": (1, 4, C),
                "backbone.mask_token": (1, C),
                "backbone.patch_embed.proj.weight": (C, 3, 16, 16),
                "backbone.patch_embed.proj.bias": (C,),
                "backbone.rope_embed.periods": (16,),
                "backbone.norm.weight": (C,),
                "backbone.norm.bias": (C,),
                "text_provider.emb.weight": (n, C),
            }
        )
        for i in range(12):
            p = f"backbone.blocks.{i}."
            t.update(
                {
                    p + "norm1.weight": (C,),
                    p + "norm1.bias": (C,),
                    p + "norm2.weight": (C,),
                    p + "norm2.bias": (C,),
                    p + "attn.qkv.weight": (3 * C, C),
                    p + "attn.qkv.bias": (3 * C,),
                    p + "attn.qkv.bias_mask": (3 * C,),
                    p + "attn.proj.weight": (C, C),
                    p + "attn.proj.bias": (C,),
                    p + "ls1.gamma": (C,),
                    p + "ls2.gamma": (C,),
                    p + "mlp.fc1.weight": (F, C),
                    p + "mlp.fc1.bias": (F,),
                    p + "mlp.fc2.weight": (C, F),
                    p + "mlp.fc2.bias": (C,),
                }
            )
    d = "decode_head."
    t.update(
        {
            d + "conv1.weight": (128, 1, 7, 7),
            d + "conv1.bias": (128,),
            d + "aspp.aspp_convs.0.0.weight": (128, 128, 1, 1),
            d + "aspp.aspp_convs.4.gap.1.weight": (128, 128, 1, 1),
            d + "aspp.aspp_convs.4.gap.2.weight": (128,),
            d + "aspp.aspp_convs.4.gap.2.bias": (128,),
            d + "aspp.project.0.weight": (128, 640, 1, 1),
            d + "aspp.project.1.weight": (128,),
            d + "aspp.project.1.bias": (128,),
            d + "text_proj.0.weight": (128, 512 if kind == "clip" else C),
            d + "text_proj.0.bias": (128,),
            d + "skip_proj.0.0.weight": (32, C, 3, 3),
            d + "skip_proj.0.0.bias": (32,),
            d + "skip_proj.1.0.weight": (16, C, 3, 3),
            d + "skip_proj.1.0.bias": (16,),
            d + "up1.up.weight": (128, 96, 2, 2),
            d + "up1.up.bias": (96,),
            d + "up1.conv.0.weight": (64, 128, 3, 3),
            d + "up1.conv.1.weight": (64,),
            d + "up1.conv.1.bias": (64,),
            d + "up1.conv.3.weight": (64, 64, 3, 3),
            d + "up1.conv.4.weight": (64,),
            d + "up1.conv.4.bias": (64,),
            d + "up2.up.weight": (64, 48, 2, 2),
            d + "up2.up.bias": (48,),
            d + "up2.conv.0.weight": (32, 64, 3, 3),
            d + "up2.conv.1.weight": (32,),
            d + "up2.conv.1.bias": (32,),
            d + "up2.conv.3.weight": (32, 32, 3, 3),
            d + "up2.conv.4.weight": (32,),
            d + "up2.conv.4.bias": (32,),
            d + "head.weight": (1, 32, 3, 3),
            d + "head.bias": (1,),
        }
    )
    for k in range(4):
        t.update(
            {
                d + f"aspp.aspp_convs.{k}.0.weight": (
                    128,
                    128,
                    1 if k == 0 else 3,
                    1 if k == 0 else 3,
                ),
                d + f"aspp.aspp_convs.{k}.1.weight": (128,),
                d + f"aspp.aspp_convs.{k}.1.bias": (128,),
            }
        )
    for l in range(2):
        p = d + f"layers.{l}.transformer."
        t.update(
            {
                p + "ln1.weight": (256,),
                p + "ln1.bias": (256,),
                p + "ln2.weight": (256,),
                p + "ln2.bias": (256,),
                p + "attn.attn.in_proj_weight": (768, 256),
                p + "attn.attn.in_proj_bias": (768,),
                p + "attn.attn.out_proj.weight": (256, 256),
                p + "attn.attn.out_proj.bias": (256,),
                p + "ffn.layers.0.0.weight": (512, 256),
                p + "ffn.layers.0.0.bias": (512,),
                p + "ffn.layers.1.weight": (256, 512),
                p + "ffn.layers.1.bias": (256,),
            }
        )
    return t


@pytest.mark.parametrize("kind, n_keys", [("clip", 221), ("dinov3", 257)])
def test_base_release_keys_and_shapes_are_exactly_what_the_conversion_consumes(
    kind, n_keys, tmp_path
):
    table = release_table(kind)
    assert len(table) == n_keys and sum(k.startswith("decode_head.") for k in table) == 68
    g = torch.Generator().manual_seed(0)
    sd = {"module." + k: torch.randn(shape, generator=g) * 0.02 for k, shape in table.items()}
    if kind == "dinov3":
        for i in range(12):
            sd[f"module.backbone.blocks.{i}.attn.qkv.bias_mask"] = torch.cat(
                [torch.ones(768), torch.zeros(768), torch.ones(768)]
            )
        sd["module.backbone.rope_embed.periods"] = (100 ** (torch.arange(16) / 16)).bfloat16()
    torch.save({"model": sd, "optimizer": {}, "epoch": 0}, tmp_path / f"best_{kind}.pth")
    s = release.from_release(
        str(tmp_path / f"best_{kind}.pth")
    )  # every key consumed, every tensor filled
    assert release.kind_and_sizes("x", {k[7:]: v for k, v in sd.items()})[0] == kind
    assert sum(p.numel() for p in s.head.parameters()) == (
        2_217_185 if kind == "clip" else 2_249_953
    )
    assert (
        s.backbone.config.hidden_size == 768
        and s.backbone.config.num_hidden_layers == 12
        and s.taps == model.tapped_blocks(kind, 12)
    )
    if kind == "clip":
        assert s.backbone.config.image_size == 512 and s.backbone.config.num_attention_heads == 12


# --------------------------------------------------------------------------------------------
# eval.py --release: convert, evaluate the authors' way, save as our run, evaluate and fine-tune that


def test_eval_release_end_to_end_then_eval_and_fine_tune_the_saved_run(released, tmp_path, capsys):
    folder, refs = released  # its name carries a published figure: 61.25
    root = custom_root(tmp_path / "data", n=10)
    run = tmp_path / "converted"
    result = release.main(
        [
            str(folder),
            "--dataset",
            "custom",
            "--data-root",
            root,
            "--device",
            "cpu",
            "--save",
            str(run),
            "--workers",
            "0",
        ]
    )
    out = capsys.readouterr().out
    assert "published 61.25 | ours: clip" in out and result["published"] == 61.25
    assert (
        set(result["results"]) == {"clip", "dinov3", "fused"} and result["crop"] == CROP
    )  # the release's crop
    # each student's mIoU is the reference network's, by hand: one 64 px window per val tile,
    # argmax, the release's mIoU. This runs eval.py in fp32 (its data pipeline), where the two
    # networks' logits differ by rounding (and bf16 RoPE rounding apart): d, measured here on the
    # same tiles with the converted students, taken x10 (helpers.floor_bound) for eval.py's own
    # forward. A pixel whose top-2 margin is under 2 * 10 * d may take the other class; k such
    # pixels move at most k counts between cells of the confusion matrix, so each class's IoU moves
    # by at most 2k / U_c (U_c its union): the bound.
    ours = {k: release.from_release(str(folder / f"best_{k}.pth")) for k in refs}
    for kind, ref in refs.items():
        cm, ambiguous, d, cms = ev.ConfusionMatrix(N), 0, 0.0, []
        for i in (8, 9):
            img = data.normalize(
                Image.open(os.path.join(root, "images", f"{i:02d}.png")).convert("RGB")
            )[None]
            label = torch.from_numpy(
                np.array(Image.open(os.path.join(root, "labels", f"{i:02d}.png")))
            ).long()
            with torch.no_grad():
                logits = ref(img)
                d = max(d, (ours[kind](img) - logits).abs().max().item())
            cms.append((logits, label))
        for logits, label in cms:
            top2 = logits.topk(2, dim=1).values
            near = 2 * helpers.floor_bound(d, logits.abs().max())
            ambiguous += int((top2[:, 0] - top2[:, 1] < near).sum())
            cm.update(logits.argmax(1)[0], label)
        m = cm.mat.double()
        union = m.sum(0) + m.sum(1) - m.diag()
        bound = 2 * ambiguous / union[union > 0].min().item() if ambiguous else 0.0
        diff = abs(result["results"][kind]["miou"] - cm.miou())
        print(f"{kind}: fp32 logits differ by {d:.1e}; {ambiguous} ambiguous pixels")
        print(f"margin {kind} eval --release mIoU: {diff:.2e} of bound {bound:.1e}")
        assert diff <= bound, (kind, ambiguous)
    # the converted run: eval.py reads it like any run and gives the same numbers
    again = ev.main([str(run), "--workers", "0", "--device", "cpu"])
    assert again["results"] == result["results"]
    # and train.py fine-tunes from it (--init): its students, sizes and release numerics
    train.main(
        [
            "--dataset",
            "custom",
            "--data-root",
            root,
            "--init",
            str(run),
            "--out",
            str(tmp_path / "ft"),
            "--iters",
            "1",
            "--crop",
            str(CROP),
            "--batch",
            "1",
            "--workers",
            "0",
            "--ratio",
            "1/8",
        ]
    )
    cfg = json.load(open(tmp_path / "ft" / "config.json"))
    assert (
        cfg["numerics"] == "release"
        and cfg["students"] == "clip,dinov3"
        and cfg["hyper"].startswith("paper")
    )
    assert (tmp_path / "ft" / "last.pt").is_file()


def test_cutmix_box_is_the_releases_joint_rejection_sampling():
    """transform.py obtain_cutmix_box, draw for draw: coin, area, then (ratio, x, y) redrawn together."""
    import random

    def theirs(size, rng):
        mask = np.zeros((size, size), bool)
        if rng.random() >= 0.5:
            return mask
        area = rng.uniform(0.02, 0.4) * size * size
        while True:
            ratio = rng.uniform(0.3, 1 / 0.3)
            w, h = int(np.sqrt(area / ratio)), int(np.sqrt(area * ratio))
            x, y = rng.randint(0, size - 1), rng.randint(0, size - 1)
            if x + w <= size and y + h <= size:
                break
        mask[y : y + h, x : x + w] = True
        return mask

    for seed in range(200):
        assert np.array_equal(
            data.cutmix_box(64, random.Random(seed)).numpy(), theirs(64, random.Random(seed))
        ), seed


def test_clip_encoder_keys_are_dropped_as_the_authors_eval_does_and_others_stay_errors(
    released, tmp_path, capsys
):
    folder, _ = released
    ckpt = torch.load(folder / "best_clip.pth", weights_only=True)
    base = release.from_release(str(folder / "best_clip.pth")).state_dict()
    extra = dict(
        ckpt["model"],
        **{
            "module.clip_encoder.text.weight": torch.ones(3),
            "module.clip_encoder.proj": torch.ones(2),
        },
    )
    torch.save(dict(ckpt, model=extra), tmp_path / "with_encoder.pth")
    s = release.from_release(str(tmp_path / "with_encoder.pth"))
    assert "dropped 2 'clip_encoder.*' keys" in capsys.readouterr().out
    assert all(torch.equal(v, s.state_dict()[k]) for k, v in base.items())
    torch.save(
        dict(ckpt, model=dict(ckpt["model"], **{"module.other.weight": torch.ones(1)})),
        tmp_path / "other_key.pth",
    )
    with pytest.raises(UserError, match="other.weight"):
        release.from_release(str(tmp_path / "other_key.pth"))


def test_text_embeddings_go_to_the_clip_student_only_and_release_evaluates_in_fp32(
    released, tmp_path
):
    """eval.py --release DIR --text-embeddings FILE with both students present: the class embeddings
    are the CLIP student's; the DINOv3 student keeps its own queries. --release evaluates in fp32
    by default (as the authors), our runs under their own --amp."""
    folder, _ = released
    both = tmp_path / "1_8-61.25"
    both.mkdir()
    sd = torch.load(folder / "best_clip.pth", weights_only=True)
    stored = sd["model"].pop("module._cached_text")
    torch.save(sd, both / "best_clip.pth")
    (both / "best_dinov3.pth").write_bytes((folder / "best_dinov3.pth").read_bytes())
    np.save(tmp_path / "text.npy", stored.numpy())
    root = custom_root(tmp_path / "data", n=10)
    m, info, cfg, published = release.load_release(
        str(both), "custom", root, str(tmp_path / "text.npy")
    )
    clip, dinov3 = m.students
    assert torch.equal(clip.text, torch.nn.functional.normalize(stored.float(), dim=-1))
    assert dinov3.text is None and dinov3.queries.weight.shape == (N, 128)
    np.save(tmp_path / "wide.npy", np.zeros((N, 512), np.float32) + 1)
    with pytest.raises(UserError, match="512-d rows"):
        release.load_release(str(both), "custom", root, str(tmp_path / "wide.npy"))
    args = release.get_args([str(both), "--dataset", "custom", "--data-root", root])
    assert args.amp == "off"
    assert release.get_args([str(both), "--dataset", "custom", "--amp", "auto"]).amp == "auto"
