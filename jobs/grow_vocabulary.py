"""Grow trained Shapes v2 model folders (CLIP, LVLM, caption model) to the world's current vocabulary, in place.

When the v2 world adds words (the one-word cell names "c4"), a folder saved before keeps working for the old
words but reads every new one as ``<unk>``. This appends the new words to the folder's tokenizer and embedding
tables, keeping every trained row (``actors/vocab_growth.py``: a new word starts as the mean of the words it
replaces), so a fine-tune (``train_lvlm_v2.py --resume``, ``train_accm.py --stage pretrain --captioner DIR``)
can teach it the rest. A folder already at the current vocabulary is left as it is.

    .venv/bin/python jobs/grow_vocabulary.py runs/lvlm_v2g runs/accm_v2g/captioner runs/clip_v2g
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from actors import vocab_growth as G  # noqa: E402
from pipeline import shapes_v2 as world  # noqa: E402


def parts(word: str) -> tuple[str, ...]:
    """The older words a new v2 word stands for (a cell word: its row and column); none for other words."""
    return world.cell_word_parts(word) if world.cell_of(word) is not None else ()


def kind_of(folder: Path) -> str:
    if (folder / "accm_captioner.json").exists():
        return "captioner"
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type in ("clip", "llava"):
        return model_type
    raise SystemExit(f"{folder}: not a Shapes v2 CLIP, LVLM or caption model folder (model_type {model_type!r})")


def grow(folder: str | Path) -> dict:
    """Grow one folder in place; returns what was done."""
    from transformers import AutoTokenizer

    from actors import shapes_clip as C
    from actors import shapes_lvlm_v2 as V

    folder = Path(folder)
    kind = kind_of(folder)
    if kind == "captioner":
        from actors.captioner import CaptionModel

        model = CaptionModel.from_pretrained(folder)
        new_tok = V.build_tokenizer()
        words = G.grow_causal_lm(model.decoder, G.vocab_of(model.tokenizer), G.vocab_of(new_tok), parts)
        if words:
            model.tokenizer = new_tok
            model.save_pretrained(folder)
    elif kind == "llava":
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager")
        new_tok = V.build_tokenizer()
        words = G.grow_lvlm(model, G.vocab_of(AutoTokenizer.from_pretrained(folder)), G.vocab_of(new_tok), parts)
        if words:
            model.save_pretrained(folder)
            V.build_processor(new_tok).save_pretrained(folder)
    else:
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(folder)
        new_tok = C.build_tokenizer()
        words = G.grow_clip(model, G.vocab_of(AutoTokenizer.from_pretrained(folder)), G.vocab_of(new_tok), parts)
        if words:
            model.save_pretrained(folder)
            C.build_processor(new_tok).save_pretrained(folder)
    return {"folder": str(folder), "kind": kind, "new_words": len(words), "vocab": len(new_tok)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="CLIP, LVLM or caption model folders, grown in place")
    args = p.parse_args(argv)
    out = []
    for folder in args.folders:
        row = grow(folder)
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


if __name__ == "__main__":
    main()
