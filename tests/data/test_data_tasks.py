"""Synthetic tasks, the held-out split and the JSONL reader.

Arithmetic is exact (Python ints, Fractions), so every check is equality; the one statistical
check (share of eval prompts) states its tolerance below.
"""

import dataclasses
import json

import numpy as np
import pytest

from m1jax.data import tasks
from m1jax.rl.rewards import countdown
from m1jax.rl.rewards import math as math_rewards

ARITHMETIC = [
    tasks.ArithmeticTask(),
    tasks.ArithmeticTask(min_digits=2, max_digits=4, ops=("+", "-", "*")),
    tasks.ArithmeticTask(max_digits=3, ops=("-",), show_work=False),
]
COUNTDOWN = [tasks.CountdownTask(), tasks.CountdownTask(num_numbers=4, max_number=25)]


def _examples(task, n=200, seed=0, split="train"):
  return [tasks.generate_example(task, seed=seed, index=i, split=split) for i in range(n)]


@pytest.mark.parametrize("task", ARITHMETIC + COUNTDOWN)
def test_generation_is_a_function_of_seed_and_index(task):
  again = _examples(task, n=50)
  assert _examples(task, n=50) == again
  other_seed = _examples(task, n=50, seed=1)
  assert sum(a.prompt != b.prompt for a, b in zip(again, other_seed)) > 25


@pytest.mark.parametrize("task", ARITHMETIC)
def test_arithmetic_answers_and_worked_steps_are_correct(task):
  for example in _examples(task):
    a, b, op = (example.metadata[k] for k in ("a", "b", "op"))
    assert op in task.ops and example.prompt == f"{a}{op}{b}="
    for operand in (a, b):
      assert task.min_digits <= len(str(operand)) <= task.max_digits
    assert int(example.answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
    assert math_rewards.math_reward(example.demonstration, example.answer) == 1.0
    if not task.show_work:
      assert example.demonstration == f"#### {example.answer}"
      continue
    work, final = example.demonstration.split(" #### ")
    assert final == example.answer
    # Every worked step "lhs=rhs" must hold; the negative-difference prefix "-(b-a):" too.
    for step in work.replace(":", ",").split(","):
      if step.startswith("-("):
        assert step == f"-({b}-{a})"
      elif step:
        lhs, rhs = step.split("=")
        assert countdown.evaluate_expression(lhs)[0] == int(rhs), step


def test_arithmetic_worked_formats():
  assert tasks._addition_work(47, 85) == "7+5=12,4+8+1=13"
  assert tasks._subtraction_work(42, 17) == "12-7=5,4-2=2"
  assert tasks._multiplication_work(47, 85) == "47*5=235,47*80=3760,235+3760=3995"
  assert tasks._multiplication_work(47, 0) == "47*0=0"


def test_arithmetic_easiest_default_prompts_are_short():
  for example in _examples(tasks.ArithmeticTask()):
    assert len(example.prompt) <= 6 and len(example.demonstration) <= 26


@pytest.mark.parametrize("task", COUNTDOWN)
def test_countdown_is_solvable_and_demonstration_verifies(task):
  for example in _examples(task):
    numbers, target = example.metadata["numbers"], int(example.answer)
    assert len(numbers) == task.num_numbers
    assert all(1 <= n <= task.max_number for n in numbers)
    assert 1 <= target <= task.max_target and target not in numbers
    assert example.prompt == f"make {target} from {' '.join(map(str, numbers))}:"
    verdict = countdown.check_countdown(example.metadata["expression"], numbers, target)
    assert verdict.correct, (example, verdict)
    assert countdown.countdown_reward(example.demonstration, example) == 1.0
    for step in example.demonstration.split(" #### ")[0].split(","):
      lhs, rhs = step.split("=")
      assert countdown.evaluate_expression(lhs)[0] == int(rhs), step


def test_task_knobs_are_validated():
  with pytest.raises(ValueError, match="max_digits"):
    tasks.ArithmeticTask(min_digits=3, max_digits=2)
  with pytest.raises(ValueError, match="ops"):
    tasks.ArithmeticTask(ops=("/",))
  with pytest.raises(ValueError, match="ops"):
    tasks.CountdownTask(ops=("-", "/"))
  with pytest.raises(ValueError, match="num_numbers"):
    tasks.CountdownTask(num_numbers=1)
  with pytest.raises(ValueError, match="unknown task"):
    tasks.make_task("sudoku")
  assert tasks.make_task("countdown", num_numbers=4) == tasks.CountdownTask(num_numbers=4)
  assert tasks.ArithmeticTask(ops="+-").ops == ("+", "-")
  assert tasks.CountdownTask(ops=["+", "*"]).ops == ("+", "*")


def test_train_and_eval_prompts_are_disjoint():
  # 1-2 digit addition has only 10^4 distinct prompts, so random streams would collide often.
  task = tasks.ArithmeticTask()
  train = {e.prompt for e in _examples(task, n=3000, seed=0)}
  train |= {e.prompt for e in _examples(task, n=3000, seed=7)}
  eval_set = tasks.make_eval_set(task, size=300, seed=3)
  assert len({e.prompt for e in eval_set}) == 300
  assert not train & {e.prompt for e in eval_set}
  assert all(tasks.prompt_split(e.prompt) == "eval" for e in eval_set)


def test_prompt_split_share_and_stability():
  prompts = [f"{a}+{b}=" for a in range(100) for b in range(100)]
  share = np.mean([tasks.prompt_split(p, 0.1) == "eval" for p in prompts])
  # Binomial(10^4, 0.1) has std 0.003: a 0.02 band is > 6 sigma.
  assert abs(share - 0.1) < 0.02
  assert tasks.prompt_split("12+34=", 0.5) == tasks.prompt_split("12+34=", 0.5)
  with pytest.raises(ValueError, match="eval_fraction"):
    tasks.prompt_split("1+1=", 0.0)


def test_eval_set_that_cannot_be_filled_raises():
  # One-digit addition has 100 prompts, about 10 of them held out.
  with pytest.raises(ValueError, match="distinct eval prompts"):
    tasks.make_eval_set(tasks.ArithmeticTask(max_digits=1), size=30, seed=0)


def _write(tmp_path, lines):
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_read_jsonl(tmp_path):
  rows = [{"prompt": "1+1=", "answer": 2, "source": "x"}, {"prompt": "2+3=", "answer": "5"}]
  path = _write(tmp_path, [json.dumps(rows[0]), "", json.dumps(rows[1])])
  examples = tasks.read_jsonl(path)
  assert [e.prompt for e in examples] == ["1+1=", "2+3="]
  assert [e.answer for e in examples] == ["2", "5"]
  assert examples[0].demonstration == "#### 2" and examples[0].task == "math"
  assert examples[0].metadata == {"source": "x"}
  custom = _write(tmp_path, [json.dumps({"q": "make 6 from 2 3:", "t": 6, "sol": "2*3",
                                         "numbers": [2, 3]})])
  (example,) = tasks.read_jsonl(custom, prompt_key="q", answer_key="t", demonstration_key="sol",
                                task="countdown")
  assert dataclasses.astuple(example) == ("make 6 from 2 3:", "6", "2*3", "countdown",
                                          {"numbers": [2, 3]})


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "invalid JSON"),
    ('["prompt", "answer"]', "expected a JSON object"),
    ('{"answer": "1"}', "missing field 'prompt'"),
    ('{"prompt": "", "answer": "1"}', "non-empty string"),
    ('{"prompt": "1+1=", "answer": null}', "field 'answer'"),
    ('{"prompt": 3, "answer": "1"}', "field 'prompt'"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
  path = _write(tmp_path, ['{"prompt": "1+1=", "answer": "2"}', "", bad_line])
  with pytest.raises(ValueError, match=message) as info:
    tasks.read_jsonl(path)
  assert f"{path}:3:" in str(info.value)


def test_read_jsonl_empty_file(tmp_path):
  with pytest.raises(ValueError, match="no examples"):
    tasks.read_jsonl(_write(tmp_path, [""]))


def test_split_examples_partitions_by_prompt():
  examples = [tasks.Example(f"{i}*2=", str(2 * i), f"#### {2 * i}", "math") for i in range(500)]
  train = tasks.split_examples(examples, "train")
  held_out = tasks.split_examples(examples, "eval")
  assert len(train) + len(held_out) == 500 and held_out
  assert not {e.prompt for e in train} & {e.prompt for e in held_out}


GOOD_LINE = b'{"prompt": "1+1=", "answer": "2"}\n'


@pytest.mark.parametrize("third_line, message", [
    (b'{"prompt": "caf\xe9", "answer": "1"}', "not UTF-8 text (byte 0xe9 at column 16)"),
    (b'{"prompt": "\\ud800", "answer": "1"}', "lone surrogate"),
    (b'{"prompt": "1+1=", "answer": NaN}', "NaN is not a JSON number"),
    (b'{"prompt": "1+1=", "answer": 1e999}', "finite number"),
    (b'{"prompt": "1+1=", "answer": "nan"}', "not an answer"),
    (b'{"prompt": "1+1=", "answer": "-Infinity"}', "not an answer"),
    (b'{"prompt": "1+1=", "answer": 2}}', "Extra data at column 32 (near"),
    (b"{", "one JSON document, not JSON Lines"),
])
def test_read_jsonl_names_line_and_problem_of_bad_bytes_and_answers(tmp_path, third_line,
                                                                     message):
  path = tmp_path / "data.jsonl"
  path.write_bytes(GOOD_LINE + b"\n" + third_line + b"\n")
  with pytest.raises(ValueError) as info:
    tasks.read_jsonl(str(path))
  assert str(info.value).startswith(f"{path}:3: ") and message in str(info.value), info.value


def test_read_jsonl_rejects_utf16_and_reads_a_utf8_bom(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_bytes(GOOD_LINE.decode().encode("utf-16"))
  with pytest.raises(ValueError, match=f"{path}: looks like UTF-16"):
    tasks.read_jsonl(str(path))
  path.write_bytes(b"\xef\xbb\xbf" + GOOD_LINE)  # a byte-order mark is no JSON error at column 1
  assert [e.prompt for e in tasks.read_jsonl(str(path))] == ["1+1="]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "make 6:", "answer": "six", "numbers": [2, 3]}, "must be an integer"),
    ({"prompt": "make 6:", "answer": 6}, "field 'numbers'"),
    ({"prompt": "make 6:", "answer": 6, "numbers": ["2", 3]}, "field 'numbers'"),
])
def test_read_jsonl_checks_countdown_examples(tmp_path, row, message):
  path = _write(tmp_path, [json.dumps(row)])
  with pytest.raises(ValueError, match=f"{path}:1: .*{message}"):
    tasks.read_jsonl(path, task="countdown")
