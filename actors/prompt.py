"""The one definition of the LVLM prompt: conversation formats, answer-format suffixes, the caption splice.

Two conversation formats (``PromptFormat.conv``):

* ``llava_hf`` -- what the proving-ground models are trained on (no system prompt)::

      USER: <image>\\n[additional information: <caption>\\n]<question> ASSISTANT:

* ``vicuna_v1`` -- LLaVA-1.5's evaluation conversation (haotian-liu/LLaVA ``llava/conversation.py``,
  ``conv_vicuna_v1``: system prompt, roles USER/ASSISTANT, ``sep=" "``), which every published LLaVA-1.5
  number and every pruning paper uses::

      <system> USER: <image>\\n<question>[\\n<answer suffix>] ASSISTANT:

  ACCM's caption splice there follows the authors' code (ASGO-MM/ACCM 50f1bd8,
  ``llava/model/llava_arch.py`` lines 149-156): ``'additional information: ' + caption`` is tokenized on its
  own (its BOS dropped) and inserted right after the newline that follows the image, before the question,
  with no separator of its own.

The answer-format suffix (``PromptFormat.answer_suffix``) is the benchmark's line appended to the question
after a newline (LLaVA's ``playground/data/eval`` files carry it in their ``text``). The caption model and
the selector never see it (ACCM's side path reads the question's first line, ``model_vqa_loader.py`` line 74).
Training (jobs/train_lvlm.py) and inference (actors/engine.py) both build prompts here, so they agree.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_TOKEN = "<image>"
CAPTION_PREFIX = "additional information: "
CONVERSATIONS = ("llava_hf", "vicuna_v1")
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# LLaVA-1.5's answer-format lines (haotian-liu/LLaVA scripts/v1_5/eval/*.sh question files), by short name
ANSWER_SUFFIXES = {
    "none": "",
    "short": "Answer the question using a single word or phrase.",
    "option": "Answer with the option's letter from the given choices directly.",
}


def has_words(caption: str | None) -> bool:
    """Whether ``caption`` says anything. A caption model abstains by stopping at once ('.' or nothing):
    then nothing is spliced and the LVLM answers from its retained tokens alone."""
    return caption is not None and any(ch.isalnum() for ch in caption)


def caption_text(caption: str | None) -> str:
    """The spliced supplemental text for ``caption`` in the ``llava_hf`` format ('' when it has no words)."""
    if not has_words(caption):
        return ""
    return f"{CAPTION_PREFIX}{caption.strip()}\n"


def resolve_answer_suffix(value: str | None) -> str:
    """A short name of ``ANSWER_SUFFIXES`` or a literal line -> the line ('' for none)."""
    if value is None:
        return ""
    return ANSWER_SUFFIXES.get(value, value)


def plain_question(question: str) -> str:
    """What ACCM's side path (CLIP text guide, caption model, selector) reads: the question's first line."""
    return question.strip().split("\n")[0].strip()


@dataclass(frozen=True)
class PromptFormat:
    """How the LVLM prompt is built: the conversation and the answer-format line added to every question."""

    conv: str = "llava_hf"
    answer_suffix: str = ""  # a line, or a short name of ANSWER_SUFFIXES

    def __post_init__(self) -> None:
        if self.conv not in CONVERSATIONS:
            raise ValueError(f"conversation format must be one of {', '.join(CONVERSATIONS)}, got {self.conv!r}")
        object.__setattr__(self, "answer_suffix", resolve_answer_suffix(self.answer_suffix))

    def question_text(self, question: str) -> str:
        """The question as the LLM reads it (with the answer-format line, if any)."""
        q = question.strip()
        return f"{q}\n{self.answer_suffix}" if self.answer_suffix else q

    def build(self, question: str, caption: str | None = None, image_token: str = IMAGE_TOKEN) -> str:
        """Prompt up to and including ``ASSISTANT:`` as one string (the caption inline, as text)."""
        q = self.question_text(question)
        if self.conv == "llava_hf":
            return f"USER: {image_token}\n{caption_text(caption)}{q} ASSISTANT:"
        splice = f"{CAPTION_PREFIX}{caption.strip()}" if has_words(caption) else ""
        return f"{VICUNA_SYSTEM} USER: {image_token}\n{splice}{q} ASSISTANT:"

    def token_ids(self, tokenizer, question: str, caption: str | None, image_token_id: int) -> list[int]:
        """The prompt's token ids with one ``image_token_id`` placeholder.

        ``llava_hf``: the whole string tokenized at once (what the proving-ground models were trained on).
        ``vicuna_v1``: the caption-free prompt tokenized, then the caption splice tokenized on its own (no
        BOS) and inserted after the first token following the image that holds the newline, as ACCM's
        ``llava_arch.py`` (lines 152-156) does."""
        if self.conv == "llava_hf" or not has_words(caption):
            return tokenizer(self.build(question, caption, IMAGE_TOKEN))["input_ids"]
        ids = tokenizer(self.build(question, None, IMAGE_TOKEN))["input_ids"]
        splice = tokenizer(f"{CAPTION_PREFIX}{caption.strip()}", add_special_tokens=False)["input_ids"]
        j = ids.index(image_token_id) + 1
        for k in range(j, min(j + 4, len(ids))):  # the newline after the image (sentencepiece: '▁', '\n')
            if "\n" in tokenizer.decode([ids[k]]):
                j = k + 1
                break
        return ids[:j] + splice + ids[j:]


def build_prompt(question: str, caption: str | None = None, image_token: str = IMAGE_TOKEN) -> str:
    """Prompt of the default (``llava_hf``) format up to and including ``ASSISTANT:``."""
    return PromptFormat().build(question, caption, image_token)


def prompt_parts(question: str, caption: str | None = None) -> tuple[str, str]:
    """(text before the visual tokens, text after them): what the engine embeds around the kept tokens."""
    before, after = build_prompt(question, caption).split(IMAGE_TOKEN)
    return before, after
