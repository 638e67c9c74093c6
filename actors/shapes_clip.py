"""The proving ground v2's CLIP: a small ``CLIPModel`` (vision + text towers, both projections) for Shapes v2.

Same transformers classes and layout as openai/clip-vit-large-patch14-336, so everything that takes a real
CLIP folder takes this one by path: ``actors.pruners.TextGuide`` (``--clip``: PruMerge+'s text picks,
CDPruner's relevance), the ACCM selector's text encoder, and the LVLM, whose vision tower *is* this model's
vision tower (LLaVA reads layer -2; the last layer, ``post_layernorm`` and both projections exist for the
CLIP side: the CLS attention PruMerge+ reads and the projected patch embeddings ACCM's mapper takes).

Importable without Ray; ``jobs/train_clip.py`` trains it.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline import shapes_v2 as world

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
PUNCTUATION = (",", ".", "?", ":")
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.25, 0.25, 0.25)
MAX_TEXT_TOKENS = 40

PRESETS: dict[str, dict] = {
    # 128-d x 4-layer tower: ~10% of an item's FLOPs beside the 256-d x 6-layer LLM (LLaVA-1.5-7B: ~4-13%,
    # depending on what is counted); the LVLM reads layer 3 (-2), the CLIP side layer 4
    "default": dict(v_hidden=128, v_layers=4, v_heads=4, v_inter=512, t_hidden=128, t_layers=3, t_heads=4,
                    t_inter=512, projection=128),
    "tiny": dict(v_hidden=32, v_layers=2, v_heads=2, v_inter=64, t_hidden=32, t_layers=1, t_heads=2,
                 t_inter=64, projection=16),
}


def vocabulary() -> list[str]:
    return list(dict.fromkeys([*SPECIAL_TOKENS, *PUNCTUATION, *world.vocabulary_words()]))


def build_tokenizer():
    """Word-level tokenizer, ``<s> text </s>`` like CLIP's start/end-of-text (the text tower pools at ``</s>``)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\s+"), behavior="removed"), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="right", model_max_length=MAX_TEXT_TOKENS,
    )


def vision_config(preset: str = "default"):
    """The tower shared by the CLIP and the LVLM (one place for its shape)."""
    from transformers import CLIPVisionConfig

    p = PRESETS[preset]
    return CLIPVisionConfig(
        hidden_size=p["v_hidden"], intermediate_size=p["v_inter"], num_hidden_layers=p["v_layers"],
        num_attention_heads=p["v_heads"], image_size=world.IMAGE_SIZE, patch_size=world.PATCH,
        projection_dim=p["projection"], hidden_act="quick_gelu",
    )


def build_clip(preset: str = "default", *, tokenizer=None, seed: int = 0):
    """A from-scratch ``CLIPModel`` for the v2 world (SDPA attention; load with eager to read attentions)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    p = PRESETS[preset]
    tokenizer = tokenizer or build_tokenizer()
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=p["t_hidden"], intermediate_size=p["t_inter"],
        num_hidden_layers=p["t_layers"], num_attention_heads=p["t_heads"], max_position_embeddings=MAX_TEXT_TOKENS,
        projection_dim=p["projection"], hidden_act="quick_gelu", pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision_config(preset).to_dict(),
                        projection_dim=p["projection"])
    torch.manual_seed(seed)
    return CLIPModel(config)


def build_processor(tokenizer=None):
    """``CLIPProcessor``: shortest side resized to 96, centre crop, the LVLM's normalisation."""
    from transformers import CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), do_convert_rgb=True,
        size={"shortest_edge": world.IMAGE_SIZE}, crop_size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE},
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer or build_tokenizer())


def pixel_values(images: list[np.ndarray]) -> torch.Tensor:
    """[B, 3, 96, 96] as the processor computes it for a 96x96 image (uint8 HWC arrays in)."""
    x = np.stack(images).astype(np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def patch_embeddings(model, last_hidden: torch.Tensor) -> torch.Tensor:
    """[B, N, P] L2-normalised projected patch embeddings (CLS dropped): post_layernorm + visual_projection
    of the last layer, the space PruMerge+'s text picks and CDPruner's relevance compare questions in."""
    emb = model.visual_projection(model.vision_model.post_layernorm(last_hidden[:, 1:]))
    return emb / emb.norm(dim=-1, keepdim=True)


def patch_labels(objects) -> dict[str, np.ndarray]:
    """Per-patch labels of the cell each patch lies in: colour (0 = empty, 1..8), shape (0 = empty, 1..6),
    cell row and cell column (0..5). Every patch of an object's cell carries its identity, which is what
    lets half of an object's patches stand for it."""
    n = world.GRID * world.GRID
    color, shape = np.zeros(n, np.int64), np.zeros(n, np.int64)
    idx = np.arange(n)
    per = world.CELL // world.PATCH
    row, col = (idx // world.GRID) // per, (idx % world.GRID) // per
    for o in objects:
        for p in world.patch_indices(o):
            color[p] = 1 + world.COLOR_NAMES.index(o.color)
            shape[p] = 1 + world.SHAPES.index(o.shape)
    return {"color": color, "shape": shape, "row": row, "col": col}
