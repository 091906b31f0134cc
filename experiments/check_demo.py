r"""Compares a finished demo run with the numbers the docs quote (configs/demo.py EXPECTED).

  python -m experiments.check_demo --workdir=workdirs/demo

`make demo` runs it after training. It prints the expected range and this run's held-out
accuracy after each stage; a run outside the measured range is reported, not failed: the demo's
result moves with float summation order (XLA version, thread count, CPU type; docs/training.md).
"""

import json
import os

from absl import app, flags

from configs import demo

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "The demo run's --workdir.")


def compare(summary: dict, seed: int) -> list[str]:
  """Lines comparing a run's summary.json (driver.run_from_config) with demo.EXPECTED."""
  lines = [f"expected (configs/demo.py): {demo.expected_line()}"]
  for stage in ("sft", "rl"):
    measured = demo.EXPECTED[f"{stage}_accuracy"]
    got = summary[stage]["eval/accuracy@end"]
    low, high = min(measured), max(measured)
    verdict = "within" if low <= got <= high else "OUTSIDE"
    same_seed = (f"; seed {seed} measured {measured[demo.EXPECTED['seeds'].index(seed)]:.3f}"
                 if seed in demo.EXPECTED["seeds"] else "")
    lines.append(f"this run, seed {seed}: {stage} held-out accuracy {got:.3f}, {verdict} the "
                 f"measured range {low:.2f}-{high:.2f}{same_seed}")
  return lines


def main(argv):
  del argv
  with open(os.path.join(_WORKDIR.value, "summary.json")) as f:
    summary = json.load(f)
  with open(os.path.join(_WORKDIR.value, "config.json")) as f:
    seed = json.load(f)["seed"]
  print("\n".join(compare(summary, seed)))


if __name__ == "__main__":
  app.run(main)
