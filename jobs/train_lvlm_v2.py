"""Train the proving ground v2's LVLM (``actors/shapes_lvlm_v2.py``) on Shapes v2, on CPU, resumably.

The vision tower is the trained Shapes v2 CLIP's (``--clip``), frozen; the projector and the LLaMA decoder are
trained from scratch with v1's recipe (see models/shapes/lvlm/MODEL_CARD.md for why each piece is there):

* projector standardisation: the tower's per-dimension feature mean/std folded into the projector's first
  Linear (the residual stream's shared component otherwise makes the visual tokens look alike to the LLM);
* attention supervision: naming words attend to the patches of the objects they select (``--word-layer``,
  ``--context-layer``), the answer position to the question's decisive word (``--hop-layer``). The forward runs
  on SDPA; the supervised rows are recomputed from the captured layer inputs (``actors/attention_rows.py``);
* stage 1: plain image questions on scenes of every size (1-28 objects); stage 2: instruction tuning with the
  answer's fact beside the image ("additional information") and text-only questions, scenes narrowing to the
  benchmark's 20-28 objects; a share of the fact questions' objects are left out of the image, so the fact is
  the only source (the LVLM must read supplemental text; it never sees ACCM captions or evaluation items);
* optional augmentations, each with its own random generator: token drops (``--drop-visual``), shuffled token
  order (``--shuffle-visual``); and optional signals (``actors/shapes_lvlm_v2_losses.py``): a cell-word weight on
  the context targets (``--cell-weight``), a shape-word weight on the search targets of exist and spatial
  questions (``--search-weight``), a projector loss that points each visual token at its cell word
  (``--cell-grounding``) or an object's tokens at its shape word (``--shape-grounding``), a loss that asks a
  colour / shape question's cell word for its object's colour and shape (``--gather-sup``), one that asks a
  spatial question's shape word for its object's row (``--row-gather``), and count facts
  that list some hidden counted objects instead of the total (``--count-list``); ``--shape-phase N`` holds the
  augmentations and the lookup signals off for the first N stage-2 steps (``phase_args``).

Usage::

    python jobs/train_lvlm_v2.py --clip models/shapes_v2/clip --output runs/lvlm_v2/model --ckpt runs/lvlm_v2/ckpt.pt
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors import shapes_clip as C  # noqa: E402
from actors import shapes_lvlm as L  # noqa: E402
from actors import shapes_lvlm_v2 as V  # noqa: E402
from actors.attention_rows import AttentionCapture  # noqa: E402
from actors.shapes_lvlm_v2_batches import (  # noqa: E402,F401 - their home; tests reach them here too
    StepBatch,
    count_list_facts,
    recount,
    scene_range,
    shuffled_order,
    step_batch,
    visual_keep,
    vqa_batch,
)
from actors.shapes_lvlm_v2_losses import (  # noqa: E402,F401 - the losses' home; tests reach them here too
    cell_grounding_loss,
    cell_weights,
    gather_loss,
    gather_targets,
    patch_cells,
    patch_shapes,
    row_gather_loss,
    row_gather_targets,
    search_weights,
    shape_grounding_loss,
    word_grounding_loss,
)
from jobs.train_lvlm import answer_accuracy  # noqa: E402
from jobs.train_utils import log, lr_at, parse_type_weights  # noqa: E402
from pipeline import shapes_v2 as world  # noqa: E402


def image_question_weights(spec: str) -> tuple[float, ...] | None:
    """``--question-weights count=2,shape=1.5`` -> sampling weights over ``world.QUESTION_TYPES`` for the plain
    image questions (types not named weigh 1); "" -> None (uniform, the batches drawn as always). Why: the
    shipped LVLM's weakest types with all tokens are count and shape (test 74 / 86%, colour 93%)."""
    if not spec:
        return None
    named = parse_type_weights(spec)
    unknown = set(named) - set(world.QUESTION_TYPES)
    if unknown or any(w < 0 for w in named.values()):
        raise ValueError(f"--question-weights: unknown types {sorted(unknown)} or a negative weight in {spec!r}")
    return tuple(named.get(q, 1.0) for q in world.QUESTION_TYPES)


def evaluate(model, tok, items: list, *, with_fact: bool = False, text_only: bool = False,
             keep_rate: float = 1.0) -> dict:
    """v2's val accuracy (``train_lvlm.answer_accuracy`` on the v2 world's 144 patches)."""
    return answer_accuracy(
        model, tok, items, fact=world.fact, pack=V.pack_batch, n_visual=V.N_VISUAL,
        pixels=lambda part: C.pixel_values([V.render(it) for it in part]),
        with_fact=with_fact, text_only=text_only, keep_rate=keep_rate, chunk=50)


def standardize_projector(model, seed: int, n_images: int = 128) -> dict:
    """v1's projector standardisation (``actors.shapes_lvlm.fold_feature_standardisation``) on v2 scenes."""
    rng = np.random.default_rng([seed, 7, 0])
    images = [V.render(world.sample_scene(rng, "train"), world.sample_background(rng)) for _ in range(n_images)]
    return L.fold_feature_standardisation(model, C.pixel_values(images))


def save(model, tok, out: Path, state: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    V.build_processor(tok).save_pretrained(out)
    saved = {k: v for k, v in state.items() if not k.endswith("opt") and k != "t_start"}
    if "t_start" in state:
        saved["minutes"] = round(state["minutes"] + (time.time() - state["t_start"]) / 60, 2)
    (out / "training_log.json").write_text(json.dumps(saved, indent=1))


def combined(*weights: torch.Tensor | None) -> torch.Tensor | None:
    """The product of per-target weights, None where none applies."""
    present = [w for w in weights if w is not None]
    return None if not present else torch.stack(present).prod(0)


SHAPE_PHASE_OFF = {"drop_visual": 0.0, "shuffle_visual": 0.0, "cell_grounding": 0.0, "cell_weight": 1.0,
                   "search_weight": 1.0, "row_gather": 0.0}


def phase_args(args, stage: int, step: int):
    """``--shape-phase N``: the first N stage-2 steps train with every token, in order, and without the lookup-by-
    content levers (``SHAPE_PHASE_OFF``), so that ``--shape-grounding`` and ``--gather-sup`` teach the cell word to
    read shape before the lookup must be found again under shuffled tokens. Why: alone, that pair read image
    shape by stage-2 step 600 (design note, session 15); with every lever shape came at ~1500 in one run of two
    and not at all in the other (sessions 17-18)."""
    if stage != 2 or step >= args.shape_phase:
        return args
    return argparse.Namespace(**{**vars(args), **SHAPE_PHASE_OFF})


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (oneDNN's probe: avx512_bf16 or AMX). Asked once per process:
    ``forward_precision`` asks it on every step, and the answer cannot change."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolved_precision(autocast: str) -> str:
    """What ``--autocast`` runs on this CPU: ``"bf16"`` or ``"fp32"``. ``auto`` is bf16 only with native bf16;
    ``bf16`` without it is refused, since emulated bf16 matmuls are slower than float32."""
    if autocast == "none":
        return "fp32"
    native = native_bf16()
    if autocast == "bf16" and not native:
        raise SystemExit("--autocast bf16: this CPU has no native bfloat16 (avx512_bf16 / AMX); use auto or none")
    return "bf16" if native else "fp32"


def forward_precision(autocast: str):
    """``--autocast bf16``: the LLM's forward (and so its backward) under CPU bfloat16 autocast; the weights, the
    optimizer, the losses and the evaluations stay float32. Why: a stage-2 step is the model's matmuls (design note,
    session 22), and bf16 matmuls on a CPU with native bf16 (avx512_bf16 / AMX) make a step 1.32-1.37x faster
    (``benchmarks/bench_lvlm_precision.py``). Which precision runs: ``resolved_precision``. ``none``: plain float32,
    as every run before the flag."""
    if resolved_precision(autocast) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


@dataclass(frozen=True)
class WordIds:
    """The token ids the supervision losses name (cell, shape, colour and row words)."""

    cell: int
    cells: torch.Tensor
    shapes: torch.Tensor
    colours: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def of(cls, tok) -> WordIds:
        ids = lambda words: torch.as_tensor(tok.convert_tokens_to_ids(list(words)))  # noqa: E731
        return cls(tok.convert_tokens_to_ids("cell"), ids(world.CELL_WORDS), ids(world.SHAPES),
                   ids(world.COLOR_NAMES), ids(world.ROW_ANSWERS))


def step_losses(model, args, batch: StepBatch, words: WordIds) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """One training step's forward: ``(total loss, its parts, answer logits, labels)`` for ``step_batch``'s batch
    under ``args``' levers; the LLM's forward runs in ``--autocast``'s precision, the losses in float32."""
    px, pb, keep, scenes, _ = batch  # a StepBatch
    with torch.no_grad():
        hidden, _ = L.vision_features(model, px)
    # SDPA forward; the supervised rows are recomputed from the captured layer inputs (actors/attention_rows)
    with forward_precision(args.autocast), AttentionCapture(
            model.model.language_model, {args.word_layer, args.context_layer, args.hop_layer}) as cap:
        feats = hidden[:, 1:] if keep is None else L.kept_features(hidden[:, 1:], keep)
        logits, labels = L.packed_logits(model, px, pb, features=feats)
    logits = logits.float()
    weights = {"word": search_weights(pb, pb.word_targets, words.shapes, args.search_weight),
               "context": combined(cell_weights(pb, words.cell, args.cell_weight),
                                   search_weights(pb, pb.context_targets, words.shapes, args.search_weight)),
               "hop": None}
    sup = {name: L.target_nll(cap.rows(layer, t, args.attn_sup_heads), t, weights[name]) if t else logits.new_zeros(())
           for name, layer, t in (("word", args.word_layer, pb.word_targets),
                                  ("context", args.context_layer, pb.context_targets),
                                  ("hop", args.hop_layer, pb.hop_targets))}
    zero = logits.new_zeros(())
    parts = {
        "loss": F.cross_entropy(logits, labels),
        "word-attn": sup["word"] + sup["context"],
        "hop-attn": sup["hop"],
        "cell-grounding": cell_grounding_loss(model, hidden[:, 1:], words.cells) if args.cell_grounding else zero,
        "shape-grounding": (shape_grounding_loss(model, hidden[:, 1:], words.shapes, patch_shapes(scenes))
                            if args.shape_grounding else zero),
        "gather": (gather_loss(model, cap.inputs[args.hop_layer]["hidden"],
                               gather_targets(pb, scenes, words.cells), words.colours, words.shapes)
                   if args.gather_sup else zero),
        "row-gather": (row_gather_loss(model, cap.inputs[args.hop_layer]["hidden"],
                                       row_gather_targets(pb, words.shapes, words.rows), words.rows)
                       if args.row_gather else zero),
    }
    total = (parts["loss"] + args.attn_sup * (parts["word-attn"] + parts["hop-attn"])
             + args.cell_grounding * parts["cell-grounding"] + args.shape_grounding * parts["shape-grounding"]
             + args.gather_sup * parts["gather"] + args.row_gather * parts["row-gather"])
    return total, parts, logits, labels


def run_stage(model, tok, args, state: dict, stage: int) -> None:
    steps = args.stage1_steps if stage == 1 else args.stage2_steps
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    start = state.get(f"stage{stage}_step", 0)
    rewarm = 0  # a fresh optimizer in mid-schedule (resumed from the HF folder) warms up again
    if f"stage{stage}_opt" in state:
        opt.load_state_dict(state.pop(f"stage{stage}_opt"))
    elif start > 0:
        rewarm = args.warmup
    val = [world.make_item(args.val_seed, "val", i) for i in range(args.val_items)]
    words = WordIds.of(tok)
    t0 = time.time()
    run_args = args
    for step in range(start, steps):
        args = phase_args(run_args, stage, step)  # this step's flags
        if stage == 2 and step == run_args.shape_phase > 0:
            log(f"stage2 step {step}: shape phase over, the levers start ({sorted(SHAPE_PHASE_OFF)})")
        batch = step_batch(tok, args, stage, step, steps)
        floor = 1.0 if stage == 1 else 0.1
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.lr, args.warmup, floor=floor) * min(1.0, (step - start + 1) / max(1, rewarm))
        total, parts, logits, labels = step_losses(model, args, batch, words)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0:
            img = batch.pb.first_kind == 1
            acc = (logits[img].argmax(-1) == labels[img]).float().mean().item() if img.any() else 0.0
            log(f"stage{stage} step {step}/{steps} " + " ".join(f"{k} {v.item():.{4 if k == 'loss' else 3}f}"
                                                                for k, v in parts.items())
                + f" objects {batch.n_range} lr {opt.param_groups[0]['lr']:.2e} batch image-acc {acc:.2f} "
                f"{(time.time() - t0) / (step - start + 1):.2f} s/step")
        done = step + 1 == steps
        if (step + 1) % args.eval_every == 0 or done:
            res = {"stage": stage, "step": step + 1, "val": evaluate(model, tok, val),
                   "fact": evaluate(model, tok, val[: len(val) // 2], with_fact=True),
                   "text": evaluate(model, tok, val[: len(val) // 2], text_only=True),
                   "keep50": evaluate(model, tok, val, keep_rate=0.5),
                   "minutes": round(state["minutes"] + (time.time() - state["t_start"]) / 60, 2)}
            state.setdefault("evals", []).append(res)
            log(f"EVAL {json.dumps(res)}")
        if (step + 1) % args.ckpt_every == 0 or done:
            state[f"stage{stage}_step"] = step + 1
            save_ckpt(model, opt, state, args, stage)
            save(model, tok, Path(args.output), state)
    state[f"stage{stage}_done"] = True
    state.pop(f"stage{stage}_opt", None)


def save_ckpt(model, opt, state: dict, args, stage: int) -> None:
    path = Path(args.ckpt)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"model": model.state_dict(), "state": {**state, f"stage{stage}_opt": opt.state_dict(),
                                                   "minutes": state["minutes"] + (time.time() - state["t_start"]) / 60}}
    torch.save(blob, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", required=True, help="the trained Shapes v2 CLIP folder (its vision tower is taken)")
    p.add_argument("--output", required=True, help="HF-layout output folder (written at every checkpoint)")
    p.add_argument("--ckpt", required=True, help="resumable checkpoint path")
    p.add_argument("--resume", action="store_true", help="continue from --ckpt")
    p.add_argument("--preset", default="default", choices=sorted(V.PRESETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rope-theta", type=float, default=None,
                   help="LLaMA's rotary base (default: the preset's, 10000); see shapes_lvlm_v2.build_model")
    p.add_argument("--val-seed", type=int, default=1234)
    p.add_argument("--val-items", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stage1-steps", type=int, default=600)
    p.add_argument("--stage1-n-image", type=int, default=10, help="stage 1: plain image questions per image")
    p.add_argument("--stage2-steps", type=int, default=900)
    p.add_argument("--n-image", type=int, default=6, help="stage 2: plain image questions per image")
    p.add_argument("--n-fact", type=int, default=2, help="stage 2: image + fact questions per image")
    p.add_argument("--n-text", type=int, default=1, help="stage 2: text-only (fact, no image) questions per image")
    p.add_argument("--hide-fact-objects", type=float, default=0.5,
                   help="stage 2: share of images drawn without the objects their fact questions are about")
    p.add_argument("--drop-visual", type=float, default=0.0,
                   help="share of training images whose visual tokens are randomly thinned (token-drop augmentation; "
                        "see visual_keep)")
    p.add_argument("--drop-max", type=float, default=0.9375, help="largest drop rate of --drop-visual")
    p.add_argument("--shuffle-visual", type=float, default=0.0,
                   help="share of training images whose visual tokens enter in a random order (see shuffled_order)")
    p.add_argument("--augment-from-stage", type=int, default=1, choices=(1, 2),
                   help="first stage whose images get --drop-visual and --shuffle-visual (2: stage 1 sees every "
                        "token in order, so the LLM can learn a positional lookup before it must look up by content)")
    p.add_argument("--cell-weight", type=float, default=1.0,
                   help="weight of the context-layer attention loss of cell words (their target: the object "
                        "in that cell) against the other context targets (see cell_weights)")
    p.add_argument("--cell-grounding", type=float, default=0.0,
                   help="weight of the loss that points each projected visual token at its cell word's input "
                        "embedding (see cell_grounding_loss); 0 = off")
    p.add_argument("--search-weight", type=float, default=1.0,
                   help="weight of the attention targets whose query is a shape word (exist / spatial questions' "
                        "search for a colour and shape)")
    p.add_argument("--shape-grounding", type=float, default=0.0,
                   help="weight of the loss that points each projected token of an object at its shape word's "
                        "input embedding (see shape_grounding_loss); 0 = off")
    p.add_argument("--gather-sup", type=float, default=0.0,
                   help="weight of a loss that makes a colour/shape question's cell word name its object's colour "
                        "and shape at the hop layer's input, through the frozen output head")
    p.add_argument("--row-gather", type=float, default=0.0,
                   help="weight of a loss that asks a spatial question's shape word for its object's row")
    p.add_argument("--shape-phase", type=int, default=0, metavar="N",
                   help="the first N stage-2 steps run without --drop-visual, --shuffle-visual, --cell-grounding, "
                        "--cell-weight, --search-weight and --row-gather (see phase_args); 0 = off")
    p.add_argument("--count-list", type=float, default=0.0,
                   help="share of the image + fact count questions whose fact lists some hidden counted objects "
                        "instead of stating the total (see count_list_facts); 0 = off")
    p.add_argument("--question-weights", default="", metavar="TYPE=W,...",
                   help="sampling weights of the plain image questions' types, e.g. count=2,shape=1.5 (others 1); "
                        "default uniform (see image_question_weights)")
    p.add_argument("--ramp", type=float, default=0.3, help="share of stage 2 by which scenes reach 20-28 objects")
    p.add_argument("--batch", type=int, default=16, help="images per step (each carries several questions)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--attn-sup", type=float, default=1.0, help="weight of the attention-supervision losses")
    p.add_argument("--attn-sup-heads", type=int, default=0, help="supervised heads per layer (0 = half)")
    p.add_argument("--word-layer", type=int, default=2)
    p.add_argument("--context-layer", type=int, default=3)
    p.add_argument("--hop-layer", type=int, default=4)
    p.add_argument("--autocast", choices=("none", "bf16", "auto"), default="none",
                   help="precision of the LLM's forward and backward: float32, CPU bfloat16 autocast, or bf16 where "
                        "the CPU has native bf16 (see forward_precision); weights stay float32")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--ckpt-every", type=int, default=50)
    args = p.parse_args(argv)
    preset = V.PRESETS[args.preset]
    args.attn_sup_heads = args.attn_sup_heads or max(1, preset["heads"] // 2)
    try:  # parsed once here, not in every step's batch
        args.image_weights = image_question_weights(args.question_weights)
    except ValueError as err:
        p.error(str(err))
    if max(args.word_layer, args.context_layer, args.hop_layer) >= preset["layers"]:
        p.error(f"--word-layer/--context-layer/--hop-layer must be < {preset['layers']} for preset {args.preset!r}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = V.build_tokenizer()
    model = V.build_model(args.preset, tokenizer=tok, seed=args.seed, rope_theta=args.rope_theta)
    state: dict = {"minutes": 0.0, "args": vars(args)}
    saved_log = Path(args.output, "training_log.json")
    if args.resume and Path(args.ckpt).exists():
        blob = torch.load(args.ckpt, weights_only=False)
        model.load_state_dict(blob["model"])
        state = blob["state"]
        log(f"resumed from {args.ckpt}: {[k for k in state if k.endswith(('_done', '_step'))]}")
    elif args.resume and saved_log.exists():
        # no checkpoint (another machine): the HF folder written at every checkpoint holds the weights and the
        # stage/step reached; training goes on from there with a fresh optimizer state
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(args.output, attn_implementation="eager")
        state = json.loads(saved_log.read_text())
        log(f"resumed from the saved model {args.output} (fresh optimizer state): "
            f"{ {k: v for k, v in state.items() if k.endswith(('_done', '_step'))} }")
    elif args.resume:
        raise SystemExit(f"--resume: neither {args.ckpt} nor {saved_log} exists")
    else:
        V.load_clip_tower(model, args.clip)
        state["projector"] = standardize_projector(model, args.seed)
        log(f"tower from {args.clip}; projector standardised {state['projector']}")
    state["t_start"] = time.time()
    if args.resume:  # the log says what this part of the run was started with
        state.setdefault("resumed_with", []).append(vars(args))
    # checked before any step runs (bf16 is refused on a CPU without it); the log records what ran
    forward = resolved_precision(args.autocast)
    state.setdefault("forward_precision", []).append(forward)
    log(f"LLM forward and backward in {forward} (--autocast {args.autocast})")
    model.model.vision_tower.requires_grad_(False)
    model.model.vision_tower.eval()
    model.config.text_config._attn_implementation = "sdpa"  # no attention maps are asked for (AttentionCapture)
    for stage, steps in ((1, args.stage1_steps), (2, args.stage2_steps)):
        if state.get(f"stage{stage}_step", 0) < steps:  # (more steps than a finished run had: it goes on)
            run_stage(model, tok, args, state, stage)
    state["minutes"] = round(state["minutes"] + (time.time() - state.pop("t_start")) / 60, 1)
    save(model, tok, Path(args.output), state)
    log(f"done: {state['minutes']} min of training; saved {args.output}")
    return state


if __name__ == "__main__":
    main()
