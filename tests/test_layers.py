"""The project's modules depend on each other one way (issue #19):

    run.py -> algorithms/* -> clip_adapters.py / models.py -> datasets.py -> fedmed.py
    (results.py: -> datasets, fedmed; bench/ and tests/ sit above all of them)

fedmed.py, the core, imports no module of the project (no method, no model zoo, no data
code): a method plugs into it through `fedmed.register`, the model zoo through
`fedmed.set_model_factory`. Checked statically (every import statement, at module level
or inside a function, of every project module) and at run time (importing each module
alone in a fresh interpreter, recording which project modules it pulls in)."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("fedmed", "datasets", "models", "clip_adapters", "results", "run")
ALGOS = sorted(f"algorithms.{p.stem}" for p in (ROOT / "algorithms").glob("*.py")
               if p.stem != "__init__")
MODULES = TOP + ("algorithms",) + tuple(ALGOS)


def path_of(mod: str) -> Path:
    if mod == "algorithms":
        return ROOT / "algorithms" / "__init__.py"
    return ROOT / (mod.replace(".", "/") + ".py")


def imports_of(mod: str) -> set:
    """The project modules that `mod` names in any import statement (module level or in
    a function body; `from algorithms import x` counts as algorithms.x)."""
    tree = ast.parse(path_of(mod).read_text())
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n in MODULES and n != mod:
                out.add(n)
    return out


def graph() -> dict:
    return {m: imports_of(m) for m in MODULES}


def cycle(g: dict):
    """One import cycle of `g` as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        state[m] = "done"
        stack.pop()
        return None
    for m in sorted(g):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    g = graph()
    assert cycle(g) is None, " -> ".join(cycle(g))


def test_the_core_imports_no_module_of_the_project():
    """fedmed.py imports no method (algorithms/), no model zoo (models, clip_adapters),
    no data code (datasets), no results or command-line code."""
    assert imports_of("fedmed") == set()


def test_the_layers_point_one_way():
    """Each module imports only modules of a lower layer."""
    layer = {"fedmed": 0, "datasets": 1, "clip_adapters": 2, "models": 3, "results": 2,
             "algorithms": 4, "run": 6, **{a: 5 for a in ALGOS}}
    g = graph()
    wrong = [(m, n) for m, ns in g.items() for n in ns if layer[n] >= layer[m]
             and not (m.startswith("algorithms.") and n.startswith("algorithms."))]
    assert not wrong, wrong


def loaded_by(mod: str) -> list:
    """The project modules in sys.modules after importing `mod` alone, in a fresh
    interpreter (function-level imports not run)."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import {mod}; import json; "
            f"print(json.dumps(sorted(m for m in sys.modules if m in {list(MODULES)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(ROOT), env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_core_alone_loads_nothing_else_of_the_project():
    assert loaded_by("fedmed") == ["fedmed"]
    assert loaded_by("datasets") == ["datasets", "fedmed"]


def test_the_registry_is_filled_from_the_algorithms_package_and_models_plug_in():
    """algorithms.load_all() registers every method file; the core's default model
    (Algorithm.build_model) is the factory models.py hands it when imported."""
    code = ("import sys; sys.path.insert(0, %r); import fedmed; assert not fedmed.ALGORITHMS; "
            "import algorithms; algorithms.load_all(); import models; "
            "assert fedmed.model_factory() is models.build; print(sorted(fedmed.ALGORITHMS))"
            % str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(ROOT), env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert out.returncode == 0, out.stderr
    names = eval(out.stdout.strip().splitlines()[-1])              # noqa: S307 - our own output
    assert {"fedavg", "fedprox", "fedlsm", "fedal", "fcu"} <= set(names)
