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
    python jobs/train_accm.py --world v2 --stage pretrain \
        --captioner-arch '{"input_features": "projected"}'               # proving ground v2 (models/shapes_v2)

``--world v2`` trains on Shapes v2 (144 patches, objects over 2x2 patches): budgets of 18 (87.5%) and 9 tokens,
the v2 LVLM, and its CLIP for PruMerge+'s text-guided picks and, with ``input_features: projected``, the CLIP's
projected patch embeddings as the mapper's input (ACCM's reference input).
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

# batches: actors.accm_batches (re-exported here for the jobs and tests that import them from this job)
from actors.accm_batches import (  # noqa: E402, F401
    ABSTAIN_CAPTION,
    ACCM_REFERENCES,
    COUNT_FACTS,
    candidate_kl,
    fact_objects,
    make_batch,
    slot_attributes,
    slot_labels,
    target_slots,
    weighted_indices,
)
from actors.accm_trainable import (  # noqa: E402, F401
    SLOT_ATTRIBUTES,
    STATS_OFFSET,
    ACCMTrainable,
    batches,
    build_or_load,
    caption_val,
    init_from,
)
from jobs.accm_ablation import evaluate, markdown  # noqa: E402, F401
from jobs.train_utils import parse_type_weights  # noqa: E402
from pipeline import shapes  # noqa: E402
from pipeline.worlds import WORLDS  # noqa: E402


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
    engine = LlavaEngine.from_pretrained(config["lvlm"], clip_text_url=config.get("clip"))
    engine.model.requires_grad_(False)
    captioner, selector = build_or_load(config, engine)
    batch_of = batches(config, engine, captioner.config.input_features, captioner.config.kept_context)
    if stage == "pretrain" and not captioner.config.patch_prefix and (config.get("attn_sup") or config.get("slot_read")):
        raise ValueError("--attn-sup / --slot-read supervise patch slots: they need a patch_prefix caption model "
                         "(or pass --attn-sup 0 --slot-read 0)")
    module = ACCMTrainable(captioner, selector, slot_reader=stage == "pretrain" and config.get("slot_read", 0) > 0,
                           attributes=slot_attributes(WORLDS[config.get("world", "v1")])).train()
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
    val = batch_of(config["seed"], "val", list(range(config.get("val_n", 256))), config["keep"])

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
        indices = list(range(offset + step * bsz, offset + (step + 1) * bsz))
        if stage == "pretrain" and config.get("question_weights") and not reading:
            indices = weighted_indices(offset + step * bsz, bsz, config["question_weights"], config["seed"],
                                       WORLDS[config.get("world", "v1")])
        batch = batch_of(config["seed"], "train", indices, step_keep, sizes)
        if stage == "pretrain":
            if reading:  # warm-up: every patch to the mapper, every fact a target -- learn to read before finding
                batch["discarded"] = batch["mapper_full"]
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
            kl = candidate_kl(engine, batch, beams.captions, config.get("accm_reference", "all_tokens"))
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
    p.add_argument("--world", choices=sorted(WORLDS), default="v1",
                   help="Shapes-VQA v1 (models/shapes) or v2 (models/shapes_v2, proving ground v2); sets the "
                        "defaults of the model folders, --clip, --keep and --pretrain-keep")
    p.add_argument("--lvlm", default=None, help="the frozen LVLM (default: models/<world>/lvlm)")
    p.add_argument("--clip", default=None,
                   help="CLIPModel folder: PruMerge+'s text-guided picks and the projected patches a caption model "
                        "with input_features 'projected' reads (default: v1 none, v2 models/shapes_v2/clip)")
    p.add_argument("--captioner", default=None,
                   help="init (accm/eval) and output folder of the caption model (default: models/<world>/captioner)")
    p.add_argument("--selector", default=None, help="default: models/<world>/selector")
    p.add_argument("--selector-text", default=None, metavar="CLIP_DIR",
                   help="fresh selectors: the frozen text encoder is this CLIP's text tower (LongCLIP's role in "
                        "the reference) instead of a random one; with --selector-arch '{\"template\": ...}' for "
                        "a template in its vocabulary")
    p.add_argument("--init-captioner", default=None, metavar="DIR",
                   help="start --captioner (which must not exist yet) from this trained caption model, with "
                        "--captioner-arch's mapper_layers applied: a shallower mapper keeps the first blocks")
    p.add_argument("--pretrain-steps", type=int, default=4500)
    p.add_argument("--accm-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--accm-batch-size", type=int, default=16)
    p.add_argument("--keep", type=int, default=None,
                   help="retained tokens during training (base pruner budget; default 1/8 of the patches: v1 8, v2 18)")
    p.add_argument("--lr-mapper", type=float, default=2e-3)
    p.add_argument("--lr-decoder", type=float, default=2e-3)
    p.add_argument("--lr-decoder-accm", type=float, default=1e-6,
                   help="ACCM stage decoder lr: the authors' 1e-6 (1e-4 moved the captions away from the facts: val "
                        "first-beam exact 0.61 -> 0.42, docs/notes/accm.md Session 5)")
    p.add_argument("--lr-selector", type=float, default=1e-3)
    p.add_argument("--weight-scale", type=float, default=1.0)
    p.add_argument("--accm-reference", choices=ACCM_REFERENCES, default="all_tokens",
                   help="ACCM stage: what each candidate's KL is taken against: all_tokens (the paper: the LVLM "
                        "with every visual token and no caption) or answer (the ground-truth answer one-hot, "
                        "i.e. -log p(answer | caption): for an LVLM that misreads its full image often)")
    p.add_argument("--weight-max", type=float, default=5.0)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=500)
    p.add_argument("--eval-seed", type=int, default=4242)
    p.add_argument("--eval-split", choices=("val", "test"), default="test",
                   help="val to choose between variants (with a seed of your own); test to report the chosen one")
    p.add_argument("--eval-out", default=None, help="write the ablation table to OUT.json and OUT.md")
    p.add_argument("--eval-rates", default="0.875,0.9375",
                   help="pruning rates of the base pruner + ACCM rows of the ablation (comma-separated)")
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
    p.add_argument("--pretrain-keep", default=None, metavar="LO-HI",
                   help="pretrain with a base-pruner budget drawn per step from LO-HI ('': --keep; default 1/16 to "
                        "1/8 of the patches: v1 4-8, v2 9-18); a small "
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
    p.add_argument("--count-facts", choices=COUNT_FACTS, default="total",
                   help="what a count question's caption target says: the total, or one caption per counted object "
                        "wholly among the discarded patches, which the LVLM adds to those it sees "
                        "(actors.accm_batches.listed_count_fact; an LVLM trained with train_lvlm_v2.py --count-list)")
    p.add_argument("--pretrain-question-weights", default="", metavar="TYPE=W,...",
                   help="pre-training: draw question types by these weights (unnamed types 1), e.g. count=3")
    p.add_argument("--kept-context", action="store_true",
                   help="a loaded caption model reads the kept patches too, flagged (the project's option, "
                        "actors.kept_context; ACCM reads the discarded ones only); a count fact is then always a target")
    p.add_argument("--max-caption-tokens", type=int, default=None,
                   help="raise a loaded caption model's caption length (list captions are longer)")
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
        # worker_niceness 0: Ray starts workers at nice 15 by default, and the Ray Train worker here is the whole
        # job; beside any other process it then starved (a few steps a minute). Ray's job manager does the same.
        # The dashboard serves the State API that Ray Train's PlacementGroupCleaner polls: without it the cleaner
        # warned every few seconds (~370 lines per ACCM stage; 39 in --smoke, 0 with it).
        ray.init(address="local", num_cpus=max(2, threads), include_dashboard=True, log_to_driver=True,
                 runtime_env={"env_vars": env}, _system_config={"worker_niceness": 0})


def world_defaults(args: argparse.Namespace) -> None:
    """Fill the flags left unset from ``--world``: its model folders, CLIP, and budgets of 1/8 (1/16) of its
    patches -- the 87.5% (93.75%) pruning rates the cards report."""
    folder = REPO / ("models/shapes" if args.world == "v1" else "models/shapes_v2")
    patches = WORLDS[args.world].GRID ** 2
    for key in ("lvlm", "captioner", "selector"):
        if getattr(args, key) is None:
            setattr(args, key, str(folder / key))
    if args.clip is None and args.world == "v2":
        args.clip = str(folder / "clip")
    if args.keep is None:
        args.keep = patches // 8
    if args.pretrain_keep is None:
        args.pretrain_keep = f"{patches // 16}-{patches // 8}"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.smoke and args.world != "v1":
        raise SystemExit("--smoke builds a tiny v1 LVLM: run it with --world v1 (tests/test_train_accm.py covers v2)")
    world_defaults(args)
    arch_c, arch_s = DEFAULT_CAPTIONER, DEFAULT_SELECTOR
    # Ray Train workers run in their own directory: hand them absolute paths
    for key in ("lvlm", "clip", "selector_text", "captioner", "selector", "storage", "resume"):
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
    if args.selector_text:
        arch_s = {**arch_s, "text_encoder_dir": args.selector_text}
    if args.init_captioner:
        init_from(args.init_captioner, args.captioner, json.loads(args.captioner_arch or "{}"))
    base = dict(lvlm=args.lvlm, clip=args.clip, world=args.world, keep=args.keep, seed=args.seed,
                threads=args.threads, ckpt_every=args.ckpt_every,
                captioner_arch=arch_c, selector_arch=arch_s, lr_mapper=args.lr_mapper,
                weight_scale=args.weight_scale, weight_max=args.weight_max, accm_reference=args.accm_reference,
                pretrain_targets=args.pretrain_targets, count_facts=args.count_facts,
                max_caption_tokens=args.max_caption_tokens, kept_context=args.kept_context,
                question_weights=parse_type_weights(args.pretrain_question_weights),
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
                             rates=tuple(float(r) for r in args.eval_rates.split(",")),
                             batch_size=min(64, args.eval_n), split=args.eval_split, world=args.world,
                             clip=args.clip, count_facts=args.count_facts)
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
