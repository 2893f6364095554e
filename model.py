"""model.py: the two Co2S students (CLIP and DINOv3 ViT-B/16), their decoder head and the fusion head.

A student = a transformers ViT backbone + class embeddings T + the decoder head of METHOD.md
section 3. Implements E1 (CLIP value path), E3 (similarity maps), E4 (feature perturbation) and E10
(fusion of the two students at inference); the class embeddings of E2 come from text.py. Both
students share ONE class (`Student`) and ONE head; the only per-kind code is how the three pyramid
maps are tapped from the backbone (`_clip_features`, `_dinov3_features`).

Numerics (`numerics=`): 'hf' runs the transformers checkpoints as they are (CLIP: QuickGELU, LayerNorm
eps 1e-5; DINOv3: fp32 RoPE); 'release' runs them as the authors' code did (CLIP inside an mmseg ViT:
exact GELU, eps 1e-6; DINOv3: eps 1e-6, RoPE from bf16 periods with q and k rotated in bf16).
`from_release` converts the authors' released checkpoints (best_clip.pth, best_dinov3.pth).

Deliberately left out: registries, weight re-initialisation after loading (the released code wiped the
DINOv3 weights that way; METHOD.md section 7.3). The backbones are the transformers modules, run block
by block so we can tap them; only DINOv3's block is written out here (RoPE in the release's dtype).
"""
import json
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import release
from errors import UserError

KINDS = ("clip", "dinov3")
NUMERICS = ("hf", "release")
DEFAULT_WEIGHTS = {"clip": "openai/clip-vit-base-patch16", "dinov3": "facebook/dinov3-vitb16-pretrain-lvd1689m"}


@dataclass
class ViTSize:
    width: int = 768        # ViT-B/16
    depth: int = 12
    heads: int = 12
    mlp: int = 3072
    proj: int = 512         # CLIP joint image-text space (the dense embedding and text embeddings)
    registers: int = 4      # DINOv3 register tokens
    image_size: int = 224   # CLIP: the position grid is image_size / 16 on a side (a release stores it at the crop)


# "tiny" is the same code with smaller numbers: a CPU preset for tests and the demo.
SIZES = {
    "base": ViTSize(),
    "tiny": ViTSize(width=192, depth=4, heads=3, mlp=768, proj=128),
}
# Tapped blocks (0-based) at ViT-B depth 12; other depths scale the index by (depth-1)/11.
TAPS = {"clip": (0, 4, 11), "dinov3": (2, 7, 11)}


def tapped_blocks(kind, depth):
    return tuple(round(k * (depth - 1) / 11) for k in TAPS[kind])


def _size(size):
    """A preset name, or the ViTSize fields themselves (a converted release: vit_size)."""
    if isinstance(size, dict):
        return ViTSize(**size)
    if size not in SIZES:
        raise UserError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    return SIZES[size]


def vit_size(students):
    """The ViTSize fields that rebuild these students' backbones (for a checkpoint's model_args)."""
    size = {}
    for s in students:
        c = s.backbone.config
        size.update(width=c.hidden_size, depth=c.num_hidden_layers, heads=c.num_attention_heads, mlp=c.intermediate_size)
        size.update(dict(proj=c.projection_dim, image_size=c.image_size) if s.kind == "clip" else
                    dict(registers=c.num_register_tokens))
    return size


# --------------------------------------------------------------------------------------------
# Backbones: transformers models, built at random from a preset or loaded with from_pretrained


def numerics_config(kind, numerics):
    """Config overrides of a numerics choice (see the module docstring); 'hf' keeps the checkpoint's own."""
    if numerics not in NUMERICS:
        raise UserError(f"unknown numerics {numerics!r}; valid: {', '.join(NUMERICS)}")
    if numerics == "hf":
        return {}
    return dict(hidden_act="gelu", layer_norm_eps=1e-6) if kind == "clip" else dict(layer_norm_eps=1e-6)


def backbone_config(kind, s, numerics="hf"):
    """The transformers config of a random-init backbone of ViTSize s (dropout and drop-path off)."""
    from transformers import CLIPVisionConfig, DINOv3ViTConfig
    common = dict(hidden_size=s.width, num_hidden_layers=s.depth, num_attention_heads=s.heads,
                  intermediate_size=s.mlp, patch_size=16, attention_dropout=0.0)
    if kind == "clip":
        cfg = dict(common, projection_dim=s.proj, image_size=s.image_size, hidden_act="quick_gelu")
        return CLIPVisionConfig(**{**cfg, **numerics_config(kind, numerics)})
    # RoPE coordinate augmentation off so train mode is deterministic.
    return DINOv3ViTConfig(**common, num_register_tokens=s.registers, layerscale_value=1.0, drop_path_rate=0.0,
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
    from transformers import CLIPVisionModelWithProjection, DINOv3ViTModel
    cls = CLIPVisionModelWithProjection if kind == "clip" else DINOv3ViTModel
    if weights is None:
        if size == "base":
            warnings.warn(f"building the base {kind} student with RANDOM backbone weights (weights=None): "
                          f"fine for tests, useless for reproducing the paper (default {DEFAULT_WEIGHTS[kind]})")
        return cls(backbone_config(kind, _size(size), numerics))
    overrides = dict(attention_dropout=0.0, **numerics_config(kind, numerics))
    if kind == "dinov3":
        overrides.update(drop_path_rate=0.0, pos_embed_shift=None, pos_embed_jitter=None, pos_embed_rescale=None)
    model = load_pretrained(cls, kind, weights, **overrides)
    if model.config.hidden_size != _size(size).width:
        raise UserError(f"{weights!r} has width {model.config.hidden_size}, but --size {size} expects "
                        f"{_size(size).width}; pick the matching --size or checkpoint")
    return model


def blocks(backbone):
    """The list of transformer blocks (CLIP: encoder.layers; DINOv3: model.layer, or layer before transformers 5.2)."""
    if hasattr(backbone, "vision_model"):
        return backbone.vision_model.encoder.layers
    return backbone.model.layer if hasattr(backbone, "model") else backbone.layer


def attention_projections(block):
    """q, k, v, out projections of one block: the only backbone parameters that train (the paper's recipe)."""
    attn = block.self_attn if hasattr(block, "self_attn") else block.attention
    out = attn.out_proj if hasattr(attn, "out_proj") else attn.o_proj
    return [attn.q_proj, attn.k_proj, attn.v_proj, out]


TRAIN_BACKBONE = ("attention", "all")


def set_trainable(backbone, train_backbone="attention"):
    """'attention': only the attention projections train, all else stays frozen (the paper; pretrained weights).
    'all': every backbone weight trains (students from scratch: frozen RANDOM patch embeddings and MLPs
    leave a tiny student unable to fit even 6 labelled tiles of real imagery)."""
    if train_backbone not in TRAIN_BACKBONE:
        raise UserError(f"unknown train_backbone {train_backbone!r}; valid: {', '.join(TRAIN_BACKBONE)}")
    backbone.requires_grad_(train_backbone == "all")
    for block in blocks(backbone):
        for proj in attention_projections(block):
            proj.requires_grad_(True)


# --------------------------------------------------------------------------------------------
# The decoder head (METHOD.md section 3): the same module for both students


def conv_gn_relu(cin, cout, k=3, dilation=1):
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
                         nn.GroupNorm(cout // 16, cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Rates 1 (a 1x1 conv), 6, 12, 18 + image pooling, a 1x1 projection of the 5 branches."""

    def __init__(self, c=128, rates=(1, 6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList([conv_gn_relu(c, c, 1 if r == 1 else 3, r) for r in rates])
        self.pool = conv_gn_relu(c, c, 1)
        self.project = conv_gn_relu(c * (len(rates) + 1), c, 1)

    def forward(self, x):
        pooled = self.pool(x.mean((2, 3), keepdim=True)).expand_as(x)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], 1))


class ClassAttention(nn.Module):
    """Semantic reasoning: at each pooled location, the N class features attend to each other."""

    def __init__(self, c=128, pool=4):
        super().__init__()
        self.pool = pool
        self.layer = nn.TransformerEncoderLayer(2 * c, nhead=4, dim_feedforward=512, dropout=0.0,
                                                activation="gelu", batch_first=True, norm_first=True)

    def forward(self, x, guide, n):
        # x: (B*N, C, h, w) one map per class; guide: (N, C) projected class embeddings
        bn, c, h, w = x.shape
        # (B*N, C, h // 4, w // 4): rounds down as released; a map under 4 cells (an input under 64 px, which
        # the release never sees) keeps one cell instead of none
        p = F.avg_pool2d(x, self.pool, ceil_mode=min(h, w) < self.pool)
        hp, wp = p.shape[-2:]
        tok = p.view(bn // n, n, c, hp * wp).permute(0, 3, 1, 2).reshape(-1, n, c)   # (B*h'*w', N, C)
        tok = torch.cat([tok, guide.expand(tok.shape[0], n, c)], -1)        # (B*h'*w', N, 2C)
        tok = self.layer(tok)[..., :c]                                      # keep the first C channels
        out = tok.view(bn // n, hp * wp, n, c).permute(0, 2, 3, 1).reshape(bn, c, hp, wp)
        return x + F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)   # as released


class UpBlock(nn.Module):
    """Transposed conv x2, concat a skip (Conv3x3+ReLU of a 1/16 map, resized), two Conv3x3-GN-ReLU."""

    def __init__(self, cin, cup, feat_dim, cskip, cout):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cup, 2, stride=2)
        self.skip = nn.Sequential(nn.Conv2d(feat_dim, cskip, 3, padding=1), nn.ReLU(inplace=True))
        self.convs = nn.Sequential(conv_gn_relu(cup + cskip, cout), conv_gn_relu(cout, cout))

    def forward(self, x, feat, n):
        x = self.up(x)                                                       # (B*N, cup, 2h, 2w)
        s = F.interpolate(self.skip(feat), size=x.shape[-2:], mode="bilinear", align_corners=True)  # as released
        s = s.repeat_interleave(n, dim=0)                                    # one copy per class map
        return self.convs(torch.cat([x, s], 1))


class Co2SHead(nn.Module):
    """METHOD.md section 3: 2,217,185 parameters for 512-d class embeddings, 2,249,953 for 768-d."""

    def __init__(self, feat_dim=768, embed_dim=512, c=128):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 7, padding=3)                  # spatial reasoning, per class map
        self.aspp = ASPP(c)
        self.guide = nn.Sequential(nn.Linear(embed_dim, c), nn.ReLU(inplace=True))  # shared by both layers
        self.class_attn = nn.ModuleList([ClassAttention(c), ClassAttention(c)])
        self.up1 = UpBlock(c, 96, feat_dim, 32, 64)                  # 1/16 -> 1/8, skip from f2
        self.up2 = UpBlock(64, 48, feat_dim, 16, 32)                 # 1/8 -> 1/4, skip from f1
        self.out = nn.Conv2d(32, 1, 3, padding=1)

    def forward(self, feats, T):
        f1, f2, f3 = feats                                           # (B, C, h, w) each, fine to coarse
        b, n = f3.shape[0], T.shape[0]
        # E3: cosine similarity of every pixel embedding with every class embedding
        T = F.normalize(T, dim=-1)                                   # unit class embeddings, here and for the guide
        S = torch.einsum("bchw,nc->bnhw", F.normalize(f3, dim=1), T)  # (B, N, h, w)
        x = self.stem(S.reshape(b * n, 1, *S.shape[-2:]))            # (B*N, 128, h, w)
        x = x + self.aspp(x)
        guide = self.guide(T)                                        # (N, 128), of the NORMALISED T (as released)
        for layer in self.class_attn:
            x = layer(x, guide, n)
        x = self.up2(self.up1(x, f2, n), f1, n)                      # (B*N, 32, 4h, 4w)
        return self.out(x).view(b, n, *x.shape[-2:])                 # (B, N, H/4, W/4)


# --------------------------------------------------------------------------------------------
# The student: backbone + class embeddings + head; one class for both kinds


class Student(nn.Module):
    def __init__(self, kind, backbone, num_classes, text=None, name=None, numerics="hf"):
        super().__init__()
        self.kind, self.name, self.numerics = kind, name or kind, numerics
        self.backbone = backbone
        self.taps = tapped_blocks(kind, backbone.config.num_hidden_layers)
        self.grad_checkpoint = False
        width = backbone.config.hidden_size
        f3_dim = backbone.config.projection_dim if kind == "clip" else width
        if text is not None:    # explicit guidance: fixed text embeddings (E2), a buffer, saved with the model
            self.register_buffer("text", text.float().clone())
            self.queries = None
        else:                   # implicit guidance: learnable class queries
            self.text = None
            self.queries = nn.Embedding(num_classes, f3_dim)
            nn.init.normal_(self.queries.weight, std=0.02)
        self.head = Co2SHead(feat_dim=width, embed_dim=f3_dim)
        if kind == "dinov3":    # RoPE periods (head_dim / 4 of them), in the dtype the rotation runs in
            self.register_buffer("rope_periods", rope_periods(backbone.config, numerics))
        self._frozen = {}       # position tables computed once per input size (see _cached)

    def class_embeddings(self):
        return self.text if self.queries is None else self.queries.weight

    def _block(self, fn, *args):
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _cached(self, what, source, h, w, make):
        """make(source, h, w) once per (what, size, device, dtype) while `source` (a frozen tensor) is unchanged.
        A trainable source (--train-backbone all) is recomputed every forward, so that it gets its gradient."""
        if source.requires_grad:
            return make(source, h, w)
        key = (what, h, w, source.device, source.dtype, source._version)
        if key not in self._frozen:
            self._frozen = {k: v for k, v in self._frozen.items() if k[0] != what or k[-1] == source._version}
            with torch.no_grad():
                self._frozen[key] = make(source, h, w)
        return self._frozen[key]

    def _clip_features(self, x):
        vm = self.backbone.vision_model
        emb, (h, w) = vm.embeddings, (x.shape[-2] // 16, x.shape[-1] // 16)
        patches = emb.patch_embedding(x.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        tokens = torch.cat([emb.class_embedding.expand(len(x), 1, -1), patches], 1)       # (B, 1+hw, C)
        h = vm.pre_layrnorm(tokens + self._cached("pos", emb.position_embedding.weight, h, w, resize_positions))
        maps = []
        for i, block in enumerate(blocks(self.backbone)):
            if i in self.taps:
                # E1, value path: no token mixing; v = x + out(v(LN1 x)); v = v + MLP(LN2 v)
                attn = block.self_attn
                v = h + attn.out_proj(attn.v_proj(block.layer_norm1(h)))
                v = v + block.mlp(block.layer_norm2(v))
                maps.append(v)
            if i == self.taps[-1]:
                break                      # the main path after the last tap is never used
            h = self._block(block, h, None)
        # E1, dense embedding: last value path -> post_layernorm -> visual_projection -> unit norm
        maps[-1] = F.normalize(self.backbone.visual_projection(vm.post_layernorm(maps[-1])), dim=-1)
        return [m[:, 1:] for m in maps]    # drop CLS

    def _dinov3_features(self, x):
        bb = self.backbone
        cos, sin = self._cached("rope", self.rope_periods, x.shape[-2] // 16, x.shape[-1] // 16, rope_tables)
        h = bb.embeddings(x)                                          # (B, 1+4+hw, C): CLS, registers, patches
        prefix = 1 + bb.config.num_register_tokens
        maps = []
        for i, block in enumerate(blocks(bb)[: self.taps[-1] + 1]):
            h = self._block(dinov3_block, block, h, cos, sin)
            if i in self.taps:
                maps.append(bb.norm(h)[:, prefix:])   # final LayerNorm, patch tokens only
        return maps

    def features(self, x):
        """The three tapped maps, fine to coarse, each (B, C, H/16, W/16)."""
        tokens = self._clip_features(x) if self.kind == "clip" else self._dinov3_features(x)
        hw = (x.shape[-2] // 16, x.shape[-1] // 16)
        return [t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *hw) for t in tokens]

    def forward(self, x, fp=False, fp_from=0):
        """Logits (B, N, H, W). With fp=True also the FP logits (E4) of x[fp_from:], from the SAME
        backbone pass: (logits, logits_fp)."""
        feats = self.features(x)
        if fp:  # E4: Dropout2d(0.5) on every tapped map; clean and perturbed maps run as one head batch
            feats = [torch.cat([f, F.dropout2d(f[fp_from:], 0.5, training=True)]) for f in feats]
        logits = self.head(feats, self.class_embeddings())
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return (logits[: len(x)], logits[len(x):]) if fp else logits


def resize_positions(table, h, w):
    """CLIP's (1 + g*g, C) position table for an h x w patch grid: the CLS entry, then the g x g grid resized
    bicubically (align_corners False, as transformers and the release do). The same table every forward."""
    g = math.isqrt(table.shape[0] - 1)
    if (h, w) == (g, g):
        return table
    grid = table[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(table.dtype)
    return torch.cat([table[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)])


def rope_periods(config, numerics):
    """DINOv3 RoPE periods base^(2j / (head_dim / 2)), j < head_dim / 4: fp32 ('hf'), or bf16 as the release
    computes and stores them ('release'; the whole rotation then runs in bf16)."""
    n = config.hidden_size // config.num_attention_heads // 4
    dtype = torch.bfloat16 if numerics == "release" else torch.float32
    return config.rope_theta ** (2 * torch.arange(n, dtype=dtype) / (2 * n))


def rope_tables(periods, h, w):
    """cos, sin (h*w, head_dim) of an h x w patch grid, in the dtype of `periods` (each step rounded to it,
    as the release computes them): patch centres in [-1, 1] per axis, angles 2 pi coord / period, [y | x] x 2."""
    ys = torch.arange(0.5, h, dtype=periods.dtype, device=periods.device) / h
    xs = torch.arange(0.5, w, dtype=periods.dtype, device=periods.device) / w
    coords = 2.0 * torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).flatten(0, 1) - 1.0   # (hw, 2): y, x
    angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)  # (hw, head_dim)
    return torch.cos(angles), torch.sin(angles)


def rotate(x, cos, sin):
    """RoPE on the patch tokens (the last len(cos) of x (B, heads, T, d)), computed in the dtype of cos:
    x is cast to it whole (prefix tokens too, as the release does) and cast back afterwards."""
    dtype, n = x.dtype, cos.shape[0]
    x = x.to(cos.dtype)
    patches = x[..., -n:, :]
    half = patches.shape[-1] // 2
    patches = patches * cos + torch.cat([-patches[..., half:], patches[..., :half]], -1) * sin
    return torch.cat([x[..., :-n, :], patches], -2).to(dtype)


def dinov3_block(block, h, cos, sin):
    """One DINOv3 block with the weights of the transformers module `block`: pre-norm attention with RoPE on
    the patch tokens and layer scale, then pre-norm MLP and layer scale. Written out rather than calling
    block.forward because the release rotates q and k in bf16, which transformers does not."""
    attn, (b, t, c) = block.attention, h.shape
    x = block.norm1(h)
    q, k, v = (p(x).view(b, t, attn.num_heads, -1).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    x = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v)      # (B, heads, T, d)
    h = h + block.layer_scale1(attn.o_proj(x.transpose(1, 2).reshape(b, t, c)))
    return h + block.layer_scale2(block.mlp(block.norm2(h)))


def build_student(kind, num_classes, *, size="base", weights=None, guidance=None, text=None, name=None,
                  numerics="hf", train_backbone="attention"):
    """One Co2S student. kind: 'clip' | 'dinov3'. guidance: 'text' (CLIP default) | 'queries'.

    weights: hub id or local folder of the backbone (None = random init). text: the (N, D) class
    embeddings of text guidance (text.class_embeddings gives them from concepts, a file or a stand-in).
    numerics: 'hf' | 'release' (see the module docstring). train_backbone: 'attention' | 'all' (set_trainable)."""
    if kind not in KINDS:
        raise UserError(f"unknown student kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    guidance = guidance or ("text" if kind == "clip" else "queries")
    if guidance not in ("text", "queries") or (kind == "dinov3" and guidance == "text"):
        raise UserError(f"guidance {guidance!r} for a {kind} student; valid: "
                        f"{'text, queries' if kind == 'clip' else 'queries'}")
    if guidance == "text" and (text is None or tuple(text.shape) != (num_classes, _size(size).proj)):
        raise ValueError(f"a CLIP student with text guidance needs its ({num_classes}, {_size(size).proj}) class "
                         f"embeddings, got {None if text is None else tuple(text.shape)}")
    # The backbone is built (and its pretrained weights loaded) first; the head and the queries created
    # after it are new modules, so nothing re-initialises the loaded weights (METHOD.md section 7.3).
    backbone = build_backbone(kind, size, weights, numerics)
    set_trainable(backbone, train_backbone)
    return Student(kind, backbone, num_classes, text=text if guidance == "text" else None, name=name, numerics=numerics)


def build_model(kinds, num_classes, *, size="base", weights=None, clip_guidance="text", text=None,
                fusion="confidence", grad_checkpoint=False, numerics="hf", train_backbone="attention"):
    """The students (E1-E4) inside the fusion head (E10). kinds: e.g. ['clip', 'dinov3'].
    weights: {kind: hub id or folder or None}; text: the CLIP class embeddings (see build_student)."""
    students = []
    for kind, name in zip(kinds, student_names(kinds)):
        s = build_student(kind, num_classes, size=size, weights=(weights or {}).get(kind), name=name, text=text,
                          guidance=clip_guidance if kind == "clip" else "queries", numerics=numerics,
                          train_backbone=train_backbone)
        s.grad_checkpoint = grad_checkpoint
        students.append(s)
    return Co2S(students, fusion=fusion)


# --------------------------------------------------------------------------------------------
# E10: the fusion head, the model that eval and inference use


def fuse(probs, mode="confidence"):
    """E10: per pixel the more confident student's probabilities ('confidence'), or their mean."""
    if mode == "mean":
        return torch.stack(probs).mean(0)
    if mode != "confidence":
        raise UserError(f"unknown fusion mode {mode!r}; valid: confidence, mean")
    stacked = torch.stack(probs)                                   # (K, B, N, H, W)
    winner = stacked.amax(2, keepdim=True).argmax(0, keepdim=True) # (1, B, 1, H, W): most confident student
    return stacked.gather(0, winner.expand(1, *stacked.shape[1:]))[0]


class Co2S(nn.Module):
    """The two students plus the parameter-free fusion head (E10)."""

    def __init__(self, students, fusion="confidence"):
        super().__init__()
        self.students = nn.ModuleList(students)
        self.fusion = fusion

    def forward(self, x):
        """Probabilities (B, N, H, W) of each student (by name) and 'fused'."""
        probs = {s.name: s(x).float().softmax(1) for s in self.students}
        probs["fused"] = fuse(list(probs.values()), self.fusion)
        return probs


def student_names(kinds):
    """clip,dinov3 -> clip, dinov3; clip,clip -> clip1, clip2 (names must be unique)."""
    return [k if kinds.count(k) == 1 else f"{k}{kinds[:i + 1].count(k)}" for i, k in enumerate(kinds)]


# --------------------------------------------------------------------------------------------
# The authors' released checkpoints (their format: release.py)


def from_release(path, text=None):
    """A Student from one of the authors' released files, in eval mode with the release numerics: the same
    logits as their network for one window. The kind comes from the keys, the sizes from the shapes.
    text: the CLIP student's (N, D) class embeddings if the file does not hold them (theirs do)."""
    sd = release.read(path)
    kind, sizes = release.kind_and_sizes(path, sd)
    size = ViTSize(**sizes)
    if kind == "clip":
        text = sd["_cached_text"] if "_cached_text" in sd else text
        if text is None:
            raise UserError(f"{path!r} holds no class embeddings (_cached_text): pass the authors' concept-averaged "
                            f"[N, {size.proj}] file with --text-embeddings")
        sd = {**sd, "_cached_text": text}
        num_classes = text.shape[0]
    else:
        num_classes = sd["text_provider.emb.weight"].shape[0] if "text_provider.emb.weight" in sd else 0
    from transformers import CLIPVisionModelWithProjection, DINOv3ViTModel
    backbone = (CLIPVisionModelWithProjection if kind == "clip" else DINOv3ViTModel)(backbone_config(kind, size, "release"))
    set_trainable(backbone, "attention")
    student = Student(kind, backbone, num_classes, text=text, name=kind, numerics="release")
    prefix = "backbone." + next(n for n, m in backbone.named_modules() if m is blocks(backbone))
    student.load_state_dict(release.convert(path, sd, kind, student.state_dict(), blocks_prefix=prefix))
    return student.eval()
