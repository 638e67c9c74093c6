"""Diagnostics for an ACCM caption model on Shapes-VQA val items: where does a wrong caption go wrong?

Four subcommands, each on a caption model (``actors.captioner.CaptionModel``) and the frozen LVLM whose
vision tower and base pruner (``prumerge_plus``) feed it (``actors.engine.LlavaEngine``):

* ``by-objects`` -- first-beam exact match with the fact, per question type, against the scene's object
  count, all 64 patches to the mapper: separates *finding* the named object (fails as scenes get crowded)
  from *reading* it (already fails with one object).
* ``errors`` -- per question type exact match on the items whose named object the mapper sees (the base
  pruner discarded it), with a few wrong captions next to their facts.
* ``attention`` (``patch_prefix`` models) -- colour questions, true fact teacher-forced: at the position that
  predicts the colour word, the supervised heads' (first half of the last decoder layer's heads) attention
  mass on the target slot, how often their argmax is the target, and how often the colour word is right;
  "attends to the right slot but says the wrong colour" is a reading failure, not a finding one.
* ``slot-probe`` (``patch_prefix`` models) -- linear probes of an object's colour from its raw discarded
  patch feature, the mapper output and each decoder hidden state at its slot: the layer where the probe
  drops is where the colour is mixed away.

Items come from the val split (``--seed``); each diagnostic uses its own index range, and a probe's train
and test items are disjoint ranges. Every subcommand prints a table and returns (``--json``: writes) its
numbers.

    .venv/bin/python jobs/diagnose_captioner.py attention --captioner models/shapes/captioner \\
        --lvlm models/shapes/lvlm --n 80 --json runs/diag/attention.json
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from jobs.train_utils import write_json  # noqa: E402
from pipeline import shapes  # noqa: E402

DEFAULT_LVLM = "models/shapes/lvlm"
KEEP = 8  # patches the base pruner keeps for the LVLM (87.5% pruning); the caption model gets the other 56
OBJECT_RANGES = ((1, 1), (2, 2), (4, 4), (shapes.MIN_OBJECTS, shapes.MAX_OBJECTS))
BATCH = 64
# val index ranges start here (each diagnostic its own; a probe's train/test split its range in two)
ERRORS_START, ATTENTION_START, PROBE_START = 1000, 2000, 3000
DEFAULT_N = {"by-objects": 40, "errors": 100, "attention": 80, "slot-probe": 640}
PROBE_TEST_FRACTION = 0.2


def load_models(captioner: str | Path, lvlm: str | Path = DEFAULT_LVLM):
    """(CaptionModel, LlavaEngine) on CPU, in eval mode."""
    from actors.captioner import CaptionModel
    from actors.engine import LlavaEngine

    return CaptionModel.from_pretrained(captioner), LlavaEngine.from_pretrained(str(lvlm))


def _chunks(indices: Sequence[int], size: int = BATCH) -> Iterator[list[int]]:
    for s in range(0, len(indices), size):
        yield list(indices[s : s + size])


def _rate(hits: float, n: int) -> float | None:
    return round(hits / n, 4) if n else None


def _require_patch_prefix(cap, what: str) -> None:
    if not cap.config.patch_prefix:
        raise ValueError(f"{what} needs a patch_prefix caption model (one decoder prefix slot per discarded "
                         "patch); this one has patch_prefix=False")


def _label(lo: int, hi: int) -> str:
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


# ------------------------------------------------------------------------------------------------ by-objects


@torch.no_grad()
def by_objects(cap, engine, *, n: int = DEFAULT_N["by-objects"], seed: int = 0,
               ranges: Sequence[tuple[int, int]] = OBJECT_RANGES) -> dict:
    """First-beam exact match with the fact per question type, for scenes of each object-count range.

    All 64 patch features go to the mapper, so the named object is always visible: a model that is right
    with one object and wrong with two has not learned to *find* the object the question names; one that is
    wrong already with one object does not *read* it. ``n`` items per (range, question type).
    """
    table: dict[str, dict[str, float]] = {}
    for lo, hi in ranges:
        hits: dict[str, int] = {}
        for qtype in shapes.QUESTION_TYPES:
            items = [shapes.make_item(seed, "val", i, qtype=qtype, n_objects=(lo, hi)) for i in range(n)]
            hits[qtype] = 0
            for chunk in _chunks(items):
                vision = engine.encode_images(engine.preprocess([shapes.render(it.objects) for it in chunk]))
                beams = cap.beam_search(vision.patch_features, [it.question for it in chunk])
                facts = [shapes.fact(it.objects, it.question_type, it.question, it.target) for it in chunk]
                hits[qtype] += sum(c[0] == f for c, f in zip(beams.captions, facts, strict=True))
        row = {qtype: _rate(h, n) for qtype, h in hits.items()}
        row["all"] = _rate(sum(hits.values()), n * len(hits))
        table[_label(lo, hi)] = row
    return {"diagnostic": "by-objects", "seed": seed, "n_per_type": n, "exact_match": table}


def print_by_objects(result: dict) -> None:
    cols = [*shapes.QUESTION_TYPES, "all"]
    print(f"first-beam exact match, all patches to the mapper ({result['n_per_type']} items per type)")
    print(f"{'objects':>8s} " + " ".join(f"{c:>8s}" for c in cols))
    for objects, row in result["exact_match"].items():
        print(f"{objects:>8s} " + " ".join(f"{row[c]:8.2f}" for c in cols))


# ------------------------------------------------------------------------------------------------ errors


@torch.no_grad()
def errors(cap, engine, *, n: int = DEFAULT_N["errors"], seed: int = 0, keep: int = KEEP,
           examples_per_type: int = 5) -> dict:
    """Per question type first-beam exact match on val items whose named object the mapper sees.

    Items whose object the base pruner kept are left out (no caption can state what it does not get), so a
    miss here is the caption model's own; the examples show which part of the fact it gets wrong.
    """
    from jobs.train_accm import make_batch

    seen: dict[str, list[bool]] = {}
    examples: list[dict] = []
    for idx in _chunks(range(ERRORS_START, ERRORS_START + n)):
        b = make_batch(engine, seed, "val", idx, keep)
        beams = cap.beam_search(b["discarded"], b["questions"])
        for q, qtype, fact, caps, visible in zip(b["questions"], b["qtypes"], b["facts"], beams.captions,
                                                 b["target_discarded"], strict=True):
            if not visible:
                continue
            right = caps[0] == fact
            seen.setdefault(qtype, []).append(right)
            if not right and sum(e["qtype"] == qtype for e in examples) < examples_per_type:
                examples.append({"qtype": qtype, "question": q, "fact": fact, "caption": caps[0]})
    per_type = {qtype: {"exact_match": _rate(sum(v), len(v)), "n": len(v)}
                for qtype in shapes.QUESTION_TYPES if (v := seen.get(qtype))}
    total = [r for v in seen.values() for r in v]
    return {"diagnostic": "errors", "seed": seed, "n": n, "keep": keep, "per_type": per_type,
            "all": {"exact_match": _rate(sum(total), len(total)), "n": len(total)}, "examples": examples}


def print_errors(result: dict) -> None:
    for e in result["examples"]:
        print(f"{e['qtype']:8s} {e['question']:44s} fact={e['fact']:44s} got={e['caption']}")
    print(f"\nfirst-beam exact match, named object seen by the mapper (keep {result['keep']}, {result['n']} items)")
    print(f"{'type':>8s} {'match':>6s} {'n':>5s}")
    for qtype, row in [*result["per_type"].items(), ("all", result["all"])]:
        match = "-" if row["exact_match"] is None else f"{row['exact_match']:.2f}"
        print(f"{qtype:>8s} {match:>6s} {row['n']:5d}")


# ------------------------------------------------------------------------------------------------ attention


@torch.no_grad()
def attention(cap, engine, *, n: int = DEFAULT_N["attention"], seed: int = 0, keep: int = KEEP,
              heads: int = 0) -> dict:
    """Colour questions, true fact teacher-forced: the supervised heads at the colour word's position.

    Distinguishes *finding* the object (the heads' argmax is the target slot, much mass on it) from
    *reading* it (the colour word right, teacher-forced). ``reads_attended``: the predicted colour is the
    colour of whatever object the argmax slot holds, i.e. the model says what it looks at. ``heads``: the
    first ``heads`` heads of the last decoder layer (0: half, as pre-training supervises them). ``n``
    colour items; those whose object the base pruner kept are left out.
    """
    from jobs.train_accm import make_batch

    _require_patch_prefix(cap, "attention")
    colour = shapes.QUESTION_TYPES.index("color")
    step = len(shapes.QUESTION_TYPES)
    indices = [ATTENTION_START + step * k + colour for k in range(n)]  # make_item's type of index i: i % step
    colour_ids = {c: cap.caption_ids([c])[0][0] for c in shapes.COLOR_NAMES}
    rows = hits = right = reads = attended_objects = 0
    mass = 0.0
    for idx in _chunks(indices):
        b = make_batch(engine, seed, "val", idx, keep)
        m = b["discarded"].shape[1]
        for r, slots in enumerate(b["target_slots"]):
            if not slots:
                continue
            tf = cap.teacher_forced(b["discarded"][r : r + 1], [b["questions"][r]], [b["facts"][r]],
                                    output_attentions=True)
            ids = tf.caption_ids[0].tolist()
            first_slot, out = tf.first_slot, tf.out
            pos = tf.prompt_len - 1 + len(ids) - 2  # predicts token len-2 of "... is <colour> ."
            att = out.attentions[-1][0]
            h = heads or max(1, att.shape[0] // 2)
            slot_att = att[:h, pos].float().mean(0)[first_slot : first_slot + m]
            argmax = int(slot_att.argmax())
            pred = int(out.logits[0, pos].argmax())
            rows += 1
            mass += float(slot_att[slots].sum())
            hits += argmax in slots
            right += pred == ids[-2]
            label = int(b["slot_labels"][r, argmax, 0])
            if label >= 0:  # the argmax slot holds an object: does the model say its colour?
                attended_objects += 1
                reads += pred == colour_ids[shapes.COLOR_NAMES[label]]
    return {"diagnostic": "attention", "seed": seed, "n": n, "keep": keep, "items": rows,
            "target_mass": _rate(mass, rows), "argmax_is_target": _rate(hits, rows),
            "colour_word_right": _rate(right, rows), "argmax_on_object": attended_objects,
            "reads_attended": _rate(reads, attended_objects)}


def print_attention(result: dict) -> None:
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    print(f"colour questions, true fact teacher-forced ({result['items']} items with the object discarded)")
    print(f"  supervised heads' mass on the target slot   {fmt(result['target_mass'])}   (finding)")
    print(f"  argmax slot == target                       {fmt(result['argmax_is_target'])}   (finding)")
    print(f"  colour word right                           {fmt(result['colour_word_right'])}   (reading)")
    print(f"  colour word == argmax slot's object colour  {fmt(result['reads_attended'])}   "
          f"({result['argmax_on_object']} items with an object there)")


# ------------------------------------------------------------------------------------------------ slot-probe


@torch.no_grad()
def slot_features(cap, engine, indices: Sequence[int], *, seed: int = 0,
                  keep: int = KEEP) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per object in a discarded slot: its raw patch feature, mapper output and decoder hidden states at its
    slot (``decoder_<i>``: after layer i), and its colour class."""
    from jobs.train_accm import make_batch

    feats: dict[str, list[torch.Tensor]] = {}
    labels: list[torch.Tensor] = []
    for idx in _chunks(indices):
        b = make_batch(engine, seed, "val", idx, keep)
        discarded = b["discarded"].to(cap.device, cap.decoder.get_input_embeddings().weight.dtype)
        mapped = cap.mapper(discarded)
        embeds, mask, _ = cap._prefix_inputs(discarded, b["questions"])
        out = cap.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=cap._positions(mask),
                          use_cache=False, output_hidden_states=True)
        first_slot = mask.shape[1] - mapped.shape[1]  # question left-padded: the slots start at one column
        m = discarded.shape[1]
        colour = b["slot_labels"][..., 0]
        rows, slots = (colour >= 0).nonzero(as_tuple=True)
        layers = {"raw": b["discarded"], "mapper": mapped[:, :m]}
        layers |= {f"decoder_{i}": h[:, first_slot : first_slot + m] for i, h in enumerate(out.hidden_states)
                   if i > 0}
        for name, x in layers.items():
            feats.setdefault(name, []).append(x[rows, slots].float().cpu())
        labels.append(colour[rows, slots])
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, *,
                 classes: int, steps: int = 400, lr: float = 1e-2, seed: int = 0) -> float:
    """Test accuracy of a softmax-regression probe (features standardised with the train statistics)."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    with torch.enable_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        lin = torch.nn.Linear(x_train.shape[1], classes)
        opt = torch.optim.Adam(lin.parameters(), lr)
        for _ in range(steps):
            loss = F.cross_entropy(lin(x_train), y_train)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((lin(x_test).argmax(1) == y_test).float().mean())


def slot_probe(cap, engine, *, n: int = DEFAULT_N["slot-probe"], seed: int = 0, keep: int = KEEP,
               steps: int = 400) -> dict:
    """Linear probes of an object's colour at its slot, layer by layer: where is the colour lost?

    A caption model can attend to the right slot and still say the wrong colour if an earlier layer has
    mixed the slot's own attributes away; the probe accuracy falling from ``mapper`` to ``decoder_1`` is
    that. ``n`` val items: the first ``1 - PROBE_TEST_FRACTION`` train the probes, the rest (a disjoint
    index range) test them; ``chance``: the train majority class's test rate.
    """
    _require_patch_prefix(cap, "slot-probe")
    n_test = max(1, round(n * PROBE_TEST_FRACTION))
    train_idx = range(PROBE_START, PROBE_START + n - n_test)
    test_idx = range(PROBE_START + n - n_test, PROBE_START + n)
    assert not set(train_idx) & set(test_idx)
    x_train, y_train = slot_features(cap, engine, train_idx, seed=seed, keep=keep)
    x_test, y_test = slot_features(cap, engine, test_idx, seed=seed, keep=keep)
    if not len(y_train) or not len(y_test):
        raise ValueError(f"no objects in the discarded slots of {n} val items: ask for more items (--n)")
    classes = len(shapes.COLOR_NAMES)
    majority = int(torch.bincount(y_train, minlength=classes).argmax())
    accuracy = {k: round(linear_probe(x_train[k], y_train, x_test[k], y_test, classes=classes, steps=steps,
                                      seed=seed), 4) for k in x_train}
    return {"diagnostic": "slot-probe", "seed": seed, "n": n, "keep": keep,
            "train_items": [train_idx.start, train_idx.stop], "test_items": [test_idx.start, test_idx.stop],
            "train_objects": len(y_train), "test_objects": len(y_test),
            "chance": round(float((y_test == majority).float().mean()), 4), "colour_accuracy": accuracy}


def print_slot_probe(result: dict) -> None:
    print(f"linear probe of the object's colour at its slot (test accuracy; {result['train_objects']} train / "
          f"{result['test_objects']} test objects, chance {result['chance']:.2f})")
    for name, acc in result["colour_accuracy"].items():
        print(f"  {name:12s} {acc:.3f}")


# ------------------------------------------------------------------------------------------------ CLI

DIAGNOSTICS = {
    "by-objects": (by_objects, print_by_objects),
    "errors": (errors, print_errors),
    "attention": (attention, print_attention),
    "slot-probe": (slot_probe, print_slot_probe),
}


def _ranges(text: str) -> list[tuple[int, int]]:
    return [shapes.parse_lo_hi(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("diagnostic", choices=list(DIAGNOSTICS))
    p.add_argument("--captioner", required=True, help="caption model folder (CaptionModel.save_pretrained)")
    p.add_argument("--lvlm", default=DEFAULT_LVLM, help="LVLM whose vision tower + base pruner feed it")
    p.add_argument("--n", type=int, default=None,
                   help="items (by-objects: per object range and question type; slot-probe: train + test); "
                        "default " + ", ".join(f"{k} {v}" for k, v in DEFAULT_N.items()))
    p.add_argument("--seed", type=int, default=0, help="val-split seed")
    p.add_argument("--keep", type=int, default=KEEP, help="patches the base pruner keeps (not by-objects)")
    p.add_argument("--objects", default="1,2,4,10-16", help="by-objects: object-count ranges")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="", help="write the numbers here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cap, engine = load_models(args.captioner, args.lvlm)
    run, show = DIAGNOSTICS[args.diagnostic]
    kwargs: dict = {"n": args.n or DEFAULT_N[args.diagnostic], "seed": args.seed}
    if args.diagnostic == "by-objects":
        kwargs["ranges"] = _ranges(args.objects)
    else:
        kwargs["keep"] = args.keep
    result = run(cap, engine, **kwargs)
    result["captioner"] = str(args.captioner)
    show(result)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
