"""The federated core, each property checked against an independent computation."""
import io
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets
import fedmed
import run
from fedmed import Config, ServerState, transmit
from helpers import drop_seconds, one_line_error, read_jsonl

import algorithms  # noqa: E402 - the methods register themselves

algorithms.load_all()


@pytest.fixture(scope="module")
def fed():
    return datasets.make_synthetic(seed=3, clients=3, image_size=16)


def make_algo(fed, **kw):
    cfg = Config(**{"model": "cnn", "rounds": 2, "batch_size": 16, **kw})
    cls = fedmed.ALGORITHMS[cfg.algo]
    algo = cls(cfg, cls.Args() if cls.Args else None, fed)
    clients = fedmed.make_clients(fed)
    server = ServerState()
    algo.setup(server, clients)
    return algo, server, clients


def cli(tmp_path, *flags, name="out"):
    """Run the command line on a tiny synthetic federation; returns (exit code, out dir)."""
    out = str(tmp_path / name)
    base = ["--image-size", "16", "--clients", "3", "--rounds", "3", "--local-epochs", "1",
            "--batch-size", "16", "--quiet", "--out", out]
    return run.main(base + list(flags)), out


# ---------------------------------------------------------------- aggregation

def test_weighted_aggregation_equals_hand_computation(fed):
    algo, server, _ = make_algo(fed)
    gen = torch.Generator().manual_seed(0)
    n = [1, 2, 7]
    ups = {k: {"w": {key: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + k
                     for key, v in server.weights.items()}, "n": n[k]} for k in range(3)}
    algo.aggregate(server, ups)
    for key, v in server.weights.items():
        if key.endswith("num_batches_tracked"):
            assert v == max(ups[k]["w"][key] for k in range(3))
            continue
        hand = (1 * ups[0]["w"][key] + 2 * ups[1]["w"][key] + 7 * ups[2]["w"][key]) / 10
        assert torch.allclose(v, hand, atol=1e-6), key


def test_uniform_weighting_and_partial_participation(fed):
    algo, server, _ = make_algo(fed, weighting="uniform")
    ups = {k: {"w": {"classifier.bias": torch.full((6,), float(k + 1))}, "n": 10 ** k} for k in range(3)}
    algo.aggregate(server, ups)
    assert torch.allclose(server.weights["classifier.bias"], torch.full((6,), 2.0))
    algo, server, _ = make_algo(fed)                     # samples weighting, S_t = {0, 2}
    ups = {0: {"w": {"classifier.bias": torch.full((6,), 1.0)}, "n": 1},
           2: {"w": {"classifier.bias": torch.full((6,), 4.0)}, "n": 3}}
    algo.aggregate(server, ups)
    assert torch.allclose(server.weights["classifier.bias"], torch.full((6,), (1 + 12) / 4))


def test_client_sampling_is_seeded_and_sized():
    s = fedmed.sample_clients(0, 5, 10, 0.3)
    assert s == fedmed.sample_clients(0, 5, 10, 0.3) and len(s) == 3 and len(set(s)) == 3
    assert fedmed.sample_clients(0, 5, 10, 1.0) == list(range(10))
    assert len(fedmed.sample_clients(0, 5, 10, 0.01)) == 1
    draws = {tuple(fedmed.sample_clients(0, t, 10, 0.3)) for t in range(20)}
    assert len(draws) > 5


# ---------------------------------------------------------------- BatchNorm policies

def one_round(algo, server, clients):
    uploads = {}
    for c in clients:
        payload, _ = transmit(algo.broadcast(server, c))
        uploads[c.id], _ = transmit(algo.local_update(c, payload))
    return uploads


def test_bn_average_is_weighted_mean_of_client_buffers(fed):
    algo, server, clients = make_algo(fed, bn="average")
    uploads = one_round(algo, server, clients)
    algo.aggregate(server, uploads)
    key = "features.1.running_mean"
    n = np.array([c.n for c in clients], float)
    hand = sum(uploads[c.id]["w"][key].double() * n[i] / n.sum() for i, c in enumerate(clients))
    assert torch.allclose(server.weights[key].double(), hand, atol=1e-6)
    assert not torch.equal(uploads[0]["w"][key], uploads[1]["w"][key])


def test_bn_local_keeps_bn_at_the_client_and_out_of_payloads(fed):
    algo, server, clients = make_algo(fed, bn="local")
    bn = {k for k in server.weights if k.startswith("features.1.")}
    assert bn == {f"features.1.{s}" for s in ("weight", "bias", "running_mean", "running_var",
                                               "num_batches_tracked")}
    down = algo.broadcast(server, clients[0])
    assert not bn & set(down["w"])
    uploads = one_round(algo, server, clients)
    assert not any(bn & set(u["w"]) for u in uploads.values())
    before = {k: clients[0].state["private"][k].clone() for k in bn}
    algo.aggregate(server, uploads)
    for k in bn:                                         # aggregation leaves them alone
        assert torch.equal(clients[0].state["private"][k], before[k])
    assert not torch.equal(clients[0].state["private"]["features.1.running_mean"],
                           clients[1].state["private"]["features.1.running_mean"])
    # ... and the bytes sent drop accordingly
    avg, s_avg, c_avg = make_algo(fed, bn="average")
    assert transmit(algo.broadcast(server, clients[0]))[1] < transmit(avg.broadcast(s_avg, c_avg[0]))[1]


def test_bn_params_only_sends_affine_not_statistics(fed):
    algo, server, clients = make_algo(fed, bn="params_only")
    down = algo.broadcast(server, clients[0])["w"]
    assert "features.1.weight" in down and "features.1.bias" in down
    assert not any("running" in k or "num_batches" in k for k in down)
    init_stats = server.weights["features.1.running_mean"].clone()
    algo.aggregate(server, one_round(algo, server, clients))
    assert torch.equal(server.weights["features.1.running_mean"], init_stats)


# ---------------------------------------------------------------- FedProx

def test_fedprox_gradient_is_mu_times_distance(fed):
    mu = 0.37
    prox, server, clients = make_algo(fed, algo="fedprox")
    prox.args.mu = mu
    avg, _, _ = make_algo(fed, algo="fedavg")
    payload = prox.broadcast(server, clients[0])
    model = prox.model
    prox.load_model(payload["w"], {})
    model.eval()                                         # no BN statistic updates
    batch = prox.batch(torch.as_tensor(clients[0].train[:8]))
    model.zero_grad()
    prox.loss(model, batch, payload, clients[0]).backward()
    zero_step = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    avg.loss(model, batch, payload, clients[0]).backward()
    for n, p in model.named_parameters():                # the proximal term is 0 at w = w^t
        assert torch.allclose(zero_step[n], p.grad, atol=1e-7)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    model.zero_grad()
    prox.loss(model, batch, payload, clients[0]).backward()
    g_prox = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    avg.loss(model, batch, payload, clients[0]).backward()
    for n, p in model.named_parameters():
        expected = mu * (p.detach() - payload["w"][n])
        assert torch.allclose(g_prox[n] - p.grad, expected, atol=1e-5), n


def test_fedprox_mu_zero_equals_fedavg_bit_for_bit(tmp_path):
    rc1, out1 = cli(tmp_path, "--algo", "fedavg", name="a")
    rc2, out2 = cli(tmp_path, "--algo", "fedprox", "--mu", "0", name="b")
    assert rc1 == rc2 == 0
    w1 = torch.load(os.path.join(out1, "checkpoint.pt"), weights_only=False)["server"]["weights"]
    w2 = torch.load(os.path.join(out2, "checkpoint.pt"), weights_only=False)["server"]["weights"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    rc3, out3 = cli(tmp_path, "--algo", "fedprox", "--mu", "1", name="c")
    w3 = torch.load(os.path.join(out3, "checkpoint.pt"), weights_only=False)["server"]["weights"]
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)


# ---------------------------------------------------------------- determinism and resume

def test_same_seed_same_results_other_seed_other_results(tmp_path):
    _, a = cli(tmp_path, name="a")
    _, b = cli(tmp_path, name="b")
    _, c = cli(tmp_path, "--seed", "1", name="c")
    sa, sb, sc = (json.load(open(os.path.join(d, "summary.json"))) for d in (a, b, c))
    assert drop_seconds(sa) == drop_seconds(sb)
    assert drop_seconds(read_jsonl(os.path.join(a, "metrics.jsonl"))) == \
        drop_seconds(read_jsonl(os.path.join(b, "metrics.jsonl")))
    assert drop_seconds(sa) != drop_seconds(sc)


@pytest.mark.parametrize("algo", ["fedavg", "local"])
def test_stop_and_resume_equals_uninterrupted(tmp_path, algo):
    flags = ["--algo", algo, "--rounds", "4", "--fraction", "0.67", "--keep-optimizer"]
    rc, full = cli(tmp_path, *flags, name="full")
    assert rc == 0
    rc, part = cli(tmp_path, *flags, "--stop-after", "2", name="part")
    assert rc == 0 and not os.path.exists(os.path.join(part, "summary.json"))
    with open(os.path.join(part, "metrics.jsonl"), "a") as f:     # a round half-written
        f.write(json.dumps({"round": 3, "client": "site0"}) + "\n")  # before a kill
    rc, _ = cli(tmp_path, *flags, "--resume", name="part")
    assert rc == 0
    ck_full = torch.load(os.path.join(full, "checkpoint.pt"), weights_only=False)
    ck_part = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=False)
    for k, v in ck_full["server"]["weights"].items():
        assert torch.equal(v, ck_part["server"]["weights"][k])
    for s1, s2 in zip(ck_full["clients"], ck_part["clients"]):
        for k, v in s1["state"].get("private", {}).items():
            assert torch.equal(v, s2["state"]["private"][k])
    assert drop_seconds(read_jsonl(os.path.join(full, "metrics.jsonl"))) == \
        drop_seconds(read_jsonl(os.path.join(part, "metrics.jsonl")))
    assert drop_seconds(json.load(open(os.path.join(full, "summary.json")))) == \
        drop_seconds(json.load(open(os.path.join(part, "summary.json"))))


def test_loop_never_touches_global_rng(tmp_path):
    torch.manual_seed(123)
    np.random.seed(123)
    expected_t, expected_n = torch.rand(1), np.random.rand()
    torch.manual_seed(123)
    np.random.seed(123)
    cli(tmp_path)
    assert torch.equal(torch.rand(1), expected_t) and np.random.rand() == expected_n


def test_single_client_fedavg_equals_centralised_sgd(fed):
    """K = 1, plain SGD: R rounds of tau steps through the loop = R * tau steps of one
    bare model on the same minibatches."""
    one = datasets.Federation("one", fed.classes, fed.x, fed.y, fed.clients[:1])
    cfg = Config(rounds=3, local_steps=4, batch_size=8, momentum=0.0, lr=0.05, model="cnn")
    algo, server, clients = make_algo(one, **{k: getattr(cfg, k) for k in
                                              ("rounds", "local_steps", "batch_size", "momentum", "lr")})
    bare, _, _ = make_algo(one, **{k: getattr(cfg, k) for k in
                                   ("rounds", "local_steps", "batch_size", "momentum", "lr")})
    model = bare.model
    model.load_state_dict(server.weights)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    for t in range(cfg.rounds):
        algo.round = bare.round = t
        uploads = one_round(algo, server, clients)
        algo.aggregate(server, uploads)
        gen = fedmed.torch_rng(cfg.seed, "batches", t, 0)
        model.train()
        for idx in bare.local_batches(clients[0], gen):
            x, y = bare.batch(idx, gen)
            loss = F.cross_entropy(model(x), y, weight=bare.alpha)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for k, v in model.state_dict().items():
        assert torch.allclose(v.double(), server.weights[k].double(), atol=1e-5), k


# ---------------------------------------------------------------- communication

def test_byte_counts_are_the_serialised_sizes(tmp_path, fed):
    algo, server, clients = make_algo(fed)
    payload = algo.broadcast(server, clients[0])
    buf = io.BytesIO()
    torch.save(payload, buf)
    received, nbytes = transmit(payload)
    assert nbytes == len(buf.getvalue())
    assert all(torch.equal(received["w"][k], payload["w"][k]) for k in payload["w"])
    assert transmit({}) == ({}, 0)
    rc, out = cli(tmp_path, "--fraction", "0.67")
    lines = read_jsonl(os.path.join(out, "metrics.jsonl"))
    summary = json.load(open(os.path.join(out, "summary.json")))
    per_client = [m for m in lines if m["client"] != "pooled"]
    assert sum(m["bytes_down"] for m in per_client) == summary["bytes_down"]
    assert sum(m["bytes_up"] for m in per_client) == summary["bytes_up"]
    trained = [m for m in per_client if m["bytes_down"]]
    assert len(trained) == 3 * 2                          # 2 of 3 clients in each of 3 rounds
    assert {m["bytes_down"] for m in trained} == {nbytes}  # the full model every time


@pytest.mark.parametrize("algo", ["local", "pooled"])
def test_local_and_pooled_send_nothing(tmp_path, algo):
    rc, out = cli(tmp_path, "--algo", algo)
    s = json.load(open(os.path.join(out, "summary.json")))
    assert rc == 0 and s["bytes_up"] == 0 and s["bytes_down"] == 0


def test_pooled_makes_the_same_sample_visits(fed):
    algo, server, clients = make_algo(fed, algo="pooled", local_steps=3)
    (pseudo,) = algo.participants(server, clients)
    assert sorted(pseudo.train.tolist()) == sorted(np.concatenate([c.train for c in clients]).tolist())
    steps = list(algo.local_batches(pseudo, torch.Generator().manual_seed(0), len(clients)))
    assert len(steps) == 3 * len(clients)


# ---------------------------------------------------------------- losses and metrics

def test_focal_loss_formula():
    gen = torch.Generator().manual_seed(0)
    logits, y = torch.randn(7, 4, generator=gen), torch.tensor([0, 1, 2, 3, 0, 0, 1])
    assert torch.allclose(fedmed.focal_loss(logits, y, None, 0.0), F.cross_entropy(logits, y))
    alpha = fedmed.class_weights(y.numpy(), 4)
    assert torch.allclose(alpha, torch.tensor([7 / 3, 7 / 2, 7, 7]))
    loop = 0.0
    for i in range(7):
        p = torch.softmax(logits[i], 0)[y[i]]
        loop += -alpha[y[i]] * (1 - p) ** 2 * torch.log(p)
    assert torch.allclose(fedmed.focal_loss(logits, y, alpha, 2.0), loop / 7)
    assert fedmed.class_weights(np.array([0, 0, 2]), 3).tolist() == [1.5, 0.0, 3.0]


def test_metrics_agree_with_sklearn():
    from sklearn import metrics as skm
    rng = np.random.default_rng(0)
    for trial in range(20):
        C, n = 5, int(rng.integers(5, 60))
        y = rng.choice([0, 1, 3], size=n) if trial % 2 else rng.integers(0, C, n)  # missing classes
        logits = rng.normal(size=(n, C)) + 2 * np.eye(C)[y] * rng.random()
        logits[:, 4] = np.round(logits[:, 4])                                      # ties
        prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        m = fedmed.classification_metrics(y, prob)
        pred = prob.argmax(1)
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
        assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, labels=range(C), average="macro",
                                                           zero_division=0))
        aucs = [skm.roc_auc_score(y == c, prob[:, c]) for c in np.unique(y) if 0 < (y == c).sum() < n]
        assert m["macro_auroc"] == pytest.approx(np.mean(aucs))
        assert m["loss"] == pytest.approx(skm.log_loss(y, prob, labels=range(C)))


def test_pooled_balanced_accuracy_is_not_the_mean_of_clients():
    eye = np.eye(2)
    y1, p1 = np.array([0, 0, 0, 1]), eye[[0, 0, 0, 0]]       # client 1: BA 0.5
    y2, p2 = np.array([1, 1]), eye[[1, 1]]                   # client 2: BA 1.0
    m1, m2 = fedmed.classification_metrics(y1, p1), fedmed.classification_metrics(y2, p2)
    pooled = fedmed.classification_metrics(np.r_[y1, y2], np.r_[p1, p2])
    assert (m1["balanced_accuracy"] + m2["balanced_accuracy"]) / 2 == 0.75
    assert pooled["balanced_accuracy"] == pytest.approx((1.0 + 2 / 3) / 2)


# ---------------------------------------------------------------- results folder

def test_results_folder_contents(tmp_path):
    rc, out = cli(tmp_path)
    assert rc == 0
    assert sorted(os.listdir(out)) == [fedmed.LOCK_NAME, "checkpoint.pt", "config.json",
                                       "metrics.jsonl", "model.pt", "summary.json"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["config"]["rounds"] == 3 and cfg["versions"]["torch"] == torch.__version__
    assert "open_clip" in cfg["versions"] and "git_commit" in cfg and cfg["split"]
    s = json.load(open(os.path.join(out, "summary.json")))
    for key in ("balanced_accuracy", "pooled_balanced_accuracy", "accuracy", "macro_f1",
                "macro_auroc", "bytes_up", "bytes_down", "seconds", "rounds"):
        assert key in s
    lines = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert len(lines) == 3 * (3 + 1)                       # every client every round + pooled
    last = [m for m in lines if m["round"] == 3 and m["client"] != "pooled"]
    assert s["balanced_accuracy"] == pytest.approx(np.mean([m["balanced_accuracy"] for m in last]))


def test_existing_out_is_refused_then_overwritten(tmp_path, capsys):
    rc, out = cli(tmp_path)
    before = open(os.path.join(out, "summary.json")).read()
    rc, _ = cli(tmp_path, "--rounds", "1")
    assert rc == 2 and open(os.path.join(out, "summary.json")).read() == before
    assert "--overwrite" in capsys.readouterr().err
    rc, _ = cli(tmp_path, "--rounds", "1", "--overwrite")
    assert rc == 0 and json.load(open(os.path.join(out, "summary.json")))["rounds"] == 1


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("flags,needle", [
    (["--algo", "fedsgdx"], "--algo"),
    (["--dataset", "nope"], "--dataset"),
    (["--rounds", "0"], "--rounds"),
    (["--fraction", "0"], "--fraction"),
    (["--fraction", "1.5"], "--fraction"),
    (["--weights", "/nonexistent/w.pt"], "--weights"),
    (["--partition", "dirichlet", "--dataset", "synthetic"], "--partition"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, flags, needle):
    rc, out = cli(tmp_path, *flags)
    one_line_error(capsys, rc, needle, out=out)


def test_client_left_empty_is_refused(tmp_path, fed):
    empty = datasets.ClientSplit("site9", np.zeros(0, np.int64), fed.clients[0].test)
    bad = datasets.Federation("bad", fed.classes, fed.x, fed.y, fed.clients + [empty])
    with pytest.raises(fedmed.UsageError, match="site9"):
        fedmed.run(Config(rounds=1), None, bad, str(tmp_path / "o"), quiet=True)
    assert not os.path.exists(tmp_path / "o")


def test_client_without_test_images_is_refused(tmp_path, fed):
    c = fed.clients[0]
    bad = datasets.Federation("bad", fed.classes, fed.x, fed.y, fed.clients[1:] + [
        datasets.ClientSplit("site7", c.train, np.zeros(0, np.int64))])
    with pytest.raises(fedmed.UsageError, match="site7 has no test image"):
        fedmed.run(Config(rounds=1), None, bad, str(tmp_path / "o"), quiet=True)


def test_resume_from_other_configuration_is_refused(tmp_path, capsys):
    cli(tmp_path, "--stop-after", "1")
    rc, out = cli(tmp_path, "--resume", "--lr", "0.5")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "another configuration" in err and "config.lr" in err
    assert len(read_jsonl(os.path.join(out, "metrics.jsonl"))) == 4   # nothing lost


def test_mismatched_weights_file_is_refused(tmp_path, capsys, fed):
    import models
    wrong = tmp_path / "resnet.pt"
    torch.save(models.build("resnet18", 6).state_dict(), wrong)
    rc, _ = cli(tmp_path, "--weights", str(wrong))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(wrong) in err and "does not fit" in err and len(err.splitlines()) == 1
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    rc, _ = cli(tmp_path, "--weights", str(junk), name="o2")
    assert rc == 2 and "cannot be read" in capsys.readouterr().err


# ---------------------------------------------------------------- models

@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "densenet121"])
def test_torchvision_models_build_offline_and_load_local_weights(tmp_path, name):
    import torchvision

    import models
    imagenet = getattr(torchvision.models, name)(weights=None)      # a 1000-class checkpoint
    path = tmp_path / f"{name}.pt"
    torch.save(imagenet.state_dict(), path)
    m = models.build(name, 8, str(path))
    body = {k: v for k, v in imagenet.state_dict().items() if not k.startswith(models.HEADS[name] + ".")}
    assert all(torch.equal(m.state_dict()[k], v) for k, v in body.items())
    assert m(torch.zeros(2, 3, 64, 64)).shape == (2, 8)
    own = tmp_path / f"{name}_8.pt"                                  # our own 8-class checkpoint
    torch.save(m.state_dict(), own)
    m2 = models.build(name, 8, str(own))
    assert all(torch.equal(m2.state_dict()[k], v) for k, v in m.state_dict().items())


def test_several_views_each_get_metrics_and_the_first_is_primary(tmp_path, fed):
    """predict() returning {view: probs} gives a line per view; summary uses the first."""
    class TwoViews(fedmed.ALGORITHMS["fedavg"]):
        def predict(self, server, client, idx):
            p = super().predict(server, client, idx)
            uniform = np.full_like(p, 1.0 / p.shape[1])
            return {"global": p, "uniform": uniform}

    fedmed.ALGORITHMS["_twoviews"] = TwoViews
    try:
        s = fedmed.run(Config(algo="_twoviews", rounds=2, batch_size=16, local_epochs=1), None,
                       fed, str(tmp_path / "o"), quiet=True)
    finally:
        del fedmed.ALGORITHMS["_twoviews"]
    lines = read_jsonl(tmp_path / "o" / "metrics.jsonl")
    assert len(lines) == 2 * 2 * (3 + 1)
    uni = [m for m in lines if m["view"] == "uniform" and m["round"] == 2 and m["client"] != "pooled"]
    assert all(m["accuracy"] == pytest.approx((np.argmax(np.full(6, 1 / 6)) ==
                                               fed.y[torch.as_tensor(fed.clients[i].test)].numpy()).mean())
               for i, m in enumerate(uni))
    glob = [m for m in lines if m["view"] == "global" and m["round"] == 2 and m["client"] != "pooled"]
    assert s["view"] == "global"
    assert s["balanced_accuracy"] == pytest.approx(np.mean([m["balanced_accuracy"] for m in glob]))
    assert s["views"]["uniform"]["balanced_accuracy"] == pytest.approx(
        np.mean([m["balanced_accuracy"] for m in uni]))
    pooled = [m for m in lines if m["client"] == "pooled" and m["view"] == "global"]
    assert s["bytes_up"] == sum(m["bytes_up"] for m in pooled)      # not double-counted


def test_local_models_are_cross_evaluated_in_the_last_round(tmp_path):
    rc, out = cli(tmp_path, "--algo", "local")
    lines = read_jsonl(os.path.join(out, "metrics.jsonl"))
    s = json.load(open(os.path.join(out, "summary.json")))
    assert {m["view"] for m in lines if m["round"] < 3} == {"local"}
    last = [m for m in lines if m["round"] == 3]
    assert {m["view"] for m in last} == {"local", "model:site0", "model:site1", "model:site2"}
    own = {m["client"]: m["balanced_accuracy"] for m in last if m["view"] == "local"}
    for name in ("site0", "site1", "site2"):           # model k on its own test set = "local"
        cross = [m for m in last if m["view"] == f"model:{name}" and m["client"] == name][0]
        assert cross["balanced_accuracy"] == own[name]
    assert s["view"] == "local" and set(s["views"]) == {"model:site0", "model:site1", "model:site2"}


def test_held_out_clients_get_distinct_negative_ids_and_stay_out_of_the_pooled_line(tmp_path):
    """Two held-out clients: ids -1 and -2 (never a training client's 0..K-1), each
    evaluated on a line of its own marked holdout, and the pooled test line joins the
    training clients' test sets only."""
    fed = datasets.make_synthetic(seed=0, clients=4, image_size=16)
    held = datasets.take_holdout(fed.clients, "site2,site3", [])
    fed.clients = [c for c in fed.clients if c.name not in ("site2", "site3")]
    fed.holdout = held
    cfg = fedmed.Config(algo="fedavg", rounds=1, local_steps=1, batch_size=8)
    algo, cfg, clients, holdout, server = fedmed.build(cfg, None, fed, quiet=True)
    assert [c.id for c in clients] == [0, 1] and [c.id for c in holdout] == [-1, -2]
    assert algo.holdout is holdout and algo.clients is clients     # attach, setup
    lines = fedmed.evaluate_all(algo, server, clients, holdout, 0, {}, {}, 0.0)
    pooled = [m for m in lines if m["client"] == "pooled"][0]
    assert pooled["n"] == sum(len(c.test) for c in clients)
    assert {m["client"] for m in lines if m["holdout"]} == {"site2", "site3"}


def test_the_pooled_line_s_seconds_are_the_round_s_training_time(tmp_path):
    """The pooled line's `seconds`: the time from the round's start to its aggregation,
    between 0 and the run's wall time."""
    import time
    fed = datasets.make_synthetic(seed=0, clients=3, image_size=16)
    cfg = fedmed.Config(algo="fedavg", rounds=2, local_steps=1, batch_size=8)
    t0 = time.perf_counter()
    fedmed.run(cfg, None, fed, str(tmp_path / "r"), quiet=True)
    wall = time.perf_counter() - t0
    with open(tmp_path / "r" / "metrics.jsonl") as f:
        pooled = [json.loads(x) for x in f if '"pooled"' in x]
    assert len(pooled) == 2 and all(0 < m["seconds"] < wall for m in pooled)
    with open(tmp_path / "r" / "summary.json") as f:
        total = json.load(f)["seconds"]
    assert sum(m["seconds"] for m in pooled) < total < wall   # + evaluation and checkpoint


def test_stop_after_the_last_round_finishes_the_run(tmp_path):
    """--stop-after R with --rounds R: nothing is left to stop before, so the run ends
    as usual, with its summary."""
    fed = datasets.make_synthetic(seed=0, clients=3, image_size=16)
    cfg = fedmed.Config(algo="fedavg", rounds=2, local_steps=1, batch_size=8)
    s = fedmed.run(cfg, None, fed, str(tmp_path / "r"), quiet=True, stop_after=2)
    assert s and s["rounds"] == 2 and (tmp_path / "r" / "summary.json").exists()
    said: list = []
    s = fedmed.run(cfg, None, fed, str(tmp_path / "q"), quiet=True, stop_after=1, log=said.append)
    assert s == {} and not (tmp_path / "q" / "summary.json").exists()
    assert said == ["stopped after round 1 as asked; continue with --resume"]


def test_an_interrupt_names_the_round_it_stopped_in_and_the_checkpoint_kept(tmp_path,
                                                                         monkeypatch):
    """Ctrl-C in round 3: one line saying round 3 of 4 and that round 2's checkpoint is
    kept (the checkpoint holds round 2)."""
    fed = datasets.make_synthetic(seed=0, clients=3, image_size=16)
    cfg = fedmed.Config(algo="fedavg", rounds=4, local_steps=1, batch_size=8)
    real = fedmed.Algorithm.local_update

    def interrupted(self, client, payload):
        if self.round == 2:
            raise KeyboardInterrupt
        return real(self, client, payload)
    monkeypatch.setattr(fedmed.Algorithm, "local_update", interrupted)
    out = str(tmp_path / "r")
    with pytest.raises(fedmed.Interrupted) as e:
        fedmed.run(cfg, None, fed, out, quiet=True)
    assert "interrupted in round 3 of 4" in str(e.value) and "round 2" in str(e.value)
    assert fedmed.load_checkpoint(os.path.join(out, "checkpoint.pt"))["round"] == 2


def test_resuming_a_finished_run_rebuilds_its_summary_from_the_metrics_file(tmp_path):
    """--resume on a run that has done all its rounds trains nothing and writes the same
    summary again (from metrics.jsonl)."""
    fed = datasets.make_synthetic(seed=0, clients=3, image_size=16)
    cfg = fedmed.Config(algo="fedavg", rounds=2, local_steps=1, batch_size=8)
    out = str(tmp_path / "r")
    first = fedmed.run(cfg, None, fed, out, quiet=True)
    again = fedmed.run(cfg, None, fed, out, quiet=True, resume=True)
    assert again["rounds"] == 2 and again["balanced_accuracy"] == first["balanced_accuracy"]
    assert again["pooled_balanced_accuracy"] == first["pooled_balanced_accuracy"]
