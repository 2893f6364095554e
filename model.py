"""model.py: the two Co2S students (CLIP and DINOv3 ViT-B/16), their decoder head and the fusion.

A student = a ViT backbone + class embeddings T + the decoder head of METHOD.md section 3. Here:
the ViT side the method needs (which blocks are tapped, E1's CLIP value path, DINOv3's blocks with
RoPE, the position tables at the crop size, which backbone weights train), E2 (the CLIP student's
class embeddings from its text tower), E3 (similarity maps) and the head, E4 (feature
perturbation) and E10 (the fusion of the two students at inference). Both students are ONE class
(`Student`) with ONE head; what differs per kind is how the three pyramid maps are tapped
(`_clip_features`, `_dinov3_features`), the width of the coarsest map (CLIP's 512-d joint space,
DINOv3's 768) and the class embeddings (fixed text, or learnable queries).

Where the backbone weights come from (presets, from_pretrained, the numerics switch, the text
tower's cache) is plumbing/weights.py. Deliberately left out: registries, builders by string, and
re-initialising weights after loading them (METHOD.md section 7.3).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from losses import at_least_fp32
from plumbing.errors import UserError
from plumbing.weights import blocks, build_backbone, text_embeddings, vit_preset

KINDS = ("clip", "dinov3")
TRAIN_BACKBONE = ("attention", "all")
FUSIONS = ("confidence", "mean")
FUSED = "fused"  # the name of the fused prediction (E10), beside the students' names
# Tapped blocks (0-based) at ViT-B depth 12; other depths scale the index by (depth - 1) / 11.
TAPS = {"clip": (0, 4, 11), "dinov3": (2, 7, 11)}


# --------------------------------------------------------------------------------------------
# The ViT side: taps, what trains, position tables, DINOv3's block


def tapped_blocks(kind, depth):
    return tuple(round(k * (depth - 1) / 11) for k in TAPS[kind])


def attention_projections(block):
    """q, k, v, out projections of one block: the only backbone weights that train (the paper)."""
    attn = block.self_attn if hasattr(block, "self_attn") else block.attention
    out = attn.out_proj if hasattr(attn, "out_proj") else attn.o_proj
    return [attn.q_proj, attn.k_proj, attn.v_proj, out]


def set_trainable(backbone, train_backbone="attention"):
    """'attention': only the attention projections train, all else stays frozen (the paper, with
    pretrained weights). 'all': every backbone weight trains (students from scratch: frozen RANDOM
    patch embeddings and MLPs leave a tiny student unable to fit even 6 labelled tiles)."""
    if train_backbone not in TRAIN_BACKBONE:
        raise UserError(f"unknown train_backbone {train_backbone!r}; valid: {TRAIN_BACKBONE}")
    backbone.requires_grad_(train_backbone == "all")
    for block in blocks(backbone):
        for proj in attention_projections(block):
            proj.requires_grad_(True)


def resize_positions(table, h, w):
    """CLIP's (1 + g*g, C) position table for an h x w patch grid: the CLS entry, then the g x g
    grid resized bicubically (align_corners False, as transformers and the release do)."""
    g = math.isqrt(table.shape[0] - 1)
    if (h, w) == (g, g):
        return table
    grid = table[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(at_least_fp32(grid), size=(h, w), mode="bicubic", align_corners=False)
    grid = grid.to(table.dtype).permute(0, 2, 3, 1).reshape(h * w, -1)
    return torch.cat([table[:1], grid])


def rope_periods(config, numerics):
    """DINOv3 RoPE periods base^(2j / (head_dim / 2)), j < head_dim / 4: fp32 ('hf'), or bf16 as the
    release computes and stores them ('release'; the whole rotation then runs in bf16)."""
    n = config.hidden_size // config.num_attention_heads // 4
    dtype = torch.bfloat16 if numerics == "release" else torch.float32
    return config.rope_theta ** (2 * torch.arange(n, dtype=dtype) / (2 * n))


def rope_tables(periods, h, w):
    """cos, sin (h*w, head_dim) of an h x w patch grid, in the dtype of `periods` (each step rounded
    to it, as the release computes them): patch centres in [-1, 1] per axis, angles
    2 pi coord / period, laid out [y | x] x 2."""
    ys, xs = (torch.arange(0.5, n, dtype=periods.dtype, device=periods.device) / n for n in (h, w))
    # (hw, 2): y, x of each patch centre, in [-1, 1]
    coords = 2.0 * torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).flatten(0, 1) - 1.0
    angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]
    angles = angles.flatten(1, 2).tile(2)  # (hw, head_dim)
    return torch.cos(angles), torch.sin(angles)


def rotate(x, cos, sin):
    """RoPE on the patch tokens (the last len(cos) of x (B, heads, T, d)), computed in the dtype of
    cos: x is cast to it whole (prefix tokens too, as the release does) and cast back after."""
    dtype, n = x.dtype, cos.shape[0]
    x = x.to(cos.dtype)
    patches = x[..., -n:, :]
    half = patches.shape[-1] // 2
    rotated = torch.cat([-patches[..., half:], patches[..., :half]], -1)
    patches = patches * cos + rotated * sin
    return torch.cat([x[..., :-n, :], patches], -2).to(dtype)


def dinov3_block(block, h, cos, sin):
    """One DINOv3 block with the weights of the transformers module `block`: pre-norm attention
    with RoPE on the patch tokens and layer scale, then pre-norm MLP and layer scale. Written out
    rather than calling block.forward: the release rotates q and k in bf16, transformers cannot."""
    attn, (b, t, c) = block.attention, h.shape
    x = block.norm1(h)
    qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
    q, k, v = (p(x).view(b, t, attn.num_heads, -1).transpose(1, 2) for p in qkv)
    x = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v)  # (B, h, T, d)
    h = h + block.layer_scale1(attn.o_proj(x.transpose(1, 2).reshape(b, t, c)))
    return h + block.layer_scale2(block.mlp(block.norm2(h)))


def clip_block(block, h):
    """One CLIP block (transformers' own forward; no attention mask)."""
    return block(h, None)


# --------------------------------------------------------------------------------------------
# E2: the CLIP student's class embeddings

PROMPT = "a photo of a {}"


def average_concepts(concept_embeds, counts):
    """E2: average the concept embeddings of each class as the text tower gives them (not
    normalised first, as the authors' text_embeddings.py does), then L2-normalise.
    (sum(counts), D) -> (N, D)."""
    per_class = at_least_fp32(concept_embeds).split(list(counts))
    return F.normalize(torch.stack([c.mean(0) for c in per_class]), dim=-1)


@torch.no_grad()
def encode_concepts(concepts, text_model, tokenizer):
    """E2: the prompt "a photo of a {concept}" for every concept of every class -> (N, D) unit
    rows."""
    prompts = [PROMPT.format(c) for cls_concepts in concepts for c in cls_concepts]
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    if tokens["input_ids"].shape[1] <= 2:
        raise UserError("the CLIP tokenizer gave empty prompts: check the CLIP weights folder")
    text_model.eval()
    out = text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return average_concepts(out.text_embeds, [len(c) for c in concepts])


def stand_in_embeddings(num_classes, dim, seed=0):
    """Seeded random unit rows (pairwise cosine about +-1/sqrt(dim)). A CLIP student WITHOUT
    pretrained weights has no language: a random text tower maps every prompt to nearly the same
    vector (cosine 0.90-0.97 at tiny size), and the student could not tell the classes apart (its
    loss stays at ln N). These rows stand in for a pretrained tower's distinct directions."""
    t = np.random.default_rng([seed, num_classes, dim]).standard_normal((num_classes, dim))
    return F.normalize(torch.from_numpy(t).float(), dim=-1)


def class_embeddings(concepts, *, size, clip_weights=None, file=None):
    """(T, source) for a CLIP student with text guidance: from `file` when given (e.g. the
    authors' precomputed rows), else E2 with the text tower of `clip_weights` (cached), else
    (random CLIP weights) the stand-in rows."""
    from plumbing.weights import load_text_embeddings

    dim = vit_preset(size).proj
    if file:
        return load_text_embeddings(file, len(concepts), dim), f"file {file}"
    if clip_weights:
        T = text_embeddings(concepts, clip_weights, encode_concepts, PROMPT)
        return T, f"E2 with the text tower of {clip_weights}"
    source = "stand-in: seeded well-separated unit rows (the CLIP student has random weights)"
    return stand_in_embeddings(len(concepts), dim), source


# --------------------------------------------------------------------------------------------
# The decoder head (METHOD.md section 3): the same module for both students


def conv_gn_relu(cin, cout, k=3, dilation=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
        nn.GroupNorm(cout // 16, cout),
        nn.ReLU(inplace=True),
    )


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
        self.layer = nn.TransformerEncoderLayer(
            2 * c, nhead=4, dim_feedforward=512, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip

    def forward(self, x, guide, n):
        # x: (B*N, C, h, w) one map per class; guide: (N, C) projected class embeddings
        bn, c, h, w = x.shape
        # (B*N, C, h // 4, w // 4): rounds down as released; a map under 4 cells (an input under
        # 64 px, which the release never sees) keeps one cell instead of none
        p = F.avg_pool2d(x, self.pool, ceil_mode=min(h, w) < self.pool)
        hp, wp = p.shape[-2:]
        tok = p.view(bn // n, n, c, hp * wp).permute(0, 3, 1, 2).reshape(-1, n, c)  # (B*h'w', N, C)
        tok = torch.cat([tok, guide.expand(tok.shape[0], n, c)], -1)  # (B*h'w', N, 2C)
        tok = self.layer(tok)[..., :c]  # keep the first C channels
        out = tok.view(bn // n, hp * wp, n, c).permute(0, 2, 3, 1).reshape(bn, c, hp, wp)
        return x + F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)  # released


class UpBlock(nn.Module):
    """Transposed conv x2, concat a skip (Conv3x3+ReLU of a 1/16 map, resized), two
    Conv3x3-GN-ReLU."""

    def __init__(self, cin, cup, feat_dim, cskip, cout):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cup, 2, stride=2)
        self.skip = nn.Sequential(nn.Conv2d(feat_dim, cskip, 3, padding=1), nn.ReLU(inplace=True))
        self.convs = nn.Sequential(conv_gn_relu(cup + cskip, cout), conv_gn_relu(cout, cout))

    def forward(self, x, feat, n):
        x = self.up(x)  # (B*N, cup, 2h, 2w)
        s = F.interpolate(self.skip(feat), size=x.shape[-2:], mode="bilinear", align_corners=True)
        s = s.repeat_interleave(n, dim=0)  # one copy per class map
        return self.convs(torch.cat([x, s], 1))


class Co2SHead(nn.Module):
    """METHOD.md section 3: 2,217,185 parameters for 512-d class embeddings, 2,249,953 for 768-d."""

    def __init__(self, feat_dim=768, embed_dim=512, c=128):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 7, padding=3)  # spatial reasoning, per class map
        self.aspp = ASPP(c)
        self.guide = nn.Sequential(nn.Linear(embed_dim, c), nn.ReLU(inplace=True))  # both layers'
        self.class_attn = nn.ModuleList([ClassAttention(c), ClassAttention(c)])
        self.up1 = UpBlock(c, 96, feat_dim, 32, 64)  # 1/16 -> 1/8, skip from f2
        self.up2 = UpBlock(64, 48, feat_dim, 16, 32)  # 1/8 -> 1/4, skip from f1
        self.out = nn.Conv2d(32, 1, 3, padding=1)

    def forward(self, feats, T):
        f1, f2, f3 = feats  # (B, C, h, w) each, fine to coarse
        b, n = f3.shape[0], T.shape[0]
        # E3: cosine similarity of every pixel embedding with every class embedding; the unit
        # class embeddings feed the guide too (as released)
        T = F.normalize(T, dim=-1)
        S = torch.einsum("bchw,nc->bnhw", F.normalize(f3, dim=1), T)  # (B, N, h, w)
        x = self.stem(S.reshape(b * n, 1, *S.shape[-2:]))  # (B*N, 128, h, w)
        x = x + self.aspp(x)
        guide = self.guide(T)  # (N, 128)
        for layer in self.class_attn:
            x = layer(x, guide, n)
        x = self.up2(self.up1(x, f2, n), f1, n)  # (B*N, 32, 4h, 4w)
        return self.out(x).view(b, n, *x.shape[-2:])  # (B, N, H/4, W/4)


# --------------------------------------------------------------------------------------------
# The student: backbone + class embeddings + head; one class for both kinds


class Student(nn.Module):
    def __init__(self, kind, backbone, num_classes, text=None, name=None, numerics="hf"):
        super().__init__()
        self.kind, self.name, self.numerics = kind, name or kind, numerics
        self.backbone = backbone
        self.taps = tapped_blocks(kind, backbone.config.num_hidden_layers)
        self.grad_checkpoint = False
        # one transformer block: (block, h, *position tables) -> h; runtime.compile_model compiles it
        self.run_block = clip_block if kind == "clip" else dinov3_block
        width = backbone.config.hidden_size
        f3_dim = backbone.config.projection_dim if kind == "clip" else width
        # explicit guidance: fixed text embeddings (E2), saved with the model (a None buffer is not)
        self.register_buffer("text", None if text is None else at_least_fp32(text).clone())
        self.queries = None
        if text is None:  # implicit guidance: learnable class queries
            self.queries = nn.Embedding(num_classes, f3_dim)
            nn.init.normal_(self.queries.weight, std=0.02)
        self.head = Co2SHead(feat_dim=width, embed_dim=f3_dim)
        if kind == "dinov3":  # RoPE periods (head_dim / 4 of them), in the dtype RoPE runs in
            self.register_buffer("rope_periods", rope_periods(backbone.config, numerics))
        self._frozen = {}  # position tables computed once per input size (see _cached)

    def class_embeddings(self):
        return self.text if self.queries is None else self.queries.weight

    def _block(self, fn, *args):
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _cached(self, what, source, h, w, make):
        """make(source, h, w) once per (what, size, device, dtype) while `source` (a frozen tensor)
        is unchanged. A trainable source (--train-backbone all) is recomputed every forward, so
        that it gets its gradient."""
        if source.requires_grad:
            return make(source, h, w)
        key = (what, h, w, source.device, source.dtype, source._version)
        if key not in self._frozen:
            # drop the tables of an older version of the same source (it was trained or loaded)
            old = [k for k in self._frozen if k[0] == what and k[-1] != source._version]
            self._frozen = {k: v for k, v in self._frozen.items() if k not in old}
            with torch.no_grad():
                self._frozen[key] = make(source, h, w)
        return self._frozen[key]

    def _clip_features(self, x, hw):
        vm = self.backbone.vision_model
        emb, (h, w) = vm.embeddings, hw
        patches = emb.patch_embedding(x.to(emb.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # (B, hw, C)
        tokens = torch.cat([emb.class_embedding.expand(len(x), 1, -1), patches], 1)  # (B, 1+hw, C)
        pos = self._cached("pos", emb.position_embedding.weight, h, w, resize_positions)
        h = vm.pre_layrnorm(tokens + pos)
        maps = []
        for i, block in enumerate(blocks(self.backbone)):
            if i in self.taps:
                # E1, value path: no token mixing; v = x + out(v(LN1 x)); v = v + MLP(LN2 v)
                v = h + block.self_attn.out_proj(block.self_attn.v_proj(block.layer_norm1(h)))
                maps.append(v + block.mlp(block.layer_norm2(v)))
            if i == self.taps[-1]:
                break  # the main path after the last tap is never used
            h = self._block(self.run_block, block, h)
        # E1, dense embedding: last value path -> post_layernorm -> visual_projection -> unit norm
        maps[-1] = F.normalize(self.backbone.visual_projection(vm.post_layernorm(maps[-1])), dim=-1)
        return [m[:, 1:] for m in maps]  # drop CLS

    def _dinov3_features(self, x, hw):
        bb = self.backbone
        cos, sin = self._cached("rope", self.rope_periods, *hw, rope_tables)
        h = bb.embeddings(x)  # (B, 1+4+hw, C): CLS, registers, patches
        prefix = 1 + bb.config.num_register_tokens
        maps = []
        for i, block in enumerate(blocks(bb)[: self.taps[-1] + 1]):
            h = self._block(self.run_block, block, h, cos, sin)
            if i in self.taps:
                maps.append(bb.norm(h)[:, prefix:])  # final LayerNorm, patch tokens only
        return maps

    def features(self, x):
        """The three tapped maps, fine to coarse, each (B, C, H/16, W/16)."""
        hw = (x.shape[-2] // 16, x.shape[-1] // 16)
        tokens = self._clip_features(x, hw) if self.kind == "clip" else self._dinov3_features(x, hw)
        return [t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *hw) for t in tokens]

    def forward(self, x, fp_from=None):
        """Logits (B, N, H, W) of x at the input size. With fp_from (E4), the FP logits of
        x[fp_from:] follow them along the batch: the SAME backbone pass, Dropout2d(0.5) on every
        tapped map, the clean and the perturbed maps through the head as one batch. One forward
        for both, so that DDP (train.py) sees every use of the weights."""
        feats = self.features(x)
        if fp_from is not None:
            feats = [torch.cat([f, F.dropout2d(f[fp_from:], 0.5, training=True)]) for f in feats]
        logits = self.head(feats, self.class_embeddings())  # (B [+ B - fp_from], N, H/4, W/4)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class ModelSpec:
    """What builds a Co2S model, saved in every checkpoint (`model_args`) so that eval.py, --resume
    and --init rebuild it without a download. size: a preset name or ViTSize fields (a converted
    release)."""

    kinds: tuple  # e.g. ("clip", "dinov3")
    num_classes: int
    size: object = "base"
    numerics: str = "hf"  # plumbing.weights.NUMERICS
    clip_guidance: str = "text"  # text (E2) | queries
    fusion: str = "confidence"  # FUSIONS (E10)
    grad_checkpoint: bool = False
    train_backbone: str = "attention"  # TRAIN_BACKBONE


def build_student(kind, spec, *, weights=None, text=None, name=None):
    """One Co2S student of `kind` ('clip' | 'dinov3') with the sizes and options of `spec`.

    weights: hub id or local folder of the backbone (None = random init). text: the (N, D) class
    embeddings of a CLIP student with text guidance (class_embeddings gives them)."""
    if kind not in KINDS:
        raise UserError(f"unknown student kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    guidance = spec.clip_guidance if kind == "clip" else "queries"
    if guidance not in ("text", "queries"):
        raise UserError(f"guidance {guidance!r} for the clip student; valid: text, queries")
    shape = (spec.num_classes, vit_preset(spec.size).proj)
    got = None if text is None else tuple(text.shape)
    if guidance == "text" and got != shape:
        raise ValueError(f"the CLIP text guidance needs its {shape} class embeddings, got {got}")
    # The backbone is built (and its pretrained weights loaded) first; the head and the queries
    # created after it are new modules, so nothing re-initialises the loaded weights (METHOD.md
    # section 7.3).
    backbone = build_backbone(kind, spec.size, weights, spec.numerics)
    set_trainable(backbone, spec.train_backbone)
    text = text if guidance == "text" else None
    s = Student(kind, backbone, spec.num_classes, text=text, name=name, numerics=spec.numerics)
    s.grad_checkpoint = spec.grad_checkpoint
    return s


def build_model(spec, weights=None, text=None):
    """The students of spec.kinds (E1-E4) inside the fusion head (E10).
    weights: {kind: hub id or folder or None}; text: the CLIP class embeddings (see build_student)."""
    weights, pairs = weights or {}, zip(spec.kinds, student_names(spec.kinds))
    students = [build_student(k, spec, weights=weights.get(k), text=text, name=n) for k, n in pairs]
    return Co2S(students, fusion=spec.fusion)


def student_names(kinds):
    """clip,dinov3 -> clip, dinov3; clip,clip -> clip1, clip2 (names must be unique)."""
    return [
        k if kinds.count(k) == 1 else f"{k}{kinds[: i + 1].count(k)}" for i, k in enumerate(kinds)
    ]


def prediction_names(kinds):
    """What a model of these students predicts: each student by name, and the fusion (E10)."""
    return student_names(kinds) + [FUSED]


# --------------------------------------------------------------------------------------------
# E10: the fusion head


def check_fusion(mode):
    if mode not in FUSIONS:
        raise UserError(f"unknown fusion mode {mode!r}; valid: {', '.join(FUSIONS)}")
    return mode


def fuse(probs, mode="confidence"):
    """E10: per pixel the more confident student's probabilities ('confidence'), or their mean.
    probs: one (B, N, H, W) map per student; mode: one of FUSIONS."""
    check_fusion(mode)
    stacked = torch.stack(probs)  # (K, B, N, H, W)
    if mode == "mean":
        return stacked.mean(0)
    winner = stacked.amax(2, keepdim=True).argmax(0, keepdim=True)  # (1, B, 1, H, W)
    return stacked.gather(0, winner.expand(1, *stacked.shape[1:]))[0]


class Co2S(nn.Module):
    """The students and the fusion rule (E10) their predictions are combined with. No forward of
    its own: eval.predict runs each student over the sliding windows and fuses the averaged maps,
    so both students are judged on the same full-image probabilities."""

    def __init__(self, students, fusion="confidence"):
        super().__init__()
        self.students = nn.ModuleList(students)
        self.fusion = check_fusion(fusion)
        self.names = [s.name for s in students] + [FUSED]  # prediction_names of its students

    def check_names(self, names):
        """names: which predictions to compute (student names and/or 'fused'); None = all."""
        names = list(names or self.names)
        bad = [n for n in names if n not in self.names]
        if bad:
            raise UserError(f"unknown prediction(s) {bad}; valid here: {', '.join(self.names)}")
        return names
