"""Short builders for tests: one student or a two-student model from a few keywords."""

import model


def student(
    kind,
    num_classes,
    *,
    size="tiny",
    weights=None,
    text=None,
    guidance="text",
    numerics="hf",
    train_backbone="attention",
):
    """model.build_student with a ModelSpec of one student (guidance: the CLIP student's)."""
    spec = model.ModelSpec(
        (kind,),
        num_classes,
        size=size,
        numerics=numerics,
        clip_guidance=guidance,
        train_backbone=train_backbone,
    )
    return model.build_student(kind, spec, weights=weights, text=text)


def micro_args(root, out, *extra):
    """train.py's flags of a micro run on `root` (tests' micro_root): 64 px crops, 2 + 2 images a
    step, no loader processes; later flags win."""
    common = ["--data-root", root, "--out", str(out), "--ratio", "1/4", "--crop", "64"]
    return common + ["--batch", "2", "--workers", "0", *extra]
