"""The package's import graph: every module imports on its own (no import-order dependence), and the top-level
imports of its modules form no cycle (a cycle works or breaks depending on which module is imported first)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import vismmoe

PKG_DIR = os.path.dirname(vismmoe.__file__)


def package_modules(root: str = PKG_DIR, name: str = "vismmoe") -> dict[str, str]:
    """Dotted module name -> file of every module of the package under `root` (packages by their __init__)."""
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith((".", "__")))
        rel = os.path.relpath(d, root)
        base = name if rel == "." else name + "." + rel.replace(os.sep, ".")
        if "__init__.py" not in files:
            continue
        for f in sorted(files):
            if f.endswith(".py"):
                out[base if f == "__init__.py" else f"{base}.{f[:-3]}"] = os.path.join(d, f)
    return out


def top_level_imports(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """Modules of the package that `module` imports when it is imported: its module-level import statements
    (not those inside functions or under `if TYPE_CHECKING`), each resolved to the deepest package module it
    names; importing `a.b.c` imports the packages `a.b` and `a` too."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_pkg = path.endswith("__init__.py")
    here = module if is_pkg else module.rpartition(".")[0]
    names: set[str] = set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    src = f"{base}.{node.module}" if node.module else base
                else:
                    src = node.module
                names.add(src)
                names.update(f"{src}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, (ast.With,)):
                visit(node.body)

    visit(tree.body)
    out = set()
    for n in names:
        parts = n.split(".")
        for i in range(1, len(parts) + 1):       # the module and every package above it
            m = ".".join(parts[:i])
            if m in modules and m != module:
                out.add(m)
    return out


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                comps.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return comps


def package_graph(root: str = PKG_DIR, name: str = "vismmoe") -> dict[str, set[str]]:
    mods = package_modules(root, name)
    graph = {m: top_level_imports(m, p, mods) for m, p in mods.items()}
    # a package's __init__ is imported before any of its modules: the module does not depend on it the other way
    for m in graph:
        graph[m] = {d for d in graph[m] if not m.startswith(d + ".")}
    return graph


def test_no_import_cycle_among_top_level_imports():
    cycles = import_cycles(package_graph())
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n")       # inside a function: not top level
    (pkg / "c.py").write_text("from .d import x\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n"
                              "from .c import y\n")
    assert import_cycles(package_graph(str(pkg), "cyc")) == [["cyc.c", "cyc.d"]]


def test_every_module_imports_on_its_own():
    """Each module imported with none of the package imported before it (third-party modules stay loaded, which
    keeps this fast): a module that works only after another was imported fails here."""
    mods = [m for m in package_modules() if not m.endswith("__main__")]
    code = ("import importlib, sys, traceback\n"
            f"failed = []\nfor m in {mods!r}:\n"
            "    for k in [k for k in sys.modules if k == 'vismmoe' or k.startswith('vismmoe.')]:\n"
            "        del sys.modules[k]\n"
            "    try:\n        importlib.import_module(m)\n"
            "    except Exception as e:\n        failed.append(f'{m}: {type(e).__name__}: {e}')\n"
            "print('\\n'.join(failed))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", out.stdout
