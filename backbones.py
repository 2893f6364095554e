"""backbones.py: the two ViT-B/16 backbones as transformers modules: sizes, configs, loading,
numerics.

What a student's backbone is before model.py taps it: the transformers config of each kind (or a
pretrained checkpoint loaded with `from_pretrained`, from the hub or a local folder, with errors
that say how to fix a failed load), which weights train (the paper: only the attention projections),
and the numerics the authors ran them with. 'hf' runs the transformers checkpoints as they are
(CLIP: QuickGELU, LayerNorm eps 1e-5; DINOv3: fp32 RoPE); 'release' runs them as the authors' code
did (CLIP inside an mmseg ViT: exact GELU, eps 1e-6; DINOv3: eps 1e-6, RoPE from bf16 periods with q
and k rotated in bf16). Also here the position tables at the crop size (CLIP's resized grid,
DINOv3's RoPE) and DINOv3's block written out, since transformers has no bf16 rotation.

Deliberately left out: dropout and drop-path (off in the paper's recipe). The released code wiped
the pretrained DINOv3 weights after loading them (METHOD.md section 7.3): that student is built on
request (`release_init`, `--dinov3-weights release-init`), never by accident.
"""
import json
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from errors import UserError

KINDS = ("clip", "dinov3")
NUMERICS = ("hf", "release")
TRAIN_BACKBONE = ("attention", "all")
# --dinov3-weights release-init: the DINOv3 student as the release trains it (release_init)
RELEASE_INIT = "release-init"
DEFAULT_WEIGHTS = {"clip": "openai/clip-vit-base-patch16",
                   "dinov3": "facebook/dinov3-vitb16-pretrain-lvd1689m"}


@dataclass
class ViTSize:
    width: int = 768        # ViT-B/16
    depth: int = 12
    heads: int = 12
    mlp: int = 3072
    proj: int = 512         # CLIP joint image-text space (the dense embedding and text embeddings)
    registers: int = 4      # DINOv3 register tokens
    # CLIP: position grid image_size / 16 a side (a release stores it at the crop)
    image_size: int = 224


# "tiny" is the same code with smaller numbers: a CPU preset for tests and the demo.
SIZES = {
    "base": ViTSize(),
    "tiny": ViTSize(width=192, depth=4, heads=3, mlp=768, proj=128),
}
# Tapped blocks (0-based) at ViT-B depth 12; other depths scale the index by (depth-1)/11.
TAPS = {"clip": (0, 4, 11), "dinov3": (2, 7, 11)}


def tapped_blocks(kind, depth):
    return tuple(round(k * (depth - 1) / 11) for k in TAPS[kind])


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
        size.update(width=c.hidden_size, depth=c.num_hidden_layers, heads=c.num_attention_heads,
                    mlp=c.intermediate_size)
        size.update(dict(proj=c.projection_dim, image_size=c.image_size) if kind == "clip" else
                    dict(registers=c.num_register_tokens))
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
    return dict(hidden_act="gelu",
                layer_norm_eps=1e-6) if kind == "clip" else dict(layer_norm_eps=1e-6)


def backbone_config(kind, s, numerics="hf"):
    """The transformers config of a random-init backbone of ViTSize s (dropout and drop-path
    off)."""
    from transformers import CLIPVisionConfig, DINOv3ViTConfig
    common = dict(hidden_size=s.width, num_hidden_layers=s.depth, num_attention_heads=s.heads,
                  intermediate_size=s.mlp, patch_size=16, attention_dropout=0.0)
    if kind == "clip":
        cfg = dict(common, projection_dim=s.proj, image_size=s.image_size, hidden_act="quick_gelu")
        return CLIPVisionConfig(**{**cfg, **numerics_config(kind, numerics)})
    # RoPE coordinate augmentation off so train mode is deterministic.
    return DINOv3ViTConfig(**common, num_register_tokens=s.registers, layerscale_value=1.0,
                           drop_path_rate=0.0,
                           pos_embed_shift=None, pos_embed_jitter=None, pos_embed_rescale=None,
                           **numerics_config(kind, numerics))


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
            raise UserError(f"{weights!r} is not a transformers checkpoint folder (no config.json); "
                             f"pass a folder written by save_pretrained or `hf download` to {flag}")
        with open(cfg_path) as f:
            model_type = json.load(f).get("model_type")
        if model_type not in _model_types(kind):
            raise UserError(f"{weights!r} holds a {model_type!r} checkpoint, not a {kind} one "
                             f"(expected model_type in {_model_types(kind)}); check {flag}")
    elif weights.startswith((".", "/", "~")) or weights.count("/") > 1:
        raise UserError(f"{flag}: local folder {weights!r} does not exist")
    try:
        model, info = cls.from_pretrained(weights, output_loading_info=True, **overrides)
    except (OSError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        gated = any(w in str(e).lower() for w in ("gated", "401", "403", "access to model"))
        hint = (" This repository is gated: accept Meta's DINOv3 licence on its hub page, run `hf auth "
                "login`, or download it elsewhere and pass the folder." if gated else "")
        raise UserError(
            f"could not load the {kind} {what} from {weights!r} ({type(e).__name__}: {reason}).{hint} "
            f"Without network access, download it once (`hf download {DEFAULT_WEIGHTS[kind]} --local-dir DIR`) "
            f"and pass {flag} DIR, or set HF_HUB_OFFLINE=1 with a filled hub cache.") from e
    if info["missing_keys"] or info["mismatched_keys"]:
        raise UserError(f"{weights!r} is not a complete {kind} {what}: missing "
                           f"{sorted(info['missing_keys'])[:5]} mismatched {info['mismatched_keys'][:5]}")
    return model


def build_backbone(kind, size="base", weights=None, numerics="hf"):
    """The backbone of `kind`: random (weights None), loaded (a hub id or folder), or for DINOv3
    RELEASE_INIT: what the release trains (release_init)."""
    from transformers import CLIPVisionModelWithProjection, DINOv3ViTModel
    cls = CLIPVisionModelWithProjection if kind == "clip" else DINOv3ViTModel
    if weights == RELEASE_INIT:
        if kind != "dinov3":
            raise UserError(f"--{kind}-weights {RELEASE_INIT}: only the DINOv3 student was re-initialised "
                            f"by the release; the {kind} student keeps its pretrained weights")
        return release_init(cls(backbone_config(kind, vit_preset(size), numerics)))
    if weights is None:
        if size == "base":
            warnings.warn(f"building the base {kind} student with RANDOM backbone weights (weights=None): "
                          f"fine for tests, useless for reproducing the paper (default {DEFAULT_WEIGHTS[kind]})")
        return cls(backbone_config(kind, vit_preset(size), numerics))
    overrides = dict(attention_dropout=0.0, **numerics_config(kind, numerics))
    if kind == "dinov3":
        overrides.update(drop_path_rate=0.0, pos_embed_shift=None, pos_embed_jitter=None,
                         pos_embed_rescale=None)
    model = load_pretrained(cls, kind, weights, **overrides)
    if model.config.hidden_size != vit_preset(size).width:
        raise UserError(f"{weights!r} has width {model.config.hidden_size}, but --size {size} expects "
                        f"{vit_preset(size).width}; pick the matching --size or checkpoint")
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


def attention_projections(block):
    """q, k, v, out projections of one block: the only backbone parameters that train (the
    paper's recipe)."""
    attn = block.self_attn if hasattr(block, "self_attn") else block.attention
    out = attn.out_proj if hasattr(attn, "out_proj") else attn.o_proj
    return [attn.q_proj, attn.k_proj, attn.v_proj, out]



def set_trainable(backbone, train_backbone="attention"):
    """'attention': only the attention projections train, all else stays frozen (the paper;
    pretrained weights). 'all': every backbone weight trains (students from scratch: frozen RANDOM
    patch embeddings and MLPs leave a tiny student unable to fit even 6 labelled tiles of real
    imagery)."""
    if train_backbone not in TRAIN_BACKBONE:
        raise UserError(f"unknown train_backbone {train_backbone!r}; valid: {', '.join(TRAIN_BACKBONE)}")
    backbone.requires_grad_(train_backbone == "all")
    for block in blocks(backbone):
        for proj in attention_projections(block):
            proj.requires_grad_(True)



def resize_positions(table, h, w):
    """CLIP's (1 + g*g, C) position table for an h x w patch grid: the CLS entry, then the g x g
    grid resized bicubically (align_corners False, as transformers and the release do). The same
    table every forward."""
    g = math.isqrt(table.shape[0] - 1)
    if (h, w) == (g, g):
        return table
    grid = table[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic",
                         align_corners=False).to(table.dtype)
    return torch.cat([table[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)])


def rope_periods(config, numerics):
    """DINOv3 RoPE periods base^(2j / (head_dim / 2)), j < head_dim / 4: fp32 ('hf'), or bf16 as the
    release computes and stores them ('release'; the whole rotation then runs in bf16)."""
    n = config.hidden_size // config.num_attention_heads // 4
    dtype = torch.bfloat16 if numerics == "release" else torch.float32
    return config.rope_theta ** (2 * torch.arange(n, dtype=dtype) / (2 * n))


def rope_tables(periods, h, w):
    """cos, sin (h*w, head_dim) of an h x w patch grid, in the dtype of `periods` (each step rounded
    to it, as the release computes them): patch centres in [-1, 1] per axis, angles 2 pi coord /
    period, [y | x] x 2."""
    ys = torch.arange(0.5, h, dtype=periods.dtype, device=periods.device) / h
    xs = torch.arange(0.5, w, dtype=periods.dtype, device=periods.device) / w
    # (hw, 2): y, x
    coords = 2.0 * torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).flatten(0, 1) - 1.0
    # (hw, head_dim)
    angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)
    return torch.cos(angles), torch.sin(angles)


def rotate(x, cos, sin):
    """RoPE on the patch tokens (the last len(cos) of x (B, heads, T, d)), computed in the dtype of
    cos: x is cast to it whole (prefix tokens too, as the release does) and cast back afterwards."""
    dtype, n = x.dtype, cos.shape[0]
    x = x.to(cos.dtype)
    patches = x[..., -n:, :]
    half = patches.shape[-1] // 2
    patches = patches * cos + torch.cat([-patches[..., half:], patches[..., :half]], -1) * sin
    return torch.cat([x[..., :-n, :], patches], -2).to(dtype)


def dinov3_block(block, h, cos, sin):
    """One DINOv3 block with the weights of the transformers module `block`: pre-norm attention with
    RoPE on the patch tokens and layer scale, then pre-norm MLP and layer scale. Written out rather
    than calling block.forward because the release rotates q and k in bf16, which transformers does
    not."""
    attn, (b, t, c) = block.attention, h.shape
    x = block.norm1(h)
    q, k, v = (p(x).view(b, t, attn.num_heads, -1).transpose(1, 2) for p in (attn.q_proj,
                                                                             attn.k_proj, attn.v_proj))
    # (B, heads, T, d)
    x = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v)
    h = h + block.layer_scale1(attn.o_proj(x.transpose(1, 2).reshape(b, t, c)))
    return h + block.layer_scale2(block.mlp(block.norm2(h)))


