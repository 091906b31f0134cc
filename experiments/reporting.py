"""What the benchmark and figure scripts share: the log, tables, CSV files, the versions line and
the measured hardware ceilings that MFU and "% of the HBM floor" are relative to."""

from __future__ import annotations

import ast
import dataclasses
import datetime
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from m1jax.analysis.tables import markdown_table, write_csv

__all__ = ["PEAK_BF16_FLOPS", "HBM_BYTES_PER_S", "markdown_table", "write_csv", "tee", "versions",
           "write_dataclass_csv", "write_results", "model_overrides", "median_call"]

# One H200, measured with the benchmarks here (docs/benchmarks.md): dense bf16 matmul rate and
# device-to-device copy rate.
PEAK_BF16_FLOPS = 800e12
HBM_BYTES_PER_S = 4.3e12


def tee(path: str) -> Callable[[str], None]:
  """log(msg) prints msg and appends it to `path` (flushed per line, so a cut-short run keeps
  everything it printed)."""

  def log(msg: str):
    print(msg, flush=True)
    with open(path, "a") as f:
      f.write(msg + "\n")

  return log


def versions(*extra: str) -> str:
  """"date ...; device ...; python ..., jax ..." plus the versions of the modules in `extra`."""
  parts = [f"python {platform.python_version()}", f"jax {jax.__version__}"]
  for name in extra:
    try:
      module = __import__(name)
      parts.append(f"{name} {getattr(module, '__version__', '?')}")
    except ImportError:
      parts.append(f"{name} absent")
  return (f"date {datetime.date.today()}; device {jax.devices()[0].device_kind}; "
          + ", ".join(parts))


def median_call(fn: Callable[[], object], reps: int) -> tuple[object, float]:
  """(output of the last call, median wall seconds of `reps` calls of fn after one untimed
  call); each call waits for its device work (jax.block_until_ready)."""
  out = jax.block_until_ready(fn())
  seconds = []
  for _ in range(reps):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - start)
  return out, statistics.median(seconds)


def compile_timed(jitted, *args, compiler_options: dict | None = None):
  """jitted.lower(*args).compile(compiler_options) -> (compiled, seconds of lower + compile,
  seconds of the lowering alone: tracing and lowering in jax, Pallas kernels included)."""
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile(compiler_options=compiler_options)
  return compiled, time.perf_counter() - start, lower_s


def write_dataclass_csv(path: str, rows: Sequence) -> None:
  """Rows of one dataclass type as CSV, one column per field."""
  fields = [f.name for f in dataclasses.fields(rows[0])]
  write_csv(path, fields, [[getattr(r, name) for name in fields] for r in rows])


def write_results(out_dir: str, name: str, rows: Sequence, table: str, log) -> None:
  """A benchmark's end: `rows` (dataclasses) to <out_dir>/<name>.csv, its markdown `table` to
  <name>.md and to `log`."""
  write_dataclass_csv(os.path.join(out_dir, f"{name}.csv"), rows)
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(table + "\n")
  log(table)


def _literal(text: str):
  """`text` as a Python literal (1, 0.5, True, None, ...), else the string itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def model_overrides(items: Sequence[str]) -> dict:
  """ModelConfig fields from "name=value" strings (values as Python literals, else strings):
  ["moe_gemm_impl=xla", "head_chunk_tokens=2048"] -> {"moe_gemm_impl": "xla", ...}; a
  KernelConfig field as "lightning_kernel.<field>=value" (collected into one KernelConfig). A
  name that is no such field raises ValueError naming it."""
  from m1jax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from pallas_kernels import KernelConfig  # pylint: disable=g-import-not-at-top
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  kernel_fields = {f"lightning_kernel.{f.name}" for f in dataclasses.fields(KernelConfig)}
  out, kernel = {}, {}
  for item in items:
    name, has_value, value = item.strip().partition("=")
    if not has_value or name not in fields | kernel_fields:
      raise ValueError(f"model override {item!r}: expected name=value with name a ModelConfig "
                       f"field ({', '.join(sorted(fields))}) or lightning_kernel.<field> "
                       f"({', '.join(sorted(f.split('.')[1] for f in kernel_fields))})")
    value = _literal(value)
    if name in kernel_fields:
      kernel[name.split(".", 1)[1]] = value
    else:
      out[name] = value
  if kernel:
    out["lightning_kernel"] = dataclasses.replace(out.get("lightning_kernel", KernelConfig()),
                                                  **kernel)
  return out


def model_variants(spec: str) -> list[dict]:
  """"a=1,b=x;c=2" -> [{"a": 1, "b": "x"}, {"c": 2}]: ';'-separated groups of ModelConfig
  changes, each checked by model_overrides."""
  return [model_overrides(group.split(",")) for group in spec.split(";") if group]


def _option_value(text: str):
  """An XLA option's value: true/false in any case as a bool (XLA's flag parser takes bools only
  as Python bools), else a Python literal or the string."""
  return text.lower() == "true" if text.lower() in ("true", "false") else _literal(text)


def compiler_option_sets(spec: str) -> list[dict]:
  """"xla_a=0,xla_b=false;xla_c=1" -> [{"xla_a": 0, "xla_b": False}, {"xla_c": 1}]:
  ';'-separated groups of XLA compiler options (`jax.stages.Lowered.compile(compiler_options)`).
  Each name is checked by compiling a trivial program with it, so a misspelled option stops
  here rather than after a long compile."""
  sets = []
  for group in spec.split(";"):
    if not group:
      continue
    options = {}
    for item in group.split(","):
      name, sep, value = item.partition("=")
      if not sep or not name.strip():
        raise ValueError(f"compiler option {item!r}: expected name=value")
      options[name.strip()] = _option_value(value.strip())
    try:
      jax.jit(lambda x: x + 1).lower(jnp.zeros(())).compile(compiler_options=options)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"compiler options {group!r}: {str(e).splitlines()[0]}") from None
    sets.append(options)
  return sets


def describe_overrides(changes: dict, sep: str = ",") -> str:
  """The inverse of model_overrides, for labels: {"moe_impl": "dense", "lightning_kernel":
  KernelConfig(block_size=128)} -> "moe_impl=dense,lightning_kernel.block_size=128" (a
  KernelConfig by its fields that differ from the default)."""
  parts = []
  for name, value in changes.items():
    if dataclasses.is_dataclass(value):
      default = type(value)()
      parts += [f"{name}.{f.name}={getattr(value, f.name)}" for f in dataclasses.fields(value)
                if getattr(value, f.name) != getattr(default, f.name)]
    else:
      parts.append(f"{name}={value}")
  return sep.join(parts)
