"""Dependencies point one way: experiments -> m1jax.train -> {rl, generate, data, convert} ->
model -> pallas_kernels (with config, sharding, flops and files as leaves under the model), and
importing the library pulls in no torch, fla or matplotlib."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Unit of the package tree -> layer; a module may import its own unit, and units of lower layers.
LAYERS = {
    "pallas_kernels": 0,
    "m1jax.config": 1, "m1jax.sharding": 1, "m1jax.flops": 1, "m1jax.files": 1,
    "m1jax.model": 2,
    "m1jax.rl": 3, "m1jax.generate": 3, "m1jax.data": 3, "m1jax.convert": 3,
    "m1jax.train": 4,
    "m1jax.analysis": 5,
}


def _unit(module: str) -> str | None:
  for unit in sorted(LAYERS, key=len, reverse=True):
    if module == unit or module.startswith(unit + "."):
      return unit
  return None


def _imports(path: pathlib.Path) -> set[str]:
  """Every module an `import` or `from ... import` names, anywhere in the file (lazy ones too)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def _edges():
  """(importing unit, imported unit, file) for every import between two units."""
  edges = []
  for package in ("m1jax", "pallas_kernels"):
    for path in sorted((ROOT / package).rglob("*.py")):
      module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
      importer = _unit(module)
      if importer is None:  # m1jax/__init__.py
        continue
      for name in _imports(path):
        assert not name.split(".")[0] in ("experiments", "configs", "tests"), (
            f"{path.relative_to(ROOT)} imports {name}: the library never imports from the checkout")
        imported = _unit(name)
        if imported is not None and imported != importer:
          edges.append((importer, imported, path.relative_to(ROOT)))
  return edges


def test_every_module_is_in_a_layer():
  for package in ("m1jax", "pallas_kernels"):
    for path in (ROOT / package).rglob("*.py"):
      module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
      assert module == "m1jax.__init__" or _unit(module), f"{module} has no layer in LAYERS"


def test_no_import_from_a_higher_layer():
  upward = [f"{file}: {a} (layer {LAYERS[a]}) imports {b} (layer {LAYERS[b]})"
            for a, b, file in _edges() if LAYERS[b] > LAYERS[a]]
  assert not upward, "\n".join(upward)


def test_no_cycle_between_units():
  graph = {}
  for a, b, _ in _edges():
    graph.setdefault(a, set()).add(b)

  def visit(unit, path):
    if unit in path:
      raise AssertionError("import cycle: " + " -> ".join(path[path.index(unit):] + [unit]))
    for nxt in sorted(graph.get(unit, ())):
      visit(nxt, path + [unit])

  for unit in sorted(graph):
    visit(unit, [])


def test_the_library_imports_no_torch_fla_or_matplotlib():
  code = ("import sys; import m1jax.train.driver, m1jax.analysis, m1jax.convert, m1jax.generate, "
          "pallas_kernels; print(sorted({m.split('.')[0] for m in sys.modules} & "
          "{'torch', 'fla', 'matplotlib', 'transformers'}))")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "[]", result.stdout
