"""run.py --evaluate RUN_DIR: a finished run's exported models on new data, without
training, by the rule the run's own loop applies to a client it never trained
(fedmed.Algorithm.predict with no private state: the global model; FedBN's n_k-average
of the private BN tensors; local's n_k-average of the clients' models). The figures must
equal the ones the run itself wrote for a --holdout-client site, which fedmed.run
computed with its own predict; bad run folders and flags are one line, exit 2, and
write nothing."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets
import models
import run
from helpers import IMAGENET_MEAN, IMAGENET_STD, one_line_error

TINY = ["--image-size", "16", "--clients", "3", "--rounds", "2", "--local-steps", "3",
        "--batch-size", "16", "--quiet"]
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isic2019-mini"


def read(path):
    with open(path) as f:
        return json.load(f)


def train(tmp, name, *flags):
    out = str(tmp / name)
    assert run.main(TINY + ["--out", out] + list(flags)) == 0
    return out


def evaluate(run_dir, out, *flags):
    return run.main(["--evaluate", run_dir, "--out", out, "--quiet"] + list(flags))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs that hold site2 out of training: FedAvg, FedBN, local."""
    tmp = tmp_path_factory.mktemp("runs")
    return {name: train(tmp, name, *flags, "--holdout-client", "site2")
            for name, flags in (("fedavg", []), ("fedbn", ["--algo", "fedavg", "--bn", "local"]),
                                ("local", ["--algo", "local"]))}


@pytest.mark.parametrize("name, view", [("fedavg", "global"), ("fedbn", "global"),
                                        ("local", "average")])
def test_held_out_rule_reproduces_the_runs_own_holdout_figures(runs, tmp_path, name, view):
    out = str(tmp_path / "eval")
    assert evaluate(runs[name], out, "--clients", "3", "--only-clients", "site2") == 0
    rec = read(os.path.join(out, "evaluation.json"))
    want = read(os.path.join(runs[name], "summary.json"))["holdout"]["site2"]
    got = rec["views"][view]["clients"]["site2"]
    assert rec["primary_view"] == view and got["n"] == want["n"]
    for k in ("balanced_accuracy", "accuracy", "macro_f1", "macro_auroc"):
        assert np.isclose(got[k], want[k], atol=1e-9), k
    assert np.isclose(rec["views"][view]["pooled"]["balanced_accuracy"], want["balanced_accuracy"])
    if name != "fedavg":                               # each client's own model too
        assert sorted(rec["views"]) == sorted([view, "model:site0", "model:site1"])
    assert "evaluation.md" in os.listdir(out)
    assert not any(n.startswith("evaluation") for n in os.listdir(runs[name]))


def probs(path, fed, idx):
    """Softmax of the weights file `path` on images idx, normalised by hand."""
    m = models.build("cnn", fed.num_classes, str(path)).eval()
    x = fed.x[torch.as_tensor(idx, dtype=torch.long)].float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return F.softmax(m(x), dim=1).numpy()


def test_a_site_the_run_never_had_is_scored_on_all_its_images(runs, tmp_path, capsys):
    """The run had 3 clients; site3 of a 4-client synthetic federation is a new hospital
    (client k's images depend only on (seed, k)): every image of it is evaluated, with
    model.pt, and model:site0 is site0's own FedBN model."""
    out = str(tmp_path / "eval")
    assert evaluate(runs["fedbn"], out, "--clients", "4", "--only-clients", "site3") == 0
    printed = capsys.readouterr().out
    assert "| site3 |" in printed and f"results in {out}" in printed
    rec = read(os.path.join(out, "evaluation.json"))
    fed = datasets.load(datasets.namespace(image_size=16, clients=4), seed=0)
    site3 = [c for c in fed.clients if c.name == "site3"][0]
    idx = np.sort(np.concatenate([site3.train, site3.test]))
    y = fed.y[idx].numpy()
    assert rec["images"] == {"site3": len(idx)}
    for view, file in (("global", "model.pt"), ("model:site0", "model-site0.pt")):
        p = probs(os.path.join(runs["fedbn"], file), fed, idx)
        ba = np.mean([(p.argmax(1)[y == c] == c).mean() for c in np.unique(y)])
        assert np.isclose(rec["views"][view]["clients"]["site3"]["balanced_accuracy"], ba)
    assert rec["notes"] == ["--only-clients: left out site0, site1, site2"]


def test_a_training_site_is_evaluated_with_a_note(runs, tmp_path):
    out = str(tmp_path / "eval")
    assert evaluate(runs["fedavg"], out, "--clients", "3", "--only-clients", "site0") == 0
    notes = read(os.path.join(out, "evaluation.json"))["notes"]
    assert any("site0 trained in this run" in n for n in notes)


def test_bad_runs_and_flags_are_one_line(runs, tmp_path, capsys):
    out = str(tmp_path / "eval")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    unfinished = str(tmp_path / "unfinished")
    assert run.main(TINY + ["--out", unfinished, "--stop-after", "1"]) == 0
    protocol = tmp_path / "fcu"                       # an FCU protocol's top folder
    protocol.mkdir()
    (protocol / "config.json").write_text(json.dumps({"phases": ["original", "fcu"]}))
    for run_dir, flags, needle in [
            (str(tmp_path / "absent"), [], "no such folder"),
            (str(empty), [], "not a FedMed run (no config.json)"),
            (unfinished, [], "did not finish (no summary.json)"),
            (str(protocol), [], f"a protocol folder (phases original, fcu); evaluate one phase's "
                                f"run, e.g. {protocol}/fcu"),
            (runs["fedavg"], ["--seeds", "0", "1"], "--seeds does not apply to --evaluate"),
            (runs["fedavg"], ["--lr", "0.1"], "--lr does not apply to --evaluate"),
            (runs["fedavg"], ["--algo", "local"], "--algo does not apply to --evaluate"),
            (runs["fedavg"], ["--image-size", "32"], "trained on 16 px images"),
            (runs["fedavg"], ["--dataset", "synthetic-multilabel"], "the data is multi-label"),
            (runs["fedavg"], ["--only-clients", "site9"], "--only-clients 'site9' is not a client"),
            (runs["fedavg"], ["--dataset", "isic2019"], "--dataset isic2019 needs --data-dir")]:
        one_line_error(capsys, evaluate(run_dir, out, *flags), needle, out=out)


def test_a_seeds_folder_is_evaluated_seed_by_seed_with_mean_and_sd(tmp_path):
    """Each seed's run on the site it held out (its own data seed), then mean +- sd."""
    r = str(tmp_path / "s")
    assert run.main(TINY + ["--out", r, "--seeds", "0", "1", "--holdout-client", "site2"]) == 0
    out = str(tmp_path / "eval")
    assert evaluate(r, out, "--clients", "3", "--only-clients", "site2") == 0
    want = []
    for k in (0, 1):
        w = read(os.path.join(r, f"seed-{k}", "summary.json"))["holdout"]["site2"]
        one = read(os.path.join(out, f"seed-{k}", "evaluation.json"))
        assert one["seed"] == k
        assert np.isclose(one["views"]["global"]["clients"]["site2"]["balanced_accuracy"],
                          w["balanced_accuracy"])
        want.append(w["balanced_accuracy"])
    f = read(os.path.join(out, "evaluation.json"))["figures"]["site2"]["balanced_accuracy"]
    assert np.allclose(f["values"], want)
    assert np.isclose(f["mean"], np.mean(want)) and np.isclose(f["sd"], np.std(want, ddof=1))
    assert "| site2 |" in open(os.path.join(out, "evaluation.md")).read()
    assert evaluate(r, out, "--clients", "3", "--only-clients", "site2", "--overwrite") == 0
    single = train(tmp_path, "single")                  # an evaluation replaced by another
    assert evaluate(single, out, "--overwrite") == 0
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == [
        "evaluation.json", "evaluation.md"]                 # the seed-S folders are gone


def test_models_that_do_not_fit_and_runs_without_models_are_refused(tmp_path, capsys):
    out = str(tmp_path / "eval")
    r = train(tmp_path, "r")
    sd = torch.load(os.path.join(r, "model.pt"))
    sd["classifier.weight"] = sd["classifier.weight"][:4]       # 4 classes, the data has 6
    sd["classifier.bias"] = sd["classifier.bias"][:4]
    torch.save(sd, os.path.join(r, "model.pt"))
    one_line_error(capsys, evaluate(r, out), "does not fit --model cnn with 6 classes", out=out)
    s = read(os.path.join(r, "summary.json"))
    s["exported"] = []                                          # e.g. a CLIP method's run
    with open(os.path.join(r, "summary.json"), "w") as f:
        json.dump(s, f)
    one_line_error(capsys, evaluate(r, out), "exported no model", out=out)
    os.remove(os.path.join(r, "model.pt"))
    s["exported"] = ["model.pt"]
    with open(os.path.join(r, "summary.json"), "w") as f:
        json.dump(s, f)
    one_line_error(capsys, evaluate(r, out), "model.pt is listed in summary.json but missing",
                   out=out)


def test_out_is_never_a_runs_folder_and_an_evaluation_is_replaced_only_on_request(
        runs, tmp_path, capsys):
    one_line_error(capsys, evaluate(runs["fedavg"], runs["local"], "--overwrite"),
                   "holds files that are not an evaluation")
    out = str(tmp_path / "eval")
    assert evaluate(runs["fedavg"], out, "--only-clients", "site1") == 0
    one_line_error(capsys, evaluate(runs["fedavg"], out), "already holds results")
    assert evaluate(runs["fedavg"], out, "--only-clients", "site0", "--overwrite") == 0
    assert list(read(os.path.join(out, "evaluation.json"))["images"]) == ["site0"]


@pytest.mark.skipif(not (DATA / "ISIC_2019_Training_GroundTruth.csv").is_file(),
                    reason=f"real data absent: {DATA} (the shared isic2019-mini copy)")
def test_isic2019_mini_a_centre_held_out_of_training_is_the_new_site(tmp_path):
    """Train on three centres of isic2019-mini with HAM_vienna_dias held out; evaluating
    the run on that centre alone (--only-clients) gives the run's own holdout figures."""
    data = ["--dataset", "isic2019", "--data-dir", str(DATA), "--max-images-per-client", "60"]
    r = str(tmp_path / "run")
    assert run.main(["--image-size", "16", "--rounds", "1", "--local-steps", "2",
                     "--batch-size", "16", "--quiet", "--out", r, *data, "--only-clients",
                     "HAM_vidir_modern,HAM_rosendahl,HAM_vienna_dias", "--holdout-client",
                     "HAM_vienna_dias"]) == 0
    out = str(tmp_path / "eval")
    assert evaluate(r, out, *data, "--only-clients", "HAM_vienna_dias") == 0
    want = read(os.path.join(r, "summary.json"))["holdout"]["HAM_vienna_dias"]
    got = read(os.path.join(out, "evaluation.json"))["views"]["global"]["clients"]["HAM_vienna_dias"]
    assert got["n"] == want["n"]
    assert np.isclose(got["balanced_accuracy"], want["balanced_accuracy"])
    assert np.isclose(got["macro_auroc"], want["macro_auroc"])
