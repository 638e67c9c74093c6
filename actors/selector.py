"""ACCM caption selector (SPEC §1.3): frozen CLIP text encoder + a small trainable transformer over candidates.

Each candidate caption becomes ``"Question: {q} Supplemental information for questions: {caption}"``; the
text encoder (``CLIPTextModelWithProjection``; LongCLIP-L in the reference) gives its EOS feature projected
to ``projection_dim``. The N vectors of one item form a sequence through a pre-norm encoder, a Linear gives
one logit per candidate, softmax over candidates, argmax picks. Text only: it never sees the image.
``rank_embedding``: a learned vector per beam rank is added to each candidate's feature (zero-initialised,
so an untrained selector is still order-blind). It is the one prior a text-only selector can learn when the
candidates differ only in what the image decides: how often the caption model's first beam is the best one
(docs/notes/accm.md, Session 5).

``arch="torch_transformer"`` is the ACCM authors' ``TransformerSelector`` (selector_transformer.py): a stock
``nn.TransformerEncoder`` whose state dict keys are theirs after renaming ``transformer_encoder.`` to
``classifier.``; with ``template=REFERENCE_TEMPLATE``, ``strip_caption=False`` and ``remove_suffixes=
LLAVA_ANSWER_SUFFIXES`` the candidate texts are theirs (clip_encoder.py lines 296-307).

On disk::

    accm_selector.json           SelectorConfig
    classifier.safetensors       encoder + head weights
    text_encoder/                CLIPTextModelWithProjection + tokenizer, HF layout (a real CLIP folder drops in)
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPTextModelWithProjection, PreTrainedTokenizerBase

from actors.encoder_blocks import Encoder

CONFIG_NAME = "accm_selector.json"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
TEXT_ENCODER_DIR = "text_encoder"
TEMPLATE = "Question: {q} Supplemental information for questions: {c}"
# clip_encoder.py lines 298-303: 'Question: ' + q.strip() + '  Supplemental information for questions: ' + caption
# (two spaces before "Supplemental")
REFERENCE_TEMPLATE = "Question: {q}  Supplemental information for questions: {c}"
# clip_encoder.py lines 304-305: LLaVA's answer-format suffixes are removed from the question
LLAVA_ANSWER_SUFFIXES = ("\nAnswer with the option's letter from the given choices directly.",
                         "\nAnswer the question using a single word or phrase.")
SELECTOR_WORDS = ("question", "supplemental", "information", "for", "questions")
SELECTOR_ARCHS = ("encoder", "torch_transformer")


def selector_text(question: str, caption: str, config: SelectorConfig | None = None) -> str:
    """One candidate's text. The question is stripped, then ``config.remove_suffixes`` are removed from it
    (the reference strips first, then replaces, clip_encoder.py lines 300-305); the caption is stripped only
    with ``config.strip_caption`` (the reference appends it as is, line 307)."""
    template, strip_caption, suffixes = TEMPLATE, True, ()
    if config is not None:
        template, strip_caption, suffixes = config.template, config.strip_caption, config.remove_suffixes
    q = question.strip()
    for suffix in suffixes:
        q = q.replace(suffix, "")
    return template.format(q=q, c=caption.strip() if strip_caption else caption)


@dataclass
class SelectorConfig:
    hidden: int  # = text encoder projection_dim
    layers: int = 2
    heads: int = 4
    intermediate: int = 0  # 0 -> 2 * hidden
    # Token budget of a candidate text; None -> the text encoder's max_position_embeddings. Longer texts are
    # cut there (BOS + first tokens + EOS, like LongCLIP's tokenize(truncate=True), longclip.py lines 344-348)
    # with a warning; a budget above the encoder's position table is an error.
    max_text_tokens: int | None = None
    rank_embedding: bool = False  # add a learned vector per beam rank (candidates arrive best-first)
    max_candidates: int = 8
    # "encoder": the project's pre-norm encoder (actors.captioner.Encoder, final LayerNorm);
    # "torch_transformer": the authors' nn.TransformerEncoder (selector_transformer.py lines 24-46)
    arch: str = "encoder"
    dropout: float = 0.1  # torch_transformer only (train mode); the reference's default
    template: str = TEMPLATE
    strip_caption: bool = True
    remove_suffixes: list[str] = field(default_factory=list)
    # Encode the token prefix an item's candidates share (the question, with "{q} {c}") once, the candidates'
    # suffixes against its cached keys/values (actors.shared_prefix): the same EOS features, fewer FLOPs.
    share_prefix: bool = False

    def __post_init__(self) -> None:
        if not self.intermediate:
            self.intermediate = 2 * self.hidden
        if self.arch not in SELECTOR_ARCHS:
            raise ValueError(f"SelectorConfig.arch must be one of {SELECTOR_ARCHS}, not {self.arch!r}")


def build_classifier(config: SelectorConfig) -> nn.Module:
    """The candidate-sequence body ``config.arch`` names (input and output [B, N, hidden])."""
    if config.arch == "torch_transformer":
        return ReferenceClassifier(config)
    return Encoder(config.hidden, config.layers, config.heads, config.intermediate)


class ReferenceClassifier(nn.Module):
    """``TransformerSelector``'s body (selector_transformer.py lines 24-46, 61-63): ``nn.TransformerEncoder`` of
    ``TransformerEncoderLayer(d, heads, ffn, dropout, activation="gelu", norm_first=True)``, sequence-first
    (batch_first False), no final norm. Its state dict is ``layers.{i}.self_attn.in_proj_weight`` ... exactly
    as the authors' ``transformer_encoder.*``.

    In eval mode without grad PyTorch may run its fused encoder-layer kernel; to count FLOPs, disable it
    (``torch.backends.mha.set_fastpath_enabled(False)``) and use the math SDPA backend."""

    def __init__(self, config: SelectorConfig) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(config.hidden, config.heads, config.intermediate, config.dropout,
                                           activation="gelu", norm_first=True)
        self.layers = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False).layers

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(0, 1)  # [N, B, d]: selector_transformer.py line 61
        for layer in self.layers:
            x = layer(x)
        return x.transpose(0, 1)


class CaptionSelector(nn.Module):
    """Scores N candidate captions per question; only ``classifier`` and ``head`` train."""

    def __init__(self, config: SelectorConfig, text_encoder: CLIPTextModelWithProjection,
                 tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        if text_encoder.config.projection_dim != config.hidden:
            raise ValueError("selector hidden size must equal the text encoder's projection_dim")
        self.config = config
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        limit = text_encoder.config.max_position_embeddings
        if config.max_text_tokens is None:
            config.max_text_tokens = limit
        elif config.max_text_tokens > limit:
            raise ValueError(f"max_text_tokens {config.max_text_tokens} exceeds the text encoder's "
                             f"{limit} positions")
        self.classifier = build_classifier(config)
        self.head = nn.Linear(config.hidden, 1)
        self.rank = nn.Embedding(config.max_candidates, config.hidden) if config.rank_embedding else None
        if self.rank is not None:
            nn.init.zeros_(self.rank.weight)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the ACCM stage trains: everything but the frozen text encoder."""
        parts = [self.classifier, self.head] + ([self.rank] if self.rank is not None else [])
        return [p for part in parts for p in part.parameters()]

    def train(self, mode: bool = True) -> CaptionSelector:
        super().train(mode)
        self.text_encoder.eval()  # frozen: never in train mode (no dropout)
        return self

    # ---- persistence -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu") -> CaptionSelector:
        path = Path(path)
        config = SelectorConfig(**json.loads((path / CONFIG_NAME).read_text()))
        text_encoder = CLIPTextModelWithProjection.from_pretrained(path / TEXT_ENCODER_DIR,
                                                                   attn_implementation="eager")
        tokenizer = AutoTokenizer.from_pretrained(path / TEXT_ENCODER_DIR)
        model = cls(config, text_encoder, tokenizer)
        weights = path / CLASSIFIER_WEIGHTS
        if weights.exists():
            state = load_file(str(weights))
            model.classifier.load_state_dict({k[len("classifier."):]: v for k, v in state.items()
                                              if k.startswith("classifier.")})
            model.head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})
            if model.rank is not None:
                model.rank.load_state_dict({k[len("rank."):]: v for k, v in state.items() if k.startswith("rank.")})
        return model.to(device).eval()

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        state = {f"classifier.{k}": v for k, v in self.classifier.state_dict().items()}
        state.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        if self.rank is not None:
            state.update({f"rank.{k}": v for k, v in self.rank.state_dict().items()})
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path / CLASSIFIER_WEIGHTS))
        self.text_encoder.save_pretrained(path / TEXT_ENCODER_DIR)
        self.tokenizer.save_pretrained(path / TEXT_ENCODER_DIR)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    # ---- forward ----------------------------------------------------------------------------------------
    def text(self, question: str, caption: str) -> str:
        """The text the encoder reads for one candidate (``selector_text`` with this selector's config)."""
        return selector_text(question, caption, self.config)

    def text_lengths(self, texts: list[str]) -> list[int]:
        """Token counts (specials included) before any truncation."""
        return [len(ids) for ids in self.tokenizer(texts)["input_ids"]]

    def encode_texts(self, texts: list[str]) -> tuple[Tensor, int]:
        """EOS features [T, hidden] of the frozen text encoder, and the padded token length used.

        A text longer than ``max_text_tokens`` is cut there (its EOS kept last) with a warning, never silently."""
        budget = self.config.max_text_tokens
        long = [n for n in self.text_lengths(texts) if n > budget]
        if long:
            warnings.warn(f"selector: {len(long)} candidate text(s) of up to {max(long)} tokens truncated to "
                          f"{budget} (the text encoder's budget)", stacklevel=2)
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=budget, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            feats = self.text_encoder(**enc).text_embeds
        return feats, int(enc["input_ids"].shape[1])

    def encode_shared(self, texts: list[str], group: int) -> tuple[Tensor, list[int], int]:
        """``encode_texts`` with each group of ``group`` texts' common token prefix encoded once
        (``actors.shared_prefix``): features, per group the prefix length, and the padded suffix length."""
        from actors.shared_prefix import shared_prefix_features

        budget = self.config.max_text_tokens
        rows = self.tokenizer(texts, truncation=True, max_length=budget)["input_ids"]
        return shared_prefix_features(self.text_encoder, rows, group)

    def forward(self, questions: list[str], candidates: list[list[str]]) -> Tensor:
        """Logits [B, N] over each item's N candidates (softmax over dim -1 gives the selection probs)."""
        n = len(candidates[0])
        if any(len(c) != n for c in candidates):
            raise ValueError("every item needs the same number of candidates")
        texts = [self.text(q, c) for q, cands in zip(questions, candidates, strict=True) for c in cands]
        feats = self.encode_shared(texts, n)[0] if self.config.share_prefix else self.encode_texts(texts)[0]
        x = feats.view(len(questions), n, -1)
        if self.rank is not None:
            if n > self.config.max_candidates:
                raise ValueError(f"at most {self.config.max_candidates} candidates with a rank embedding")
            x = x + self.rank.weight[:n].to(x.dtype)
        x = self.classifier(x)
        return self.head(x).squeeze(-1)

    @torch.no_grad()
    def select(self, questions: list[str], candidates: list[list[str]]) -> tuple[list[int], Tensor]:
        probs = self(questions, candidates).float().softmax(-1)
        return probs.argmax(-1).tolist(), probs


def build_selector_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerBase:
    """Word-level tokenizer for the small CLIP text encoder: ``<|startoftext|> ... <|endoftext|>``.

    EOS is id 3 (not 2): CLIP's pooling then takes the first EOS position (id 2 selects a legacy argmax).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from actors.tiny import PUNCTUATION, _split_words, shapes_words

    specials = ("<pad>", "<|startoftext|>", "<unk>", "<|endoftext|>")
    vocab = {t: i for i, t in enumerate(specials)}
    for phrase in [*SELECTOR_WORDS, *PUNCTUATION, *(words or shapes_words())]:
        for w in _split_words(phrase):
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 3)],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="right")


def build_selector(
    *,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    projection_dim: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 0,
    rank_embedding: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int = 0,
    max_positions: int = 64,
    arch: str = "encoder",
    dropout: float = 0.1,
    template: str = TEMPLATE,
    strip_caption: bool = True,
    remove_suffixes: list[str] | tuple[str, ...] = (),
    max_text_tokens: int | None = None,
    text_encoder_dir: str | None = None,
    share_prefix: bool = False,
) -> CaptionSelector:
    """A small random-init CLIP text encoder (frozen) + a fresh classifier.

    ``max_positions``: the text encoder's position table; ``max_text_tokens`` (default: all of it) the token
    budget of a candidate. ``arch``, ``dropout``, ``template``, ``strip_caption``, ``remove_suffixes``,
    ``share_prefix``: see ``SelectorConfig``. ``text_encoder_dir``: a trained CLIPModel folder whose text tower (with its projection and
    tokenizer) is the frozen encoder instead of a random one -- LongCLIP's role in the reference; the
    ``text_*``, ``projection_dim``, ``max_positions`` and ``tokenizer`` arguments are then the folder's."""
    from transformers import CLIPTextConfig

    text_encoder = text_config = None
    if text_encoder_dir is not None:
        text_encoder = CLIPTextModelWithProjection.from_pretrained(text_encoder_dir, attn_implementation="eager")
        tokenizer = AutoTokenizer.from_pretrained(text_encoder_dir)
    else:
        tokenizer = tokenizer or build_selector_tokenizer()
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=4 * text_hidden,
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads,
            max_position_embeddings=max_positions,
            projection_dim=projection_dim,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            attn_implementation="eager",
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if text_encoder is None:
            text_encoder = CLIPTextModelWithProjection(text_config)
        config = SelectorConfig(hidden=text_encoder.config.projection_dim, layers=layers, heads=heads,
                                intermediate=intermediate, rank_embedding=rank_embedding, arch=arch, dropout=dropout,
                                template=template, strip_caption=strip_caption,
                                remove_suffixes=list(remove_suffixes), max_text_tokens=max_text_tokens,
                                share_prefix=share_prefix)
        model = CaptionSelector(config, text_encoder, tokenizer)
    return model.eval()
