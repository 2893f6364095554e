"""plumbing/recipes.py: `--recipe`, the authors' code as they ran it with one switch (train.py).

The paper's method is train.py's defaults; the release (XavierJiezou/Co2S @ 26bc087) differs from
it in the ways of METHOD.md section 7, each a flag of its own (RELEASE: flag -> the release's value
and what it reproduces; PAPER: the same flags at the paper's values). `--recipe release` sets them
all; a flag given on the command line still wins (train.resolve), and config.json records both
what the recipe set (`recipe_switches`) and where the run differs from it (`recipe_overrides`).
Not switches, because they are the datasets' own pipelines in both recipes: LoveDA's PIL resize
and mmseg's rescale sizes (data.rescale_size).
"""

import math

from plumbing.catalog import RELEASE_PROCESSES
from plumbing.weights import RELEASE_INIT

# --recipe release: the authors' code as they ran it (METHOD.md section 7), one switch for each
# difference, each also a flag of its own, which wins when given: flag -> (value, what it is).
RELEASE = {
    "stability": ("released", "E8 on detached logits: the students never influence each other"),
    "dinov3_weights": (RELEASE_INIT, "DINOv3 re-initialised after its pretrained weights load"),
    "numerics": ("release", "their ViTs' exact GELU, LayerNorm eps 1e-6, DINOv3's bf16 RoPE"),
    "amp": ("off", "fp32 training and evaluation"),
    "mix_source": ("same", "the CutMix partner is the same image augmented again"),
    "accum": (RELEASE_PROCESSES, "their 4 processes as micro-batches, as far as the batch splits"),
    "data_order": ("shared", "one seeded sampler orders the labelled and unlabelled lists"),
    "round_iters": (True, "--iters rounded up to whole epochs"),
    "best_per_student": (True, "best_<student>.pt, each on its own mIoU, besides best.pt"),
}
# --recipe paper: the same switches at the paper's values (DINOv3: the dataset's default weights)
PAPER = dict(stability="grad", numerics="hf", amp="auto", mix_source="partner", accum=1)
PAPER |= dict(data_order="own", round_iters=False, best_per_student=False)
RECIPES = ("paper", "release")


def switches(recipe, batch, world):
    """flag -> value of every switch `recipe` sets: none for the paper (its values are the
    defaults), RELEASE's for the release, whose 4 processes are as many as the global batch splits
    into (the demo's batch of 2: 2), over `world` processes and --accum."""
    if recipe == "paper":
        return {}
    accum = max(1, math.gcd(RELEASE_PROCESSES, batch) // world)
    return dict({k: v for k, (v, _) in RELEASE.items()}, accum=accum)


def as_flag(key, value):
    """A config value as the flag that sets it: --stability released, --round-iters."""
    name = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} {value}"


def summary(cfg):
    """The start summary's lines for --recipe: the recipe and each switch it set, with the flag
    that overrode it, if one did."""
    if not cfg["recipe_switches"]:
        other = "--recipe release for the authors' code as they ran it"
        return f"recipe: {cfg['recipe']} (the method as the paper states it; {other})"
    lines = [f"recipe: {cfg['recipe']} (the authors' code as they ran it, METHOD.md section 7):"]
    over = cfg["recipe_overrides"]
    for k, v in cfg["recipe_switches"].items():
        note = f" (overridden here: {as_flag(k, over[k])})" if k in over else ""
        lines.append(f"  {as_flag(k, v):<30} {RELEASE[k][1]}{note}")
    return "\n".join(lines)
