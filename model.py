"""model.py: the two Co2S students (CLIP and DINOv3 ViT-B/16), their decoder head and the fusion
head.

A student = a backbone (backbones.py) + class embeddings T + the decoder head of METHOD.md section
3. Implements E1 (CLIP value path), E3 (similarity maps), E4 (feature perturbation) and E10 (fusion
of the two students at inference); the class embeddings of E2 come from text.py. Both students share
ONE class (`Student`) and ONE head; what differs per kind is how the three pyramid maps are tapped
(`_clip_features`, `_dinov3_features`), the width of the coarsest map (CLIP's 512-d joint space,
DINOv3's 768) and the class embeddings (fixed text or learnable queries).

Deliberately left out: registries, builders by string, weight re-initialisation after loading (the
release's re-initialised DINOv3 is built only on request: backbones.release_init).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from backbones import (KINDS, blocks, build_backbone, dinov3_block, resize_positions, rope_periods,
                       rope_tables, set_trainable, tapped_blocks, vit_preset)
from errors import UserError

FUSIONS = ("confidence", "mean")


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
        # (B*N, C, h // 4, w // 4): rounds down as released; a map under 4 cells (an input under 64
        # px, which
        # the release never sees) keeps one cell instead of none
        p = F.avg_pool2d(x, self.pool, ceil_mode=min(h, w) < self.pool)
        hp, wp = p.shape[-2:]
        # (B*h'*w', N, C)
        tok = p.view(bn // n, n, c, hp * wp).permute(0, 3, 1, 2).reshape(-1, n, c)
        tok = torch.cat([tok, guide.expand(tok.shape[0], n, c)], -1)        # (B*h'*w', N, 2C)
        # keep the first C channels
        tok = self.layer(tok)[..., :c]
        out = tok.view(bn // n, hp * wp, n, c).permute(0, 2, 3, 1).reshape(bn, c, hp, wp)
        # as released
        return x + F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)


class UpBlock(nn.Module):
    """Transposed conv x2, concat a skip (Conv3x3+ReLU of a 1/16 map, resized), two
    Conv3x3-GN-ReLU."""

    def __init__(self, cin, cup, feat_dim, cskip, cout):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cup, 2, stride=2)
        self.skip = nn.Sequential(nn.Conv2d(feat_dim, cskip, 3, padding=1), nn.ReLU(inplace=True))
        self.convs = nn.Sequential(conv_gn_relu(cup + cskip, cout), conv_gn_relu(cout, cout))

    def forward(self, x, feat, n):
        x = self.up(x)                                                       # (B*N, cup, 2h, 2w)
        # as released
        s = F.interpolate(self.skip(feat), size=x.shape[-2:], mode="bilinear", align_corners=True)
        # one copy per class map
        s = s.repeat_interleave(n, dim=0)
        return self.convs(torch.cat([x, s], 1))


class Co2SHead(nn.Module):
    """METHOD.md section 3: 2,217,185 parameters for 512-d class embeddings, 2,249,953 for 768-d."""

    def __init__(self, feat_dim=768, embed_dim=512, c=128):
        super().__init__()
        # spatial reasoning, per class map
        self.stem = nn.Conv2d(1, c, 7, padding=3)
        self.aspp = ASPP(c)
        # shared by both layers
        self.guide = nn.Sequential(nn.Linear(embed_dim, c), nn.ReLU(inplace=True))
        self.class_attn = nn.ModuleList([ClassAttention(c), ClassAttention(c)])
        self.up1 = UpBlock(c, 96, feat_dim, 32, 64)                  # 1/16 -> 1/8, skip from f2
        self.up2 = UpBlock(64, 48, feat_dim, 16, 32)                 # 1/8 -> 1/4, skip from f1
        self.out = nn.Conv2d(32, 1, 3, padding=1)

    def forward(self, feats, T):
        # (B, C, h, w) each, fine to coarse
        f1, f2, f3 = feats
        b, n = f3.shape[0], T.shape[0]
        # E3: cosine similarity of every pixel embedding with every class embedding
        # unit class embeddings, here and for the guide
        T = F.normalize(T, dim=-1)
        S = torch.einsum("bchw,nc->bnhw", F.normalize(f3, dim=1), T)  # (B, N, h, w)
        x = self.stem(S.reshape(b * n, 1, *S.shape[-2:]))            # (B*N, 128, h, w)
        x = x + self.aspp(x)
        # (N, 128), of the NORMALISED T (as released)
        guide = self.guide(T)
        for layer in self.class_attn:
            x = layer(x, guide, n)
        x = self.up2(self.up1(x, f2, n), f1, n)                      # (B*N, 32, 4h, 4w)
        return self.out(x).view(b, n, *x.shape[-2:])                 # (B, N, H/4, W/4)


# --------------------------------------------------------------------------------------------
# The student: backbone + class embeddings + head; one class for both kinds


def clip_block(block, h):
    """One CLIP block (transformers' own forward; no attention mask)."""
    return block(h, None)


class Student(nn.Module):
    def __init__(self, kind, backbone, num_classes, text=None, name=None, numerics="hf"):
        super().__init__()
        self.kind, self.name, self.numerics = kind, name or kind, numerics
        self.backbone = backbone
        self.taps = tapped_blocks(kind, backbone.config.num_hidden_layers)
        self.grad_checkpoint = False
        # one transformer block: (block, h, *position tables) -> h; compile_model compiles it
        self.run_block = clip_block if kind == "clip" else dinov3_block
        width = backbone.config.hidden_size
        f3_dim = backbone.config.projection_dim if kind == "clip" else width
        # explicit guidance: fixed text embeddings (E2), a buffer, saved with the model
        if text is not None:
            self.register_buffer("text", text.float().clone())
            self.queries = None
        else:                   # implicit guidance: learnable class queries
            self.text = None
            self.queries = nn.Embedding(num_classes, f3_dim)
            nn.init.normal_(self.queries.weight, std=0.02)
        self.head = Co2SHead(feat_dim=width, embed_dim=f3_dim)
        # RoPE periods (head_dim / 4 of them), in the dtype the rotation runs in
        if kind == "dinov3":
            self.register_buffer("rope_periods", rope_periods(backbone.config, numerics))
        self._frozen = {}       # position tables computed once per input size (see _cached)

    def class_embeddings(self):
        return self.text if self.queries is None else self.queries.weight

    def _block(self, fn, *args):
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _cached(self, what, source, h, w, make):
        """make(source, h, w) once per (what, size, device, dtype) while `source` (a frozen tensor)
        is unchanged. A trainable source (--train-backbone all) is recomputed every forward, so that
        it gets its gradient."""
        if source.requires_grad:
            return make(source, h, w)
        key = (what, h, w, source.device, source.dtype, source._version)
        if key not in self._frozen:
            self._frozen = {k: v for k,
                            v in self._frozen.items() if k[0] != what or k[-1] == source._version}
            with torch.no_grad():
                self._frozen[key] = make(source, h, w)
        return self._frozen[key]

    def _clip_features(self, x):
        vm = self.backbone.vision_model
        emb, (h, w) = vm.embeddings, (x.shape[-2] // 16, x.shape[-1] // 16)
        patches = emb.patch_embedding(x.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        # (B, 1+hw, C)
        tokens = torch.cat([emb.class_embedding.expand(len(x), 1, -1), patches], 1)
        h = vm.pre_layrnorm(tokens + self._cached("pos", emb.position_embedding.weight, h, w,
                                                  resize_positions))
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
            h = self._block(self.run_block, block, h)
        # E1, dense embedding: last value path -> post_layernorm -> visual_projection -> unit norm
        maps[-1] = F.normalize(self.backbone.visual_projection(vm.post_layernorm(maps[-1])), dim=-1)
        return [m[:, 1:] for m in maps]    # drop CLS

    def _dinov3_features(self, x):
        bb = self.backbone
        cos, sin = self._cached("rope", self.rope_periods, x.shape[-2] // 16, x.shape[-1] // 16,
                                rope_tables)
        # (B, 1+4+hw, C): CLS, registers, patches
        h = bb.embeddings(x)
        prefix = 1 + bb.config.num_register_tokens
        maps = []
        for i, block in enumerate(blocks(bb)[: self.taps[-1] + 1]):
            h = self._block(self.run_block, block, h, cos, sin)
            if i in self.taps:
                maps.append(bb.norm(h)[:, prefix:])   # final LayerNorm, patch tokens only
        return maps

    def features(self, x):
        """The three tapped maps, fine to coarse, each (B, C, H/16, W/16)."""
        tokens = self._clip_features(x) if self.kind == "clip" else self._dinov3_features(x)
        hw = (x.shape[-2] // 16, x.shape[-1] // 16)
        return [t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *hw) for t in tokens]

    def forward(self, x):
        """Logits (B, N, H, W) at the input size."""
        return self._logits(self.features(x), x.shape[-2:])

    def forward_fp(self, x, fp_from):
        """(logits of x, FP logits of x[fp_from:]) from the SAME backbone pass (E4): Dropout2d(0.5)
        on every tapped map; the clean and the perturbed maps run through the head as one batch."""
        feats = [torch.cat([f,
                            F.dropout2d(f[fp_from:], 0.5,
                                        training=True)]) for f in self.features(x)]
        logits = self._logits(feats, x.shape[-2:])
        return logits[: len(x)], logits[len(x):]

    def _logits(self, feats, size):
        logits = self.head(feats, self.class_embeddings())                    # (B, N, H/4, W/4)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class ModelSpec:
    """What builds a Co2S model, saved in every checkpoint (`model_args`) so that eval.py, --resume
    and
    --init rebuild it without a download. size: a preset name or ViTSize fields (a converted
    release)."""
    kinds: tuple                     # e.g. ("clip", "dinov3")
    num_classes: int
    size: object = "base"
    numerics: str = "hf"             # backbones.NUMERICS
    clip_guidance: str = "text"      # text (E2) | queries
    fusion: str = "confidence"       # FUSIONS (E10)
    grad_checkpoint: bool = False
    train_backbone: str = "attention"   # backbones.TRAIN_BACKBONE


def build_student(kind, spec, *, weights=None, text=None, name=None):
    """One Co2S student of `kind` ('clip' | 'dinov3') with the sizes and options of `spec`.

    weights: hub id or local folder of the backbone (None = random init). text: the (N, D) class
    embeddings of a CLIP student with text guidance (text.class_embeddings gives them)."""
    if kind not in KINDS:
        raise UserError(f"unknown student kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    guidance = spec.clip_guidance if kind == "clip" else "queries"
    if guidance not in ("text", "queries"):
        raise UserError(f"guidance {guidance!r} for the clip student; valid: text, queries")
    shape = (spec.num_classes, vit_preset(spec.size).proj)
    if guidance == "text" and (text is None or tuple(text.shape) != shape):
        raise ValueError(f"a CLIP student with text guidance needs its {shape} class embeddings, got "
                         f"{None if text is None else tuple(text.shape)}")
    # The backbone is built (and its pretrained weights loaded) first; the head and the queries
    # created
    # after it are new modules, so nothing re-initialises the loaded weights (METHOD.md section
    # 7.3).
    backbone = build_backbone(kind, spec.size, weights, spec.numerics)
    set_trainable(backbone, spec.train_backbone)
    student = Student(kind, backbone, spec.num_classes, text=text if guidance == "text" else None,
                      name=name, numerics=spec.numerics)
    student.grad_checkpoint = spec.grad_checkpoint
    return student


def build_model(spec, weights=None, text=None):
    """The students of spec.kinds (E1-E4) inside the fusion head (E10).
    weights: {kind: hub id or folder or None}; text: the CLIP class embeddings (see build_student)."""
    students = [build_student(kind, spec, weights=(weights or {}).get(kind), text=text, name=name)
                for kind, name in zip(spec.kinds, student_names(spec.kinds))]
    return Co2S(students, fusion=spec.fusion)


def student_names(kinds):
    """clip,dinov3 -> clip, dinov3; clip,clip -> clip1, clip2 (names must be unique)."""
    kinds = list(kinds)
    return [k if kinds.count(k) == 1 else f"{k}{kinds[:i + 1].count(k)}" for i,
            k in enumerate(kinds)]


# --------------------------------------------------------------------------------------------
# E10: the fusion head


def fuse(probs, mode="confidence"):
    """E10: per pixel the more confident student's probabilities ('confidence'), or their mean."""
    if mode not in FUSIONS:
        raise UserError(f"unknown fusion mode {mode!r}; valid: {', '.join(FUSIONS)}")
    stacked = torch.stack(probs)                                     # (K, B, N, H, W)
    if mode == "mean":
        return stacked.mean(0)
    # (1, B, 1, H, W): most confident
    winner = stacked.amax(2, keepdim=True).argmax(0, keepdim=True)
    return stacked.gather(0, winner.expand(1, *stacked.shape[1:]))[0]


def compile_model(model):
    """--compile: torch.compile each student's transformer block function (one graph serves all its
    blocks: their weights are inputs) and its decoder head, with static shapes. So each distinct
    (batch, height, width, grad mode) compiles once: in training the [labelled; weak] and strong
    passes (2 x the micro-batch), the CutMix partners (1 x, no grad) and, for the head, the clean +
    FP batch (3 x); at evaluation the window batch. The rest (embeddings, E1's value path, the
    losses) runs eagerly."""
    for s in model.students:
        s.run_block = torch.compile(s.run_block, dynamic=False)
        s.head.compile(dynamic=False)
    return model


def store_frozen(model, dtype):
    """--frozen-bf16: the frozen matrix weights of the backbones (every Linear and Conv2d none of
    whose parameters trains: with the paper's trainable set, the MLPs, the patch embeddings and
    CLIP's projection) stored in the autocast dtype, so autocast does not cast them at every step.
    Autocast would round them to the same values, so the arithmetic is unchanged; norms, layer
    scales, tokens and position tables stay fp32 (autocast runs their ops in fp32). What trains
    keeps its fp32 master weights. dtype None (runs.frozen_dtype of an fp32 run): nothing changes."""
    for s in model.students if dtype is not None else []:
        for m in s.backbone.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not any(p.requires_grad
                                                                 for p in m.parameters()):
                m.to(dtype)
    return model


def check_names(model, names):
    """names: which predictions to compute (student names and/or 'fused'); None = all of them."""
    valid = [s.name for s in model.students] + ["fused"]
    names = list(names or valid)
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"unknown prediction(s) {bad}; valid for this model: {', '.join(valid)}")
    return names



class Co2S(nn.Module):
    """The students and the fusion rule (E10) their predictions are combined with. It has no forward
    of its own: eval.predict runs each student over the sliding windows and fuses the averaged maps,
    so both students are judged on the same full-image probabilities."""

    def __init__(self, students, fusion="confidence"):
        super().__init__()
        if fusion not in FUSIONS:
            raise UserError(f"unknown fusion mode {fusion!r}; valid: {', '.join(FUSIONS)}")
        self.students = nn.ModuleList(students)
        self.fusion = fusion
