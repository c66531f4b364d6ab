"""Exported weights (model.pt, model-CLIENT.pt): the files a run leaves are exactly the
models it evaluated in its last round, so loading one with --weights and predicting
recomputes the summary's figures (pooled balanced accuracy on concatenated predictions,
per-client balanced accuracy; baselines.md section 8)."""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

import datasets
import fedmed
import models
import run


def cli(tmp_path, *flags, name="out"):
    out = str(tmp_path / name)
    base = ["--image-size", "16", "--clients", "3", "--rounds", "2", "--local-steps", "3",
            "--batch-size", "16", "--quiet", "--out", out]
    assert run.main(base + list(flags)) == 0
    with open(os.path.join(out, "summary.json")) as f:
        return out, json.load(f)


def fed():
    return datasets.load(datasets.namespace(image_size=16, clients=3), seed=0)


def probs(path, fed, idx):
    """Softmax of the model in `path` on images idx, with the loop's normalisation."""
    m = models.build("cnn", fed.num_classes, str(path)).eval()
    x = fed.x[torch.as_tensor(idx, dtype=torch.long)].float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        return F.softmax(m(x), dim=1).numpy()


def test_fedavg_model_pt_is_the_evaluated_global_model(tmp_path):
    out, s = cli(tmp_path)
    assert s["exported"] == ["model.pt"]
    f = fed()
    ys = [f.y[c.test].numpy() for c in f.clients]
    ps = [probs(os.path.join(out, "model.pt"), f, c.test) for c in f.clients]
    pooled = fedmed.classification_metrics(np.concatenate(ys), np.concatenate(ps))
    assert np.isclose(pooled["balanced_accuracy"], s["pooled_balanced_accuracy"])
    assert np.isclose(pooled["loss"], s["pooled"]["loss"], rtol=1e-5)
    out2, s2 = cli(tmp_path, "--weights", os.path.join(out, "model.pt"), "--rounds", "1",
                   name="again")                       # --weights accepts it
    assert s2["exported"] == ["model.pt"]


def test_fedbn_and_local_export_each_clients_own_model(tmp_path):
    f = fed()
    for algo, flags, stems in (("fedavg", ["--bn", "local"], ["model"]), ("local", [], [])):
        out, s = cli(tmp_path, "--algo", algo, *flags, name=algo)
        want = sorted([f"{x}.pt" for x in stems] + [f"model-{c.name}.pt" for c in f.clients])
        assert s["exported"] == want
        for c in f.clients:
            p = probs(os.path.join(out, f"model-{c.name}.pt"), f, c.test)
            m = fedmed.classification_metrics(f.y[c.test].numpy(), p)
            assert np.isclose(m["balanced_accuracy"], s["clients"][c.name]["balanced_accuracy"])
            assert np.isclose(m["macro_auroc"], s["clients"][c.name]["macro_auroc"])


def test_pooled_exports_its_one_model_and_overwrite_drops_stale_files(tmp_path):
    out, _ = cli(tmp_path, "--algo", "local", name="o")
    out, s = cli(tmp_path, "--algo", "pooled", "--overwrite", name="o")
    assert s["exported"] == ["model.pt"]
    assert sorted(n for n in os.listdir(out) if n.startswith("model")) == ["model.pt"]
    f = fed()
    ys = [f.y[c.test].numpy() for c in f.clients]
    ps = [probs(os.path.join(out, "model.pt"), f, c.test) for c in f.clients]
    pooled = fedmed.classification_metrics(np.concatenate(ys), np.concatenate(ps))
    assert np.isclose(pooled["balanced_accuracy"], s["pooled_balanced_accuracy"])
