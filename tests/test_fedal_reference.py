"""FedAL reference step (issue #11): the first two rounds of FedAL (FL phase 0, the AL
phase, the first round of FL phase 1) recomputed in plain torch INSIDE THIS FILE, straight
from ../shared/methods/fedal.md, without calling any helper of algorithms/fedal.py, and
compared with what the hooks produce (driven as the loop drives them) and with fedmed.run,
at float-rounding tolerance.

Recomputed (sheet section 3; the equation names are those of algorithms/fedal.py's
docstring):
  init      L_k = a random p0 share of client k's images, stream (seed, "fedal-init", k);
  FL phase  one FedAvg round on the L_k: the class weights alpha_c = N / N_c of the
            labelled pools, the minibatches of the (seed, "batches", round, k) stream with
            flips, weighted cross-entropy, SGD (momentum, weight decay); the server mean
            with n_k = |L_k|;
  AL phase  p_loc = softmax f_{theta_k}(x) (theta_k: client k's weights right after its
            local update, before aggregation), p_glob = softmax f_{theta_g}(x) (the
            aggregated model), both in eval mode, x in U_k; every score: (S1) entropy of
            the mean, (S2) mean of the entropies, (S3) their difference, and the baseline
            acquisitions (global / local entropy, least confidence, margin, random);
            b_k by (B1)-(B2); S_k = the top-b_k by (S1), ties to the lower index;
            L_k <- L_k u S_k with the oracle's labels, U_k <- U_k minus S_k;
  FL phase 1, first round: alpha_c and n_k from the grown L_k;
  prediction: softmax of the global model on each client's test set.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets
from helpers import weak_view
import fedmed
import models
from fedmed import Config, ServerState, transmit

import algorithms  # noqa: E402 - the methods register themselves

algorithms.load_all()
from algorithms.fedal import FedAL  # noqa: E402

SEED = 0
P0, BUDGET, CYCLES = 0.2, 0.6, 2
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def fed():
    return datasets.make_synthetic(seed=3, clients=3, image_size=16)


def config(**kw):
    return Config(**{"algo": "fedal", "model": "cnn", "batch_size": 16, "local_steps": 2,
                     "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, "seed": SEED, **kw})


def al_args(**kw):
    return FedAL.Args(**{"al_initial": P0, "al_budget": BUDGET, "al_cycles": CYCLES,
                         "al_rounds_per_cycle": 1, **kw})


# ---------------------------------------------------------------- the reference, in plain torch

images = weak_view                                    # tests/helpers.py


def net(state, C):
    model = models.build("cnn", C)
    model.load_state_dict(state)
    return model


@torch.no_grad()
def softmax_of(state, fed, idx):
    model = net(state, fed.num_classes).eval()
    return F.softmax(model(images(fed, idx)), dim=1).double()


def H(p):
    """(S0) H(p) = -sum_c p_c log p_c, 0 log 0 = 0."""
    return -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(1)


def class_weights_of(fed, L):
    """alpha_c = N / N_c over the labelled pools only (0 for a class nobody labelled)."""
    y = fed.y[torch.as_tensor(np.concatenate(L))]
    counts = torch.bincount(y, minlength=fed.num_classes).double()
    return torch.where(counts > 0, counts.sum() / counts.clamp(min=1), torch.zeros(1).double()).float()


def fedavg_update(fed, cfg, theta_g, L_k, alpha, rnd, k):
    """One FedAvg local update on L_k: `local_steps` minibatches of size B from successive
    random permutations of L_k (stream (seed, "batches", round, k)), each flipped, weighted
    cross-entropy sum_i alpha_{y_i} CE_i / sum_i alpha_{y_i}, SGD with momentum and
    weight decay."""
    model = net(theta_g, fed.num_classes)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    gen = fedmed.torch_rng(SEED, "batches", rnd, k)
    data, B, steps = torch.as_tensor(L_k, dtype=torch.long), cfg.batch_size, 0
    while steps < cfg.local_steps:
        perm = data[torch.randperm(len(data), generator=gen)]
        for s in range(0, len(data), B):
            if steps == cfg.local_steps:
                break
            idx = perm[s:s + B]
            if len(idx) < 2:
                continue
            x, y = images(fed, idx, gen), fed.y[idx]
            logp = F.log_softmax(model(x), dim=1)
            nll = -logp[torch.arange(len(y)), y]
            loss = (alpha[y] * nll).sum() / alpha[y].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    return {n: v.detach().clone() for n, v in model.state_dict().items()}


def fedavg_mean(states, n):
    """w = sum_k n_k / n w_k (num_batches_tracked: the maximum), in float64."""
    out = {}
    for key in states[0]:
        ts = [s[key] for s in states]
        if key.endswith("num_batches_tracked"):
            out[key] = torch.stack(ts).max()
        else:
            out[key] = sum(n[k] / sum(n) * ts[k].double() for k in range(len(ts))).to(ts[0].dtype)
    return out


def top_b(scores, pool, b):
    """The b images of `pool` with the highest score, ties to the lower index."""
    ranked = sorted(range(len(pool)), key=lambda i: (-float(scores[i]), int(pool[i])))
    return sorted(int(pool[i]) for i in ranked[:b])


def close(a, b):
    return torch.allclose(torch.as_tensor(a).double(), torch.as_tensor(b).double(), **TOL)


# ---------------------------------------------------------------- the test

def test_two_rounds_and_one_acquisition_equal_the_sheet_recomputed(fed, tmp_path):
    cfg, C = config(), fed.num_classes
    with fedmed.seeded(SEED, "init"):                          # the common initialisation
        theta0 = models.build("cnn", C).state_dict()
    # init: L_k a random p0 share, U_k the rest
    L, U, N = [], [], []
    for k, c in enumerate(fed.clients):
        train = np.asarray(c.train)
        n0 = max(1, int(round(P0 * len(train))))
        pick = np.zeros(len(train), bool)
        pick[fedmed.np_rng(SEED, "fedal-init", k).choice(len(train), n0, replace=False)] = True
        L.append(train[pick]), U.append(np.sort(train[~pick])), N.append(len(train))

    algo = FedAL(cfg, al_args(), fed)
    clients = fedmed.make_clients(fed)
    server = ServerState()
    algo.setup(server, clients)
    assert all(np.array_equal(c.train, l) and np.array_equal(c.unlabeled, u)
               for c, l, u in zip(clients, L, U))

    # FL phase 0 (one round): theta_k and p_loc per client, then the aggregation
    alpha0 = class_weights_of(fed, L)
    algo.set_round(0)
    algo.begin_round(server, clients)
    assert close(algo.base.alpha, alpha0)
    thetas, p_loc, uploads = [], [], {}
    for k, c in enumerate(clients):
        theta_k = fedavg_update(fed, cfg, theta0, L[k], alpha0, 0, k)
        thetas.append(theta_k)
        p_loc.append(softmax_of(theta_k, fed, U[k]))
        payload, _ = transmit(algo.broadcast(server, c))
        uploads[c.id], _ = transmit(algo.local_update(c, payload))
        assert uploads[c.id]["n"] == len(L[k])
        for key, v in theta_k.items():
            assert close(uploads[c.id]["w"][key], v), (c.name, key)
        assert close(c.state["al_p_local"], p_loc[k]), c.name             # p_loc from theta_k
    algo.aggregate(server, uploads)
    theta_g = fedavg_mean(thetas, [len(l) for l in L])
    for key, v in theta_g.items():
        assert close(server.weights[key], v), key

    # the AL phase: every score against its formula, with p_glob from theta_g
    beta = (BUDGET - P0) / CYCLES
    for k, c in enumerate(clients):
        p_glob = softmax_of(theta_g, fed, U[k])
        pl = p_loc[k]
        pbar = (pl + p_glob) / 2
        top2 = pbar.sort(1).values[:, -2:]
        want = {("ensemble-entropy", "entropy_of_mean"): H(pbar),                       # (S1)
                ("ensemble-entropy", "mean_entropy"): (H(pl) + H(p_glob)) / 2,           # (S2)
                ("ensemble-entropy", "mi"): H(pbar) - (H(pl) + H(p_glob)) / 2,           # (S3)
                ("global-entropy", None): H(p_glob), ("local-entropy", None): H(pl),
                ("least-confidence", None): 1 - pbar.max(1).values,
                ("margin", None): -(top2[:, 1] - top2[:, 0]),
                ("random", None): torch.from_numpy(
                    fedmed.np_rng(SEED, "fedal-random", 1, k).random(len(U[k])))}
        for (acq, score), s in want.items():
            algo.args.acquisition, algo.args.al_score = acq, score or "entropy_of_mean"
            assert close(algo.scores(server, c, 1), s), (c.name, acq, score)
        algo.args.acquisition, algo.args.al_score = "ensemble-entropy", "entropy_of_mean"
        b = min(len(U[k]), int(round((P0 + beta) * N[k])) - len(L[k]))                  # (B1-2)
        assert algo.acquisition_size(c, 1) == b > 0
        S = top_b(want[("ensemble-entropy", "entropy_of_mean")], U[k], b)
        L[k] = np.sort(np.r_[L[k], S])
        U[k] = np.setdiff1d(U[k], S)

    # FL phase 1, round 1: the acquisition happens in begin_round, then one round
    algo.set_round(1)
    algo.begin_round(server, clients)
    for k, c in enumerate(clients):
        assert np.array_equal(c.train, L[k]) and np.array_equal(c.unlabeled, U[k]), c.name
        assert torch.equal(algo.fed.y[torch.as_tensor(c.train)], fed.y[torch.as_tensor(L[k])])
        assert c.state["al_p_phase"] == 0           # theta_k's scores: gone at its next update
    alpha1 = class_weights_of(fed, L)
    assert close(algo.base.alpha, alpha1) and not close(alpha1, alpha0)
    thetas, uploads = [], {}
    for k, c in enumerate(clients):
        thetas.append(fedavg_update(fed, cfg, theta_g, L[k], alpha1, 1, k))
        payload, _ = transmit(algo.broadcast(server, c))
        uploads[c.id], _ = transmit(algo.local_update(c, payload))
        assert uploads[c.id]["n"] == len(L[k])
    algo.aggregate(server, uploads)
    theta_g1 = fedavg_mean(thetas, [len(l) for l in L])
    for key, v in theta_g1.items():
        assert close(server.weights[key], v), key
    for c in clients:                                           # the prediction
        assert close(algo.predict(server, c, c.test), softmax_of(theta_g1, fed, c.test)), c.name

    # the same two rounds through the one round loop
    fedmed.run(config(), al_args(), fed, str(tmp_path / "run"), stop_after=2, quiet=True)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    for key, v in theta_g1.items():
        assert close(ck["server"]["weights"][key], v), key
    for saved, l in zip(ck["clients"], L):
        assert np.array_equal(saved["train"], l)
