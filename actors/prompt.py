"""The one definition of the LVLM prompt (LLaVA-1.5 conversation format, no system prompt).

``USER: <image>\\n[additional information: <caption>\\n]<question> ASSISTANT:`` followed by the answer.
The caption splice (ACCM's compensation, SPEC §1.4) sits between the visual tokens and the question.
Training (jobs/train_lvlm.py) and inference (actors/lvlm.py) both build prompts here, so they agree.
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
CAPTION_PREFIX = "additional information: "


def has_words(caption: str | None) -> bool:
    """Whether ``caption`` says anything. A caption model abstains by stopping at once ('.' or nothing):
    then nothing is spliced and the LVLM answers from its retained tokens alone."""
    return caption is not None and any(ch.isalnum() for ch in caption)


def caption_text(caption: str | None) -> str:
    """The spliced supplemental text for ``caption`` ('' when it has no words: no splice)."""
    if not has_words(caption):
        return ""
    return f"{CAPTION_PREFIX}{caption.strip()}\n"


def build_prompt(question: str, caption: str | None = None, image_token: str = IMAGE_TOKEN) -> str:
    """Prompt up to and including ``ASSISTANT:``; the answer is generated after it."""
    return f"USER: {image_token}\n{caption_text(caption)}{question.strip()} ASSISTANT:"


def prompt_parts(question: str, caption: str | None = None) -> tuple[str, str]:
    """(text before the visual tokens, text after them): what the engine embeds around the kept tokens."""
    before, after = build_prompt(question, caption).split(IMAGE_TOKEN)
    return before, after
