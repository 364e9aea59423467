"""The package's layers: no import circles and no upward imports.

Every ``import dsmoe...`` / ``from dsmoe... import ...`` in dsmoe/, at module
level or inside a function, is read from the source (nothing is imported).
Layers, bottom to top:

  errors, spec -> config -> model, dispatch, parallel, data (and the
  params-only checkpoint I/O, accounting, a workdir's saved config) -> generate,
  interop, train ->
  analysis, aot (ahead-of-time compiles) -> cli

A module may import from its own layer or below; the imports between
modules form no cycle.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

LAYERS = (
    ("dsmoe.errors", "dsmoe.spec"),
    ("dsmoe.config",),
    ("dsmoe.model", "dsmoe.dispatch", "dsmoe.parallel", "dsmoe.data", "dsmoe.params_io",
     "dsmoe.accounting", "dsmoe.run_config"),
    ("dsmoe.generate", "dsmoe.interop", "dsmoe.train"),
    ("dsmoe.analysis", "dsmoe.aot"),
    ("dsmoe.cli",),
)


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in (ROOT / "dsmoe").rglob("*.py"):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    out[".".join(parts)] = path
  return out


def _layer(module: str) -> int | None:
  for i, names in enumerate(LAYERS):
    if any(module == n or module.startswith(n + ".") for n in names):
      return i
  return None


def _imports(path: pathlib.Path, modules) -> set[str]:
  """The dsmoe modules `path` imports (a ``from pkg import name`` of a
  non-module name counts as an import of pkg)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.split(".")[0] in ("dsmoe", "configs")}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
        node.module.split(".")[0] in ("dsmoe", "configs")):
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        out.add(sub if sub in modules else node.module)
  return out - {"dsmoe"}  # the package's lazy entry points only


def _graph():
  modules = _modules()
  return {m: _imports(p, modules) for m, p in modules.items()}


def test_every_module_has_a_layer():
  assert [m for m in _graph() if m != "dsmoe" and _layer(m) is None] == []


def test_the_library_never_imports_the_config_files():
  """The shipped config files (dsmoe.configs) sit above everything (one reads
  an HF folder through dsmoe.interop); dsmoe.config reads them by path."""
  assert [m for m, deps in _graph().items()
          if any(d.split(".")[0] == "configs" or d.startswith("dsmoe.configs") for d in deps)] == []


def test_no_upward_imports():
  upward = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
            for m, deps in _graph().items() if _layer(m) is not None
            for d in sorted(deps) if _layer(d) is not None and _layer(d) > _layer(m)]
  assert upward == []


def test_no_import_circles():
  graph = _graph()
  index, low, stack, on_stack, circles = {}, {}, [], set(), []

  def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in graph:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        circles.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  assert circles == []
