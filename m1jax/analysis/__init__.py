"""Measurements behind the paper's figures that run the model (scripts in experiments/figures/)."""

from m1jax.analysis import mismatch

__all__ = ["mismatch"]
