"""Which option a reply to a closed question (MCQ, PubMedQA's yes/no/maybe) chose: `--judge exact`.

    from exact_match import choose_option
    choose_option("A. yes\\n\\nThe answer is A. yes.", ["yes", "no", "maybe"])   # -> (0, "stated")
    choose_option("I cannot tell.", ["yes", "no", "maybe"])                    # -> (None, "unmatched")

The text read is the answer the reply gives: inside its first `<answer>...</answer>` if there is one,
else the whole text given (evaluate.py passes what follows the reasoning), read as
judge_prompts.normalise_text reads it (NFKC, no zero-width characters). Rules, first that applies:
1. `whole`: the whole answer is an option: its letter ("B", "B.", "(B)"), its text, or both ("B. no").
2. `stated`: "the answer is X" / "Answer: X" / "option X": the first such statement whose X opens with an
   option (lm-eval's strict-match filters: a regex, take_first with group_select 0, the first match).
3. `leading`: the answer opens with an option ("A. yes, because ...", "(C)", "No, the study ...").
4. `mentioned`: exactly one option's text (as whole words) or "(X)" appears somewhere. lm-eval's
   MultiChoiceRegexFilter falls back to the first choice text found; a reply naming two different
   options chose none here, and counts as unmatched.
A letter followed by another option's text ("A. no") chose nothing (contradiction). A reply that
matches no rule is `unmatched` (lm-eval's "[invalid]" fallback): scored 0 and counted in the report.
Stdlib only (and judge_prompts), so it copies out with the judge parsers.
"""
from __future__ import annotations

import re

from judge_prompts import normalise_text

RULES = "rules2"  # the version of the rules below, in each judged line (`template_id`): change it with them
LETTERS = "ABCDEFGHIJ"  # as data.LETTERS (not imported: this file stays stdlib-only)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# "the (correct|final|best) answer is X", "Answer: X", "option X" / "choice X": X is what follows.
_STATED = re.compile(r"(?:\b(?:correct|final|best|right)\s+)?\banswer\b\s*(?:is|would\s+be|=|:|-)\s*[:\-]?\s*|\b(?:option|choice)\s+(?=\(?[A-J]\b)",
                     re.IGNORECASE)  # fmt: skip
_OPEN_PUNCT = " \t\r\n*_\"'`"  # markdown emphasis and quotes around an answer
_END_PUNCT = " \t\r\n*_\"'`.,;:!)]"


def answer_text(text: str) -> str:
    """The part of a reply that holds its answer: the first `<answer>` block, else all of it (normalised)."""
    text = normalise_text(text or "")
    tagged = _ANSWER_TAG.search(text)
    return (tagged.group(1) if tagged else text).strip()


def _fold(text: str) -> str:
    return " ".join(text.lower().split())


def _letter_at_start(text: str, n: int) -> tuple[int | None, str]:
    """(option index, the text after the letter) when `text` opens with an option letter written as one:
    "B", "B.", "B)", "B:", "(B)", "B - ...", never the article "A" of "A study ..."."""
    m = re.match(r"\(\s*([A-J])\s*\)|([A-J])(?=$|[.):\-]|\s*$|\s+is\b)", text.lstrip(_OPEN_PUNCT))
    if m:
        letter = m.group(1) or m.group(2)
        if LETTERS.index(letter) < n:
            return LETTERS.index(letter), text.lstrip(_OPEN_PUNCT)[m.end():].lstrip(" .):-\t")
    return None, text


def _text_at_start(text: str, options: list[str]) -> int | None:
    """The option whose text `text` opens with, as whole words (the longest, if one extends another)."""
    low = _fold(text.lstrip(_OPEN_PUNCT))
    best = None
    for i, o in enumerate(options):
        if o and re.match(re.escape(o) + r"(?!\w)", low) and (best is None or len(o) > len(options[best])):
            best = i
    return best


CONTRADICTS = -1  # `_leading`: a letter then another option's text ("A. no")


def _leading(text: str, options: list[str]) -> int | None:
    """The option `text` opens with: a letter (then nothing, or that option's text, or any other words) or an
    option's text. A letter then a *different* option's text contradicts itself: CONTRADICTS."""
    letter, rest = _letter_at_start(text, len(options))
    if letter is not None:
        named = _text_at_start(rest, options) if rest.strip(_END_PUNCT) else None
        return letter if named in (None, letter) else CONTRADICTS
    return _text_at_start(text, options)


def choose_option(response: str, choices: list[str]) -> tuple[int | None, str]:
    """(index of the chosen option or None, the rule that decided: whole | stated | leading | mentioned | unmatched)."""
    options = [_fold(normalise_text(str(c))) for c in choices]
    text = answer_text(response)
    bare = text.strip(_END_PUNCT + "(")
    lone = re.fullmatch(r"\(?([a-jA-J])\)?", bare)  # the whole answer one letter: its case does not matter
    if lone and LETTERS.index(lone.group(1).upper()) < len(options):
        return LETTERS.index(lone.group(1).upper()), "whole"
    if bare:
        letter, rest = _letter_at_start(bare, len(options))
        rest = _fold(rest.strip(_END_PUNCT))
        if letter is not None and rest in ("", options[letter]):
            return letter, "whole"
        if letter is None and _fold(bare) in options:
            return options.index(_fold(bare)), "whole"
    for m in _STATED.finditer(text):
        chosen = _leading(text[m.end():], options)
        if chosen is not None:
            return (None, "unmatched") if chosen == CONTRADICTS else (chosen, "stated")
    chosen = _leading(text, options)
    if chosen is not None:
        return (None, "unmatched") if chosen == CONTRADICTS else (chosen, "leading")
    low = _fold(text)
    found = {i for i, o in enumerate(options) if o and re.search(r"(?<!\w)" + re.escape(o) + r"(?!\w)", low)}
    found |= {LETTERS.index(x) for x in re.findall(r"\(([A-J])\)", text) if LETTERS.index(x) < len(options)}
    if len(found) == 1:
        return found.pop(), "mentioned"
    return None, "unmatched"
