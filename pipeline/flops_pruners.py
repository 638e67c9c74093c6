"""The pruners' own selection work per item, in ``pipeline.flops``'s convention (2 FLOPs per multiply-add,
other arithmetic 1): what CDPruner's DPP, DivPrune's max-min diversity and DART's pivot duplication cost beyond
the layers the LLM runs. ``pipeline.flops.pruner_flops`` adds them to an item's total; the pruners' modules
(``actors/cdpruner.py``, ``actors/divprune.py``, ``actors/dart.py``) take them from here."""

from __future__ import annotations


def cdpruner_selection_flops(n: int, d: int, keep: int, *, conditional: bool = True, text_dim: int = 0,
                             text_segments: int = 1, breakdown: bool = False) -> float | dict[str, float]:
    """CDPruner's own work on one item (actors/cdpruner.py), multiply-add = 2 FLOPs, other arithmetic 1.

    - ``similarity``: ``S = X X^T`` of the N projected tokens, 2 N^2 D (a matmul);
    - ``kernel``: ``r_i S_ij r_j``, 2 N^2 (0 when ``conditional=False``, i.e. no relevance);
    - ``greedy_matmul``: step i's ``sum_{t<i} c_t[j] c_t[:]``, 2 i N, summed over i < keep: N keep (keep - 1);
    - ``greedy_elementwise``: per step ``L[j] - proj``, ``* inv``, ``e^2``, ``d2 -=``: 4 N;
    - ``relevance``: ``2 N D' M`` for the cosine against M text segments (``text_dim`` D', 0 = not counted).
    ``keep >= n`` (nothing pruned, no work) gives 0."""
    keep = max(0, min(int(keep), n))
    parts = dict.fromkeys(("similarity", "kernel", "greedy_matmul", "greedy_elementwise", "relevance"), 0.0)
    if 0 < keep < n:
        parts["similarity"] = 2.0 * n * n * d
        parts["kernel"] = 2.0 * n * n if conditional else 0.0
        parts["greedy_matmul"] = float(n) * keep * (keep - 1)
        parts["greedy_elementwise"] = 4.0 * n * keep
        parts["relevance"] = 2.0 * n * text_dim * text_segments
    return parts if breakdown else sum(parts.values())


def divprune_selection_flops(n: int, d: int, keep: int, *, breakdown: bool = False) -> float | dict[str, float]:
    """DivPrune's own work on one item (actors/divprune.py): ``similarity`` 2 N^2 D (matmul), ``distance``
    1 - S (N^2), ``first_pick`` nearest-neighbour distances (~N^2 comparisons), ``greedy`` a min update and an
    argmax per later step (2 N (keep - 1)). ``keep >= n`` gives 0."""
    keep = max(0, min(int(keep), n))
    parts = dict.fromkeys(("similarity", "distance", "first_pick", "greedy"), 0.0)
    if 0 < keep < n:
        parts["similarity"] = 2.0 * n * n * d
        parts["distance"] = float(n) * n
        parts["first_pick"] = float(n) * n
        parts["greedy"] = 2.0 * n * (keep - 1)
    return parts if breakdown else sum(parts.values())


def dart_selection_flops(n_image: int, hidden: int, pivots: int, *, kv_dim: int | None = None, n_text: int = 0) -> float:
    """DART's own work beyond the LLM layers (pipeline.flops convention: 2 per MAC, elementwise ops ~1).

    Key L1 norms of the image tokens and the ``n_text`` tokens after the image (``kv_dim`` = heads x head_dim
    of the key cache, default ``hidden``); the final RMSNorm of the ``n_image + pivots`` compared states
    (~2 per element); candidate norms (2 N d) and the pivot-candidate dot products (2 P N d). The top-k
    selections are ignored, as for FastV.
    """
    kv = hidden if kv_dim is None else kv_dim
    norms = float((n_image + n_text) * kv)
    rms = 2.0 * (n_image + pivots) * hidden
    cos = 2.0 * n_image * hidden + 2.0 * pivots * n_image * hidden
    return norms + rms + cos
