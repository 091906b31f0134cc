"""The code task family (seeded problems with hidden tests) and the JSONL format of user problems."""

import json

import pytest

from m1jax.data import code_tasks, pipeline, tasks
from m1jax.data.tokenizer import load_tokenizer


def test_examples_are_a_pure_function_of_the_seed_and_index():
  task = tasks.make_task("code", num_tests=4)
  a = tasks.generate_example(task, seed=1, index=5)
  assert a == tasks.generate_example(task, seed=1, index=5)
  assert a.task == "code" and a.metadata["entry_point"] == "f" and len(a.metadata["tests"]) == 4
  others = [tasks.generate_example(task, seed=2, index=i) for i in range(20)]
  assert any(o.metadata["tests"] != a.metadata["tests"] for o in others)


@pytest.mark.parametrize("family", sorted(code_tasks.FAMILIES))
def test_each_solution_agrees_with_its_reference_on_the_hidden_tests(family):
  """The demonstration (text) and the reference (the function the tests come from) are written
  separately; running one on the other's inputs checks both."""
  task = code_tasks.CodeTask(families=(family,), num_tests=20)
  for index in range(10):
    example = tasks.generate_example(task, seed=0, index=index)
    namespace = {}
    exec(example.demonstration, namespace)  # noqa: S102 -- our own generated solution
    for test in example.metadata["tests"]:
      assert namespace["f"](*test["args"]) == test["expected"], (example.prompt, test)
    json.dumps(example.metadata["tests"])  # the tests are JSON
    assert example.prompt.startswith("f(") and example.prompt.endswith("\n")


def test_bad_knobs_are_rejected():
  with pytest.raises(ValueError, match="families"):
    code_tasks.CodeTask(families=("sort_everything",))
  with pytest.raises(ValueError, match="num_tests"):
    code_tasks.CodeTask(num_tests=0)
  with pytest.raises(ValueError, match="time_limit_s"):
    code_tasks.CodeTask(time_limit_s=0.0)


def test_held_out_split_and_prompts_fit_the_demo_lengths():
  task = code_tasks.CodeTask()
  eval_set = tasks.make_eval_set(task, size=8, seed=0)
  train = [tasks.generate_example(task, seed=0, index=i) for i in range(200)]
  assert not {e.prompt for e in eval_set} & {e.prompt for e in train}
  tok = load_tokenizer("byte")
  longest = max(len(pipeline.encode_sft(tok, e)[0]) for e in train + eval_set)
  prompt = max(len(pipeline.encode_prompt(tok, e.prompt)) for e in train + eval_set)
  assert prompt <= 40  # rl.max_prompt_len
  assert longest <= 96  # configs/rl/code_demo.py: sft.max_len


def _write(tmp_path, rows):
  path = tmp_path / "problems.jsonl"
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
  return str(path)


GOOD = {"prompt": "add a and b", "entry_point": "add",
        "tests": [{"args": [1, 2], "expected": 3}, {"args": [0, 0], "expected": 0}],
        "time_limit_s": 1, "solution": "def add(a, b):\n  return a + b", "source": "mine"}


def test_user_problems_are_read_with_their_fields(tmp_path):
  path = _write(tmp_path, [GOOD, "", {k: v for k, v in GOOD.items()
                                       if k not in ("time_limit_s", "solution")}])
  first, second = tasks.read_jsonl(path, task="code")
  assert first.task == "code" and first.prompt == "add a and b"
  assert first.demonstration == GOOD["solution"]
  assert first.metadata["entry_point"] == "add" and first.metadata["time_limit_s"] == 1.0
  assert first.metadata["tests"] == tuple(GOOD["tests"]) and first.metadata["source"] == "mine"
  assert "time_limit_s" not in second.metadata and second.demonstration == ""
  assert len(list(pipeline.jsonl_source(path, task="code"))) == 2


@pytest.mark.parametrize("row, message", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({k: v for k, v in GOOD.items() if k != "tests"}, "missing field 'tests'"),
    ({**GOOD, "prompt": " "}, "field 'prompt' must be a non-empty string"),
    ({**GOOD, "entry_point": "add me"}, "field 'entry_point' must be a Python identifier"),
    ({**GOOD, "tests": []}, "field 'tests' must be a non-empty list"),
    ({**GOOD, "tests": [{"args": [1]}]}, r"tests\[0\] must be an object with exactly"),
    ({**GOOD, "tests": [{"args": 1, "expected": 1}]}, r"tests\[0\].args must be a list"),
    ({**GOOD, "time_limit_s": -1}, "field 'time_limit_s' must be a positive number"),
    ({**GOOD, "time_limit_s": True}, "field 'time_limit_s' must be a positive number"),
    ({**GOOD, "solution": 3}, "field 'solution' must be a string"),
])
def test_malformed_rows_name_file_and_line(tmp_path, row, message):
  path = _write(tmp_path, [GOOD, "", row])
  with pytest.raises(ValueError, match=f"problems.jsonl:3: {message}"):
    code_tasks.read_jsonl(path)


def test_an_empty_file_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="holds no problems"):
    code_tasks.read_jsonl(_write(tmp_path, [""]))
