"""Real-shaped ACCM parts with random weights, built offline (no model hub): for converter and whole-job tests.

* ``gpt2_small_dir(path)``: an HF ``gpt2`` folder (GPT2LMHeadModel 12 x 768, vocab 50257, 1024 positions) with
  a byte-level BPE ``GPT2TokenizerFast`` whose 50257 ids all decode to text ('.' is one token, <|endoftext|> is
  50256 as in GPT-2).
* ``clip_l336_dir(path)``: a CLIP ViT-L/14-336-shaped ``CLIPModel`` folder (vision 24 x 1024, patch 14, image
  336; text 12 x 768, projection 768) with a small CLIP-style BPE tokenizer (<|startoftext|>, <|endoftext|>
  last = highest id, '</w>' word ends) and an image processor.
* ``authors_checkpoints(path)``: the three files the ACCM authors publish, as plain state dicts with their
  key names and shapes: ``coco_prefix-009.pt`` (``clip_project.*`` + ``gpt.*``, including the old
  ``attn.bias`` / ``attn.masked_bias`` buffers), ``llava-RL_prefix-019.pt`` (``transformer_encoder.*`` +
  ``head.*``), ``longclip-L.pt`` (OpenAI-CLIP format text tower + a tiny ``visual.*`` + ``logit_scale``).
* ``realshape_parts(tmp_path_factory)``: all of the above, built once per pytest session.

Weights are drawn with a seeded generator (fast: one pool per tensor shape class, no HF init).
"""

from __future__ import annotations

from pathlib import Path

import torch

GPT2_VOCAB = 50257
CLIP_VOCAB = 49408  # LongCLIP-L's token_embedding rows
CAPTION_FILE = "coco_prefix-009.pt"
SELECTOR_FILE = "llava-RL_prefix-019.pt"
LONGCLIP_FILE = "longclip-L.pt"

_TEXT = ("a man is riding a horse on the beach. two dogs play with a red ball in the park. "
         "what color is the car? the car is blue. is there a dog in the picture? yes, a small brown dog. "
         "what is the man holding? he is holding an umbrella. a group of people standing near a bus.")


def _fill(shape: tuple[int, ...], gen: torch.Generator, *, std: float = 0.02, kind: str = "weight") -> torch.Tensor:
    """A random tensor: LayerNorm-like weights near 1, biases near 0, matrices N(0, std)."""
    if kind == "norm":
        return 1.0 + 0.05 * torch.randn(shape, generator=gen)
    if kind == "bias":
        return 0.02 * torch.randn(shape, generator=gen)
    return std * torch.randn(shape, generator=gen)


# --------------------------------------------------------------------------------------------- GPT-2


def gpt2_tokenizer():
    """Byte-level BPE over GPT-2's id space: 256 byte symbols, merges of letters / 'Ġ'+letters up to id 50255,
    <|endoftext|> = 50256. Every id decodes to text; '.' stays a single byte token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import GPT2TokenizerFast

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(alphabet)}
    letters = [c for c in "etaoinshrdlucmfwypvbgkqjxzETAOINSHRDLUCMFWYPVBGKQJXZ"]
    merges: list[tuple[str, str]] = []
    frontier = ["Ġ", *letters]

    def add(a: str, b: str) -> bool:
        if a + b in vocab or len(vocab) >= GPT2_VOCAB - 1:
            return len(vocab) < GPT2_VOCAB - 1
        vocab[a + b] = len(vocab)
        merges.append((a, b))
        return True

    while len(vocab) < GPT2_VOCAB - 1:  # grow tokens one letter at a time, breadth first
        nxt = []
        for a in frontier:
            for c in letters:
                if not add(a, c):
                    break
                nxt.append(a + c)
            if len(vocab) >= GPT2_VOCAB - 1:
                break
        frontier = nxt
    vocab["<|endoftext|>"] = GPT2_VOCAB - 1
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(["<|endoftext|>"])
    return GPT2TokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>", model_max_length=1024)


def gpt2_small_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=GPT2_VOCAB, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                      bos_token_id=GPT2_VOCAB - 1, eos_token_id=GPT2_VOCAB - 1)


def gpt2_small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel state dict (lm_head tied to wte) with random weights; wte std 0.05 so that the
    next-token distributions are far from flat (beam ties are then measure-zero)."""
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):
        skeleton = GPT2LMHeadModel(gpt2_small_config())
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in skeleton.state_dict().items():
        if name == "lm_head.weight":
            continue
        kind = "norm" if ".ln_" in name and name.endswith("weight") else "bias" if name.endswith("bias") else "weight"
        out[name] = _fill(tuple(t.shape), gen, std=0.05 if "wte" in name else 0.02, kind=kind)
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def gpt2_small_dir(path: str | Path, *, seed: int = 0, weights: bool = True) -> Path:
    """An HF gpt2-small folder (config, tokenizer and, with ``weights``, safetensors weights) at ``path``."""
    from transformers import GPT2LMHeadModel

    path = Path(path)
    if weights:
        with torch.device("meta"):
            model = GPT2LMHeadModel(gpt2_small_config())
        model.load_state_dict(gpt2_small_state(seed), assign=True, strict=False)
        model.tie_weights()
        model.save_pretrained(path)
    else:
        path.mkdir(parents=True, exist_ok=True)
        gpt2_small_config().save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------- CLIP


def clip_tokenizer():
    """A small CLIP-style BPE ('</w>' word ends, CLIP's normaliser and split, <|startoftext|> / <|endoftext|> last,
    the EOS the highest id) as ``CLIPTokenizer``; sample words merge to single tokens."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(alphabet)}
    for s in alphabet:
        vocab[s + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    words = sorted(set(_TEXT.replace(".", " ").replace("?", " ").replace(",", " ").split()))
    for w in words:  # merge every word of the sample text left to right, ending in '</w>'
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            a, b = parts[0], parts[1]
            if a + b not in vocab:
                vocab[a + b] = len(vocab)
                merges.append((a, b))
            parts = [a + b, *parts[2:]]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def clip_l336_config(vocab_size: int, tokenizer):
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)


def clip_l336_dir(path: str | Path, *, seed: int = 1) -> Path:
    """A CLIP ViT-L/14-336-shaped ``CLIPModel`` folder (random weights, small text vocab) + tokenizer + processor."""
    from transformers import CLIPImageProcessor, CLIPModel

    path = Path(path)
    tok = clip_tokenizer()
    config = clip_l336_config(len(tok), tok)
    with torch.device("meta"):
        model = CLIPModel(config)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith("position_ids"):
            continue
        kind = "norm" if ("norm" in name and name.endswith("weight")) else "bias" if name.endswith("bias") else "weight"
        state[name] = _fill(tuple(t.shape), gen, kind=kind)
    state["logit_scale"] = torch.tensor(4.6052)
    model.load_state_dict(state, assign=True, strict=False)
    for emb in (model.text_model.embeddings, model.vision_model.embeddings):
        n = emb.position_embedding.weight.shape[0]
        emb.register_buffer("position_ids", torch.arange(n).unsqueeze(0), persistent=False)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------- the authors' files


def caption_checkpoint_state(seed: int = 2, *, prefix_len: int = 20, layers: int = 4) -> dict[str, torch.Tensor]:
    """``coco_prefix-009.pt``: ClipCaptionModel(prefix_length=20, prefix_size=768, num_layers=4, Transformer
    mapping) state dict -- ``clip_project.*`` (TransformerMapper) + ``gpt.*`` (GPT2LMHeadModel, with the
    ``attn.bias`` / ``attn.masked_bias`` buffers older transformers saved)."""
    gen = torch.Generator().manual_seed(seed)
    d = 768
    out = {"clip_project.linear.weight": _fill((d, d), gen, std=0.04), "clip_project.linear.bias": _fill((d,), gen,
                                                                                                       kind="bias"),
           "clip_project.prefix_const": torch.randn((prefix_len, d), generator=gen)}
    for i in range(layers):
        p = f"clip_project.transformer.layers.{i}."
        out.update({
            p + "norm1.weight": _fill((d,), gen, kind="norm"), p + "norm1.bias": _fill((d,), gen, kind="bias"),
            p + "attn.to_queries.weight": _fill((d, d), gen, std=0.04),
            p + "attn.to_keys_values.weight": _fill((2 * d, d), gen, std=0.04),
            p + "attn.project.weight": _fill((d, d), gen), p + "attn.project.bias": _fill((d,), gen, kind="bias"),
            p + "norm2.weight": _fill((d,), gen, kind="norm"), p + "norm2.bias": _fill((d,), gen, kind="bias"),
            p + "mlp.fc1.weight": _fill((2 * d, d), gen), p + "mlp.fc1.bias": _fill((2 * d,), gen, kind="bias"),
            p + "mlp.fc2.weight": _fill((d, 2 * d), gen), p + "mlp.fc2.bias": _fill((d,), gen, kind="bias"),
        })
    gpt = gpt2_small_state(seed + 100)
    out.update({f"gpt.{k}": v for k, v in gpt.items()})
    causal = torch.tril(torch.ones(1024, 1024, dtype=torch.bool)).view(1, 1, 1024, 1024)
    for i in range(12):
        out[f"gpt.transformer.h.{i}.attn.bias"] = causal
        out[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


def selector_checkpoint_state(seed: int = 3, *, layers: int = 4) -> dict[str, torch.Tensor]:
    """``llava-RL_prefix-019.pt``: TransformerSelector(768, 4 layers, 8 heads, FFN 1536) state dict."""
    gen = torch.Generator().manual_seed(seed)
    d, f = 768, 1536
    out = {}
    for i in range(layers):
        p = f"transformer_encoder.layers.{i}."
        out.update({
            p + "self_attn.in_proj_weight": _fill((3 * d, d), gen, std=0.04),
            p + "self_attn.in_proj_bias": _fill((3 * d,), gen, kind="bias"),
            p + "self_attn.out_proj.weight": _fill((d, d), gen),
            p + "self_attn.out_proj.bias": _fill((d,), gen, kind="bias"),
            p + "linear1.weight": _fill((f, d), gen), p + "linear1.bias": _fill((f,), gen, kind="bias"),
            p + "linear2.weight": _fill((d, f), gen), p + "linear2.bias": _fill((d,), gen, kind="bias"),
            p + "norm1.weight": _fill((d,), gen, kind="norm"), p + "norm1.bias": _fill((d,), gen, kind="bias"),
            p + "norm2.weight": _fill((d,), gen, kind="norm"), p + "norm2.bias": _fill((d,), gen, kind="bias"),
        })
    out["head.weight"] = _fill((1, d), gen, std=0.2)
    out["head.bias"] = _fill((1,), gen, kind="bias")
    return out


def longclip_checkpoint_state(seed: int = 4, *, vocab_size: int = CLIP_VOCAB) -> dict[str, torch.Tensor]:
    """``longclip-L.pt``: OpenAI-CLIP format, text tower of LongCLIP-L (248 positions in two tables) plus a
    tiny ``visual.*`` and ``logit_scale`` that a text-only converter must ignore."""
    gen = torch.Generator().manual_seed(seed)
    d = 768
    out = {"token_embedding.weight": _fill((vocab_size, d), gen),
           "positional_embedding": _fill((248, d), gen, std=0.01),
           "positional_embedding_res": _fill((248, d), gen, std=0.01),
           "ln_final.weight": _fill((d,), gen, kind="norm"), "ln_final.bias": _fill((d,), gen, kind="bias"),
           "text_projection": _fill((d, d), gen, std=d ** -0.5), "logit_scale": torch.tensor(4.6052),
           "visual.class_embedding": _fill((1024,), gen), "visual.proj": _fill((1024, d), gen)}
    for i in range(12):
        p = f"transformer.resblocks.{i}."
        out.update({
            p + "attn.in_proj_weight": _fill((3 * d, d), gen, std=d ** -0.5),
            p + "attn.in_proj_bias": _fill((3 * d,), gen, kind="bias"),
            p + "attn.out_proj.weight": _fill((d, d), gen), p + "attn.out_proj.bias": _fill((d,), gen, kind="bias"),
            p + "ln_1.weight": _fill((d,), gen, kind="norm"), p + "ln_1.bias": _fill((d,), gen, kind="bias"),
            p + "mlp.c_fc.weight": _fill((4 * d, d), gen, std=(2 * d) ** -0.5),
            p + "mlp.c_fc.bias": _fill((4 * d,), gen, kind="bias"),
            p + "mlp.c_proj.weight": _fill((d, 4 * d), gen), p + "mlp.c_proj.bias": _fill((d,), gen, kind="bias"),
            p + "ln_2.weight": _fill((d,), gen, kind="norm"), p + "ln_2.bias": _fill((d,), gen, kind="bias"),
        })
    return out


def authors_checkpoints(path: str | Path) -> dict[str, Path]:
    """Write the three checkpoint files under ``path``: {"caption", "selector", "longclip"} -> file."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files = {"caption": path / CAPTION_FILE, "selector": path / SELECTOR_FILE, "longclip": path / LONGCLIP_FILE}
    torch.save(caption_checkpoint_state(), files["caption"])
    torch.save(selector_checkpoint_state(), files["selector"])
    torch.save(longclip_checkpoint_state(), files["longclip"])
    return files


_SESSION: dict[tuple[int, bool], dict[str, Path]] = {}


def clip_tokenizer_dir(path: str | Path) -> Path:
    """Only the CLIP tokenizer of ``clip_l336_dir`` (what the converter's ``--clip`` reads), at ``path``."""
    path = Path(path)
    clip_tokenizer().save_pretrained(path)
    return path


def realshape_parts(tmp_path_factory, *, light: bool = False) -> dict[str, Path]:
    """{"caption", "selector", "longclip", "gpt2", "clip"} built once per pytest session (per ``light``).

    ``light``: the gpt2 folder without weights and the clip folder with its tokenizer only (enough for
    ``jobs/convert_accm_checkpoint.py``; a job that runs the CLIP vision tower needs the full folder)."""
    key = (id(tmp_path_factory), light)
    if key not in _SESSION:
        root = tmp_path_factory.mktemp("accm_realshape_light" if light else "accm_realshape")
        parts = dict(authors_checkpoints(root / "authors"))
        parts["gpt2"] = gpt2_small_dir(root / "gpt2", weights=not light)
        parts["clip"] = clip_tokenizer_dir(root / "clip") if light else clip_l336_dir(root / "clip")
        _SESSION[key] = parts
    return _SESSION[key]


def llava_7b_config(tokenizer, *, vision_layers: int):
    """LLaVA-1.5-7B's widths (CLIP ViT-L/14-336 tower and projector, LLaMA-7B: 4096 hidden, 11008 FFN, 32 heads,
    vocab 32064) with ``vision_layers`` tower layers and 2 LLM layers: real shapes at CPU-test cost."""
    from actors.tiny import LLAVA_7B_SHAPE, llava_config

    return llava_config(**{**LLAVA_7B_SHAPE, "vision_layers": vision_layers, "text_layers": 2},
                        image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
