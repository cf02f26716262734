"""Prompt encoding with UMT5 (transformers), cached per prompt, and a word-level tokenizer for tiny models."""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # UMT5's special tokens, ids 0, 1, 2 as in umt5-xxl


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A lower-casing, whitespace/punctuation-splitting word-level tokenizer over ``words`` with UMT5's special
    tokens (pad 0, eos 1, unk 2) and an end-of-sequence token appended, savable with ``save_pretrained``."""
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for w in sorted({w.lower() for w in words}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)


class PromptEncoder:
    """Text encoder + tokenizer, producing Wan-style prompt embeddings ``[1, max_tokens, dim]`` (the real tokens'
    states followed by zeros, as diffusers' WanPipeline pads them). Results are cached per prompt string.

    ``unknown_words``: ``"error"`` raises a ValueError listing the words the tokenizer does not know (and the
    vocabulary when it is small); ``"fallback"`` maps them to the unknown token with a warning; ``"ignore"`` is
    for sentencepiece tokenizers where unknown words do not arise.
    """

    def __init__(
        self, tokenizer, text_encoder, max_tokens: int = 512, unknown_words: str = "ignore", cache_size: int = 16
    ) -> None:
        if unknown_words not in ("error", "fallback", "ignore"):
            raise ValueError(f"unknown_words must be 'error', 'fallback' or 'ignore', got {unknown_words!r}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_tokens = max_tokens
        self.unknown_words = unknown_words
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    def _check_words(self, prompt: str) -> None:
        if self.unknown_words == "ignore":
            return
        unk = self.tokenizer.unk_token_id
        words = self.tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(prompt.lower())
        unknown = [w for w, _ in words if self.tokenizer.convert_tokens_to_ids(w) == unk]
        if not unknown:
            return
        if self.unknown_words == "fallback":
            logger.warning("prompt words not in the tokenizer's vocabulary (encoded as %s): %s", UNK, unknown)
            return
        vocab = sorted(w for w in self.tokenizer.get_vocab() if not w.startswith("<"))
        listing = f" Known words: {', '.join(vocab)}." if len(vocab) <= 300 else ""
        raise ValueError(f"prompt has words this model does not know: {unknown}.{listing}")

    @torch.no_grad()
    def __call__(self, prompt: str, allow_empty: bool = False) -> torch.Tensor:
        """Embeddings ``[1, max_tokens, d_model]`` of ``prompt``; ``allow_empty`` admits ``""`` (the unconditional
        prompt of classifier-free guidance: the end-of-sequence token alone, as caption dropout trains it)."""
        if not isinstance(prompt, str) or (not prompt.strip() and not allow_empty):
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        prompt = " ".join(prompt.split())
        if prompt in self._cache:
            self._cache.move_to_end(prompt)
            return self._cache[prompt]
        if prompt:
            self._check_words(prompt)
        enc = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.max_tokens,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        full = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if len(full) > self.max_tokens:
            logger.warning("prompt has %d tokens; only the first %d are used", len(full), self.max_tokens)
        device = self.text_encoder.device
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        states = self.text_encoder(ids, attention_mask=mask).last_hidden_state
        length = int(mask.sum())  # host value: once per prompt, not per chunk
        embeds = torch.zeros_like(states)
        embeds[:, :length] = states[:, :length]
        self._cache[prompt] = embeds
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return embeds
