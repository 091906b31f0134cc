"""Where a compiled program's device time goes: the XLA profiler's per-kernel times, each kernel
attributed to the model component whose code emitted it.

`profile(compiled, args, reps, classify)` runs a compiled program `reps` times under
`jax.profiler` and reads the trace back (`jax.profiler.ProfileData`, no TensorBoard needed).
Every device event carries the HLO instruction it ran (`hlo_op`); the compiled module's text maps
each instruction to its `op_name`, the JAX name stack (`jit(f)/Transformer/.../layer_3/moe/
experts/pallas_call`), and `classify(op_name)` names its component. Times are per call:

- kernel ms: the sum of the kernels' durations (kernels on different streams can overlap, so
  the sum can exceed the wall time);
- busy ms: the union of the intervals in which some kernel ran;
- wall ms: the calls' wall time over `reps`; wall - busy is the device idle in between (launch
  gaps, host work, synchronisation).

On CPU the trace holds the thunk executor's events instead of kernels; they are read the same
way (leaf events only: a while loop's event encloses its body's). On GPU, kernels launched from
a command buffer (CUDA graph) name the buffer as their hlo_op; they are matched by kernel name,
which XLA shares between identical fusions, so such a kernel's phase (prefill / decode) can be
the other fusion's (docs/benchmarks.md).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import tempfile
import time
from typing import Callable, Sequence

import jax

from m1jax.config import ModelConfig

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OP_NAME = re.compile(r"op_name=\"([^\"]*)\"")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_MODULE = re.compile(r"^HloModule\s+([\w.\-]+)", re.M)


@dataclasses.dataclass
class ComponentTime:
  component: str
  kernels: int  # kernel launches per call
  kernel_ms: float  # summed kernel time per call
  share: float  # of the summed kernel time of all components


@dataclasses.dataclass
class OpTime:
  hlo_op: str
  component: str
  op_name: str
  kernels: int
  kernel_ms: float


@dataclasses.dataclass
class Profile:
  wall_ms: float
  busy_ms: float
  kernel_ms: float
  components: list[ComponentTime]
  top_ops: list[OpTime]
  lines: dict[str, int]  # events read per trace line, over all calls


def op_names(hlo_text: str) -> tuple[str, dict[str, str]]:
  """(module name, {HLO instruction name: op_name}) from a compiled module's text. A fusion
  without metadata of its own takes the op_name of the first instruction inside it that has
  one."""
  module = _MODULE.search(hlo_text)
  names, calls, first_in = {}, {}, {}
  computation = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, rest = match.groups()
    op_name = _OP_NAME.search(rest)
    if op_name:
      names[name] = op_name.group(1)
      first_in.setdefault(computation, op_name.group(1))
    else:
      called = _CALLS.search(rest)
      if called:
        calls[name] = called.group(1)
  for name, computation in calls.items():
    if computation in first_in:
      names[name] = first_in[computation]
  return (module.group(1) if module else ""), names


def _leaf_ops(line, module: str) -> list[tuple[int, int, str, str]]:
  """(start ns, end ns, hlo_op, event name) of the HLO-op events of `module` on one trace line
  that enclose no other such event. The event name of a GPU kernel is the kernel's: XLA names
  a fusion's kernel after the fusion, which identifies the op when hlo_op names only the
  command buffer (CUDA graph) that launched it."""
  events = []
  for e in line.events:
    stats = dict(e.stats)
    if e.duration_ns > 0 and "hlo_op" in stats and stats.get("hlo_module", module) == module:
      events.append((int(e.start_ns), int(e.start_ns + e.duration_ns), str(stats["hlo_op"]),
                     str(e.name)))
  events.sort(key=lambda e: (e[0], -e[1]))
  return [event for i, event in enumerate(events)
          if not (i + 1 < len(events) and events[i + 1][0] < event[1]
                  and events[i + 1][1] <= event[1])]


def _busy_ns(intervals: list[tuple[int, int]]) -> int:
  busy, reach = 0, None
  for start, end in sorted(intervals):
    if reach is None or start > reach:
      busy += end - start
      reach = end
    elif end > reach:
      busy += end - reach
      reach = end
  return busy


def device_events(trace_dir: str, module: str) -> tuple[list[tuple[int, int, str, str]], dict]:
  """(start ns, end ns, hlo_op, event name) of every device event of HLO module `module` in the newest
  trace under trace_dir, and the count of them per trace line ("plane/line"). GPU: the kernels
  on the device planes; CPU: the leaf events of the host threads (where XLA:CPU runs its
  thunks)."""
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise RuntimeError(f"the profiler wrote no trace under {trace_dir}")
  data = jax.profiler.ProfileData.from_file(files[-1])
  planes = list(data.planes)
  device = [p for p in planes if p.name.startswith("/device:")]
  out, per_line = [], collections.Counter()
  for plane in device or [p for p in planes if p.name.startswith("/host:")]:
    for line in plane.lines:
      ops = _leaf_ops(line, module)
      if ops:
        per_line[f"{plane.name}/{line.name}"] += len(ops)
      out.extend(ops)
  return out, dict(per_line)


def profile(compiled, args: Sequence, reps: int, classify: Callable[[str], str],
            top: int = 25) -> Profile:
  """Runs `compiled(*args)` once untimed, then `reps` times under the profiler; per-call times
  by component (`classify(op_name)`), and the `top` HLO ops by kernel time. Donated arguments
  are not supported (each call reuses `args`)."""
  module, names = op_names(compiled.as_text())
  jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for _ in range(reps):
      jax.block_until_ready(compiled(*args))
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    events, lines = device_events(trace_dir, module)
  if not events:
    raise RuntimeError(f"the trace holds no device events of module {module!r}")
  by_kernel_name = {name.replace(".", "_").replace("-", "_"): name for name in names}
  per_op = collections.defaultdict(lambda: [0, 0])
  for start, end, op, kernel in events:
    if op not in names:  # a command buffer's hlo_op: the kernel's name says which op it ran
      op = by_kernel_name.get(kernel.replace(".", "_").replace("-", "_"), kernel)
    per_op[op][0] += 1
    per_op[op][1] += end - start
  by_component = collections.defaultdict(lambda: [0, 0])
  ops = []
  for op, (count, ns) in per_op.items():
    op_name = names.get(op, "")
    component = (classify(op_name) if op_name else
                 "copies (no op_name: layout, loop carries)" if "copy" in op else "unattributed")
    by_component[component][0] += count
    by_component[component][1] += ns
    ops.append(OpTime(op, component, op_name, count // reps, ns / reps / 1e6))
  total_ns = sum(ns for _, ns in by_component.values())
  components = sorted(
      (ComponentTime(c, count // reps, ns / reps / 1e6, ns / total_ns)
       for c, (count, ns) in by_component.items()), key=lambda c: -c.kernel_ms)
  ops.sort(key=lambda o: -o.kernel_ms)
  return Profile(wall_ms=1e3 * wall / reps,
                 busy_ms=_busy_ns([event[:2] for event in events]) / reps / 1e6,
                 kernel_ms=total_ns / reps / 1e6, components=components, top_ops=ops[:top],
                 lines=lines)


def model_classifier(cfg: ModelConfig) -> Callable[[str], str]:
  """op_name -> component of the model, its sampler and its train step, from the name scopes
  of m1jax (Flax module paths; "lm_head", "router", "dispatch", "experts", "combine", "sample",
  "optimizer", "compute_params"). Phases of generate ("prefill", "decode", "refill") prefix the component."""
  kinds = cfg.is_lightning[:cfg.layer_period]

  def component(op_name: str) -> str:
    # "transpose(jvp(Transformer))" -> "Transformer": transforms wrap a scope's name.
    parts = [re.sub(r"^(?:[\w<>]+\()+", "", p).rstrip(")") for p in op_name.split("/")]
    phase = next((p for p in parts if p in ("prefill", "decode", "refill")), "")
    name = _component(parts, kinds)
    return f"{phase}: {name}" if phase else name

  return component


def _component(parts: list[str], kinds: Sequence[bool]) -> str:
  if "compute_params" in parts:
    return "weights cast to the compute dtype"
  if "optimizer" in parts:
    return "optimizer update"
  if "lm_head" in parts:
    return "LM head + log-probs"
  if "sample" in parts:
    return "sampling"
  for i, part in enumerate(parts):
    match = re.fullmatch(r"layer_(\d+)", part)
    if match:
      below = parts[i + 1:]
      kind = "lightning" if kinds[int(match.group(1))] else "softmax"
      if "attn" in below:
        return f"{kind} attention"
      if "moe" in below:
        for scope, name in (("router", "MoE router"), ("experts", "MoE expert GEMMs"),
                            ("dispatch", "MoE dispatch (sort, gather)"),
                            ("combine", "MoE combine (unsort, weights)")):
          if scope in below:
            return name
        return "MoE other"
      return "norms + residuals"
  if "final_norm" in parts:
    return "norms + residuals"
  if "_take" in parts and "Transformer" in parts:
    return "embedding"
  if "Transformer" in parts:
    return "model, outside the layers"
  return "other"


def component_table(result: Profile) -> str:
  from experiments import reporting
  rows = [[c.component, c.kernels, f"{c.kernel_ms:.3f}", f"{100 * c.share:.1f}%"]
          for c in result.components]
  rows.append(["all kernels", sum(c.kernels for c in result.components),
               f"{result.kernel_ms:.3f}", "100%"])
  rows.append(["device busy (union of kernel intervals)", "", f"{result.busy_ms:.3f}",
               f"{100 * result.busy_ms / result.wall_ms:.0f}% of wall"])
  rows.append(["wall", "", f"{result.wall_ms:.3f}", ""])
  return reporting.markdown_table(["component", "kernels per call", "ms per call", "share"], rows)


def ops_table(result: Profile) -> str:
  from experiments import reporting
  shorten = lambda s: s if len(s) <= 90 else "..." + s[-87:]
  return reporting.markdown_table(
      ["HLO op", "component", "kernels", "ms per call", "op_name"],
      [[o.hlo_op, o.component, o.kernels, f"{o.kernel_ms:.3f}", shorten(o.op_name)]
       for o in result.top_ops])


def per_step_table(result: Profile, prefix: str, steps: int) -> str:
  """The components whose name starts with `prefix` (a phase of generate), per loop step."""
  from experiments import reporting
  chosen = [c for c in result.components if c.component.startswith(prefix)]
  total = sum(c.kernel_ms for c in chosen)
  rows = [[c.component[len(prefix):], f"{c.kernels / steps:.1f}", f"{c.kernel_ms / steps:.4f}",
           f"{100 * c.kernel_ms / total:.1f}%"] for c in chosen]
  rows.append(["all", f"{sum(c.kernels for c in chosen) / steps:.1f}", f"{total / steps:.4f}",
               "100%"])
  return reporting.markdown_table(["component", "kernels per step", "ms per step", "share"], rows)
