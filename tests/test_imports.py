"""The import graph of hybrids/, kernels/ and launch/: acyclic, and kernels/ never imports upward.

Read with ``ast`` (nothing is imported), so imports inside functions count as much as the ones at
the top of a file: a cycle hidden in a function is still a cycle. An import of ``a.b.c`` also
depends on the packages ``a`` and ``a.b`` (their ``__init__`` runs first), except those that
contain the importing module itself (already being imported); ``from a.b import c`` depends on the
module ``a.b.c`` where that is a file, else on ``a.b``. Relative imports are resolved.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOTS = ("hybrids", "kernels", "launch")


def _modules() -> dict[str, str]:
  """Module name → file, for every .py under ROOTS (packages by their ``__init__``)."""
  out = {}
  for root in ROOTS:
    for folder, dirs, files in os.walk(os.path.join(REPO, root)):
      dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
      for name in files:
        if not name.endswith(".py"):
          continue
        parts = os.path.relpath(os.path.join(folder, name), REPO)[:-3].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        out[".".join(parts)] = os.path.join(folder, name)
  return out


def _ancestors(module: str) -> set[str]:
  parts = module.split(".")
  return {".".join(parts[:i]) for i in range(1, len(parts))}


def _targets(module: str, path: str, modules: dict[str, str]):
  """(imported module, line) for every import in ``path``, at any depth, within ROOTS."""
  is_package = path.endswith("__init__.py")
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        prefix = ".".join(base + ([node.module] if node.module else []))
      else:
        prefix = node.module or ""
      names = []
      for alias in node.names:
        sub = f"{prefix}.{alias.name}"
        names.append(sub if sub in modules else prefix)
    else:
      continue
    for name in names:
      if name.split(".")[0] not in ROOTS:
        continue
      while name and name not in modules:  # (e.g. an attribute path) the nearest module
        name = name.rpartition(".")[0]
      if not name:
        continue
      yield name, node.lineno
      for parent in _ancestors(name) - _ancestors(module) - {module}:
        yield parent, node.lineno


def _graph():
  modules = _modules()
  graph = {m: {} for m in modules}
  for module, path in modules.items():
    for target, line in _targets(module, path, modules):
      if target != module:
        graph[module].setdefault(target, f"{os.path.relpath(path, REPO)}:{line}")
  return graph


def _cycle(graph) -> list[str] | None:
  """One cycle as a path of modules, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_walker_sees_function_level_and_relative_imports(tmp_path):
  pkg = tmp_path / "kernels"
  (pkg / "fam").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "fam" / "__init__.py").write_text("from . import impl\n")
  (pkg / "fam" / "impl.py").write_text("def f():\n  from kernels.fam import g\n")
  modules = {"kernels": str(pkg / "__init__.py"), "kernels.fam": str(pkg / "fam" / "__init__.py"),
             "kernels.fam.impl": str(pkg / "fam" / "impl.py")}
  edges = {m: {t for t, _ in _targets(m, p, modules)} for m, p in modules.items()}
  assert edges["kernels.fam"] == {"kernels.fam.impl"}
  assert edges["kernels.fam.impl"] == {"kernels.fam"}
  assert _cycle({m: dict.fromkeys(e) for m, e in edges.items()}) == ["kernels.fam", "kernels.fam.impl", "kernels.fam"]


def _cyclic_modules(graph) -> set[str]:
  """Every module on some cycle (the strongly connected components of more than one module)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), set()

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
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
        out.update(component)

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_kernels_and_launch_are_on_no_cycle():
  graph = _graph()
  assert sorted(m for m in _cyclic_modules(graph) if m.split(".")[0] in ("kernels", "launch")) == []
  kernels = {m: {t: l for t, l in ts.items() if t.startswith("kernels")} for m, ts in graph.items()
             if m.startswith("kernels")}
  assert _cycle(kernels) is None


def test_import_graph_is_acyclic():
  graph = _graph()
  cycle = _cycle(graph)
  where = [graph[a][b] for a, b in zip(cycle, cycle[1:])] if cycle else []
  assert cycle is None, f"import cycle {' -> '.join(cycle)} ({', '.join(where)})"


def test_kernels_never_import_models_or_the_launcher():
  upward = [(module, target, line) for module, targets in _graph().items() if module.split(".")[0] == "kernels"
            for target, line in targets.items() if target.split(".")[0] in ("hybrids", "launch")]
  assert upward == []


def test_every_kernel_family_is_a_folder_with_its_implementations():
  modules = _modules()
  for family, files in {"scan": ("reference", "xla", "pallas", "mosaic_gpu", "bench"),
                        "gla": ("reference", "xla", "pallas", "mosaic_gpu", "bench"),
                        "delta": ("reference", "xla", "pallas", "bench"),
                        "window_attention": ("reference", "xla", "pallas", "mosaic_gpu", "cudnn", "bench")}.items():
    for name in files:
      assert f"kernels.{family}.{name}" in modules, (family, name)
