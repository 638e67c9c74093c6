"""Grow a trained model's word-level vocabulary to its world's newer one, keeping every trained row.

Why: a world that adds words (Shapes v2's one-word cell names) should not cost a retrain from scratch of the
CLIP, the LVLM and the caption model. New words are appended at the end of the vocabulary, so a saved
tokenizer's vocabulary is a prefix of the new one and every old token id keeps its row. A new word's input
row starts as the mean of the rows of the words it stands for (``parts``: "c4" -> "4", "3", "three"), so the
model reads it roughly as it read the old phrase before fine-tuning teaches it the rest; an LVLM's output row
starts at zero (a cell word is never an answer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def appended_words(saved: dict[str, int], current: dict[str, int]) -> list[str]:
    """The words of ``current`` after ``saved``'s, in id order; raises if ``saved`` is not a prefix of it."""
    moved = [w for w, i in saved.items() if current.get(w) != i]
    if moved:
        raise ValueError(f"the saved vocabulary is not a prefix of the new one ({len(moved)} words moved, e.g. "
                         f"{moved[:3]}): only appended words can be grown into a trained model")
    return [w for w, i in sorted(current.items(), key=lambda kv: kv[1]) if i >= len(saved)]


@torch.no_grad()
def part_mean_rows(weight: torch.Tensor, saved: dict[str, int], words: Sequence[str],
                   parts: Callable[[str], Sequence[str]]) -> torch.Tensor:
    """Per new word, the mean of ``weight``'s rows of its parts that ``saved`` has (all rows' mean if none)."""
    rows = []
    for word in words:
        ids = [saved[p] for p in parts(word) if p in saved]
        rows.append(weight[ids].mean(0) if ids else weight.mean(0))
    return torch.stack(rows) if rows else weight.new_zeros((0, weight.shape[1]))


@torch.no_grad()
def grown_embedding(emb: nn.Embedding, extra: torch.Tensor) -> nn.Embedding:
    """A copy of ``emb`` with ``extra`` rows appended (same dtype, device and padding index)."""
    out = nn.Embedding(emb.num_embeddings + len(extra), emb.embedding_dim, padding_idx=emb.padding_idx,
                       dtype=emb.weight.dtype, device=emb.weight.device)
    out.weight.copy_(torch.cat([emb.weight, extra.to(emb.weight)]))
    return out


@torch.no_grad()
def grown_linear(head: nn.Linear, extra: torch.Tensor) -> nn.Linear:
    """A copy of an output head with ``extra`` rows (new vocabulary entries) appended."""
    out = nn.Linear(head.in_features, head.out_features + len(extra), bias=head.bias is not None,
                    dtype=head.weight.dtype, device=head.weight.device)
    out.weight.copy_(torch.cat([head.weight, extra.to(head.weight)]))
    if head.bias is not None:
        out.bias.copy_(torch.cat([head.bias, head.bias.new_zeros(len(extra))]))
    return out


def grown_input_table(table: nn.Embedding, saved: dict[str, int], words: Sequence[str],
                      parts: Callable[[str], Sequence[str]]) -> nn.Embedding:
    """``table`` with one row per new word, each the mean of its parts' rows (``part_mean_rows``)."""
    return grown_embedding(table, part_mean_rows(table.weight, saved, words, parts))


def vocab_of(tokenizer) -> dict[str, int]:
    return dict(tokenizer.get_vocab())


def grow_clip(clip, saved: dict[str, int], current: dict[str, int], parts: Callable[[str], Sequence[str]]) -> list[str]:
    """Grow a ``CLIPModel``'s text token table in place; returns the new words."""
    words = appended_words(saved, current)
    table = clip.text_model.embeddings.token_embedding
    clip.text_model.embeddings.token_embedding = grown_input_table(table, saved, words, parts)
    clip.config.text_config.vocab_size = table.num_embeddings + len(words)
    return words


def grow_lvlm(lvlm, saved: dict[str, int], current: dict[str, int], parts: Callable[[str], Sequence[str]]) -> list[str]:
    """Grow a ``LlavaForConditionalGeneration``'s input table (parts' mean) and LM head (zero rows) in place."""
    words = appended_words(saved, current)
    table = lvlm.get_input_embeddings()
    lvlm.set_input_embeddings(grown_input_table(table, saved, words, parts))
    head = lvlm.get_output_embeddings()
    lvlm.set_output_embeddings(grown_linear(head, head.weight.new_zeros((len(words), head.in_features))))
    lvlm.config.text_config.vocab_size = table.num_embeddings + len(words)
    return words


def grow_causal_lm(decoder, saved: dict[str, int], current: dict[str, int],
                   parts: Callable[[str], Sequence[str]]) -> list[str]:
    """Grow a caption model's decoder (a tied ``GPT2LMHeadModel``) in place: input and output share the rows."""
    words = appended_words(saved, current)
    table = decoder.get_input_embeddings()
    decoder.set_input_embeddings(grown_input_table(table, saved, words, parts))
    decoder.config.vocab_size = table.num_embeddings + len(words)
    decoder.tie_weights()
    return words
