"""Training and evaluation batches for ACCM's caption model on a Shapes world (``pipeline.worlds``).

A batch is what one step needs: the frozen LVLM's tower run once, the base pruner (PruMerge+) applied, the
discarded patches in the feature kind the caption model reads, the scene fact each question rests on, and
where the objects that fact is about sit among the discarded patches (for the attention supervision and the
slot read-out of pre-training). v1 objects hold one patch; v2 objects hold 2x2 (``world.patch_indices``).
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from actors.kept_context import append_kept, flag_all_discarded, kept_order
from pipeline import shapes

# What the caption model is taught to say when the mapper does not see what the fact is about
# (``--pretrain-targets abstain``): it stops at once, and nothing is spliced (actors.prompt.has_words).
ABSTAIN_CAPTION = "."
FEATURE_KINDS = ("feature_layer", "projected")


def slot_attributes(world: ModuleType = shapes) -> tuple[int, int, int, int]:
    """Classes per slot attribute: colour, shape, row, column (positions range over the world's cells)."""
    return len(world.COLOR_NAMES), len(world.SHAPES), world.CELLS, world.CELLS


def fact_objects(item) -> tuple[int, ...]:
    """The objects an item's fact is about: every object a count question counts, else the one it names."""
    return item.target if item.question_type == "count" else item.target[:1]


def object_slots(item, objects, discarded_indices: list[int], world: ModuleType = shapes) -> list[int]:
    """Slots (positions in the discarded-patch list) of every patch of ``objects`` (indices into the item's
    scene); patches the base pruner kept are not there."""
    slot_of = {patch: slot for slot, patch in enumerate(discarded_indices)}
    patches = (p for o in objects for p in world.patch_indices(item.objects[o]))
    return [slot_of[p] for p in patches if p in slot_of]


def target_slots(item, discarded_indices: list[int], world: ModuleType = shapes) -> list[int]:
    """``object_slots`` of the objects an item's fact is about."""
    return object_slots(item, fact_objects(item), discarded_indices, world)


def objects_seen(item, discarded_indices: list[int], world: ModuleType = shapes) -> int:
    """How many of the fact's objects have at least one patch among the discarded ones (the mapper sees it)."""
    dropped = set(discarded_indices)
    return sum(any(p in dropped for p in world.patch_indices(item.objects[o])) for o in fact_objects(item))


COUNT_FACTS = ("total", "list")  # train_accm.py --count-facts


def weighted_indices(first: int, n: int, weights: dict[str, float], seed: int,
                     world: ModuleType = shapes) -> list[int]:
    """``n`` item indices whose question types follow ``weights`` (type -> weight, unnamed types 1): item ``i``
    of a world asks ``QUESTION_TYPES[i % T]``, so base ``b`` and a drawn type ``t`` give index ``T * b + t``,
    distinct for distinct bases (``train_accm.py --pretrain-question-weights``)."""
    types = world.QUESTION_TYPES
    unknown = set(weights) - set(types)
    if unknown:
        raise ValueError(f"unknown question types {sorted(unknown)}; the world asks {types}")
    p = np.array([float(weights.get(t, 1.0)) for t in types])
    rng = np.random.default_rng([seed, first])
    drawn = rng.choice(len(types), size=n, p=p / p.sum())
    return [len(types) * (first + j) + int(t) for j, t in enumerate(drawn)]


def wholly_discarded(item, discarded_indices: list[int], world: ModuleType = shapes) -> tuple[int, ...]:
    """The counted objects every patch of which the base pruner discarded: the ones the LVLM cannot see."""
    dropped = set(discarded_indices)
    return tuple(o for o in item.target if all(p in dropped for p in world.patch_indices(item.objects[o])))


def listed_count_fact(item, discarded_indices: list[int], world: ModuleType = shapes) -> tuple[str, tuple[int, ...]]:
    """``--count-facts list``: a count question's caption names the counted objects the LVLM cannot see, one
    caption each (``world.caption``, scene order), and the LVLM adds those it sees (``jobs/train_lvlm_v2.py
    --count-list``); nothing to add -> the abstention. Returns (fact, the listed objects)."""
    listed = wholly_discarded(item, discarded_indices, world)
    return " ".join(world.caption(item.objects[o]) for o in listed) or ABSTAIN_CAPTION, listed


def slot_labels(items, discarded_indices: Tensor, world: ModuleType = shapes) -> Tensor:
    """[B, M, 4] (colour, shape, row, column) classes of the object on each discarded patch; -100 where no
    object is. What a fact can ask about a patch: its attributes, and where it is (spatial questions)."""
    labels = torch.full((*discarded_indices.shape, len(slot_attributes(world))), -100, dtype=torch.long)
    for r, (item, patches) in enumerate(zip(items, discarded_indices.tolist(), strict=True)):
        slot_of = {patch: slot for slot, patch in enumerate(patches)}
        for o in item.objects:
            value = torch.tensor([world.COLOR_NAMES.index(o.color), world.SHAPES.index(o.shape), o.row, o.col])
            for patch in world.patch_indices(o):
                if patch in slot_of:
                    labels[r, slot_of[patch]] = value
    return labels


def make_batch(engine, seed: int, split: str, indices: list[int], keep: int,
               n_objects: tuple[int, int] | None = None, *, world: ModuleType = shapes,
               features: str = "feature_layer", count_facts: str = "total", kept_context: bool = False) -> dict:
    """Items of ``world`` -> frozen tower -> base pruner: everything a training/eval step needs.

    ``n_objects``: scene sizes other than the benchmark's (pre-training's curriculum). ``features``: what the
    caption model reads ("feature_layer", or "projected" = the CLIP's projected patch embeddings, the ACCM
    reference input; needs an engine built with ``clip_text_url``). ``count_facts``: what a count question's
    fact says, the total ("total") or the objects the LVLM cannot see ("list", ``listed_count_fact``).
    ``kept_context``: the caption model reads the kept patches too (``actors.kept_context``); its slots are the
    discarded patches then the kept ones, and a count fact is always sayable."""
    if features not in FEATURE_KINDS:
        raise ValueError(f"features must be one of {FEATURE_KINDS}, not {features!r}")
    if count_facts not in COUNT_FACTS:
        raise ValueError(f"count_facts must be one of {COUNT_FACTS}, not {count_facts!r}")
    sizes = n_objects or (world.MIN_OBJECTS, world.MAX_OBJECTS)
    items = [world.make_item(seed, split, i, n_objects=sizes) for i in indices]
    questions = [it.question for it in items]
    ids = [it.id for it in items]
    with torch.no_grad():
        vision = engine.encode_images(engine.preprocess([world.render_item(it) for it in items]),
                                      projected=True if features == "projected" else None)
        if vision.patch_features.shape[1] != world.GRID ** 2:
            raise ValueError(f"the LVLM's tower gives {vision.patch_features.shape[1]} patches, the world "
                             f"{world.__name__} draws {world.GRID ** 2}: pass the LVLM of that world")
        pruned = engine.prune(vision, "prumerge_plus", keep, ids, questions)
    projected = features == "projected"
    if projected and pruned.discarded_projected is None:
        raise ValueError("projected features: the engine computed none (build it with clip_text_url)")
    dropped = pruned.discarded_indices.tolist()
    full = vision.projected if projected else vision.patch_features
    discarded = pruned.discarded_projected if projected else pruned.discarded
    slot_patches = dropped  # the patch behind each mapper slot
    if kept_context:
        slot_patches = [kept_order(d, full.shape[1]) for d in dropped]
        discarded = append_kept(discarded, full, dropped)
        full = flag_all_discarded(full)
    slots = [target_slots(it, p, world) for it, p in zip(items, slot_patches, strict=True)]
    seen = [objects_seen(it, d, world) for it, d in zip(items, dropped, strict=True)]
    facts = [world.fact(it.objects, it.question_type, it.question, it.target) for it in items]
    # does the mapper see every object the fact is about? (with the kept context a count always is)
    visible = [s == len(fact_objects(it)) or (kept_context and it.question_type == "count")
               for it, s in zip(items, seen, strict=True)]
    if count_facts == "list":  # the caption names what the LVLM cannot see: always sayable, slots of those only
        for i, (it, d) in enumerate(zip(items, dropped, strict=True)):
            if it.question_type == "count":
                facts[i], listed = listed_count_fact(it, d, world)
                slots[i] = object_slots(it, listed, d, world)
                visible[i] = True
    return {
        "ids": ids,
        "items": items,
        "questions": questions,
        "answers": [it.answer for it in items],
        "qtypes": [it.question_type for it in items],
        "facts": facts,
        "discarded": discarded,  # the mapper's input
        # every patch in the caption model's feature kind (pre-training's reading warm-up)
        "mapper_full": full,
        # can the caption model see the object the question names (a patch of it is discarded)? count/exist
        # facts: always stated
        "target_discarded": [it.question_type in ("count", "exist") or s > 0 for it, s in zip(items, seen, strict=True)],
        "target_slots": slots,
        "discarded_indices": dropped,  # per item, the patches the base pruner discarded (slot order)
        # does the mapper see every object the fact is about? (exist-no facts are about none: always)
        "fact_visible": visible,
        "slot_labels": slot_labels(items, torch.tensor(slot_patches), world),
        "retained": list(pruned.retained.unbind(0)),
        "full": list(vision.patch_features.unbind(0)),
        "vision": vision,  # the tower's output, for other pruners on the same images
    }


ACCM_REFERENCES = ("all_tokens", "answer")  # train_accm.py --accm-reference


def candidate_kl(engine, batch: dict, candidates: list[list[str]], reference: str = "all_tokens") -> Tensor:
    """[B, N]: KL(reference || with caption_i), averaged over the answer positions.

    ``all_tokens`` (the paper, SPEC §1.5; ACCM's public code ships no training code): the reference is the
    LVLM's own distribution with every visual token and no caption. ``answer`` (this project's option): the
    reference is the ground-truth answer as a one-hot distribution, so KL = -log p(answer | caption_i). It is
    for an LVLM that misreads its full image often: then a true caption moves the answer away from the
    all-token distribution and the paper's best candidate is the one that says least."""
    from actors.accm import answer_log_probs, answer_token_ids

    if reference not in ACCM_REFERENCES:
        raise ValueError(f"reference must be one of {ACCM_REFERENCES}, got {reference!r}")
    b, n = len(candidates), len(candidates[0])
    rep = [i for i in range(b) for _ in range(n)]
    with torch.no_grad():
        flat = [c for cands in candidates for c in cands]
        cand = answer_log_probs(engine, [batch["retained"][i] for i in rep], [batch["questions"][i] for i in rep],
                                flat, [batch["answers"][i] for i in rep])
        if reference == "answer":
            ids = [answer_token_ids(engine, a) for a in batch["answers"]]
            kl = torch.stack([-c.gather(-1, torch.tensor(ids[i], device=c.device)[:, None]).mean()
                              for i, c in zip(rep, cand, strict=True)])
            return kl.view(b, n)
        ref = answer_log_probs(engine, batch["full"], batch["questions"], [None] * b, batch["answers"])
    kl = torch.stack([(ref[i].exp() * (ref[i] - c)).sum(-1).mean() for i, c in zip(rep, cand, strict=True)])
    return kl.view(b, n)
