"""Client-level differential privacy over any method that uploads its model: DP-FedAvg
with a Renyi-DP accountant (specification: shared/methods/privacy.md).

    python run.py --algo fedavg ... --dp-clip 1.0 --dp-noise 1.0      # train, spend (eps, delta)
    python run.py --algo fedavg ... --dp-epsilon 8 --dp-plan          # print z and eps, no training

Citations
  * DP-FedAvg (client level): H. B. McMahan, D. Ramage, K. Talwar, L. Zhang, "Learning
    Differentially Private Recurrent Language Models", ICLR 2018, arXiv:1710.06963.
  * Sampled Gaussian mechanism, RDP: I. Mironov, "Renyi Differential Privacy", CSF 2017,
    arXiv:1702.07476; I. Mironov, K. Talwar, L. Zhang, "Renyi Differential Privacy of the
    Sampled Gaussian Mechanism", arXiv:1908.10530 (2019), Sections 3.2 (integer orders)
    and 3.3 (fractional orders).
  * RDP -> (eps, delta): B. Balle, G. Barthe, M. Gaboardi, J. Hsu, T. Sato, "Hypothesis
    Testing Interpretations and Renyi Differential Privacy", AISTATS 2020, arXiv:1905.09982
    (Theorem 21); the classic conversion is Mironov 2017, Proposition 3.

DP-FedAvg, round t (sheet section 3; K clients, sampling rate q, clip norm S, noise z):
  (1) P_t: every client independently with probability q (Poisson sampling, stream
      (seed, "dp-sample", t)); the run's --fraction is q.
  (2) client k in P_t trains from w_t as its method says, then
      Delta_k = w_k - w_t over ALL shared tensors, flattened into one vector (BatchNorm
      running statistics included when they are shared; --bn local keeps them home);
      Delta_k <- Delta_k * min(1, S / ||Delta_k||_2)          (global L2 clip, not per tensor)
  (3) server: w_{t+1} = w_t + (sum_{k in P_t} Delta_k + N(0, z^2 S^2 I)) / (q K)
      (the fixed denominator qK; noise from stream (seed, "dp-noise", t)); server
      learning rate 1 (the sheet's default).
  (4) accountant: one more step of the sampled Gaussian mechanism (q, z).
  RDP of one step at order a (q = 1: a / (2 z^2)); integer a:
      eps(a) = 1/(a-1) log sum_{k=0}^{a} C(a,k) (1-q)^{a-k} q^k exp((k^2 - k) / (2 z^2))
  fractional a (Mironov et al. 2019, Section 3.3), z0 = z^2 log(1/q - 1) + 1/2:
      A = sum_{i>=0} C(a,i) [ q^i (1-q)^{a-i} exp((i^2-i)/(2z^2)) erfc((i-z0)/(sqrt2 z))/2
                            + q^{a-i} (1-q)^i exp(((a-i)^2-(a-i))/(2z^2)) erfc((z0-(a-i))/(sqrt2 z))/2 ]
      eps(a) = log(A) / (a-1)       (C(a,i): the generalised binomial coefficient)
  T rounds compose: eps_T(a) = T eps(a). To (eps, delta):
      balle:   eps = min_a [ eps_T(a) + log((a-1)/a) - (log delta + log a) / (a-1) ]
      classic: eps = min_a [ eps_T(a) + log(1/delta) / (a-1) ]
  over the orders a in {1.1, 1.2, ..., 10.9} and {12, ..., 63}.

What is released and what is not: the clipped update of a participant reaches the server
(the server is trusted to add the noise: --dp-noise-at server, the sheet's default); the
released models w_t carry the (eps, delta) guarantee. Integer tensors (BatchNorm's
num_batches_tracked) never leave a client under DP: the server keeps its own.

Deviations (project choices, not the papers'):
  * floating-point Gaussian noise from a seeded generator: a simulation-faithful
    mechanism, not a secure implementation (least-significant-bit attacks; sheet pitfall 5);
  * ineligible methods: only those whose upload is their shared weights and whose
    aggregation is the plain average (fedavg, fedprox, fedclip, facmic, clip_linear
    --probe fedavg) can be wrapped; methods that upload other quantities (counts, SVD
    factors, teachers) need their own sensitivity analysis and are refused;
  * BatchNorm running variances are clamped at 0 after the noise (post-processing, so
    the guarantee holds; a negative variance would make every prediction NaN);
  * eps is reported as max(0, eps) (the Balle conversion can go below 0 at tiny eps_T);
  * per-client update norms are written to metrics.jsonl (`dp_norm`, `dp_clipped`) to
    tune S (the sheet: about the median unclipped norm of a dry run, `--dp-clip inf
    --dp-noise 0`); in a deployment the server would not see them.
"""
from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np
import torch

import fedmed
from fedmed import UsageError

ORDERS = tuple([1 + x / 10 for x in range(1, 100)] + list(range(12, 64)))
CONVERSIONS = ("balle", "classic")


# ---------------------------------------------------------------- the accountant

def _log_a_integer(q: float, z: float, a: int) -> float:
    """log A_a, integer a (Mironov et al. 2019, Section 3.2)."""
    k = np.arange(a + 1, dtype=np.float64)
    lb = np.array([math.lgamma(a + 1) - math.lgamma(x + 1) - math.lgamma(a - x + 1) for x in k])
    terms = lb + k * math.log(q) + (a - k) * math.log1p(-q) + (k * k - k) / (2 * z * z)
    return _logsumexp_signed(terms, np.ones_like(terms))


def _logsumexp_signed(logs: np.ndarray, signs: np.ndarray) -> float:
    """log(sum_i signs_i exp(logs_i)) for a positive sum."""
    top = float(np.max(logs))
    if top == -math.inf:
        return -math.inf
    total = float(np.sum(signs * np.exp(logs - top)))
    if total <= 0:
        raise ArithmeticError("log of a non-positive sum")
    return top + math.log(total)


def _log_a_fractional(q: float, z: float, a: float) -> float:
    """log A_a, fractional a (Mironov et al. 2019, Section 3.3): two series over i >= 0
    with the generalised binomial coefficients C(a, i) (signed), summed in log space
    up to the first i > a where both terms fall below e^-30."""
    from scipy.special import log_ndtr            # log Phi; erfc(x)/2 = Phi(-x sqrt 2)
    z0 = z * z * math.log(1 / q - 1) + 0.5
    n = 1024
    while n <= 2 ** 22:
        i = np.arange(n, dtype=np.float64)
        f = a - i[:-1]                                # C(a, i) = prod_{j<i} (a - j) / (j + 1)
        lbin = np.concatenate([[0.0], np.cumsum(np.log(np.abs(f)) - np.log(i[1:]))])
        sign = np.concatenate([[1.0], np.cumprod(np.where(f < 0, -1.0, 1.0))])
        j = a - i
        s1 = (lbin + i * math.log(q) + j * math.log1p(-q) + (i * i - i) / (2 * z * z)
              + log_ndtr(-(i - z0) / z))
        s2 = (lbin + j * math.log(q) + i * math.log1p(-q) + (j * j - j) / (2 * z * z)
              + log_ndtr(-(z0 - j) / z))
        done = np.nonzero((i > a) & (np.maximum(s1, s2) < -30))[0]
        if len(done):
            m = int(done[0]) + 1
            return _logsumexp_signed(np.concatenate([s1[:m], s2[:m]]),
                                     np.concatenate([sign[:m], sign[:m]]))
        n *= 4
    raise ArithmeticError(f"RDP series did not converge (q={q}, z={z}, order={a})")


def rdp_step(q: float, z: float, order: float) -> float:
    """RDP at `order` of ONE step of the sampled Gaussian mechanism (sampling rate q,
    noise multiplier z = sigma / sensitivity)."""
    if not 0 <= q <= 1:
        raise ValueError(f"sampling rate q must lie in [0, 1] (got {q})")
    if order <= 1:
        raise ValueError(f"RDP orders must exceed 1 (got {order})")
    if q == 0:
        return 0.0
    if z == 0:
        return math.inf
    if q == 1:
        return order / (2 * z * z)
    if math.isinf(z):
        return 0.0
    log_a = (_log_a_integer(q, z, int(order)) if float(order).is_integer()
             else _log_a_fractional(q, z, order))
    return log_a / (order - 1)


def rdp(q: float, z: float, steps: int, orders=ORDERS) -> np.ndarray:
    """eps_T(a) = T eps(a) for every order (composition over T steps)."""
    return np.array([steps * rdp_step(q, z, a) for a in orders], dtype=np.float64)


def epsilon(q: float, z: float, steps: int, delta: float, orders=ORDERS,
            conversion: str = "balle") -> tuple[float, float]:
    """(eps, the order that attains it) after `steps` steps, at `delta`."""
    if steps == 0 or q == 0:
        return 0.0, float(orders[0])
    return to_epsilon(rdp(q, z, steps, orders), delta, orders, conversion)


def to_epsilon(r: np.ndarray, delta: float, orders=ORDERS,
               conversion: str = "balle") -> tuple[float, float]:
    """(eps, the order that attains it) from the composed RDP curve r[i] = eps_T(orders[i])."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1) (got {delta})")
    a = np.asarray(orders, dtype=np.float64)
    if conversion == "balle":
        eps = r + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)
    elif conversion == "classic":
        eps = r + math.log(1 / delta) / (a - 1)
    else:
        raise ValueError(f"conversion must be one of {CONVERSIONS} (got {conversion!r})")
    eps = np.where(np.isnan(eps), np.inf, eps)
    i = int(np.argmin(eps))
    return max(0.0, float(eps[i])), float(a[i])


def noise_for_epsilon(target: float, q: float, steps: int, delta: float, orders=ORDERS,
                      conversion: str = "balle", tol: float = 1e-4) -> float:
    """The smallest noise multiplier z (to within `tol`) whose eps after `steps` steps is
    at most `target`, by bisection (eps decreases in z). Raises ValueError when no z
    reaches it (eps has a floor set by delta and the largest order)."""
    if target <= 0:
        raise ValueError(f"target epsilon must be positive (got {target})")
    hi = 1.0
    while epsilon(q, hi, steps, delta, orders, conversion)[0] > target:
        hi *= 2
        if hi > 1e4:
            floor = epsilon(q, 1e6, steps, delta, orders, conversion)[0]
            raise ValueError(f"epsilon {target:g} cannot be reached: even z = 1e6 spends "
                             f"{floor:.3g} at delta {delta:g} with orders up to {max(orders):g}")
    lo = 0.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if epsilon(q, mid, steps, delta, orders, conversion)[0] > target:
            lo = mid
        else:
            hi = mid
    return hi


# ---------------------------------------------------------------- clipping and noise

def update_norm(delta: dict) -> float:
    """L2 norm of the concatenation of every tensor of `delta` (float64)."""
    return math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta.values()))


def clip_factor(norm: float, clip: float) -> float:
    """min(1, S / ||Delta||) (1 for a zero update)."""
    return 1.0 if norm <= clip else clip / norm


def clip_update(delta: dict, clip: float) -> tuple[dict, float, float]:
    """(Delta * min(1, S/||Delta||), ||Delta||, the factor): the GLOBAL norm of the whole
    update, never per tensor (sheet pitfall 2)."""
    norm = update_norm(delta)
    f = clip_factor(norm, clip)
    if f == 1.0:
        return delta, norm, f
    return {k: (d.double() * f).to(d.dtype) for k, d in delta.items()}, norm, f


def gaussian_noise(shapes: dict, std: float, seed: int, t: int) -> dict:
    """N(0, std^2) for every tensor, float64, from the stream (seed, "dp-noise", t), in
    sorted key order (so a resumed run draws the same noise)."""
    g = fedmed.torch_rng(seed, "dp-noise", t)
    return {k: torch.randn(shapes[k], generator=g, dtype=torch.float64) * std
            for k in sorted(shapes)}


def poisson_sample(seed: int, t: int, K: int, q: float) -> list:
    """P_t: each of K clients independently with probability q, stream (seed,
    "dp-sample", t); q = 1 takes every client."""
    if q >= 1:
        return list(range(K))
    u = fedmed.np_rng(seed, "dp-sample", t).random(K)
    return [k for k in range(K) if u[k] < q]


# ---------------------------------------------------------------- the layer

@dataclasses.dataclass
class DPSettings:
    clip: float                       # S
    noise: float                      # z
    delta: float                      # delta
    q: float                          # sampling rate (= --fraction)
    rounds: int                       # T
    conversion: str = "balle"
    target_epsilon: float | None = None   # --dp-epsilon (z was derived from it)

    def spent(self, rounds: int | None = None) -> tuple[float, float]:
        """(eps, order) after `rounds` rounds (default: the run's T): T times the RDP of
        one step, computed once."""
        T = self.rounds if rounds is None else rounds
        if T == 0 or self.q == 0:
            return 0.0, float(ORDERS[0])
        if getattr(self, "_rdp1", None) is None:
            self._rdp1 = rdp(self.q, self.noise, 1)
        return to_epsilon(T * self._rdp1, self.delta, ORDERS, self.conversion)

    def record(self) -> dict:
        """The settings (config.json; --resume must match them)."""
        return {"mechanism": "DP-FedAvg, client level (McMahan et al. 2018), noise at the server",
                "clip": self.clip, "noise_multiplier": self.noise, "delta": self.delta,
                "sampling": "Poisson", "q": self.q, "target_epsilon": self.target_epsilon,
                "accountant": "RDP of the sampled Gaussian mechanism (Mironov et al. 2019)",
                "conversion": {"balle": "Balle et al. 2020", "classic": "Mironov 2017"}[self.conversion],
                "note": "simulation: floating-point noise from a seeded stream, not a secure "
                        "implementation"}


ELIGIBLE_HINT = ("fedavg, fedprox, fedclip, facmic, clip_linear --probe fedavg")


def check_eligible(cls) -> None:
    """A one-line error for a method whose upload is not its shared weights averaged by
    the core's rule (DP's sensitivity analysis covers only that)."""
    name = next((n for n, c in fedmed.ALGORITHMS.items() if c is cls), cls.__name__)
    if (issubclass(cls, fedmed.Wrapper) or cls.aggregate is not fedmed.Algorithm.aggregate
            or name in ("local", "pooled", "clip_zeroshot")):
        raise UsageError(f"--dp-clip does not apply to --algo {name}: client-level DP covers "
                         f"methods that upload their weights and average them ({ELIGIBLE_HINT}); "
                         "drop the --dp-* flags or choose one of those")


class DPLayer(fedmed.Wrapper):
    """DP-FedAvg around one method (its `base`): the base trains; this layer samples the
    participants, clips each upload, and replaces the aggregation by the noisy
    fixed-denominator sum (equations (1)-(4) of the module docstring)."""

    aggregate_empty = True            # noise is released even in a round nobody was sampled

    def __init__(self, base: fedmed.Algorithm, dp: DPSettings):
        fedmed.Wrapper.__init__(self, base.cfg, base.args, base.fed)
        self.wrap(base)
        self.dp = dp
        self.info = getattr(base, "info", {})
        self.layer_record = {"privacy": dp.record()}
        self._norms: dict = {}

    def streams(self) -> bool:
        return False

    def participants(self, server, sampled):                                  # (1)
        ks = poisson_sample(self.cfg.seed, self.round, len(self.clients), self.dp.q)
        return self.base.participants(server, [self.clients[k] for k in ks])

    def local_update(self, client, payload):                                 # (2)
        w_t = payload.get("w", {})
        up = self.base.local_update(client, payload)
        if not up:
            return up
        if set(up) - {"w", "n"} or set(up["w"]) != set(w_t):
            raise UsageError(f"--dp-clip: --algo {self.cfg.algo} uploaded more than its "
                             "broadcast weights; client-level DP does not cover it")
        floats = [k for k in sorted(w_t) if w_t[k].is_floating_point()]
        delta = {k: up["w"][k].double() - w_t[k].double() for k in floats}
        clipped, norm, f = clip_update(delta, self.dp.clip)
        self._norms[client.id] = (norm, f < 1.0)
        w = {k: (w_t[k].double() + clipped[k]).to(w_t[k].dtype) if f < 1.0 else up["w"][k]
             for k in floats}
        return {"w": w, "n": 1}

    def aggregate(self, server, uploads):                                    # (3)
        K, q = len(self.clients), self.dp.q
        denom = q * K
        keys = [k for k in sorted(server.weights) if k in self.base.shared_keys
                and server.weights[k].is_floating_point()]
        acc = {k: torch.zeros_like(server.weights[k], dtype=torch.float64) for k in keys}
        scale = 1.0 / denom
        for cid in sorted(uploads):                   # the core's fold: sum_k w_k / (qK)
            for k in keys:
                acc[k].add_(uploads[cid]["w"][k].double().mul(scale))
        rest = 1.0 - len(uploads) / denom             # fixed denominator: w_t's share
        if rest != 0.0:
            for k in keys:
                acc[k].add_(server.weights[k].double().mul(rest))
        if self.dp.noise > 0:
            noise = gaussian_noise({k: acc[k].shape for k in keys},
                                   self.dp.noise * self.dp.clip / denom, self.cfg.seed, self.round)
            for k in keys:
                acc[k].add_(noise[k])
        for k in keys:
            if k.endswith("running_var"):           # post-processing (keeps the guarantee):
                acc[k].clamp_(min=0.0)              # noise must not make a variance negative
            server.weights[k] = acc[k].to(server.weights[k].dtype)

    def line_extra(self, server, client):
        extra = dict(self.base.line_extra(server, client))
        eps, _ = self.dp.spent(self.round + 1)                              # (4)
        extra["dp_epsilon"] = eps
        if client.id in self._norms:
            norm, clipped = self._norms[client.id]
            extra.update(dp_norm=norm, dp_clipped=clipped)
        return extra

    def begin_round(self, server, clients):
        self._norms = {}
        self.base.begin_round(server, clients)

    def summary_extra(self, server, lines):
        out = dict(self.base.summary_extra(server, lines))
        eps, order = self.dp.spent()
        out["privacy"] = {**self.dp.record(), "rounds": self.dp.rounds, "epsilon": eps,
                          "order": order, "orders": [float(a) for a in ORDERS]}
        return out


# ---------------------------------------------------------------- the command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("privacy: client-level DP-FedAvg over a method that uploads its "
                             "weights (" + ELIGIBLE_HINT + ")")
    g.add_argument("--dp-clip", type=float, default=None, metavar="S",
                   help="clip each client's whole update to L2 norm S and turn DP on "
                        "(inf: no clipping, a dry run that logs the norms)")
    g.add_argument("--dp-noise", type=float, default=None, metavar="Z",
                   help="noise multiplier z: N(0, z^2 S^2) on the sum (default 1.0)")
    g.add_argument("--dp-epsilon", type=float, default=None, metavar="E",
                   help="instead of --dp-noise: the smallest z whose run spends at most E")
    g.add_argument("--dp-delta", type=float, default=None, metavar="D",
                   help="delta of the (epsilon, delta) guarantee (default 1e-5)")
    g.add_argument("--rdp-conversion", default=None, choices=CONVERSIONS,
                   help="RDP -> (eps, delta): balle (Balle et al. 2020, default) | classic")
    g.add_argument("--dp-plan", action="store_true",
                   help="print the (epsilon, delta) the configured run would spend (or the z "
                        "that reaches --dp-epsilon) and exit without reading data")


FLAGS = ("dp_clip", "dp_noise", "dp_epsilon", "dp_delta", "rdp_conversion", "dp_plan")


def settings(ns: argparse.Namespace, cfg: fedmed.Config, given: set) -> DPSettings | None:
    """The DP settings the flags ask for (None: DP off), checked before any data is read;
    every bad value is a one-line UsageError naming its flag."""
    used = [f for f in FLAGS if f in given]
    if not used:
        return None
    if "dp_clip" not in given and not ns.dp_plan:
        raise UsageError(f"--{used[0].replace('_', '-')} needs --dp-clip S (DP is on only with a "
                         "clip norm); add --dp-clip, or --dp-plan to plan without training")
    if ns.dp_clip is not None and not ns.dp_clip > 0:      # also NaN
        raise UsageError(f"--dp-clip must be positive (got {ns.dp_clip}); e.g. the median update "
                         "norm of a dry run (--dp-clip inf --dp-noise 0)")
    if ns.dp_noise is not None and ns.dp_epsilon is not None:
        raise UsageError("--dp-noise and --dp-epsilon exclude each other; give one")
    if ns.dp_noise is not None and not (ns.dp_noise >= 0 and math.isfinite(ns.dp_noise)):
        raise UsageError(f"--dp-noise must be a finite number >= 0 (got {ns.dp_noise})")
    delta = 1e-5 if ns.dp_delta is None else ns.dp_delta
    if not 0 < delta < 1:
        raise UsageError(f"--dp-delta must lie in (0, 1) (got {delta}); e.g. 1e-5")
    if ns.dp_clip is not None and math.isinf(ns.dp_clip) and (
            ns.dp_epsilon is not None or ns.dp_noise is None or ns.dp_noise > 0):
        raise UsageError("--dp-clip inf bounds nothing, so no noise can protect it; give a "
                         "finite --dp-clip, or --dp-noise 0 for a dry run that logs the norms")
    if ns.dp_epsilon is not None and not (ns.dp_epsilon > 0 and math.isfinite(ns.dp_epsilon)):
        raise UsageError(f"--dp-epsilon must be a positive number (got {ns.dp_epsilon})")
    if "weighting" in given and cfg.weighting != "uniform":
        raise UsageError("--weighting samples does not apply with --dp-clip: DP-FedAvg weights "
                         "every client alike (n_k weights raise the sensitivity); drop --weighting")
    conversion = ns.rdp_conversion or "balle"
    q, T = cfg.fraction, cfg.rounds
    if ns.dp_epsilon is not None:
        try:
            z = noise_for_epsilon(ns.dp_epsilon, q, T, delta, ORDERS, conversion)
        except ValueError as e:
            raise UsageError(f"--dp-epsilon: {e} in {T} rounds at q = {q:g}; raise --dp-epsilon "
                             "or --dp-delta, or lower --rounds") from None
    else:
        z = 1.0 if ns.dp_noise is None else ns.dp_noise
    return DPSettings(clip=math.inf if ns.dp_clip is None else ns.dp_clip, noise=z,
                      delta=delta, q=q, rounds=T, conversion=conversion,
                      target_epsilon=ns.dp_epsilon)


def plan_text(dp: DPSettings) -> str:
    """What --dp-plan prints."""
    eps, order = dp.spent()
    how = (f"z = {dp.noise:.4f}, the smallest that reaches epsilon {dp.target_epsilon:g}"
           if dp.target_epsilon is not None else f"z = {dp.noise:g}")
    every = ", ".join(f"{r}: {dp.spent(r)[0]:.3f}" for r in sorted({1, max(1, dp.rounds // 2), dp.rounds}))
    return (f"DP-FedAvg plan: {dp.rounds} rounds, Poisson sampling q = {dp.q:g} (--fraction), "
            f"{how}, clip S = {dp.clip:g}, delta = {dp.delta:g}\n"
            f"spends epsilon = {eps:.4f} at delta = {dp.delta:g} (RDP accountant of the sampled "
            f"Gaussian mechanism, best order {order:g} of {len(ORDERS)}, conversion "
            f"{'Balle et al. 2020' if dp.conversion == 'balle' else 'classic (Mironov 2017)'})\n"
            f"epsilon after round {every}")
