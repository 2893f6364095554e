"""tools/release.py: the format of the authors' released checkpoints (best_clip.pth / best_dinov3.pth).

Written from their code (XavierJiezou/Co2S @ 26bc087): each file is {'model', 'optimizer', 'epoch'},
'model' the state dict of a DDP-wrapped student (keys start with 'module.'), tensors saved on the
GPU. CLIP student (221 keys at ViT-B/16, 512 px): an mmseg VisionTransformer holding the OpenAI
weights (fused q/k/v `in_proj`, the position table already resized to the crop, `proj` as a 1x1
conv), the decode head and `_cached_text`, the class embeddings. DINOv3 student (257 keys): the
DINOv3 reference ViT (fused `qkv` with a `bias_mask` that zeroes the key bias, `rope_embed.periods`
in bf16), the head and the learnable queries `text_provider.emb.weight`. `from_release` builds our
Student from one file, `load_release` a Co2S model from an experiment folder (e.g.
POTSDAM/1_32-74.30/).

    python -m tools.release release/POTSDAM/1_32-74.30 --dataset potsdam      # their way: fp32
    python -m tools.release DIR --dataset potsdam --save runs/release-potsdam-1_32   # a run of ours

Each release key is renamed by the rule it matches in full; '{qkv}' marks a fused q, k, v tensor
that is split in that order, '{blocks}' the DINOv3 block list (its path moved in transformers 5.2).
"""

import argparse
import os
import re

import torch

import eval as evaluation
from model import KINDS, Co2S, ModelSpec, build_student
from plumbing import atomic, runs
from plumbing.catalog import CHOICES, dataset_info
from plumbing.errors import UserError, cli, reason
from plumbing.runtime import AMP, autocast
from plumbing.weights import blocks, load_text_embeddings, vit_size

# fmt: off
_W = r"(weight|bias)"
# our CLIP tower and its block \1; the head's class-attention layer \1 in the release and ours
_V, _E = "backbone.vision_model.", r"backbone.vision_model.encoder.layers.\1."
_A, _H = r"decode_head\.layers\.(\d)\.transformer\.", r"head.class_attn.\1.layer."
RULES = {
    "clip": [
        (r"backbone\.cls_token", _V + "embeddings.class_embedding"),
        (r"backbone\.pos_embed", _V + "embeddings.position_embedding.weight"),
        (r"backbone\.patch_embed\.projection\.weight", _V + "embeddings.patch_embedding.weight"),
        (rf"backbone\.ln0\.{_W}", _V + r"pre_layrnorm.\1"),
        (rf"backbone\.layers\.(\d+)\.ln([12])\.{_W}", _E + r"layer_norm\2.\3"),
        (rf"backbone\.layers\.(\d+)\.attn\.attn\.in_proj_{_W}", _E + r"self_attn.{qkv}_proj.\2"),
        (rf"backbone\.layers\.(\d+)\.attn\.attn\.out_proj\.{_W}", _E + r"self_attn.out_proj.\2"),
        (rf"backbone\.layers\.(\d+)\.ffn\.layers\.0\.0\.{_W}", _E + r"mlp.fc1.\2"),
        (rf"backbone\.layers\.(\d+)\.ffn\.layers\.1\.{_W}", _E + r"mlp.fc2.\2"),
        (rf"backbone\.ln1\.{_W}", _V + r"post_layernorm.\1"),
        # a 1x1 conv there, a Linear here
        (r"backbone\.proj\.weight", "backbone.visual_projection.weight"),
        (r"_cached_text", "text")],
    "dinov3": [
        (r"backbone\.(cls_token|mask_token)", r"backbone.embeddings.\1"),
        (r"backbone\.storage_tokens", "backbone.embeddings.register_tokens"),
        (rf"backbone\.patch_embed\.proj\.{_W}", r"backbone.embeddings.patch_embeddings.\1"),
        (r"backbone\.rope_embed\.periods", "rope_periods"),
        (rf"backbone\.blocks\.(\d+)\.norm([12])\.{_W}", r"{blocks}.\1.norm\2.\3"),
        (rf"backbone\.blocks\.(\d+)\.attn\.qkv\.{_W}", r"{blocks}.\1.attention.{qkv}_proj.\2"),
        (rf"backbone\.blocks\.(\d+)\.attn\.proj\.{_W}", r"{blocks}.\1.attention.o_proj.\2"),
        (r"backbone\.blocks\.(\d+)\.ls([12])\.gamma", r"{blocks}.\1.layer_scale\2.lambda1"),
        (rf"backbone\.blocks\.(\d+)\.mlp\.fc1\.{_W}", r"{blocks}.\1.mlp.up_proj.\2"),
        (rf"backbone\.blocks\.(\d+)\.mlp\.fc2\.{_W}", r"{blocks}.\1.mlp.down_proj.\2"),
        (rf"backbone\.norm\.{_W}", r"backbone.norm.\1"),
        (r"text_provider\.emb\.weight", "queries.weight")],
    "head": [
        (rf"decode_head\.conv1\.{_W}", r"head.stem.\1"),
        (r"decode_head\.aspp\.aspp_convs\.([0-3])\.([01])\.(.+)", r"head.aspp.branches.\1.\2.\3"),
        (r"decode_head\.aspp\.aspp_convs\.4\.gap\.1\.weight", "head.aspp.pool.0.weight"),
        (rf"decode_head\.aspp\.aspp_convs\.4\.gap\.2\.{_W}", r"head.aspp.pool.1.\1"),
        # the same names in both
        (rf"decode_head\.(aspp\.project\.[01]|up[12]\.up)\.{_W}", r"head.\1.\2"),
        (rf"decode_head\.text_proj\.0\.{_W}", r"head.guide.0.\1"),
        (rf"{_A}ln([12])\.{_W}", _H + r"norm\2.\3"),
        (rf"{_A}attn\.attn\.(in_proj_|out_proj\.){_W}", _H + r"self_attn.\2\3"),
        (rf"{_A}ffn\.layers\.0\.0\.{_W}", _H + r"linear1.\2"),
        (rf"{_A}ffn\.layers\.1\.{_W}", _H + r"linear2.\2"),
        # the deeper skip (f2) feeds up1
        (rf"decode_head\.skip_proj\.0\.0\.{_W}", r"head.up1.skip.0.\1"),
        (rf"decode_head\.skip_proj\.1\.0\.{_W}", r"head.up2.skip.0.\1"),
        # conv, GN, (ReLU), conv, GN
        (r"decode_head\.up([12])\.conv\.([01])\.(.+)", r"head.up\1.convs.0.\2.\3"),
        (r"decode_head\.up([12])\.conv\.3\.weight", r"head.up\1.convs.1.0.weight"),
        (rf"decode_head\.up([12])\.conv\.4\.{_W}", r"head.up\1.convs.1.1.\2"),
        (rf"decode_head\.head\.{_W}", r"head.out.\1")],
}
# fmt: on


def read(path):
    """The state dict of a released student file, on the CPU, without the DDP 'module.' prefix."""
    try:
        # GPU tensors load on a CPU machine too
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read the released checkpoint {path!r} ({reason(e)})") from e
    sd = ckpt.get("model", ckpt.get("state_dict", ckpt)) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        layout = "{'model': ..., 'optimizer': ..., 'epoch': ...} as the authors' Co2S.py saves"
        raise UserError(f"{path!r} holds no state dict (expected {layout}, or a plain state dict)")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    # the authors' own eval.py deletes these before loading: the CLIP text tower's weights
    if drop := [k for k in sd if k.startswith("clip_encoder.")]:
        print(f"{path}: dropped {len(drop)} 'clip_encoder.*' keys, as the authors' evaluation does")
    return {k: v for k, v in sd.items() if k not in drop}


def kind_and_sizes(path, sd):
    """Which student a release state dict holds, and its sizes (plumbing.weights.ViTSize fields)
    read off the tensor shapes, with heads = width / 64 as in every ViT preset."""
    clip = "backbone.ln0.weight" in sd
    layers = "backbone.layers." if clip else "backbone.blocks."
    fc1 = layers + ("0.ffn.layers.0.0.weight" if clip else "0.mlp.fc1.weight")
    own = ["backbone.proj.weight", "backbone.pos_embed"] if clip else ["backbone.storage_tokens"]
    if missing := [k for k in ["backbone.cls_token", fc1, *own] if k not in sd]:
        keys = "backbone.ln0 of the CLIP student nor backbone.storage_tokens of the DINOv3 one"
        msg = f"{path!r} is not a released Co2S student (neither {keys}, or missing {missing})"
        raise UserError(f"{msg}; its first keys: {list(sd)[:4]}")
    width = sd["backbone.cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith(layers))
    sizes = dict(width=width, depth=depth, heads=width // 64, mlp=sd[fc1].shape[0])
    if clip:
        # (1, 1 + grid^2, D): exact in floating point for any real grid
        grid = round((sd["backbone.pos_embed"].shape[1] - 1) ** 0.5)
        return "clip", dict(sizes, proj=sd["backbone.proj.weight"].shape[0], image_size=16 * grid)
    return "dinov3", dict(sizes, registers=sd["backbone.storage_tokens"].shape[1])


def convert(path, sd, kind, ours, blocks_prefix):
    """Our state dict (keys and shapes of `ours`) from a release state dict of `kind`; every key on
    both sides is accounted for, or the error names the ones that are not."""
    rules = [(p, t.replace("{blocks}", blocks_prefix)) for p, t in RULES[kind] + RULES["head"]]
    out, unused = {}, []
    for key, t in sd.items():
        name = next((m.expand(target) for p, target in rules if (m := re.fullmatch(p, key))), None)
        # one tensor, or q, k, v (DINOv3: the effective qkv bias is bias * bias_mask)
        if name is not None:
            parts = (t * sd.get(key + "_mask", 1)).chunk(3) if "{qkv}" in name else [t]
            out.update((name.replace("{qkv}", p), part) for p, part in zip("qkv", parts))
        # a DINOv3 bias_mask (no rule matches it) is applied with its bias, above
        elif not (key.endswith(".bias_mask") and key.removesuffix("_mask") in sd):
            unused.append(key)
    # transformers' DINOv3 has no key bias: the release's must be masked to 0 (else it is an extra)
    out = {k: t for k, t in out.items() if k in ours or t.any() or not k.endswith("k_proj.bias")}
    missing, extra = sorted(set(ours) - set(out)), sorted(set(out) - set(ours))
    if unused or missing or extra:
        why = f"release keys not understood {unused[:6]}, our tensors not filled {missing[:6]}"
        why += f", renamed keys we do not have {extra[:6]}"
        raise UserError(f"{path!r} does not match the released format: {why}")
    if bad := next((k for k, t in out.items() if t.numel() != ours[k].numel()), None):
        theirs, shape = tuple(out[bad].shape), tuple(ours[bad].shape)
        raise UserError(f"{path!r}: a tensor of shape {theirs} for our {bad} of shape {shape}")
    return {k: t.reshape(ours[k].shape) for k, t in out.items()}


def from_release(path, text=None):
    """A Student from one of the authors' released files, in eval mode with the release numerics:
    the same logits as their network for one window. The kind comes from the keys, the sizes from
    the shapes. text: the CLIP student's (N, D) class embeddings if the file does not hold them
    (theirs do)."""
    sd = read(path)
    kind, sizes = kind_and_sizes(path, sd)
    # class embeddings belong to the CLIP student only; the file's, else `text`
    text = sd.setdefault("_cached_text", text) if kind == "clip" else None
    if kind == "clip" and (text is None or text.shape[1] != sizes["proj"]):
        got = "none (no _cached_text)" if text is None else f"{text.shape[1]}-d rows"
        raise UserError(
            f"{path!r} projects to {sizes['proj']} dimensions, its class embeddings: {got}; pass the "
            f"authors' concept-averaged [N, {sizes['proj']}] file with --text-embeddings"
        )
    num_classes = len(text) if kind == "clip" else len(sd.get("text_provider.emb.weight", []))
    # random (as build_student makes one of our students), then every tensor from the file
    student = build_student(kind, ModelSpec((kind,), num_classes, sizes, "release"), text=text)
    prefix = next(n for n, m in student.named_modules() if m is blocks(student.backbone))
    student.load_state_dict(convert(path, sd, kind, student.state_dict(), prefix))
    return student.eval()


def load_release(folder, dataset, data_root=None, text_embeddings=None):
    """(model, info, cfg, published mIoU or None) of one of the authors' experiment folders (e.g.
    POTSDAM/1_32-74.30/ with best_clip.pth and/or best_dinov3.pth). text_embeddings: a [N, 512] file
    for a CLIP student whose file lacks them (only the CLIP student reads it; its width is checked
    against the file's projection)."""
    files = [f for f in (os.path.join(folder, f"best_{k}.pth") for k in KINDS) if os.path.isfile(f)]
    if not files:
        raise UserError(f"--release {folder!r} holds neither best_clip.pth nor best_dinov3.pth")
    info = dataset_info(dataset, data_root)
    text = load_text_embeddings(text_embeddings, len(info.classes)) if text_embeddings else None
    # from_release gives the class embeddings to a CLIP student only
    students = [from_release(f, text) for f in files]
    if bad := next((s for s in students if len(s.class_embeddings()) != len(info.classes)), None):
        got = f"the released {bad.kind} student predicts {len(bad.class_embeddings())} classes"
        raise UserError(f"{got}, {dataset} has {len(info.classes)}: check --dataset")
    m = re.search(r"(\d+_\d+)-(\d+(?:\.\d+)?)$", os.path.basename(os.path.abspath(folder)))
    ratio = m.group(1) if m else info.ratios[0].replace("/", "_")
    # a release stores its crop's position grid; students[0] is the CLIP student where there is one
    crop = students[0].backbone.config.image_size if students[0].kind == "clip" else info.crop
    cfg = dict(dataset=dataset, data_root=data_root or os.path.join("data", dataset), splits=None)
    cfg.update(seed=0, ratio=ratio, release=os.path.abspath(folder), crop=crop)
    return Co2S(students), info, cfg, float(m.group(2)) if m else None


def save_release(model, cfg, run_dir):
    """A converted release (release.load_release) as one of our run folders (best.pt): eval.py,
    --predict and train.py --init read it like any run."""
    os.makedirs(run_dir, exist_ok=True)
    kinds, n = tuple(s.kind for s in model.students), len(model.students[0].class_embeddings())
    spec = ModelSpec(kinds, n, vit_size(model.students), "release", fusion=model.fusion)
    cfg = dict(cfg, students=",".join(kinds), numerics="release", fusion=model.fusion)
    cfg["train_backbone"] = spec.train_backbone
    runs.save_checkpoint(runs.Run(cfg, spec, model), os.path.join(run_dir, "best.pt"))


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a released experiment, or make it a run.")
    a = p.add_argument
    a("release", metavar="DIR", help="a release's experiment folder, e.g. POTSDAM/1_32-74.30")
    a("--dataset", required=True, choices=CHOICES, help="the dataset it was trained on")
    a("--data-root", help="dataset folder (default: data/<dataset>)")
    a("--text-embeddings", help="[N, 512] CLIP class embeddings, if the file lacks them")
    a("--save", metavar="RUN_DIR", help="write the converted model as a run folder")
    a("--amp", choices=AMP, default="off", help="autocast (off: fp32, as the authors)")
    a("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu")
    a("--workers", type=int, default=2, help="data loader processes")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    model, info, cfg, published = load_release(
        args.release, args.dataset, args.data_root, args.text_embeddings
    )
    if args.save:
        save_release(model, cfg, args.save)
        print(f"wrote {os.path.join(args.save, 'best.pt')}")
    model.to(args.device)
    loader = evaluation.split_loader(info, cfg, "val", workers=args.workers)
    cms = evaluation.evaluate(model, loader, cfg["crop"], amp=autocast(args.device, args.amp))
    print(f"{args.release}: val split, {len(loader)} images, crop {cfg['crop']}, amp {args.amp}")
    print(evaluation.format_table(cms, info.classes))
    if published is not None:  # the folder name carries the authors' figure (never fused)
        ours = ", ".join(f"{n} {100 * cm.miou():.2f}" for n, cm in cms.items())
        print(f"published {published:.2f} | ours: {ours}")
    result = dict(release=cfg["release"], crop=cfg["crop"], amp=args.amp, published=published)
    result["results"] = {n: cm.to_dict(info.classes) for n, cm in cms.items()}
    if args.save:
        atomic.write_json(os.path.join(args.save, "eval_val.json"), result)
    return result


if __name__ == "__main__":
    cli(main)
