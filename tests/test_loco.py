"""run.py --leave-one-out: the leave-one-centre-out protocol for any algorithm (issue #15,
fgasl.md section 3 "Protocol" and 11.7): one fold per client, each a normal run in
OUT/fold-NAME/seed-S holding that client out; the table of the unseen centre and of the
training clients' own test sets; reruns with --resume skip finished runs and continue
interrupted ones."""
import json
import os

import pytest

import fedmed
import run
from helpers import one_line_error, read_json

BASE = ["--unlabeled-fraction", "0.6", "--image-size", "16", "--clients", "3",
        "--local-steps", "2", "--batch-size", "8", "--quiet"]


def test_every_fold_is_a_normal_run_and_the_table_reads_them(tmp_path):
    """D folds (3 clients -> 3 folds) x 2 seeds; each fold's config.json holds that client
    out, its metrics.jsonl evaluates it as holdout; loco.json's per-fold figures are the
    mean over seeds of each run's summary (unseen BA, training clients' BA) and the mean
    row is the mean over seeds of the per-seed mean over folds."""
    out = str(tmp_path / "loco")
    assert run.main(["--algo", "fedavg", "--rounds", "1", "--leave-one-out", "--seeds", "0", "1",
                     "--out", out] + BASE) == 0
    rec = read_json(os.path.join(out, "loco.json"))
    assert rec["folds"] == ["site0", "site1", "site2"] and rec["seeds"] == [0, 1]
    assert rec["status"] == "done"
    per_seed = {0: [], 1: []}
    for fold in rec["folds"]:
        vals, trains = [], []
        for seed in (0, 1):
            sub = os.path.join(out, f"fold-{fold}", f"seed-{seed}")
            cfg = read_json(os.path.join(sub, "config.json"))
            assert cfg["data"]["holdout_client"] == fold and cfg["config"]["seed"] == seed
            assert cfg["holdout"] == [fold] and fold not in cfg["clients"]
            s = read_json(os.path.join(sub, "summary.json"))
            vals.append(s["holdout"][fold]["balanced_accuracy"])
            trains.append(s["balanced_accuracy"])
            per_seed[seed].append(s["holdout"][fold]["balanced_accuracy"])
        got = rec["per_fold"][fold]
        assert got["unseen_ba"]["values"] == vals
        assert abs(got["unseen_ba"]["mean"] - sum(vals) / 2) < 1e-12
        assert abs(got["train_ba"]["mean"] - sum(trains) / 2) < 1e-12
    means = [sum(v) / 3 for v in per_seed.values()]
    assert abs(rec["mean"]["unseen_ba"]["mean"] - sum(means) / 2) < 1e-12
    md = open(os.path.join(out, "loco.md")).read()
    assert "| site1 |" in md and "mean over folds" in md


def test_resume_skips_finished_runs_and_continues_an_interrupted_one(tmp_path):
    """A finished fold is not retrained (its checkpoint untouched); a fold stopped after
    round 1 is continued to round 2 and ends with the weights of an uninterrupted run."""
    out = str(tmp_path / "loco")
    args = ["--algo", "fedavg", "--rounds", "2", "--leave-one-out", "site0,site1",
            "--out", out] + BASE
    assert run.main(args) == 0
    a = os.path.join(out, "fold-site0", "seed-0", "checkpoint.pt")
    b = os.path.join(out, "fold-site1", "seed-0")
    want = fedmed.load_checkpoint(os.path.join(b, "checkpoint.pt"))["server"]
    assert run.main(["--algo", "fedavg", "--rounds", "2", "--holdout-client", "site1",
                     "--seed", "0", "--stop-after", "1", "--overwrite", "--out", b] + BASE) == 0
    assert not os.path.exists(os.path.join(b, "summary.json"))
    t_a = os.path.getmtime(a)
    assert run.main(args + ["--resume"]) == 0
    assert os.path.getmtime(a) == t_a
    ck = fedmed.load_checkpoint(os.path.join(b, "checkpoint.pt"))
    assert ck["round"] == 2
    assert fedmed.state_digest(ck["server"]) == fedmed.state_digest(want)
    assert read_json(os.path.join(out, "loco.json"))["folds"] == ["site0", "site1"]


def test_fgasl_runs_through_the_protocol(tmp_path):
    """The method of #15 through the same protocol: the unseen centre is evaluated every
    round and its images are in no client of that fold."""
    out = str(tmp_path / "loco")
    assert run.main(["--algo", "fgasl", "--rounds", "1", "--leave-one-out", "site2",
                     "--out", out] + BASE) == 0
    lines = [json.loads(s) for s in open(os.path.join(out, "fold-site2", "seed-0",
                                                      "metrics.jsonl"))]
    assert [m["client"] for m in lines if m["holdout"]] == ["site2"]
    assert all("pl_accept" in m for m in lines if m["client"] in ("site0", "site1"))


@pytest.mark.parametrize("flags,needle", [
    (["--leave-one-out", "nowhere"], "--leave-one-out 'nowhere' is not a client"),
    (["--leave-one-out", "--holdout-client", "site0"], "drop --holdout-client"),
    (["--leave-one-out", "--stop-after", "1"], "--stop-after does not apply"),
])
def test_bad_protocol_input_is_one_line_exit_2(tmp_path, capsys, flags, needle):
    out = str(tmp_path / "x")
    code = run.main(["--algo", "fedavg", "--rounds", "1", "--out", out] + BASE + flags)
    one_line_error(capsys, code, needle, out=out)


def test_a_second_run_into_the_folder_is_refused_and_resume_checks_the_folds(tmp_path, capsys):
    out = str(tmp_path / "loco")
    assert run.main(["--algo", "fedavg", "--rounds", "1", "--leave-one-out", "site0",
                     "--out", out] + BASE) == 0
    capsys.readouterr()
    code = run.main(["--algo", "fedavg", "--rounds", "1", "--leave-one-out", "site0",
                     "--out", out] + BASE)
    one_line_error(capsys, code, "already holds results")
    code = run.main(["--algo", "fedavg", "--rounds", "1", "--leave-one-out", "site1",
                     "--resume", "--out", out] + BASE)
    one_line_error(capsys, code, "holds folds site0")
