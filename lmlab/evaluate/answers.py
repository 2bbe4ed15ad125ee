"""Reading the answer out of a generated text: an option letter (parse_answer, extract_letter) or a number
(extract_number), and whether a number is right (is_correct).

parse_answer is the multiple-choice harness's rule (--mode generate). The math word problems use:
    numbers  commas are removed ("1,000" is 1000), then the last number -?\\d+\\.?\\d* of the completion is the
             answer, as in LLM-Adapters' evaluate.py; correct when |prediction - gold| <= NUMERIC_TOLERANCE
             (LLM-Adapters' 0.001, so 0.67 for 2/3 is wrong: a model must write the digits)
    letters  the option after the last "answer is" / "answer:" (case-insensitive, "(C)" or "C"); else the last
             option in parentheses "(C)"; else parse_answer (a leading "C." or "C)", a letter standing alone) on
             the text without a leading "A: " before a word, the "Answer:" prefix that LLM-Adapters' rationales
             (and so a model trained on them) start with. LLM-Adapters takes the first capital A-E anywhere,
             which that prefix fools.
"""

from __future__ import annotations

import math
import re

LETTERS = "ABCDEFGHIJ"  # option labels, in prompts and in answers
NUMERIC_TOLERANCE = 1e-3
AQUA_OPTIONS = 5
_NUMBER = re.compile(r"-?\d+\.?\d*")
_LETTER_AFTER_ANSWER = re.compile(r"(?i:answer)(?:\s+is)?\s*:?\s*\(?([A-E])\b")
_LETTER_IN_PARENS = re.compile(r"\(([A-E])\)")
_RATIONALE_PREFIX = re.compile(r"^\s*A:\s+(?=[A-Za-z])")  # "A: The train..." is an answer, not option A


def parse_answer(text: str, n_options: int) -> int | None:
    r"""The option a generated answer names, as an index, or None. Tried in order, with L the valid labels
    (A, B, ... for n options):
      1. the answer starts with a label:  ^\s*\(?L(?:[).:\]]|\s*$|\s*\n)     "B", " B: text", "(B)", "A."
      2. a label after "answer":          (?i:answer)(?: is)?\s*:?\s*\(?L\b  "The answer is B", "Answer: (C)"
      3. the first label standing alone:  (?<![A-Za-z])L(?![A-Za-z'])        "I'd pick B since..."
    The article "A" is no answer: step 1 needs a delimiter after the letter, and step 3 skips an "A" followed
    by a lowercase word ("A dog would pick B" is B)."""
    labels = LETTERS[:n_options]
    cls = f"[{labels}]"
    for pattern in (rf"^\s*\(?({cls})(?:[).:\]]|\s*$|\s*\n)", rf"(?i:answer)(?: is)?\s*:?\s*\(?({cls})\b"):
        m = re.search(pattern, text)
        if m:
            return labels.index(m.group(1))
    for m in re.finditer(rf"(?<![A-Za-z])({cls})(?![A-Za-z'])", text):
        if not (m.group(1) == "A" and re.match(r" [a-z]", text[m.end():])):
            return labels.index(m.group(1))
    return None


def extract_number(text: str) -> float | None:
    """The last number in the text, commas removed; None when there is none."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def extract_letter(text: str) -> int | None:
    """The option a completion names (0 for A), or None (see the module docstring)."""
    for pattern in (_LETTER_AFTER_ANSWER, _LETTER_IN_PARENS):
        found = pattern.findall(text)
        if found:
            return LETTERS.index(found[-1])
    return parse_answer(_RATIONALE_PREFIX.sub("", text), AQUA_OPTIONS)


def is_correct(prediction: float | None, gold: float) -> bool:
    return prediction is not None and math.isfinite(prediction) and abs(prediction - gold) <= NUMERIC_TOLERANCE
