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
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from plumbing.atomic import read_json, save_atomic
from plumbing.errors import UserError, reason

NUMERICS = ("hf", "release")
# --dinov3-weights release-init: the DINOv3 student as the release trains it (release_init)
RELEASE_INIT = "release-init"
DEFAULT_WEIGHTS = dict(
    clip="openai/clip-vit-base-patch16", dinov3="facebook/dinov3-vitb16-pretrain-lvd1689m"
)
# added to a failed download's message when the hub refused access
GATED = " This repository is gated: accept Meta's DINOv3 licence on its hub page, run `hf auth login`, or download it elsewhere and pass the folder."


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
# the ViTSize fields each backbone has, and their names in its transformers config
_SHARED = dict(width="hidden_size", depth="num_hidden_layers", heads="num_attention_heads")
FIELDS = {
    "clip": dict(_SHARED, mlp="intermediate_size", proj="projection_dim", image_size="image_size"),
    "dinov3": dict(_SHARED, mlp="intermediate_size", registers="num_register_tokens"),
}


def vit_preset(size):
    """A preset name, or the ViTSize fields themselves (a converted release: vit_size)."""
    if not isinstance(size, dict) and size not in SIZES:
        raise UserError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    return ViTSize(**size) if isinstance(size, dict) else SIZES[size]


def vit_size(students):
    """The ViTSize fields that rebuild these students' backbones (a converted release)."""
    return {f: getattr(s.backbone.config, a) for s in students for f, a in FIELDS[s.kind].items()}


# --------------------------------------------------------------------------------------------
# Configs and loading: built at random from a preset, or loaded with from_pretrained


def load_pretrained(cls, kind, weights, what="backbone", **overrides):
    """`cls.from_pretrained(weights)` with errors that say what was tried and how to fix it.

    `weights` is a hub id or a local folder (a `save_pretrained` / `hf download` folder). Missing
    weights are an error, never a silent random init."""
    flag, weights = f"--{kind}-weights", os.path.expanduser(weights)
    if os.path.isdir(weights):
        # a transformers checkpoint folder: its config.json names the model type
        cfg = os.path.join(weights, "config.json")
        model_type = read_json(cfg).get("model_type") if os.path.isfile(cfg) else None
        types = ("clip", "clip_vision_model") if kind == "clip" else ("dinov3_vit",)
        if model_type not in types:
            found = f"a {model_type!r} checkpoint" if os.path.isfile(cfg) else "no config.json"
            raise UserError(
                f"{weights!r} holds {found}, not a {kind} one: pass {flag} a save_pretrained or "
                f"`hf download` folder whose config.json has model_type in {types}"
            )
    elif weights.startswith((".", "/", "~")) or weights.count("/") > 1:
        raise UserError(f"{flag}: local folder {weights!r} does not exist")
    try:
        model, info = cls.from_pretrained(weights, output_loading_info=True, **overrides)
    except (OSError, ValueError, RuntimeError) as e:
        why = reason(e)  # its type and the first line of its message
        gated = any(w in str(e).lower() for w in ("gated", "401", "403", "access to model"))
        raise UserError(
            f"could not load the {kind} {what} from {weights!r} ({why}).{GATED if gated else ''}"
            f" Without network access, download it once (`hf download {DEFAULT_WEIGHTS[kind]} "
            f"--local-dir DIR`) and pass {flag} DIR, or HF_HUB_OFFLINE=1 with a filled hub cache."
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
    if weights == RELEASE_INIT and kind != "dinov3":
        raise UserError(
            f"--{kind}-weights {RELEASE_INIT}: only the DINOv3 student was re-initialised "
            f"by the release; the {kind} student keeps its pretrained weights"
        )
    if numerics not in NUMERICS:
        raise UserError(f"unknown numerics {numerics!r}; valid: {', '.join(NUMERICS)}")
    # What every config is given, built or loaded: dropout and drop-path off, DINOv3's RoPE
    # coordinate augmentation off (so train mode is deterministic), and the numerics choice (see
    # the module docstring; 'hf' keeps the checkpoint's own).
    augment = dict(pos_embed_shift=None, pos_embed_jitter=None, pos_embed_rescale=None)
    dinov3 = dict(drop_path_rate=0.0, **augment) if kind == "dinov3" else {}
    overrides = dict(attention_dropout=0.0, **dinov3)
    if numerics == "release":
        overrides.update(layer_norm_eps=1e-6, **({"hidden_act": "gelu"} if kind == "clip" else {}))
    s = vit_preset(size)
    if weights in (None, RELEASE_INIT):
        if weights is None and size == "base":
            warnings.warn(
                f"building the base {kind} student with RANDOM backbone weights (weights=None): "
                f"fine for tests, useless for reproducing the paper (default {DEFAULT_WEIGHTS[kind]})"
            )
        fields = {a: getattr(s, f) for f, a in FIELDS[kind].items()}
        # the rest are transformers' defaults (CLIP: QuickGELU; DINOv3: layer scale 1)
        model = cls(cls.config_class(**fields, patch_size=16, **overrides))
        return release_init(model) if weights else model
    model = load_pretrained(cls, kind, weights, **overrides)
    if model.config.hidden_size != s.width:
        raise UserError(
            f"{weights!r} has width {model.config.hidden_size}, but --size {size} expects {s.width}; pick the matching --size or checkpoint"
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
    stays 1e-5, so every residual branch is scaled by 1e-5 for the whole run. (torch.nn.init
    writes without autograd.)"""
    emb, conv = backbone.embeddings, backbone.embeddings.patch_embeddings
    for token in (emb.cls_token, emb.register_tokens):
        torch.nn.init.normal_(token, std=0.02)
    torch.nn.init.zeros_(emb.mask_token)
    # fan-in: in_channels * kernel height * kernel width
    bound = conv.weight[0].numel() ** -0.5
    for p in (conv.weight, conv.bias):
        torch.nn.init.uniform_(p, -bound, bound)
    for m in backbone.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.ones_(m.weight)
        elif hasattr(m, "lambda1"):  # a block's two layer scales
            torch.nn.init.constant_(m.lambda1, 1e-5)
        # biases 0 (DINOv3's key projection has none)
        if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)) and m.bias is not None:
            torch.nn.init.zeros_(m.bias)
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
    ckpt = weights = os.path.expanduser(weights)
    if os.path.isdir(weights):
        stats = [(f, os.stat(os.path.join(weights, f))) for f in sorted(os.listdir(weights))]
        ckpt = [os.path.abspath(weights)] + [(f, st.st_size, st.st_mtime) for f, st in stats]
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
            f"the CLIP tokenizer of {weights!r} has only {len(tokenizer)} tokens: not the real vocabulary"
        )
    embeds = encode(concepts, text_model, tokenizer)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_atomic(embeds, path)
    return embeds


def load_text_embeddings(path, num_classes, dim=None):
    """A precomputed [N, D] .npy / .pt file (e.g. the authors' `*_conceptavg*_single.npy`), unit
    rows. dim None: any width (the caller checks it against its model)."""
    try:
        t = np.load(path) if path.endswith(".npy") else torch.load(path, weights_only=True)
        t = torch.as_tensor(t)
    except Exception as e:
        why = "cannot read it" if os.path.isfile(path) else "does not exist"
        raise UserError(f"--text-embeddings {path!r}: {why} ({type(e).__name__})") from e
    if t.dim() != 2 or t.shape != (num_classes, dim or t.shape[1]):
        raise UserError(
            f"--text-embeddings {path!r} has shape {tuple(t.shape)}, expected ({num_classes}, {dim or 'D'}): one row per class"
        )
    return torch.nn.functional.normalize(t.float(), dim=-1)
