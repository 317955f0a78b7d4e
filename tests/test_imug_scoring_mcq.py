"""The official MCQ formula, its adjacent-capitals quirk, and the corrected parser."""

import pytest

from imug_jax.scoring import mcq


@pytest.mark.parametrize(
  "answer, response, expected",
  [
    ("B", "B", 1.0),
    ("B", "A", 0.0),
    ("B", "B.", 0.75),  # separators allowed, format 0.75
    ("B", " B ", 1.0),  # stripped before the format check
    ("B", "(B)", 0.5),  # brackets are not in the separator class
    ("B", "The answer is B", 0.5),
    # Multi-answer (letters separated, so the official regex sees them).
    ("A, C", "A, C", 0.75),
    ("A, C", "C;A", 0.75),
    ("A, C", "A", 0.5),  # half the letters, bare format
    ("A, B, C", "A", 0.3333),  # rounded to 4 places
    # Extra letters are penalised, floored at 0.
    ("A, C", "A, C, D", 0.375),
    ("B", "B, D", 0.0),
    ("B", "A, D, E", 0.0),
    # Lowercase letters are not options.
    ("B", "b", 0.0),
    ("B", "answer: b", 0.0),
    # Free text with stray capitals: every standalone A-G counts.
    ("B", "I think B", 0.5),  # "I" is not an option letter
    ("B", "A cat picks B", 0.0),  # stray "A" cancels the hit
    ("C", "Answer: C. Because D is wrong", 0.0),
    # Empty or missing responses.
    ("B", "", 0.0),
    ("B", None, 0.0),
    ("B", "   ", 0.0),
    # Gold without a parsable letter scores 0 for everything.
    ("", "B", 0.0),
    # The quirk: runs of adjacent capitals parse to nothing.
    ("BCD", "BCD", 0.0),
    ("BCD", "B, C, D", 0.0),
    ("B, D", "BD", 0.0),
  ],
)
def test_official_formula(answer, response, expected):
  assert mcq.score(answer, response) == expected


def test_format_factor_levels():
  assert mcq.format_factor("ACE") == 1.0
  assert mcq.format_factor("A, C-E.") == 0.75
  assert mcq.format_factor("A and C") == 0.5
  assert mcq.format_factor("") == 0.0
  assert mcq.format_factor(None) == 0.0


def test_official_parser_finds_no_letter_in_runs():
  assert mcq.extract_choices("BCD") == frozenset()
  assert mcq.extract_choices("B C D") == frozenset("BCD")
  assert mcq.extract_choices("Option A) or (G)") == frozenset("AG")


@pytest.mark.parametrize(
  "answer, response, expected",
  [
    ("BCD", "BCD", 1.0),
    ("BCD", "B", 0.3333),
    ("BCD", "DCB", 1.0),
    ("B, D", "BD", 1.0),
    ("BD", "B, D, E", 0.375),  # (2 - 1) / 2 * 0.75
    ("B", "The answer is B", 0.5),  # same as official where no run is involved
    ("B", "b", 0.0),
    ("B", "", 0.0),
  ],
)
def test_corrected_parser(answer, response, expected):
  assert mcq.score(answer, response, parser="corrected") == expected


def test_modes_agree_without_runs():
  cases = [("A, C", "A, C, D"), ("B", "I think B"), ("C", "Answer: C. Because D is wrong")]
  for answer, response in cases:
    assert mcq.score(answer, response) == mcq.score(answer, response, parser="corrected")


def test_unknown_parser_is_an_error():
  with pytest.raises(ValueError, match="unknown MCQ parser"):
    mcq.score("A", "A", parser="lenient")
