"""The packages' import structure: every module imports on its own and together with every
other (no flag defined twice), and the import graph, function-level imports included, has no
cycle."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("deepssim_jax", "ldm_jax")


def modules() -> dict[str, str]:
  """{dotted name: path} of every module of both packages."""
  out = {}
  for pkg in PACKAGES:
    for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(folder, f)
          name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
          out[name.removesuffix(".__init__")] = path
  return out


def imports_of(name: str, path: str, known) -> set[str]:
  """The package modules `name` imports anywhere in its file (function bodies included)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        base = f"{up}.{base}" if base else up
      for a in node.names:  # `from pkg import module` names the module itself
        found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
  return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Each back edge of a depth-first search, as the cycle it closes."""
  state, stack, out = {}, [], []

  def visit(u):
    state[u] = "open"
    stack.append(u)
    for v in sorted(graph[u]):
      if state.get(v) == "open":
        out.append(stack[stack.index(v):] + [v])
      elif v not in state:
        visit(v)
    stack.pop()
    state[u] = "done"

  for u in sorted(graph):
    if u not in state:
      visit(u)
  return out


def test_cycle_finder_finds_a_planted_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert cycles(graph) == [["a", "b", "c", "a"]]
  assert not cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}})


def test_import_graph_is_acyclic():
  known = modules()
  graph = {m: imports_of(m, p, known) for m, p in known.items()}
  assert graph["deepssim_jax.main"] >= {"deepssim_jax.cli", "deepssim_jax.jobs"}  # sees edges
  found = cycles(graph)
  assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_every_module_imports_together_in_a_fresh_interpreter():
  # `__main__` modules only run as scripts (python -m <package>), so they are left out.
  names = sorted(m for m in modules() if not m.endswith("__main__"))
  code = "import importlib\nfor m in %r:\n  importlib.import_module(m)\nprint('imported', len(%r))"
  r = subprocess.run([sys.executable, "-c", code % (names, names)], cwd=ROOT,
                     capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"imported {len(names)}" in r.stdout
