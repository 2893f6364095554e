"""model.py: the two students (E1, E3, E4), their text embeddings (E2), loading, and the fusion head (E10).

Everything runs on random weights at "tiny" size, except the base-size checks of parameter counts,
taps and configs (each base student is built once for the module and run on one 32x32 image)."""

import copy
import warnings
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_text import TEXT, random_text_tower, tiny_clip_tokenizer

import model
import model as text
from losses import supervised_loss
from plumbing import weights
from plumbing.errors import UserError

N = 6  # potsdam
POTSDAM = [  # METHOD.md section 2, class name first
    ["impervious_surface", "asphalt", "concrete", "pavement", "roof", "sidewalk"],
    [
        "building",
        "residential building",
        "commercial building",
        "church",
        "factory",
        "historical building",
    ],
    ["low_vegetation", "grass", "lawn", "meadow", "pasture", "flower bed"],
    ["tree", "deciduous tree", "evergreen tree", "tree row", "park tree", "forest edge"],
    ["car", "passenger car", "truck", "van", "bus", "parked vehicle"],
    ["clutter", "fence", "wall", "railway", "construction site", "unclassified object"],
]
_REPO = Path(__file__).resolve().parents[1]
_EMB_DIRS = [_REPO / "shared/data/text_embeddings", _REPO.parent / "shared/data/text_embeddings"]
EMB = next((d for d in _EMB_DIRS if d.is_dir()), None)
needs_authors_files = pytest.mark.skipif(
    EMB is None, reason="the authors' text embedding files (shared/data) are absent"
)


def split(logits, n):
    """(clean logits, FP logits) of a student's forward with fp_from."""
    return logits[:n], logits[n:]


def embeddings_module(student):
    bb = student.backbone
    return bb.vision_model.embeddings.patch_embedding if student.kind == "clip" else bb.embeddings


def count_backbone_passes(student):
    """A list that gets one entry per run of the backbone's patch embedding (= one backbone pass)."""
    calls = []
    handle = embeddings_module(student).register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return {
        "clip": helpers.student(
            "clip", N, size="tiny", text=text.stand_in_embeddings(N, TINY.proj)
        ),
        "dinov3": helpers.student("dinov3", N, size="tiny"),
    }


@pytest.fixture(scope="module")
def tiny64(tiny):
    """The tiny students in float64, for the tests that compare two computations of the same maps
    (helpers.F64_BOUND: where rounding cannot decide them)."""
    return {kind: helpers.float64(copy.deepcopy(s)) for kind, s in tiny.items()}


def rope_in_float64(s, monkeypatch):
    """transformers computes DINOv3's RoPE tables in float32 whatever the model's dtype (float32
    patch centres and inv_freq), as centre * 1 / base^x where model.rope_tables takes centre /
    base^x: two float32 roundings of one table, 1e-7 apart, which a float64 comparison of the
    blocks would measure. Here both sides compute the tables in float64 from float64 periods."""
    import transformers.models.dinov3_vit.modeling_dinov3_vit as hf

    centres = hf.get_patches_center_coordinates
    monkeypatch.setattr(
        hf,
        "get_patches_center_coordinates",
        lambda h, w, dtype, device: centres(h, w, dtype=torch.float64, device=device),
    )
    rope, cfg = s.backbone.rope_embeddings, s.backbone.config
    rope.inv_freq = 1 / rope.base ** torch.arange(0, 1, 4 / rope.head_dim, dtype=torch.float64)
    n = cfg.hidden_size // cfg.num_attention_heads // 4  # model.rope_periods, in float64
    s.rope_periods = cfg.rope_theta ** (2 * torch.arange(n, dtype=torch.float64) / (2 * n))


# --------------------------------------------------------------------------------------------
# Shapes and the single backbone pass of E4


@pytest.mark.parametrize("kind", model.KINDS)
@pytest.mark.parametrize("hw", [(128, 128), (96, 160)])
def test_feature_and_logit_shapes_and_one_backbone_pass_for_fp(tiny, kind, hw):
    s, (H, W) = tiny[kind], hw
    x = torch.randn(2, 3, H, W)
    widths = (
        (192, 192, 128) if kind == "clip" else (192, 192, 192)
    )  # CLIP f3 is the 128-d projection
    calls, handle = count_backbone_passes(s)
    try:
        with torch.no_grad():
            assert [tuple(f.shape) for f in s.features(x)] == [
                (2, c, H // 16, W // 16) for c in widths
            ]
            assert s(x).shape == (2, N, H, W)
            assert len(calls) == 2
            out = split(s(x, fp_from=0), len(x))
        assert len(calls) == 3, "clean and FP logits must share ONE backbone pass (E4)"
    finally:
        handle.remove()
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].shape == out[1].shape == (2, N, H, W)


def test_fp_from_perturbs_only_the_tail_of_the_batch(tiny64):
    """The clean logits are those of the plain forward; the FP logits are of x[fp_from:] only, and
    perturbed (Dropout2d on the tapped maps), so they differ from the clean ones of the same images.
    In float64: the head runs a batch of 5 against one of 3, which rounds its sums otherwise."""
    s, x = tiny64["dinov3"], torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(1)
        clean, pert = split(s(x, fp_from=1), len(x))
        plain = s(x)
    assert clean.shape == (3, N, 64, 64) and pert.shape == (2, N, 64, 64)
    helpers.assert_close(clean, plain, what="FP clean half vs plain forward")  # not perturbed
    assert (pert - plain[1:]).abs().amax() > 1e-3  # the tail is


# --------------------------------------------------------------------------------------------
# Base size, random init: the numbers of the paper's architecture


TINY = weights.SIZES["tiny"]


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        students = {
            "clip": helpers.student("clip", N, size="base", guidance="queries"),
            "dinov3": helpers.student("dinov3", N, size="base"),
        }
    return students, [str(w.message) for w in caught]


def attention_names(kind, depth=12):
    if kind == "clip":
        return {
            f"vision_model.encoder.layers.{i}.self_attn.{p}_proj.{w}"
            for i in range(depth)
            for p in ("q", "k", "v", "out")
            for w in ("weight", "bias")
        }
    # DINOv3: no key bias (the released model has none), every other projection has one. The blocks
    # are `model.layer` from transformers 5.2 on, `layer` before.
    import transformers.models.dinov3_vit.modeling_dinov3_vit as m

    prefix = "model.layer" if hasattr(m, "DINOv3ViTEncoder") else "layer"
    return {
        f"{prefix}.{i}.attention.{p}_proj.{w}"
        for i in range(depth)
        for p, ws in [
            ("q", ("weight", "bias")),
            ("k", ("weight",)),
            ("v", ("weight", "bias")),
            ("o", ("weight", "bias")),
        ]
        for w in ws
    }


def test_base_random_init_warns_that_weights_are_random(base):
    _, messages = base
    for kind in model.KINDS:
        assert any("RANDOM backbone weights" in m and kind in m for m in messages)


@pytest.mark.parametrize("kind,head_params", [("clip", 2_217_185), ("dinov3", 2_249_953)])
def test_base_head_parameter_count_matches_method(base, kind, head_params):
    assert sum(p.numel() for p in base[0][kind].head.parameters()) == head_params


@pytest.mark.parametrize("kind,count", [("clip", 28_348_416), ("dinov3", 28_339_200)])
def test_base_trainable_backbone_is_exactly_the_attention_projections(base, kind, count):
    bb = base[0][kind].backbone
    trainable = {n: p for n, p in bb.named_parameters() if p.requires_grad}
    assert set(trainable) == attention_names(kind)
    assert sum(p.numel() for p in trainable.values()) == count


def test_base_taps_queries_and_feature_widths(base):
    clip, dino = base[0]["clip"], base[0]["dinov3"]
    assert clip.taps == (0, 4, 11) and dino.taps == (2, 7, 11)
    # implicit guidance: learnable N x 768 queries, init N(0, 0.02)
    q = dino.queries.weight
    assert q.shape == (N, 768) and q.requires_grad and 0.015 < q.std().item() < 0.025
    assert dino.text is None
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert [f.shape[1] for f in clip.features(x)] == [
            768,
            768,
            512,
        ]  # f3: the 512-d dense CLIP embedding
        assert [f.shape[1] for f in dino.features(x)] == [768, 768, 768]


def test_base_configs_have_no_dropout_and_dinov3_train_mode_is_deterministic(base):
    for s in base[0].values():
        drops = {k: v for k, v in s.backbone.config.to_dict().items() if "drop" in k}
        assert drops and all(v in (0, 0.0, None) for v in drops.values()), drops
    dino = base[0]["dinov3"]
    cfg = dino.backbone.config
    assert (
        cfg.pos_embed_rescale is None
        and cfg.pos_embed_shift is None
        and cfg.pos_embed_jitter is None
    )
    dino.train()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, b = dino.features(x), dino.features(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b)), (
        "RoPE augmentation must be off in train mode"
    )


@needs_authors_files
def test_base_clip_with_text_file_holds_fixed_unit_text_embeddings():
    path = EMB / "potsdam_conceptavg5_single.npy"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = helpers.student(
            "clip",
            N,
            size="base",
            text=text.class_embeddings(POTSDAM, size="base", file=str(path))[0],
        )
    rows = torch.from_numpy(np.load(path)).float()
    assert s.queries is None and s.text.shape == (N, 512)
    assert torch.equal(s.text, F.normalize(rows, dim=-1))  # the same normalisation
    assert "text" in s.state_dict()  # saved with the checkpoint, never trained
    assert not any(p is s.text for p in s.parameters())
    trainable = {n for n, p in s.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not n.startswith("head.")} == {
        "backbone." + n for n in attention_names("clip")
    }
    assert sum(p.numel() for p in s.head.parameters()) == 2_217_185


def test_clip_with_query_guidance_learns_queries_in_the_projection_space():
    s = helpers.student("clip", N, size="tiny", guidance="queries")
    assert (
        s.text is None
        and s.queries.weight.shape == (N, TINY.proj)
        and s.queries.weight.requires_grad
    )


# --------------------------------------------------------------------------------------------
# E1: what the pyramid maps are


def as_map(tokens, h, w):
    """(B, 1+h*w, C) tokens after the prefix has been cut -> (B, C, h, w), patches in row-major order."""
    return tokens.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)


def test_clip_maps_are_the_value_path_by_hand(tiny64):
    """In float64: ours (cached position table, our loop) and transformers' forward sum alike only
    up to rounding."""
    s = tiny64["clip"]
    bb, vm = s.backbone, s.backbone.vision_model
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)  # non-square: interpolated 4x6 grid
    with torch.no_grad():
        feats = s.features(x)
        hs = bb(
            pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=True
        ).hidden_states
        # HF convention: hs[0] is the input of block 0 (embeddings -> pre_layrnorm), hs[i+1] the output of block i
        helpers.assert_close(
            hs[0], vm.pre_layrnorm(vm.embeddings(x, interpolate_pos_encoding=True)), what="hs[0]"
        )

        def value_path(i):  # E1: v = x + out(v(LN1 x)); v = v + MLP(LN2 v), no token mixing
            layer, h = vm.encoder.layers[i], hs[i]
            v = h + layer.self_attn.out_proj(layer.self_attn.v_proj(layer.layer_norm1(h)))
            return v + layer.mlp(layer.layer_norm2(v))

        t1, t2, t3 = s.taps
        expect = [
            value_path(t1)[:, 1:],
            value_path(t2)[:, 1:],
            F.normalize(bb.visual_projection(vm.post_layernorm(value_path(t3))), dim=-1)[:, 1:],
        ]
    for f, e in zip(feats, expect):
        helpers.assert_close(f, as_map(e, 4, 6), what="CLIP maps vs value path by hand")
    helpers.assert_close(feats[2].norm(dim=1), torch.ones(1, 4, 6), what="unit per pixel")
    # the value path is NOT the ordinary block output (which mixes tokens through attention)
    assert not torch.allclose(feats[0], as_map(hs[t1 + 1][:, 1:], 4, 6), atol=1e-3)


def test_dinov3_maps_are_final_norm_of_tapped_blocks_without_prefix_tokens(tiny64, monkeypatch):
    """In float64, the RoPE tables too (rope_in_float64)."""
    s = copy.deepcopy(tiny64["dinov3"]).eval()
    rope_in_float64(s, monkeypatch)
    bb = s.backbone
    assert bb.config.num_register_tokens == 4
    with torch.no_grad():
        for block in weights.blocks(
            bb
        ):  # random init has layer scale 1e-5: make every block visibly change the tokens
            block.layer_scale1.lambda1.fill_(1.0)
            block.layer_scale2.lambda1.fill_(1.0)
        x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
        feats = s.features(x)
        hs = bb(x, output_hidden_states=True).hidden_states
        # HF convention: hs[0] = embeddings (CLS + 4 registers + patches), hs[i+1] = output of block i
        assert len(hs) == TINY.depth + 1
        helpers.assert_close(hs[0], bb.embeddings(x), what="DINOv3 hs[0]")
        for f, t in zip(feats, s.taps):
            helpers.assert_close(
                f, as_map(bb.norm(hs[t + 1])[:, 1 + 4 :], 4, 6), what="DINOv3 maps vs transformers"
            )
            # off by one block, or keeping a register token, would be visible
            assert not torch.allclose(f, as_map(bb.norm(hs[t])[:, 1 + 4 :], 4, 6), atol=1e-3)
            assert not torch.allclose(f, as_map(bb.norm(hs[t + 1])[:, 4:-1], 4, 6), atol=1e-3)


# --------------------------------------------------------------------------------------------
# Loading weights from a local folder, and its errors


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random CLIP (vision + text + toy tokenizer) and a tiny DINOv3 written with save_pretrained."""
    from transformers import CLIPConfig, CLIPModel, DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(1)
    vit = dict(  # both students' tiny ViT, in HF's names
        hidden_size=TINY.width,
        num_hidden_layers=TINY.depth,
        num_attention_heads=TINY.heads,
        intermediate_size=TINY.mlp,
    )
    vision = dict(vit, patch_size=16, image_size=224, projection_dim=TINY.proj)
    clip = CLIPModel(
        CLIPConfig(
            vision_config=vision,
            text_config=dict(TEXT, projection_dim=TINY.proj),
            projection_dim=TINY.proj,
        )
    )
    clip_dir = str(tmp_path_factory.mktemp("clip"))
    clip.save_pretrained(clip_dir)
    tiny_clip_tokenizer().save_pretrained(clip_dir)
    # Like the released checkpoint: registers, layer scale 1 and HF's default train-time RoPE rescaling (2.0)
    dino = DINOv3ViTModel(DINOv3ViTConfig(**vit, num_register_tokens=4, pos_embed_rescale=2.0))
    dino_dir = str(tmp_path_factory.mktemp("dinov3"))
    dino.save_pretrained(dino_dir)
    return {"clip": (clip_dir, clip.state_dict()), "dinov3": (dino_dir, dino.state_dict())}


def test_loaded_clip_backbone_equals_the_saved_weights(saved, tmp_path):
    folder, sd = saved["clip"]
    rows = torch.randn(N, TINY.proj)
    np.save(tmp_path / "text.npy", rows.numpy())
    t, source = text.class_embeddings(
        POTSDAM, size="tiny", clip_weights=folder, file=str(tmp_path / "text.npy")
    )
    assert source.startswith("file")  # a file wins over the weights' text tower
    s = helpers.student("clip", N, size="tiny", weights=folder, text=t)
    loaded = s.backbone.state_dict()
    vision_keys = {k for k in sd if k.startswith(("vision_model.", "visual_projection."))}
    assert set(loaded) == vision_keys
    for k, v in loaded.items():
        assert torch.equal(v, sd[k]), f"{k} differs from the saved checkpoint"
    assert torch.equal(s.text, F.normalize(rows, dim=-1))  # the same normalisation
    assert {n for n, p in s.backbone.named_parameters() if p.requires_grad} == attention_names(
        "clip", TINY.depth
    )


def test_loaded_dinov3_backbone_equals_the_saved_weights_with_rope_augmentation_off(saved):
    folder, sd = saved["dinov3"]
    s = helpers.student("dinov3", N, size="tiny", weights=folder)
    loaded = s.backbone.state_dict()
    assert set(loaded) == set(sd)
    for k, v in loaded.items():
        assert torch.equal(v, sd[k]), (
            f"{k} differs from the saved checkpoint (re-initialised after loading?)"
        )
    assert {n for n, p in s.backbone.named_parameters() if p.requires_grad} == attention_names(
        "dinov3", TINY.depth
    )
    assert s.backbone.config.pos_embed_rescale is None  # overridden at load time
    s.train()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(s.features(x), s.features(x)))


def test_clip_folder_with_toy_tokenizer_is_rejected(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("CO2S_CACHE", str(tmp_path))
    folder, _ = saved["clip"]
    with pytest.raises(UserError, match="has only 514 tokens: not the real vocabulary") as e:
        text.class_embeddings([["car"], ["tree"]], size="tiny", clip_weights=folder)
    assert folder in str(e.value)
    assert not (tmp_path / "text").exists() or not any(
        (tmp_path / "text").iterdir()
    )  # nothing cached


def test_text_embeddings_are_computed_once_then_read_from_the_cache(saved, tmp_path, monkeypatch):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    folder, _ = saved["clip"]
    monkeypatch.setenv("CO2S_CACHE", str(tmp_path))
    monkeypatch.setattr(
        CLIPTokenizer, "__len__", lambda self: 49408
    )  # let the toy vocabulary pass as the real one
    encode, calls = text.encode_concepts, []
    monkeypatch.setattr(text, "encode_concepts", lambda *a: calls.append(a[0]) or encode(*a))
    a, b = [["car", "van"], ["tree"]], [["car"], ["tree", "park tree"]]
    first_a, first_b = (
        weights.text_embeddings(a, folder, model.encode_concepts, model.PROMPT),
        weights.text_embeddings(b, folder, model.encode_concepts, model.PROMPT),
    )
    assert (
        calls == [a, b] and len(list((tmp_path / "text").glob("*.pt"))) == 2
    )  # the key includes the concepts
    # computed with the folder's own text tower: the same eager computation, so bit-identical
    tower = CLIPTextModelWithProjection.from_pretrained(folder)
    assert torch.equal(first_a, encode(a, tower, tiny_clip_tokenizer()))
    # second time: read from disk, no model is even loaded
    monkeypatch.setattr(
        weights, "load_pretrained", lambda *a, **k: pytest.fail("cached embeddings were recomputed")
    )
    assert torch.equal(
        weights.text_embeddings(a, folder, model.encode_concepts, model.PROMPT), first_a
    )
    assert torch.equal(
        weights.text_embeddings(b, folder, model.encode_concepts, model.PROMPT), first_b
    )
    assert calls == [a, b]


def _in_hub_cache(repo_id):
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


@pytest.mark.parametrize("kind", model.KINDS)
def test_hub_id_without_network_names_the_id_and_the_local_folder_flag(kind):
    hub_id = weights.DEFAULT_WEIGHTS[kind]
    if _in_hub_cache(hub_id):
        pytest.skip(f"{hub_id} is in the local hub cache, so it would load")
    with pytest.raises(UserError) as e:
        weights.build_backbone(kind, "base", hub_id)
    msg = str(e.value)
    assert hub_id in msg and f"--{kind}-weights" in msg and "hf download" in msg


def test_missing_or_empty_local_folder_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "no-such-folder")
    with pytest.raises(UserError, match="does not exist") as e:
        weights.build_backbone("clip", "tiny", missing)
    assert missing in str(e.value) and "--clip-weights" in str(e.value)
    with pytest.raises(ValueError, match="no config.json") as e:
        weights.build_backbone("dinov3", "tiny", str(tmp_path))
    assert "--dinov3-weights" in str(e.value)


@pytest.mark.parametrize("kind,other", [("clip", "dinov3"), ("dinov3", "clip")])
def test_folder_of_the_other_kind_is_rejected(saved, kind, other):
    with pytest.raises(ValueError, match=f"not a {kind} one") as e:
        weights.build_backbone(kind, "tiny", saved[other][0])
    assert f"--{kind}-weights" in str(e.value)


@pytest.mark.parametrize("kind", model.KINDS)
def test_folder_of_the_wrong_width_is_rejected(saved, kind):
    with pytest.raises(ValueError, match="has width 192, but --size base expects 768"):
        weights.build_backbone(kind, "base", saved[kind][0])


# --------------------------------------------------------------------------------------------
# E2: text embeddings


def _npy(name):
    return torch.from_numpy(np.load(EMB / name)).float()


@needs_authors_files
def test_average_concepts_reproduces_the_authors_class_embeddings():
    concepts = _npy("potsdam_concept5_single.npy")  # (36, 512): 6 concepts per class
    authors = F.normalize(_npy("potsdam_conceptavg5_single.npy"), dim=-1)
    counts = [len(c) for c in POTSDAM]
    ours = text.average_concepts(concepts, counts)
    assert ours.shape == (N, 512)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(N), atol=1e-5)
    assert ((ours * authors).sum(-1) > 0.999).all()
    # rows are grouped by class, class name first (it equals the authors' name-only embedding) ...
    names = F.normalize(_npy("potsdam_single.npy"), dim=-1)
    assert ((F.normalize(concepts[::6], dim=-1) * names).sum(-1) > 0.999).all()
    # ... so the order matters: swapping two classes' concepts swaps their rows, interleaving breaks it
    swapped = torch.cat([concepts[6:12], concepts[:6], concepts[12:]])
    # per-class sums of the same rows: the same bits, in the swapped order
    assert torch.equal(text.average_concepts(swapped, counts), ours[[1, 0, 2, 3, 4, 5]])
    interleaved = concepts.view(6, 6, 512).transpose(0, 1).reshape(36, 512)
    assert ((text.average_concepts(interleaved, counts) * authors).sum(-1) < 0.99).all()


@needs_authors_files
def test_load_text_embeddings_checks_the_shape_and_normalises(tmp_path):
    path = str(EMB / "potsdam_conceptavg5_single.npy")
    t = weights.load_text_embeddings(path, N, 512)
    assert t.shape == (N, 512) and t.dtype == torch.float32
    assert torch.allclose(t.norm(dim=-1), torch.ones(N), atol=1e-6)
    for n, d in [(7, 512), (N, 768)]:
        with pytest.raises(UserError, match="one row per class") as e:
            weights.load_text_embeddings(path, n, d)
        assert path in str(e.value) and f"({n}, {d})" in str(e.value)
    torch.save(3 * torch.ones(2, 4), tmp_path / "t.pt")  # .pt files work too, and are normalised
    assert torch.allclose(
        weights.load_text_embeddings(str(tmp_path / "t.pt"), 2, 4), torch.full((2, 4), 0.5)
    )
    with pytest.raises(UserError, match="does not exist"):
        weights.load_text_embeddings(str(tmp_path / "none.npy"), N, 512)


def test_average_concepts_averages_the_raw_embeddings_then_normalises_as_the_authors_do():
    e = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])  # class 0: two concepts of norms 1 and 3
    out = text.average_concepts(e, [2, 1])
    assert torch.allclose(
        out[0], F.normalize(torch.tensor([0.5, 1.5]), dim=0)
    )  # not the mean of unit rows (45 deg)
    assert torch.allclose(out[1], F.normalize(torch.tensor([1.0, 1.0]), dim=0))


def test_encode_concepts_averages_the_prompt_embeddings_of_each_class():
    """In float64 (helpers.F64_BOUND): a padded batch of prompts and one prompt at a time are two
    computations of the same embeddings (the padding is masked out)."""
    tower, tok = random_text_tower()
    tower = helpers.float64(tower)
    concepts = [["car", "passenger car", "parked vehicle"], ["tree"], ["low_vegetation", "grass"]]
    e = text.encode_concepts(concepts, tower, tok)
    assert e.shape == (3, TINY.proj) and e.dtype == torch.float64
    helpers.assert_close(e.norm(dim=-1), torch.ones(3), what="unit text rows")
    # one prompt "a photo of a {concept}" at a time (no padding), then averaged: the same, so padding changes nothing
    with torch.no_grad():
        raw = torch.cat(
            [
                tower(**tok([f"a photo of a {c}"], return_tensors="pt")).text_embeds
                for cls in concepts
                for c in cls
            ]
        )
    helpers.assert_close(e, text.average_concepts(raw, [3, 1, 2]), what="padded vs one prompt")
    assert not torch.allclose(e[0], F.normalize(raw[0], dim=-1), atol=1e-3)  # the synonyms do count
    one = text.encode_concepts([["car"]], tower, tok)[0]
    helpers.assert_close(one, F.normalize(raw[0], dim=-1), what="one concept vs one prompt")
    # a random tower is why a CLIP student without weights gets stand-in rows: its prompts collapse
    assert (e @ e.T).min() > 0.8


def test_a_clip_student_without_weights_gets_separated_deterministic_stand_in_rows():
    t, source = text.class_embeddings(POTSDAM, size="tiny")
    assert source.startswith("stand-in") and t.shape == (N, TINY.proj)
    assert torch.allclose(t.norm(dim=1), torch.ones(N), atol=1e-6)
    assert (t @ t.T - torch.eye(N)).abs().max() < 0.4  # distinct directions (a random tower: > 0.8)
    assert torch.equal(t, text.class_embeddings(POTSDAM, size="tiny")[0])  # the same every run


# --------------------------------------------------------------------------------------------
# E10: fusion


def test_fuse_takes_the_more_confident_student_per_pixel():
    # 2 classes, a 1x2 image: student a is confident on pixel 0, student b on pixel 1
    a = torch.tensor([[[[0.90, 0.40]], [[0.10, 0.60]]]])  # (1, 2, 1, 2)
    b = torch.tensor([[[[0.30, 0.05]], [[0.70, 0.95]]]])
    for fused in (
        model.fuse([a, b]),
        model.fuse([b, a]),
    ):  # the order of the students does not matter
        assert torch.equal(fused[..., 0], a[..., 0]) and torch.equal(fused[..., 1], b[..., 1])
        assert torch.equal(
            fused.amax(1), torch.maximum(a.amax(1), b.amax(1))
        )  # C_fused = max(c_a, c_b)
    assert torch.equal(model.fuse([a, b], "mean"), (a + b) / 2)  # one rounded sum, an exact halving
    with pytest.raises(ValueError, match="valid: confidence, mean"):
        model.fuse([a, b], "max")


def test_fuse_of_two_students_is_a_distribution_that_follows_the_more_confident(tiny):
    students = [tiny["clip"], tiny["dinov3"]]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        own = [s(x).softmax(1) for s in students]
    fused, mean = model.fuse(own), model.fuse(own, "mean")
    assert torch.allclose(fused.sum(1), torch.ones(1, 64, 64), atol=1e-5)
    first = own[0].amax(1) >= own[1].amax(1)  # (1, 64, 64)
    assert torch.equal(fused, torch.where(first[:, None], own[0], own[1]))
    assert torch.equal(mean, (own[0] + own[1]) / 2)  # one rounded sum, an exact halving
    with pytest.raises(ValueError, match="valid: confidence, mean"):
        model.Co2S(students, fusion="max")


def test_student_names_are_unique():
    assert model.student_names(["clip", "dinov3"]) == ["clip", "dinov3"]
    assert model.student_names(["clip", "clip"]) == ["clip1", "clip2"]


# --------------------------------------------------------------------------------------------
# Training: what moves, what does not; E4


def _name(module, param):
    return next(n for n, p in module.named_parameters() if p is param)


@pytest.mark.parametrize("kind", model.KINDS)
def test_one_step_moves_attention_and_head_and_leaves_frozen_weights_bit_identical(tiny, kind):
    s = copy.deepcopy(tiny[kind])
    before = {k: v.clone() for k, v in s.state_dict().items()}
    trainable = {n for n, p in s.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in s.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, N, (2, 64, 64))
    clean, pert = split(s(x, fp_from=0), len(x))
    (supervised_loss(clean, y) + supervised_loss(pert, y)).backward()
    opt.step()
    after = s.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trainable, (
        f"frozen weights or buffers moved: {sorted(changed - trainable)[:5]}"
    )
    assert {n for n in trainable if n.startswith("head.")} <= changed
    # every attention projection on the path to the taps moves (CLIP's last tap uses only v and out)
    last = s.taps[-1]
    for i, block in enumerate(weights.blocks(s.backbone)[: last + 1]):
        projs = model.attention_projections(block)
        if kind == "clip" and i == last:
            projs = projs[2:]
        for proj in projs:
            assert not torch.equal(proj.weight, before[_name(s, proj.weight)]), f"block {i} {proj}"
    if kind == "dinov3":
        assert "queries.weight" in changed


@pytest.mark.parametrize("kind", model.KINDS)
def test_from_scratch_every_backbone_weight_on_the_path_learns(kind):
    """--train-backbone all (students with random weights): embeddings, norms and MLPs get gradients too; CLIP's
    position table, otherwise a cached constant, is then recomputed with its gradient."""
    torch.manual_seed(0)
    s = helpers.student(
        kind, N, size="tiny", text=text.stand_in_embeddings(N, TINY.proj), train_backbone="all"
    )
    supervised_loss(s(torch.randn(2, 3, 64, 80)), torch.randint(0, N, (2, 64, 80))).backward()
    first = weights.blocks(s.backbone)[0]
    if kind == "clip":
        vm = s.backbone.vision_model
        params = [
            vm.embeddings.position_embedding.weight,
            vm.embeddings.patch_embedding.weight,
            vm.post_layernorm.weight,
        ]
    else:
        params = [s.backbone.embeddings.patch_embeddings.weight, s.backbone.norm.weight]
    for p in params + list(first.mlp.parameters()) + [next(first.parameters())]:
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", model.KINDS)
def test_fp_logits_are_the_head_on_dropout2d_of_the_same_features(tiny64, kind, monkeypatch):
    """In float64: the head's batch of 2B rounds its sums unlike one of B."""
    s, x = tiny64[kind], torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(123)
        clean, pert = split(s(x, fp_from=0), len(x))
        # the clean half is the plain forward
        helpers.assert_close(clean, s(x), what="FP clean half vs plain forward")
        torch.manual_seed(123)  # E4: Dropout2d(0.5) on every map, same RNG draws
        feats = [F.dropout2d(f, 0.5, training=True) for f in s.features(x)]
        ref = F.interpolate(
            s.head(feats, s.class_embeddings()), size=(64, 64), mode="bilinear", align_corners=False
        )
        helpers.assert_close(pert, ref, what="FP half vs head on Dropout2d by hand")
        assert not torch.allclose(pert, clean, atol=1e-3)
        monkeypatch.setattr(
            F, "dropout2d", lambda f, *a, **k: f
        )  # without the dropout, FP == clean
        clean, pert = split(s(x, fp_from=0), len(x))
        helpers.assert_close(pert, clean, what="FP without dropout vs clean")


def test_build_student_rejects_bad_arguments_listing_the_choices():
    with pytest.raises(ValueError, match="valid kinds: clip, dinov3"):
        helpers.student("vit", N, size="tiny")
    dino = helpers.student(
        "dinov3", N, size="tiny", guidance="text"
    )  # the choice is the CLIP student's
    assert dino.queries is not None and dino.text is None
    with pytest.raises(ValueError, match="valid: text, queries"):
        helpers.student("clip", N, size="tiny", guidance="both")
    with pytest.raises(ValueError, match=r"needs its \(6, 128\) class embeddings, got \(5, 128\)"):
        helpers.student("clip", N, size="tiny", text=torch.randn(5, 128))
    with pytest.raises(ValueError, match="got None"):
        helpers.student("clip", N, size="tiny")
    with pytest.raises(ValueError, match="valid sizes: base, tiny"):
        helpers.student("dinov3", N, size="small")


@pytest.mark.parametrize("kind", model.KINDS)
def test_grad_checkpoint_gives_the_same_gradients(kind):
    """--grad-checkpoint recomputes the blocks in backward: a memory option that must not change the
    maths. In float64 (helpers.F64_BOUND), gradients against the whole gradient's size where they
    cancel (helpers.assert_same_gradients)."""
    torch.manual_seed(0)
    s = helpers.student(kind, N, size="tiny", text=text.stand_in_embeddings(N, TINY.proj)).train()
    s, x = helpers.float64(s), torch.randn(2, 3, 64, 64, dtype=torch.float64)
    grads = []
    for flag in (False, True):
        s.grad_checkpoint = flag
        s.zero_grad(set_to_none=True)
        s(x).logsumexp(1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(
        "attention" in n or "self_attn" in n for n in grads[0]
    )
    helpers.assert_same_gradients(grads[1], grads[0], what="grad checkpoint vs plain gradients")


# --------------------------------------------------------------------------------------------
# The fast path (position tables computed once per size, DINOv3's block written out) is the plain one


def _grads(s, feats):
    s.zero_grad(set_to_none=True)
    sum((f * torch.linspace(-1, 1, f.numel()).view_as(f)).sum() for f in feats).backward()
    return {n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", model.KINDS)
def test_fast_path_gives_the_plain_transformers_features_and_gradients(tiny64, kind, monkeypatch):
    """Plain path: the transformers model's own forward (hidden states), tapped as METHOD.md says.
    In float64 (and DINOv3's RoPE tables too: rope_in_float64); gradients against the whole
    gradient's size where they cancel (helpers.assert_same_gradients)."""
    s = copy.deepcopy(tiny64[kind]).train()
    if kind == "dinov3":
        rope_in_float64(s, monkeypatch)
    bb = s.backbone
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        for block in weights.blocks(bb):
            if kind == "dinov3":  # random init has layer scale 1e-5: make every block count
                block.layer_scale1.lambda1.fill_(1.0)
                block.layer_scale2.lambda1.fill_(1.0)
    ours = s.features(x)
    assert all(
        torch.equal(a, b) for a, b in zip(ours, s.features(x))
    )  # the cached tables: same again
    g_ours = _grads(s, ours)
    if kind == "dinov3":
        hs = bb(x, output_hidden_states=True).hidden_states
        plain = [as_map(bb.norm(hs[t + 1])[:, 5:], 4, 6) for t in s.taps]
    else:
        vm = bb.vision_model
        hs = bb(
            pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=True
        ).hidden_states
        plain = []
        for t in s.taps:
            layer, h = vm.encoder.layers[t], hs[t]
            v = h + layer.self_attn.out_proj(layer.self_attn.v_proj(layer.layer_norm1(h)))
            plain.append(v + layer.mlp(layer.layer_norm2(v)))
        plain[-1] = F.normalize(bb.visual_projection(vm.post_layernorm(plain[-1])), dim=-1)
        plain = [as_map(p[:, 1:], 4, 6) for p in plain]
    for a, b in zip(ours, plain):
        helpers.assert_close(a, b, what="fast path vs transformers features")
    g_plain = _grads(s, plain)
    helpers.assert_same_gradients(g_ours, g_plain, what="fast path vs transformers gradients")


def test_position_tables_follow_the_input_size_and_the_weights():
    s = helpers.student("clip", N, size="tiny", text=text.stand_in_embeddings(N, TINY.proj)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = s.features(x)
        assert s.features(torch.randn(1, 3, 96, 64))[0].shape[-2:] == (
            6,
            4,
        )  # another size: another table
        s.backbone.vision_model.embeddings.position_embedding.weight.mul_(
            2
        )  # new weights (load_state_dict does this)
        b = s.features(x)
    assert not torch.allclose(a[0], b[0], atol=1e-3), "a stale position table was used"


def test_dinov3_release_init_is_the_backbone_the_release_trains():
    """--dinov3-weights release-init: every parameter re-drawn with the authors' DINOv3 initialisers,
    layer scale 1e-5 and frozen, only attention trains; so each block barely moves its input."""
    torch.manual_seed(0)
    spec = model.ModelSpec(("dinov3",), N, size="tiny")
    s = model.build_student("dinov3", spec, weights=weights.RELEASE_INIT)
    bb, blocks = s.backbone, weights.blocks(s.backbone)
    for block in blocks:
        for ls in (block.layer_scale1.lambda1, block.layer_scale2.lambda1):
            assert torch.all(ls == 1e-5) and not ls.requires_grad
        assert torch.all(block.norm1.weight == 1) and torch.all(block.norm2.bias == 0)
        assert torch.all(block.mlp.up_proj.bias == 0) and torch.all(
            block.attention.o_proj.bias == 0
        )
    linear = torch.cat([b.mlp.up_proj.weight.flatten() for b in blocks])
    assert abs(linear.std().item() - 0.02) < 0.001 and linear.abs().max() < 0.2
    conv, bound = bb.embeddings.patch_embeddings, (1 / (3 * 16 * 16)) ** 0.5
    assert conv.weight.abs().max() <= bound and conv.weight.std() > 0.9 * bound / 3**0.5
    assert (
        torch.all(bb.embeddings.mask_token == 0)
        and abs(bb.embeddings.register_tokens.std() - 0.02) < 0.006
    )
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in bb.named_parameters() if ".attention." in n}
    h = torch.randn(1, 13, bb.config.hidden_size)
    cos, sin = model.rope_tables(s.rope_periods, 2, 4)
    moved = model.dinov3_block(blocks[0], h, cos, sin) - h
    assert 0 < moved.abs().max() < 1e-3 * h.abs().max()
    with pytest.raises(UserError, match="only the DINOv3 student"):
        weights.build_backbone("clip", "tiny", weights.RELEASE_INIT)
