"""Code reward: runs the response's program against the example's hidden tests in a sandbox.

An example of task "code" carries in `metadata`:
  entry_point   the function to call, e.g. "f"
  tests         a sequence of {"args": [...], "expected": value}; args and values are JSON
  time_limit_s  optional: this problem's limit for all its tests (else the settings')
The program is the response's last fenced block (```python ... ``` or ``` ... ```), or the whole
response when it has none. It runs in `sandbox.Sandbox` (bubblewrap); only the test ARGUMENTS
enter the sandbox, and each returned value is compared outside it with the expected one (JSON
types must agree: True is not 1; floats within 1e-9 relative), so a program cannot fake a pass.

  reward = CodeReward(CodeSettings(time_limit_s=1.0, workers=2))
  reward.run(texts, examples)      # [ProgramResult]: reason, per-test TestResult(passed, reason)
  reward.batch(texts, examples)    # [float], scored concurrently on `workers` sandboxes
  reward(text, example)            # one float: 1.0 when every test passes (or partial credit)

Reasons: "ok", "wrong_answer", "timeout", "memory", "crash", "output_limit", "violation".
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import queue
import re
import threading
from typing import Any, Sequence

from m1jax.rl.rewards.code import sandbox as sandbox_lib
from m1jax.rl.rewards.code.sandbox import Limits, Sandbox, SandboxUnavailable

__all__ = ["CodeReward", "CodeSettings", "ProgramResult", "REASONS", "Sandbox",
           "SandboxUnavailable", "TestResult", "extract_code", "judge", "values_match"]

REASONS = ("ok", "wrong_answer", "timeout", "memory", "crash", "output_limit", "violation")
MAX_PROGRAM_CHARS = 64 * 1024
FLOAT_RTOL = 1e-9
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class CodeSettings:
  """The code reward's knobs (config.code in m1jax/train/schema.py)."""
  time_limit_s: float = 2.0
  memory_mb: int = 256
  max_processes: int = 8
  max_output_bytes: int = 1 << 20
  max_file_bytes: int = 1 << 20
  max_dir_bytes: int = 16 << 20
  startup_grace_s: float = 2.0
  workers: int = 2
  bwrap: str = "bwrap"
  python_prefix: str = ""
  partial_credit: bool = False
  unsafe_no_sandbox: bool = False

  def __post_init__(self):
    self.limits()  # checks the limits
    if self.workers < 1:
      raise ValueError(f"workers: must be >= 1, got {self.workers}")

  def limits(self, time_limit_s: float | None = None) -> Limits:
    return Limits(time_limit_s=self.time_limit_s if time_limit_s is None else time_limit_s,
                  memory_mb=self.memory_mb, max_processes=self.max_processes,
                  max_output_bytes=self.max_output_bytes, max_file_bytes=self.max_file_bytes,
                  max_dir_bytes=self.max_dir_bytes, startup_grace_s=self.startup_grace_s)

  @classmethod
  def from_config(cls, cfg) -> "CodeSettings":
    """From config.code (a ConfigDict or mapping with these field names)."""
    return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg})


@dataclasses.dataclass(frozen=True)
class TestResult:
  passed: bool
  reason: str  # one of REASONS
  detail: str = ""


@dataclasses.dataclass(frozen=True)
class ProgramResult:
  """One program's verdict: `reason` is "ok" only when every test passed."""
  reason: str
  tests: tuple[TestResult, ...]
  detail: str = ""
  wall_s: float = 0.0
  output_tail: str = ""

  @property
  def passed(self) -> bool:
    return self.reason == "ok" and bool(self.tests) and all(t.passed for t in self.tests)

  def reward(self, partial_credit: bool = False) -> float:
    if self.reason == "violation" or not self.tests:
      return 0.0
    if partial_credit:
      return sum(t.passed for t in self.tests) / len(self.tests)
    return float(self.passed)


def extract_code(text: str) -> str:
  """The last fenced code block of `text`, or all of `text` when it has none."""
  blocks = _FENCE.findall(text)
  return blocks[-1] if blocks else text


def values_match(value: Any, expected: Any) -> bool:
  """Equality of JSON values with matching types (bool is not a number; int and float are both
  numbers, compared within FLOAT_RTOL when either is a float)."""
  if isinstance(expected, bool) or isinstance(value, bool):
    return isinstance(expected, bool) and isinstance(value, bool) and value == expected
  if isinstance(expected, (int, float)) and isinstance(value, (int, float)):
    if isinstance(expected, int) and isinstance(value, int):
      return value == expected
    return math.isclose(value, expected, rel_tol=FLOAT_RTOL, abs_tol=FLOAT_RTOL)
  if isinstance(expected, list) and isinstance(value, list):
    return len(value) == len(expected) and all(map(values_match, value, expected))
  if isinstance(expected, dict) and isinstance(value, dict):
    return value.keys() == expected.keys() and all(values_match(value[k], expected[k])
                                                   for k in expected)
  return type(value) is type(expected) and value == expected


def _signal_reason(returncode: int) -> str | None:
  """The reason of a process ended by a signal (bwrap exits with 128 + signal; Popen gives
  -signal): CPU limit -> timeout, file-size limit -> output_limit, others -> crash."""
  sig = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else None
  if sig is None:
    return None
  return {24: "timeout", 25: "output_limit"}.get(sig, "crash")  # SIGXCPU, SIGXFSZ


# Reasons the harness may report for a failure (anything else on the result pipe is "crash": the
# program can write there too, but only the parent's comparison can make a test pass).
_FAILURE_REASONS = ("memory", "crash", "output_limit")


def _failure(reason) -> str:
  return reason if reason in _FAILURE_REASONS else "crash"


def judge(execution: sandbox_lib.Execution, expected: Sequence[Any]) -> ProgramResult:
  """Compares an execution's returned values with the expected ones -> ProgramResult."""
  records = execution.records
  violations = [str(r["violation"]) for r in records if "violation" in r]
  setup = next((r for r in records if "setup" in r), None)
  by_test = {r["test"]: r for r in records if isinstance(r.get("test"), int)}
  ended = execution.killed or _signal_reason(execution.returncode)
  if violations:
    reason, detail = "violation", "; ".join(violations[:3])
  elif ended:
    reason, detail = ended, (f"killed by the parent ({ended})" if execution.killed
                             else f"exit status {execution.returncode}")
  elif setup is not None:
    reason, detail = _failure(setup.get("setup")), str(setup.get("detail", ""))
  else:
    reason, detail = None, ""
  missing = reason or "crash"
  tests = []
  for i, want in enumerate(expected):
    record = by_test.get(i)
    if reason == "violation":
      tests.append(TestResult(False, "violation", detail))
    elif record is None:
      tests.append(TestResult(False, missing, detail or "the program ended before this test"))
    elif "value" in record:
      ok = values_match(record["value"], want)
      tests.append(TestResult(ok, "ok" if ok else "wrong_answer",
                              "" if ok else f"returned {record['value']!r:.100}"))
    else:
      tests.append(TestResult(False, _failure(record.get("reason")),
                              str(record.get("detail", ""))))
  if reason is None:
    failed = next((t for t in tests if not t.passed), None)
    reason, detail = ("ok", "") if failed is None else (failed.reason, failed.detail)
  return ProgramResult(reason, tuple(tests), detail, execution.wall_s, execution.output_tail)


class CodeReward:
  """The "code" reward: `fn(text, example) -> float`, plus `batch` and `run` for many at once.

  Programs of a batch run concurrently, at most `settings.workers` at a time, each worker with
  its own slot (uid). The sandbox is checked on first use; it raises SandboxUnavailable rather
  than run anything unsandboxed (unless settings.unsafe_no_sandbox).
  """

  def __init__(self, settings: CodeSettings = CodeSettings(), sandbox: Sandbox | None = None):
    self.settings = settings
    self.sandbox = sandbox or Sandbox(bwrap=settings.bwrap, python_prefix=settings.python_prefix,
                                      unsafe_no_sandbox=settings.unsafe_no_sandbox)
    self._slots: queue.Queue[int] = queue.Queue()
    for slot in range(settings.workers):
      self._slots.put(slot)
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._pool_lock = threading.Lock()

  def check(self) -> None:
    """Raises SandboxUnavailable when the sandbox cannot start."""
    self.sandbox.check()

  def _run_one(self, text: str, example) -> ProgramResult:
    meta = example.metadata
    expected = [t["expected"] for t in meta["tests"]]
    program = extract_code(text)
    if not program.strip():
      return ProgramResult("crash", tuple(TestResult(False, "crash", "no code")
                                          for _ in expected), "the response holds no code")
    if len(program) > MAX_PROGRAM_CHARS:
      return ProgramResult("crash", tuple(TestResult(False, "crash", "program too long")
                                          for _ in expected),
                           f"program of {len(program)} characters > {MAX_PROGRAM_CHARS}")
    limits = self.settings.limits(meta.get("time_limit_s"))
    slot = self._slots.get()
    try:
      execution = self.sandbox.run(program, meta["entry_point"],
                                   [list(t["args"]) for t in meta["tests"]], limits, slot)
    finally:
      self._slots.put(slot)
    return judge(execution, expected)

  def run(self, texts: Sequence[str], examples: Sequence[Any]) -> list[ProgramResult]:
    """Each response's ProgramResult, in order; at most settings.workers sandboxes at a time."""
    if len(texts) != len(examples):
      raise ValueError(f"texts: {len(texts)} responses for {len(examples)} examples")
    self.check()
    if len(texts) <= 1:
      return [self._run_one(t, e) for t, e in zip(texts, examples)]
    with self._pool_lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self.settings.workers,
                                                           thread_name_prefix="code-reward")
    return list(self._pool.map(self._run_one, texts, examples))

  def batch(self, texts: Sequence[str], examples: Sequence[Any]) -> list[float]:
    return [r.reward(self.settings.partial_credit) for r in self.run(texts, examples)]

  def __call__(self, text: str, example) -> float:
    return self.batch([text], [example])[0]
