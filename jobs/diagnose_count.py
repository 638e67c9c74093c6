"""Diagnostics for count questions on Shapes v2 under ACCM: which side of the chain cannot count?

At 87.5% pruning ACCM answers colour, shape, exist and spatial questions within 2 points of all tokens, and
count questions ("How many red objects are there?") at ~25% against 72%. Two subcommands separate the LVLM
from the caption model, on val count items at one budget of PruMerge+ (the base pruner):

* ``lvlm-text`` -- the frozen LVLM's count accuracy with four supplemental texts: none (the pruner alone); the
  total-count fact (``there are three red objects.``, the oracle caption); the one-object captions of the
  counted objects the caption model can see (a patch of theirs is discarded), one after another; and those of
  the counted objects that are wholly discarded (the ones the LVLM cannot see). Each is split by whether the
  caption model sees every counted object (``fact_visible``: then a total-count caption is possible at all).
  Says which caption form the LVLM can use.
* ``caption-finetune`` -- fine-tunes a caption model on count items only (plain PyTorch, no Ray; budgets drawn
  from ``--keep-range``, facts only where every counted object is seen, the pre-training's attention and slot
  read-out losses) and reports its first-beam exact match on the val items whose counted objects it all sees
  and how often it abstains.
  ``--count-token``: the mapper also sums a per-slot MLP over the patch slots (a sum, not an attention average,
  so a count can be linear in it) into its last constant slot, with an auxiliary per-colour count read-out of
  that sum. Says whether the caption model can learn to count at all, with and without that help. The
  fine-tuned model is written only with ``--out``, and never into a shipped folder.

    .venv/bin/python jobs/diagnose_count.py lvlm-text --n 200 --json runs/diag/count_lvlm_text.json
    .venv/bin/python jobs/diagnose_count.py caption-finetune --captioner models/shapes_v2/captioner \\
        --steps 450 --json runs/diag/count_caption.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from actors.accm_batches import ABSTAIN_CAPTION, make_batch, slot_attributes, wholly_discarded  # noqa: E402
from jobs.train_utils import shown_path, write_json  # noqa: E402
from pipeline import shapes_v2 as world  # noqa: E402

COUNT_INDEX = world.QUESTION_TYPES.index("count")  # item i asks QUESTION_TYPES[i % 5]


def count_indices(start: int, n: int) -> list[int]:
    """Indices of ``n`` count items of a split, from the ``start``-th count item on."""
    return [len(world.QUESTION_TYPES) * (start + i) + COUNT_INDEX for i in range(n)]


def count_batches(engine, split: str, start: int, n: int, keep: int, batch_size: int, seed: int,
                  kept_context: bool = False):
    for s in range(0, n, batch_size):
        yield make_batch(engine, seed, split, count_indices(start + s, min(batch_size, n - s)), keep, world=world,
                         features="projected", kept_context=kept_context)


def list_captions(batch: dict, wholly: bool) -> list[str | None]:
    """Per item, the one-object captions of its counted objects that have a discarded patch (``wholly``: all of
    them discarded), in scene order; None when there is none."""
    out = []
    for item, dropped in zip(batch["items"], batch["discarded_indices"], strict=True):
        gone = set(dropped)
        hit = (wholly_discarded(item, dropped, world) if wholly else
               [o for o in item.target if any(p in gone for p in world.patch_indices(item.objects[o]))])
        out.append(" ".join(world.caption(item.objects[o]) for o in hit) or None)
    return out


def lvlm_text(args) -> dict:
    from actors.engine import LlavaEngine

    engine = LlavaEngine.from_pretrained(args.lvlm, clip_text_url=args.clip)
    tally: dict[str, list[int]] = {}
    for batch in count_batches(engine, "val", 0, args.n, args.keep, args.batch_size, args.seed):
        forms = {"none": None, "total fact": batch["facts"], "seen objects listed": list_captions(batch, False),
                 "wholly discarded objects listed": list_captions(batch, True)}
        for name, texts in forms.items():
            res = engine.generate(batch["retained"], batch["questions"], texts,
                                  method="accm" if texts else "prumerge_plus", keep_tokens=args.keep)
            for text, answer, seen in zip(res.texts, batch["answers"], batch["fact_visible"], strict=True):
                for key in (name, f"{name} | sees every counted object: {'yes' if seen else 'no'}"):
                    t = tally.setdefault(key, [0, 0])
                    t[0] += int(text.strip().lower() == answer.lower())
                    t[1] += 1
    return {k: {"accuracy": round(c / n, 3), "n": n} for k, (c, n) in sorted(tally.items())}


class CountTokenMapper(nn.Module):
    """A caption-model mapper plus a summed count token: sum over patch slots of an MLP of each, added to the
    mapper's last constant slot. Starts as the identity (zero output layer)."""

    def __init__(self, mapper: nn.Module, hidden: int) -> None:
        super().__init__()
        self.inner = mapper
        self.fc = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(2 * hidden, hidden)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.summary: Tensor | None = None

    @property
    def linear(self) -> nn.Linear:  # CaptionModel.device reads the mapper's input layer
        return self.inner.linear

    def forward(self, discarded: Tensor) -> Tensor:
        out = self.inner(discarded)
        m = discarded.shape[1]
        self.summary = self.out(F.gelu(self.fc(out[:, :m]))).sum(1) / 8.0
        return torch.cat([out[:, :-1], out[:, -1:] + self.summary[:, None]], dim=1)


def seen_colour_counts(batch: dict, colours: int) -> Tensor:
    """[B, colours]: objects per colour with a discarded patch (from the slots' labels: colour, shape, row, col)."""
    labels = batch["slot_labels"]
    out = torch.zeros(labels.shape[0], colours)
    for r in range(labels.shape[0]):
        for colour, _row, _col in {(c, rw, cl) for c, _, rw, cl in labels[r].tolist() if c >= 0}:
            out[r, colour] += 1
    return out


def caption_exact(captioner, engine, args) -> dict:
    captioner.eval()
    seen = hits = abstained = 0
    for batch in count_batches(engine, "val", 0, args.n, args.keep, args.batch_size, args.seed,
                               captioner.config.kept_context):
        with torch.no_grad():
            beams = captioner.beam_search(batch["discarded"], batch["questions"])
        for cands, fact, visible in zip(beams.captions, batch["facts"], batch["fact_visible"], strict=True):
            seen += visible
            hits += visible and cands[0] == fact
            abstained += cands[0] == ABSTAIN_CAPTION
    captioner.train()
    return {"items_seen": seen, "exact_where_seen": round(hits / max(1, seen), 3),
            "abstained": round(abstained / args.n, 3)}


def caption_finetune(args) -> dict:
    from actors.accm_trainable import ACCMTrainable
    from actors.captioner import CaptionModel
    from actors.engine import LlavaEngine

    torch.manual_seed(0)
    engine = LlavaEngine.from_pretrained(args.lvlm, clip_text_url=args.clip)
    engine.model.requires_grad_(False)
    captioner = CaptionModel.from_pretrained(args.captioner)
    if captioner.config.input_features != "projected" or not captioner.config.patch_prefix:
        raise SystemExit("caption-finetune: a v2 caption model reading projected features with a patch prefix")
    if args.kept_context:
        from actors.kept_context import enable_kept_context

        enable_kept_context(captioner)
    wrapped = CountTokenMapper(captioner.mapper, captioner.config.hidden) if args.count_token else None
    if wrapped is not None:
        captioner.mapper = wrapped
    module = ACCMTrainable(captioner, None, slot_reader=True, attributes=slot_attributes(world)).train()
    readout = nn.Linear(captioner.config.hidden, len(world.COLOR_NAMES)) if wrapped is not None else None
    params = [p for p in module.parameters() if p.requires_grad] + (list(readout.parameters()) if readout else [])
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    lo, hi = (int(x) for x in args.keep_range.split("-"))
    curve = [{"step": 0, **caption_exact(captioner, engine, args)}]
    print(json.dumps(curve[-1]), flush=True)
    t0 = time.time()
    for step in range(args.steps):
        keep = int(np.random.default_rng([args.seed, step]).integers(lo, hi + 1))
        batch = make_batch(engine, args.seed, "train", count_indices(1_000_000 + step * args.batch_size,
                                                                      args.batch_size), keep, world=world,
                           features="projected", kept_context=args.kept_context)
        batch["train_rows"] = rows = [i for i, v in enumerate(batch["fact_visible"]) if v]
        out = module("pretrain", batch, attention_weight=1.0, read_weight=1.0)
        loss = out["loss"]
        if readout is not None and rows:
            target = seen_colour_counts(batch, len(world.COLOR_NAMES))[rows]
            loss = loss + F.mse_loss(readout(wrapped.summary), target)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append({"step": step + 1, "seconds": round(time.time() - t0), **caption_exact(captioner, engine, args)})
            print(json.dumps(curve[-1]), flush=True)
    if args.out:
        if wrapped is not None:
            raise SystemExit("--out: a --count-token model has no saved form (the mapper wrapper is a probe)")
        captioner.save_pretrained(args.out)
    return {"captioner": shown_path(args.captioner), "count_token": args.count_token,
            "kept_context": args.kept_context, "lr": args.lr, "curve": curve}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("lvlm-text", "caption-finetune"))
    p.add_argument("--lvlm", default=str(REPO / "models/shapes_v2/lvlm"))
    p.add_argument("--clip", default=str(REPO / "models/shapes_v2/clip"))
    p.add_argument("--captioner", default=str(REPO / "models/shapes_v2/captioner"))
    p.add_argument("--n", type=int, default=160, help="val count items")
    p.add_argument("--keep", type=int, default=18, help="PruMerge+ budget (18 of 144 = 87.5%% pruning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=450, help="caption-finetune: steps")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--keep-range", default="9-72", metavar="LO-HI", help="caption-finetune: training budgets")
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--count-token", action="store_true", help="caption-finetune: add the summed count token")
    p.add_argument("--kept-context", action="store_true",
                   help="caption-finetune: the caption model reads the kept patches too (actors.kept_context)")
    p.add_argument("--out", default=None, help="caption-finetune: write the fine-tuned caption model here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.out and Path(args.out).resolve().is_relative_to((REPO / "models").resolve()):
        raise SystemExit("--out: write the probe's model under runs/, not into a shipped folder")
    result = lvlm_text(args) if args.command == "lvlm-text" else caption_finetune(args)
    result = {"command": args.command, "keep": args.keep, "n": args.n, "result": result}
    print(json.dumps(result, indent=1))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
