"""summary.json: the mean over the last k rounds beside the last round, and `pooled_kind`
(what the pooled-test figure is), recomputed here from metrics.jsonl by hand (baselines.md
section 8: headline = mean over the client test sets; pooled = concatenated predictions)."""
import json
import os

import numpy as np

import fedmed
import run
from helpers import one_line_error, read_jsonl

import algorithms  # noqa: E402 - the methods register themselves

algorithms.load_all()


def cli(tmp_path, *flags, name="out"):
    out = str(tmp_path / name)
    base = ["--image-size", "16", "--clients", "3", "--rounds", "4", "--local-steps", "2",
            "--batch-size", "16", "--quiet", "--out", out]
    return run.main(base + list(flags)), out


def summary_of(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def by_hand(out, k, view=None):
    """(mean over the last k rounds of the per-round mean client BA, same of pooled BA)."""
    lines = read_jsonl(os.path.join(out, "metrics.jsonl"))
    view = view or lines[0]["view"]
    rounds = sorted({m["round"] for m in lines})[-k:]
    per, pooled = [], []
    for r in rounds:
        clients = [m["balanced_accuracy"] for m in lines if m["round"] == r and m["view"] == view
                   and m["client"] != "pooled" and not m["holdout"]]
        per.append(sum(clients) / len(clients))
        pooled += [m["balanced_accuracy"] for m in lines if m["round"] == r and m["view"] == view
                   and m["client"] == "pooled"]
    return sum(per) / len(per), sum(pooled) / len(pooled), len(rounds)


def test_last_k_mean_equals_hand_computation_and_differs_from_last_round(tmp_path):
    rc, out = cli(tmp_path, "--last-k", "3", "--lr", "0.05")
    assert rc == 0
    s = summary_of(out)
    ba, pooled, j = by_hand(out, 3)
    assert j == 3 and s["last_k"] == 3
    assert np.isclose(s["balanced_accuracy_last3"], ba, atol=1e-12)
    assert np.isclose(s["pooled_balanced_accuracy_last3"], pooled, atol=1e-12)
    ba4, pooled4, _ = by_hand(out, 4)                     # not the mean over every round
    assert not np.isclose(ba, ba4) or not np.isclose(pooled, pooled4)
    last_ba, last_pooled, _ = by_hand(out, 1)             # the last-round keys are unchanged
    assert np.isclose(s["balanced_accuracy"], last_ba)
    assert np.isclose(s["pooled_balanced_accuracy"], last_pooled)
    assert s["pooled_kind"] == "one global model on every client's test set, joined"


def test_default_k_is_5_and_a_short_run_names_the_rounds_it_averaged(tmp_path):
    rc, out = cli(tmp_path)                               # 4 rounds < the default k = 5
    assert rc == 0
    s = summary_of(out)
    ba, pooled, j = by_hand(out, 5)
    assert j == 4 and s["last_k"] == 4 and "balanced_accuracy_last5" not in s
    assert np.isclose(s["balanced_accuracy_last4"], ba)
    assert np.isclose(s["pooled_balanced_accuracy_last4"], pooled)
    rc, out = cli(tmp_path, "--rounds", "6", name="six")
    s = summary_of(out)
    ba, pooled, j = by_hand(out, 5)
    assert (j, s["last_k"]) == (5, 5)
    assert np.isclose(s["balanced_accuracy_last5"], ba)
    assert np.isclose(s["pooled_balanced_accuracy_last5"], pooled)


def test_pooled_kind_names_what_the_pooled_figure_is(tmp_path):
    rc, out = cli(tmp_path, "--algo", "local", "--rounds", "2", "--last-k", "2")
    s = summary_of(out)
    assert s["pooled_kind"].startswith("each client's own model on its own test set")
    ba, pooled, _ = by_hand(out, 2, "local")
    assert np.isclose(s["balanced_accuracy_last2"], ba)
    assert np.isclose(s["pooled_balanced_accuracy_last2"], pooled)
    for view, v in s["views"].items():                  # cross-evaluation: the last round only
        assert view.startswith("model:") and v["pooled_kind"].startswith(f"client {view[6:]}'s")
        assert np.isclose(v["pooled_balanced_accuracy_last1"], v["pooled_balanced_accuracy"])
    rc, out = cli(tmp_path, "--algo", "pooled", "--rounds", "2", name="pooled")
    assert summary_of(out)["pooled_kind"].startswith("one model trained on the union")
    rc, out = cli(tmp_path, "--bn", "local", "--rounds", "2", name="fedbn")
    assert "private tensors (--bn local)" in summary_of(out)["pooled_kind"]


def test_last_k_below_one_is_a_one_line_error(tmp_path, capsys):
    rc, out = cli(tmp_path, "--last-k", "0")
    one_line_error(capsys, rc, "--last-k", out=out)
