"""clip_svm reference step: one whole round recomputed in plain torch INSIDE THIS FILE from
../shared/methods/clip_svm.md, without calling any helper of algorithms/clip_svm.py, and
compared with what the hooks produce when driven as the loop drives them (broadcast ->
transmit -> local_update -> transmit -> aggregate -> predict), at float-rounding tolerance.

Recomputed (the labels of clip_svm.py's docstring; sheet sections 3-4):
  (A3) T_c = normalise(CLIP_text("a picture of a {class}")) with open_clip by hand, the
       tiny text tower drawn from the (seed, "clip-init") stream;
  (A1) the tower: torchvision mobilenet_v2 (weights=None) with classifier[1] replaced by
       the identity and P = Linear(1280, D), drawn in that order from (seed, "init");
  local update of each of two clients: two steps, each on the flip-augmented minibatch of
       the (seed, "batches", 0, k) stream, in train mode (BN batch statistics, dropout from
       the (seed, "local", 0, k) stream); I^ = normalise(P(g(x))) (A4);
       (L1) 1/2 [CE(s I^ T_y^T, arange) + CE(s T_y I^^T, arange)]   or
       (L2) CE(s I^ T^T, y); plus (L3) mu/2 sum ||w - w^t||^2 over the trainable tensors
       under --fl fedprox; one SGD step (momentum, weight decay) with TWO groups: the
       backbone at --backbone-lr, P at --lr;
  aggregation: every tensor sum_k n_k w_k / sum_k n_k (BN running statistics too,
       num_batches_tracked the maximum);
  prediction (A5): softmax(s I^ T^T) of the aggregated model in eval mode, on a client's
       test images and on the held-out client's.
The optimiser is SGD here (the recipe's AdamW divides by sqrt(v), which turns last-bit
differences of near-zero gradients into visible ones across CPUs); the AdamW groups are
checked in test_clip_svm.py.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import datasets
import fedmed
from fedmed import Config, ServerState, transmit
from helpers import register_clip_config, weak_view

import algorithms  # noqa: E402 - the methods register themselves

algorithms.load_all()

SEED, B, STEPS, LR, BLR, MOM, WD, S = 0, 8, 2, 0.01, 0.002, 0.9, 1e-3, 100.0
TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}}
NAME = "fedmed-clipsvm-ref"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return register_clip_config(tmp_path_factory, NAME, TINY)


@pytest.fixture(scope="module")
def fed():
    f = datasets.make_synthetic(seed=0, clients=3, image_size=32)
    f.holdout = datasets.take_holdout(f.clients, "site2", [])
    return f


def text_by_hand(fed):
    import open_clip
    with fedmed.seeded(SEED, "clip-init"):
        clip = open_clip.create_model(NAME, pretrained=None)
    clip.eval()
    tok = open_clip.get_tokenizer(NAME)
    with torch.no_grad():
        e = clip.encode_text(tok([f"a picture of a {c}" for c in fed.classes])).float()
    return F.normalize(e, dim=-1)


def tower_by_hand(D):
    with fedmed.seeded(SEED, "init"):
        g = torchvision.models.convnext_tiny(weights=None)
        g.classifier[2] = nn.Identity()
        P = nn.Linear(768, D)
    return g, P


def embed(g, P, x):
    return F.normalize(P(g(x)), dim=-1)


def local_by_hand(fed, g, P, T, client, loss_kind, mu):
    """Two SGD steps of client `client` from the current g, P (in place)."""
    w_t = {**{f"backbone.{n}": p.detach().clone() for n, p in g.named_parameters()},
           **{f"proj.{n}": p.detach().clone() for n, p in P.named_parameters()}}
    opt = torch.optim.SGD([{"params": list(g.parameters()), "lr": BLR},
                           {"params": list(P.parameters()), "lr": LR}],
                          momentum=MOM, weight_decay=WD)
    g.train()
    P.train()
    gen = fedmed.torch_rng(SEED, "batches", 0, client.id)
    y_all = fed.y
    with fedmed.seeded(SEED, "local", 0, client.id):
        perm = torch.as_tensor(client.train)[torch.randperm(client.n, generator=gen)]
        for step in range(STEPS):
            idx = perm[step * B:(step + 1) * B]
            x, y = weak_view(fed, idx, gen), y_all[idx]
            I = embed(g, P, x)
            if loss_kind == "contrastive":                                  # (L1)
                logits = S * I @ T[y].t()
                gt = torch.arange(len(idx))
                L = (F.cross_entropy(logits, gt) + F.cross_entropy(logits.t(), gt)) / 2
            else:                                                           # (L2)
                L = F.cross_entropy(S * I @ T.t(), y)
            if mu:                                                          # (L3)
                named = [(f"backbone.{n}", p) for n, p in g.named_parameters()] + \
                        [(f"proj.{n}", p) for n, p in P.named_parameters()]
                L = L + mu / 2 * sum(((p - w_t[n]) ** 2).sum() for n, p in named)
            opt.zero_grad()
            L.backward()
            opt.step()
    return {**{f"backbone.{k}": v.detach().clone() for k, v in g.state_dict().items()},
            **{f"proj.{k}": v.detach().clone() for k, v in P.state_dict().items()}}


@pytest.mark.parametrize("loss_kind,fl,mu", [("contrastive", "fedavg", 0.0),
                                             ("proto_ce", "fedprox", 0.3)])
def test_one_round_by_hand(fed, tiny, tmp_path, loss_kind, fl, mu):
    from algorithms import clip_svm as cs
    cfg = Config(algo="clip_svm", rounds=1, local_steps=STEPS, batch_size=B, lr=LR,
                 momentum=MOM, weight_decay=WD, optimizer="sgd", loss=loss_kind,
                 class_weights="none", seed=SEED)
    args = cs.Args(image_tower="convnext_t", clip_model=NAME, pretrained="none",
                   feature_cache=str(tmp_path), backbone_lr=BLR, fl=fl,
                   **({"mu": mu} if fl == "fedprox" else {}))
    algo = cs.ClipSVM(cfg, args, fed)
    clients, server = fedmed.make_clients(fed), ServerState()
    holdout = [fedmed.ClientState(-1, h.name, np.asarray(h.train), np.asarray(h.test))
               for h in fed.holdout]
    algo.attach(holdout, True)
    algo.setup(server, clients)
    algo.set_round(0)
    uploads = {}
    for c in clients:
        payload, _ = transmit(algo.broadcast(server, c))
        uploads[c.id], _ = transmit(algo.local_update(c, payload))
    algo.aggregate(server, uploads)

    T = text_by_hand(fed)
    assert torch.allclose(algo.model.text, T, atol=1e-6)                    # (A3)
    g0, P0 = tower_by_hand(T.shape[1])
    init = {**{f"backbone.{k}": v.clone() for k, v in g0.state_dict().items()},
            **{f"proj.{k}": v.clone() for k, v in P0.state_dict().items()}}
    assert set(init) == set(server.weights)
    hands = []
    for c in clients:
        g, P = tower_by_hand(T.shape[1])
        hand = local_by_hand(fed, g, P, T, c, loss_kind, mu)
        hands.append(hand)
        for k, v in hand.items():
            u = uploads[c.id]["w"][k].double()
            err = float((u - v.double()).abs().max()) if u.is_floating_point() else 0.0
            assert err <= 2e-5 + 1e-4 * float(v.double().abs().max()), (c.name, k, err)
    ns = [c.n for c in clients]
    assert ns[0] != ns[1]
    agg = {}
    for k in init:
        if k.endswith("num_batches_tracked"):
            agg[k] = torch.stack([h[k] for h in hands]).max()
        else:
            agg[k] = (sum(n * h[k].double() for n, h in zip(ns, hands)) / sum(ns)).float()
        assert torch.allclose(server.weights[k].double(), agg[k].double(), atol=2e-5,
                              rtol=1e-4), k
        moved = not torch.equal(agg[k], init[k])
        if k.startswith("proj.") or k.endswith("running_mean"):
            assert moved, k                                                 # it trained
    g, P = tower_by_hand(T.shape[1])
    g.load_state_dict({k[9:]: v for k, v in agg.items() if k.startswith("backbone.")})
    P.load_state_dict({k[5:]: v for k, v in agg.items() if k.startswith("proj.")})
    g.eval()
    for c in clients[:1] + holdout:                                         # (A5)
        with torch.no_grad():
            want = F.softmax(S * embed(g, P, weak_view(fed, c.test)) @ T.t(), dim=1)
        got = algo.predict(server, c, c.test)
        assert np.allclose(got, want.numpy(), atol=2e-5), c.name
