"""FCU (algorithms/fcu.py): the MCU loss and FGMP against independent computations (numpy
FFTs, explicit formulas), the protocol (who trains when, what is sent), the baselines, the
audit's attack measurements, and bad input. Section 11 of ../shared/methods/fcu.md and
the tests issue 5 asks for."""
import dataclasses
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets
import fedmed
import run
from fedmed import Config, ServerState, transmit
from helpers import one_line_error, read_jsonl

import algorithms  # noqa: E402 - the methods register themselves

algorithms.load_all()
from algorithms import fcu  # noqa: E402
from algorithms.fcu import FCU  # noqa: E402
import unlearning_audit as ua  # noqa: E402

SMALL_ARGS = {"unlearn_steps": 4, "fusion_interval": 2, "post_rounds": 2,
              "post_local_steps": 2}


@pytest.fixture(scope="module")
def fed():
    return datasets.make_synthetic(seed=3, clients=3, image_size=16)


def small_cfg(**kw):
    return Config(**{"algo": "fcu", "model": "cnn", "rounds": 2, "local_steps": 3,
                     "batch_size": 8, **kw})


def make(fed, cfg=None, **kw):
    algo = FCU(cfg or small_cfg(), FCU.Args(**{**SMALL_ARGS, **kw}), fed)
    clients = fedmed.make_clients(fed)
    server = ServerState()
    algo.setup(server, clients)
    algo.begin_round(server, clients)
    return algo, clients


@pytest.fixture(scope="module")
def audit(fed, tmp_path_factory):
    """The whole protocol once on the small federation (u = client 1, backdoor on), with
    every training batch's indices recorded per phase and round."""
    seen = []
    original = FCU.batch

    def spy(self, idx, gen=None):
        if gen is not None:
            seen.append((self.phase, self.round, self.stage(), idx.tolist()))
        return original(self, idx, gen)

    out = str(tmp_path_factory.mktemp("fcu") / "out")
    FCU.batch = spy
    try:
        summary = FCU.protocol(small_cfg(), FCU.Args(**SMALL_ARGS, forget_client="1",
                                                     backdoor=True), fed, out, quiet=True)
    finally:
        FCU.batch = original
    return summary, out, seen


# ---------------------------------------------------------------- MCU

def test_mcu_loss_equals_its_formula_by_hand():
    g = torch.Generator().manual_seed(0)
    f, f_o, f_d = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    tau = 0.5
    got = fcu.mcu_loss(f, f_o, f_d, tau).item()
    a, o, d = f.numpy(), f_o.numpy(), f_d.numpy()
    cos = lambda x, y: (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)  # noqa
    pos, neg = np.exp(cos(a, d) / tau), np.exp(cos(a, o) / tau)
    want = np.mean(-np.log(pos / (pos + neg)))
    assert got == pytest.approx(want, rel=1e-12)


def test_one_step_on_f_moves_towards_f_d_and_away_from_f_o():
    """Toy vectors: f_d and f_o orthogonal unit axes, f between them (as the sheet)."""
    f = torch.tensor([[1.0, 1.0, 0.5], [0.3, 2.0, -1.0], [2.0, 0.2, 0.0]], requires_grad=True)
    f_d = torch.tensor([[1.0, 0.0, 0.0]]).expand(3, 3)
    f_o = torch.tensor([[0.0, 1.0, 0.0]]).expand(3, 3)
    before_d, before_o = F.cosine_similarity(f, f_d), F.cosine_similarity(f, f_o)
    fcu.mcu_loss(f, f_o, f_d, 0.5).backward()
    with torch.no_grad():
        f2 = f - 0.1 * f.grad
    assert (F.cosine_similarity(f2, f_d) > before_d).all()
    assert (F.cosine_similarity(f2, f_o) < before_o).all()


def test_references_get_no_gradient_and_keep_their_bn_buffers(fed):
    algo, clients = make(fed)
    theta_o = {k: v + 0.01 for k, v in algo.init_weights.items()
               if v.is_floating_point()}
    ref = algo.frozen(theta_o)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    x, _ = algo.batch(torch.as_tensor(clients[0].train[:8]), torch.Generator())
    f, _ = fcu.penultimate(ref, ref.get_submodule(algo.head_name), x)
    assert not f.requires_grad and not ref.training
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())


def test_penultimate_features_are_the_classifier_input(fed):
    algo, clients = make(fed)
    x, _ = algo.batch(torch.as_tensor(clients[0].train[:4]))
    algo.model.eval()
    f, logits = fcu.penultimate(algo.model, algo.model.classifier, x)
    want = algo.model.features(x).mean(dim=(2, 3))
    assert torch.allclose(f, want) and torch.allclose(logits, algo.model.classifier(want))
    assert not algo.model.classifier._forward_pre_hooks          # the hook is removed


# ---------------------------------------------------------------- FGMP

def hand_fuse(base, donor, r, symmetric=True):
    """FGMP with numpy's FFT and explicit index loops for the window."""
    def mat(w):
        if w.ndim == 4:
            n, c, kh, kw = w.shape
            return np.transpose(w, (1, 2, 3, 0)).reshape(c * kh, kw * n)
        return w
    mb, md = mat(base.astype(np.float64)), mat(donor.astype(np.float64))
    h, w = mb.shape
    fb, fd = np.fft.fftshift(np.fft.fft2(mb)), np.fft.fftshift(np.fft.fft2(md))
    bh, bw = math.floor(h * r / 2), math.floor(w * r / 2)
    inside = np.zeros((h, w), bool)
    if bh and bw:
        for i in range(h):
            for j in range(w):
                di, dj = i - h // 2, j - w // 2
                if symmetric:
                    inside[i, j] = -bh <= di <= bh and -bw <= dj <= bw
                else:
                    inside[i, j] = -bh <= di < bh and -bw <= dj < bw
    amp = np.where(inside, np.abs(fd), np.abs(fb))
    m = np.fft.ifft2(np.fft.ifftshift(amp * np.exp(1j * np.angle(fb)))).real
    if base.ndim == 4:
        n, c, kh, kw = base.shape
        return np.transpose(m.reshape(c, kh, kw, n), (3, 0, 1, 2))
    return m


SHAPES = [(6, 4, 3, 3), (8, 5, 1, 1), (7, 12), (3, 10), (10, 3)]   # (10, 3): b_w = 1 at r 0.7


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", [0.0, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("kind", ["symmetric", "code"])
def test_fuse_equals_an_independent_numpy_computation(shape, r, kind):
    g = torch.Generator().manual_seed(hash((shape, r)) % 1000)
    base, donor = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    got = fcu.fuse(base, donor, r, kind).double().numpy()
    want = hand_fuse(base.numpy(), donor.numpy(), r, kind == "symmetric")
    assert np.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", [0.0, 0.5, 0.7, 1.0])
def test_fuse_of_a_weight_with_itself_is_the_identity(shape, r):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(fcu.fuse(w, w, r), w, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_ratio_0_returns_the_base_and_ratio_1_the_donor(shape):
    """r = 0: the base, whatever the donor. r = 1: the donor's whole amplitude with the
    base's phase, i.e. the donor itself whenever the two share their phase; tested with
    a donor built from the base's phase and an unrelated (Hermitian) amplitude."""
    g = torch.Generator().manual_seed(3)
    base, other = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    assert torch.allclose(fcu.fuse(base, other, 0.0), base, atol=1e-6)
    mb = fcu.as_matrix(base.double())
    amp = torch.fft.fft2(fcu.as_matrix(other.double())).abs()
    donor_m = torch.fft.ifft2(torch.polar(amp, torch.fft.fft2(mb).angle()))
    assert donor_m.imag.abs().max() < 1e-9
    donor = fcu.from_matrix(donor_m.real, base).float()
    assert torch.allclose(fcu.fuse(base, donor, 1.0), donor, atol=1e-5)
    assert torch.allclose(fcu.fuse(base, 2 * base, 1.0), 2 * base, atol=1e-5)


def test_code_window_size_and_symmetric_window():
    for h, w, r in [(8, 12, 0.5), (7, 9, 0.7), (2, 1024, 0.5), (16, 16, 1.0)]:
        code = fcu.window(h, w, r, "code")
        bh, bw = math.floor(h * r / 2), math.floor(w * r / 2)
        assert int(code.sum()) == (2 * bh) * (2 * bw)
        sym = fcu.window(h, w, r, "symmetric")
        # Hermitian: frequency (a, b) inside <=> (-a, -b) inside (indices mod the size)
        for i, j in sym.nonzero().tolist():
            a, b = i - h // 2, j - w // 2
            assert sym[(-a + h // 2) % h, (-b + w // 2) % w]
    assert int(fcu.window(2, 1024, 0.5, "code").sum()) == 0       # pitfall 5: not fused


def test_code_window_leaves_an_imaginary_residue_the_symmetric_one_does_not():
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(4))
    d = torch.randn(16, 24, generator=torch.Generator().manual_seed(5))
    fcu.fuse(w, d, 0.5, "symmetric")                 # asserts the residue < 1e-6
    mb, md = w.double(), d.double()
    fb, fd = (torch.fft.fftshift(torch.fft.fft2(m)) for m in (mb, md))
    amp = torch.where(fcu.window(16, 24, 0.5, "code"), fd.abs(), fb.abs())
    out = torch.fft.ifft2(torch.fft.ifftshift(torch.polar(amp, fb.angle())))
    assert out.imag.abs().max() > 1e-4 * out.real.abs().max()


def test_conventions_are_the_same_fusion_with_the_roles_swapped(fed):
    algo, _ = make(fed)
    g = torch.Generator().manual_seed(6)
    cur = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
           for k, v in algo.init_weights.items()}
    orig = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in algo.init_weights.items()}
    paper = fcu.fgmp(cur, orig, algo.fused, 0.7, "paper")
    code = fcu.fgmp(orig, cur, algo.fused, 0.7, "code")
    for k in algo.fused:
        assert torch.equal(paper[k], code[k])
    bn = [k for k in cur if k not in algo.fused]
    assert bn and all(torch.equal(paper[k], cur[k]) for k in bn)          # paper: base = theta
    assert all(torch.equal(fcu.fgmp(cur, orig, algo.fused, 0.7, "code")[k], orig[k])
               for k in bn)                                              # code: base = theta_o
    assert all(torch.equal(fcu.fgmp(cur, orig, algo.fused, 0.7, "paper", bn_from="orig")[k],
                           orig[k]) for k in bn)
    assert sorted(algo.fused) == ["classifier.weight", "features.0.weight",
                                  "features.4.weight", "features.8.weight"]


# ---------------------------------------------------------------- the protocol

def test_forgotten_client_never_trains_after_the_request(audit, fed):
    summary, out, seen = audit
    u = set(fed.clients[1].train.tolist())
    touches = lambda phase, stage=None: [r for r in seen if r[0] == phase and  # noqa: E731
                                         (stage is None or r[2] == stage) and u & set(r[3])]
    assert touches("original")                               # u trained in the original
    for phase in ("retrain", "continue"):
        assert not touches(phase)
    for phase in ("pga", "fcu", "fcu_code"):
        assert touches(phase, "unlearn") and not touches(phase, "post")
        unlearn = [r for r in seen if r[0] == phase and r[2] == "unlearn"]
        assert all(set(r[3]) <= u for r in unlearn)          # unlearning reads only D_f
    for phase in ("retrain", "continue", "fcu"):
        lines = read_jsonl(os.path.join(out, phase, "metrics.jsonl"))
        u_lines = [m for m in lines if m["client"] == fed.clients[1].name]
        sent = [m["round"] for m in u_lines if m["bytes_up"]]
        assert sent == ([1] if phase == "fcu" else [])      # u uploads once, in FCU only
        assert all(m["bytes_down"] == 0 for m in u_lines)   # and is sent nothing


def test_bytes_are_one_model_plus_post_training(audit, fed):
    summary, out, _ = audit
    algo, clients = make(fed)
    up = {c.id: transmit({"w": algo.init_weights, "n": c.n})[1] for c in clients}
    model = transmit({"w": algo.init_weights})[1]
    s = json.load(open(os.path.join(out, "fcu", "summary.json")))
    K, R_post, u = len(fed.clients), SMALL_ARGS["post_rounds"], 1
    assert s["bytes_down"] == (K - 1) * R_post * model
    assert s["bytes_up"] == up[u] + R_post * sum(up[k] for k in up if k != u)


def batch_sizes(n, B, steps):
    """Sizes of the minibatches of `steps` steps cycling through permutations of n
    images, a final batch of 1 skipped (as fedmed's schedule)."""
    sizes, per = [], [min(B, n - s) for s in range(0, n, B)]
    per = [b for b in per if b >= 2 or n < 2]
    while len(sizes) < steps:
        sizes += per
    return sizes[:steps]


def test_costs_are_counted_and_the_speedup_is_their_ratio(audit, fed):
    summary, out, _ = audit
    cfg, B = small_cfg(), 8
    u = 1
    n = [len(c.train) for c in fed.clients]
    rest = [k for k in range(len(n)) if k != u]
    a = summary["audit"]
    assert a["original"]["grad_samples"] == cfg.rounds * sum(sum(batch_sizes(m, B, 3)) for m in n)
    assert a["retrain"]["grad_samples"] == cfg.rounds * sum(sum(batch_sizes(n[k], B, 3))
                                                            for k in rest)
    post = SMALL_ARGS["post_rounds"] * sum(sum(batch_sizes(n[k], B, 2)) for k in rest)
    assert a["continue"]["grad_samples"] == post
    assert a["fcu"]["grad_samples"] == sum(batch_sizes(n[u], B, 4)) + post
    assert summary["speedup_vs_retrain"] == pytest.approx(
        a["retrain"]["grad_samples"] / a["fcu"]["grad_samples"])
    assert summary["speedup_vs_retrain_wall"] == pytest.approx(
        a["retrain"]["train_seconds"] / a["fcu"]["train_seconds"])
    for m in ("original", "retrain", "continue", "pga", "fcu", "fcu_code"):
        for k in ("test_balanced_accuracy", "test_auroc", "forgotten_accuracy",
                  "remaining_balanced_accuracy", "mia_member_rate", "mia_attack_auroc",
                  "mia_loss_auroc", "backdoor_success"):
            assert 0 <= a[m][k] <= 1
        assert a[m]["forgotten_error"] == pytest.approx(1 - a[m]["forgotten_accuracy"])


def test_every_method_starts_from_the_same_original_model(audit, fed):
    _, out, _ = audit
    theta_o = torch.load(os.path.join(out, "original", "checkpoint.pt"),
                         weights_only=False)["server"]["weights"]
    for phase in ("continue", "pga", "fcu"):
        ck = torch.load(os.path.join(out, phase, "checkpoint.pt"), weights_only=False)
        assert all(torch.equal(ck["server"]["state"]["theta_o"][k], v) for k, v in theta_o.items())


def test_retrain_equals_fedavg_without_the_client_bit_for_bit(fed, tmp_path):
    """Same seed streams: retraining without the last client is FedAvg on the federation
    from which that client was removed."""
    cfg = small_cfg(class_weights="inverse")
    args = FCU.Args(**SMALL_ARGS, forget_client=str(len(fed.clients) - 1), phase="retrain")
    fedmed.run(cfg, args, fed, str(tmp_path / "retrain"), quiet=True)
    without = dataclasses.replace(fed, clients=fed.clients[:-1])
    fedmed.run(dataclasses.replace(cfg, algo="fedavg"), None, without,
               str(tmp_path / "fedavg"), quiet=True)
    a = torch.load(tmp_path / "retrain" / "checkpoint.pt", weights_only=False)["server"]["weights"]
    b = torch.load(tmp_path / "fedavg" / "checkpoint.pt", weights_only=False)["server"]["weights"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unlearning_with_zero_steps_of_change_returns_theta_o(fed, audit):
    """With a zero learning rate, MCU changes nothing and FGMP of theta_o with itself is
    the identity: the upload is theta_o."""
    _, out, _ = audit
    algo, clients = make(fed, forget_client="1", unlearn_lr=0.0, phase="fcu",
                         from_run=os.path.join(out, "original"))
    up = algo.mcu_fgmp(clients[1])
    for k in algo.fused:
        assert torch.allclose(up[k], algo.theta_o[k], atol=1e-6)


def test_pga_reference_model_and_projection(fed, audit):
    _, out, _ = audit
    algo, clients = make(fed, forget_client="1", phase="pga", pga_lr=10.0, pga_epochs=1,
                         pga_stop_accuracy=-1.0,
                         from_run=os.path.join(out, "original"))
    c = clients[1]
    n, n_u = sum(x.n for x in clients), c.n
    ref = algo.reference_model(c)
    k = "classifier.weight"
    hand = (n * algo.theta_o[k].double() - n_u * c.state["last_local"][k].double()) / (n - n_u)
    assert torch.allclose(ref[k].double(), hand, atol=1e-6)
    delta = algo.pga_radius(ref)
    w = algo.pga(c)
    keys = [name for name, p in algo.model.named_parameters()]
    dist = math.sqrt(sum(float((w[q].double() - ref[q].double()).pow(2).sum()) for q in keys))
    assert 0 < dist <= delta * (1 + 1e-5)                   # lr 10 hits the ball's edge


# ---------------------------------------------------------------- the audit's attacks

def test_trigger_only_on_the_forgotten_clients_training_images(fed):
    algo, clients = make(fed, forget_client="1", backdoor=True, backdoor_fraction=0.5,
                         backdoor_target="2")
    poisoned = set(torch.nonzero(algo.poison).flatten().tolist())
    assert poisoned and poisoned <= set(clients[1].train.tolist())
    pool = [i for i in clients[1].train if fed.y[i] != 2]
    assert len(poisoned) == min(round(0.5 * clients[1].n), len(pool))
    assert all(fed.y[i] != 2 for i in poisoned)
    every = torch.as_tensor(np.concatenate([c.train for c in clients] +
                                           [c.test for c in clients]))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x, y = algo.batch(every, g1)
    x0, y0 = fedmed.Algorithm.batch(algo, every, g2)          # the same flips, no trigger
    changed = (x != x0).flatten(1).any(1) | (y != y0)
    assert set(every[changed].tolist()) == poisoned
    assert (y[changed] == 2).all()
    s, pattern = ua.trigger(16, 0.125)
    assert s == 2 and torch.allclose(x[changed][:, :, -s:, -s:], ua.stamp(x0[changed], 0.125)
                                     [:, :, -s:, -s:])
    xe, ye = algo.batch(every)                                 # evaluation: never stamped
    assert torch.equal(ye, fed.y[every])
    assert torch.equal(xe, fedmed.Algorithm.batch(algo, every)[0])


def test_mia_of_an_untrained_model_is_near_half(fed):
    algo, clients = make(fed)
    audit = algo.audit.model(algo.init_weights)
    assert abs(audit["mia_loss_auroc"] - 0.5) < 0.12
    assert abs(audit["mia_attack_auroc"] - 0.5) < 0.15


def test_paper_defaults():
    a = FCU.Args()
    assert (a.unlearn_steps, a.fusion_interval, a.fgmp_ratio, a.mcu_tau, a.unlearn_lr,
            a.post_rounds, a.post_local_steps, a.post_lr, a.post_weighting,
            a.fgmp_convention, a.forget_client) == (100, 10, 0.7, 0.5, 1e-5, 20, 20, 1e-4,
                                                    "uniform", "paper", "0")
    assert FCU.recipe["batch_size"] == 64
    # PGA (Halimi et al.: radius 1/3 of the distance to random models; stop at chance)
    # and the backdoor check, as documented in fcu.py
    assert (a.pga_lr, a.pga_epochs, a.pga_radius, a.pga_stop_accuracy) == (0.01, 5, 1 / 3, 0.0)
    assert (a.backdoor, a.backdoor_fraction, a.backdoor_patch) == (False, 0.2, 0.125)
    assert (a.phase, a.from_run, a.reuse_original) == ("audit", "", "")
    # the release's post-training Adam (issue #19) and the BN rule (no D_f statistics)
    assert (a.post_beta2, a.post_weight_decay, a.unlearn_bn_stats) == (0.9999, 5e-4, "start")
    text = run.build_parser().format_help()            # set by the protocol, not by a user
    assert "--phase" not in text and "--from-run" not in text and "--fgmp-ratio" in text


def test_trigger_side_is_at_least_one_pixel():
    assert ua.trigger(8, 0.125)[0] == 1 and ua.trigger(4, 0.1)[0] == 1
    assert ua.trigger(16, 0.125)[0] == 2 and ua.trigger(17, 0.125)[0] == 3


# ---------------------------------------------------------------- bad input

def cli(tmp_path, *flags):
    out = str(tmp_path / "out")
    return run.main(["--algo", "fcu", "--image-size", "16", "--clients", "3", "--rounds", "1",
                     "--local-steps", "1", "--post-rounds", "1", "--post-local-steps", "1",
                     "--unlearn-steps", "2", "--fusion-interval", "1", "--quiet", "--out", out]
                    + list(flags)), out


@pytest.mark.parametrize("flags,needle", [
    (["--forget-client", "site9"], "--forget-client"),
    (["--forget-client", "7"], "--forget-client"),
    (["--forget-client", "3"], "--forget-client"),             # 3 clients: 0..2
    (["--backdoor", "--backdoor-target", "6"], "--backdoor-target"),   # 6 classes: 0..5
    (["--clients", "1"], "single client"),
    (["--unlearn-methods", "fcu,magic"], "--unlearn-methods"),
    (["--fgmp-convention", "swapped"], "--fgmp-convention"),
    (["--fgmp-ratio", "1.5"], "--fgmp-ratio"),
    (["--backdoor", "--backdoor-target", "zebra"], "--backdoor-target"),
    (["--bn", "local"], "--bn"),
    (["--stop-after", "1"], "--stop-after"),
    (["--resume"], "--resume"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, flags, needle):
    rc, out = cli(tmp_path, *flags)
    one_line_error(capsys, rc, needle, out=out)


def test_cli_runs_the_whole_audit_and_resumes(tmp_path, capsys):
    rc, out = cli(tmp_path, "--unlearn-methods", "retrain,fcu")
    text = capsys.readouterr().out
    assert rc == 0 and "FCU speed-up vs retraining" in text
    s = json.load(open(os.path.join(out, "summary.json")))
    assert set(s["audit"]) == {"original", "retrain", "fcu"} and "speedup_vs_retrain" in s
    assert s["forget_client"] == "site0"
    rc2, _ = cli(tmp_path, "--unlearn-methods", "retrain,fcu", "--resume")
    s2 = json.load(open(os.path.join(out, "summary.json")))
    assert rc2 == 0 and s2["audit"]["fcu"]["test_balanced_accuracy"] == \
        s["audit"]["fcu"]["test_balanced_accuracy"]


def test_audit_test_ba_matches_the_loops_pooled_evaluation(audit):
    """The audit's global test set is the loop's pooled test set: the same BA for the final
    model (last round) and for theta_u (the unlearning round's line)."""
    summary, out, _ = audit
    for phase in ("original", "retrain", "fcu", "pga"):
        pooled = [m for m in read_jsonl(os.path.join(out, phase, "metrics.jsonl"))
                  if m["client"] == "pooled"]
        a = summary["audit"][phase]
        assert a["test_balanced_accuracy"] == pytest.approx(pooled[-1]["balanced_accuracy"])
        if phase in ("fcu", "pga"):
            assert a["before_post_training"]["test_balanced_accuracy"] == pytest.approx(
                pooled[0]["balanced_accuracy"])
        else:
            assert "before_post_training" not in a


def test_pga_stops_before_a_step_once_the_batch_accuracy_is_below_the_threshold(fed, audit):
    _, out, _ = audit
    algo, clients = make(fed, forget_client="1", phase="pga", pga_stop_accuracy=1.1,
                         from_run=os.path.join(out, "original"))
    c = clients[1]
    ref = algo.reference_model(c)
    w = algo.pga(c)                            # no batch reaches accuracy 1.1: no step
    assert all(torch.equal(w[k], ref[k]) for k in algo.fused)
    assert c.state.get("grad_steps", 0) == 0 and c.state.get("grad_samples", 0) == 0


@pytest.mark.parametrize("model", ["resnet18", "densenet121"])
def test_torchvision_backbones_expose_features_and_fuse(model):
    """The paper's DenseNet-121 (and ResNet-18): MCU's features are the head's input
    (1024 / 512 pooled channels), every conv (7x7, 3x3, 1x1) and the head are fused, and
    FGMP of the model with itself is the identity."""
    fed = datasets.make_synthetic(seed=3, clients=2, image_size=32)     # DenseNet needs 32 px
    algo = FCU(small_cfg(model=model), FCU.Args(**SMALL_ARGS), fed)
    head = algo.model.get_submodule(algo.head_name)
    x, _ = algo.batch(torch.as_tensor(fed.clients[0].train[:2]))
    algo.model.eval()
    with torch.no_grad():
        f, logits = fcu.penultimate(algo.model, head, x)
    assert f.shape == (2, head.in_features) and logits.shape == (2, fed.num_classes)
    convs = [n for n, m in algo.model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(algo.fused) == len(convs) + 1 and f"{algo.head_name}.weight" in algo.fused
    sd = {k: v.clone() for k, v in algo.model.state_dict().items()}
    out = fcu.fgmp(sd, sd, algo.fused, 0.7)
    assert all(torch.allclose(out[k].float(), sd[k].float(), atol=1e-5) for k in algo.fused)


@pytest.mark.parametrize("kw,ok", [
    ({"fgmp_convention": "swapped"}, False), ({"unlearn_methods": "fcu,magic"}, False),
    ({"unlearn_methods": " , "}, False), ({"fgmp_ratio": -0.1}, False),
    ({"fgmp_ratio": 0.0}, True), ({"fgmp_ratio": 1.0}, True),
    ({"backdoor": True, "backdoor_fraction": 0.0}, False),
    ({"backdoor": True, "backdoor_fraction": 1.5}, False),
    ({"backdoor": True, "backdoor_fraction": 1.0}, True),
    ({"unlearn_steps": 0}, False), ({"phase": "magic"}, False),
])
def test_each_phase_run_validates_its_arguments(fed, kw, ok):
    """A phase is one fedmed.run of FCU: constructing it checks the arguments, so a run
    started without the protocol gets the same one-line errors; the bounds are inclusive
    where the help says so."""
    if ok:
        FCU(small_cfg(), FCU.Args(**{**SMALL_ARGS, **kw}), fed)
    else:
        with pytest.raises(fedmed.UsageError):
            FCU(small_cfg(), FCU.Args(**{**SMALL_ARGS, **kw}), fed)


def test_multilabel_data_is_refused():
    ml = datasets.make_synthetic_multilabel(seed=3, clients=2, image_size=16)
    with pytest.raises(fedmed.UsageError, match="single-label"):
        FCU(small_cfg(), FCU.Args(**SMALL_ARGS), ml)


def test_pga_reference_model_uniform_weighting_and_clipped_variances(fed):
    """Halimi et al.'s w_ref with uniform aggregation weights: (K w_o - w_u) / (K - 1);
    running variances below 0 are clipped to 0; integer buffers are theta_o's."""
    algo, clients = make(fed, cfg=small_cfg(weighting="uniform"))
    g = torch.Generator().manual_seed(9)
    w_o = {k: (v + torch.rand(v.shape, generator=g) if v.is_floating_point() else v + 3)
           for k, v in algo.init_weights.items()}
    w_u = {k: (v + 5 * torch.rand(v.shape, generator=g) if v.is_floating_point() else v)
           for k, v in algo.init_weights.items()}
    algo.theta_o, clients[1].state["last_local"] = w_o, w_u
    ref = algo.reference_model(clients[1])
    K = len(clients)
    for k, v in w_o.items():
        if not v.is_floating_point():
            assert torch.equal(ref[k], v)
            continue
        want = (K * v.double() - w_u[k].double()) / (K - 1)
        if k.endswith("running_var"):
            assert (want < 0).any()                 # the test covers the clipping
            want = want.clamp(min=0)
        assert torch.allclose(ref[k].double(), want, atol=1e-6), k


def test_a_fresh_protocol_removes_an_old_summary_first(fed, tmp_path, monkeypatch):
    """Without --resume, the old summary.json goes before any phase runs, so a run that
    fails half-way never leaves the previous audit looking current."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")

    def boom(*a, **k):
        raise RuntimeError("phase failed")
    monkeypatch.setattr(FCU, "run_phase", boom)
    with pytest.raises(RuntimeError):
        FCU.protocol(small_cfg(), FCU.Args(**SMALL_ARGS), fed, str(out), quiet=True)
    assert not (out / "summary.json").exists()
    (out / "summary.json").write_text("{}")
    with pytest.raises(RuntimeError):
        FCU.protocol(small_cfg(), FCU.Args(**SMALL_ARGS), fed, str(out), resume=True,
                     quiet=True)
    assert (out / "summary.json").exists()          # resuming keeps it until the end


def test_protocol_without_fcu_starts_over_and_reports_the_last_phase(fed, tmp_path, monkeypatch):
    """Into an existing folder without resume, every phase starts over (here with a new
    post-training length that a resumed run would refuse); without fcu among the
    methods, the summary's figures are the last phase's; the log names each phase."""
    out = str(tmp_path / "out")
    cfg = small_cfg(rounds=1, local_steps=1)
    args = dict(SMALL_ARGS, unlearn_methods="retrain,continue", post_local_steps=1)
    log = []
    s = FCU.protocol(cfg, FCU.Args(**args), fed, out, log=log.append)
    assert s["figures_of"] == "continue" and set(s["audit"]) == {
        "original", "retrain", "continue"}
    assert s["phases"]["continue"]["rounds"] == SMALL_ARGS["post_rounds"]
    assert s["rounds"] == 1 + 1 + SMALL_ARGS["post_rounds"]         # the whole protocol
    assert log == ["phase original: 1 rounds", "phase retrain: 1 rounds",
                   f"phase continue: {SMALL_ARGS['post_rounds']} rounds"]
    monkeypatch.setattr(sys, "argv", ["run.py", "--algo", "fcu", "--post-rounds", "3"])
    s = FCU.protocol(cfg, FCU.Args(**{**args, "post_rounds": 3}), fed, out, quiet=True)
    assert s["phases"]["continue"]["rounds"] == 3 and s["audit"]["continue"]["rounds"] == 3
    for phase in ("original", "retrain", "continue"):   # no argv given: this process's
        with open(os.path.join(out, phase, "config.json")) as f:          # command line
            assert json.load(f)["argv"] == sys.argv[1:], phase


def test_mia_loss_is_the_cross_entropy_floored_at_1e_12(fed, monkeypatch):
    """The MIA score is -CE with p_y floored at 1e-12 (as the metrics' loss): members
    at p_y = 1.5e-12 keep their loss, non-members at 1e-13 are floored, so the members
    score higher (AUROC 1); a floor above 1.5e-12 would tie them all (0.5)."""
    algo, clients = make(fed, forget_client="1")
    u, y = clients[1], fed.y.numpy()

    def probs(idx):
        p = np.full((len(idx), fed.num_classes), 0.5)
        p[np.arange(len(idx)), y[idx]] = np.where(np.isin(idx, u.train), 1.5e-12, 1e-13)
        return p
    monkeypatch.setattr(algo, "forward_probs", probs)
    assert algo.audit.model(algo.init_weights)["mia_loss_auroc"] == 1.0


def test_speedups_are_plain_ratios_even_for_one_image_clients(tmp_path):
    """speedup = retrain's sample gradients / the method's, with a floor only against 0:
    a remaining client holding one image trains on batches of one (1 sample gradient
    a step), and the ratio is exact."""
    two = datasets.make_synthetic(seed=3, clients=2, image_size=16)
    rest = dataclasses.replace(two.clients[1], train=two.clients[1].train[:1])
    fed1 = dataclasses.replace(two, clients=[two.clients[0], rest])
    s = FCU.protocol(small_cfg(rounds=1, local_steps=1),
                     FCU.Args(**dict(SMALL_ARGS, unlearn_methods="retrain,continue",
                                     post_rounds=1, post_local_steps=1)),
                     fed1, str(tmp_path / "out"), quiet=True)
    a = s["audit"]
    assert a["retrain"]["grad_samples"] == 1 and a["continue"]["grad_samples"] == 1
    assert s["speedup_vs_retrain_continue"] == 1.0


def test_reuse_original_runs_only_the_unlearning_phases(audit, fed, tmp_path):
    """--reuse-original DIR: the original and retrain phases of an earlier run of the same
    flags are read, not rerun (nothing of them is written to the new folder), audited the
    same way, and counted in the totals as reused; the unlearning phases start from
    DIR's theta_o. Another setting, or a folder without the phase, is refused."""
    summary, out, _ = audit
    new = str(tmp_path / "release_bn")
    args = dict(SMALL_ARGS, forget_client="1", backdoor=True, unlearn_methods="retrain,fcu",
                unlearn_bn_stats="trained", reuse_original=out)
    log = []
    s = FCU.protocol(small_cfg(), FCU.Args(**args), fed, new, log=log.append)
    assert sorted(os.listdir(new)) == ["config.json", "fcu", "summary.json"]
    assert log[:2] == [f"phase original: reused from {os.path.join(out, 'original')}",
                       f"phase retrain: reused from {os.path.join(out, 'retrain')}"]
    for p in ("original", "retrain"):
        assert s["audit"][p] == summary["audit"][p]
        assert s["phases"][p]["reused_from"] == os.path.join(out, p)
    assert "reused_from" not in s["phases"]["fcu"]
    ck = torch.load(os.path.join(new, "fcu", "checkpoint.pt"), weights_only=False)
    theta_o = torch.load(os.path.join(out, "original", "checkpoint.pt"),
                         weights_only=False)["server"]["weights"]
    assert all(torch.equal(ck["server"]["state"]["theta_o"][k], v) for k, v in theta_o.items())
    assert s["audit"]["fcu"]["before_post_training"] != summary["audit"]["fcu"][
        "before_post_training"]                              # the release's BN statistics
    with pytest.raises(fedmed.UsageError, match="backdoor"):
        FCU.protocol(small_cfg(), FCU.Args(**{**args, "backdoor": False}), fed,
                     str(tmp_path / "x"), quiet=True)
    with pytest.raises(fedmed.UsageError, match="lr"):
        FCU.protocol(small_cfg(lr=0.02), FCU.Args(**args), fed, str(tmp_path / "y"), quiet=True)
    with pytest.raises(fedmed.UsageError, match="does not exist"):
        FCU.protocol(small_cfg(), FCU.Args(**{**args, "reuse_original": str(tmp_path)}), fed,
                     str(tmp_path / "z"), quiet=True)
    y = fed.y.clone()
    i = fed.clients[0].train[0]
    y[i] = (y[i] + 1) % fed.num_classes                  # one label changed
    with pytest.raises(fedmed.UsageError, match="the data"):
        FCU.protocol(small_cfg(), FCU.Args(**args), dataclasses.replace(fed, y=y),
                     str(tmp_path / "w"), quiet=True)
    stale = tmp_path / "stale"                  # a summary of fewer rounds than config.json
    shutil.copytree(out, stale)
    sj = stale / "retrain" / "summary.json"
    sj.write_text(json.dumps({**json.loads(sj.read_text()), "rounds": 1}))
    with pytest.raises(fedmed.UsageError, match="rounds done"):
        FCU.protocol(small_cfg(), FCU.Args(**{**args, "reuse_original": str(stale)}), fed,
                     str(tmp_path / "v"), quiet=True)
