"""Train the proving-ground LVLM (a small LlavaForConditionalGeneration) on Shapes-VQA, on CPU.

LLaVA's staging, adapted to a from-scratch model (see models/shapes/lvlm/MODEL_CARD.md for what each stage did):

* stage 0 -- vision tower pre-training: dense heads on the penultimate layer (per-patch colour / shape /
  empty, exact labels since one object sits in one patch; per-patch row / column, so the features keep
  each patch's place) and a CLS object-count head. (``jobs/lvlm_stage0.py``)
* stage 1 -- image questions only on scenes of 1-16 objects (``--curriculum mixed``), tower frozen,
  projector + LLM trained with the answer loss plus *attention supervision*
  (``actors.shapes_lvlm.attention_target_loss``): in LLM layer 0 every colour/shape word attends to the
  objects it names, in layer 1 the words whose selection needs context (exist's colour+shape, row+column)
  do, in layer 2 the answer position attends to the question's decisive word. Without it the LLM never
  learned to select the object a question names (chance at >= 2 objects, even with ideal visual tokens).
* stage 2 -- instruction tuning, tower frozen: packed multi-question samples (every question type),
  image + fact samples and text-only fact samples; scenes narrow to the benchmark's 10-16 objects.

Fresh training data is generated in-process (train split only); validation uses the val split.
Checkpoints (``--ckpt``) allow ``--resume``; the HF layout is written to ``--output`` at every
checkpoint and at the end. ``--smoke`` runs a few steps of a tiny config (CI).
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from actors import shapes_lvlm as L  # noqa: E402
from jobs.lvlm_stage0 import run_stage0  # noqa: E402
from jobs.train_utils import log, lr_at  # noqa: E402
from pipeline import shapes  # noqa: E402

# ----------------------------------------------------------------------------- stages 1-2


def vqa_batch(tok, rng: np.random.Generator, args, n_range: tuple[int, int], stage: int = 2):
    # stage 1 defaults to image questions only: with fact/text samples present the LLM lowered its loss by
    # reading text and never started to use the image (runs 5-6, see the model card)
    n_fact = args.n_fact if stage == 2 else args.stage1_n_fact
    n_text = args.n_text if stage == 2 else args.stage1_n_text
    n_image = args.n_image if stage == 2 else args.stage1_n_image
    images, branches = [], []
    qtypes = tuple(args.stage1_qtypes.split(",")) if stage == 1 and args.stage1_qtypes else shapes.QUESTION_TYPES
    for _ in range(args.batch):
        objs = L.sample_train_scene(rng, *n_range)
        if stage == 2 and n_fact and rng.random() < args.hide_fact_objects:
            # the facts are about objects the image does not show: the fact is the only source of the answer
            # (a complete image of another scene, not a pruned one); the plain questions ask about what is shown
            facts = L.draw_branches(objs, rng, n_image=0, n_fact=n_fact, n_text=n_text, qtypes=qtypes)
            hidden = {i for br in facts if br.use_image for i in br.target}
            shown = tuple(o for i, o in enumerate(objs) if i not in hidden)
            if shown:
                images.append(np.asarray(shapes.render(shown)))
                branches.append(L.draw_branches(shown, rng, n_image=n_image, n_fact=0, n_text=0, qtypes=qtypes) + facts)
                continue
        images.append(np.asarray(shapes.render(objs)))
        branches.append(L.draw_branches(objs, rng, n_image=n_image, n_fact=n_fact, n_text=n_text, qtypes=qtypes))
    return L.pixel_values(images), L.pack_batch(tok, branches)


def val_items(seed: int, n: int) -> list[shapes.Item]:
    return [shapes.make_item(seed, "val", i) for i in range(n)]


@torch.no_grad()
def answer_accuracy(model, tok, items: list, *, fact, pixels, pack, n_visual: int, with_fact: bool = False,
                    text_only: bool = False, keep_rate: float = 1.0, chunk: int = 50) -> dict:
    """Single-question accuracy per type, for either world: greedy first answer token (answers are one word) vs
    the answer. ``fact(objects, qtype, question, target)`` gives the supplemental text, ``pixels(items)`` the
    images, ``pack`` the world's ``pack_batch``. ``keep_rate`` < 1: each image keeps that share of its
    ``n_visual`` tokens at random (a fixed draw per item), as a pre-LLM pruner would leave them."""
    model.eval()
    per: dict[str, list[int]] = {}
    for i in range(0, len(items), chunk):
        part = items[i:i + chunk]
        branches = []
        for it in part:
            cap = fact(it.objects, it.question_type, it.question, it.target) if (with_fact or text_only) else None
            branches.append([L.Branch(it.question, it.answer, it.question_type, cap, not text_only)])
        px = pixels(part)
        keep = L.random_visual_keep(i, len(part), keep_rate, n_visual)
        pb = pack(tok, branches, visual_keep=keep)
        feats = None
        if keep is not None:
            hidden, _ = L.vision_features(model, px)
            feats = L.kept_features(hidden[:, 1:], keep)
        logits, labels = L.packed_logits(model, px, pb, features=feats)
        for it, ok in zip(part, L.first_answer_hits(logits, labels, pb).tolist(), strict=True):
            per.setdefault(it.question_type, []).append(int(ok))
    res = {k: round(sum(v) / len(v), 4) for k, v in sorted(per.items())}
    res["all"] = round(sum(sum(v) for v in per.values()) / sum(len(v) for v in per.values()), 4)
    model.train()
    return res


def evaluate(model, tok, items: list[shapes.Item], *, with_fact: bool = False, text_only: bool = False) -> dict:
    """v1's val accuracy (``answer_accuracy`` on the Shapes world's 64 patches)."""
    return answer_accuracy(
        model, tok, items, fact=shapes.fact, pack=L.pack_batch, n_visual=shapes.GRID * shapes.GRID,
        pixels=lambda part: L.pixel_values([np.asarray(shapes.render(it.objects)) for it in part]),
        with_fact=with_fact, text_only=text_only, chunk=64)


def save_hf(model, tok, proc, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    proc.save_pretrained(out)


@torch.no_grad()
def standardize_projector(model, seed: int, n_images: int = 256) -> dict:
    """Fold per-dimension standardisation of the tower features into the projector's first Linear.

    The penultimate-layer residual stream carries a large component shared by all patches (measured:
    feature norm ~24, projected norm ~34, while projected tokens differ across patches by ~0.8): after the
    LLM's RMSNorm the 64 visual tokens were nearly identical and VQA stayed at chance for 300 steps.
    W <- W / sigma, b <- b - W mu / sigma removes it without changing the architecture.
    """
    rng = np.random.default_rng([seed, 7, 0])
    images = [np.asarray(shapes.render(L.sample_train_scene(rng, shapes.MIN_OBJECTS, shapes.MAX_OBJECTS)))
              for _ in range(n_images)]
    return L.fold_feature_standardisation(model, L.pixel_values(images))


def run_vqa_stage(model, tok, proc, args, state: dict, stage: int) -> None:
    steps = args.stage1_steps if stage == 1 else args.stage2_steps
    tower = model.model.vision_tower
    tower.requires_grad_(False)
    tower.eval()
    if args.standardize_projector and not state.get("projector_standardized"):
        state["projector_standardized"] = standardize_projector(model, args.seed)
        log(f"projector standardised: {state['projector_standardized']}")
    llm_params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    train_llm = not (stage == 1 and args.stage1_freeze_llm)
    for p in llm_params:
        p.requires_grad_(train_llm)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = args.lr if stage == 2 else args.stage1_lr
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    start = 0
    key = f"stage{stage}_opt"
    if key in state:
        opt.load_state_dict(state.pop(key))
        start = state.get(f"stage{stage}_step", 0)
    vitems = val_items(args.val_seed, args.val_items)
    level, ema, at_level = state.get("level", 1), 0.0, 0
    # the attention-supervision loss needs the attention maps, which only eager attention returns
    train_attn = "eager" if args.attn_sup > 0 else args.train_attn
    model.config.text_config._attn_implementation = train_attn
    t0, seen = time.time(), 0
    for step in range(start, steps):
        progress = step / max(1, steps)
        if args.curriculum == "adaptive":
            # stay on a level until the plain image questions are answered (EMA of the batch's first-token
            # accuracy > threshold); a fixed schedule (--ramp) sets the floor so stage 2 ends on full scenes
            floor = 1 if stage == 1 else int(shapes.MAX_OBJECTS * min(1.0, progress / args.ramp)) if args.ramp > 0 else 16
            level = max(level, floor)
            n_range = L.level_range(level)
        elif args.curriculum == "mixed":
            # every object count at once: easy scenes keep the skills' gradients clean while crowded ones
            # teach selection; stage 2 narrows to the benchmark's 10-16 by --ramp
            n_range = (1, shapes.MAX_OBJECTS) if stage == 1 else L.mixed_range(progress, args.ramp)
        else:
            n_range = (1, 4) if stage == 1 else L.curriculum_range(progress, args.ramp)
        if stage == 1 and args.stage1_objects:
            n_range = shapes.parse_lo_hi(args.stage1_objects)
        rng = np.random.default_rng([args.seed, stage, step])
        px, pb = vqa_batch(tok, rng, args, n_range, stage)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, args.warmup if stage == 2 else max(1, min(100, steps // 10)),
                            floor=0.1 if stage == 2 else args.stage1_lr_floor)
        with torch.no_grad():
            hidden, _ = L.vision_features(model, px)
        if args.attn_sup > 0:
            logits, labels, attn = L.packed_logits(model, px, pb, features=hidden[:, 1:], output_attentions=True)
            word_loss = L.attention_target_loss(attn[args.word_layer], pb.word_targets, args.attn_sup_heads)
            word_loss = word_loss + L.attention_target_loss(attn[args.context_layer], pb.context_targets,
                                                            args.attn_sup_heads)
            hop_loss = L.attention_target_loss(attn[args.hop_layer], pb.hop_targets, args.attn_sup_heads)
        else:
            logits, labels = L.packed_logits(model, px, pb, features=hidden[:, 1:])
            word_loss = hop_loss = torch.zeros(())
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        (loss + args.attn_sup * (word_loss + hop_loss)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        seen += int((pb.labels != -100).sum().item())
        with torch.no_grad():
            img = pb.first_kind == 1
            acc_img = (logits[img].argmax(-1) == labels[img]).float().mean().item() if img.any() else 0.0
        ema = 0.9 * ema + 0.1 * acc_img
        at_level += 1
        if args.curriculum == "adaptive" and at_level >= 20 and ema > args.level_threshold and level < shapes.MAX_OBJECTS:
            level, at_level, ema = level + 1, 0, 0.0
            state["level"] = level
            log(f"curriculum: level {level} objects {L.level_range(level)} at stage{stage} step {step}")
        last = step == steps - 1
        if step % args.log_every == 0 or last:
            el = time.time() - t0
            log(f"stage{stage} step {step}/{steps} loss {loss.item():.4f} word-attn {word_loss.item():.3f} "
                f"hop-attn {hop_loss.item():.3f} objects {n_range} lr {opt.param_groups[0]['lr']:.2e} "
                f"{(step - start + 1) * args.batch / max(el, 1e-6):.1f} img/s {seen / max(el, 1e-6):.0f} tok/s "
                f"train image-question acc (EMA) {ema:.2f}")
        if (step + 1) % args.eval_every == 0 or last:
            model.config.text_config._attn_implementation = "eager"
            acc = evaluate(model, tok, vitems)
            fact = evaluate(model, tok, vitems[: args.val_items // 2], with_fact=True)
            text = evaluate(model, tok, vitems[: args.val_items // 2], text_only=True)
            model.config.text_config._attn_implementation = train_attn
            log(f"EVAL stage{stage} step {step + 1} val {json.dumps(acc)} | +fact {fact['all']} | text-only {text['all']}")
            state.setdefault("evals", []).append({"stage": stage, "step": step + 1, "val": acc, "fact": fact, "text": text,
                                                  "minutes": round((time.time() - state["t_start"]) / 60, 2)})
        if (step + 1) % args.ckpt_every == 0 or last:
            state[f"stage{stage}_step"] = step + 1
            save_ckpt(model, opt, state, args, stage)
            model.config.text_config._attn_implementation = "eager"
            save_hf(model, tok, proc, Path(args.output))
            model.config.text_config._attn_implementation = train_attn
    state.pop(f"stage{stage}_opt", None)
    state[f"stage{stage}_done"] = True
    model.config.text_config._attn_implementation = "eager"


def save_ckpt(model, opt, state: dict, args, stage: int) -> None:
    if not args.ckpt:
        return
    path = Path(args.ckpt)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"model": model.state_dict(), "state": {k: v for k, v in state.items() if not k.endswith("_opt")}}
    blob["state"][f"stage{stage}_opt"] = opt.state_dict()
    torch.save(blob, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="models/shapes/lvlm", help="HF-layout output dir")
    p.add_argument("--ckpt", default="runs/train_lvlm/ckpt.pt", help="resumable checkpoint path ('' = none)")
    p.add_argument("--resume", action="store_true", help="continue from --ckpt")
    p.add_argument("--preset", default="default", choices=sorted(L.PRESETS), help="model size preset")
    p.add_argument("--stages", default="0,1,2", help="comma-separated stages to run")
    p.add_argument("--seed", type=int, default=0, help="model init + training data seed")
    p.add_argument("--val-seed", type=int, default=1234, help="seed of the val-split items used for evaluation")
    p.add_argument("--val-items", type=int, default=250, help="val items per evaluation")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--stage0-steps", type=int, default=400, help="stage 0 (tower) steps")
    p.add_argument("--stage0-batch", type=int, default=128, help="stage 0 images per step")
    p.add_argument("--stage0-lr", type=float, default=1.5e-3, help="stage 0 peak LR (2e-3 diverged)")
    p.add_argument("--grow-from", default="",
                   help="initialise from this trained HF model whose LLM has fewer layers than --preset's: its layers "
                        "go on top, the new front layers start as the identity (see actors.shapes_lvlm.grow_llm_front)")
    p.add_argument("--init-tower", default="", help="take the vision tower from this checkpoint (skips stage 0's compute)")
    p.add_argument("--no-standardize-projector", dest="standardize_projector", action="store_false",
                   help="do not fold feature standardisation into the projector before stage 1")
    p.add_argument("--stage1-steps", type=int, default=1200, help="stage 1 steps (image questions only)")
    p.add_argument("--stage1-lr", type=float, default=1e-3, help="stage 1 peak LR")
    p.add_argument("--stage1-lr-floor", type=float, default=1.0,
                   help="stage 1 LR at its end as a fraction of the peak (1.0 = constant after warmup: the curriculum "
                        "must keep advancing; a cosine to 10%% stalled it at one-object scenes)")
    p.add_argument("--stage1-n-image", type=int, default=10, help="stage 1: plain image questions per image")
    p.add_argument("--stage1-n-fact", type=int, default=0, help="stage 1: image + fact questions per image")
    p.add_argument("--stage1-n-text", type=int, default=0, help="stage 1: text-only questions per image")
    p.add_argument("--stage1-objects", default="", metavar="LO-HI",
                   help="stage 1: a fixed object-count range (e.g. 2-4) instead of the curriculum's")
    p.add_argument("--stage1-qtypes", default="",
                   help="stage 1: only these question types (comma-separated; include spatial, count or exist: "
                        "colour/shape questions cannot always be asked of a small scene)")
    p.add_argument("--stage1-freeze-llm", action="store_true", help="stage 1 trains the projector only")
    p.add_argument("--stage2-steps", type=int, default=1500, help="stage 2 steps")
    p.add_argument("--lr", type=float, default=1e-3, help="stage 2 peak LR (AdamW, warmup + cosine)")
    p.add_argument("--warmup", type=int, default=100, help="stage 2 warmup steps")
    p.add_argument("--batch", type=int, default=16, help="images per step (each carries several questions)")
    p.add_argument("--n-image", type=int, default=6, help="plain image questions per image")
    p.add_argument("--n-fact", type=int, default=2, help="image + fact-as-text questions per image")
    p.add_argument("--n-text", type=int, default=1, help="text-only (fact, no image) questions per image")
    p.add_argument("--hide-fact-objects", type=float, default=0.0,
                   help="stage 2: fraction of images rendered without the objects their fact questions are about, "
                        "so the spliced fact is the only source of the answer (the model otherwise ignores a fact "
                        "once pruning has removed the object)")
    p.add_argument("--ramp", type=float, default=0.3, help="fraction of stage 2 by which scenes reach 10-16 objects")
    p.add_argument("--curriculum", default="mixed", choices=["adaptive", "linear", "mixed"],
                   help="adaptive: one object first, one more when train image accuracy passes --level-threshold; "
                        "mixed: stage 1 draws 1-16 objects uniformly, stage 2 narrows to 10-16 by --ramp")
    p.add_argument("--level-threshold", type=float, default=0.8, help="adaptive curriculum: EMA accuracy to advance")
    p.add_argument("--attn-sup", type=float, default=1.0,
                   help="weight of the attention-supervision losses (stages 1-2; 0 = off): naming words attend to "
                        "the objects they select, the answer position to the decisive word (see "
                        "actors.shapes_lvlm.attention_target_loss)")
    p.add_argument("--attn-sup-heads", type=int, default=0,
                   help="how many heads (the first N) each supervised layer gives (0 = half of them)")
    p.add_argument("--word-layer", type=int, default=0,
                   help="LLM layer whose heads learn word -> object attention (what a word means by itself)")
    p.add_argument("--context-layer", type=int, default=1,
                   help="LLM layer whose heads learn word -> object attention that needs the words before it")
    p.add_argument("--hop-layer", type=int, default=2, help="LLM layer whose heads learn answer -> word attention")
    p.add_argument("--train-attn", default="sdpa", choices=["sdpa", "eager"], help="LLM attention kernel in training")
    p.add_argument("--log-every", type=int, default=25, help="log the training loss every N steps")
    p.add_argument("--eval-every", type=int, default=150, help="val accuracy every N steps")
    p.add_argument("--ckpt-every", type=int, default=150, help="checkpoint + HF save every N steps")
    p.add_argument("--smoke", action="store_true", help="tiny config, a few steps (CI)")
    args = p.parse_args(argv)
    qtypes = [q for q in args.stage1_qtypes.split(",") if q]
    if qtypes and (set(qtypes) - set(shapes.QUESTION_TYPES) or not set(qtypes) & {"spatial", "count", "exist"}):
        p.error(f"--stage1-qtypes: known types are {shapes.QUESTION_TYPES}, and one of spatial/count/exist is needed")
    if args.smoke:
        args.preset = "tiny"
        args.stage0_steps, args.stage0_batch, args.stage1_steps, args.stage2_steps = 3, 8, 2, 4
        args.batch, args.val_items, args.eval_every, args.ckpt_every, args.log_every, args.warmup = 4, 10, 4, 2, 1, 2
        args.word_layer, args.context_layer, args.hop_layer = 0, 1, 1  # the tiny LLM has 2 layers
    preset = L.PRESETS[args.preset]
    args.attn_sup_heads = args.attn_sup_heads or max(1, preset["heads"] // 2)
    if args.attn_sup > 0 and (max(args.word_layer, args.context_layer, args.hop_layer) >= preset["layers"]
                              or not 0 < args.attn_sup_heads <= preset["heads"]):
        p.error(f"--word-layer/--context-layer/--hop-layer must be < {preset['layers']} and --attn-sup-heads in 1..{preset['heads']} "
                f"for preset {args.preset!r}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    stages = {int(s) for s in args.stages.split(",") if s.strip()}
    tok = L.build_tokenizer()
    proc = L.build_processor(tok)
    model = L.build_model(args.preset, tokenizer=tok, seed=args.seed)
    state: dict = {"t_start": time.time()}
    if args.resume and args.ckpt and Path(args.ckpt).exists():
        blob = torch.load(args.ckpt, weights_only=False)
        model.load_state_dict(blob["model"])
        state = blob["state"]
        state["t_start"] = time.time() - 60 * state.get("evals", [{}])[-1].get("minutes", 0) if state.get("evals") else time.time()
        log(f"resumed from {args.ckpt}: {[k for k in state if k.endswith('_done') or k.endswith('_step')]}")
    elif args.resume and "0" not in args.stages and Path(args.output, "config.json").exists():
        from transformers import LlavaForConditionalGeneration
        model = LlavaForConditionalGeneration.from_pretrained(args.output, attn_implementation="eager")
        log(f"initialised from {args.output}")
    if args.grow_from and not (args.resume and args.ckpt and Path(args.ckpt).exists()):
        from transformers import LlavaForConditionalGeneration
        trained = LlavaForConditionalGeneration.from_pretrained(args.grow_from, attn_implementation="eager")
        added = L.grow_llm_front(trained, model)
        state["stage0_done"] = state["stage1_done"] = True
        state["projector_standardized"] = "inherited"
        log(f"grown from {args.grow_from}: {added} identity layers in front of its "
            f"{trained.config.text_config.num_hidden_layers}")
        del trained
    if args.init_tower:
        blob = torch.load(args.init_tower, weights_only=False)
        sd = {k[len("model.vision_tower."):]: v for k, v in blob["model"].items() if k.startswith("model.vision_tower.")}
        model.model.vision_tower.load_state_dict(sd)
        state["stage0_done"] = True
        state["stage0"] = blob["state"].get("stage0")
        log(f"vision tower from {args.init_tower}: {state['stage0']}")
    nparams = sum(p.numel() for p in model.parameters())
    log(f"preset {args.preset}: {nparams / 1e6:.3f}M parameters "
        f"(tower {sum(p.numel() for p in model.model.vision_tower.parameters()) / 1e6:.3f}M); args {vars(args)}")
    if 0 in stages and not state.get("stage0_done"):
        run_stage0(model, args, state)
        state["stage0_done"] = True
        save_ckpt(model, torch.optim.AdamW([torch.zeros(1)]), state, args, 0)
    for stage in (1, 2):
        if stage in stages and not state.get(f"stage{stage}_done"):
            run_vqa_stage(model, tok, proc, args, state, stage)
            save_ckpt(model, torch.optim.AdamW([torch.zeros(1)]), state, args, stage)
    model.config.text_config._attn_implementation = "eager"
    save_hf(model, tok, proc, Path(args.output))
    minutes = (time.time() - state["t_start"]) / 60
    summary = {"parameters": nparams, "minutes": round(minutes, 1), "stage0": state.get("stage0"),
               "evals": state.get("evals", []), "args": vars(args)}
    Path(args.output, "training_log.json").write_text(json.dumps(summary, indent=1))
    log(f"done in {minutes:.1f} min; saved {args.output}")
    return summary


if __name__ == "__main__":
    main()
