"""An independent statement of the authors' released students: their module tree and key names, their
forward numerics, at any width (written from XavierJiezou/Co2S @ 26bc087 and mmcv 1.4.4, not from model.py).

- CLIP student: MaskClipVisionTransformer (mmseg ViT, mmcv layers: `attn.attn` is an nn.MultiheadAttention,
  FFN `layers.0.0` / `layers.1`), LayerNorm eps 1e-6, exact GELU, pre-norm `ln0`, position table stored
  at the crop size; features = MaskCLIP value paths of layers 0 and 4, and of layer 11 through the final
  norm, the 1x1 `proj` conv and an L2 norm.
- DINOv3 student: the DINOv3 reference ViT (fused `qkv` with `bias_mask`, LayerScale `ls1`/`ls2`, 4
  storage tokens), eps 1e-6, RoPE from bf16 `periods` with q and k cast to bf16 for the rotation;
  features = final norm of the outputs of blocks 2, 7, 11 without the 5 prefix tokens.
- VLGHead (decode_head): similarity -> conv1 -> ASPP (+ residual) -> 2 class-attention layers (AvgPool 4,
  align_corners=True) -> up1/up2 with skips resized align_corners=True -> head; resized to the crop, then
  to the input.
`save_like_the_authors` writes {'model': DDP state dict ('module.' keys), 'optimizer', 'epoch'}.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MMCVAttention(nn.Module):
    """mmcv.cnn.bricks.transformer.MultiheadAttention: a sequence-first nn.MultiheadAttention plus the identity."""

    def __init__(self, dim, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads)

    def forward(self, x, identity):
        q = x.transpose(0, 1)
        return identity + self.attn(q, q, q, need_weights=False)[0].transpose(0, 1)


class MMCVFFN(nn.Module):
    """mmcv FFN: layers = [Sequential(Linear, GELU, Dropout), Linear, Dropout], plus the identity."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0)),
            nn.Linear(hidden, dim),
            nn.Dropout(0.0),
        )

    def forward(self, x, identity):
        return identity + self.layers(x)


class EncoderLayer(nn.Module):
    """The pre-norm layer of mmseg's ViT / maskclip: ln1, attn, ln2, ffn."""

    def __init__(self, dim, heads, hidden, eps):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim, eps=eps), MMCVAttention(dim, heads)
        self.ln2, self.ffn = nn.LayerNorm(dim, eps=eps), MMCVFFN(dim, hidden)

    def forward(self, x):
        x = self.attn(self.ln1(x), identity=x)
        return self.ffn(self.ln2(x), identity=x)

    def value_path(self, x):
        """maskclip forward_qkv's v: x + out_proj(v-projection of ln1(x)), then the FFN with its residual."""
        d = x.shape[-1]
        v = F.linear(
            self.ln1(x),
            self.attn.attn.in_proj_weight[2 * d :],
            self.attn.attn.in_proj_bias[2 * d :],
        )
        v = x + self.attn.attn.out_proj(v)
        return self.ffn(self.ln2(v), identity=v)


class MaskClipViT(nn.Module):
    def __init__(self, width, depth, heads, proj, grid):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.projection = nn.Conv2d(3, width, 16, 16, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, width))
        self.ln0 = nn.LayerNorm(width, eps=1e-6)
        self.layers = nn.ModuleList(
            [EncoderLayer(width, heads, 4 * width, 1e-6) for _ in range(depth)]
        )
        self.ln1 = nn.LayerNorm(width, eps=1e-6)
        self.proj = nn.Conv2d(width, proj, 1, bias=False)

    def forward(self, img):
        b, _, H, W = img.shape
        h, w = H // 16, W // 16
        x = self.patch_embed.projection(img).flatten(2).transpose(1, 2)
        pos = self.pos_embed
        g = math.isqrt(pos.shape[1] - 1)
        if (h, w) != (g, g):  # resize_pos_embed: cls kept apart, the grid resized bicubically
            grid = (
                F.interpolate(
                    pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2),
                    size=(h, w),
                    mode="bicubic",
                    align_corners=False,
                )
                .flatten(2)
                .transpose(1, 2)
            )
            pos = torch.cat([pos[:, :1], grid], 1)
        x = self.ln0(torch.cat([self.cls_token.expand(b, -1, -1), x], 1) + pos)
        outs = []
        for i, layer in enumerate(self.layers):
            if i in (0, 4, len(self.layers) - 1):
                outs.append(layer.value_path(x))
            x = layer(x)
        v = self.ln1(outs[-1])[:, 1:].transpose(1, 2).reshape(b, -1, h, w)
        emb = self.proj(v)
        emb = emb / emb.norm(dim=1, keepdim=True)
        return [o[:, 1:].transpose(1, 2).reshape(b, -1, h, w) for o in outs[:2]] + [emb]


class DinoAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qkv.register_buffer(
            "bias_mask", torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
        )
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        b, n, c = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias * self.qkv.bias_mask).reshape(
            b, n, 3, self.heads, -1
        )
        q, k, v = qkv.unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def apply_rope(x, rope):
    """The release's rope: x cast to the rope dtype (bf16), the last HW tokens rotated, cast back."""
    sin, cos = rope
    x_dtype = x.dtype
    x = x.to(sin.dtype)
    n = sin.shape[-2]
    prefix, patches = x[:, :, :-n], x[:, :, -n:]
    x1, x2 = patches.chunk(2, dim=-1)
    patches = patches * cos + torch.cat([-x2, x1], -1) * sin
    return torch.cat([prefix, patches], -2).to(x_dtype)


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class DinoBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn, self.ls1 = (
            nn.LayerNorm(dim, eps=1e-6),
            DinoAttention(dim, heads),
            LayerScale(dim),
        )
        self.norm2, self.mlp, self.ls2 = (
            nn.LayerNorm(dim, eps=1e-6),
            Mlp(dim, 4 * dim),
            LayerScale(dim),
        )

    def forward(self, x, rope):
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class RopeEmbed(nn.Module):
    def __init__(self, dim, heads, base=100.0):
        super().__init__()
        d_head = dim // heads
        self.register_buffer(
            "periods", base ** (2 * torch.arange(d_head // 4, dtype=torch.bfloat16) / (d_head // 2))
        )

    def forward(self, H, W):
        dd = dict(dtype=self.periods.dtype)
        coords = torch.stack(
            torch.meshgrid(
                torch.arange(0.5, H, **dd) / H, torch.arange(0.5, W, **dd) / W, indexing="ij"
            ),
            dim=-1,
        ).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        return torch.sin(angles), torch.cos(angles)


class DinoViT(nn.Module):
    def __init__(self, width, depth, heads, registers=4):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, 16, 16)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.storage_tokens = nn.Parameter(torch.zeros(1, registers, width))
        self.mask_token = nn.Parameter(torch.zeros(1, width))
        self.rope_embed = RopeEmbed(width, heads)
        self.blocks = nn.ModuleList([DinoBlock(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, img):
        b, _, H, W = img.shape
        h, w = H // 16, W // 16
        x = self.patch_embed.proj(img).flatten(2).transpose(1, 2)
        cls = self.cls_token + 0 * self.mask_token
        x = torch.cat([cls.expand(b, -1, -1), self.storage_tokens.expand(b, -1, -1), x], 1)
        rope, outs = self.rope_embed(h, w), []
        for i, block in enumerate(self.blocks):
            x = block(x, rope)
            if i in (2, 7, 11):
                outs.append(
                    self.norm(x)[:, 1 + self.storage_tokens.shape[1] :]
                    .transpose(1, 2)
                    .reshape(b, -1, h, w)
                )
        return outs


def gn_relu_conv(cin, cout, k, dilation=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
        nn.GroupNorm(cout // 16, cout),
        nn.ReLU(),
    )


class ASPPModule(nn.Module):
    def __init__(self, c=128):
        super().__init__()
        pool = nn.Module()
        pool.gap = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1, bias=False), nn.GroupNorm(8, c), nn.ReLU()
        )
        self.aspp_convs = nn.ModuleList(
            [gn_relu_conv(c, c, 1)] + [gn_relu_conv(c, c, 3, r) for r in (6, 12, 18)] + [pool]
        )
        self.project = gn_relu_conv(5 * c, c, 1)

    def forward(self, x):
        outs = [m(x) for m in self.aspp_convs[:4]]
        outs.append(
            F.interpolate(
                self.aspp_convs[4].gap(x), size=x.shape[-2:], mode="bilinear", align_corners=True
            )
        )
        return self.project(torch.cat(outs, 1))


class SemanticTransformer(nn.Module):
    def __init__(self, c=128):
        super().__init__()
        self.pool = nn.AvgPool2d(4)
        self.transformer = EncoderLayer(2 * c, 4, 4 * c, 1e-5)

    def forward(self, x, text, n):  # x (B*N, C, h, w), text (B, N, C)
        bn, c, h, w = x.shape
        b = bn // n
        p = self.pool(x)
        hp, wp = p.shape[-2:]
        tok = p.reshape(b, n, c, hp, wp).permute(0, 3, 4, 1, 2).reshape(b * hp * wp, n, c)
        t = text[:, None, None].expand(b, hp, wp, n, c).reshape(b * hp * wp, n, c)
        tok = self.transformer(torch.cat([tok, t], -1))[..., :c]
        out = tok.reshape(b, hp, wp, n, c).permute(0, 3, 4, 1, 2).reshape(bn, c, hp, wp)
        return x + F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)


class Up(nn.Module):
    def __init__(self, cin, cskip, cout):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin - cskip, 2, stride=2)
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.GroupNorm(cout // 16, cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.GroupNorm(cout // 16, cout),
            nn.ReLU(),
        )

    def forward(self, x, skip, n):
        x = self.up(x)
        skip = F.interpolate(
            skip, size=x.shape[-2:], mode="bilinear", align_corners=True
        ).repeat_interleave(n, 0)
        return self.conv(torch.cat([x, skip], 1))


class VLGHead(nn.Module):
    def __init__(self, feat_dim, text_dim, crop, c=128):
        super().__init__()
        self.crop = crop
        self.conv1 = nn.Conv2d(1, c, 7, padding=3)
        self.aspp = ASPPModule(c)
        self.text_proj = nn.Sequential(nn.Linear(text_dim, c), nn.ReLU())
        self.layers = nn.ModuleList([SemanticTransformer(c), SemanticTransformer(c)])
        self.skip_proj = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(feat_dim, 32, 3, padding=1), nn.ReLU()),
                nn.Sequential(nn.Conv2d(feat_dim, 16, 3, padding=1), nn.ReLU()),
            ]
        )
        self.up1, self.up2 = Up(c, 32, 64), Up(64, 16, 32)
        self.head = nn.Conv2d(32, 1, 3, padding=1)

    def forward(self, feats, text):  # feats: [shallow, deeper, image embedding]; text (B, N, D)
        img, (deep, shallow) = feats[-1], feats[:-1][::-1]
        b, n, (h, w) = img.shape[0], text.shape[1], img.shape[-2:]
        t = F.normalize(text, dim=-1)
        S = torch.einsum("bchw,bnc->bnhw", F.normalize(img, dim=1), t)
        x = self.conv1(S.reshape(b * n, 1, h, w))
        x = x + self.aspp(x)
        t = self.text_proj(t)
        for layer in self.layers:
            x = layer(x, t, n)
        s0, s1 = self.skip_proj[0](deep), self.skip_proj[1](shallow)
        x = self.head(self.up2(self.up1(x, s0, n), s1, n)).reshape(b, n, 4 * h, 4 * w)
        return F.interpolate(x, size=(self.crop, self.crop), mode="bilinear", align_corners=False)


class ReleasedStudent(nn.Module):
    """model/Co2S.py: backbone + decode_head + class embeddings (`_cached_text` or `text_provider.emb`)."""

    def __init__(self, kind, num_classes, width=128, depth=12, proj=64, crop=64):
        super().__init__()
        heads = width // 64
        if kind == "clip":
            self.backbone = MaskClipViT(width, depth, heads, proj, crop // 16)
            self._cached_text = nn.Parameter(
                F.normalize(torch.randn(num_classes, proj), dim=-1), requires_grad=False
            )
        else:
            self.backbone = DinoViT(width, depth, heads)
            self.text_provider = nn.Module()
            self.text_provider.emb = nn.Embedding(num_classes, width)
        self.decode_head = VLGHead(width, proj if kind == "clip" else width, crop)
        self.kind = kind

    def forward(self, img):
        text = self._cached_text if self.kind == "clip" else self.text_provider.emb.weight
        out = self.decode_head(self.backbone(img), text[None].expand(len(img), -1, -1))
        return F.interpolate(out, size=img.shape[-2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def randomise(model, seed=0):
    """Random weights with nothing trivial: norm scales and layer scales around 1, biases and tokens non-zero,
    weights at 1/sqrt(fan-in) so that every block visibly changes the features."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and name.endswith(
            ("weight", "gamma")
        ):  # LayerNorm / GroupNorm / LayerScale
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
        elif p.dim() == 1 or "token" in name or "pos_embed" in name:  # biases, tokens, positions
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    if getattr(model, "_cached_text", None) is not None:
        model._cached_text.copy_(F.normalize(model._cached_text, dim=-1))
    return model


def save_like_the_authors(model, path, epoch=7):
    """Co2S.py: torch.save({'model': DDP(model).state_dict(), 'optimizer': ..., 'epoch': ...})."""
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save(
        {
            "model": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
            "epoch": epoch,
        },
        path,
    )
