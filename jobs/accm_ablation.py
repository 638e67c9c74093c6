"""ACCM's ablation table (the caption model cards' tables): the base pruner alone, + the first beam, + the
selector (ACCM), + one greedy candidate without the selector (the budget form, ``--num-candidates 1``), + the
oracle fact, at each pruning rate; every plain pruner at 75% as the equal-cost reference. Run by
``train_accm.py --stage eval``; plain PyTorch (no Ray).

Accuracy is exact match on single-word answers; ``se`` is its binomial standard error (each item is its own
scene). ``split="val"`` is for choosing between trained variants; the test split only reports the chosen one.
"""

from __future__ import annotations

import math

from pipeline.worlds import WORLDS

# the plain pruners the 75% reference row holds: the pre-LLM ones, and FastV inside the LLM
REFERENCE_METHODS = ("random", "fastv", "visionzip", "prumerge_plus", "divprune", "cdpruner")


def rate_label(keep: int, n_patches: int) -> str:
    return f"{100 * (1 - keep / n_patches):g}%"


def evaluate(lvlm: str, captioner_dir: str, selector_dir: str, *, n: int, seed: int,
             rates: tuple[float, ...] = (0.875, 0.9375), batch_size: int = 64, split: str = "test",
             world: str = "v1", clip: str | None = None,
             reference_methods: tuple[str, ...] = REFERENCE_METHODS, count_facts: str = "total") -> dict:
    """The ablation rows, each {accuracy, se, mflops_per_item, n, accuracy_by_type, ...}.

    ``rates``: pruning rates of the base pruner + ACCM rows (keep = round((1 - rate) * patches));
    ``clip``: the CLIP folder (text-guided PruMerge+ picks, and the projected features a reference caption
    model reads); ``count_facts``: the count facts the caption model was trained on (the oracle rows say the
    same; ``actors.accm_batches.make_batch``)."""
    from actors.accm import ACCMCaptioner
    from actors.accm_batches import make_batch
    from actors.engine import LlavaEngine
    from actors.prompt import has_words

    gen = WORLDS[world]
    engine = LlavaEngine.from_pretrained(lvlm, clip_text_url=clip)
    accm = ACCMCaptioner.from_pretrained(captioner_dir, selector_dir)
    patches = gen.GRID * gen.GRID
    keeps = list(dict.fromkeys(max(1, round((1 - r) * patches)) for r in rates))  # each budget once
    quarter = patches // 4
    fastv_layer = min(2, engine.config.text_config.num_hidden_layers - 1)  # the smoke's LLM has 2 layers
    rows: dict[str, dict] = {}
    types: list[str] = []  # the current batch's question types

    def add(key: str, res, answers, spliced: list[str] | None = None, facts: list[str] | None = None):
        r = rows.setdefault(key, {"correct": 0, "n": 0, "flops": 0.0, "spoke": 0, "by_type": {}})
        for i, (t, a) in enumerate(zip(res.texts, answers, strict=True)):
            hit = int(t.strip().lower() == a.lower())
            r["correct"] += hit
            r["n"] += 1
            r["flops"] += res.flops[i]["total"]
            per = r["by_type"].setdefault(types[i], [0, 0])
            per[0] += hit
            per[1] += 1
        if spliced is not None:  # an abstention splices nothing and costs no LLM tokens
            r["spoke"] += sum(has_words(c) for c in spliced)
        if facts is not None:  # how often the spliced caption is exactly the scene fact
            r["is_fact"] = r.get("is_fact", 0) + sum(c == f for c, f in zip(spliced, facts, strict=True))

    kept_context = accm.captioner.config.kept_context
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        batch = make_batch(engine, seed, split, idx, keeps[0], world=gen, features=accm.input_features,
                           count_facts=count_facts, kept_context=kept_context)
        batch_keep = keeps[0]
        qs, ans = batch["questions"], batch["answers"]
        types[:] = batch["qtypes"]
        add("all tokens", engine.generate(batch["full"], qs, method="none"), ans)
        # the equal-cost reference: every plain pruner at 75% pruning
        vision = batch["vision"]
        for method in reference_methods:
            kept = (batch["full"] if method == "fastv"
                    else engine.prune(vision, method, quarter, batch["ids"], qs).retained)
            add(f"75% {method}", engine.generate(kept, qs, method=method, keep_tokens=quarter,
                                                 fastv_layer=fastv_layer), ans)
        for keep in keeps:
            if keep != batch_keep:
                batch = make_batch(engine, seed, split, idx, keep, world=gen, features=accm.input_features,
                                   count_facts=count_facts, kept_context=kept_context)
                batch_keep = keep
            rate = rate_label(keep, patches)
            add(f"{rate} prumerge_plus", engine.generate(batch["retained"], qs, method="prumerge_plus",
                                                         keep_tokens=keep), ans)
            out = accm.caption(batch["discarded"], qs)
            cap = [{"flops": f} for f in out.flops_captioner]
            sel = [{"flops": f} for f in out.flops_selector]
            first = [c[0] for c in out.candidates]
            add(f"{rate} + first beam caption", engine.generate(batch["retained"], qs, first, method="accm",
                                                                 keep_tokens=keep, captioner=cap), ans, first,
                batch["facts"])
            add(f"{rate} + selector (ACCM)", engine.generate(batch["retained"], qs, out.selected, method="accm",
                                                             keep_tokens=keep, captioner=cap, selector=sel), ans,
                out.selected, batch["facts"])
            # the budget form: one greedy candidate, no selector (``--num-candidates 1``)
            one = accm.caption(batch["discarded"], qs, beams=1)
            greedy = [c[0] for c in one.candidates]
            add(f"{rate} + one-candidate caption (no selector)",
                engine.generate(batch["retained"], qs, greedy, method="accm", keep_tokens=keep,
                                captioner=[{"flops": f} for f in one.flops_captioner]), ans, greedy, batch["facts"])
            add(f"{rate} + oracle caption", engine.generate(batch["retained"], qs, batch["facts"], method="accm",
                                                            keep_tokens=keep), ans, batch["facts"])
    table = {}
    for k, v in rows.items():
        acc = v["correct"] / v["n"]
        table[k] = {"accuracy": acc, "se": math.sqrt(acc * (1 - acc) / v["n"]),
                    "mflops_per_item": v["flops"] / v["n"] / 1e6, "n": v["n"],
                    "accuracy_by_type": {t: c / m for t, (c, m) in sorted(v["by_type"].items())}}
        if "caption" in k or "ACCM" in k:
            table[k]["caption_spliced"] = v["spoke"] / v["n"]
        if "is_fact" in v:
            table[k]["caption_is_fact"] = v["is_fact"] / v["n"]
    return table


def markdown(table: dict) -> str:
    """The ablation, then accuracy by question type (older tables without the breakdown or the SE print too)."""
    lines = ["| setting | accuracy | MFLOPs / item | caption spliced | caption = fact |", "|---|---:|---:|---:|---:|"]
    for k, v in table.items():
        spliced = f"{100 * v['caption_spliced']:.1f}%" if "caption_spliced" in v else ""
        fact = f"{100 * v['caption_is_fact']:.1f}%" if "caption_is_fact" in v else ""
        se = f" ± {100 * v['se']:.1f}" if "se" in v else ""
        lines.append(f"| {k} | {100 * v['accuracy']:.1f}%{se} | {v['mflops_per_item']:.1f} | {spliced} | {fact} |")
    types = sorted({t for v in table.values() for t in v.get("accuracy_by_type", {})})
    if types:
        lines += ["", "| setting | " + " | ".join(types) + " |", "|---|" + "---:|" * len(types)]
        for k, v in table.items():
            by = v.get("accuracy_by_type", {})
            lines.append(f"| {k} | " + " | ".join(f"{100 * by[t]:.1f}%" if t in by else "" for t in types) + " |")
    return "\n".join(lines)
