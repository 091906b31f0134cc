"""The training driver across devices and processes: the RL update sharded over 8 devices equals
one device's, and an SFT run over 2 processes. (Apart from test_train.py, so that pytest-xdist's
--dist=loadfile can run the two halves on two workers.)"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from m1jax import convert, model, sharding
from m1jax.rl import losses
from m1jax.train import context, metrics, optimizer as optimizer_lib, rl as rl_trainer, schema
from m1jax.train import state as state_lib
from m1jax.train.transfer import to_global

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MICRO_CONFIG = os.path.join(ROOT, "tests/train/micro_config.py")


def test_rl_update_on_8_devices_equals_one_device():
  config = schema.load_config(MICRO_CONFIG)
  ctx = context.build_context(config, "/unused")
  cfg = ctx.model_cfg
  loss_cfg = losses.LossConfig(kind="cispo")
  opt = optimizer_lib.make_optimizer(config.rl.optimizer, 10)
  params = model.init(cfg, jax.random.key(0))
  n, p, l = 8, 6, 5
  ks = jax.random.split(jax.random.key(1), 4)
  sequences = jax.random.randint(ks[0], (n, p + l), 0, cfg.vocab_size)
  seq_mask = jnp.arange(p + l)[None] >= jax.random.randint(ks[1], (n, 1), 0, 3)
  batch = rl_trainer.RolloutBatch(
      sequences, seq_mask, jnp.ones((n, l)), -jax.random.uniform(ks[2], (n, l)) * 5,
      jax.random.normal(ks[3], (n,)), None)

  def one_step(mesh):
    shardings = state_lib.state_shardings(cfg, opt, mesh)
    state = jax.device_put(state_lib.create(params, opt), shardings)
    step = jax.jit(lambda s, b: rl_trainer.rl_update(cfg, loss_cfg, 1.0, opt, s, b),
                   in_shardings=(shardings, None))
    with sharding.activate(mesh):
      batch_d = jax.tree.map(lambda x: to_global(np.asarray(x), mesh), batch)
      _, step_metrics = step(state, batch_d)
    return jax.device_get(step_metrics)

  single = one_step(sharding.make_mesh({"fsdp": 1}, jax.devices()[:1]))
  multi = one_step(sharding.make_mesh({"fsdp": 2, "tensor": 2, "expert": 2}, jax.devices()[:8]))
  # float32: only the reduction order differs between 1 and 8 devices.
  np.testing.assert_allclose(multi["loss"], single["loss"], rtol=1e-5)
  np.testing.assert_allclose(multi["grad_norm"], single["grad_norm"], rtol=1e-5)
  assert single["grad_norm"] > 0


def test_two_process_run_on_localhost(tmp_path):
  """jax.distributed with 2 CPU processes (2 devices each): a 2-step SFT run, starting from a
  HF checkpoint that each process streams into its own devices' blocks, completes."""
  import portpicker  # pylint: disable=g-import-not-at-top
  port = portpicker.pick_unused_port()
  model_cfg = schema.model_from_config(schema.load_config(MICRO_CONFIG).model)
  convert.save_hf(model_cfg, model.init(model_cfg, jax.random.key(0)), tmp_path / "hf")
  # 2 devices per process; the other XLA flags of tests/conftest.py stay.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count=")]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": " ".join(flags + ["--xla_force_host_platform_device_count=2"])}
  common = [sys.executable, "-m", "experiments.train", "--config=tests/train/micro_config.py",
            f"--workdir={tmp_path}", "--config.mode=sft", "--config.sft.steps=2",
            f"--config.model.hf_dir={tmp_path / 'hf'}",
            "--num_processes=2", f"--coordinator_address=localhost:{port}"]
  # Each process's output goes to a file (a pipe read after the other process ends can fill and
  # stall it), and a failure shows both: the first error is often in the other process.
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, "w") as f:
      procs.append(subprocess.Popen(common + [f"--process_id={i}"], cwd=ROOT, env=env,
                                    stdout=f, stderr=subprocess.STDOUT, text=True))
  returncodes = [p.wait(timeout=300) for p in procs]
  assert returncodes == [0, 0], "\n".join(
      f"--- process {i} (exit {rc}):\n{log.read_text()[-2500:]}"
      for i, (rc, log) in enumerate(zip(returncodes, logs)))
  steps = [r["step"] for r in metrics.read_jsonl(os.path.join(tmp_path, "sft", "metrics.jsonl"))]
  assert steps == [0, 1, 2]
