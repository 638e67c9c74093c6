"""The Shapes v2 LVLM's auxiliary training signals (``jobs/train_lvlm_v2.py``), plain PyTorch: per-target weights
of the attention supervision, the projector's grounding losses and the residual's gather loss.

Each answers a failure that a from-scratch run showed (``docs/notes/proving-ground-v2.md``): the LLM found rows
before cells (``cell_weights``, ``cell_grounding_loss``), looked its cell's object up without reading its shape
(``shape_grounding_loss``, ``gather_loss``), and never searched the image for a named colour and shape
(``search_weights``), then found the object without keeping its row (``row_gather_loss``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from actors import shapes_lvlm as L
from actors import shapes_lvlm_v2 as V
from pipeline import shapes_v2 as world


def cell_weights(pb: L.PackedBatch, cell_id: int, cell_weight: float) -> torch.Tensor | None:
    """Per context target, ``--cell-weight`` where the query is a cell word (the word after ``cell``; its target:
    the object in that cell), else 1; None when the weight is 1 (every target counts the same). Why: with
    shuffled tokens the LLM learned to find a row by content long before a cell (``jobs/diagnose_lvlm_lookup.py
    --shuffled``)."""
    if cell_weight == 1 or not pb.context_targets:
        return None
    is_cell = [int(pb.input_ids[row, query - 1]) == cell_id for row, query, _ in pb.context_targets]
    return torch.tensor([cell_weight if c else 1.0 for c in is_cell])


def search_weights(pb: L.PackedBatch, targets: list[tuple[int, int, list[int]]] | None, shape_word_ids: torch.Tensor,
                   search_weight: float) -> torch.Tensor | None:
    """Per attention target, ``--search-weight`` where the query is a shape word (in exist and spatial questions:
    its own target, every object of that shape, and its context target, the objects of the named colour *and*
    shape), else 1; None when the weight is 1 or there are no targets. Why: from scratch the shape word never
    learnt its search (``jobs/diagnose_shape_reading.py layers --qtypes spatial,exist``: at most 0.04 of its
    attention on the object, against 0.73 in the shipped LVLM, whose context layer reads the row there at 97%),
    though every visual token carries its shape and row linearly; its targets are a quarter of the supervision."""
    if search_weight == 1 or not targets:
        return None
    shapes = set(shape_word_ids.tolist())
    return torch.tensor([search_weight if int(pb.input_ids[row, query]) in shapes else 1.0
                         for row, query, _ in targets])


def patch_cells() -> torch.Tensor:
    """[144]: the index in ``world.CELL_WORDS`` of the cell each visual token's patch lies in (2x2 patches a cell)."""
    per_cell = world.GRID // world.CELLS
    rows, cols = np.divmod(np.arange(V.N_VISUAL), world.GRID)
    return torch.as_tensor((rows // per_cell) * world.CELLS + cols // per_cell)


def word_grounding_loss(model, patch_features: torch.Tensor, word_ids: torch.Tensor, labels: torch.Tensor,
                        scale: float = 10.0) -> torch.Tensor:
    """Every projected visual token is classified into one of ``word_ids`` by cosine similarity with the LLM's
    input embeddings of those words; ``labels`` [B or 1, 144] index ``word_ids`` (-100: no target)."""
    projected = model.model.multi_modal_projector(patch_features)  # [B, 144, D]
    table = model.model.language_model.get_input_embeddings().weight[word_ids]  # [words, D]
    logits = scale * F.normalize(projected, dim=-1) @ F.normalize(table, dim=-1).T
    labels = labels.to(logits.device).expand(logits.shape[:2])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def cell_grounding_loss(model, patch_features: torch.Tensor, cell_word_ids: torch.Tensor,
                        scale: float = 10.0) -> torch.Tensor:
    """``--cell-grounding``: every projected visual token is classified into its cell by cosine similarity with
    the LLM's input embeddings of the 36 cell words. Why: the session-6 lookup diagnostic found the cell word's
    heads on its grid row (0.69 of the mass) and hardly on its column (0.24); the tower carries row and column
    linearly (probes 100%), and the projector's hidden layer can make their conjunction, so a visual token whose
    embedding points like its cell word's gives the cell word a key to match by content, wherever it sits."""
    return word_grounding_loss(model, patch_features, cell_word_ids, patch_cells()[None], scale)


def patch_shapes(scenes: list[tuple]) -> torch.Tensor:
    """[B, 144]: the index in ``world.SHAPES`` of the object each visual token's patch holds, -100 where none."""
    out = torch.full((len(scenes), V.N_VISUAL), -100, dtype=torch.long)
    for i, objs in enumerate(scenes):
        for o in objs:
            out[i, list(world.patch_indices(o))] = world.SHAPES.index(o.shape)
    return out


def shape_grounding_loss(model, patch_features: torch.Tensor, shape_word_ids: torch.Tensor, labels: torch.Tensor,
                         scale: float = 10.0) -> torch.Tensor:
    """``--shape-grounding``: every projected visual token of an object is classified into the object's shape
    (``labels`` from ``patch_shapes``) by cosine similarity with the LLM's input embeddings of the six shape words.
    Why: from scratch on today's world the LLM looks cells up (colour by cell 100%) but answers shape questions
    with one constant word, though the tower holds shape linearly (``jobs/diagnose_shape_reading.py``); a token
    that points like its shape word gives the shape word's heads a key, and the answer a direction to read."""
    return word_grounding_loss(model, patch_features, shape_word_ids, labels, scale)


def gather_targets(pb: L.PackedBatch, scenes: list[tuple], cell_word_ids: torch.Tensor) -> tuple[list, torch.Tensor,
                                                                                                  torch.Tensor]:
    """The (row, position) of every plain image question's decisive word that is a cell word (colour and shape
    questions), and the colour and shape indices of the object in that cell (``--gather-sup``'s targets)."""
    cell_of = {int(w): i for i, w in enumerate(cell_word_ids)}
    places, colours, shapes = [], [], []
    for row, _, (key, *_) in pb.hop_targets or []:
        cell = cell_of.get(int(pb.input_ids[row, key]))
        if cell is None:
            continue
        r, c = divmod(cell, world.CELLS)
        obj = next((o for o in scenes[row] if (o.row, o.col) == (r, c)), None)
        if obj is not None:
            places.append((row, key))
            colours.append(world.COLOR_NAMES.index(obj.color))
            shapes.append(world.SHAPES.index(obj.shape))
    return places, torch.tensor(colours), torch.tensor(shapes)


def gather_loss(model, hidden: torch.Tensor, targets: tuple[list, torch.Tensor, torch.Tensor],
                colour_ids: torch.Tensor, shape_ids: torch.Tensor) -> torch.Tensor:
    """``--gather-sup``: the cell word's residual at the hop layer's input (``hidden``, [B, L, D], normed) must name
    its object's colour and its shape through the output head's rows of those words (frozen here: only what
    builds the residual learns). Why: from scratch the cell word gathers its object's colour by layer 2 and never
    its shape (``jobs/diagnose_shape_reading.py layers``: probes 95-100% colour, 10-20% shape at every layer; the
    shipped LVLM 93-94% shape from layer 1 on), so the hop that reads it has no shape to carry and the answer is
    one constant shape word. Alone it leaves shape at chance; with ``--shape-grounding`` (the heads then read
    shape, but the residual does not keep it) val image shape left chance for the first time from scratch
    (docs/notes/proving-ground-v2.md, session 15)."""
    places, colours, shapes = targets
    if not places:
        return hidden.new_zeros(())
    return (named_through_head(model, hidden, places, colour_ids, colours)
            + named_through_head(model, hidden, places, shape_ids, shapes)) / 2


def named_through_head(model, hidden: torch.Tensor, places: list[tuple[int, int]], word_ids: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the residual at each (row, position) of ``places`` read through the output head's rows of
    ``word_ids`` (detached: the head is read, not trained) against ``labels`` (indices into ``word_ids``)."""
    rows, keys = (torch.tensor(v) for v in zip(*places, strict=True))
    return F.cross_entropy(hidden[rows, keys] @ model.lm_head.weight.detach()[word_ids].T, labels)


def row_gather_targets(pb: L.PackedBatch, shape_word_ids: torch.Tensor,
                       row_word_ids: torch.Tensor) -> tuple[list, torch.Tensor]:
    """The (row, position) of every plain spatial question's shape word (its decisive word; an exist question's
    shape word answers yes / no and is skipped) and the index of its answer in ``row_word_ids``
    (``--row-gather``'s targets)."""
    shapes = set(shape_word_ids.tolist())
    row_of = {int(w): i for i, w in enumerate(row_word_ids)}
    places, rows = [], []
    for row, answer, (key, *_) in pb.hop_targets or []:
        label = int(pb.labels[row, answer])
        if int(pb.input_ids[row, key]) in shapes and label in row_of:
            places.append((row, key))
            rows.append(row_of[label])
    return places, torch.tensor(rows, dtype=torch.long)


def row_gather_loss(model, hidden: torch.Tensor, targets: tuple[list, torch.Tensor],
                    row_word_ids: torch.Tensor) -> torch.Tensor:
    """``--row-gather``: a spatial question's shape word's residual at the hop layer's input (``hidden``, normed)
    must name its object's row through the output head's rows of the row digits (the head frozen here). Why:
    with ``--search-weight 4`` a layer-3 head finds the object and reads its row at 60%, but the shape word's
    residual keeps 17-22% and spatial stays at chance (``jobs/diagnose_shape_reading.py layers --qtypes
    spatial``): the pattern ``gather_loss`` fixed for shape at the cell word."""
    places, rows = targets
    if not places:
        return hidden.new_zeros(())
    return named_through_head(model, hidden, places, row_word_ids, rows)

