"""The captioner tier's model logic (SPEC §1.2-1.3): discarded patches + question -> selected caption.

``ACCMCaptioner`` glues the caption model (beam search over the discarded patches) and the selector
(softmax over the N candidates) and prices every item with the analytic FLOPs model of
``pipeline/flops.py``. It knows nothing about Ray: the captioner-tier actor wraps it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from actors.captioner import CaptionModel
from actors.selector import CaptionSelector


@dataclass
class CaptionResult:
    selected: list[str]  # the caption spliced into the LVLM prompt, per item
    candidates: list[list[str]]  # N beam candidates per item, beam-score order
    probs: list[list[float]]  # selector softmax over the candidates
    flops_captioner: list[float]  # mapper + decoder prefill + beam decode, per item
    flops_selector: list[float]  # text encoder over N candidates + classifier, per item


def caption_config_dims(config, decoder_config):
    """(mapper dims, decoder dims) in the FLOPs model's terms, from a CaptionConfig and the decoder's HF config.

    Both mapper archs fit ``encoder_flops``: the project's ``Mapper`` and the authors' ClipCap mapper
    (to_queries d->d + to_keys_values d->2d + project d->d, fc1/fc2 with mapper_intermediate,
    clipcap_model.py lines 64-66 and 45-47); norms, softmax and activations are not priced."""
    from pipeline.flops import TransformerDims, dims_from_config

    c = config
    mapper = TransformerDims(hidden=c.hidden, intermediate=c.mapper_intermediate, layers=c.mapper_layers,
                             heads=c.mapper_heads, kv_heads=c.mapper_heads, gated_ffn=False)
    return mapper, dims_from_config(decoder_config)


def caption_model_dims(model: CaptionModel):
    """(mapper dims, decoder dims) of a loaded caption model."""
    return caption_config_dims(model.config, model.decoder.config)


def selector_config_dims(config, text_config):
    """(text encoder dims, classifier dims) from a SelectorConfig and the text encoder's HF config.

    The authors' classifier (``arch="torch_transformer"``: in_proj d->3d, out_proj, linear1/linear2 with the
    1536 FFN, selector_transformer.py lines 38-45) fits the same formula as the project's encoder."""
    from pipeline.flops import TransformerDims, dims_from_config

    c = config
    classifier = TransformerDims(hidden=c.hidden, intermediate=c.intermediate, layers=c.layers, heads=c.heads,
                                 kv_heads=c.heads, gated_ffn=False)
    return dims_from_config(text_config), classifier


def selector_dims(selector: CaptionSelector):
    """(text encoder dims, classifier dims) of a loaded selector."""
    return selector_config_dims(selector.config, selector.text_encoder.config)


def captioner_flops_slot(config, decoder_config, *, discarded_tokens: int, question_tokens: int,
                         caption_tokens: int, beams: int | None = None) -> dict:
    """kwargs of ``pipeline.flops.caption_model_flops`` for one item (``caption_tokens`` per beam; ``beams``:
    default the config's)."""
    mapper, decoder = caption_config_dims(config, decoder_config)
    return dict(mapper_dims=mapper, decoder_dims=decoder, discarded_tokens=discarded_tokens,
                prefix_len=config.prefix_len, question_tokens=question_tokens, beams=beams or config.beams,
                caption_tokens=caption_tokens, feature_dim=config.feature_dim + int(config.kept_context),
                patch_prefix=config.patch_prefix)


def selector_flops_slot(config, text_config, *, candidates: int, tokens_per_candidate: int,
                        shared_prefix_tokens: int = 0) -> dict:
    """kwargs of ``pipeline.flops.selector_flops`` for one item (``shared_prefix_tokens``: see there)."""
    text, classifier = selector_config_dims(config, text_config)
    return dict(text_dims=text, classifier_dims=classifier, candidates=candidates,
                tokens_per_candidate=tokens_per_candidate, projection_dim=getattr(text_config, "projection_dim", None),
                shared_prefix_tokens=shared_prefix_tokens)


def accm_flops_slots(captioner_dir: str, selector_dir: str, *, discarded_tokens: int, question_tokens: int,
                     caption_tokens: int, selector_tokens: int | None = None,
                     kept_tokens: int = 0) -> tuple[dict, dict]:
    """``captioner`` / ``selector`` slots of ``pipeline.flops.llava_item_flops`` for two shipped folders, read
    from their configs alone (no weights, so a real GPT-2 / LongCLIP folder prices instantly).

    ``caption_tokens`` = tokens generated per beam; ``selector_tokens`` = tokens per candidate (default: the
    real-length estimate of ``pipeline.flops.selector_real_tokens``); ``kept_tokens``: the patches the pruner
    kept, which a ``kept_context`` caption model reads too."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    from actors.captioner import CONFIG_NAME as CAPTION_CONFIG
    from actors.captioner import DECODER_DIR, CaptionConfig
    from actors.selector import CONFIG_NAME as SELECTOR_CONFIG
    from actors.selector import TEXT_ENCODER_DIR, SelectorConfig
    from pipeline.flops import selector_real_tokens

    cap_cfg = CaptionConfig(**json.loads((Path(captioner_dir) / CAPTION_CONFIG).read_text()))
    captioner = captioner_flops_slot(cap_cfg, AutoConfig.from_pretrained(Path(captioner_dir) / DECODER_DIR),
                                     discarded_tokens=discarded_tokens + (kept_tokens if cap_cfg.kept_context else 0),
                                     question_tokens=question_tokens, caption_tokens=caption_tokens)
    sel_cfg = SelectorConfig(**json.loads((Path(selector_dir) / SELECTOR_CONFIG).read_text()))
    text_config = AutoConfig.from_pretrained(Path(selector_dir) / TEXT_ENCODER_DIR)
    text_config = getattr(text_config, "text_config", text_config)  # a full CLIPConfig folder works too
    tokens = selector_tokens if selector_tokens is not None else selector_real_tokens(question_tokens,
                                                                                        caption_tokens)
    # share_prefix: the start token and the question run once (an estimate from the template "{q} {c}")
    shared = min(tokens - 1, question_tokens + 1) if sel_cfg.share_prefix else 0
    selector = selector_flops_slot(sel_cfg, text_config, candidates=cap_cfg.beams, tokens_per_candidate=tokens - shared,
                                   shared_prefix_tokens=shared)
    return captioner, selector


class ACCMCaptioner:
    """Caption model + selector, loaded from two folders (local path, ``file://`` or ``s3://``)."""

    def __init__(self, captioner: CaptionModel, selector: CaptionSelector) -> None:
        self.captioner = captioner.eval()
        self.selector = selector.eval()

    @classmethod
    def from_pretrained(cls, captioner_url: str, selector_url: str, device: str | torch.device = "cpu",
                        cache_dir: str | None = None) -> ACCMCaptioner:
        from actors.loading import local_model_dir

        return cls(CaptionModel.from_pretrained(local_model_dir(captioner_url, cache_dir), device=device),
                   CaptionSelector.from_pretrained(local_model_dir(selector_url, cache_dir), device=device))

    @property
    def input_features(self) -> str:
        """Which discarded features ``caption`` expects: "feature_layer" (``PrunedBatch.discarded``) or
        "projected" (``PrunedBatch.discarded_projected``, the ACCM reference)."""
        return self.captioner.config.input_features

    @property
    def beams(self) -> int:
        """The caption model's default beam count (what ``caption`` runs when not told otherwise)."""
        return self.captioner.config.beams

    def captioner_flops(self, discarded_tokens: int, question_tokens: int, caption_tokens: int,
                        beams: int | None = None) -> float:
        """One item's caption-model FLOPs (beam search of ``caption_tokens`` generated tokens per beam)."""
        from pipeline.flops import caption_model_flops

        return float(caption_model_flops(**captioner_flops_slot(
            self.captioner.config, self.captioner.decoder.config, discarded_tokens=discarded_tokens,
            question_tokens=question_tokens, caption_tokens=caption_tokens, beams=beams)))

    def selector_flops(self, candidates: int, tokens_per_candidate: int, shared_prefix_tokens: int = 0) -> float:
        from pipeline.flops import selector_flops

        return float(selector_flops(**selector_flops_slot(self.selector.config, self.selector.text_encoder.config,
                                                          candidates=candidates,
                                                          tokens_per_candidate=tokens_per_candidate,
                                                          shared_prefix_tokens=shared_prefix_tokens)))

    def selector_tokens(self, question: str, candidates: list[str]) -> int:
        """Padded token length of one item's selector batch (what a per-item forward computes on)."""
        lengths = self.selector.text_lengths([self.selector.text(question, c) for c in candidates])
        return min(max(lengths), self.selector.config.max_text_tokens)

    def selector_shape(self, question: str, candidates: list[str]) -> tuple[int, int]:
        """(padded tokens per candidate, shared prefix tokens) one item's selector forward computes on: with
        ``share_prefix`` the candidates' common token prefix and their padded suffixes, else (padded length, 0)."""
        if not self.selector.config.share_prefix:
            return self.selector_tokens(question, candidates), 0
        from actors.shared_prefix import common_prefix

        rows = self.selector.tokenizer([self.selector.text(question, c) for c in candidates], truncation=True,
                                       max_length=self.selector.config.max_text_tokens)["input_ids"]
        p = common_prefix(rows)
        return max(len(r) for r in rows) - p, p

    @torch.no_grad()
    def caption(self, discarded: Tensor, questions: list[str], *, beams: int | None = None) -> CaptionResult:
        """N beam candidates per item from its discarded patches [B, N-k, Dv], the selector's pick and FLOPs.

        ``discarded``: the features ``input_features`` names; ``beams``: candidates per item (default the
        caption model's ``beams``; 1 decodes greedily and the selector does not run)."""
        if discarded.shape[0] != len(questions):
            raise ValueError("one question per item")
        if beams is not None and beams < 1:
            raise ValueError("beams must be >= 1")
        k = beams or self.captioner.config.beams
        out = self.captioner.beam_search(discarded, questions, beams=k)
        m = discarded.shape[1]
        flops_cap = [self.captioner_flops(m, q, s + 1, beams=k) for q, s in zip(out.question_tokens, out.steps,
                                                                                    strict=True)]
        if k == 1:  # one candidate (greedy decoding): nothing to choose, so the selector neither runs nor costs
            picks, probs = [0] * len(questions), torch.ones(len(questions), 1)
            flops_sel = [0.0] * len(questions)
        else:
            picks, probs = self.selector.select(questions, out.captions)
            flops_sel = [self.selector_flops(len(c), *self.selector_shape(q, c))
                         for q, c in zip(questions, out.captions, strict=True)]
        return CaptionResult(
            selected=[c[i] for c, i in zip(out.captions, picks, strict=True)],
            candidates=out.captions,
            probs=probs.tolist(),
            flops_captioner=flops_cap,
            flops_selector=flops_sel,
        )


def answer_token_ids(engine, answer: str) -> list[int]:
    """The tokens ``answer_log_probs`` teacher-forces for one answer: the LVLM's training format
    ``ASSISTANT: {answer}</s>`` (a space, the answer, EOS)."""
    return engine.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"] + [engine.eos_token_id]


def answer_log_probs(
    engine, visual: list[Tensor], questions: list[str], captions: list[str | None], answers: list[str]
) -> list[Tensor]:
    """Teacher-forced log-distributions [T_i, V] at each answer position (answer tokens + EOS) of the LVLM.

    The engine generates but does not score, so this builds the same sequence its ``generate`` prefills
    (text before the image, projected ``visual`` tokens, text after, from ``actors.prompt``) and appends
    the answer. Used by ACCM's self-supervised training (KL of reference vs captioned distributions).
    """
    from actors.prompt import IMAGE_TOKEN, build_prompt

    tok, model = engine.tokenizer, engine.model
    embed = model.get_input_embeddings()
    seqs, n_prompt, n_answer = [], [], []
    for feats, q, c, a in zip(visual, questions, captions, answers, strict=True):
        ids = tok(build_prompt(q, c, IMAGE_TOKEN))["input_ids"]
        j = ids.index(engine.image_token_id)
        ans = answer_token_ids(engine, a)
        text = embed(torch.tensor(ids[:j] + ids[j + 1 :] + ans[:-1], device=engine.device))
        seqs.append(torch.cat([text[:j], engine.project(feats), text[j:]]))
        n_answer.append(len(ans))
        n_prompt.append(seqs[-1].shape[0] - len(ans) + 1)
    width = max(s.shape[0] for s in seqs)
    b = len(seqs)
    embeds = seqs[0].new_zeros(b, width, seqs[0].shape[-1])
    mask = torch.zeros(b, width, dtype=torch.long, device=engine.device)
    for i, s in enumerate(seqs):
        embeds[i, width - s.shape[0] :] = s
        mask[i, width - s.shape[0] :] = 1
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                        position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
    out = []
    for i, s in enumerate(seqs):
        start = width - s.shape[0] + n_prompt[i] - 1  # last prompt position predicts the first answer token
        out.append(model.lm_head(hidden[i, start : start + n_answer[i]]).float().log_softmax(-1))
    return out
