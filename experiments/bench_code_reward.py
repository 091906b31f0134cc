r"""Programs scored per second by the sandboxed code reward, correct and hostile mixes.

  python -m experiments.bench_code_reward --out_dir=results/code_reward

For each mix (correct demonstrations, hostile programs, 90/10 mixed) and each --workers value,
one batch of --programs goes through `CodeReward.run` with the given limits. Writes
code_reward.csv and code_reward.md (docs/benchmarks.md records a run on 2 CPU cores).
"""

import os
import shutil
import subprocess

from absl import app, flags

from experiments import reporting
from experiments.benchmarks import code_reward
from m1jax.rl.rewards import code

_PROGRAMS = flags.DEFINE_integer("programs", 256, "Programs per batch.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2", "4", "8"], "Concurrent sandboxes.")
_MIXES = flags.DEFINE_list("mixes", ["correct", "mixed", "hostile"], "Program mixes.")
_TIME_LIMIT = flags.DEFINE_float("time_limit_s", 1.0, "config.code.time_limit_s.")
_GRACE = flags.DEFINE_float("startup_grace_s", 0.5, "config.code.startup_grace_s.")
_OUT_DIR = flags.DEFINE_string("out_dir", "results/code_reward", "CSV and table folder.")


def main(argv):
  del argv
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  log = reporting.tee(os.path.join(_OUT_DIR.value, "code_reward.log"))
  bwrap = subprocess.run([shutil.which("bwrap") or "bwrap", "--version"], capture_output=True,
                         text=True, check=False).stdout.strip()
  log(f"{reporting.versions()}; {bwrap}; {os.cpu_count()} CPUs")
  settings = code.CodeSettings(time_limit_s=_TIME_LIMIT.value, startup_grace_s=_GRACE.value)
  results = []
  for mix in _MIXES.value:
    for workers in (int(w) for w in _WORKERS.value):
      results.append(code_reward.time_mix(mix, _PROGRAMS.value, workers, settings))
      log(code_reward.table(results[-1:]))
  reporting.write_results(_OUT_DIR.value, "code_reward", results, code_reward.table(results), log)


if __name__ == "__main__":
  app.run(main)
