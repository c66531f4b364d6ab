"""FGASL reference step: one whole round recomputed in plain torch INSIDE THIS FILE from
../shared/methods/fgasl.md (sheet section 3 and 4; the equation labels are those of
algorithms/fgasl.py's docstring), without calling any helper of algorithms/fgasl.py, and
compared with what the hooks produce when driven as the loop drives them (broadcast ->
transmit -> local_update -> transmit -> aggregate -> predict), at float-rounding
tolerance.

Round r = 1 of R = 4 (so t = r I + i and the GA step (1 - r/R) are not trivial), two
clients, each starting from a persisted threshold tau and a pre-filled entropy buffer:
  (C1) student, static and dynamic teacher <- theta_g;
  (C2) I = 3 iterations: the labelled batch of the (seed, "batches", r, k) stream (the
       core's minibatches), the unlabelled batch of (seed, "unlabeled", r, k) (cycling
       permutations), flips and the strong view from (seed, "augment", r, k) in the
       order labelled flips, unlabelled flips, strong parameters, cutout centres;
       (DR-1..3) both teachers in eval mode on the weak view, mean prediction, mean
       entropy; the student's clean pass over [x^l, strong(x^u)] in train mode, the
       pooled feature F; (DR-4) q_t; (DR-5) tau <- d tau + (1 - d) Quantile(buffer of the
       last N_buf labelled entropies); (DR-6) u <= tau; (L-s) class-weighted CE with
       alpha_c = N / N_c on the pooled labelled images; (L-u) masked CE over |B_u|;
       (PIA) the second pass with Dropout2d after each of the CNN's three blocks (global
       generator of the (seed, "local", r, k) stream), MSE of the pooled features;
       L = L_s + L_u + lambda_f L_pert; one SGD step (momentum, weight decay);
       (EMA) the dynamic teacher;
  (C3) a_k = mean KL(p_g || p_k) over labelled + unlabelled images, eval mode;
Server: (GA-1..3) alpha from its previous value and the two gaps, (AGG) sum alpha_k
  theta_k over every floating tensor, num_batches_tracked the maximum.
Prediction: softmax of the aggregate in eval mode on a client's test images.
SGD here (Adam's sqrt(v) magnifies last-bit differences of near-zero gradients across
CPUs); the recipe's Adam is the core's make_optimizer, tested elsewhere.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets
import fedmed
import models
from fedmed import Config, ServerState, transmit

import algorithms  # noqa: E402

algorithms.load_all()
from algorithms import fgasl  # noqa: E402

SEED, B, BU, I, R, r = 0, 8, 6, 3, 4, 1
LR, MOM, WD = 0.05, 0.9, 1e-3
Q_S, Q_E, P_FP, LAM_F, D, DYN, TAU_D, NBUF = 0.2, 0.6, 0.3, 0.5, 0.3, 0.9, 0.7, 10
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TAU0 = [1.80, 1.75]
BUF0 = [1.0, 1.6, 2.0]
ALPHA0 = [0.3, 0.7]


@pytest.fixture(scope="module")
def fed():
    ns = datasets.namespace(dataset="synthetic", clients=2, image_size=16, unlabeled_fraction=0.6)
    return datasets.load(ns, seed=SEED)


def flip_by_hand(x, gen):
    u = torch.rand(len(x), 2, generator=gen)
    out = x.clone()
    for i in range(len(x)):
        if u[i, 0] < 0.5:
            out[i] = out[i].flip(2)
        if u[i, 1] < 0.5:
            out[i] = out[i].flip(1)
    return out


def strong_by_hand(x, gen):
    """Brightness, contrast (about the image mean), saturation (about the luma grey),
    each factor 0.5 + U; a Gaussian blur with probability 1/2 (kernel 3/5/7 from the 6th
    draw, sigma 0.1 + 1.9 U, reflect padding); a cutout square of side S/4; clamp.
    The blur is torch's depthwise conv2d, as in the method: the synthetic images have
    flat and clipped regions (max-pool ties), where a blur summed in another order moves
    the last bits enough to route a max-pool gradient elsewhere (1e-5 after 3 steps)."""
    n, _, S, _ = x.shape
    u = torch.rand(n, 6, generator=gen)
    cut = torch.randint(0, S, (n, 2), generator=gen)
    out = []
    for i in range(n):
        xi = x[i:i + 1] * (0.5 + u[i, 0])
        m = xi.mean(dim=(1, 2, 3), keepdim=True)
        xi = (xi - m) * (0.5 + u[i, 1]) + m
        grey = (0.299 * xi[:, 0] + 0.587 * xi[:, 1] + 0.114 * xi[:, 2]).unsqueeze(1)
        xi = grey + (0.5 + u[i, 2]) * (xi - grey)
        if u[i, 3] < 0.5:
            k = [3, 5, 7][min(int(u[i, 5] * 3), 2)]
            sigma = 0.1 + 1.9 * float(u[i, 4])
            g = torch.exp(-(torch.arange(k).float() - k // 2) ** 2 / (2 * sigma ** 2))
            g = g / g.sum()
            ker = (g[:, None] * g[None, :]).expand(3, 1, k, k)
            xi = F.conv2d(F.pad(xi, [k // 2] * 4, mode="reflect"), ker, groups=3)
        y0, x0, h = int(cut[i, 0]), int(cut[i, 1]), S // 4
        xi = xi.clone()
        xi[:, :, max(y0 - h // 2, 0):y0 + h // 2, max(x0 - h // 2, 0):x0 + h // 2] = 0
        out.append(xi[0].clamp(0, 1))
    return torch.stack(out)


def cnn_pass(model, x, drop):
    """The small CNN layer by layer; with drop, Dropout2d(P_FP) after each of its three
    blocks (the output of the max-pool). Returns (logits, pooled feature)."""
    h = x
    for j, layer in enumerate(model.features):
        h = layer(h)
        if drop and j in (3, 7, 11):
            h = F.dropout2d(h, P_FP, training=True)
    feat = h.mean(dim=(2, 3))
    return model.classifier(feat), feat


def H(p):
    return -(p * torch.log(p.clamp_min(1e-30))).sum(1)


def reference_client(fed, k, theta_g, alpha_w):
    c = fed.clients[k]
    student = models.build("cnn", fed.num_classes)
    student.load_state_dict(theta_g)
    static, dynamic = copy.deepcopy(student), copy.deepcopy(student)
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=MOM, weight_decay=WD)
    gen = fedmed.torch_rng(SEED, "batches", r, k)
    gen_u = fedmed.torch_rng(SEED, "unlabeled", r, k)
    gen_aug = fedmed.torch_rng(SEED, "augment", r, k)
    train, unl = torch.as_tensor(c.train), torch.as_tensor(c.unlabeled)
    assert len(train) >= B * I and len(unl) >= BU * I
    perm_l = train[torch.randperm(len(train), generator=gen)]
    perm_u = unl[torch.randperm(len(unl), generator=gen_u)]
    tau, buf = TAU0[k], torch.tensor(BUF0, dtype=torch.float64)
    margins, accepted, seen, correct = [], 0, 0, 0
    with fedmed.seeded(SEED, "local", r, k):
        for i in range(I):
            il, iu = perm_l[i * B:(i + 1) * B], perm_u[i * BU:(i + 1) * BU]
            x_l = flip_by_hand(fed.x[il].float() / 255, gen_aug)
            w_u = flip_by_hand(fed.x[iu].float() / 255, gen_aug)
            s_u = strong_by_hand(w_u, gen_aug)
            x_l, w_u, s_u = ((v - MEAN) / STD for v in (x_l, w_u, s_u))
            static.eval()
            dynamic.eval()
            with torch.no_grad():
                pS, pD = F.softmax(static(w_u), 1), F.softmax(dynamic(w_u), 1)
            y_hat = ((pS + pD) / 2).argmax(1)                             # (DR-2)
            u = (H(pS) + H(pD)) / 2                                       # (DR-3)
            student.train()
            x_in = torch.cat([x_l, s_u])
            z, feat = cnn_pass(student, x_in, drop=False)
            z_l, z_u = z[:B], z[B:]
            Hl = H(F.softmax(z_l.detach(), 1)).double()
            buf = torch.cat([buf, Hl])[-NBUF:]
            q = Q_S + (Q_E - Q_S) * (r * I + i) / (R * I)                 # (DR-4)
            tau = TAU_D * tau + (1 - TAU_D) * float(torch.quantile(buf, q))  # (DR-5)
            margins.append(float((u - tau).abs().min()))
            mask = (u <= tau).float()                                     # (DR-6)
            accepted += int(mask.sum())
            correct += int(((y_hat == fed.y[iu]).float() * mask).sum())
            seen += BU
            L_s = F.cross_entropy(z_l, fed.y[il], weight=alpha_w)          # (L-s)
            L_u = (mask * F.cross_entropy(z_u, y_hat, reduction="none")).sum() / BU
            _, feat_fp = cnn_pass(student, x_in, drop=True)
            L = L_s + L_u + LAM_F * ((feat - feat_fp) ** 2).mean()        # (PIA)
            opt.zero_grad()
            L.backward()
            opt.step()
            with torch.no_grad():                                         # (EMA)
                for pd, ps in zip(dynamic.parameters(), student.parameters()):
                    pd.copy_(DYN * pd + (1 - DYN) * ps)
                for bd, bs in zip(dynamic.buffers(), student.buffers()):
                    bd.copy_(bs)
    student.eval()
    static.eval()
    idx = torch.cat([train, unl])
    x = (fed.x[idx].float() / 255 - MEAN) / STD
    with torch.no_grad():
        pg = F.softmax(static(x).double(), 1)
        pk = F.softmax(student(x).double(), 1)
    a_k = (pg * (pg.log() - pk.log())).sum(1).mean()                    # (GAP)
    return {"w": student.state_dict(), "gap": a_k, "tau": tau, "buf": buf,
            "margin": min(margins), "accepted": accepted, "seen": seen, "correct": correct,
            "dynamic": dynamic.state_dict()}


def test_one_round_matches_the_sheet(fed):
    cfg = Config(algo="fgasl", rounds=R, local_steps=I, batch_size=B, optimizer="sgd", lr=LR,
                 momentum=MOM, weight_decay=WD, model="cnn", seed=SEED)
    args = fgasl.Args(q_s=Q_S, q_e=Q_E, p_fp=P_FP, lambda_f=LAM_F, ga_step=D,
                      dynamic_decay=DYN, tau_decay=TAU_D, buffer=NBUF, unlabeled_batch=BU)
    algo = fedmed.ALGORITHMS["fgasl"](cfg, args, fed)
    server, clients = ServerState(), fedmed.make_clients(fed)
    algo.attach([], True)
    algo.setup(server, clients)
    server.state["alpha"] = torch.tensor(ALPHA0, dtype=torch.float64)
    for k, c in enumerate(clients):
        c.state["tau"], c.state["buffer"] = TAU0[k], torch.tensor(BUF0, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)               # theta_g != the initialisation,
    for k, v in server.weights.items():                # so the teachers must load it
        if v.is_floating_point() and "running_var" not in k:
            server.weights[k] = v + 0.05 * torch.randn(v.shape, generator=g)
    theta_g = {k: v.clone() for k, v in server.weights.items()}
    # alpha_c = N / N_c over the pooled labelled training images
    y = np.concatenate([fed.y.numpy()[c.train] for c in fed.clients])
    counts = np.bincount(y, minlength=fed.num_classes)
    alpha_w = torch.tensor(np.where(counts > 0, len(y) / np.maximum(counts, 1), 0), dtype=torch.float32)

    algo.set_round(r)
    ups, dyn = {}, {}
    for c in clients:
        payload, down = transmit(algo.broadcast(server, c))
        ups[c.id], _ = transmit(algo.local_update(c, payload))
        dyn[c.id] = {k: v.clone() for k, v in algo.dynamic.state_dict().items()}
        assert set(payload["w"]) == set(theta_g)                       # (S1) every tensor
    refs = [reference_client(fed, k, theta_g, alpha_w) for k in range(2)]
    for k, ref in enumerate(refs):
        assert ref["margin"] > 1e-5                # no mask decision within rounding
        got = ups[k]["w"]
        for key, want in ref["w"].items():
            if want.is_floating_point():
                torch.testing.assert_close(got[key], want, rtol=1e-4, atol=2e-5, msg=key)
            else:
                assert torch.equal(got[key], want), key
        torch.testing.assert_close(ups[k]["gap"], ref["gap"], rtol=1e-3, atol=1e-8)
        assert abs(clients[k].state["tau"] - ref["tau"]) < 1e-5
        torch.testing.assert_close(clients[k].state["buffer"], ref["buf"], rtol=1e-5, atol=1e-6)
        assert clients[k].state["pl"]["accepted"] == ref["accepted"]
        assert clients[k].state["pl"]["correct"] == ref["correct"]
        for key, want in ref["dynamic"].items():                       # (EMA)
            torch.testing.assert_close(dyn[k][key].double(), want.double(), rtol=1e-4, atol=2e-5)
        assert clients[k].state["pl"]["seen"] == ref["seen"] == BU * I
    acc = sum(ref["accepted"] for ref in refs)
    assert 0 < acc < 2 * BU * I, acc               # the mask both accepts and rejects
    algo.aggregate(server, ups)
    # (GA-1..3) by hand
    a = [float(ref["gap"]) for ref in refs]
    m = max(abs(v) for v in a)
    raw = [min(max(ALPHA0[k] + a[k] / m * D / 3 * (1 - r / R), 0.0), 1.0) for k in range(2)]
    alpha = [v / sum(raw) for v in raw]
    torch.testing.assert_close(server.state["alpha"], torch.tensor(alpha, dtype=torch.float64),
                               rtol=1e-6, atol=1e-9)
    for key in theta_g:                            # (AGG)
        if key.endswith("num_batches_tracked"):
            assert int(server.weights[key]) == max(int(ref["w"][key]) for ref in refs)
        else:
            want = alpha[0] * refs[0]["w"][key].double() + alpha[1] * refs[1]["w"][key].double()
            torch.testing.assert_close(server.weights[key].double(), want, rtol=1e-4, atol=2e-5)
    # prediction: the aggregate in eval mode
    model = models.build("cnn", fed.num_classes)
    model.load_state_dict(server.weights)
    model.eval()
    idx = clients[0].test
    x = (fed.x[torch.as_tensor(idx)].float() / 255 - MEAN) / STD
    with torch.no_grad():
        want = F.softmax(model(x), 1).numpy()
    np.testing.assert_allclose(algo.predict(server, clients[0], idx), want, rtol=1e-4, atol=1e-5)
