"""Programs scored per second by the code reward's sandbox, for correct and hostile mixes.

Correct programs are the code task's demonstrations (each passes its 5 hidden tests); hostile
ones loop, fork, hog memory, write outside their directory, read secrets, open sockets, flood
stdout, kill, sleep or load native code (each ends with reward 0). One `CodeReward.run` call per
(mix, workers): the time from the call to its last result, the sandbox check excluded.
"""

from __future__ import annotations

import collections
import dataclasses
import time

from experiments import reporting
from m1jax.data import code_tasks, tasks
from m1jax.rl.rewards import code

OK = "  return a[0]\n"  # whatever the problem, a wrong answer: the attack is what matters
HOSTILE = (
    "def f(*a):\n  while True:\n    pass\n",
    "import os\ndef f(*a):\n  while True:\n    os.fork()\n",
    "def f(*a):\n  hog = []\n  while True:\n    hog.append(bytearray(1 << 24))\n",
    "def f(*a):\n  open('/etc/m1jax-bench', 'w').write('x')\n" + OK,
    "def f(*a):\n  print(open('/etc/passwd').read())\n" + OK,
    "import socket\ndef f(*a):\n  socket.create_connection(('127.0.0.1', 22), 1)\n" + OK,
    "import sys\ndef f(*a):\n  for _ in range(1024):\n    sys.stdout.write('x' * (1 << 20))\n",
    "import os\ndef f(*a):\n  os.kill(os.getppid(), 9)\n" + OK,
    "import time\ndef f(*a):\n  time.sleep(10 ** 6)\n",
    "import ctypes\ndef f(*a):\n  ctypes.CDLL(None).kill(1, 9)\n" + OK,
)


@dataclasses.dataclass
class CodeRewardTiming:
  mix: str
  workers: int
  programs: int
  time_limit_s: float
  seconds: float
  programs_per_s: float
  reasons: str  # "reason:count ..." over the batch


def programs(mix: str, count: int, seed: int = 0):
  """(texts, examples) of one mix: "correct", "hostile", or "mixed" (90% correct, 10% hostile)."""
  task = code_tasks.CodeTask()
  examples = [tasks.generate_example(task, seed=seed, index=i) for i in range(count)]
  texts = []
  for i, example in enumerate(examples):
    if mix == "hostile":
      texts.append(HOSTILE[i % len(HOSTILE)])
    elif mix == "mixed" and i % 10 == 9:
      texts.append(HOSTILE[(i // 10) % len(HOSTILE)])
    else:
      texts.append(example.demonstration)
  return texts, examples


def time_mix(mix: str, count: int, workers: int, settings: code.CodeSettings) -> CodeRewardTiming:
  reward = code.CodeReward(dataclasses.replace(settings, workers=workers))
  reward.check()
  texts, examples = programs(mix, count)
  start = time.perf_counter()
  results = reward.run(texts, examples)
  seconds = time.perf_counter() - start
  counts = collections.Counter(r.reason for r in results)
  return CodeRewardTiming(mix, workers, count, settings.time_limit_s, seconds, count / seconds,
                          " ".join(f"{k}:{v}" for k, v in sorted(counts.items())))


def table(results) -> str:
  return reporting.markdown_table(
      ["mix", "workers", "programs", "time limit s", "seconds", "programs/s", "reasons"],
      [[r.mix, r.workers, r.programs, f"{r.time_limit_s:g}", f"{r.seconds:.2f}",
        f"{r.programs_per_s:.1f}", r.reasons] for r in results])
