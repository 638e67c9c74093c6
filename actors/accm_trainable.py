"""ACCM's training module and the plain-PyTorch helpers ``jobs/train_accm.py`` runs inside Ray Train: the caption
model + selector as one DeepSpeed-wrapped module, the held-out caption metric, building or loading the two
models, and the world's batch function. Nothing here knows about Ray."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actors.accm_batches import make_batch, slot_attributes
from pipeline import shapes
from pipeline.worlds import WORLDS

SLOT_ATTRIBUTES = slot_attributes(shapes)  # v1's (colour, shape, row, column) classes


# ------------------------------------------------------------------------------------------------ model


class ACCMTrainable(nn.Module):
    """Caption model + selector as one module so that DeepSpeed wraps (and checkpoints) both."""

    def __init__(self, captioner, selector, slot_reader: bool = False,
                 attributes: tuple[int, ...] = SLOT_ATTRIBUTES) -> None:
        super().__init__()
        self.captioner = captioner
        self.selector = selector
        self.attributes = tuple(attributes)  # classes per slot attribute (actors.accm_batches.slot_attributes)
        # pre-training only (not saved with the caption model): a linear read-out of each patch slot's colour,
        # shape, row and column from the hidden state the supervised attention heads read, so that it keeps
        # them (--slot-read)
        self.slot_reader = nn.Linear(captioner.config.hidden, sum(self.attributes)) if slot_reader else None

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
                logits = self.slot_reader(out["slot_hidden"]).float().split(self.attributes, dim=-1)
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


def batches(config: dict, engine, features: str, kept_context: bool = False):
    """``make_batch`` for this run's world and the caption model's feature kind (and kept context)."""
    world = WORLDS[config.get("world", "v1")]

    def batch(seed: int, split: str, indices: list[int], keep: int, n_objects=None) -> dict:
        return make_batch(engine, seed, split, indices, keep, n_objects, world=world, features=features,
                          count_facts=config.get("count_facts", "total"), kept_context=kept_context)

    return batch


def build_or_load(config: dict, engine):
    from actors.captioner import CaptionModel, build_caption_model
    from actors.selector import CaptionSelector, build_selector

    init_c, init_s = config.get("init_captioner"), config.get("init_selector")
    if init_c and (Path(init_c) / "accm_captioner.json").exists():
        captioner = CaptionModel.from_pretrained(init_c)
        if config.get("max_caption_tokens"):  # longer captions (--count-facts list) from a trained model
            captioner.config.max_caption_tokens = config["max_caption_tokens"]
        if config.get("kept_context"):  # --kept-context: read the kept patches too, from a trained model
            from actors.kept_context import enable_kept_context

            enable_kept_context(captioner)
    else:
        arch = config["captioner_arch"]
        projected = arch.get("input_features") == "projected"
        if projected and engine.text_guide is None:
            raise SystemExit("input_features 'projected' reads the CLIP's projected patches: pass --clip")
        # the width of what the mapper reads: the tower's feature layer, or the CLIP's projection
        feature_dim = (engine.text_guide.visual_projection.out_features if projected
                       else engine.config.vision_config.hidden_size)
        captioner = build_caption_model(engine.tokenizer, feature_dim=feature_dim, **arch)
        # fold feature standardisation into the mapper's Linear (items disjoint from every training batch)
        stats = batches(config, engine, captioner.config.input_features, captioner.config.kept_context)(
            config["seed"], "train", list(range(STATS_OFFSET, STATS_OFFSET + 256)), config["keep"])["discarded"]
        print(json.dumps({"mapper_input_standardized": captioner.mapper.standardize_input(stats)}), flush=True)
    if init_s and (Path(init_s) / "accm_selector.json").exists():
        selector = CaptionSelector.from_pretrained(init_s)
    else:
        selector = build_selector(**config["selector_arch"])
    return captioner, selector
