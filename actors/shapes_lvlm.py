"""The proving-ground LVLM for Shapes-VQA: tokenizer, processor, model and its forward over
training batches.

Importable without Ray (``jobs/train_lvlm.py`` and the tests use it directly). What lives here:

* ``build_tokenizer`` -- a word-level tokenizer over the tiny Shapes-VQA vocabulary, wrapped in
  ``PreTrainedTokenizerFast`` with ``<image>`` as the image token, so that ``AutoProcessor`` serves it
  exactly as it serves ``llava-hf/llava-1.5-7b-hf``.
* ``build_processor`` / ``build_model`` -- a ``LlavaProcessor`` and a ``LlavaForConditionalGeneration``
  (CLIP vision tower, 2-layer GELU projector, LLaMA decoder) from a named size preset.
* ``pixel_values`` -- the processor's normalisation done in numpy (training renders millions of images;
  a test checks it equals the saved processor's output).
* ``sample_train_scene`` -- a curriculum sampler (fewer objects early) that stays inside the train split.
* ``packed_embeds`` / ``packed_logits`` -- the forward over a packed multi-question batch. The batches
  themselves (``pack_batch``, ``draw_branches``: one image prefix, several question branches) are built in
  ``actors.packed_batch`` and re-exported here.
"""

from __future__ import annotations

import numpy as np
import torch

from actors.attention_rows import attention_target_loss, target_nll  # noqa: F401 - re-exported: the supervision losses
from actors.packed_batch import (  # noqa: F401 - re-exported: the training jobs and tests call them as L.*
    Branch,
    PackedBatch,
    _word_attention_targets,
    draw_branches,
    first_answer_hits,
    first_answer_positions,
    kept_features,
    pack_batch,
    random_visual_keep,
)
from actors.prompt import IMAGE_TOKEN
from pipeline import shapes

# ----------------------------------------------------------------------------- tokenizer

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN)
_WORDS = (
    "USER", "ASSISTANT", ":", "\n", "?", ",", ".", "additional", "information",
    "What", "How", "Is", "color", "shape", "is", "the", "object", "many", "are", "there", "a", "in", "row",
    "column", "no", "yes",
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def vocabulary() -> list[str]:
    """Every word the Shapes-VQA prompts, facts and answers can contain (special tokens first)."""
    words = list(SPECIAL_TOKENS) + list(_WORDS)
    words += list(shapes.COLOR_NAMES) + list(shapes.SHAPES) + [shapes.plural(s) for s in shapes.SHAPES]
    words += list(shapes.NUMBER_WORDS) + [str(i) for i in range(shapes.MAX_OBJECTS + 1)]
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)


def build_tokenizer(words: list[str] | None = None):
    """Word-level tokenizer; '<s>' prepended like LLaMA's, '<image>' registered as the image token.
    ``words``: another world's vocabulary (default: Shapes-VQA v1's, ``vocabulary()``)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words or vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.Split(Regex(" +"), behavior="removed"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
    )


# ----------------------------------------------------------------------------- processor + model

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.25, 0.25, 0.25)


def build_processor(tokenizer=None, *, image_size: int = shapes.IMAGE_SIZE, patch_size: int = shapes.CELL):
    """LlavaProcessor as CLIP's: shortest side resized to 64 and center-cropped (a Shapes image, already 64x64,
    passes unchanged; a photo of any size is answered), rescale + normalise; 64 visual tokens per image
    (``image_size`` / ``patch_size``: another world's)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = tokenizer or build_tokenizer()
    image_processor = CLIPImageProcessorPil(
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


PRESETS: dict[str, dict] = {
    # small tower, larger LLM: tower ~4% of a full-token item's FLOPs (LLaVA-1.5-7B: ~4%)
    # (a 64-d tower with a 256-wide MLP learned per-object shape to only ~46% in stage 0: too little
    # per-patch capacity to recognise 5-6 px shapes under any colour and offset; hence the wide MLP)
    "default": dict(v_hidden=96, v_layers=3, v_heads=4, v_inter=768, hidden=256, layers=4, heads=8, kv_heads=4, inter=768),
    # 6 layers: the attention-supervised lookups sit in layers 2-4, after FastV's K=2 as in a 32-layer LLM
    "deep": dict(v_hidden=96, v_layers=3, v_heads=4, v_inter=768, hidden=256, layers=6, heads=8, kv_heads=4, inter=768),
    "small": dict(v_hidden=96, v_layers=3, v_heads=4, v_inter=768, hidden=192, layers=4, heads=6, kv_heads=3, inter=512),
    "tiny": dict(v_hidden=32, v_layers=3, v_heads=2, v_inter=64, hidden=48, layers=2, heads=2, kv_heads=1, inter=96),
}


def llama_config(p: dict, tokenizer, max_positions: int = 512):
    """The proving-ground LLaMA from a preset's ``hidden/inter/layers/heads/kv_heads`` and optional ``rope_theta``
    (both worlds)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=p["hidden"], intermediate_size=p["inter"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
        max_position_embeddings=max_positions, rope_theta=float(p.get("rope_theta", 10000.0)), tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def build_model(preset: str = "default", *, tokenizer=None, seed: int = 0):
    """A from-scratch LlavaForConditionalGeneration in the llava-1.5 layout (eager attention by default)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    p = PRESETS[preset]
    tokenizer = tokenizer or build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=p["v_hidden"], intermediate_size=p["v_inter"], num_hidden_layers=p["v_layers"],
        num_attention_heads=p["v_heads"], image_size=shapes.IMAGE_SIZE, patch_size=shapes.CELL,
        projection_dim=p["v_hidden"], hidden_act="quick_gelu",
    )
    text = llama_config(p, tokenizer)
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=shapes.GRID * shapes.GRID, tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


@torch.no_grad()
def grow_llm_front(trained, grown) -> int:
    """Copy a trained LLaVA into `grown`, whose LLM has more layers, the extra ones in front (block expansion).

    Why: FastV prunes after layer K=2. In LLaVA-1.5-7B that is 2 of 32 layers, before the LLM has found what
    the question needs; in a 4-layer LLM whose lookups sit in layers 0-2 it is after. Putting new layers in
    front moves the trained lookups to layers N.. without retraining them. Each new layer is a copy of the
    trained first layer with its output projections (attention o_proj, MLP down_proj) zeroed, so it starts
    as the identity on the residual stream (LLaMA Pro's block expansion) and the grown model computes
    exactly what the trained one did until fine-tuning changes it. Returns the number of layers added.
    """
    src, dst = trained.model.language_model, grown.model.language_model
    added = len(dst.layers) - len(src.layers)
    if added < 0:
        raise ValueError(f"cannot grow a {len(src.layers)}-layer LLM into {len(dst.layers)} layers")
    own = grown.state_dict()
    for name, value in trained.state_dict().items():
        key = name
        if ".language_model.layers." in name:
            head, rest = name.split(".language_model.layers.", 1)
            idx, tail = rest.split(".", 1)
            key = f"{head}.language_model.layers.{int(idx) + added}.{tail}"
        if key not in own or own[key].shape != value.shape:
            raise ValueError(f"{name}: no matching parameter {key} in the grown model (differently sized?)")
        own[key].copy_(value)
    for layer in dst.layers[:added]:
        layer.load_state_dict(dst.layers[added].state_dict())
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    return added


def pixel_values(images: list[np.ndarray]) -> torch.Tensor:
    """[B, 3, 64, 64] exactly as the saved processor computes it (uint8 HWC arrays in)."""
    x = np.stack(images).astype(np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


@torch.no_grad()
def fold_feature_standardisation(model, pixels: torch.Tensor) -> dict:
    """Fold the per-dimension mean/std of the tower's feature-layer patches on ``pixels`` into the projector's
    first Linear (W <- W / sigma, b <- b - W mu / sigma): see ``jobs/train_lvlm.standardize_projector``."""
    hidden, _ = vision_features(model, pixels)
    feats = hidden[:, 1:].reshape(-1, hidden.shape[-1])
    mu, sigma = feats.mean(0), feats.std(0) + 1e-5
    lin = model.model.multi_modal_projector.linear_1
    lin.bias -= (lin.weight / sigma) @ mu
    lin.weight /= sigma
    return {"feature_mean_norm": round(mu.norm().item(), 2), "feature_std_mean": round(sigma.mean().item(), 3)}


def vision_features(model, pixels: torch.Tensor, *, output_attentions: bool = False):
    """Penultimate-layer patch features [B, 64, Dv] (CLS dropped) and, optionally, CLS hidden + attentions."""
    out = model.model.vision_tower(pixels, output_hidden_states=True, output_attentions=output_attentions)
    hidden = out.hidden_states[model.config.vision_feature_layer]
    return hidden, out


# ----------------------------------------------------------------------------- data

def sample_train_scene(rng: np.random.Generator, n_min: int, n_max: int) -> tuple[shapes.SceneObject, ...]:
    """A train-split scene with ``n_min..n_max`` objects (curriculum)."""
    return shapes.sample_scene(rng, "train", (n_min, n_max))


def curriculum_range(progress: float, ramp: float) -> tuple[int, int]:
    """Object-count range at ``progress`` in [0, 1]: 1-4 objects at the start, 10-16 after ``ramp``."""
    t = 1.0 if ramp <= 0 else min(1.0, progress / ramp)
    lo = int(round(1 + t * (shapes.MIN_OBJECTS - 1)))
    hi = int(round(4 + t * (shapes.MAX_OBJECTS - 4)))
    return lo, hi


def mixed_range(progress: float, ramp: float) -> tuple[int, int]:
    """Stage 2 of the ``mixed`` curriculum: 1-16 objects at the start, the benchmark's 10-16 after ``ramp``."""
    t = 1.0 if ramp <= 0 else min(1.0, progress / ramp)
    return int(round(1 + t * (shapes.MIN_OBJECTS - 1))), shapes.MAX_OBJECTS


def level_range(level: int) -> tuple[int, int]:
    """Adaptive curriculum level -> object-count range: level 1 = one object, ... level 16 = 10-16."""
    level = max(1, min(shapes.MAX_OBJECTS, level))
    return max(1, min(shapes.MIN_OBJECTS, level - 3)), level


def patch_labels(objects) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch colour (0 = empty, 1..8) and shape (0 = empty, 1..6) labels for stage 0."""
    color = np.zeros(shapes.GRID * shapes.GRID, np.int64)
    shape = np.zeros(shapes.GRID * shapes.GRID, np.int64)
    for o in objects:
        p = shapes.patch_index(o)
        color[p] = 1 + shapes.COLOR_NAMES.index(o.color)
        shape[p] = 1 + shapes.SHAPES.index(o.shape)
    return color, shape


def packed_embeds(model, pixels: torch.Tensor, batch: PackedBatch, *,
                  features: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, D] the LLM's input embeddings of a packed batch: the text tokens' embeddings with the projected
    patch features (``features``, else the tower's on ``pixels``) in the image slots."""
    if features is None:
        hidden, _ = vision_features(model, pixels)
        features = hidden[:, 1:]
    projected = model.model.multi_modal_projector(features)
    embeds = model.model.language_model.get_input_embeddings()(batch.input_ids)
    return embeds.masked_scatter(batch.image_mask[..., None], projected.to(embeds.dtype))


def packed_logits(model, pixels: torch.Tensor, batch: PackedBatch, *, features: torch.Tensor | None = None,
                  output_attentions: bool = False):
    """Logits at the labelled positions only ([n_labels, V]) and their labels for a packed batch; with
    ``output_attentions`` (eager attention only) also the LLM's per-layer attention maps."""
    out = model.model.language_model(
        inputs_embeds=packed_embeds(model, pixels, batch, features=features), attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False,
        output_attentions=output_attentions,
    )
    sel = batch.labels != -100
    logits, labels = model.lm_head(out.last_hidden_state[sel]), batch.labels[sel]
    return (logits, labels, out.attentions) if output_attentions else (logits, labels)
