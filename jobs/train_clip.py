"""Train the proving ground v2's CLIP (``actors/shapes_clip.py``) on Shapes v2 scenes, on CPU, resumably.

Three losses, every step, on freshly rendered train-split scenes (never stored):

* **image-text contrastive** (CLIP's symmetric InfoNCE): each image against one object caption of its own
  scene, the batch's other captions as negatives; pooled CLS -> ``visual_projection`` vs EOS -> ``text_projection``;
* **text-to-patch contrastive**: a caption or question against the image's 144 projected patch embeddings
  (``post_layernorm`` + ``visual_projection`` of the last layer), softmax over patches, target = the patches
  of the objects the text is about. This is what makes the projected patch space the one PruMerge+'s text
  picks, CDPruner's relevance and ACCM's mapper read (a question picks its objects' patches);
* **feature-layer probes** (training only, heads discarded): the layer the LVLM reads (-2) must say, per
  patch, the colour, shape, row and column of the cell it lies in, so the LVLM gets an object's identity and
  position from any of its 2x2 patches.

Usage::

    python jobs/train_clip.py --output models/shapes_v2/clip --ckpt runs/clip/ckpt.pt   # add --resume after a stop
    python jobs/train_clip.py --evaluate models/shapes_v2/clip --split test --eval-seed 4242 --json clip_test.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors import shapes_clip as C  # noqa: E402
from jobs.train_utils import log, lr_at  # noqa: E402 - the trainers' one log line and LR schedule
from pipeline import shapes_v2 as world  # noqa: E402

COUNT_CLASSES = 10  # 0..9 objects of one colour or shape (more are counted as 9)


class ProbeHeads(nn.Module):
    """Heads on the LVLM's feature layer (training only): per patch colour / shape / cell row / cell column,
    and on the CLS how many objects of each colour and of each shape the scene holds."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({
            "color": nn.Linear(dim, 1 + len(world.COLOR_NAMES)), "shape": nn.Linear(dim, 1 + len(world.SHAPES)),
            "row": nn.Linear(dim, world.CELLS), "col": nn.Linear(dim, world.CELLS),
        })
        self.counts = nn.ModuleDict({
            "color_counts": nn.Linear(dim, len(world.COLOR_NAMES) * COUNT_CLASSES),
            "shape_counts": nn.Linear(dim, len(world.SHAPES) * COUNT_CLASSES),
        })

    def forward(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """``hidden``: the feature layer [B, 1 + N, D] (CLS first)."""
        out = {name: head(hidden[:, 1:]) for name, head in self.heads.items()}
        out.update({name: head(hidden[:, 0]).view(hidden.shape[0], -1, COUNT_CLASSES)
                    for name, head in self.counts.items()})
        return out


def scene_counts(objects) -> dict[str, np.ndarray]:
    color = np.zeros(len(world.COLOR_NAMES), np.int64)
    shape = np.zeros(len(world.SHAPES), np.int64)
    for o in objects:
        color[world.COLOR_NAMES.index(o.color)] += 1
        shape[world.SHAPES.index(o.shape)] += 1
    return {"color_counts": np.minimum(color, COUNT_CLASSES - 1), "shape_counts": np.minimum(shape, COUNT_CLASSES - 1)}


def relevant_objects(item_objects, qtype: str, target: tuple[int, ...]) -> tuple[int, ...]:
    """The objects a question is about: for ``exist`` every object of the named colour and shape."""
    if qtype == "exist" and target:
        o = item_objects[target[0]]
        return tuple(i for i, p in enumerate(item_objects) if (p.color, p.shape) == (o.color, o.shape))
    return target


def patch_target(objects, idx: tuple[int, ...]) -> np.ndarray:
    t = np.zeros(world.GRID * world.GRID, np.float32)
    for i in idx:
        t[list(world.patch_indices(objects[i]))] = 1.0
    return t


def make_batch(rng: np.random.Generator, n: int, n_objects: tuple[int, int], split: str = "train") -> dict:
    """Images, one caption each (contrastive), one targeted question each (text-to-patch), probe labels."""
    keys = ("color", "shape", "row", "col", "color_counts", "shape_counts")
    images, captions, questions, q_targets, labels = [], [], [], [], {k: [] for k in keys}
    cap_targets, scene_keys, caption_keys = [], [], []
    for _ in range(n):
        objects = world.sample_scene(rng, split, n_objects)
        images.append(np.asarray(world.render(objects, world.sample_background(rng))))
        i = int(rng.integers(len(objects)))
        captions.append(world.caption(objects[i]))
        scene_keys.append({(o.color, o.shape, o.row, o.col) for o in objects})
        caption_keys.append((objects[i].color, objects[i].shape, objects[i].row, objects[i].col))
        cap_targets.append(patch_target(objects, (i,)))
        while True:
            qtype = world.QUESTION_TYPES[int(rng.integers(len(world.QUESTION_TYPES)))]
            asked = world.ask(objects, qtype, rng)
            if asked is not None and asked[2]:
                break
        questions.append(asked[0])
        q_targets.append(patch_target(objects, relevant_objects(objects, qtype, asked[2])))
        for k, v in {**C.patch_labels(objects), **scene_counts(objects)}.items():
            labels[k].append(v)
    return {
        "pixels": C.pixel_values(images), "captions": captions, "questions": questions,
        "patch_targets": torch.from_numpy(np.stack(cap_targets + q_targets)),
        "labels": {k: torch.from_numpy(np.stack(v)) for k, v in labels.items()},
        # caption i is true of image j (the same object in the same cell can be in other scenes too)
        "caption_true": torch.tensor([[key in scene for scene in scene_keys] for key in caption_keys]),
    }


def encode_text(model, tok, texts: list[str]) -> torch.Tensor:
    enc = tok(texts, padding=True, return_tensors="pt")
    out = model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    emb = model.text_projection(out.pooler_output)
    return emb / emb.norm(dim=-1, keepdim=True)


def forward_losses(model, heads: ProbeHeads, tok, batch: dict, weights: dict[str, float],
                   dense_questions: bool = False) -> tuple[torch.Tensor, dict]:
    vis = model.vision_model(pixel_values=batch["pixels"], output_hidden_states=True)
    img = model.visual_projection(vis.pooler_output)
    img = img / img.norm(dim=-1, keepdim=True)
    texts = encode_text(model, tok, batch["captions"] + (batch["questions"] if dense_questions else []))
    n = img.shape[0]
    scale = model.logit_scale.exp()
    logits = scale * texts[:n] @ img.T
    ref = torch.arange(n)
    global_loss = (F.cross_entropy(logits, ref) + F.cross_entropy(logits.T, ref)) / 2
    patches = C.patch_embeddings(model, vis.last_hidden_state)  # [n, N, P]
    owner = torch.cat([ref, ref])[: texts.shape[0]]
    patch_logits = scale * torch.einsum("tp,tnp->tn", texts, patches[owner])
    target = batch["patch_targets"][: texts.shape[0]]
    dense_loss = -(target * patch_logits.log_softmax(-1)).sum(-1).div(target.sum(-1)).mean()
    preds = heads(vis.hidden_states[-2])
    probe = {k: F.cross_entropy(v.flatten(0, 1), batch["labels"][k].flatten()) for k, v in preds.items()}
    count_loss = (probe.pop("color_counts") + probe.pop("shape_counts")) / 2
    probe_loss = sum(probe.values()) / len(probe)
    # the feature layer's CLS attention (head mean, what VisionZip ranks patches by) spread evenly over the
    # objects' patches: the CLS of a real CLIP attends to what the image shows, not to a few patches of it
    objects = (batch["labels"]["color"] > 0).float()
    feature_cls = cls_attention(model, vis.hidden_states[-3], layer_index=-2)
    cls_loss = -(objects * feature_cls.clamp_min(1e-8).log()).sum(-1).div(objects.sum(-1).clamp_min(1)).mean()
    parts = {"global": global_loss.item(), "dense": dense_loss.item(), "probe": probe_loss.item(),
             "count": count_loss.item(), "cls": cls_loss.item()}
    total = (global_loss + weights["dense"] * dense_loss + probe_loss + weights["count"] * count_loss
             + weights["cls"] * cls_loss)
    return total, parts


def cls_attention(model, hidden_in: torch.Tensor, layer_index: int = -1) -> torch.Tensor:
    """[B, N] head-mean attention of the CLS query over the patches in one layer, from that layer's input:
    the last layer's is what PruMerge+ reads, the feature layer's (-2) what VisionZip reads."""
    layer = model.vision_model.encoder.layers[layer_index]
    x = layer.layer_norm1(hidden_in)
    attn = layer.self_attn
    b, t, _ = x.shape
    q = attn.q_proj(x[:, :1]).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
    w = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # [B, H, 1, T]
    return w.mean(1)[:, 0, 1:]


@torch.no_grad()
def evaluate(model, heads: ProbeHeads | None, tok, seed: int, n: int = 200, split: str = "val") -> dict:
    """Held-out retrieval, question-to-patch precision, probe accuracy (with ``heads``) and CLS focus.

    Retrieval: each image against one caption of one of its objects, among ``n`` images; a hit is a match the
    caption is true of (the same object in the same cell is often in other scenes too). Question-to-patch:
    the share of a question's 4 most similar projected patches that lie on the objects it is about (for
    exist, every object of the named colour and shape)."""
    was_training = model.training
    model.eval()
    batch = make_batch(np.random.default_rng([seed, 99, 0]), n, (world.MIN_OBJECTS, world.MAX_OBJECTS), split)
    vis = model.vision_model(pixel_values=batch["pixels"], output_hidden_states=True)
    img = model.visual_projection(vis.pooler_output)
    img = img / img.norm(dim=-1, keepdim=True)
    caps, qs = encode_text(model, tok, batch["captions"]), encode_text(model, tok, batch["questions"])
    sim = caps @ img.T
    truth = batch["caption_true"]
    patches = C.patch_embeddings(model, vis.last_hidden_state)
    q_sim = torch.einsum("tp,tnp->tn", qs, patches)
    q_target = batch["patch_targets"][n:]
    top = q_sim.topk(4, dim=-1).indices
    precision = q_target.gather(1, top).mean().item()
    cap_top = torch.einsum("tp,tnp->tn", caps, patches).topk(4, dim=-1).indices
    cap_precision = batch["patch_targets"][:n].gather(1, cap_top).mean().item()
    preds = heads(vis.hidden_states[-2]) if heads is not None else {}
    probes = {}
    for k, v in preds.items():
        lab = batch["labels"][k]
        mask = lab > 0 if k in ("color", "shape") else torch.ones_like(lab, dtype=torch.bool)
        probes[k] = round((v.argmax(-1) == lab)[mask].float().mean().item(), 4)
    cls = cls_attention(model, vis.hidden_states[-2])
    feature_cls = cls_attention(model, vis.hidden_states[-3], layer_index=-2)
    occupied = (batch["labels"]["color"] > 0).float()
    cover = {}
    for k in (72, 18):  # the 50% and 87.5% budgets: objects with a patch among the k most CLS-attended ones
        for name, att in (("feature_layer", feature_cls), ("last_layer", cls)):
            top = torch.zeros_like(att).scatter_(1, att.topk(k, dim=-1).indices, 1.0)
            per_cell = (top * occupied).view(n, world.CELLS, 2, world.CELLS, 2).amax(dim=(2, 4))
            cells = occupied.view(n, world.CELLS, 2, world.CELLS, 2).amax(dim=(2, 4))
            cover[f"{name}_top{k}"] = round((per_cell.sum() / cells.sum()).item(), 4)
    model.train(was_training)
    return {
        "image_to_text_top1": round(truth.gather(0, sim.argmax(0)[None])[0].float().mean().item(), 4),
        "text_to_image_top1": round(truth.gather(1, sim.argmax(1)[:, None])[:, 0].float().mean().item(), 4),
        "images_a_caption_is_true_of": round(truth.float().sum(1).mean().item(), 2),
        "question_patch_precision_at_4": round(precision, 4),
        "caption_patch_precision_at_4": round(cap_precision, 4),
        **({"probe_accuracy": probes} if heads is not None else {}),
        "cls_attention_on_objects": round((cls * occupied).sum(-1).mean().item(), 4),
        "feature_layer_cls_attention_on_objects": round((feature_cls * occupied).sum(-1).mean().item(), 4),
        "objects_covered_by_top_cls_patches": cover,
        "object_patch_fraction": round(occupied.mean().item(), 4),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", help="folder for the trained CLIPModel + processor")
    p.add_argument("--ckpt", help="training checkpoint (written every --ckpt-every steps)")
    p.add_argument("--evaluate", metavar="DIR", help="only evaluate this trained CLIP folder (--split, --eval-seed)")
    p.add_argument("--split", default="test", choices=["val", "test"], help="--evaluate: split to measure on")
    p.add_argument("--eval-seed", type=int, default=4242, help="--evaluate: seed of the held-out scenes")
    p.add_argument("--eval-images", type=int, default=500, help="--evaluate: images (retrieval among all of them)")
    p.add_argument("--json", help="--evaluate: also write the result here")
    p.add_argument("--probes", action="store_true",
                   help="--evaluate: also fit linear probes (colour, shape, row, column per patch) on the feature "
                        "layer and on the projected patch embeddings")
    p.add_argument("--probe-images", type=int, default=256, help="--probes: train-split images the probes are fit on")
    p.add_argument("--resume", action="store_true", help="continue from --ckpt")
    p.add_argument("--preset", default="default", choices=sorted(C.PRESETS))
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--objects", default="4-28", help="object-count range of the training scenes (LO-HI)")
    p.add_argument("--dense-weight", type=float, default=0.1,
                   help="weight of the caption-to-patch loss (1.0 with --dense-questions made text picks near "
                        "perfect: 97%% of a question's top-4 patches on its objects, unlike a real CLIP)")
    p.add_argument("--dense-questions", action="store_true", help="also train questions against their patches")
    p.add_argument("--count-weight", type=float, default=1.0,
                   help="weight of the feature-layer CLS count probes (how many objects of each colour and shape)")
    p.add_argument("--cls-weight", type=float, default=1.0,
                   help="weight of the loss that spreads the feature layer's CLS attention evenly over the objects' "
                        "patches (without it that attention sat on the background: VisionZip kept half the objects "
                        "at 50%% pruning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=int(os.environ.get("TORCH_THREADS", "2")))
    args = p.parse_args(argv)
    if not args.evaluate and not (args.output and args.ckpt):
        p.error("--output and --ckpt are required to train")
    return args


def linear_probes(model, seed: int, split: str, train_images: int = 256, test_images: int = 100,
                  steps: int = 300) -> dict:
    """What a linear read-out recovers per patch (colour, shape, cell row, cell column) from the feature layer
    (what the LVLM reads) and from the projected patch embeddings (what ACCM's reference caption model reads):
    probes fitted on train-split scenes, scored on ``split`` scenes (colour/shape on occupied patches)."""
    def features(rng_key, n, which_split):
        batch = make_batch(np.random.default_rng(rng_key), n, (world.MIN_OBJECTS, world.MAX_OBJECTS), which_split)
        with torch.no_grad():
            vis = model.vision_model(pixel_values=batch["pixels"], output_hidden_states=True)
            feats = {"feature_layer": vis.hidden_states[-2][:, 1:],
                     "projected": C.patch_embeddings(model, vis.last_hidden_state)}
        return feats, batch["labels"]

    train_feats, train_labels = features([seed, 98, 0], train_images, "train")
    test_feats, test_labels = features([seed, 98, 1], test_images, split)
    out: dict[str, dict[str, float]] = {}
    for space in train_feats:
        x, xt = train_feats[space].flatten(0, 1), test_feats[space].flatten(0, 1)
        mu, sd = x.mean(0), x.std(0) + 1e-6
        x, xt = (x - mu) / sd, (xt - mu) / sd
        out[space] = {}
        for key in ("color", "shape", "row", "col"):
            y, yt = train_labels[key].flatten(), test_labels[key].flatten()
            probe = nn.Linear(x.shape[1], int(y.max()) + 1)
            opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
            for _ in range(steps):
                loss = F.cross_entropy(probe(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                pred = probe(xt).argmax(-1)
            mask = yt > 0 if key in ("color", "shape") else torch.ones_like(yt, dtype=torch.bool)
            out[space][key] = round((pred == yt)[mask].float().mean().item(), 4)
    return out


def evaluate_saved(args) -> dict:
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(args.evaluate)
    res = evaluate(model, None, AutoTokenizer.from_pretrained(args.evaluate), args.eval_seed, args.eval_images,
                   args.split)
    res = {"model": args.evaluate, "split": args.split, "seed": args.eval_seed, "images": args.eval_images, **res}
    if args.probes:
        res["linear_probes"] = linear_probes(model, args.eval_seed, args.split, args.probe_images,
                                             max(1, args.probe_images * 100 // 256))
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return res


def main(argv: list[str] | None = None) -> dict:
    from pipeline.shapes import parse_lo_hi

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.evaluate:
        return evaluate_saved(args)
    tok = C.build_tokenizer()
    model = C.build_clip(args.preset, tokenizer=tok, seed=args.seed)
    heads = ProbeHeads(model.config.vision_config.hidden_size)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    state = {"step": 0, "log": []}
    ckpt = Path(args.ckpt)
    if args.resume and ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"])
        heads.load_state_dict(saved["heads"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        log(f"resumed at step {state['step']}")
    elif args.resume:
        raise SystemExit(f"--resume: {ckpt} does not exist")
    model.train()
    n_objects = parse_lo_hi(args.objects)
    t0, window = time.time(), []
    while state["step"] < args.steps:
        step = state["step"]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup, floor=0.05)
        batch = make_batch(np.random.default_rng([args.seed, 11, step]), args.batch, n_objects)
        weights = {"dense": args.dense_weight, "count": args.count_weight, "cls": args.cls_weight}
        loss, parts = forward_losses(model, heads, tok, batch, weights, args.dense_questions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        window.append(parts)
        state["step"] = step + 1
        if state["step"] % 20 == 0:
            mean = {k: round(sum(w[k] for w in window) / len(window), 4) for k in window[0]}
            log(f"step {state['step']}/{args.steps} loss {mean} scale {model.logit_scale.exp().item():.1f} "
                f"{(time.time() - t0) / len(window):.2f} s/step")
            state["log"].append({"step": state["step"], **mean})
            window, t0 = [], time.time()
        if state["step"] % args.eval_every == 0 or state["step"] == args.steps:
            res = evaluate(model, heads, tok, args.seed)
            state["log"].append({"step": state["step"], "val": res})
            log(f"val {json.dumps(res)}")
        if state["step"] % args.ckpt_every == 0 or state["step"] == args.steps:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(),
                        "state": state, "args": vars(args)}, tmp)
            tmp.replace(ckpt)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    C.build_processor(tok).save_pretrained(out)
    final = evaluate(model, heads, tok, args.seed)
    (out / "training_log.json").write_text(json.dumps({"args": vars(args), "log": state["log"], "final_val": final},
                                                      indent=1))
    log(f"saved {out}")
    return final


if __name__ == "__main__":
    main()
