"""Rule-based rewards for RL: verifiers, a name registry, weighted sums and batch scoring.

A reward function has the signature `fn(response_text, example) -> float`, where `example` is an
`m1jax.data.tasks.Example` (fields used: `answer`, `task`, `metadata`) and `response_text` is the
generated continuation decoded up to, not including, its EOS token.

  fn = get_reward_fn("math")                # "math", "countdown", "code", "format", "task"
  fn = combine({"task": 1.0, "format": 0.1})       # weighted sum; fn.components(...) for logging
  fn = combine({"task": 1.0}, {"code": code.CodeReward(code.CodeSettings(workers=4))})
  scores = score_responses(fn, tokenizer, response_tokens, examples, unfinished_reward=0.0)

A reward may also score a whole batch at once: `fn.batch(texts, examples) -> [float]` (the code
reward runs its programs concurrently that way); `score_batch` uses it where present.
"""

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from m1jax.rl.rewards import code
from m1jax.rl.rewards import countdown
from m1jax.rl.rewards import format as format_rewards
from m1jax.rl.rewards import math as math_rewards

RewardFn = Callable[[str, Any], float]


def math_reward_fn(text: str, example) -> float:
  """1.0 when the final answer equals `example.answer` (see `math.is_equivalent`)."""
  return math_rewards.math_reward(text, example.answer)


# Verifier ("math" / "countdown") used by the "task" reward for each `Example.task`.
TASK_VERIFIERS = {"arithmetic": "math", "math": "math", "countdown": "countdown",
                  "code": "code"}


def score_batch(fn: RewardFn, texts: Sequence[str], examples: Sequence[Any]) -> np.ndarray:
  """float32 [B]: `fn.batch(texts, examples)` where fn has it, else fn on each pair."""
  if hasattr(fn, "batch"):
    values = fn.batch(list(texts), list(examples))
  else:
    values = [fn(text, example) for text, example in zip(texts, examples)]
  return np.asarray(values, np.float32).reshape(len(texts))


class TaskReward:
  """The verifier that fits `example.task` (see TASK_VERIFIERS); for mixed-task datasets.
  `resolve(name)` gives the verifier for a name (default: the registry)."""

  def __init__(self, resolve: Callable[[str], RewardFn] | None = None):
    self._resolve = resolve or (lambda name: get_reward_fn(name))

  def _verifier(self, example) -> str:
    if example.task not in TASK_VERIFIERS:
      raise ValueError(
          f"example.task: no verifier for {example.task!r}; known: {sorted(TASK_VERIFIERS)}")
    return TASK_VERIFIERS[example.task]

  def __call__(self, text: str, example) -> float:
    return self._resolve(self._verifier(example))(text, example)

  def batch(self, texts: Sequence[str], examples: Sequence[Any]) -> np.ndarray:
    """Each verifier scores its examples as one batch."""
    out = np.zeros(len(texts), np.float32)
    names = [self._verifier(example) for example in examples]
    for name in sorted(set(names)):
      rows = [i for i, n in enumerate(names) if n == name]
      out[rows] = score_batch(self._resolve(name), [texts[i] for i in rows],
                              [examples[i] for i in rows])
    return out


_REGISTRY: dict[str, RewardFn] = {
    "math": math_reward_fn,
    "countdown": countdown.countdown_reward,
    "code": code.CodeReward(),  # default settings; the sandbox is checked on first use
    "format": format_rewards.format_reward,
    "task": TaskReward(),
}


def register_reward(name: str, fn: RewardFn) -> None:
  """Adds a reward under `name` (for `get_reward_fn` and `combine`); names are unique."""
  if name in _REGISTRY:
    raise ValueError(f"name: a reward called {name!r} is already registered")
  _REGISTRY[name] = fn


def get_reward_fn(name: str) -> RewardFn:
  """The reward registered as `name`."""
  if name not in _REGISTRY:
    raise ValueError(f"name: unknown reward {name!r}; expected one of {sorted(_REGISTRY)}")
  return _REGISTRY[name]


class CombinedReward:
  """Weighted sum of named rewards: `sum_k weights[k] * reward_k(text, example)`.

  `configured` maps names to reward instances used instead of the registry's (e.g. a CodeReward
  with the run's limits); the "task" reward and `self.task` resolve through it too.
  """

  def __init__(self, weights: Mapping[str, float],
               configured: Mapping[str, RewardFn] | None = None):
    if not weights:
      raise ValueError("weights: expected at least one reward name")
    self.weights = {name: float(w) for name, w in weights.items()}
    self.configured = dict(configured or {})
    self.task = TaskReward(self.resolve)  # correctness, whatever the weights
    self._fns = {name: self.resolve(name) for name in self.weights}

  def resolve(self, name: str) -> RewardFn:
    if name == "task":
      return self.task
    return self.configured[name] if name in self.configured else get_reward_fn(name)

  def components(self, text: str, example) -> dict[str, float]:
    """Each named reward, unweighted (for logging)."""
    return {name: float(fn(text, example)) for name, fn in self._fns.items()}

  def components_batch(self, texts: Sequence[str], examples: Sequence[Any]
                       ) -> dict[str, np.ndarray]:
    """Each named reward over a batch, unweighted: float32 [B] per name."""
    return {name: score_batch(fn, texts, examples) for name, fn in self._fns.items()}

  def batch(self, texts: Sequence[str], examples: Sequence[Any]) -> np.ndarray:
    parts = self.components_batch(texts, examples)
    return sum(self.weights[name] * value for name, value in parts.items())

  def __call__(self, text: str, example) -> float:
    parts = self.components(text, example)
    return sum(self.weights[name] * value for name, value in parts.items())


def combine(weights: Mapping[str, float],
            configured: Mapping[str, RewardFn] | None = None) -> CombinedReward:
  """A reward that is the weighted sum of registered rewards, e.g. {"math": 1, "format": 0.1};
  `configured`: instances to use for some names (see CombinedReward)."""
  return CombinedReward(weights, configured)


@dataclasses.dataclass(frozen=True)
class ResponseScores:
  rewards: np.ndarray  # float32 [B]
  texts: list[str]  # decoded responses, up to their first EOS
  finished: np.ndarray  # bool [B]: the response contains EOS
  # float32 [B] per named reward of a CombinedReward (unweighted; 0 where unfinished_reward
  # applied), else empty
  components: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)


def score_responses(
    reward_fn: RewardFn,
    tokenizer,
    response_tokens,
    examples: Sequence[Any],
    *,
    lengths=None,
    unfinished_reward: float | None = None,
) -> ResponseScores:
  """Decodes a batch of generated responses and scores each against its example.

  Args:
    reward_fn: `fn(text, example) -> float`.
    tokenizer: anything with `decode(ids)` and `eos_id` (see `m1jax.data.tokenizer`).
    response_tokens: int [B, L] generated tokens only (no prompt), padded after EOS.
    examples: the B examples the prompts came from.
    lengths: optional int [B]; only `response_tokens[b, :lengths[b]]` is read.
    unfinished_reward: when not None, the reward of responses without EOS (e.g. 0.0 to make
      running out of length never pay); when None they are scored like the others.

  Returns:
    ResponseScores with rewards float32 [B], the decoded texts, finished bool [B] and, for a
    CombinedReward, its components. The scored rows go to the reward as one batch
    (`score_batch`).
  """
  tokens = np.asarray(response_tokens)
  if tokens.ndim != 2 or tokens.shape[0] != len(examples):
    raise ValueError(f"response_tokens: expected shape [B={len(examples)}, L], "
                     f"got {tokens.shape}")
  texts, finished = [], []
  for b in range(len(examples)):
    row = tokens[b] if lengths is None else tokens[b, :int(lengths[b])]
    eos = np.flatnonzero(row == tokenizer.eos_id)
    done = eos.size > 0
    texts.append(tokenizer.decode(row[:eos[0]] if done else row))
    finished.append(done)
  finished = np.asarray(finished, bool)
  scored = np.arange(len(examples))
  if unfinished_reward is not None:
    scored = np.flatnonzero(finished)
  rewards = np.full(len(examples), unfinished_reward or 0.0, np.float32)
  components = {}
  args = [texts[i] for i in scored], [examples[i] for i in scored]
  if isinstance(reward_fn, CombinedReward):
    parts = reward_fn.components_batch(*args)
    for name, values in parts.items():
      components[name] = np.zeros(len(examples), np.float32)
      components[name][scored] = values
    if scored.size:
      rewards[scored] = sum(reward_fn.weights[name] * values for name, values in parts.items())
  elif scored.size:
    rewards[scored] = score_batch(reward_fn, *args)
  return ResponseScores(rewards, texts, finished, components)
