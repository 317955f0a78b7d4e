"""Multiple-choice scoring of IMUG-Bench text turns (official `score_mcq.py` formula).

score = round(max(0, (|P ∩ E| - |P \\ E|) / |E|) * format_factor(response), 4)

where E and P are the option letters (A-G) found in the gold answer and in the response. The
format factor rewards a bare answer: 1.0 for letters only ("AC"), 0.75 for letters with
separators ("A, C."), 0.5 for anything else, 0 for an empty or missing response.

Two letter parsers:
  * "official": every standalone capital A-G (regex `\\b([A-G])\\b`). Runs of adjacent capitals
    such as "BCD" contain no word boundary between the letters, so they parse to the empty set:
    a gold "BCD" scores 0 for every reply and a reply "BD" earns nothing. Resolved dynamic answers
    are stored exactly like that, so all multi-letter dynamic answers score 0 officially. This is
    the parity mode and the default.
  * "corrected": additionally splits all-capital runs made only of A-G ("BCD" -> {B, C, D}).
    Everything else (format factor, stray standalone capitals in free text) is unchanged, so the
    two modes differ only where the quirk bites. Reports must say which parser was used.
"""

from __future__ import annotations

import re

PARSERS = ("official", "corrected")

_OFFICIAL_LETTER = re.compile(r"\b([A-G])\b")
_LETTER_RUN = re.compile(r"\b([A-G]+)\b")
_LETTERS_ONLY = re.compile(r"[A-G]+")
_LETTERS_WITH_SEPARATORS = re.compile(r"[A-G\s,.;\-]+")


def extract_choices(text: object, parser: str = "official") -> frozenset[str]:
  """Returns the option letters that `parser` reads from `text` (empty for non-strings)."""
  _check_parser(parser)
  if not text or not isinstance(text, str):
    return frozenset()
  if parser == "official":
    return frozenset(_OFFICIAL_LETTER.findall(text))
  letters: set[str] = set()
  for run in _LETTER_RUN.findall(text):
    letters.update(run)
  return frozenset(letters)


def format_factor(response: object) -> float:
  """The official format multiplier: 1.0, 0.75, 0.5, or 0 for an empty/missing response."""
  if not response:
    return 0.0
  stripped = str(response).strip()
  if _LETTERS_ONLY.fullmatch(stripped):
    return 1.0
  if _LETTERS_WITH_SEPARATORS.fullmatch(stripped):
    return 0.75
  return 0.5


def score(answer: object, response: object, *, parser: str = "official") -> float:
  """Scores one response against a gold answer; in [0, 1], rounded to 4 places.

  Args:
    answer: gold answer string (already resolved if it was dynamic), e.g. "B" or "AC".
    response: the model's text reply; None or "" scores 0.
    parser: "official" (parity, with the adjacent-capitals quirk) or "corrected".

  Returns:
    The partial-credit score times the format factor. A gold answer with no parsable letter
    scores 0.0, as in the official scorer.
  """
  expected = extract_choices(answer, parser)
  if not expected:
    return 0.0
  predicted = extract_choices(response, parser)
  correct = len(predicted & expected)
  incorrect = len(predicted - expected)
  return round(max(0.0, (correct - incorrect) / len(expected)) * format_factor(response), 4)


def _check_parser(parser: str) -> None:
  if parser not in PARSERS:
    raise ValueError(f"unknown MCQ parser {parser!r}; expected one of {PARSERS}")
