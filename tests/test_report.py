"""bench/report.py: result folders -> one comparison table (runs that differ only in
--seed are one row, mean +- sd over seeds, recomputed here by hand from each run's
summary.json) and plots (matplotlib optional: without it the table is still written and
one line says how to get the plots). The curves are recomputed from metrics.jsonl."""
import json
import os
import sys

import numpy as np
import pytest

import results
import run
from helpers import read_jsonl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import report  # noqa: E402

TINY = ["--image-size", "16", "--clients", "3", "--rounds", "3", "--local-steps", "2",
        "--batch-size", "16", "--quiet"]


def read(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """FedAvg seeds 0 1 (--seeds) plus seed 2 in a folder of its own; local seed 0; FedAvg
    with another --lr; an unfinished run."""
    t = tmp_path_factory.mktemp("res")
    made = {"seeds": ["--seeds", "0", "1"], "extra": ["--seed", "2"],
            "local": ["--algo", "local"], "lr": ["--lr", "0.05"],
            "unfinished": ["--stop-after", "1"]}
    for name, flags in made.items():
        assert run.main(TINY + ["--out", str(t / name)] + flags) == 0
    return t


def summaries(*runs):
    return [read(os.path.join(r, "summary.json")) for r in runs]


def test_runs_differing_only_in_seed_are_one_row_with_mean_and_sd(folders, tmp_path, capsys):
    t = folders
    out = str(tmp_path / "rep")
    assert report.main([str(t), "--out", out, "--no-plots"]) == 0
    rec = read(os.path.join(out, "report.json"))
    by = {g["label"]: g for g in rec["groups"]}
    # a setting that differs between rows is named on every row
    assert sorted(by) == ["fedavg --lr 0.01", "fedavg --lr 0.05", "local --lr 0.01"]
    fedavg = by["fedavg --lr 0.01"]
    assert sorted(fedavg["seeds"]) == [0, 1, 2]
    s = summaries(*fedavg["runs"])
    for key, values in (("balanced_accuracy", [x["balanced_accuracy"] for x in s]),
                        ("pooled_balanced_accuracy", [x["pooled_balanced_accuracy"] for x in s]),
                        ("pooled_balanced_accuracy_lastk",
                         [x["pooled_balanced_accuracy_last3"] for x in s]),
                        ("bytes_up", [x["bytes_up"] for x in s]),
                        ("client:site2", [x["clients"]["site2"]["balanced_accuracy"] for x in s])):
        mean = sum(values) / 3
        sd = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5          # ddof = 1
        assert np.isclose(fedavg["figures"][key]["mean"], mean)
        assert np.isclose(fedavg["figures"][key]["sd"], sd)
    ba = fedavg["figures"]["balanced_accuracy"]
    md = open(os.path.join(out, "report.md")).read()
    assert f"| fedavg --lr 0.01 | 3 | {ba['mean']:.3f} +- {ba['sd']:.3f} |" in md
    assert "| local --lr 0.01 | 1 |" in md and "client BA last-3" in md
    assert "* local --lr 0.01: each client's own model on its own test set, joined (no single model)" in md
    assert "unfinished: not finished (no summary.json), left out" in md
    assert capsys.readouterr().out.startswith("| run | seeds |")


def test_a_seed_read_twice_counts_once(folders, tmp_path):
    out = str(tmp_path / "rep")
    assert report.main([str(folders / "seeds"), str(folders / "seeds" / "seed-0"), "--out", out,
                        "--no-plots"]) == 0
    rec = read(os.path.join(out, "report.json"))
    assert [len(g["runs"]) for g in rec["groups"]] == [2]
    assert any("seed 0 of this configuration already read" in n for n in rec["notes"])


def test_curves_are_the_metrics_lines(folders):
    r = str(folders / "lr")
    c = results.curves(r)
    lines = read_jsonl(os.path.join(r, "metrics.jsonl"))
    pooled = [m for m in lines if m["client"] == "pooled"]
    assert c["round"] == [1, 2, 3]
    assert c["pooled"] == [m["balanced_accuracy"] for m in pooled]
    assert c["bytes"] == list(np.cumsum([m["bytes_up"] + m["bytes_down"] for m in pooled]))
    site1 = [m["balanced_accuracy"] for m in lines if m["client"] == "site1"]
    assert c["clients"]["site1"] == site1
    assert np.isclose(c["mean"][2], np.mean([m["balanced_accuracy"] for m in lines
                                             if m["round"] == 3 and m["client"] != "pooled"]))


def test_without_matplotlib_the_table_is_written_and_one_line_says_how_to_plot(
        folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import fails as if absent
    out = str(tmp_path / "rep")
    assert report.main([str(folders / "seeds"), "--out", out]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["no plots: matplotlib is not installed; pip install matplotlib (or -r "
                   "requirements-plots.txt) to get the plots"]
    assert sorted(os.listdir(out)) == ["report.json", "report.md"]


def test_plots_are_written_with_matplotlib(folders, tmp_path):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "rep")
    assert report.main([str(folders / "seeds"), str(folders / "local"), "--out", out]) == 0
    pngs = sorted(n for n in os.listdir(out) if n.endswith(".png"))
    assert pngs == ["ba-vs-bytes.png", "curves-fedavg.png", "curves-local.png"]
    for p in pngs:
        with open(os.path.join(out, p), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "![ba-vs-bytes.png](ba-vs-bytes.png)" in open(os.path.join(out, "report.md")).read()


def test_bad_folders_are_one_line(folders, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "rep"
    for argv, needle in (([str(tmp_path / "absent")], "no such folder"),
                         ([str(empty)], "no finished run under"),
                         ([], "the following arguments are required")):
        rc = report.main(argv + ["--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert report.main([str(folders / "local"), "--out", str(out), "--no-plots"]) == 0
    capsys.readouterr()
    assert report.main([str(folders / "local"), "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    rc = report.main([str(folders / "local"), "--out", str(folders / "lr"), "--overwrite"])
    assert rc == 2 and "not a report" in capsys.readouterr().err      # a run is never replaced
    assert os.path.isfile(folders / "lr" / "summary.json")


def test_a_setting_recorded_as_null_groups_with_a_run_that_lacks_it():
    """Runs made before a flag existed (no key) and after (the key, null) are seeds of one
    configuration; a set value still separates them."""
    old = {"config": {"algo": "fedavg", "seed": 0, "lr": 0.1}, "data": {"dataset": "x"}}
    new = {"config": {"algo": "fedavg", "seed": 1, "lr": 0.1},
           "data": {"dataset": "x", "only_clients": None}}
    assert results.group_key(old) == results.group_key(new)
    new["data"]["only_clients"] = "site0"
    assert results.group_key(old) != results.group_key(new)
