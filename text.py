"""text.py: the class embeddings T of the CLIP student (E2), from concepts, a file, or a stand-in.

E2: for each class, every concept (class name first, then its synonyms) becomes the prompt
"a photo of a {concept}", goes through the CLIP text tower with its projection; the concept
embeddings of a class are averaged and the mean L2-normalised. Computed once per
(checkpoint, concept lists) and cached on disk. A precomputed [N, D] file (e.g. the authors'
`*_conceptavg*_single.npy`) can be given instead.

A CLIP student WITHOUT pretrained weights has no language: a random text tower maps every prompt to
nearly the same vector (cosine 0.90-0.97 at tiny size) and the student cannot tell the classes apart
(its loss stays at ln N). Such a student gets seeded, well-separated stand-in rows instead.
"""
import hashlib
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from errors import UserError
from backbones import SIZES, load_pretrained
from runs import save_atomic

PROMPT = "a photo of a {}"


def average_concepts(concept_embeds, counts):
    """E2: average the concept embeddings of each class as the text tower gives them (not normalised
    first, as the authors' text_embeddings.py does), then L2-normalise. (sum(counts), D) -> (N,
    D)."""
    return F.normalize(torch.stack([c.mean(0) for c in concept_embeds.float().split(list(counts))]), dim=-1)


@torch.no_grad()
def encode_concepts(concepts, text_model, tokenizer):
    """E2: prompt "a photo of a {concept}" for every concept of every class -> (N, D) unit rows."""
    prompts = [PROMPT.format(c) for cls_concepts in concepts for c in cls_concepts]
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    if tokens["input_ids"].shape[1] <= 2:
        raise UserError("the CLIP tokenizer produced empty prompts (an empty tokenizer?): check the CLIP weights folder")
    text_model.eval()
    embeds = text_model(input_ids=tokens["input_ids"],
                        attention_mask=tokens["attention_mask"]).text_embeds
    return average_concepts(embeds, [len(c) for c in concepts])


def text_embeddings(concepts, weights, cache_dir=None):
    """E2 class embeddings from the text tower of the CLIP checkpoint `weights` (hub id or folder),
    cached.

    concepts: per class a list of concepts, class name first."""
    cache_dir = cache_dir or os.environ.get("CO2S_CACHE", os.path.expanduser("~/.cache/co2s"))
    weights = os.path.expanduser(weights)
    # key: checkpoint (a folder by path and the size/time of its files, so replaced weights are not
    # reused)
    ckpt = weights if not os.path.isdir(weights) else [os.path.abspath(weights)] + sorted(
        (f, os.path.getsize(os.path.join(weights, f)),
         os.path.getmtime(os.path.join(weights, f))) for f in os.listdir(weights))
    # what E2 computes is part of the key
    key_src = json.dumps([ckpt, PROMPT, concepts, "mean of raw embeddings"])
    path = os.path.join(cache_dir, "text", hashlib.sha1(key_src.encode()).hexdigest()[:16] + ".pt")
    if os.path.isfile(path):
        return torch.load(path)
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer
    text_model = load_pretrained(CLIPTextModelWithProjection, "clip", weights, what="text tower")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(weights)
    except OSError as e:
        raise UserError(f"no CLIP tokenizer in {weights!r} ({e}); the folder needs vocab.json/merges.txt "
                        "or tokenizer.json next to the weights") from e
    if len(tokenizer) < 1000:
        raise UserError(f"the CLIP tokenizer of {weights!r} has only {len(tokenizer)} tokens: not the real vocabulary")
    embeds = encode_concepts(concepts, text_model, tokenizer)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_atomic(embeds, path)
    return embeds


def load_text_embeddings(path, num_classes, dim=None):
    """A precomputed [N, D] .npy / .pt file (e.g. the authors' `*_conceptavg*_single.npy`), unit
    rows. dim None: any width (the caller checks it against its model)."""
    if not os.path.isfile(path):
        raise UserError(f"--text-embeddings: file {path!r} does not exist")
    t = torch.from_numpy(np.load(path)) if path.endswith(".npy") else torch.load(path)
    if t.dim() != 2 or t.shape[0] != num_classes or t.shape[1] != (dim or t.shape[1]):
        raise UserError(f"--text-embeddings {path!r} has shape {tuple(t.shape)}, expected "
                        f"({num_classes}, {dim or 'D'}): one row per class")
    return F.normalize(t.float(), dim=-1)


def stand_in_embeddings(num_classes, dim, seed=0):
    """Seeded random unit rows (pairwise cosine about +-1/sqrt(dim)): the class embeddings of a CLIP
    student with random weights, standing in for a pretrained text tower's distinct directions."""
    t = np.random.default_rng([seed, num_classes, dim]).standard_normal((num_classes, dim))
    return F.normalize(torch.from_numpy(t).float(), dim=-1)


def class_embeddings(concepts, *, size, clip_weights=None, file=None):
    """(T, source) for a CLIP student with text guidance: from `file` when given, else E2 with the
    text tower of `clip_weights`, else (random CLIP weights) the stand-in rows."""
    dim = SIZES[size].proj
    if file:
        return load_text_embeddings(file, len(concepts), dim), f"file {file}"
    if clip_weights:
        return text_embeddings(concepts, clip_weights), f"E2 with the text tower of {clip_weights}"
    return stand_in_embeddings(len(concepts),
                               dim), ("stand-in: seeded well-separated unit rows (the CLIP student "
                                                     "has random weights; a random text tower collapses the prompts)")
