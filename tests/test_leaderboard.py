"""bench/leaderboard.py: every applicable algorithm on one federation, same budget and
seeds, into one table; each row is a `run.py --seeds` folder that gets only the flags its
algorithm reads; algorithms that do not apply are left out with the reason; bad flags are
one line before anything runs; --resume continues. Tiny budgets (seconds)."""
import os
import shutil
import sys

import numpy as np
import pytest

from helpers import drop_seconds, read_json

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import leaderboard  # noqa: E402

TINY = ["--seeds", "0", "1", "--image-size", "16", "--clients", "3", "--rounds", "2",
        "--local-steps", "2", "--batch-size", "16", "--no-plots"]
CLIP = ("clip_linear", "clip_zeroshot", "fedclip", "fedmedclip")


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lb") / "out")
    assert leaderboard.main(["--out", out, "--mu", "0.5"] + TINY) == 0
    return out


def test_every_applicable_algorithm_is_a_row_and_the_others_say_why(board):
    rec = read_json(os.path.join(board, "leaderboard.json"))
    rows = [g["label"] for g in rec["groups"]]
    assert rows[:5] == ["fedavg", "fedprox", "fedbn", "local", "pooled"]
    for name in ("fcu", "fedal", "fedlsm", "facmic"):
        assert name in rec["left_out"] and name not in rows
    for name in CLIP:                                  # run where CLIP weights are offline
        assert (name in rows) != (name in rec["left_out"])
        if name in rec["left_out"]:
            assert "--pretrained FILE" in rec["left_out"][name]
    md = open(os.path.join(board, "leaderboard.md")).read()
    assert "| fedbn | 2 |" in md and "Left out:" in md and "* fcu: a protocol" in md
    assert ("* pooled: 2 rounds x 2 local steps, batch 16, sgd lr 0.01, --model cnn; synthetic "
            "(3 clients, 16 px)") in md                 # what each row ran
    g = rec["groups"][0]
    s = [read_json(os.path.join(board, "fedavg", f"seed-{k}", "summary.json")) for k in (0, 1)]
    assert np.isclose(g["figures"]["balanced_accuracy"]["mean"],
                      np.mean([x["balanced_accuracy"] for x in s]))


def test_each_row_gets_the_flags_its_algorithm_reads(board):
    def config(row):
        return read_json(os.path.join(board, row, "seed-1", "config.json"))
    for row in ("fedavg", "fedprox", "fedbn", "local", "pooled"):
        c = config(row)
        assert c["config"]["seed"] == 1 and c["config"]["rounds"] == 2
        assert c["config"]["local_steps"] == 2 and c["data"]["clients"] == 3
        assert c["data"]["image_size"] == 16
    assert config("fedprox")["algorithm_args"]["mu"] == 0.5        # --mu: fedprox only
    assert config("fedavg")["algorithm_args"] == {}
    assert config("fedbn")["config"]["bn"] == "local" and config("fedavg")["config"]["bn"] == "average"


def test_a_row_run_py_refuses_is_left_out_with_its_error(tmp_path):
    out = str(tmp_path / "o")
    assert leaderboard.main(["--out", out, "--algos", "fedavg,fedprox", "--mu", "abc"] + TINY) == 0
    rec = read_json(os.path.join(out, "leaderboard.json"))
    assert [g["label"] for g in rec["groups"]] == ["fedavg"]
    assert "argument --mu: invalid float value" in rec["left_out"]["fedprox"]


@pytest.mark.parametrize("flags, needle", [
    (["--seed", "3"], "--seed is set by the leaderboard"),
    (["--bogus"], "--bogus: not a flag of run.py"),
    (["--algos", "fedavg,nope"], "--algos 'nope' is not a row"),
    (["--seeds", "1", "1"], "seed 1 is given twice"),
    (["--algos", "fcu"], "no row to run: every algorithm asked for is left out"),
])
def test_bad_flags_are_one_line_before_anything_runs(tmp_path, capsys, flags, needle):
    out = str(tmp_path / "o")
    rc = leaderboard.main(["--out", out] + TINY + flags)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not os.path.exists(out)


def test_resume_reruns_only_what_is_missing_and_a_full_out_is_refused(tmp_path, capsys):
    out = str(tmp_path / "o")
    argv = ["--out", out, "--algos", "fedavg,local"] + TINY
    assert leaderboard.main(argv) == 0
    before = read_json(os.path.join(out, "leaderboard.json"))
    capsys.readouterr()
    assert leaderboard.main(argv) == 2
    assert "pass --resume to continue" in capsys.readouterr().err
    shutil.rmtree(os.path.join(out, "local"))               # as if stopped before that row
    assert leaderboard.main(argv + ["--resume"]) == 0
    after = read_json(os.path.join(out, "leaderboard.json"))
    assert drop_seconds(after["groups"]) == drop_seconds(before["groups"])
