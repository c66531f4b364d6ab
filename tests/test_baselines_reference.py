"""Reference-step tests for the baselines (FedAvg with each BN policy, FedProx, local-only,
pooled): each test recomputes two complete rounds from ../shared/methods/baselines.md in
plain torch, here, without the project's training, aggregation or prediction code, and
compares the global weights after every aggregation and the metrics of every client's
prediction with what `fedmed.run` produced.

Recomputed (baselines.md section 3):
  * the client update: E epochs of minibatch SGD (momentum, weight decay; state reset
    every round) on the class-weighted cross-entropy, from w_t, over the permutation of
    the client's images drawn from the (seed, "batches", t, k) stream, each batch
    flip-augmented from the same stream and ImageNet-normalised, a last batch of one image
    skipped; FedProx adds mu/2 ||w - w^t||^2 (Eq. 2) over the parameters that were sent;
  * the aggregation w_{t+1} = sum_k n_k / sum_j n_j w_{t+1}^k (Algorithm 1) over the
    sampled clients (S_t from the (seed, "sample", t) stream), BN running statistics by the
    --bn policy, num_batches_tracked the maximum;
  * the prediction: softmax of the evaluated model (global, or with the client's own BN
    tensors under local / params_only, or the client's own model for local-only) in eval
    mode, scored against metrics.jsonl (loss = mean cross-entropy, balanced accuracy).
Tolerances are float rounding (1e-5): the same float32 ops in another order.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets
import fedmed
from models import SmallCNN

import algorithms  # noqa: E402 - the methods register themselves

algorithms.load_all()

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
SEED, B, LR, MOM, WD, ROUNDS = 7, 16, 0.05, 0.9, 1e-3, 2


@pytest.fixture(scope="module")
def fed():
    return datasets.make_synthetic(seed=3, clients=3, image_size=16)


def bn_stat(k):
    return k.endswith(("running_mean", "running_var", "num_batches_tracked"))


def bn_affine(k, sd):
    # the SmallCNN's BN layers are features.1, features.5, features.9 (conv, BN, ReLU, pool)
    return k.startswith("features.") and int(k.split(".")[1]) % 4 == 1 and not bn_stat(k)


def alpha_of(fed):
    y = np.concatenate([fed.y.numpy()[c.train] for c in fed.clients])
    if y.ndim == 2:                                    # pos_weight_c = #neg_c / #pos_c
        pos, neg = (y == 1).sum(0).astype(np.float64), (y == 0).sum(0).astype(np.float64)
        return torch.tensor(np.where(pos > 0, neg / np.maximum(pos, 1), 1.0), dtype=torch.float32)
    counts = np.bincount(y, minlength=fed.num_classes).astype(np.float64)
    return torch.tensor(np.where(counts > 0, counts.sum() / np.maximum(counts, 1), 0.0),
                        dtype=torch.float32)


def init_state(fed):
    with fedmed.seeded(SEED, "init"):                 # the common initialisation w_0
        model = SmallCNN(fed.num_classes)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def sgd(fed, state, train, t, key, alpha, mu=0.0, sent=None, epochs=1, batch=B,
        loss="ce", gamma=2.0, opt_state=None, out=None):
    """One client's local update, straight from the sheet; `out` (a dict) receives the
    optimiser state and the number of steps."""
    model = SmallCNN(fed.num_classes)
    model.load_state_dict(state)
    model.train()
    opt = torch.optim.SGD(list(model.parameters()), lr=LR, momentum=MOM, weight_decay=WD)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    gen = fedmed.torch_rng(SEED, "batches", t, key)
    data = torch.as_tensor(np.asarray(train), dtype=torch.long)
    steps = 0
    for _ in range(epochs):
        perm = data[torch.randperm(len(data), generator=gen)]
        for s in range(0, len(data), batch):
            idx = perm[s:s + batch]
            if len(idx) < 2:
                continue
            x = fed.x[idx].float() / 255
            flips = torch.rand(len(idx), 2, generator=gen)
            x = torch.where((flips[:, 0] < 0.5).view(-1, 1, 1, 1), x.flip(3), x)
            x = torch.where((flips[:, 1] < 0.5).view(-1, 1, 1, 1), x.flip(2), x)
            z, y = model((x - MEAN) / STD), fed.y[idx]
            if fed.y.ndim == 2:                      # masked BCE, pos_weight = alpha
                obs = (y >= 0).float()
                bce = F.binary_cross_entropy_with_logits(z, y.clamp(min=0).float(),
                                                         pos_weight=alpha, reduction="none")
                f = (bce * obs).sum() / obs.sum().clamp(min=1)
            elif loss == "focal":                    # -alpha_y (1 - p_y)^gamma log p_y
                logp = F.log_softmax(z, dim=1)[torch.arange(len(y)), y]
                f = (-alpha[y] * (1 - logp.exp()) ** gamma * logp).mean()
            else:
                f = F.cross_entropy(z, y, weight=alpha)
            if mu:
                params = dict(model.named_parameters())
                f = f + mu / 2 * sum(((params[k] - sent[k]) ** 2).sum()
                                     for k in params if k in sent)
            opt.zero_grad()
            f.backward()
            opt.step()
            steps += 1
    if out is not None:
        out.update(opt=opt.state_dict(), steps=steps)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def average(states, n):
    out = {}
    for k in states[0]:
        if k.endswith("num_batches_tracked"):
            out[k] = torch.stack([s[k] for s in states]).max()
        else:
            acc = sum(s[k].double() * nk for s, nk in zip(states, n)) / sum(n)
            out[k] = acc.to(states[0][k].dtype)
    return out


@torch.no_grad()
def predict_metrics(fed, state, idx):
    model = SmallCNN(fed.num_classes)
    model.load_state_dict(state)
    model.eval()
    x = (fed.x[torch.as_tensor(idx)].float() / 255 - MEAN) / STD
    y = fed.y.numpy()[idx]
    if y.ndim == 2:                                    # sigmoid; mean BCE over observed
        q = np.clip(torch.sigmoid(model(x)).numpy().astype(np.float64), 1e-12, 1 - 1e-12)
        return {"loss": float(-np.where(y == 1, np.log(q), np.log(1 - q))[y >= 0].mean())}
    prob = F.softmax(model(x), dim=1).numpy().astype(np.float64)
    pred = prob.argmax(1)
    return {"loss": float(-np.log(np.clip(prob[np.arange(len(y)), y], 1e-12, None)).mean()),
            "balanced_accuracy": float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))}


def clone(d):
    return {k: (v.clone() if torch.is_tensor(v) else clone(v) if isinstance(v, dict) else v)
            for k, v in d.items()}


def run_loop(fed, tmp_path, monkeypatch, algo, **cfg_kw):
    """fedmed.run for ROUNDS rounds, recording what each hook saw and produced: per round
    and client (payload received, private state before, private state after, upload), and
    the global weights after each aggregation; returns (records, metrics lines)."""
    cls = fedmed.ALGORITHMS[algo]
    rec = {"agg": [], "lu": {}, "steps": {}}
    # the loop folds FedAvg's uploads as they arrive and ends with finish_aggregate (the
    # list path, aggregate(), ends there too): recording there leaves the path unchanged
    orig_agg, orig_lu, orig_train = cls.finish_aggregate, cls.local_update, cls.train

    def train(self, client, payload, steps_scale=1):
        rec["steps"][self.round, client.id] = orig_train(self, client, payload, steps_scale)
        return rec["steps"][self.round, client.id]

    def agg(self, server, acc):
        rec["streamed"] = self.streams()
        orig_agg(self, server, acc)
        rec["agg"].append(clone(server.weights))

    def lu(self, client, payload):
        before = clone(client.state.get("private", {}))
        up = orig_lu(self, client, payload)
        rec["lu"][self.round, client.id] = (clone(payload), before,
                                            clone(client.state.get("private", {})), clone(up))
        return up
    monkeypatch.setattr(cls, "finish_aggregate", agg)
    monkeypatch.setattr(cls, "local_update", lu)
    monkeypatch.setattr(cls, "train", train)
    cfg = fedmed.Config(**{"algo": algo, "model": "cnn", "rounds": ROUNDS, "batch_size": B,
                           "lr": LR, "momentum": MOM, "weight_decay": WD, "seed": SEED,
                           **cfg_kw})
    args = cls.Args(**({"mu": 0.5} if algo == "fedprox" else {})) if cls.Args else None
    out = str(tmp_path / algo)
    fedmed.run(cfg, args, fed, out, quiet=True)
    with open(f"{out}/metrics.jsonl") as f:
        lines = [json.loads(s) for s in f]
    return rec, lines


def close(a, b, what):
    assert set(a) == set(b), what
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=1e-5, rtol=1e-5), (what, k)


def check_line(lines, t, name, ref, view=None):
    m = [m for m in lines if m["round"] == t + 1 and m["client"] == name
         and (view is None or m["view"] == view)][0]
    assert m["loss"] == pytest.approx(ref["loss"], abs=1e-5), (t, name)
    if "balanced_accuracy" in ref:
        assert m["balanced_accuracy"] == pytest.approx(ref["balanced_accuracy"], abs=1e-9), (t, name)


CASES = {"fedavg": ("fedavg", "average", 1.0, {}),
         "fedbn": ("fedavg", "local", 1.0, {}),
         "params_only": ("fedavg", "params_only", 1.0, {}),
         "sampled": ("fedavg", "average", 0.67, {}),
         "fedprox": ("fedprox", "average", 1.0, {}),
         "fedprox-fedbn": ("fedprox", "local", 1.0, {}),
         # two epochs, a last batch of 2 images (107 = 7 * 15 + 2), small eval batches
         "epochs2-batch15": ("fedavg", "average", 1.0,
                             {"local_epochs": 2, "batch_size": 15, "eval_batch_size": 8}),
         "focal": ("fedavg", "average", 1.0, {"loss": "focal", "focal_gamma": 1.5}),
         "keep-optimizer": ("fedavg", "local", 1.0, {"keep_optimizer": True}),
         "holdout-fedbn": ("fedavg", "local", 1.0, {"holdout": True}),
         "holdout": ("fedavg", "average", 1.0, {"holdout": True}),
         "multilabel": ("fedavg", "average", 1.0, {"multilabel": True})}


@pytest.mark.parametrize("case", list(CASES))
def test_fedavg_fedprox_two_rounds_by_hand(tmp_path, monkeypatch, case):
    """Algorithm 1 (FedAvg) and Eq. (2) (FedProx, mu = 0.5) with each BN policy, client
    sampling, E = 2, a last minibatch of two, focal loss (Lin et al.), a kept optimiser
    state, a held-out client and multi-label data (masked BCE). Each round: the broadcast
    is w_t without the private tensors; each sampled client's update is recomputed from
    what it received (and its own private tensors and optimiser state); the aggregation is
    recomputed from the clients' uploads; every client's prediction is recomputed from
    w_{t+1} and its private tensors, a held-out client's with the n_k-weighted average of
    the training clients' private tensors (baselines.md, FedBN)."""
    algo, bn, fraction, kw = CASES[case]
    kw = dict(kw)
    holdout, multilabel = kw.pop("holdout", False), kw.pop("multilabel", False)
    if multilabel:
        fed = datasets.make_synthetic_multilabel(seed=3, clients=3, image_size=16)
    else:
        fed = datasets.make_synthetic(seed=3, clients=4 if holdout else 3, image_size=16)
    if holdout:
        fed.holdout, fed.clients = fed.clients[-1:], fed.clients[:-1]
    rec, lines = run_loop(fed, tmp_path, monkeypatch, algo, bn=bn, fraction=fraction, **kw)
    alpha, w0 = alpha_of(fed), init_state(fed)
    K, batch, epochs = len(fed.clients), kw.get("batch_size", B), kw.get("local_epochs", 1)
    private = {"average": lambda k: False, "params_only": lambda k: bn_stat(k),
               "local": lambda k: bn_stat(k) or bn_affine(k, w0)}[bn]
    w = w0
    own = [{k: v.clone() for k, v in w0.items() if private(k)} for _ in range(K)]
    opt_state = [None] * K
    mu = 0.5 if algo == "fedprox" else 0.0
    for t in range(ROUNDS):
        m = max(1, int(round(fraction * K)))
        S = (list(range(K)) if m >= K else
             sorted(fedmed.np_rng(SEED, "sample", t).choice(K, size=m, replace=False).tolist()))
        assert sorted(k for (r, k) in rec["lu"] if r == t) == S
        states = []
        for k in S:
            payload, before, after, up = rec["lu"][t, k]
            close(payload["w"], {key: v for key, v in w.items() if not private(key)},
                  f"round {t + 1} broadcast to {k}")
            close(before, own[k], f"round {t + 1} private tensors of {k}")
            info = {}
            new = sgd(fed, {**w0, **payload["w"], **before}, fed.clients[k].train, t, k,
                      alpha, mu, payload["w"], epochs=epochs, batch=batch,
                      loss=kw.get("loss", "ce"), gamma=kw.get("focal_gamma", 2.0),
                      opt_state=opt_state[k] if kw.get("keep_optimizer") else None, out=info)
            close(up["w"], {key: v for key, v in new.items() if not private(key)},
                  f"round {t + 1} upload of {k}")
            close(after, {key: v for key, v in new.items() if private(key)},
                  f"round {t + 1} private tensors kept by {k}")
            assert up["n"] == len(fed.clients[k].train)
            assert rec["steps"][t, k] == info["steps"]
            own[k], opt_state[k] = after, info["opt"]
            states.append(up["w"])
        agg = average(states, [len(fed.clients[k].train) for k in S])
        close({k: v for k, v in rec["agg"][t].items() if not private(k)}, agg,
              f"round {t + 1} aggregation")
        w = rec["agg"][t]
        for k, c in enumerate(fed.clients):
            check_line(lines, t, c.name, predict_metrics(fed, {**w, **own[k]}, c.test))
        for c in fed.holdout:                          # n_k-average of the private tensors
            n = [len(d.train) for d in fed.clients]
            held = average(own, n) if own[0] else {}
            check_line(lines, t, c.name, predict_metrics(fed, {**w, **held}, c.test))
    if holdout:
        assert any(m["holdout"] for m in lines)
    assert rec["streamed"]                             # the path a real run takes


def test_local_only_two_rounds_by_hand(fed, tmp_path, monkeypatch):
    """Local-only: each client continues its own model from w_0, nothing is sent or
    averaged, each is evaluated with its own model, and in the last round every model on
    every test set."""
    rec, lines = run_loop(fed, tmp_path, monkeypatch, "local")
    alpha, w0 = alpha_of(fed), init_state(fed)
    own = [dict(w0) for _ in fed.clients]
    for t in range(ROUNDS):
        for k, c in enumerate(fed.clients):
            payload, before, after, up = rec["lu"][t, k]
            assert payload == {} and up == {}
            close(before, own[k], f"round {t + 1} model of {k}")
            close(after, sgd(fed, before, c.train, t, k, alpha), f"round {t + 1} update of {k}")
            own[k] = after
        for k, c in enumerate(fed.clients):
            check_line(lines, t, c.name, predict_metrics(fed, own[k], c.test), "local")
    for j, c in enumerate(fed.clients):                # cross-evaluation, last round
        for k, d in enumerate(fed.clients):
            check_line(lines, ROUNDS - 1, c.name, predict_metrics(fed, own[k], c.test),
                       f"model:{d.name}")
    assert rec["agg"] == []
    assert all(m["bytes_up"] == 0 and m["bytes_down"] == 0 for m in lines)
    assert {m["view"] for m in lines if m["round"] == 1} == {"local"}


def pooled_steps(fed, state, union, t, alpha, steps):
    """`steps` minibatches of the union from one permutation (the tau case)."""
    model = SmallCNN(fed.num_classes)
    model.load_state_dict(state)
    model.train()
    opt = torch.optim.SGD(list(model.parameters()), lr=LR, momentum=MOM, weight_decay=WD)
    gen = fedmed.torch_rng(SEED, "batches", t, "pooled")
    perm = torch.as_tensor(union)[torch.randperm(len(union), generator=gen)]
    for s in range(steps):
        idx = perm[s * B:(s + 1) * B]
        x = fed.x[idx].float() / 255
        flips = torch.rand(len(idx), 2, generator=gen)
        x = torch.where((flips[:, 0] < 0.5).view(-1, 1, 1, 1), x.flip(3), x)
        x = torch.where((flips[:, 1] < 0.5).view(-1, 1, 1, 1), x.flip(2), x)
        loss = F.cross_entropy(model((x - MEAN) / STD), fed.y[idx], weight=alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("tau", [0, 3])
def test_pooled_two_rounds_by_hand(fed, tmp_path, monkeypatch, tau):
    """Pooled: one model on the sorted union of the training sets, from the ("batches", t,
    "pooled") stream; a round is E epochs of the union (tau = 0) or K * tau minibatches
    (--local-steps tau): the same sample visits as a federated round."""
    rec, lines = run_loop(fed, tmp_path, monkeypatch, "pooled", local_steps=tau)
    alpha, w = alpha_of(fed), init_state(fed)
    union = np.sort(np.concatenate([c.train for c in fed.clients]))
    K = len(fed.clients)
    assert K * tau < len(union) // B                  # tau case: within one permutation
    for t in range(ROUNDS):
        assert [k for (r, k) in rec["lu"] if r == t] == ["pooled"]
        payload, before, after, up = rec["lu"][t, "pooled"]
        assert payload == {} and up == {}
        close(before, w, f"round {t + 1} model")
        ref = (sgd(fed, before, union, t, "pooled", alpha) if tau == 0 else
               pooled_steps(fed, before, union, t, alpha, K * tau))
        close(after, ref, f"round {t + 1} update")
        w = after
        for c in fed.clients:
            check_line(lines, t, c.name, predict_metrics(fed, w, c.test), "centralised")
    assert all(m["bytes_up"] == 0 for m in lines)


def test_pooled_clients_hold_nothing_and_the_model_lives_in_server_state(fed, tmp_path):
    """Pooled keeps its one model in server.state (checkpointed), nothing at the clients;
    a run stopped after round 1 and resumed ends with the weights of an uninterrupted run,
    and predict uses the model in server.state whatever the working model holds."""
    cfg = fedmed.Config(algo="pooled", model="cnn", rounds=ROUNDS, batch_size=B, lr=LR,
                        momentum=MOM, seed=SEED)
    algo = fedmed.ALGORITHMS["pooled"](cfg, None, fed)
    clients = fedmed.make_clients(fed)
    server = fedmed.ServerState()
    algo.setup(server, clients)
    assert all(c.state == {} for c in clients)
    close(server.state["private"], init_state(fed), "initial model")
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    fedmed.run(cfg, None, fed, full, quiet=True)
    fedmed.run(cfg, None, fed, part, quiet=True, stop_after=1)
    fedmed.run(cfg, None, fed, part, quiet=True, resume=True)
    with open(f"{full}/metrics.jsonl") as a, open(f"{part}/metrics.jsonl") as b:
        strip = lambda s: [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in s]  # noqa: E731
        assert strip(a) == strip(b)
    probs = algo.predict(server, clients[0], clients[0].test)
    with torch.no_grad():
        for p in algo.model.parameters():
            p.add_(1.0)
    assert np.array_equal(algo.predict(server, clients[0], clients[0].test), probs)


def test_forward_probs_of_no_image_is_an_empty_array(fed):
    """Prediction on an empty index set: a (0, C) array, not an error or a row."""
    algo = fedmed.ALGORITHMS["fedavg"](fedmed.Config(model="cnn"), None, fed)
    assert algo.forward_probs(np.zeros(0, np.int64)).shape == (0, fed.num_classes)


def test_fedprox_default_mu_is_flambys():
    """baselines.md: FedProx mu = 0.001 is FLamby's Fed-ISIC2019 value (the paper searches
    {0.001, 0.01, 0.1, 1})."""
    assert fedmed.ALGORITHMS["fedprox"].Args().mu == 0.001
