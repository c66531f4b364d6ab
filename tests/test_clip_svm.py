"""clip_svm (algorithms/clip_svm.py): the tests of ../shared/methods/clip_svm.md section 11,
the command line and bad input. The reference step (one whole local update, one
aggregation and one prediction recomputed in plain torch) is tests/test_clip_svm_reference.py.

Sheet section 11:
  1. backbone factory: the pooled width of each of the 12 towers (built on the meta
     device: weights=None, nothing materialised, ~2 s for all) equals the sheet's table,
     and P maps it to D in {768, 1024};
  2. frozen text tower: T equals re-encoding the prompts with open_clip by hand, the
     tower's parameters take no gradient, T is never in a state dict or a payload and is
     unchanged after a round; the cached T is read back;
  3. contrastive (L1) by hand and symmetric; proto_ce (L2) = CE(s I^ T_all^T, y) by hand;
  4. FedProx mu = 0 bit-identical to FedAvg; the payload's keys; the n_k-weighted aggregate;
  5. SVM deterministic under a seed, train accuracy 1 on separable toy features, each
     scaler's mean / std the statistics of its client's source features only;
  6. unseen-site indices disjoint from every training batch and split;
  7. the paper's metrics against scikit-learn on random labels with missing classes.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets
import fedmed
import run
from fedmed import Config, ServerState, transmit
from helpers import one_line_error, register_clip_config

import algorithms  # noqa: E402 - the methods register themselves
from algorithms import clip_svm as cs

algorithms.load_all()
ROOT = Path(__file__).resolve().parents[1]

TINY = {"embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}}
NAME = "fedmed-clipsvm-tiny"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return register_clip_config(tmp_path_factory, NAME, TINY)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny):                     # (make() needs the tiny config)
    return str(tmp_path_factory.mktemp("clipsvm-cache"))


@pytest.fixture(scope="module")
def fed():
    f = datasets.make_synthetic(seed=0, clients=4, image_size=16)
    f.holdout = datasets.take_holdout(f.clients, "site3", [])
    return f


def cfg_of(**kw):
    return Config(**{"algo": "clip_svm", **cs.ClipSVM.recipe, "rounds": 2, "local_steps": 2,
                     "batch_size": 8, "seed": 0, **kw})


def make(fed, cache, cfg=None, **kw):
    args = cs.Args(**{"image_tower": "mobilenet_v2", "clip_model": NAME, "pretrained": "none",
                      "feature_cache": cache, **kw})
    algo = cs.ClipSVM(cfg or cfg_of(), args, fed)
    clients, server = fedmed.make_clients(fed), ServerState()
    algo.attach([fedmed.ClientState(-1 - i, c.name, np.asarray(c.train), np.asarray(c.test))
                 for i, c in enumerate(fed.holdout)], True)
    algo.setup(server, clients)
    return algo, server, clients


def one_round(algo, server, clients, t=0):
    algo.set_round(t)
    uploads = {}
    for c in clients:
        payload, _ = transmit(algo.broadcast(server, c))
        uploads[c.id], _ = transmit(algo.local_update(c, payload))
    algo.aggregate(server, uploads)
    return uploads


# ---------------------------------------------------------------- 1. backbone factory

SHEET_WIDTH = {"convnext_t": 768, "convnext_s": 768, "convnext_b": 1024, "convnext_l": 1536,
               "maxvit_t": 512, "swin_t": 768, "swin_s": 768, "swin_b": 1024,
               "swin_v2_t": 768, "swin_v2_s": 768, "swin_v2_b": 1024, "vit_l_16": 1024}


def test_the_twelve_paper_towers_and_their_pooled_widths():
    assert set(cs.PAPER_TOWERS) == set(SHEET_WIDTH)
    assert len(cs.PAPER_TOWERS) == 12
    for name, d in SHEET_WIDTH.items():
        size = 256 if name.startswith("swin_v2") else 224
        with torch.device("meta"):
            g, d_img = cs.build_backbone(name)
            z = g(torch.zeros(2, 3, size, size))
            for D in (768, 1024):
                m = cs.ClipImageModel(g, d_img, D, 7, 100.0, False)
                assert tuple(m.embed(torch.zeros(2, 3, size, size)).shape) == (2, D), name
                assert m.proj.in_features == d and m.proj.out_features == D
        assert d_img == d, name
        assert tuple(z.shape) == (2, d), name                  # the head is the identity
    with torch.device("meta"):
        g, d_img = cs.build_backbone("mobilenet_v2")
        assert tuple(g(torch.zeros(2, 3, 64, 64)).shape) == (2, 1280) and d_img == 1280


def test_image_sizes_the_towers_cannot_take_are_refused():
    for name, size in (("vit_l_16", 64), ("maxvit_t", 256), ("convnext_t", 16), ("swin_t", 8)):
        with pytest.raises(fedmed.UsageError, match="--image-size"):
            cs.check_tower(name, None, size)
    cs.check_tower("vit_l_16", None, 224)
    cs.check_tower("maxvit_t", None, 224)
    cs.check_tower("convnext_t", None, 32)
    cs.check_tower("swin_t", None, 16)
    cs.check_tower("swin_t", None, None)
    assert cs.ClipSVM.default_image_size(cs.Args(image_tower="swin_v2_t")) == 256
    assert cs.ClipSVM.default_image_size(cs.Args(image_tower="swin_t")) == 224
    assert cs.ClipSVM.default_image_size(None) == 224


def test_tower_weights_from_a_local_file_and_a_file_of_another_model(tmp_path):
    import torchvision
    src = torchvision.models.mobilenet_v2(weights=None)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    path = tmp_path / "mnv2.pt"
    torch.save(src.state_dict(), path)                           # with its 1000-class head
    g, _ = cs.build_backbone("mobilenet_v2")
    cs.load_tower_weights(g, "mobilenet_v2", str(path))
    want = {k: v for k, v in src.state_dict().items() if not k.startswith("classifier.1.")}
    got = g.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(fedmed.UsageError, match="does not fit --image-tower mobilenet_v2"):
        cs.load_tower_weights(g, "mobilenet_v2", str(tmp_path / "r18.pt"))
    sd = dict(want)
    sd["features.0.0.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(fedmed.UsageError, match="shape mismatch at features.0.0.weight"):
        cs.load_tower_weights(g, "mobilenet_v2", str(tmp_path / "bad.pt"))
    sd.pop("features.0.0.weight")
    sd["extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "more.pt")
    with pytest.raises(fedmed.UsageError, match="missing"):
        cs.load_tower_weights(g, "mobilenet_v2", str(tmp_path / "more.pt"))
    sd["features.0.0.weight"] = want["features.0.0.weight"]
    torch.save(sd, tmp_path / "more.pt")
    with pytest.raises(fedmed.UsageError, match="unexpected"):
        cs.load_tower_weights(g, "mobilenet_v2", str(tmp_path / "more.pt"))


def test_imagenet_weights_are_the_fetched_mobilenet_v2_body(fed, cache):
    path = cs.imagenet_path("mobilenet_v2")
    if not os.path.isfile(path):
        pytest.skip(f"{path} absent (python models.py fetch mobilenet_v2)")
    algo, _, _ = make(fed, cache, cfg_of(weights="imagenet"))
    body = torch.load(path, weights_only=True)
    got = algo.model.backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in body.items())
    assert cs.imagenet_path("swin_t").endswith(".pth")         # torchvision's hub file name


# ---------------------------------------------------------------- 2. frozen text tower

def test_text_features_are_the_prompts_encoded_by_hand_and_never_travel(fed, cache, tiny):
    import open_clip
    algo, server, clients = make(fed, cache)
    with fedmed.seeded(0, "clip-init"):
        clip = open_clip.create_model(NAME, pretrained=None)
    clip.eval()
    tok = open_clip.get_tokenizer(NAME)
    prompts = [f"a picture of a{'n' if n[0] in 'aeiou' else ''} {n}" for n in fed.classes]
    with torch.no_grad():
        T = F.normalize(clip.encode_text(tok(prompts)).float(), dim=-1)
    assert torch.allclose(algo.text, T, atol=1e-6)
    assert torch.allclose(algo.model.text, T, atol=1e-6)
    assert algo.info["class_prompts"] == prompts
    assert "text" not in algo.model.state_dict()
    assert "text" not in algo.broadcast(server, clients[0])["w"]
    before = algo.model.text.clone()
    uploads = one_round(algo, server, clients)
    assert all("text" not in u["w"] for u in uploads.values())
    assert torch.equal(algo.model.text, before)
    tower = cs.ca.ClipBackbone(cs.ca.ClipArgs(clip_model=NAME, pretrained="none"), 0,
                               torch.device("cpu"), cache)
    assert not any(p.requires_grad for p in tower.model.parameters())
    again, _, _ = make(fed, cache)                               # read back from the cache
    assert torch.equal(again.text, algo.text)
    assert os.listdir(cache)


# ---------------------------------------------------------------- 3. losses

def test_contrastive_by_hand_and_symmetric():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(5, 6, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 6, generator=g), dim=-1)
    s = 7.0
    S = s * img @ txt.t()
    l_it = -np.mean([float(S[i, i] - torch.logsumexp(S[i], 0)) for i in range(5)])
    l_ti = -np.mean([float(S[i, i] - torch.logsumexp(S[:, i], 0)) for i in range(5)])
    assert float(cs.contrastive(img, txt, s)) == pytest.approx((l_it + l_ti) / 2, rel=1e-6)
    assert float(cs.contrastive(txt, img, s)) == pytest.approx((l_it + l_ti) / 2, rel=1e-6)
    assert float(cs.contrastive(img, txt, s)) != pytest.approx(l_it, rel=1e-3)


def test_proto_ce_by_hand_with_and_without_class_weights():
    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    T = F.normalize(torch.randn(4, 5, generator=g), dim=-1)
    y = torch.tensor([0, 3, 1, 1, 2, 3])
    s = 9.0
    logp = [float(s * img[i] @ T[y[i]] - torch.logsumexp(s * img[i] @ T.t(), 0)) for i in range(6)]
    assert float(cs.proto_ce(img, T, y, s)) == pytest.approx(-np.mean(logp), rel=1e-6)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    want = -sum(float(w[y[i]]) * logp[i] for i in range(6)) / float(w[y].sum())
    assert float(cs.proto_ce(img, T, y, s, w)) == pytest.approx(want, rel=1e-6)


def test_the_run_trains_the_loss_it_names(fed, cache):
    """--loss contrastive / proto_ce / the FedProx term: each is what `loss` returns."""
    x, y = fed.x[:6].float() / 255, fed.y[:6]
    for loss in ("contrastive", "proto_ce"):
        for fl, mu in (("fedavg", 0.01), ("fedprox", 0.5)):
            algo, server, clients = make(fed, cache, cfg_of(loss=loss), fl=fl, mu=mu)
            m = algo.model.eval()                                # no dropout draw
            payload = {"w": {k: v.clone() + 0.01 for k, v in server.weights.items()}}
            got = algo.loss(m, (x, y), payload, clients[0])
            img, s = m.embed(x), m.scale()
            want = (cs.contrastive(img, m.text[y], s) if loss == "contrastive"
                    else cs.proto_ce(img, m.text, y, s))
            if fl == "fedprox":
                want = want + mu / 2 * sum(((p - payload["w"][n]) ** 2).sum()
                                           for n, p in m.named_parameters())
            assert float(got) == pytest.approx(float(want), rel=1e-5), (loss, fl)


def test_learnable_scale_starts_at_one_over_007_is_clamped_and_travels(fed, cache):
    algo, server, clients = make(fed, cache, learnable_scale=True)
    m = algo.model
    assert float(m.scale()) == pytest.approx(1 / 0.07, rel=1e-6)
    assert "log_scale" in algo.broadcast(server, clients[0])["w"]
    with torch.no_grad():
        m.log_scale.fill_(10.0)
    assert float(m.scale()) == pytest.approx(100.0, rel=1e-6)
    opt = algo.make_optimizer(clients[0])
    assert any(p is m.log_scale for p in opt.param_groups[1]["params"])
    fixed, _, _ = make(fed, cache, logit_scale=42.0)
    assert fixed.model.scale() == 42.0 and fixed.model.log_scale is None


def test_adamw_with_the_backbone_and_projection_learning_rates(fed, cache):
    algo, _, clients = make(fed, cache, cfg_of(lr=3e-3, weight_decay=0.05), backbone_lr=2e-5)
    opt = algo.make_optimizer(clients[0])
    assert type(opt) is torch.optim.AdamW
    bb, head = opt.param_groups
    assert bb["lr"] == 2e-5 and head["lr"] == 3e-3
    assert bb["betas"] == (0.9, 0.98) and bb["weight_decay"] == 0.05
    assert {id(p) for p in bb["params"]} == {id(p) for p in algo.model.backbone.parameters()}
    assert {id(p) for p in head["params"]} == {id(p) for p in algo.model.proj.parameters()}
    sgd, _, clients = make(fed, cache, cfg_of(optimizer="sgd", lr=0.1, momentum=0.5,
                                              weight_decay=0.01), backbone_lr=0.02)
    opt = sgd.make_optimizer(clients[0])
    assert type(opt) is torch.optim.SGD
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.1]
    assert opt.param_groups[0]["momentum"] == 0.5 and opt.param_groups[0]["weight_decay"] == 0.01


def test_keep_optimizer_restores_the_state_and_the_two_learning_rates(fed, cache):
    algo, server, clients = make(fed, cache, cfg_of(keep_optimizer=True), backbone_lr=2e-5)
    one_round(algo, server, clients)
    state = clients[0].state["optimizer"]
    assert state["state"]
    opt = algo.make_optimizer(clients[0])
    assert [g["lr"] for g in opt.param_groups] == [2e-5, 1e-3]
    assert opt.state_dict()["state"].keys() == state["state"].keys()
    k = next(iter(state["state"]))
    assert torch.equal(opt.state_dict()["state"][k]["exp_avg"], state["state"][k]["exp_avg"])


# ---------------------------------------------------------------- 4. FL invariants

def test_fedprox_with_mu_zero_is_fedavg_bit_for_bit_and_mu_positive_is_not(fed, cache):
    finals = {}
    for fl, mu in (("fedavg", 0.01), ("fedprox", 0.0), ("fedprox", 1.0)):
        algo, server, clients = make(fed, cache, fl=fl, mu=mu)
        for t in range(2):
            one_round(algo, server, clients, t)
        finals[(fl, mu)] = server.weights
    a, b, c = finals[("fedavg", 0.01)], finals[("fedprox", 0.0)], finals[("fedprox", 1.0)]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_the_payload_holds_the_tower_and_projection_only(fed, cache):
    algo, server, clients = make(fed, cache)
    keys = set(algo.broadcast(server, clients[0])["w"])
    own = set(algo.model.backbone.state_dict())
    assert keys == {f"backbone.{k}" for k in own} | {"proj.weight", "proj.bias"}
    up = algo.local_update(clients[0], transmit(algo.broadcast(server, clients[0]))[0])
    assert set(up["w"]) == keys and up["n"] == clients[0].n
    local, server2, clients2 = make(fed, cache, cfg_of(bn="local"))
    sent = set(local.broadcast(server2, clients2[0])["w"])
    assert sent < keys and not any("running_mean" in k for k in sent)


def test_the_aggregate_is_the_nk_weighted_mean(fed, cache):
    algo, server, clients = make(fed, cache)
    ns = [c.n for c in clients]
    assert len(set(ns)) > 1                                      # unequal n_k
    uploads = one_round(algo, server, clients)
    for k in ("proj.weight", "backbone.features.0.0.weight", "backbone.features.0.1.running_var"):
        want = sum(n * uploads[c.id]["w"][k].double() for n, c in zip(ns, clients)) / sum(ns)
        assert torch.allclose(server.weights[k].double(), want, atol=1e-7), k


# ---------------------------------------------------------------- 5. SVM / KNN

def test_svm_is_deterministic_and_separates_separable_features():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    z = rng.normal(size=(60, 4)) * 0.1 + np.eye(3, 4)[y] * 5
    a = cs.fit_classifier("svm", z, y, 5, svm_c=1.0, knn_k=5, seed=7)
    b = cs.fit_classifier("svm", z, y, 5, svm_c=1.0, knn_k=5, seed=7)
    pa, pb = cs.classifier_probs(a, z, 5), cs.classifier_probs(b, z, 5)
    assert np.array_equal(pa, pb)
    assert (pa.argmax(1) == y).all()
    assert pa.shape == (60, 5) and np.allclose(pa[:, 3:], 0) and np.allclose(pa.sum(1), 1)
    svc = a[1]
    assert svc.kernel == "rbf" and svc.C == 1.0 and svc.gamma == "scale" and svc.probability
    k = cs.fit_classifier("knn", z, y, 5, svm_c=1.0, knn_k=3, seed=7)
    assert k[1].n_neighbors == 3 and (cs.classifier_probs(k, z, 5).argmax(1) == y).all()
    small = cs.fit_classifier("knn", z[:4], np.array([0, 1, 0, 1]), 5, svm_c=1, knn_k=9, seed=0)
    assert small[1].n_neighbors == 4                             # k <= n_k
    one = cs.fit_classifier("svm", z[:5], np.full(5, 2), 5, svm_c=1.0, knn_k=5, seed=0)
    assert one[1] is None
    assert np.array_equal(cs.classifier_probs(one, z[:3], 5), np.eye(5)[[2, 2, 2]])
    c2 = cs.fit_classifier("svm", z, y, 5, svm_c=0.25, knn_k=5, seed=7)
    assert c2[1].C == 0.25


def test_each_scaler_sees_its_clients_source_features_only(fed, cache):
    algo, server, clients = make(fed, cache, svm=True, svm_pooled=True)
    one_round(algo, server, clients)
    fitted = algo.fit_parties(server)
    assert set(fitted) == {"svm", "knn", "svm_pooled", "knn_pooled"}
    Z = []
    for c, party in zip(clients, fitted["svm"]):
        z = algo.features(server, c, c.train)
        Z.append(z)
        scaler = party[0]
        assert scaler.n_samples_seen_ == c.n
        sd = z.std(0)
        assert np.allclose(scaler.mean_, z.mean(0))
        assert np.allclose(scaler.scale_, np.where(sd == 0, 1.0, sd))   # sklearn: 1 if constant
        assert np.allclose(np.linalg.norm(z, axis=1), 1)         # normalise(g(x)), (C1)
    pooled = fitted["svm_pooled"][0][0]
    assert np.allclose(pooled.mean_, np.concatenate(Z).mean(0))
    assert pooled.n_samples_seen_ == sum(c.n for c in clients)


def test_svm_feature_proj_is_the_normalised_projection(fed, cache):
    algo, server, clients = make(fed, cache, svm_feature="proj")
    algo.load_model(server.weights, {})
    algo.model.eval()
    idx = clients[0].test[:5]
    x, _ = algo.batch(torch.as_tensor(idx))
    with torch.no_grad():
        want = algo.model.embed(x).double().numpy()
    assert np.allclose(algo.features(server, clients[0], idx), want, atol=1e-6)


def test_the_federated_svm_sums_client_probabilities(fed, cache, monkeypatch):
    algo, server, clients = make(fed, cache, svm=True)
    one_round(algo, server, clients)
    fitted = algo.fit_parties(server)
    res = algo.feature_classifiers(server)["site3"]
    h = algo.holdout[0]
    y, z = fed.y.numpy()[h.test], algo.features(server, h, h.test)
    C = fed.num_classes
    for kind in ("svm", "knn"):
        P = sum(cs.classifier_probs(f, z, C) for f in fitted[kind])
        want = cs.paper_metrics(y, P)
        assert res[kind] == pytest.approx(want), kind
        assert res["avg_minus_deep"][kind] == pytest.approx(want["avg"] - res["deep"]["avg"])
    deep = cs.paper_metrics(y, algo.predict(server, h, h.test))
    assert res["deep"] == pytest.approx(deep)
    assert "svm_pooled" not in res


# ---------------------------------------------------------------- 6. unseen-site hygiene

def test_unseen_site_images_never_reach_training(fed, cache, monkeypatch):
    algo, server, clients = make(fed, cache, svm=True)
    held = set(algo.holdout[0].test.tolist())
    assert held and all(not held & set(np.concatenate([c.train, c.test]).tolist()) for c in clients)
    seen = []
    orig = algo.batch
    monkeypatch.setattr(algo, "batch", lambda idx, gen=None: (seen.append(
        (gen is not None, torch.as_tensor(idx).tolist())), orig(idx, gen))[1])
    one_round(algo, server, clients)
    trained = {i for g, idx in seen if g for i in idx}
    assert trained and not trained & held
    fits = []
    real = cs.fit_classifier
    monkeypatch.setattr(cs, "fit_classifier", lambda *a, **k: (fits.append(a[1]), real(*a, **k))[1])
    algo.fit_parties(server)
    assert sum(len(z) for z in fits) == 2 * sum(c.n for c in clients)   # svm + knn, sources only


# ---------------------------------------------------------------- 7. metrics

def test_paper_metrics_against_sklearn_with_missing_classes():
    from sklearn import metrics as skm
    rng = np.random.default_rng(3)
    C = 6
    for trial in range(5):
        y = rng.choice([0, 1, 3, 4], size=80)                    # classes 2 and 5 absent
        prob = rng.dirichlet(np.ones(C), size=80)
        prob[:, 5] *= 0.01 * trial                               # class 5 rarely predicted
        pred = prob.argmax(1)
        m = cs.paper_metrics(y, prob)
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
        for avg in ("weighted", "macro"):
            p, r, f, _ = skm.precision_recall_fscore_support(
                y, pred, labels=list(range(C)), average=avg, zero_division=0)
            assert (m[f"{avg}_precision"], m[f"{avg}_recall"], m[f"{avg}_f1"]) == pytest.approx((p, r, f))
        aucs = [skm.roc_auc_score(y == c, prob[:, c]) for c in np.unique(y)]
        assert m["macro_auroc"] == pytest.approx(np.mean(aucs))
        five = [m[k] for k in ("accuracy", "balanced_accuracy", "weighted_precision",
                               "weighted_recall", "weighted_f1")]
        assert m["avg"] == pytest.approx(np.mean(five))
        assert m["n"] == 80


# ---------------------------------------------------------------- the command line

def cli(tmp_path, tiny, cache, *flags, name="out"):
    out = str(tmp_path / name)
    base = ["--algo", "clip_svm", "--image-tower", "mobilenet_v2", "--clip-model", tiny,
            "--pretrained", "none", "--feature-cache", cache, "--clients", "3", "--image-size",
            "16", "--rounds", "1", "--local-steps", "1", "--batch-size", "8", "--quiet",
            "--out", out]
    return run.main(base + list(flags)), out


def test_the_command_line_writes_the_paper_metrics_and_the_classifiers(tmp_path, tiny, cache, capsys):
    code, out = cli(tmp_path, tiny, cache, "--holdout-client", "site2", "--svm", "--svm-pooled")
    assert code == 0
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    fc = s["feature_classifiers"]["site2"]
    assert set(fc) == {"deep", "svm", "knn", "svm_pooled", "knn_pooled", "avg_minus_deep"}
    assert "NON-PRIVATE" in s["feature_classifiers_note"]
    assert fc["deep"]["avg"] == pytest.approx(s["paper_metrics"]["site2"]["avg"])
    assert fc["deep"]["balanced_accuracy"] == pytest.approx(s["holdout"]["site2"]["balanced_accuracy"])
    assert set(s["paper_metrics"]) == {"pooled_test", "site2"}
    assert s["paper_metrics"]["pooled_test"]["balanced_accuracy"] == pytest.approx(
        s["pooled_balanced_accuracy"])
    with open(os.path.join(out, "config.json")) as f:
        c = json.load(f)
    assert "reconstruction" in c["algorithm_info"] and c["config"]["loss"] == "contrastive"
    assert c["algorithm_info"]["d_img"] == 1280 and c["algorithm_info"]["D"] == 24
    printed = capsys.readouterr().out
    assert "unseen site site2:" in printed and "svm_pooled" in printed
    table = cs.ClipSVM.summary_table(s)
    assert table.splitlines()[0].startswith("unseen site site2:") and len(table.splitlines()) == 6
    assert cs.ClipSVM.summary_table({}) == ""
    code, out = cli(tmp_path, tiny, cache, name="plain")          # no holdout, no --svm
    assert code == 0
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert "feature_classifiers" not in s and set(s["paper_metrics"]) == {"pooled_test"}


@pytest.mark.parametrize("flags,needle", [
    (["--image-tower", "resnet50"], "--image-tower 'resnet50' is unknown"),
    (["--holdout-client", "nowhere", "--svm"], "--holdout-client 'nowhere' is not a client"),
    (["--svm"], "--svm evaluates on an unseen site"),
    (["--svm-pooled"], "--svm-pooled needs --svm"),
    (["--mu", "0.1"], "--mu applies only with --fl fedprox"),
    (["--fl", "scaffold"], "--fl 'scaffold' is unknown"),
    (["--loss", "focal"], "--loss focal does not apply to --algo clip_svm"),
    (["--image-tower", "vit_l_16"], "takes 224 px inputs only"),
    (["--weights", "/nonexistent/w.pt"], "--weights /nonexistent/w.pt: no such file"),
    (["--loss", "contrastive", "--class-weights", "inverse"], "--class-weights inverse does not apply"),
    (["--svm-feature", "logits"], "--svm-feature 'logits' is unknown"),
    (["--knn-k", "0"], "--knn-k must be >= 1"),
    (["--svm-c", "0"], "--svm-c must be > 0"),
    (["--backbone-lr", "0"], "--backbone-lr must be positive"),
    (["--logit-scale", "0"], "--logit-scale must be positive"),
    (["--fl", "fedprox", "--mu", "-1"], "--mu must be >= 0"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, tiny, cache, capsys, flags, needle):
    code, out = cli(tmp_path, tiny, cache, *flags)
    one_line_error(capsys, code, needle, out=out)


def test_contrastive_and_proto_ce_belong_to_clip_svm_only(tmp_path, capsys):
    out = str(tmp_path / "o")
    code = run.main(["--algo", "fedavg", "--loss", "proto_ce", "--quiet", "--out", out])
    one_line_error(capsys, code, "--loss proto_ce does not apply to --algo fedavg", out=out)


def test_the_constructor_refuses_what_the_command_line_refuses(fed, cache):
    with pytest.raises(fedmed.UsageError, match="--loss ce"):
        make(fed, cache, cfg_of(loss="ce"))
    bare = datasets.make_synthetic(seed=0, clients=3, image_size=16)
    with pytest.raises(fedmed.UsageError, match="--svm evaluates on an unseen site"):
        make(bare, cache, svm=True)
    with pytest.raises(fedmed.UsageError, match="--image-size 16 is too small"):
        make(fed, cache, image_tower="convnext_t")
    multi = datasets.make_synthetic_multilabel(0, 3, 16, 2, 0.2, False)
    with pytest.raises(fedmed.UsageError, match="single-label"):
        make(multi, cache)
    cs.ClipSVM.check_command(cfg_of(), cs.Args(svm=True), datasets.namespace(holdout_client="a"),
                             {"svm"})
    cs.ClipSVM.check_command(cfg_of(), cs.Args(fl="fedprox"), datasets.namespace(), {"mu"})


# ---------------------------------------------------------------- pieces mutation probes

def test_small_settings_are_accepted_and_the_svm_seed_is_taken_mod_2_32():
    assert cs.Args(knn_k=1).knn_k == 1
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(2), 10)
    z = rng.normal(size=(20, 3)) + y[:, None] * 3
    big = 2 ** 40 + 100                                        # % 2**32: 100, % 64: 36
    assert cs.fit_classifier("svm", z, y, 2, svm_c=1, knn_k=5, seed=big)[1].random_state == 100
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # sklearn 1.9's deprecation of
        cs.fit_classifier("svm", z, y, 2, svm_c=1, knn_k=5, seed=1)   # `probability` is silenced
    assert cs.fit_classifier("svm", z, y, 2, svm_c=1, knn_k=5, seed=7)[1].random_state == 7


def test_paper_metrics_on_a_hand_case():
    """3 classes; class 2 predicted once (right) and present once: precision = recall = 1."""
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 0, 2])
    prob = np.eye(3)[pred] * 0.8 + 0.1
    m = cs.paper_metrics(y, prob)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["macro_precision"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["macro_recall"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["weighted_precision"] == pytest.approx((3 * 2 / 3 + 2 * 1 / 2 + 1) / 6)
    assert m["weighted_f1"] == pytest.approx((3 * 2 / 3 + 2 * 1 / 2 + 1) / 6)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_check_command_branches():
    ns = datasets.namespace
    with pytest.raises(fedmed.UsageError, match="--svm evaluates"):
        cs.ClipSVM.check_command(cfg_of(), cs.Args(svm=True), ns(), set())
    cs.ClipSVM.check_command(cfg_of(), cs.Args(svm=True, unseen_dir="x"), ns(dataset="ham10000"),
                             set())
    with pytest.raises(fedmed.UsageError, match="pairs with --dataset ham10000"):
        cs.ClipSVM.check_command(cfg_of(), cs.Args(unseen_dir="x"), ns(dataset="isic2019"), set())
    with pytest.raises(fedmed.UsageError, match="--mu applies only"):
        cs.ClipSVM.check_command(cfg_of(), cs.Args(), ns(), {"mu"})
    cs.ClipSVM.check_command(cfg_of(), cs.Args(), ns(), set())


def test_imagenet_weights_of_a_paper_tower_absent_here_are_one_line():
    path = cs.imagenet_path("swin_t")
    if os.path.isfile(path):
        pytest.skip(f"{path} is present on this machine")
    with pytest.raises(fedmed.UsageError, match="not found for --image-tower swin_t; download"):
        cs.check_tower("swin_t", "imagenet", None)


def test_a_json_text_config_open_clip_never_saw_works(fed, tmp_path):
    """--clip-model FILE.json: its name is registered before the tokenizer is asked."""
    import json as js
    path = tmp_path / "fedmed-clipsvm-unregistered-ctx12.json"
    cfg = dict(TINY, text_cfg=dict(TINY["text_cfg"], context_length=12))
    path.write_text(js.dumps(cfg))
    algo, _, _ = make(fed, "none", clip_model=str(path))
    assert algo.text.shape == (fed.num_classes, 24)


def test_features_use_the_clients_own_bn_under_bn_local(fed, cache):
    algo, server, clients = make(fed, cache, cfg_of(bn="local"), svm=True)
    one_round(algo, server, clients)
    c = clients[0]
    idx = c.test[:6]
    for who, private in ((c, c.state["private"]), (algo.holdout[0], algo.average_private())):
        algo.load_model(server.weights, private)
        algo.model.eval()
        x, _ = algo.batch(torch.as_tensor(idx))
        with torch.no_grad():
            want = F.normalize(algo.model.backbone(x), dim=-1).double().numpy()
        algo.load_model(server.weights, clients[1].state["private"])     # something else loaded
        assert np.allclose(algo.features(server, who, idx), want, atol=1e-6), who.name


def test_the_recipe_is_the_sheets_section_7(tmp_path, tiny, cache):
    """AdamW lr 1e-3 (P; backbone 1e-4), weight decay 0.01, batch 32, R = 50, E = 1, the
    contrastive loss unweighted: what run.py applies to the flags left unset."""
    assert cs.ClipSVM.recipe == {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.01,
                                 "batch_size": 32, "rounds": 50, "local_epochs": 1,
                                 "loss": "contrastive", "class_weights": "none"}
    assert cs.Args().backbone_lr == 1e-4 and cs.Args().mu == 0.01
    out = str(tmp_path / "recipe")
    assert run.main(["--algo", "clip_svm", "--image-tower", "mobilenet_v2", "--clip-model", tiny,
                     "--pretrained", "none", "--feature-cache", cache, "--clients", "2",
                     "--image-size", "16", "--rounds", "1", "--local-steps", "1", "--quiet",
                     "--out", out]) == 0
    with open(os.path.join(out, "config.json")) as f:
        c = json.load(f)["config"]
    assert (c["optimizer"], c["lr"], c["weight_decay"], c["batch_size"], c["loss"]) == (
        "adam", 1e-3, 0.01, 32, "contrastive")


@pytest.mark.parametrize("name", ["convnext_t", "convnext_s", "convnext_b", "convnext_l"])
def test_convnext_towers_take_32_px_and_refuse_31(name):
    """ConvNeXt's stem (stride 4) and three 2x downsamplings need a side of at least 32:
    the check before any image is read accepts 32 and refuses 31 for each size."""
    cs.check_tower(name, None, 32)
    with pytest.raises(fedmed.UsageError, match=f"--image-size 31 is too small for --image-tower {name}"):
        cs.check_tower(name, None, 31)


def test_the_32_px_minimum_is_the_convnext_forward_pass():
    """The fact behind the table, on the smallest ConvNeXt: 32 px runs, 31 px fails."""
    import torchvision
    net = torchvision.models.convnext_tiny(weights=None).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)
        with pytest.raises(RuntimeError):
            net(torch.zeros(1, 3, 31, 31))


def test_feature_classifier_defaults_are_the_sheets_and_guards_take_the_edges():
    """Sheet 3C: SVC with C = 1 (RBF, gamma 'scale') and KNN with k = 5; a logit scale
    below 1 is valid (only s <= 0 is refused)."""
    a = cs.Args()
    assert a.svm_c == 1.0 and a.knn_k == 5
    assert cs.Args(logit_scale=0.5).logit_scale == 0.5
    assert cs.Args(knn_k=1).knn_k == 1
    for bad in ({"logit_scale": 0.0}, {"svm_c": 0.0}, {"knn_k": 0}):
        with pytest.raises(fedmed.UsageError):
            cs.Args(**bad)


def test_imagenet_weights_paths(tmp_path):
    """--weights imagenet: mobilenet_v2 reads the file `models.py fetch` makes; a paper
    tower reads torchvision's default weights file name in torch hub's cache."""
    import torchvision
    import models
    assert cs.imagenet_path("mobilenet_v2") == str(models.imagenet_file("mobilenet_v2"))
    url = torchvision.models.get_model_weights("convnext_tiny").DEFAULT.url
    assert cs.imagenet_path("convnext_t") == str(models.hub_checkpoints() / url.rsplit("/", 1)[-1])
    f = tmp_path / "tower.pth"
    f.write_bytes(b"x")
    cs.check_tower("convnext_t", str(f), 32)                 # an existing file passes
    with pytest.raises(fedmed.UsageError, match="no such file"):
        cs.check_tower("convnext_t", str(tmp_path / "absent.pth"), 32)
