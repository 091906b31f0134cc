"""Rule-based rewards for RL: verifiers, a name registry, weighted sums and batch scoring.

A reward function has the signature `fn(response_text, example) -> float`, where `example` is an
`m1jax.data.tasks.Example` (fields used: `answer`, `task`, `metadata`) and `response_text` is the
generated continuation decoded up to, not including, its EOS token.

  fn = get_reward_fn("math")                       # "math", "countdown", "format", "task"
  fn = combine({"task": 1.0, "format": 0.1})       # weighted sum; fn.components(...) for logging
  scores = score_responses(fn, tokenizer, response_tokens, examples, unfinished_reward=0.0)
"""

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from m1jax.rl.rewards import countdown
from m1jax.rl.rewards import format as format_rewards
from m1jax.rl.rewards import math as math_rewards

RewardFn = Callable[[str, Any], float]


def math_reward_fn(text: str, example) -> float:
  """1.0 when the final answer equals `example.answer` (see `math.is_equivalent`)."""
  return math_rewards.math_reward(text, example.answer)


# Verifier ("math" / "countdown") used by the "task" reward for each `Example.task`.
TASK_VERIFIERS = {"arithmetic": "math", "math": "math", "countdown": "countdown"}


def task_reward_fn(text: str, example) -> float:
  """The verifier that fits `example.task` (see TASK_VERIFIERS); for mixed-task datasets."""
  if example.task not in TASK_VERIFIERS:
    raise ValueError(
        f"example.task: no verifier for {example.task!r}; known: {sorted(TASK_VERIFIERS)}")
  return _REGISTRY[TASK_VERIFIERS[example.task]](text, example)


_REGISTRY: dict[str, RewardFn] = {
    "math": math_reward_fn,
    "countdown": countdown.countdown_reward,
    "format": format_rewards.format_reward,
    "task": task_reward_fn,
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
  """Weighted sum of named rewards: `sum_k weights[k] * reward_k(text, example)`."""

  def __init__(self, weights: Mapping[str, float]):
    if not weights:
      raise ValueError("weights: expected at least one reward name")
    self.weights = {name: float(w) for name, w in weights.items()}
    self._fns = {name: get_reward_fn(name) for name in self.weights}

  def components(self, text: str, example) -> dict[str, float]:
    """Each named reward, unweighted (for logging)."""
    return {name: float(fn(text, example)) for name, fn in self._fns.items()}

  def __call__(self, text: str, example) -> float:
    parts = self.components(text, example)
    return sum(self.weights[name] * value for name, value in parts.items())


def combine(weights: Mapping[str, float]) -> CombinedReward:
  """A reward that is the weighted sum of registered rewards, e.g. {"math": 1, "format": 0.1}."""
  return CombinedReward(weights)


@dataclasses.dataclass(frozen=True)
class ResponseScores:
  rewards: np.ndarray  # float32 [B]
  texts: list[str]  # decoded responses, up to their first EOS
  finished: np.ndarray  # bool [B]: the response contains EOS


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
    ResponseScores with rewards float32 [B], the decoded texts and finished bool [B].
  """
  tokens = np.asarray(response_tokens)
  if tokens.ndim != 2 or tokens.shape[0] != len(examples):
    raise ValueError(f"response_tokens: expected shape [B={len(examples)}, L], "
                     f"got {tokens.shape}")
  rewards, texts, finished = [], [], []
  for b, example in enumerate(examples):
    row = tokens[b] if lengths is None else tokens[b, :int(lengths[b])]
    eos = np.flatnonzero(row == tokenizer.eos_id)
    done = eos.size > 0
    text = tokenizer.decode(row[:eos[0]] if done else row)
    texts.append(text)
    finished.append(done)
    if not done and unfinished_reward is not None:
      rewards.append(unfinished_reward)
    else:
      rewards.append(reward_fn(text, example))
  return ResponseScores(np.asarray(rewards, np.float32), texts, np.asarray(finished, bool))
