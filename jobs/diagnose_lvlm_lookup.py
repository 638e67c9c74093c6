"""Diagnostic for a Shapes v2 LVLM: does it find the object a question names by what its tokens show, or by
where they sit in the sequence?

Colour and shape questions name their object by one cell word ("... the object in cell c4?"). The LVLM's
supervised heads of ``--layer`` (``jobs/train_lvlm_v2.py --context-layer``) should attend, from the cell word,
to the object in that cell. This measures the attention mass of those heads on the named cell's visual tokens
and on its grid row and grid column (a query that found only the row or only the column spreads along it),
and the answer accuracy, with all 144 tokens and with a random share of them kept in order (``--keep``), as a
pre-LLM pruner leaves them, or shuffled (``--shuffled``). A model that finds objects by sequence offset keeps
its mass with all tokens in order and loses it with any drop or shuffle.

    .venv/bin/python jobs/diagnose_lvlm_lookup.py --model models/shapes_v2/lvlm --n 80 --json runs/diag/lookup.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from actors import shapes_clip as C  # noqa: E402
from actors import shapes_lvlm as L  # noqa: E402
from actors import shapes_lvlm_v2 as V  # noqa: E402
from actors.attention_rows import AttentionCapture  # noqa: E402
from pipeline import shapes_v2 as world  # noqa: E402


def cell_items(seed: int, n: int) -> list:
    """The first ``n`` val items whose question names its object by cell (colour and shape questions)."""
    out, i = [], 0
    while len(out) < n:
        it = world.make_item(seed, "val", i)
        if it.question_type in ("color", "shape"):
            out.append(it)
        i += 1
    return out


def grid_line_mass(rows: torch.Tensor, image_mask: torch.Tensor, kept: list[int] | None, obj) -> tuple[float, float]:
    """Mean head mass of ``rows`` [heads, L] on the kept visual tokens of ``obj``'s grid row and grid column
    (every patch of the 2 patch rows / columns its cell spans). A cell word whose query reads only the row
    attends along the row; one that reads only the column attends along the column."""
    slots = torch.nonzero(image_mask).flatten().tolist()
    patches = kept if kept is not None else list(range(len(slots)))
    per = world.CELL // world.PATCH
    in_row = [s for s, p in zip(slots, patches, strict=True) if p // world.GRID // per == obj.row]
    in_col = [s for s, p in zip(slots, patches, strict=True) if p % world.GRID // per == obj.col]
    return rows[:, in_row].sum(-1).mean().item(), rows[:, in_col].sum(-1).mean().item()


@torch.no_grad()
def lookup(model, tok, items: list, *, keep_rate: float, layer: int, heads: int, shuffled: bool = False,
           chunk: int = 20) -> dict:
    """Mean attention mass of the first ``heads`` heads of ``layer``, from each question's cell word, on the
    named cell's kept visual tokens and on its grid row / column, and first-answer-token accuracy, at
    ``keep_rate``. ``shuffled``: the kept tokens enter in a random order, so no lookup by position can work (a
    content lookup is unaffected)."""
    mass: dict[str, list[float]] = {"cell": [], "cell_word_on_row": [], "cell_word_on_column": []}
    correct = 0
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        branches = [[L.Branch(it.question, it.answer, it.question_type, None, True, tuple(it.objects), tuple(it.target))]
                    for it in part]
        keep = L.random_visual_keep(start, len(part), keep_rate, V.N_VISUAL)  # train_lvlm_v2's keep50 draw
        if shuffled:
            keep = [np.random.default_rng([start + j, 6]).permutation(k).tolist()
                    for j, k in enumerate(keep or [list(range(V.N_VISUAL))] * len(part))]
        pb = V.pack_batch(tok, branches, visual_keep=keep)
        px = C.pixel_values([V.render(it) for it in part])
        hidden, _ = L.vision_features(model, px)
        feats = L.kept_features(hidden[:, 1:], keep) if keep else None
        with AttentionCapture(model.model.language_model, {layer}) as cap:
            logits, labels = L.packed_logits(model, px, pb, features=feats)
        rows = cap.rows(layer, pb.context_targets, heads)  # [T, heads, L]
        correct += int(L.first_answer_hits(logits, labels, pb).sum())
        for t, (row, _, keys) in enumerate(pb.context_targets):  # one per question: its cell word
            patches = [k for k in keys if k != 0]  # key 0 is the <s> sink every target allows
            if patches:
                mass["cell"].append(rows[t][:, patches].sum(-1).mean().item())
            on_row, on_col = grid_line_mass(rows[t], pb.image_mask[row], keep[row] if keep else None,
                                            part[row].objects[part[row].target[0]])
            mass["cell_word_on_row"].append(on_row)
            mass["cell_word_on_column"].append(on_col)
    return {"keep": keep_rate, "shuffled": shuffled, "accuracy": round(correct / len(items), 4),
            **{f"{k}_mass": round(float(np.mean(v)), 4) if v else None for k, v in mass.items()}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, action="append", help="a Shapes v2 LVLM folder (repeatable)")
    p.add_argument("--n", type=int, default=80, help="colour and shape val items")
    p.add_argument("--seed", type=int, default=1234, help="val seed (train_lvlm_v2's --val-seed)")
    p.add_argument("--keep", default="1.0,0.5", help="shares of the visual tokens kept, comma-separated")
    p.add_argument("--shuffled", action="store_true", help="also measure with the kept tokens in a random order")
    p.add_argument("--layer", type=int, default=3, help="the supervised context layer")
    p.add_argument("--heads", type=int, default=4, help="supervised heads (the first ones)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the rows here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    from transformers import LlavaForConditionalGeneration

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = V.build_tokenizer()
    items = cell_items(args.seed, args.n)
    out = []
    for path in args.model:
        model = LlavaForConditionalGeneration.from_pretrained(path).eval()
        model.config.text_config._attn_implementation = "sdpa"  # AttentionCapture recomputes the rows
        for shuffled in (False, True) if args.shuffled else (False,):
            for rate in (float(x) for x in args.keep.split(",")):
                row = {"model": path, **lookup(model, tok, items, keep_rate=rate, layer=args.layer, heads=args.heads,
                                               shuffled=shuffled)}
                print(json.dumps(row), flush=True)
                out.append(row)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
