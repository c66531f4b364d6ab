"""FGASL's semi-supervised baselines (fgasl.md section 8): FedAvg + FixMatch
(algorithms/fixmatch.py) and FedAvg + Mean Teacher (algorithms/meanteacher.py). Reference
steps: one client's local update of I = 2 iterations recomputed in plain torch from the
equations of each module's docstring (FM-1..3, MT-1..3), with the views of
test_fgasl_reference.py (the same streams: batches, unlabeled, augment), compared with
local_update driven as the loop drives it; then the FedAvg aggregate with n_k =
labelled + unlabelled images."""
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets
import fedmed
import models
import run
from fedmed import Config, ServerState, transmit
from helpers import one_line_error
from test_fgasl_reference import MEAN, STD, flip_by_hand, strong_by_hand

import algorithms  # noqa: E402

algorithms.load_all()
from algorithms import fixmatch, meanteacher  # noqa: E402

SEED, B, BU, I, R, r, LR, MOM = 0, 8, 6, 2, 3, 1, 0.05, 0.9


@pytest.fixture(scope="module")
def fed():
    ns = datasets.namespace(dataset="synthetic", clients=2, image_size=16, unlabeled_fraction=0.6)
    return datasets.load(ns, seed=SEED)


def drive(fed, algo_name, args):
    cfg = Config(algo=algo_name, rounds=R, local_steps=I, batch_size=B, optimizer="sgd", lr=LR,
                 momentum=MOM, model="cnn", seed=SEED, class_weights="none")
    algo = fedmed.ALGORITHMS[algo_name](cfg, args, fed)
    server, clients = ServerState(), fedmed.make_clients(fed)
    algo.attach([], True)
    algo.setup(server, clients)
    theta_g = {k: v.clone() for k, v in server.weights.items()}
    algo.set_round(r)
    ups = {}
    for c in clients:
        payload, _ = transmit(algo.broadcast(server, c))
        ups[c.id], _ = transmit(algo.local_update(c, payload))
    algo.aggregate(server, ups)
    return algo, server, clients, theta_g, ups


def views(fed, k):
    c = fed.clients[k]
    gen = fedmed.torch_rng(SEED, "batches", r, k)
    gen_u = fedmed.torch_rng(SEED, "unlabeled", r, k)
    gen_aug = fedmed.torch_rng(SEED, "augment", r, k)
    train, unl = torch.as_tensor(c.train), torch.as_tensor(c.unlabeled)
    perm_l = train[torch.randperm(len(train), generator=gen)]
    perm_u = unl[torch.randperm(len(unl), generator=gen_u)]
    for i in range(I):
        il, iu = perm_l[i * B:(i + 1) * B], perm_u[i * BU:(i + 1) * BU]
        x_l = flip_by_hand(fed.x[il].float() / 255, gen_aug)
        w_u = flip_by_hand(fed.x[iu].float() / 255, gen_aug)
        s_u = strong_by_hand(w_u, gen_aug)
        yield il, iu, *((v - MEAN) / STD for v in (x_l, w_u, s_u))


def check(fed, ups, server, refs):
    for k, w in enumerate(refs):
        for key, want in w.items():
            if want.is_floating_point():
                torch.testing.assert_close(ups[k]["w"][key], want, rtol=1e-4, atol=2e-5)
    n = [len(c.train) + len(c.unlabeled) for c in fed.clients]
    assert [ups[k]["n"] for k in range(2)] == n
    for key, want in refs[0].items():
        if want.is_floating_point():
            avg = (n[0] * refs[0][key].double() + n[1] * refs[1][key].double()) / sum(n)
            torch.testing.assert_close(server.weights[key].double(), avg, rtol=1e-4, atol=2e-5)


def test_fixmatch_local_update_and_aggregate(fed):
    """(FM-1) pseudo label from the weak view of the same forward (train mode, one
    batch [x^l, weak x^u, strong x^u]), (FM-2) masked CE over |B_u|, (FM-3) l_s + lambda_u
    l_u, SGD; the FedAvg aggregate; the mask both accepts and rejects here."""
    TAU, LAM = 0.25, 2.0
    algo, server, clients, theta_g, ups = drive(
        fed, "fixmatch", fixmatch.Args(confidence=TAU, lambda_u=LAM, unlabeled_batch=BU))
    refs, accepted = [], 0
    for k in range(2):
        model = models.build("cnn", fed.num_classes)
        model.load_state_dict(theta_g)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM)
        with fedmed.seeded(SEED, "local", r, k):
            for il, iu, x_l, w_u, s_u in views(fed, k):
                model.train()
                z = model(torch.cat([x_l, w_u, s_u]))
                z_l, z_w, z_s = z[:B], z[B:B + BU], z[B + BU:]
                q = F.softmax(z_w.detach(), 1)
                conf, y_hat = q.max(1)
                mask = (conf >= TAU).float()
                accepted += int(mask.sum())
                L = F.cross_entropy(z_l, fed.y[il]) + LAM * (
                    mask * F.cross_entropy(z_s, y_hat, reduction="none")).sum() / BU
                opt.zero_grad()
                L.backward()
                opt.step()
        refs.append(model.state_dict())
    assert 0 < accepted < 2 * I * BU, accepted
    assert sum(c.state["pl"]["accepted"] for c in clients) == accepted
    check(fed, ups, server, refs)


def test_mean_teacher_local_update_and_aggregate(fed):
    """(MT-1) l_s + w(t) lambda_c MSE(softmax student(strong), softmax teacher(weak)),
    teacher in eval mode without gradient, (MT-2) the sigmoid ramp-up at t = r I + i over
    T_r = rampup R I, SGD, (MT-3) the teacher's EMA after each step (it changes the
    second step's targets); the FedAvg aggregate."""
    DEC, LAM, RAMP = 0.5, 3.0, 0.8
    algo, server, clients, theta_g, ups = drive(
        fed, "meanteacher", meanteacher.Args(mt_decay=DEC, lambda_c=LAM, rampup=RAMP,
                                             unlabeled_batch=BU))
    refs = []
    for k in range(2):
        model = models.build("cnn", fed.num_classes)
        model.load_state_dict(theta_g)
        teacher = copy.deepcopy(model)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM)
        with fedmed.seeded(SEED, "local", r, k):
            for i, (il, iu, x_l, w_u, s_u) in enumerate(views(fed, k)):
                teacher.eval()
                with torch.no_grad():
                    p_t = F.softmax(teacher(w_u), 1)
                model.train()
                z = model(torch.cat([x_l, s_u]))
                t, T_r = r * I + i, RAMP * R * I
                w = np.exp(-5 * (1 - min(t / T_r, 1)) ** 2)
                L = F.cross_entropy(z[:B], fed.y[il]) + w * LAM * (
                    (F.softmax(z[B:], 1) - p_t) ** 2).mean()
                opt.zero_grad()
                L.backward()
                opt.step()
                with torch.no_grad():
                    for pt, ps in zip(teacher.parameters(), model.parameters()):
                        pt.copy_(DEC * pt + (1 - DEC) * ps)
                    for bt, bs in zip(teacher.buffers(), model.buffers()):
                        bt.copy_(bs)
        refs.append(model.state_dict())
    check(fed, ups, server, refs)


def test_rampup_weight_end_points():
    """(MT-2): w(0) = exp(-5), w(T_r) = 1 and stays 1 after, no ramp-up: 1."""
    assert abs(meanteacher.rampup_weight(0, 10) - np.exp(-5)) < 1e-15
    assert meanteacher.rampup_weight(10, 10) == 1.0 == meanteacher.rampup_weight(30, 10)
    assert abs(meanteacher.rampup_weight(5, 10) - np.exp(-5 * 0.25)) < 1e-15
    assert meanteacher.rampup_weight(0, 0) == 1.0


@pytest.mark.parametrize("algo,flags,needle", [
    ("fixmatch", ["--confidence", "1.5"], "--confidence"),
    ("fixmatch", ["--unlabeled-batch", "1"], "--unlabeled-batch"),
    ("meanteacher", ["--mt-decay", "2"], "--mt-decay"),
    ("meanteacher", ["--unlabeled-fraction", "0"], "has no unlabelled image"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, algo, flags, needle):
    out = str(tmp_path / "x")
    argv = ["--algo", algo, "--unlabeled-fraction", "0.6", "--image-size", "16", "--rounds", "1",
            "--quiet", "--out", out] + flags
    if "--unlabeled-fraction" in flags:
        argv = argv[:2] + argv[4:]
    one_line_error(capsys, run.main(argv), needle, out=out)


# ---------------------------------------------------------------- the pieces around the step

def make(fed, algo_name, args, **cfg_kw):
    cfg = Config(**{"algo": algo_name, "rounds": R, "local_steps": I, "batch_size": B,
                    "optimizer": "sgd", "lr": LR, "momentum": MOM, "model": "cnn", "seed": SEED,
                    "class_weights": "none", **cfg_kw})
    algo = fedmed.ALGORITHMS[algo_name](cfg, args, fed)
    server, clients = ServerState(), fedmed.make_clients(fed)
    algo.attach([], True)
    algo.setup(server, clients)
    algo.set_round(r)
    return algo, server, clients


def test_defaults_are_the_papers_and_the_documented_ones():
    """FixMatch: tau 0.95, lambda_u 1 [paper], the unlabelled batch = --batch-size;
    Mean Teacher: a 0.99 [paper], lambda_c 1 and a ramp-up over 25% [ours]."""
    assert (fixmatch.Args().confidence, fixmatch.Args().lambda_u,
            fixmatch.Args().unlabeled_batch) == (0.95, 1.0, 0)
    a = meanteacher.Args()
    assert (a.mt_decay, a.lambda_c, a.rampup, a.unlabeled_batch) == (0.99, 1.0, 0.25, 0)


@pytest.mark.parametrize("algo_name,kw,ok", [
    ("fixmatch", dict(confidence=0.0), True), ("fixmatch", dict(confidence=1.0), True),
    ("fixmatch", dict(lambda_u=0.0), True), ("fixmatch", dict(confidence=-0.01), False),
    ("fixmatch", dict(confidence=1.01), False), ("fixmatch", dict(lambda_u=-0.1), False),
    ("fixmatch", dict(unlabeled_batch=2), True), ("fixmatch", dict(unlabeled_batch=1), False),
    ("fixmatch", dict(unlabeled_batch=-2), False),
    ("meanteacher", dict(mt_decay=0.0), True), ("meanteacher", dict(mt_decay=1.0), True),
    ("meanteacher", dict(rampup=0.0), True), ("meanteacher", dict(rampup=1.0), True),
    ("meanteacher", dict(lambda_c=0.0), True), ("meanteacher", dict(mt_decay=1.01), False),
    ("meanteacher", dict(mt_decay=-0.01), False), ("meanteacher", dict(rampup=1.01), False),
    ("meanteacher", dict(rampup=-0.01), False), ("meanteacher", dict(lambda_c=-1.0), False),
])
def test_the_ranges_of_the_settings_and_their_edges(fed, algo_name, kw, ok):
    mod = {"fixmatch": fixmatch, "meanteacher": meanteacher}[algo_name]
    build = lambda: make(fed, algo_name, mod.Args(**kw))  # noqa: E731
    if ok:
        build()
    else:
        with pytest.raises(fedmed.UsageError):
            build()


def test_one_labelled_image_at_a_client_is_enough(fed):
    """A client with a single labelled image trains (none is refused)."""
    one = [datasets.ClientSplit(c.name, c.train[:1] if k == 0 else c.train, c.test, c.unlabeled,
                                c.label_set) for k, c in enumerate(fed.clients)]
    make(dataclasses.replace(fed, clients=one), "fixmatch", fixmatch.Args())
    none = [datasets.ClientSplit(c.name, c.train[:0] if k == 0 else c.train, c.test, c.unlabeled,
                                 c.label_set) for k, c in enumerate(fed.clients)]
    with pytest.raises(fedmed.UsageError, match="no labelled training image"):
        make(dataclasses.replace(fed, clients=none), "fixmatch", fixmatch.Args())


@pytest.mark.parametrize("algo_name", ["fixmatch", "meanteacher"])
def test_pseudo_label_counts_and_the_metric_line(fed, algo_name):
    """After a local update: |B_u| seen per step, the accepted ones (FixMatch: conf >=
    tau; Mean Teacher: all) and how many of those match the hidden label, recomputed from
    the weak views of the same step; the metric line's pl_seen / pl_accept / pl_acc; no
    diagnostic label left in the client's state; nothing for a held-out client or for a
    round the client did not train."""
    TAU = 0.25
    args = (fixmatch.Args(confidence=TAU, unlabeled_batch=BU) if algo_name == "fixmatch"
            else meanteacher.Args(unlabeled_batch=BU))
    algo, server, clients = make(fed, algo_name, args)
    seen = {}
    real = algo.unlabelled_loss

    def spy(x_l, w_u, s_u, t, T_max, stats):
        before = dict(stats)
        out = real(x_l, w_u, s_u, t, T_max, stats)
        seen.setdefault("steps", []).append({k: stats[k] - before[k] for k in
                                             ("seen", "accepted", "correct")})
        with torch.no_grad():
            net = algo.model if algo_name == "fixmatch" else algo.teacher
            was = net.training
            if algo_name == "fixmatch":       # the weak part of the same train-mode forward
                z = net(torch.cat([x_l, w_u, s_u])).float()[len(x_l):len(x_l) + len(w_u)]
            else:
                z = net(w_u).float()
            net.train(was)
            conf, y_hat = F.softmax(z, 1).max(1)
            acc = conf >= TAU if algo_name == "fixmatch" else torch.ones_like(conf, dtype=torch.bool)
            seen["steps"][-1]["want"] = (len(w_u), int(acc.sum()),
                                         int(((y_hat == stats["truth"]) & acc).sum()))
        return out
    algo.unlabelled_loss = spy
    c = clients[0]
    algo.local_update(c, transmit(algo.broadcast(server, c))[0])
    steps = seen["steps"]
    assert len(steps) == I
    for s in steps:
        assert (s["seen"], s["accepted"], s["correct"]) == s["want"], s
    pl = c.state["pl"]
    assert set(pl) == {"seen", "accepted", "correct", "round"} and pl["round"] == r
    tot = {k: sum(s[k] for s in steps) for k in ("seen", "accepted", "correct")}
    assert {k: pl[k] for k in tot} == tot and tot["seen"] == I * BU
    if algo_name == "meanteacher":
        assert tot["accepted"] == tot["seen"]
    else:
        assert 0 < tot["accepted"] < tot["seen"], tot
    line = algo.line_extra(server, c)
    assert line["pl_seen"] == I * BU
    assert line["pl_accept"] == tot["accepted"] / tot["seen"]
    assert line["pl_acc"] == tot["correct"] / tot["accepted"]
    held = fedmed.ClientState(-1, "held", c.train, c.test)
    held.state = dict(c.state)
    assert algo.line_extra(server, held) == {}
    algo.set_round(r + 1)
    assert algo.line_extra(server, c) == {}
    algo.set_round(r)
    c.state["pl"] = dict(pl, accepted=0, correct=0)
    assert algo.line_extra(server, c)["pl_acc"] is None
    c.state["pl"] = dict(pl, seen=1, accepted=1, correct=1)        # (--batch-size 1, 1 step)
    assert algo.line_extra(server, c)["pl_accept"] == 1.0


def test_fixmatch_accepts_a_confidence_equal_to_the_threshold(fed):
    """(FM-2) 1[max q >= tau]: with all-zero logits every q_i = 1/C, and tau = 1/C
    accepts them all."""
    C = fed.num_classes
    tau = float(F.softmax(torch.zeros(1, C), 1)[0, 0])
    algo, server, clients = make(fed, "fixmatch", fixmatch.Args(confidence=tau))
    algo.model = lambda x: torch.zeros(len(x), C, requires_grad=True)
    stats = {"seen": 0, "accepted": 0, "correct": 0, "truth": torch.zeros(BU, dtype=torch.long)}
    x = torch.zeros(BU, 3, 16, 16)
    _, l_u = algo.unlabelled_loss(x[:2], x, x, 0, 1, stats)
    assert stats["accepted"] == BU and stats["correct"] == BU     # argmax of ties: class 0
    assert abs(float(l_u.detach()) - math.log(C)) < 1e-6                   # CE of uniform logits


@pytest.mark.parametrize("algo_name", ["fixmatch", "meanteacher"])
def test_a_non_finite_loss_stops_the_run(fed, algo_name):
    """A NaN in the broadcast weights makes the loss NaN: Diverged, naming the client."""
    mod = {"fixmatch": fixmatch, "meanteacher": meanteacher}[algo_name]
    algo, server, clients = make(fed, algo_name, mod.Args())
    payload = transmit(algo.broadcast(server, clients[0]))[0]
    key = next(k for k, v in payload["w"].items() if v.is_floating_point() and "weight" in k)
    payload["w"][key] = payload["w"][key].clone().fill_(float("nan"))
    with pytest.raises(fedmed.Diverged, match=clients[0].name):
        algo.local_update(clients[0], payload)


@pytest.mark.parametrize("epochs,scale", [(0, 1), (2, 1), (0, 2), (2, 2)])
def test_steps_and_the_ramp_up_schedule(fed, monkeypatch, epochs, scale):
    """I = --local-steps x steps_scale, or --local-epochs x ceil(|L_k| / B) (the core's
    contract for train: the scale multiplies steps, not epochs): train returns I steps,
    and Mean Teacher's ramp-up reads t = r I + i over T_r = rampup R I (before the fix
    the scale also multiplied the epochs' I, so T_r disagreed with the steps taken)."""
    calls = []
    monkeypatch.setattr(meanteacher, "rampup_weight",
                        lambda t, T_r: calls.append((t, T_r)) or 1.0)
    kw = dict(local_steps=0, local_epochs=epochs) if epochs else {}
    algo, server, clients = make(fed, "meanteacher", meanteacher.Args(rampup=0.5), **kw)
    c = clients[1]
    want = I * scale if not epochs else epochs * math.ceil(len(c.train) / B)
    algo.load_model(transmit(algo.broadcast(server, c))[0]["w"], {})
    assert algo.train(c, {}, steps_scale=scale) == want
    assert calls == [(r * want + i, 0.5 * R * want) for i in range(want)]
    assert c.state["pl"]["seen"] == want * B


def test_the_local_step_trains_whatever_mode_the_model_was_left_in(fed):
    """An evaluation leaves the model in eval mode; the local step runs in train mode
    (BN batch statistics): the same update either way."""
    def update(pre_eval):
        algo, server, clients = make(fed, "fixmatch", fixmatch.Args(confidence=0.25))
        if pre_eval:
            algo.model.eval()
        return algo.local_update(clients[0], transmit(algo.broadcast(server, clients[0]))[0])
    a, b = update(False), update(True)
    assert all(torch.equal(a["w"][k], b["w"][k]) for k in a["w"])


def test_mean_teachers_teacher_is_frozen_and_the_ramp_up_of_a_short_schedule():
    """The teacher is never trained by gradients (only the EMA moves it); (MT-2) with a
    ramp-up of less than one iteration still starts at exp(-5)."""
    ns = datasets.namespace(dataset="synthetic", clients=2, image_size=16, unlabeled_fraction=0.6)
    algo, _, _ = make(datasets.load(ns, seed=SEED), "meanteacher", meanteacher.Args())
    assert not any(p.requires_grad for p in algo.teacher.parameters())
    assert abs(meanteacher.rampup_weight(0, 0.5) - np.exp(-5)) < 1e-15
