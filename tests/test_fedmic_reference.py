"""FedMIC reference step: one whole round recomputed in plain torch INSIDE THIS FILE from
../shared/methods/fedmic.md, without calling any helper of algorithms/fedmic.py, and
compared with what the hooks produce when driven as the loop drives them (broadcast ->
transmit -> local_update -> transmit -> aggregate -> predict), at float-rounding tolerance.

Recomputed, for each of two clients (sheet section 3, the labels of fedmic.py's docstring):
  (C1) S_k <- S-bar = the common initialisation (first contact: sent dense);
  (C2) two local steps, each on the flip-augmented minibatch of the (seed, "batches", 0, k)
       stream: teacher (ResNet-18, d_T = 512) and student (small CNN, d_S = 128) forward,
       pooled penultimate features H_T, H_S, the adapter A_k = Linear(128, 512);
       (4a) the class-weighted CE of each (alpha_c = N / N_c on the pooled training
       labels), D = L_T^task + L_S^task detached; (4b) KL(p_S || p_T) / D and
       KL(p_T || p_S) / D, 'batchmean', first argument detached; (4c) MSE(H_T, A(H_S)) / D
       into the teacher and into the student and adapter; (4d) one SGD step (momentum,
       weight decay) on L_T + L_S over every parameter of the three models; BN in train
       mode (the student's BN layers private: --bn local);
  (C3)/(C4) dW = S_k - S-bar; each matrix (conv kernels as out x in*k*k) by SVD with the
       smallest r reaching T(0) = T_start + (T_end - T_start) / R of the energy (sent dense
       when r (m + n + 1) >= m n), 1-D tensors dense;
Server: (REC) U diag(s) V^T, (AVG) the mean with weights 1 (uniform) or n_k (samples),
  (S3) re-compressed with T(0), S-bar <- S-bar + U diag(s) V^T; the next round's broadcast
  carries that update.
Prediction: softmax of the client's teacher (view personal) and of S-bar with the client's
  BN layers (view global), eval mode.
The optimiser is SGD here (the recipe's Adam divides by sqrt(v), which turns last-bit
differences of near-zero gradients into visible ones across CPUs); that the recipe's Adam
covers the three models with one lr is checked in test_fedmic.py. The rank decisions are
asserted to lie more than 1e-6 (relative energy) from the threshold, so float rounding
cannot flip one on any CPU.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import datasets
import fedmed
import models
from fedmed import Config, ServerState, transmit
from helpers import weak_view

import algorithms  # noqa: E402 - the methods register themselves

algorithms.load_all()

SEED, B, STEPS, LR, MOM, WD, R = 0, 8, 2, 0.05, 0.9, 1e-3, 2
T_START, T_END = 0.5, 0.7
T0 = T_START + (T_END - T_START) / R                  # (SCH), t = 0


@pytest.fixture(scope="module")
def fed():
    return datasets.make_synthetic(seed=0, clients=2, image_size=16)


def resnet_features(m, x):
    """ResNet-18's pooled penultimate features, layer by layer."""
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
    return torch.flatten(m.avgpool(x), 1)


def alpha_of(fed):
    y = np.concatenate([fed.y.numpy()[c.train] for c in fed.clients])
    counts = np.bincount(y, minlength=fed.num_classes).astype(np.float64)
    return torch.tensor(np.where(counts > 0, counts.sum() / np.maximum(counts, 1), 0.0),
                        dtype=torch.float32)


def svd_hand(dW, T):
    """(SVD) by hand: (reconstruction, r); r = None for a 1-D tensor."""
    if dW.dim() < 2:
        return dW, None
    m = dW.shape[0]
    M = dW.reshape(m, -1).double()
    n = M.shape[1]
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    e = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    r = next(i + 1 for i in range(len(e)) if e[i] >= T)
    assert abs(float(e[r - 1]) - T) > 1e-6 and (r == 1 or abs(float(e[r - 2]) - T) > 1e-6)
    if r * (m + n + 1) >= m * n:
        return dW, r
    Uf, sf, Vf = U[:, :r].float(), s[:r].float(), Vh[:r].float()
    return (Uf @ torch.diag(sf) @ Vf).reshape(dW.shape), r


def rec_of(entry, like):
    """The receiver's view of one payload entry, by hand: U diag(s) V^T or the dense one."""
    if "dense" in entry:
        return entry["dense"]
    return (entry["U"] @ torch.diag(entry["s"]) @ entry["V"]).reshape(like.shape)


def is_bn(k):
    # the SmallCNN's BN layers are features.1, .5, .9
    return k.startswith("features.") and int(k.split(".")[1]) % 4 == 1


def reference_client(fed, k, alpha):
    with fedmed.seeded(SEED, "teacher-init"):
        teacher = models.build("resnet18", fed.num_classes)
    with fedmed.seeded(SEED, "init"):
        student = models.build("cnn", fed.num_classes)
    with fedmed.seeded(SEED, "adapter-init"):
        adapter = nn.Linear(128, 512)
    S0 = {n: v.clone() for n, v in student.state_dict().items()}
    c = fed.clients[k]
    gen = fedmed.torch_rng(SEED, "batches", 0, k)
    train = torch.as_tensor(c.train, dtype=torch.long)
    perm = train[torch.randperm(len(train), generator=gen)]
    params = list(teacher.parameters()) + list(student.parameters()) + list(adapter.parameters())
    opt = torch.optim.SGD(params, lr=LR, momentum=MOM, weight_decay=WD)
    teacher.train(), student.train(), adapter.train()
    for s in range(STEPS):
        idx = perm[s * B:(s + 1) * B]
        x, y = weak_view(fed, idx, gen), fed.y[idx]
        HT = resnet_features(teacher, x)
        zT = teacher.fc(HT)
        HS = student.features(x).mean(dim=(2, 3))
        zS = student.classifier(HS)
        tT, tS = F.cross_entropy(zT, y, weight=alpha), F.cross_entropy(zS, y, weight=alpha)   # (4a)
        D = (tT + tS).detach()
        lpT, lpS = F.log_softmax(zT, 1), F.log_softmax(zS, 1)
        pT, pS = lpT.exp().detach(), lpS.exp().detach()
        kl_T = (pS * (pS.log() - lpT)).sum(1).mean()              # KL(p_S || p_T)  (4b)
        kl_S = (pT * (pT.log() - lpS)).sum(1).mean()              # KL(p_T || p_S)
        A = adapter(HS)
        Lh_T = ((HT - A.detach()) ** 2).mean()                    # (4c)
        Lh_S = ((HT.detach() - A) ** 2).mean()
        L = (tT + kl_T / D + Lh_T / D) + (tS + kl_S / D + Lh_S / D)   # (4d)
        opt.zero_grad()
        L.backward()
        opt.step()
    S1 = student.state_dict()
    shared = [n for n in S0 if not is_bn(n)]
    dW = {n: S1[n] - S0[n] for n in shared}                       # (C3)
    sent = {n: svd_hand(v, T0) for n, v in dW.items()}            # (C4)
    return {"teacher": teacher, "adapter": adapter, "student": student, "S0": S0, "dW": dW,
            "sent": sent, "private": {n: v.clone() for n, v in S1.items() if is_bn(n)}}


@pytest.mark.parametrize("weighting", ["uniform", "samples"])
def test_one_round_equals_the_sheet_recomputed_by_hand(fed, weighting):
    cfg = Config(algo="fedmic", model="cnn", rounds=R, local_steps=STEPS, batch_size=B, seed=SEED,
                 optimizer="sgd", lr=LR, momentum=MOM, weight_decay=WD, bn="local",
                 weighting=weighting)
    Args = fedmed.ALGORITHMS["fedmic"].Args
    algo = fedmed.ALGORITHMS["fedmic"](cfg, Args(teacher_model="resnet18", energy_start=T_START,
                                                  energy_end=T_END), fed)
    clients, server = fedmed.make_clients(fed), ServerState()
    algo.setup(server, clients)
    algo.set_round(0)
    alpha = alpha_of(fed)
    algo.predict(server, clients[0], clients[0].test[:4])        # leaves the teacher in eval
    uploads, refs = {}, []
    for k, c in enumerate(clients):
        payload, _ = transmit(algo.broadcast(server, c))
        for n, v in payload["student"].items():                   # (C1) first contact: S-bar
            assert torch.equal(v, server.weights[n])
        uploads[k], _ = transmit(algo.local_update(c, payload))
        ref = reference_client(fed, k, alpha)
        refs.append(ref)
        for n, v in ref["teacher"].state_dict().items():          # the private teacher
            assert torch.allclose(c.state["teacher"][n].float(), v.float(), rtol=1e-4, atol=1e-5), n
        for n, v in ref["adapter"].state_dict().items():
            assert torch.allclose(c.state["adapter"][n], v, rtol=1e-4, atol=1e-5), n
        for n, v in ref["private"].items():                       # the student's BN layers
            assert torch.allclose(c.state["private"][n].float(), v.float(), rtol=1e-4, atol=1e-5), n
        up = uploads[k]["update"]
        assert set(up) == set(ref["sent"])
        for n, (want, r) in ref["sent"].items():                  # (C4) what travels
            got = rec_of(up[n], want)
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), n
            if r is not None:
                assert c.state["ranks_up"]["ranks"][n] == r, n
                if "U" in up[n]:
                    assert up[n]["s"].numel() == r
        assert any("U" in e for e in up.values())
        assert uploads[k]["n"] == c.n
    algo.aggregate(server, uploads)
    w = [1.0, 1.0] if weighting == "uniform" else [float(c.n) for c in clients]
    ranks_down = {}
    for n in refs[0]["sent"]:
        avg = sum(wk * ref["sent"][n][0].double() for wk, ref in zip(w, refs)) / sum(w)   # (AVG)
        rec, r = svd_hand(avg.float(), T0)                        # (S3)
        want = refs[0]["S0"][n] + rec
        assert torch.allclose(server.weights[n], want, rtol=1e-4, atol=1e-5), n
        if r is not None:
            ranks_down[n] = r
    assert server.state["ranks_down"]["ranks"] == ranks_down
    algo.set_round(1)                                             # the broadcast of round 0
    payload, _ = transmit(algo.broadcast(server, clients[0]))
    assert len(payload["updates"]) == 1
    for n, v in payload["updates"][0].items():
        assert torch.allclose(refs[0]["S0"][n] + rec_of(v, refs[0]["S0"][n]), server.weights[n],
                              rtol=1e-4, atol=1e-5)
    # prediction: the teacher (personal) and S-bar with the client's BN (global)
    c = clients[0]
    x = weak_view(fed, c.test)
    ref = refs[0]
    ref["teacher"].eval()
    with torch.no_grad():
        p_T = F.softmax(ref["teacher"](x), 1).numpy()
        student = ref["student"]
        student.load_state_dict({**{n: server.weights[n] for n in ref["sent"]}, **ref["private"]})
        student.eval()
        p_S = F.softmax(student(x), 1).numpy()
    out = algo.predict(server, c, c.test)
    assert np.allclose(out["personal"], p_T, atol=1e-5)
    assert np.allclose(out["global"], p_S, atol=1e-5)
