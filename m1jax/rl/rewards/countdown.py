"""Countdown verifier: a safe parser for `+ - * /` expressions with exact rational arithmetic.

Grammar (no unary operators, no exponent, integer literals only, whitespace ignored):
  expr   := term (("+" | "-") term)*
  term   := factor (("*" | "/") factor)*
  factor := INTEGER | "(" expr ")"
Nothing is evaluated by Python: the text is tokenised and parsed here, values are
`fractions.Fraction`, so `(7/2)*2` is exactly 7. Division by zero, any other character, more
than `MAX_EXPRESSION_CHARS` characters, or parentheses nested deeper than `MAX_DEPTH` make the
expression invalid.
"""

import collections
import dataclasses
import fractions
import re
from typing import Sequence

from m1jax.rl.rewards import math as math_rewards

MAX_EXPRESSION_CHARS = 256
MAX_DEPTH = 16
MAX_LITERAL_DIGITS = 12

_TOKEN = re.compile(r"\s*(?:([0-9]+)|([-+*/()]))")


class ExpressionError(ValueError):
  """The text is not a valid countdown expression."""


def _tokenize(expression: str) -> list[int | str]:
  if len(expression) > MAX_EXPRESSION_CHARS:
    raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
  tokens, pos, depth = [], 0, 0
  expression = expression.rstrip()
  while pos < len(expression):
    match = _TOKEN.match(expression, pos)
    if match is None:
      raise ExpressionError(f"unexpected character {expression[pos:].lstrip()[:1]!r}")
    literal, symbol = match.groups()
    if literal is not None:
      if len(literal) > MAX_LITERAL_DIGITS:
        raise ExpressionError(f"number {literal[:MAX_LITERAL_DIGITS]}... is too long")
      tokens.append(int(literal))
    else:
      depth += {"(": 1, ")": -1}.get(symbol, 0)
      if depth > MAX_DEPTH:
        raise ExpressionError(f"parentheses nested deeper than {MAX_DEPTH}")
      tokens.append(symbol)
    pos = match.end()
  return tokens


class _Parser:
  """Recursive descent over the token list; records the integer literals it reads."""

  def __init__(self, tokens: list[int | str]):
    self.tokens = tokens
    self.pos = 0
    self.literals: list[int] = []

  def _peek(self) -> int | str | None:
    return self.tokens[self.pos] if self.pos < len(self.tokens) else None

  def parse(self) -> fractions.Fraction:
    if not self.tokens:
      raise ExpressionError("empty expression")
    value = self._expr()
    if self.pos != len(self.tokens):
      raise ExpressionError(f"unexpected {self.tokens[self.pos]!r} at token {self.pos}")
    return value

  def _expr(self) -> fractions.Fraction:
    value = self._term()
    while self._peek() in ("+", "-"):
      op = self.tokens[self.pos]
      self.pos += 1
      rhs = self._term()
      value = value + rhs if op == "+" else value - rhs
    return value

  def _term(self) -> fractions.Fraction:
    value = self._factor()
    while self._peek() in ("*", "/"):
      op = self.tokens[self.pos]
      self.pos += 1
      rhs = self._factor()
      if op == "*":
        value *= rhs
      elif rhs == 0:
        raise ExpressionError("division by zero")
      else:
        value /= rhs
    return value

  def _factor(self) -> fractions.Fraction:
    token = self._peek()
    self.pos += 1
    if isinstance(token, int):
      self.literals.append(token)
      return fractions.Fraction(token)
    if token == "(":
      value = self._expr()
      if self._peek() != ")":
        raise ExpressionError("missing ')'")
      self.pos += 1
      return value
    raise ExpressionError(f"expected a number or '(' at token {self.pos - 1}, got {token!r}")


def evaluate_expression(expression: str) -> tuple[fractions.Fraction, tuple[int, ...]]:
  """Exact value of `expression` and the integer literals it uses, in order of appearance.

  Raises:
    ExpressionError: the expression is malformed, divides by zero or breaks a size limit.
  """
  parser = _Parser(_tokenize(expression))
  value = parser.parse()
  return value, tuple(parser.literals)


@dataclasses.dataclass(frozen=True)
class CountdownVerdict:
  correct: bool
  reason: str  # "ok", or why the expression fails
  value: fractions.Fraction | None = None


def check_countdown(
    expression: str, numbers: Sequence[int], target: int | fractions.Fraction
) -> CountdownVerdict:
  """Whether `expression` reaches `target` using each of `numbers` at most once."""
  try:
    value, used = evaluate_expression(expression)
  except ExpressionError as e:
    return CountdownVerdict(False, f"invalid expression: {e}")
  excess = collections.Counter(used) - collections.Counter(int(n) for n in numbers)
  if excess:
    return CountdownVerdict(False, f"uses numbers not available: {sorted(excess.elements())}",
                            value)
  if value != target:
    return CountdownVerdict(False, f"value {value} != target {target}", value)
  return CountdownVerdict(True, "ok", value)


def countdown_reward(text: str, example) -> float:
  """1.0 when the response's final answer is a correct expression for the example, else 0.0.

  Reads `example.metadata["numbers"]` (the available numbers) and `example.answer` (the target).
  """
  expression = math_rewards.extract_answer(text)
  if expression is None:
    return 0.0
  target = math_rewards.parse_number(str(example.answer))
  if target is None:
    raise ValueError(f"example.answer: countdown target must be a number, got {example.answer!r}")
  return float(check_countdown(expression, example.metadata["numbers"], target).correct)
