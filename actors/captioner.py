"""ACCM caption model (SPEC §1.2): a ClipCap-style mapper over the *discarded* patches + a causal LM decoder.

    discarded patches [B, N-k, Dv] --Linear--> [B, N-k, d] ++ P learned constants --encoder--> last P = prefix
    decoder input: [question token embeddings ; prefix] then caption tokens; beam search -> N candidates

The decoder is any Hugging Face causal LM (``GPT2LMHeadModel`` in the reference, a small one here with the
LVLM's word-level vocabulary). On disk a caption model is a folder::

    accm_captioner.json      CaptionConfig (mapper shape, beam settings)
    mapper.safetensors       mapper weights
    decoder/                 the decoder + its tokenizer in HF layout (a real `gpt2` folder drops in here)

``mapper_arch``: "encoder" (``Mapper`` below) or "clipcap" (the ACCM authors' ClipCap TransformerMapper,
``actors.clipcap``, with their parameter names). ``input_features`` names which discarded features the mapper
reads; ``beam_rank`` / ``stop_on_eos`` / ``decode`` select the project's search or the authors' ``generate_beam``.

Attention is written out (no SDPA) in the mapper and the decoder is loaded with eager attention, so that
``torch.utils.flop_counter.FlopCounterMode`` sees every matmul and agrees with ``pipeline/flops.py``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from actors.encoder_blocks import Encoder

CONFIG_NAME = "accm_captioner.json"
MAPPER_WEIGHTS = "mapper.safetensors"
DECODER_DIR = "decoder"
INPUT_FEATURES = ("feature_layer", "projected")
MAPPER_ARCHS = ("encoder", "clipcap")


def detokenize(text: str) -> str:
    """Undo a word-level tokenizer's spaces before punctuation ('yellow .' -> 'yellow.'): the caption is then
    the same string as the scene facts it was trained on (and re-tokenizes to the same ids)."""
    return re.sub(r" ([.,?:])", r"\1", text).strip()


# --------------------------------------------------------------------------------------------------------
# Config, mapper, caption model
# --------------------------------------------------------------------------------------------------------


@dataclass
class CaptionConfig:
    """Everything about a caption model that is not in the decoder's own HF config."""

    feature_dim: int  # Dv of the vision tower's patch features
    hidden: int  # mapper width = decoder embedding width (ClipCap)
    prefix_len: int = 8  # P
    # False: ClipCap's prefix, the last P mapper outputs (a summary that does not depend on the question).
    # True: every mapper output (one slot per discarded patch, then the P constants), so the decoder's own
    # attention, which sees the question, can pick out the patch the question names (docs/notes/accm.md,
    # Session 5). Costs M more decoder-prefill tokens.
    patch_prefix: bool = False
    mapper_layers: int = 2
    mapper_heads: int = 4
    mapper_intermediate: int = 0  # 0 -> 2 * hidden
    beams: int = 3
    max_caption_tokens: int = 16
    length_penalty: float = 1.0  # final ranking: sum log-prob / length ** length_penalty
    stop_texts: list[str] = field(default_factory=lambda: ["."])
    # Which discarded features the mapper reads: "feature_layer" = PrunedBatch.discarded (the vision tower's
    # feature layer, what the project's own models train on); "projected" = PrunedBatch.discarded_projected
    # (the per-patch projected last-layer CLIP embeddings the ACCM authors feed, clip_encoder.py lines 268-275).
    input_features: str = "feature_layer"
    # "encoder": the project's mapper (Mapper below); "clipcap": the authors' TransformerMapper (actors.clipcap)
    mapper_arch: str = "encoder"
    # Beam search. Defaults = the project's search; the ACCM reference (decoding_scheme.py generate_beam,
    # lines 72-131) is beam_rank="mean", stop_on_eos=False, decode="raw", max_caption_tokens=67, beams=3.
    beam_rank: str = "sum"  # candidates ranked at every step by their summed ("sum") or mean ("mean") log-prob
    stop_on_eos: bool = True  # a beam also ends at the tokenizer's EOS (generate_beam stops only at stop_texts)
    decode: str = "detokenize"  # "raw": tokenizer.decode(ids) as is, stop token included, specials kept
    # The project's option (ACCM reads the discarded patches only, clip_encoder.py lines 268-275): the mapper
    # also reads the kept patches, after the discarded ones, with a 1 in an extra flag channel
    # (``actors.kept_context``), so a caption can state what needs the whole scene (a count).
    kept_context: bool = False

    def __post_init__(self) -> None:
        if not self.mapper_intermediate:
            self.mapper_intermediate = 2 * self.hidden
        for name, value, allowed in (("input_features", self.input_features, INPUT_FEATURES),
                                     ("mapper_arch", self.mapper_arch, MAPPER_ARCHS),
                                     ("beam_rank", self.beam_rank, ("sum", "mean")),
                                     ("decode", self.decode, ("detokenize", "raw"))):
            if value not in allowed:
                raise ValueError(f"CaptionConfig.{name} must be one of {allowed}, not {value!r}")


@torch.no_grad()
def standardize_linear(linear: nn.Linear, features: Tensor) -> dict[str, float]:
    """Fold per-dimension standardisation of ``features`` into ``linear`` in place (see Mapper.standardize_input)."""
    feats = features.reshape(-1, features.shape[-1]).float()
    mu, sigma = feats.mean(0), feats.std(0) + 1e-5
    w = linear.weight
    linear.bias -= (w / sigma.to(w)) @ mu.to(w)
    linear.weight /= sigma.to(w)
    return {"feature_mean_norm": round(mu.norm().item(), 2), "feature_std_mean": round(sigma.mean().item(), 3)}


def build_mapper(config: CaptionConfig) -> nn.Module:
    """The mapper ``config.mapper_arch`` names."""
    if config.mapper_arch == "clipcap":
        from actors.clipcap import ClipCapMapper

        return ClipCapMapper(config)
    return Mapper(config)


class Mapper(nn.Module):
    """Linear on every discarded patch feature, concatenated with P learned constants, through an encoder."""

    def __init__(self, config: CaptionConfig) -> None:
        super().__init__()
        self.prefix_len = config.prefix_len
        self.patch_prefix = config.patch_prefix
        self.linear = nn.Linear(config.feature_dim + int(config.kept_context), config.hidden)
        self.prefix_const = nn.Parameter(torch.randn(config.prefix_len, config.hidden) * 0.02)
        self.encoder = Encoder(config.hidden, config.mapper_layers, config.mapper_heads, config.mapper_intermediate)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.blocks

    def standardize_input(self, features: Tensor) -> dict[str, float]:
        """Fold per-dimension standardisation of the patch features into ``linear`` (W/sigma, b - W mu/sigma).

        The tower's penultimate residual stream carries a large component shared by every patch (feature
        norm ~25, per-dimension std ~1.2): mapped as is, the patch tokens are nearly identical and the
        caption model sits on the language-prior plateau (measured: val CE 0.76 after 600 steps at width 40;
        with this fold it leaves the plateau, see docs/notes/accm.md). Same architecture, same FLOPs.
        """
        return standardize_linear(self.linear, features)

    def forward(self, discarded: Tensor) -> Tensor:
        """[B, M, Dv] -> prefix [B, P, d] (``patch_prefix``: [B, M + P, d])."""
        x = self.linear(discarded)
        x = torch.cat([x, self.prefix_const.expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)
        out = self.encoder(x)
        return out if self.patch_prefix else out[:, -self.prefix_len :]


@dataclass
class TeacherForced:
    """One teacher-forced decoder pass: position ``prompt_len - 1 + t`` predicts caption token t; with a patch
    prefix, patch slot s sits at position ``first_slot + s``."""

    out: object  # the decoder's CausalLMOutput (logits, and attentions / hidden_states when asked)
    caption_ids: Tensor  # [B, Lc], right-padded
    caption_mask: Tensor  # [B, Lc]
    prompt_len: int  # question + prefix
    first_slot: int  # patch_prefix models only


@dataclass
class BeamOutput:
    """Per item: N candidates sorted best first, their scores, token counts and the decode steps run."""

    captions: list[list[str]]
    scores: list[list[float]]  # length-normalised log-probabilities, descending
    token_ids: list[list[list[int]]]
    steps: list[int]  # decoder forward passes after the prefill (tokens of the longest beam, minus 1)
    question_tokens: list[int]


class CaptionModel(nn.Module):
    """Mapper + HF causal LM decoder + tokenizer; beam search and the teacher-forced caption loss."""

    def __init__(self, config: CaptionConfig, decoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        if decoder.get_input_embeddings().embedding_dim != config.hidden:
            raise ValueError("mapper hidden size must equal the decoder's embedding width")
        self.config = config
        self.mapper = build_mapper(config)
        self.decoder = decoder
        self.tokenizer = tokenizer
        stop = {self._stop_id(tokenizer, t) for t in config.stop_texts}
        if config.stop_on_eos and tokenizer.eos_token_id is not None:
            stop.add(tokenizer.eos_token_id)
        stop.discard(tokenizer.unk_token_id)
        self.stop_ids = sorted(i for i in stop if i is not None)
        if not self.stop_ids:
            raise ValueError(f"no stop token: none of {config.stop_texts} is a token (and no EOS stop)")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

    @staticmethod
    def _stop_id(tokenizer: PreTrainedTokenizerBase, text: str) -> int | None:
        """The vocabulary entry ``text``; else the first id it encodes to (generate_beam's
        ``tokenizer.encode(stop_token)[0]``, decoding_scheme.py line 76)."""
        tid = tokenizer.convert_tokens_to_ids(text)
        if tid is None or tid == tokenizer.unk_token_id:
            ids = tokenizer.encode(text, add_special_tokens=False)
            tid = ids[0] if ids else None
        return tid

    # ---- persistence -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu") -> CaptionModel:
        """Load a folder written by ``save_pretrained``; ``decoder/`` may be any HF causal LM (e.g. gpt2)."""
        path = Path(path)
        config = CaptionConfig(**json.loads((path / CONFIG_NAME).read_text()))
        decoder = AutoModelForCausalLM.from_pretrained(path / DECODER_DIR, attn_implementation="eager")
        tokenizer = AutoTokenizer.from_pretrained(path / DECODER_DIR)
        model = cls(config, decoder, tokenizer)
        weights = path / MAPPER_WEIGHTS
        if weights.exists():  # a fresh folder around a stock decoder has no mapper yet
            model.mapper.load_state_dict(load_file(str(weights)))
        return model.to(device).eval()

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.mapper.state_dict().items()},
                  str(path / MAPPER_WEIGHTS))
        self.decoder.save_pretrained(path / DECODER_DIR)
        self.tokenizer.save_pretrained(path / DECODER_DIR)

    @property
    def device(self) -> torch.device:
        return self.mapper.linear.weight.device

    # ---- inputs ------------------------------------------------------------------------------------------
    def question_ids(self, questions: list[str]) -> list[list[int]]:
        return [self.tokenizer(q)["input_ids"] for q in questions]

    def caption_ids(self, captions: list[str]) -> list[list[int]]:
        return [self.tokenizer(c.strip(), add_special_tokens=False)["input_ids"] for c in captions]

    def _prefix_inputs(self, discarded: Tensor, questions: list[str]) -> tuple[Tensor, Tensor, list[int]]:
        """Left-padded [question ; prefix] embeddings and mask: the decoder's prompt for every item."""
        ids = self.question_ids(questions)
        lq = max(len(i) for i in ids)
        b = len(ids)
        q_emb_layer = self.decoder.get_input_embeddings()
        prefix = self.mapper(discarded.to(self.device, q_emb_layer.weight.dtype))
        padded = torch.full((b, lq), self.pad_id, dtype=torch.long)
        mask = torch.zeros(b, lq + prefix.shape[1], dtype=torch.long)
        for r, row in enumerate(ids):
            padded[r, lq - len(row):] = torch.tensor(row)
            mask[r, lq - len(row):] = 1
        mask = mask.to(self.device)
        q_emb = q_emb_layer(padded.to(self.device))
        return torch.cat([q_emb, prefix], dim=1), mask, [len(i) for i in ids]

    @staticmethod
    def _positions(mask: Tensor) -> Tensor:
        return (mask.cumsum(-1) - 1).clamp(min=0)

    # ---- training -------------------------------------------------------------------------------------
    def caption_loss(self, discarded: Tensor, questions: list[str], captions: list[str]) -> Tensor:
        """Per-item mean cross-entropy of ``captions`` given (discarded patches, question): [B]."""
        return self.caption_losses(discarded, questions, captions)["caption_ce"]

    def caption_losses(
        self, discarded: Tensor, questions: list[str], captions: list[str], *,
        target_slots: list[list[int]] | None = None, attention_layer: int = -1, attention_heads: int = 0,
        slot_hidden: bool = False,
    ) -> dict[str, Tensor]:
        """One teacher-forced pass -> ``caption_ce`` (per item [B]), ``attention`` (scalar) and, with
        ``slot_hidden``, the patch slots' hidden states entering layer ``attention_layer`` ([B, M, d]).

        ``target_slots`` (pre-training only, ``patch_prefix`` models): per item, the discarded-patch slots of
        the objects its caption is about (``[]``: none seen, no supervision). The first ``attention_heads``
        heads (0: half) of decoder layer ``attention_layer``, at every position that predicts a caption token,
        should spread their attention over those slots (``actors.attention_rows.attention_target_loss``, the
        LVLM's lesson: without it a small model does not learn to pick the object a question names).
        ``slot_hidden`` is what those heads read from: a training job can ask it to keep each patch's
        attributes (measured: without that, the earlier layer mixes them away, docs/notes/accm.md Session 5).
        """
        supervise = target_slots is not None and any(target_slots)
        if (supervise or slot_hidden) and not self.config.patch_prefix:
            raise ValueError("attention supervision needs patch_prefix=True (one prefix slot per patch)")
        tf = self.teacher_forced(discarded, questions, captions, output_attentions=supervise,
                                 output_hidden_states=slot_hidden)
        b, lc = tf.caption_ids.shape
        logits = tf.out.logits[:, tf.prompt_len - 1 : tf.prompt_len - 1 + lc]  # position t predicts caption token t
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tf.caption_ids.reshape(-1),
                              reduction="none")
        nll = nll.view(b, lc) * tf.caption_mask
        result = {"caption_ce": nll.sum(1) / tf.caption_mask.sum(1).clamp(min=1), "attention": nll.new_zeros(())}
        m = discarded.shape[1]
        if slot_hidden:
            layer = attention_layer % self.decoder.config.num_hidden_layers
            result["slot_hidden"] = tf.out.hidden_states[layer][:, tf.first_slot : tf.first_slot + m]
        if supervise:
            from actors.attention_rows import attention_target_loss

            lengths = tf.caption_mask.sum(1).tolist()
            targets = [(r, tf.prompt_len - 1 + t, [tf.first_slot + s for s in slots])
                       for r, slots in enumerate(target_slots) if slots for t in range(lengths[r])]
            attention = tf.out.attentions[attention_layer]
            heads = attention_heads or max(1, attention.shape[1] // 2)
            result["attention"] = attention_target_loss(attention.float(), targets, heads)
        return result

    def teacher_forced(
        self, discarded: Tensor, questions: list[str], captions: list[str], *,
        output_attentions: bool = False, output_hidden_states: bool = False,
    ) -> TeacherForced:
        """The decoder over [question ; prefix ; caption] (captions right-padded), and where each part sits."""
        embeds, mask, _ = self._prefix_inputs(discarded, questions)
        cap = self.caption_ids(captions)
        lc = max(len(c) for c in cap)
        b, lp = mask.shape
        cap_ids = torch.full((b, lc), self.pad_id, dtype=torch.long, device=self.device)
        cap_mask = torch.zeros(b, lc, dtype=torch.long, device=self.device)
        for r, row in enumerate(cap):
            cap_ids[r, : len(row)] = torch.tensor(row)
            cap_mask[r, : len(row)] = 1
        embeds = torch.cat([embeds, self.decoder.get_input_embeddings()(cap_ids)], dim=1)
        full_mask = torch.cat([mask, cap_mask], dim=1)
        out = self.decoder(inputs_embeds=embeds, attention_mask=full_mask, position_ids=self._positions(full_mask),
                           use_cache=False, output_attentions=output_attentions,
                           output_hidden_states=output_hidden_states)
        first_slot = lp - discarded.shape[1] - self.config.prefix_len  # the prefix starts after the question
        return TeacherForced(out, cap_ids, cap_mask, lp, first_slot)

    # ---- inference ------------------------------------------------------------------------------------
    @torch.no_grad()
    def beam_search(
        self, discarded: Tensor, questions: list[str], *, beams: int | None = None, max_tokens: int | None = None
    ) -> BeamOutput:
        """Batched beam search with a KV cache; every item gets ``beams`` distinct candidates, best first.

        The prompt ([question ; prefix]) is run once per item, then its cache is copied to the beams.
        A beam ends at a stop token ('.', and EOS with ``stop_on_eos``); a finished beam keeps its score and
        length and continues only with padding at zero cost. ``beam_rank="sum"`` keeps the k best summed
        log-probabilities at every step; ``"mean"`` the k best summed / length, as generate_beam does
        (decoding_scheme.py lines 102-107). The final order is by sum / length ** length_penalty.
        """
        k = beams or self.config.beams
        max_tokens = max_tokens or self.config.max_caption_tokens
        rank_by_sum = self.config.beam_rank == "sum"
        embeds, mask, q_lens = self._prefix_inputs(discarded, questions)
        b = embeds.shape[0]
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=self._positions(mask),
                           use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        logp = out.logits[:, -1].float().log_softmax(-1)  # [B, V]
        vocab = logp.shape[-1]
        scores, tokens = logp.topk(k, dim=-1)  # distinct first tokens: [B, K]
        stop = torch.tensor(self.stop_ids, device=self.device)
        seqs = tokens.reshape(b * k, 1)
        finished = torch.isin(seqs[:, 0], stop)
        lengths = torch.ones(b * k, device=self.device)
        scores = scores.reshape(b * k)
        steps = torch.zeros(b, dtype=torch.long)  # per item: decode passes while any of its beams ran
        cache.batch_repeat_interleave(k)
        mask = mask.repeat_interleave(k, dim=0)
        pos = self._positions(mask)[:, -1:]
        for _ in range(max_tokens - 1):
            if bool(finished.all()):
                break
            steps += ~finished.view(b, k).all(1).cpu()
            mask = torch.cat([mask, mask.new_ones(b * k, 1)], dim=1)
            pos = pos + 1
            out = self.decoder(input_ids=seqs[:, -1:], attention_mask=mask, position_ids=pos,
                               past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logp = out.logits[:, -1].float().log_softmax(-1)
            logp[finished] = float("-inf")
            logp[finished, self.pad_id] = 0.0  # a finished beam continues only with padding, score unchanged
            cand = (scores[:, None] + logp).view(b, k * vocab)  # summed log-probs of every continuation
            # generate_beam (decoding_scheme.py lines 100-104): a running beam's length grows by one, a
            # finished one's does not; candidates are ranked by scores_sum / seq_lengths
            new_len = lengths + (~finished).float()
            rank = cand if rank_by_sum else (cand.view(b * k, vocab) / new_len[:, None]).view(b, k * vocab)
            _, idx = rank.topk(k, dim=-1)
            top = cand.gather(1, idx)
            src = (idx // vocab + torch.arange(b, device=self.device)[:, None] * k).reshape(-1)
            tok = (idx % vocab).reshape(-1)
            cache.reorder_cache(src)
            was_finished = finished[src]
            seqs = torch.cat([seqs[src], tok[:, None]], dim=1)
            lengths = new_len[src]
            finished = was_finished | torch.isin(tok, stop)
            scores = top.reshape(-1)
        final = (scores / lengths.pow(self.config.length_penalty)).view(b, k)
        order = final.argsort(dim=-1, descending=True)
        captions, out_scores, out_ids = [], [], []
        for r in range(b):
            caps, scs, ids = [], [], []
            for j in order[r].tolist():
                n = int(lengths[r * k + j].item())
                row = seqs[r * k + j, :n].tolist()
                ids.append(row)
                caps.append(self.decode_caption(row))
                scs.append(float(final[r, j]))
            captions.append(caps)
            out_scores.append(scs)
            out_ids.append(ids)
        return BeamOutput(captions, out_scores, out_ids, steps.tolist(), q_lens)

    def decode_caption(self, ids: list[int]) -> str:
        """``decode="raw"``: ``tokenizer.decode(tokens[:length])`` as generate_beam returns it (decoding_scheme.py
        line 128: stop token included, nothing stripped); else special tokens dropped and ``detokenize``d."""
        if self.config.decode == "raw":
            return self.tokenizer.decode(ids)
        return detokenize(self.tokenizer.decode(ids, skip_special_tokens=True))


def shallower_mapper(model: CaptionModel, layers: int) -> CaptionModel:
    """Keep only the mapper's first ``layers`` encoder blocks (and its final norm), in place.

    The start of a cheaper caption model fine-tuned from a trained one: each mapper block costs as much as
    a decoder layer over every discarded patch (~4.9 MFLOPs per item for the proving ground's, 87.5%)."""
    blocks = model.mapper.blocks
    if not 0 <= layers <= len(blocks):
        raise ValueError(f"mapper has {len(blocks)} blocks; cannot keep {layers}")
    del blocks[layers:]
    model.config.mapper_layers = layers
    return model


def build_caption_model(
    tokenizer: PreTrainedTokenizerBase,
    *,
    feature_dim: int,
    hidden: int = 64,
    decoder_layers: int = 2,
    decoder_heads: int = 4,
    decoder_intermediate: int | None = None,
    prefix_len: int = 8,
    patch_prefix: bool = False,
    mapper_layers: int = 2,
    mapper_heads: int = 4,
    mapper_intermediate: int = 0,
    beams: int = 3,
    max_caption_tokens: int = 16,
    dropout: float = 0.1,
    seed: int = 0,
    n_positions: int = 256,
    mapper_arch: str = "encoder",
    input_features: str = "feature_layer",
    beam_rank: str = "sum",
    stop_on_eos: bool = True,
    decode: str = "detokenize",
    length_penalty: float = 1.0,
    kept_context: bool = False,
) -> CaptionModel:
    """A random-init caption model with a small ``GPT2LMHeadModel`` decoder over ``tokenizer``'s vocabulary.

    ``n_positions``: the decoder's position table (question + prefix + caption must fit). ``mapper_arch``,
    ``input_features``, ``beam_rank``, ``stop_on_eos``, ``decode``, ``kept_context``: see ``CaptionConfig``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    dec_config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=hidden,
        n_layer=decoder_layers,
        n_head=decoder_heads,
        n_inner=decoder_intermediate or 4 * hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        attn_implementation="eager",
    )
    config = CaptionConfig(feature_dim=feature_dim, hidden=hidden, prefix_len=prefix_len,
                           patch_prefix=patch_prefix, mapper_layers=mapper_layers, mapper_heads=mapper_heads,
                           mapper_intermediate=mapper_intermediate, beams=beams,
                           max_caption_tokens=max_caption_tokens, mapper_arch=mapper_arch,
                           input_features=input_features, beam_rank=beam_rank, stop_on_eos=stop_on_eos,
                           decode=decode, length_penalty=length_penalty, kept_context=kept_context)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        decoder = GPT2LMHeadModel(dec_config)
        model = CaptionModel(config, decoder, tokenizer)
    return model.eval()
