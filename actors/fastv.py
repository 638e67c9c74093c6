"""The LLaMA decoder loop of the engine, with FastV's in-LLM token pruning (real compaction).

The engine runs ``model.model.language_model``'s layers itself rather than through ``generate``:
sequences are built from embeddings (text before, projected visual tokens, text after), left padded,
and every layer keeps its own K/V tensors. That gives FastV what it needs (SPEC §2): after layer K-1,
the head-averaged attention of the last prompt token ranks the image tokens, and from layer K on the
hidden states *and* those layers' KV caches hold only the top-k image tokens (plus all text), with
their original position ids. Layers < K keep the full cache, as in FastV where they saw every token.

Attention is ``scaled_dot_product_attention`` in every layer (fused kernels where the device has them);
the one probability row FastV reads is computed on its own from layer K-1's q and K, so no
``output_attentions`` over the whole model and no [Q, S] matrix. The KV cache is preallocated (prompt +
new tokens) and written in place. ``attention="eager"`` writes LLaMA's eager attention out instead: the
reference the fused path is tested against. For ``fastv=None`` the loop reproduces
``LlavaForConditionalGeneration``'s logits (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from actors.pruners import select_topk
from kernels.compact import compact_rows
from kernels.token_scores import head_mean_query_scores as head_mean_last_query

ATTENTIONS = ("sdpa", "eager")


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
    """Per-layer preallocated KV caches and key-validity masks (layers before and after FastV's cut differ in
    length). Buffers hold ``capacity`` slots; the first ``lengths[l]`` are filled."""

    key_cache: list[Tensor]  # [B, Hkv, capacity_l, hd]
    value_cache: list[Tensor]
    mask_cache: list[Tensor]  # [B, capacity_l] bool, True = a real token; one object per layer group
    lengths: list[int]  # filled slots per layer
    next_pos: Tensor  # [B] position id of the next token
    padded: list[bool]  # per layer: does its prompt hold left padding (decode steps then need a mask)
    fastv_positions: Tensor | None = None  # [B, L'] padded-sequence positions kept from FastV's layer on

    @property
    def keys(self) -> list[Tensor]:
        """Filled keys per layer [B, Hkv, S_l, hd] (views of the buffers)."""
        return [k[:, :, :n] for k, n in zip(self.key_cache, self.lengths, strict=True)]

    @property
    def values(self) -> list[Tensor]:
        return [v[:, :, :n] for v, n in zip(self.value_cache, self.lengths, strict=True)]

    @property
    def masks(self) -> list[Tensor]:
        return [m[:, :n] for m, n in zip(self.mask_cache, self.lengths, strict=True)]


def _with_room(t: Tensor, extra: int, dim: int) -> Tensor:
    """``t`` followed by ``extra`` zero (for masks: False) slots along ``dim``: a cache buffer with room for new
    tokens, sized from the tensor itself (this rank's heads under tensor parallelism, any projection type)."""
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _causal(q_len: int, s: int, device) -> Tensor:
    """Bool [Q, S]: the last ``q_len`` of ``s`` positions each see themselves and everything before."""
    q_pos = torch.arange(s - q_len, s, device=device)[:, None]
    return torch.arange(s, device=device)[None, :] <= q_pos


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask of allowed keys as the additive mask attention adds to its scores (0 or dtype's min)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class LlamaDecoderRunner:
    """Prefill + cached decode over a ``LlamaModel``'s layers, FastV/DART optional.

    ``attention``: "sdpa" (default: ``scaled_dot_product_attention`` in every layer, the fused flash /
    memory-efficient kernels where the device has them) or "eager" (the score matrix written out, LLaMA's
    eager attention: the reference the fused path is tested against). Either way the one attention row an
    in-LLM pruner reads (FastV: the last prompt token's, layer K-1) is computed on its own from that layer's
    q and K, so no layer materialises a [Q, S] probability matrix for it.

    The KV cache is preallocated per batch (``DecoderState``): prompt length (after the cut, for layers
    past it) plus ``max_new_tokens`` slots, written in place at every decode step.
    """

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, *, attention: str = "sdpa"):
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.lm = language_model
        self.lm_head = lm_head
        self.layers = list(language_model.layers)
        self.attention = attention

    # -- one layer -----------------------------------------------------------------------------------

    def _layer(
        self,
        layer: nn.Module,
        hidden: Tensor,
        cos_sin: tuple[Tensor, Tensor],
        allowed: Tensor | None,
        cache: tuple[Tensor, Tensor, int] | None,
        want_last_probs: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """One decoder layer. ``allowed``: the keys each query may see, [B, 1, Q, S], as a bool mask or as the
        additive float mask of the model's dtype that ``prefill``/``decode_step`` build once per layer group
        (``_bias``); None: causal over equal-length rows, no padding. ``cache``: (K, V, n) preallocated
        [B, Hkv, cap, hd] buffers holding ``n`` earlier positions; this step's k/v are written at ``n`` onwards
        and attention reads the first ``n + Q``. Returns (hidden, k, v, last-row probs [B, H, S] float32 or
        None); k/v: the keys and values the layer attended over (the cache view when ``cache`` is given)."""
        attn = layer.self_attn
        b, q_len, _ = hidden.shape
        x = layer.input_layernorm(hidden)
        shape = (b, q_len, -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *cos_sin)
        if cache is not None:
            k_buf, v_buf, n = cache
            k_buf[:, :, n : n + q_len] = k
            v_buf[:, :, n : n + q_len] = v
            k, v = k_buf[:, :, : n + q_len], v_buf[:, :, : n + q_len]
        groups = q.shape[1] // k.shape[1]
        bias = allowed
        if bias is None and (self.attention == "eager" or 1 < q_len < k.shape[2]):  # SDPA's is_causal aligns
            bias = _causal(q_len, k.shape[2], q.device)[None, None]  # top-left: spell causal out where it differs
        if bias is not None and bias.dtype == torch.bool:
            bias = _additive(bias, q.dtype)
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, is_causal=bias is None and q_len > 1, scale=attn.scaling,
                enable_gqa=groups > 1)
        else:
            scores = torch.matmul(q, repeat_kv(k, groups).transpose(2, 3)) * attn.scaling
            probs = torch.softmax(scores + bias, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, repeat_kv(v, groups))
        out = attn.o_proj(out.transpose(1, 2).reshape(b, q_len, -1))
        hidden = hidden + out
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        last = None
        if want_last_probs:  # the one row FastV reads: last query against every key, on its own
            scores = torch.matmul(q[:, :, -1:], repeat_kv(k, groups).transpose(2, 3)) * attn.scaling
            scores = scores.float()  # float32: in bf16 near-equal scores would tie
            if bias is not None:  # without one, the last query sees every key
                scores = scores + bias[:, :, -1:].float()
            last = torch.softmax(scores, dim=-1)[:, :, 0]
        return hidden, k, v, last

    @staticmethod
    def _bias(allowed: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """A bool ``_allowed`` mask as the additive mask every layer of its group adds (built once, in the
        model's dtype: no per-layer conversion inside the attention kernel)."""
        return None if allowed is None else _additive(allowed, dtype)

    @staticmethod
    def _allowed(key_mask: Tensor, q_len: int, padded: bool | None = None) -> Tensor | None:
        """Bool [B, 1, Q, S]: causal over the last Q keys, padding keys hidden; None when no key is padding
        (then causal attention needs no mask: the fused kernels' fastest path). ``padded``: whether any key
        is padding, when the caller knows (saves a device sync per decode step).

        Every row may see itself, so fully padded (left-pad) query rows stay finite.
        """
        if padded is None:
            padded = not bool(key_mask.all())
        if not padded:
            return None
        s = key_mask.shape[1]
        pos = torch.arange(s, device=key_mask.device)
        itself = pos[None, :] == pos[s - q_len :, None]
        allowed = _causal(q_len, s, key_mask.device)[None] & key_mask[:, None, :]
        return (allowed | itself[None])[:, None]

    # -- prefill -------------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(
        self,
        embeds: Tensor,
        mask: Tensor,
        image_start: Tensor,
        image_len: Tensor,
        fastv: FastVSpec | None = None,
        *,
        max_new_tokens: int = 0,
    ) -> tuple[Tensor, DecoderState]:
        """Left-padded ``embeds`` [B, L, d] with ``mask`` [B, L] -> (last-position logits [B, V], state).

        ``max_new_tokens``: cache slots reserved past the prompt (decoding further grows the cache)."""
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
        next_pos = pos[:, -1] + 1
        hidden = embeds
        cos_sin = self.lm.rotary_emb(hidden, pos)
        bias = self._bias(self._allowed(mask, hidden.shape[1]), embeds.dtype)
        keys, values, masks, lengths, padded = [], [], [], [], []
        probs_last = None
        cut = fastv.layer if fastv is not None else -1
        keep_idx = None
        if fastv is not None and not 1 <= cut <= len(self.layers):  # cut == layers: nothing left to prune
            raise ValueError(f"fastv layer must be in [1, {len(self.layers)}], got {cut}")
        if fastv is not None and fastv.rule not in ("fastv", "dart"):
            raise ValueError(f"unknown in-LLM rule {fastv.rule!r}")
        dart = fastv is not None and fastv.rule == "dart"
        mask_buf = _with_room(mask, max_new_tokens, dim=1)
        for i, layer in enumerate(self.layers):
            if i == cut and dart:
                keep_idx = self._dart_keep_positions(hidden, keys[cut - 1][:, :, : lengths[cut - 1]], image_start,
                                                     image_len, fastv)
            elif i == cut:
                heads = self.layers[cut - 1].self_attn.config.num_attention_heads
                keep_idx = self._fastv_keep_positions(probs_last, image_start, image_len, fastv.keep, heads)
            if i == cut:
                hidden = compact_rows(hidden, keep_idx)
                mask = torch.gather(mask, 1, keep_idx)
                pos = torch.gather(pos, 1, keep_idx)
                cos_sin = self.lm.rotary_emb(hidden, pos)
                bias = self._bias(self._allowed(mask, hidden.shape[1]), embeds.dtype)
                mask_buf = _with_room(mask, max_new_tokens, dim=1)
            seq = hidden.shape[1]
            want_row = i == cut - 1 and not dart and cut < len(self.layers)  # FastV's row, if a cut follows
            hidden, k, v, probs_last = self._layer(layer, hidden, cos_sin, bias, None, want_row)
            keys.append(_with_room(k, max_new_tokens, dim=2))
            values.append(_with_room(v, max_new_tokens, dim=2))
            masks.append(mask_buf)
            lengths.append(seq)
            padded.append(bias is not None)
        logits = self.lm_head(self.lm.norm(hidden[:, -1:]))[:, 0]
        return logits, DecoderState(keys, values, masks, lengths, next_pos, padded, keep_idx)

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
        """Kept image offsets [B, k] (ascending, -1 padded) -> [B, L'] positions: all text + those images.

        On the device, without a per-row loop (no host round trip per row)."""
        kept, start, length = kept.to(device), start.to(device), length.to(device)
        pos = torch.arange(seq_len, device=device)[None]
        image = (pos >= start[:, None]) & (pos < (start + length)[:, None])
        keep = ~image
        rows = torch.arange(kept.shape[0], device=device)[:, None].expand_as(kept)
        valid = kept >= 0
        keep[rows[valid], (kept + start[:, None])[valid]] = True
        counts = keep.sum(1)
        if bool((counts != counts[0]).any()):
            raise ValueError("FastV rows must drop the same number of tokens (equal image counts and budget)")
        return keep.nonzero()[:, 1].view(kept.shape[0], -1)

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

    @staticmethod
    def _reserve(state: DecoderState, steps: int) -> None:
        """Make room for ``steps`` more tokens in every layer's buffers (grows by at least a doubling, so a
        caller decoding past ``max_new_tokens`` pays amortised O(1) copies per step)."""
        grown: dict[int, Tensor] = {}
        for i, k in enumerate(state.key_cache):
            n, cap = state.lengths[i], k.shape[2]
            if n + steps <= cap:
                continue
            extra = max(n + steps - cap, cap)
            state.key_cache[i] = _with_room(k, extra, dim=2)
            state.value_cache[i] = _with_room(state.value_cache[i], extra, dim=2)
            m = state.mask_cache[i]
            if id(m) not in grown:
                grown[id(m)] = _with_room(m, extra, dim=1)
            state.mask_cache[i] = grown[id(m)]

    @torch.no_grad()
    def decode_step(self, embeds: Tensor, state: DecoderState) -> Tensor:
        """One cached step for new-token embeddings [B, 1, d] -> logits [B, V]; written into ``state`` in place."""
        self._reserve(state, 1)
        hidden = embeds
        pos = state.next_pos[:, None]
        cos_sin = self.lm.rotary_emb(hidden, pos)
        # layers share one mask buffer per group (before / after the cut): mark the new slot once per group
        biases: dict[int, Tensor | None] = {}
        for m, n, pad in zip(state.mask_cache, state.lengths, state.padded, strict=True):
            if id(m) not in biases:
                m[:, n] = True
                biases[id(m)] = self._bias(self._allowed(m[:, : n + 1], 1, pad), hidden.dtype)
        for i, layer in enumerate(self.layers):
            n = state.lengths[i]
            cache = (state.key_cache[i], state.value_cache[i], n)
            hidden = self._layer(layer, hidden, cos_sin, biases[id(state.mask_cache[i])], cache, False)[0]
            state.lengths[i] = n + 1
        state.next_pos = state.next_pos + 1
        return self.lm_head(self.lm.norm(hidden))[:, 0]
