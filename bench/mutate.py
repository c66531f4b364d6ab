"""Mutation testing: change one token of one file, run that file's tests, repeat.

    python bench/mutate.py algorithms/fcu.py                 # one file, its default tests
    python bench/mutate.py algorithms/fcu.py --tests tests/test_fcu_reference.py tests/test_fcu.py
    python bench/mutate.py --all                             # every file of algorithms/ and clip_adapters.py
    python bench/mutate.py algorithms/fcu.py --list          # the mutants, without running anything

A test suite earns trust only if it turns red when the method is wrong (DESIGN.md, "Tests
that can fail"). This script measures that. For every mutant of FILE it runs FILE's tests
and reports killed (some test failed or errored), survived (every test passed) or timed out
(ran past --timeout-factor times the unmutated tests' time, e.g. an endless loop: counted
with the killed ones, as the mutant did change behaviour).

Mutations, one at a time (single tokens, plus the two "wiring" mutations the issue asks
for): arithmetic operators (+ -, * /, // /, ** *, % //, & |, ^ |), augmented assignments
likewise, a term dropped from a + or - (a + b -> a, a + b -> b, a - b -> a), comparisons
(< <=, > >=, == !=, is / is not, in / not in), and / or, `not x` -> x, `-x` -> x,
integers n -> n + 1, floats x -> 2x (0.0 -> 1.0), True / False, and a call statement
deleted (`opt.step()` -> `pass`, i.e. a periodic step skipped). Not mutated: strings,
docstrings, type annotations, `raise` and `assert` statements (messages and internal
invariants), f-strings, `print` calls, the `if __name__ == "__main__"` block, and any line
marked `# pragma: no mutate`.

How it runs: the parent imports the heavy third-party modules (torch, numpy, open_clip,
scikit-learn, pytest) once and forks a child per mutant; the child imports the project
with the mutated module compiled from memory (an import hook: nothing on disk changes, so
runs can proceed in parallel and a killed run leaves no trace) and runs pytest in-process
with -x. A first, unmutated run records which tests execute each line of FILE (a line
tracer on that file only); a mutant then runs only the tests that execute the statement
it lives in, in the order given (put the fast, specific reference tests first). A mutant
on a line no test executes survives without running ("not run" in the table). Tests that
start `python run.py` in a subprocess do not see mutants; in-process tests do.

Equivalent mutants (no observable behaviour can differ) are listed, one per line, as
`KEY<TAB>reason` in bench/equivalent_mutants/<FILE with / replaced by .>.txt; KEY is what
this script prints for a survivor. They are reported apart and left out of the score;
a listed key that no longer matches a mutant is reported as stale. Score = (killed +
timed out) / (mutants - equivalent).

Bad input (an unknown file, a file with no tests, a test file that does not exist, tests
that fail before any mutation) is a one-line error with exit status 2.
"""
from __future__ import annotations

import argparse
import ast
import copy
import glob
import importlib.abc
import importlib.util
import os
import re
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# FILE -> its tests (globs, in run order: reference tests first). A file not listed here
# needs --tests.
TESTS = {
    "algorithms/fedavg.py": ["tests/test_baselines_reference.py", "tests/test_core.py",
                             "tests/test_export.py"],
    "algorithms/fedprox.py": ["tests/test_baselines_reference.py", "tests/test_core.py",
                              "tests/test_export.py"],
    "algorithms/local.py": ["tests/test_baselines_reference.py", "tests/test_core.py",
                            "tests/test_export.py"],
    "algorithms/pooled.py": ["tests/test_baselines_reference.py", "tests/test_core.py",
                             "tests/test_export.py"],
    "algorithms/clip_zeroshot.py": ["tests/test_clip_reference*.py", "tests/test_clip.py",
                                    "tests/test_clip_isic.py"],
    "algorithms/clip_linear.py": ["tests/test_clip_reference*.py", "tests/test_clip.py",
                                  "tests/test_clip_isic.py"],
    "algorithms/fedclip.py": ["tests/test_clip_reference*.py", "tests/test_clip.py",
                              "tests/test_clip_isic.py"],
    "algorithms/facmic.py": ["tests/test_clip_reference*.py", "tests/test_clip.py",
                             "tests/test_clip_isic.py"],
    "algorithms/fedmedclip.py": ["tests/test_clip_reference*.py", "tests/test_clip.py",
                                 "tests/test_clip_isic.py"],
    "clip_adapters.py": ["tests/test_clip_units.py", "tests/test_clip_loading.py",
                         "tests/test_clip_reference*.py", "tests/test_clip.py",
                         "tests/test_clip_isic.py"],
    "algorithms/fcu.py": ["tests/test_fcu_reference*.py", "tests/test_fcu.py"],
    "algorithms/pga.py": ["tests/test_pga.py", "tests/test_fcu_reference*.py", "tests/test_fcu.py"],
    "unlearning_audit.py": ["tests/test_unlearning_audit.py", "tests/test_fcu_reference*.py",
                            "tests/test_fcu.py"],
    "algorithms/fedlsm.py": ["tests/test_fedlsm_reference*.py", "tests/test_fedlsm.py"],
    "algorithms/fedal.py": ["tests/test_fedal_reference*.py", "tests/test_fedal.py"],
    "algorithms/fedmic.py": ["tests/test_fedmic_reference*.py", "tests/test_fedmic.py"],
    "algorithms/fgasl.py": ["tests/test_fgasl_reference.py", "tests/test_fgasl_units.py",
                            "tests/test_fgasl.py",
                            "tests/test_ssl_baselines.py", "tests/test_loco.py"],
    "algorithms/fixmatch.py": ["tests/test_ssl_baselines.py"],
    "algorithms/meanteacher.py": ["tests/test_ssl_baselines.py"],
    "algorithms/clip_svm.py": ["tests/test_clip_svm_reference.py", "tests/test_clip_svm.py",
                               "tests/test_clip_svm_ham.py"],
    "fedmed.py": ["tests/test_core.py", "tests/test_*.py"],
    "datasets.py": ["tests/test_datasets.py", "tests/test_isic2019.py"],
    "models.py": ["tests/test_core.py", "tests/test_*.py"],
}
HEAVY = ("numpy", "torch", "torchvision", "open_clip", "sklearn.metrics", "sklearn.svm",
         "sklearn.linear_model", "sklearn.pipeline", "sklearn.preprocessing",
         "PIL.Image", "pytest", "_pytest.python")


class Bad(Exception):
    """A usage error: one line, exit status 2."""


# ---------------------------------------------------------------- the mutants

BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
         ast.FloorDiv: ast.Div, ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv,
         ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitOr}
CMPOP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
         ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
         ast.In: ast.NotIn, ast.NotIn: ast.In}
SYM = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//",
       ast.Pow: "**", ast.Mod: "%", ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^",
       ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
       ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in",
       ast.And: "and", ast.Or: "or"}


def _stringy(node) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant)
                                               and isinstance(node.value, (str, bytes)))


def _skip_subtrees(tree) -> set:
    """ids of nodes whose whole subtree is never mutated."""
    skip = set()

    def mark(n):
        for s in ast.walk(n):
            skip.add(id(s))
    for n in ast.walk(tree):
        if isinstance(n, (ast.Raise, ast.Assert, ast.JoinedStr)):
            mark(n)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if n.returns is not None:
                mark(n.returns)
            for a in n.args.args + n.args.kwonlyargs + n.args.posonlyargs + \
                    [x for x in (n.args.vararg, n.args.kwarg) if x]:
                if a.annotation is not None:
                    mark(a.annotation)
        elif isinstance(n, ast.AnnAssign):
            mark(n.annotation)
        elif isinstance(n, ast.Expr) and _stringy(n.value):
            mark(n)                                              # docstrings
        elif (isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
              and isinstance(n.value.func, ast.Name) and n.value.func.id == "print"):
            mark(n)
        elif (isinstance(n, ast.If) and isinstance(n.test, ast.Compare)
              and isinstance(n.test.left, ast.Name) and n.test.left.id == "__name__"):
            mark(n)
    return skip


def _qualnames(tree) -> dict:
    """id(node) -> the qualified name of the def/class it lives in ('' at module level)."""
    out = {}

    def visit(n, q):
        for c in ast.iter_child_nodes(n):
            if isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                cq = f"{q}.{c.name}" if q else c.name
                out[id(c)] = q
                visit(c, cq)
            else:
                out[id(c)] = q
                visit(c, q)
    visit(tree, "")
    return out


def _statements(tree) -> dict:
    """id(node) -> (first line, last line) of the innermost statement holding it."""
    out = {}

    def visit(n, span):
        for c in ast.iter_child_nodes(n):
            s = (c.lineno, c.end_lineno) if isinstance(c, ast.stmt) else span
            if isinstance(c, (ast.If, ast.While, ast.For, ast.With, ast.FunctionDef,
                              ast.AsyncFunctionDef, ast.ClassDef, ast.Try)):
                # a compound statement's own expressions live on its header line(s)
                body_start = min((b.lineno for b in getattr(c, "body", [])), default=c.lineno)
                s = (c.lineno, max(c.lineno, body_start - 1))
            out[id(c)] = s
            visit(c, s)
    visit(tree, (1, 1))
    return out


def _candidates(node, parent_field):
    """(description, apply) pairs for one node; apply(node) returns the replacement node
    (or the same node, changed in place)."""
    out = []
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BINOP:
        if not (isinstance(node, ast.BinOp) and (_stringy(node.left) or _stringy(node.right))):
            new = BINOP[type(node.op)]
            desc = f"{SYM[type(node.op)]} -> {SYM[new]}"

            def apply(n, new=new):
                n.op = new()
                return n
            out.append((desc, apply))
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)) \
            and not (_stringy(node.left) or _stringy(node.right)):
        out.append(("drop right term", lambda n: n.left))
        if isinstance(node.op, ast.Add):
            out.append(("drop left term", lambda n: n.right))
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in CMPOP:
                new = CMPOP[type(op)]

                def apply(n, i=i, new=new):
                    n.ops[i] = new()
                    return n
                out.append((f"{SYM[type(op)]} -> {SYM[new]} #{i}", apply))
    if isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And

        def apply(n, new=new):
            n.op = new()
            return n
        out.append((f"{SYM[type(node.op)]} -> {SYM[new]}", apply))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        out.append(("drop not" if isinstance(node.op, ast.Not) else "drop unary -",
                    lambda n: n.operand))
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool):
            out.append((f"{v} -> {not v}", lambda n: ast.Constant(not n.value)))
        elif isinstance(v, int):
            out.append((f"{v} -> {v + 1}", lambda n: ast.Constant(n.value + 1)))
        elif isinstance(v, float):
            nv = v * 2 if v != 0 else 1.0
            out.append((f"{v!r} -> {nv!r}", lambda n, nv=nv: ast.Constant(nv)))
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        out.append(("delete call statement", lambda n: ast.Pass()))
    return out


class Mutant:
    __slots__ = ("index", "node_index", "cand", "key", "line", "span", "desc", "text")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


def _walk(tree):
    """Nodes with (parent, field, position) in a deterministic order."""
    out = []

    def visit(n):
        for field, value in ast.iter_fields(n):
            if isinstance(value, list):
                for i, c in enumerate(value):
                    if isinstance(c, ast.AST):
                        out.append((c, n, field, i))
                        visit(c)
            elif isinstance(value, ast.AST):
                out.append((value, n, field, None))
                visit(value)
    visit(tree)
    return out


def enumerate_mutants(source: str, relpath: str) -> list:
    tree = ast.parse(source)
    lines = source.splitlines()
    skip = _skip_subtrees(tree)
    qual = _qualnames(tree)
    stmts = _statements(tree)
    mutants = []
    for ni, (node, parent, field, pos) in enumerate(_walk(tree)):
        if id(node) in skip or not hasattr(node, "lineno"):
            continue
        text = lines[node.lineno - 1]
        if "pragma: no mutate" in text:
            continue
        text = re.sub(r"\s{2,}#.*$", "", text)          # a key survives comment edits
        for ci, (desc, _) in enumerate(_candidates(node, field)):
            full = f"{desc} @{node.col_offset}"
            key = f"{relpath}::{qual.get(id(node), '')}::{text.strip()}::{full}"
            mutants.append(Mutant(index=len(mutants), node_index=ni, cand=ci, key=key,
                                  line=node.lineno, span=stmts.get(id(node), (node.lineno,) * 2),
                                  desc=full, text=text.strip()))
    return mutants


def mutated_code(source: str, path: str, m: Mutant):
    tree = ast.parse(source)
    node, parent, field, pos = _walk(tree)[m.node_index]
    _, apply = _candidates(node, field)[m.cand]
    new = apply(node)
    if new is not node:
        if pos is None:
            setattr(parent, field, new)
        else:
            getattr(parent, field)[pos] = new
    ast.fix_missing_locations(tree)
    for n in ast.walk(new):
        if not hasattr(n, "lineno"):
            ast.copy_location(n, node)
    return compile(tree, path, "exec")


# ---------------------------------------------------------------- running tests in a child

class _Hook(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports module `name` from a code object held in memory."""

    def __init__(self, name, path, code):
        self.name, self.path, self.code = name, path, code

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            spec = importlib.util.spec_from_loader(fullname, self, origin=self.path)
            if fullname.rsplit(".", 1)[-1] != fullname:   # a module inside a package
                pass
            return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__file__ = self.path
        exec(self.code, module.__dict__)


class _Coverage:
    """pytest plugin: which tests execute which lines of one file (plus the lines that
    run at import/collection time, outside any test)."""

    def __init__(self, path):
        self.path = path
        self.current = "<import>"
        self.lines = {}                                    # line -> [nodeid, ...]
        self.durations = {}
        self.order = []
        self.failed = []

    def _local(self, frame, event, arg):
        if event == "line":
            s = self.lines.setdefault(frame.f_lineno, [])
            if not s or s[-1] != self.current:
                if self.current not in s:
                    s.append(self.current)
        return self._local

    def _global(self, frame, event, arg):
        if frame.f_code.co_filename == self.path:
            self._local(frame, "line", None)
            return self._local
        return None

    def pytest_collection_finish(self, session):
        self.order = [it.nodeid for it in session.items]

    def pytest_runtest_logstart(self, nodeid, location):
        self.current = nodeid

    def pytest_runtest_setup(self, item):
        """Code run while a test's fixtures are set up may build a module- or
        session-scoped fixture that later tests of the file reuse: it counts as executed
        by every test of that file (recorded as '<setup>FILE')."""
        self.current = "<setup>" + item.nodeid.split("::")[0]

    def pytest_runtest_call(self, item):
        self.current = item.nodeid

    def pytest_runtest_logreport(self, report):
        self.durations[report.nodeid] = self.durations.get(report.nodeid, 0) + report.duration
        if report.failed:
            self.failed.append(report.nodeid)

    def pytest_runtest_logfinish(self, nodeid, location):
        self.current = "<import>"

    def start(self):
        sys.settrace(self._global)
        import threading
        threading.settrace(self._global)

    def stop(self):
        sys.settrace(None)


def _quiet_child():
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)


def _pytest_args(ids):
    return ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "--no-header",
            "-W", "ignore", *ids]


def _fork(target) -> int:
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            code = target()
        except BaseException:
            code = 3
        finally:
            os._exit(code if isinstance(code, int) else 3)
    return pid


def baseline(modname, path, source, test_files, workdir):
    """Run the tests on the unmutated file in a child; returns (ok, coverage record)."""
    import json
    import tempfile
    rfd, rpath = tempfile.mkstemp(prefix="mutate-baseline-", suffix=".json")
    os.close(rfd)
    code = compile(source, path, "exec")

    def child():
        _quiet_child()
        os.chdir(workdir)
        sys.meta_path.insert(0, _Hook(modname, path, code))
        import pytest
        cov = _Coverage(path)
        cov.start()
        rc = pytest.main(["-q", "-p", "no:cacheprovider", "-W", "ignore", *test_files],
                         plugins=[cov])
        cov.stop()
        with open(rpath, "w") as f:
            json.dump({"rc": int(rc), "lines": {str(k): v for k, v in cov.lines.items()},
                       "durations": cov.durations, "order": cov.order,
                       "failed": cov.failed}, f)
        return 0
    pid = _fork(child)
    _, status = os.waitpid(pid, 0)
    with open(rpath) as f:
        text = f.read()
    os.unlink(rpath)
    if not text:
        raise Bad(f"the unmutated tests crashed ({' '.join(test_files)}): run them with pytest")
    rec = json.loads(text)
    return rec


def select_tests(m: Mutant, rec) -> list | None:
    """The tests that execute the mutant's statement, in run order; None = not executed
    by any test; ['*'] = executed at import time (every test)."""
    hit = set()
    for line in range(m.span[0], m.span[1] + 1):
        hit.update(rec["lines"].get(str(line), []))
    if not hit:
        return None
    if "<import>" in hit:
        return ["*"]
    files = {h[len("<setup>"):] for h in hit if h.startswith("<setup>")}
    return [t for t in rec["order"] if t in hit or t.split("::")[0] in files]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="mutate.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="files to mutate, relative to the repository root")
    ap.add_argument("--all", action="store_true",
                    help="every file of algorithms/ and clip_adapters.py")
    ap.add_argument("--tests", nargs="+", help="test files to run (default: the file's own)")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    ap.add_argument("--only", nargs="+",
                    help="run only the mutants whose key contains one of these")
    ap.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    ap.add_argument("--timeout-factor", type=float, default=4.0,
                    help="a mutant times out after this many times its tests' unmutated "
                         "time, plus 10 s (default 4)")
    ap.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)
    ap.add_argument("--quiet", action="store_true", help="no per-mutant progress lines")
    ap.add_argument("--no-preload", action="store_true", help=argparse.SUPPRESS)
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        return run(args)
    except Bad as e:
        print(f"mutate.py: {e}", file=sys.stderr)
        return 2


def _resolve(args):
    root = os.path.abspath(args.root)
    files = list(args.files)
    if args.all:
        files += sorted(os.path.relpath(p, root) for p in glob.glob(f"{root}/algorithms/*.py")
                        if not p.endswith("__init__.py"))
        files.append("clip_adapters.py")
    if not files:
        raise Bad("name a file to mutate (e.g. algorithms/fedavg.py) or give --all")
    if args.jobs < 1:
        raise Bad(f"--jobs {args.jobs}: give 1 or more")
    plans = []
    for f in files:
        rel = os.path.relpath(os.path.abspath(os.path.join(root, f)) if not os.path.isabs(f)
                              else f, root)
        path = os.path.join(root, rel)
        if not (rel.endswith(".py") and os.path.isfile(path)) or rel.startswith(".."):
            raise Bad(f"{f}: no such Python file in {root} (give e.g. algorithms/fedavg.py)")
        if args.tests:
            tests = []
            for t in args.tests:
                if not os.path.isfile(os.path.join(root, t)):
                    raise Bad(f"--tests {t}: no such test file under {root}")
                tests.append(t)
        else:
            tests = []
            for pat in TESTS.get(rel, []):
                for t in sorted(glob.glob(os.path.join(root, pat))):
                    t = os.path.relpath(t, root)
                    if t not in tests:
                        tests.append(t)
            if not tests:
                raise Bad(f"{rel}: no tests known for this file; pass --tests tests/test_....py")
        plans.append((rel, path, tests))
    return root, plans


def load_equivalents(root, rel) -> dict:
    p = os.path.join(root, "bench", "equivalent_mutants", rel.replace("/", ".") + ".txt")
    out = {}
    if os.path.isfile(p):
        with open(p) as f:
            for line in f:
                line = line.rstrip("\n")
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                key, _, reason = line.partition("\t")
                if not reason.strip():
                    raise Bad(f"{p}: the line for {key[:60]}... gives no reason (KEY<TAB>reason)")
                out[key] = reason.strip()
    return out, p


def run(args) -> int:
    root, plans = _resolve(args)
    if args.list:
        for rel, path, tests in plans:
            with open(path) as f:
                ms = enumerate_mutants(f.read(), rel)
            if args.only:
                ms = [m for m in ms if any(o in m.key for o in args.only)]
            for m in ms:
                print(f"{m.line:5d}  {m.desc:28s}  {m.key}")
            print(f"{rel}: {len(ms)} mutants")
        return 0
    sys.path.insert(0, root)
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"   # the tests use no plugin; saves ~1 s a mutant
    for mod in HEAVY[-2:] if args.no_preload else HEAVY:   # imported once, shared by each child
        try:
            __import__(mod)
        except Exception:
            pass
    rows = []
    for rel, path, tests in plans:
        rows.append(mutate_file(args, root, rel, path, tests))
    print()
    print("| file | mutants | killed | timed out | survived (not run) | equivalent | score |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['file']} | {r['mutants']} | {r['killed']} | {r['timeout']} | "
              f"{r['survived']} ({r['not_run']}) | {r['equivalent']} | {r['score']:.1%} |")
    return 0


def mutate_file(args, root, rel, path, tests):
    with open(path) as f:
        source = f.read()
    modname = rel[:-3].replace("/", ".")
    mutants = enumerate_mutants(source, rel)
    equiv, equiv_path = load_equivalents(root, rel)
    if args.only:
        mutants = [m for m in mutants if any(o in m.key for o in args.only)]
    t0 = time.time()
    rec = baseline(modname, path, source, tests, root)
    if rec["rc"] != 0 or rec["failed"]:
        raise Bad(f"the tests fail on the unmutated {rel} ({', '.join(rec['failed'][:3]) or 'rc ' + str(rec['rc'])}); "
                  f"fix them before mutating")
    base_s = time.time() - t0
    print(f"{rel}: {len(mutants)} mutants, tests {' '.join(tests)} "
          f"({len(rec['order'])} tests, {base_s:.1f} s unmutated)", flush=True)
    results = {}
    queue = []
    for m in mutants:
        sel = select_tests(m, rec)
        if sel is None:
            results[m.index] = "not run"
            continue
        ids = tests if sel == ["*"] else sel
        est = (sum(rec["durations"].values()) if sel == ["*"] else
               sum(rec["durations"].get(t, 0) for t in sel))
        queue.append((m, ids, args.timeout_factor * est + 10 + (2 if sel != ["*"] else 5)))
    running = {}                                   # pid -> (mutant, deadline)
    done = 0
    while queue or running:
        while queue and len(running) < args.jobs:
            m, ids, limit = queue.pop(0)
            try:
                code = mutated_code(source, path, m)
            except Exception:                      # a mutant that does not compile
                results[m.index] = "killed"
                continue

            def child(code=code, ids=ids):
                _quiet_child()
                os.chdir(root)
                sys.meta_path.insert(0, _Hook(modname, path, code))
                import pytest
                return int(pytest.main(_pytest_args(ids)))
            pid = _fork(child)
            running[pid] = (m, time.time() + limit)
        time.sleep(0.02)
        for pid, (m, deadline) in list(running.items()):
            got, status = os.waitpid(pid, os.WNOHANG)
            if got == 0:
                if time.time() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    results[m.index] = "timeout"
                else:
                    continue
            else:
                rc = os.waitstatus_to_exitcode(status)
                results[m.index] = "survived" if rc == 0 else "killed"
            del running[pid]
            done += 1
            if not args.quiet and results[m.index] == "survived" and m.key not in equiv:
                print(f"  survived  L{m.line}  {m.desc}: {m.text[:90]}", flush=True)
    surv, counts = [], {"killed": 0, "timeout": 0, "survived": 0, "not run": 0, "equivalent": 0}
    keys = {m.key for m in mutants}
    for m in mutants:
        r = results[m.index]
        if r in ("survived", "not run") and m.key in equiv:
            counts["equivalent"] += 1
            continue
        if m.key in equiv and r not in ("survived", "not run"):
            print(f"  note: listed as equivalent but {r}: {m.key}")
        counts[r] += 1
        if r in ("survived", "not run"):
            surv.append((m, r))
    stale = [k for k in equiv if k not in keys] if not args.only else []
    total = len(mutants)
    denom = total - counts["equivalent"]
    score = (counts["killed"] + counts["timeout"]) / denom if denom else 1.0
    if surv:
        print(f"{rel}: {len(surv)} surviving mutants (KEY, to kill with a test or list in "
              f"{os.path.relpath(equiv_path, root)} with a reason):")
        for m, r in surv:
            print(f"  [{r}] L{m.line}\t{m.key}")
    for k in stale:
        print(f"  stale equivalent entry (no such mutant any more): {k}")
    print(f"{rel}: {total} mutants, {counts['killed']} killed, {counts['timeout']} timed out, "
          f"{counts['survived'] + counts['not run']} survived ({counts['not run']} on lines no "
          f"test runs), {counts['equivalent']} equivalent: score {score:.1%} "
          f"({time.time() - t0:.0f} s)", flush=True)
    return {"file": rel, "mutants": total, "killed": counts["killed"],
            "timeout": counts["timeout"], "survived": counts["survived"] + counts["not run"],
            "not_run": counts["not run"], "equivalent": counts["equivalent"], "score": score}


if __name__ == "__main__":
    sys.exit(main())
