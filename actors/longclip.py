"""LongCLIP-L's text tower as a stock ``CLIPTextModelWithProjection`` (the ACCM selector's text encoder).

LongCLIP (``longclip-L.pt``, used by the ACCM authors in clip_encoder.py line 115) is an OpenAI-CLIP-format state
dict whose text tower has 248 positions split over two tables (model_longclip.py lines 306-309 and 356-360)::

    x = token_embedding(ids) + positional_embedding * mask1 + positional_embedding_res * mask2

with mask1 = 1 on rows < 20 and mask2 = 1 on rows >= 20 (lines 282-286, 318-321), so the position table a stock
HF model needs is ``cat(positional_embedding[:20], positional_embedding_res[20:])``. The rest is CLIP's text
transformer (causal mask, QuickGELU, pre-LN), ``ln_final``, and the EOS feature times ``text_projection``
(``x @ text_projection``, line 370) which becomes HF's bias-free ``text_projection`` Linear with the transposed
matrix. LongCLIP pools at ``ids.argmax()`` (EOT 49407, the highest id); the HF config gets
``eos_token_id`` = the tokenizer's EOS so HF pools at the first EOS, the same position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# model_longclip.py lines 282-286: mask1 keeps positional_embedding on the first 20 rows, mask2 the _res table after
LONGCLIP_KEEP_POSITIONS = 20
# longclip.py line 313: tokenize(context_length=77*4-60) = 248 positions
LONGCLIP_CONTEXT = 248


@dataclass(frozen=True)
class LongCLIPTextShape:
    """LongCLIP-L's text tower (ViT-L/14: width 768, 12 layers, 12 heads, projection 768, 248 positions)."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    projection: int = 768
    context: int = LONGCLIP_CONTEXT


LONGCLIP_L = LongCLIPTextShape()


def longclip_text_shapes(vocab_size: int, shape: LongCLIPTextShape = LONGCLIP_L) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every text-tower tensor of an OpenAI-CLIP-format LongCLIP state dict."""
    d = shape.width
    out: dict[str, tuple[int, ...]] = {
        "token_embedding.weight": (vocab_size, d),
        "positional_embedding": (shape.context, d),
        "positional_embedding_res": (shape.context, d),
        "ln_final.weight": (d,),
        "ln_final.bias": (d,),
        "text_projection": (d, shape.projection),
    }
    for i in range(shape.layers):
        p = f"transformer.resblocks.{i}."
        out.update({
            p + "attn.in_proj_weight": (3 * d, d), p + "attn.in_proj_bias": (3 * d,),
            p + "attn.out_proj.weight": (d, d), p + "attn.out_proj.bias": (d,),
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (4 * d, d), p + "mlp.c_fc.bias": (4 * d,),
            p + "mlp.c_proj.weight": (d, 4 * d), p + "mlp.c_proj.bias": (d,),
        })
    return out


def is_ignored_longclip_key(key: str) -> bool:
    """Keys of a LongCLIP checkpoint the text tower does not use: the image tower and the logit scale."""
    return key.startswith("visual.") or key in ("logit_scale", "context_length", "input_resolution", "vocab_size")


def check_state(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], what: str,
                ignore=lambda key: False) -> None:
    """Raise ValueError naming every missing, unexpected and mis-shaped key of ``state``."""
    have = {k for k in state if not ignore(k)}
    missing = sorted(set(expected) - have)
    extra = sorted(have - set(expected))
    bad = sorted(f"{k} {tuple(state[k].shape)} (expected {expected[k]})" for k in set(expected) & have
                 if tuple(state[k].shape) != tuple(expected[k]))
    if missing or extra or bad:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", extra), ("mis-shaped keys", bad)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
                parts.append(f"{label}: {shown}")
        raise ValueError(f"{what} does not match: " + "; ".join(parts))


def longclip_text_config(vocab_size: int, tokenizer, shape: LongCLIPTextShape = LONGCLIP_L):
    """The stock HF config of LongCLIP's text tower (quick_gelu, eps 1e-5, 248 positions, eager attention)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=shape.width, intermediate_size=4 * shape.width,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, projection_dim=shape.projection,
        max_position_embeddings=shape.context, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        # pooling: HF takes the first position holding eos_token_id (unless it is the legacy 2, then argmax);
        # LongCLIP takes text.argmax(-1) = the EOT token (model_longclip.py line 370): the same position
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        attn_implementation="eager",
    )


def longclip_to_hf_state(state: dict[str, Tensor], shape: LongCLIPTextShape = LONGCLIP_L) -> dict[str, Tensor]:
    """OpenAI-CLIP-format LongCLIP text keys -> ``CLIPTextModelWithProjection`` keys (checked first)."""
    vocab = state["token_embedding.weight"].shape[0] if "token_embedding.weight" in state else 0
    check_state(state, longclip_text_shapes(vocab, shape), "LongCLIP checkpoint", ignore=is_ignored_longclip_key)
    d, k = shape.width, LONGCLIP_KEEP_POSITIONS
    t = "text_model."
    out = {
        t + "embeddings.token_embedding.weight": state["token_embedding.weight"],
        # model_longclip.py line 358: pe * mask1 + pe_res * mask2 = rows < 20 from pe, the rest from pe_res
        t + "embeddings.position_embedding.weight": torch.cat([state["positional_embedding"][:k],
                                                                state["positional_embedding_res"][k:]]),
        t + "final_layer_norm.weight": state["ln_final.weight"],
        t + "final_layer_norm.bias": state["ln_final.bias"],
        # line 370: x @ text_projection -> Linear(d, proj, bias=False) with weight = text_projection.T
        "text_projection.weight": state["text_projection"].t(),
    }
    for i in range(shape.layers):
        src, dst = f"transformer.resblocks.{i}.", f"{t}encoder.layers.{i}."
        # nn.MultiheadAttention packs q, k, v row-wise in in_proj_weight / in_proj_bias (lines 170, 178-179)
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), state[src + "attn.in_proj_weight"].split(d),
                              state[src + "attn.in_proj_bias"].split(d), strict=True):
            out[f"{dst}self_attn.{name}.weight"], out[f"{dst}self_attn.{name}.bias"] = w, b
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{dst}{b}.weight"] = state[f"{src}{a}.weight"]
            out[f"{dst}{b}.bias"] = state[f"{src}{a}.bias"]
    return {key: v.detach().float().contiguous().clone() for key, v in out.items()}


def longclip_text_model(state: dict[str, Tensor], tokenizer, shape: LongCLIPTextShape = LONGCLIP_L):
    """A ``CLIPTextModelWithProjection`` carrying LongCLIP's text tower; ``tokenizer`` (CLIP BPE) must fit its vocab."""
    from transformers import CLIPTextModelWithProjection

    hf = longclip_to_hf_state(state, shape)
    vocab = hf["text_model.embeddings.token_embedding.weight"].shape[0]
    if len(tokenizer) > vocab:
        raise ValueError(f"the CLIP tokenizer has {len(tokenizer)} entries; LongCLIP's token_embedding only {vocab}")
    config = longclip_text_config(vocab, tokenizer, shape)
    model = CLIPTextModelWithProjection(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    check_state(hf, expected, "converted LongCLIP text tower")
    model.load_state_dict(hf, strict=False)
    return model.eval()


def longclip_tokenizer(clip_dir: str, context: int = LONGCLIP_CONTEXT):
    """CLIP's BPE tokenizer from a CLIP folder, with LongCLIP's 248 positions (longclip.py line 313)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(clip_dir)
    tok.model_max_length = context
    return tok
