"""Reference-step tests of FCU (algorithms/fcu.py), issue #11.

The whole protocol (original, retrain, continue, pga, fcu, fcu_code) runs once through
`FCU.protocol` on a tiny federation (3 clients, 16-pixel images, the small CNN, u =
client 1, backdoor on). Every phase is then recomputed HERE, from the method sheet
(../shared/methods/fcu.md) and Halimi et al., in plain torch and numpy: the batches from
the same named streams (fedmed.torch_rng), the images, the losses, hand-written SGD /
Adam, a numpy FGMP, the aggregations and the audit's measurements. Nothing of
algorithms/fcu.py is called; the tensors it produced are compared at float-rounding
tolerance. The unlearning runs T = 7 MCU steps with a fusion every E = 3 (fusions after
steps 3 and 6, the 7th step unfused) so that a fusion skipped, run every step or run at
the wrong step changes the result.
"""
import dataclasses
import itertools
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import datasets
import fedmed
import models
from fedmed import Config, torch_rng

import algorithms  # noqa: E402 - the methods register themselves

algorithms.load_all()
from algorithms.fcu import FCU  # noqa: E402

SEED = 5
U = 1                                  # the forgotten client
TARGET = 2                             # the backdoor's target class
CFG = dict(algo="fcu", model="cnn", rounds=3, local_steps=10, batch_size=8, seed=SEED,
           eval_batch_size=32)
ARGS = dict(forget_client=str(U), unlearn_steps=7, fusion_interval=3, fgmp_ratio=0.7,
            unlearn_lr=2e-3, post_rounds=2, post_local_steps=2, post_lr=1e-3,
            pga_lr=0.01, pga_epochs=2, pga_radius=0.1, pga_stop_accuracy=-1.0, backdoor=True,
            backdoor_target=str(TARGET), backdoor_fraction=0.3, backdoor_patch=0.125)
STOP_ARGS = dict(ARGS, pga_stop_accuracy=0.0, pga_epochs=3)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def fed():
    # data seed 0: with seeds 1, 3 and 4 of this generator the original or the retrain
    # phase lands on a max-pool tie (clipped, flat image regions), where last-bit
    # differences between two correct computations grow to 1e-3 in three rounds
    return datasets.make_synthetic(seed=0, clients=3, image_size=16)


@pytest.fixture(scope="module")
def protocol(fed, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fcuref") / "out")
    summary = FCU.protocol(Config(**CFG), FCU.Args(**ARGS), fed, out, quiet=True)
    # PGA once more with the default stopping rule (accuracy below chance, 1/C), into a
    # folder that holds another finished PGA run: without resume, it must start over
    shutil.copytree(os.path.join(out, "pga"), os.path.join(out, "pga_stop"))
    log = []
    FCU.run_phase(Config(**CFG), FCU.Args(**STOP_ARGS), fed, os.path.join(out, "pga_stop"),
                  "pga", os.path.join(out, "original"), log=log.append)
    ck = {p: torch.load(os.path.join(out, p, "checkpoint.pt"), weights_only=False)
          for p in ("original", "retrain", "continue", "pga", "fcu", "fcu_code", "pga_stop")}
    ck["log"], ck["out"] = log, out
    return summary, ck


# ---------------------------------------------------------------- plain-torch pieces

def poisoned(fed):
    """u's poisoned images: round(fraction n_u) of those not of the target class, drawn
    from the stream (seed, "backdoor")."""
    mine = np.asarray(fed.clients[U].train)
    pool = mine[fed.y.numpy()[mine] != TARGET]
    n = int(round(ARGS["backdoor_fraction"] * len(mine)))
    pick = fedmed.np_rng(SEED, "backdoor").choice(pool, size=min(n, len(pool)), replace=False)
    return set(pick.tolist())


def trigger_patch(side):
    s = math.ceil(ARGS["backdoor_patch"] * side)
    pat = torch.tensor([[float((i + j) % 2 == 0) for j in range(s)] for i in range(s)])
    return s, (pat.view(1, 1, s, s) - MEAN) / STD


def images(fed, idx, gen=None, poison=frozenset()):
    """Training batches (gen given): flips from gen, normalisation, then the trigger and
    the target label on poisoned images; evaluation batches: normalisation only."""
    x = fed.x[idx].float() / 255
    y = fed.y[idx].clone()
    if gen is not None:
        fl = torch.rand(len(idx), 2, generator=gen)
        x = torch.where((fl[:, 0] < 0.5).view(-1, 1, 1, 1), x.flip(3), x)
        x = torch.where((fl[:, 1] < 0.5).view(-1, 1, 1, 1), x.flip(2), x)
    x = (x - MEAN) / STD
    if gen is not None:
        s, patch = trigger_patch(x.shape[-1])
        for i, j in enumerate(idx.tolist()):
            if j in poison:
                x[i, :, -s:, -s:] = patch[0]
                y[i] = TARGET
    return x, y


def batches(train, gen, steps=0, epochs=1, B=8):
    """The loop's schedule: fresh permutations from gen, minibatches of B, a batch of one
    image skipped; `steps` minibatches (cycling) or `epochs` epochs."""
    data = torch.as_tensor(train, dtype=torch.long)
    done = 0
    for _ in (itertools.count() if steps else range(epochs)):
        perm = data[torch.randperm(len(data), generator=gen)]
        for s in range(0, len(data), B):
            if steps and done >= steps:
                return
            idx = perm[s:s + B]
            if len(idx) < 2:
                continue
            done += 1
            yield idx
        if steps and done >= steps:
            return


def net(fed, sd, train=True):
    m = models.SmallCNN(fed.num_classes)
    m.load_state_dict(sd)
    m.train(train)
    return m


def state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def inverse_weights(fed, clients):
    y = np.concatenate([fed.y.numpy()[fed.clients[k].train] for k in clients])
    counts = np.bincount(y, minlength=fed.num_classes).astype(np.float64)
    return torch.tensor([len(y) / c if c else 0.0 for c in counts], dtype=torch.float32)


def weighted_ce_by_hand(logits, y, alpha=None):
    """sum_i alpha_{y_i} (-log p_i[y_i]) / sum_i alpha_{y_i}: the weighted CE the loop
    trains with (checked against weighted_ce in test_weighted_ce_is_the_hand_formula)."""
    logp = logits.log_softmax(1)[torch.arange(len(y)), y]
    w = torch.ones(len(y)) if alpha is None else alpha[y]
    return -(w * logp).sum() / w.sum()


def weighted_ce(logits, y, alpha=None):
    """The same loss through torch's kernel. The hand formula differs from it in the last
    bits, and over ten SGD steps such bits can flip a max-pool or ReLU tie on these
    8-bit images and grow to 1e-3 (measured on one synthetic federation), so the
    reference loops use the kernel and the formula is checked once, above."""
    return torch.nn.functional.cross_entropy(logits, y, weight=alpha)


def test_weighted_ce_is_the_hand_formula():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(16, 6, generator=g) * 3, torch.randint(0, 6, (16,), generator=g)
    alpha = torch.rand(6, generator=g) * 10
    for a in (None, alpha):
        assert torch.allclose(weighted_ce(logits, y, a), weighted_ce_by_hand(logits, y, a),
                              rtol=1e-6, atol=1e-7)


def sgd_step(m, buf, lr, mu):
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.grad is None:
                continue
            buf[n] = p.grad.clone() if n not in buf else mu * buf[n] + p.grad
            p -= lr * buf[n]


def adam_step(m, st, lr, betas=(0.9, 0.999), wd=0.0, eps=1e-8):
    """Adam (Kingma & Ba) with L2 weight decay added to the gradient (torch's Adam);
    parameters without a gradient are left alone, as torch does."""
    b1, b2 = betas
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.grad is None:
                continue
            g = p.grad + wd * p
            t, mm, vv = st.get(n, (0, torch.zeros_like(p), torch.zeros_like(p)))
            t, mm, vv = t + 1, b1 * mm + (1 - b1) * g, b2 * vv + (1 - b2) * g * g
            st[n] = (t, mm, vv)
            p -= lr * (mm / (1 - b1 ** t)) / ((vv / (1 - b2 ** t)).sqrt() + eps)


def average(sds, weights):
    tot = float(sum(weights))
    out = {}
    for k in sds[0]:
        if k.endswith("num_batches_tracked"):
            out[k] = torch.stack([s[k] for s in sds]).max()
        else:
            out[k] = sum(s[k].double() * (w / tot) for s, w in zip(sds, weights)).float()
    return out


def fedavg(fed, start, clients, rounds, alpha, poison, cost):
    """FedAvg (McMahan et al., Algorithm 1): local SGD (lr 0.01, momentum 0.9, fresh each
    round), weighted CE, n_k-weighted average; returns (weights, u's last local model)."""
    w, last = start, None
    for t in range(rounds):
        ups = []
        for k in clients:
            m, buf = net(fed, w), {}
            gen = torch_rng(SEED, "batches", t, k)
            for idx in batches(fed.clients[k].train, gen, steps=CFG["local_steps"]):
                x, y = images(fed, idx, gen, poison)
                loss = weighted_ce(m(x), y, alpha)
                m.zero_grad(set_to_none=True)
                loss.backward()
                sgd_step(m, buf, 0.01, 0.9)
                cost[0] += 1
                cost[1] += len(idx)
            ups.append(state(m))
            if k == U:
                last = ups[-1]
        w = average(ups, [len(fed.clients[k].train) for k in clients])
    return w, last


def post_train(fed, start, first_round, cost):
    """Post-training (sheet section 3, Phase 3): R_post FedAvg rounds over the K - 1
    others, Adam lr 1e-3 here with the release's betas (0.9, 0.9999) and L2 weight decay
    5e-4, its state carried across rounds per client, weighted CE
    with the remaining clients' inverse class weights, uniform 1/(K - 1) average."""
    rest = [k for k in range(len(fed.clients)) if k != U]
    alpha = inverse_weights(fed, rest)
    w, adam = start, {k: {} for k in rest}
    for t in range(first_round, first_round + ARGS["post_rounds"]):
        ups = []
        for k in rest:
            m = net(fed, w)
            gen = torch_rng(SEED, "batches", t, k)
            for idx in batches(fed.clients[k].train, gen, steps=ARGS["post_local_steps"]):
                x, y = images(fed, idx, gen)
                loss = weighted_ce(m(x), y, alpha)
                m.zero_grad(set_to_none=True)
                loss.backward()
                adam_step(m, adam[k], ARGS["post_lr"], betas=(0.9, 0.9999), wd=5e-4)
                cost[0] += 1
                cost[1] += len(idx)
            ups.append(state(m))
        w = average(ups, [1] * len(ups))
    return w


def np_fuse(base, donor, r, symmetric):
    """FGMP (sheet section 4) with numpy: conv [N, C, k, k] -> (C k) x (k N); fftshift-ed
    FFT2; donor amplitude on the frequencies -b..b (symmetric) or -b..b-1 (release) around
    the centre, b = floor(side r / 2) (no window when a b is 0); base amplitude elsewhere;
    base phase; real part of the inverse."""
    b, d = base.double().numpy(), donor.double().numpy()
    if b.ndim == 4:
        N, C, kh, kw = b.shape
        b = b.transpose(1, 2, 3, 0).reshape(C * kh, kw * N)
        d = d.transpose(1, 2, 3, 0).reshape(C * kh, kw * N)
    h, w = b.shape
    Fb, Fd = np.fft.fftshift(np.fft.fft2(b)), np.fft.fftshift(np.fft.fft2(d))
    bh, bw = math.floor(h * r / 2), math.floor(w * r / 2)
    fi = np.arange(h)[:, None] - h // 2
    fj = np.arange(w)[None, :] - w // 2
    hi_h, hi_w = (bh, bw) if symmetric else (bh - 1, bw - 1)
    inside = (fi >= -bh) & (fi <= hi_h) & (fj >= -bw) & (fj <= hi_w) & (bh > 0) & (bw > 0)
    amp = np.where(inside, np.abs(Fd), np.abs(Fb))
    m = np.fft.ifft2(np.fft.ifftshift(amp * np.exp(1j * np.angle(Fb)))).real
    if base.dim() == 4:
        m = m.reshape(C, kh, kw, N).transpose(3, 0, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(m)).float()


FUSED = ["features.0.weight", "features.4.weight", "features.8.weight", "classifier.weight"]


def feats(m, x):
    return m.features(x).mean(dim=(2, 3))


def cos(a, b):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def mcu_fgmp(fed, theta_o, theta_0, convention, poison, cost):
    """Phase 2 (sheet sections 3-4): theta <- theta_o; T Adam steps (lr 2e-3 here, betas
    (0.9, 0.9999), L2 weight decay 5e-4, one parameter group: every parameter) on
    L_MCU = -log[e^{cos(f,f_d)/tau} / (e^{cos(f,f_d)/tau} + e^{cos(f,f_o)/tau})], written
    as the sheet's test 11.4 form -log softmax([cos(f,f_d), cos(f,f_o)] / tau)[0], tau = 0.5,
    f = the pooled features, f_o, f_d from theta_o, theta_d = theta_0 in eval mode; after
    every E steps FGMP of every conv and the classifier weight (paper: base = theta, donor =
    theta_o, symmetric window, the rest from theta; code: base = theta_o, donor = theta,
    half-open window, the rest from theta_o); the Adam state carries on; uploaded with
    theta_o's BN running statistics (none estimated on D_f).

    torch's Adam, not `adam_step`: Adam divides by |g|, so where a gradient and the weight
    decay cancel, a rounding difference in g flips the step's sign; the same kernels keep
    this reference equal to the method up to float rounding of the FFTs."""
    m = net(fed, theta_o)
    ref_o, ref_d = net(fed, theta_o, train=False), net(fed, theta_0, train=False)
    opt = torch.optim.Adam(m.parameters(), lr=ARGS["unlearn_lr"], betas=(0.9, 0.9999),
                           weight_decay=5e-4)
    gen = torch_rng(SEED, "batches", "unlearn", U)
    for step, idx in enumerate(batches(fed.clients[U].train, gen,
                                       steps=ARGS["unlearn_steps"]), 1):
        x, _ = images(fed, idx, gen, poison)
        f = feats(m, x)
        with torch.no_grad():
            f_o, f_d = feats(ref_o, x), feats(ref_d, x)
        logits = torch.stack([torch.nn.functional.cosine_similarity(f, f_d, dim=1),
                              torch.nn.functional.cosine_similarity(f, f_o, dim=1)], 1) / 0.5
        loss = -logits.log_softmax(1)[:, 0].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cost[0] += 1
        cost[1] += len(idx)
        if step % ARGS["fusion_interval"] == 0:
            cur = state(m)
            if convention == "paper":
                new = dict(cur)
                new.update({k: np_fuse(cur[k], theta_o[k], ARGS["fgmp_ratio"], True)
                            for k in FUSED})
            else:
                new = {k: v.clone() for k, v in theta_o.items()}
                new.update({k: np_fuse(theta_o[k], cur[k], ARGS["fgmp_ratio"], False)
                            for k in FUSED})
            m.load_state_dict(new)
    return start_stats(state(m), theta_o)


def start_stats(sd, start):
    """What leaves u (the rule of issue #19): every BN running statistic (mean, variance,
    batch count) is the starting model's, none estimated on D_f."""
    return {k: (start[k].clone() if k.rsplit(".", 1)[1] in BN_STATS else v)
            for k, v in sd.items()}


BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def pga(fed, theta_o, w_u, theta_0_keys, poison, cost, args=ARGS):
    """Halimi et al. Sec. 3: w_ref = (n w_o - n_u w_u) / (n - n_u) (running variances
    clipped at 0), delta = radius x the mean distance (trainable parameters) of w_ref to
    10 models drawn from (seed, "pga-random", i); from w_ref, SGD (lr, momentum 0.9) on
    -CE over D_f, each step followed by the projection onto ||w - w_ref|| <= delta; an
    epoch per fresh permutation (stream (seed, "batches", "pga", epoch, u)); stop before
    the first minibatch whose training-mode accuracy is below 1/C; uploaded with w_ref's BN
    running statistics (none estimated on D_f)."""
    n_all = sum(len(c.train) for c in fed.clients)
    n_u = len(fed.clients[U].train)
    ref = {}
    for k, v in theta_o.items():
        if not v.is_floating_point():
            ref[k] = v.clone()
            continue
        ref[k] = ((n_all * v.double() - n_u * w_u[k].double()) / (n_all - n_u)).float()
        if k.endswith("running_var"):
            ref[k] = ref[k].clamp(min=0)
    dists = []
    for i in range(10):
        with fedmed.seeded(SEED, "pga-random", i):
            rnd = models.SmallCNN(fed.num_classes).state_dict()
        dists.append(math.sqrt(sum(float((ref[k].double() - rnd[k].double()).pow(2).sum())
                                   for k in theta_0_keys)))
    delta = args["pga_radius"] * float(np.mean(dists))
    m, buf = net(fed, ref), {}
    stopped, projected, inside = None, 0, 0
    stop = args["pga_stop_accuracy"] or 1 / fed.num_classes
    for epoch in range(args["pga_epochs"]):
        gen = torch_rng(SEED, "batches", "pga", epoch, U)
        for idx in batches(fed.clients[U].train, gen, epochs=1):
            x, y = images(fed, idx, gen, poison)
            logits = m(x)
            if float((logits.argmax(1) == y).float().mean()) < stop:
                stopped = epoch
                break
            ce = -logits.log_softmax(1)[torch.arange(len(y)), y].mean()
            loss = -ce                                   # ascend: minimise -CE (unweighted)
            m.zero_grad(set_to_none=True)
            loss.backward()
            sgd_step(m, buf, args["pga_lr"], 0.9)
            cost[0] += 1
            cost[1] += len(idx)
            with torch.no_grad():
                ps = dict(m.named_parameters())
                norm = math.sqrt(sum(float((p - ref[n]).pow(2).sum()) for n, p in ps.items()))
                if norm > delta:
                    projected += 1
                    for n, p in ps.items():
                        p.copy_(ref[n] + (p - ref[n]) * (delta / norm))
                else:
                    inside += 1
        if stopped is not None:
            break
    return start_stats(state(m), ref), dict(ref=ref, delta=delta, stopped=stopped,
                                            projected=projected, inside=inside)


def assert_close(got, want, atol=2e-5, rtol=1e-4):
    assert got.keys() == want.keys()
    for k in want:
        g, w = got[k], want[k]
        if not w.is_floating_point():
            assert torch.equal(g, w), k
            continue
        assert torch.allclose(g, w, atol=atol, rtol=rtol), (
            k, float((g - w).abs().max()))


def theta_0(fed):
    with fedmed.seeded(SEED, "init"):
        return state(models.SmallCNN(fed.num_classes))


def trainable_keys(fed):
    return [n for n, _ in models.SmallCNN(fed.num_classes).named_parameters()]


def cost_of(summary, phase):
    a = summary["audit"][phase]
    return [a["grad_steps"], a["grad_samples"]]


# ---------------------------------------------------------------- the tests

def test_original_and_retrain_are_fedavg_from_theta_0(fed, protocol):
    """Phase 0 (sheet section 3): R rounds of FedAvg over all K clients from theta_0 with
    the pooled inverse class weights (u's poisoned batches included); u keeps its last
    local model. Retrain: the same schedule and streams over the K - 1 others, with their
    own class weights."""
    summary, ck = protocol
    poison = poisoned(fed)
    cost = [0, 0]
    w, last = fedavg(fed, theta_0(fed), [0, 1, 2], CFG["rounds"],
                     inverse_weights(fed, [0, 1, 2]), poison, cost)
    assert_close(ck["original"]["server"]["weights"], w)
    assert_close(ck["original"]["clients"][U]["state"]["last_local"], last)
    assert cost_of(summary, "original") == cost
    cost = [0, 0]
    w, _ = fedavg(fed, theta_0(fed), [0, 2], CFG["rounds"], inverse_weights(fed, [0, 2]),
                  poison, cost)
    assert_close(ck["retrain"]["server"]["weights"], w)
    assert cost_of(summary, "retrain") == cost


def test_continue_is_post_training_from_theta_o(fed, protocol):
    """Continue: the R_post post-training rounds (Phase 3) straight from theta_o."""
    summary, ck = protocol
    theta_o = ck["original"]["server"]["weights"]
    cost = [0, 0]
    w = post_train(fed, theta_o, 0, cost)
    assert_close(ck["continue"]["server"]["weights"], w)
    assert cost_of(summary, "continue") == cost
    assert "theta_u" not in ck["continue"]["server"]["state"]


@pytest.mark.parametrize("phase,convention", [("fcu", "paper"), ("fcu_code", "code")])
def test_fcu_unlearning_then_post_training(fed, protocol, phase, convention):
    """Phase 2 at u (MCU + FGMP, sheet sections 3-4, T = 7, E = 3) from theta_o with
    theta_d = theta_0, uploaded once as theta_u (round 0); then Phase 3 from theta_u
    (rounds 1..R_post)."""
    summary, ck = protocol
    theta_o = ck["original"]["server"]["weights"]
    cost = [0, 0]
    theta_u = mcu_fgmp(fed, theta_o, theta_0(fed), convention, poisoned(fed), cost)
    got = ck[phase]["server"]["state"]["theta_u"]
    assert_close(got, theta_u)
    w = post_train(fed, got, 1, cost)
    assert_close(ck[phase]["server"]["weights"], w)
    assert cost_of(summary, phase) == cost


def test_mcu_moves_the_features_towards_theta_d_and_away_from_theta_o(fed, protocol):
    """Behaviour of Phase 2 (sheet section 4): on D_f, theta_u's features are closer to
    theta_d's and farther from theta_o's than theta_o's own (cos(f_o, f_o) = 1)."""
    _, ck = protocol
    idx = torch.as_tensor(fed.clients[U].train)
    x, _ = images(fed, idx)
    theta_o = ck["original"]["server"]["weights"]
    with torch.no_grad():
        f_o = feats(net(fed, theta_o, False), x)
        f_d = feats(net(fed, theta_0(fed), False), x)
        f_u = feats(net(fed, ck["fcu"]["server"]["state"]["theta_u"], False), x)
    assert cos(f_u, f_d).mean() > cos(f_o, f_d).mean()
    assert cos(f_u, f_o).mean() < 0.999


def test_pga_is_projected_gradient_ascent_from_w_ref(fed, protocol):
    """PGA (Halimi et al. Sec. 3) from w_ref for 2 epochs (no early stop), uploaded once,
    then Phase 3. The settings make the projection act on most steps, not on all."""
    summary, ck = protocol
    theta_o = ck["original"]["server"]["weights"]
    w_u = ck["original"]["clients"][U]["state"]["last_local"]
    cost = [0, 0]
    theta_u, info = pga(fed, theta_o, w_u, trainable_keys(fed), poisoned(fed), cost)
    assert info["projected"] and info["inside"] and info["stopped"] is None
    got = ck["pga"]["server"]["state"]["theta_u"]
    assert_close(got, theta_u)
    assert ck["pga"]["clients"][U]["state"]["pga_epochs"] == ARGS["pga_epochs"]
    w = post_train(fed, got, 1, cost)
    assert_close(ck["pga"]["server"]["weights"], w)
    assert cost_of(summary, "pga") == cost


def test_pga_stops_at_the_first_batch_below_chance_accuracy(fed, protocol):
    """Halimi et al.'s early stop with the default threshold (0: chance, 1/C): the
    ascent stops before the first minibatch whose training-mode accuracy is below 1/C;
    that batch costs no gradient and no further epoch starts."""
    _, ck = protocol
    theta_o = ck["original"]["server"]["weights"]
    w_u = ck["original"]["clients"][U]["state"]["last_local"]
    cost = [0, 0]
    theta_u, info = pga(fed, theta_o, w_u, trainable_keys(fed), poisoned(fed), cost,
                        STOP_ARGS)
    assert info["stopped"] is not None and cost[0] >= 1
    assert_close(ck["pga_stop"]["server"]["state"]["theta_u"], theta_u)
    u = ck["pga_stop"]["clients"][U]["state"]
    assert u["pga_epochs"] == info["stopped"] + 1
    assert [u["grad_steps"], u["grad_samples"]] == cost


def probs(fed, sd, idx):
    with torch.no_grad():
        return net(fed, sd, train=False)(images(fed, torch.as_tensor(idx))[0]).softmax(1)


def pair_auroc(pos, neg):
    """P(score of a positive > score of a negative), ties one half (Mann-Whitney)."""
    pos, neg = np.asarray(pos, np.float64)[:, None], np.asarray(neg, np.float64)[None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def hand_metrics(y, p):
    """Balanced accuracy (mean recall over the classes in y), accuracy, and the macro
    one-vs-rest AUROC over the classes with positives and negatives."""
    y, p = y.numpy(), p.numpy()
    pred = p.argmax(1)
    present = np.unique(y)
    aucs = [pair_auroc(p[y == c, c], p[y != c, c]) for c in present if 0 < (y == c).sum() < len(y)]
    return (float(np.mean([(pred[y == c] == c).mean() for c in present])),
            float((pred == y).mean()), float(np.mean(aucs)))


def mia_features(fed, sd, idx):
    """Sheet section 8: per image (loss, entropy, max-probability) of the softmax p,
    loss = -log max(p_y, 1e-12), entropy = -sum_c p_c log p_c."""
    p = probs(fed, sd, idx).double()
    loss = -p[torch.arange(len(idx)), fed.y[idx]].clamp(min=1e-12).log()
    ent = -(p * p.clamp(min=1e-12).log()).sum(1)
    return torch.stack([loss, ent, p.max(1).values], 1).numpy()


def hand_attack(fed, shadow):
    """Sheet section 8: a logistic regression (class-balanced, on features standardised
    with the training rows' mean and population sd) fit on the SHADOW model's (the
    retrained one) outputs: D_r members, the first half of the test set (positions from
    the stream (seed, "mia-split")) non-members. Returns (decision function, held-out
    test positions)."""
    from sklearn.linear_model import LogisticRegression
    test = np.concatenate([c.test for c in fed.clients])
    rest = np.concatenate([c.train for k, c in enumerate(fed.clients) if k != U])
    perm = fedmed.np_rng(SEED, "mia-split").permutation(len(test))
    first, held = np.sort(perm[:len(test) // 2]), np.sort(perm[len(test) // 2:])
    x = np.concatenate([mia_features(fed, shadow, rest), mia_features(fed, shadow, test[first])])
    t = np.r_[np.ones(len(rest)), np.zeros(len(first))]
    mu, sd = x.mean(0), x.std(0)
    lr = LogisticRegression(class_weight="balanced").fit((x - mu) / sd, t)
    return (lambda f: lr.decision_function((f - mu) / sd)), held


def hand_audit(fed, sd, shadow):
    """The audit (sheet section 8 and fcu.py's docstring) of one model: the global test
    set (every client's test images), D_f (u's training images, clean, unaugmented), D_r
    (the others' training images); the sheet's attack (fit on `shadow`'s outputs): the
    share of D_f it calls members and its AUROC of D_f against the held-out test half; the
    loss-threshold MIA (Yeom et al.): score = -CE, AUROC of D_f against u's test images;
    the backdoor's attack success on the test images of the other classes, trigger
    stamped."""
    u = fed.clients[U]
    test = np.concatenate([c.test for c in fed.clients])
    rest = np.concatenate([c.train for k, c in enumerate(fed.clients) if k != U])
    out = {}
    for name, idx in (("test", test), ("forgotten", u.train), ("remaining", rest)):
        ba, acc, auc = hand_metrics(fed.y[idx], probs(fed, sd, idx))
        out.update({f"{name}_balanced_accuracy": ba, f"{name}_accuracy": acc,
                    f"{name}_auroc": auc})
    out["forgotten_error"] = 1 - out["forgotten_accuracy"]
    ce = lambda idx: -probs(fed, sd, idx)[torch.arange(len(idx)), fed.y[idx]].clamp(  # noqa
        min=1e-12).log().numpy()
    out["mia_loss_auroc"] = pair_auroc(-ce(u.train), -ce(u.test))
    decide, held = hand_attack(fed, shadow)
    s_f = decide(mia_features(fed, sd, u.train))
    out["mia_member_rate"] = float((s_f > 0).mean())
    out["mia_attack_auroc"] = pair_auroc(s_f, decide(mia_features(fed, sd, test[held])))
    other = test[fed.y.numpy()[test] != TARGET]
    x, _ = images(fed, torch.as_tensor(other))
    s, patch = trigger_patch(x.shape[-1])
    x[:, :, -s:, -s:] = patch
    with torch.no_grad():
        out["backdoor_success"] = int((net(fed, sd, False)(x).argmax(1) == TARGET).sum()) / len(x)
    return out


@pytest.mark.parametrize("phase", ["original", "fcu", "pga"])
def test_audit_recomputed_from_the_final_and_the_uploaded_models(fed, protocol, phase):
    """The audit's numbers (sheet section 8) of each phase's final model and, for the
    unlearning methods, of theta_u (before post-training), recomputed by hand."""
    summary, ck = protocol
    got = summary["audit"][phase]
    shadow = ck["retrain"]["server"]["weights"]
    want = hand_audit(fed, ck[phase]["server"]["weights"], shadow)
    assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-9)
    assert summary["mia_shadow"] == "retrain"
    if phase == "original":
        assert "before_post_training" not in got
    else:
        before = hand_audit(fed, ck[phase]["server"]["state"]["theta_u"], shadow)
        assert {k: got["before_post_training"][k] for k in before} == pytest.approx(
            before, abs=1e-9)
    assert summary["forget_client"] == fed.clients[U].name
    assert summary["backdoor_target"] == fed.classes[TARGET]


def test_what_the_protocol_writes_and_keeps(fed, protocol):
    """The folder of the whole protocol: config.json (every setting, the phases run),
    summary.json (the returned summary: FCU's run, the audit, the table); every phase
    starts from theta_o; only u's last local model is kept, by the original run (and
    handed to PGA); a phase run alone says what it runs."""
    summary, ck = protocol
    out = ck["out"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["phases"] == ["original", "retrain", "continue", "pga", "fcu", "fcu_code"]
    assert cfg["data"] == {} and cfg["algorithm_args"]["fusion_interval"] == 3
    assert json.load(open(os.path.join(out, "summary.json"))) == json.loads(
        fedmed.dumps(summary))
    runs = {p: json.load(open(os.path.join(out, p, "summary.json")))
            for p in ("original", "retrain", "continue", "pga", "fcu", "fcu_code")}
    for k in ("pooled_balanced_accuracy", "balanced_accuracy"):   # the figures: FCU's model
        assert summary[k] == runs["fcu"][k]
    assert summary["figures_of"] == "fcu" and summary["phase"] == "audit"
    for k in ("bytes_up", "bytes_down", "seconds", "rounds"):      # the cost: every phase
        assert summary["phases"] == {p: {k: r[k] for k in ("bytes_up", "bytes_down", "seconds",
                                                             "rounds")} for p, r in runs.items()}
        assert summary[k] == pytest.approx(sum(r[k] for r in runs.values()), rel=1e-12)
    assert summary["rounds"] == 2 * CFG["rounds"] + ARGS["post_rounds"] + 3 * (1 + ARGS["post_rounds"])
    keeps = {p: [k for k, c in enumerate(ck[p]["clients"]) if "last_local" in c["state"]]
             for p in ("original", "retrain", "continue", "pga", "fcu", "fcu_code")}
    assert keeps == {"original": [U], "retrain": [], "continue": [], "pga": [U], "fcu": [],
                     "fcu_code": []}
    assert ck["log"] == [f"phase pga: {1 + ARGS['post_rounds']} rounds"]
    rows = FCU.summary_table(summary).splitlines()
    names = [r.split()[0] for r in rows[2:11]]
    assert names == ["original", "retrain", "continue", "pga", "theta_u", "fcu", "theta_u",
                     "fcu_code", "theta_u"]
    pga_row = rows[2 + names.index("pga")]
    assert f"{summary['audit']['pga']['backdoor_success']:.3f}" in pga_row
    assert f"{summary['audit']['pga']['grad_samples']:,}" in pga_row
    assert rows[11].startswith("MIA: attack fit on the retrain model's outputs")
    assert [r.split(":")[0] for r in rows[12:16]] == [
        f"time to accuracy, {m}" for m in ("fcu", "fcu_code", "pga", "continue")]
    assert rows[-1].startswith("FCU speed-up vs retraining")


def ck_weights(protocol):
    return protocol[1]["original"]["server"]["weights"]


def fresh_algo(fed, protocol, phase, **kw):
    """An FCU instance of `phase` set up as the loop sets it up for round 0."""
    _, ck = protocol
    args = FCU.Args(**{**ARGS, **kw}, phase=phase,
                    from_run=os.path.join(ck["out"], "original"))
    algo = FCU(Config(**CFG), args, fed)
    clients = fedmed.make_clients(fed)
    server = fedmed.ServerState()
    algo.setup(server, clients)
    algo.round = 0
    algo.begin_round(server, clients)
    return algo, clients


def test_unlearning_trains_in_training_mode_whatever_mode_the_model_was_left_in(
        fed, protocol):
    """MCU+FGMP and PGA put the model in training mode themselves: after an evaluation
    (eval mode) they produce the same theta_u as in the protocol."""
    _, ck = protocol
    algo, clients = fresh_algo(fed, protocol, "fcu")
    algo.model.eval()
    assert_close(algo.mcu_fgmp(clients[U]), ck["fcu"]["server"]["state"]["theta_u"])
    algo, clients = fresh_algo(fed, protocol, "pga")
    algo.model.eval()
    assert_close(algo.pga(clients[U]), ck["pga"]["server"]["state"]["theta_u"])


def test_pga_stop_is_strict(fed, protocol):
    """The ascent stops at a batch whose accuracy is BELOW the threshold: with the
    threshold equal to the first batch's accuracy under w_ref, that batch is a step."""
    _, ck = protocol
    theta_o = ck["original"]["server"]["weights"]
    w_u = ck["original"]["clients"][U]["state"]["last_local"]
    _, info = pga(fed, theta_o, w_u, trainable_keys(fed), poisoned(fed), [0, 0])
    m = net(fed, info["ref"])
    gen = torch_rng(SEED, "batches", "pga", 0, U)
    idx = next(batches(fed.clients[U].train, gen, epochs=1))
    x, y = images(fed, idx, gen, poisoned(fed))
    with torch.no_grad():
        acc = float((m(x).argmax(1) == y).float().mean())
    assert acc > 0
    algo, clients = fresh_algo(fed, protocol, "pga", pga_stop_accuracy=acc, pga_epochs=1)
    algo.pga(clients[U])
    assert clients[U].state["grad_steps"] >= 1


def test_attack_success_in_eval_mode_and_on_a_single_image(fed, protocol):
    """The attack success rate is measured with the model in eval mode whatever its
    mode, and is a share: 1.0 for one image of another class the model sends to the
    target."""
    summary, ck = protocol
    algo = FCU.auditor(Config(**CFG), FCU.Args(**ARGS), fed)
    w = ck["original"]["server"]["weights"]
    algo.load_model(w, {})
    algo.model.train()
    test = np.concatenate([c.test for c in fed.clients])
    hits, tried = algo.audit.attack_success(test)
    assert tried == int((fed.y.numpy()[test] != TARGET).sum())
    assert hits / tried == pytest.approx(summary["audit"]["original"]["backdoor_success"],
                                         abs=1e-12)
    other = test[fed.y.numpy()[test] != TARGET]
    x, _ = images(fed, torch.as_tensor(other))
    s, patch = trigger_patch(x.shape[-1])
    x[:, :, -s:, -s:] = patch
    with torch.no_grad():
        hit = (net(fed, w, False)(x).argmax(1) == TARGET).numpy()
    assert hit.any()
    assert algo.audit.attack_success(other[hit][:1]) == (1, 1)
    assert algo.audit.attack_success(test[fed.y.numpy()[test] == TARGET]) == (0, 0)


@pytest.mark.parametrize("phase,kw", [
    ("fcu", {}), ("fcu_code", dict(fgmp_convention="code", fgmp_window="code")), ("pga", {})])
def test_no_bn_statistic_of_theta_u_depends_on_D_f(fed, protocol, phase, kw):
    """Issue #19, what of D_f may leave u: with D_f's images changed (inverted) and all
    else equal, the uploaded theta_u's BN running statistics are the same, those of the
    model unlearning started from (theta_o; PGA's w_ref), while its trained weights
    differ. The release's behaviour (--unlearn-bn-stats trained) uploads statistics
    estimated on D_f: they change with D_f's images."""
    x = fed.x.clone()
    idx = torch.as_tensor(fed.clients[U].train)
    x[idx] = 255 - x[idx]
    other = dataclasses.replace(fed, x=x)
    stats = [k for k in ck_weights(protocol) if k.rsplit(".", 1)[1] in BN_STATS]
    assert len(stats) == 9                               # 3 BN layers x (mean, var, count)
    for rule in ("start", "trained"):
        up = []
        for f in (fed, other):
            algo, clients = fresh_algo(f, protocol, phase, unlearn_bn_stats=rule, **kw)
            up.append(algo.pga(clients[U]) if phase == "pga" else algo.mcu_fgmp(clients[U]))
        start = (algo.reference_model(clients[U]) if phase == "pga"
                 else protocol[1]["original"]["server"]["weights"])
        assert not torch.allclose(up[0]["features.0.weight"], up[1]["features.0.weight"])
        same = [torch.equal(up[0][k], up[1][k]) for k in stats]
        if rule == "start":
            assert all(same)
            assert all(torch.equal(up[0][k], start[k]) for k in stats)
        else:
            assert not any(same[:2])           # the first layer's mean and var: D_f's


def test_time_to_accuracy_from_retrainings_curve(fed, protocol):
    """Issue #12's cost: for each method, the first retraining round whose pooled test BA
    (the loop's evaluation line) reaches the method's final test BA, retraining's sample
    gradients up to that round (its schedule by hand: the same minibatch sizes every
    round), over the method's; never reached: the bound retraining's total / method's."""
    summary, ck = protocol
    with open(os.path.join(ck["out"], "retrain", "metrics.jsonl")) as f:
        ba = [m["balanced_accuracy"] for m in map(json.loads, f) if m["client"] == "pooled"]
    per_round = sum(len(idx) for k in (0, 2) for idx in batches(
        fed.clients[k].train, torch.Generator().manual_seed(0), steps=CFG["local_steps"]))
    tta = summary["time_to_accuracy"]
    assert set(tta) == {"fcu", "fcu_code", "pga", "continue"}
    for m, t in tta.items():
        target = summary["audit"][m]["test_balanced_accuracy"]
        spent = summary["audit"][m]["grad_samples"]
        hit = [r for r, b in enumerate(ba, 1) if b >= target]
        assert t["target_test_balanced_accuracy"] == target
        if hit:
            assert (t["retrain_round"], t["retrain_grad_samples"]) == (hit[0], hit[0] * per_round)
            assert t["ratio"] == pytest.approx(hit[0] * per_round / spent)
        else:
            assert t["retrain_round"] is None and t["ratio"] is None
            assert t["ratio_above"] == pytest.approx(CFG["rounds"] * per_round / spent)
