"""The code reward's sandbox: hostile programs score 0 with the right reason and change nothing
outside their temporary directory; correct programs pass; no sandbox means no run."""

import glob
import logging
import os
import pathlib
import tempfile
import time

import pytest

from m1jax.data import code_tasks, tasks
from m1jax.rl import rewards
from m1jax.rl.rewards import code

ROOT = pathlib.Path(__file__).resolve().parents[2]
SECRET = "s3cret-checkpoint-bytes-7f2a"
# 256 hostile programs (the list below, repeated) on 8 workers with a 0.5 s limit (+ 1.5 s grace
# for starting up): 9-11 s on 2 cores shared with other work (the infinite loops burn their CPU
# second each, the sleepers wait out their limit). The budget allows a loaded CI machine 10x that
# (docs/code_reward.md states the same budget).
HOSTILE_BATCH = 256
HOSTILE_BATCH_BUDGET_S = 120.0
FAST = code.CodeSettings(time_limit_s=0.5, startup_grace_s=1.5, memory_mb=128, workers=8)


def _example(tests=(([1], 2), ([5], 6)), entry_point="f", **meta):
  return tasks.Example("p", "", "", "code", {
      "entry_point": entry_point,
      "tests": tuple({"args": args, "expected": want} for args, want in tests), **meta})


@pytest.fixture(scope="module", autouse=True)
def private_tempdir(tmp_path_factory):
  """The sandbox's host directories go under a directory of this module's own, so the checks
  that none are left behind do not see those of a test file running in another process."""
  saved, tempfile.tempdir = tempfile.tempdir, str(tmp_path_factory.mktemp("system_tmp"))
  yield tempfile.tempdir
  tempfile.tempdir = saved


@pytest.fixture(scope="module")
def reward():
  r = code.CodeReward(FAST)
  r.check()
  return r


@pytest.fixture()
def targets(tmp_path):
  """Real files a hostile program goes after: the repository, a home directory, a workdir's
  checkpoint; with a snapshot of their state."""
  home = tmp_path / "home"
  home.mkdir()
  (home / ".bashrc").write_text("unchanged")
  checkpoint = tmp_path / "workdirs" / "run" / "rl" / "checkpoints" / "10" / "state"
  checkpoint.parent.mkdir(parents=True)
  checkpoint.write_text(SECRET)
  paths = dict(repo_file=ROOT / f"pwned-{os.getpid()}.txt", home=home,
               real_home_file=pathlib.Path(os.path.expanduser("~")) / f"pwned-{os.getpid()}.txt",
               checkpoint=checkpoint)
  yield paths
  for key in ("repo_file", "real_home_file"):
    if paths[key].exists():
      paths[key].unlink()


def _snapshot(targets):
  home = targets["home"]
  return (targets["repo_file"].exists(), targets["real_home_file"].exists(),
          sorted(p.name for p in home.iterdir()), (home / ".bashrc").read_text(),
          targets["checkpoint"].read_text(), sorted(os.listdir(targets["checkpoint"].parent)))


def _hostile(targets) -> dict[str, tuple[str, str]]:
  """name -> (program, the reason it must get). Each would return the right answer (x + 1) if
  its attack were let through, so only the sandbox keeps its reward at 0."""
  pid = os.getpid()
  ok = "  return x + 1\n"
  return {
      "infinite_loop": ("def f(x):\n  while True:\n    pass\n", "timeout"),
      "fork_bomb": ("import os\ndef f(x):\n  while True:\n    os.fork()\n", "violation"),
      # One large allocation: a gradual hog on a loaded machine may reach the time limit first.
      "memory_hog": ("def f(x):\n  hog = bytearray(1 << 34)\n" + ok, "memory"),
      "write_repository": (f"def f(x):\n  open({str(targets['repo_file'])!r}, 'w').write('x')\n"
                           + ok, "violation"),
      "write_home": ("import os\ndef f(x):\n"
                     f"  open({str(targets['home'] / 'pwned')!r}, 'w').write('x')\n"
                     f"  open({str(targets['real_home_file'])!r}, 'w').write('x')\n"
                     "  open(os.path.expanduser('~/pwned'), 'w').write('x')\n" + ok, "violation"),
      "read_passwd": ("def f(x):\n  print(open('/etc/passwd').read())\n" + ok, "violation"),
      "read_checkpoint": (f"def f(x):\n  print(open({str(targets['checkpoint'])!r}).read())\n"
                          + ok, "violation"),
      "socket": ("import socket\ndef f(x):\n  socket.create_connection(('127.0.0.1', 22), 1)\n"
                 + ok, "violation"),
      "print_1gb": ("import sys\ndef f(x):\n  for _ in range(1024):\n"
                    "    sys.stdout.write('x' * (1 << 20))\n" + ok, "output_limit"),
      "kill_parent": (f"import os, signal\ndef f(x):\n  os.kill({pid}, signal.SIGKILL)\n"
                      "  os.kill(os.getppid(), signal.SIGKILL)\n" + ok, "violation"),
      "sleep_forever": ("import time\ndef f(x):\n  time.sleep(10 ** 6)\n", "timeout"),
      "ctypes_escape": ("import ctypes\nlibc = ctypes.CDLL(None)\ndef f(x):\n"
                        f"  libc.kill({pid}, 9)\n  libc.setuid(0)\n" + ok, "violation"),
  }


def _sandbox_dirs():
  return set(glob.glob(os.path.join(tempfile.gettempdir(), "m1jax-code-*")))


def test_each_hostile_program_scores_zero_with_its_reason(reward, targets):
  before, dirs = _snapshot(targets), _sandbox_dirs()
  hostile = _hostile(targets)
  texts = [program for program, _ in hostile.values()]
  results = reward.run(texts, [_example()] * len(texts))
  for (name, (_, reason)), result in zip(hostile.items(), results):
    assert (name, result.reason) == (name, reason), result
    assert result.reward() == 0.0 and result.reward(partial_credit=True) == 0.0, name
    assert [t.passed for t in result.tests] == [False, False], name
    assert SECRET not in result.output_tail + result.detail, name
    assert "root:" not in result.output_tail, name
  assert _snapshot(targets) == before  # nothing outside the temporary directories changed
  assert _sandbox_dirs() == dirs  # and those are gone


def test_hostile_programs_are_contained_without_the_audit_hook(targets):
  """The layers beneath the audit hook (namespaces, read-only binds, uid, rlimits, kill) alone:
  the attacks fail, though the programs may then return the right answer."""
  reward = code.CodeReward(FAST, code.Sandbox(audit=False))
  before = _snapshot(targets)
  hostile = _hostile(targets)
  results = reward.run([p for p, _ in hostile.values()], [_example()] * len(hostile))
  by_name = dict(zip(hostile, results))
  assert _snapshot(targets) == before
  for name, result in by_name.items():
    assert SECRET not in result.output_tail and "root:" not in result.output_tail, name
  for name in ("infinite_loop", "sleep_forever"):
    assert by_name[name].reason == "timeout"
  assert by_name["memory_hog"].reason == "memory"
  assert by_name["print_1gb"].reason == "output_limit"
  for name in ("read_passwd", "read_checkpoint", "write_repository", "write_home", "socket"):
    assert by_name[name].reason == "crash", by_name[name]  # the file or network is not there
  assert os.getpid() > 0  # still alive: the kills could not reach this process


def test_a_batch_of_256_hostile_programs_finishes_within_budget(targets):
  reward = code.CodeReward(FAST)
  reward.check()
  before = _snapshot(targets)
  hostile = list(_hostile(targets).values())
  batch = [hostile[i % len(hostile)] for i in range(HOSTILE_BATCH)]
  start = time.monotonic()
  results = reward.run([p for p, _ in batch], [_example()] * len(batch))
  elapsed = time.monotonic() - start
  assert elapsed < HOSTILE_BATCH_BUDGET_S, f"{elapsed:.1f} s"
  assert [r.reason for r in results] == [reason for _, reason in batch]
  assert all(r.reward() == 0.0 for r in results)
  assert _snapshot(targets) == before


def test_correct_programs_pass_and_mistakes_get_their_reason(reward):
  task = code_tasks.CodeTask()
  examples = [tasks.generate_example(task, seed=3, index=i) for i in range(24)]
  assert len({e.metadata["family"] for e in examples}) >= 6
  scores = reward.batch([e.demonstration for e in examples], examples)
  assert scores == [1.0] * len(examples)
  example = _example()
  cases = {
      "```python\ndef f(x):\n  return x + 1\n```\nDone.": ("ok", [True, True]),
      "def f(x):\n  return 2": ("wrong_answer", [True, False]),
      "def f(x):\n  return 2.0": ("wrong_answer", [True, False]),  # numbers compare as numbers
      "def f(x):\n  return str(x + 1)": ("wrong_answer", [False, False]),  # "2" is not 2
      "def f(x):\n  return x / 0": ("crash", [False, False]),
      "def g(x):\n  return x + 1": ("crash", [False, False]),  # no entry point
      "def f(x) return": ("crash", [False, False]),
      "def f(x):\n  return {x}": ("crash", [False, False]),  # a set is not JSON
      "": ("crash", [False, False]),
      # Fake harness records on every descriptor that might be the result pipe, then quit.
      "import os\nfor fd in range(3, 64):\n  try:\n    os.write(fd, b'{\"setup\": \"ok\"}\\n"
      "{\"test\": 0, \"reason\": \"ok\"}\\n')\n  except OSError:\n    pass\nos._exit(0)\n":
          ("crash", [False, False]),
  }
  results = reward.run(list(cases), [example] * len(cases))
  for (text, (reason, passed)), result in zip(cases.items(), results):
    assert (result.reason, [t.passed for t in result.tests]) == (reason, passed), text
  assert results[1].reward() == 0.0 and results[1].reward(partial_credit=True) == 0.5


def test_the_program_directory_is_small_and_private(reward):
  fill = ("def f(x):\n  for i in range(64):\n    open(f'junk{i}', 'w').write('x' * 1000000)\n"
          "  return x + 1\n")  # 64 MB into a 16 MiB directory
  big = "def f(x):\n  open('big', 'w').write('x' * (2 << 20))\n  return x + 1\n"  # > 1 MiB file
  local = "def f(x):\n  open('note', 'w').write(str(x))\n  return int(open('note').read()) + 1\n"
  dirs = _sandbox_dirs()
  filled, too_big, fine = reward.run([fill, big, local], [_example()] * 3)
  assert filled.reason == "output_limit" and "No space left" in filled.detail
  assert too_big.reason == "output_limit" and "File too large" in too_big.detail
  assert fine.reason == "ok"
  assert _sandbox_dirs() == dirs


def test_what_a_program_prints_is_kept_for_inspection(reward):
  (result,) = reward.run(["print('hello from f')\ndef f(x):\n  return x + 1\n"], [_example()])
  assert result.reason == "ok" and "hello from f" in result.output_tail


def test_a_problem_time_limit_overrides_the_settings(reward):
  slow = "import time\ndef f(x):\n  time.sleep(0.6)\n  return x + 1\n"  # 1.2 s for 2 tests
  fast_limit, slow_limit = _example(time_limit_s=0.2), _example(time_limit_s=3.0)
  short, long_ = reward.run([slow, slow], [fast_limit, slow_limit])
  assert short.reason == "timeout" and short.wall_s < 1.2
  assert long_.reason == "ok"


def test_values_match_compares_json_types_strictly():
  assert code.values_match([1, "a", {"k": 2.0}], [1, "a", {"k": 2.0 + 1e-12}])
  assert not code.values_match(True, 1) and not code.values_match(1, True)
  assert not code.values_match("1", 1) and not code.values_match([1, 2], [1, 2, 3])
  assert code.values_match(0.1 + 0.2, 0.3) and not code.values_match(0.31, 0.3)
  assert code.extract_code("text\n```py\na = 1\n```\n```\nb = 2\n```") == "b = 2\n"


def test_missing_sandbox_fails_closed(tmp_path):
  marker = tmp_path / "ran"
  program = f"def f(x):\n  open({str(marker)!r}, 'w').write('x')\n  return x + 1\n"
  for settings in (code.CodeSettings(bwrap=str(tmp_path / "no-bwrap")),
                   code.CodeSettings(bwrap="/bin/false")):
    with pytest.raises(code.SandboxUnavailable, match="unsafe_no_sandbox|could not run"):
      code.CodeReward(settings).batch([program], [_example()])
  with pytest.raises(code.SandboxUnavailable, match="make sandbox"):
    code.CodeReward(code.CodeSettings(bwrap=str(tmp_path / "no-bwrap"))).check()
  assert not marker.exists()


def test_unsafe_flag_runs_without_bwrap_and_says_so(tmp_path, caplog):
  settings = code.CodeSettings(bwrap=str(tmp_path / "no-bwrap"), unsafe_no_sandbox=True,
                               time_limit_s=1.0)
  with caplog.at_level(logging.WARNING):
    scores = code.CodeReward(settings).batch(["def f(x):\n  return x + 1", "def f(x): return 0"],
                                             [_example()] * 2)
  assert scores == [1.0, 0.0]
  assert "WITHOUT ISOLATION" in caplog.text


def test_code_plugs_into_the_task_and_combined_rewards(reward):
  example = _example()
  combined = rewards.combine({"task": 1.0, "format": 0.5}, {"code": reward})
  texts = ["def f(x):\n  return x + 1", "def f(x):\n  return 0"]
  parts = combined.components_batch(texts, [example] * 2)
  assert parts["task"].tolist() == [1.0, 0.0]
  assert combined.batch(texts, [example] * 2).tolist() == [1.0, 0.0]  # no #### answer: format 0
  assert combined.task.batch(texts, [example] * 2).tolist() == [1.0, 0.0]
  assert rewards.get_reward_fn("code") is not reward  # the registry keeps its default instance
