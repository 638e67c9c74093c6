"""Train ACCM's caption model and selector against a frozen LVLM (SPEC §1.2-1.5), on Ray Train + DeepSpeed.

Stages (``--stage``):

* ``pretrain`` -- the caption model as a plain captioner (ClipCap's COCO stage, here): target = the
  scene fact that answers the question (``pipeline.shapes.fact``), mapper fed the patches the base pruner
  (``prumerge_plus``) discards from the LVLM's frozen vision tower. Mapper + decoder train.
* ``accm`` -- the self-supervised stage, exactly SPEC §1.5: per sample N beam captions; the frozen LVLM
  scores the ground-truth answer teacher-forced with all tokens and no caption (reference) and with the
  k retained tokens + caption_i; KL(ref || cand_i) per candidate; best = argmin; w = scale * batch mean of
  (mean KL - best KL); loss = w * CE(caption model on the best caption) + w * KL(one-hot(best) || selector).
  The mapper is frozen; the decoder and the selector's classifier train.
* ``all`` -- pretrain then accm; ``eval`` -- the ablation table of the model card (no Ray needed).

Each training stage runs in Ray Train's ``TorchTrainer`` (one worker, gloo) with DeepSpeed ZeRO-2 over a
client ``torch.optim.AdamW`` (no DeepSpeed op compile on CPU); checkpoints go through
``ray.train.report(checkpoint=...)`` (HF-layout models + the DeepSpeed state); re-launching a stage under
the same ``--name`` and ``--storage`` resumes from its latest checkpoint (``--resume DIR``: from any one). ``--smoke`` runs every stage for a few steps on tiny random models.

    python jobs/train_accm.py --stage all --lvlm models/shapes/lvlm       # ~the shipped checkpoints
    python jobs/train_accm.py --stage eval --lvlm models/shapes/lvlm      # the ablation table
    python jobs/train_accm.py --smoke                                     # CI
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from pipeline import shapes  # noqa: E402

# ------------------------------------------------------------------------------------------------ data


def make_batch(engine, seed: int, split: str, indices: list[int], keep: int,
               n_objects: tuple[int, int] | None = None) -> dict:
    """Shapes-VQA items -> frozen tower -> base pruner: everything a training/eval step needs.

    ``n_objects``: scene sizes other than the benchmark's (pre-training's curriculum)."""
    sizes = n_objects or (shapes.MIN_OBJECTS, shapes.MAX_OBJECTS)
    items = [shapes.make_item(seed, split, i, n_objects=sizes) for i in indices]
    questions = [it.question for it in items]
    ids = [it.id for it in items]
    with torch.no_grad():
        vision = engine.encode_images(engine.preprocess([shapes.render(it.objects) for it in items]))
        pruned = engine.prune(vision, "prumerge_plus", keep, ids, questions)
    slots = [target_slots(it, d) for it, d in zip(items, pruned.discarded_indices.tolist(), strict=True)]
    return {
        "ids": ids,
        "questions": questions,
        "answers": [it.answer for it in items],
        "qtypes": [it.question_type for it in items],
        "facts": [shapes.fact(it.objects, it.question_type, it.question, it.target) for it in items],
        "discarded": pruned.discarded,
        # can the caption model see the object the question names? (count/exist facts: always stated)
        "target_discarded": [it.question_type in ("count", "exist") or
                             shapes.patch_index(it.objects[it.target[0]]) not in set(kept)
                             for it, kept in zip(items, pruned.kept_indices.tolist(), strict=True)],
        "target_slots": slots,
        # does the mapper see every object the fact is about? (exist-no facts are about none: always)
        "fact_visible": [len(s) == len(fact_objects(it)) for it, s in zip(items, slots, strict=True)],
        "slot_labels": slot_labels(items, pruned.discarded_indices),
        "retained": list(pruned.retained.unbind(0)),
        "full": list(vision.patch_features.unbind(0)),
    }


def fact_objects(item) -> tuple[int, ...]:
    """The objects an item's fact is about: every object a count question counts, else the one it names."""
    return item.target if item.question_type == "count" else item.target[:1]


def target_slots(item, discarded_indices: list[int]) -> list[int]:
    """Slots (positions in the discarded-patch list) of the objects an item's fact is about; objects the
    base pruner kept are not there."""
    slot_of = {patch: slot for slot, patch in enumerate(discarded_indices)}
    cells = (shapes.patch_index(item.objects[o]) for o in fact_objects(item))
    return [slot_of[c] for c in cells if c in slot_of]


# What the caption model is taught to say when the mapper does not see what the fact is about
# (``--pretrain-targets abstain``): it stops at once, and nothing is spliced (actors.prompt.has_words).
ABSTAIN_CAPTION = "."


SLOT_ATTRIBUTES = (len(shapes.COLOR_NAMES), len(shapes.SHAPES), shapes.GRID, shapes.GRID)  # colour, shape, row, col


def slot_labels(items, discarded_indices: Tensor) -> Tensor:
    """[B, M, 4] (colour, shape, row, column) classes of the object in each discarded-patch slot; -100 where no
    object is. What a fact can ask about a patch: its attributes, and where it is (spatial questions)."""
    labels = torch.full((*discarded_indices.shape, len(SLOT_ATTRIBUTES)), -100, dtype=torch.long)
    for r, (item, patches) in enumerate(zip(items, discarded_indices.tolist(), strict=True)):
        slot_of = {patch: slot for slot, patch in enumerate(patches)}
        for o in item.objects:
            slot = slot_of.get(shapes.patch_index(o))
            if slot is not None:
                labels[r, slot] = torch.tensor([shapes.COLOR_NAMES.index(o.color), shapes.SHAPES.index(o.shape),
                                                o.row, o.col])
    return labels


def candidate_kl(engine, batch: dict, candidates: list[list[str]]) -> Tensor:
    """[B, N]: KL(reference || with caption_i), averaged over the answer positions (SPEC §1.5)."""
    from actors.accm import answer_log_probs

    b, n = len(candidates), len(candidates[0])
    with torch.no_grad():
        ref = answer_log_probs(engine, batch["full"], batch["questions"], [None] * b, batch["answers"])
        flat = [c for cands in candidates for c in cands]
        rep = [i for i in range(b) for _ in range(n)]
        cand = answer_log_probs(engine, [batch["retained"][i] for i in rep], [batch["questions"][i] for i in rep],
                                flat, [batch["answers"][i] for i in rep])
    kl = torch.stack([(ref[i].exp() * (ref[i] - c)).sum(-1).mean() for i, c in zip(rep, cand, strict=True)])
    return kl.view(b, n)


# ------------------------------------------------------------------------------------------------ model


class ACCMTrainable(nn.Module):
    """Caption model + selector as one module so that DeepSpeed wraps (and checkpoints) both."""

    def __init__(self, captioner, selector, slot_reader: bool = False) -> None:
        super().__init__()
        self.captioner = captioner
        self.selector = selector
        # pre-training only (not saved with the caption model): a linear read-out of each patch slot's colour,
        # shape, row and column from the hidden state the supervised attention heads read, so that it keeps
        # them (--slot-read)
        self.slot_reader = nn.Linear(captioner.config.hidden, sum(SLOT_ATTRIBUTES)) if slot_reader else None

    def forward(self, stage: str, batch: dict, best_captions: list[str] | None = None,
                candidates: list[list[str]] | None = None, best: Tensor | None = None,
                attention_weight: float = 0.0, read_weight: float = 0.0) -> dict[str, Tensor]:
        if stage == "pretrain":
            rows = batch["train_rows"] if "train_rows" in batch else list(range(len(batch["questions"])))
            if not rows:  # no item's fact is visible to the mapper: nothing to learn from this batch
                zero = sum(p.sum() for p in self.captioner.parameters()) * 0.0  # keeps DeepSpeed's backward happy
                return {"loss": zero, "caption_ce": zero.detach(), "attention_loss": zero.detach()}
            slots = [batch["target_slots"][i] for i in rows] if attention_weight > 0 else None
            read = read_weight > 0 and self.slot_reader is not None
            out = self.captioner.caption_losses(batch["discarded"][rows], [batch["questions"][i] for i in rows],
                                                [batch["facts"][i] for i in rows], target_slots=slots,
                                                slot_hidden=read)
            ce, attn = out["caption_ce"].mean(), out["attention"]
            loss, logs = ce + attention_weight * attn, {"caption_ce": ce.detach(), "attention_loss": attn.detach()}
            if read:
                logits = self.slot_reader(out["slot_hidden"]).float().split(SLOT_ATTRIBUTES, dim=-1)
                labels = batch["slot_labels"][rows].to(logits[0].device)
                read_loss = sum(F.cross_entropy(lg.flatten(0, 1), labels[..., a].flatten())
                                for a, lg in enumerate(logits))
                loss = loss + read_weight * read_loss
                logs["slot_read_loss"] = read_loss.detach()
            return {"loss": loss, **logs}
        cap = self.captioner.caption_loss(batch["discarded"], batch["questions"], best_captions).mean()
        logits = self.selector(batch["questions"], candidates)
        sel = F.cross_entropy(logits.float(), best)  # = KL(one-hot(best) || softmax)
        return {"caption_ce": cap, "selector_kl": sel}


STATS_OFFSET = 50_000_000  # train-split item indices used only for the mapper's input statistics


@torch.no_grad()
def caption_val(captioner, batch: dict) -> dict[str, float]:
    """Held-out caption quality: first-beam exact match with the scene fact (and any-of-N), per question type."""
    was_training = captioner.training
    captioner.eval()
    beams = captioner.beam_search(batch["discarded"], batch["questions"])
    captioner.train(was_training)
    per: dict[str, list[tuple[bool, bool]]] = {}
    for cands, f, qt in zip(beams.captions, batch["facts"], batch["qtypes"], strict=True):
        per.setdefault(qt, []).append((cands[0] == f, f in cands))
    rows = [r for v in per.values() for r in v]
    seen = [c[0] == f for c, f, v in zip(beams.captions, batch["facts"], batch["target_discarded"], strict=True) if v]
    out = {"val_exact": sum(a for a, _ in rows) / len(rows), "val_any_beam": sum(b for _, b in rows) / len(rows),
           "val_exact_target_discarded": sum(seen) / max(1, len(seen))}
    out.update({f"val_exact_{k}": sum(a for a, _ in v) / len(v) for k, v in sorted(per.items())})
    return {k: round(v, 4) for k, v in out.items()}


def init_from(source: str, target: str, arch: dict) -> None:
    """Write ``target`` = the trained caption model in ``source``, cut to ``arch["mapper_layers"]`` blocks.

    Only the mapper's depth may change (its first blocks are kept); other arch keys must match the source.
    Refuses an existing ``target`` so that a rerun never overwrites a fine-tuned model with its start."""
    from dataclasses import asdict

    from actors.captioner import CONFIG_NAME, CaptionModel, shallower_mapper

    if (Path(target) / CONFIG_NAME).exists():
        raise SystemExit(f"--init-captioner: {target} already holds a caption model; pick a new --captioner")
    model = CaptionModel.from_pretrained(source)
    current = asdict(model.config)
    other = {k: v for k, v in arch.items() if k != "mapper_layers" and k in current and current[k] != v}
    if other:
        raise SystemExit(f"--init-captioner changes only mapper_layers; these differ from {source}: {other}")
    shallower_mapper(model, arch.get("mapper_layers", model.config.mapper_layers))
    model.save_pretrained(target)
    print(json.dumps({"init_captioner": source, "mapper_layers": model.config.mapper_layers}), flush=True)


def build_or_load(config: dict, engine):
    from actors.captioner import CaptionModel, build_caption_model
    from actors.selector import CaptionSelector, build_selector

    init_c, init_s = config.get("init_captioner"), config.get("init_selector")
    if init_c and (Path(init_c) / "accm_captioner.json").exists():
        captioner = CaptionModel.from_pretrained(init_c)
    else:
        captioner = build_caption_model(engine.tokenizer, feature_dim=engine.config.vision_config.hidden_size,
                                        **config["captioner_arch"])
        # fold feature standardisation into the mapper's Linear (items disjoint from every training batch)
        stats = make_batch(engine, config["seed"], "train", list(range(STATS_OFFSET, STATS_OFFSET + 256)),
                           config["keep"])["discarded"]
        print(json.dumps({"mapper_input_standardized": captioner.mapper.standardize_input(stats)}), flush=True)
    if init_s and (Path(init_s) / "accm_selector.json").exists():
        selector = CaptionSelector.from_pretrained(init_s)
    else:
        selector = build_selector(**config["selector_arch"])
    return captioner, selector


def train_loop(config: dict) -> None:
    """Ray Train worker: one stage of ACCM training under DeepSpeed ZeRO-2."""
    import deepspeed
    import ray.train

    from actors.engine import LlavaEngine

    # gloo does the collectives on CPU: skip DeepSpeed's shared-memory all-reduce op (actors.tp.cpu_gloo_setup)
    if not torch.cuda.is_available():
        from actors.tp import cpu_gloo_setup

        cpu_gloo_setup()

    torch.set_num_threads(config.get("threads", 2))
    torch.manual_seed(config["seed"])
    stage = config["stage"]
    engine = LlavaEngine.from_pretrained(config["lvlm"])
    engine.model.requires_grad_(False)
    captioner, selector = build_or_load(config, engine)
    if stage == "pretrain" and not captioner.config.patch_prefix and (config.get("attn_sup") or config.get("slot_read")):
        raise ValueError("--attn-sup / --slot-read supervise patch slots: they need a patch_prefix caption model "
                         "(or pass --attn-sup 0 --slot-read 0)")
    module = ACCMTrainable(captioner, selector, slot_reader=stage == "pretrain" and config.get("slot_read", 0) > 0).train()
    module.requires_grad_(False)
    if stage == "pretrain":
        groups = [{"params": list(captioner.mapper.parameters()), "lr": config["lr_mapper"]},
                  {"params": list(captioner.decoder.parameters()), "lr": config["lr_decoder"]}]
        if module.slot_reader is not None:
            groups.append({"params": list(module.slot_reader.parameters()), "lr": config["lr_decoder"]})
    else:  # mapper frozen (SPEC §1.5); decoder + selector classifier train; the text encoder stays frozen
        groups = [{"params": list(captioner.decoder.parameters()), "lr": config["lr_decoder"]},
                  {"params": selector.trainable_parameters(), "lr": config["lr_selector"]}]
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    ds_config = {
        "train_micro_batch_size_per_gpu": config["batch_size"],
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    steps = config["steps"]
    # linear warm-up (5%) then cosine to 10% of the peak; a function of the step, so resuming restores it
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, steps - warm))))))
    ds, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=sched, config=ds_config)
    val = make_batch(engine, config["seed"], "val", list(range(config.get("val_n", 256))), config["keep"])

    start = 0
    # Ray Train restores the latest checkpoint of a run re-launched under the same name; an explicit
    # directory (``--resume``) is the fallback for starting a new run from an old checkpoint.
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("resume_from"):
        ckpt = ray.train.Checkpoint.from_directory(config["resume_from"])
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / "state.json").read_text())
            if state["stage"] == stage:
                ds.load_checkpoint(str(Path(d) / "ds"), tag="latest_ds")
                start = state["step"]
    bsz, keep = config["batch_size"], config["keep"]
    t0, seen = time.time(), 0
    log: dict[str, float] = {}
    for step in range(start, steps):
        # item indices are a function of (stage, step): a resumed run sees the batches it has not seen yet
        offset = 0 if stage == "pretrain" else 10_000_000
        step_keep, sizes = keep, None
        reading = stage == "pretrain" and step < config.get("pretrain_read_steps", 0)
        if reading:
            sizes = config.get("pretrain_read_objects") or (1, 4)
        elif stage == "pretrain":  # optional curriculum: smaller scenes, smaller budgets (more of the scene visible)
            rng = np.random.default_rng([config["seed"], step])
            lo, hi = config.get("pretrain_keep") or (keep, keep)
            step_keep, sizes = int(rng.integers(lo, hi + 1)), config.get("pretrain_objects")
        batch = make_batch(engine, config["seed"], "train", list(range(offset + step * bsz, offset + (step + 1) * bsz)),
                           step_keep, sizes)
        if stage == "pretrain":
            if reading:  # warm-up: every patch to the mapper, every fact a target -- learn to read before finding
                batch["discarded"] = torch.stack(batch["full"])
            elif config.get("pretrain_targets") == "discarded":  # facts about what the mapper sees (see notes)
                batch["train_rows"] = [i for i, v in enumerate(batch["target_discarded"]) if v]
            elif config.get("pretrain_targets") == "abstain":  # ... and abstain where it cannot see them
                visible = batch["fact_visible"]
                batch["facts"] = [f if v else ABSTAIN_CAPTION for f, v in zip(batch["facts"], visible, strict=True)]
                batch["target_slots"] = [s if v else [] for s, v in zip(batch["target_slots"], visible, strict=True)]
            # the warm-up feeds every patch: slots index the discarded list, so no supervision there
            out = ds("pretrain", batch, attention_weight=0.0 if reading else config.get("attn_sup", 0.0),
                     read_weight=0.0 if reading else config.get("slot_read", 0.0))
            loss = out["loss"]
        else:
            ds.module.captioner.eval()
            beams = ds.module.captioner.beam_search(batch["discarded"], batch["questions"])
            ds.module.captioner.train()
            kl = candidate_kl(engine, batch, beams.captions)
            best = kl.argmin(1)
            margin = kl.mean(1) - kl.gather(1, best[:, None]).squeeze(1)
            weight = (config["weight_scale"] * margin.mean()).clamp(max=config["weight_max"])
            out = ds("accm", batch, [c[i] for c, i in zip(beams.captions, best.tolist(), strict=True)],
                     beams.captions, best)
            loss = weight * (out["caption_ce"] + out["selector_kl"])
            out.update(weight=weight, kl_best=kl.min(1).values.mean(), kl_mean=kl.mean(),
                       best_is_first=(best == 0).float().mean())
        ds.backward(loss)
        ds.step()
        seen += bsz
        for k, v in out.items():
            log[k] = 0.9 * log.get(k, float(v)) + 0.1 * float(v)
        done = step + 1
        if done % config["ckpt_every"] == 0 or done == steps:
            metrics = {"stage": stage, "step": done, "started_at": start, "samples_per_s": seen / (time.time() - t0),
                       "lr": sched.get_last_lr()[0], **{k: round(v, 4) for k, v in log.items()},
                       **caption_val(ds.module.captioner, val)}
            with tempfile.TemporaryDirectory() as d:
                ds.module.captioner.save_pretrained(Path(d) / "captioner")
                ds.module.selector.save_pretrained(Path(d) / "selector")
                ds.save_checkpoint(str(Path(d) / "ds"), tag="latest_ds")
                (Path(d) / "state.json").write_text(json.dumps({"stage": stage, "step": done, "started_at": start}))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            print(json.dumps(metrics), flush=True)
        elif done % config.get("log_every", 50) == 0:
            print(json.dumps({"stage": stage, "step": done, "samples_per_s": round(seen / (time.time() - t0), 1),
                              **{k: round(v, 4) for k, v in log.items()}}), flush=True)


def run_stage(config: dict, *, storage: str, name: str, resume: str | None = None) -> Path:
    """One stage on Ray Train; returns the local directory of its last checkpoint."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_loop,
        train_loop_config=dict(config, resume_from=resume),
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(storage_path=storage, name=name),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage {config['stage']} produced no checkpoint")
    return Path(result.checkpoint.path)


# ------------------------------------------------------------------------------------------------ eval


def evaluate(lvlm: str, captioner_dir: str, selector_dir: str, *, n: int, seed: int, keeps: list[int],
             batch_size: int = 64, split: str = "test") -> dict:
    """Ablation: base pruner alone, + first beam, + selector (ACCM), + oracle fact. ``split="val"`` is for
    choosing between trained variants; the test split is only for reporting the chosen one."""
    from actors.accm import ACCMCaptioner
    from actors.engine import LlavaEngine
    from actors.prompt import has_words

    engine = LlavaEngine.from_pretrained(lvlm)
    accm = ACCMCaptioner.from_pretrained(captioner_dir, selector_dir)
    rows: dict[str, dict] = {}
    caption_rows: dict[str, list[int]] = {}

    types: list[str] = []  # the current batch's question types

    def add(key: str, res, answers, spliced: list[str] | None = None):
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

    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        batch = make_batch(engine, seed, split, idx, keeps[0])
        qs, ans = batch["questions"], batch["answers"]
        items = [shapes.make_item(seed, split, i) for i in idx]
        types[:] = [it.question_type for it in items]
        add("all tokens", engine.generate(batch["full"], qs, method="none"), ans)
        # the equal-cost reference: every plain pruner at 75% pruning (16 of 64 tokens)
        vision = engine.encode_images(engine.preprocess([shapes.render(it.objects) for it in items]))
        for method in ("random", "fastv", "visionzip", "prumerge_plus"):
            kept = (batch["full"] if method == "fastv"
                    else engine.prune(vision, method, 16, batch["ids"], qs).retained)
            # FastV's layer 2, or the last layer that still has one after it (the smoke's 2-layer LLM)
            fastv_layer = min(2, engine.config.text_config.num_hidden_layers - 1)
            add(f"75% {method}", engine.generate(kept, qs, method=method, keep_tokens=16, fastv_layer=fastv_layer),
                ans)
        for keep in keeps:
            if keep != keeps[0]:
                batch = make_batch(engine, seed, split, idx, keep)
            rate = f"{100 * (1 - keep / 64):g}%"
            add(f"{rate} prumerge_plus", engine.generate(batch["retained"], qs, method="prumerge_plus",
                                                         keep_tokens=keep), ans)
            out = accm.caption(batch["discarded"], qs)
            cap = [{"flops": f} for f in out.flops_captioner]
            sel = [{"flops": f} for f in out.flops_selector]
            first = [c[0] for c in out.candidates]
            add(f"{rate} + first beam caption", engine.generate(batch["retained"], qs, first, method="accm",
                                                                 keep_tokens=keep, captioner=cap), ans, first)
            add(f"{rate} + selector (ACCM)", engine.generate(batch["retained"], qs, out.selected, method="accm",
                                                             keep_tokens=keep, captioner=cap, selector=sel), ans,
                out.selected)
            add(f"{rate} + oracle caption", engine.generate(batch["retained"], qs, batch["facts"], method="accm",
                                                            keep_tokens=keep), ans, batch["facts"])
            for name, caps in (("first beam", first), ("selector", out.selected)):
                r = caption_rows.setdefault(f"{rate} {name}", [0, 0])
                r[0] += sum(c == f for c, f in zip(caps, batch["facts"], strict=True))
                r[1] += len(caps)
    table = {k: {"accuracy": v["correct"] / v["n"], "mflops_per_item": v["flops"] / v["n"] / 1e6, "n": v["n"],
                 "accuracy_by_type": {t: c / m for t, (c, m) in sorted(v["by_type"].items())}}
             for k, v in rows.items()}
    for k, v in rows.items():
        if "caption" in k or "ACCM" in k:
            table[k]["caption_spliced"] = v["spoke"] / v["n"]
    for k, (hit, total) in caption_rows.items():  # how often the spliced caption is exactly the scene fact
        table[k.replace(" first beam", " + first beam caption").replace(" selector", " + selector (ACCM)")][
            "caption_is_fact"] = hit / total
    return table


def markdown(table: dict) -> str:
    """The ablation, then accuracy by question type (older tables without the breakdown print the first part)."""
    lines = ["| setting | accuracy | MFLOPs / item | caption spliced | caption = fact |", "|---|---:|---:|---:|---:|"]
    for k, v in table.items():
        spliced = f"{100 * v['caption_spliced']:.1f}%" if "caption_spliced" in v else ""
        fact = f"{100 * v['caption_is_fact']:.1f}%" if "caption_is_fact" in v else ""
        lines.append(f"| {k} | {100 * v['accuracy']:.1f}% | {v['mflops_per_item']:.1f} | {spliced} | {fact} |")
    types = sorted({t for v in table.values() for t in v.get("accuracy_by_type", {})})
    if types:
        lines += ["", "| setting | " + " | ".join(types) + " |", "|---|" + "---:|" * len(types)]
        for k, v in table.items():
            by = v.get("accuracy_by_type", {})
            lines.append(f"| {k} | " + " | ".join(f"{100 * by[t]:.1f}%" if t in by else "" for t in types) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main

# Width 64 because narrower caption models did not learn to read the patches (measured, docs/notes/accm.md): at
# widths 32/40/48 the validation caption CE stayed on the language-prior plateau (~0.76) for 600+ steps.
# patch_prefix: the decoder sees one slot per discarded patch and picks the named one with its own attention
# (with --attn-sup / --slot-read in pre-training; session 5: val first-beam exact 0.30 -> 0.80 on items whose
# named object the mapper sees). Dropout 0: the data are generated afresh every step, and dropout on the
# supervised attention maps would zero the target entries.
DEFAULT_CAPTIONER = dict(hidden=64, decoder_layers=2, decoder_heads=4, decoder_intermediate=128, prefix_len=4,
                         patch_prefix=True, mapper_layers=2, mapper_heads=4, beams=3, max_caption_tokens=14,
                         dropout=0.0)
DEFAULT_SELECTOR = dict(text_hidden=24, text_layers=1, text_heads=2, projection_dim=24, layers=1, heads=2,
                        rank_embedding=True)
SMOKE_CAPTIONER = dict(hidden=32, decoder_layers=1, decoder_heads=2, prefix_len=2, patch_prefix=True, mapper_layers=1,
                       mapper_heads=2, beams=3, max_caption_tokens=6)
SMOKE_SELECTOR = dict(text_hidden=32, text_layers=1, text_heads=2, projection_dim=32, layers=1, heads=2,
                      rank_embedding=True)


SMOKE_STAGES = ("pretrain", "accm", "accm-resume", "eval")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("pretrain", "accm", "all", "eval"), default="all")
    p.add_argument("--lvlm", default=str(REPO / "models/shapes/lvlm"))
    p.add_argument("--captioner", default=str(REPO / "models/shapes/captioner"),
                   help="init (accm/eval) and output folder of the caption model")
    p.add_argument("--selector", default=str(REPO / "models/shapes/selector"))
    p.add_argument("--init-captioner", default=None, metavar="DIR",
                   help="start --captioner (which must not exist yet) from this trained caption model, with "
                        "--captioner-arch's mapper_layers applied: a shallower mapper keeps the first blocks")
    p.add_argument("--pretrain-steps", type=int, default=4500)
    p.add_argument("--accm-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--accm-batch-size", type=int, default=16)
    p.add_argument("--keep", type=int, default=8, help="retained tokens during training (base pruner budget)")
    p.add_argument("--lr-mapper", type=float, default=2e-3)
    p.add_argument("--lr-decoder", type=float, default=2e-3)
    p.add_argument("--lr-decoder-accm", type=float, default=1e-6,
                   help="ACCM stage decoder lr: the authors' 1e-6 (1e-4 moved the captions away from the facts: val "
                        "first-beam exact 0.61 -> 0.42, docs/notes/accm.md Session 5)")
    p.add_argument("--lr-selector", type=float, default=1e-3)
    p.add_argument("--weight-scale", type=float, default=1.0)
    p.add_argument("--weight-max", type=float, default=5.0)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=500)
    p.add_argument("--eval-seed", type=int, default=4242)
    p.add_argument("--eval-split", choices=("val", "test"), default="test",
                   help="val to choose between variants (with a seed of your own); test to report the chosen one")
    p.add_argument("--eval-out", default=None, help="write the ablation table to OUT.json and OUT.md")
    p.add_argument("--storage", default=str(REPO / "runs/ray"))
    p.add_argument("--name", default="accm")
    p.add_argument("--resume", default=None, help="checkpoint directory to resume the (first) stage from")
    p.add_argument("--pretrain-targets", choices=("all", "discarded", "abstain"), default="discarded",
                   help="pretrain on every item's fact, or only where the named object is among the discarded "
                        "patches (the mapper cannot see retained ones; count/exist facts always kept), or "
                        "(abstain) on every item, with '.' (nothing spliced) where the mapper does not see every "
                        "object the fact is about")
    p.add_argument("--pretrain-objects", default="", metavar="LO-HI",
                   help="pretrain on scenes of LO-HI objects (default: the benchmark's 10-16)")
    p.add_argument("--pretrain-keep", default="4-8", metavar="LO-HI",
                   help="pretrain with a base-pruner budget drawn per step from LO-HI ('': --keep); a small "
                        "budget shows the mapper more of the scene")
    p.add_argument("--pretrain-read-steps", type=int, default=0,
                   help="first N pre-training steps: a reading warm-up on small scenes (--pretrain-read-objects) with "
                        "every patch given to the mapper and every fact a target (a fresh caption model learns to read "
                        "one object in ~500 such steps, and does not learn it from 10-16 object scenes)")
    p.add_argument("--pretrain-read-objects", default="1-4", metavar="LO-HI", help="scene sizes of the warm-up")
    p.add_argument("--attn-sup", type=float, default=1.0,
                   help="pre-training: weight of the attention supervision (patch_prefix caption models only): half "
                        "the heads of the decoder's last layer, at each caption position, attend to the slots of "
                        "the objects the fact is about (CaptionModel.caption_losses)")
    p.add_argument("--slot-read", type=float, default=1.0,
                   help="pre-training: weight of a linear read-out of each patch slot's colour, shape, row and "
                        "column from the hidden state the supervised heads read (patch_prefix only; not shipped)")
    p.add_argument("--captioner-arch", default=None,
                   help="JSON overrides of the caption model's arch (fresh builds; build_caption_model kwargs), e.g. "
                        "the ACCM reference mapper: '{\"mapper_arch\": \"clipcap\", \"patch_prefix\": false}' "
                        "(with --attn-sup 0 --slot-read 0: a ClipCap prefix has no patch slots)")
    p.add_argument("--selector-arch", default=None,
                   help="JSON overrides of the selector's arch (fresh builds; build_selector kwargs), e.g. the "
                        "ACCM reference classifier: '{\"arch\": \"torch_transformer\"}'")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None, help="--smoke: parent folder of its scratch directory")
    p.add_argument("--smoke", action="store_true", help="a few steps of every stage on tiny random models")
    return p.parse_args(argv)


def _init_ray(threads: int) -> None:
    import ray

    if not ray.is_initialized():
        env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
        ray.init(address="local", num_cpus=max(2, threads), include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": env})


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    arch_c, arch_s = DEFAULT_CAPTIONER, DEFAULT_SELECTOR
    # Ray Train workers run in their own directory: hand them absolute paths
    for key in ("lvlm", "captioner", "selector", "storage", "resume"):
        value = getattr(args, key)
        if value and "://" not in value:
            setattr(args, key, str(Path(value).resolve()))
    work = None
    if args.smoke:
        from actors.tiny import build_tiny_llava

        work = Path(tempfile.mkdtemp(prefix="accm-smoke-", dir=args.workdir))
        build_tiny_llava(work / "lvlm", vision_hidden=32, text_hidden=32, heads=2, kv_heads=1)
        args.lvlm, args.captioner, args.selector = str(work / "lvlm"), str(work / "captioner"), str(work / "selector")
        args.storage, args.batch_size, args.accm_batch_size = str(work / "ray"), 4, 2
        args.pretrain_steps, args.accm_steps, args.ckpt_every, args.eval_n = 2, 2, 1, 4
        arch_c, arch_s = SMOKE_CAPTIONER, SMOKE_SELECTOR
    if args.captioner_arch:
        arch_c = {**arch_c, **json.loads(args.captioner_arch)}
    if args.selector_arch:
        arch_s = {**arch_s, **json.loads(args.selector_arch)}
    if args.init_captioner:
        init_from(args.init_captioner, args.captioner, json.loads(args.captioner_arch or "{}"))
    base = dict(lvlm=args.lvlm, keep=args.keep, seed=args.seed, threads=args.threads, ckpt_every=args.ckpt_every,
                captioner_arch=arch_c, selector_arch=arch_s, lr_mapper=args.lr_mapper,
                weight_scale=args.weight_scale, weight_max=args.weight_max, pretrain_targets=args.pretrain_targets,
                pretrain_objects=shapes.parse_lo_hi(args.pretrain_objects) if args.pretrain_objects else None,
                pretrain_keep=shapes.parse_lo_hi(args.pretrain_keep) if args.pretrain_keep else None,
                pretrain_read_steps=args.pretrain_read_steps, attn_sup=args.attn_sup,
                slot_read=args.slot_read,
                pretrain_read_objects=shapes.parse_lo_hi(args.pretrain_read_objects))
    summary: dict = {}
    stages = ["pretrain", "accm"] if args.stage == "all" else [args.stage]
    if args.smoke:
        stages = list(SMOKE_STAGES)
    resume = args.resume
    for stage in stages:
        if stage == "eval":
            table = evaluate(args.lvlm, args.captioner, args.selector, n=args.eval_n, seed=args.eval_seed,
                             keeps=[8, 4], batch_size=min(64, args.eval_n), split=args.eval_split)
            print(markdown(table))
            summary["eval"] = table
            if args.eval_out:
                out = Path(args.eval_out)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.with_suffix(".json").write_text(json.dumps(table, indent=2) + "\n")
                out.with_suffix(".md").write_text(markdown(table) + "\n")
            continue
        _init_ray(args.threads)
        real = "accm" if stage.startswith("accm") else stage
        cfg = dict(base, stage=real, init_captioner=args.captioner, init_selector=args.selector,
                   batch_size=args.batch_size if real == "pretrain" else args.accm_batch_size,
                   steps=args.pretrain_steps if real == "pretrain" else args.accm_steps,
                   lr_decoder=args.lr_decoder if real == "pretrain" else args.lr_decoder_accm,
                   lr_selector=args.lr_selector)
        if stage == "accm-resume":  # smoke: same run name again -> Ray Train restores, one more step
            cfg["steps"] = args.accm_steps + 1
        t0 = time.time()
        ckpt = run_stage(cfg, storage=args.storage, name=f"{args.name}-{real}", resume=resume)
        resume = None
        state = json.loads((ckpt / "state.json").read_text())
        summary[stage] = {"checkpoint": str(ckpt), "step": state["step"], "seconds": round(time.time() - t0, 1),
                          "started_at": state.get("started_at", 0)}
        for part, out in (("captioner", args.captioner), ("selector", args.selector)):
            shutil.copytree(ckpt / part, out, dirs_exist_ok=True)
        print(json.dumps({stage: summary[stage]}), flush=True)
    if work is not None:
        (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        summary["workdir"] = str(work)
    return summary


if __name__ == "__main__":
    main()
