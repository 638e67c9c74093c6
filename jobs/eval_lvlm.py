"""The model card's table: Shapes-VQA test accuracy per question type, full tokens vs pruned, with FLOPs.

Runs through the pruned-LLaVA engine (``actors.engine.LlavaEngine``): full tokens, then
50 / 75 / 87.5 / 93.75% pruning for each of ``--methods``, plus an "oracle caption" row (the item's fact
spliced as ``additional information``, 87.5% pruning) that shows how much a caption can give back. Scores are
VQAv2 accuracy (``pipeline.scoring.vqa_accuracy``); ``se`` is one standard error of the ``all`` column.
``--world v2`` evaluates on Shapes v2 (``pipeline/shapes_v2.py``); ``--clip`` gives the text-guided pruners
(PruMerge+'s text picks, CDPruner) their CLIP text tower.

    .venv/bin/python jobs/eval_lvlm.py --model models/shapes/lvlm --seed 4242 --per-type 100 \
        --json runs/eval_lvlm.json --markdown runs/eval_lvlm.md
    .venv/bin/python jobs/eval_lvlm.py --world v2 --model models/shapes_v2/lvlm --clip models/shapes_v2/clip \
        --methods random,visionzip,prumerge_plus,divprune,cdpruner,fastv --seed 4242 --json runs/eval_v2.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline import shapes  # noqa: E402
from pipeline.worlds import WORLDS  # noqa: E402

RATES = (0.5, 0.75, 0.875, 0.9375)
METHODS = ("random", "visionzip", "prumerge_plus", "fastv")
world = shapes  # the benchmark being evaluated (main() switches it with --world)


def render(item):
    """The item's image in its world (v2 scenes carry a background texture)."""
    return world.render_item(item)


def eval_items(seed: int, per_type: int, split: str = "test") -> list:
    """``per_type`` items of each question type from ``split`` (the table's test items; val to choose among
    checkpoints)."""
    items = []
    for qtype in world.QUESTION_TYPES:
        items += [world.make_item(seed, split, i, qtype) for i in range(per_type)]
    return items


def score(pred: str, answer: str) -> float:
    try:
        from pipeline.scoring import vqa_accuracy

        return float(vqa_accuracy(pred, [answer] * world.NUM_ANSWERS))
    except ImportError:  # scoring not available: exact match
        return float(pred.strip().lower() == answer)


def items_with_objects(seed: int, per_type: int, n_range: tuple[int, int], split: str = "test") -> list:
    """``split`` items whose scenes hold ``n_range`` objects (the benchmark's own: v1 10-16, v2 20-28)."""
    return [world.make_item(seed, split, i, qtype, n_objects=n_range)
            for qtype in world.QUESTION_TYPES for i in range(per_type)]


def by_objects(model_dir: str, seed: int, per_type: int, ranges: list[tuple[int, int]], batch: int = 50,
               split: str = "test") -> list[dict]:
    """Full-token accuracy per question type against the number of objects in the scene.

    The diagnostic that located the proving-ground LVLM's failure: a model that reads the one object of a
    one-object scene but answers at chance with two has not learned to *select* the object a question
    names (content matching), which no amount of crowding curriculum fixes by itself.
    """
    from actors.engine import LlavaEngine

    engine = LlavaEngine.from_pretrained(model_dir)
    rows = []
    for lo, hi in ranges:
        row = run_setting(engine, items_with_objects(seed, per_type, (lo, hi), split), method="none", rate=None,
                          captions=False, batch=batch)
        row.pop("_scores")
        rows.append({"objects": f"{lo}" if lo == hi else f"{lo}-{hi}", **row})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def by_objects_markdown(rows: list[dict]) -> str:
    cols = list(world.QUESTION_TYPES) + ["all"]
    lines = ["| objects | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    lines += [f"| {r['objects']} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def object_patches(obj) -> tuple[int, ...]:
    return world.patch_indices(obj)


def needed_objects(item) -> tuple[tuple[int, ...], bool]:
    """The objects a question's answer rests on, and whether *all* of them must be seen (count, colour,
    shape, spatial) or *any* (an exist-yes question: one object of the named pair shows it)."""
    if item.question_type == "exist" and item.target:
        t = item.objects[item.target[0]]
        return tuple(i for i, o in enumerate(item.objects) if (o.color, o.shape) == (t.color, t.shape)), False
    return item.target, True


def coverage(model_dir: str, seed: int, per_type: int, methods, rates, clip: str | None, batch: int = 50,
             split: str = "test") -> list[dict]:
    """Diagnostic: how often a pre-LLM pruner keeps at least one patch of every object the answer rests on
    (no LLM run; VisionZip's merged tokens are not counted). It bounds what a perfect reader of the kept
    patches could answer, which is why the accuracy curve has the shape it has."""
    from actors.engine import LlavaEngine
    from actors.pruners import IN_LLM_METHODS

    if set(methods) & set(IN_LLM_METHODS):
        raise ValueError(f"--coverage measures pre-LLM pruners; {sorted(set(methods) & set(IN_LLM_METHODS))} prune "
                         "inside the LLM")
    engine = LlavaEngine.from_pretrained(model_dir, clip_text_url=clip)
    items = [it for it in eval_items(seed, per_type, split) if needed_objects(it)[0]]
    rows = []
    for method in methods:
        for rate in rates:
            keep = engine.num_patches - int(round(rate * engine.num_patches))
            hits: dict[str, list[int]] = {}
            for i in range(0, len(items), batch):
                chunk = items[i:i + batch]
                vision = engine.encode_images(engine.preprocess([render(it) for it in chunk]))
                pruned = engine.prune(vision, method, keep, [it.id for it in chunk], [it.question for it in chunk])
                for it, kept in zip(chunk, pruned.kept_indices.tolist(), strict=True):
                    kept = set(kept)
                    objs, need_all = needed_objects(it)
                    ok = (all if need_all else any)(kept & set(object_patches(it.objects[j])) for j in objs)
                    hits.setdefault(it.question_type, []).append(int(ok))
            row = {"method": method, "pruning": rate, "kept": keep,
                   **{t: round(100 * sum(v) / len(v), 1) for t, v in sorted(hits.items())}}
            row["all"] = round(100 * sum(map(sum, hits.values())) / sum(map(len, hits.values())), 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _ranges(text: str) -> list[tuple[int, int]]:
    return [shapes.parse_lo_hi(part) for part in text.split(",")]


def clustered_se(values: list[float], clusters: list[str]) -> float:
    """Standard error of the mean of ``values`` whose items share scenes: the items of one index (one id) across
    the question types are questions about the same scene, so their scores are not independent. The mean of
    cluster means' spread, over the number of clusters (equal cluster sizes here)."""
    groups: dict[str, list[float]] = {}
    for v, c in zip(values, clusters, strict=True):
        groups.setdefault(c, []).append(v)
    means = [sum(g) / len(g) for g in groups.values()]
    m = sum(means) / len(means)
    return (sum((x - m) ** 2 for x in means) / max(1, len(means) - 1) / len(means)) ** 0.5


def run_setting(engine, items, *, method: str, rate: float | None, captions: bool, batch: int) -> dict:
    """One table row; ``_scores`` (per item, in ``items`` order) is kept for the paired SE of a drop and
    dropped before the row is written."""
    per: dict[str, list[float]] = {}
    scores: list[float] = []
    flops: list[float] = []
    vision: list[float] = []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        images = [render(it) for it in chunk]
        caps = [world.fact(it.objects, it.question_type, it.question, it.target) for it in chunk] if captions else None
        keep = None if rate is None else engine.num_patches - int(round(rate * engine.num_patches))
        res, _ = engine.answer(images, [it.question for it in chunk], [it.id for it in chunk], caps,
                               method=method, keep_tokens=keep, max_new_tokens=4)
        for it, text, f in zip(chunk, res.texts, res.flops, strict=True):
            scores.append(score(text, it.answer))
            per.setdefault(it.question_type, []).append(scores[-1])
            flops.append(f["total"])
            vision.append(f["vision"])
    row = {t: round(100 * sum(v) / len(v), 1) for t, v in sorted(per.items())}
    row["all"] = round(100 * sum(scores) / len(scores), 1)
    row["se"] = round(100 * clustered_se(scores, [it.id for it in items]), 1)
    row["_scores"] = scores
    row["kept"] = engine.num_patches if rate is None else keep
    row["mflops"] = round(sum(flops) / len(flops) / 1e6, 1)
    row["vision_share"] = round(sum(vision) / sum(flops), 3)
    return row


def evaluate(model_dir: str, seed: int, per_type: int, batch: int = 50, rates=RATES, methods=METHODS,
             clip: str | None = None, split: str = "test") -> list[dict]:
    from actors.engine import LlavaEngine

    engine = LlavaEngine.from_pretrained(model_dir, clip_text_url=clip)
    items = eval_items(seed, per_type, split)
    settings = [("none", None, False)] + [(m, r, False) for m in methods for r in rates] + [("prumerge_plus", 0.875, True)]
    rows: list[dict] = []
    full: list[float] = []
    ids = [it.id for it in items]
    for method, rate, captions in settings:
        row = {"method": method, "pruning": rate or 0.0, "caption": captions,
               **run_setting(engine, items, method=method, rate=rate, captions=captions, batch=batch)}
        scores = row.pop("_scores")
        full = full or scores
        # the drop from full tokens is a paired difference on the same items: its own (scene-clustered) SE
        row["drop_se"] = round(100 * clustered_se([a - b for a, b in zip(scores, full, strict=True)], ids), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    cols = list(world.QUESTION_TYPES) + ["all"]
    head = "| method | pruning | kept | " + " | ".join(cols) + " | MFLOPs/item | tower share |"
    lines = [head, "|" + "---|" * (len(cols) + 5)]
    full = rows[0]["all"]
    for r in rows:
        kept = r["kept"]
        name = r["method"] + (" + oracle caption" if r["caption"] else "")
        vals = " | ".join(f"{r[c]:.1f}" for c in cols)
        drop = f" ± {r['se']:.1f}" + ("" if r is rows[0] else f" ({r['all'] - full:+.1f} ± {r['drop_se']:.1f})")
        lines.append(f"| {name} | {100 * r['pruning']:.2f}% | {kept} | {vals}{drop} | {r['mflops']:.1f} | {r['vision_share']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="v1", choices=sorted(WORLDS), help="Shapes-VQA v1 or v2")
    p.add_argument("--model", default="models/shapes/lvlm")
    p.add_argument("--clip", default=None, help="CLIPModel folder: the text guide of the text-guided pruners")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated pruning methods (\"\": full tokens and the oracle-caption row only)")
    p.add_argument("--rates", default=",".join(map(str, RATES)), help="comma-separated pruning rates")
    p.add_argument("--split", default="test", choices=("test", "val"),
                   help="the items (of the table and of both diagnostics): test, or val to choose among checkpoints "
                        "without touching test")
    p.add_argument("--seed", type=int, default=4242, help="the split's seed")
    p.add_argument("--per-type", type=int, default=100, help="items per question type")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="", help="write rows here")
    p.add_argument("--markdown", default="", help="write the markdown table here")
    p.add_argument("--coverage", action="store_true",
                   help="diagnostic instead of the table: how often each pruner keeps a patch of every object the "
                        "answer rests on (no LLM run)")
    p.add_argument("--by-objects", default="", metavar="RANGES",
                   help="diagnostic instead of the table: full-token accuracy per question type for scenes of "
                        "these object counts, e.g. 1,2,4,10-16")
    args = p.parse_args(argv)
    global world
    previous, world = world, WORLDS[args.world]
    try:
        return _run(args)
    finally:  # other callers of this module's functions keep the world they had
        world = previous


def _run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.coverage:
        rows = coverage(args.model, args.seed, args.per_type, args.methods.split(","),
                        [float(r) for r in args.rates.split(",")], args.clip, args.batch, args.split)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return rows
    if args.by_objects:
        rows = by_objects(args.model, args.seed, args.per_type, _ranges(args.by_objects), args.batch, args.split)
        print(by_objects_markdown(rows))
        if args.markdown:
            Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
            Path(args.markdown).write_text(by_objects_markdown(rows) + "\n")
        return rows
    rows = evaluate(args.model, args.seed, args.per_type, args.batch,
                    methods=tuple(m for m in args.methods.split(",") if m),
                    rates=tuple(float(r) for r in args.rates.split(",")), clip=args.clip, split=args.split)
    table = markdown(rows)
    print(table)
    print(f"({time.time() - t0:.0f}s, {args.per_type * len(world.QUESTION_TYPES)} {args.split} items, seed {args.seed})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
