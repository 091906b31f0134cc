"""Verifiable tasks: synthetic arithmetic, countdown and code generators, and a JSONL reader.

Every example is an `Example` (prompt, gold answer, SFT demonstration, task name, metadata).
Demonstrations end with the final answer written as `#### <answer>` on the last line; the math
and countdown rewards in `m1jax.rl.rewards` read that format (they also accept `\\boxed{}`).

Synthetic examples are a pure function of (task, seed, split, index), so data pipelines can
address them by index. Held-out split: every prompt belongs to exactly one split, decided by a
stable hash of the prompt text (`prompt_split`, blake2b, not Python's salted `hash`); a
generator for split s redraws until its prompt falls in s. Train and eval prompts therefore never
overlap, whatever the seeds, as long as both sides use the same `eval_fraction`.

Prompt formats (compact, for small byte-level contexts):
  arithmetic  "47+85="               -> "7+5=12,4+8+1=13 #### 132"
  countdown   "make 26 from 3 5 7:"  -> "7*3=21,21+5=26 #### 7*3+5"
  code        "f(x): x times 3 plus 2\n" -> "def f(x):\n  return x*3+2"  (m1jax.data.code_tasks:
              hidden unit tests in metadata, scored by running the program in a sandbox)
"""

import dataclasses
import hashlib
import json
import math
import re
from typing import Any, ClassVar, Mapping, Protocol, Sequence

import numpy as np

FINAL_ANSWER_MARKER = "####"
SPLITS = ("train", "eval")
DEFAULT_EVAL_FRACTION = 0.1
_SPLIT_STREAM = {"train": 0, "eval": 1}
_MAX_DRAWS = 10_000


@dataclasses.dataclass(frozen=True)
class Example:
  """One task instance.

  Attributes:
    prompt: the text the model continues.
    answer: the gold final answer (countdown: the target number).
    demonstration: the SFT target that follows the prompt; ends with `#### <final answer>`.
    task: task name; `m1jax.rl.rewards.get_reward_fn("task")` picks the verifier from it.
    metadata: task-specific facts (countdown: "numbers"); treat as read-only.
  """
  prompt: str
  answer: str
  demonstration: str
  task: str
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def format_final_answer(answer: str) -> str:
  return f"{FINAL_ANSWER_MARKER} {answer}"


class Task(Protocol):
  name: ClassVar[str]

  def sample(self, rng: np.random.Generator) -> Example:
    """Draws one example using only `rng`."""


def _digits(n: int) -> list[int]:
  """Decimal digits of n >= 0, least significant first."""
  return [int(c) for c in reversed(str(n))]


def _addition_work(a: int, b: int) -> str:
  """Column addition, least significant digit first: 47+85 -> "7+5=12,4+8+1=13"."""
  da, db = _digits(a), _digits(b)
  steps, carry = [], 0
  for i in range(max(len(da), len(db))):
    x, y = da[i] if i < len(da) else 0, db[i] if i < len(db) else 0
    total = x + y + carry
    steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
    carry = total // 10
  return ",".join(steps)


def _subtraction_work(a: int, b: int) -> str:
  """Column subtraction with borrows for a >= b: 42-17 -> "12-7=5,4-2=2"."""
  da, db = _digits(a), _digits(b)
  steps, borrow = [], 0
  for i, x in enumerate(da):
    y = (db[i] if i < len(db) else 0) + borrow
    borrow = int(x < y)
    x += 10 * borrow
    steps.append(f"{x}-{y}={x - y}")
  return ",".join(steps)


def _multiplication_work(a: int, b: int) -> str:
  """Partial products by digit of b, then running sums: 47*85 -> "47*5=235,47*80=3760,..."."""
  partials = [(d * 10**i, a * d * 10**i) for i, d in enumerate(_digits(b)) if d] or [(0, 0)]
  steps = [f"{a}*{factor}={product}" for factor, product in partials]
  total = partials[0][1]
  for _, product in partials[1:]:
    steps.append(f"{total}+{product}={total + product}")
    total += product
  return ",".join(steps)


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
  """`a op b` with each operand drawn with min_digits..max_digits digits.

  The digit count is uniform over [min_digits, max_digits], then the operand is uniform over
  numbers with that many digits (0..9 for one digit). `ops` is a sequence of operators, e.g.
  ("+", "-") or "+-". With `show_work`, the demonstration shows column addition / column
  subtraction with borrows / partial products before the answer.

  Measured on 2 CPU cores with a 0.86M-parameter 4-layer transformer, SFT batch 64, greedy
  decoding on 256 held-out prompts: the default (1-2 digit addition) reached 62% after 200 steps
  (~3 min) with `show_work` and 0% without; max_digits=3 reached 18% after 130 steps.
  """
  name: ClassVar[str] = "arithmetic"
  min_digits: int = 1
  max_digits: int = 2
  ops: tuple[str, ...] = ("+",)
  show_work: bool = True

  def __post_init__(self):
    object.__setattr__(self, "ops", tuple(self.ops))
    if not 1 <= self.min_digits <= self.max_digits <= 18:
      raise ValueError(
          f"min_digits/max_digits: need 1 <= min_digits <= max_digits <= 18, "
          f"got {self.min_digits}, {self.max_digits}")
    if not self.ops or not set(self.ops) <= {"+", "-", "*"}:
      raise ValueError(f"ops: expected a non-empty subset of '+', '-', '*', got {self.ops!r}")

  def _operand(self, rng: np.random.Generator) -> int:
    digits = int(rng.integers(self.min_digits, self.max_digits + 1))
    low = 0 if digits == 1 else 10**(digits - 1)
    return int(rng.integers(low, 10**digits))

  def sample(self, rng: np.random.Generator) -> Example:
    op = self.ops[int(rng.integers(len(self.ops)))]
    a, b = self._operand(rng), self._operand(rng)
    if op == "+":
      answer, work = a + b, _addition_work(a, b)
    elif op == "-":
      answer = a - b
      work = _subtraction_work(a, b) if a >= b else f"-({b}-{a}):" + _subtraction_work(b, a)
    else:
      answer, work = a * b, _multiplication_work(a, b)
    final = format_final_answer(str(answer))
    return Example(
        prompt=f"{a}{op}{b}=",
        answer=str(answer),
        demonstration=f"{work} {final}" if self.show_work else final,
        task=self.name,
        metadata={"a": a, "b": b, "op": op},
    )


_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def _render(node) -> str:
  """An expression tree (int or (op, left, right)) as text with the fewest parentheses."""
  if isinstance(node, int):
    return str(node)
  op, left, right = node
  left_text, right_text = _render(left), _render(right)
  if not isinstance(left, int) and _PRECEDENCE[left[0]] < _PRECEDENCE[op]:
    left_text = f"({left_text})"
  if not isinstance(right, int) and (
      _PRECEDENCE[right[0]] < _PRECEDENCE[op]
      or (_PRECEDENCE[right[0]] == _PRECEDENCE[op] and op in "-/")):
    right_text = f"({right_text})"
  return f"{left_text}{op}{right_text}"


def _apply(op: str, a: int, b: int) -> int | None:
  """a op b when it is a positive integer, else None (keeps demonstrations in integers)."""
  if op == "+":
    return a + b
  if op == "*":
    return a * b
  if op == "-":
    return a - b if a > b else None
  return a // b if a % b == 0 else None


@dataclasses.dataclass(frozen=True)
class CountdownTask:
  """Reach a target with `+ - * /`, using each given number at most once.

  Solvable by construction: `num_numbers` numbers are drawn uniformly from [1, max_number] and
  combined pairwise in random order with random operators (intermediate results stay positive
  integers) into one expression; its value is the target. Draws whose target exceeds
  `max_target` or equals one of the numbers are redrawn. The demonstration is that expression
  (with its steps when `show_work`); any other correct expression also earns the reward.
  """
  name: ClassVar[str] = "countdown"
  num_numbers: int = 3
  max_number: int = 20
  max_target: int = 100
  ops: tuple[str, ...] = ("+", "-", "*", "/")
  show_work: bool = True

  def __post_init__(self):
    object.__setattr__(self, "ops", tuple(self.ops))
    if not 2 <= self.num_numbers <= 8:
      raise ValueError(f"num_numbers: expected 2..8, got {self.num_numbers}")
    if self.max_number < 2:
      raise ValueError(f"max_number: expected >= 2, got {self.max_number}")
    if self.max_target < 2:
      raise ValueError(f"max_target: expected >= 2, got {self.max_target}")
    if not self.ops or not set(self.ops) <= set(_PRECEDENCE) or not set(self.ops) & {"+", "*"}:
      raise ValueError(
          f"ops: expected a subset of '+', '-', '*', '/' holding '+' or '*', got {self.ops!r}")

  def sample(self, rng: np.random.Generator) -> Example:
    for _ in range(_MAX_DRAWS):
      numbers = [int(n) for n in rng.integers(1, self.max_number + 1, size=self.num_numbers)]
      pool = [(n, n) for n in numbers]  # (value, expression tree)
      steps = []
      while len(pool) > 1:
        i, j = (int(k) for k in rng.choice(len(pool), size=2, replace=False))
        (a, left), (b, right) = pool[i], pool[j]
        feasible = [op for op in self.ops if _apply(op, a, b) is not None]
        op = feasible[int(rng.integers(len(feasible)))]
        value = _apply(op, a, b)
        steps.append(f"{a}{op}{b}={value}")
        pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [(value, (op, left, right))]
      target, tree = pool[0]
      if target <= self.max_target and target not in numbers:
        break
    else:
      raise ValueError(f"CountdownTask: no target <= max_target={self.max_target} found in "
                       f"{_MAX_DRAWS} draws; raise max_target")
    expression = _render(tree)
    final = format_final_answer(expression)
    return Example(
        prompt=f"make {target} from {' '.join(map(str, numbers))}:",
        answer=str(target),
        demonstration=f"{','.join(steps)} {final}" if self.show_work else final,
        task=self.name,
        metadata={"numbers": tuple(numbers), "expression": expression},
    )


TASKS: dict[str, type] = {"arithmetic": ArithmeticTask, "countdown": CountdownTask}


def make_task(name: str, **kwargs) -> Task:
  """A task by name ("arithmetic", "countdown", "code") with its difficulty knobs as keywords."""
  if name not in TASKS:
    raise ValueError(f"name: unknown task {name!r}; expected one of {sorted(TASKS)}")
  return TASKS[name](**kwargs)


def prompt_split(prompt: str, eval_fraction: float = DEFAULT_EVAL_FRACTION) -> str:
  """"eval" for a stable `eval_fraction` share of all prompts (by blake2b hash), else "train"."""
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"eval_fraction: expected a value in (0, 1), got {eval_fraction}")
  digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
  return "eval" if int.from_bytes(digest, "little") < eval_fraction * 2**64 else "train"


def _check_split(split: str):
  if split not in SPLITS:
    raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")


def generate_example(
    task: Task,
    *,
    seed: int,
    index: int,
    split: str = "train",
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
) -> Example:
  """The `index`-th example of `task`'s `split` stream for `seed`; a pure function of its args."""
  _check_split(split)
  rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index])
  for _ in range(_MAX_DRAWS):
    example = task.sample(rng)
    if prompt_split(example.prompt, eval_fraction) == split:
      return example
  raise ValueError(f"split: no {split!r} prompt in {_MAX_DRAWS} draws of {task!r} with "
                   f"eval_fraction={eval_fraction}")


def make_eval_set(
    task: Task,
    *,
    size: int,
    seed: int,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
) -> list[Example]:
  """`size` held-out examples with distinct prompts, none of which can appear in training."""
  examples, seen = [], set()
  for index in range(50 * size + 1000):
    example = generate_example(task, seed=seed, index=index, split="eval",
                               eval_fraction=eval_fraction)
    if example.prompt not in seen:
      seen.add(example.prompt)
      examples.append(example)
      if len(examples) == size:
        return examples
  raise ValueError(f"size: found only {len(examples)} distinct eval prompts for {task!r}; "
                   f"lower size or raise eval_fraction/difficulty")


def split_examples(
    examples: Sequence[Example],
    split: str,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
) -> list[Example]:
  """The examples whose prompt hashes into `split` (see `prompt_split`)."""
  _check_split(split)
  return [e for e in examples if prompt_split(e.prompt, eval_fraction) == split]


def _text_field(row: dict, key: str, where: str, allow_number: bool) -> str:
  if key not in row:
    raise ValueError(f"{where}: missing field {key!r} (fields: {sorted(row)})")
  value = row[key]
  if allow_number and isinstance(value, (int, float)) and not isinstance(value, bool):
    if not math.isfinite(value):
      raise ValueError(f"{where}: field {key!r} must be a finite number, got {value!r}")
    value = str(value)
  if not isinstance(value, str) or not value.strip():
    raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(f"{where}: field {key!r} holds a lone surrogate {value[e.start]!r} at "
                     f"character {e.start} (an unpaired \\u escape): not text") from None
  return value


_NON_FINITE_ANSWERS = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity",
                       "-infinity"}
_INTEGER = re.compile(r"[+-]?\d+")


def _check_answer(answer: str, row: dict, task: str, where: str, answer_key: str) -> None:
  """The gold answer is something a verifier can match: not NaN / inf; for countdown an integer
  target and a "numbers" list of integers."""
  if answer.strip().lower() in _NON_FINITE_ANSWERS:
    raise ValueError(f"{where}: field {answer_key!r} is {answer!r}, not an answer")
  if task == "countdown":
    if not _INTEGER.fullmatch(answer.strip()):
      raise ValueError(f"{where}: field {answer_key!r}: a countdown target must be an integer, "
                       f"got {answer!r}")
    numbers = row.get("numbers")
    if (not isinstance(numbers, list) or not numbers
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers)):
      raise ValueError(f"{where}: field 'numbers': a countdown example needs a non-empty list "
                       f"of integers, got {numbers!r}")


def _reject_constant(name: str):
  raise ValueError(f"{name} is not a JSON number (JSON has no NaN / Infinity)")


def _decode_line(raw: bytes, where: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                     f"{e.start + 1}); save the file as UTF-8") from None


def read_jsonl(
    path: str,
    *,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    demonstration_key: str | None = None,
    task: str = "math",
) -> list[Example]:
  """Reads one example per line from a JSONL file of objects (UTF-8).

  Args:
    path: file with lines like {"prompt": "...", "answer": "42"}; blank lines are skipped.
    prompt_key: field holding the prompt text.
    answer_key: field holding the gold answer (a string or a finite number; not NaN / inf).
    demonstration_key: field holding the SFT target; when None the demonstration is just
      `#### <answer>`.
    task: task name stored on each example; selects the verifier of the "task" reward
      ("math", or "countdown" with a "numbers" list of integers and an integer target as
      answer). "code" reads programming problems instead (`code_tasks.read_jsonl`: fixed fields,
      the keys above unused).

  Returns:
    The examples; fields other than the three above go to `Example.metadata`.

  Raises:
    ValueError: naming file and line and what is wrong: bytes that are not UTF-8 (or a UTF-16
      file), invalid JSON (with the text around the error), non-objects, missing/empty fields,
      lone surrogates, answers that are not answers.
  """
  if task == code_tasks.TASK:
    return code_tasks.read_jsonl(path)
  examples = []
  with open(path, "rb") as f:
    head = f.read(4)
    f.seek(0)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(head) == 4 and head.count(0) >= 1):
      raise ValueError(f"{path}: looks like UTF-16 / UTF-32 (a byte-order mark or NUL bytes at "
                       "the start); save it as UTF-8")
    for line_number, raw in enumerate(f, start=1):
      where = f"{path}:{line_number}"
      line = _decode_line(raw, where)
      if line_number == 1:
        line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark
      if not line.strip():
        continue
      try:
        row = json.loads(line, parse_constant=_reject_constant)
      except json.JSONDecodeError as e:
        excerpt = line[max(e.pos - 20, 0):e.pos + 20].strip()
        hint = ""
        if line.strip() in ("[", "{"):
          hint = "; this looks like one JSON document, not JSON Lines (one object per line)"
        raise ValueError(f"{where}: invalid JSON: {e.msg} at column {e.colno} (near "
                         f"{excerpt!r}){hint}") from None
      except ValueError as e:
        raise ValueError(f"{where}: invalid JSON: {e}") from None
      if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
      prompt = _text_field(row, prompt_key, where, allow_number=False)
      answer = _text_field(row, answer_key, where, allow_number=True)
      _check_answer(answer, row, task, where, answer_key)
      if demonstration_key is None:
        demonstration = format_final_answer(answer)
      else:
        demonstration = _text_field(row, demonstration_key, where, allow_number=False)
      used = {prompt_key, answer_key, demonstration_key}
      metadata = {k: v for k, v in row.items() if k not in used}
      examples.append(Example(prompt, answer, demonstration, task, metadata))
  if not examples:
    raise ValueError(f"path: {path} holds no examples")
  return examples


# The code family (its own module) adds itself to TASKS; it imports Example from here.
from m1jax.data import code_tasks  # noqa: E402
