"""FedLSM (algorithms/fedlsm.py), the multi-label core path and --oracle-labels, each
checked against a second, independent computation on tiny generated federations."""
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
import fedmed  # noqa: E402
import run  # noqa: E402
from algorithms import fedlsm  # noqa: E402
from fedmed import Config, ServerState, transmit  # noqa: E402
from helpers import one_line_error  # noqa: E402

import algorithms  # noqa: E402 - the methods register themselves

algorithms.load_all()


# ---------------------------------------------------------------- tiny federations

def class_images(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """uint8 [n, size, size, 3]: class c brightens a class-specific block of one channel,
    on noise, so a small CNN can learn the classes in a few steps."""
    g = np.random.default_rng(seed)
    x = g.normal(100, 25, (len(y), size, size, 3))
    h = size // 2
    for i, c in enumerate(y):
        r, s = divmod(int(c) % 4, 2)
        x[i, r * h:(r + 1) * h, s * h:(s + 1) * h, int(c) % 3] += 90
    return np.clip(x, 0, 255).astype(np.uint8)


def labelset_catalog(n_per_class=40, C=6, size=16, seed=0) -> datasets.Catalog:
    y = np.repeat(np.arange(C), n_per_class)
    return datasets.Catalog("toy", "/nonexistent/toy.npz", [f"c{c}" for c in range(C)],
                            [f"img{i}" for i in range(len(y))], y.astype(np.int64),
                            arrays=class_images(y, size, seed), default_size=size)


@pytest.fixture(scope="module")
def fed():
    ns = datasets.namespace(partition="labelset", clients=3, labels_per_client=2)
    return datasets.build(labelset_catalog(), ns, seed=0)


def make_algo(fed, args=None, **kw):
    cfg = Config(**{"algo": "fedlsm", "model": "cnn", "rounds": 2, "batch_size": 16,
                    "local_steps": 2, **kw})
    cls = fedmed.ALGORITHMS[cfg.algo]
    algo = cls(cfg, args if args is not None else (cls.Args() if cls.Args else None), fed)
    clients = fedmed.make_clients(fed)
    server = ServerState()
    algo.setup(server, clients)
    return algo, server, clients


def multilabel_fed(N=150, C=4, K=3, size=16, seed=0, label_sets=((0, 1), (1, 2), (2, 3))):
    """A multi-label federation: class c present with probability 0.35, drawn as a bright
    block; client k's training entries outside its label set are missing (-1)."""
    g = np.random.default_rng(seed)
    Y = (g.random((N, C)) < 0.35).astype(np.float32)
    x = g.normal(100, 20, (N, 3, size, size))
    h = size // 2
    for c in range(C):
        r, s = divmod(c, 2)
        x[Y[:, c] == 1, c % 3, r * h:(r + 1) * h, s * h:(s + 1) * h] += 80
    x = torch.from_numpy(np.clip(x, 0, 255).astype(np.uint8))
    parts = np.array_split(g.permutation(N), K)
    clients = []
    y = torch.from_numpy(Y)
    for k, part in enumerate(parts):
        part = np.sort(part)
        n_test = len(part) // 4
        train, test = part[n_test:], part[:n_test]
        L = list(label_sets[k])
        miss = [c for c in range(C) if c not in L]
        y[torch.as_tensor(train)[:, None], torch.as_tensor(miss)[None, :]] = -1.0
        clients.append(datasets.ClientSplit(f"site{k}", train, test, label_set=L))
    return datasets.Federation("ml", [f"d{c}" for c in range(C)], x, y, clients)


def write_npz(path: Path, n_train=240, n_test=60, C=6, seed=0):
    """A MedMNIST-format .npz with learnable classes (for the command line)."""
    g = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = np.resize(np.arange(C), n)[g.permutation(n)]
        arrays[f"{split}_images"] = class_images(y, 16, seed + n)
        arrays[f"{split}_labels"] = y[:, None].astype(np.uint8)
    np.savez(path, **arrays)
    return path


def cli(tmp_path, npz, *flags, name="out"):
    out = str(tmp_path / name)
    base = ["--dataset", "medmnist", "--data-dir", str(npz), "--partition", "labelset",
            "--clients", "3", "--labels-per-client", "2", "--rounds", "2", "--local-steps", "2",
            "--batch-size", "16", "--quiet", "--cache-dir", "none", "--out", out]
    return run.main(base + list(flags)), out


# ---------------------------------------------------------------- AWPA

def random_uploads(server, q, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: {"w": {key: (torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + k)
                      for key, v in server.weights.items()},
                "n": n[k], "q": torch.tensor(q[k])} for k in range(len(n))}


def test_awpa_equals_hand_computation_with_unequal_counts(fed):
    algo, server, _ = make_algo(fed)
    assert algo.head == ["classifier.weight", "classifier.bias"]
    before = {k: v.clone() for k, v in server.weights.items()}
    q = [[5, 0, 1, 0, 2, 0], [1, 3, 0, 0, 6, 0], [0, 1, 9, 0, 2, 4]]     # class 3: nobody
    n = [10, 30, 60]
    ups = random_uploads(server, q, n)
    algo.aggregate(server, ups)
    for key, v in server.weights.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key in algo.head:
            for c in range(6):
                tot = sum(q[k][c] for k in range(3))
                hand = (before[key][c] if tot == 0 else
                        sum(q[k][c] / tot * ups[k]["w"][key][c] for k in range(3)))
                assert torch.allclose(v[c], hand, atol=1e-6), (key, c)
        else:                                                           # (AGG-f): n_k / n
            hand = sum(n[k] / 100 * ups[k]["w"][key] for k in range(3))
            assert torch.allclose(v, hand, atol=1e-6), key
    assert torch.equal(server.weights["classifier.weight"][3], before["classifier.weight"][3])
    assert torch.equal(server.weights["classifier.bias"][5],              # one client counted c5
                       ups[2]["w"]["classifier.bias"][5])
    assert torch.isfinite(server.weights["classifier.weight"]).all()


def test_awpa_empty_class_samples_fallback(fed):
    algo, server, _ = make_algo(fed, fedlsm.Args(empty_class="samples"))
    q, n = [[1, 0, 0, 0, 0, 0], [0, 2, 0, 0, 0, 0]], [1, 3]
    ups = random_uploads(server, q, n, seed=1)
    algo.aggregate(server, ups)
    w = server.weights["classifier.weight"]
    assert torch.allclose(w[4], (ups[0]["w"]["classifier.weight"][4] + 3 * ups[1]["w"]["classifier.weight"][4]) / 4,
                          atol=1e-6)
    assert torch.allclose(w[1], ups[1]["w"]["classifier.weight"][1])


# ---------------------------------------------------------------- UE, pseudo labels, mixup, EMA

def test_uncertainty_ranking_selects_highest_entropy_images():
    g = torch.Generator().manual_seed(0)
    prob = torch.softmax(3 * torch.randn(20, 5, generator=g), 1)
    H = fedlsm.uncertainty(prob)
    hand = torch.tensor([-sum(p * np.log(p) for p in row.tolist()) for row in prob])
    assert torch.allclose(H, hand.float(), atol=1e-5)
    U, Cf, P = fedlsm.rank_pools(H, 4, 6)
    order = sorted(range(20), key=lambda i: -hand[i].item())
    assert set(U) == set(order[:4]) and set(Cf) == set(order[-6:])
    assert set(P) == set(range(20)) - set(order[:4]) and set(Cf) <= set(P)
    # multi-label: mean -s log s over the missing classes only
    s = torch.rand(8, 4, generator=g)
    missing = torch.tensor([False, True, False, True])
    Hm = fedlsm.uncertainty(s, missing)
    assert torch.allclose(Hm, -(s[:, [1, 3]] * s[:, [1, 3]].log()).mean(1))
    s2 = s.clone()
    s2[:, 0] = 0.5                                          # an annotated class changes
    assert torch.equal(fedlsm.uncertainty(s2, missing), Hm)


def test_pseudo_labels_only_above_thresholds_and_only_for_unannotated_classes():
    L = torch.tensor([True, True, False, False])            # client annotates c0, c1
    Y = torch.tensor([[0, 1, 0, 0], [-1] * 4, [-1] * 4, [-1] * 4, [-1] * 4], dtype=torch.float)
    t = torch.tensor([[0.01, 0.01, 0.97, 0.01],             # labelled: GT kept
                      [0.01, 0.01, 0.96, 0.02],             # -> c2
                      [0.02, 0.02, 0.02, 0.94],             # below 0.95: no target
                      [0.97, 0.01, 0.01, 0.01],             # confident in c0, annotated: none
                      [0.01, 0.01, 0.02, 0.96]])            # -> c3
    y, has, new = fedlsm.pseudo_single(Y, t, 0.95, L)
    assert y.tolist() == [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    assert has.tolist() == [True, True, False, False, True]
    assert new.tolist() == [False, True, False, False, True]
    assert not (y[new] * L.float()).any()                   # never an annotated class
    # multi-label, sheet test 4: teacher [0.9, 0.5, 0.005] on missing classes -> [1, masked, 0];
    # observed entries keep the ground truth whatever the teacher says
    Ym = torch.tensor([[1, 0, -1, -1, -1]], dtype=torch.float)
    tm = torch.tensor([[0.001, 0.999, 0.9, 0.5, 0.005]])
    y, m, pos = fedlsm.pseudo_multi(Ym, tm, 0.85, 0.01)
    assert y.tolist() == [[1, 0, 1, 0, 0]] and m.tolist() == [[True, True, True, False, True]]
    assert pos.tolist() == [[False, False, True, False, False]]


def test_mixup_labels_are_the_convex_combination_with_the_image_lambda():
    g = torch.Generator().manual_seed(1)
    x_u, x_c = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    y_u, y_c = torch.eye(5)[[0, 1, 2, 3]], torch.eye(5)[[4, 4, 0, 1]]
    for lam in (0.0, 0.13, 0.5, 1.0):
        x, y = fedlsm.mixup(x_u, x_c, y_u, y_c, lam)
        # recover lambda from the images and check the labels use the same one
        lam_img = ((x - x_c) * (x_u - x_c)).sum() / ((x_u - x_c) ** 2).sum()
        assert lam_img.item() == pytest.approx(lam, abs=1e-5)
        assert torch.allclose(y, lam_img * y_u + (1 - lam_img) * y_c, atol=1e-5)
        assert torch.allclose(y.sum(1), torch.ones(4))
    x, y = fedlsm.mixup(x_u, x_c, y_u, y_c, 1.0)
    assert torch.equal(x, x_u) and torch.equal(y, y_u)


def test_mixup_inside_training_uses_one_beta_lambda_per_step(fed, monkeypatch):
    """The loop's mixed images and labels come from one lambda ~ Beta(0.2, 0.2) of the
    (seed, "mixup", round, client) stream."""
    seen = []
    real = fedlsm.mixup

    def spy(x_u, x_c, y_u, y_c, lam):
        out = real(x_u, x_c, y_u, y_c, lam)
        seen.append((lam, x_u, x_c, y_u, y_c) + out)
        return out
    monkeypatch.setattr(fedlsm, "mixup", spy)
    algo, server, clients = make_algo(fed, fedlsm.Args(n_u=6, n_c=10), local_steps=3)
    payload, _ = transmit(algo.broadcast(server, clients[1]))
    algo.local_update(clients[1], payload)
    expect = fedmed.np_rng(0, "mixup", 0, 1)
    assert len(seen) == 3
    for lam, x_u, x_c, y_u, y_c, x, y in seen:
        assert lam == expect.beta(0.2, 0.2)
        assert torch.allclose(x, lam * x_u + (1 - lam) * x_c) and torch.allclose(y, lam * y_u + (1 - lam) * y_c)


def test_ema_teacher_equals_its_formula(fed):
    g = torch.Generator().manual_seed(0)
    s, t = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in t.parameters()]
    for p in s.parameters():
        p.data = torch.randn(p.shape, generator=g)
    for _ in range(7):                                      # fixed student: d^n t0 + (1 - d^n) s
        fedlsm.ema_update(t, s, 0.9)
    for p0, pt, ps in zip(t0, t.parameters(), s.parameters()):
        assert torch.allclose(pt, 0.9 ** 7 * p0 + (1 - 0.9 ** 7) * ps, atol=1e-6)
    # in training: reset to theta_g each round, after one step 0.999 theta_g + 0.001 theta
    algo, server, clients = make_algo(fed, local_steps=1)
    payload, _ = transmit(algo.broadcast(server, clients[0]))
    algo.local_update(clients[0], payload)
    theta = dict(algo.model.named_parameters())
    for name, p in algo.teacher.named_parameters():
        assert torch.allclose(p, 0.999 * server.weights[name] + 0.001 * theta[name], atol=1e-6), name
    algo.round = 1
    payload, _ = transmit(algo.broadcast(server, clients[0]))
    algo.args.ema_decay = 1.0                               # teacher stays the received model
    algo.local_update(clients[0], payload)
    for name, p in algo.teacher.named_parameters():
        assert torch.equal(p, server.weights[name]), name


# ---------------------------------------------------------------- EDD and the upload

def test_edd_counts_ground_truth_and_the_upload_carries_them(fed, monkeypatch, tmp_path):
    """No pseudo labels (tau_p > 1) and one pass over P = all images (n_u = 0): q is the
    class count of the client's labelled images; the upload's bytes include q."""
    c = fedmed.make_clients(fed)[0]
    N = len(c.train) + len(c.unlabeled)
    args = fedlsm.Args(n_u=0, batch_u=0, tau_p=1.01)
    algo, server, clients = make_algo(fed, args, batch_size=N, local_steps=1)
    payload, _ = transmit(algo.broadcast(server, clients[0]))
    up = algo.local_update(clients[0], payload)
    y = fed.y.numpy()
    assert up["q"].tolist() == np.bincount(y[clients[0].train], minlength=6).tolist()
    assert up["n"] == N
    sent = []
    real = fedmed.transmit

    def spy(payload):
        got, nbytes = real(payload)
        sent.append((payload, nbytes))
        return got, nbytes
    monkeypatch.setattr(fedmed, "transmit", spy)
    out = fedmed.run(Config(algo="fedlsm", rounds=1, batch_size=16, local_steps=1), fedlsm.Args(),
                     fed, str(tmp_path / "o"), quiet=True)
    uploads = [(p, b) for p, b in sent if "q" in p]
    assert len(uploads) == 3 and all(p["q"].dtype == torch.int64 and p["q"].shape == (6,)
                                     for p, _ in uploads)
    for p, b in uploads:
        buf = io.BytesIO()
        torch.save(p, buf)
        assert b == len(buf.getvalue())
        buf = io.BytesIO()
        torch.save({k: v for k, v in p.items() if k != "q"}, buf)
        assert b > len(buf.getvalue())                      # q is part of what is counted
    assert out["bytes_up"] == sum(b for _, b in uploads)


# ---------------------------------------------------------------- baselines

def test_fedavg_with_labelset_trains_on_annotated_images_only(fed):
    algo, server, clients = make_algo(fed, algo="fedavg", local_epochs=1, local_steps=0)
    y = fed.y.numpy()
    for c in clients:
        seen = torch.cat(list(algo.local_batches(c, torch.Generator().manual_seed(0)))).numpy()
        assert set(seen) <= set(c.train) and not set(seen) & set(c.unlabeled)
        assert set(y[seen]) <= set(c.label_set)
    assert algo.alpha[0] > 0                               # class weights from visible labels


def test_oracle_labels_keeps_every_label_on_the_same_clients():
    cat = labelset_catalog()
    part = datasets.build(cat, datasets.namespace(partition="labelset", clients=3,
                                                  labels_per_client=2), seed=0)
    full = datasets.build(cat, datasets.namespace(partition="labelset", clients=3,
                                                  labels_per_client=2, oracle_labels=True), seed=0)
    for p, o in zip(part.clients, full.clients):
        assert np.array_equal(np.sort(np.r_[p.train, p.unlabeled]), o.train)   # same images
        assert np.array_equal(p.test, o.test) and len(o.unlabeled) == 0
        assert o.label_set == list(range(6))
    assert any("--oracle-labels" in n for n in full.info["notes"])
    with pytest.raises(fedmed.UsageError, match="--oracle-labels"):
        datasets.load(datasets.namespace(oracle_labels=True), seed=0)


# ---------------------------------------------------------------- multi-label core

def test_multilabel_metrics_agree_with_sklearn():
    from sklearn import metrics as skm
    rng = np.random.default_rng(0)
    for trial in range(10):
        n, C = int(rng.integers(8, 40)), 4
        y = (rng.random((n, C)) < 0.4).astype(float)
        y[:, 3] = 0 if trial % 2 else y[:, 3]                             # a class with no positive
        prob = np.clip(0.6 * y + 0.5 * rng.random((n, C)), 0, 1)
        prob[:, 2] = np.round(prob[:, 2], 1)                              # ties
        miss = rng.random((n, C)) < 0.2
        ym = np.where(miss, -1, y)
        m = fedmed.classification_metrics(ym, prob)
        ba, acc, f1, auc = [], [], [], []
        for c in range(C):
            o = ~miss[:, c]
            t, p = y[o, c], (prob[o, c] >= 0.5).astype(float)
            ba.append(skm.balanced_accuracy_score(t, p) if len(np.unique(t)) > 1 else
                      skm.recall_score(t, p, pos_label=t[0], zero_division=0))
            acc.append(skm.accuracy_score(t, p))
            f1.append(skm.f1_score(t, p, zero_division=0))
            if 0 < t.sum() < len(t):
                auc.append(skm.roc_auc_score(t, prob[o, c]))
        assert m["balanced_accuracy"] == pytest.approx(np.mean(ba))
        assert m["accuracy"] == pytest.approx(np.mean(acc))
        assert m["macro_f1"] == pytest.approx(np.mean(f1))
        assert m["macro_auroc"] == pytest.approx(np.mean(auc))
        assert m["loss"] == pytest.approx(skm.log_loss(y[~miss], np.clip(prob[~miss], 1e-12, 1 - 1e-12),
                                                       labels=[0, 1]))


def test_masked_bce_and_pos_weight_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 3, generator=g)
    y = torch.tensor([[1, 0, -1], [0, -1, 1], [1, 1, 0], [-1, -1, -1], [0, 0, 0], [1, -1, 1]],
                     dtype=torch.float)
    pw = torch.tensor([2.0, 0.5, 3.0])
    total, count = 0.0, 0
    for i in range(6):
        for c in range(3):
            if y[i, c] >= 0:
                s = torch.sigmoid(z[i, c])
                total += -(pw[c] * y[i, c] * torch.log(s) + (1 - y[i, c]) * torch.log(1 - s))
                count += 1
    assert torch.allclose(fedmed.masked_bce(z, y, pw), total / count, atol=1e-6)
    a = fedmed.class_weights(y.numpy(), 3)                  # #neg / #pos over observed entries
    assert a.tolist() == pytest.approx([2 / 3, 2 / 1, 2 / 2])


@pytest.mark.parametrize("algo", ["fedavg", "fedlsm"])
def test_multilabel_federation_runs_end_to_end(tmp_path, algo):
    fed = multilabel_fed()
    s = fedmed.run(Config(algo=algo, rounds=2, batch_size=16, local_steps=3), fedmed.ALGORITHMS[algo].Args()
                   if fedmed.ALGORITHMS[algo].Args else None, fed, str(tmp_path / "o"), quiet=True)
    assert 0 <= s["balanced_accuracy"] <= 1 and np.isfinite(s["macro_auroc"])
    a, server, clients = make_algo(fed, algo=algo)
    prob = a.predict(server, clients[0], clients[0].test)
    assert prob.shape == (len(clients[0].test), 4) and not np.allclose(prob.sum(1), 1)   # sigmoids
    cfg = json.load(open(tmp_path / "o" / "config.json"))
    assert cfg["split"]["site0"]["train"] == (fed.y[clients[0].train] == 1).sum(0).tolist()
    if algo == "fedlsm":
        assert server.state["bytes_up_once"] > 0                          # the label counts
        assert torch.allclose(server.state["pos_weight"], a.alpha)


def test_multilabel_pseudo_labels_fill_missing_entries_only(monkeypatch):
    """In training, observed entries reach the loss as ground truth and missing entries
    only as thresholded teacher outputs."""
    fed = multilabel_fed()
    got = []
    real = fedlsm.pseudo_multi

    def spy(Y, t, hi, lo):
        out = real(Y, t, hi, lo)
        got.append((Y, t, hi, lo) + out)
        return out
    monkeypatch.setattr(fedlsm, "pseudo_multi", spy)
    algo, server, clients = make_algo(fed, fedlsm.Args(n_u=5, n_c=10, tau_hi=0.5, tau_lo=0.45))
    payload, _ = transmit(algo.broadcast(server, clients[0]))
    algo.local_update(clients[0], payload)
    assert got
    for Y, t, hi, lo, y, m, pos in got:
        obs = Y >= 0
        assert torch.equal(y[obs], Y[obs]) and m[obs].all()
        assert torch.equal(m[~obs], ((t >= hi) | (t <= lo))[~obs])
        assert not obs[:, [0, 1]].logical_not().any() and not obs[:, [2, 3]].any()   # L_0 = {0, 1}


# ---------------------------------------------------------------- command line

def test_fedlsm_command_line_runs_and_resumes_bit_for_bit(tmp_path):
    npz = write_npz(tmp_path / "toy.npz")
    flags = ["--algo", "fedlsm", "--rounds", "3", "--n-u", "8", "--n-c", "20"]
    rc, full = cli(tmp_path, npz, *flags, name="full")
    assert rc == 0
    rc, part = cli(tmp_path, npz, *flags, "--stop-after", "1", name="part")
    rc, _ = cli(tmp_path, npz, *flags, "--resume", name="part")
    assert rc == 0
    a = torch.load(os.path.join(full, "checkpoint.pt"), weights_only=False)["server"]["weights"]
    b = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=False)["server"]["weights"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    cfg = json.load(open(os.path.join(full, "config.json")))
    assert cfg["algorithm_args"]["n_u"] == 8 and cfg["data"]["oracle_labels"] is False
    rc, _ = cli(tmp_path, npz, "--oracle-labels", name="oracle")
    assert rc == 0


@pytest.mark.parametrize("flags,needle", [
    (["--labels-per-client", "7"], "--labels-per-client"),       # k > C = 6
    (["--labels-per-client", "0"], "--labels-per-client"),       # an empty label set
    (["--algo", "fedlsm", "--empty-class", "nope"], "--empty-class"),
    (["--algo", "fedlsm", "--batch-u", "16"], "--batch-u"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, flags, needle):
    npz = write_npz(tmp_path / "toy.npz", n_train=60, n_test=12)
    rc, out = cli(tmp_path, npz, *flags)
    one_line_error(capsys, rc, needle)


def test_client_with_empty_label_set_is_refused(tmp_path, fed):
    c0 = fed.clients[0]
    bad = datasets.Federation("bad", fed.classes, fed.x, fed.y,
                              [datasets.ClientSplit(c0.name, c0.train[:0], c0.test,
                                                    np.r_[c0.train, c0.unlabeled], label_set=[])]
                              + fed.clients[1:])
    with pytest.raises(fedmed.UsageError, match="empty label set") as e:
        fedmed.run(Config(algo="fedlsm", rounds=1), fedlsm.Args(), bad, str(tmp_path / "o"), quiet=True)
    assert "\n" not in str(e.value)


def test_synthetic_multilabel_dataset_from_the_command_line(tmp_path, capsys):
    ns = datasets.namespace(dataset="synthetic-multilabel", clients=3, image_size=16)
    fed = datasets.load(ns, seed=0)
    y = fed.y.numpy()
    assert y.shape[1] == 6 and set(np.unique(y)) == {-1.0, 0.0, 1.0}
    for c in fed.clients:
        outside = [k for k in range(6) if k not in c.label_set]
        assert (y[c.train][:, outside] == -1).all() and (y[c.train][:, c.label_set] >= 0).all()
        assert (y[c.test] >= 0).all()                                  # complete test labels
    oracle = datasets.load(datasets.namespace(dataset="synthetic-multilabel", clients=3,
                                              image_size=16, oracle_labels=True), seed=0)
    assert (oracle.y.numpy() >= 0).all() and torch.equal(oracle.x, fed.x)
    flags = ["--dataset", "synthetic-multilabel", "--clients", "3", "--image-size", "16",
             "--rounds", "1", "--local-steps", "2", "--batch-size", "16", "--quiet"]
    assert run.main(flags + ["--algo", "fedlsm", "--n-u", "5", "--n-c", "10",
                             "--out", str(tmp_path / "a")]) == 0
    assert run.main(flags + ["--partition", "iid", "--out", str(tmp_path / "b")]) == 2
    assert "--partition" in capsys.readouterr().err


# ---------------------------------------------------------------- issue #11: what the mutants showed

def test_defaults_are_the_sheet_isic_values():
    """Sheet section 7 (ISIC column where the two differ) and the documented flags."""
    a = fedlsm.Args()
    assert (a.n_u, a.n_c, a.batch_u) == (50, 200, 4)
    assert (a.ema_decay, a.mix_alpha, a.lambda_ude) == (0.999, 0.2, 0.1)
    assert (a.tau_p, a.tau_u, a.tau_hi, a.tau_lo, a.tau_u_lo) == (0.95, 0.7, 0.85, 0.01, 0.005)
    assert (a.ce_weights, a.empty_class, a.ude_compat, a.ue_binary_entropy) == \
        (False, "keep", False, False)


def test_pseudo_label_thresholds_are_inclusive():
    """Sheet section 4: y_c = 1 if t_c >= tau_hi, 0 if t_c <= tau_lo; a single-label image
    gets a pseudo label when max t >= tau (values exact in binary)."""
    L = torch.tensor([True, False, False])
    y, has, new = fedlsm.pseudo_single(torch.full((1, 3), -1.0), torch.tensor([[0.125, 0.75, 0.125]]),
                                       0.75, L)
    assert y.tolist() == [[0, 1, 0]] and has.tolist() == [True] and new.tolist() == [True]
    y, m, pos = fedlsm.pseudo_multi(torch.full((1, 3), -1.0), torch.tensor([[0.75, 0.25, 0.5]]),
                                    0.75, 0.25)
    assert y.tolist() == [[1, 0, 0]] and m.tolist() == [[True, True, False]]
    assert pos.tolist() == [[True, False, False]]


def test_pools_at_their_bounds():
    """n_u = 0 / n_c = 0 give empty pools and P = everything; U never takes every image
    (P keeps at least one), Cf may."""
    H = torch.tensor([0.3, 0.1, 0.2, 0.4])
    U, Cf, P = fedlsm.rank_pools(H, 0, 0)
    assert len(U) == 0 and len(Cf) == 0 and P.tolist() == [0, 1, 2, 3]
    U, Cf, P = fedlsm.rank_pools(H, 10, 10)
    assert U.tolist() == [0, 2, 3] and P.tolist() == [1] and Cf.tolist() == [0, 1, 2, 3]
    U, Cf, P = fedlsm.rank_pools(H, 3, 4)
    assert U.tolist() == [0, 2, 3] and Cf.tolist() == [0, 1, 2, 3]


def test_soft_ce_equals_its_formula_with_class_weights():
    """CE_soft of (L-s): -1/B sum_i sum_c a_c y_ic log softmax(z_i)_c."""
    g = torch.Generator().manual_seed(0)
    z, a = torch.randn(4, 3, generator=g), torch.tensor([0.5, 2.0, 3.0])
    y = torch.tensor([[1, 0, 0], [0, 0.3, 0.7], [0, 0, 0], [0, 1, 0]])
    hand = 0.0
    for i in range(4):
        for c in range(3):
            hand -= a[c] * y[i, c] * torch.log(torch.softmax(z[i], 0)[c])
    assert torch.allclose(fedlsm.soft_ce(z, y, a), hand / 4)
    assert torch.allclose(fedlsm.soft_ce(z, y, None), fedlsm.soft_ce(z, y, torch.ones(3)))


@pytest.mark.parametrize("kw,ok", [
    ({"n_u": 0, "n_c": 0}, True), ({"n_u": -1}, False), ({"n_c": -1}, False),
    ({"ema_decay": 0.0}, True), ({"ema_decay": 1.0}, True), ({"ema_decay": -0.5}, False),
    ({"ema_decay": 1.5}, False), ({"mix_alpha": 0.0}, False), ({"mix_alpha": 0.01}, True),
    ({"batch_u": 0}, True), ({"batch_u": 15}, True), ({"batch_u": -1}, False),
])
def test_argument_bounds(fed, kw, ok):
    """n_u, n_c >= 0, d in [0, 1], alpha > 0, 0 <= batch_u < batch size (16)."""
    if ok:
        make_algo(fed, fedlsm.Args(**kw))
    else:
        with pytest.raises(fedmed.UsageError):
            make_algo(fed, fedlsm.Args(**kw))


def test_label_set_of_none_is_the_classes_with_a_labelled_image(fed):
    """Natural mode: L_k = the classes with a labelled training image (single-label) or
    with an observed entry (multi-label); a given label set is taken as it is, even for a
    class with no image at the client."""
    algo, _, clients = make_algo(fed)
    c = clients[0]
    assert algo.annotated(c).nonzero()[:, 0].tolist() == sorted(c.label_set)
    c.label_set = sorted(c.label_set) + [5]                 # annotates 5, has no image of it
    assert algo.annotated(c).nonzero()[:, 0].tolist() == sorted(set(c.label_set))
    c.label_set = None
    assert algo.annotated(c).nonzero()[:, 0].tolist() == sorted(set(fed.y[c.train].tolist()))
    mfed = multilabel_fed()
    algo, _, clients = make_algo(mfed)
    clients[1].label_set = None
    mfed.y[torch.as_tensor(clients[1].train), 2] = 0.0      # observed, never positive: annotated
    assert algo.annotated(clients[1]).tolist() == [False, True, True, False]


def test_once_only_label_counts_and_their_bytes(fed, monkeypatch):
    """Multi-label: each client sends its positive / negative counts once; bytes_up_once is
    what they cost; with --class-weights none nothing is sent and W = m. Single-label:
    nothing is sent."""
    mfed = multilabel_fed()
    sent = []
    real = fedlsm.transmit

    def spy(payload):
        got, nbytes = real(payload)
        sent.append(nbytes)
        return got, nbytes
    monkeypatch.setattr(fedlsm, "transmit", spy)
    algo, server, _ = make_algo(mfed)
    assert len(sent) == 3 and server.state["bytes_up_once"] == sum(sent) > 0
    algo, server, _ = make_algo(mfed, class_weights="none")
    assert server.state["bytes_up_once"] == 0 and "pos_weight" not in server.state
    single, server, _ = make_algo(fed)
    assert server.state["bytes_up_once"] == 0 and "pos_weight" not in server.state


def test_no_mixup_without_u_cf_batches(fed, monkeypatch):
    """batch_u = 0 (or an empty U or Cf) turns UDE off: no mixup, no lambda drawn, and the
    P batch is the whole --batch-size."""
    called = []
    monkeypatch.setattr(fedlsm, "mixup", lambda *a: called.append(1) or a[:2])
    for kw in ({"batch_u": 0, "n_u": 4, "n_c": 6}, {"batch_u": 2, "n_u": 0, "n_c": 6},
               {"batch_u": 2, "n_u": 4, "n_c": 0}):
        algo, server, clients = make_algo(fed, fedlsm.Args(**kw))
        payload, _ = transmit(algo.broadcast(server, clients[0]))
        up = algo.local_update(clients[0], payload)
        assert not called, kw
        assert all(torch.isfinite(v).all() for v in up["w"].values() if v.is_floating_point())


def test_epochs_budget_is_passes_over_p(fed):
    """Without --local-steps, E epochs are E ceil(|P| / (B - b)) steps."""
    algo, server, clients = make_algo(fed, fedlsm.Args(n_u=5, n_c=10), local_steps=0, local_epochs=2)
    c = clients[0]
    payload, _ = transmit(algo.broadcast(server, c))
    algo.load_model(payload["w"], {})
    N = len(c.train) + len(c.unlabeled)
    assert algo.train(c, payload) == 2 * -(-(N - 5) // (16 - 4))


def test_binary_entropy_option_equals_its_formula():
    """--ue-binary-entropy (sheet pitfall 3): H = mean over missing c of
    -s_c log s_c - (1 - s_c) log(1 - s_c)."""
    s = torch.tensor([[0.2, 0.9, 0.5], [0.01, 0.3, 1.0]])
    missing = torch.tensor([True, False, True])
    hand = torch.tensor([[-(p * np.log(p) + (1 - p) * np.log(1 - p)) if 0 < p < 1 else 0.0
                          for p in row] for row in s.tolist()])
    assert torch.allclose(fedlsm.uncertainty(s, missing, binary=True), hand[:, [0, 2]].mean(1).float())
    assert torch.equal(fedlsm.uncertainty(s, torch.zeros(3, dtype=torch.bool), binary=True),
                       torch.zeros(2))


def test_ude_compat_uses_ground_truth_only(fed):
    """--ude-compat (sheet pitfall 2): U and Cf get no pseudo labels, whatever the
    teacher says; a row has a target only where the image carries a ground truth."""
    algo, _, clients = make_algo(fed, fedlsm.Args(ude_compat=True))
    L = algo.annotated(clients[0])
    out = int((~L).nonzero()[0])                            # a class outside L_0
    Y = torch.tensor([[0, 1, 0, 0, 0, 0], [-1] * 6, [1, 0, 0, 0, 0, 0]], dtype=torch.float)
    t = torch.full((3, 6), 0.002)
    t[:, out] = 0.99                                        # the teacher is confident in it
    y_u, m_u, y_c, m_c = algo._mix_targets(Y, t, Y.flip(0), t, L)
    assert y_u.tolist() == (Y == 1).float().tolist() and m_u.tolist() == [True, False, True]
    assert y_c.tolist() == (Y.flip(0) == 1).float().tolist() and m_c.tolist() == [True, False, True]
    algo.args.ude_compat = False                            # the described behaviour
    y_u, m_u, _, _ = algo._mix_targets(Y, t, Y, t, L)
    assert m_u.tolist() == [True, True, True] and y_u[1].tolist() == torch.eye(6)[out].tolist()


# ---------------------------------------------------------------- issue #19: the recipe

def resolved(monkeypatch, tmp_path, *flags):
    """(cfg, args) as run.py resolves `--algo fedlsm` with `flags` (no data is read)."""
    seen = {}

    def fake_train(ns, cfg, cls, args, out, rounds_given):
        seen.update(cfg=cfg, args=args)
        return 0
    monkeypatch.setattr(run, "_train", fake_train)
    assert run.main(["--algo", "fedlsm", "--quiet", "--out", str(tmp_path / "o"), *flags]) == 0
    return seen["cfg"], seen["args"]


def test_the_recipe_is_the_public_codes_and_user_flags_win(monkeypatch, tmp_path):
    """Sheet section 7 (ISIC): Adam lr 1e-4, weight decay 5e-4, 30 local iterations, batch
    64 = 60 of P + 4 of U + 4 of Cf (--batch-size 64 with --batch-u 4), each client's
    optimiser state carried across rounds; betas (0.9, 0.9999). A flag given wins,
    --no-keep-optimizer included."""
    cfg, args = resolved(monkeypatch, tmp_path)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.local_steps,
            cfg.keep_optimizer) == ("adam", 1e-4, 5e-4, 64, 30, True)
    assert cfg.batch_size - args.batch_u == 60 and args.batch_u == 4
    assert fedlsm.FedLSM.adam_betas == (0.9, 0.9999)
    cfg, _ = resolved(monkeypatch, tmp_path, "--optimizer", "sgd", "--lr", "0.05", "--weight-decay", "0",
                      "--batch-size", "16", "--local-steps", "2", "--no-keep-optimizer")
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.local_steps,
            cfg.keep_optimizer) == ("sgd", 0.05, 0.0, 16, 2, False)
    cfg, _ = resolved(monkeypatch, tmp_path, "--keep-optimizer")
    assert cfg.keep_optimizer is True
    seen = {}                                  # another algorithm: no recipe of FedLSM's
    monkeypatch.setattr(run, "_train", lambda ns, cfg, *rest: seen.update(cfg=cfg) or 0)
    assert run.main(["--quiet", "--out", str(tmp_path / "o")]) == 0
    assert (seen["cfg"].optimizer, seen["cfg"].lr, seen["cfg"].keep_optimizer) == ("sgd", 0.01, False)


def test_the_recipe_runs_and_config_json_records_it(tmp_path):
    """The optimiser that ran under the recipe: Adam with the recipe's betas and weight
    decay, its state carried (the second round's Adam continues at step 2 x tau), and
    config.json names all of it."""
    npz = write_npz(tmp_path / "toy.npz")
    out = str(tmp_path / "out")
    rc = run.main(["--dataset", "medmnist", "--data-dir", str(npz), "--partition", "labelset",
                   "--clients", "3", "--labels-per-client", "2", "--rounds", "2",
                   "--local-steps", "2", "--batch-size", "16", "--n-u", "8", "--n-c", "20",
                   "--quiet", "--cache-dir", "none", "--out", out, "--algo", "fedlsm"])
    assert rc == 0
    rec = json.load(open(os.path.join(out, "config.json")))
    c = rec["config"]
    assert (c["optimizer"], c["lr"], c["weight_decay"], c["keep_optimizer"]) == ("adam", 1e-4, 5e-4, True)
    assert rec["algorithm_info"] == {"adam_betas": [0.9, 0.9999], "batch": {"P": 12, "U": 4, "Cf": 4}}
    ck = fedmed.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    for saved in ck["clients"]:
        ref = saved["state"][fedmed.OPT_REF]
        st = torch.load(os.path.join(out, fedmed.OPT_DIR, ref["file"]), weights_only=True)
        assert st["param_groups"][0]["betas"] == (0.9, 0.9999)
        assert st["param_groups"][0]["weight_decay"] == 5e-4
        assert {float(v["step"]) for v in st["state"].values()} == {4.0}   # 2 rounds x 2 steps


def test_the_isic_bench_runs_fedlsm_with_its_recipe_and_the_baselines_with_the_same(
        monkeypatch, tmp_path):
    """bench/fedlsm_isic.py: FedLSM's command passes no optimiser or budget flag (run.py
    applies the recipe), the baselines' pass the recipe's values, and --extra flags (the
    lead's --model / --weights) reach run.py last."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import fedlsm_isic
    import argparse
    a = argparse.Namespace(data_dir="/data", image_size=64, rounds=3, local_steps=None, lr=None,
                           batch_size=None, out=str(tmp_path), extra=["--model", "cnn"])
    lsm, base = fedlsm_isic.command("fedlsm", 0, a), fedlsm_isic.command("partial", 0, a)
    for flag in ("--lr", "--optimizer", "--batch-size", "--local-steps", "--keep-optimizer",
                 "--weight-decay"):
        assert flag not in lsm and flag in base
    assert lsm[-2:] == ["--model", "cnn"] and base[-2:] == ["--model", "cnn"]
    seen = {}
    monkeypatch.setattr(run, "_train", lambda ns, cfg, *rest: seen.update(cfg=cfg) or 0)
    for cmd in (lsm, base):                    # both resolve to the same optimiser and budget
        argv = list(cmd[2:])                   # the same flags on synthetic data
        i = argv.index("--data-dir")
        del argv[i:i + 2]
        argv[argv.index("--dataset") + 1] = "synthetic"
        assert run.main(argv) == 0, argv
        c = seen["cfg"]
        assert (c.optimizer, c.lr, c.weight_decay, c.batch_size, c.local_steps, c.keep_optimizer,
                c.model) == ("adam", 1e-4, 5e-4, 64, 30, True, "cnn")
    a.local_steps, a.lr = 5, 0.01              # given to the bench: every method's
    for m in ("fedlsm", "partial"):
        cmd = fedlsm_isic.command(m, 0, a)
        assert cmd[cmd.index("--local-steps") + 1] == "5" and cmd[cmd.index("--lr") + 1] == "0.01"
