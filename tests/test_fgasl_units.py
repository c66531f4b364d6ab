"""FGASL (algorithms/fgasl.py): the defaults of the sheet (section 7), the range checks
at their boundaries, and the pieces of the local update that the reference step does not
reach (the epoch schedule, the kept optimiser state, divergence, frozen teachers, the
upload's n_k, a multi-label federation)."""
import dataclasses

import numpy as np
import pytest
import torch

import datasets
import fedmed
from fedmed import Config, ServerState, UsageError, transmit

import algorithms  # noqa: E402

algorithms.load_all()
from algorithms import fgasl  # noqa: E402


def small_fed(clients=2, frac=0.6):
    ns = datasets.namespace(dataset="synthetic", clients=clients, image_size=16,
                            unlabeled_fraction=frac)
    return datasets.load(ns, seed=0)


@pytest.fixture(scope="module")
def fed():
    return small_fed()


def make(fed, cfg_kw=None, **kw):
    cfg = Config(**{**dict(algo="fgasl", rounds=2, local_steps=2, batch_size=8,
                           optimizer="adam", lr=1e-3, model="cnn", seed=0), **(cfg_kw or {})})
    algo = fedmed.ALGORITHMS["fgasl"](cfg, fgasl.Args(**kw), fed)
    server, clients = ServerState(), fedmed.make_clients(fed)
    algo.attach([], True)
    algo.setup(server, clients)
    return algo, server, clients


def test_defaults_are_the_sheets():
    """Sheet section 7: q_s 0.15 -> q_e 0.30, p_fp 0.3, lambda_f 0.3, d 0.05, EMA 0.99,
    threshold EMA 0.9, N_buf 256 [ours], the unlabelled batch = the labelled one, every
    component on, FedDG-GA's centring off, the fixed threshold of --no-dr 0.95; the
    recipe: Adam, lr 1e-4, weight decay 5e-4, batch 16, 100 local iterations."""
    a = fgasl.Args()
    assert dataclasses.asdict(a) == {
        "q_s": 0.15, "q_e": 0.30, "p_fp": 0.3, "lambda_f": 0.3, "ga_step": 0.05,
        "ga_center": False, "dynamic_decay": 0.99, "tau_decay": 0.9, "buffer": 256,
        "threshold_source": "buffer", "unlabeled_batch": 0, "gaa": True, "dr": True,
        "pia": True, "tau_fixed": 0.95}
    assert fgasl.FGASL.recipe == {"optimizer": "adam", "lr": 1e-4, "weight_decay": 5e-4,
                                  "batch_size": 16, "local_steps": 100}


@pytest.mark.parametrize("kw", [dict(q_s=0.0, q_e=1.0), dict(q_s=0.4, q_e=0.4), dict(p_fp=0.0),
                                dict(lambda_f=0.0, ga_step=0.0), dict(dynamic_decay=0.0),
                                dict(dynamic_decay=1.0, tau_decay=1.0, tau_fixed=1.0),
                                dict(tau_decay=0.0, tau_fixed=0.0), dict(buffer=1),
                                dict(q_s=1.0, q_e=1.0), dict(q_s=0.0, q_e=0.0),
                                dict(unlabeled_batch=2), dict(threshold_source="batch")])
def test_the_boundaries_of_each_range_are_accepted(kw):
    fgasl.check_args(Config(algo="fgasl", model="cnn"), fgasl.Args(**kw))


@pytest.mark.parametrize("kw,needle", [
    (dict(q_s=-0.01), "--q-s and --q-e"), (dict(q_e=1.01), "--q-s and --q-e"),
    (dict(q_s=1.5), "--q-s and --q-e"), (dict(q_s=-0.2, q_e=-0.1), "--q-s and --q-e"),
    (dict(q_s=0.31), "above --q-e"), (dict(p_fp=1.0), "--p-fp"), (dict(p_fp=-0.1), "--p-fp"),
    (dict(lambda_f=-1.0), "--lambda-f"), (dict(ga_step=-0.1), "--ga-step"),
    (dict(dynamic_decay=1.01), "--dynamic-decay"), (dict(dynamic_decay=-0.01), "--dynamic-decay"),
    (dict(tau_decay=1.5), "--tau-decay"), (dict(tau_fixed=-0.5), "--tau-fixed"),
    (dict(buffer=0), "--buffer"), (dict(unlabeled_batch=1), "--unlabeled-batch"),
    (dict(unlabeled_batch=-2), "--unlabeled-batch")])
def test_each_range_is_refused_outside(kw, needle):
    with pytest.raises(UsageError, match=needle):
        fgasl.check_args(Config(algo="fgasl", model="cnn"), fgasl.Args(**kw))


def test_epochs_schedule_when_no_local_steps(fed):
    """--local-steps 0: I = E ceil(n_lab / B) iterations (the unlabelled cycle follows)."""
    algo, server, clients = make(fed, cfg_kw=dict(local_steps=0, local_epochs=2), unlabeled_batch=4)
    c = clients[0]
    algo.set_round(0)
    payload, _ = transmit(algo.broadcast(server, c))
    algo.local_update(c, payload)
    I = 2 * int(np.ceil(len(c.train) / 8))
    drop = 1 if len(c.train) % 8 == 1 else 0            # minibatches drops a batch of one
    assert c.state["pl"]["seen"] == 4 * (I - 2 * drop)


def test_kept_optimizer_state_only_with_keep_optimizer(fed):
    algo, server, clients = make(fed)
    algo.set_round(0)
    payload, _ = transmit(algo.broadcast(server, clients[0]))
    algo.local_update(clients[0], payload)
    assert "optimizer" not in clients[0].state
    algo, server, clients = make(fed, cfg_kw=dict(keep_optimizer=True))
    algo.set_round(0)
    payload, _ = transmit(algo.broadcast(server, clients[0]))
    algo.local_update(clients[0], payload)
    st = clients[0].state["optimizer"]["state"]
    assert st and all(int(v["step"]) == 2 for v in st.values())


def test_a_non_finite_loss_is_a_divergence(fed, monkeypatch):
    algo, server, clients = make(fed)
    monkeypatch.setattr(algo, "task_loss", lambda z, y: torch.tensor(float("nan")) + z.sum() * 0)
    algo.set_round(0)
    payload, _ = transmit(algo.broadcast(server, clients[0]))
    with pytest.raises(fedmed.Diverged, match="client site0"):
        algo.local_update(clients[0], payload)


def test_teachers_are_frozen_and_the_upload_counts_every_local_image(fed):
    """Neither teacher has a trainable parameter; the upload's n is labelled +
    unlabelled images and carries the gap; what is reported names the components."""
    algo, server, clients = make(fed, pia=False)
    assert not any(p.requires_grad for m in (algo.static, algo.dynamic) for p in m.parameters())
    assert all(p.requires_grad for p in algo.model.parameters())
    algo.set_round(0)
    c = clients[1]
    payload, _ = transmit(algo.broadcast(server, c))
    up = algo.local_update(c, payload)
    assert up["n"] == len(c.train) + len(c.unlabeled)
    assert up["gap"].dtype == torch.float64 and set(up) == {"w", "n", "gap"}
    assert algo.info == {"pia_stages": ["features.3", "features.7", "features.11"],
                         "feature_at": "classifier", "components": ["gaa", "dr"]}


def test_a_multilabel_federation_is_refused():
    fed = datasets.make_synthetic_multilabel(0, 2, 16)
    with pytest.raises(UsageError, match="single-label"):
        make(fed)


def test_line_extra_of_a_round_the_client_did_not_train(fed):
    """Keys of this round only: before training (round 0 not run) only tau; a held-out
    client gets nothing; pl_acc is null when nothing was accepted."""
    algo, server, clients = make(fed)
    algo.set_round(0)
    assert algo.line_extra(server, clients[0]) == {"tau": 0.0}
    held = fedmed.ClientState(-1, "held", np.zeros(0, np.int64), clients[0].test)
    assert algo.line_extra(server, held) == {}
    clients[0].state["pl"] = {"round": 0, "seen": 10, "accepted": 0, "correct": 0}
    assert algo.line_extra(server, clients[0])["pl_acc"] is None
    clients[0].state["pl"] = {"round": 0, "seen": 10, "accepted": 4, "correct": 1}
    extra = algo.line_extra(server, clients[0])
    assert extra["pl_accept"] == 0.4 and extra["pl_acc"] == 0.25


def test_the_upper_clip_matters_after_renormalisation():
    """(GA-3) the clip at 1 (not only at 0): raw alpha [2.5, 1.5] clips to [1, 1], so the
    weights are equal; without the upper clip they would be 5/8, 3/8."""
    got = fgasl.ga_update(torch.tensor([0.5, 0.5], dtype=torch.float64),
                          torch.tensor([1.0, 0.5], dtype=torch.float64), 0, 10, 6.0)
    torch.testing.assert_close(got, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_the_pseudo_label_needs_both_teachers():
    """(DR-2) y_hat is the argmax of the mean: here it differs from each teacher's own
    argmax in one row (static says 0 and dynamic 1, the mean says 0; and the reverse)."""
    pS = torch.tensor([[0.9, 0.1], [0.4, 0.6]])
    pD = torch.tensor([[0.4, 0.6], [0.9, 0.1]])
    y, _ = fgasl.dual_teacher(pS, pD)
    assert y.tolist() == [0, 0]


def test_bad_settings_are_refused_before_data_and_by_the_constructor(fed):
    """run.py's check before any image is read, and the constructor's own (a script that
    builds the method directly)."""
    bad = fgasl.Args(q_s=0.5, q_e=0.2)
    with pytest.raises(UsageError, match="above --q-e"):
        fgasl.FGASL.check_before_data(Config(algo="fgasl", model="cnn"), bad)
    with pytest.raises(UsageError, match="above --q-e"):
        fedmed.ALGORITHMS["fgasl"](Config(algo="fgasl", model="cnn"), bad, fed)


def test_no_dr_accepts_a_confidence_equal_to_the_fixed_threshold(fed):
    """--no-dr: the mask is max p_D >= tau_fixed (>=): a zero head gives exactly uniform
    teacher predictions, 1/C, and tau_fixed = 1/C accepts every image of the step."""
    algo, server, clients = make(fed, cfg_kw=dict(local_steps=1), dr=False, pia=False)
    for k in ("classifier.weight", "classifier.bias"):
        server.weights[k] = torch.zeros_like(server.weights[k])
    algo.args.tau_fixed = float(torch.softmax(torch.zeros(1, fed.num_classes), 1)[0, 0])
    algo.set_round(0)
    payload, _ = transmit(algo.broadcast(server, clients[0]))
    algo.local_update(clients[0], payload)
    assert clients[0].state["pl"]["accepted"] == clients[0].state["pl"]["seen"] == 8


def test_train_returns_its_number_of_steps(fed):
    algo, server, clients = make(fed, cfg_kw=dict(local_steps=3))
    algo.set_round(0)
    algo.load_model(server.weights, {})
    algo.static.load_state_dict(algo.model.state_dict())
    algo.dynamic.load_state_dict(algo.model.state_dict())
    assert algo.train(clients[0], {}) == 3


def test_the_gap_is_the_same_in_small_evaluation_batches(fed):
    """(GAP) over every local image whatever --eval-batch-size: batches of 16 give the
    mean of batches of 256."""
    vals = []
    for ebs in (256, 16):
        algo, server, clients = make(fed, cfg_kw=dict(eval_batch_size=ebs))
        algo.set_round(0)
        payload, _ = transmit(algo.broadcast(server, clients[0]))
        vals.append(float(algo.local_update(clients[0], payload)["gap"]))
    assert len(clients[0].train) + len(clients[0].unlabeled) > 32
    assert vals[0] > 0 and abs(vals[0] - vals[1]) < 1e-6 * vals[0]


def test_no_gaa_logs_fedavg_weights_summing_to_one(fed):
    algo, server, clients = make(fed, gaa=False)
    algo.set_round(0)
    ups = {}
    for c in clients:
        payload, _ = transmit(algo.broadcast(server, c))
        ups[c.id], _ = transmit(algo.local_update(c, payload))
    algo.aggregate(server, ups)
    n = [len(c.train) + len(c.unlabeled) for c in clients]
    assert server.state["used"]["w"] == {0: n[0] / sum(n), 1: n[1] / sum(n)}


def test_no_hook_is_left_on_the_model_after_a_local_update(fed):
    algo, server, clients = make(fed)
    algo.set_round(0)
    for c in clients:
        payload, _ = transmit(algo.broadcast(server, c))
        algo.local_update(c, payload)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in algo.model.modules())


def test_the_hooks_perturb_only_inside_a_perturbed_forward():
    """Perturbed: a direct call of the model while the hooks are registered is the clean
    model, before and after a perturbed pass."""
    import models
    torch.manual_seed(0)
    model = models.build("cnn", 4)
    model.train()
    hooks = fgasl.Perturbed(model, fgasl.PIA_STAGES["cnn"], fgasl.HEAD_AT["cnn"], 0.5)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first = model(x)
        clean, _ = hooks.forward(x)
        assert torch.equal(first, clean) and torch.equal(model(x), clean)
        perturbed, _ = hooks.forward(x, perturb=True)
        assert not torch.equal(perturbed, clean)
        assert torch.equal(model(x), clean)
    hooks.remove()


def test_train_scales_its_steps(fed):
    """steps_scale (the core's hook for a loop over several clients' data) multiplies I,
    and T_max = R I follows: 2 steps scaled by 2 are the same round as 4 steps."""
    taus = []
    for steps, scale in ((2, 2), (4, 1)):
        algo, server, clients = make(fed, cfg_kw=dict(local_steps=steps))
        algo.set_round(1)
        algo.load_model(server.weights, {})
        assert algo.train(clients[0], {}, steps_scale=scale) == 4
        taus.append(clients[0].state["tau"])
    assert taus[0] == taus[1] > 0


def test_one_training_client_aggregates_to_its_own_model():
    """A fold of a two-client federation leaves one training client: the aggregate is its
    model (weight 1), every tensor."""
    fed = small_fed(clients=2)
    fed.holdout, fed.clients = fed.clients[1:], fed.clients[:1]
    algo, server, clients = make(fed)
    algo.set_round(0)
    payload, _ = transmit(algo.broadcast(server, clients[0]))
    up, _ = transmit(algo.local_update(clients[0], payload))
    algo.aggregate(server, {0: up})
    for key, v in up["w"].items():
        torch.testing.assert_close(server.weights[key], v)
    assert server.state["used"]["w"] == {0: 1.0}
