"""FGASL (algorithms/fgasl.py): the tests of ../shared/methods/fgasl.md section 11, each
naming the items it checks (11.1 ... 11.8), and the bad input of issue #15. The
reference step of one whole local update is in test_fgasl_reference.py."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets
import fedmed
import run
from fedmed import Config, ServerState, transmit
from helpers import one_line_error, read_jsonl

import algorithms  # noqa: E402

algorithms.load_all()
from algorithms import fgasl  # noqa: E402


def small_fed(seed=0, clients=3, holdout=None, frac=0.6):
    ns = datasets.namespace(dataset="synthetic", clients=clients, image_size=16,
                            unlabeled_fraction=frac, holdout_client=holdout)
    return datasets.load(ns, seed=seed)


def make(fed, rounds=3, **kw):
    cfg = Config(algo="fgasl", rounds=rounds, local_steps=2, batch_size=8, optimizer="adam",
                 lr=1e-3, model="cnn", seed=0)
    algo = fedmed.ALGORITHMS["fgasl"](cfg, fgasl.Args(**kw), fed)
    server, clients = ServerState(), fedmed.make_clients(fed)
    algo.attach([], True)
    algo.setup(server, clients)
    return algo, server, clients


def one_round(algo, server, clients, t):
    algo.set_round(t)
    ups = {}
    for c in clients:
        payload, _ = transmit(algo.broadcast(server, c))
        ups[c.id], _ = transmit(algo.local_update(c, payload))
    algo.aggregate(server, ups)
    return ups


@pytest.fixture(scope="module")
def fed():
    return small_fed()


# ---------------------------------------------------------------- 11.1 the GA update

def test_ga_update_by_hand_for_the_sheets_numbers():
    """11.1: a = [0.2, 0.1, 0.4], r = 0, R = 50, d = 0.05 from uniform alpha:
    normalise(clip(1/3 + [0.5, 0.25, 1] * 0.05/3))."""
    a = torch.tensor([0.2, 0.1, 0.4], dtype=torch.float64)
    got = fgasl.ga_update(torch.full((3,), 1 / 3, dtype=torch.float64), a, 0, 50, 0.05)
    raw = [1 / 3 + g * 0.05 / 3 for g in (0.5, 0.25, 1.0)]
    want = torch.tensor([v / sum(raw) for v in raw], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    assert abs(float(got.sum()) - 1) < 1e-15


def test_ga_step_decays_linearly_with_the_round():
    """11.1 (GA-2): the step is (d/3)(1 - r/R): at r = 25 of 50, half of round 0's."""
    a = torch.tensor([0.0, 1.0])
    alpha = torch.tensor([0.5, 0.5])
    got = fgasl.ga_update(alpha, a, 25, 50, 0.3)
    raw = [0.5, 0.5 + 0.1 * 0.5]
    torch.testing.assert_close(got, torch.tensor(raw, dtype=torch.float64) / sum(raw))


def test_ga_center_is_feddg_gas_form():
    """11.1 --ga-center: g = (a - mean a) / max |a - mean a| (FedDG-GA)."""
    a = torch.tensor([0.2, 0.1, 0.4])
    c = [0.2 - 0.7 / 3, 0.1 - 0.7 / 3, 0.4 - 0.7 / 3]
    m = max(abs(v) for v in c)
    raw = [1 / 3 + v / m * 0.05 / 3 for v in c]
    got = fgasl.ga_update(torch.full((3,), 1 / 3), a, 0, 50, 0.05, center=True)
    torch.testing.assert_close(got, torch.tensor([v / sum(raw) for v in raw], dtype=torch.float64))


def test_ga_clip_to_zero_one_and_uniform_when_all_clipped():
    """11.1 (GA-3): alpha is clipped to [0, 1] before the renormalisation; a sum of 0
    gives uniform weights; all-zero gaps leave alpha unchanged (g = 0)."""
    got = fgasl.ga_update(torch.tensor([0.01, 0.99]), torch.tensor([-1.0, 1.0]), 0, 10, 3.0)
    # raw [0.01 - 1, 0.99 + 1] -> clip [0, 1] -> [0, 1]
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0], dtype=torch.float64))
    got = fgasl.ga_update(torch.tensor([0.0, 0.0]), torch.tensor([-1.0, -1.0]), 0, 10, 0.3)
    torch.testing.assert_close(got, torch.tensor([0.5, 0.5], dtype=torch.float64))
    got = fgasl.ga_update(torch.tensor([0.2, 0.8]), torch.zeros(2), 3, 10, 0.3)
    torch.testing.assert_close(got, torch.tensor([0.2, 0.8], dtype=torch.float64))


def test_ga_weights_sum_to_one_every_round():
    """11.1: over 20 rounds of random positive gaps, alpha stays a distribution."""
    g = torch.Generator().manual_seed(0)
    alpha = torch.full((4,), 0.25)
    for r in range(20):
        alpha = fgasl.ga_update(alpha, torch.rand(4, generator=g), r, 20, 0.5)
        assert abs(float(alpha.sum()) - 1) < 1e-12 and float(alpha.min()) >= 0


# ---------------------------------------------------------------- 11.2 the weights

def _fake_uploads(algo, server, gaps, scale):
    ups = {}
    for k, a in enumerate(gaps):
        w = {key: (v * scale[k] + k if v.is_floating_point() else v + k)
             for key, v in server.weights.items()}
        ups[k] = {"w": w, "n": 10 * (k + 1), "gap": torch.tensor(a, dtype=torch.float64)}
    return ups


def test_round_0_is_uniform_and_the_aggregate_covers_every_tensor(fed):
    """11.2: round 0 aggregates with exactly 1/K (not n_k, not alpha), every floating
    tensor (BN running statistics included) is sum_k w_k theta_k, num_batches_tracked the
    maximum; alpha is still updated with the round-0 gaps; from round 1 the updated alpha
    is used."""
    algo, server, clients = make(fed)
    gaps, scale = [0.2, 0.1, 0.4], [1.0, 2.0, 3.0]
    algo.set_round(0)
    ups = _fake_uploads(algo, server, gaps, scale)
    base = {k: v.clone() for k, v in server.weights.items()}
    algo.aggregate(server, ups)
    for key, v in base.items():
        if key.endswith("num_batches_tracked"):
            assert int(server.weights[key]) == int(v) + 2
        else:
            want = sum((v.double() * scale[k] + k) / 3 for k in range(3)).float()
            torch.testing.assert_close(server.weights[key], want, rtol=1e-6, atol=1e-6)
    assert any("running_var" in k for k in base)
    alpha1 = fgasl.ga_update(torch.full((3,), 1 / 3), torch.tensor(gaps), 0, 3, 0.05)
    torch.testing.assert_close(server.state["alpha"], alpha1)
    assert server.state["used"]["w"] == {0: 1 / 3, 1: 1 / 3, 2: 1 / 3}
    algo.set_round(1)
    base = {k: v.clone() for k, v in server.weights.items()}
    ups = _fake_uploads(algo, server, [0.3, 0.3, 0.0], scale)
    algo.aggregate(server, ups)
    alpha2 = fgasl.ga_update(alpha1, torch.tensor([0.3, 0.3, 0.0]), 1, 3, 0.05)
    torch.testing.assert_close(server.state["alpha"], alpha2)
    for key, v in base.items():
        if v.is_floating_point():
            want = sum(alpha2[k] * (v.double() * scale[k] + k) for k in range(3)).float()
            torch.testing.assert_close(server.weights[key], want, rtol=1e-6, atol=1e-6)


def test_no_gaa_takes_fedavg_weights(fed):
    """--no-gaa: n_k / n (labelled + unlabelled) in every round, no gap computed."""
    algo, server, clients = make(fed, gaa=False)
    algo.set_round(1)
    ups = _fake_uploads(algo, server, [0.0] * 3, [1.0, 1.0, 1.0])
    key = next(k for k, v in server.weights.items() if v.is_floating_point())
    v = server.weights[key].clone()
    algo.aggregate(server, ups)
    want = sum((v.double() + k) * 10 * (k + 1) / 60 for k in range(3)).float()
    torch.testing.assert_close(server.weights[key], want)
    payload, _ = transmit(algo.broadcast(server, clients[0]))
    assert "gap" not in algo.local_update(clients[0], payload)


# ---------------------------------------------------------------- 11.3 pseudo labels

def test_identical_teachers_give_the_static_prediction_and_its_entropy():
    """11.3: p_S = p_D gives y_hat = argmax p_S and u = H(p_S)."""
    p = F.softmax(torch.randn(6, 5, generator=torch.Generator().manual_seed(1)), 1)
    y, u = fgasl.dual_teacher(p, p.clone())
    assert torch.equal(y, p.argmax(1))
    torch.testing.assert_close(u, -(p * p.log()).sum(1))
    pS = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    pD = torch.tensor([[0.3, 0.7], [0.9, 0.1]])
    y, u = fgasl.dual_teacher(pS, pD)                     # mean: [0.45, 0.55], [0.7, 0.3]
    assert y.tolist() == [1, 0]
    H = lambda q: -sum(v * math.log(v) for v in q)         # noqa: E731
    torch.testing.assert_close(u, torch.tensor([(H([.6, .4]) + H([.3, .7])) / 2,
                                                (H([.5, .5]) + H([.9, .1])) / 2]))


def test_mask_is_monotone_in_tau_and_tau_zero_takes_only_one_hot():
    """11.3: raising tau never removes an accepted sample; with tau = 0 only exactly
    one-hot predictions (entropy 0) are accepted; u == tau is accepted (<=)."""
    u = torch.rand(200, generator=torch.Generator().manual_seed(2)) * 2
    prev = fgasl.accept(u, 0.0)
    for tau in np.linspace(0, 2.1, 30):
        m = fgasl.accept(u, float(tau))
        assert bool((m >= prev).all())
        prev = m
    assert prev.sum() == 200
    p = torch.tensor([[1.0, 0.0, 0.0], [0.999, 0.001, 0.0], [0.0, 0.0, 1.0]])
    _, u = fgasl.dual_teacher(p, p)
    assert fgasl.accept(u, 0.0).tolist() == [1.0, 0.0, 1.0]
    assert fgasl.accept(torch.tensor([0.5]), 0.5).tolist() == [1.0]


# ---------------------------------------------------------------- 11.4 the threshold

def test_quantile_schedule_is_linear_over_R_I():
    """11.4 (DR-4): q_0 = q_s, q_{T_max} = q_e, linear in between."""
    assert fgasl.quantile_at(0, 400, 0.15, 0.30) == 0.15
    assert abs(fgasl.quantile_at(400, 400, 0.15, 0.30) - 0.30) < 1e-15
    assert abs(fgasl.quantile_at(100, 400, 0.1, 0.5) - 0.2) < 1e-15


def test_threshold_is_an_ema_of_the_buffer_quantile():
    """11.4 (DR-5): tau <- 0.9 tau + 0.1 Q_q(buffer); the buffer keeps the last N_buf
    entropies; --threshold-source batch takes this batch's quantile."""
    buf = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    H = torch.tensor([0.9, 0.5], dtype=torch.float64)
    tau, new = fgasl.update_threshold(0.4, buf, H, 0.5, 0.9, 4)
    assert new.tolist() == [0.2, 0.3, 0.9, 0.5]
    q = float(np.quantile([0.2, 0.3, 0.9, 0.5], 0.5))
    assert abs(tau - (0.9 * 0.4 + 0.1 * q)) < 1e-12
    tau, _ = fgasl.update_threshold(0.4, buf, H, 0.25, 0.9, 4, source="batch")
    assert abs(tau - (0.9 * 0.4 + 0.1 * float(np.quantile([0.9, 0.5], 0.25)))) < 1e-7


def test_tau_starts_at_zero_persists_across_rounds_and_through_resume(tmp_path):
    """11.4: tau_0 = 0 at every client; tau and the buffer carry from round to round
    (round 2 starts from round 1's value: its tau differs from one started at 0) and
    through a checkpoint: 1 round + --resume 1 round = 2 rounds uninterrupted, bit for
    bit, tau included."""
    fed = small_fed(clients=2)
    algo, server, clients = make(fed, rounds=2)
    assert [c.state["tau"] for c in clients] == [0.0, 0.0]
    one_round(algo, server, clients, 0)
    tau1 = [c.state["tau"] for c in clients]
    assert all(t > 0 for t in tau1)
    assert all(len(c.state["buffer"]) == 2 * 8 for c in clients)
    saved = {k: v.clone() for k, v in server.weights.items()}
    one_round(algo, server, clients, 1)
    tau2 = [c.state["tau"] for c in clients]
    algo2, server2, clients2 = make(fed, rounds=2)
    server2.weights = saved
    server2.state["alpha"] = server.state["alpha"]
    algo2.set_round(1)
    for c in clients2:                                       # same round from tau = 0
        payload, _ = transmit(algo2.broadcast(server2, c))
        algo2.local_update(c, payload)
    assert all(abs(a - b) > 1e-6 for a, b in zip(tau2, [c.state["tau"] for c in clients2]))
    cfg = Config(algo="fgasl", rounds=2, local_steps=2, batch_size=8, optimizer="adam",
                 lr=1e-3, model="cnn")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    fedmed.run(cfg, fgasl.Args(), fed, a, quiet=True, log=lambda *_: None)
    fedmed.run(cfg, fgasl.Args(), fed, b, quiet=True, stop_after=1, log=lambda *_: None)
    fedmed.run(cfg, fgasl.Args(), fed, b, quiet=True, resume=True, log=lambda *_: None)
    ka = fedmed.load_checkpoint(os.path.join(a, "checkpoint.pt"))
    kb = fedmed.load_checkpoint(os.path.join(b, "checkpoint.pt"))
    assert fedmed.state_digest(ka["server"]) == fedmed.state_digest(kb["server"])
    assert [c["state"]["tau"] for c in ka["clients"]] == [c["state"]["tau"] for c in kb["clients"]]
    assert all(c["state"]["tau"] > 0 for c in ka["clients"])


# ---------------------------------------------------------------- 11.5 PIA

def _pia(model_name="cnn", p=0.3, train=True):
    torch.manual_seed(0)
    import models
    model = models.build(model_name, 4)
    model.train(train)
    hooks = fgasl.Perturbed(model, fgasl.PIA_STAGES[model_name], fgasl.HEAD_AT[model_name], p)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    return model, hooks, x


def test_pia_is_zero_at_p_zero():
    """11.5: p_fp = 0: the perturbed pass equals the clean one, L_pert = 0 exactly."""
    model, hooks, x = _pia(p=0.0)
    _, feat = hooks.forward(x)
    _, feat_fp = hooks.forward(x, perturb=True)
    assert float(fgasl.pia_loss(feat, feat_fp).detach()) == 0.0


def test_pia_is_positive_in_train_mode_and_both_passes_get_gradient():
    """11.5: p_fp > 0 in train mode: L_pert > 0 and the gradient reaches both passes'
    features (and the parameters through both)."""
    model, hooks, x = _pia(p=0.5)
    _, feat = hooks.forward(x)
    _, feat_fp = hooks.forward(x, perturb=True)
    feat.retain_grad()
    feat_fp.retain_grad()
    loss = fgasl.pia_loss(feat, feat_fp)
    assert float(loss.detach()) > 0
    loss.backward()
    assert float(feat.grad.abs().sum()) > 0 and float(feat_fp.grad.abs().sum()) > 0
    torch.testing.assert_close(feat.grad, -feat_fp.grad)
    assert feat.shape == (6, 128)                       # the pooled feature, head input


def test_pia_applies_no_dropout_in_eval_mode_and_leaves_no_hook():
    """11.5: eval mode: the perturbed pass is the clean pass; remove() leaves no hook."""
    model, hooks, x = _pia(p=0.5, train=False)
    z, feat = hooks.forward(x)
    z2, feat_fp = hooks.forward(x, perturb=True)
    assert torch.equal(feat, feat_fp) and torch.equal(z, z2)
    hooks.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_pia_stages_exist_and_perturb(name):
    """Every stage of PIA_STAGES exists; the perturbed pass differs in train mode."""
    model, hooks, x = _pia(name, p=0.5)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, f1 = hooks.forward(x)
        _, f2 = hooks.forward(x, perturb=True)
    assert not torch.equal(f1, f2)
    hooks.remove()


def test_one_dropout_per_stage_each_feeding_the_next():
    """11.5: Dropout2d is applied at the output of every listed stage (3 for the CNN) and
    the next stage sees the dropped map."""
    model, hooks, x = _pia(p=0.5)
    seen = []
    h = model.features[4].register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    calls = []
    orig = F.dropout2d

    def spy(t, p, training):
        out = orig(t, p, training)
        calls.append(out)
        return out
    fgasl.F.dropout2d = spy
    try:
        hooks.forward(x, perturb=True)
    finally:
        fgasl.F.dropout2d = orig
        h.remove()
    assert len(calls) == 3
    assert torch.equal(seen[0], calls[0])


# ---------------------------------------------------------------- 11.6 the gap

def test_gap_is_zero_for_equal_models_in_eval_mode_without_moving_bn(fed):
    """11.6: a_k = 0 when theta = theta_g; the gap leaves every BN buffer unchanged and
    is computed in eval mode (a train-mode pass would move running_mean)."""
    algo, server, clients = make(fed)
    algo.load_model(server.weights, {})
    algo.static.load_state_dict(algo.model.state_dict())
    algo.model.train()
    before = {k: v.clone() for k, v in algo.model.state_dict().items()}
    a = algo.gap(clients[0])
    assert float(a) == 0.0
    after = algo.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not algo.model.training


def test_gap_is_the_mean_kl_over_labelled_and_unlabelled_images(fed):
    """11.6 (GAP): a_k = mean over train + unlabeled of sum_c p_g (log p_g - log p_k), eval
    mode, no augmentation; recomputed here in float64 from the two models' logits."""
    algo, server, clients = make(fed)
    c = clients[1]
    payload, _ = transmit(algo.broadcast(server, c))
    up = algo.local_update(c, payload)
    idx = torch.as_tensor(np.concatenate([c.train, c.unlabeled]))
    x = (fed.x[idx].float() / 255 - fedmed.IMAGENET_MEAN) / fedmed.IMAGENET_STD
    import models
    g, k = models.build("cnn", fed.num_classes), models.build("cnn", fed.num_classes)
    g.load_state_dict(server.weights)
    k.load_state_dict(up["w"])
    g.eval()
    k.eval()
    with torch.no_grad():
        pg = F.softmax(g(x).double(), 1)
        pk = F.softmax(k(x).double(), 1)
    want = (pg * (pg.log() - pk.log())).sum(1).mean()
    assert float(want) > 0
    torch.testing.assert_close(up["gap"], want, rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------- 11.7 the protocol

class Spy:
    """fed.x that records which rows are read while `on`."""

    def __init__(self, x):
        self.x, self.on, self.rows = x, False, set()

    def __getitem__(self, idx):
        if self.on:
            self.rows |= set(torch.as_tensor(idx).reshape(-1).tolist())
        return self.x[idx]

    def __getattr__(self, name):
        return getattr(self.x, name)


def test_the_unseen_centre_is_in_no_training_loader():
    """11.7: with --holdout-client, no image of the held-out client is read by any local
    update (labelled, unlabelled, gap), and it is evaluated on all of its images."""
    fed = small_fed(clients=3, holdout="site1")
    held = set(fed.holdout[0].test.tolist())
    assert len(held) > 0 and not fed.holdout[0].train.size
    algo, server, clients = make(fed, rounds=1)
    spy = Spy(fed.x)
    algo.fed.x = spy
    try:
        spy.on = True
        one_round(algo, server, clients, 0)
        spy.on = False
    finally:
        algo.fed.x = spy.x
    trained = set(np.concatenate([np.concatenate([c.train, c.unlabeled]) for c in clients]).tolist())
    assert spy.rows == trained
    assert not spy.rows & held
    assert [c.name for c in clients] == ["site0", "site2"]


def test_labelled_subsets_are_deterministic_per_seed_and_disjoint():
    """11.7: the labelled subset is a function of the seed (the same twice, another with
    another seed), labelled and unlabelled are disjoint, and holding a client out does
    not change the others' subsets."""
    a, b, c = small_fed(seed=4), small_fed(seed=4), small_fed(seed=5)
    h = small_fed(seed=4, holdout="site0")
    for x, y in zip(a.clients, b.clients):
        assert np.array_equal(x.train, y.train) and np.array_equal(x.unlabeled, y.unlabeled)
        assert not set(x.train) & set(x.unlabeled) and len(x.unlabeled) > len(x.train) / 2
    assert any(not np.array_equal(x.train, y.train) for x, y in zip(a.clients, c.clients))
    for x, y in zip(a.clients[1:], h.clients):
        assert x.name == y.name and len(x.train) == len(y.train)


# ---------------------------------------------------------------- 11.8 multi-round smoke

def test_three_rounds_end_to_end_in_train_mode(tmp_path, monkeypatch):
    """11.8: 3 rounds through run.py on tiny data; every local step runs in train mode
    (pitfall 3: after each evaluation), and the BN running statistics move in round 3;
    metrics.jsonl carries the pseudo-label acceptance, accuracy, tau, gap and weight."""
    modes = []
    orig = fgasl.Perturbed.forward

    def spy(self, x, perturb=False):
        modes.append(self.model.training)
        return orig(self, x, perturb)
    monkeypatch.setattr(fgasl.Perturbed, "forward", spy)
    out = str(tmp_path / "run")
    code = run.main(["--algo", "fgasl", "--unlabeled-fraction", "0.6", "--rounds", "3",
                     "--local-steps", "2", "--batch-size", "8", "--image-size", "16",
                     "--clients", "3", "--holdout-client", "site2", "--quiet", "--out", out])
    assert code == 0
    assert len(modes) == 3 * 2 * 2 * 2 and all(modes)
    lines = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert sorted({m["round"] for m in lines}) == [1, 2, 3]
    train = [m for m in lines if m["client"] in ("site0", "site1")]
    assert all(0 <= m["pl_accept"] <= 1 and m["pl_seen"] == 16 and m["tau"] > 0 for m in train)
    assert all(m["pl_acc"] is None or 0 <= m["pl_acc"] <= 1 for m in train)
    assert all(m["gap"] >= 0 for m in train)
    for r in (1, 2, 3):
        w = [m["ga_weight"] for m in train if m["round"] == r]
        assert abs(sum(w) - 1) < 1e-9 and (r > 1 or w == [0.5, 0.5])
    held = [m for m in lines if m["client"] == "site2"]
    assert len(held) == 3 and all(m["holdout"] for m in held)
    ck = fedmed.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert abs(float(ck["server"]["state"]["alpha"].sum()) - 1) < 1e-12


def test_ablation_flags_reach_the_method(tmp_path):
    """--no-dr: one teacher with a fixed threshold (the static one is never called);
    --no-pia: no perturbed pass."""
    fed = small_fed(clients=2)
    algo, server, clients = make(fed, rounds=1, dr=False, pia=False, tau_fixed=0.0)
    calls = []
    algo.static.register_forward_hook(lambda *a: calls.append("static"))
    orig = fgasl.Perturbed.forward
    perturbed = []

    def spy(self, x, perturb=False):
        perturbed.append(perturb)
        return orig(self, x, perturb)
    fgasl.Perturbed.forward = spy
    try:
        algo.set_round(0)
        payload, _ = transmit(algo.broadcast(server, clients[0]))
        algo.local_update(clients[0], payload)
    finally:
        fgasl.Perturbed.forward = orig
    assert perturbed == [False, False]
    assert calls == ["static"]                             # the gap only, not the pseudo labels
    assert clients[0].state["pl"]["accepted"] == 16        # tau_fixed 0 accepts every label
    assert clients[0].state["tau"] == 0.0                  # no adaptive threshold


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("flags,needle", [
    (["--holdout-client", "nowhere"], "--holdout-client 'nowhere' is not a client"),
    (["--q-s", "0.5", "--q-e", "0.2"], "--q-s 0.5 is above --q-e 0.2"),
    (["--p-fp", "1"], "--p-fp"),
    (["--threshold-source", "pixels"], "--threshold-source"),
    (["--bn", "local"], "--bn local"),
    (["--fraction", "0.5"], "--fraction 0.5"),
    (["--model", "clip:ViT-B-32"], "PIA has no stage list"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, flags, needle):
    out = str(tmp_path / "x")
    code = run.main(["--algo", "fgasl", "--unlabeled-fraction", "0.6", "--image-size", "16",
                     "--rounds", "1", "--quiet", "--out", out] + flags)
    one_line_error(capsys, code, needle, out=out)


def test_a_client_with_every_label_removed_is_refused(tmp_path):
    """A client whose labelled subset is empty (every label removed) or that has no
    unlabelled image: a one-line UsageError naming the client, before training."""
    fed = small_fed(clients=2)
    c = fed.clients[1]
    c.unlabeled, c.train = np.sort(np.concatenate([c.train, c.unlabeled])), c.train[:0]
    with pytest.raises(fedmed.UsageError, match="client site1 has no labelled training image"):
        make(fed)
    fed = small_fed(clients=2, frac=0.0)
    with pytest.raises(fedmed.UsageError, match="client site0 has no unlabelled image"):
        make(fed)
