"""FGASL's semi-supervised baselines (fgasl.md section 8): FedAvg + FixMatch
(algorithms/fixmatch.py) and FedAvg + Mean Teacher (algorithms/meanteacher.py). Reference
steps: one client's local update of I = 2 iterations recomputed in plain torch from the
equations of each module's docstring (FM-1..3, MT-1..3), with the views of
test_fgasl_reference.py (the same streams: batches, unlabeled, augment), compared with
local_update driven as the loop drives it; then the FedAvg aggregate with n_k =
labelled + unlabelled images."""
import copy

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
