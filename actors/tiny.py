"""Builders for small random LLaVA models and a word-level tokenizer (tests, benchmarks, training seeds).

The models are real ``LlavaForConditionalGeneration`` instances (CLIP vision tower, LLaVA MLP projector,
LLaMA decoder) saved in the llava-hf layout, so everything that loads them also loads
``llava-hf/llava-1.5-7b-hf``. The tokenizer is word-level (lower-cased, punctuation split off): the
Shapes-VQA world has a closed vocabulary, and one token per word keeps a CPU-trained LLM small.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from actors.prompt import CAPTION_PREFIX, IMAGE_TOKEN

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)  # ids 0..4 in this order
PROMPT_WORDS = ("user", "assistant", CAPTION_PREFIX)
PUNCTUATION = tuple(".,:;?!'\"-()/")


def shapes_words() -> list[str]:
    """Every word the Shapes-VQA questions, answers and facts use (pipeline/shapes.py)."""
    from pipeline import shapes

    words = [*shapes.SHAPES, *(shapes.plural(s) for s in shapes.SHAPES), *shapes.COLOR_NAMES]
    words += [*shapes.NUMBER_WORDS, *(str(i) for i in range(shapes.MAX_OBJECTS + 1))]
    words += (
        "what color is the shape object how many are there a in row column yes no "
        "image picture this that of and or it its which where left right top bottom"
    ).split()
    return words


def _split_words(text: str) -> list[str]:
    # Mirrors pre_tokenizers.Whitespace (\w+|[^\w\s]+), lower-cased like the normalizer.
    return re.findall(r"\w+|[^\w\s]+", text.lower())


def build_tokenizer(words: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``words`` (phrases are split; default: the Shapes-VQA vocabulary).

    ``<s>`` is prepended to every encoded text, as LLaMA's tokenizer does; ``<image>`` is a special token
    the processor expands to one token per visual patch.
    """
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for phrase in [*PROMPT_WORDS, *PUNCTUATION, *(shapes_words() if words is None else words)]:
        for w in _split_words(phrase):
            vocab.setdefault(w, len(vocab))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def build_tiny_llava(
    save_dir: str | Path | None = None,
    *,
    image_size: int = 64,
    patch: int = 8,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    vision_heads: int | None = None,
    vision_intermediate: int | None = None,
    text_hidden: int = 64,
    text_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    words: Iterable[str] | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
    init_std: float = 0.02,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random-weight LLaVA (CLIP + MLP projector + LLaMA) and its processor; saved in llava-hf layout if asked.

    Defaults give ~0.2M parameters: 64x64 images cut into 8x8 patches = 64 visual tokens + CLS.
    A larger ``init_std`` (e.g. 0.2) makes random models' greedy outputs depend visibly on their input.
    """
    tokenizer = tokenizer or build_tokenizer(words)
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or 4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads or heads,
        image_size=image_size,
        patch_size=patch,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",
        initializer_range=init_std,
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=intermediate or (8 * text_hidden) // 3,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(image_size // patch) ** 2,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    processor = build_processor(tokenizer, image_size=image_size, patch=patch)
    if save_dir is not None:
        save_dir = Path(save_dir)
        model.save_pretrained(save_dir)
        processor.save_pretrained(save_dir)
    return model, processor


def build_processor(tokenizer: PreTrainedTokenizerFast, *, image_size: int, patch: int) -> LlavaProcessor:
    """LLaVA processor for square images: CLIP preprocessing (PIL backend) + the image-token expansion."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_resize=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


# LLaVA-1.5-7B's shapes (CLIP ViT-L/14-336 tower, LLaMA-7B: 4096 hidden, 11008 FFN, 32 heads, vocab 32064), as
# ``llava_config`` keywords: benchmarks and real-shape tests build from it, with fewer layers where they say so
LLAVA_7B_SHAPE = dict(
    image_size=336, patch=14, vision_hidden=1024, vision_intermediate=4096, vision_layers=24, vision_heads=16,
    text_hidden=4096, text_intermediate=11008, text_layers=32, heads=32, kv_heads=32, vocab_size=32064,
)  # fmt: skip


def llava_config(
    *,
    image_size: int,
    patch: int,
    vision_hidden: int,
    vision_intermediate: int,
    vision_layers: int,
    vision_heads: int,
    text_hidden: int,
    text_intermediate: int,
    text_layers: int,
    heads: int,
    kv_heads: int,
    vocab_size: int,
    image_token_index: int,
) -> LlavaConfig:
    """A LlavaConfig (CLIP vision + LLaMA) from plain numbers, feature layer -2, eager attention."""
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=vision_hidden,
            intermediate_size=vision_intermediate,
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads,
            image_size=image_size,
            patch_size=patch,
            projection_dim=768,
            hidden_act="quick_gelu",
        ),
        text_config=LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=text_hidden,
            intermediate_size=text_intermediate,
            num_hidden_layers=text_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=4096,
        ),
        image_token_index=image_token_index,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch) ** 2,
    )
    config._attn_implementation = "eager"
    return config


def fast_random_llava(config: LlavaConfig, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                      device: str | torch.device = "cpu"):
    """A LlavaForConditionalGeneration with cheap random weights (for shape/speed checks at 7B widths).

    Built on the meta device and materialised uninitialised on ``device`` (a GPU: no 14 GB host copy), then
    every matrix is filled from one small random pool (a copy, not a per-element draw): seconds instead of
    the minutes that HF's init takes. Norm weights are 1, biases 0, and the non-persistent buffers are
    recomputed. The weights do not depend on ``device``.
    """
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    device = torch.device(device)
    model = model.to_empty(device=device)
    g = torch.Generator().manual_seed(seed)
    pool = (torch.rand(1_000_003, generator=g) * 2 - 1).to(dtype).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
                continue
            flat = p.view(-1)
            std = (3.0 / p[0].numel()) ** 0.5  # uniform(-a, a) with variance 1/fan_in
            for off in range(0, flat.numel(), pool.numel()):
                chunk = flat[off : off + pool.numel()]
                chunk.copy_(pool[: chunk.numel()] * std)
        ids = model.model.vision_tower.embeddings.position_ids
        ids.copy_(torch.arange(ids.shape[-1], device=device)[None])
        model.model.language_model.rotary_emb = LlamaRotaryEmbedding(config=config.text_config).to(device)
    return model.eval()
