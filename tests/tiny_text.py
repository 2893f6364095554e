"""A CLIP text path that runs offline at tiny size: a byte-level tokenizer and a random text tower."""

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

TEXT = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=512,
    vocab_size=514,
    bos_token_id=512,
    eos_token_id=513,
    pad_token_id=513,
)  # tiny text tower (projection: the tiny proj, 128)


def tiny_clip_tokenizer():
    """A byte-level CLIP tokenizer with no merges (every byte is a token), built in code: the real CLIP
    vocabulary cannot be downloaded offline."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:] + [256 + n for n in range(256) if n not in bs]
    bs = bs + [n for n in range(256) if n not in bs]
    chars = [chr(c) for _, c in sorted(zip(bs, cs))]  # GPT-2 byte -> printable unicode map
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return CLIPTokenizer(vocab=vocab, merges=[])


def random_text_tower(proj=128, seed=0):
    """A random tiny CLIP text tower and its tokenizer, deterministic by seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return (
            CLIPTextModelWithProjection(
                CLIPTextConfig(**TEXT, projection_dim=proj, hidden_act="quick_gelu")
            ),
            tiny_clip_tokenizer(),
        )
