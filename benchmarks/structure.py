"""Counts of the library's shape, the figures the rule/driver work is judged by.

    python benchmarks/structure.py            # prints a summary, writes results/structure.json

* module sizes (lines of each ``wagrad/_src`` module) and the longest functions;
* private names that cross module boundaries (``from wagrad._src.m import _x`` or
  ``m._x`` on an imported wagrad module);
* update paths outside the driver: public transforms whose code (followed through the
  module-level functions it calls, within its module) never reaches
  ``periodic.exchange_step``;
* public names at ``wagrad``'s top level and in ``wagrad.async_``.

Static (``ast``), no JAX: it reads the source.
"""
from __future__ import annotations

import ast
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "wagrad", "_src")
TRANSFORMS = ("sync_sgd", "model_averaging", "diloco", "downpour", "easgd", "eamsgd",
              "tree_easgd", "multi_leader_lsgd", "lsgd", "async_easgd", "async_lsgd",
              "staleness_aware_sgd", "wasgd", "wasgd_plus", "wpsgd")
DRIVER = "exchange_step"


def _modules():
  for name in sorted(os.listdir(SRC)):
    if name.endswith(".py") and name != "__init__.py":
      path = os.path.join(SRC, name)
      with open(path) as f:
        text = f.read()
      yield name[:-3], text, ast.parse(text)


def _functions(tree):
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node


def _private_crossings(mod, tree):
  aliases = {}
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("wagrad"):
      for a in node.names:
        if node.module == "wagrad._src":
          aliases[a.asname or a.name] = a.name
        elif a.name.startswith("_"):
          out.append(f"{mod}: from {node.module} import {a.name}")
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases and node.attr.startswith("_")):
      out.append(f"{mod}: {aliases[node.value.id]}.{node.attr}")
  return sorted(set(out))


def _calls(node):
  names = set()
  for n in ast.walk(node):
    if isinstance(n, ast.Call):
      f = n.func
      names.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None))
  return names - {None}


def _reaches_driver(fn_name, defs, seen=None):
  seen = seen or set()
  if fn_name in seen or fn_name not in defs:
    return False
  seen.add(fn_name)
  calls = _calls(defs[fn_name])
  return DRIVER in calls or any(_reaches_driver(c, defs, seen) for c in calls)


def measure():
  sizes, functions, crossings, outside = {}, [], [], []
  all_defs = {}
  for mod, text, tree in _modules():
    sizes[mod] = text.count("\n")
    for fn in _functions(tree):
      functions.append((fn.end_lineno - fn.lineno + 1, f"{mod}.{fn.name}"))
    crossings += _private_crossings(mod, tree)
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    all_defs[mod] = defs
  for mod, defs in all_defs.items():
    for t in TRANSFORMS:
      if t in defs:
        reaches = _reaches_driver(t, defs) or any(  # a transform built on another
            _reaches_driver(c, d) for c in _calls(defs[t]) for d in all_defs.values()
            if c in TRANSFORMS and c != t)
        if not reaches:
          outside.append(t)
  sys.path.insert(0, ROOT)
  import wagrad
  import wagrad.async_
  public = [n for n in dir(wagrad) if not n.startswith("_")
            and not type(getattr(wagrad, n)).__name__ == "module"]
  return {
      "module_lines": sizes,
      "modules_over_400": {m: n for m, n in sizes.items() if n > 400},
      "longest_functions": [{"lines": n, "name": f} for n, f in sorted(functions)[::-1][:10]],
      "functions_over_30": sum(n > 30 for n, _ in functions),
      "private_crossings": crossings,
      "update_paths_outside_driver": sorted(outside),
      "public_names": len(public),
      "async_names": len(wagrad.async_.__all__),
  }


def main():
  out = measure()
  os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
  with open(os.path.join(ROOT, "benchmarks", "results", "structure.json"), "w") as f:
    json.dump(out, f, indent=1)
  print(f"modules over 400 lines: {out['modules_over_400']}")
  print("longest functions: " + ", ".join(
      f"{d['name']} {d['lines']}" for d in out["longest_functions"][:5]))
  print(f"functions over 30 lines: {out['functions_over_30']}")
  print(f"private names crossing modules: {len(out['private_crossings'])}")
  print(f"update paths outside the driver: {len(out['update_paths_outside_driver'])} of "
        f"{len(TRANSFORMS)} ({', '.join(out['update_paths_outside_driver'])})")
  print(f"public names: wagrad {out['public_names']}, wagrad.async_ {out['async_names']}")


if __name__ == "__main__":
  main()
