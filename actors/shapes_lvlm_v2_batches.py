"""The Shapes v2 LVLM's training batches (``jobs/train_lvlm_v2.py``): each step's scenes, questions and packed
branches, and the augmentations drawn with their own generators (token drops, token order, listed counts), so that
a run without an augmentation draws the batches it always drew and a resumed run (or a benchmark) the batches the
first run drew. ``args`` is ``train_lvlm_v2.parse_args``'s namespace.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch

from actors import shapes_clip as C
from actors import shapes_lvlm as L
from actors import shapes_lvlm_v2 as V
from pipeline import shapes_v2 as world


def scene_range(stage: int, progress: float, ramp: float) -> tuple[int, int]:
    """Stage 1: every scene size; stage 2: narrowing from 1-28 to the benchmark's 20-28 by ``ramp``."""
    if stage == 1:
        return 1, world.MAX_OBJECTS
    t = 1.0 if ramp <= 0 else min(1.0, progress / ramp)
    return int(round(1 + t * (world.MIN_OBJECTS - 1))), world.MAX_OBJECTS


def vqa_batch(tok, rng: np.random.Generator, args, n_range: tuple[int, int], stage: int,
              drop_rng: np.random.Generator | None = None, order_rng: np.random.Generator | None = None,
              list_rng: np.random.Generator | None = None):
    """One step's images, packed branches, the visual tokens each image keeps in the order they enter
    (``visual_keep``, ``shuffled_order``, ``count_list_facts``; their own generators ``drop_rng``, ``order_rng``
    and ``list_rng``, so that runs without the augmentations draw the batches they always drew) and the objects
    each image shows (for ``patch_shapes``)."""
    n_image, n_fact, n_text = (args.n_image, args.n_fact, args.n_text) if stage == 2 else (args.stage1_n_image, 0, 0)
    images, branches, scenes = [], [], []
    for _ in range(args.batch):
        objs = world.sample_scene(rng, "train", n_range)
        background = world.sample_background(rng)
        if n_fact and rng.random() < args.hide_fact_objects:
            # the fact questions are about objects the image does not show: the fact is the only source
            facts = V.draw_branches(objs, rng, n_image=0, n_fact=n_fact, n_text=n_text)
            listed: set[int] = set()
            if list_rng is not None and args.count_list > 0:
                facts, listed = count_list_facts(objs, facts, list_rng, args.count_list)
            hidden = {i for br in facts if br.use_image for i in br.target}
            shown = tuple(o for i, o in enumerate(objs) if i not in hidden)
            facts = [recount(br, objs, hidden) if j in listed else br for j, br in enumerate(facts)]
            # the subset is a scene of its own: it must hash into the train split too (a small one could be a
            # val or test scene), else the full scene is used
            if shown and world.scene_hash(shown) % 10 in world._SPLIT_BUCKETS["train"]:
                images.append(V.render(shown, background))
                scenes.append(shown)
                branches.append(V.draw_branches(shown, rng, n_image=n_image, n_fact=0, n_text=0,
                                                image_weights=args.image_weights) + facts)
                continue
        images.append(V.render(objs, background))
        scenes.append(objs)
        branches.append(V.draw_branches(objs, rng, n_image=n_image, n_fact=n_fact, n_text=n_text,
                                        image_weights=args.image_weights))
    keep = visual_keep(branches, drop_rng, args) if drop_rng is not None else None
    keep = shuffled_order(keep, len(images), order_rng, args) if order_rng is not None else keep
    return C.pixel_values(images), V.pack_batch(tok, branches, visual_keep=keep), keep, scenes


def count_list_facts(objs, facts: list[L.Branch], rng: np.random.Generator,
                     share: float) -> tuple[list[L.Branch], set[int]]:
    """``--count-list``: a share of the image + fact count branches hide only some (1..all) of the counted objects
    and state those, one caption each (``world.caption``, in scene order), instead of the total; the answer is
    then what the image shows plus what the text lists (``recount``). Why: that is the count caption ACCM can
    give (the caption model lists the objects wholly among the discarded patches, the LVLM counts the ones its
    kept tokens show). Measured before it (``jobs/diagnose_count.py lvlm-text``): the LVLM reads a total-count
    fact 100% and such a list 7-16%. Returns the branches and the positions of the listed ones."""
    out, positions = [], set()
    for j, br in enumerate(facts):
        if br.use_image and br.qtype == "count" and br.target and rng.random() < share:
            k = int(rng.integers(1, len(br.target) + 1))
            listed = tuple(sorted(int(i) for i in rng.choice(br.target, size=k, replace=False)))
            br = replace(br, caption=" ".join(world.caption(objs[i]) for i in listed), target=listed)
            positions.add(j)
        out.append(br)
    return out, positions


def recount(br: L.Branch, objs, hidden: set[int]) -> L.Branch:
    """A listed-count branch's answer once the image's hidden objects are known: the counted objects the image
    still shows plus those the list names (other branches may hide more of them; those are gone)."""
    colour = objs[br.target[0]].color  # the listed objects are of the counted colour
    shown = sum(1 for i, o in enumerate(objs) if o.color == colour and i not in hidden)
    return replace(br, answer=str(shown + len(br.target)))


def visual_keep(branches: list[list[L.Branch]], rng: np.random.Generator, args) -> list[list[int]] | None:
    """Token-drop augmentation (``--drop-visual``): a share of the images keep a random subset of their 144
    visual tokens (drop rate uniform in [0, ``--drop-max``]), in their original order, as a pre-LLM pruner
    leaves them. One patch of every object a plain image question is about is always kept, so every label
    stays true. Why: without it the LLM finds objects by where their tokens sit in the sequence, and drops of
    any size break it (one dropped token of 144 changed 3 of 10 answers); with it, by what the tokens show.
    ``None``: every image keeps every token (no random numbers drawn)."""
    if args.drop_visual <= 0:
        return None
    out = []
    for image_branches in branches:
        if rng.random() >= args.drop_visual:
            out.append(list(range(V.N_VISUAL)))
            continue
        rate = rng.uniform(0.0, args.drop_max)
        n_keep = max(1, round((1 - rate) * V.N_VISUAL))
        needed = {int(rng.choice(world.patch_indices(br.objects[o]))) for br in image_branches
                  if br.use_image and br.caption is None for o in br.target}
        others = [p for p in rng.permutation(V.N_VISUAL).tolist() if p not in needed]
        out.append(sorted(needed | set(others[: max(0, n_keep - len(needed))])))
    return out


def shuffled_order(keep: list[list[int]] | None, n_images: int, rng: np.random.Generator, args) -> list[list[int]] | None:
    """Token-order augmentation (``--shuffle-visual``): a share of the images present their kept visual tokens
    in a random order. Why: token drops alone leave the order, and a model trained with them still finds a row
    by its approximate place in the sequence (``jobs/diagnose_lvlm_lookup.py --shuffled``: row mass 0.87 with
    half the tokens kept in order, 0.34 shuffled); with the order drawn at random only what a token shows can
    name its cell. Inference keeps the pipeline's order: a lookup by content does not care which it is."""
    if args.shuffle_visual <= 0:
        return keep
    keep = keep or [list(range(V.N_VISUAL))] * n_images
    return [rng.permutation(k).tolist() if rng.random() < args.shuffle_visual else list(k) for k in keep]


class StepBatch(NamedTuple):
    """One training step's batch (``vqa_batch``'s four parts) and the scene sizes it was drawn from."""

    px: torch.Tensor
    pb: L.PackedBatch
    keep: list[list[int]] | None
    scenes: list
    n_range: tuple[int, int]


def step_batch(tok, args, stage: int, step: int, steps: int) -> StepBatch:
    """Step ``step``'s batch: a function of --seed, the stage and the step alone, so a resumed run (or a
    benchmark) draws the batches the first run drew."""
    n_range = scene_range(stage, step / steps, args.ramp)
    augment = stage >= args.augment_from_stage
    rng = lambda *tail: np.random.default_rng([args.seed, stage, step, *tail])  # noqa: E731
    return StepBatch(*vqa_batch(tok, rng(), args, n_range, stage, rng(1) if augment else None,
                                rng(2) if augment else None, rng(3)), n_range)
