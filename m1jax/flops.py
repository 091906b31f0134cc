"""Analytical inference FLOPs of decoder LMs at a given context length (paper Figure 1, right).

One generated token whose context holds t tokens (itself included) costs

  2 x the matmul parameters on its path: attention projections, MoE router, its top-k experts,
      shared experts, dense MLPs, LM head (an embedding lookup is 0 FLOPs: not counted)
  + attention over the context, per layer kind (H heads):
      softmax (GQA)    QK^T and AV over t keys           4 t H D                  linear in t
      lightning        decode step S = lam S + k^T v,     H (4 D^2 + D^2)          constant in t
                       o = q S (D^2: the decay)
      MLA, absorbed    per head, an MQA over the cached   H (2 t (r + d_rope) + 2 t r)
                       latent (r = kv_lora_rank)
      MLA, naive       MHA over decompressed k, v         H (2 t (d_nope + d_rope) + 2 t d_v)

Norms, activations, softmax exponentials and the residual adds are elementwise and not counted.
Every term is affine in t, so sums over a generation are closed-form. `Counting` switches the
conventions a FLOP count can differ by (MLA form, lightning in chunked form, no causal halving,
MLP excluded, LM head / embedding as matmuls). `DecoderArch` describes softmax-GQA / lightning /
MLA decoders with dense or MoE MLPs; `minimax_m1()`, `deepseek_r1()` and `qwen3_235b_a22b()` are
the three models of the figure.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from m1jax import config as config_lib

SOFTMAX = "softmax"
LIGHTNING = "lightning"
MLA = "mla"
LAYER_KINDS = (SOFTMAX, LIGHTNING, MLA)
MLA_FORMS = ("absorbed", "naive")
LIGHTNING_FORMS = ("recurrent", "chunked")

# Figure 1 (right) as plotted in the paper, read off the plot (docs/paper.md). The x labels
# 32K ... 128K are multiples of 1024: the paper's fitted curves reproduce the read values only so.
PAPER_FIG1_LENGTHS = (32 * 1024, 64 * 1024, 100 * 1024, 128 * 1024)
PAPER_FIG1_FLOPS = {
    "deepseek-r1": (0.62e16, 2.00e16, 4.44e16, 7.00e16),
    "qwen3-235b-a22b": (0.39e16, 1.27e16, 2.86e16, 4.53e16),
    "minimax-m1": (0.36e16, 0.77e16, 1.28e16, 1.71e16),
}
# Least-squares fits of the plotted curves: FLOPs(L) = a L + b L^2 / 2, as (a, b).
PAPER_FIG1_FITS = {
    "deepseek-r1": (7.54e10, 7.00e6),
    "qwen3-235b-a22b": (4.30e10, 4.62e6),
    "minimax-m1": (1.045e11, 3.93e5),
}


@dataclasses.dataclass(frozen=True)
class MLADims:
  """Multi-head latent attention (DeepSeek-V2/V3/R1) dimensions."""

  q_lora_rank: int  # 0: queries are projected from the hidden state directly.
  kv_lora_rank: int  # Width of the cached latent (r).
  qk_nope_head_dim: int
  qk_rope_head_dim: int  # Shared rotary key, cached beside the latent.
  v_head_dim: int


@dataclasses.dataclass(frozen=True)
class DecoderArch:
  """A decoder-only LM as far as parameters and FLOPs go. All MLPs are SwiGLU (3 matrices).

  Layers are softmax GQA (`num_heads` queries, `num_kv_heads` key/value heads of `head_dim`),
  lightning (MiniMax: q, k, v, output gate and output projection, `num_heads` x `head_dim`, inner
  RMSNorm over all heads) or MLA (`mla`). MLPs: with `num_experts` > 0, layers from
  `num_dense_layers` on are MoE (router, `experts_per_token` of `num_experts` experts of width
  `expert_width`, plus `num_shared_experts` always-on experts of width `shared_expert_width`); the
  first `num_dense_layers` layers (every layer when `num_experts` == 0) are dense of `dense_width`.
  """

  name: str
  vocab_size: int
  hidden_size: int
  layer_kinds: tuple[str, ...]
  num_heads: int
  num_kv_heads: int = 0  # Softmax layers only.
  head_dim: int = 0  # Softmax and lightning layers.
  mla: MLADims | None = None
  qk_norm: bool = False  # Per-head RMSNorm on q and k (Qwen3); parameters only.
  lightning_block_size: int = 256  # Chunk length for Counting(lightning_form="chunked").
  num_experts: int = 0
  experts_per_token: int = 0
  expert_width: int = 0
  num_shared_experts: int = 0
  shared_expert_width: int = 0
  num_dense_layers: int = 0
  dense_width: int = 0
  tie_embeddings: bool = False

  def __post_init__(self):
    object.__setattr__(self, "layer_kinds", tuple(self.layer_kinds))
    def fail(field, msg):
      raise ValueError(f"DecoderArch({self.name}).{field}={getattr(self, field)!r}: {msg}")
    for field in ("vocab_size", "hidden_size", "num_heads"):
      if getattr(self, field) <= 0:
        fail(field, "must be positive")
    if not self.layer_kinds:
      fail("layer_kinds", "needs at least one layer")
    bad = [k for k in self.layer_kinds if k not in LAYER_KINDS]
    if bad:
      fail("layer_kinds", f"unknown kind {bad[0]!r} (expected one of {LAYER_KINDS})")
    kinds = set(self.layer_kinds)
    if kinds & {SOFTMAX, LIGHTNING} and self.head_dim <= 0:
      fail("head_dim", "softmax and lightning layers need a positive head_dim")
    if SOFTMAX in kinds and (self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads):
      fail("num_kv_heads", f"must be positive and divide num_heads={self.num_heads}")
    if MLA in kinds and self.mla is None:
      fail("mla", "MLA layers need MLADims")
    if self.num_experts:
      if not 0 < self.experts_per_token <= self.num_experts:
        fail("experts_per_token", f"must be in [1, num_experts={self.num_experts}]")
      if self.expert_width <= 0:
        fail("expert_width", "must be positive for an MoE")
      if self.num_shared_experts and self.shared_expert_width <= 0:
        fail("shared_expert_width", "must be positive when num_shared_experts > 0")
    if not 0 <= self.num_dense_layers <= self.num_layers:
      fail("num_dense_layers", f"must be in [0, num_layers={self.num_layers}]")
    if (self.num_dense_layers or not self.num_experts) and self.dense_width <= 0:
      fail("dense_width", "dense MLP layers need a positive dense_width")

  @property
  def num_layers(self) -> int:
    return len(self.layer_kinds)

  def count(self, kind: str) -> int:
    """Number of layers of `kind`."""
    return sum(k == kind for k in self.layer_kinds)

  def is_moe_layer(self, layer: int) -> bool:
    return self.num_experts > 0 and layer >= self.num_dense_layers


@dataclasses.dataclass(frozen=True)
class Counting:
  """FLOP-counting conventions. The defaults are the count described in the module docstring."""

  mla_form: str = "absorbed"  # "naive": MHA over decompressed keys (d_nope + d_rope), values (d_v).
  lightning_form: str = "recurrent"  # "chunked": blockwise prefill cost 4 D (C + D) per token-head.
  causal: bool = True  # False: each of L generated tokens is charged attention over all L tokens
  #                      (the full square score matrix). Only sums over a generation use it.
  include_mlp: bool = True  # False: drop routers, experts and dense MLPs.
  include_lm_head: bool = True
  embedding_as_matmul: bool = False  # True: charge the embedding 2 V d like a one-hot matmul.

  def __post_init__(self):
    if self.mla_form not in MLA_FORMS:
      raise ValueError(f"Counting.mla_form={self.mla_form!r}: must be one of {MLA_FORMS}")
    if self.lightning_form not in LIGHTNING_FORMS:
      raise ValueError(
          f"Counting.lightning_form={self.lightning_form!r}: must be one of {LIGHTNING_FORMS}")


# ------------------------------------------------------------------------------------------------
# Parameters.
def _attention_params(arch: DecoderArch, kind: str) -> tuple[int, int]:
  """(matmul parameters, norm parameters) of one attention block of `kind`."""
  d, heads, hd = arch.hidden_size, arch.num_heads, arch.head_dim
  if kind == LIGHTNING:  # qkv (3), output gate, output projection; RMSNorm over heads * head_dim.
    return 5 * d * heads * hd, heads * hd
  if kind == SOFTMAX:
    matmul = 2 * d * heads * hd + 2 * d * arch.num_kv_heads * hd
    return matmul, 2 * hd if arch.qk_norm else 0
  m = arch.mla
  qk_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
  if m.q_lora_rank:
    q = d * m.q_lora_rank + m.q_lora_rank * heads * qk_dim
  else:
    q = d * heads * qk_dim
  kv = d * (m.kv_lora_rank + m.qk_rope_head_dim)
  kv += m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
  out = heads * m.v_head_dim * d
  return q + kv + out, m.q_lora_rank + m.kv_lora_rank


def _mlp_params(arch: DecoderArch, layer: int) -> tuple[int, int]:
  """(total, active per token) parameters of the MLP of `layer`."""
  d = arch.hidden_size
  if not arch.is_moe_layer(layer):
    return 3 * d * arch.dense_width, 3 * d * arch.dense_width
  router = d * arch.num_experts
  expert = 3 * d * arch.expert_width
  shared = arch.num_shared_experts * 3 * d * arch.shared_expert_width
  return (router + arch.num_experts * expert + shared,
          router + arch.experts_per_token * expert + shared)


def param_counts(arch: DecoderArch) -> dict[str, int]:
  """Parameter counts.

  Keys: total; embedding; lm_head (0 when tied); active_per_token (one token's path without
  embedding and LM head, norms included: the meaning of m1jax.model.param_counts); active_matmul
  (the same without norms: what FLOPs are charged on); active_with_embeddings (active_per_token
  plus embedding and LM head: the usual published "activated parameters").
  """
  embedding = arch.vocab_size * arch.hidden_size
  lm_head = 0 if arch.tie_embeddings else embedding
  final_norm = arch.hidden_size
  total = embedding + lm_head + final_norm
  active_matmul = 0
  norms = final_norm
  for layer, kind in enumerate(arch.layer_kinds):
    attn, attn_norms = _attention_params(arch, kind)
    mlp_total, mlp_active = _mlp_params(arch, layer)
    layer_norms = 2 * arch.hidden_size + attn_norms
    total += attn + mlp_total + layer_norms
    active_matmul += attn + mlp_active
    norms += layer_norms
  return {"total": total, "embedding": embedding, "lm_head": lm_head,
          "active_per_token": active_matmul + norms, "active_matmul": active_matmul,
          "active_with_embeddings": active_matmul + norms + embedding + lm_head}


# ------------------------------------------------------------------------------------------------
# FLOPs.
def flops_terms(arch: DecoderArch,
                counting: Counting = Counting()) -> dict[str, tuple[float, float]]:
  """Per-token FLOPs as affine functions of the context t: {term: (constant, per context token)}.

  Terms: attention_projections, mlp, lm_head, embedding, softmax_attention, lightning_attention,
  mla_attention. MLA projections are the same in both forms (absorbed: W_UK applied to the query
  and W_UV to the latent output, once per token; naive: both applied to the new token's latent).
  """
  d, heads, hd = arch.hidden_size, arch.num_heads, arch.head_dim
  projections = sum(_attention_params(arch, kind)[0] for kind in arch.layer_kinds)
  mlp = sum(_mlp_params(arch, layer)[1] for layer in range(arch.num_layers))
  vocab_matmul = 2.0 * arch.vocab_size * d
  if counting.lightning_form == "recurrent":
    lightning_head = 4 * hd * hd + hd * hd
  else:
    lightning_head = 4 * hd * (arch.lightning_block_size + hd)
  mla_head = 0.0
  if arch.mla is not None:
    m = arch.mla
    if counting.mla_form == "absorbed":
      mla_head = 2 * (m.kv_lora_rank + m.qk_rope_head_dim) + 2 * m.kv_lora_rank
    else:
      mla_head = 2 * (m.qk_nope_head_dim + m.qk_rope_head_dim) + 2 * m.v_head_dim
  return {
      "attention_projections": (2.0 * projections, 0.0),
      "mlp": (2.0 * mlp if counting.include_mlp else 0.0, 0.0),
      "lm_head": (vocab_matmul if counting.include_lm_head else 0.0, 0.0),
      "embedding": (vocab_matmul if counting.embedding_as_matmul else 0.0, 0.0),
      "softmax_attention": (0.0, 4.0 * heads * hd * arch.count(SOFTMAX)),
      "lightning_attention": (float(heads * lightning_head * arch.count(LIGHTNING)), 0.0),
      "mla_attention": (0.0, float(heads * mla_head * arch.count(MLA))),
  }


def _affine(arch: DecoderArch, counting: Counting) -> tuple[float, float]:
  terms = flops_terms(arch, counting).values()
  return sum(c for c, _ in terms), sum(s for _, s in terms)


def _check_at_least(name: str, value, minimum: int = 0) -> np.ndarray:
  array = np.asarray(value, dtype=np.float64)
  if np.any(array < minimum):
    raise ValueError(f"{name}={value!r}: must be >= {minimum}")
  return array


def flops_breakdown(arch: DecoderArch, t, counting: Counting = Counting()) -> dict[str, np.ndarray]:
  """FLOPs of one token at context length t (>= 1, itself included), per term. t: [...] -> [...]."""
  t = _check_at_least("t", t, minimum=1)
  return {name: c + s * t for name, (c, s) in flops_terms(arch, counting).items()}


def flops_per_token(arch: DecoderArch, t, counting: Counting = Counting()) -> np.ndarray:
  """FLOPs of one token at context length t (>= 1, itself included). t: [...] -> [...] float64."""
  t = _check_at_least("t", t, minimum=1)
  constant, slope = _affine(arch, counting)
  return constant + slope * t


def cumulative_flops(arch: DecoderArch, length, prompt_len: int = 0,
                     counting: Counting = Counting()) -> np.ndarray:
  """FLOPs to generate `length` tokens after a `prompt_len`-token prompt (prompt cost excluded).

  Causal: sum_{t=1..L} flops_per_token(prompt_len + t), in closed form. Not causal: every token is
  charged attention over the final context prompt_len + L. length: [...] -> [...] float64.
  """
  length = _check_at_least("length", length)
  prompt_len = float(_check_at_least("prompt_len", prompt_len))
  constant, slope = _affine(arch, counting)
  if counting.causal:
    context_sum = prompt_len * length + length * (length + 1) / 2
  else:
    context_sum = length * (prompt_len + length)
  return constant * length + slope * context_sum


def quadratic_fit(arch: DecoderArch, counting: Counting = Counting()) -> tuple[float, float]:
  """(a, b) with cumulative_flops(arch, L) = a L + b L^2 / 2 exactly (no prompt): the fits' form."""
  constant, slope = _affine(arch, counting)
  if counting.causal:
    return constant + slope / 2, slope
  return constant, 2 * slope


# ------------------------------------------------------------------------------------------------
# Training and kernel FLOPs (the numerators of MFU and TFLOP/s figures).
PASSES = ("fwd", "fwd+bwd")


def _check_pass(pass_: str) -> None:
  if pass_ not in PASSES:
    raise ValueError(f"pass_={pass_!r}: must be one of {PASSES}")


def training_flops_per_token(arch: DecoderArch, seq_len: int,
                             counting: Counting = Counting(lightning_form="chunked")) -> float:
  """Forward + backward FLOPs per token of a training step on sequences of `seq_len` tokens:
  3 x (a backward pass costs two forwards) the forward FLOPs of a token averaged over its causal context t = 1..seq_len (matmuls of
  the active parameters, LM head included; softmax attention over t; lightning attention in
  chunked form, counting's default)."""
  seq_len = int(_check_at_least("seq_len", seq_len, minimum=1))
  constant, slope = _affine(arch, counting)
  return 3.0 * (constant + slope * (seq_len + 1) / 2)


def lightning_attention_flops(pass_: str, batch: int, seq_len: int, heads: int, dim: int,
                              block: int) -> float:
  """Chunked lightning attention of one layer, blocks of `block` tokens: forward 4 T D (C + D)
  per head, forward + backward 14 T D (C + D) (the backward's sweeps cost 2.5 forwards)."""
  _check_pass(pass_)
  per_head = {"fwd": 4, "fwd+bwd": 14}[pass_]
  return float(per_head * seq_len * dim * (block + dim) * batch * heads)


def softmax_attention_flops(pass_: str, batch: int, seq_len: int, heads: int, dim: int) -> float:
  """Causal softmax attention of one layer: forward 2 T^2 D per head (QK^T and PV, half the
  square), forward + backward 7 T^2 D (the backward recomputes the scores)."""
  _check_pass(pass_)
  per_head = {"fwd": 2, "fwd+bwd": 7}[pass_]
  return float(per_head * seq_len ** 2 * dim * batch * heads)


# ------------------------------------------------------------------------------------------------
# The three models of Figure 1.
def arch_from_model_config(cfg: config_lib.ModelConfig, name: str = "minimax-m1") -> DecoderArch:
  """The DecoderArch of an m1jax ModelConfig (lightning / softmax layers, MoE in every layer)."""
  return DecoderArch(
      name=name, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      layer_kinds=tuple(LIGHTNING if lightning else SOFTMAX for lightning in cfg.is_lightning),
      num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
      head_dim=cfg.head_dim, lightning_block_size=cfg.block_size,
      num_experts=cfg.num_local_experts, experts_per_token=cfg.num_experts_per_tok,
      expert_width=cfg.intermediate_size, tie_embeddings=cfg.tie_word_embeddings)


def minimax_m1() -> DecoderArch:
  """MiniMax-M1 (456B total, 45.9B active) from the released config."""
  return arch_from_model_config(config_lib.preset("minimax-m1-456b"), name="minimax-m1")


def deepseek_r1() -> DecoderArch:
  """DeepSeek-R1 (= V3 architecture; 671B / 37B) from its config.json, without the MTP module."""
  return DecoderArch(
      name="deepseek-r1", vocab_size=129280, hidden_size=7168, layer_kinds=(MLA,) * 61,
      num_heads=128,
      mla=MLADims(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                  v_head_dim=128),
      num_experts=256, experts_per_token=8, expert_width=2048, num_shared_experts=1,
      shared_expert_width=2048, num_dense_layers=3, dense_width=18432)


def qwen3_235b_a22b() -> DecoderArch:
  """Qwen3-235B-A22B (235B / 22B) from its config.json: every layer MoE, q/k norms, untied."""
  return DecoderArch(
      name="qwen3-235b-a22b", vocab_size=151936, hidden_size=4096, layer_kinds=(SOFTMAX,) * 94,
      num_heads=64, num_kv_heads=4, head_dim=128, qk_norm=True,
      num_experts=128, experts_per_token=8, expert_width=1536)


def figure1_archs() -> dict[str, DecoderArch]:
  """The models of Figure 1 (right), keyed as PAPER_FIG1_FLOPS."""
  return {arch.name: arch for arch in (deepseek_r1(), qwen3_235b_a22b(), minimax_m1())}


# ------------------------------------------------------------------------------------------------
# Comparison with the paper.
CONVENTIONS = {
    "default (causal, absorbed MLA)": Counting(),
    "naive MLA": Counting(mla_form="naive"),
    "full score matrix": Counting(causal=False),
    "full score matrix, naive MLA": Counting(causal=False, mla_form="naive"),
    "chunked lightning": Counting(lightning_form="chunked"),
    "no MLP": Counting(include_mlp=False),
    "no MLP, naive MLA": Counting(include_mlp=False, mla_form="naive"),
    "embedding as matmul": Counting(embedding_as_matmul=True),
}


def compare_with_paper(archs: Mapping[str, DecoderArch], counting: Counting = Counting(),
                       prompt_len: int = 0) -> dict[str, np.ndarray]:
  """Ours vs the paper at PAPER_FIG1_LENGTHS, each value [4].

  Keys: each model name (our cumulative FLOPs); "minimax-m1/<other>" (our ratio) and
  "paper minimax-m1/<other>" (the plotted ratio) for <other> in deepseek-r1, qwen3-235b-a22b.
  """
  missing = set(PAPER_FIG1_FLOPS) - set(archs)
  if missing:
    raise ValueError(f"archs={sorted(archs)}: missing {sorted(missing)}")
  out = {name: cumulative_flops(archs[name], PAPER_FIG1_LENGTHS, prompt_len, counting)
         for name in PAPER_FIG1_FLOPS}
  paper_m1 = np.asarray(PAPER_FIG1_FLOPS["minimax-m1"])
  for other in ("deepseek-r1", "qwen3-235b-a22b"):
    out[f"minimax-m1/{other}"] = out["minimax-m1"] / out[other]
    out[f"paper minimax-m1/{other}"] = paper_m1 / np.asarray(PAPER_FIG1_FLOPS[other])
  return out
