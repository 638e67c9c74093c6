"""actors.prompt: the conversation formats, the answer-format line and ACCM's caption splice."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from actors.prompt import (
    ANSWER_SUFFIXES,
    VICUNA_SYSTEM,
    PromptFormat,
    build_prompt,
    plain_question,
)

LVLM = Path(__file__).resolve().parents[1] / "models" / "shapes" / "lvlm"


def test_llava_hf_is_the_trained_format_unchanged() -> None:
    # the proving-ground models were trained on exactly these strings (caption line ends with a newline)
    assert build_prompt("What color is it?") == "USER: <image>\nWhat color is it? ASSISTANT:"
    assert build_prompt(" What color is it? ", "the circle is red.") == (
        "USER: <image>\nadditional information: the circle is red.\nWhat color is it? ASSISTANT:")
    assert build_prompt("Q?", " . ") == "USER: <image>\nQ? ASSISTANT:"  # an abstaining caption splices nothing


def test_vicuna_v1_is_llava_15s_evaluation_prompt() -> None:
    # haotian-liu/LLaVA conv_vicuna_v1: system + " USER: " + msg + " ASSISTANT:"
    fmt = PromptFormat("vicuna_v1", "short")
    assert fmt.build("Is there a dog?") == (
        f"{VICUNA_SYSTEM} USER: <image>\nIs there a dog?\nAnswer the question using a single word or phrase."
        " ASSISTANT:")
    assert VICUNA_SYSTEM.startswith("A chat between a curious human") and VICUNA_SYSTEM.endswith("questions.")
    # ACCM: 'additional information: ' + caption right after the image's newline, before the question
    assert fmt.build("Is there a dog?", "a dog sits.").split("\n")[1] == "additional information: a dog sits.Is there a dog?"


def test_answer_suffix_names_and_literals() -> None:
    assert PromptFormat(answer_suffix="option").answer_suffix == ANSWER_SUFFIXES["option"]
    assert PromptFormat(answer_suffix="none").question_text("Q?") == "Q?"
    assert PromptFormat(answer_suffix="Reply yes or no.").question_text(" Q? ") == "Q?\nReply yes or no."
    with pytest.raises(ValueError, match="conversation format"):
        PromptFormat("chatml")
    # the side path (CLIP text guide, caption model, selector) reads the first line only
    assert plain_question("Is it red?\nAnswer the question using a single word or phrase.") == "Is it red?"


def test_vicuna_splice_is_tokenized_on_its_own_after_the_newline() -> None:
    tok = AutoTokenizer.from_pretrained(LVLM)
    image = tok.convert_tokens_to_ids("<image>")
    fmt = PromptFormat("vicuna_v1", "short")
    plain = fmt.token_ids(tok, "What color is the circle?", None, image)
    spliced = fmt.token_ids(tok, "What color is the circle?", "the circle is red.", image)
    splice = tok("additional information: the circle is red.", add_special_tokens=False)["input_ids"]
    j = plain.index(image) + 2  # image, newline, then the question
    assert tok.decode([plain[j - 1]]) == "\n"
    assert spliced == plain[:j] + splice + plain[j:]  # no BOS of its own, nothing else changed
    # llava_hf tokenizes the whole string (what the shipped LVLM saw in training)
    hf = PromptFormat().token_ids(tok, "What color is the circle?", "the circle is red.", image)
    assert hf == tok(build_prompt("What color is the circle?", "the circle is red."))["input_ids"]
