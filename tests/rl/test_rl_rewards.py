"""Rewards: answer extraction, exact numeric equivalence, countdown verifier, format, registry.

Rewards are 0/1 (or exact weighted sums of them), so checks are equality; the combined reward
is compared with a 1e-6 tolerance only because it is a float sum of weights.
"""

import fractions
import time

import numpy as np
import pytest

from m1jax.data import tasks
from m1jax.data import tokenizer as tokenizer_lib
from m1jax.rl import rewards
from m1jax.rl.rewards import countdown
from m1jax.rl.rewards import format as format_rewards
from m1jax.rl.rewards import math as math_rewards


@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
    ("\\boxed{{1}+{2}}", "{1}+{2}"),
    ("work 1+1=2\n#### 2\n", "2"),
    ("#### 5 then \\boxed{7}", "7"),  # the marker that starts last wins
    ("\\boxed{7} ... #### 5", "5"),
    ("#### 1\n#### 2", "2"),
    ("\\boxed{3} \\boxed{4", "3"),  # unbalanced braces are not an answer
    ("no answer here", None),
    ("####   \n", None),
    ("\\boxed{12", None),
])
def test_extract_answer(text, expected):
  assert math_rewards.extract_answer(text) == expected


@pytest.mark.parametrize("pred, gold", [
    ("42", "42"),
    ("+42", "42"),
    ("042", "42"),
    ("42.0", "42"),
    ("42.000", "42"),
    ("42.", "42"),
    ("$42$", "42"),
    ("  42  ", "42"),
    ("\\$42", "42"),
    ("1,234", "1234"),
    ("1,234,567.50", "1234567.5"),
    ("-7", "-7"),
    ("\u22127", "-7"),
    ("- 7", "-7"),
    ("0.5", "1/2"),
    (".5", "\\frac{1}{2}"),
    ("3/4", "\\frac{3}{4}"),
    ("\\dfrac{3}{4}", "0.75"),
    ("-\\frac{3}{4}", "-3/4"),
    ("\\frac{-3}{4}", "-0.75"),
    ("6/8", "3/4"),
    ("$\\frac{10}{4}$", "2.5"),
    ("x + 1", "x+1"),
    ("42", 42),
])
def test_equivalent_answers(pred, gold):
  assert math_rewards.is_equivalent(pred, gold)


@pytest.mark.parametrize("pred, gold", [
    ("41", "42"),
    ("-42", "42"),
    ("4.2", "42"),
    ("0.333", "1/3"),
    ("0.3333333333", "\\frac{1}{3}"),
    ("1,23", "123"),  # not a thousands grouping
    ("12,34,567", "1234567"),
    ("3/0", "0"),
    ("42 apples", "42"),
    ("1 2", "12"),
    ("", "0"),
    (None, "1"),
    ("x+2", "x+1"),
    ("4/3", "3/4"),
    ("\\frac{3}{4}", "4/3"),
    ("1/-2", "-1/2"),
    ("", ""),
    ("1e3", "1000"),
    ("42", "4 2"),
    ("0x2A", "42"),
])
def test_inequivalent_answers(pred, gold):
  assert not math_rewards.is_equivalent(pred, gold)


def test_parse_number_is_exact():
  assert math_rewards.parse_number("1,234.25") == fractions.Fraction(4937, 4)
  assert math_rewards.parse_number("\\frac{1}{3}") == fractions.Fraction(1, 3)
  assert math_rewards.parse_number("abc") is None


def test_math_reward():
  assert math_rewards.math_reward("7+5=12,4+8+1=13 #### 132", "132") == 1.0
  assert math_rewards.math_reward("7+5=12,4+8+1=13 #### 131", "132") == 0.0
  assert math_rewards.math_reward("132", "132") == 0.0  # no final-answer marker


@pytest.mark.parametrize("expression, value, used", [
    ("1+2*3", 7, (1, 2, 3)),
    ("(1+2)*3", 9, (1, 2, 3)),
    ("8-3-2", 3, (8, 3, 2)),
    ("8-(3-2)", 7, (8, 3, 2)),
    ("12/4/3", 1, (12, 4, 3)),
    ("(7/2)*2", 7, (7, 2, 2)),
    (" ( 10 - 4 ) / 4 ", fractions.Fraction(3, 2), (10, 4, 4)),
])
def test_evaluate_expression(expression, value, used):
  assert countdown.evaluate_expression(expression) == (value, used)


@pytest.mark.parametrize("expression, reason", [
    ("", "empty"),
    ("3+", "expected a number"),
    ("(3+4", "missing"),
    ("3+4)", "unexpected"),
    ("3 4", "unexpected"),
    ("2**3", "expected a number"),
    ("-3+5", "expected a number"),  # no unary minus
    ("6/(3-3)", "division by zero"),
    ("1.5*2", "unexpected character"),
    ("__import__('os').system('ls')", "unexpected character"),
    ("1+1; import os", "unexpected character"),
    ("eval('1')", "unexpected character"),
    ("lambda: 1", "unexpected character"),
    ("\u0663+1", "unexpected character"),  # Arabic-Indic digit three
    ("1" * 13, "too long"),
    ("(" * 17 + "1" + ")" * 17, "nested"),
    ("1+" * 200 + "1", "longer than"),
])
def test_evaluate_expression_rejects(expression, reason):
  with pytest.raises(countdown.ExpressionError, match=reason):
    countdown.evaluate_expression(expression)


@pytest.mark.parametrize("expression, correct", [
    ("7*3+5", True),
    ("5+3*7", True),
    ("(7-5)*13", False),  # 13 is not given
    ("7*3+5+0", False),  # 0 is not given
    ("7*3*1+5", False),
    ("7*3+5*1", False),
    ("7+7+7+5", False),  # 7 used three times
    ("3*7", False),  # right numbers, wrong value
    ("26", False),
    ("7*3+5)", False),
    ("5/(7-7)", False),
])
def test_check_countdown(expression, correct):
  assert countdown.check_countdown(expression, [3, 5, 7], 26).correct == correct


def test_check_countdown_allows_subsets_and_rational_steps():
  assert countdown.check_countdown("7*3", [3, 5, 7], 21).correct
  assert countdown.check_countdown("(5/3+1)*3", [1, 3, 3, 5], 8).correct
  assert not countdown.check_countdown("(5/3+1)*3", [1, 3, 5], 8).correct  # 3 used twice


def _countdown_example(numbers=(3, 5, 7), target=26):
  return tasks.Example(f"make {target} from 3 5 7:", str(target), "#### 7*3+5", "countdown",
                       {"numbers": numbers})


def test_countdown_reward():
  example = _countdown_example()
  assert countdown.countdown_reward("7*3=21,21+5=26 #### 7*3+5", example) == 1.0
  assert countdown.countdown_reward("\\boxed{(3*7)+5}", example) == 1.0
  assert countdown.countdown_reward("#### 7*3+5=26", example) == 0.0
  assert countdown.countdown_reward("#### 7*3+3+2", example) == 0.0
  assert countdown.countdown_reward("7*3+5", example) == 0.0


@pytest.mark.parametrize("text, expected", [
    ("7+5=12 #### 12", 1.0),
    ("#### 12\n", 1.0),
    ("some work \\boxed{12}.", 1.0),
    ("$\\boxed{\\frac{1}{2}}$", 1.0),
    ("#### 12\nmore text", 0.0),  # garbage after the answer line
    ("\\boxed{12} and then", 0.0),
    ("#### 12 #### 12", 0.0),  # two markers
    ("\\boxed{1} \\boxed{1}", 0.0),
    ("#### 1 \\boxed{1}", 0.0),
    ("####", 0.0),  # empty answer
    ("\\boxed{}", 0.0),
    ("\\boxed{12", 0.0),
    ("12", 0.0),
])
def test_format_reward(text, expected):
  assert format_rewards.format_reward(text, None) == expected


def test_registry_and_task_dispatch():
  arithmetic = tasks.Example("7+5=", "12", "7+5=12 #### 12", "arithmetic")
  example = _countdown_example()
  assert rewards.get_reward_fn("math")("#### 12", arithmetic) == 1.0
  assert rewards.get_reward_fn("countdown")("#### 7*3+5", example) == 1.0
  assert rewards.get_reward_fn("task")("#### 12", arithmetic) == 1.0
  assert rewards.get_reward_fn("task")("#### 7*3+5", example) == 1.0
  assert rewards.get_reward_fn("task")("#### 26", example) == 0.0  # not an expression of 3 5 7
  with pytest.raises(ValueError, match="unknown reward"):
    rewards.get_reward_fn("bleu")
  with pytest.raises(ValueError, match="no verifier"):
    rewards.get_reward_fn("task")("#### 1", tasks.Example("p", "1", "#### 1", "poetry"))
  with pytest.raises(ValueError, match="already registered"):
    rewards.register_reward("math", rewards.math_reward_fn)


def test_combine_is_a_weighted_sum():
  example = tasks.Example("7+5=", "12", "#### 12", "arithmetic")
  reward = rewards.combine({"math": 1.0, "format": 0.1})
  assert reward("#### 12", example) == pytest.approx(1.1, abs=1e-6)
  assert reward("#### 12\nextra", example) == pytest.approx(1.0, abs=1e-6)
  assert reward("#### 13", example) == pytest.approx(0.1, abs=1e-6)
  assert reward.components("#### 13", example) == {"math": 0.0, "format": 1.0}
  with pytest.raises(ValueError, match="unknown reward"):
    rewards.combine({"math": 1.0, "lenght": 0.1})


def test_score_responses_decodes_up_to_eos():
  tok = tokenizer_lib.ByteTokenizer()
  examples = [tasks.Example("7+5=", "12", "#### 12", "arithmetic")] * 4

  def row(text, eos=True, width=12):
    ids = tok.encode(text) + ([tok.eos_id] if eos else [])
    return ids + [tok.pad_id] * (width - len(ids))

  tokens = np.array([row("#### 12"), row("#### 13"), row("#### 12", eos=False),
                     tok.encode("#### 12") + [tok.eos_id] + tok.encode("9999")])
  scores = rewards.score_responses(rewards.get_reward_fn("math"), tok, tokens, examples)
  np.testing.assert_array_equal(scores.rewards, [1.0, 0.0, 1.0, 1.0])  # text after EOS ignored
  np.testing.assert_array_equal(scores.finished, [True, True, False, True])
  assert scores.texts == ["#### 12", "#### 13", "#### 12", "#### 12"]
  assert scores.rewards.dtype == np.float32
  penalised = rewards.score_responses(rewards.get_reward_fn("math"), tok, tokens, examples,
                                      unfinished_reward=-1.0)
  np.testing.assert_array_equal(penalised.rewards, [1.0, 0.0, -1.0, 1.0])
  cut = rewards.score_responses(rewards.get_reward_fn("math"), tok, tokens, examples,
                                lengths=[6, 8, 8, 8])
  assert cut.texts[0] == "#### 1" and not cut.finished[0]
  with pytest.raises(ValueError, match="response_tokens"):
    rewards.score_responses(rewards.get_reward_fn("math"), tok, tokens[:2], examples)


# Model outputs built to crash or stall a verifier: every reward returns 0/1 for each of them.
MB = 1_000_000
HOSTILE = {
    "4301 digits after ####": "#### " + "1" * 4301,
    "4301-digit boxed": "\\boxed{" + "1" * 4301 + "}",
    "long decimal": "#### 0." + "3" * 5000,
    "frac with long parts": "\\boxed{\\frac{" + "1" * 5000 + "}{" + "3" * 5000 + "}}",
    "frac of 900 digits": "#### \\frac{" + "9" * 900 + "}{7}",
    "unclosed boxed x150k": "\\boxed{" * 150_000,
    "64 boxed then 1 MB of braces": "\\boxed{" * 64 + "{" * (MB // 2) + "}" * (MB // 2),
    "1 MB of {": "{" * MB,
    "1 MB of #": "#" * MB,
    "#### lines": "####\n" * (MB // 5),
    "spaces then a number": "#### " + " " * MB + "1",
    "spaces around operators": "#### 1" + " - " * 300,
    "huge exponent": "#### 1e999999999",
    "countdown huge product": "#### " + "*".join(["999999999999"] * 19),
    "countdown deep parens": "#### " + "(" * 100_000 + "1" + ")" * 100_000,
    "NaN": "#### NaN",
    "inf": "\\boxed{inf}",
    "-Infinity": "#### -Infinity",
    "lone surrogates": "#### \ud800" + "\udfff" * MB,
    "long lines": ("x" * 999 + "\n") * 1000,
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_rewards_never_raise_and_stay_fast_on_hostile_outputs(name):
  text = HOSTILE[name]
  examples = [tasks.Example("1+0=", "1", "#### 1", "arithmetic"), _countdown_example()]
  fns = [rewards.get_reward_fn(n) for n in ("math", "countdown", "format", "task")]
  for fn, example in [(f, e) for f in fns for e in examples if f is not fns[1] or e is examples[1]]:
    cpu = []
    for _ in range(3):  # process CPU time, best of 3: the limit is on the work, not the load
      start = time.process_time()
      value = fn(text, example)
      cpu.append(time.process_time() - start)
    assert value in (0.0, 1.0)
    assert min(cpu) < 0.05, f"{name}: {min(cpu) * 1e3:.0f} ms of CPU"  # 1 MB in under 50 ms


def test_absurd_numbers_are_compared_as_text():
  digits = "1" * 4301
  assert math_rewards.parse_number(digits) is None
  assert math_rewards.math_reward("#### " + digits, "1") == 0.0
  assert math_rewards.is_equivalent("1" * 300, "1" * 300)  # as text
  assert not math_rewards.is_equivalent("1" * 300, "1" * 299)
  # An answer longer than MAX_ANSWER_CHARS is not well formed; more than MAX_MARKERS is none.
  assert math_rewards.extract_answer("\\boxed{" + "x" * 1001 + "}") is None
  assert math_rewards.extract_answer("\\boxed{" + "x" * 1000 + "}") == "x" * 1000
  assert math_rewards.extract_answer("#### 1\n" * 64) == "1"
  assert math_rewards.extract_answer("#### 1\n" * 65) is None
  assert math_rewards.extract_answer("#### 2 #### 3") == "2 #### 3"  # one marker per line
