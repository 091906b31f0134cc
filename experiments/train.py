r"""Trains from a config: SFT, RL, or SFT then RL.

  python -m experiments.train --config=configs/demo.py --workdir=workdirs/demo
  python -m experiments.train --config=configs/rl/grpo_arithmetic.py --config.rl.steps=50 \
      --workdir=workdirs/grpo

Rerunning with the same --workdir resumes. Several processes (hosts, or local processes on CPU):
add --num_processes=N --process_id=i --coordinator_address=host:port to each.

Exit codes: 0 done; 1 an error (one line; --verbosity=0 adds the traceback); 2 a bad flag or
config; 128 + the signal number after Ctrl-C (130) or SIGTERM (143), with one line saying where
a rerun resumes.
"""

import signal
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from m1jax.train import schema

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def _unknown_override(argv) -> str | None:
  """The message for the first `--config.<key>` override of `argv` that names no key of the
  config file given by --config (None when every override names a key)."""
  args = [a for a in argv[1:] if a != "--"]
  path, keys = None, []
  for i, arg in enumerate(args):
    name, has_value, value = arg.lstrip("-").partition("=")
    if name == "config":
      path = value if has_value else (args[i + 1] if i + 1 < len(args) else None)
    elif name.startswith("config."):
      keys.append(name.removeprefix("config."))
  if path is None:
    return None
  config = schema.load_config(path)
  return next(filter(None, (schema.unknown_key(config, key) for key in keys)), None)


def _parse_flags(argv):
  """absl's flag parsing, except that a misspelled `--config.<key>` override stops with one line
  naming the key's full path and the closest known key, exit code 2 (ml_collections raises
  AttributeError / KeyError / IndexError with a traceback there)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, IndexError) as e:
    print(_unknown_override(argv) or f"--config override: {e}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library INFO logs (orbax) drown the progress bar
  try:
    schema.validate(_CONFIG.value)  # fail fast, before the heavy imports and devices
    schema.check_paths(_CONFIG.value)
  except ValueError as e:
    raise app.UsageError(str(e), exitcode=2) from None
  from m1jax.train import context, driver, stage  # pylint: disable=g-import-not-at-top

  def interrupted_outside_a_stage(signum, frame):
    del frame
    raise stage.Interrupted(signum, "interrupted outside a training step; every checkpoint "
                            "written so far stands: a rerun resumes from the latest")

  signal.signal(signal.SIGTERM, interrupted_outside_a_stage)
  try:
    context.init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    summary = driver.run_from_config(_CONFIG.value, _WORKDIR.value)
  except KeyboardInterrupt as e:
    signum = e.signum if isinstance(e, stage.Interrupted) else signal.SIGINT
    print(str(e) or "interrupted", file=sys.stderr)
    sys.exit(128 + signum)
  except (ValueError, stage.NonFiniteError, OSError) as e:
    logging.info("%s", traceback.format_exc())
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(driver.format_summary(summary))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
