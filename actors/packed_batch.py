"""Packed multi-question training batches of the proving-ground LVLMs (v1 and v2 worlds).

One image prefix followed by several question branches: a 4-D attention mask lets every branch see
``<s> USER:`` (+ the visual tokens for image branches) and itself only, and position ids restart after the
prefix, so each branch is token- and position-identical to the single-turn inference prompt of
``actors.prompt.build_prompt`` while the image prefix is computed once. Branches with the answer's fact as
``additional information`` and text-only branches (no visual tokens, fact given) teach the decoder to read
supplemental text. Split from ``actors.shapes_lvlm`` (which re-exports these names) to keep the model and
its batches apart; the forward over a packed batch (``packed_logits``) stays with the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from actors.prompt import IMAGE_TOKEN, build_prompt
from pipeline import shapes


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
