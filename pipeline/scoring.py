"""Per-item answer scoring: VQAv2 soft accuracy, GQA exact match, POPE yes/no.

``vqa_accuracy`` follows the official VQAv2 evaluation script (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``) rule for rule, quirks included, so that numbers
are comparable with published ones:

* the prediction: newline/tab -> space, strip, ``processPunctuation``, ``processDigitArticle``
  (lower-case, number words -> digits, articles dropped, contractions fixed);
* the ground-truth answers are used as given (the official annotation files are already normalized);
  only when they are not all identical does the script run ``processPunctuation`` on them;
* accuracy = mean over the answers of min(1, #matches among the *other* answers / 3), i.e. the mean
  over the 10 leave-one-out subsets for the usual 10 answers.

The rules were re-implemented from the published description; the tables are the script's data.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# The official contraction table. Keys are matched per whole word after
# lower-casing, so the capitalised keys ("Im", "Ive", ...) can never match: kept as in the script.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official regexes, verbatim. "(?!<=\d)" is a lookahead (the script meant a lookbehind): in effect a
# period is removed unless a digit follows it ("3.5" keeps its point, "yes." loses it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The script passes re.UNICODE (== 32) as the positional *count* of re.sub: at most 32 periods go.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``.

    A punctuation mark next to a space (or any text with a digit,digit comma) is deleted; otherwise it
    becomes a space ("black-and-white" -> "black and white"). Then periods not before a digit go.
    """
    out = text
    comma_between_digits = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or comma_between_digits:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words -> digits, drop articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The full official normalization the prediction receives (also handy for raw answer sets)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 soft accuracy of one prediction against its human answers (usually 10), in [0, 1].

    Each answer in turn is left out; the prediction scores min(1, matches among the rest / 3); the
    item's accuracy is the mean. With 10 answers: 4+ matching answers -> 1.0, 3 -> 0.9, 2 -> 0.6,
    1 -> 0.3, 0 -> 0.0. (With a single answer the score is always 0: no other answer can match.)
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = normalize_answer(prediction)
    gts = list(answers)
    if len(set(gts)) > 1:  # official: only differing answer sets are punctuation-processed
        gts = [process_punctuation(a) for a in gts]
    matches = [a == pred for a in gts]
    total = sum(matches)
    # leave-one-out: for answer i, the matches among the others are total - matches[i]
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(gts)


def exact_match(prediction: str, answer: str) -> float:
    """GQA-style exact match (1.0/0.0): both lower-cased, trailing periods and whitespace stripped."""

    def norm(s: str) -> str:
        return s.strip().lower().rstrip(".").strip()

    return float(norm(prediction) == norm(answer))


def yes_no(prediction: str) -> str:
    """POPE's rule for a free-form answer: only the first sentence, commas removed, any word 'no'/'No'/'not'
    means "no", anything else "yes". (The reference splits on ' '; any whitespace separates words here.)
    """
    first = prediction.split(".", 1)[0].replace(",", "")
    words = first.split()
    return "no" if any(w in ("no", "No", "not") for w in words) else "yes"


def score_item(prediction: str | None, answers: Sequence[str] | None, metric: str = "vqa") -> float | None:
    """The score stored in the output row: None without answers or prediction.

    ``metric``: ``vqa`` (soft accuracy), ``exact`` (GQA; first answer) or ``yes_no`` (POPE; first answer).
    """
    if prediction is None or not answers:
        return None
    if metric == "vqa":
        return vqa_accuracy(prediction, answers)
    if metric == "exact":
        return exact_match(prediction, answers[0])
    if metric == "yes_no":
        return float(yes_no(prediction) == answers[0].strip().lower())
    raise ValueError(f"unknown metric {metric!r} (vqa, exact, yes_no)")
