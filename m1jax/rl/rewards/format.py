"""Format reward: one well-formed final answer, and nothing after it."""

import re

from m1jax.rl.rewards import math as math_rewards

_TRAILER_AFTER_BOXED = re.compile(r"[\s$.]*")


def format_reward(text: str, example=None) -> float:
  """1.0 when the response is well formatted, else 0.0.

  Well formatted means all of:
    1. `####` and `\\boxed` occur exactly once in total in `text`;
    2. that marker is well formed: `####` followed by a non-empty answer on its line, or
       `\\boxed{...}` with balanced braces and non-empty content;
    3. only whitespace follows the answer (after `\\boxed{...}` also `$` and `.`), i.e. the
       answer line is the end of the response.
  `text` is the response decoded up to, not including, its EOS token. Whether a response ended
  with EOS at all is a token-level fact: `rewards.score_responses(..., unfinished_reward=0.0)`
  scores responses that hit the length limit without EOS.

  Args:
    text: the decoded response.
    example: unused; accepted so that every reward has the signature (text, example).
  """
  del example
  if text.count(math_rewards.FINAL_ANSWER_MARKER) + text.count(math_rewards.BOXED_MARKER) != 1:
    return 0.0
  spans = math_rewards.answer_spans(text)
  if len(spans) != 1 or not spans[0].answer:
    return 0.0
  rest = text[spans[0].end:]
  if spans[0].kind == "boxed":
    return float(_TRAILER_AFTER_BOXED.fullmatch(rest) is not None)
  return float(not rest.strip())
