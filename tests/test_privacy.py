"""Client-level DP-FedAvg and its RDP accountant (privacy.py; shared/methods/privacy.md).

Sheet section 11, tests 1-4: clipping (1), the no-op equivalence (2), noise calibration
(3), the accountant (4: q = 1 closed form, monotonicity, an independent reference
implementation, the inverse search); plus a reference step that recomputes one whole DP
round (equations (1)-(3) of privacy.py's docstring) from what each client's method
produced, Poisson sampling, resume, and the one-line errors.
"""
import json
import math
import os

import numpy as np
import pytest
import torch

import datasets
import fedmed
import privacy
import run
from helpers import drop_seconds, one_line_error, read_jsonl

import algorithms  # noqa: E402 - the methods register themselves

algorithms.load_all()


def cli(tmp_path, *flags, name="out", rounds=3):
    out = str(tmp_path / name)
    base = ["--image-size", "16", "--clients", "3", "--rounds", str(rounds), "--local-steps",
            "2", "--batch-size", "16", "--quiet", "--out", out]
    return run.main(base + list(flags)), out


def server_weights(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["server"]["weights"]


# ---------------------------------------------------------------- 1. clipping

def test_clip_uses_the_global_norm_keeps_direction_and_leaves_small_updates_alone():
    g = torch.Generator().manual_seed(0)
    d = {"a": torch.randn(30, generator=g), "b": torch.randn(4, 5, generator=g)}
    flat = torch.cat([v.flatten().double() for v in d.values()])
    norm = float(flat.norm())
    S = norm * 0.9                     # each tensor alone is below S, together above
    assert all(float(v.norm()) > 0 for v in d.values())
    clipped, got_norm, f = privacy.clip_update(d, S)
    assert got_norm == pytest.approx(norm, rel=1e-12)
    assert f == pytest.approx(S / norm, rel=1e-12)
    out = torch.cat([clipped[k].flatten().double() for k in d])
    assert float(out.norm()) <= S * (1 + 1e-6)
    assert float(out.norm()) == pytest.approx(S, rel=1e-6)
    cos = float(out @ flat) / (float(out.norm()) * norm)
    assert cos == pytest.approx(1.0, abs=1e-6)                 # same direction
    same, _, f1 = privacy.clip_update(d, norm * 1.01)           # under S: untouched
    assert f1 == 1.0 and all(torch.equal(same[k], d[k]) for k in d)
    per_tensor_ok = {k: v for k, v in d.items() if float(v.norm()) < S}
    assert per_tensor_ok, "the case needs a tensor below S that is still scaled"
    for k in per_tensor_ok:                                    # not a per-tensor clip
        assert not torch.equal(clipped[k], d[k])


# ---------------------------------------------------------------- 2. no-op equivalence

def test_no_clip_and_no_noise_is_uniform_fedavg_bit_for_bit_and_each_knob_alone_differs(tmp_path):
    rc, plain = cli(tmp_path, "--weighting", "uniform", name="plain")
    assert rc == 0
    rc, noop = cli(tmp_path, "--dp-clip", "inf", "--dp-noise", "0", name="noop")
    assert rc == 0
    w1, w2 = server_weights(plain), server_weights(noop)
    for k in w1:
        if k.endswith("num_batches_tracked"):      # never leaves a client under DP
            assert int(w2[k]) == 0 and int(w1[k]) > 0
            continue
        assert torch.equal(w1[k], w2[k]), k
    a = read_jsonl(os.path.join(plain, "metrics.jsonl"))
    b = read_jsonl(os.path.join(noop, "metrics.jsonl"))
    for m, n in zip(a, b):            # the upload lacks the integer BN counters: fewer bytes
        up_dp, up_plain = n.pop("bytes_up"), m.pop("bytes_up")
        assert 0 < up_dp < up_plain
    strip = [{k: v for k, v in m.items() if not k.startswith("dp_")} for m in b]
    assert drop_seconds(strip) == drop_seconds(a)
    norms = [m["dp_norm"] for m in read_jsonl(os.path.join(noop, "metrics.jsonl"))
             if "dp_norm" in m]
    assert len(norms) == 3 * 3 and min(norms) > 0        # every client, every round
    rc, noisy = cli(tmp_path, "--dp-clip", str(max(norms) * 10), "--dp-noise", "0.01",
                    name="noisy")
    assert rc == 0
    rc, clipped = cli(tmp_path, "--dp-clip", str(max(norms) / 2), "--dp-noise", "0",
                      name="clipped")
    assert rc == 0
    for other in (noisy, clipped):
        w3 = server_weights(other)
        assert not all(torch.equal(w1[k], w3[k]) for k in w1 if not k.endswith("tracked"))


# ---------------------------------------------------------------- 3. noise calibration

def _layer(fed, q=1.0, z=1.5, S=0.8, seed=5):
    cfg = fedmed.Config(algo="fedavg", rounds=4, seed=seed, weighting="uniform", fraction=q)
    base = fedmed.ALGORITHMS["fedavg"](cfg, None, fed)
    dp = privacy.DPSettings(clip=S, noise=z, delta=1e-5, q=q, rounds=4)
    layer = privacy.PrivacyLayer(base, dp)
    layer.attach([], True)
    server = fedmed.ServerState()
    clients = fedmed.make_clients(fed)
    layer.setup(server, clients)
    return layer, server, clients


def test_noise_on_the_mean_has_std_z_s_over_qk_and_its_own_stream_per_round():
    from scipy.stats import chi2
    fed = datasets.make_synthetic(seed=0, clients=4, image_size=16)
    q, z, S = 0.5, 1.5, 0.8
    layer, server, clients = _layer(fed, q=q, z=z, S=S)
    K = len(clients)
    keys = [k for k in layer.base.shared_keys if server.weights[k].is_floating_point()]
    draws = []
    for t in (0, 1):
        layer.set_round(t)
        w_t = {k: v.clone() for k, v in server.weights.items()}
        ups = {c.id: {"w": {k: w_t[k] for k in keys}, "n": 1} for c in clients[:2]}  # Delta = 0
        layer.aggregate(server, ups)                    # |P_t| = 2 = qK: w_t's share is 0
        draws.append(torch.cat([(server.weights[k].double() - w_t[k].double()).flatten()
                                for k in keys]))
        for k in w_t:
            server.weights[k] = w_t[k]                  # round 1 starts from the same w
    x = torch.cat(draws)
    n, sigma = x.numel(), z * S / (q * K)
    assert n >= 1e5
    stat = float((x ** 2).sum()) / sigma ** 2           # ~ chi2(n) (the mean is known, 0)
    assert chi2.ppf(0.0005, n) < stat < chi2.ppf(0.9995, n)
    assert abs(float(x.mean())) < 4 * sigma / math.sqrt(n)
    assert not torch.equal(draws[0], draws[1])          # another round, other noise
    layer.set_round(0)                                  # the same round: the same noise
    w_t = {k: v.clone() for k, v in server.weights.items()}
    layer.aggregate(server, {c.id: {"w": {k: w_t[k] for k in keys}, "n": 1} for c in clients[:2]})
    again = torch.cat([(server.weights[k].double() - w_t[k].double()).flatten() for k in keys])
    assert torch.allclose(again, draws[0], atol=1e-12)


# ---------------------------------------------------------------- 4. the accountant

def test_rdp_for_q_one_is_the_gaussian_closed_form():
    for z in (0.5, 1.0, 3.0):
        r = privacy.rdp(1.0, z, 17)
        expect = np.array([17 * (a / (2 * z * z)) for a in privacy.ORDERS])
        assert np.array_equal(r, expect)


def test_fractional_series_meets_the_integer_formula_and_both_meet_a_hand_sum():
    """At integer orders the binomial sum (Mironov et al. 2019, Section 3.2) is recomputed
    here with math.comb; the fractional series (Section 3.3) just off an integer order
    must agree with it (the RDP curve is continuous in the order)."""
    q, z = 0.3, 1.2
    for a in (2, 3, 7):
        hand = math.log(sum(math.comb(a, k) * (1 - q) ** (a - k) * q ** k
                            * math.exp((k * k - k) / (2 * z * z)) for k in range(a + 1))) / (a - 1)
        assert privacy.rdp_step(q, z, a) == pytest.approx(hand, rel=1e-12)
        near = privacy.rdp_step(q, z, a + 1e-7)
        assert near == pytest.approx(hand, rel=1e-5)


def test_epsilon_falls_with_z_and_delta_and_grows_with_rounds_and_q():
    e = lambda q, z, T, d: privacy.epsilon(q, z, T, d)[0]   # noqa: E731
    assert e(0.5, 0.8, 10, 1e-5) > e(0.5, 1.0, 10, 1e-5) > e(0.5, 2.0, 10, 1e-5)
    assert e(0.5, 1.0, 10, 1e-6) > e(0.5, 1.0, 10, 1e-5) > e(0.5, 1.0, 10, 1e-3)
    assert e(0.5, 1.0, 5, 1e-5) < e(0.5, 1.0, 10, 1e-5) < e(0.5, 1.0, 40, 1e-5)
    assert e(0.1, 1.0, 10, 1e-5) < e(0.5, 1.0, 10, 1e-5) < e(1.0, 1.0, 10, 1e-5)
    assert privacy.epsilon(1.0, 1.0, 10, 1e-5, conversion="classic")[0] > e(1.0, 1.0, 10, 1e-5)


def test_accountant_matches_opacus_to_1e6_relative():
    """An independent reference implementation (Opacus's RDP analysis), installed for
    the tests only (requirements-test.txt), never a dependency of the project."""
    pytest.importorskip("opacus", reason="Opacus is the test's reference accountant: "
                        "pip install -r requirements-test.txt")
    from opacus.accountants.analysis import rdp as ref
    orders = list(privacy.ORDERS)
    for q in (1.0, 0.5, 0.05, 0.001):
        for z in (0.4, 1.0, 3.0):
            for T in (1, 50):
                r_ref = np.asarray(ref.compute_rdp(q=q, noise_multiplier=z, steps=T, orders=orders))
                r = privacy.rdp(q, z, T)
                assert np.allclose(r, r_ref, rtol=1e-6, atol=1e-12), (q, z, T)
                for delta in (1e-3, 1e-5, 1e-8):
                    with np.errstate(all="ignore"):
                        import warnings
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            e_ref, o_ref = ref.get_privacy_spent(orders=orders, rdp=r_ref,
                                                                 delta=delta)
                    e, o = privacy.epsilon(q, z, T, delta)
                    assert e == pytest.approx(e_ref, rel=1e-6), (q, z, T, delta)
                    assert o == o_ref


def test_inverse_search_returns_the_smallest_z_that_meets_the_target():
    for q, T, target in ((1.0, 20, 8.0), (0.5, 40, 3.0), (0.2, 100, 1.5)):
        z = privacy.noise_for_epsilon(target, q, T, 1e-5)
        assert privacy.epsilon(q, z, T, 1e-5)[0] <= target
        assert privacy.epsilon(q, z - 1e-3, T, 1e-5)[0] > target
    with pytest.raises(ValueError, match="cannot be reached"):
        privacy.noise_for_epsilon(0.05, 1.0, 10, 1e-5)



def test_accountant_edges_and_guards():
    """The trivial cases (no step, nobody sampled, infinite noise) spend nothing; q outside
    [0, 1], an order <= 1 and delta outside (0, 1) are refused; the signed log-sum-exp of
    nothing positive is -inf or an error, never a number."""
    assert privacy.rdp_step(0.0, 1.0, 2) == 0.0
    assert privacy.rdp_step(0.5, math.inf, 2) == 0.0
    assert privacy.rdp_step(1.0, 1.0, 3) == 1.5                 # q = 1 is allowed
    for q in (-0.1, 1.5):
        with pytest.raises(ValueError, match="sampling rate"):
            privacy.rdp_step(q, 1.0, 2)
    with pytest.raises(ValueError, match="orders must exceed 1"):
        privacy.rdp_step(0.5, 1.0, 1.0)
    assert privacy.epsilon(0.5, 1.0, 0, 1e-5) == (0.0, privacy.ORDERS[0])
    assert privacy.epsilon(0.0, 1.0, 10, 1e-5) == (0.0, privacy.ORDERS[0])
    dp = privacy.DPSettings(clip=1.0, noise=1.0, delta=1e-5, q=0.0, rounds=10)
    assert dp.spent() == (0.0, privacy.ORDERS[0])
    dp = privacy.DPSettings(clip=1.0, noise=1.0, delta=1e-5, q=0.5, rounds=10)
    assert dp.spent(0) == (0.0, privacy.ORDERS[0]) and dp.spent()[0] > 0
    r = privacy.rdp(0.5, 1.0, 3)
    for delta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="delta must lie"):
            privacy.to_epsilon(r, delta)
    assert privacy._logsumexp_signed(np.array([-math.inf, -math.inf]), np.ones(2)) == -math.inf
    with pytest.raises(ArithmeticError):
        privacy._logsumexp_signed(np.array([0.0, 0.0]), np.array([1.0, -1.0]))


def test_classic_conversion_by_hand():
    """Mironov 2017, Prop. 3: eps = min_a eps_T(a) + log(1/delta) / (a - 1); at q = 1
    eps_T(a) = T a / (2 z^2)."""
    z, T, delta = 1.3, 7, 1e-6
    hand = min((T * a / (2 * z * z) + math.log(1 / delta) / (a - 1), a) for a in privacy.ORDERS)
    e, order = privacy.epsilon(1.0, z, T, delta, conversion="classic")
    assert e == pytest.approx(hand[0], rel=1e-12) and order == hand[1]


def test_inverse_search_is_the_stated_bisection():
    """noise_for_epsilon: hi = 1, doubled while eps(hi) > target; then bisection of
    [0, hi] until hi - lo <= 1e-4, keeping hi feasible; recomputed here step by step.
    A target needing z above 2^13 = 8192 (the first doubling past 1e4 is 16384) is
    refused with the floor eps of z = 1e6."""
    e = lambda z: privacy.epsilon(0.5, z, 30, 1e-5)[0]          # noqa: E731
    for target in (30.0, 9.0, 2.5, 0.8):                      # 30: z = 1 already suffices
        hi = 1.0
        while e(hi) > target:
            hi *= 2
        lo = 0.0
        while hi - lo > 1e-4:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if e(mid) > target else (lo, mid)
        assert privacy.noise_for_epsilon(target, 0.5, 30, 1e-5) == hi
    with pytest.raises(ValueError, match="must be positive"):
        privacy.noise_for_epsilon(0.0, 0.5, 30, 1e-5)
    f = lambda z: privacy.epsilon(1.0, z, 1, 1e-5)[0]           # noqa: E731
    assert privacy.noise_for_epsilon(f(8000.0), 1.0, 1, 1e-5) == 8000.0   # 8000 = 8192 * 125/128:
    assert privacy.noise_for_epsilon(f(8192.0), 1.0, 1, 1e-5) == 8192.0   # on the grid, feasible
    floor = privacy.epsilon(1.0, 1e6, 1, 1e-5)[0]
    with pytest.raises(ValueError, match=f"even z = 1e6 spends {floor:.3g} at"):
        privacy.noise_for_epsilon(f(9000.0), 1.0, 1, 1e-5)


# ---------------------------------------------------------------- a whole DP round by hand

@pytest.mark.parametrize("fraction,S,z", [(1.0, 0.5, 0.7), (0.5, 2.0, 1.0)])
def test_one_dp_round_by_hand(tmp_path, monkeypatch, fraction, S, z):
    """Equations (1)-(3) of privacy.py: P_t drawn by hand (each client with probability
    q from the (seed, "dp-sample", t) stream); each participant's update from what its
    method (FedAvg) produced, Delta_k = w_k - w_t over every float shared tensor, clipped
    by the global norm; w_{t+1} = w_t + (sum_k Delta_k + N(0, z^2 S^2)) / (qK) with the
    noise drawn from (seed, "dp-noise", t) in sorted key order; the next broadcast is
    w_{t+1}; the server's num_batches_tracked never moves; metrics.jsonl's dp_epsilon is
    the accountant's after t + 1 rounds."""
    seen = {}
    orig = fedmed.Algorithm.local_update

    def record(self, client, payload):
        up = orig(self, client, payload)
        seen[self.round, client.id] = ({k: v.clone() for k, v in payload["w"].items()},
                                       {k: v.clone() for k, v in up["w"].items()})
        return up
    monkeypatch.setattr(fedmed.Algorithm, "local_update", record)
    seed, K = 4, 4
    rc, out = cli(tmp_path, "--clients", str(K), "--seed", str(seed), "--fraction", str(fraction),
                  "--dp-clip", str(S), "--dp-noise", str(z), rounds=2)
    assert rc == 0
    w = None
    for t in range(2):
        u = fedmed.np_rng(seed, "dp-sample", t).random(K)
        P = [k for k in range(K) if fraction >= 1 or u[k] < fraction]
        assert sorted(k for (r, k) in seen if r == t) == P
        if fraction < 1 and t == 0:
            assert len(P) != fraction * K, "the case must exercise the fixed denominator"
        w_t = seen[t, P[0]][0]
        if w is not None:
            for k in w:
                assert torch.allclose(w_t[k].double(), w[k], atol=1e-6), (t, k)
        keys = sorted(k for k in w_t if w_t[k].is_floating_point())
        total = {k: torch.zeros(w_t[k].shape, dtype=torch.float64) for k in keys}
        for k in P:
            before, after = seen[t, k]
            d = {key: after[key].double() - before[key].double() for key in keys}
            norm = math.sqrt(sum(float((v ** 2).sum()) for v in d.values()))
            f = min(1.0, S / norm)
            for key in keys:
                total[key] += d[key] * f
        g = torch.Generator().manual_seed(fedmed.derive_seed(seed, "dp-noise", t))
        for key in keys:
            total[key] += torch.randn(w_t[key].shape, generator=g, dtype=torch.float64) * z * S
        w = {key: w_t[key].double() + total[key] / (fraction * K) for key in keys}
        for key in w:                   # a noisy variance is clamped at 0 (post-processing)
            if key.endswith("running_var"):
                w[key] = w[key].clamp(min=0.0)
    final = server_weights(out)
    for key in w:
        assert torch.allclose(final[key].double(), w[key], atol=1e-6), key
    for key, v in final.items():
        if key.endswith("num_batches_tracked"):
            assert int(v) == 0
    lines = read_jsonl(os.path.join(out, "metrics.jsonl"))
    for t in range(2):
        eps = privacy.epsilon(fraction, z, t + 1, 1e-5)[0]
        assert all(m["dp_epsilon"] == pytest.approx(eps, rel=1e-9)
                   for m in lines if m["round"] == t + 1 and m["client"] != "pooled")
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["privacy"]["epsilon"] == pytest.approx(
        privacy.epsilon(fraction, z, 2, 1e-5)[0], rel=1e-9)
    assert summary["privacy"]["rounds"] == 2 and summary["privacy"]["q"] == fraction


def test_a_round_with_no_participant_still_releases_noise():
    fed = datasets.make_synthetic(seed=0, clients=3, image_size=16)
    layer, server, clients = _layer(fed, q=0.5, z=1.0, S=1.0)
    w_t = {k: v.clone() for k, v in server.weights.items()}
    layer.set_round(0)
    layer.aggregate(server, {})
    moved = [k for k in w_t if not torch.equal(w_t[k], server.weights[k])]
    assert moved and all(server.weights[k].is_floating_point() for k in moved)


def test_dp_stop_and_resume_equals_uninterrupted(tmp_path):
    flags = ["--fraction", "0.67", "--dp-clip", "1.0", "--dp-noise", "0.8"]
    rc, full = cli(tmp_path, *flags, name="full", rounds=3)
    assert rc == 0
    rc, part = cli(tmp_path, *flags, "--stop-after", "2", name="part", rounds=3)
    assert rc == 0
    rc, _ = cli(tmp_path, *flags, "--resume", name="part", rounds=3)
    assert rc == 0
    a, b = server_weights(full), server_weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert drop_seconds(read_jsonl(os.path.join(full, "metrics.jsonl"))) == \
        drop_seconds(read_jsonl(os.path.join(part, "metrics.jsonl")))
    rc, _ = cli(tmp_path, "--fraction", "0.67", "--dp-clip", "1.0", "--dp-noise", "0.9",
                "--resume", name="part", rounds=4)
    assert rc == 2                                      # another mechanism: refused


# ---------------------------------------------------------------- plan and bad input

def test_dp_plan_prints_the_accountants_epsilon_and_trains_nothing(tmp_path, capsys):
    out = str(tmp_path / "never")
    rc = run.main(["--rounds", "30", "--fraction", "0.5", "--dp-noise", "1.3", "--dp-plan",
                   "--out", out])
    text = capsys.readouterr().out
    assert rc == 0 and not os.path.exists(out)
    eps = privacy.epsilon(0.5, 1.3, 30, 1e-5)[0]
    assert f"spends epsilon = {eps:.4f} at delta = 1e-05" in text
    rc = run.main(["--rounds", "30", "--dp-clip", "1", "--dp-epsilon", "5", "--dp-plan",
                   "--out", out])
    text = capsys.readouterr().out
    z = privacy.noise_for_epsilon(5, 1.0, 30, 1e-5)
    assert rc == 0 and f"z = {z:.4f}, the smallest that reaches epsilon 5" in text


@pytest.mark.parametrize("flags,needle", [
    (["--dp-clip", "0"], "--dp-clip must be positive"),
    (["--dp-clip", "-1"], "--dp-clip must be positive"),
    (["--dp-clip", "1", "--dp-noise", "-0.5"], "--dp-noise must be"),
    (["--dp-clip", "1", "--dp-delta", "0"], "--dp-delta must lie in (0, 1)"),
    (["--dp-clip", "1", "--dp-delta", "1"], "--dp-delta must lie in (0, 1)"),
    (["--dp-clip", "1", "--dp-epsilon", "0.01"], "--dp-epsilon: epsilon 0.01 cannot be reached"),
    (["--dp-clip", "1", "--dp-epsilon", "2", "--dp-noise", "1"], "exclude each other"),
    (["--dp-noise", "1"], "--dp-noise needs --dp-clip"),
    (["--dp-clip", "inf"], "--dp-clip inf bounds nothing"),
    (["--dp-clip", "1", "--weighting", "samples"], "--weighting samples does not apply"),
    (["--dp-clip", "1", "--algo", "local"], "--dp-clip does not apply to --algo local"),
    (["--dp-clip", "1", "--algo", "fedmic"], "--dp-clip does not apply to --algo fedmic"),
])
def test_bad_privacy_flags_are_one_line_errors(tmp_path, capsys, flags, needle):
    out = str(tmp_path / "never")
    rc = run.main(["--rounds", "3", "--out", out] + flags)
    one_line_error(capsys, rc, needle, out=out)


# ---------------------------------------------------------------- 5-8. secure aggregation

M, Q = 2 ** 32, 2 ** 22


def _masked(n=5, t=3, d=64, seed=0, top=False):
    sa = privacy.SecAggRound(seed, 0, list(range(n)), t, M, d)
    rng = np.random.default_rng(seed)
    xq = {i: (np.full(d, Q, dtype=np.int64) if top else rng.integers(0, Q + 1, d)) for i in range(n)}
    return sa, xq, {i: sa.mask(i, xq[i]) for i in range(n)}


@pytest.mark.parametrize("top", [False, True])
def test_masks_cancel_exactly_and_hide_each_input(top):
    """Sheet test 5: the pairwise masks cancel, sum_i (y_i - PRG(b_i)) = sum_i x~_i
    (mod M) exactly (each y_i also carries its self mask PRG(b_i), which the server
    removes after rebuilding b_i), with every input at its largest value Q too (masked
    values then spread up to the modulus); no y_i equals its x~_i; the server's
    unmasking returns the exact sum."""
    sa, xq, y = _masked(top=top)
    total = sum((v.astype(np.uint64) + M - privacy.prg(sa.b[i], 64, M)) % M
                for i, v in y.items()) % M
    assert np.array_equal(total, sum(xq.values()).astype(np.uint64) % M)
    assert max(int(v.max()) for v in y.values()) > M - M // 8     # values near M occur
    for i in y:
        assert not np.array_equal(y[i], xq[i])
    assert np.array_equal(sa.unmask(y, list(y)), sum(xq.values()).astype(np.uint64) % M)


def test_pair_seeds_agree_between_the_two_ends():
    sa, _, _ = _masked()
    for i in range(5):
        for j in range(5):
            if i != j:
                assert sa.pair_seed(i, j) == sa.pair_seed(j, i)


def test_every_dropout_set_up_to_n_minus_t_is_recovered_and_more_is_refused():
    """Sheet test 7, n = 5, t = 3: every set of clients dropped after the setup (their
    inputs never arrive) of size <= 2 gives exactly the survivors' sum; 3 raise and
    return nothing."""
    import itertools
    n, t = 5, 3
    sa, xq, y = _masked(n=n, t=t)
    for size in range(0, n + 1):
        for dropped in itertools.combinations(range(n), size):
            alive = [i for i in range(n) if i not in dropped]
            received = {i: y[i] for i in alive}
            if size <= n - t:
                got = sa.unmask(received, alive)
                expect = sum((xq[i] for i in alive), np.zeros(64, np.int64)).astype(np.uint64) % M
                assert np.array_equal(got, expect), dropped
            else:
                with pytest.raises(privacy.SecAggAbort):
                    sa.unmask(received, alive)


def test_clients_that_upload_then_go_silent_count_toward_the_sum_not_the_threshold():
    sa, xq, y = _masked(n=5, t=3)
    got = sa.unmask(y, [0, 1, 2])                       # 3 and 4 uploaded, then went silent
    assert np.array_equal(got, sum(xq.values()).astype(np.uint64) % M)
    with pytest.raises(privacy.SecAggAbort):
        sa.unmask(y, [0, 1])


def test_quantisation_error_is_bounded_and_unbiased():
    """Sheet test 6: for inputs in [-c, c] the dequantised sum is within |U| 2c/Q of the
    float sum per coordinate; the rounding error's mean over 10^4 draws is within 3
    standard errors of 0."""
    c, levels, n = 1.5, 2 ** 10, 4
    rng = np.random.default_rng(3)
    x = rng.uniform(-c, c, (n, 2000))
    xq = [privacy.quantise(x[i], c, levels, np.random.default_rng(10 + i)) for i in range(n)]
    assert all(v.min() >= 0 and v.max() <= levels for v in xq)
    s = privacy.dequantise_sum(sum(xq) % M, c, levels, n)
    assert np.max(np.abs(s - x.sum(0))) <= n * 2 * c / levels
    one = np.full(10 ** 4, 0.3 * c)
    err = privacy.dequantise_sum(privacy.quantise(one, c, levels, np.random.default_rng(7)),
                                 c, levels, 1) - one
    assert abs(err.mean()) < 3 * err.std() / math.sqrt(len(err))
    assert err.std() > 0                                # it really rounds at random
    clipped = privacy.quantise(np.array([-5 * c, 5 * c]), c, levels, np.random.default_rng(0))
    assert clipped.tolist() == [0, levels]


def test_shamir_any_t_shares_rebuild_the_secret_and_t_minus_1_do_not():
    """Sheet test 8."""
    import itertools
    rng = np.random.default_rng(0)
    secret = 123456789123456789
    shares = privacy.shamir_share(secret, 3, 6, rng)
    for sub in itertools.combinations(shares, 3):
        assert privacy.shamir_reconstruct(list(sub)) == secret
    for sub in itertools.combinations(shares, 2):
        assert privacy.shamir_reconstruct(list(sub)) != secret
    bad = list(shares[:3])
    bad[1] = (bad[1][0], (bad[1][1] + 1) % privacy.PRIME)          # a tampered share
    assert privacy.shamir_reconstruct(bad) != secret
    for blob in (b"", b"x", bytes(range(15)), bytes(range(16)), bytes(range(200))):
        sh = privacy.shamir_share_bytes(blob, 2, 4, rng)
        assert privacy.shamir_reconstruct_bytes([sh[3], sh[1]]) == blob


def test_secagg_run_equals_the_plain_mean_within_the_quantisation_bound(tmp_path):
    """--secagg without DP: w_{t+1} = w_t + (sum of the dequantised updates) / |U|, within
    |U| 2c/Q / |U| per coordinate per round of uniform FedAvg (each round starting from
    the same w_t: one round compared); the masked payload and the setup and unmasking
    messages are counted by the byte counter."""
    rc, plain = cli(tmp_path, "--weighting", "uniform", name="plain", rounds=1)
    rc2, sec = cli(tmp_path, "--secagg", name="sec", rounds=1)
    assert rc == rc2 == 0
    a, b = server_weights(plain), server_weights(sec)
    bound = 2 * 8.0 / Q
    for k in a:
        if a[k].is_floating_point():
            assert float((a[k].double() - b[k].double()).abs().max()) <= bound + 1e-6, k
    s = json.load(open(os.path.join(sec, "summary.json")))
    assert s["secagg"]["bytes_up"] > 0 and s["secagg"]["bytes_down"] > 0
    assert s["secagg"]["aborted_rounds"] == 0
    lines = read_jsonl(os.path.join(sec, "metrics.jsonl"))
    assert all(m["secagg_bytes_up"] > 0 for m in lines if m["client"] != "pooled")


def test_dp_secagg_with_dropouts_killed_and_resumed_equals_uninterrupted(tmp_path):
    """--dropout-prob 0.3 with DP and secure aggregation: the rounds complete with the
    survivors (some clients drop before and after uploading over the run), and a run
    stopped after round 2 and resumed ends identical to the uninterrupted one."""
    flags = ["--clients", "5", "--dp-clip", "1.0", "--dp-noise", "0.5", "--secagg",
             "--dropout-prob", "0.3", "--seed", "2"]
    rc, full = cli(tmp_path, *flags, name="full", rounds=4)
    assert rc == 0
    rc, part = cli(tmp_path, *flags, "--stop-after", "2", name="part", rounds=4)
    assert rc == 0
    rc, _ = cli(tmp_path, *flags, "--resume", name="part", rounds=4)
    assert rc == 0
    a, b = server_weights(full), server_weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = (read_jsonl(os.path.join(d, "metrics.jsonl")) for d in (full, part))
    assert drop_seconds(la) == drop_seconds(lb)
    kinds = {m.get("dropout") for m in la}
    assert {"before_upload", "after_upload"} <= kinds, kinds
    s = json.load(open(os.path.join(full, "summary.json")))
    assert s["dropouts"]["before_upload"] > 0 and "privacy" in s and "secagg" in s


@pytest.mark.parametrize("flags,needle", [
    (["--secagg", "--secagg-bits", "31"], "could wrap around"),
    (["--secagg", "--secagg-threshold", "4"], "--secagg-threshold 4 is above the number of clients"),
    (["--secagg-bits", "20"], "--secagg-bits needs --secagg"),
    (["--secagg", "--dp-clip", "1", "--secagg-range", "2"], "--secagg-range does not apply"),
    (["--secagg", "--dropout-prob", "1"], "--dropout-prob must lie in [0, 1)"),
    (["--secagg", "--algo", "fedmic"], "--secagg does not apply to --algo fedmic"),
])
def test_bad_secagg_flags_are_one_line_errors(tmp_path, capsys, flags, needle):
    out = str(tmp_path / "never")
    rc = run.main(["--rounds", "2", "--clients", "3", "--image-size", "16", "--quiet", "--out",
                   out] + flags)
    one_line_error(capsys, rc, needle, out=out)


# ---------------------------------------------------------------- faults and robust rules

def test_robust_rules_by_hand():
    rows = [torch.tensor([1.0, 10.0, -3.0]), torch.tensor([2.0, -1.0, 0.0]),
            torch.tensor([3.0, 4.0, 5.0]), torch.tensor([100.0, 2.0, 1.0])]
    rows = [r.double() for r in rows]
    assert privacy.robust_combine(rows, "mean").tolist() == [26.5, 3.75, 0.75]
    assert privacy.robust_combine(rows, "median").tolist() == [2.5, 3.0, 0.5]
    assert privacy.robust_combine(rows[:3], "median").tolist() == [2.0, 4.0, 0.0]
    # trim 0.25 of 4: drop the largest and smallest per coordinate, mean of the middle two
    assert privacy.robust_combine(rows, "trimmed_mean", trim=0.25).tolist() == [2.5, 3.0, 0.5]
    assert privacy.robust_combine(rows, "trimmed_mean", trim=0.2).tolist() == [26.5, 3.75, 0.75]
    # Krum, f = 1, n = 5: each row scores its n - f - 2 = 2 nearest; the outlier never wins
    honest = [torch.tensor([0.0, 0.0]), torch.tensor([0.1, 0.0]), torch.tensor([0.0, 0.2]),
              torch.tensor([0.3, 0.1])]
    W = [h.double() for h in honest] + [torch.tensor([50.0, -50.0]).double()]
    d2 = lambda a, b: float(((a - b) ** 2).sum())      # noqa: E731
    scores = [sum(sorted(d2(W[i], W[j]) for j in range(5) if j != i)[:2]) for i in range(5)]
    assert torch.equal(privacy.robust_combine(W, "krum", krum_f=1), W[int(np.argmin(scores))])
    with pytest.raises(fedmed.UsageError):
        privacy.robust_combine(W[:3], "krum", krum_f=1)


def _attack_layer(fed, attack, scale=10.0, seed=3):
    cfg = fedmed.Config(algo="fedavg", rounds=2, seed=seed, weighting="uniform", local_steps=2,
                        batch_size=16)
    base = fedmed.ALGORITHMS["fedavg"](cfg, None, fed)
    faults = privacy.FaultSettings(attack=attack, attackers=(fed.clients[0].name,),
                                   attack_scale=scale, reject_factor=0)
    layer = privacy.PrivacyLayer(base, None, None, faults)
    layer.attach([], True)
    server = fedmed.ServerState()
    clients = fedmed.make_clients(fed)
    layer.setup(server, clients)
    layer.set_round(0)
    layer.begin_round(server, clients)
    return layer, server, clients


def _honest_upload(fed, seed=3, flip=False):
    """Client 0's FedAvg upload in round 0; with `flip`, trained on labels C - 1 - y (the
    class weights stay those of the true labels, computed when the method is built)."""
    if flip:
        fed = datasets.make_synthetic(seed=0, clients=3, image_size=16)
    cfg = fedmed.Config(algo="fedavg", rounds=2, seed=seed, weighting="uniform", local_steps=2,
                        batch_size=16)
    base = fedmed.ALGORITHMS["fedavg"](cfg, None, fed)
    if flip:
        y = fed.y.clone()
        idx = torch.as_tensor(np.asarray(fed.clients[0].train), dtype=torch.long)
        y[idx] = fed.num_classes - 1 - y[idx]
        fed.y = y
    base.attach([], True)
    server = fedmed.ServerState()
    clients = fedmed.make_clients(fed)
    base.setup(server, clients)
    base.set_round(0)
    return base.broadcast(server, clients[0]), base.local_update(clients[0], base.broadcast(server, clients[0]))


@pytest.mark.parametrize("attack", ["sign_flip", "scale", "label_flip"])
def test_each_attack_sends_what_it_says(attack):
    """sign_flip sends w_t - Delta, scale w_t + L Delta (Delta: the honest update from the
    same streams), label_flip the update of training on y -> C - 1 - y (recomputed with
    the client's labels flipped in the data)."""
    fed = datasets.make_synthetic(seed=0, clients=3, image_size=16)
    layer, server, clients = _attack_layer(fed, attack, scale=7.0)
    payload = layer.broadcast(server, clients[0])
    up = layer.local_update(clients[0], payload)
    w_t, honest = _honest_upload(fed, flip=(attack == "label_flip"))
    for k in layer.keys:
        d = honest["w"][k].double() - w_t["w"][k].double()
        expect = {"sign_flip": w_t["w"][k].double() - d, "scale": w_t["w"][k].double() + 7.0 * d,
                  "label_flip": honest["w"][k].double()}[attack]
        assert torch.allclose(up["w"][k].double(), expect, atol=1e-5), k
    assert any(not torch.allclose(up["w"][k], _honest_upload(fed)[1]["w"][k]) for k in layer.keys)
    assert layer.line_extra(server, clients[0])["attack"] == attack


def test_a_nan_upload_and_an_outlier_are_rejected_and_the_round_completes(tmp_path, monkeypatch):
    """Rule 1: a non-finite upload is rejected; rule 2: an update norm above 10 x the
    round's median is rejected; both logged; the aggregate is the mean of the rest."""
    seen = {}
    orig = privacy.PrivacyLayer.local_update

    def record(self, client, payload):
        up = orig(self, client, payload)
        seen[self.round, client.id] = ({k: v.clone() for k, v in payload["w"].items()}, up)
        return up
    monkeypatch.setattr(privacy.PrivacyLayer, "local_update", record)
    rc, out = cli(tmp_path, "--clients", "5", "--attack", "nan", "--attackers", "site1",
                  name="nan", rounds=1)
    assert rc == 0
    lines = read_jsonl(os.path.join(out, "metrics.jsonl"))
    rej = {m["client"]: m["rejected"] for m in lines if "rejected" in m}
    assert list(rej) == ["site1"] and "NaN" in rej["site1"]
    w = server_weights(out)
    ok = [k for (r, k) in seen if seen[r, k][1]]
    assert ok == [0, 2, 3, 4]
    for key in seen[0, 0][0]:
        if w[key].is_floating_point():
            mean = torch.stack([seen[0, k][1]["w"][key].double() for k in ok]).mean(0)
            assert torch.allclose(w[key].double(), mean, atol=1e-6), key
    rc, out2 = cli(tmp_path, "--clients", "5", "--attack", "scale", "--attackers", "site3",
                   "--attack-scale", "1000", name="scale", rounds=1)
    assert rc == 0
    lines = read_jsonl(os.path.join(out2, "metrics.jsonl"))
    rej = {m["client"]: m["rejected"] for m in lines if "rejected" in m}
    assert list(rej) == ["site3"] and "x the round's median" in rej["site3"]
    assert json.load(open(os.path.join(out2, "summary.json")))["rejected_uploads"] == 1


def test_median_aggregator_run_takes_the_coordinate_median(tmp_path, monkeypatch):
    seen = {}
    orig = privacy.PrivacyLayer.local_update

    def record(self, client, payload):
        up = orig(self, client, payload)
        seen[client.id] = up
        return up
    monkeypatch.setattr(privacy.PrivacyLayer, "local_update", record)
    rc, out = cli(tmp_path, "--clients", "4", "--aggregator", "median", "--attack", "sign_flip",
                  "--attackers", "site0", name="med", rounds=1)
    assert rc == 0
    w = server_weights(out)
    for key in seen[0]["w"]:
        srt = torch.stack([seen[k]["w"][key].double() for k in range(4)]).sort(0).values
        assert torch.allclose(w[key].double(), (srt[1] + srt[2]) / 2, atol=1e-7), key


@pytest.mark.parametrize("flags,needle", [
    (["--aggregator", "median", "--dp-clip", "1"], "--aggregator median does not apply"),
    (["--attack", "scale"], "--attack and --attackers go together"),
    (["--attack", "scale", "--attackers", "nobody"], "--attackers: no client 'nobody'"),
    (["--aggregator", "krum", "--krum-f", "2"], "needs at least 5 clients"),
    (["--aggregator", "trimmed_mean", "--trim-fraction", "0.5"], "--trim-fraction must lie"),
    (["--trim-fraction", "0.1"], "--trim-fraction applies only with"),
    (["--reject-factor", "0.5"], "--reject-factor must be 0"),
    (["--attack", "nan", "--attackers", "site0", "--attack-scale", "3"], "--attack-scale applies"),
])
def test_bad_fault_flags_are_one_line_errors(tmp_path, capsys, flags, needle):
    out = str(tmp_path / "never")
    rc = run.main(["--rounds", "2", "--clients", "3", "--image-size", "16", "--quiet", "--out",
                   out] + flags)
    one_line_error(capsys, rc, needle, out=out)


def test_kill_9_at_a_random_moment_of_a_dp_secagg_run_then_resume_is_identical(tmp_path):
    """A DP + secure aggregation run with --dropout-prob 0.3 is killed with SIGKILL at a
    random moment after its first checkpoint (the moment's seed is in the failure message)
    and resumed: final weights, metrics and summary equal the uninterrupted run's."""
    import random
    import signal
    import subprocess
    import sys
    import time
    flags = ["--image-size", "16", "--clients", "5", "--rounds", "6", "--local-steps", "2",
             "--batch-size", "16", "--quiet", "--dp-clip", "1.0", "--dp-noise", "0.5",
             "--secagg", "--dropout-prob", "0.3", "--seed", "1"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert run.main(flags + ["--out", full]) == 0
    seed = time.time_ns() % 10 ** 6
    rng = random.Random(seed)
    after, extra = rng.randint(1, 4), rng.uniform(0.0, 0.4)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, os.path.join(repo, "run.py"), *flags, "--out", part],
                            cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = os.path.join(part, "checkpoint.pt")
    t_end = time.time() + 300
    while time.time() < t_end and proc.poll() is None:
        if os.path.exists(ck) and torch.load(ck, weights_only=False)["round"] >= after:
            break
        time.sleep(0.05)
    time.sleep(extra)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.exists(ck), f"no checkpoint before the kill (seed {seed})"
    assert run.main(flags + ["--resume", "--out", part]) == 0, f"seed {seed}"
    a, b = server_weights(full), server_weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a), f"seed {seed}: after={after} extra={extra:.2f}"
    assert drop_seconds(read_jsonl(os.path.join(full, "metrics.jsonl"))) == \
        drop_seconds(read_jsonl(os.path.join(part, "metrics.jsonl"))), f"seed {seed}"
    sa, sb = (drop_seconds(json.load(open(os.path.join(d, "summary.json")))) for d in (full, part))
    for s in (sa, sb):
        s.get("secagg", {}).pop("seconds_this_process", None)
    assert sa == sb, f"seed {seed}"


# ---------------------------------------------------------------- boundaries the layer keeps

def test_layer_boundaries_threshold_equal_to_clients_wrap_at_exactly_m_and_krum_minimum(tmp_path, capsys):
    """t = K runs (no round aborted); K Q = M exactly is refused (the sum could reach M);
    Krum with f = 0 runs with f + 3 = 3 clients; label_flip on multi-label data is refused."""
    rc, out = cli(tmp_path, "--secagg", "--secagg-threshold", "3", name="t3", rounds=1)
    assert rc == 0
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["secagg"]["aborted_rounds"] == 0
    lines = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert all(m["secagg_t"] == 3 for m in lines if m["client"] != "pooled")
    rc = run.main(["--rounds", "1", "--clients", "4", "--image-size", "16", "--quiet", "--out",
                   str(tmp_path / "wrap"), "--secagg", "--secagg-bits", "30"])
    one_line_error(capsys, rc, "could wrap around")
    rc, _ = cli(tmp_path, "--aggregator", "krum", "--krum-f", "0", name="krum", rounds=1)
    assert rc == 0
    rc = run.main(["--rounds", "1", "--image-size", "16", "--quiet", "--dataset",
                   "synthetic-multilabel", "--out", str(tmp_path / "ml"), "--attack", "label_flip",
                   "--attackers", "site0"])
    one_line_error(capsys, rc, "label_flip is for single-label data")


def test_default_threshold_is_half_plus_one_and_message_bytes_are_counted_exactly(tmp_path):
    """t = floor(n/2) + 1 of the round's n participants (5 -> 3); an answering client's
    unmasking message is one 16-byte share per participant, counted by fedmed.transmit on
    top of its setup bytes; summary.json's totals are the lines' sums (rounds where a
    client did not take part included); the layer's own seconds are positive and below
    the test's wall time."""
    import time
    t0 = time.perf_counter()
    rc, out = cli(tmp_path, "--clients", "5", "--secagg", "--dp-clip", "1", "--dp-noise", "0.3",
                  "--fraction", "0.7", "--seed", "3", name="b", rounds=3)
    wall = time.perf_counter() - t0
    assert rc == 0
    lines = [m for m in read_jsonl(os.path.join(out, "metrics.jsonl")) if m["client"] != "pooled"]
    assert any("secagg_bytes_up" not in m for m in lines)        # someone sat a round out
    for r in {m["round"] for m in lines}:
        part = [m for m in lines if m["round"] == r and "secagg_bytes_up" in m]
        n = len(part)
        if n == 0:
            continue
        assert all(m["secagg_t"] == n // 2 + 1 for m in part)
        sa = privacy.SecAggRound(3, r - 1, list(range(n)), n // 2 + 1, 2 ** 32, 4)
        for m in part:
            setup_up, setup_down = sa.setup_bytes(0)
            extra = m["secagg_bytes_up"] - setup_up
            assert extra == fedmed.transmit(
                {"shares": torch.zeros(n, 16, dtype=torch.uint8)})[1], (r, m["client"])
            assert m["secagg_bytes_down"] == setup_down
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["secagg"]["bytes_up"] == sum(m.get("secagg_bytes_up", 0) for m in lines)
    assert s["secagg"]["bytes_down"] == sum(m.get("secagg_bytes_down", 0) for m in lines)
    assert 0 < s["secagg"]["seconds_this_process"] < wall


def test_rejection_rule_at_three_uploads_off_at_zero_and_uses_the_median_times_k(tmp_path):
    """With exactly 3 uploads an outlier is rejected; --reject-factor 0 rejects nothing;
    a moderate outlier (norm between K/median and K x median) is kept."""
    rc, out = cli(tmp_path, "--attack", "scale", "--attackers", "site2", "--attack-scale", "30",
                  name="three", rounds=1)
    assert rc == 0
    rej = [m for m in read_jsonl(os.path.join(out, "metrics.jsonl")) if "rejected" in m]
    assert [m["client"] for m in rej] == ["site2"]
    rc, out = cli(tmp_path, "--attack", "sign_flip", "--attackers", "site2",
                  "--reject-factor", "0", name="off", rounds=1)
    assert rc == 0
    assert not [m for m in read_jsonl(os.path.join(out, "metrics.jsonl")) if "rejected" in m]
    rc, out = cli(tmp_path, "--attack", "scale", "--attackers", "site2", "--attack-scale", "4",
                  name="mild", rounds=1)
    assert rc == 0
    lines = [m for m in read_jsonl(os.path.join(out, "metrics.jsonl")) if m["client"] != "pooled"]
    norms = sorted(m["dp_norm"] for m in lines)
    assert norms[-1] > 10 / norms[1]                  # K / median would reject it
    assert not [m for m in lines if "rejected" in m]  # K x median keeps it


def test_dropout_counts_and_clipped_flags_match_the_lines(tmp_path):
    rc, out = cli(tmp_path, "--clients", "5", "--dp-clip", "0.5", "--dp-noise", "0.5",
                  "--dropout-prob", "0.4", "--seed", "2", name="d", rounds=3)
    assert rc == 0
    lines = [m for m in read_jsonl(os.path.join(out, "metrics.jsonl")) if m["client"] != "pooled"]
    s = json.load(open(os.path.join(out, "summary.json")))
    for kind in ("before_upload", "after_upload"):
        assert s["dropouts"][kind] == sum(1 for m in lines if m.get("dropout") == kind)
    assert s["dropouts"]["before_upload"] + s["dropouts"]["after_upload"] > 0
    assert all(m["dp_clipped"] == (m["dp_norm"] > 0.5) for m in lines if "dp_norm" in m)


def test_the_base_methods_round_hook_runs_and_an_empty_round_keeps_w_t(tmp_path, monkeypatch):
    calls = []
    orig = fedmed.Algorithm.begin_round
    monkeypatch.setattr(fedmed.Algorithm, "begin_round",
                        lambda self, s, c: (calls.append(self.round), orig(self, s, c))[1])
    rc, _ = cli(tmp_path, "--dp-clip", "1", "--dp-noise", "0.5", name="hook", rounds=2)
    assert rc == 0 and calls == [0, 1]
    fed = datasets.make_synthetic(seed=0, clients=3, image_size=16)
    layer, server, clients = _layer(fed, q=0.5, z=1.0, S=1.0)
    w_t = {k: v.clone() for k, v in server.weights.items()}
    layer.set_round(0)
    layer.aggregate(server, {})                       # nobody: w_t + N / (qK)
    sigma = 1.0 * 1.0 / (0.5 * 3)
    g = torch.Generator().manual_seed(fedmed.derive_seed(layer.cfg.seed, "dp-noise", 0))
    for k in layer.keys:                              # the noise drawn by hand, sorted keys
        noise = torch.randn(w_t[k].shape, generator=g, dtype=torch.float64) * sigma
        if not k.endswith("running_var"):
            assert torch.allclose(server.weights[k].double(), w_t[k].double() + noise,
                                  atol=1e-6), k


def test_an_upload_with_more_than_the_broadcast_is_refused(tmp_path, capsys, monkeypatch):
    orig = fedmed.Algorithm.local_update
    monkeypatch.setattr(fedmed.Algorithm, "local_update",
                        lambda self, c, p: {**orig(self, c, p), "extra": torch.zeros(1)})
    rc, _ = cli(tmp_path, "--dp-clip", "1", name="x", rounds=1)
    one_line_error(capsys, rc, "uploaded more than its broadcast weights")


# ---------------------------------------------------------------- faults outside the layer

FAULT_RUN = ["--algo", "fedmic", "--teacher-model", "cnn", "--clients", "4", "--seed", "3"]


def _fault_run(tmp_path, monkeypatch, name, *flags, skip=()):
    """A fedmic run (its uploads are SVD factors, outside the PrivacyLayer) recording
    which (round, client) trained; `skip`: (round, client id) pairs whose base
    local_update is replaced by an upload that never arrives ({}), without training."""
    trained = []
    orig = fedmed.ALGORITHMS["fedmic"].local_update

    def local_update(self, client, payload):
        if (self.round, client.id) in skip:
            return {}
        trained.append((self.round, client.id))
        return orig(self, client, payload)
    monkeypatch.setattr(fedmed.ALGORITHMS["fedmic"], "local_update", local_update)
    rc, out = cli(tmp_path, *FAULT_RUN, *flags, name=name, rounds=3)
    monkeypatch.undo()
    assert rc == 0
    return out, trained


def test_fault_layer_outside_the_privacy_layer_drops_and_rejects_like_an_upload_never_sent(
        tmp_path, monkeypatch):
    """--dropout-prob and --attack nan on a method whose uploads are not averaged weights
    (FaultLayer): a failing client (first draw of stream (seed, "dropout", t, k) < p)
    does not train and sends nothing; the attacker's NaN upload is rejected with a logged
    reason; both runs equal, bit for bit, a run where those uploads simply never arrive;
    with p = 0 and no attack the layer changes nothing."""
    p, seed = 0.4, 3
    out, trained = _fault_run(tmp_path, monkeypatch, "faults", "--dropout-prob", str(p),
                              "--attack", "nan", "--attackers", "site1")
    drops = {(t, k) for t in range(3) for k in range(4)
             if fedmed.np_rng(seed, "dropout", t, k).random(2)[0] < p}
    assert drops and (set(trained) == {(t, k) for t in range(3) for k in range(4)} - drops)
    lines = read_jsonl(os.path.join(out, "metrics.jsonl"))
    lines = [m for m in lines if m["client"] != "pooled" and m["view"] == lines[0]["view"]]
    names = {f"site{k}": k for k in range(4)}
    for m in lines:
        key = (m["round"] - 1, names[m["client"]])
        assert (m.get("dropout") == "before_upload") == (key in drops), m
        assert ("rejected" in m) == (m["client"] == "site1" and key not in drops), m
        if key in drops:
            assert m["bytes_up"] == 0
    assert all("NaN" in m["rejected"] for m in lines if "rejected" in m)
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["dropouts"] == {"before_upload": sum(1 for m in lines if "dropout" in m)}
    assert s["rejected_uploads"] == sum(1 for m in lines if "rejected" in m) > 0
    assert math.isfinite(s["balanced_accuracy"])
    lost = drops | {(t, 1) for t in range(3)}
    ref, _ = _fault_run(tmp_path, monkeypatch, "never-sent", skip=lost)
    w, w_ref = server_weights(out), server_weights(ref)
    assert w.keys() == w_ref.keys()
    assert all(torch.equal(w[k], w_ref[k]) for k in w)
    noop, _ = _fault_run(tmp_path, monkeypatch, "noop", "--dropout-prob", "0")
    plain, _ = _fault_run(tmp_path, monkeypatch, "plain")
    w, w_ref = server_weights(noop), server_weights(plain)
    assert all(torch.equal(w[k], w_ref[k]) for k in w)
    assert drop_seconds(read_jsonl(os.path.join(noop, "metrics.jsonl"))) == \
        drop_seconds(read_jsonl(os.path.join(plain, "metrics.jsonl")))


@pytest.mark.parametrize("flags, message", [
    (["--dp-clip", "1"], "--dp-clip does not apply to --algo fedmic"),
    (["--aggregator", "median"], "--aggregator does not apply to --algo fedmic"),
    (["--reject-factor", "5"], "--reject-factor does not apply to --algo fedmic"),
    (["--attack", "sign_flip", "--attackers", "site0"], "--attack sign_flip does not apply"),
    (["--attack", "nan", "--attackers", "site9"], "--attackers: no client 'site9'"),
])
def test_fault_layer_refuses_what_needs_averaged_weights(tmp_path, capsys, flags, message):
    rc, out = cli(tmp_path, *FAULT_RUN, *flags, name="bad", rounds=1)
    hint = () if "site9" in message else ("only --dropout-prob and --attack nan apply",)
    one_line_error(capsys, rc, message, *hint, out=None if "site9" in message else out)


@pytest.mark.parametrize("flags, message", [
    (["--algo", "fcu", "--dropout-prob", "0.3"], "--dropout-prob does not apply to --algo fcu: it is a protocol"),
    (["--algo", "pooled", "--dropout-prob", "0.3"], "--dropout-prob does not apply to --algo pooled: no site uploads"),
    (["--algo", "clip_zeroshot", "--pretrained", "none", "--attack", "nan", "--attackers", "site0"], "--attack does not apply to --algo clip_zeroshot"),
    (["--algo", "fedmedclip", "--pretrained", "none", "--attack", "nan", "--attackers", "site0"], "--attack nan does not apply to --algo fedmedclip: its upload is coded bytes"),
])
def test_faults_refused_where_nothing_they_simulate_exists(tmp_path, capsys, flags, message):
    rc, out = cli(tmp_path, *flags, name="bad", rounds=1)
    one_line_error(capsys, rc, message, out=out)


def test_attack_nan_on_an_upload_without_floats_is_refused_not_ignored():
    class Base:
        round = 0

    layer = privacy.FaultLayer.__new__(privacy.FaultLayer)
    layer.faults = privacy.FaultSettings(attack="nan", attackers=("a",))
    layer.base, layer._lines, layer.cfg = Base(), {}, fedmed.Config()
    layer.base.local_update = lambda c, p: {"blob": torch.zeros(3, dtype=torch.uint8)}
    client = fedmed.ClientState(0, "a", np.arange(2), np.arange(2))
    with pytest.raises(fedmed.UsageError, match="holds no floating-point tensor"):
        privacy.FaultLayer.local_update(layer, client, {})
    assert not privacy._has_float({"n": 3, "ids": [1, 2], "blob": torch.zeros(2, dtype=torch.uint8)})
    assert privacy._has_float({"n": 3, "parts": [torch.zeros(2, dtype=torch.uint8), torch.ones(1)]})
    layer.base.local_update = lambda c, p: {"w": {"x": torch.ones(2)}, "n": 3}
    assert privacy.FaultLayer.local_update(layer, client, {}) == {}
    assert "NaN" in layer._lines[0]["rejected"] and layer._lines[0]["attack"] == "nan"



def test_fault_layer_runs_the_base_round_hook_and_counts_a_single_view_method(tmp_path, monkeypatch):
    """fgasl (one view, weights aggregated by GAA): the base's begin_round runs under the
    layer every round, and summary.json counts dropouts and rejections once per line."""
    calls = []
    cls = fedmed.ALGORITHMS["fgasl"]
    orig = cls.begin_round
    monkeypatch.setattr(cls, "begin_round",
                        lambda self, s, c: (calls.append(self.round), orig(self, s, c))[1])
    rc, out = cli(tmp_path, "--algo", "fgasl", "--unlabeled-fraction", "0.6", "--clients", "4",
                  "--dropout-prob", "0.5", "--attack", "nan", "--attackers", "site1",
                  "--seed", "1", name="fg", rounds=2)
    assert rc == 0 and calls == [0, 1]
    lines = [m for m in read_jsonl(os.path.join(out, "metrics.jsonl")) if m["client"] != "pooled"]
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["dropouts"]["before_upload"] == sum(1 for m in lines if "dropout" in m) > 0
    assert s["rejected_uploads"] == sum(1 for m in lines if "rejected" in m) > 0


@pytest.mark.parametrize("flags, message", [
    (["--algo", "fcu", "--dp-clip", "1"], "--dp-clip does not apply to --algo fcu"),
    (["--algo", "pooled", "--secagg"], "--secagg does not apply to --algo pooled"),
    (["--algo", "fedmic", "--teacher-model", "cnn", "--aggregator", "median", "--attack",
      "sign_flip", "--attackers", "site0"], "--attack sign_flip does not apply to --algo fedmic"),
])
def test_the_first_flag_named_is_one_the_method_cannot_take(tmp_path, capsys, flags, message):
    rc, out = cli(tmp_path, *flags, name="bad", rounds=1)
    one_line_error(capsys, rc, message, out=out)


def test_field_elements_are_four_32_bit_draws_masked_to_127_bits():
    """_field_int: the big-endian concatenation of four uniform 32-bit draws, its top bit
    dropped (a uniform 127-bit integer), redrawn when it is 0 or >= 2^127 - 1."""
    for seed in range(5):
        rng, ref = np.random.default_rng(seed), np.random.default_rng(seed)
        for _ in range(3):
            w = [int(x) for x in ref.integers(0, 2 ** 32, size=4, dtype=np.uint64)]
            v = ((w[0] << 96) | (w[1] << 64) | (w[2] << 32) | w[3]) % (2 ** 127)
            assert 0 < v < privacy.PRIME                   # a redraw has probability ~2^-127
            assert privacy._field_int(rng) == v


def test_an_update_under_the_clip_norm_is_not_marked_clipped(tmp_path):
    """dp_clipped is true exactly when the factor min(1, S / ||Delta||) is below 1: with
    S far above every norm nothing is clipped (and the flag says so on every line)."""
    rc, out = cli(tmp_path, "--dp-clip", "1e9", "--dp-noise", "0", name="big", rounds=2)
    assert rc == 0
    lines = [m for m in read_jsonl(os.path.join(out, "metrics.jsonl")) if "dp_norm" in m]
    assert lines and all(m["dp_clipped"] is False and m["dp_norm"] < 1e9 for m in lines)


def test_a_round_nobody_joins_still_releases_noise_through_the_loop(tmp_path):
    """Seed 0, K = 3, q = 0.1: Poisson sampling draws nobody in round 1. The loop still
    calls the layer's aggregate (aggregate_empty), which adds N(0, z^2 S^2) / (qK) to
    w_t: two such runs differing only in z end with different weights."""
    assert privacy.poisson_sample(0, 0, 3, 0.1) == []
    w = {}
    for z in ("0.5", "1"):
        rc, out = cli(tmp_path, "--dp-clip", "1", "--dp-noise", z, "--fraction", "0.1",
                      "--seed", "0", name=f"empty-{z}", rounds=1)
        assert rc == 0
        w[z] = server_weights(out)
    floats = [k for k in w["1"] if w["1"][k].is_floating_point()]
    assert floats and any(not torch.equal(w["0.5"][k], w["1"][k]) for k in floats)


def test_an_unmasking_message_is_one_16_byte_share_per_participant(tmp_path, monkeypatch):
    """A Shamir share of a field element below 2^127 is 16 bytes; each answering client
    sends one per participant of the round (the message fedmed.transmit counts)."""
    sent = []
    orig = fedmed.transmit

    def record(payload):
        if isinstance(payload, dict) and isinstance(payload.get("shares"), torch.Tensor):
            sent.append(tuple(payload["shares"].shape))
        return orig(payload)
    monkeypatch.setattr(fedmed, "transmit", record)
    rc, _ = cli(tmp_path, "--clients", "4", "--secagg", name="shares", rounds=1)
    assert rc == 0
    assert sent == [(4, 16)] * 4


def test_shamir_shares_are_f_at_1_to_n_and_the_guards_take_the_edges():
    """Shamir (1979): share i is (i, f(i)), i = 1..n, f(x) = secret + sum_j a_j x^j over
    GF(2^127 - 1) with a_j the stream's next field elements; secrets 0 and PRIME - 1 and
    t = 1 or n are valid, PRIME, -1, t = 0 and t = n + 1 are not."""
    rng, ref = np.random.default_rng(7), np.random.default_rng(7)
    shares = privacy.shamir_share(12345, 3, 5, rng)
    a = [privacy._field_int(ref) for _ in range(2)]
    P = privacy.PRIME
    assert shares == [(x, (12345 + a[0] * x + a[1] * x * x) % P) for x in range(1, 6)]
    for secret in (0, P - 1):
        assert privacy.shamir_reconstruct(privacy.shamir_share(secret, 2, 3, rng)[:2]) == secret
    assert privacy.shamir_share(9, 1, 3, rng) == [(1, 9), (2, 9), (3, 9)]
    assert len(privacy.shamir_share(9, 3, 3, rng)) == 3
    for secret, t, n in ((P, 2, 3), (-1, 2, 3), (9, 0, 3), (9, 4, 3)):
        with pytest.raises(ValueError):
            privacy.shamir_share(secret, t, n, rng)


def test_prg_settings_defaults_and_round_guard():
    """PRG(seed): SHA-256 of the seed's 32 little-endian bytes keys numpy's Philox (its
    first 16 bytes as two uint64 words), d draws in [0, M); the defaults are Flower's
    (Q = 2^22 levels, range c = 8, M = 2^32); a round's threshold lies in 1..n."""
    import hashlib
    seed = 2 ** 100 + 12345
    key = np.frombuffer(hashlib.sha256(seed.to_bytes(32, "little")).digest()[:16], dtype=np.uint64)
    ref = np.random.Generator(np.random.Philox(key=key)).integers(0, 2 ** 32, size=7, dtype=np.uint64)
    assert np.array_equal(privacy.prg(seed, 7, 2 ** 32), ref)
    sa = privacy.SecAggSettings()
    assert (sa.levels, sa.clip_range, sa.modulus) == (2 ** 22, 8.0, 2 ** 32)
    privacy.SecAggRound(0, 0, [0, 1, 2], 1, 2 ** 32, 2)
    privacy.SecAggRound(0, 0, [0, 1, 2], 3, 2 ** 32, 2)
    for t in (0, 4):
        with pytest.raises(ValueError, match="threshold"):
            privacy.SecAggRound(0, 0, [0, 1, 2], t, 2 ** 32, 2)


def test_client_lines_keep_the_first_view_without_pooled():
    lines = [{"client": "a", "view": "x"}, {"client": "a", "view": "y"},
             {"client": "pooled", "view": "x"}, {"client": "b", "view": "x"}]
    assert privacy.client_lines(lines) == [lines[0], lines[3]]
    assert privacy.client_lines([]) == []
