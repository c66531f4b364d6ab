"""run.py --seeds: one results folder per seed (OUT/seed-S, each the run that --seed S
makes), and the mean +- sd table over the seeds (OUT/seeds.json, OUT/seeds.md), recomputed
here by hand from the seeds' summary.json; bad combinations are one line before any data
is read; a second invocation never mixes two sets of seeds."""
import os

import numpy as np
import pytest

import run
from helpers import drop_seconds, one_line_error, read_json

TINY = ["--image-size", "16", "--clients", "3", "--rounds", "2", "--local-steps", "2",
        "--batch-size", "16", "--quiet"]


def cli(*flags):
    return run.main(TINY + list(flags))


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("seeds") / "out")
    assert cli("--seeds", "0", "1", "--out", out) == 0
    return out


def test_each_seed_is_the_run_of_that_seed_and_the_table_is_their_mean_and_sd(two_seeds, tmp_path):
    out = two_seeds
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == \
        ["seed-0", "seed-1", "seeds.json", "seeds.md"]
    s = [read_json(os.path.join(out, f"seed-{k}", "summary.json")) for k in (0, 1)]
    for k in (0, 1):
        assert read_json(os.path.join(out, f"seed-{k}", "config.json"))["config"]["seed"] == k
    alone = str(tmp_path / "alone")                    # --seed 1 by itself: the same run
    assert cli("--seed", "1", "--out", alone) == 0
    assert drop_seconds(read_json(os.path.join(alone, "summary.json"))) == drop_seconds(s[1])
    rec = read_json(os.path.join(out, "seeds.json"))
    assert rec["seeds"] == [0, 1] and rec["status"] == "done"
    for key, mine in (("balanced_accuracy", [x["balanced_accuracy"] for x in s]),
                      ("pooled_balanced_accuracy", [x["pooled_balanced_accuracy"] for x in s]),
                      ("balanced_accuracy_lastk", [x["balanced_accuracy_last2"] for x in s]),
                      ("macro_auroc", [x["macro_auroc"] for x in s]),
                      ("bytes_up", [x["bytes_up"] for x in s]),
                      ("client:site1", [x["clients"]["site1"]["balanced_accuracy"] for x in s])):
        f = rec["figures"][key]
        assert f["values"] == mine
        assert np.isclose(f["mean"], (mine[0] + mine[1]) / 2)
        assert np.isclose(f["sd"], abs(mine[0] - mine[1]) / np.sqrt(2))   # ddof = 1
    md = open(os.path.join(out, "seeds.md")).read()
    ba = rec["figures"]["balanced_accuracy"]
    assert f"| client BA (mean over clients) | {ba['mean']:.3f} +- {ba['sd']:.3f} |" in md
    assert "pooled = one global model on every client's test set, joined" in md


@pytest.mark.parametrize("flags, needle", [
    (["--seeds", "0", "1", "--seed", "2"], "--seeds and --seed exclude each other"),
    (["--seeds", "0", "1", "0"], "seed 0 is given twice"),
    (["--seeds", "-1", "2"], "seeds must be >= 0"),
    (["--seeds", "0", "1", "--stop-after", "1"], "--stop-after does not apply with --seeds"),
    (["--seeds"], "--seeds: expected at least one argument"),
])
def test_bad_seed_flags_are_one_line_before_the_data(tmp_path, capsys, flags, needle):
    out = str(tmp_path / "o")                           # the data flags are bad too: not read
    rc = run.main(["--dataset", "isic2019", "--data-dir", str(tmp_path / "absent"),
                   "--out", out] + flags)
    one_line_error(capsys, rc, needle, out=out)


def test_a_second_invocation_never_mixes_seeds(two_seeds, capsys):
    out = two_seeds
    one_line_error(capsys, cli("--seeds", "2", "--out", out), "already holds results")
    one_line_error(capsys, cli("--seeds", "0", "2", "--resume", "--out", out),
                   "holds the runs of --seeds 0 1")
    one_line_error(capsys, cli("--resume", "--out", out), "add those --seeds")
    one_line_error(capsys, cli("--seeds", "0", "--resume", "--out", os.path.join(out, "seed-0")),
                   "not the folder of a --seeds run")
    assert read_json(os.path.join(out, "seeds.json"))["seeds"] == [0, 1]


def test_resume_starts_a_missing_seed_and_rereads_finished_ones(tmp_path):
    out = str(tmp_path / "o")
    assert cli("--seeds", "0", "1", "--out", out) == 0
    before = read_json(os.path.join(out, "seeds.json"))
    import shutil
    shutil.rmtree(os.path.join(out, "seed-1"))          # as if killed before seed 1 began
    assert cli("--seeds", "0", "1", "--resume", "--out", out) == 0
    after = read_json(os.path.join(out, "seeds.json"))
    assert drop_seconds(after["figures"]) == drop_seconds(before["figures"])
    assert cli("--seeds", "3", "--overwrite", "--out", out) == 0      # replaces all of it
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == \
        ["seed-3", "seeds.json", "seeds.md"]


def test_a_data_error_leaves_no_folder(tmp_path, capsys):
    out = str(tmp_path / "o")
    rc = run.main(["--dataset", "isic2019", "--data-dir", str(tmp_path / "absent"), "--seeds",
                   "0", "1", "--out", out, "--quiet"])
    one_line_error(capsys, rc, "--data-dir", out=out)
