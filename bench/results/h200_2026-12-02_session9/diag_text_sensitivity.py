"""How far a tiny-world text encoder's prompt embeddings move when one word changes (shape, colour, motion, size).

Usage: python bench/results/h200_2026-12-02_session9/diag_text_sensitivity.py assets/tinyworld
"""

import sys

import torch
from transformers import UMT5EncoderModel

from stream_runtime.pipelines.tinyworld.model import build_tokenizer, encode_tokens, tokenize

encoder = UMT5EncoderModel.from_pretrained(sys.argv[1] + "/text_encoder").eval()
prompts = [
    "a large red circle moving left on a black background",
    "a large red square moving left on a black background",
    "a large red triangle moving left on a black background",
    "a large green circle moving left on a black background",
    "a large red circle moving up on a black background",
    "a small red circle moving left on a black background",
]
ids, mask = tokenize(build_tokenizer(), prompts)
with torch.no_grad():
    embeds = encode_tokens(encoder, ids, mask)
for prompt, e in zip(prompts, embeds, strict=True):
    moved = (e - embeds[0]).norm(dim=-1)[:10].numpy().round(2)
    print(f"{(e - embeds[0]).norm().item():7.3f}  per token {moved}  {prompt}")
