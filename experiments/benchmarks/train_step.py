"""The RL train step (`rl_update`): time, tokens/s, MFU, memory, compile time, and where the time
goes; sharded on several meshes with agreement against one device.

Every mesh runs the same `rl_update` on the same random rollout batch from the same params; the
loss and gradient norm must match the one-device run (bf16 compute: to bf16 tolerance).

The breakdown times each component of the step on its own, forward and backward at the step's
shapes (jit, median after warm-up): the embedding, one lightning attention sub-layer (norm +
attention + residual), one softmax attention sub-layer, one MoE sub-layer, the LM head +
log-probs and the optimizer update; layer components are multiplied by their count. Their sum
next to the measured step says how much of the step they explain (the rest: the loss, fusion
across components, and what XLA schedules differently in the whole step).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import reporting
from m1jax import flops, model, sharding
from m1jax.config import ModelConfig
from m1jax.generate import sampling
from m1jax.model.attention import SoftmaxAttention
from m1jax.model.lightning import LightningAttention, layer_slopes
from m1jax.model.moe import MoE
from m1jax.model.norms import RMSNorm
from m1jax.rl import losses
from m1jax.train import optimizer as optimizer_lib, rl, schema
from m1jax.train import state as state_lib
from m1jax.train.transfer import to_global
from pallas_kernels import grouped_matmul


@dataclasses.dataclass
class StepResult:
  mesh: str
  devices: int
  rows: int
  seq_len: int
  loss: float
  grad_norm: float
  step_ms: float
  tokens_per_s: float
  mfu: float
  compile_s: float  # trace + lower + XLA compile
  peak_gib: float  # the compiled step's arguments + outputs + temporaries (XLA's estimate)
  variant: str = ""  # ModelConfig changes against the base config ("" for the base)
  lower_s: float = float("nan")  # of compile_s: tracing and lowering in jax (kernels included)


def rollout_batch(cfg: ModelConfig, rows: int, prompt_len: int, response_len: int, seed: int = 0):
  """A random rollout batch (host numpy) of `rows` sequences of prompt_len + response_len tokens;
  the first row's prompt is left-padded by half (RL batches are padded)."""
  rng = np.random.default_rng(seed)
  total = prompt_len + response_len
  mask = np.ones((rows, total), bool)
  mask[0, :prompt_len // 2] = False
  return rl.RolloutBatch(
      sequences=rng.integers(0, cfg.vocab_size, (rows, total), dtype=np.int32),
      sequence_mask=mask,
      response_mask=np.ones((rows, response_len), np.float32),
      old_logprobs=-rng.uniform(0, 8, (rows, response_len)).astype(np.float32),
      advantages=rng.standard_normal(rows).astype(np.float32),
      ref_logprobs=None)


def make_optimizer():
  opt_cfg = schema.base_config().rl.optimizer
  opt_cfg.learning_rate = 1e-6
  return optimizer_lib.make_optimizer(opt_cfg, 100)


def _peak_gib(compiled) -> float:
  stats = compiled.memory_analysis()
  if stats is None:
    return float("nan")
  used = (stats.argument_size_in_bytes + stats.output_size_in_bytes
          - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  return used / 2**30


def time_step(cfg: ModelConfig, params, batch, mesh_shape: Mapping[str, int], devices,
              peak_flops_per_device: float, steps: int = 5, variant: str = "",
              compiler_options: Mapping[str, str] | None = None) -> StepResult:
  """Compiles rl_update for `mesh_shape` over `devices` (timed; with XLA `compiler_options`),
  runs it once from the common starting state, then times `steps` steps (median)."""
  mesh = sharding.make_mesh(dict(mesh_shape), devices)
  optimizer = make_optimizer()
  shardings = state_lib.state_shardings(cfg, optimizer, mesh)
  with sharding.activate(mesh):
    state = jax.jit(lambda p: state_lib.create(p, optimizer), out_shardings=shardings)(params)
    batch_d = jax.tree.map(lambda x: to_global(x, mesh), batch)
    step = jax.jit(lambda s, b: rl.rl_update(cfg, losses.LossConfig(kind="cispo"), 1.0,
                                             optimizer, s, b),
                   in_shardings=(shardings, None), out_shardings=(shardings, None),
                   donate_argnums=0)
    compiled, compile_s, lower_s = reporting.compile_timed(
        step, state, batch_d,
        compiler_options=dict(compiler_options) if compiler_options else None)
    state, metrics = compiled(state, batch_d)  # the first step, from the common starting state
    first = jax.device_get(metrics)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch_d)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
  seconds = statistics.median(times)
  rows, total = batch.sequences.shape
  tokens = rows * total
  step_flops = flops.training_flops_per_token(flops.arch_from_model_config(cfg), total) * tokens
  name = "x".join(f"{k}{v}" for k, v in mesh_shape.items() if v > 1) or "single"
  return StepResult(mesh=name, devices=len(devices), rows=rows, seq_len=total,
                    loss=float(first["loss"]), grad_norm=float(first["grad_norm"]),
                    step_ms=seconds * 1e3, tokens_per_s=tokens / seconds,
                    mfu=step_flops / seconds / (peak_flops_per_device * len(devices)),
                    compile_s=compile_s, peak_gib=_peak_gib(compiled), variant=variant,
                    lower_s=lower_s)


def run_meshes(cfg: ModelConfig, mesh_shapes: Sequence[Mapping[str, int]], rows: int,
               prompt_len: int, response_len: int, peak_flops_per_device: float,
               log=print) -> list[StepResult]:
  params = model.init(cfg, jax.random.key(0))
  batch = rollout_batch(cfg, rows, prompt_len, response_len)
  results = []
  for shape in mesh_shapes:
    size = int(np.prod(list(shape.values())))
    result = time_step(cfg, params, batch, shape, jax.devices()[:size], peak_flops_per_device)
    log(f"{result.mesh:>16} devices {result.devices}  {rows} x {prompt_len + response_len}  "
        f"loss {result.loss:.6f}  grad_norm {result.grad_norm:.6f}  step "
        f"{result.step_ms:8.2f} ms  {result.tokens_per_s:10.0f} tok/s  MFU "
        f"{100 * result.mfu:5.1f}%  compile {result.compile_s:.1f} s (lower "
        f"{result.lower_s:.1f})  {result.peak_gib:.1f} GiB")
    results.append(result)
  return results


def table(results: Sequence[StepResult]) -> str:
  """One row per result; agreement and scaling efficiency against the first result of the same
  shape (its first mesh)."""
  rows = []
  for r in results:
    base = next(b for b in results if (b.rows, b.seq_len) == (r.rows, r.seq_len))
    efficiency = r.tokens_per_s / (base.tokens_per_s * r.devices / base.devices)
    rows.append([r.variant or "base", r.mesh, r.devices, f"{r.rows} x {r.seq_len}",
                 f"{r.loss:.6f}",
                 f"{r.grad_norm:.5f}",
                 f"{abs(r.loss - base.loss) / abs(base.loss):.1e} / "
                 f"{abs(r.grad_norm - base.grad_norm) / base.grad_norm:.1e}", f"{r.step_ms:.1f}",
                 f"{r.tokens_per_s:.0f}", f"{100 * r.mfu:.1f}%", f"{100 * efficiency:.0f}%",
                 f"{r.compile_s:.1f} ({r.lower_s:.1f})", f"{r.peak_gib:.1f}"])
  return reporting.markdown_table(
      ["model", "mesh", "GPUs", "rows x tokens", "loss", "grad norm",
       "rel. diff vs 1st row of the shape (loss / grad)",
       "step ms", "tokens/s", "MFU", "scaling eff.", "compile s (of it: lower)", "peak GiB"],
      rows)


# --- where the time goes -----------------------------------------------------------------------
def _time(fn: Callable, *args, reps: int = 10) -> float:
  """Median milliseconds of a jitted fn after two warm-up calls."""
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - start)
  return 1e3 * statistics.median(samples)


def _fwd_bwd(fn: Callable):
  """jit of (args...) -> (out, grads of sum(out * ct) w.r.t. every arg): one forward + backward."""
  def run(*args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(jax.tree.map(jnp.ones_like, out))
  return jax.jit(run)


@dataclasses.dataclass
class Component:
  name: str
  count: int  # times per step
  ms: float  # one forward + backward
  tflops: float = float("nan")  # for the MoE: its expert GEMMs' FLOPs over its time

  @property
  def total_ms(self) -> float:
    return self.count * self.ms


def component_times(cfg: ModelConfig, params, rows: int, seq_len: int,
                    response_len: int) -> list[Component]:
  """Each component of rl_update timed alone, forward + backward at the step's shapes."""
  dtype = cfg.jnp_dtype
  keys = jax.random.split(jax.random.key(1), 4)
  tokens = jax.random.randint(keys[0], (rows, seq_len), 0, cfg.vocab_size)
  mask = jnp.ones((rows, seq_len), bool).at[0, :seq_len // 16].set(False)
  positions = model.positions_from_mask(mask, mask.shape)
  x = jax.random.normal(keys[1], (rows, seq_len, cfg.hidden_size), dtype)
  slopes = layer_slopes(cfg)
  lightning_layer = cfg.is_lightning.index(True) if cfg.num_lightning_layers else None
  softmax_layer = cfg.is_lightning.index(False) if cfg.num_softmax_layers else None
  out = []

  embed = _fwd_bwd(lambda e: jnp.take(e, tokens, axis=0).astype(dtype))
  out.append(Component("embedding", 1, _time(embed, params["embed"])))

  def attention_sublayer(module, alpha, beta):
    def fn(p, x):
      h = RMSNorm(cfg.rms_norm_eps, ("norm",), cfg.jnp_param_dtype).apply(
          {"params": p["input_norm"]}, x)
      return h * alpha + module(p["attn"], h) * beta
    return fn

  if lightning_layer is not None:
    p = model.layer_params(cfg, params, lightning_layer)
    attend = lambda q, h: LightningAttention(cfg).apply(
        {"params": q}, h, slopes[lightning_layer], mask)[0]
    fn = _fwd_bwd(attention_sublayer(attend, cfg.layernorm_linear_attention_alpha,
                                     cfg.layernorm_linear_attention_beta))
    out.append(Component("lightning attention layers", cfg.num_lightning_layers, _time(fn, p, x)))
  if softmax_layer is not None:
    p = model.layer_params(cfg, params, softmax_layer)
    attend = lambda q, h: SoftmaxAttention(cfg).apply({"params": q}, h, positions, mask)[0]
    fn = _fwd_bwd(attention_sublayer(attend, cfg.layernorm_full_attention_alpha,
                                     cfg.layernorm_full_attention_beta))
    out.append(Component("softmax attention layers", cfg.num_softmax_layers, _time(fn, p, x)))

  p = model.layer_params(cfg, params, 0)

  def moe_sublayer(p, x):
    h = RMSNorm(cfg.rms_norm_eps, ("norm",), cfg.jnp_param_dtype).apply(
        {"params": p["post_attn_norm"]}, x)
    moe_out, _ = MoE(cfg).apply({"params": p["moe"]}, h, mask)
    return h * cfg.layernorm_mlp_alpha + moe_out * cfg.layernorm_mlp_beta

  moe_ms = _time(_fwd_bwd(moe_sublayer), p, x)
  gemm_flops = 3 * 2 * rows * seq_len * cfg.num_experts_per_tok * 3 * cfg.hidden_size * (
      cfg.intermediate_size)
  out.append(Component("MoE layers", cfg.num_hidden_layers, moe_ms, gemm_flops / moe_ms / 1e9))

  targets = tokens[:, seq_len - response_len:]
  head_in = x[:, seq_len - response_len - 1:seq_len - 1]
  for head_dtype in dict.fromkeys((cfg.lm_head_dtype, "bfloat16")):
    head_cfg = cfg.replace(lm_head_dtype=head_dtype)
    head = _fwd_bwd(lambda h, w, c=head_cfg: sampling.head_token_logprobs(c, h, w, targets, 1.0))
    name = "LM head + log-probs" + ("" if head_dtype == cfg.lm_head_dtype else
                                    f" (a {head_dtype} head instead; not in the sum)")
    out.append(Component(name, 1 if head_dtype == cfg.lm_head_dtype else 0,
                         _time(head, head_in, params["lm_head"])))

  optimizer = make_optimizer()
  opt_state = optimizer.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

  @jax.jit
  def update(params, opt_state, grads):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return jax.tree.map(jnp.add, params, updates), opt_state

  out.append(Component("optimizer update", 1, _time(update, params, opt_state, grads)))
  return out


def grouped_gemm_rates(cfg: ModelConfig, rows: int, seq_len: int) -> dict[str, float]:
  """TF/s of the MoE's two grouped GEMMs alone (forward + both gradients) at the step's shapes,
  experts balanced: [w1 | w3] (E -> 2I) and w2 (I -> E)."""
  dtype = cfg.jnp_dtype
  m = rows * seq_len * cfg.num_experts_per_tok
  groups = cfg.num_local_experts
  sizes = jnp.full((groups,), m // groups, jnp.int32).at[0].add(m % groups)
  keys = jax.random.split(jax.random.key(2), 4)
  rates = {}
  for name, k, n in (("w13", cfg.hidden_size, 2 * cfg.intermediate_size),
                     ("w2", cfg.intermediate_size, cfg.hidden_size)):
    lhs = jax.random.normal(keys[0], (m, k), dtype)
    rhs = jax.random.normal(keys[1], (groups, k, n), dtype) * k ** -0.5
    fn = _fwd_bwd(lambda a, b: grouped_matmul(a, b, sizes, impl=cfg.moe_gemm_impl))
    rates[name] = 3 * 2 * m * k * n / _time(fn, lhs, rhs) / 1e9
  return rates


def component_table(components: Sequence[Component], step_ms: float) -> str:
  rows = [[c.name, c.count, f"{c.ms:.3f}", f"{c.total_ms:.2f}",
           f"{100 * c.total_ms / step_ms:.0f}%",
           "" if np.isnan(c.tflops) else f"{c.tflops:.0f}"] for c in components]
  total = sum(c.total_ms for c in components)
  rows.append(["sum", "", "", f"{total:.2f}", f"{100 * total / step_ms:.0f}%", ""])
  rows.append(["the whole step", "", "", f"{step_ms:.2f}", "100%", ""])
  return reporting.markdown_table(
      ["component (forward + backward)", "per step", "ms each", "ms per step", "of the step",
       "GEMM TF/s"], rows)


# --- the float32 head's matmul algorithm --------------------------------------------------------
@dataclasses.dataclass
class HeadPrecision:
  precision: str  # lm_head_precision
  logit_std: float  # of the scaled head's logits
  forward_ms: float  # head_token_logprobs over all rows x tokens, forward only
  mean_abs_diff: float  # sampled tokens' log-probs against the first precision's
  max_abs_diff: float


def head_precisions(cfg: ModelConfig, params, rows: int, seq_len: int,
                    precisions: Sequence[str], logit_stds: Sequence[float]) -> list[HeadPrecision]:
  """The LM head + log-probs of the trainer's forward (`head_token_logprobs`) under each
  lm_head_precision, on the model's final hidden states [rows, seq_len, E] of random tokens: its
  time, and how far the log-probs of tokens sampled (temperature 1) from the first precision's
  logits move from that precision's. The head is scaled so that its logits have each standard
  deviation in logit_stds (0: the head as it is; a random head's logits are nearly uniform)."""
  tokens = jax.random.randint(jax.random.key(3), (rows, seq_len), 0, cfg.vocab_size)
  hidden = jax.jit(lambda p, t: model.forward(cfg, p, t, compute_logits=False).hidden)(
      params, tokens)
  head = params["lm_head"]
  reference = cfg.replace(lm_head_precision=precisions[0])
  std = float(jnp.std(jax.jit(functools.partial(model.lm_head_logits, reference))(
      hidden[:1], head)))
  sample = jax.jit(lambda h, w, key: jax.random.categorical(
      key, model.lm_head_logits(reference, h, w)))
  out = []
  for target in logit_stds:
    scaled = head * (target / std if target else 1.0)
    sampled = sample(hidden, scaled, jax.random.key(4))
    for precision in precisions:  # the first is the reference
      c = cfg.replace(lm_head_precision=precision)
      fn = jax.jit(lambda h, w, t, c=c: sampling.head_token_logprobs(c, h, w, t, 1.0)[0])
      ms = _time(fn, hidden, scaled, sampled, reps=5)
      logprobs = np.asarray(fn(hidden, scaled, sampled), np.float64)
      if precision == precisions[0]:
        reference_logprobs = logprobs
      diff = np.abs(logprobs - reference_logprobs)
      out.append(HeadPrecision(precision, target or std, ms, float(diff.mean()),
                               float(diff.max())))
  return out


def head_precision_table(results: Sequence[HeadPrecision]) -> str:
  return reporting.markdown_table(
      ["lm_head_precision", "logit std", "head forward ms", "mean abs. diff", "max abs. diff"],
      [[r.precision, f"{r.logit_std:.2f}", f"{r.forward_ms:.2f}", f"{r.mean_abs_diff:.1e}",
        f"{r.max_abs_diff:.1e}"] for r in results])
