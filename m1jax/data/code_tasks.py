"""Programming tasks with hidden unit tests: a seeded generator, and a JSONL reader for user problems.

Each example asks for a function `f`; its hidden tests are inputs drawn from the seed with the
outputs of a reference implementation the generator knows (a Python function here, written
independently of the solution text it demonstrates). The "code" reward
(`m1jax.rl.rewards.code`) runs the response in a sandbox and compares its return values.

  prompt          "f(x): x times 3 plus 2\\n"
  demonstration   "def f(x):\\n  return x*3+2"
  metadata        {"entry_point": "f", "tests": ({"args": [4], "expected": 14}, ...), "family"}

User problems, one JSON object a line (blank lines skipped):
  {"prompt": "...", "entry_point": "solve", "tests": [{"args": [1, 2], "expected": 3}, ...],
   "time_limit_s": 1.0, "solution": "def solve(a, b): ..."}
"time_limit_s" (all the problem's tests together) and "solution" (the SFT demonstration) are
optional; args is a list of JSON values, expected any JSON value; other fields go to metadata.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, ClassVar

import numpy as np

from m1jax.data import tasks

TASK = "code"
ENTRY_POINT = "f"


@dataclasses.dataclass(frozen=True)
class Family:
  """One kind of problem: `arg` names the input, whose values `draw_input(rng)` gives;
  `params(rng)` draws the constants the description, solution and reference share."""
  arg: str
  describe: Callable[[dict], str]
  solution: Callable[[dict], str]  # the returned expression
  reference: Callable[[dict, Any], Any]
  params: Callable[[np.random.Generator], dict]
  draw_input: Callable[[np.random.Generator], Any]


def _int(rng, low=-20, high=20):
  return int(rng.integers(low, high + 1))


def _ints(rng, min_len=0):
  return [int(v) for v in rng.integers(-9, 10, size=int(rng.integers(min_len, 6)))]


def _text(rng):
  return "".join(rng.choice(list("abc"), size=int(rng.integers(0, 7))))


_NO_PARAMS = lambda rng: {}  # noqa: E731

FAMILIES: dict[str, Family] = {
    "affine": Family("x", lambda p: f"x times {p['a']} plus {p['b']}",
                     lambda p: f"x*{p['a']}+{p['b']}", lambda p, x: x * p["a"] + p["b"],
                     lambda rng: {"a": _int(rng, 2, 9), "b": _int(rng, 1, 9)}, _int),
    "mod": Family("x", lambda p: f"x mod {p['m']}", lambda p: f"x%{p['m']}",
                  lambda p, x: x - p["m"] * (x // p["m"]), lambda rng: {"m": _int(rng, 2, 9)},
                  _int),
    "at_least": Family("x", lambda p: f"x but at least {p['a']}", lambda p: f"max(x,{p['a']})",
                       lambda p, x: x if x > p["a"] else p["a"],
                       lambda rng: {"a": _int(rng, -5, 5)}, _int),
    "sum": Family("xs", lambda p: "sum of xs", lambda p: "sum(xs)",
                  lambda p, xs: int(np.sum(xs, dtype=np.int64)), _NO_PARAMS, _ints),
    "largest": Family("xs", lambda p: "largest of xs", lambda p: "max(xs)",
                      lambda p, xs: sorted(xs)[-1], _NO_PARAMS, lambda rng: _ints(rng, 1)),
    "count_above": Family("xs", lambda p: f"how many xs are above {p['a']}",
                          lambda p: f"len([v for v in xs if v>{p['a']}])",
                          lambda p, xs: int(np.count_nonzero(np.asarray(xs) > p["a"])),
                          lambda rng: {"a": _int(rng, -3, 3)}, _ints),
    "scale": Family("xs", lambda p: f"each of xs times {p['a']}",
                    lambda p: f"[v*{p['a']} for v in xs]",
                    lambda p, xs: [v * p["a"] for v in xs],
                    lambda rng: {"a": _int(rng, 2, 9)}, _ints),
    "reverse": Family("s", lambda p: "s backwards", lambda p: "s[::-1]",
                      lambda p, s: "".join(reversed(s)), _NO_PARAMS, _text),
    "repeat": Family("s", lambda p: f"s {p['a']} times", lambda p: f"s*{p['a']}",
                     lambda p, s: "".join([s] * p["a"]), lambda rng: {"a": _int(rng, 2, 4)},
                     _text),
    "count_char": Family("s", lambda p: f"how many {p['c']} in s",
                         lambda p: f"s.count('{p['c']}')",
                         lambda p, s: sum(ch == p["c"] for ch in s),
                         lambda rng: {"c": str(rng.choice(list("abc")))}, _text),
}


def solution_code(family: str, params: dict) -> str:
  f = FAMILIES[family]
  return f"def {ENTRY_POINT}({f.arg}):\n  return {f.solution(params)}"


@dataclasses.dataclass(frozen=True)
class CodeTask:
  """Write a one-line function from a short description; `num_tests` hidden tests.

  `families` picks the problem kinds (keys of FAMILIES; default all). Inputs: integers in
  [-20, 20], lists of up to 5 integers in [-9, 9], strings of up to 6 letters from "abc".
  """
  name: ClassVar[str] = TASK
  families: tuple[str, ...] = tuple(FAMILIES)
  num_tests: int = 5
  time_limit_s: float | None = None  # per-problem override of the reward's limit

  def __post_init__(self):
    object.__setattr__(self, "families", tuple(self.families))
    unknown = sorted(set(self.families) - set(FAMILIES))
    if not self.families or unknown:
      raise ValueError(f"families: expected a non-empty subset of {sorted(FAMILIES)}, "
                       f"got unknown {unknown}" if unknown else "families: empty")
    if not 1 <= self.num_tests <= 100:
      raise ValueError(f"num_tests: expected 1..100, got {self.num_tests}")
    if self.time_limit_s is not None and self.time_limit_s <= 0:
      raise ValueError(f"time_limit_s: must be positive, got {self.time_limit_s}")

  def sample(self, rng: np.random.Generator) -> tasks.Example:
    name = self.families[int(rng.integers(len(self.families)))]
    family = FAMILIES[name]
    params = family.params(rng)
    tests = []
    for _ in range(self.num_tests):
      value = family.draw_input(rng)
      tests.append({"args": [value], "expected": family.reference(params, value)})
    code = solution_code(name, params)
    metadata = {"entry_point": ENTRY_POINT, "tests": tuple(tests), "family": name}
    if self.time_limit_s is not None:
      metadata["time_limit_s"] = self.time_limit_s
    return tasks.Example(prompt=f"{ENTRY_POINT}({family.arg}): {family.describe(params)}\n",
                         answer=code, demonstration=code, task=TASK, metadata=metadata)


def _row_error(where: str, message: str) -> ValueError:
  return ValueError(f"{where}: {message}")


def parse_row(row: Any, where: str) -> tasks.Example:
  """One user problem (see the module docstring); errors name `where` (file:line) and field."""
  if not isinstance(row, dict):
    raise _row_error(where, f"expected a JSON object, got {type(row).__name__}")
  for key in ("prompt", "entry_point", "tests"):
    if key not in row:
      raise _row_error(where, f"missing field {key!r} (fields: {sorted(row)})")
  prompt, entry_point, tests = row["prompt"], row["entry_point"], row["tests"]
  if not isinstance(prompt, str) or not prompt.strip():
    raise _row_error(where, f"field 'prompt' must be a non-empty string, got {prompt!r}")
  if not isinstance(entry_point, str) or not entry_point.isidentifier():
    raise _row_error(where, f"field 'entry_point' must be a Python identifier, got "
                     f"{entry_point!r}")
  if not isinstance(tests, list) or not tests:
    raise _row_error(where, f"field 'tests' must be a non-empty list, got {tests!r:.80}")
  for i, test in enumerate(tests):
    if not isinstance(test, dict) or set(test) != {"args", "expected"}:
      raise _row_error(where, f"tests[{i}] must be an object with exactly 'args' and "
                       f"'expected', got {test!r:.80}")
    if not isinstance(test["args"], list):
      raise _row_error(where, f"tests[{i}].args must be a list of arguments, got "
                       f"{test['args']!r:.80}")
  metadata = {k: v for k, v in row.items() if k not in ("prompt", "tests", "solution")}
  metadata["tests"] = tuple(tests)
  if "time_limit_s" in row:
    limit = row["time_limit_s"]
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
      raise _row_error(where, f"field 'time_limit_s' must be a positive number, got {limit!r}")
    metadata["time_limit_s"] = float(limit)
  solution = row.get("solution", "")
  if not isinstance(solution, str):
    raise _row_error(where, f"field 'solution' must be a string, got {solution!r:.80}")
  return tasks.Example(prompt, solution, solution, TASK, metadata)


def read_jsonl(path: str) -> list[tasks.Example]:
  """User problems, one a line (see the module docstring); ValueError names file:line."""
  examples = []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{line_number}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise _row_error(where, f"invalid JSON ({e.msg} at column {e.colno})") from e
      examples.append(parse_row(row, where))
  if not examples:
    raise ValueError(f"path: {path} holds no problems")
  return examples


tasks.TASKS[TASK] = CodeTask
