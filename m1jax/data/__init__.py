"""Data: tokenizers, verifiable tasks (synthetic and JSONL) and grain pipelines."""

from m1jax.data import pipeline
from m1jax.data import tasks
from m1jax.data import tokenizer

__all__ = ["pipeline", "tasks", "tokenizer"]
