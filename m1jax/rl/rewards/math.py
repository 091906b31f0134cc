"""Final-answer extraction and exact comparison of math answers.

A response states its final answer in one of two ways:
  `#### <answer>`   the answer is the rest of that line (this is what m1jax's synthetic task
                    demonstrations use);
  `\\boxed{<answer>}` braces may nest, e.g. `\\boxed{\\frac{3}{4}}`.
When a response holds several, the one that starts last wins. Any string is scored in time
linear in its length and nothing raises: see MAX_MARKERS, MAX_ANSWER_CHARS, MAX_NUMBER_CHARS.

Answers are compared as exact rationals (`fractions.Fraction`) when both sides parse as numbers;
otherwise as strings with whitespace and surrounding `$` removed. Numbers may be written as
integers (`-12`, `+12`, `1,234,567` with well-formed thousands groups), decimals (`2.50`, `.5`,
`3.`), fractions `3/4`, `-3/4`, `\\frac{3}{4}` (also `\\dfrac`, `\\tfrac`, `-\\frac{3}{4}`,
`\\frac{-3}{4}`), optionally inside `$...$`. Decimals are exact: `0.333` is not `1/3`.
"""

import dataclasses
import fractions
import re

import numpy as np

FINAL_ANSWER_MARKER = "####"
BOXED_MARKER = "\\boxed"
# Bounds that keep scoring linear in the response length whatever the model writes: a response
# with more final-answer markers than MAX_MARKERS states no answer; an answer (a `####` line's
# rest or a `\\boxed{}`'s content) longer than MAX_ANSWER_CHARS is not well formed; a number
# longer than MAX_NUMBER_CHARS is compared as text, not as a number.
MAX_MARKERS = 64
MAX_ANSWER_CHARS = 1000
MAX_NUMBER_CHARS = 256


@dataclasses.dataclass(frozen=True)
class AnswerSpan:
  """One well-formed final-answer marker: text[start:end] is the marker with its answer."""
  start: int
  end: int
  answer: str
  kind: str  # "####" or "boxed"


_BOXED_OPEN = re.compile(r"\\boxed\s*\{")


def _closing_brace(text: str, open_end: int) -> int | None:
  """Index of the `}` that closes the `{` ending at open_end, looked for within
  MAX_ANSWER_CHARS characters; None when it is not there."""
  window = text[open_end:open_end + MAX_ANSWER_CHARS + 1]
  if "}" not in window:
    return None
  codes = np.frombuffer(window.encode("utf-32-le", "surrogatepass"), np.uint32)
  depth = 1 + np.cumsum((codes == ord("{")).astype(np.int32) - (codes == ord("}")))
  closed = np.flatnonzero(depth == 0)
  return open_end + int(closed[0]) if closed.size else None


def _boxed_spans(text: str) -> list[AnswerSpan]:
  """Every well-formed `\\boxed{...}` with balanced braces; malformed ones are skipped."""
  spans = []
  for match in _BOXED_OPEN.finditer(text):
    close = _closing_brace(text, match.end())
    if close is not None:
      spans.append(AnswerSpan(match.start(), close + 1, text[match.end():close].strip(), "boxed"))
  return spans


def _marker_spans(text: str) -> list[AnswerSpan]:
  """Every `#### answer` whose answer (rest of the line) is non-empty; the first `####` of a
  line is its marker (later ones belong to its answer)."""
  spans, start = [], text.find(FINAL_ANSWER_MARKER)
  while start >= 0:
    eol = text.find("\n", start)
    eol = len(text) if eol < 0 else eol
    answer = text[start + len(FINAL_ANSWER_MARKER):eol].strip()
    if answer and len(answer) <= MAX_ANSWER_CHARS:
      spans.append(AnswerSpan(start, eol, answer, FINAL_ANSWER_MARKER))
    start = text.find(FINAL_ANSWER_MARKER, eol)
  return spans


def answer_spans(text: str) -> list[AnswerSpan]:
  """All well-formed final-answer markers in `text`, in order of their start (none when the
  text holds more than MAX_MARKERS markers)."""
  if text.count(FINAL_ANSWER_MARKER) + text.count(BOXED_MARKER) > MAX_MARKERS:
    return []
  return sorted(_boxed_spans(text) + _marker_spans(text), key=lambda span: span.start)


def extract_answer(text: str) -> str | None:
  """The final answer of a response (the last marker's content), or None when it has none."""
  spans = answer_spans(text)
  return spans[-1].answer if spans else None


_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[+-]?\.\d+")
_FRAC = re.compile(r"([+-]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")


def _strip_wrapping(text: str) -> str:
  text = text.replace("\\$", "").replace("\u2212", "-")
  return text.strip().strip("$").strip()


def _parse_decimal(text: str) -> fractions.Fraction | None:
  if len(text) > MAX_NUMBER_CHARS or not _NUMBER.fullmatch(text):
    return None
  text = text.replace(",", "")
  if text.endswith("."):
    text = text[:-1]
  return fractions.Fraction(text)


def parse_number(text: str) -> fractions.Fraction | None:
  """The exact value of a numeric answer string, or None when it is not a plain number (or
  longer than MAX_ANSWER_CHARS)."""
  if len(text) > MAX_ANSWER_CHARS:
    return None
  text = re.sub(r"\s*([+\-/{}])\s*", r"\1", _strip_wrapping(text))
  frac = _FRAC.fullmatch(text)
  if frac:
    sign, num, den = frac.groups()
    numerator, denominator = _parse_decimal(num), _parse_decimal(den)
    if numerator is None or denominator is None or denominator == 0:
      return None
    value = numerator / denominator
    return -value if sign == "-" else value
  if text.count("/") == 1:
    num, den = text.split("/")
    numerator, denominator = _parse_decimal(num), _parse_decimal(den)
    if numerator is None or denominator is None or denominator == 0 or den[0] in "+-":
      return None
    return numerator / denominator
  return _parse_decimal(text)


def _normalise_text(text: str) -> str:
  return re.sub(r"\s+", "", _strip_wrapping(text))


def is_equivalent(pred: str | None, gold: str | int) -> bool:
  """Whether a predicted answer equals the gold one: exactly as numbers, else as strings."""
  if pred is None:
    return False
  gold = str(gold)
  pred_value, gold_value = parse_number(pred), parse_number(gold)
  if pred_value is not None and gold_value is not None:
    return pred_value == gold_value
  if pred_value is not None or gold_value is not None:
    return False
  return bool(_normalise_text(gold)) and _normalise_text(pred) == _normalise_text(gold)


def math_reward(text: str, gold: str | int) -> float:
  """1.0 when the response's final answer equals `gold`, else 0.0."""
  return float(is_equivalent(extract_answer(text), gold))
