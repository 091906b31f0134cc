"""Model configuration: every field of the released MiniMax-M1 config.json plus m1jax's knobs.

`ModelConfig.from_hf` reads both the original MiniMax-M1 / MiniMax-Text-01 keys
(`attn_type_list`, `layernorm_*_alpha`, `rope_theta`, `rotary_dim`, ...) and transformers'
"minimax" keys (`layer_types`, `*_alpha_factor`, `rope_parameters`); `to_hf` writes transformers'
form. docs/model.md maps every field to the paper and to transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import jax.numpy as jnp

from pallas_kernels.grouped_matmul import IMPLEMENTATIONS as GROUPED_MATMUL_IMPLS
from pallas_kernels.lightning import IMPLEMENTATIONS as LIGHTNING_IMPLS
from pallas_kernels.lightning import KernelConfig

LIGHTNING = 0  # `attn_type_list` value of a lightning (linear, decayed) attention layer.
SOFTMAX = 1  # `attn_type_list` value of a softmax (GQA) attention layer.
_HF_LAYER_TYPES = {"linear_attention": LIGHTNING, "full_attention": SOFTMAX}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
MOE_IMPLS = ("ragged", "dense")
MOE_GEMM_IMPLS = GROUPED_MATMUL_IMPLS
REMAT_POLICIES = ("none", "full", "dots_saveable", "save_matmuls")
SLOPE_CONVENTIONS = ("original", "transformers")
# How a float32 LM head multiplies (lm_head_precision): "highest" is true float32 arithmetic;
# the others are XLA dot algorithms that run float32 operands on the bf16 (or tf32) tensor cores
# in 3 or 6 passes (a split of each operand into bf16 or tf32 parts), accumulating in float32.
# (XLA's 9-pass bf16 algorithm is left out: on an H200, jax 0.11.2, its error against float64
# was 2.9e-4, worse than 3 passes; docs/benchmarks.md.)
LM_HEAD_PRECISIONS = ("highest", "bf16_3x", "bf16_6x", "tf32_3x")

# Keys in HF config.json files that carry no model math (bookkeeping, generation defaults).
_HF_BOOKKEEPING_KEYS = frozenset({
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
    "use_cache", "output_router_logits", "bos_token_id", "eos_token_id", "pad_token_id",
    "attention_dropout", "router_jitter_noise", "initializer_range", "max_position_embeddings",
    "shared_moe_mode", "name_or_path", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "tie_encoder_decoder", "id2label", "label2id",
    "problem_type", "tokenizer_class", "quantization_config",
})


def _repeat_layout(period: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
  return tuple(period[i % len(period)] for i in range(num_layers))


def hybrid_layout(num_layers: int, period: int = 8) -> tuple[int, ...]:
  """`period - 1` lightning layers then one softmax layer, repeated (MiniMax's 7:1 layout)."""
  return _repeat_layout((LIGHTNING,) * (period - 1) + (SOFTMAX,), num_layers)


def alpha_for_depth(num_layers: int) -> float:
  """DeepNorm-style residual scale used by the release: (2 N) ** 0.25 (3.5566 for N = 80)."""
  return math.pow(2 * num_layers, 0.25)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hybrid lightning/softmax attention MoE decoder (MiniMax-Text-01 / MiniMax-M1).

  Field names follow the released config.json. Fields below `# --- m1jax knobs ---` are ours.
  """

  vocab_size: int = 200064
  hidden_size: int = 6144
  intermediate_size: int = 9216  # Width of each SwiGLU expert.
  num_hidden_layers: int = 80
  num_attention_heads: int = 64
  num_key_value_heads: int = 8  # Softmax layers only (GQA); lightning layers use all heads.
  head_dim: int = 128
  attn_type_list: tuple[int, ...] = hybrid_layout(80)  # 0 lightning, 1 softmax, one per layer.
  layernorm_full_attention_alpha: float = 3.5565588200778455
  layernorm_full_attention_beta: float = 1.0
  layernorm_linear_attention_alpha: float = 3.5565588200778455
  layernorm_linear_attention_beta: float = 1.0
  layernorm_mlp_alpha: float = 3.5565588200778455
  layernorm_mlp_beta: float = 1.0
  postnorm: bool = True  # Residual is the normalised input (every release); False: the raw input.
  rms_norm_eps: float = 1e-5
  lightning_norm_eps: float = 1e-6  # Inner RMSNorm over H*D features of a lightning layer.
  rope_theta: float = 1e7
  rotary_dim: int = 64
  num_local_experts: int = 32
  num_experts_per_tok: int = 2
  shared_intermediate_size: int = 0  # No release uses a shared expert; only 0 is supported.
  router_aux_loss_coef: float = 0.001
  # Lightning attention block length of the released engine; m1jax's jnp blockwise path tiles by
  # it. The Pallas kernels tile by lightning_kernel.block_size (their on-chip limits).
  block_size: int = 256
  hidden_act: str = "silu"
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 10240000
  initializer_range: float = 0.02
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  # --- m1jax knobs ---
  dtype: str = "bfloat16"  # Activations / compute.
  param_dtype: str = "float32"
  # LM head matmul + logits; shared by sampler and trainer (paper 3.2).
  lm_head_dtype: str = "float32"
  # The float32 head's matmul algorithm (LM_HEAD_PRECISIONS); shared by sampler and trainer, so
  # their log-probs on the same hidden states are equal whichever it is. bf16_3x: float32
  # operands on the bf16 tensor cores in 3 passes, error 4.4e-6 against float64 (highest: 5.7e-7),
  # log-probs within 1.3e-5 of highest's on average; on an H200 the small preset's head forward
  # takes 10.1 ms instead of 23.6 at 16 x 1024 tokens. XLA:CPU computes it in plain float32, so CPU
  # results are those of highest.
  lm_head_precision: str = "bf16_3x"
  # The float32 head's matmuls in the training backward pass (the chunk's logits recomputed there
  # and both gradient products; LM_HEAD_PRECISIONS), apart from the forward's, whose log-probs the
  # importance ratios compare with the sampler's: the gradient only needs the softmax to a few
  # ulps (with lm_head_precision=highest, bf16_3x here saved 34 ms per small-preset rl_update on
  # an H200, gradients within 5e-6).
  lm_head_grad_precision: str = "bf16_3x"
  # Training computes the LM head + log-probs over chunks of this many tokens (memory O(chunk V)).
  head_chunk_tokens: int = 1024
  # True rotates the whole head, as transformers does (ignores rotary_dim).
  rope_full_head: bool = False
  slope_convention: str = "original"  # "original": 1 - l/(L-1); "transformers": 1 - l/(L-1+1e-5).
  lightning_impl: str = "auto"  # auto: pallas on GPU, blockwise elsewhere.
  # Tiling and forward kernel of the Pallas lightning kernels (lightning_impl "pallas").
  lightning_kernel: KernelConfig = KernelConfig()
  # jax.nn.dot_product_attention implementation (auto: cudnn when it applies).
  attention_impl: str = "auto"
  # ragged: dropless grouped GEMM; dense: all experts (tests).
  moe_impl: str = "ragged"
  # The dropless grouped GEMM: auto (Mosaic GPU kernels on Hopper, XLA elsewhere), mosaic, xla.
  moe_gemm_impl: str = "auto"
  # The gate and up projections run as one grouped matmul on [w1 | w3] when the routed rows
  # (tokens x top-k) number at least this; fewer rows (decode steps) multiply w1 and w3 apart,
  # so a step does not copy the two weights into one (the GEMMs read the same bytes either way).
  moe_fuse_gate_up_rows: int = 4096
  # On a GPU, decode steps (one token per row) of at most this many rows compute every expert on
  # every row, combined with the top-k weights (experts_dense): each expert's weights are read
  # once, as the grouped GEMMs read them, without their sort, row alignment and unsort. 0: never.
  # (A speed choice measured on the H200; elsewhere decode keeps the grouped path.)
  moe_dense_decode_rows: int = 512
  # None: dropless. Else capacity = cf * tokens * k / E per expert.
  moe_capacity_factor: float | None = None
  # Recomputation in each decoder layer's backward: "none" keeps every residual, "full" keeps
  # only the layer's input, "dots_saveable" jax's dots_with_no_batch_dims_saveable (on a GPU the
  # projections are custom_vjp calls that policy does not see: nearly "full"), "save_matmuls"
  # keeps the named outputs of the projections, expert GEMMs and attention kernels
  # (common.SAVED_BY_SAVE_MATMULS, bf16 at bf16 compute) and recomputes norms, activations and
  # casts.
  remat_policy: str = "none"
  # Layer groups per iteration of the layer scan: 1 is a loop over the groups; a value that
  # divides num_layer_groups into one trip (num_layer_groups itself) is straight-line code, with
  # no per-iteration slicing of the stacked weights and no stacking of the backward's residuals
  # into loop buffers (more to compile). The parameter tree is the same for every value.
  layer_scan_unroll: int = 1

  def __post_init__(self):
    object.__setattr__(self, "attn_type_list", tuple(int(t) for t in self.attn_type_list))
    self.validate()

  # ----------------------------------------------------------------------------------------------
  # Validation.
  def validate(self) -> None:
    def fail(field, msg):
      raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: {msg}")

    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
                  "num_experts_per_tok", "block_size", "rotary_dim", "max_position_embeddings",
                  "head_chunk_tokens", "moe_fuse_gate_up_rows", "layer_scan_unroll"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        fail(field, "must be a positive integer")
    rows = self.moe_dense_decode_rows
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
      fail("moe_dense_decode_rows", "must be a non-negative integer (0: never)")
    for field in ("rms_norm_eps", "lightning_norm_eps", "rope_theta"):
      if not getattr(self, field) > 0:
        fail(field, "must be positive")
    if len(self.attn_type_list) != self.num_hidden_layers:
      raise ValueError(
          f"ModelConfig.attn_type_list has {len(self.attn_type_list)} entries but "
          f"num_hidden_layers={self.num_hidden_layers}: give one layer type per layer")
    bad = [t for t in self.attn_type_list if t not in (LIGHTNING, SOFTMAX)]
    if bad:
      fail("attn_type_list", f"unknown layer type {bad[0]!r} (0: lightning, 1: softmax)")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"ModelConfig.num_attention_heads={self.num_attention_heads} is not divisible by "
          f"num_key_value_heads={self.num_key_value_heads}")
    if self.num_experts_per_tok > self.num_local_experts:
      raise ValueError(
          f"ModelConfig.num_experts_per_tok={self.num_experts_per_tok} exceeds "
          f"num_local_experts={self.num_local_experts}")
    if self.rotary_dim % 2:
      fail("rotary_dim", "must be even (RoPE rotates pairs of dims)")
    if self.rotary_dim > self.head_dim:
      fail("rotary_dim", f"exceeds head_dim={self.head_dim}")
    if self.shared_intermediate_size:
      fail("shared_intermediate_size", "shared experts are not supported (no release uses one)")
    if self.hidden_act != "silu":
      fail("hidden_act", "only 'silu' is supported")
    if self.tie_word_embeddings:
      fail("tie_word_embeddings", "MiniMax has an untied LM head; only False is supported")
    for field in ("dtype", "param_dtype", "lm_head_dtype"):
      if getattr(self, field) not in DTYPES:
        fail(field, f"must be one of {sorted(DTYPES)}")
    for field, allowed in (("lightning_impl", LIGHTNING_IMPLS), ("attention_impl", ATTENTION_IMPLS),
                           ("moe_impl", MOE_IMPLS), ("moe_gemm_impl", MOE_GEMM_IMPLS),
                           ("remat_policy", REMAT_POLICIES),
                           ("lm_head_precision", LM_HEAD_PRECISIONS),
                           ("lm_head_grad_precision", LM_HEAD_PRECISIONS),
                           ("slope_convention", SLOPE_CONVENTIONS)):
      if getattr(self, field) not in allowed:
        fail(field, f"must be one of {allowed}")
    if self.moe_capacity_factor is not None and not self.moe_capacity_factor > 0:
      fail("moe_capacity_factor", "must be positive, or None for dropless routing")
    if not isinstance(self.lightning_kernel, KernelConfig):
      fail("lightning_kernel", "must be a pallas_kernels.KernelConfig")
    try:
      self.lightning_kernel.validate()
    except ValueError as e:
      raise ValueError(f"ModelConfig.lightning_kernel: {e}") from None

  # ----------------------------------------------------------------------------------------------
  # Derived quantities.
  @property
  def is_lightning(self) -> tuple[bool, ...]:
    """Per layer: True for a lightning layer, False for a softmax layer."""
    return tuple(t == LIGHTNING for t in self.attn_type_list)

  @property
  def num_lightning_layers(self) -> int:
    return sum(self.is_lightning)

  @property
  def num_softmax_layers(self) -> int:
    return self.num_hidden_layers - self.num_lightning_layers

  @property
  def layer_period(self) -> int:
    """Smallest p dividing num_hidden_layers with attn_type_list repeating every p layers (8 for
    the released 7:1 layout; num_hidden_layers when the layout does not repeat). The model scans
    over num_hidden_layers / p groups of p layers."""
    types, n = self.attn_type_list, self.num_hidden_layers
    return next(p for p in range(1, n + 1)
                if n % p == 0 and all(types[i] == types[i % p] for i in range(n)))

  @property
  def num_layer_groups(self) -> int:
    return self.num_hidden_layers // self.layer_period

  @property
  def effective_rotary_dim(self) -> int:
    return self.head_dim if self.rope_full_head else self.rotary_dim

  @property
  def jnp_dtype(self):
    return DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def jnp_lm_head_dtype(self):
    return DTYPES[self.lm_head_dtype]

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  # ----------------------------------------------------------------------------------------------
  # HF interop.
  @classmethod
  def from_hf(cls, source: str | os.PathLike | Mapping[str, Any], **overrides) -> ModelConfig:
    """Reads a HF config: a checkpoint dir, a config.json path, or a dict.

    Accepts the original MiniMax-M1 / Text-01 keys and transformers' "minimax" keys. A config
    without `rotary_dim` means RoPE over the whole head (what transformers computes). A transformers
    config (model_type "minimax") selects the transformers slope convention. `overrides` set any
    field, m1jax knobs included (e.g. dtype="float32").
    """
    if isinstance(source, Mapping):
      raw, where = dict(source), "config"
    else:
      path = os.fspath(source)
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      raw, where = _read_json_object(path), path
    unknown_overrides = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown_overrides:
      raise ValueError(f"ModelConfig has no field(s) {sorted(unknown_overrides)}")
    missing = [" or ".join(keys) for keys in _HF_REQUIRED if not any(k in raw for k in keys)]
    if missing:
      raise ValueError(f"{where}: missing architecture key(s) {missing}")
    try:
      fields = _fields_from_hf(raw)
      _check_field_types(fields, raw)
      fields.update(overrides)
      return cls(**fields)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None

  def to_hf(self) -> dict[str, Any]:
    """transformers' MiniMaxConfig dict (model_type "minimax"); `rotary_dim` is kept for m1jax."""
    hf = {
        "architectures": ["MiniMaxForCausalLM"],
        "model_type": "minimax",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "hidden_act": self.hidden_act,
        "layer_types": ["linear_attention" if l else "full_attention" for l in self.is_lightning],
        "full_attn_alpha_factor": self.layernorm_full_attention_alpha,
        "full_attn_beta_factor": self.layernorm_full_attention_beta,
        "linear_attn_alpha_factor": self.layernorm_linear_attention_alpha,
        "linear_attn_beta_factor": self.layernorm_linear_attention_beta,
        "mlp_alpha_factor": self.layernorm_mlp_alpha,
        "mlp_beta_factor": self.layernorm_mlp_beta,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
        "rotary_dim": self.head_dim if self.rope_full_head else self.rotary_dim,
        "num_local_experts": self.num_local_experts,
        "num_experts_per_tok": self.num_experts_per_tok,
        "router_aux_loss_coef": self.router_aux_loss_coef,
        "block_size": self.block_size,
        "tie_word_embeddings": False,
        "max_position_embeddings": self.max_position_embeddings,
        "initializer_range": self.initializer_range,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
    }
    return hf


# transformers' "minimax" names of ModelConfig fields.
_HF_RENAMES = {
    "full_attn_alpha_factor": "layernorm_full_attention_alpha",
    "full_attn_beta_factor": "layernorm_full_attention_beta",
    "linear_attn_alpha_factor": "layernorm_linear_attention_alpha",
    "linear_attn_beta_factor": "layernorm_linear_attention_beta",
    "mlp_alpha_factor": "layernorm_mlp_alpha",
    "mlp_beta_factor": "layernorm_mlp_beta",
    "num_experts": "num_local_experts",
}
# Architecture keys a config.json must give (either spelling): no default stands in for them.
_HF_REQUIRED = (("vocab_size",), ("hidden_size",), ("intermediate_size",),
                ("num_hidden_layers",), ("num_attention_heads",), ("num_key_value_heads",),
                ("num_local_experts", "num_experts"), ("num_experts_per_tok",))


def _read_json_object(path: str) -> dict[str, Any]:
  with open(path, "rb") as f:
    data = f.read()
  if not data.strip():
    raise ValueError(f"{path}: empty file; expected a JSON object of model config keys")
  try:
    raw = json.loads(data)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(raw, dict):
    raise ValueError(f"{path}: expected a JSON object of model config keys, got "
                     f"{type(raw).__name__}")
  return raw


def _check_field_types(fields: dict[str, Any], raw: Mapping[str, Any]) -> None:
  """Each value read from a HF config (`raw`) has its field's type (ints for ints, numbers for
  floats, ...); floats given as integers become floats. Raises ValueError naming the key."""
  hf_name = {field: key for key, field in _HF_RENAMES.items() if key in raw}
  for field in dataclasses.fields(ModelConfig):
    if field.name not in fields:
      continue
    value, default = fields[field.name], field.default
    kind = type(default) if default is not None else _OPTIONAL_TYPES.get(field.name)
    ok = True
    if kind is bool:
      ok = isinstance(value, bool)
    elif kind is int:
      ok = (isinstance(value, int) and not isinstance(value, bool)) or (
          value is None and default is None)
    elif kind is float:
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
      if ok:
        fields[field.name] = float(value)
      ok = ok or (value is None and default is None)
    elif kind is str:
      ok = isinstance(value, str)
    elif kind is tuple:
      ok = isinstance(value, (list, tuple)) and all(
          isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok:
      name = hf_name.get(field.name, field.name)
      expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                  tuple: "a list of integers"}.get(kind, kind.__name__)
      raise ValueError(f"field {name!r}={value!r}: expected {expected}")


_OPTIONAL_TYPES = {"bos_token_id": int, "eos_token_id": int, "moe_capacity_factor": float}


def _fields_from_hf(raw: dict[str, Any]) -> dict[str, Any]:
  """Maps HF config keys (either dialect) to ModelConfig field names; rejects unknown keys."""
  raw = dict(raw)
  model_type = raw.get("model_type")
  out: dict[str, Any] = {}
  renames = _HF_RENAMES
  if "layer_types" in raw:
    layer_types = raw.pop("layer_types")
    if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
      raise ValueError(f"field 'layer_types'={layer_types!r}: expected a list of "
                       f"{sorted(_HF_LAYER_TYPES)}")
    unknown = [t for t in layer_types if t not in _HF_LAYER_TYPES]
    if unknown:
      raise ValueError(f"layer_types: unknown layer type {unknown[0]!r} "
                       f"(expected one of {sorted(_HF_LAYER_TYPES)})")
    types = [_HF_LAYER_TYPES[t] for t in layer_types]
    if "num_hidden_layers" in raw and len(types) != raw["num_hidden_layers"]:
      raise ValueError(f"layer_types has {len(types)} entries but "
                       f"num_hidden_layers={raw['num_hidden_layers']}: give one type per layer")
    if "attn_type_list" in raw and list(raw["attn_type_list"]) != types:
      raise ValueError("config has both attn_type_list and layer_types and they disagree")
    raw.pop("attn_type_list", None)
    out["attn_type_list"] = tuple(types)
  if "rope_parameters" in raw or "rope_scaling" in raw:
    rope = raw.pop("rope_parameters", None) or raw.pop("rope_scaling", None) or {}
    raw.pop("rope_scaling", None)
    if not isinstance(rope, dict):
      raise ValueError(f"field 'rope_parameters'={rope!r}: expected an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ValueError(f"rope_parameters.rope_type={rope_type!r}: only 'default' RoPE is supported")
    if "rope_theta" in rope:
      out["rope_theta"] = rope["rope_theta"]
  if raw.get("sliding_window") is not None:
    raise ValueError(f"sliding_window={raw['sliding_window']!r}: "
                     "sliding-window attention is not supported")
  raw.pop("sliding_window", None)
  if raw.get("postnorm") is False and model_type == "minimax":
    raise ValueError("postnorm=False contradicts model_type 'minimax' (transformers is post-norm)")
  if raw.get("layernorm_attention_alpha") is not None:
    raise ValueError("layernorm_attention_alpha: give per-kind alphas "
                     "(layernorm_linear/full_attention_alpha)")
  for key in list(raw):
    if key in _HF_BOOKKEEPING_KEYS or key.startswith("_"):
      value = raw.pop(key)
      if key in ("bos_token_id", "eos_token_id") and isinstance(value, int):
        out[key] = value
      elif key in ("max_position_embeddings", "initializer_range"):
        out[key] = value  # type-checked with the fields
  field_names = {f.name for f in dataclasses.fields(ModelConfig)}
  for key, value in raw.items():
    name = renames.get(key, key)
    if name not in field_names:
      raise ValueError(f"unknown config key {key!r}")
    out[name] = value
  if "head_dim" not in out and "hidden_size" in out and "num_attention_heads" in out:
    out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
  if "rotary_dim" not in out:
    out["rotary_dim"] = out.get("head_dim", ModelConfig.head_dim)
  if "attn_type_list" not in out:
    n = out.get("num_hidden_layers", ModelConfig.num_hidden_layers)
    if model_type == "minimax":  # transformers' default: alternate, starting with full attention.
      out["attn_type_list"] = tuple(SOFTMAX if (i + 1) % 2 else LIGHTNING for i in range(n))
    else:
      out["attn_type_list"] = hybrid_layout(n)
  if model_type == "minimax":
    out.setdefault("slope_convention", "transformers")
  return out


_PRESETS = {
    # CPU tests and the demo: builds and runs a forward in well under a second.
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rotary_dim=8,
        attn_type_list=hybrid_layout(4, period=4), num_local_experts=4, num_experts_per_tok=2,
        block_size=16, rope_theta=1e4, max_position_embeddings=4096,
        layernorm_full_attention_alpha=alpha_for_depth(4),
        layernorm_linear_attention_alpha=alpha_for_depth(4), layernorm_mlp_alpha=alpha_for_depth(4),
        dtype="float32"),
    # GPU runs: ~0.75B total / ~0.16B active parameters, the 7:1 layout, head_dim 128.
    "small": dict(
        vocab_size=32768, hidden_size=1024, intermediate_size=768, num_hidden_layers=16,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128, rotary_dim=64,
        attn_type_list=hybrid_layout(16), num_local_experts=16, num_experts_per_tok=2,
        block_size=256, max_position_embeddings=1 << 20,
        layernorm_full_attention_alpha=alpha_for_depth(16),
        layernorm_linear_attention_alpha=alpha_for_depth(16),
        layernorm_mlp_alpha=alpha_for_depth(16), layer_scan_unroll=2),
    # Exactly the released MiniMax-M1 / MiniMax-Text-01 config.json.
    "minimax-m1-456b": dict(),
}


def preset(name: str, **overrides) -> ModelConfig:
  """Named configs: "tiny", "small", "minimax-m1-456b" (exactly the released config)."""
  if name not in _PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose one of {sorted(_PRESETS)}")
  return ModelConfig(**{**_PRESETS[name], **overrides})
