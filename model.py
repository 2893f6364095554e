"""model.py: the two Co2S students (CLIP and DINOv3 ViT-B/16), their decoder head and the fusion head.

A student = a transformers ViT backbone + class embeddings T + the decoder head of METHOD.md
section 3. Implements E1 (CLIP value path), E3 (similarity maps), E4 (feature perturbation) and E10
(fusion of the two students at inference); the class embeddings of E2 come from text.py. Both students share ONE class
(`Student`) and ONE head; the only per-kind code is how the three pyramid maps are tapped from the
backbone (`_clip_features`, `_dinov3_features`).

Deliberately left out: any ViT code of our own (the backbones are the transformers modules, run
block by block so we can tap them), registries, and weight re-initialisation after loading (the
released code wiped the DINOv3 weights that way; METHOD.md section 7.3).
"""
import json
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from errors import UserError

KINDS = ("clip", "dinov3")
DEFAULT_WEIGHTS = {"clip": "openai/clip-vit-base-patch16", "dinov3": "facebook/dinov3-vitb16-pretrain-lvd1689m"}


@dataclass
class ViTSize:
    width: int = 768        # ViT-B/16
    depth: int = 12
    heads: int = 12
    mlp: int = 3072
    proj: int = 512         # CLIP joint image-text space (the dense embedding and text embeddings)


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
    if size not in SIZES:
        raise UserError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    return SIZES[size]


# --------------------------------------------------------------------------------------------
# Backbones: transformers models, built at random from a preset or loaded with from_pretrained


def backbone_config(kind, size):
    """The transformers config of a random-init backbone of this size (dropout and drop-path off)."""
    from transformers import CLIPVisionConfig, DINOv3ViTConfig
    s = _size(size)
    common = dict(hidden_size=s.width, num_hidden_layers=s.depth, num_attention_heads=s.heads,
                  intermediate_size=s.mlp, patch_size=16, attention_dropout=0.0)
    if kind == "clip":
        return CLIPVisionConfig(**common, projection_dim=s.proj, image_size=224, hidden_act="quick_gelu")
    # 4 register tokens; RoPE coordinate augmentation off so train mode is deterministic.
    return DINOv3ViTConfig(**common, num_register_tokens=4, layerscale_value=1.0, drop_path_rate=0.0,
                           pos_embed_shift=None, pos_embed_jitter=None, pos_embed_rescale=None)


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


def build_backbone(kind, size="base", weights=None):
    from transformers import CLIPVisionModelWithProjection, DINOv3ViTModel
    cls = CLIPVisionModelWithProjection if kind == "clip" else DINOv3ViTModel
    if weights is None:
        if size == "base":
            warnings.warn(f"building the base {kind} student with RANDOM backbone weights (weights=None): "
                          f"fine for tests, useless for reproducing the paper (default {DEFAULT_WEIGHTS[kind]})")
        return cls(backbone_config(kind, size))
    overrides = dict(attention_dropout=0.0)
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
    """q, k, v, out projections of one block: the ONLY backbone parameters that train."""
    attn = block.self_attn if hasattr(block, "self_attn") else block.attention
    out = attn.out_proj if hasattr(attn, "out_proj") else attn.o_proj
    return [attn.q_proj, attn.k_proj, attn.v_proj, out]


def freeze_all_but_attention(backbone):
    backbone.requires_grad_(False)
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
        p = F.avg_pool2d(x, self.pool, ceil_mode=True)                      # (B*N, C, h', w')
        hp, wp = p.shape[-2:]
        tok = p.view(bn // n, n, c, hp * wp).permute(0, 3, 1, 2).reshape(-1, n, c)   # (B*h'*w', N, C)
        tok = torch.cat([tok, guide.expand(tok.shape[0], n, c)], -1)        # (B*h'*w', N, 2C)
        tok = self.layer(tok)[..., :c]                                      # keep the first C channels
        out = tok.view(bn // n, hp * wp, n, c).permute(0, 2, 3, 1).reshape(bn, c, hp, wp)
        return x + F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)


class UpBlock(nn.Module):
    """Transposed conv x2, concat a skip (Conv3x3+ReLU of a 1/16 map, resized), two Conv3x3-GN-ReLU."""

    def __init__(self, cin, cup, feat_dim, cskip, cout):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cup, 2, stride=2)
        self.skip = nn.Sequential(nn.Conv2d(feat_dim, cskip, 3, padding=1), nn.ReLU(inplace=True))
        self.convs = nn.Sequential(conv_gn_relu(cup + cskip, cout), conv_gn_relu(cout, cout))

    def forward(self, x, feat, n):
        x = self.up(x)                                                       # (B*N, cup, 2h, 2w)
        s = F.interpolate(self.skip(feat), size=x.shape[-2:], mode="bilinear", align_corners=False)
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
        S = torch.einsum("bchw,nc->bnhw", F.normalize(f3, dim=1), F.normalize(T, dim=-1))  # (B, N, h, w)
        x = self.stem(S.reshape(b * n, 1, *S.shape[-2:]))            # (B*N, 128, h, w)
        x = x + self.aspp(x)
        guide = self.guide(T)                                        # (N, 128)
        for layer in self.class_attn:
            x = layer(x, guide, n)
        x = self.up2(self.up1(x, f2, n), f1, n)                      # (B*N, 32, 4h, 4w)
        return self.out(x).view(b, n, *x.shape[-2:])                 # (B, N, H/4, W/4)


# --------------------------------------------------------------------------------------------
# The student: backbone + class embeddings + head; one class for both kinds


class Student(nn.Module):
    def __init__(self, kind, backbone, num_classes, text=None, name=None):
        super().__init__()
        self.kind, self.name = kind, name or kind
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

    def class_embeddings(self):
        return self.text if self.queries is None else self.queries.weight

    def _block(self, block, x, **kw):
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False, **kw)
        return block(x, **kw)

    def _clip_features(self, x):
        vm = self.backbone.vision_model
        h = vm.pre_layrnorm(vm.embeddings(x, interpolate_pos_encoding=True))  # (B, 1+hw, C)
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
            h = self._block(block, h, attention_mask=None)
        # E1, dense embedding: last value path -> post_layernorm -> visual_projection -> unit norm
        maps[-1] = F.normalize(self.backbone.visual_projection(vm.post_layernorm(maps[-1])), dim=-1)
        return [m[:, 1:] for m in maps]    # drop CLS

    def _dinov3_features(self, x):
        bb = self.backbone
        h, rope = bb.embeddings(x), bb.rope_embeddings(x)  # (B, 1+4+hw, C); RoPE from the input size
        prefix = 1 + bb.config.num_register_tokens
        maps = []
        for i, block in enumerate(blocks(bb)[: self.taps[-1] + 1]):
            h = self._block(block, h, position_embeddings=rope)
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


def build_student(kind, num_classes, *, size="base", weights=None, guidance=None, text=None, name=None):
    """One Co2S student. kind: 'clip' | 'dinov3'. guidance: 'text' (CLIP default) | 'queries'.

    weights: hub id or local folder of the backbone (None = random init). text: the (N, D) class
    embeddings of text guidance (text.class_embeddings gives them from concepts, a file or a stand-in)."""
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
    backbone = build_backbone(kind, size, weights)
    freeze_all_but_attention(backbone)
    return Student(kind, backbone, num_classes, text=text if guidance == "text" else None, name=name)


def build_model(kinds, num_classes, *, size="base", weights=None, clip_guidance="text", text=None,
                fusion="confidence", grad_checkpoint=False):
    """The students (E1-E4) inside the fusion head (E10). kinds: e.g. ['clip', 'dinov3'].
    weights: {kind: hub id or folder or None}; text: the CLIP class embeddings (see build_student)."""
    students = []
    for kind, name in zip(kinds, student_names(kinds)):
        s = build_student(kind, num_classes, size=size, weights=(weights or {}).get(kind), name=name, text=text,
                          guidance=clip_guidance if kind == "clip" else "queries")
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
