"""bench/mutate.py, the mutation-testing command: which mutants it makes, that it tells a
killed mutant from a survivor on a toy project, that equivalent mutants are read and left
out of the score, and that bad input is one line with exit status 2."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import mutate  # noqa: E402


def kinds(src):
    return [(m.line, m.desc.rsplit(" @", 1)[0]) for m in mutate.enumerate_mutants(src, "toy.py")]


def test_mutants_of_each_kind_and_none_in_messages_or_annotations():
    src = textwrap.dedent('''\
        """docstring 1 + 2"""
        def f(a: int | None, b=2) -> int | None:
            """doc"""
            if a < b and not a:
                raise ValueError(f"bad {a + 1}")
            assert a + 1 > 0, "x"
            x = a - b * 3.0 ** 2
            x += 1
            g(x)  # pragma: no mutate
            g(x)
            print(x + 1)
            return -x, True
        ''')
    got = kinds(src)
    assert (2, "2 -> 3") in got                                    # a default value
    assert (4, "< -> <= #0") in got and (4, "and -> or") in got and (4, "drop not") in got
    assert not any(line in (1, 3, 5, 6, 9, 11) for line, _ in got), got
    for k in ("- -> +", "drop right term", "* -> /", "** -> *", "3.0 -> 6.0", "2 -> 3"):
        assert (7, k) in got, k
    assert (8, "+ -> -") in got and (8, "1 -> 2") in got
    assert (10, "delete call statement") in got
    assert (12, "drop unary -") in got and (12, "True -> False") in got
    assert not any("|" in d or "&" in d for _, d in got)          # annotations untouched


def test_each_mutant_compiles_and_changes_one_thing():
    src = "def f(a, b):\n    return a + b * 2\n"
    ms = mutate.enumerate_mutants(src, "toy.py")
    results = []
    for m in ms:
        ns = {}
        exec(mutate.mutated_code(src, "toy.py", m), ns)
        results.append((m.desc.rsplit(" @", 1)[0], ns["f"](3, 5)))
    assert dict(results) == {"+ -> -": 3 - 10, "drop right term": 3, "drop left term": 10,
                             "* -> /": 3 + 5 / 2, "2 -> 3": 3 + 15}


@pytest.fixture()
def toy(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "bench" / "equivalent_mutants").mkdir(parents=True)
    (tmp_path / "toy.py").write_text(textwrap.dedent('''\
        def add(a, b):
            return a + b


        def untested(a):
            return a * 2


        def weak(a):
            return a >= 0
        '''))
    (tmp_path / "tests" / "test_toy.py").write_text(textwrap.dedent('''\
        import toy


        def test_add():
            assert toy.add(2, 3) == 5


        def test_weak():
            assert toy.weak(5) and not toy.weak(-5) and toy.weak(0.5)
        '''))
    return tmp_path


def mutate_cli(root, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench", "mutate.py"),
                           "--root", str(root), "--no-preload", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_toy_project_killed_survived_not_run_and_equivalents(toy):
    p = mutate_cli(toy, "toy.py", "--tests", "tests/test_toy.py")
    assert p.returncode == 0, p.stderr
    # add: 3 mutants killed; untested: 2 never run; weak: >= -> > survives (0 untested), 0 -> 1 killed
    assert "| toy.py | 7 | 4 | 0 | 3 (2) | 0 | 57.1% |" in p.stdout, p.stdout
    key = [line.split("\t", 1)[1] for line in p.stdout.splitlines()
           if line.startswith("  [survived]")][0]
    assert ">= -> >" in key
    (toy / "bench" / "equivalent_mutants" / "toy.py.txt").write_text(
        f"{key}\tonly 0 tells them apart (a toy's stand-in reason)\n"
        "toy.py::gone::x = 1::1 -> 2 @4\ta stale line\n")
    p = mutate_cli(toy, "toy.py", "--tests", "tests/test_toy.py")
    assert "| toy.py | 7 | 4 | 0 | 2 (2) | 1 | 66.7% |" in p.stdout, p.stdout
    assert "stale equivalent entry" in p.stdout


def test_bad_input_is_one_line_exit_2(toy):
    cases = [(["nope.py"], "no such Python file"),
             (["toy.py"], "no tests known"),
             (["toy.py", "--tests", "tests/missing.py"], "no such test file"),
             ([], "name a file"),
             (["toy.py", "--tests", "tests/test_toy.py", "--jobs", "0"], "--jobs")]
    for args, needle in cases:
        p = mutate_cli(toy, *args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, (args, p.stderr)
    (toy / "bench" / "equivalent_mutants" / "toy.py.txt").write_text("some key without reason\n")
    p = mutate_cli(toy, "toy.py", "--tests", "tests/test_toy.py")
    assert p.returncode == 2 and "gives no reason" in p.stderr
    (toy / "tests" / "test_toy.py").write_text("def test_red():\n    assert False\n")
    (toy / "bench" / "equivalent_mutants" / "toy.py.txt").unlink()
    p = mutate_cli(toy, "toy.py", "--tests", "tests/test_toy.py")
    assert p.returncode == 2 and "fail on the unmutated" in p.stderr, p.stderr


def test_code_run_by_a_shared_fixture_counts_for_every_test_that_uses_it(toy):
    """A module-scoped fixture is built in the setup of the first test that asks for it;
    a later test reusing it must still be run against mutants of the code it executed."""
    (toy / "tests" / "test_toy.py").write_text(textwrap.dedent('''\
        import pytest

        import toy


        @pytest.fixture(scope="module")
        def result():
            return toy.add(2, 3)


        def test_first(result):
            assert result is not None


        def test_second(result):
            assert result == 5


        def test_weak():
            assert toy.weak(5) and not toy.weak(-5) and toy.weak(0.5)
        '''))
    p = mutate_cli(toy, "toy.py", "--tests", "tests/test_toy.py")
    assert p.returncode == 0, p.stderr
    assert "| toy.py | 7 | 4 | 0 | 3 (2) | 0 | 57.1% |" in p.stdout, p.stdout
