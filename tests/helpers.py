"""Small helpers shared by the test files (imported as `helpers`: pytest puts tests/ on
sys.path)."""
import json
import os


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(s) for s in f]


def drop_seconds(obj):
    """The same record without its wall-clock fields (the only ones allowed to differ
    between two runs of one seed)."""
    if isinstance(obj, dict):
        return {k: drop_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [drop_seconds(v) for v in obj]
    return obj


def one_line_error(capsys, code, *needles, out=None):
    """A usage error as run.py must give it: exit status 2, one line on stderr naming
    every needle, and (when `out` is given) no results folder written."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    if out is not None:
        assert not os.path.exists(out), out
    return err
