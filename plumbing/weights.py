"""plumbing/weights.py: where the students' backbone weights and class embeddings come from.

The architecture is model.py's; this file builds the transformers backbone under it: at random
from a size preset (`SIZES`: ViT-B/16 for the paper, "tiny" for the CPU demo and tests), or loaded
with from_pretrained from a hub id or a local folder (with errors that say how to fix a missing,
gated or wrong checkpoint), with the numerics the run asked for: 'hf' runs the transformers
checkpoints as they are (CLIP: QuickGELU, LayerNorm eps 1e-5; DINOv3: fp32 RoPE), 'release' as
the authors' code ran them (CLIP inside an mmseg ViT: exact GELU, eps 1e-6; DINOv3: eps 1e-6, RoPE
from bf16 periods, rotated in bf16). Also the CLIP text tower that E2 runs (model.encode_concepts),
its on-disk cache, and precomputed class-embedding files.

The released code wiped the pretrained DINOv3 weights after loading them (METHOD.md section 7.3):
that student is built on request (`release_init`, `--dinov3-weights release-init`), never by
accident. Dropout and drop-path are off (as in the paper's recipe).
"""

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from plumbing.atomic import save_atomic
from plumbing.errors import UserError

NUMERICS = ("hf", "release")
# --dinov3-weights release-init: the DINOv3 student as the release trains it (release_init)
RELEASE_INIT = "release-init"
DEFAULT_WEIGHTS = {
    "clip": "openai/clip-vit-base-patch16",
    "dinov3": "facebook/dinov3-vitb16-pretrain-lvd1689m",
}


@dataclass
class ViTSize:
    width: int = 768  # ViT-B/16
    depth: int = 12
    heads: int = 12
    mlp: int = 3072
    proj: int = 512  # CLIP joint image-text space (the dense embedding and text embeddings)
    registers: int = 4  # DINOv3 register tokens
    # CLIP: position grid image_size / 16 a side (a release stores it at the crop)
    image_size: int = 224


# "tiny" is the same code with smaller numbers: a CPU preset for tests and the demo.
SIZES = {"base": ViTSize(), "tiny": ViTSize(width=192, depth=4, heads=3, mlp=768, proj=128)}


def vit_preset(size):
    """A preset name, or the ViTSize fields themselves (a converted release: vit_size)."""
    if isinstance(size, dict):
        return ViTSize(**size)
    if size not in SIZES:
        raise UserError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    return SIZES[size]


def vit_size(backbones):
    """The ViTSize fields that rebuild these backbones (kind, backbone pairs; a converted
    release)."""
    size = {}
    for kind, bb in backbones:
        c = bb.config
        size.update(
            width=c.hidden_size,
            depth=c.num_hidden_layers,
            heads=c.num_attention_heads,
            mlp=c.intermediate_size,
        )
        size.update(
            dict(proj=c.projection_dim, image_size=c.image_size)
            if kind == "clip"
            else dict(registers=c.num_register_tokens)
        )
    return size


# --------------------------------------------------------------------------------------------
# Configs and loading: built at random from a preset, or loaded with from_pretrained


def numerics_config(kind, numerics):
    """Config overrides of a numerics choice (see the module docstring); 'hf' keeps the
    checkpoint's own."""
    if numerics not in NUMERICS:
        raise UserError(f"unknown numerics {numerics!r}; valid: {', '.join(NUMERICS)}")
    if numerics == "hf":
        return {}
    return (
        dict(hidden_act="gelu", layer_norm_eps=1e-6)
        if kind == "clip"
        else dict(layer_norm_eps=1e-6)
    )


def backbone_config(kind, s, numerics="hf"):
    """The transformers config of a random-init backbone of ViTSize s (dropout and drop-path
    off)."""
    from transformers import CLIPVisionConfig, DINOv3ViTConfig

    common = dict(
        hidden_size=s.width,
        num_hidden_layers=s.depth,
        num_attention_heads=s.heads,
        intermediate_size=s.mlp,
        patch_size=16,
        attention_dropout=0.0,
    )
    if kind == "clip":
        cfg = dict(common, projection_dim=s.proj, image_size=s.image_size, hidden_act="quick_gelu")
        return CLIPVisionConfig(**{**cfg, **numerics_config(kind, numerics)})
    # RoPE coordinate augmentation off so train mode is deterministic.
    return DINOv3ViTConfig(
        **common,
        num_register_tokens=s.registers,
        layerscale_value=1.0,
        drop_path_rate=0.0,
        pos_embed_shift=None,
        pos_embed_jitter=None,
        pos_embed_rescale=None,
        **numerics_config(kind, numerics),
    )


def _model_types(kind):
    return ("clip", "clip_vision_model") if kind == "clip" else ("dinov3_vit",)


def load_pretrained(cls, kind, weights, what="backbone", **overrides):
    """`cls.from_pretrained(weights)` with errors that say what was tried and how to fix it.

    `weights` is a hub id or a local folder (a `save_pretrained` / `hf download` folder). Missing
    weights are an error, never a silent random init."""
    flag = f"--{kind}-weights"
    weights = os.path.expanduser(weights)
    local = os.path.isdir(weights)
    if local:
        cfg_path = os.path.join(weights, "config.json")
        if not os.path.isfile(cfg_path):
            raise UserError(
                f"{weights!r} is not a transformers checkpoint folder (no config.json); "
                f"pass a folder written by save_pretrained or `hf download` to {flag}"
            )
        with open(cfg_path) as f:
            model_type = json.load(f).get("model_type")
        if model_type not in _model_types(kind):
            raise UserError(
                f"{weights!r} holds a {model_type!r} checkpoint, not a {kind} one "
                f"(expected model_type in {_model_types(kind)}); check {flag}"
            )
    elif weights.startswith((".", "/", "~")) or weights.count("/") > 1:
        raise UserError(f"{flag}: local folder {weights!r} does not exist")
    try:
        model, info = cls.from_pretrained(weights, output_loading_info=True, **overrides)
    except (OSError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        gated = any(w in str(e).lower() for w in ("gated", "401", "403", "access to model"))
        hint = (
            " This repository is gated: accept Meta's DINOv3 licence on its hub page, run `hf auth "
            "login`, or download it elsewhere and pass the folder."
            if gated
            else ""
        )
        raise UserError(
            f"could not load the {kind} {what} from {weights!r} ({type(e).__name__}: {reason}).{hint} "
            f"Without network access, download it once (`hf download {DEFAULT_WEIGHTS[kind]} --local-dir DIR`) "
            f"and pass {flag} DIR, or set HF_HUB_OFFLINE=1 with a filled hub cache."
        ) from e
    if info["missing_keys"] or info["mismatched_keys"]:
        raise UserError(
            f"{weights!r} is not a complete {kind} {what}: missing "
            f"{sorted(info['missing_keys'])[:5]} mismatched {info['mismatched_keys'][:5]}"
        )
    return model


def build_backbone(kind, size="base", weights=None, numerics="hf"):
    """The backbone of `kind`: random (weights None), loaded (a hub id or folder), or for DINOv3
    RELEASE_INIT: what the release trains (release_init)."""
    from transformers import CLIPVisionModelWithProjection, DINOv3ViTModel

    cls = CLIPVisionModelWithProjection if kind == "clip" else DINOv3ViTModel
    if weights == RELEASE_INIT:
        if kind != "dinov3":
            raise UserError(
                f"--{kind}-weights {RELEASE_INIT}: only the DINOv3 student was re-initialised "
                f"by the release; the {kind} student keeps its pretrained weights"
            )
        return release_init(cls(backbone_config(kind, vit_preset(size), numerics)))
    if weights is None:
        if size == "base":
            warnings.warn(
                f"building the base {kind} student with RANDOM backbone weights (weights=None): "
                f"fine for tests, useless for reproducing the paper (default {DEFAULT_WEIGHTS[kind]})"
            )
        return cls(backbone_config(kind, vit_preset(size), numerics))
    overrides = dict(attention_dropout=0.0, **numerics_config(kind, numerics))
    if kind == "dinov3":
        overrides.update(
            drop_path_rate=0.0, pos_embed_shift=None, pos_embed_jitter=None, pos_embed_rescale=None
        )
    model = load_pretrained(cls, kind, weights, **overrides)
    if model.config.hidden_size != vit_preset(size).width:
        raise UserError(
            f"{weights!r} has width {model.config.hidden_size}, but --size {size} expects "
            f"{vit_preset(size).width}; pick the matching --size or checkpoint"
        )
    return model


def release_init(backbone):
    """A DINOv3 backbone as the release trains it. The authors' wrapper loads the pretrained weights
    in its constructor, then mmcv's `init_weights` (model/builder.py) re-draws every parameter with
    their DINOv3 initialisers (third_party/dinov3: init_weights, init_weights_vit, PatchEmbed and
    LayerScale reset_parameters): linear weights truncated normal std 0.02 and biases 0; LayerNorms
    1 and 0; the patch embedding's weight and bias uniform +-sqrt(1 / (3 * 16 * 16)); CLS and register
    tokens normal std 0.02; the mask token 0; layer scale 1e-5. The loaded weights do not survive,
    so none are loaded here. With the paper's trainable set only attention trains: the layer scale
    stays 1e-5, so every residual branch is scaled by 1e-5 for the whole run."""
    with torch.no_grad():
        emb = backbone.embeddings
        torch.nn.init.normal_(emb.cls_token, std=0.02)
        torch.nn.init.normal_(emb.register_tokens, std=0.02)
        torch.nn.init.zeros_(emb.mask_token)
        conv = emb.patch_embeddings
        bound = math.sqrt(1 / (conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]))
        for p in (conv.weight, conv.bias):
            torch.nn.init.uniform_(p, -bound, bound)
        for m in backbone.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)
            elif isinstance(m, torch.nn.LayerNorm):
                torch.nn.init.ones_(m.weight)
                torch.nn.init.zeros_(m.bias)
        for block in blocks(backbone):
            block.layer_scale1.lambda1.fill_(1e-5)
            block.layer_scale2.lambda1.fill_(1e-5)
    return backbone


def blocks(backbone):
    """The list of transformer blocks (CLIP: encoder.layers; DINOv3: model.layer, or layer before
    transformers 5.2)."""
    if hasattr(backbone, "vision_model"):
        return backbone.vision_model.encoder.layers
    return backbone.model.layer if hasattr(backbone, "model") else backbone.layer


# --------------------------------------------------------------------------------------------
# Class embeddings: E2's text tower (cached on disk) or a precomputed file


def text_embeddings(concepts, weights, encode, prompt, cache_dir=None):
    """E2 class embeddings `encode(concepts, text_model, tokenizer)` (model.encode_concepts) with
    the text tower of the CLIP checkpoint `weights` (hub id or folder), cached on disk by what
    they depend on: the checkpoint (a folder by path and the size and time of its files, so
    replaced weights are not reused), the prompt and the concept lists."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    cache_dir = cache_dir or os.environ.get("CO2S_CACHE", os.path.expanduser("~/.cache/co2s"))
    weights = os.path.expanduser(weights)
    ckpt = weights
    if os.path.isdir(weights):
        files = [os.path.join(weights, f) for f in sorted(os.listdir(weights))]
        ckpt = [os.path.abspath(weights)] + [
            (os.path.basename(f), os.path.getsize(f), os.path.getmtime(f)) for f in files
        ]
    key = json.dumps([ckpt, prompt, concepts, "mean of raw embeddings"])
    path = os.path.join(cache_dir, "text", hashlib.sha1(key.encode()).hexdigest()[:16] + ".pt")
    if os.path.isfile(path):
        return torch.load(path, weights_only=True)
    text_model = load_pretrained(CLIPTextModelWithProjection, "clip", weights, what="text tower")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(weights)
    except OSError as e:
        raise UserError(
            f"no CLIP tokenizer in {weights!r} ({e}); the folder needs vocab.json/merges.txt "
            "or tokenizer.json next to the weights"
        ) from e
    if len(tokenizer) < 1000:
        raise UserError(
            f"the CLIP tokenizer of {weights!r} has only {len(tokenizer)} tokens: "
            "not the real vocabulary"
        )
    embeds = encode(concepts, text_model, tokenizer)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_atomic(embeds, path)
    return embeds


def load_text_embeddings(path, num_classes, dim=None):
    """A precomputed [N, D] .npy / .pt file (e.g. the authors' `*_conceptavg*_single.npy`), unit
    rows. dim None: any width (the caller checks it against its model)."""
    if not os.path.isfile(path):
        raise UserError(f"--text-embeddings: file {path!r} does not exist")
    try:
        t = (
            torch.from_numpy(np.load(path))
            if path.endswith(".npy")
            else torch.load(path, weights_only=True)
        )
    except Exception as e:
        raise UserError(f"--text-embeddings {path!r}: cannot read it ({type(e).__name__})") from e
    if t.dim() != 2 or t.shape[0] != num_classes or t.shape[1] != (dim or t.shape[1]):
        raise UserError(
            f"--text-embeddings {path!r} has shape {tuple(t.shape)}, expected "
            f"({num_classes}, {dim or 'D'}): one row per class"
        )
    return F.normalize(t.float(), dim=-1)
