"""FedMIC (algorithms/fedmic.py): the tests of ../shared/methods/fedmic.md section 11, the
command line, bad input, and the extension. The reference step (one whole local update
and one aggregation recomputed in plain torch) is tests/test_fedmic_reference.py.

Sheet section 11:
  1. rank selection: r minimal with cumulative energy >= T, ||rec||_F^2 >= T ||dW||_F^2,
     T = 1 exact, a zero matrix r = 0 and an exact zero (SVD);
  2. exact recovery of a rank-3 matrix (3, 2, 1) at T = 0.999; the conv reshape round trip;
  3. the schedule's end points and monotonicity (SCH);
  4. the byte count: 4 sum r (m + n + 1) + dense bytes, against the transmitted bytes;
  5. mutual KD: zero at equal logits (and features), the formula on toy logits (4b, 4c),
     the detached-denominator gradient;
  6. no teacher or adapter tensor in any payload;
  7. students bit-identical after every round, full and partial participation (C1).
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets
import fedmed
import run
from fedmed import Config, ServerState, transmit
from helpers import one_line_error

import algorithms  # noqa: E402 - the methods register themselves
from algorithms import fedmic

algorithms.load_all()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fed():
    return datasets.make_synthetic(seed=0, clients=4, image_size=16)


def cfg_of(**kw):
    return Config(**{"algo": "fedmic", "model": "cnn", "rounds": 3, "local_steps": 2,
                     "batch_size": 16, "seed": 0, "optimizer": "adam", "lr": 1e-3,
                     "bn": "local", "weighting": "uniform", **kw})


def make(fed, cfg=None, **kw):
    args = fedmic.Args(**{"teacher_model": "cnn", **kw})
    algo = fedmed.ALGORITHMS["fedmic"](cfg or cfg_of(), args, fed)
    clients, server = fedmed.make_clients(fed), ServerState()
    algo.setup(server, clients)
    return algo, server, clients


def low_rank(m, n, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(sigma), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(sigma), generator=g, dtype=torch.float64))
    return (U * torch.tensor(sigma, dtype=torch.float64)) @ V.T


# ---------------------------------------------------------------- 1, 2: SVD compression

@pytest.mark.parametrize("T", [0.3, 0.5, 0.9, 0.95, 0.98, 0.999])
def test_the_rank_is_the_smallest_reaching_the_energy(T):
    """(SVD): r is minimal with sum_{i<=r} s_i^2 >= T sum s_i^2, and the reconstruction
    keeps at least T of the energy, ||rec||^2 >= T ||dW||^2."""
    for seed in range(3):
        dW = low_rank(40, 30, [0.7 ** i for i in range(20)], seed).float()
        s = torch.linalg.svdvals(dW.double())
        e = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        r = fedmic.energy_rank(s, T)
        assert e[r - 1] >= T - 1e-12 and (r == 1 or e[r - 2] < T)
        entry, r2 = fedmic.compress(dW, T)
        assert r2 == r and "U" in entry and entry["U"].shape == (40, r) and entry["V"].shape == (r, 30)
        rec = fedmic.reconstruct(entry, dW)
        assert (rec.double() ** 2).sum() >= T * (dW.double() ** 2).sum() * (1 - 1e-5)
        assert ((rec - dW).double() ** 2).sum() <= (1 - T) * (dW.double() ** 2).sum() * (1 + 1e-4) + 1e-10


def test_rank_edge_cases_full_energy_and_zero():
    """T = 1 reconstructs exactly (r = the full rank: the factors are no smaller, so dW is
    sent itself); the rank never exceeds len(s) nor drops to 0 (pitfall 2); a zero matrix
    gives r = 0 and an exact zero, no NaN."""
    dW = torch.randn(12, 9, generator=torch.Generator().manual_seed(1))
    entry, r = fedmic.compress(dW, 1.0)
    assert r == 9 and torch.equal(fedmic.reconstruct(entry, dW), dW)
    assert fedmic.energy_rank(torch.tensor([3.0, 2.0, 1.0]), 1.0) == 3
    assert fedmic.energy_rank(torch.tensor([3.0, 0.0, 0.0]), 1.0) == 1
    assert fedmic.energy_rank(torch.tensor([1.0, 1.0]), 0.5) == 1
    assert fedmic.energy_rank(torch.tensor([1.0, 1.0]), 0.51) == 2
    assert fedmic.energy_rank(torch.tensor([2.0, 1.0]), 0.8) == 1          # 4/5 reaches 0.8
    assert fedmic.energy_rank(torch.tensor([2.0]), 0.9) == 1               # a 1 x n matrix
    row = torch.randn(1, 5)
    entry, r = fedmic.compress(row, 0.9)
    assert r == 1 and torch.equal(fedmic.reconstruct(entry, row), row)
    Z = torch.zeros(7, 5)
    assert fedmic.energy_rank(torch.linalg.svdvals(Z), 0.95) == 0
    entry, r = fedmic.compress(Z, 0.95)
    rec = fedmic.reconstruct(entry, Z)
    assert r == 0 and entry["s"].numel() == 0 and torch.equal(rec, Z) and torch.isfinite(rec).all()


def test_factors_as_large_as_the_matrix_are_sent_as_the_matrix():
    """r (m + n + 1) >= m n: the dense dW (2 x 3 at rank 1: 6 numbers either way); one
    rank less and the factors are sent."""
    M = low_rank(2, 3, [1.0]).float()
    entry, r = fedmic.compress(M, 0.9)
    assert r == 1 and torch.equal(entry["dense"], M)
    M = low_rank(2, 4, [1.0]).float()                 # 7 < 8 numbers
    entry, r = fedmic.compress(M, 0.9)
    assert r == 1 and entry["U"].shape == (2, 1)


def test_exact_recovery_of_a_rank_3_matrix_and_the_conv_reshape():
    """Sheet 11.2: singular values (3, 2, 1), T = 0.999: r = 3 and relative error < 1e-5;
    a conv kernel (out, in, kh, kw) is compressed as out x in*kh*kw and comes back in its
    own shape; a 1-D tensor travels dense."""
    M = low_rank(20, 15, [3.0, 2.0, 1.0]).float()
    entry, r = fedmic.compress(M, 0.999)
    rec = fedmic.reconstruct(entry, M)
    assert r == 3 and (rec - M).norm() / M.norm() < 1e-5
    assert torch.allclose(entry["s"], torch.tensor([3.0, 2.0, 1.0]), atol=1e-5)
    K = low_rank(8, 4 * 3 * 3, [2.0, 1.0], seed=2).float().reshape(8, 4, 3, 3)
    assert fedmic.as_matrix(K).shape == (8, 36)
    assert torch.equal(fedmic.as_matrix(K).reshape(K.shape), K)
    entry, r = fedmic.compress(K, 0.999)
    assert r == 2 and entry["U"].shape == (8, 2) and entry["V"].shape == (2, 36)
    rec = fedmic.reconstruct(entry, K)
    assert rec.shape == K.shape and (rec - K).norm() / K.norm() < 1e-5
    b = torch.randn(5)
    entry, r = fedmic.compress(b, 0.5)
    assert r is None and torch.equal(entry["dense"], b)


def test_the_reconstruction_is_U_diag_s_Vt():
    """Pitfall 1: U diag(s) V^T, not a product with the vector of singular values."""
    entry = {"U": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), "s": torch.tensor([2.0, 3.0]),
             "V": torch.tensor([[1.0, 2.0], [0.5, -1.0]])}
    want = torch.tensor([[2.0, 4.0], [1.5, -3.0], [3.5, 1.0]])
    assert torch.equal(fedmic.reconstruct(entry, torch.zeros(3, 2)), want)


# ---------------------------------------------------------------- 3: schedule

def test_the_schedule_end_points():
    """(SCH) T(0) = T_start + (T_end - T_start) / R, T(R - 1) = T_end, non-decreasing."""
    R, a, b = 7, 0.9, 0.99
    T = [fedmic.energy_threshold(t, R, a, b) for t in range(R)]
    assert T[0] == pytest.approx(a + (b - a) / R) and T[-1] == pytest.approx(b)
    assert all(x <= y for x, y in zip(T, T[1:])) and T[0] < T[-1]
    assert fedmic.energy_threshold(2, 4, 0.5, 0.5) == 0.5


def test_the_run_records_its_schedule_and_its_pair(fed):
    algo, _, _ = make(fed, cfg_of(rounds=4), energy_start=0.6, energy_end=0.8)
    assert algo.info["energy"] == pytest.approx([0.65, 0.7, 0.75, 0.8])
    assert (algo.info["teacher"], algo.info["student"], algo.info["d_T"], algo.info["d_S"]) == \
        ("cnn", "cnn", 128, 128) and "extension" not in algo.info
    algo.set_round(2)
    assert algo.energy() == pytest.approx(0.75)


# ---------------------------------------------------------------- 4: bytes

def test_the_byte_count_is_the_formula_of_the_factors():
    """Sheet 11.4: the numbers sent are sum r (m + n + 1) over the factorised matrices plus
    the dense ones; fp32, so 4 bytes each; torch.save adds a bounded overhead per tensor;
    below the dense size when r < m n / (m + n + 1)."""
    mats = {"a": low_rank(64, 288, [1.0, 0.5, 0.25]).float().reshape(64, 32, 3, 3),
            "b": low_rank(30, 40, [2.0, 1.0]).float(), "c": torch.randn(64)}
    payload, ranks = {}, {}
    for k, v in mats.items():
        payload[k], ranks[k] = fedmic.compress(v, 0.99)
    assert ranks["a"] == 3 and ranks["b"] == 2
    numbers = sum(r * (m + n + 1) for r, (m, n) in
                  ((ranks["a"], (64, 288)), (ranks["b"], (30, 40)))) + 64
    tensors = [t for e in payload.values() for t in e.values()]
    assert 4 * sum(t.numel() for t in tensors) == 4 * numbers
    _, nbytes = transmit(payload)
    _, dense = transmit(mats)
    assert 4 * numbers <= nbytes <= 4 * numbers + 600 * len(tensors) + 1000
    assert nbytes < dense


def test_the_upload_bytes_follow_the_ranks_of_the_trace(fed):
    """The real upload of one client: its bytes are 4 (sum over factorised tensors of
    r (m + n + 1), dense ones whole) plus torch.save's overhead, and the trace names the
    rank of every matrix-shaped student tensor."""
    algo, server, clients = make(fed, energy_start=0.5, energy_end=0.5)
    algo.set_round(0)
    payload, _ = transmit(algo.broadcast(server, clients[0]))
    up, nbytes = transmit(algo.local_update(clients[0], payload))
    ranks = clients[0].state["ranks_up"]["ranks"]
    sd = algo.model.state_dict()
    assert set(ranks) == {k for k in algo.sync_keys if sd[k].dim() >= 2}
    numbers = 0
    for k in algo.sync_keys:
        m, n = sd[k].shape[0], sd[k][0].numel()
        if k in ranks and ranks[k] * (m + n + 1) < m * n:
            numbers += ranks[k] * (m + n + 1)
            assert up["update"][k]["U"].shape[1] == ranks[k]
        else:
            numbers += sd[k].numel()
            assert "dense" in up["update"][k]
    assert any("U" in e for e in up["update"].values())
    tensors = sum(len(e) for e in up["update"].values())
    assert 4 * numbers < nbytes <= 4 * numbers + 600 * tensors + 1000


# ---------------------------------------------------------------- 5: mutual KD

def test_kd_is_zero_at_equal_logits_and_features():
    zT = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    H = torch.randn(5, 6)
    tT, tS = torch.tensor(0.7), torch.tensor(1.3)
    L_T, L_S = fedmic.kd_losses(zT, zT.clone(), H, H.clone(), tT, tS)
    assert torch.allclose(L_T, tT, atol=1e-7) and torch.allclose(L_S, tS, atol=1e-7)


@pytest.mark.parametrize("compat", [False, True])
def test_kd_matches_its_formula_on_toy_logits(compat):
    """(4b)-(4d) by hand: KL(p_S||p_T) = 1/B sum_i sum_c p_S log(p_S / p_T) ('batchmean';
    compat: 1/(B C)), divided by D = L_T^task + L_S^task; L^h = MSE / D."""
    g = torch.Generator().manual_seed(3)
    zT, zS = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    HT, AHS = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    tT, tS = torch.tensor(0.4), torch.tensor(0.9)
    pT, pS = zT.softmax(1), zS.softmax(1)
    div = 4 * 3 if compat else 4
    kl_ST = (pS * (pS.log() - pT.log())).sum() / div
    kl_TS = (pT * (pT.log() - pS.log())).sum() / div
    mse = ((HT - AHS) ** 2).mean()
    D = tT + tS
    L_T, L_S = fedmic.kd_losses(zT, zS, HT, AHS, tT, tS, **({"compat": True} if compat else {}))
    assert torch.allclose(L_T, tT + kl_ST / D + mse / D, atol=1e-6)
    assert torch.allclose(L_S, tS + kl_TS / D + mse / D, atol=1e-6)


def test_each_term_updates_only_its_own_model():
    """The KL's first argument and the other side of the MSE are detached: L_T's
    distillation reaches only the teacher's logits / features, L_S's only the student's
    and the adapter's."""
    g = torch.Generator().manual_seed(4)
    zT, zS = torch.randn(4, 3, generator=g, requires_grad=True), torch.randn(4, 3, generator=g, requires_grad=True)
    HT, AHS = torch.randn(4, 5, generator=g, requires_grad=True), torch.randn(4, 5, generator=g, requires_grad=True)
    L_T, L_S = fedmic.kd_losses(zT, zS, HT, AHS, torch.tensor(0.5), torch.tensor(0.5))
    gT = torch.autograd.grad(L_T, [zT, zS, HT, AHS], allow_unused=True)
    gS = torch.autograd.grad(L_S, [zT, zS, HT, AHS], allow_unused=True)
    assert gT[1] is None and gT[3] is None and gT[0].abs().sum() > 0 and gT[2].abs().sum() > 0
    assert gS[0] is None and gS[2] is None and gS[1].abs().sum() > 0 and gS[3].abs().sum() > 0


def test_the_detached_denominator_gradient():
    """Sheet 11.5: with the denominators detached, autograd equals the gradient with D
    replaced by a constant of the same value; the code's form (--attached-denominator)
    differs (the distillation pushes the task losses up through D)."""
    g = torch.Generator().manual_seed(5)
    y = torch.tensor([0, 2, 1, 2])
    zT0, zS0 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    HT0, AHS0 = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)

    def grads(attached, constant=False):
        zT, zS = zT0.clone().requires_grad_(), zS0.clone().requires_grad_()
        HT, AHS = HT0.clone().requires_grad_(), AHS0.clone().requires_grad_()
        tT, tS = F.cross_entropy(zT, y), F.cross_entropy(zS, y)
        if constant:                                  # D by hand, a constant
            D = float((tT + tS).detach())
            L = (tT + tS + (F.kl_div(zT.log_softmax(1), zS.softmax(1).detach(), reduction="batchmean")
                            + F.kl_div(zS.log_softmax(1), zT.softmax(1).detach(), reduction="batchmean")
                            + F.mse_loss(HT, AHS.detach()) + F.mse_loss(HT.detach(), AHS)) / D)
        else:
            L = sum(fedmic.kd_losses(zT, zS, HT, AHS, tT, tS,      # the default: detached
                                     **({"attached": True} if attached else {})))
        return torch.autograd.grad(L, [zT, zS, HT, AHS])
    for a, b in zip(grads(False), grads(False, constant=True)):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(grads(True)[0], grads(False)[0], atol=1e-4)
    assert torch.allclose(grads(True)[2], grads(False)[2], atol=1e-6)   # features: no task term


# ---------------------------------------------------------------- 6, 7: privacy and synchronisation

def tensors_of(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_of(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_of(v)


def test_no_teacher_or_adapter_tensor_crosses_the_network(fed):
    """Sheet 11.6: over two rounds, every payload (down and up) names only student
    tensors that the student shares (never its private BN layers under --bn local), and
    no tensor of any payload has a teacher's or the adapter's values."""
    cfg = cfg_of(rounds=2)
    algo, server, clients = make(fed, cfg, teacher_model="resnet18")
    student = set(algo.sync_keys)
    assert student and not student & algo.private_keys
    for t in range(2):
        algo.set_round(t)
        ups = {}
        for c in clients[:2]:
            payload, _ = transmit(algo.broadcast(server, c))
            keys = set(payload.get("student", {}))
            for u in payload.get("updates", []):
                keys |= set(u)
            assert keys and keys <= student
            up, _ = transmit(algo.local_update(c, payload))
            assert set(up) == {"update", "n"} and set(up["update"]) == student
            secret = [v for v in list(c.state["teacher"].values()) + list(c.state["adapter"].values())
                      if v.is_floating_point()]
            for t_ in list(tensors_of(payload)) + list(tensors_of(up)):
                assert not any(t_.shape == s.shape and torch.equal(t_, s) for s in secret)
            ups[c.id] = up
        algo.aggregate(server, ups)
    teacher_keys = set(clients[0].state["teacher"])
    assert not teacher_keys & student and "weight" in clients[0].state["adapter"]
    assert clients[0].state["adapter"]["weight"].shape == (algo.d_T, algo.d_S) == (512, 128)


class Watch(fedmed.ALGORITHMS["fedmic"]):
    """FedMIC that, after each aggregation, checks every client's student: the broadcasts
    it has not applied yet, applied to it, give the server's S-bar bit for bit."""

    def local_update(self, client, payload):
        self.server_state["caught_up"] = max(self.server_state.get("caught_up", 0),
                                             len(payload.get("updates", [])))
        return super().local_update(client, payload)

    def setup(self, server, clients):
        super().setup(server, clients)
        self.server_state = server.state

    def aggregate(self, server, uploads):
        super().aggregate(server, uploads)
        same = []
        for c in self.clients:
            if "student" not in c.state:
                continue
            s = dict(c.state["student"])
            for b in server.state["queue"]:
                if b["round"] >= c.state["version"]:
                    fedmic.apply_update(s, b["update"])
            same.append(all(torch.equal(s[k], server.weights[k]) for k in self.sync_keys))
        server.state.setdefault("same", []).append(same)


def gap_of(seed, rounds=4, K=4):
    """The longest run of rounds a client misses after its first, under --fraction 0.5."""
    last, gap = {}, 0
    for t in range(rounds):
        for k in fedmed.sample_clients(seed, t, K, 0.5):
            if k in last:
                gap = max(gap, t - last[k] - 1)
            last[k] = t
    return gap


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_students_are_bit_identical_after_every_round(fed, tmp_path, monkeypatch, fraction):
    """Sheet 11.7 (and pitfall 7): after every round every client's student, with the
    broadcasts applied, is the server's S-bar bit for bit; under --fraction 0.5 a
    returning client applies every broadcast it missed (asserted: one applied at least
    two at once), and the bytes of those downlinks are counted. The run writes the rank
    traces and both views."""
    monkeypatch.setitem(fedmed.ALGORITHMS, "fedmic", Watch)
    seed = 0
    if fraction < 1:                  # a seed where a client misses two rounds in a row
        seed = next(s for s in range(50) if gap_of(s) >= 2)
    cfg = cfg_of(rounds=4, fraction=fraction, seed=seed)
    args = fedmic.Args(teacher_model="cnn", energy_start=0.6, energy_end=0.9)
    out = str(tmp_path / "run")
    s = fedmed.run(cfg, args, fed, out, quiet=True)
    ck = fedmed.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    same = ck["server"]["state"]["same"]
    assert len(same) == 4 and all(all(r) and r for r in same)
    if fraction == 1.0:
        assert all(len(r) == 4 for r in same)
        for c in ck["clients"]:                   # every client last synced at round 3
            assert c["state"]["version"] == 3
    else:
        assert ck["server"]["state"]["caught_up"] >= 2
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    views = {m["view"] for m in lines}
    assert views == {"personal", "global"} and s["view"] == "personal" and "global" in s["views"]
    mine = [m for m in lines if m["client"] != "pooled" and m["view"] == "personal"]
    for m in mine:
        assert m["energy"] == pytest.approx(fedmic.energy_threshold(m["round"] - 1, 4, 0.6, 0.9))
        assert set(m["ranks_down"]) == {"features.0.weight", "features.4.weight",
                                        "features.8.weight", "classifier.weight"}
        assert (m["bytes_up"] > 0) == bool(m["ranks_up"])
    if fraction == 0.5:
        assert any(m["bytes_up"] == 0 and m["ranks_up"] == {} for m in mine)


def test_the_teacher_is_the_personal_view_and_the_student_the_global_one(fed):
    """predict: "personal" = the client's own teacher (eval mode), "global" = S-bar with
    the client's private BN tensors; a held-out client gets the student in both."""
    algo, server, clients = make(fed)
    algo.set_round(0)
    payload, _ = transmit(algo.broadcast(server, clients[0]))
    algo.aggregate(server, {0: algo.local_update(clients[0], payload)})
    idx = clients[0].test[:10]
    out = algo.predict(server, clients[0], idx)
    t = fedmed.ALGORITHMS["fedavg"](cfg_of(algo="fedavg"), None, fed)
    t.load_model(clients[0].state["teacher"], {})
    assert np.allclose(out["personal"], t.forward_probs(idx), atol=1e-6)
    t.load_model(server.weights, clients[0].state["private"])
    assert np.allclose(out["global"], t.forward_probs(idx), atol=1e-6)
    assert not np.allclose(out["personal"], out["global"], atol=1e-3)
    held = fedmed.ClientState(-1, "h", np.zeros(0, np.int64), idx)
    h = algo.predict(server, held, idx)
    assert np.array_equal(h["personal"], h["global"])


def test_error_feedback_keeps_what_compression_dropped(fed):
    """EXTENSION (--error-feedback): over two rounds, the client's residual is what it
    compressed minus what it sent, M - rec(C(M)) with M = dW + the previous residual, and
    the server's alike with M = the averaged update + its previous residual."""
    algo, server, clients = make(fed, energy_start=0.3, energy_end=0.3, error_feedback=True)
    assert algo.info["extension"].startswith("error feedback")
    c = clients[0]
    res_c, res_s = {}, {}
    for t in range(2):
        algo.set_round(t)
        payload, _ = transmit(algo.broadcast(server, c))
        up = algo.local_update(c, payload)
        before = {k: v.clone() for k, v in c.state["student"].items()}
        sd = algo.model.state_dict()
        for k in algo.sync_keys:
            sent = fedmic.reconstruct(up["update"][k], before[k])
            M = sd[k] - before[k] + res_c.get(k, 0)
            assert torch.allclose(sent + c.state["residual"][k], M, atol=1e-6), (t, k)
        res_c = {k: v.clone() for k, v in c.state["residual"].items()}
        assert any(r.abs().sum() > 0 for r in res_c.values())
        w0 = {k: server.weights[k].clone() for k in algo.sync_keys}
        algo.aggregate(server, {0: up})
        for k in algo.sync_keys:
            M = fedmic.reconstruct(up["update"][k], before[k]) + res_s.get(k, 0)
            assert torch.allclose(server.weights[k] - w0[k] + server.state["residual"][k], M,
                                  atol=1e-6), (t, k)
        res_s = {k: v.clone() for k, v in server.state["residual"].items()}
    a2, s2, c2 = make(fed, energy_start=0.3, energy_end=0.3)
    a2.set_round(0)
    p2, _ = transmit(a2.broadcast(s2, c2[0]))
    a2.aggregate(s2, {0: a2.local_update(c2[0], p2)})
    assert "residual" not in c2[0].state and s2.state["residual"] == {}


def test_one_optimiser_over_teacher_student_and_adapter(fed):
    """Sheet section 7: Adam (the recipe) with one lr over the three models' parameters."""
    algo, server, clients = make(fed, teacher_model="resnet18")
    opt = algo.make_optimizer(clients[0])
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    every = [p for m in (algo.teacher, algo.model, algo.adapter) for p in m.parameters()]
    assert ids == {id(p) for p in every} and isinstance(opt, torch.optim.Adam)
    assert {g["lr"] for g in opt.param_groups} == {1e-3}
    assert fedmic.FedMIC.recipe == {"optimizer": "adam", "lr": 1e-4, "batch_size": 32,
                                    "weighting": "uniform", "bn": "local"}
    a = fedmic.Args()
    assert (a.energy_start, a.energy_end, a.teacher_model, a.kd_compat,
            a.attached_denominator, a.error_feedback) == (0.95, 0.98, "mobilenet_v2", False, False, False)


def test_the_constructor_checks_the_pair_too(fed):
    """Outside run.py (a script building the method) the same one-line errors."""
    with pytest.raises(fedmed.UsageError, match="the teacher"):
        make(fed, teacher_weights="/nonexistent/t.pt")


def test_a_multilabel_federation_is_refused():
    f = datasets.make_synthetic_multilabel(seed=0, clients=2, image_size=16)
    with pytest.raises(fedmed.UsageError, match="single-label"):
        fedmed.ALGORITHMS["fedmic"](cfg_of(), fedmic.Args(teacher_model="cnn"), f)


def test_features_are_the_head_input_and_no_hook_is_left(fed):
    """H = the input of the head (before MobileNetV2's dropout): its width is d, the logits
    are the head applied to it, and no forward hook stays on the model."""
    import models
    m = models.build("mobilenet_v2", 3)
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    z, H = fedmic.logits_and_features(m, "classifier", x)
    assert H.shape == (2, 1280) == (2, fedmic.width(m, "classifier"))
    assert torch.allclose(z, m.classifier(H), atol=1e-6)
    assert not m.classifier._forward_pre_hooks
    algo, _, _ = make(fed, teacher_model="resnet18")
    assert (algo.d_T, algo.d_S) == (512, 128) and algo.adapter.weight.shape == (512, 128)


def test_the_task_loss_follows_the_run(fed):
    """(4a): the class-weighted CE (alpha_c = N / N_c), or the focal loss with --loss focal."""
    g = torch.Generator().manual_seed(9)
    z, y = torch.randn(6, fed.num_classes, generator=g), torch.tensor([0, 1, 2, 3, 4, 5])
    algo, _, _ = make(fed)
    a = algo.alpha
    ce = -(a[y] * z.log_softmax(1)[torch.arange(6), y]).sum() / a[y].sum()
    assert torch.allclose(algo.task_loss(z, y), ce, atol=1e-6)
    algo, _, _ = make(fed, cfg_of(loss="focal", focal_gamma=2.0))
    p = z.softmax(1)[torch.arange(6), y]
    focal = (-(a[y]) * (1 - p) ** 2 * p.log()).mean()
    assert torch.allclose(algo.task_loss(z, y), focal, atol=1e-6)


def test_keep_optimizer_carries_the_state_of_the_three_models(fed):
    algo, server, clients = make(fed, cfg_of(keep_optimizer=True))
    c = clients[0]
    for t in range(2):
        algo.set_round(t)
        payload, _ = transmit(algo.broadcast(server, c))
        algo.aggregate(server, {0: algo.local_update(c, payload)})
    steps = {float(v["step"]) for v in c.state["optimizer"]["state"].values()}
    assert steps == {4.0}
    n = sum(1 for m in (algo.teacher, algo.model, algo.adapter) for _ in m.parameters())
    assert len(c.state["optimizer"]["state"]) == n


def test_the_teacher_trains_in_train_mode_after_an_evaluation(fed):
    """predict leaves the teacher in eval mode; the next local update trains it with
    batch statistics (its BN running means move)."""
    algo, server, clients = make(fed)
    c = clients[0]
    algo.predict(server, c, c.test[:4])
    before = {k: v.clone() for k, v in c.state["teacher"].items()}
    algo.set_round(0)
    payload, _ = transmit(algo.broadcast(server, c))
    algo.local_update(c, payload)
    assert not torch.equal(c.state["teacher"]["features.1.running_mean"], before["features.1.running_mean"])


# ---------------------------------------------------------------- command line

def test_the_command_line_runs_and_writes_both_views(tmp_path):
    """`python run.py --algo fedmic` on a tiny synthetic federation (a subprocess, as a
    user runs it): exit 0, summary.json with the personal (teacher) view first and the
    global (student) view, the recipe in config.json, the rank traces in metrics.jsonl."""
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), "--algo", "fedmic", "--dataset",
                        "synthetic", "--clients", "2", "--image-size", "16", "--rounds", "2",
                        "--local-steps", "1", "--batch-size", "8", "--teacher-model", "cnn",
                        "--quiet", "--out", str(out)], capture_output=True, text=True,
                       cwd=str(ROOT), env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    s = json.load(open(out / "summary.json"))
    assert s["view"] == "personal" and set(s["views"]) == {"global"} and s["bytes_up"] > 0
    rec = json.load(open(out / "config.json"))
    c = rec["config"]
    assert (c["optimizer"], c["lr"], c["bn"], c["weighting"]) == ("adam", 1e-4, "local", "uniform")
    assert rec["algorithm_info"]["energy"] == pytest.approx([0.965, 0.98])
    line = json.loads(open(out / "metrics.jsonl").readline())
    assert "ranks_up" in line and "ranks_down" in line and "energy" in line


@pytest.mark.parametrize("flags,needle", [
    (["--energy-start", "0"], "--energy-start"),
    (["--energy-end", "1.5"], "--energy-end"),
    (["--energy-start", "0.99", "--energy-end", "0.9"], "above --energy-end"),
    (["--teacher-model", "vgg"], "--teacher-model vgg"),
    (["--model", "clip:ViT-B-32"], "--model clip:ViT-B-32"),
    (["--teacher-weights", "/nonexistent/t.pt"], "the teacher (--teacher-model"),
])
def test_bad_input_is_one_line_exit_2_before_data(tmp_path, capsys, monkeypatch, flags, needle):
    """T_start / T_end outside (0, 1], start above end, a pair without an adapter shape:
    one line, exit 2, before any image is read (datasets.load must not be called)."""
    monkeypatch.setattr(run.datasets, "load", lambda *a, **k: pytest.fail("data were read"))
    out = str(tmp_path / "o")
    rc = run.main(["--algo", "fedmic", "--dataset", "synthetic", "--quiet", "--out", out, *flags])
    one_line_error(capsys, rc, needle, out=out)


def test_good_flags_reach_the_run(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(run, "_train", lambda ns, cfg, cls, args, *rest: seen.update(cfg=cfg, args=args) or 0)
    assert run.main(["--algo", "fedmic", "--quiet", "--out", str(tmp_path / "o"), "--energy-start",
                     "1", "--energy-end", "1", "--teacher-model", "resnet18"]) == 0
    assert (seen["args"].energy_start, seen["args"].teacher_model) == (1.0, "resnet18")
    assert seen["cfg"].optimizer == "adam" and seen["cfg"].bn == "local"
