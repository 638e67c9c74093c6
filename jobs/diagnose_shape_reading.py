"""Diagnostics for a Shapes v2 LVLM that cannot answer shape questions: the tower, or the LLM?

From-scratch LVLM runs on today's world answer colour-by-cell questions (``What color is the object in cell
b3?``) at 100% while shape-by-cell ones (``What shape is in cell b6?``) stay at chance. Two subcommands
separate the frozen tower from what is trained on top of it:

* ``tower`` -- linear probes (plain PyTorch, seeded) on the tower's feature layer (LLaVA's layer -2, what the
  projector reads): colour, shape, row and column of each object from one of its 2x2 patch tokens, their mean, and the four
  concatenated, fitted on 80% of the objects of freshly rendered train-split scenes and scored on the rest.
  High held-out accuracy means the information is in the tokens the LLM receives.
* ``answers`` -- an LVLM's greedy first answer token on val items of one question type, against the truth:
  accuracy and the most frequent predicted and true answers (a constant answer is a model that has not
  learnt to read the property at all, rather than one that reads it badly).
* ``layers`` -- where in the LLM the property is lost: linear probes of the object's shape (and, as the
  control, the colour of colour questions' objects; ``--qtypes spatial,exist``: the row / yes-no of questions
  that find their object by colour and shape) on the residual stream after each decoder layer, at the
  question's naming word (cell word, or the shape word) and at the position that predicts the answer. A
  property readable at the naming word but not at the answer position is lost in the hop; one readable at
  neither is never gathered from the patches. Per head: the naming word's attention mass on its object's
  patches, and probes of what the head reads there (its attention-weighted values) and of what it writes into
  the residual (through ``o_proj``).
* ``tokens`` -- the other side of a search: probes of each object's shape and row on the visual tokens'
  residual stream after each decoder layer.

    .venv/bin/python jobs/diagnose_shape_reading.py tower --lvlm models/shapes_v2/lvlm --json runs/diag/tower.json
    .venv/bin/python jobs/diagnose_shape_reading.py answers --lvlm runs/lvlm_v2fp --qtype shape
    .venv/bin/python jobs/diagnose_shape_reading.py layers --lvlm runs/lvlm_v2fp
    .venv/bin/python jobs/diagnose_shape_reading.py tokens --lvlm runs/lvlm_v2fp
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from jobs.train_utils import shown_path, write_json  # noqa: E402

VIEWS = ("one patch (top-left)", "mean of 4", "4 concatenated")


def _load(path: str):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def object_tokens(model, scenes: int, seed: int, batch: int = 32) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """[objects, 4, Dv] feature-layer tokens of each object's 2x2 patches, and its colour / shape / row / column
    labels (where it is: what a spatial question reads once it has found the object)."""
    from actors import shapes_clip as C
    from actors import shapes_lvlm as L
    from pipeline import shapes_v2 as W

    rng = np.random.default_rng(seed)
    feats, labels = [], {"color": [], "shape": [], "row": [], "column": []}
    for start in range(0, scenes, batch):
        drawn = [W.sample_scene(rng, "train") for _ in range(min(batch, scenes - start))]
        images = [W.render(s, W.sample_background(rng)) for s in drawn]
        with torch.no_grad():
            hidden, _ = L.vision_features(model, C.pixel_values(images))
        for i, scene in enumerate(drawn):
            for o in scene:
                feats.append(hidden[i, 1:][list(W.patch_indices(o))])
                labels["color"].append(W.COLOR_NAMES.index(o.color))
                labels["shape"].append(W.SHAPES.index(o.shape))
                labels["row"].append(o.row)
                labels["column"].append(o.col)
    return torch.stack(feats), {k: torch.tensor(v) for k, v in labels.items()}


def linear_probe(x: torch.Tensor, y: torch.Tensor, *, steps: int = 300, seed: int = 0) -> float:
    """Held-out accuracy (last 20%) of a softmax regression fitted on the first 80% (Adam, full batch)."""
    cut = int(0.8 * len(x))
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x[:cut]), y[:cut]).backward()
        opt.step()
    with torch.no_grad():
        return float((head(x[cut:]).argmax(-1) == y[cut:]).float().mean())


def tower(args) -> dict:
    model, _ = _load(args.lvlm)
    x, labels = object_tokens(model, args.scenes, args.seed)
    x = standardized(x.flatten(0, 1)).view_as(x)  # per dimension over all patches, as the projector's fold
    views = dict(zip(VIEWS, (x[:, 0], x.mean(1), x.flatten(1)), strict=True))
    out = {"objects": len(x), "chance": {name: 1 / int(y.max() + 1) for name, y in labels.items()}}
    for name, y in labels.items():
        out[name] = {view: round(linear_probe(v, y, seed=args.seed), 4) for view, v in views.items()}
    return out


def items_of_type(seed: int, qtype: str, n: int) -> list:
    """The first ``n`` val items of one question type under ``seed``."""
    from pipeline import shapes_v2 as W

    items, i = [], 0
    while len(items) < n:
        item = W.make_item(seed, "val", i)
        i += 1
        if item.question_type == qtype:
            items.append(item)
    return items


def answers(args) -> dict:
    from actors import shapes_clip as C
    from actors import shapes_lvlm as L
    from actors import shapes_lvlm_v2 as V

    model, tok = _load(args.lvlm)
    items = items_of_type(args.seed, args.qtype, args.n)
    pb = V.pack_batch(tok, [[L.Branch(it.question, it.answer, it.question_type, None, True)] for it in items])
    with torch.no_grad():
        logits, labels = L.packed_logits(model, C.pixel_values([V.render(it) for it in items]), pb)
    first = L.first_answer_positions(pb)
    pred = tok.convert_ids_to_tokens(logits[first].argmax(-1).tolist())
    truth = tok.convert_ids_to_tokens(labels[first].tolist())
    hits = sum(p == t for p, t in zip(pred, truth, strict=True))
    return {"qtype": args.qtype, "n": len(items), "accuracy": round(hits / len(items), 4),
            "predicted": Counter(pred).most_common(8), "truth": Counter(truth).most_common(8),
            "example_question": items[0].question}


def standardized(x: torch.Tensor) -> torch.Tensor:
    """Per-dimension standardisation over the rows (the probes' input, as the projector's fold does)."""
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


@torch.no_grad()
def trace(model, tok, items: list, chunk: int = 50) -> dict[str, torch.Tensor]:
    """What the LLM does with each item's decisive naming word (the cell word of colour and shape questions, the
    shape word of exist and spatial ones):

    * ``word`` / ``answer``: [items, layers + 1, D] residual stream (the embeddings, then after each decoder
      layer) at the naming word and at the position that predicts the first answer token;
    * ``mass``: [items, layers, heads] attention from the naming word to its target object's 2x2 patch tokens;
    * ``value``: [items, layers, heads, head_dim] what each head reads there (attention-weighted values);
    * ``written``: [items, layers, heads, D] what each head adds to the naming word's residual (its value
      through its slice of ``o_proj``).
    Eager attention (the maps are needed); each layer's attention input is kept by ``AttentionCapture``."""
    from actors import shapes_clip as C
    from actors import shapes_lvlm as L
    from actors import shapes_lvlm_v2 as V
    from actors.attention_rows import AttentionCapture
    from pipeline import shapes_v2 as W

    llm = model.model.language_model
    llm.config._attn_implementation = "eager"
    got: dict[str, list] = {"word": [], "answer": [], "mass": [], "value": [], "written": []}
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        pb = V.pack_batch(tok, [[L.Branch(it.question, it.answer, it.question_type, None, True, it.objects,
                                          it.target)] for it in part])  # the scene: for the naming word's place
        with AttentionCapture(llm, set(range(len(llm.layers)))) as cap:
            out = llm(inputs_embeds=L.packed_embeds(model, C.pixel_values([V.render(it) for it in part]), pb),
                      attention_mask=pb.attention_mask, position_ids=pb.position_ids, use_cache=False,
                      output_hidden_states=True, output_attentions=True)
        stream = torch.stack(out.hidden_states, 1)  # [B, layers + 1, L, D]
        rows = torch.tensor([r for r, _, _ in pb.hop_targets])
        words = torch.tensor([k[0] for _, _, k in pb.hop_targets])
        got["word"].append(stream[rows, :, words])
        got["answer"].append(stream[rows, :, torch.tensor([a for _, a, _ in pb.hop_targets])])
        objects = [torch.nonzero(pb.image_mask[r]).flatten()[[p for o in it.target
                                                               for p in W.patch_indices(it.objects[o])]]
                   for r, it in zip(rows.tolist(), part, strict=True)]  # none for an exist question's "no"
        mass, value, written = [], [], []
        for i, layer in enumerate(llm.layers):
            attn = layer.self_attn
            a = out.attentions[i][rows, :, words]  # [T, H, L]
            kept = cap.inputs[i]["hidden"]
            v = attn.v_proj(kept).view(*kept.shape[:2], -1, attn.head_dim)
            v = v.repeat_interleave(attn.num_key_value_groups, dim=2)[rows]  # [T, L, H, hd]
            read = torch.einsum("thl,tlhd->thd", a, v[:, : a.shape[-1]])
            w_o = attn.o_proj.weight.view(attn.o_proj.weight.shape[0], -1, attn.head_dim)  # [D, H, hd]
            mass.append(torch.stack([a[t][:, objects[t]].sum(-1) for t in range(len(rows))]))
            value.append(read)
            written.append(torch.einsum("thd,ehd->the", read, w_o))
        got["mass"].append(torch.stack(mass, 1))
        got["value"].append(torch.stack(value, 1))
        got["written"].append(torch.stack(written, 1))
    return {k: torch.cat(v) for k, v in got.items()}


NAMING_WORD = {"shape": "cell word", "color": "cell word", "spatial": "shape word", "exist": "shape word"}


def answer_values(qtype: str) -> tuple[str, ...]:
    """The answers a question type can have (the probes' classes)."""
    from pipeline import shapes_v2 as W

    return {"shape": W.SHAPES, "color": W.COLOR_NAMES, "spatial": W.ROW_ANSWERS,
            "exist": ("yes", "no")}[qtype]


def layers(args) -> dict:
    """Per layer, held-out linear-probe accuracy of the answer at the question's decisive naming word (the cell
    word of colour and shape questions, the shape word of spatial and exist ones) and at the answer position;
    for every type but colour (the control) also, per head, its attention mass on the target object and the
    probe on what it reads there and on what it writes into the naming word (a head that reads the property and
    writes none loses it in ``o_proj``), and on the layer's attention output there (the heads' writes summed: do
    they cancel?). A spatial question's answer is its object's row: found by colour and shape, read by place."""
    model, tok = _load(args.lvlm)

    def probe(x: torch.Tensor, y: torch.Tensor) -> float:
        return round(linear_probe(standardized(x), y, seed=args.seed), 4)

    out = {}
    for qtype in args.qtypes.split(","):
        values = answer_values(qtype)
        word = NAMING_WORD[qtype]
        items = items_of_type(args.seed, qtype, args.n)
        y = torch.tensor([values.index(it.answer) for it in items])
        t = trace(model, tok, items)
        out[qtype] = {"chance": round(1 / len(values), 4), "items": len(items), "layers": [
            {"layer": k, word: probe(t["word"][:, k], y), "answer position": probe(t["answer"][:, k], y)}
            for k in range(t["word"].shape[1])]}
        if qtype != "color":
            out[qtype]["heads"] = [
                {"layer": i, "mass on the object": [round(float(m), 3) for m in t["mass"][:, i].mean(0)],
                 "reads": [probe(t["value"][:, i, h], y) for h in range(t["value"].shape[2])],
                 "writes": [probe(t["written"][:, i, h], y) for h in range(t["written"].shape[2])],
                 "all heads write": probe(t["written"][:, i].sum(1), y)}
                for i in range(t["mass"].shape[1])]
    return out


def tokens(args) -> dict:
    """Per layer, linear probes of each object's shape and row on the visual tokens' residual stream inside the
    LLM (its top-left patch, and the mean of its four): what a search for a colour and shape could match (shape)
    and what it would read (row). Held there, a search that never finds its object fails in the query-key match,
    not for want of the information."""
    from actors import shapes_clip as C
    from actors import shapes_lvlm as L
    from actors import shapes_lvlm_v2 as V
    from pipeline import shapes_v2 as W

    model, tok = _load(args.lvlm)
    llm = model.model.language_model
    items = items_of_type(args.seed, "color", args.scenes)  # one question per scene: only the image matters
    pb = V.pack_batch(tok, [[L.Branch(it.question, it.answer, it.question_type, None, True)] for it in items])
    with torch.no_grad():
        out = llm(inputs_embeds=L.packed_embeds(model, C.pixel_values([V.render(it) for it in items]), pb),
                  attention_mask=pb.attention_mask, position_ids=pb.position_ids, use_cache=False,
                  output_hidden_states=True)
    stream = torch.stack(out.hidden_states, 1)  # [B, layers + 1, L, D]
    one, four, labels = [], [], {"shape": [], "row": []}
    for b, it in enumerate(items):
        place = torch.nonzero(pb.image_mask[b]).flatten()
        for o in it.objects:
            patches = place[list(W.patch_indices(o))]
            one.append(stream[b, :, patches[0]])
            four.append(stream[b, :, patches].mean(1))
            labels["shape"].append(W.SHAPES.index(o.shape))
            labels["row"].append(o.row)
    order = torch.randperm(len(one), generator=torch.Generator().manual_seed(args.seed))  # scenes mixed in the split
    one, four = torch.stack(one)[order], torch.stack(four)[order]
    ys = {k: torch.tensor(v)[order] for k, v in labels.items()}
    return {"objects": len(one), "chance": {"shape": round(1 / len(W.SHAPES), 4), "row": round(1 / W.CELLS, 4)},
            "layers": [{"layer": k, **{f"{name} ({view})": round(linear_probe(standardized(x[:, k]), y,
                                                                              seed=args.seed), 4)
                                       for name, y in ys.items() for view, x in (("one patch", one), ("mean of 4", four))}}
                       for k in range(stream.shape[1])]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tower", help="linear probes of colour and shape on the tower's feature layer")
    t.add_argument("--scenes", type=int, default=384, help="rendered train-split scenes (20-28 objects each)")
    a = sub.add_parser("answers", help="an LVLM's first answer tokens on val items of one question type")
    a.add_argument("--qtype", default="shape", help="question type (color, shape, count, exist, spatial)")
    a.add_argument("--n", type=int, default=100, help="val items of that type")
    la = sub.add_parser("layers", help="probes of the asked property along the LLM's residual stream")
    la.add_argument("--n", type=int, default=500, help="val items per question type")
    la.add_argument("--qtypes", default="shape,color",
                    help="comma-separated question types to trace (shape, color, spatial, exist)")
    tk = sub.add_parser("tokens", help="probes of shape and row on the visual tokens inside the LLM")
    tk.add_argument("--scenes", type=int, default=120, help="val scenes (20-28 objects each)")
    for s in (t, a, la, tk):
        s.add_argument("--lvlm", default=str(REPO / "models/shapes_v2/lvlm"), help="a Shapes v2 LVLM folder")
        s.add_argument("--seed", type=int, default=1234, help="scene seed (the val seed of train_lvlm_v2.py for answers)")
        s.add_argument("--threads", type=int, default=2)
        s.add_argument("--json", help="also write the result here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"tower": tower, "answers": answers, "layers": layers, "tokens": tokens}[args.command](args)
    out = {"command": f"jobs/diagnose_shape_reading.py {' '.join(sys.argv[1:] if argv is None else argv)}",
           "lvlm": shown_path(args.lvlm), "result": result}
    print(json.dumps(out, indent=1))
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
