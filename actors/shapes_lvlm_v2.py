"""The proving ground v2's LVLM: a LLaVA whose vision tower is the Shapes v2 CLIP's (``actors/shapes_clip.py``).

What differs from v1 (``actors/shapes_lvlm.py``, whose packing, attention-supervision loss and block
expansion it reuses): the world (``pipeline/shapes_v2.py``: 96x96 images, 144 visual tokens, 20-28 objects
of 2x2 patches), the vocabulary, a tower taken from the trained CLIP instead of trained here, and the
per-word attention targets of the v2 questions. The saved model is a plain ``LlavaForConditionalGeneration``.
"""

from __future__ import annotations

import numpy as np
import torch

from actors import shapes_clip as C
from actors import shapes_lvlm as L
from actors.prompt import IMAGE_TOKEN
from pipeline import shapes_v2 as world

N_VISUAL = world.GRID * world.GRID
_PROMPT_WORDS = ("USER", "ASSISTANT", ":", "\n", "?", ",", ".", "additional", "information")

PRESETS: dict[str, dict] = {
    # 256-d x 6-layer LLaMA beside the 128-d x 4-layer CLIP tower: tower ~10% of an item's FLOPs, visual
    # tokens ~88% of the prefill (LLaVA-1.5-7B: ~4% and ~88%); lookups supervised in layers 2-4, after FastV's K=2
    "default": dict(clip="default", hidden=256, layers=6, heads=8, kv_heads=4, inter=768),
    "tiny": dict(clip="tiny", hidden=48, layers=3, heads=2, kv_heads=1, inter=96),
}


def vocabulary() -> list[str]:
    return list(dict.fromkeys([*L.SPECIAL_TOKENS, *_PROMPT_WORDS, *world.vocabulary_words()]))


def build_tokenizer():
    return L.build_tokenizer(vocabulary())


def build_processor(tokenizer=None):
    """LlavaProcessor: CLIP-style resize + centre crop to 96x96, 144 visual tokens per image."""
    return L.build_processor(tokenizer or build_tokenizer(), image_size=world.IMAGE_SIZE, patch_size=world.PATCH)


def build_model(preset: str = "default", *, tokenizer=None, seed: int = 0, rope_theta: float | None = None):
    """A LlavaForConditionalGeneration in the llava-1.5 layout on the v2 CLIP's tower shape (eager attention).
    ``rope_theta`` overrides LLaMA's 10000: with 32-dim heads only ~3 rotary pairs turn slowly enough to compare
    a question with visual tokens wherever they sit (a 128-dim head has ~16), so a larger base gives content
    lookups room after pruning moves tokens (Llama 3 uses 500000)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    p = dict(PRESETS[preset], **({} if rope_theta is None else {"rope_theta": rope_theta}))
    tokenizer = tokenizer or build_tokenizer()
    text = L.llama_config(p, tokenizer, max_positions=1024)
    config = LlavaConfig(
        vision_config=C.vision_config(p["clip"]), text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=N_VISUAL,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return model


@torch.no_grad()
def load_clip_tower(model, clip_dir: str) -> None:
    """Put the trained CLIP's vision tower into the LVLM (the same ``CLIPVisionTransformer`` weights)."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(clip_dir)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())


def render(item_or_objects, background=None) -> np.ndarray:
    if background is None:
        return np.asarray(world.render(item_or_objects.objects, item_or_objects.background))
    return np.asarray(world.render(item_or_objects, background))


def attention_targets(
    qtype: str, words: list[str], objects
) -> tuple[list[tuple[int, list[int]]], list[tuple[int, list[int]]], int | None]:
    """Which visual tokens each naming word of a v2 question selects, and which word decides the answer
    (the v2 counterpart of ``actors.shapes_lvlm._word_attention_targets``; same three kinds of target):

    * own: a colour word selects the patches of the objects of that colour, a shape word those of that shape,
      a cell word ("c4") the object in that cell (what it means by itself, so the word layer learns it too);
    * in context: in exist / spatial questions the shape word selects the objects of the named colour *and*
      shape; a cell word, again, its object (the context layer's lookup, ``jobs/diagnose_lvlm_lookup.py``);
    * decisive: color / shape questions -> the cell word; count -> the colour word; exist / spatial -> the shape
      word.
    """
    own: list[tuple[int, list[int]]] = []
    in_context: list[tuple[int, list[int]]] = []
    decisive = None

    def patches(objs) -> list[int]:
        return [p for o in objs for p in world.patch_indices(o)]

    color = None
    for j, w in enumerate(words):
        if w in world.COLORS:
            own.append((j, patches(o for o in objects if o.color == w)))
            color = w
            if qtype == "count":
                decisive = j
        elif w in world.SHAPES:
            own.append((j, patches(o for o in objects if o.shape == w)))
            if qtype in ("exist", "spatial"):
                in_context.append((j, patches(o for o in objects if o.color == color and o.shape == w)))
                decisive = j
        elif j > 0 and words[j - 1] == "cell" and (cell := world.cell_of(w)) is not None:
            own.append((j, patches(o for o in objects if (o.row, o.col) == cell)))
            in_context.append(own[-1])
            decisive = j
    return own, in_context, decisive


def pack_batch(tokenizer, branches_per_image: list[list[L.Branch]],
               visual_keep: list[list[int]] | None = None) -> L.PackedBatch:
    return L.pack_batch(tokenizer, branches_per_image, n_visual=N_VISUAL, attention_targets=attention_targets,
                        visual_keep=visual_keep)


def draw_branches(objects, rng: np.random.Generator, *, n_image: int, n_fact: int, n_text: int,
                  qtypes: tuple[str, ...] = world.QUESTION_TYPES,
                  image_weights: tuple[float, ...] | None = None) -> list[L.Branch]:
    return L.draw_branches(objects, rng, n_image=n_image, n_fact=n_fact, n_text=n_text, qtypes=qtypes, world=world,
                           image_weights=image_weights)
