"""Turn the ACCM authors' released checkpoints into this project's caption-model and selector folders.

    python jobs/convert_accm_checkpoint.py --caption-ckpt coco_prefix-009.pt --selector-ckpt llava-RL_prefix-019.pt \\
        --longclip longclip-L.pt --gpt2 GPT2_DIR --clip CLIP_DIR --output OUT

writes ``OUT/captioner`` (``CaptionModel`` folder: ClipCap mapper + GPT-2 decoder, the authors' beam search) and
``OUT/selector`` (``CaptionSelector`` folder: LongCLIP-L text tower + the authors' TransformerSelector), for
``--captioner OUT/captioner --selector OUT/selector --clip CLIP_DIR`` of the main job.

Inputs (local paths, ``file://`` or ``s3://``):

* ``--caption-ckpt``: ``ClipCaptionModel`` state dict (``clip_project.*`` = TransformerMapper, ``gpt.*`` =
  GPT2LMHeadModel; GPT-2's ``attn.bias`` / ``attn.masked_bias`` buffers are dropped if present).
* ``--selector-ckpt``: ``TransformerSelector`` state dict (``transformer_encoder.*``, ``head.*``).
* ``--longclip``: LongCLIP-L, OpenAI-CLIP format (only the text tower is used; ``visual.*`` is ignored).
* ``--gpt2``: an HF gpt2 folder: its config and tokenizer (its weights are replaced by the checkpoint's).
* ``--clip``: an HF CLIP folder: its BPE tokenizer is LongCLIP's (with 248 positions).

The architecture is the authors' (clip_encoder.py lines 96-114): prefix 20, 4 mapper layers of 8 heads,
4 selector layers of 8 heads with a 1536 FFN; beam search with 3 beams, stop '.', at most 67 tokens, mean
log-prob ranking, raw decoding. Every checkpoint is checked before anything is written: missing, unexpected
and mis-shaped keys are named, and on any error nothing is written (the folders are built in a temporary
directory and moved into place at the end).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# decoding_scheme.py generate_beam (lines 72-73) as called in clip_encoder.py line 289: beam_size=3, the
# default entry_length=67 and stop_token='.'
REFERENCE_BEAMS = 3
REFERENCE_MAX_TOKENS = 67
REFERENCE_STOP = "."
# clip_encoder.py line 100: ClipCaptionModel(prefix_length=20, prefix_size=768, num_layers=4, Transformer mapping);
# TransformerMapper builds Transformer(dim_embedding, 8, num_layers) (clipcap_model.py line 162)
REFERENCE_PREFIX = 20
REFERENCE_MAPPER_LAYERS = 4
REFERENCE_MAPPER_HEADS = 8
REFERENCE_FEATURE_DIM = 768
# clip_encoder.py line 108: TransformerSelector(embedding_dim=768, num_layers=4, num_heads=8, dim_feedforward=1536)
REFERENCE_SELECTOR_LAYERS = 4
REFERENCE_SELECTOR_HEADS = 8
REFERENCE_SELECTOR_FFN = 1536
# GPT-2 buffers older transformers kept in the state dict (causal mask and its fill value): not weights
GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the reference architecture."""


def load_state(url: str) -> dict[str, torch.Tensor]:
    """A plain state dict from a local path, ``file://`` or ``s3://`` URL (``torch.load(weights_only=True)``)."""
    if url.startswith("s3://"):
        from pipeline.storage import read_bytes

        source = io.BytesIO(read_bytes(url))
    else:
        source = url[len("file://"):] if url.startswith("file://") else url
        if not Path(source).is_file():
            raise CheckpointError(f"{url}: no such file")
    try:
        try:  # memory-mapped when the file allows it (zip format): the 0.5-1 GB files are not copied
            state = torch.load(source, map_location="cpu", weights_only=True, mmap=isinstance(source, str))
        except RuntimeError:
            if not isinstance(source, str):
                raise
            state = torch.load(source, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as exc:  # noqa: BLE001 - the user needs to know which file failed and why
        raise CheckpointError(f"{url}: not a loadable state dict ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{url}: expected a plain state dict of tensors")
    return state


def local_dir(url: str) -> str:
    from actors.loading import local_model_dir

    return local_model_dir(url)


def _problems(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> list[str]:
    from actors.longclip import check_state

    try:
        check_state(state, expected, what)
    except ValueError as exc:
        return [str(exc)]
    return []


def caption_config(args, hidden: int):
    from actors.captioner import CaptionConfig

    return CaptionConfig(
        feature_dim=args.feature_dim, hidden=hidden, prefix_len=args.prefix_len, patch_prefix=False,
        mapper_arch="clipcap", mapper_layers=args.mapper_layers, mapper_heads=args.mapper_heads,
        mapper_intermediate=2 * hidden,  # clipcap_model.py line 135: mlp_ratio 2.
        beams=args.beams, max_caption_tokens=args.max_caption_tokens, length_penalty=1.0,
        stop_texts=[REFERENCE_STOP], input_features="projected",  # clip_encoder.py line 268: image_embeds[:, 1:]
        beam_rank="mean", stop_on_eos=False, decode="raw",
    )


def selector_config(args, hidden: int):
    from actors.selector import LLAVA_ANSWER_SUFFIXES, REFERENCE_TEMPLATE, SelectorConfig

    return SelectorConfig(hidden=hidden, layers=args.selector_layers, heads=args.selector_heads,
                          intermediate=args.selector_ffn, arch="torch_transformer", dropout=0.1,
                          template=REFERENCE_TEMPLATE, strip_caption=False,
                          remove_suffixes=list(LLAVA_ANSWER_SUFFIXES), rank_embedding=False)


def split_caption_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    """``clip_project.*`` -> mapper keys, ``gpt.*`` -> decoder keys (buffers dropped), anything else -> unexpected."""
    mapper, decoder, other = {}, {}, []
    for key, value in state.items():
        if key.startswith("clip_project."):
            mapper[key[len("clip_project."):]] = value
        elif key.startswith("gpt."):
            if key.endswith(GPT2_BUFFERS):
                continue
            decoder[key[len("gpt."):]] = value
        else:
            other.append(key)
    return mapper, decoder, other


def check_caption_state(args, state: dict[str, torch.Tensor], gpt2_dir: str) -> list[str]:
    """Problems of a ClipCaptionModel state dict against the mapper + the --gpt2 config (nothing is built)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from actors.clipcap import ClipCapMapper

    config = AutoConfig.from_pretrained(gpt2_dir)
    hidden = getattr(config, "n_embd", None) or config.hidden_size
    with torch.device("meta"):
        mapper = ClipCapMapper(caption_config(args, hidden))
        decoder = AutoModelForCausalLM.from_config(config)
    mapper_state, decoder_state, other = split_caption_state(state)
    problems = [f"caption checkpoint: unexpected keys outside clip_project.* / gpt.*: {', '.join(sorted(other))}"] \
        if other else []
    problems += _problems({f"clip_project.{k}": v for k, v in mapper_state.items()},
                          {f"clip_project.{k}": tuple(v.shape) for k, v in mapper.state_dict().items()},
                          "caption checkpoint (clip_project.*)")
    expected = {f"gpt.{k}": tuple(v.shape) for k, v in decoder.state_dict().items() if not k.endswith(GPT2_BUFFERS)}
    problems += _problems({f"gpt.{k}": v for k, v in decoder_state.items()}, expected,
                          f"caption checkpoint (gpt.*, against {gpt2_dir})")
    if problems:
        return problems
    wte, head = decoder_state.get("transformer.wte.weight"), decoder_state.get("lm_head.weight")
    if head is not None and wte is not None and getattr(config, "tie_word_embeddings", True) \
            and not torch.equal(head, wte):
        problems.append("caption checkpoint: gpt.lm_head.weight differs from gpt.transformer.wte.weight, but the "
                        "GPT-2 config ties them")
    vocab = len(AutoTokenizer.from_pretrained(gpt2_dir))
    if wte is not None and vocab > wte.shape[0]:
        problems.append(f"{gpt2_dir}: the tokenizer has {vocab} entries, more than GPT-2's {wte.shape[0]} embeddings")
    return problems


def build_caption_model(args, state: dict[str, torch.Tensor], gpt2_dir: str):
    """The product's ``CaptionModel`` holding a checked caption checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from actors.captioner import CaptionModel

    config = AutoConfig.from_pretrained(gpt2_dir)
    hidden = getattr(config, "n_embd", None) or config.hidden_size
    decoder = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # generate_beam's tokenizer.decode (decoding_scheme.py line 128) ran under the transformers LLaVA-1.5 pins
    # (4.37), whose decode cleans up tokenization spaces by default (" ." -> "."); newer versions default to False
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir, clean_up_tokenization_spaces=True)
    model = CaptionModel(caption_config(args, hidden), decoder, tokenizer)
    mapper_state, decoder_state, _ = split_caption_state(state)
    model.mapper.load_state_dict(mapper_state)
    model.decoder.load_state_dict(decoder_state, strict=False)  # the checked keys (the old buffers aside)
    return model.eval()


def _selector_hidden(state: dict[str, torch.Tensor]) -> int:
    return state["head.weight"].shape[-1] if "head.weight" in state else REFERENCE_FEATURE_DIM


def check_selector_state(args, state: dict[str, torch.Tensor], longclip: dict[str, torch.Tensor],
                         clip_dir: str) -> list[str]:
    """Problems of the TransformerSelector and LongCLIP state dicts (nothing is built)."""
    from actors.longclip import LONGCLIP_L, is_ignored_longclip_key, longclip_text_shapes
    from actors.selector import build_classifier

    hidden = _selector_hidden(state)
    with torch.device("meta"):
        classifier = build_classifier(selector_config(args, hidden))
    expected = {f"transformer_encoder.{k}": tuple(v.shape) for k, v in classifier.state_dict().items()}
    expected.update({"head.weight": (1, hidden), "head.bias": (1,)})
    problems = _problems(state, expected, "selector checkpoint")
    vocab = longclip["token_embedding.weight"].shape[0] if "token_embedding.weight" in longclip else 0
    try:
        from actors.longclip import check_state

        check_state(longclip, longclip_text_shapes(vocab), "LongCLIP checkpoint", ignore=is_ignored_longclip_key)
    except ValueError as exc:
        problems.append(str(exc))
    if LONGCLIP_L.projection != hidden:
        problems.append(f"selector width {hidden} != LongCLIP-L's projection {LONGCLIP_L.projection}")
    from actors.longclip import longclip_tokenizer

    size = len(longclip_tokenizer(clip_dir))
    if vocab and size > vocab:
        problems.append(f"{clip_dir}: the CLIP tokenizer has {size} entries, more than LongCLIP's {vocab}")
    return problems


def build_selector(args, state: dict[str, torch.Tensor], longclip: dict[str, torch.Tensor], clip_dir: str):
    """The product's ``CaptionSelector``: LongCLIP-L's text tower + the checked classifier."""
    from actors.longclip import longclip_text_model, longclip_tokenizer
    from actors.selector import CaptionSelector

    tokenizer = longclip_tokenizer(clip_dir)
    selector = CaptionSelector(selector_config(args, _selector_hidden(state)),
                               longclip_text_model(longclip, tokenizer), tokenizer)
    # selector_transformer.py lines 39-49: transformer_encoder.* -> our classifier.*; head.* unchanged
    selector.classifier.load_state_dict({k[len("transformer_encoder."):]: v for k, v in state.items()
                                         if k.startswith("transformer_encoder.")})
    selector.head.load_state_dict({"weight": state["head.weight"], "bias": state["head.bias"]})
    return selector.eval()


def convert(args) -> dict[str, str]:
    out = Path(args.output[len("file://"):] if args.output.startswith("file://") else args.output)
    targets = {"captioner": out / "captioner", "selector": out / "selector"}
    busy = [str(p) for p in targets.values() if p.exists()]
    if busy:
        raise CheckpointError(f"refusing to overwrite {', '.join(busy)}")
    caption_state, selector_state, longclip_state = (load_state(u) for u in
                                                     (args.caption_ckpt, args.selector_ckpt, args.longclip))
    gpt2_dir, clip_dir = local_dir(args.gpt2), local_dir(args.clip)
    problems = [f"{args.caption_ckpt}:\n  {p}" for p in check_caption_state(args, caption_state, gpt2_dir)]
    problems += [f"{args.selector_ckpt} / {args.longclip}:\n  {p}"
                 for p in check_selector_state(args, selector_state, longclip_state, clip_dir)]
    if problems:
        raise CheckpointError("\n".join(problems))
    captioner = build_caption_model(args, caption_state, gpt2_dir)
    selector = build_selector(args, selector_state, longclip_state, clip_dir)
    parent = out.parent if out.parent.exists() else Path(tempfile.gettempdir())
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-convert-", dir=parent))
    try:
        captioner.save_pretrained(tmp / "captioner")
        selector.save_pretrained(tmp / "selector")
        out.mkdir(parents=True, exist_ok=True)
        for name, target in targets.items():
            shutil.move(str(tmp / name), str(target))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {k: str(v) for k, v in targets.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--caption-ckpt", required=True, help="coco_prefix-*.pt (ClipCaptionModel state dict)")
    p.add_argument("--selector-ckpt", required=True, help="llava-RL_prefix-*.pt (TransformerSelector state dict)")
    p.add_argument("--longclip", required=True, help="longclip-L.pt (OpenAI-CLIP format)")
    p.add_argument("--gpt2", required=True, metavar="DIR", help="HF gpt2 folder (config + tokenizer)")
    p.add_argument("--clip", required=True, metavar="DIR", help="HF CLIP folder (its BPE tokenizer)")
    p.add_argument("--output", required=True, metavar="OUT", help="writes OUT/captioner and OUT/selector")
    p.add_argument("--beams", type=int, default=REFERENCE_BEAMS, help="caption candidates (reference: 3)")
    p.add_argument("--max-caption-tokens", type=int, default=REFERENCE_MAX_TOKENS,
                   help="most tokens a caption may have (reference: generate_beam's entry_length 67)")
    p.add_argument("--prefix-len", type=int, default=REFERENCE_PREFIX)
    p.add_argument("--feature-dim", type=int, default=REFERENCE_FEATURE_DIM,
                   help="width of the projected CLIP patch embeddings the mapper reads")
    p.add_argument("--mapper-layers", type=int, default=REFERENCE_MAPPER_LAYERS)
    p.add_argument("--mapper-heads", type=int, default=REFERENCE_MAPPER_HEADS)
    p.add_argument("--selector-layers", type=int, default=REFERENCE_SELECTOR_LAYERS)
    p.add_argument("--selector-heads", type=int, default=REFERENCE_SELECTOR_HEADS)
    p.add_argument("--selector-ffn", type=int, default=REFERENCE_SELECTOR_FFN)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        written = convert(args)
    except CheckpointError as exc:
        raise SystemExit(f"convert_accm_checkpoint: {exc}\nnothing written") from exc
    print(f"captioner: {written['captioner']}\nselector: {written['selector']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
