"""The LLaMA decoder loop of the engine, with FastV's in-LLM token pruning (real compaction).

The engine runs ``model.model.language_model``'s layers itself rather than through ``generate``:
sequences are built from embeddings (text before, projected visual tokens, text after), left padded,
and every layer keeps its own K/V tensors. That gives FastV what it needs (SPEC §2): after layer K-1,
the head-averaged attention of the last prompt token ranks the image tokens, and from layer K on the
hidden states *and* those layers' KV caches hold only the top-k image tokens (plus all text), with
their original position ids. Layers < K keep the full cache, as in FastV where they saw every token.

The attention below is LLaMA's eager attention, written out so that one layer's attention
probabilities are available without ``output_attentions`` over the whole model. For ``fastv=None``
the loop reproduces ``LlavaForConditionalGeneration``'s logits (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from actors.pruners import select_topk
from kernels.compact import compact_rows
from kernels.token_scores import head_mean_query_scores as head_mean_last_query


def tp_head_mean(local_mean: Tensor, local_heads: int, heads: int) -> Tensor:
    """Mean over all ``heads`` from each tensor-parallel rank's mean over its ``local_heads``.

    AutoTP splits the heads evenly over the ranks of the default process group (``actors.tp``: one group per
    LVLM replica), so the global mean is the rank average. Every rank calls this at the same layer.
    """
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if local_heads * world != heads:
        raise RuntimeError(f"attention has {local_heads} of {heads} heads here but {world} tp rank(s)")
    pad = torch.isinf(local_mean)  # -inf pads the same positions on every rank
    total = local_mean.masked_fill(pad, 0.0)
    dist.all_reduce(total)
    return (total / world).masked_fill(pad, float("-inf"))


@dataclass(frozen=True)
class FastVSpec:
    """Prune image tokens inside the LLM: at layer ``layer`` keep ``keep`` of them.

    ``rule``: "fastv" keeps the best-attended ones (the last prompt token's attention in layer K-1);
    "dart" runs ``actors.dart.dart_select`` (pivots by layer K-1's key L1 norm, ``pivot_image`` + ``pivot_text``
    of them; the image tokens least similar to the pivots; ``count``: see actors.dart).
    """

    layer: int
    keep: int
    rule: str = "fastv"
    pivot_image: int = 4
    pivot_text: int = 4
    count: str = "code"


@dataclass
class DecoderState:
    """Per-layer KV caches and key-validity masks (layers before and after FastV's cut differ in length)."""

    keys: list[Tensor]  # [B, Hkv, S_l, hd]
    values: list[Tensor]
    masks: list[Tensor]  # [B, S_l] bool, True = a real token
    next_pos: Tensor  # [B] position id of the next token
    fastv_positions: Tensor | None = None  # [B, L'] padded-sequence positions kept from FastV's layer on


class LlamaDecoderRunner:
    """Prefill + cached decode over a ``LlamaModel``'s layers (eager attention), FastV optional."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module):
        self.lm = language_model
        self.lm_head = lm_head
        self.layers = list(language_model.layers)

    # -- one layer -----------------------------------------------------------------------------------

    @staticmethod
    def _layer(
        layer: nn.Module,
        hidden: Tensor,
        cos_sin: tuple[Tensor, Tensor],
        bias: Tensor,
        past: tuple[Tensor, Tensor] | None,
        want_last_probs: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        attn = layer.self_attn
        b, q_len, _ = hidden.shape
        x = layer.input_layernorm(hidden)
        shape = (b, q_len, -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *cos_sin)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        scores = torch.matmul(q, repeat_kv(k, attn.num_key_value_groups).transpose(2, 3)) * attn.scaling
        probs = torch.softmax(scores + bias, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, repeat_kv(v, attn.num_key_value_groups))
        out = attn.o_proj(out.transpose(1, 2).reshape(b, q_len, -1))
        hidden = hidden + out
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden, k, v, (probs[:, :, -1, :] if want_last_probs else None)

    @staticmethod
    def _bias(key_mask: Tensor, q_len: int, dtype: torch.dtype) -> Tensor:
        """Additive mask [B, 1, Q, S]: causal over the last Q keys, padding keys hidden.

        Every row may see itself, so fully padded (left-pad) query rows stay finite.
        """
        s = key_mask.shape[1]
        q_pos = torch.arange(s - q_len, s, device=key_mask.device)[:, None]
        k_pos = torch.arange(s, device=key_mask.device)[None, :]
        allowed = (k_pos <= q_pos)[None] & key_mask[:, None, :]
        allowed = allowed | (k_pos == q_pos)[None]
        return torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )[:, None]

    # -- prefill -------------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(
        self,
        embeds: Tensor,
        mask: Tensor,
        image_start: Tensor,
        image_len: Tensor,
        fastv: FastVSpec | None = None,
    ) -> tuple[Tensor, DecoderState]:
        """Left-padded ``embeds`` [B, L, d] with ``mask`` [B, L] -> (last-position logits [B, V], state)."""
        dtype = embeds.dtype
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
        next_pos = pos[:, -1] + 1
        hidden = embeds
        cos_sin = self.lm.rotary_emb(hidden, pos)
        bias = self._bias(mask, hidden.shape[1], dtype)
        keys, values, masks = [], [], []
        probs_last = None
        cut = fastv.layer if fastv is not None else -1
        keep_idx = None
        if fastv is not None and not 1 <= cut <= len(self.layers):  # cut == layers: nothing left to prune
            raise ValueError(f"fastv layer must be in [1, {len(self.layers)}], got {cut}")
        if fastv is not None and fastv.rule not in ("fastv", "dart"):
            raise ValueError(f"unknown in-LLM rule {fastv.rule!r}")
        dart = fastv is not None and fastv.rule == "dart"
        for i, layer in enumerate(self.layers):
            if i == cut and dart:
                keep_idx = self._dart_keep_positions(hidden, keys[cut - 1], image_start, image_len, fastv)
            elif i == cut:
                heads = self.layers[cut - 1].self_attn.config.num_attention_heads
                keep_idx = self._fastv_keep_positions(probs_last, image_start, image_len, fastv.keep, heads)
            if i == cut:
                hidden = compact_rows(hidden, keep_idx)
                mask = torch.gather(mask, 1, keep_idx)
                pos = torch.gather(pos, 1, keep_idx)
                cos_sin = self.lm.rotary_emb(hidden, pos)
                bias = self._bias(mask, hidden.shape[1], dtype)
            hidden, k, v, probs_last = self._layer(layer, hidden, cos_sin, bias, None, i == cut - 1 and not dart)
            keys.append(k)
            values.append(v)
            masks.append(mask)
        logits = self.lm_head(self.lm.norm(hidden[:, -1:]))[:, 0]
        return logits, DecoderState(keys, values, masks, next_pos, keep_idx)

    @staticmethod
    def _fastv_keep_positions(probs_last: Tensor, start: Tensor, length: Tensor, keep: int,
                              heads: int | None = None) -> Tensor:
        """[B, L'] sequence positions FastV keeps: all text, the top-``keep`` image tokens, left padded.

        Left padding stays at the front, so the last position is still every row's last token. ``heads``: the
        layer's total attention heads; fewer in ``probs_last`` means tensor parallelism split them over ranks,
        and the mean then covers every rank's heads (else each rank would keep different tokens).
        """
        scores = head_mean_last_query(probs_last, start, length)
        if heads is not None and probs_last.shape[1] < heads:
            scores = tp_head_mean(scores, probs_last.shape[1], heads)
        kept = select_topk(scores, keep)  # ascending image offsets (rows with < keep images: -1 padded)
        return LlamaDecoderRunner._keep_positions(kept, start, length, probs_last.shape[-1], probs_last.device)

    @staticmethod
    def _keep_positions(kept: Tensor, start: Tensor, length: Tensor, seq_len: int, device) -> Tensor:
        """Kept image offsets [B, k] (ascending, -1 padded) -> [B, L'] positions: all text + those images."""
        rows = []
        for b in range(kept.shape[0]):
            s, n = int(start[b]), int(length[b])
            img = kept[b][kept[b] >= 0] + s
            rows.append(torch.cat([torch.arange(s), img.cpu(), torch.arange(s + n, seq_len)]))
        if any(len(r) != len(rows[0]) for r in rows):
            raise ValueError("FastV rows must drop the same number of tokens (equal image counts and budget)")
        return torch.stack(rows).to(device)

    def _dart_keep_positions(self, hidden: Tensor, keys: Tensor, start: Tensor, length: Tensor,
                             spec: FastVSpec) -> Tensor:
        """[B, L'] positions DART keeps (actors.dart): layer K-1's ``keys`` [B, Hkv, S, hd], ``hidden`` entering K.

        Under tensor parallelism the cache holds this rank's heads only: the L1 norms are summed over ranks
        (every rank then picks the same tokens; the hidden states are replicated).
        """
        from actors.dart import dart_select, key_l1

        norms = key_l1(keys)
        kv_heads = self.layers[0].self_attn.config.num_key_value_heads
        if keys.shape[1] < kv_heads:
            import torch.distributed as dist

            dist.all_reduce(norms)
        kept = dart_select(norms, self.lm.norm(hidden), start, length, spec.keep,
                           pivot_image=spec.pivot_image, pivot_text=spec.pivot_text, count=spec.count)
        return self._keep_positions(kept, start, length, hidden.shape[1], hidden.device)

    # -- decode --------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode_step(self, embeds: Tensor, state: DecoderState) -> Tensor:
        """One cached step for new-token embeddings [B, 1, d] -> logits [B, V]; ``state`` grows by one."""
        hidden = embeds
        pos = state.next_pos[:, None]
        cos_sin = self.lm.rotary_emb(hidden, pos)
        ones = torch.ones(embeds.shape[0], 1, dtype=torch.bool, device=embeds.device)
        # layers share one mask object per group (before / after FastV's cut): grow and bias each once
        grown: dict[int, tuple[Tensor, Tensor]] = {}
        for m in state.masks:
            if id(m) not in grown:
                m2 = torch.cat([m, ones], dim=1)
                grown[id(m)] = (m2, self._bias(m2, 1, hidden.dtype))
        biases = [grown[id(m)][1] for m in state.masks]
        state.masks = [grown[id(m)][0] for m in state.masks]
        for i, layer in enumerate(self.layers):
            past = (state.keys[i], state.values[i])
            hidden, state.keys[i], state.values[i], _ = self._layer(
                layer, hidden, cos_sin, biases[i], past, False
            )
        state.next_pos = state.next_pos + 1
        return self.lm_head(self.lm.norm(hidden))[:, 0]
