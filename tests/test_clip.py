"""The CLIP methods (clip_adapters.py, algorithms/clip_zeroshot.py, clip_linear.py,
fedclip.py, facmic.py, fedmedclip.py), each property checked against a second,
independent computation. A tiny open_clip configuration is registered here (a two-layer
ViT and text transformer of width 64) and used with random weights: nothing is
downloaded."""
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clip_adapters as ca  # noqa: E402
import datasets  # noqa: E402
import fedmed  # noqa: E402
import run  # noqa: E402
from algorithms import facmic  # noqa: E402
from algorithms import fedmedclip as fmc  # noqa: E402
from fedmed import Config, ServerState, UsageError, transmit  # noqa: E402
from helpers import one_line_error  # noqa: E402

import algorithms  # noqa: E402 - the methods register themselves

algorithms.load_all()

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
OTHER = {"embed_dim": 16,                                   # another architecture
         "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 32},
         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny config registered in open_clip's model-config registry; returns the path
    of its .json (what --clip-model takes in a fresh process)."""
    import open_clip
    d = tmp_path_factory.mktemp("configs")
    path = d / "fedmed-tiny-test.json"
    path.write_text(json.dumps(TINY))
    (d / "fedmed-other-test.json").write_text(json.dumps(OTHER))
    open_clip.add_model_config(str(path))
    open_clip.add_model_config(str(d / "fedmed-other-test.json"))
    return str(path)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("clipcache"))


@pytest.fixture(scope="module")
def fed():
    return datasets.make_synthetic(seed=3, clients=3, image_size=32)


@pytest.fixture(scope="module")
def fed_holdout():
    f = datasets.make_synthetic(seed=3, clients=4, image_size=32)
    f.holdout = datasets.take_holdout(f.clients, "site3", [])
    return f


def make(algo, fed, cache, rounds=2, **kw):
    cls = fedmed.ALGORITHMS[algo]
    cfg = Config(**{"algo": algo, "rounds": rounds, **cls.recipe, "batch_size": 16})
    args = cls.Args(**{"clip_model": "fedmed-tiny-test", "pretrained": "none",
                       "feature_cache": cache, **kw})
    a = cls(cfg, args, fed)
    clients = fedmed.make_clients(fed)
    a.holdout = [fedmed.ClientState(-1 - i, c.name, np.asarray(c.train), np.asarray(c.test))
                 for i, c in enumerate(fed.holdout)]
    server = ServerState()
    a.setup(server, clients)
    return a, server, clients


def one_round(a, server, clients, log=None):
    uploads = {}
    for c in clients:
        payload, down = transmit(a.broadcast(server, c))
        upload, up = transmit(a.local_update(c, payload))
        if log is not None:
            log.append((a.broadcast(server, c), payload, upload, up, down))
        uploads[c.id] = upload
    if any(uploads.values()):
        a.aggregate(server, {k: u for k, u in uploads.items() if u})
    a.round += 1


def cli(tmp_path, tiny, cache, *flags, name="out"):
    out = str(tmp_path / name)
    base = ["--clip-model", tiny, "--pretrained", "none", "--feature-cache", cache, "--clients", "3",
            "--rounds", "2", "--batch-size", "16", "--quiet", "--out", out]
    return run.main(base + list(flags)), out


# ---------------------------------------------------------------- masked linear

def test_masked_linear_threshold_extremes_give_plain_linear_and_zero():
    torch.manual_seed(0)
    x = torch.randn(5, 12)
    for mode in ("paper", "code"):
        m = fmc.MaskedLinear(12, 7, mode).eval()
        plain = x @ m.weight.detach().t() + m.bias.detach()
        with torch.no_grad():
            m.threshold.fill_(-math.inf)
        assert torch.allclose(m(x), plain, atol=1e-6)                   # every row kept
        with torch.no_grad():
            m.threshold.zero_()                                          # u_r > 0.01: all kept
        assert torch.allclose(m(x), plain, atol=1e-6)
        with torch.no_grad():
            m.threshold.fill_(math.inf)
        out = m(x)
        if mode == "paper":
            assert torch.equal(out, torch.zeros_like(out))               # bias masked too
        else:
            assert torch.allclose(out, m.bias.detach().expand_as(out))   # code: bias unmasked
        with torch.no_grad():                                            # one row cut
            m.threshold.zero_()
            m.threshold[2] = math.inf
        out = m(x)
        assert torch.allclose(out[:, 2], torch.zeros(5) if mode == "paper" else m.bias[2].expand(5))
        keep = [r for r in range(7) if r != 2]
        assert torch.allclose(out[:, keep], plain[:, keep], atol=1e-6)


def test_threshold_gets_a_gradient_in_paper_mode_and_none_in_code_mode():
    torch.manual_seed(1)
    x = torch.randn(8, 16)
    grads = {}
    for mode in ("paper", "code"):
        torch.manual_seed(2)
        m = fmc.MaskedLinear(16, 6, mode)
        m(x).pow(2).sum().backward()
        grads[mode] = m.threshold.grad
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0
    assert grads["paper"] is not None and (grads["paper"] != 0).all()
    assert grads["code"] is None or torch.equal(grads["code"], torch.zeros(6))
    # straight-through: d out / d kappa_r = -sum_i x_i W_r (+ the bias term), by hand
    torch.manual_seed(2)
    m = fmc.MaskedLinear(16, 6, "paper")
    g_out = 2 * m(x).detach()
    hand = -((g_out * (x @ m.weight.detach().t() + m.bias.detach())).sum(0))
    assert torch.allclose(grads["paper"], hand, atol=1e-4)


def test_row_score_gradient_by_hand():
    """(2) u_r = mean_j |W_rj| through the mask: dL/dW_rj gets sign(W_rj) * dL/du_r / d_in
    (0 where W_rj = 0) on top of the linear path, dL/du_r = dL/dm_r * window (paper:
    |u_r - kappa_r| <= 1, code: > 1), and dL/dkappa_r = -dL/du_r; by hand, with an exact
    zero in W and thresholds on both sides of the window's edges."""
    for mode in ("paper", "code"):
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            m = fmc.MaskedLinear(48, 24, mode)
            with torch.no_grad():
                m.weight[0, :3] = 0.0
                m.threshold.copy_(torch.randn(24, generator=g))
            x, gy = torch.randn(6, 48, generator=g), torch.randn(6, 24, generator=g)
            (m(x) * gy).sum().backward()
            W, b, kappa = m.weight.detach(), m.bias.detach(), m.threshold.detach()
            z = W.abs().mean(1) - kappa
            mask = (z > 0.01).float()
            window = ((z.abs() <= 1) if mode == "paper" else (z.abs() > 1)).float()
            pre = x @ W.t() + (b if mode == "paper" else 0)             # what the mask scales
            g_u = (gy * pre).sum(0) * window                           # dL/du_r
            g_W = (gy * mask).t() @ x + torch.sign(W) * g_u[:, None] / W.shape[1]
            assert torch.allclose(m.weight.grad, g_W, atol=1e-5), mode
            assert torch.allclose(m.threshold.grad, -g_u, atol=1e-5), mode
            assert torch.equal(m.weight.grad[0, :3] == 0, (gy * mask).t()[0] @ x[:, :3] == 0)


def test_collapsed_mask_resets_threshold_in_training():
    m = fmc.MaskedLinear(8, 4, "paper")
    with torch.no_grad():
        m.threshold.fill_(5.0)                  # every row cut
    m.train()(torch.randn(3, 8))
    assert torch.equal(m.threshold.detach(), torch.zeros(4))


# ---------------------------------------------------------------- losses

def test_class_level_kl_equals_its_formula_by_hand():
    S = torch.tensor([[0.2, -0.1], [0.5, 0.3], [-0.4, 0.9]])
    O = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.3, -0.7]])
    tau, w = 2.0, 0.3
    total = 0.0
    for c in range(2):
        p = [math.exp(S[i, c] / tau) for i in range(3)]
        q = [math.exp(O[i, c] / tau) for i in range(3)]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        total += sum(w * q[i] * math.log(q[i] / p[i]) + (1 - w) * p[i] * math.log(p[i] / q[i])
                     for i in range(3))
    assert abs(fmc.class_level_kl(S, O, tau, w).item() - total / 2) < 1e-6
    shifted = O + torch.tensor([3.0, -2.0])                  # per-column constants
    assert abs(fmc.class_level_kl(O, shifted, tau, w).item()) < 1e-6
    half = fmc.class_level_kl(S, O, tau, 0.5)
    sym = (fmc.class_level_kl(S, O, tau, 1.0) + fmc.class_level_kl(S, O, tau, 0.0)) / 2
    assert torch.allclose(half, sym)


def test_ensemble_weight_is_the_entropy_ratio():
    g = torch.Generator().manual_seed(0)
    p_fam = F.softmax(torch.randn(6, 5, generator=g) * 2, 1)
    p_mlp = F.softmax(torch.randn(6, 5, generator=g) * 2, 1)
    H = lambda p: -(p.numpy() * np.log(p.numpy())).sum(1)  # noqa: E731
    w = H(p_fam) / (H(p_fam) + H(p_mlp))
    assert np.allclose(fmc.entropy_weight(p_fam, p_mlp).numpy(), w, atol=1e-6)
    ens = fmc.ensemble(p_fam, p_mlp).numpy()
    assert np.allclose(ens, w[:, None] * p_mlp.numpy() + (1 - w[:, None]) * p_fam.numpy(), atol=1e-6)
    assert np.allclose(ens.sum(1), 1, atol=1e-6) and (w >= 0).all() and (w <= 1).all()
    assert np.allclose(fmc.entropy_weight(p_mlp, p_fam).numpy(), 1 - w, atol=1e-6)   # swap heads
    onehot = F.one_hot(torch.tensor([1, 3]), 5).float() * (1 - 4e-6) + 1e-6
    uniform = torch.full((2, 5), 0.2)
    assert np.allclose(fmc.ensemble(uniform, onehot).numpy(), onehot.numpy(), atol=3e-3)
    code = -(p_fam.numpy() * torch.log_softmax(p_fam, 1).numpy()).sum(1)   # the code's "entropy"
    assert np.allclose(fmc.entropy(p_fam, "code").numpy(), code, atol=1e-6)


def test_contrastive_loss_by_hand_and_symmetric():
    img = F.normalize(torch.tensor([[1., 0., 0., 1.], [0., 1., 1., 0.], [1., 1., 0., 0.]]), dim=1)
    txt = F.normalize(torch.tensor([[1., 0., 1., 0.], [0., 1., 0., 1.], [1., 1., 1., 1.]]), dim=1)
    s = 10.0
    L = (img @ txt.t()).numpy() * s
    ce = lambda M: np.mean([-M[i, i] + np.log(np.exp(M[i]).sum()) for i in range(3)])  # noqa: E731
    assert abs(ca.contrastive_loss(img, txt, s).item() - (ce(L) + ce(L.T)) / 2) < 1e-5
    assert torch.allclose(ca.contrastive_loss(img, txt, s), ca.contrastive_loss(txt, img, s))


def test_lmmd_by_hand():
    g = torch.Generator().manual_seed(3)
    src, tgt = torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g)
    y = torch.tensor([0, 0, 1, 2])
    p = F.softmax(torch.randn(5, 3, generator=g), 1)
    p[:, 2] = 0.0                       # no target argmax in class 2: C' = {0, 1} (or fewer)
    total = torch.cat([src, tgt])
    d2 = ((total[:, None] - total[None]) ** 2).sum(-1)
    bw = d2.sum() / (9 * 9 - 9) / 4
    K = sum(torch.exp(-d2 / (bw * 2 ** i)) for i in range(5))
    common = sorted(set(y.tolist()) & set(p.argmax(1).tolist()))
    hand = 0.0
    for c in common:
        ws = (y == c).float() / (y == c).sum()
        wt = p[:, c] / p[:, c].sum()
        hand += ws @ K[:4, :4] @ ws + wt @ K[4:, 4:] @ wt - 2 * ws @ K[:4, 4:] @ wt
    hand = hand / len(common)
    assert torch.allclose(facmic.lmmd(src, tgt, y, p, 3), torch.as_tensor(hand), atol=1e-5)


def test_gaussian_kernel_bandwidths_by_hand():
    """k(a, b) = sum_{i<num} exp(-||a-b||^2 / (bw mul^i)), bw = mean off-diagonal squared
    distance / mul^(num // 2), for num and mul other than DSAN's 5 and 2."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, generator=g), torch.randn(2, 4, generator=g)
    t = torch.cat([a, b]).double()
    d2 = ((t[:, None] - t[None]) ** 2).sum(-1)
    for mul, num in ((2.0, 7), (3.0, 4)):
        bw = d2.sum() / (25 - 5) / mul ** (num // 2)
        ref = sum(torch.exp(-d2 / (bw * mul ** i)) for i in range(num))
        assert torch.allclose(facmic.gaussian_kernel(a, b, mul, num).double(), ref, atol=1e-5)


def test_fam_output_is_a_distribution_and_uniform_attention_is_zero_shot(fed, tiny, cache):
    a, server, clients = make("fedmedclip", fed, cache)
    I = a.features[:20]
    att = a.model.fam.eval()(I)
    assert (att >= 0).all() and torch.allclose(att.sum(1), torch.ones(20), atol=1e-5)
    assert torch.allclose(ca.adapt(att, I).norm(dim=1), torch.ones(20), atol=1e-5)
    uniform = torch.full_like(I, 1 / I.shape[1])
    zs = a.zero_shot(I).argmax(1)
    assert torch.equal((ca.adapt(uniform, I) @ a.text.t()).argmax(1), zs)


def test_clip_optimiser_is_torchs_fused_adam_with_the_sheets_weight_decay(fed, tiny, cache):
    """Sheet §7: FedCLIP / FACMIC train with Adam (L2: g += wd p), FedMedCLIP with AdamW
    (decoupled: p *= 1 - lr wd); make_optimizer builds torch's fused kernel of each, and
    six steps on two parameter groups equal Adam by hand (Kingma & Ba) with that weight
    decay, to float rounding, and differ from the other decay's."""
    def by_hand(start, grads, lrs, decoupled, wd=5.0):
        P = [p.clone() for p in start]
        m = [torch.zeros_like(p) for p in P]
        v = [torch.zeros_like(p) for p in P]
        for t, gs in enumerate(grads, 1):
            for i, (p, gr, lr) in enumerate(zip(P, gs, lrs)):
                if decoupled:
                    p.mul_(1 - lr * wd)
                else:
                    gr = gr + wd * p
                m[i] = 0.9 * m[i] + 0.1 * gr
                v[i] = 0.98 * v[i] + 0.02 * gr * gr
                p.sub_(lr * (m[i] / (1 - 0.9 ** t)) / ((v[i] / (1 - 0.98 ** t)).sqrt() + 1e-6))
        return P

    for algo, decoupled in (("fedmedclip", True), ("fedclip", False)):
        a, server, clients = make(algo, fed, cache)
        a.cfg.weight_decay = 5.0
        a.round = 2
        opt = a.make_optimizer(clients[0])
        assert type(opt) is (torch.optim.AdamW if decoupled else torch.optim.Adam), algo
        assert all(g["fused"] for g in opt.param_groups), algo
        params = [p for g in opt.param_groups for p in g["params"]]
        lrs = [g["lr"] for g in opt.param_groups for _ in g["params"]]
        start = [p.detach().clone() for p in params]
        g = torch.Generator().manual_seed(1)
        grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(6)]
        for gs in grads:
            opt.zero_grad(set_to_none=True)
            for p, gr in zip(params, gs):
                p.grad = gr.clone()
            opt.step()
        want, other = by_hand(start, grads, lrs, decoupled), by_hand(start, grads, lrs, not decoupled)
        for p, w in zip(params, want):
            assert torch.allclose(p.detach(), w, atol=1e-7, rtol=1e-5), algo
        assert not all(torch.allclose(p.detach(), o, atol=1e-7, rtol=1e-5)
                       for p, o in zip(params, other)), algo


# ---------------------------------------------------------------- communication

def test_fp16_zlib_round_trip_within_fp16_error():
    torch.manual_seed(0)
    fam = fmc.MaskedFAM(64, "paper", "batch")
    fam.train()(torch.randn(8, 64))                          # BN statistics, an int counter
    sd = fam.state_dict()
    blob = fmc.pack_fp16_zlib(sd)
    back = fmc.unpack_fp16_zlib(blob)
    assert list(back) == list(sd)
    for k, v in sd.items():
        if v.is_floating_point():
            assert back[k].dtype == torch.float32
            assert torch.equal(back[k], v.half().float())         # exactly fp16 rounding
            assert (back[k] - v).abs().max() <= v.abs().max() * 2 ** -11 + 1e-7
        else:
            assert torch.equal(back[k], v)
    default = fmc.pack_fp16_zlib(sd, strategy="default")             # zlib's own strategy
    import zlib
    assert zlib.decompress(default.numpy()) == zlib.decompress(blob.numpy())   # same bytes
    _, nbytes = transmit({"fam": blob})
    assert blob.dtype == torch.uint8 and blob.dim() == 1
    assert len(blob) < nbytes < len(blob) + 2048                  # the count is the blob's
    assert len(blob) < sum(v.numel() * 2 for v in sd.values() if v.is_floating_point()) + 1024


def test_upload_is_the_fam_only_and_the_mlp_never_travels(fed, tiny, cache):
    a, server, clients = make("fedmedclip", fed, cache)
    mlp_init = {c.id: {k: v.clone() for k, v in c.state["private"].items()} for c in clients}
    assert not any(torch.equal(mlp_init[0][k], mlp_init[1][k]) for k in mlp_init[0]
                   if k.endswith("weight") and mlp_init[0][k].dim() == 2)   # own phi_k each
    log = []
    one_round(a, server, clients, log)
    fam_keys = sorted(k for k in a.init_weights if k.startswith("fam."))
    mlp_tensors = [v for c in clients for v in list(c.state["private"].values()) +
                   list(mlp_init[c.id].values()) if v.dim() == 2]     # random matrices: findable
    for sent, received, upload, up, down in log:
        for payload in (received, upload):
            assert set(payload) <= {"fam", "n"}
            assert sorted(fmc.unpack_fp16_zlib(payload["fam"])) == fam_keys
            raw = io.BytesIO()
            torch.save(payload, raw)
            blobs = [raw.getvalue(), __import__("zlib").decompress(payload["fam"].numpy().tobytes())]
            for t in mlp_tensors:                          # no MLP bytes, fp32 or fp16
                for needle in (t.flatten()[:16].numpy().tobytes(),
                               t.flatten()[:16].half().numpy().tobytes()):
                    assert not any(needle in b for b in blobs)
        assert len(upload["fam"]) < up < len(upload["fam"]) + 2048      # counted: the blob
    for c in clients:                                      # the MLP did train, at home
        assert any(not torch.equal(c.state["private"][k], mlp_init[c.id][k]) for k in mlp_init[c.id])
    moved = [k for k in fam_keys if not torch.equal(server.weights[k], a.init_weights[k])]
    assert any(k.endswith("threshold") for k in moved)     # paper mode: kappa trains, is sent
    assert any(k.endswith("weight") for k in moved)        # the FAM moves (FedCLIP issue #38)


def test_code_mode_keeps_thresholds_home_and_uniform_average_by_hand(fed, tiny, cache):
    a, server, clients = make("fedmedclip", fed, cache, mask_compat="code")
    assert a.cfg.weighting == "uniform"                   # the recipe's: the public code's 1/K
    log = []
    one_round(a, server, clients, log)
    sent = fmc.unpack_fp16_zlib(log[0][2]["fam"])
    assert not any(k.endswith("threshold") for k in sent)
    assert all(torch.equal(server.weights[k], torch.zeros_like(server.weights[k]))
               for k in server.weights if k.endswith("threshold"))
    ups = [fmc.unpack_fp16_zlib(entry[2]["fam"]) for entry in log]
    k = "fam.fc1.weight"
    assert torch.allclose(server.weights[k], sum(u[k].double() for u in ups).float() / 3, atol=1e-7)


def test_fedmedclip_weighted_average_by_hand(fed, tiny, cache):
    """(8) with --weighting samples (the project's option): w_k = n_k / n."""
    a, server, clients = make("fedmedclip", fed, cache)
    a.cfg.weighting = "samples"
    g = torch.Generator().manual_seed(0)
    n = [2, 3, 5]
    ups = {i: {"fam": fmc.pack_fp16_zlib({k: torch.randn(v.shape, generator=g) for k, v in
                                         server.weights.items()}), "n": n[i]} for i in range(3)}
    a.aggregate(server, ups)
    dec = [fmc.unpack_fp16_zlib(ups[i]["fam"]) for i in range(3)]
    for k in server.weights:
        hand = (2 * dec[0][k] + 3 * dec[1][k] + 5 * dec[2][k]) / 10
        assert torch.allclose(server.weights[k], hand, atol=1e-6)


# ---------------------------------------------------------------- features and zero-shot

def test_zero_shot_is_the_argmax_of_cosine_computed_directly(fed, tiny, cache):
    a, server, clients = make("clip_zeroshot", fed, cache)
    import open_clip
    model = ca.build_clip(ca.resolve_model("fedmed-tiny-test"),
                          ca.WeightsSpec("none", None, "x"), seed=0)        # same seed stream
    idx = np.concatenate([c.test for c in clients])
    x = fed.x[torch.as_tensor(idx)].float() / 255
    mean = torch.tensor(ca.OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(ca.OPENAI_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = F.normalize(model.encode_image((x - mean) / std), dim=1)
        tok = open_clip.get_tokenizer("fedmed-tiny-test")
        txt = F.normalize(model.encode_text(tok([f"a picture of a {c}" for c in fed.classes])), dim=1)
    direct = (img @ txt.t()).argmax(1).numpy()
    probs = np.concatenate([a.predict(server, c, c.test) for c in clients])
    assert (probs.argmax(1) == direct).all()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    cached = a.features[torch.as_tensor(idx)]
    assert torch.equal(F.normalize(cached, dim=1), img)                     # cache == on the fly


def test_training_from_cached_features_is_bit_identical_to_encoding_on_the_fly(fed, tiny,
                                                                             tmp_path):
    """Sheet §11.8. FedMedCLIP trained for two rounds (a) on features read back from a
    warm on-disk cache, (b) on features computed in memory (--feature-cache none), (c)
    with every training batch's images encoded by CLIP at the step that uses them.

    By construction, (a) and (b) end with the same bits in every FAM and MLP tensor as
    the cold run that filled the cache: the cache stores the float32 that encode_images
    returns (the disk round trip is exact) and (a), (b) and the cold run compute every
    feature by the same function over the same blocks. (c) encodes other groups of
    images (training batches of 16 against extraction chunks of 7, the last of the 414
    images alone); encode_images always runs the image tower on blocks of ENCODE_BLOCK
    images (padded), so every product has one shape and takes one kernel path, which made
    (c) bit-identical on the CPUs measured (AVX-512, 1 and 2 threads; before the blocks,
    a lone image and a batch of 7 differed by up to 6e-7 there). Whether a row of a
    product of one shape gets the same bits at every position is up to the BLAS, so (c)
    is held to a stated tolerance instead: every feature it encodes lies within 1e-5 of
    the cached one (relative to their largest entry; an encoding bug moves features by
    O(1)), and its trained tensors are compared bit for bit when its features are the
    cached bits (as on the CPUs measured). They are not compared within a tolerance
    otherwise: Adam turns a 6e-7 feature difference into O(lr) steps on parameters
    whose gradient is ~0 (a bias before BatchNorm moved 2e-3 apart in two rounds)."""

    class OnTheFly(fmc.FedMedCLIP):
        seen = []

        def batch(self, idx, gen=None):
            idx = torch.as_tensor(idx, dtype=torch.long)
            I = self.backbone.encode_images(self.fed.x[idx])
            self.seen.append((idx, I))
            return I, self.fed.y[idx]

    store = str(tmp_path / "features")
    runs = {}
    for name, cls, cache in (("cold", fmc.FedMedCLIP, store), ("warm", fmc.FedMedCLIP, store),
                             ("memory", fmc.FedMedCLIP, "none"), ("on the fly", OnTheFly, "none")):
        cfg = Config(**{"algo": "fedmedclip", "rounds": 2, **cls.recipe, "batch_size": 16})
        a = cls(cfg, fmc.Args(clip_model="fedmed-tiny-test", pretrained="none", feature_cache=cache,
                              feature_batch_size=7, personal_fam="client"), fed)  # FAMs kept
        clients, server = fedmed.make_clients(fed), ServerState()
        a.setup(server, clients)
        for _ in range(2):
            one_round(a, server, clients)
        runs[name] = (a, server, clients)
    assert runs["cold"][0].backbone.stats["computed"] == len(fed.x)
    assert runs["warm"][0].backbone.stats["computed"] == 0          # read back from disk
    assert runs["warm"][0].backbone._model is None
    assert runs["on the fly"][0].backbone._model is not None       # CLIP ran in training
    ref = runs["cold"][0].features
    for name in ("warm", "memory"):
        assert torch.equal(runs[name][0].features, ref), name
    scale = ref.abs().max()
    assert OnTheFly.seen and all(len(idx) == 16 for idx, _ in OnTheFly.seen)
    for idx, I in OnTheFly.seen:                                     # (c): the same features
        assert (I - ref[idx]).abs().max() <= 1e-5 * scale
    fly_bits = all(torch.equal(I, ref[idx]) for idx, I in OnTheFly.seen)
    for n in (1, 2, 7, 17):                                          # any batch, any size
        assert (runs["memory"][0].backbone.encode_images(fed.x[:n]) - ref[:n]).abs().max() \
            <= 1e-5 * scale, n
    _, server0, clients0 = runs["cold"]
    for name, (a, server, clients) in runs.items():
        if name == "on the fly" and not fly_bits:
            continue                                                 # see the docstring
        assert server.weights.keys() == server0.weights.keys()
        for k, v in server.weights.items():                          # the shared FAM
            assert torch.equal(v, server0.weights[k]), (name, k)
        for c, c0 in zip(clients, clients0):                         # each client's FAM and MLP
            for part in ("private", "fam"):
                for k, v in c.state[part].items():
                    assert torch.equal(v, c0.state[part][k]), (name, c.name, k)


def test_features_are_computed_once_and_reused_by_other_algorithms(fed, tiny, tmp_path):
    store = str(tmp_path / "c")
    a, _, _ = make("clip_linear", fed, store)
    assert a.backbone.stats["computed"] == len(fed.x)
    b, _, _ = make("fedclip", fed, store)                   # another algorithm, same features
    assert b.backbone.stats["computed"] == 0
    assert b.backbone._model is None                        # text cached too: CLIP never built
    assert torch.equal(a.features, b.features)
    sub = datasets.make_synthetic(seed=3, clients=2, image_size=32)          # a subset of images
    c, _, _ = make("fedmedclip", sub, store)
    assert c.backbone.stats["computed"] == 0
    d, _, _ = make("fedclip", fed, store, clip_preprocess="imagenet")         # another key
    assert d.backbone.stats["computed"] == len(fed.x)


def test_checkpoint_file_loads_back_with_identical_outputs(tiny, tmp_path):
    spec = ca.resolve_model("fedmed-tiny-test")
    model = ca.build_clip(spec, ca.WeightsSpec("none", None, "x"), seed=123)
    x = torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "tiny.safetensors"))
    (tmp_path / "dir").mkdir()
    torch.save(model.state_dict(), tmp_path / "dir" / "open_clip_pytorch_model.bin")
    ref = ca.ClipBackbone(ca.ClipArgs(clip_model="fedmed-tiny-test", pretrained="none"), 123,
                          torch.device("cpu"), None).encode_images(x)
    for p in (str(path), str(tmp_path / "tiny.safetensors"), f"local-dir:{tmp_path / 'dir'}"):
        bb = ca.ClipBackbone(ca.ClipArgs(clip_model="fedmed-tiny-test", pretrained=p), 7,
                             torch.device("cpu"), None)
        assert bb.weights.kind == "file"
        assert torch.equal(bb.encode_images(x), ref), p    # other seed: the weights came from p


def test_unknown_tag_and_missing_weights_are_one_line_errors(tmp_path, tiny, cache, capsys):
    code, _ = cli(tmp_path, tiny, cache, "--algo", "clip_zeroshot", "--pretrained", "bogus_tag")
    one_line_error(capsys, code, "--pretrained", "bogus_tag", "local checkpoint")
    spec = ca.resolve_model("ViT-B-32")
    from open_clip import pretrained as ocp
    if ca._tag_local_file(ocp.get_pretrained_cfg("ViT-B-32", "openai")) \
            or ca._online():
        pytest.skip("the openai weights are reachable here: no offline error to check")
    with pytest.raises(UsageError) as e:
        ca.resolve_weights(spec, "openai", 0)
    msg = str(e.value)
    assert "openai" in msg and "download" in msg and "--pretrained PATH" in msg and "\n" not in msg
    code, _ = run.main(["--algo", "clip_zeroshot", "--clip-model", "ViT-B-32", "--image-size", "32",
                        "--clients", "2", "--quiet", "--out", str(tmp_path / "o2"),
                        "--feature-cache", cache]), None
    one_line_error(capsys, code, "openai", "need a download", "--pretrained PATH")


def test_bad_input_is_one_line_exit_2(tmp_path, tiny, cache, capsys):
    other = ca.build_clip(ca.resolve_model("fedmed-other-test"), ca.WeightsSpec("none", None, "x"), 0)
    wrong = tmp_path / "other.pt"
    torch.save(other.state_dict(), wrong)
    code, _ = cli(tmp_path, tiny, cache, "--algo", "fedmedclip", "--pretrained", str(wrong), name="a")
    one_line_error(capsys, code, str(wrong), "does not fit", "shape mismatch")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    code, _ = cli(tmp_path, tiny, cache, "--algo", "fedclip", "--pretrained", str(junk), name="b")
    one_line_error(capsys, code, str(junk), "cannot be read")
    code, _ = cli(tmp_path, tiny, cache, "--algo", "facmic", name="c")
    one_line_error(capsys, code, "facmic", "--holdout-client")
    npz = tmp_path / "numbers.npz"
    g = np.random.default_rng(0)
    np.savez(npz, train_images=g.integers(0, 255, (40, 8, 8), dtype=np.uint8),
             train_labels=g.integers(0, 3, (40, 1)))
    code, _ = cli(tmp_path, tiny, cache, "--algo", "fedmedclip", "--dataset", "medmnist",
                  "--data-dir", str(npz), name="d")
    one_line_error(capsys, code, "no class names for prompts", "--class-names")
    code, _ = cli(tmp_path, tiny, cache, "--algo", "clip_zeroshot", "--dataset", "medmnist",
                  "--data-dir", str(npz), "--class-names", "a,b", name="e")
    one_line_error(capsys, code, "--class-names", "3 classes")
    code, _ = cli(tmp_path, tiny, cache, "--algo", "fedmedclip", "--mask-compat", "both", name="f")
    one_line_error(capsys, code, "--mask-compat")
    code, _ = cli(tmp_path, tiny, cache, "--algo", "fedmedclip", "--clip-model", "NoSuchModel-X",
                  name="g")
    one_line_error(capsys, code, "--clip-model", "NoSuchModel-X")
    code, _ = cli(tmp_path, tiny, cache, "--algo", "clip_zeroshot", "--dataset", "medmnist",
                  "--data-dir", str(npz), "--class-names", "glioma,meningioma,no tumour", name="h")
    assert code == 0                                              # names given: it runs


def test_class_prompt_names():
    assert [ca.readable(c) for c in datasets.ISIC2019_CLASSES] == [
        "melanoma", "melanocytic nevus", "basal cell carcinoma", "actinic keratosis",
        "benign keratosis", "dermatofibroma", "vascular lesion", "squamous cell carcinoma"]
    assert [ca.readable(c) for c in datasets.HAM_CLASSES][3] == "actinic keratosis"
    assert ca.readable("glioma_tumor") == "glioma tumor"
    assert ca.readable("NoTumor") == "no tumor"
    assert ca.readable("COVID-19") == "COVID 19"
    with pytest.raises(UsageError):
        ca.prompt_templates("a photo of a cat")


def test_prompts_take_the_article_their_class_name_needs(fed, tiny, cache):
    """Sheet §3 prompt "a picture of a {class}" in English: "an" before a vowel ("a picture
    of an actinic keratosis"), "a" otherwise ("a picture of a melanoma"); the recorded
    prompts and the text features T_c (encoded by hand from those strings) agree."""
    import open_clip
    names = ["actinic keratosis", "melanoma", "unknown lesion", "basal cell carcinoma",
             "ink", "scar"]
    a, _, _ = make("fedclip", fed, cache, class_names=",".join(names))
    assert a.info["class_prompts"] == [
        "a picture of an actinic keratosis", "a picture of a melanoma",
        "a picture of an unknown lesion", "a picture of a basal cell carcinoma",
        "a picture of an ink", "a picture of a scar"]
    tok = open_clip.get_tokenizer("fedmed-tiny-test")
    with torch.no_grad():
        want = F.normalize(a.backbone.model.encode_text(tok(a.info["class_prompts"])), dim=1)
    assert torch.allclose(a.text, want, atol=1e-5)
    assert ca.fill_prompt("a picture of a {}", "actinic keratosis") == \
        "a picture of an actinic keratosis"
    assert ca.fill_prompt("a picture of a {}", "melanoma") == "a picture of a melanoma"
    assert ca.fill_prompt("A {} up close", "ulcer") == "An ulcer up close"
    assert ca.fill_prompt("an image of an {}", "nevus") == "an image of a nevus"
    assert ca.fill_prompt("a photo of {}", "eye") == "a photo of eye"      # no article: as is


def test_fedmedclip_defaults_are_the_public_codes_and_config_records_both_lr_sets(
        tmp_path, tiny, cache):
    """Sheet §3 / §7: with no flag given, FedMedCLIP averages the FAM with w_k = 1/K (the
    public code; n_k/n is the project's --weighting samples) and evaluates the personal
    view with the aggregated FAM (--personal-fam client is the project's option); sheet
    §10.7: config.json records the learning rates used and both published sets (README
    5e-5 / 1e-3, the defaults; script 5e-4 / 1e-4)."""
    code, out = cli(tmp_path, tiny, cache, "--algo", "fedmedclip", "--rounds", "1")
    assert code == 0
    cfg = json.load(open(Path(out) / "config.json"))
    assert cfg["config"]["weighting"] == "uniform"
    assert cfg["algorithm_args"]["personal_fam"] == "server"
    assert cfg["algorithm_info"]["learning_rates"] == {
        "used": {"eta_F": 5e-5, "eta_M": 1e-3}, "readme": {"eta_F": 5e-5, "eta_M": 1e-3},
        "script": {"eta_F": 5e-4, "eta_M": 1e-4}}
    code, out = cli(tmp_path, tiny, cache, "--algo", "fedmedclip", "--rounds", "1", "--lr", "5e-4",
                    "--lr-mlp", "1e-4", "--weighting", "samples", name="script")
    cfg = json.load(open(Path(out) / "config.json"))
    assert cfg["config"]["weighting"] == "samples"
    assert cfg["algorithm_info"]["learning_rates"]["used"] == {"eta_F": 5e-4, "eta_M": 1e-4}


def _deviations(module) -> str:
    doc = " ".join(module.__doc__.split())
    assert "Deviations" in doc, module.__name__
    return doc[doc.index("Deviations"):]


def test_docstrings_list_what_departs_from_the_sheet_and_the_public_code():
    """#19: each departure from the public code (or from what the sheet attributes to the
    paper) is listed under `Deviations:` of the method's docstring; FedMedCLIP's masked
    bias is marked [unverified] there and in the --mask-compat help."""
    from algorithms import fedclip
    d = _deviations(fedclip)
    for fact in ("1/K", "--weighting uniform", "ImageNet", "Resize 256", "CenterCrop 224",
                 '"a picture of a {class}"', "an actinic keratosis"):
        assert fact in d, fact
    assert "bare class name" not in fedclip.__doc__
    assert "ViT-B/16" in _deviations(facmic)
    d = _deviations(fmc)
    assert "[unverified] `--mask-compat paper` also masks the bias" in d
    assert "`--weighting samples`" in d and "`--personal-fam client`" in d
    assert "n_k/n aggregation weights" not in d                   # not presented as the paper's
    flag_help, = [a.help for a in run.build_parser()._actions if "--mask-compat" in a.option_strings]
    assert "[unverified]" in flag_help and "bias" in flag_help


def test_each_method_module_lives_in_its_own_file():
    """#19, one paper per file: clip_adapters.py keeps what the CLIP methods share; each
    method's modules live in its algorithm file (FedMedCLIP's masked layers and fp16 +
    zlib packing, FACMIC's FAM and LMMD, FedCLIP's adapter), torch does what it already
    can (the FAM's per-sample standardisation is a LayerNorm without affine; Adam is
    torch.optim's), and the dead code is gone."""
    import inspect
    from algorithms import fedclip
    homes = {fmc: ("_MaskStep", "MaskedLinear", "MaskedFAM", "MaskedMLP", "pack_fp16_zlib",
                   "unpack_fp16_zlib"),
             facmic: ("FeatureAttention", "gaussian_kernel", "lmmd"),
             fedclip: ("AttentionAdapter",)}
    for module, names in homes.items():
        for name in names:
            assert getattr(module, name).__module__ == module.__name__, name
            assert not hasattr(ca, name), name
    for gone in ("FusedAdam", "fused_adam_ok", "SampleStandardize", "_RowMeanAbs"):
        assert not hasattr(ca, gone) and not hasattr(fmc, gone), gone
    norm = fmc.MaskedFAM(8).norm
    assert type(norm) is torch.nn.LayerNorm and not norm.elementwise_affine and norm.eps == 1e-5
    x = torch.randn(4, 8) * 3 + 1
    assert torch.allclose(norm(x), (x - x.mean(1, keepdim=True))
                          / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-5), atol=1e-5)
    assert list(inspect.signature(ca._tag_local_file).parameters) == ["pcfg"]
    assert not hasattr(ca.FeatureStore(None, {}, "x"), "mem_h")


# ---------------------------------------------------------------- end to end (synthetic)

def test_quiet_also_silences_the_feature_extraction_bar(tmp_path, tiny, capsys):
    """--quiet means no progress bar at all: the feature extraction's neither (a cold
    feature cache each time, so that the features are computed)."""
    for quiet in (False, True):
        name = "quiet" if quiet else "loud"
        flags = ["--algo", "clip_zeroshot", "--clip-model", tiny, "--pretrained", "none",
                 "--feature-cache", str(tmp_path / f"cache-{name}"), "--clients", "3",
                 "--rounds", "1", "--out", str(tmp_path / name)] + (["--quiet"] if quiet else [])
        assert run.main(flags) == 0
        err = capsys.readouterr().err
        assert "clip features: computed" in err                  # it did extract
        bars = [s for s in err.splitlines() if "] " in s and " images (" in s]
        assert (bars == []) == quiet, err


def test_fedmedclip_cli_views_bytes_and_holdout(tmp_path, tiny, cache):
    code, out = cli(tmp_path, tiny, cache, "--algo", "fedmedclip", "--clients", "4",
                    "--holdout-client", "site3")
    assert code == 0
    lines = [json.loads(s) for s in open(Path(out) / "metrics.jsonl")]
    last = [m for m in lines if m["round"] == 2]
    for view in ("personal", "global"):
        names = {m["client"] for m in last if m["view"] == view}
        assert names == {"site0", "site1", "site2", "site3", "pooled"}
        assert [m["holdout"] for m in last if m["view"] == view and m["client"] == "site3"] == [True]
    s = json.load(open(Path(out) / "summary.json"))
    assert s["view"] == "personal" and "global" in s["views"] and "site3" in s["holdout"]
    cfg = json.load(open(Path(out) / "config.json"))
    assert cfg["config"]["lr"] == 5e-5 and cfg["config"]["weight_decay"] == 0.02   # the recipe
    per_round = s["bytes_up"] / 2 / 3                                 # 2 rounds, 3 clients
    fam_fp16 = 2 * (2 * (32 * 32 + 32 + 32))                          # weights, biases, kappas
    assert fam_fp16 * 0.5 < per_round < fam_fp16 + 2048               # fp16 + zlib, counted


@pytest.mark.parametrize("algo,extra", [("clip_zeroshot", []), ("clip_linear", []),
                                        ("clip_linear", ["--probe", "local"]), ("fedclip", []),
                                        ("facmic", ["--clients", "4", "--holdout-client", "site3"]),
                                        ("fedmedclip", ["--mask-compat", "code"])])
def test_every_clip_algorithm_runs_and_resumes(tmp_path, tiny, cache, algo, extra):
    code, out = cli(tmp_path, tiny, cache, "--algo", algo, *extra, "--rounds", "3",
                    "--stop-after", "1")
    assert code == 0
    code, _ = cli(tmp_path, tiny, cache, "--algo", algo, *extra, "--rounds", "3", "--resume")
    assert code == 0
    code, out2 = cli(tmp_path, tiny, cache, "--algo", algo, *extra, "--rounds", "3", name="ref")
    a = json.load(open(Path(out) / "summary.json"))
    b = json.load(open(Path(out2) / "summary.json"))
    assert a["balanced_accuracy"] == b["balanced_accuracy"]
    assert a["bytes_up"] == b["bytes_up"]
    if algo in ("clip_zeroshot",) or "local" in extra:
        assert a["bytes_up"] == 0


def test_fedavg_on_the_clip_image_encoder_builds(tiny):
    import models
    m = models.build(f"clip:{tiny}", 4)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert m(torch.randn(2, 3, 20, 20)).shape == (2, 4)          # resized to the tower's size
    assert sum(p.numel() for p in m.visual.parameters()) > 50_000
