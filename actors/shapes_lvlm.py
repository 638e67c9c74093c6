"""The proving-ground LVLM for Shapes-VQA: tokenizer, processor, model and training batches.

Importable without Ray (``jobs/train_lvlm.py`` and the tests use it directly). What lives here:

* ``build_tokenizer`` -- a word-level tokenizer over the tiny Shapes-VQA vocabulary, wrapped in
  ``PreTrainedTokenizerFast`` with ``<image>`` as the image token, so that ``AutoProcessor`` serves it
  exactly as it serves ``llava-hf/llava-1.5-7b-hf``.
* ``build_processor`` / ``build_model`` -- a ``LlavaProcessor`` and a ``LlavaForConditionalGeneration``
  (CLIP vision tower, 2-layer GELU projector, LLaMA decoder) from a named size preset.
* ``pixel_values`` -- the processor's normalisation done in numpy (training renders millions of images;
  a test checks it equals the saved processor's output).
* ``sample_train_scene`` -- a curriculum sampler (fewer objects early) that stays inside the train split.
* ``pack_batch`` -- *packed multi-question sequences*: one image prefix followed by several question
  branches. A 4-D attention mask lets every branch see ``<s> USER:`` (+ the 64 visual tokens for image
  branches) and itself only, and position ids restart after the prefix, so each branch is token- and
  position-identical to the single-turn inference prompt of ``actors.prompt.build_prompt`` while the image
  prefix is computed once. Branches with the answer's fact as ``additional information`` and text-only
  branches (no visual tokens, fact given) teach the decoder to read supplemental text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from actors.attention_rows import attention_target_loss, target_nll  # noqa: F401 - re-exported: the supervision losses
from actors.prompt import IMAGE_TOKEN, build_prompt
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


@dataclass
class Branch:
    """One question branch of a packed sequence."""

    question: str
    answer: str
    qtype: str
    caption: str | None
    use_image: bool
    objects: tuple = ()  # the scene (for the per-word attention targets of training)
    target: tuple[int, ...] = ()  # indices (into ``objects``) of the objects the answer depends on


def draw_branches(objects, rng: np.random.Generator, *, n_image: int, n_fact: int, n_text: int,
                  qtypes: tuple[str, ...] = shapes.QUESTION_TYPES, world=shapes,
                  image_weights: tuple[float, ...] | None = None) -> list[Branch]:
    """Questions about one scene: plain image questions, image + fact, and text-only (fact, no image).
    ``world``: the module that asks and states facts (``pipeline.shapes`` or ``pipeline.shapes_v2``).
    ``image_weights``: sampling weights over ``qtypes`` for the plain image questions (None: uniform, drawn as
    always, so runs without it see the batches they always saw)."""
    out: list[Branch] = []
    probs = None if image_weights is None else np.asarray(image_weights, float) / float(sum(image_weights))
    for kind, n in (("image", n_image), ("fact", n_fact), ("text", n_text)):
        while n > 0:
            if kind == "image" and probs is not None:
                qtype = qtypes[int(rng.choice(len(qtypes), p=probs))]
            else:
                qtype = qtypes[int(rng.integers(len(qtypes)))]
            asked = world.ask(objects, qtype, rng)
            if asked is None:
                continue
            q, a, target = asked
            cap = None if kind == "image" else world.fact(objects, qtype, q, target)
            out.append(Branch(q, a, qtype, cap, kind != "text", tuple(objects), tuple(target)))
            n -= 1
    return out


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, L] (image slots hold the image token id)
    image_mask: torch.Tensor  # [B, L] bool, where the projected patch features go
    position_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, 1, L, L] additive float mask
    labels: torch.Tensor  # [B, L] next-token targets per position (-100: no loss), already shifted
    label_types: list[list[str]]  # question type per labelled answer position (for logging)
    first_kind: torch.Tensor | None = None  # [n_labels]: 1 first answer token of a plain image branch, 2 with fact, 3 text-only, 0 other
    # (row, position of a naming word in a plain image question, [0 (the <s> sink)] + positions of the
    # visual tokens that word selects); see _word_attention_targets. word_targets depend on the word
    # alone (learnable in the first layer), context_targets on the words before it too
    word_targets: list[tuple[int, int, list[int]]] | None = None
    context_targets: list[tuple[int, int, list[int]]] | None = None
    # (row, position that predicts the answer, [position of the question's decisive naming word])
    hop_targets: list[tuple[int, int, list[int]]] | None = None


def kept_features(patch_features: torch.Tensor, visual_keep: list[list[int]]) -> torch.Tensor:
    """[1, sum of kept, Dv]: each image's kept patch rows, image after image -- the ``features`` of
    ``packed_logits`` for a batch packed with ``pack_batch(visual_keep=...)`` (its scatter fills them in order)."""
    return torch.cat([patch_features[b, k] for b, k in enumerate(visual_keep)])[None]


def random_visual_keep(first_item: int, n_items: int, keep_rate: float, n_visual: int) -> list[list[int]] | None:
    """Per item, a random ``keep_rate`` share of its ``n_visual`` patches (ascending), fixed by the item's index
    (``first_item`` + its place): the validation metrics' stand-in for a pre-LLM pruner. None at ``keep_rate`` >= 1."""
    if keep_rate >= 1:
        return None
    n_keep = max(1, round(keep_rate * n_visual))
    return [sorted(np.random.default_rng([first_item + j, 5]).permutation(n_visual)[:n_keep].tolist())
            for j in range(n_items)]


def first_answer_positions(pb: PackedBatch) -> torch.Tensor:
    """[rows]: where each packed row's first answer token (its first labelled position) sits in the flat
    logits / labels of ``packed_logits``."""
    counts = (pb.labels != -100).sum(1)
    return torch.cumsum(counts, 0) - counts


def first_answer_hits(logits: torch.Tensor, labels: torch.Tensor, pb: PackedBatch) -> torch.Tensor:
    """[rows] bool: is each packed row's first answer token (its first labelled position) predicted right?"""
    first = first_answer_positions(pb)
    return logits[first].argmax(-1) == labels[first]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pack_batch(tokenizer, branches_per_image: list[list[Branch]], n_visual: int = 64,
               attention_targets=None, visual_keep: list[list[int]] | None = None) -> PackedBatch:
    """Packed sequences: ``<s> USER:`` + visual slots, then each branch sees only the prefix and itself.
    ``attention_targets``: the world's ``(qtype, words, objects) -> (own, in_context, decisive)``
    (default: v1's ``_word_attention_targets``). ``visual_keep``: per image, the patches (ascending) whose
    tokens the sequence holds -- the others are left out, as a pre-LLM pruner leaves them out (the features
    passed to ``packed_logits`` are then those patches' rows only); attention targets follow the kept patches."""
    attention_targets = attention_targets or _word_attention_targets
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    before, _ = build_prompt("q").split(IMAGE_TOKEN)
    prefix = [tokenizer.bos_token_id] + _ids(tokenizer, before)  # <s> USER :
    rows = []
    for r, branches in enumerate(branches_per_image):
        kept = list(range(n_visual)) if visual_keep is None else list(visual_keep[r])
        slot_of = {patch: i for i, patch in enumerate(kept)}
        n_row = len(kept)
        ids = prefix + [image_id] * n_row
        seg = [0] * len(prefix) + [1] * n_row
        pos = list(range(len(ids)))
        lab = [-100] * len(ids)
        types: list[str] = []
        kinds: list[int] = []
        words: list[tuple[int, list[int]]] = []
        hops: list[tuple[int, list[int]]] = []
        contexts: list[tuple[int, list[int]]] = []
        for b, br in enumerate(branches):
            after = build_prompt(br.question, br.caption).split(IMAGE_TOKEN)[1]
            q_ids = _ids(tokenizer, after)
            a_ids = _ids(tokenizer, br.answer) + [tokenizer.eos_token_id]
            toks = q_ids + a_ids
            start = len(prefix) + (n_row if br.use_image else 0)
            if br.use_image and br.caption is None and br.objects:
                own, in_context, decisive = attention_targets(
                    br.qtype, tokenizer.convert_ids_to_tokens(q_ids), br.objects)
                base = len(ids)
                for out_list, targets in ((words, own), (contexts, in_context)):
                    for j, keys in targets:
                        out_list.append((base + j, [0] + [len(prefix) + slot_of[k] for k in keys if k in slot_of]))
                if decisive is not None:
                    hops.append((base + len(q_ids) - 1, [base + decisive]))
            for j, t in enumerate(toks):
                ids.append(t)
                seg.append(2 * b + 2 + (1 if br.use_image else 0))
                pos.append(start + j)
                # position j predicts toks[j + 1]: label the last question token and the answer tokens
                lab.append(toks[j + 1] if len(q_ids) - 1 <= j < len(toks) - 1 else -100)
                if len(q_ids) - 1 == j:
                    types.append(br.qtype)
                if len(q_ids) - 1 <= j < len(toks) - 1:
                    kinds.append(0 if j > len(q_ids) - 1 else 3 if not br.use_image else 2 if br.caption else 1)
        rows.append((ids, seg, pos, lab, types, kinds, words, hops, contexts))
    length = max(len(r[0]) for r in rows)
    bsz = len(rows)
    input_ids = torch.full((bsz, length), tokenizer.pad_token_id, dtype=torch.long)
    segs = torch.full((bsz, length), -1, dtype=torch.long)
    position_ids = torch.zeros((bsz, length), dtype=torch.long)
    labels = torch.full((bsz, length), -100, dtype=torch.long)
    for i, (ids, seg, pos, lab, *_) in enumerate(rows):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids)
        segs[i, :n] = torch.tensor(seg)
        position_ids[i, :n] = torch.tensor(pos)
        labels[i, :n] = torch.tensor(lab)
    q, k = segs[:, :, None], segs[:, None, :]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))[None]
    same = (q == k) & (q >= 0)
    to_prefix = k == 0
    to_image = (k == 1) & (q % 2 == 1) & (q >= 1)  # image branches have odd segment ids (and the image itself)
    allowed = causal & (same | ((to_prefix | to_image) & (q >= 0)))
    allowed |= torch.eye(length, dtype=torch.bool)[None]  # padding rows attend to themselves (no NaN)
    mask = torch.zeros((bsz, 1, length, length), dtype=torch.float32)
    mask.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
    kinds = torch.tensor([k for r in rows for k in r[5]], dtype=torch.long)
    word_targets = [(i, q, keys) for i, r in enumerate(rows) for q, keys in r[6]]
    hop_targets = [(i, q, keys) for i, r in enumerate(rows) for q, keys in r[7]]
    context_targets = [(i, q, keys) for i, r in enumerate(rows) for q, keys in r[8]]
    return PackedBatch(input_ids, input_ids == image_id, position_ids, mask, labels, [r[4] for r in rows], kinds,
                       word_targets, context_targets, hop_targets)


_PLURAL_TO_SHAPE = {shapes.plural(s): s for s in shapes.SHAPES}


def _word_attention_targets(
    qtype: str, words: list[str], objects
) -> tuple[list[tuple[int, list[int]]], list[tuple[int, list[int]]], int | None]:
    """Which visual tokens each naming word of a question selects, and which word decides the answer.

    Returns ``(own, in_context, decisive)``, lists of ``(word index, patch indices)``:

    * ``own``: what the word means by itself, the same in every question (so a first layer, which sees
      only the word, can learn it): a colour word selects the objects of that colour, a shape word
      (singular or plural) the objects of that shape.
    * ``in_context``: what needs the words before it: in an exist question the shape word selects the
      objects of the named colour *and* shape (none when the answer is no); in a spatial question the
      row number selects that row's objects and the column number the object in that cell.
    * ``decisive``: the word whose selection answers the question (the answer position should read it).

    An empty selection is a real target too: the word should then attend to the ``<s>`` sink only.
    (A first version gave the exist shape word its conjunction as an ``own`` target: a first layer
    cannot tell it from the same word in a colour question, and colour questions stayed at chance.)
    """
    own: list[tuple[int, list[int]]] = []
    in_context: list[tuple[int, list[int]]] = []
    decisive = None
    patch = shapes.patch_index
    color = row = None
    for j, w in enumerate(words):
        shape = _PLURAL_TO_SHAPE.get(w, w)
        if w in shapes.COLORS:
            own.append((j, [patch(o) for o in objects if o.color == w]))
            color = w
            if qtype == "shape":
                decisive = j
        elif shape in shapes.SHAPES:
            own.append((j, [patch(o) for o in objects if o.shape == shape]))
            if qtype == "exist":
                in_context.append((j, [patch(o) for o in objects if o.color == color and o.shape == shape]))
            if qtype in ("color", "count", "exist"):
                decisive = j
        elif qtype == "spatial" and j > 0 and words[j - 1] == "row" and w.isdigit():
            row = int(w) - 1
            in_context.append((j, [patch(o) for o in objects if o.row == row]))
        elif qtype == "spatial" and j > 0 and words[j - 1] == "column" and w.isdigit():
            col = int(w) - 1
            in_context.append((j, [patch(o) for o in objects if o.row == row and o.col == col]))
            decisive = j
    return own, in_context, decisive


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
