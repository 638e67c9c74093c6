"""Pruned LLaVA inference: vision stage, visual-token pruners, caption splice, batched greedy decoding, FLOPs.

Two halves with a clean seam, because the pipeline runs them in different actor tiers:

* ``preprocess`` -> ``encode_images`` -> ``prune``: the CLIP tower once per image, then a pruner before
  the projector (captioner tier; ships ``PrunedBatch.retained`` onwards).
* ``generate``: projector on the retained features, prompt built from ``actors.prompt`` (optional
  caption splice), LLaMA prefill + cached greedy decoding with our own decoder loop
  (``actors.fastv``), FastV's or DART's (``actors.dart``) in-LLM pruning when asked, and per-item
  analytic FLOPs.

Any ``LlavaForConditionalGeneration`` checkpoint in the llava-hf layout works (llava-1.5-7b-hf or the
small models of the same classes this project trains). Attention is fused (SDPA) in both the tower and the
LLM; ``attention="eager"`` runs the written-out reference instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from actors.dart import DEFAULT_LAYER as DART_LAYER
from actors.dart import DEFAULT_PIVOTS as DART_PIVOTS
from actors.dart import dart_flops, dart_kept_count
from actors.fastv import FastVSpec, LlamaDecoderRunner
from actors.loading import local_model_dir
from actors.prompt import PromptFormat
from actors.pruners import PrunedBatch, TextGuide, prune, resolve_keep_tokens, visionzip_split
from actors.vision import VisionBatch, encode_images, feature_layer_count, next_layer_cls_score
from pipeline.config import IN_LLM_METHODS, METHODS, TEXT_GUIDED_METHODS  # the one list of each

__all__ = [
    "METHODS",
    "GenerationResult",
    "LlavaEngine",
    "PrunedBatch",
    "VisionBatch",
    "resolve_keep_tokens",
]


@dataclass
class GenerationResult:
    texts: list[str]
    prefill_tokens: list[int]  # LLM input length per item (text + visual tokens, before FastV's cut)
    new_tokens: list[int]  # generated tokens per item, including a final </s>
    flops: list[dict[str, float]]  # pipeline.flops.llava_item_flops per item
    token_ids: list[list[int]] = field(default_factory=list)  # generated ids per item
    pad_tokens: list[int] = field(default_factory=list)  # left padding per item (batch width - own length)


class LlavaEngine:
    """A LLaVA checkpoint plus the pruning-aware inference loop around it."""

    def __init__(
        self, model: Any, processor: Any, *, model_id: str = "", text_guide: TextGuide | None = None,
        attention: str = "sdpa",
    ):
        model.eval()
        self.model = model
        self.processor = processor
        self.config = model.config
        self.model_id = model_id
        self.text_guide = text_guide
        self.keep_last_state = False
        self.last_state = None
        self.tokenizer = processor.tokenizer
        self.image_token_id = int(self.config.image_token_id)
        self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        vc = self.config.vision_config
        self.num_patches = (vc.image_size // vc.patch_size) ** 2
        self.runner = LlamaDecoderRunner(model.model.language_model, model.lm_head, attention=attention)
        self.attention = attention
        # layers run up to LLaVA's feature layer (see vision_layers_for)
        self._feature_layers = feature_layer_count(vc.num_hidden_layers, self.config.vision_feature_layer)

    @classmethod
    def from_pretrained(
        cls,
        url: str,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | None = None,
        clip_text_url: str | None = None,
        vision_only: bool = False,
    ) -> LlavaEngine:
        """Load from a local dir, ``file://`` or ``s3://`` (copied once per process into ``cache_dir``).

        ``clip_text_url``: optional CLIPModel checkpoint for PruMerge+'s text-guided picks.
        ``vision_only``: load only the vision tower and projector (the captioner tier's needs); the LLM stays
        on the meta device and ``generate`` refuses to run.
        """
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        path = local_model_dir(url, cache_dir)
        if vision_only:
            from actors.loading import load_llava_vision_only

            model = load_llava_vision_only(path, dtype=dtype, device=device)
        else:
            model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        processor = AutoProcessor.from_pretrained(path)
        guide = None
        if clip_text_url is not None:
            guide = TextGuide.from_pretrained(local_model_dir(clip_text_url, cache_dir), dtype=dtype).to(
                device
            )
        return cls(model if vision_only else model.to(device), processor, model_id=str(url), text_guide=guide)

    @property
    def vision_only(self) -> bool:
        """True when the LLM's weights were never loaded (``from_pretrained(vision_only=True)``)."""
        return self.model.lm_head.weight.is_meta

    @property
    def device(self) -> torch.device:
        return next(self.model.model.multi_modal_projector.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.model.multi_modal_projector.parameters()).dtype

    # -- vision + pruning (captioner tier) ---------------------------------------------------------

    def preprocess(self, images: list[Image.Image]) -> Tensor:
        """PIL images -> pixel_values [B, 3, H, W] (the checkpoint's own image processor)."""
        images = [im.convert("RGB") for im in images]
        return self.processor.image_processor(images, return_tensors="pt")["pixel_values"]

    def uses_projection(self, method: str) -> bool:
        """Whether ``method`` reads the last layer's projected patches here: a text-guided pruner
        (``TEXT_GUIDED_METHODS``) with a text guide loaded. The others stop at LLaVA's feature layer, as they
        would in a job that runs them alone, and are priced so (a shared sweep encoding is the sweep's saving)."""
        return self.text_guide is not None and method in TEXT_GUIDED_METHODS

    def vision_layers_for(self, method: str) -> int:
        """Full encoder layers ``method`` needs: up to the feature layer, or every layer when it reads projected
        patches (``uses_projection``). PruMerge+'s single-head score adds a partial next layer (LN1, k over all
        tokens, q of CLS), priced as the pruner's (pipeline.flops.cls_score_flops)."""
        if self.uses_projection(method):
            return self.config.vision_config.num_hidden_layers
        return self._feature_layers

    @property
    def _tower(self) -> Any:
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower)

    def encode_images(self, pixel_values: Tensor, *, projected: bool | None = None) -> VisionBatch:
        """The vision tower, once (actors.vision): feature-layer patches, CLS attention, head-mean keys.

        ``projected`` (default: iff ``text_guide`` is set): also the last layer's projected patch embeddings
        through the text guide's post_layernorm + visual_projection (every layer runs), and with them the
        single-head CLS score. Without them that score is left to ``prune`` (only PruMerge+/ACCM need it),
        except when the feature layer is the last layer (then it is free: the feature layer's own q/k)."""
        if projected is None:
            projected = self.text_guide is not None
        elif projected and self.text_guide is None:
            raise ValueError("projected=True needs a text guide (text_guide=... / clip_text_url)")
        return encode_images(
            self._tower,
            pixel_values.to(self.device),
            feature_layer=self.config.vision_feature_layer,
            select_strategy=self.config.vision_feature_select_strategy,
            projection=self.text_guide if projected else None,
            next_layer_score=False,
            attention=self.attention,
        )

    def cls_score(self, vision: VisionBatch) -> Tensor:
        """PruMerge+'s single-head CLS score [B, N] from the layer after the feature layer, on the feature
        layer's output (CLS + patches): what ``encode_images`` leaves out unless it comes free."""
        if vision.cls_feature is None:
            raise ValueError("the single-head CLS score needs VisionBatch.cls_feature")
        layers = self._tower.encoder.layers
        if self._feature_layers >= len(layers):
            raise ValueError("feature layer is the last layer: encode_images computes the score itself")
        hidden = torch.cat([vision.cls_feature[:, None], vision.patch_features], dim=1)
        return next_layer_cls_score(layers[self._feature_layers], hidden)

    def prune(
        self,
        vision: VisionBatch,
        method: str,
        keep_tokens: int,
        item_ids: list[str],
        questions: list[str],
        *,
        text_pick: str = "nearest",
        cdpruner_sign: str = "code",
    ) -> PrunedBatch:
        """Pruners before the LLM (``fastv``/``dart``/``none`` keep every patch here). ``vision`` is not changed.

        PruMerge+/ACCM: the single-head CLS score is computed here when ``vision`` lacks it;
        ``text_pick``: "nearest" (the paper) or "farthest" (ACCM's code as written). CDPruner and DivPrune
        compare the patches through the projector (run here on all of them); ``cdpruner_sign``: "code" | "paper"."""
        n = vision.patch_features.shape[1]
        keep = resolve_keep_tokens(n, keep_tokens)
        if method == "dart":  # prunes inside the LLM: every patch goes on, as for fastv
            method = "none"
        needs_score = method in ("prumerge_plus", "accm") and keep < n
        if needs_score and vision.cls_attention_next is None:
            vision = replace(vision, cls_attention_next=self.cls_score(vision))
        llm_tokens = self.project(vision.patch_features) if method in ("cdpruner", "divprune") and keep < n else None
        return prune(vision, method, keep, item_ids, questions, self.text_guide, text_pick=text_pick,
                     llm_tokens=llm_tokens, cdpruner_sign=cdpruner_sign)

    def front_flops(self, method: str, keep: int, questions: list[str], *, projected: bool) -> list[dict]:
        """Per item {"vision", "pruner"} FLOPs of ``encode_images(projected=...)`` + ``prune`` as this engine
        runs them (pipeline.flops convention: matmuls only, 2 per MAC).

        vision: patch conv + the full layers run (up to the feature layer; every layer when ``projected``).
        pruner: the method's own work. PruMerge+/ACCM: the single-head CLS score (+ the partial next layer,
        k over all tokens and q of CLS, when that layer did not run in full) and, with projected patches,
        text tower + text_projection on the question's real tokens, patch projection and distances.
        CDPruner/DivPrune: the projector on every patch and their selection (+ CDPruner's text relevance).
        ``projected`` for a method that does not pick by text (ACCM over another base whose caption model reads
        projected patches): the patch projection is priced in vision.
        fastv/dart/none/random: 0 (the in-LLM ones price their scoring in the LVLM tier).
        """
        from pipeline.flops import patch_projection_flops, pruner_flops, vision_tower_flops

        if projected and self.text_guide is None:
            raise ValueError("projected=True needs a text guide")
        vc = self.config.vision_config
        n = self.num_patches
        layers = vc.num_hidden_layers if projected else self._feature_layers
        vision = vision_tower_flops(vc, layers=layers)
        proj_dim = self.text_guide.visual_projection.out_features if projected else 0
        keep = resolve_keep_tokens(n, keep)
        if method in ("prumerge_plus", "accm", "cdpruner", "divprune") and keep >= n:
            method = "none"  # prune() keeps every patch: no scoring ran
        text_specs: list[dict | None] = [None] * len(questions)
        if method in TEXT_GUIDED_METHODS and projected:
            text_specs = self.text_guide.flops_spec(questions)
        elif projected:
            vision += patch_projection_flops(vc, proj_dim)
        out = []
        for spec in text_specs:
            pruner = 0.0
            if method in ("visionzip", "prumerge_plus", "accm", "cdpruner", "divprune"):
                pruner = pruner_flops(
                    self.config, method=method, visual_tokens_total=n, visual_tokens_kept=keep,
                    visionzip_contextual=visionzip_split(keep)[1] if method == "visionzip" else None,
                    text_guide=spec, projected=projected,
                )  # fmt: skip
            out.append({"vision": vision, "pruner": pruner})
        return out

    # -- projector + LLM (LVLM tier) -----------------------------------------------------------------

    def prompt_ids(self, question: str, caption: str | None, prompt_format: PromptFormat | None = None) -> list[int]:
        """The prompt's text token ids (the image placeholder dropped): what sets a row's prefill length."""
        before, after = self._prompt_ids(question, caption, prompt_format)
        return before + after

    def _prompt_ids(self, question: str, caption: str | None,
                    prompt_format: PromptFormat | None = None) -> tuple[list[int], list[int]]:
        """Token ids before and after the image placeholder, from the one prompt module (actors.prompt)."""
        fmt = prompt_format or PromptFormat()
        ids = fmt.token_ids(self.tokenizer, question, caption, self.image_token_id)
        j = ids.index(self.image_token_id)
        return ids[:j], ids[j + 1 :]

    @torch.no_grad()
    def project(self, features: Tensor) -> Tensor:
        """Vision features [..., Dv] -> LLM embeddings [..., d] (LLaVA's MLP projector)."""
        return self.model.model.multi_modal_projector(features.to(self.device, self.dtype))

    @torch.no_grad()
    def generate(
        self,
        retained: Tensor | list[Tensor],
        questions: list[str],
        captions: list[str | None] | None = None,
        *,
        method: str = "none",
        keep_tokens: int | None = None,
        fastv_layer: int = 2,
        dart_layer: int = DART_LAYER,
        dart_pivots: tuple[int, int] = DART_PIVOTS,
        dart_count: str = "code",
        max_new_tokens: int = 8,
        captioner: list[dict | None] | None = None,
        selector: list[dict | None] | None = None,
        ignore_eos: bool = False,
        prompt_format: PromptFormat | None = None,
    ) -> GenerationResult:
        """Greedy answers for a batch. ``retained``: per item [k, Dv] vision features (pre-projector).

        Items are left padded; each item's answer is independent of its batch-mates. ``method`` only
        changes the LLM for ``fastv`` (``keep_tokens`` image tokens kept from layer ``fastv_layer`` on) and
        ``dart`` (from layer ``dart_layer`` on; ``dart_pivots`` = (image, text) pivots, ``dart_count`` see
        actors.dart); for every method it names the FLOPs accounting. ``captioner``/``selector``: per-item kwargs for
        pipeline.flops (ACCM's caption model and selector costs). ``ignore_eos``: always generate
        ``max_new_tokens`` (benchmarks: equal decode work for every method). ``prompt_format``: the
        conversation and answer-format line (``actors.prompt.PromptFormat``; default ``llava_hf``, no suffix).
        """
        from pipeline.flops import llava_item_flops

        if self.vision_only:
            raise RuntimeError("this engine was loaded with vision_only=True (captioner tier): no LLM weights")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        depth = self.config.text_config.num_hidden_layers
        if method == "fastv" and not 1 <= fastv_layer < depth:
            raise ValueError(f"--fastv-layer must be in 1..{depth - 1} for this {depth}-layer LLM, got {fastv_layer}")
        if method == "dart" and not 1 <= dart_layer < depth:
            raise ValueError(f"dart_layer must be in 1..{depth - 1} for this {depth}-layer LLM, got {dart_layer}")
        cut_layer = dart_layer if method == "dart" else fastv_layer
        items = list(retained.unbind(0)) if isinstance(retained, Tensor) else list(retained)
        b = len(items)
        if len(questions) != b:
            raise ValueError(f"{b} visual inputs but {len(questions)} questions")
        captions = list(captions) if captions is not None else [None] * b
        embed = self.model.get_input_embeddings()
        dev, dtype = self.device, self.dtype

        seqs, starts, n_vis, text_lens, caption_lens = [], [], [], [], []
        if isinstance(retained, Tensor):  # one projector call for the batch
            projected = list(self.project(retained).unbind(0))
        elif len({tuple(f.shape) for f in items}) == 1:
            projected = list(self.project(torch.stack(items)).unbind(0))
        else:
            projected = [self.project(f) for f in items]
        for vis, q, c in zip(projected, questions, captions, strict=True):
            before, after = self._prompt_ids(q, c, prompt_format)
            plain_before, plain_after = self._prompt_ids(q, None, prompt_format) if c else (before, after)
            ids = torch.tensor(before + after, device=dev)
            text = embed(ids)
            seqs.append(torch.cat([text[: len(before)], vis, text[len(before) :]]))
            starts.append(len(before))
            n_vis.append(vis.shape[0])
            text_lens.append(len(plain_before) + len(plain_after))
            caption_lens.append(len(before) + len(after) - text_lens[-1])

        lengths = [s.shape[0] for s in seqs]
        width = max(lengths)
        embeds = torch.zeros(b, width, seqs[0].shape[-1], device=dev, dtype=dtype)
        mask = torch.zeros(b, width, dtype=torch.bool, device=dev)
        for i, s in enumerate(seqs):
            embeds[i, width - lengths[i] :] = s
            mask[i, width - lengths[i] :] = True
        image_start = torch.tensor([width - n + s for n, s in zip(lengths, starts, strict=True)], device=dev)
        image_len = torch.tensor(n_vis, device=dev)

        fastv = None
        fastv_keep = n_vis
        if method in IN_LLM_METHODS:
            keeps = [resolve_keep_tokens(n, keep_tokens) for n in n_vis]
            fastv_keep = keeps
            if any(k < n for k, n in zip(keeps, n_vis, strict=True)):
                if len(set(keeps)) != 1 or len(set(n_vis)) != 1:
                    raise ValueError(f"{method} needs the same visual token count and budget for every item")
                if method == "dart":
                    p_img, p_txt = dart_pivots
                    fastv = FastVSpec(layer=dart_layer, keep=keeps[0], rule="dart", pivot_image=p_img,
                                      pivot_text=p_txt, count=dart_count)
                    fastv_keep = [dart_kept_count(n, keeps[0], p_img, p_txt, dart_count) for n in n_vis]
                else:
                    fastv = FastVSpec(layer=fastv_layer, keep=keeps[0])

        logits, state = self.runner.prefill(embeds, mask, image_start, image_len, fastv,
                                            max_new_tokens=max(max_new_tokens - 1, 0))
        if (
            self.keep_last_state
        ):  # for inspection (KV lengths, FastV's kept positions); off: it holds the cache
            self.last_state = state
        out: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool)
        tokens = torch.full((b,), self.pad_token_id, device=dev)
        for step in range(max_new_tokens):
            if step:
                logits = self.runner.decode_step(embed(tokens)[:, None], state)
            tokens = logits.argmax(dim=-1)
            for i, t in enumerate(tokens.tolist()):
                if not done[i]:
                    out[i].append(t)
                    done[i] = t == self.eos_token_id and not ignore_eos
            if bool(done.all()):
                break
            tokens = tokens.masked_fill(done.to(tokens.device), self.pad_token_id)

        text_guide = None
        if self.uses_projection(method):
            text_guide = self.text_guide.flops_spec(questions)
        flops = [
            llava_item_flops(
                self.config,
                method=method,  # fastv / dart: layers from the cut on at the kept length
                visual_tokens_total=self.num_patches,
                visual_tokens_kept=fastv_keep[i] if method in IN_LLM_METHODS else n_vis[i],
                prompt_tokens=text_lens[i],
                new_tokens=len(out[i]),
                caption_tokens=caption_lens[i],
                fastv_layer=cut_layer,
                captioner=captioner[i] if captioner else None,
                selector=selector[i] if selector else None,
                visionzip_contextual=visionzip_split(n_vis[i])[1] if method == "visionzip" else None,
                text_guide=text_guide[i] if text_guide else None,
                vision_layers=self.vision_layers_for(method),
            )
            for i in range(b)
        ]
        if method == "dart":  # DART's own cost replaces FastV's attention-row scoring (0 when nothing was cut)
            tc = self.config.text_config
            head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
            kv_dim = tc.num_key_value_heads * head_dim
            for i, f in enumerate(flops):
                own = 0.0
                if fastv is not None:
                    own = dart_flops(n_vis[i], tc.hidden_size, sum(dart_pivots), kv_dim=kv_dim,
                                     n_text=lengths[i] - (starts[i] + n_vis[i]))
                f["total"] += own - f["pruner"]
                f["pruner"] = own
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out]
        return GenerationResult(texts, lengths, [len(o) for o in out], flops, out, [width - n for n in lengths])

    # -- both halves -------------------------------------------------------------------------------

    def answer(
        self,
        images: list[Image.Image] | Tensor,
        questions: list[str],
        item_ids: list[str],
        captions: list[str | None] | None = None,
        *,
        method: str = "none",
        keep_tokens: int | None = None,
        prune_rate: float | None = None,
        fastv_layer: int = 2,
        dart_layer: int = DART_LAYER,
        dart_pivots: tuple[int, int] = DART_PIVOTS,
        dart_count: str = "code",
        max_new_tokens: int = 8,
    ) -> tuple[GenerationResult, PrunedBatch]:
        """Images (or pixel_values) -> answers: encode once, prune, generate (single-process convenience)."""
        pixels = images if isinstance(images, Tensor) else self.preprocess(images)
        keep = resolve_keep_tokens(self.num_patches, keep_tokens, prune_rate)
        pruned = self.prune(self.encode_images(pixels, projected=self.uses_projection(method)), method, keep, item_ids,
                           questions)
        result = self.generate(
            pruned.retained,
            questions,
            captions,
            method=method,
            keep_tokens=keep,
            fastv_layer=fastv_layer,
            dart_layer=dart_layer,
            dart_pivots=dart_pivots,
            dart_count=dart_count,
            max_new_tokens=max_new_tokens,
        )
        return result, pruned
