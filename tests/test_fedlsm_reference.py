"""FedLSM reference step (issue #11): one complete round of FedLSM recomputed in plain
torch INSIDE THIS FILE, straight from ../shared/methods/fedlsm.md, without calling any
helper of algorithms/fedlsm.py, and compared with what the hooks (driven as the loop
drives them) and fedmed.run produce, at float-rounding tolerance.

Recomputed, per client k (sheet section 3, the numbered steps in the docstring of
algorithms/fedlsm.py):
  (1) student theta <- theta_g, EMA teacher theta_t <- theta_g;
  (2) UE under theta_g (eval mode, no augmentation): (UE-s) / (UE-m), pools U, Cf, P;
  (3) for every local step: the P batch (weak view = flips, strong view = translation,
      brightness / contrast, cutout) and the U / Cf batches, drawn from the named stream
      (seed, "batches", round, k); pseudo labels of the TEACHER on the weak views
      (PL-s) / (PL-m) with the P, U and Cf thresholds; UDE mixup (lambda from the
      (seed, "mixup", round, k) stream), M_mix = m_u AND m_c; the loss with every term,
      (L-s) or (L-m) with W_c = pos_weight_c m_c; one SGD step (momentum, weight decay,
      one parameter group = every parameter); the EMA teacher update (parameters
      theta_t <- d theta_t + (1 - d) theta, buffers copied); EDD q_k += GT + pseudo
      positives of the P batch;
  (4) the upload theta_k, q_k, n_k = all local images.
Server: AWPA, (AGG-f) n_k-weighted mean of every tensor but the classifier (BN buffers
included, num_batches_tracked the max) and (AGG-c) classifier row c weighted by
q_{k,c} / sum_j q_{j,c}; a class nobody counted keeps theta_g's row.
Prediction: softmax / sigmoid of the aggregated model, eval mode, on a client's test set.

The thresholds are placed between the teacher's probabilities on this data, so that every
branch of the pseudo labelling is taken (asserted), and the reference checks that no
probability it thresholds lies within 1e-4 of a threshold, so float rounding cannot flip
a decision on any CPU. The EMA decay is 0.5 so that the teacher differs visibly from
theta_g after the first step.
"""
import copy
import json

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

C, S = 5, 16                                  # classes, image side
LABEL_SETS = ([0, 1], [1, 2], [2, 3])         # nobody annotates class 4
HEAD = ("classifier.weight", "classifier.bias")
SEED, ROUND = 0, 0
TOL = dict(rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- tiny federations

def single_label_fed() -> datasets.Federation:
    """3 clients; each has 14 labelled images of its label set, 8 unlabelled images of
    the other classes (their y is the truth, never to be read) and 6 test images."""
    g = np.random.default_rng(7)
    xs, ys, clients, start = [], [], [], 0
    for k, L in enumerate(LABEL_SETS):
        other = [c for c in range(C) if c not in L]
        y = np.r_[g.choice(L, 14), g.choice(other, 8), g.choice(C, 6)]
        x = g.integers(0, 256, (len(y), 3, S, S))
        for i, c in enumerate(y):                 # a little class signal
            x[i, c % 3] = np.clip(x[i, c % 3] + 40 * c, 0, 255)
        idx = np.arange(start, start + len(y))
        clients.append(datasets.ClientSplit(f"site{k}", idx[:14], idx[22:], idx[14:22], label_set=L))
        xs.append(x), ys.append(y)
        start += len(y)
    return datasets.Federation("ref", [f"c{c}" for c in range(C)],
                               torch.from_numpy(np.concatenate(xs).astype(np.uint8)),
                               torch.from_numpy(np.concatenate(ys).astype(np.int64)), clients)


def multi_label_fed() -> datasets.Federation:
    """3 clients of 20 training images (entries outside the label set missing, -1) and
    6 test images (complete labels); class 3 has a single positive, class 4 none."""
    g = np.random.default_rng(8)
    N = 3 * 26
    Y = (g.random((N, C)) < 0.4).astype(np.float32)
    x = g.integers(0, 256, (N, 3, S, S))
    for c in range(C):
        x[Y[:, c] == 1, c % 3, (c // 3) * 8:(c // 3) * 8 + 8] += 50
    y = torch.from_numpy(Y)
    clients = []
    for k, L in enumerate(LABEL_SETS):
        idx = np.arange(26 * k, 26 * (k + 1))
        train, test = idx[:20], idx[20:]
        miss = [c for c in range(C) if c not in L]
        y[torch.as_tensor(train)[:, None], torch.as_tensor(miss)[None, :]] = -1.0
        clients.append(datasets.ClientSplit(f"site{k}", train, test, label_set=L))
    y[torch.as_tensor(clients[2].train), 3] = 0.0                  # class 3: exactly one positive, so
    y[int(clients[2].train[5]), 3] = 1.0               # pos_weight_3 = #neg / 1
    return datasets.Federation("ref-ml", [f"d{c}" for c in range(C)],
                               torch.from_numpy(np.clip(x, 0, 255).astype(np.uint8)), y, clients)


def theta_g_file(tmp_path, multilabel: bool) -> str:
    """A starting model whose classifier is scaled up, so the teacher's probabilities
    spread over [0, 1] (single-label: class 4's bias is very low, so no client ever
    counts it and AWPA must keep its row)."""
    with fedmed.seeded(11, "ref-init"):
        sd = models.build("cnn", C).state_dict()
    sd["classifier.weight"] = sd["classifier.weight"] * 25
    if not multilabel:
        sd["classifier.bias"][4] = -30.0
    path = str(tmp_path / "theta_g.pt")
    torch.save(sd, path)
    return path


# ---------------------------------------------------------------- the reference, in plain torch

images = weak_view                                    # tests/helpers.py


def strong(x, gen):
    """The strong view of a weak batch: a translation by (dy, dx) in [-S/8, S/8] with zero
    fill, one cutout square of side S/4 centred at a random pixel, then contrast c in
    [0.75, 1.25] and brightness b in [-0.25, 0.25] about the image mean."""
    B, _, n, _ = x.shape
    m = max(1, n // 8)
    shift = torch.randint(-m, m + 1, (B, 2), generator=gen)
    c = 0.75 + 0.5 * torch.rand(B, 1, 1, 1, generator=gen)
    b = 0.5 * torch.rand(B, 1, 1, 1, generator=gen) - 0.25
    cut = torch.randint(0, n, (B, 2), generator=gen)
    out = torch.empty_like(x)
    pad = F.pad(x, (m, m, m, m))
    half = (n // 4) // 2
    for i in range(B):
        dy, dx = int(shift[i, 0]), int(shift[i, 1])
        out[i] = pad[i, :, m - dy:m - dy + n, m - dx:m - dx + n]      # out[y, x] = x[y - dy, x - dx]
        r = torch.arange(n)
        rows = (r >= int(cut[i, 0]) - half) & (r < int(cut[i, 0]) + half)
        cols = (r >= int(cut[i, 1]) - half) & (r < int(cut[i, 1]) + half)
        out[i, :, rows[:, None] & cols[None, :]] = 0
    mu = out.mean(dim=(1, 2, 3), keepdim=True)
    return (out - mu) * c + mu + b


class Stream:
    """Batches of `size` positions from concatenated random permutations of `pool`."""

    def __init__(self, pool, size, gen):
        self.pool, self.size, self.gen, self.buf = list(pool), size, gen, []

    def next(self):
        while len(self.buf) < self.size:
            self.buf += [self.pool[j] for j in torch.randperm(len(self.pool), generator=self.gen)]
        out, self.buf = self.buf[:self.size], self.buf[self.size:]
        return out


class Thresholds:
    """Applies thresholds and records how close any probability came to one."""

    def __init__(self):
        self.closest = 1.0

    def ge(self, t, tau):
        self.closest = min(self.closest, float((t - tau).abs().min()))
        return t >= tau

    def le(self, t, tau):
        return self.ge(t, tau).logical_not() | (t == tau)


def pl_single(rows, t, tau, L, th):
    """(PL-s): a labelled row keeps its one-hot ground truth; an unlabelled row gets
    onehot(argmax t) when max t >= tau and argmax t is outside L_k; else no target."""
    y = torch.zeros(len(rows), C)
    has = torch.zeros(len(rows), dtype=torch.bool)
    for i, label in enumerate(rows):
        if label >= 0:
            y[i, label], has[i] = 1.0, True
        else:
            top = int(t[i].argmax())
            if bool(th.ge(t[i, top], tau)) and top not in L:
                y[i, top], has[i] = 1.0, True
    return y, has


def pl_multi(Yrows, t, hi, lo, th):
    """(PL-m): observed entries keep the ground truth (mask 1); a missing entry is 1 when
    t >= hi, 0 when t <= lo, otherwise masked."""
    y, m = torch.zeros_like(t), torch.zeros_like(t, dtype=torch.bool)
    for i in range(len(t)):
        for c in range(C):
            if Yrows[i, c] >= 0:
                y[i, c], m[i, c] = Yrows[i, c], True
            elif bool(th.ge(t[i, c], hi)):
                y[i, c], m[i, c] = 1.0, True
            elif bool(th.le(t[i, c], lo)):
                y[i, c], m[i, c] = 0.0, True
    return y, m


def net(state):
    model = models.build("cnn", C)
    model.load_state_dict(state)
    return model


def probs(model, x, multilabel):
    z = model(x)
    return torch.sigmoid(z) if multilabel else F.softmax(z, dim=1)


def reference_client(fed, cfg, a, theta_g, k, pos_weight, ce_alpha, multilabel, th,
                     rnd=ROUND, opt_state=None):
    """One local update of client k in round `rnd` (sheet section 3, steps 1-4, and
    section 4). With cfg.optimizer "adam": the recipe's optimiser (sheet section 7), Adam
    with betas (0.9, 0.9999) and L2 weight decay, continuing from `opt_state` (the
    client's optimiser state after its previous round) when given; the returned upload
    carries the state after this round under "opt"."""
    client = fed.clients[k]
    L = client.label_set
    idx = np.r_[client.train, client.unlabeled]                       # labelled, then unlabelled
    if multilabel:
        Y = fed.y[torch.as_tensor(idx)].clone()
        rows = None
    else:                                                              # -1: no label known
        rows = [int(fed.y[i]) for i in client.train] + [-1] * len(client.unlabeled)
    student, teacher = net(theta_g), net(theta_g)                      # (1)
    teacher.eval()
    student.eval()
    with torch.no_grad():                                              # (2) UE under theta_g
        p = probs(student, images(fed, idx), multilabel)
    if multilabel:
        miss = [c for c in range(C) if c not in L]
        H = (-torch.special.xlogy(p[:, miss], p[:, miss])).mean(1)        # 0 log 0 = 0
    else:
        H = -torch.special.xlogy(p, p).sum(1)
    order = torch.argsort(H, descending=True)
    srt = H[order]
    for cut in (a.n_u, len(H) - a.n_c):                                # pools not on a tie
        assert float(srt[cut - 1] - srt[cut]) > 1e-5
    U = sorted(order[:a.n_u].tolist())
    Cf = sorted(order[len(H) - a.n_c:].tolist())
    P = sorted(set(range(len(idx))) - set(U))
    B_P = cfg.batch_size - a.batch_u
    gen = fedmed.torch_rng(SEED, "batches", rnd, k)
    lam_rng = fedmed.np_rng(SEED, "mixup", rnd, k)
    sP, sU, sC = Stream(P, B_P, gen), Stream(U, a.batch_u, gen), Stream(Cf, a.batch_u, gen)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(student.parameters(), lr=cfg.lr, betas=(0.9, 0.9999),
                               weight_decay=cfg.weight_decay)
        if opt_state is not None:
            opt.load_state_dict(copy.deepcopy(opt_state))
    else:
        opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
    q = torch.zeros(C, dtype=torch.long)
    q_pseudo = torch.zeros(C, dtype=torch.long)                        # its pseudo part
    seen = {"pseudo": 0, "none": 0, "mixed": 0}
    student.train()
    for _ in range(cfg.local_steps):                                   # (3)
        iP = sP.next()
        x_w = images(fed, idx[iP], gen)
        x_s = strong(x_w, gen)
        iU, iC = sU.next(), sC.next()
        x_u, x_c = images(fed, idx[iU]), images(fed, idx[iC])
        with torch.no_grad():                                          # the teacher, weak views
            tP, tU, tC = (probs(teacher, x, multilabel) for x in (x_w, x_u, x_c))
        if multilabel:
            yP, mP = pl_multi(Y[iP], tP, a.tau_hi, a.tau_lo, th)
            y_u, m_u = pl_multi(Y[iU], tU, a.tau_u, a.tau_u_lo, th)
            y_c, m_c = pl_multi(Y[iC], tC, a.tau_hi, a.tau_lo, th)
            q += ((yP == 1) & mP).sum(0)
            q_pseudo += ((yP == 1) & mP & (Y[iP] < 0)).sum(0)
            seen["pseudo"] += int((mP & (Y[iP] < 0) & (yP == 1)).sum())
            seen["none"] += int((~mP).sum())
            M_mix = m_u & m_c
        else:
            yP, hP = pl_single([rows[i] for i in iP], tP, a.tau_p, L, th)
            y_u, m_u = pl_single([rows[i] for i in iU], tU, a.tau_u, L, th)
            y_c, m_c = pl_single([rows[i] for i in iC], tC, a.tau_p, L, th)
            q += yP.sum(0).long()
            unl = torch.tensor([rows[i] < 0 for i in iP])
            q_pseudo += yP[unl].sum(0).long()
            seen["pseudo"] += int((hP & unl).sum())
            seen["none"] += int((~hP).sum())
            M_mix = m_u & m_c
        seen["mixed"] += int(M_mix.sum())
        lam = float(lam_rng.beta(a.mix_alpha, a.mix_alpha))            # (UDE)
        x_mix = lam * x_u + (1 - lam) * x_c
        y_mix = lam * y_u + (1 - lam) * y_c
        z = student(torch.cat([x_s, x_mix]))                           # one forward, one BN batch
        zP, zM = z[:B_P], z[B_P:]
        if multilabel:                                                 # (L-m)
            W = pos_weight[None, :] * mP.float()
            bce = -(yP * F.logsigmoid(zP) + (1 - yP) * F.logsigmoid(-zP))
            bce_m = -(y_mix * F.logsigmoid(zM) + (1 - y_mix) * F.logsigmoid(-zM))
            loss = (bce * W).mean() + a.lambda_ude * (bce_m * M_mix.float()).mean()
        else:                                                          # (L-s)
            y_mix = y_mix * M_mix[:, None].float()
            a_c = ce_alpha[None, :] if ce_alpha is not None else 1.0
            loss = (-(a_c * yP * F.log_softmax(zP, 1)).sum(1)).mean() \
                + a.lambda_ude * (-(a_c * y_mix * F.log_softmax(zM, 1)).sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():                                          # (EMA)
            sp = dict(student.named_parameters())
            for name, pt in teacher.named_parameters():
                pt.copy_(a.ema_decay * pt + (1 - a.ema_decay) * sp[name])
            sb = dict(student.named_buffers())
            for name, bt in teacher.named_buffers():
                bt.copy_(sb[name])
    up = {"w": {n: v.detach().clone() for n, v in student.state_dict().items()},
          "n": len(idx), "q": q, "q_pseudo": q_pseudo,                 # (4)
          "opt": copy.deepcopy(opt.state_dict())}
    return up, teacher, seen


def reference_awpa(theta_g, ups):
    """(AGG-f) and (AGG-c), in float64; a class with sum_j q_{j,c} = 0 keeps theta_g's row."""
    n = torch.tensor([float(u["n"]) for u in ups], dtype=torch.float64)
    Q = torch.stack([u["q"] for u in ups]).double()
    out = {}
    for key, v in theta_g.items():
        ts = torch.stack([u["w"][key] for u in ups]).double()
        if key.endswith("num_batches_tracked"):
            out[key] = torch.stack([u["w"][key] for u in ups]).max()
            continue
        if key in HEAD:
            rows = []
            for c in range(C):
                tot = Q[:, c].sum()
                rows.append(v[c].double() if tot == 0 else
                            sum(Q[k, c] / tot * ts[k, c] for k in range(len(ups))))
            out[key] = torch.stack(rows).to(v.dtype)
        else:
            out[key] = (sum(n[k] / n.sum() * ts[k] for k in range(len(ups)))).to(v.dtype)
    return out


def thresholds(fed, theta_g, multilabel):
    """Thresholds between the probabilities theta_g gives the clients' images."""
    model = net(theta_g).eval()
    if multilabel:
        vals = []
        for cl in fed.clients:
            with torch.no_grad():
                t = probs(model, images(fed, cl.train), True)
            vals.append(t[fed.y[torch.as_tensor(cl.train)] < 0])
        v = torch.cat(vals).sort().values
        q = lambda f: float(v[int(f * len(v))] + v[int(f * len(v)) + 1]) / 2   # noqa: E731
        return dict(tau_hi=q(0.7), tau_lo=q(0.3), tau_u=q(0.55), tau_u_lo=q(0.45))
    unl = np.concatenate([cl.unlabeled for cl in fed.clients])
    with torch.no_grad():
        v = probs(model, images(fed, unl), False).max(1).values.sort().values
    q = lambda f: float(v[int(f * len(v))] + v[int(f * len(v)) + 1]) / 2        # noqa: E731
    return dict(tau_p=q(0.3), tau_u=q(0.2))


# ---------------------------------------------------------------- the test

@pytest.mark.parametrize("multilabel,ce_weights,class_weights",
                         [(False, False, "inverse"), (False, True, "inverse"), (True, False, "inverse"),
                          (True, False, "none")],
                         ids=["single-label", "single-label-ce-weights", "multi-label",
                              "multi-label-no-pos-weight"])
def test_one_round_equals_the_sheet_recomputed_in_plain_torch(tmp_path, multilabel, ce_weights,
                                                               class_weights):
    """Steps (1)-(4), (UE), (PL), (UDE), (L), (EMA), (EDD), AWPA (AGG-f, AGG-c) and the
    prediction, recomputed here, against the hooks and against fedmed.run. With
    --ce-weights, CE_soft of (L-s) carries a_c = N / N_c of the pooled labelled images;
    multi-label with --class-weights none: pos_weight_c = 1 (W_c = m_c)."""
    fed = multi_label_fed() if multilabel else single_label_fed()
    path = theta_g_file(tmp_path, multilabel)
    theta_g = torch.load(path, weights_only=True)
    cfg = Config(algo="fedlsm", model="cnn", weights=path, rounds=1, batch_size=8,
                 local_steps=3, lr=0.05, momentum=0.9, weight_decay=1e-3, seed=SEED,
                 class_weights=class_weights)
    Lsm = fedmed.ALGORITHMS["fedlsm"]
    a = Lsm.Args(n_u=4, n_c=6, batch_u=2, ema_decay=0.5, ce_weights=ce_weights,
                 **thresholds(fed, theta_g, multilabel))
    pos_weight = ce_alpha = None
    if ce_weights:                            # a_c = N / N_c of the labelled images, 0 if none
        n_c = torch.bincount(fed.y[torch.as_tensor(np.concatenate([c.train for c in fed.clients]))],
                             minlength=C).float()
        ce_alpha = torch.where(n_c > 0, n_c.sum() / n_c.clamp(min=1), torch.zeros(C))
        assert (ce_alpha == 0).any() and len(set(ce_alpha.tolist())) > 2
    if multilabel:                            # #neg_c / #pos_c over the training entries
        Ytr = fed.y[torch.as_tensor(np.concatenate([c.train for c in fed.clients]))]
        pos, neg = (Ytr == 1).sum(0).float(), (Ytr == 0).sum(0).float()
        pos_weight = torch.where(pos > 0, neg / pos.clamp(min=1), torch.ones(C))
        assert pos_weight[4] == 1 and pos_weight[3] == (Ytr[:, 3] == 0).sum()   # 0 / 1 positive
        if class_weights == "none":
            pos_weight = torch.ones(C)

    th = Thresholds()
    ref = [reference_client(fed, cfg, a, theta_g, k, pos_weight, ce_alpha, multilabel, th)
           for k in range(len(fed.clients))]
    assert th.closest > 1e-4, "a probability sits on a threshold: change the data seed"
    seen = {key: sum(s[key] for _, _, s in ref) for key in ("pseudo", "none", "mixed")}
    assert min(seen.values()) > 0, seen       # every branch of (PL) and (UDE) was taken
    agg = reference_awpa(theta_g, [u for u, _, _ in ref])

    # the hooks, driven as the loop drives them
    algo = Lsm(cfg, a, fed)
    clients = fedmed.make_clients(fed)
    server = ServerState()
    algo.setup(server, clients)
    algo.round = ROUND
    algo.begin_round(server, clients)
    if multilabel and class_weights == "inverse":
        assert torch.allclose(server.state["pos_weight"], pos_weight)
    assert "pos_weight" not in server.state or class_weights == "inverse"
    uploads = {}
    for c, (want, teacher, _) in zip(clients, ref):
        payload, _ = transmit(algo.broadcast(server, c))
        uploads[c.id], _ = transmit(algo.local_update(c, payload))
        got = uploads[c.id]
        assert got["n"] == want["n"] and torch.equal(got["q"], want["q"]), c.name
        assert torch.equal(c.state["q_pseudo"], want["q_pseudo"]), c.name    # bench diagnostics
        for key, v in want["w"].items():
            assert torch.allclose(got["w"][key].double(), v.double(), **TOL), (c.name, key)
        tsd = algo.teacher.state_dict()
        for key, v in teacher.state_dict().items():
            assert torch.allclose(tsd[key].double(), v.double(), **TOL), (c.name, "teacher", key)
    algo.aggregate(server, uploads)
    if not multilabel:
        assert float(sum(u["q"][4] for u, _, _ in ref)) == 0     # a class nobody counted
        assert torch.equal(server.weights["classifier.weight"][4], theta_g["classifier.weight"][4])
    for key, v in agg.items():
        assert torch.allclose(server.weights[key].double(), v.double(), **TOL), key
    model = net(agg).eval()
    for c in clients:                         # the prediction: the aggregated global model
        with torch.no_grad():
            want = probs(model, images(fed, c.test), multilabel)
        got = torch.as_tensor(algo.predict(server, c, c.test))
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-4), c.name  # saturated: amplified rounding

    # the same round through the one round loop
    fedmed.run(cfg, a, fed, str(tmp_path / "run"), quiet=True)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    for key, v in agg.items():
        assert torch.allclose(ck["server"]["weights"][key].double(), v.double(), **TOL), key
    for saved, (want, _, _) in zip(ck["clients"], ref):
        assert torch.equal(saved["state"]["q"], want["q"])


@pytest.mark.parametrize("side", [8, 12, 32])
def test_strong_view_equals_the_reference_at_small_sides(side):
    """The strong view's shift bound max(1, S // 8) at sides where it is 1 (8, 12) and 4."""
    lsm = __import__("algorithms.fedlsm", fromlist=["strong_view"])
    x = torch.rand(6, 3, side, side, generator=torch.Generator().manual_seed(side))
    got = lsm.strong_view(x.clone(), torch.Generator().manual_seed(3))
    want = strong(x.clone(), torch.Generator().manual_seed(3))
    assert torch.allclose(got, want, atol=1e-6)


def test_mixing_runs_with_one_image_in_each_pool(tmp_path, monkeypatch):
    """(UDE) needs only one image in U and one in Cf, and a batch_u of 1."""
    lsm = __import__("algorithms.fedlsm", fromlist=["mixup"])
    fed = single_label_fed()
    path = theta_g_file(tmp_path, False)
    cfg = Config(algo="fedlsm", model="cnn", weights=path, rounds=1, batch_size=8,
                 local_steps=3, lr=0.05, seed=SEED)
    Lsm = fedmed.ALGORITHMS["fedlsm"]
    algo = Lsm(cfg, Lsm.Args(n_u=1, n_c=1, batch_u=1), fed)
    calls = []
    real = lsm.mixup
    monkeypatch.setattr(lsm, "mixup", lambda *a: calls.append(len(a[0])) or real(*a))
    clients = fedmed.make_clients(fed)
    server = ServerState()
    algo.setup(server, clients)
    algo.begin_round(server, clients)
    payload, _ = transmit(algo.broadcast(server, clients[0]))
    algo.local_update(clients[0], payload)
    assert calls == [1, 1, 1]


def test_awpa_with_one_upload_and_a_class_counted_once(tmp_path):
    """AGG-c when one client uploads (its rows are the new rows where it counted the
    class) and when a class total sum_j q_{j,c} is 1 (share 1 for that client)."""
    fed = single_label_fed()
    path = theta_g_file(tmp_path, False)
    theta_g = torch.load(path, weights_only=True)
    cfg = Config(algo="fedlsm", model="cnn", weights=path, rounds=1, seed=SEED)
    Lsm = fedmed.ALGORITHMS["fedlsm"]
    algo = Lsm(cfg, Lsm.Args(), fed)
    clients = fedmed.make_clients(fed)
    g = torch.Generator().manual_seed(5)

    def upload(n, q):
        w = {k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
             for k, v in theta_g.items()}
        return {"w": w, "n": n, "q": torch.tensor(q)}

    for ups in ([upload(30, [1, 0, 2, 0, 0])],
                [upload(30, [1, 0, 2, 0, 0]), upload(10, [0, 0, 1, 3, 0])]):
        server = ServerState()
        algo.setup(server, clients)
        algo.aggregate(server, {k: u for k, u in enumerate(ups)})
        want = reference_awpa(theta_g, ups)
        for key, v in want.items():
            assert torch.allclose(server.weights[key].double(), v.double(), **TOL), key


def test_two_rounds_of_the_recipe_optimiser_carry_each_clients_adam_state(tmp_path):
    """Sheet section 7, the recipe's optimiser: Adam lr, betas (0.9, 0.9999), L2 weight
    decay 5e-4, each client's state carried into its next round (the public code reloads
    it after loading theta_g). Two rounds recomputed here (steps (1)-(4), AWPA, the second
    round's Adam continuing from the first's moments and step counts) against the hooks,
    against fedmed.run (whose loop keeps the state in files between rounds), and the
    optimiser that ran: its class, betas, weight decay and step count."""
    fed = single_label_fed()
    path = theta_g_file(tmp_path, False)
    theta_g = torch.load(path, weights_only=True)
    Lsm = fedmed.ALGORITHMS["fedlsm"]
    r = Lsm.recipe
    cfg = Config(algo="fedlsm", model="cnn", weights=path, rounds=2, batch_size=8,
                 local_steps=3, lr=r["lr"], optimizer=r["optimizer"], weight_decay=r["weight_decay"],
                 keep_optimizer=r["keep_optimizer"], seed=SEED)
    a = Lsm.Args(n_u=4, n_c=6, batch_u=2, ema_decay=0.5, **thresholds(fed, theta_g, False))
    th = Thresholds()
    states, ups_by_round, g = [None] * 3, [], theta_g
    for rnd in range(2):
        ups = [reference_client(fed, cfg, a, g, k, None, None, False, th, rnd,
                                states[k])[0] for k in range(3)]
        states = [u["opt"] for u in ups]
        ups_by_round.append(ups)
        g = reference_awpa(g, ups)
    assert th.closest > 1e-4, "a probability sits on a threshold: change the data seed"

    algo = Lsm(cfg, a, fed)
    clients = fedmed.make_clients(fed)
    server = ServerState()
    algo.setup(server, clients)
    for rnd, want_ups in enumerate(ups_by_round):
        algo.round = rnd
        uploads = {}
        for c, want in zip(clients, want_ups):
            payload, _ = transmit(algo.broadcast(server, c))
            uploads[c.id], _ = transmit(algo.local_update(c, payload))
            for key, v in want["w"].items():
                assert torch.allclose(uploads[c.id]["w"][key].double(), v.double(), **TOL), \
                    (rnd, c.name, key)
            st = c.state["optimizer"]
            assert st["param_groups"][0]["betas"] == (0.9, 0.9999)
            assert st["param_groups"][0]["weight_decay"] == 5e-4
            assert all(float(v["step"]) == 3 * (rnd + 1) for v in st["state"].values())
            for i, v in want["opt"]["state"].items():
                assert torch.allclose(st["state"][i]["exp_avg_sq"], v["exp_avg_sq"], rtol=1e-3,
                                      atol=1e-12), (rnd, c.name, i)
        algo.aggregate(server, uploads)
    for key, v in g.items():
        assert torch.allclose(server.weights[key].double(), v.double(), **TOL), key
    assert isinstance(algo.make_optimizer(clients[0]), torch.optim.Adam)

    fedmed.run(cfg, a, fed, str(tmp_path / "run"), quiet=True)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    for key, v in g.items():
        assert torch.allclose(ck["server"]["weights"][key].double(), v.double(), **TOL), key
    assert json.load(open(tmp_path / "run" / "config.json"))["algorithm_info"] == {
        "adam_betas": [0.9, 0.9999], "batch": {"P": 6, "U": 2, "Cf": 2}}

