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
import hashlib
import math
import time

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


# ---------------------------------------------------------------- secure aggregation

# Pairwise-mask secure aggregation (Bonawitz et al., CCS 2017), sheet section 3, as a
# SIMULATION: every secret comes from a seeded stream, the key agreement is textbook
# Diffie-Hellman in the multiplicative group mod the Mersenne prime 2^127 - 1 (not a
# vetted group), and nothing is encrypted. The arithmetic (quantisation, masks mod M,
# Shamir t-of-n recovery, dequantisation) is exact.
PRIME = 2 ** 127 - 1                  # Shamir's field and the DH group's modulus
GENERATOR = 3
BLOCK = 15                            # bytes per field element when sharing a byte string


def _field_int(rng: np.random.Generator) -> int:
    """A uniform element of [1, PRIME) from a numpy stream (four 32-bit draws)."""
    while True:
        v = 0
        for w in rng.integers(0, 2 ** 32, size=4, dtype=np.uint64):
            v = (v << 32) | int(w)
        v &= (1 << 127) - 1
        if 0 < v < PRIME:
            return v


def shamir_share(secret: int, t: int, n: int, rng: np.random.Generator) -> list:
    """n shares (x, f(x)), x = 1..n, of `secret` in GF(PRIME): f has degree t - 1,
    f(0) = secret, its other coefficients uniform from `rng` (Shamir 1979)."""
    if not 0 <= secret < PRIME:
        raise ValueError("a Shamir secret must lie in [0, 2^127 - 1)")
    if not 1 <= t <= n:
        raise ValueError(f"threshold t must lie in [1, n] (got t={t}, n={n})")
    coef = [secret] + [_field_int(rng) for _ in range(t - 1)]
    out = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coef):                      # Horner
            y = (y * x + c) % PRIME
        out.append((x, y))
    return out


def shamir_reconstruct(shares: list) -> int:
    """f(0) by Lagrange interpolation over the given shares (exactly t are needed;
    fewer give an unrelated value, which the caller must refuse beforehand)."""
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs):
        raise ValueError("two shares with the same x")
    secret = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, PRIME - 2, PRIME)) % PRIME
    return secret


def shamir_share_bytes(secret: bytes, t: int, n: int, rng: np.random.Generator) -> list:
    """A byte string in blocks of 15 bytes (each below the prime), the first element
    its length; share i is (x_i, [share of every element])."""
    elems = [len(secret)] + [int.from_bytes(secret[k:k + BLOCK], "big")
                             for k in range(0, len(secret), BLOCK)]
    per = [shamir_share(e, t, n, rng) for e in elems]
    return [(x + 1, [per[e][x][1] for e in range(len(elems))]) for x in range(n)]


def shamir_reconstruct_bytes(shares: list) -> bytes:
    elems = [shamir_reconstruct([(x, ys[e]) for x, ys in shares])
             for e in range(len(shares[0][1]))]
    length, blocks = elems[0], elems[1:]
    if length > BLOCK * len(blocks):
        raise ValueError("the shares do not reconstruct a valid byte string")
    out = b""
    for k, v in enumerate(blocks):
        size = min(BLOCK, length - BLOCK * k)
        if v >= 256 ** size:
            raise ValueError("the shares do not reconstruct a valid byte string")
        out += v.to_bytes(size, "big")
    return out


def quantise(x: np.ndarray, c: float, levels: int, rng: np.random.Generator) -> np.ndarray:
    """x clipped to [-c, c], mapped to {0..Q}: floor((x + c) Q / (2c) + u), u ~ U[0, 1)
    from `rng` (stochastic rounding: unbiased)."""
    x = np.clip(np.asarray(x, dtype=np.float64), -c, c)
    u = rng.random(x.shape)
    return np.floor((x + c) * (levels / (2 * c)) + u).astype(np.int64)


def dequantise_sum(total: np.ndarray, c: float, levels: int, count: int) -> np.ndarray:
    """sum_i x_i ~= (2c/Q) sum_i x~_i - count c: the offset c is removed once per term
    (sheet pitfall 7), `count` = the number of quantised inputs summed."""
    return total.astype(np.float64) * (2 * c / levels) - count * c


def prg(seed: int, d: int, modulus: int) -> np.ndarray:
    """d uniform integers in [0, modulus) expanded from `seed` (any size of int) by
    numpy's Philox counter-based generator."""
    key = hashlib.sha256(seed.to_bytes(32, "little")).digest()
    bits = np.random.Philox(key=np.frombuffer(key[:16], dtype=np.uint64))
    return np.random.Generator(bits).integers(0, modulus, size=d, dtype=np.uint64)


class SecAggRound:
    """One round of pairwise-mask secure aggregation among the clients `ids`.

    Setup (Bonawitz et al. rounds 0-1): client i draws a DH secret sk_i and a self-mask
    seed b_i from the stream (seed, "secagg", t, i), publishes pk_i = g^sk_i, and
    Shamir-shares sk_i and b_i (t-of-n) with the others; the pair seed of i and j is
    s_ij = pk_j^sk_i = pk_i^sk_j (mod p).
    Masking (round 2): y_i = x~_i + PRG(b_i) + sum_{j>i} PRG(s_ij) - sum_{j<i} PRG(s_ij) mod M.
    Unmasking (round 3): from the sum over the received y_i, the server removes PRG(b_i)
    of every received i (b_i rebuilt from t shares) and, for every j whose y never came,
    the masks PRG(s_ij) it shared with each received i (sk_j rebuilt from t shares); with
    fewer than t clients answering, it raises and returns nothing."""

    def __init__(self, seed: int, t: int, ids: list, threshold: int, modulus: int, d: int):
        self.ids, self.threshold, self.modulus, self.d = sorted(ids), threshold, modulus, d
        n = len(self.ids)
        if n and not 1 <= threshold <= n:
            raise ValueError(f"secagg threshold {threshold} needs 1..{n} clients")
        self.sk, self.b, self.pk, self.shares = {}, {}, {}, {}
        for i in self.ids:
            rng = fedmed.np_rng(seed, "secagg", t, i)
            self.sk[i], self.b[i] = _field_int(rng), _field_int(rng)
            self.pk[i] = pow(GENERATOR, self.sk[i], PRIME)
            # shares[i][j]: what client j holds of client i's two secrets
            sk_sh = shamir_share(self.sk[i], threshold, n, rng)
            b_sh = shamir_share(self.b[i], threshold, n, rng)
            self.shares[i] = {j: (sk_sh[m], b_sh[m]) for m, j in enumerate(self.ids)}

    def pair_seed(self, i: int, j: int, sk_i: int | None = None) -> int:
        return pow(self.pk[j], self.sk[i] if sk_i is None else sk_i, PRIME)

    def mask(self, i: int, xq: np.ndarray) -> np.ndarray:
        M = self.modulus
        y = (xq.astype(np.uint64) + prg(self.b[i], self.d, M)) % M
        for j in self.ids:
            if j == i:
                continue
            m = prg(self.pair_seed(i, j), self.d, M)
            y = (y + m) % M if j > i else (y + M - m) % M
        return y

    def unmask(self, received: dict, answering: list) -> np.ndarray:
        """sum_{i in received} x~_i mod M from the masked inputs `received` {i: y_i},
        with the shares of the clients in `answering` (those still online)."""
        M = self.modulus
        helpers = [j for j in self.ids if j in set(answering) and j in received]
        if len(helpers) < self.threshold:
            raise SecAggAbort(f"secure aggregation aborted: {len(helpers)} clients answered, "
                              f"{self.threshold} are needed to unmask")
        helpers = helpers[:self.threshold]
        total = np.zeros(self.d, dtype=np.uint64)
        for i in sorted(received):
            total = (total + received[i]) % M
        released = {}                                 # peer -> kind of share released
        for i in sorted(received):                    # survivors: their self masks
            b = shamir_reconstruct([self.shares[i][h][1] for h in helpers])
            released[i] = "b"
            total = (total + M - prg(b, self.d, M)) % M
        for j in self.ids:                            # dropped: their pair masks
            if j in received:
                continue
            if released.get(j) == "b":
                raise AssertionError("a survivor released both shares of one peer")
            sk_j = shamir_reconstruct([self.shares[j][h][0] for h in helpers])
            released[j] = "sk"
            for i in sorted(received):
                m = prg(pow(self.pk[i], sk_j, PRIME), self.d, M)   # s_ij = pk_i^sk_j
                # y_i holds +PRG(s_ij) when j > i and -PRG(s_ij) when j < i
                total = (total + M - m) % M if j > i else (total + m) % M
        return total

    def setup_bytes(self, i: int) -> tuple[int, int]:
        """(up, down) bytes of client i's setup messages through fedmed.transmit: its
        public key up; its n - 1 share pairs up (to be forwarded); the others' public keys
        and their share pairs for it down."""
        def blob(v: int) -> torch.Tensor:
            return torch.tensor(list(v.to_bytes(16, "little")), dtype=torch.uint8)
        others = [j for j in self.ids if j != i]
        up = fedmed.transmit({"pk": blob(self.pk[i]),
                              "shares": {j: [blob(self.shares[i][j][0][1]),
                                             blob(self.shares[i][j][1][1])] for j in others}})[1]
        down = fedmed.transmit({"pk": {j: blob(self.pk[j]) for j in others},
                                "shares": {j: [blob(self.shares[j][i][0][1]),
                                               blob(self.shares[j][i][1][1])] for j in others}})[1]
        return up, down


class SecAggAbort(RuntimeError):
    """Too few clients answered to unmask: the round is not aggregated."""


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


ELIGIBLE_HINT = "fedavg, fedprox, fedclip, facmic, clip_svm, ..."


def eligible(cls) -> bool:
    """Whether the layer covers a method: it uploads its shared weights and averages them
    by the core's rule (not a protocol around another method, not local-only, pooled or
    zero-shot, which send nothing to average)."""
    name = next((n for n, c in fedmed.ALGORITHMS.items() if c is cls), cls.__name__)
    owner = next(c for c in cls.__mro__ if "aggregate" in vars(c))   # who defines it
    plain = owner is fedmed.Algorithm or vars(owner).get("plain_average", False)
    return not (issubclass(cls, fedmed.Wrapper) or not plain
                or name in ("local", "pooled", "clip_zeroshot"))


def check_eligible(cls, flag: str = "--dp-clip") -> None:
    """A one-line error for a method the layer does not cover (DP's sensitivity analysis
    and the secure sum cover only an average of uploaded weights)."""
    if not eligible(cls):
        name = next((n for n, c in fedmed.ALGORITHMS.items() if c is cls), cls.__name__)
        ok = ", ".join(n for n in sorted(fedmed.ALGORITHMS) if eligible(fedmed.ALGORITHMS[n]))
        raise UsageError(f"{flag} does not apply to --algo {name}: client-level DP and secure "
                         f"aggregation cover methods that upload their weights and average them "
                         f"({ok}; clip_linear with --probe fedavg); drop those flags or choose "
                         "one of them")


@dataclasses.dataclass
class SecAggSettings:
    modulus: int = 2 ** 32            # M (Flower's default)
    levels: int = 2 ** 22             # Q (Flower's default)
    clip_range: float = 8.0           # c (Flower's default; S when DP is on)
    threshold: int | None = None      # t (None: floor(n/2) + 1 of the round's n)

    def record(self) -> dict:
        return {"modulus": self.modulus, "levels": self.levels, "clip_range": self.clip_range,
                "threshold": self.threshold if self.threshold else "floor(n/2) + 1",
                "note": "simulation: seeded secrets, textbook DH mod 2^127 - 1, no encryption"}


@dataclasses.dataclass
class FaultSettings:
    aggregator: str = "mean"          # mean | median | trimmed_mean | krum
    trim: float = 0.2                 # trimmed mean: share cut at each end, per coordinate
    krum_f: int = 1                   # Krum: the number of attackers it tolerates
    reject_factor: float = 10.0       # reject ||Delta_k|| > factor x median (0: off)
    attack: str | None = None         # sign_flip | scale | label_flip | nan
    attackers: tuple = ()             # client names
    attack_scale: float = 10.0
    dropout: float = 0.0

    def record(self) -> dict:
        return dataclasses.asdict(self)


AGGREGATORS = ("mean", "median", "trimmed_mean", "krum")
ATTACKS = ("sign_flip", "scale", "label_flip", "nan")


def client_lines(lines: list) -> list:
    """The clients' lines of the run's first view (a method with several views repeats
    each client's fault fields in every view; count them once), without the pooled ones."""
    view = lines[0].get("view") if lines else None
    return [m for m in lines if m.get("client") != "pooled" and m.get("view") == view]


def dropout_draws(seed: int, t: int, k: int) -> np.ndarray:
    """Two uniforms of the stream (seed, "dropout", t, k): client k fails in round t when
    the first is below p; the second chooses before / after uploading (PrivacyLayer)."""
    return fedmed.np_rng(seed, "dropout", t, k).random(2)


def check_attackers(faults: FaultSettings, clients: list) -> None:
    names = [c.name for c in clients]
    for a in faults.attackers:
        if a not in names:
            raise UsageError(f"--attackers: no client {a!r} in this federation; choose "
                             f"among {', '.join(names)}")


def K_needed(f: int) -> int:
    """Krum needs n - f - 2 >= 1 neighbours: n >= f + 3 uploads."""
    return f + 3


def robust_combine(ws: list, rule: str, trim: float = 0.2, krum_f: int = 1) -> torch.Tensor:
    """Combine the rows of ws (n x d, float64) by `rule`: the mean; the coordinate-wise
    median (torch's lower median for even n is replaced by the mean of the two middle
    values); the trimmed mean (per coordinate, the floor(trim n) largest and smallest
    values dropped; Yin et al., ICML 2018); Krum (Blanchard et al., NeurIPS 2017: the row
    whose summed squared distance to its n - f - 2 nearest other rows is smallest)."""
    W = torch.stack(ws)
    n = W.shape[0]
    if rule == "mean":
        return W.mean(0)
    if rule == "median":
        srt = W.sort(0).values
        return (srt[(n - 1) // 2] + srt[n // 2]) / 2
    if rule == "trimmed_mean":
        b = int(math.floor(trim * n))
        return W.sort(0).values[b:n - b].mean(0)
    if rule == "krum":
        m = n - krum_f - 2
        if m < 1:
            raise UsageError(f"--aggregator krum with --krum-f {krum_f} needs more than "
                             f"{2 * krum_f + 2} uploads in a round (got {n})")
        d2 = torch.cdist(W, W) ** 2
        scores = [float(torch.sort(torch.cat([d2[i, :i], d2[i, i + 1:]])).values[:m].sum())
                  for i in range(n)]
        return W[int(np.argmin(scores))].clone()
    raise ValueError(f"unknown aggregation rule {rule!r}")


class _Layer(fedmed.Wrapper):
    """What both layers share: `_lines`, what the layer noted about each client this
    round (its metric line's extra keys), and the note that travels with it (a Flower
    node notes, the server reads; Algorithm.note_of)."""

    _lines: dict

    def note_of(self, client):
        return {"layer": dict(self._lines.get(client.id, {})),
                "base": self.base.note_of(client)}

    def set_note(self, client, note):
        self._lines[client.id] = dict(note["layer"])
        self.base.set_note(client, note["base"])


class PrivacyLayer(_Layer):
    """Client-level DP-FedAvg and/or pairwise-mask secure aggregation, with simulated
    client dropouts, around one method (its `base`): the base trains; this layer samples
    the participants (Poisson under DP), clips each update (DP), quantises and masks it
    (--secagg), and replaces the aggregation by the (noisy, fixed-denominator under DP)
    sum (equations (1)-(4) of the module docstring; secure aggregation: SecAggRound).

    Dropouts (--dropout-prob p): a participant fails with probability p, stream
    (seed, "dropout", t, k); with probability 1/2 before uploading (after the setup of
    secure aggregation: its masks are in the others' inputs and are removed with its
    shares) and otherwise after uploading (its input arrives; it answers no unmasking
    request). The round completes with the rest."""

    aggregate_empty = True            # noise is released even in a round nobody was sampled

    def __init__(self, base: fedmed.Algorithm, dp: DPSettings | None,
                 secagg: SecAggSettings | None = None, faults: FaultSettings | None = None):
        fedmed.Wrapper.__init__(self, base.cfg, base.args, base.fed)
        self.wrap(base)
        self.faults = faults or FaultSettings()
        self.dp, self.secagg, self.dropout = dp, secagg, self.faults.dropout
        self.info = getattr(base, "info", {})
        self.layer_record = {"privacy": dp.record() if dp else None,
                             "secagg": secagg.record() if secagg else None,
                             "faults": self.faults.record()}
        self._lines: dict = {}
        self._sa = None
        self._totals = {"secagg_seconds": 0.0}

    def setup(self, server, clients):
        super().setup(server, clients)
        self.keys = [k for k in sorted(server.weights) if k in self.base.shared_keys
                     and server.weights[k].is_floating_point()]
        if self.secagg:
            K, sa = len(clients), self.secagg
            if K * sa.levels >= sa.modulus:           # sheet pitfall 8: the sum would wrap
                raise UsageError(f"--secagg: {K} clients x Q = {sa.levels} levels reach the "
                                 f"modulus M = {sa.modulus}; the sum could wrap around: lower "
                                 "--secagg-bits")
            if sa.threshold is not None and sa.threshold > K:
                raise UsageError(f"--secagg-threshold {sa.threshold} is above the number of "
                                 f"clients ({K}); give at most {K}")
        check_attackers(self.faults, clients)
        if self.faults.attack == "label_flip" and self.base.multilabel:
            raise UsageError("--attack label_flip is for single-label data")
        if self.faults.aggregator == "krum" and K_needed(self.faults.krum_f) > len(clients):
            raise UsageError(f"--aggregator krum with --krum-f {self.faults.krum_f} needs at "
                             f"least {K_needed(self.faults.krum_f)} clients (got {len(clients)})")

    def streams(self) -> bool:
        return False

    def _fails(self, client) -> str | None:
        if not self.dropout:
            return None
        u = dropout_draws(self.cfg.seed, self.round, client.id)
        if u[0] >= self.dropout:
            return None
        return "before_upload" if u[1] < 0.5 else "after_upload"

    def begin_round(self, server, clients):
        self._lines, self._sa = {}, None
        self.base.begin_round(server, clients)

    def participants(self, server, sampled):                                  # (1)
        if self.dp:
            ks = poisson_sample(self.cfg.seed, self.round, len(self.clients), self.dp.q)
            sampled = [self.clients[k] for k in ks]
        chosen = self.base.participants(server, sampled)
        if self.secagg and chosen:                    # setup: keys and shares of P_t
            t0 = time.perf_counter()
            n = len(chosen)
            thr = self.secagg.threshold or n // 2 + 1
            self._sa = None if thr > n else SecAggRound(
                self.cfg.seed, self.round, [c.id for c in chosen], thr, self.secagg.modulus,
                sum(server.weights[k].numel() for k in self.keys))
            for c in chosen:
                if self._sa is None:
                    self._line(c)["secagg"] = (f"not run: {n} participants, threshold {thr}")
                    continue
                up, down = self._sa.setup_bytes(c.id)
                self._line(c).update(secagg_bytes_up=up, secagg_bytes_down=down, secagg_t=thr)
            self._totals["secagg_seconds"] += time.perf_counter() - t0
        return chosen

    def _line(self, client) -> dict:
        return self._lines.setdefault(client.id, {})

    def local_update(self, client, payload):                                 # (2)
        fails = self._fails(client)
        if fails:
            self._line(client)["dropout"] = fails
        if fails == "before_upload":
            return {}
        w_t = payload.get("w", {})
        attack = self.faults.attack if client.name in self.faults.attackers else None
        if attack == "label_flip":                    # trains on y -> C - 1 - y
            C, batch = self.fed.num_classes, self.base.batch
            self.base.batch = lambda idx, gen=None: (lambda x, y: (x, C - 1 - y))(*batch(idx, gen))
            try:
                up = self.base.local_update(client, payload)
            finally:
                del self.base.batch                   # the class's method again
        else:
            up = self.base.local_update(client, payload)
        if not up:
            return up
        if set(up) - {"w", "n"} or set(up["w"]) != set(w_t):
            raise UsageError(f"--algo {self.cfg.algo} uploaded more than its broadcast "
                             "weights; client-level DP and secure aggregation do not cover it")
        delta = {k: up["w"][k].double() - w_t[k].double() for k in self.keys}
        if attack in ("sign_flip", "scale", "nan"):
            factor = {"sign_flip": -1.0, "scale": self.faults.attack_scale, "nan": math.nan}[attack]
            delta = {k: d * factor for k, d in delta.items()}
            up = {"w": {k: (w_t[k].double() + delta[k]).to(w_t[k].dtype) for k in self.keys},
                  "n": up["n"]}
        if attack:
            self._line(client)["attack"] = attack
        bad = next((k for k in self.keys if not bool(torch.isfinite(delta[k]).all())), None)
        if bad is not None:                           # rule 1: a non-finite upload
            self._line(client)["rejected"] = f"weight {bad} is NaN or infinite"
            return {}
        norm, f = update_norm(delta), 1.0
        if self.dp:
            delta, norm, f = clip_update(delta, self.dp.clip)
        self._line(client).update(dp_norm=norm, dp_clipped=f < 1.0)
        if not self.secagg:
            w = {k: (w_t[k].double() + delta[k]).to(w_t[k].dtype) if f < 1.0 else up["w"][k]
                 for k in self.keys}
            return {"w": w, "n": 1}
        if self._sa is None:                          # fewer participants than t: no round
            return {}
        t0 = time.perf_counter()
        x = torch.cat([delta[k].flatten() for k in self.keys]).numpy()
        rng = fedmed.np_rng(self.cfg.seed, "secagg-round", self.round, client.id)
        xq = quantise(x, self._range(), self.secagg.levels, rng)
        y = self._sa.mask(client.id, xq).astype(np.uint32).view(np.int32)
        self._totals["secagg_seconds"] += time.perf_counter() - t0
        return {"y": torch.from_numpy(y.copy()), "n": 1}

    def _range(self) -> float:
        return self.dp.clip if self.dp else self.secagg.clip_range

    def _secure_sum(self, uploads) -> tuple[dict, int] | None:
        """sum_{i received} Delta_i (dequantised) as {key: tensor}, and the count."""
        t0 = time.perf_counter()
        received = {cid: u["y"].numpy().view(np.uint32).astype(np.uint64)
                    for cid, u in uploads.items()}
        answering = [cid for cid in received
                     if self._lines.get(cid, {}).get("dropout") != "after_upload"]
        try:
            total = self._sa.unmask(received, answering)
        except SecAggAbort as e:
            for cid in received:
                self._lines.setdefault(cid, {})["secagg"] = str(e)
            return None
        for h in answering:                           # each answers with len(P_t) shares
            self._lines.setdefault(h, {})["secagg_bytes_up"] = (
                self._lines[h].get("secagg_bytes_up", 0) + fedmed.transmit(
                    {"shares": torch.zeros(len(self._sa.ids), 16, dtype=torch.uint8)})[1])
        s = dequantise_sum(total, self._range(), self.secagg.levels, len(received))
        out, pos = {}, 0
        for k in self.keys:
            n = self.base.init_weights[k].numel()
            out[k] = torch.from_numpy(s[pos:pos + n].copy()).view(self.base.init_weights[k].shape)
            pos += n
        self._totals["secagg_seconds"] += time.perf_counter() - t0
        return out, len(received)

    def aggregate(self, server, uploads):                                    # (3)
        keys = self.keys
        if not self.dp and not self.secagg:           # robust / plain mean of accepted w_k
            ok = self._accepted(uploads)
            if not ok:
                return
            for k in keys:
                ws = [uploads[c]["w"][k].double().flatten() for c in ok]
                if self.faults.aggregator == "krum":
                    continue
                server.weights[k] = robust_combine(
                    ws, self.faults.aggregator, self.faults.trim).view(
                    server.weights[k].shape).to(server.weights[k].dtype)
            if self.faults.aggregator == "krum":      # Krum chooses a whole upload
                flat = [torch.cat([uploads[c]["w"][k].double().flatten() for k in keys])
                        for c in ok]
                pick = robust_combine(flat, "krum", krum_f=self.faults.krum_f)
                chosen = next(c for c, v in zip(ok, flat) if torch.equal(v, pick))
                self._lines.setdefault(chosen, {})["krum_chosen"] = True
                for k in keys:
                    server.weights[k] = uploads[chosen]["w"][k].clone()
            return
        if self.secagg:
            got = self._secure_sum(uploads) if uploads and self._sa else None
            if got is None and not self.dp:
                return                                # nothing was aggregated: w_t stays
            total, count = got if got else ({k: torch.zeros(server.weights[k].shape,
                                                            dtype=torch.float64) for k in keys}, 0)
            denom = self.dp.q * len(self.clients) if self.dp else count
            acc = {k: server.weights[k].double() + total[k] / denom for k in keys}
        else:
            denom = self.dp.q * len(self.clients)
            acc = {k: torch.zeros_like(server.weights[k], dtype=torch.float64) for k in keys}
            scale = 1.0 / denom
            for cid in sorted(uploads):               # the core's fold: sum_k w_k / (qK)
                for k in keys:
                    acc[k].add_(uploads[cid]["w"][k].double().mul(scale))
            rest = 1.0 - len(uploads) / denom         # fixed denominator: w_t's share
            if rest != 0.0:
                for k in keys:
                    acc[k].add_(server.weights[k].double().mul(rest))
        if self.dp and self.dp.noise > 0:
            noise = gaussian_noise({k: acc[k].shape for k in keys},
                                   self.dp.noise * self.dp.clip / denom, self.cfg.seed, self.round)
            for k in keys:
                acc[k].add_(noise[k])
        for k in keys:
            if k.endswith("running_var"):           # post-processing (keeps the guarantee):
                acc[k].clamp_(min=0.0)              # noise must not make a variance negative
            server.weights[k] = acc[k].to(server.weights[k].dtype)

    def _accepted(self, uploads) -> list:
        """Rule 2 (rule 1, non-finite, acted in local_update): with 3 or more uploads, one
        whose update norm exceeds reject_factor x the median norm of the round's uploads
        is rejected, the reason logged on its line."""
        ids = sorted(uploads)
        kf = self.faults.reject_factor
        if kf and len(ids) >= 3:
            norms = {c: self._lines[c]["dp_norm"] for c in ids}
            med = float(np.median(list(norms.values())))
            out = []
            for c in ids:
                if norms[c] > kf * med:
                    self._lines[c]["rejected"] = (f"update norm {norms[c]:.4g} > {kf:g} x the "
                                                  f"round's median {med:.4g}")
                else:
                    out.append(c)
            return out
        return ids

    def line_extra(self, server, client):
        extra = dict(self.base.line_extra(server, client))
        if self.dp:
            extra["dp_epsilon"] = self.dp.spent(self.round + 1)[0]           # (4)
        extra.update(self._lines.get(client.id, {}))
        return extra

    def summary_extra(self, server, lines):
        out = dict(self.base.summary_extra(server, lines))
        if self.dp:
            eps, order = self.dp.spent()
            out["privacy"] = {**self.dp.record(), "rounds": self.dp.rounds, "epsilon": eps,
                              "order": order, "orders": [float(a) for a in ORDERS]}
        one = client_lines(lines)
        if self.secagg:
            out["secagg"] = {**self.secagg.record(),
                             "bytes_up": int(sum(m.get("secagg_bytes_up", 0) for m in one)),
                             "bytes_down": int(sum(m.get("secagg_bytes_down", 0) for m in one)),
                             "aborted_rounds": len({m["round"] for m in one if "secagg" in m}),
                             "seconds_this_process": self._totals["secagg_seconds"]}
        out["rejected_uploads"] = sum(1 for m in one if "rejected" in m)
        if self.dropout:
            out["dropouts"] = {kind: sum(1 for m in one if m.get("dropout") == kind)
                               for kind in ("before_upload", "after_upload")}
        return out


class FaultLayer(_Layer):
    """Faults around a method that the PrivacyLayer does not cover: its uploads are not
    plain weights that are averaged (compressed blobs, SVD factors, teachers, protocol
    messages), so nothing here reads them beyond their finiteness. Two rules, the same
    streams and log keys as PrivacyLayer's:

      * --dropout-prob p: a participant fails with probability p (stream (seed,
        "dropout", t, k), first draw) before it trains: it sends nothing and its own state
        does not move; the round completes with the uploads that arrive, as the method
        handles clients left out by --fraction. Logged `dropout: before_upload`.
      * rule 1 (always on here): an upload holding a NaN or infinite tensor is rejected
        and the reason logged (`rejected`); the method aggregates the rest. The site's
        private state stays as it trained: a non-finite private state still stops the run
        (fedmed.Diverged names the round and the client).
      * --attack nan --attackers NAMES: the named clients' uploaded floating tensors are
        replaced by NaN (to see rule 1 act).

    The norm rule, robust aggregators, the other attacks, DP and secure aggregation need
    the update as a vector of averaged weights: refused by `check_faults_only`."""

    def __init__(self, base: fedmed.Algorithm, faults: FaultSettings):
        fedmed.Wrapper.__init__(self, base.cfg, base.args, base.fed)
        self.wrap(base)
        self.faults = faults
        self.info = getattr(base, "info", {})
        self.layer_record = {"faults": {"dropout": faults.dropout, "attack": faults.attack,
                                        "attackers": list(faults.attackers),
                                        "rule": "non-finite uploads rejected"}}
        self._lines: dict = {}

    def setup(self, server, clients):
        super().setup(server, clients)
        check_attackers(self.faults, clients)

    def begin_round(self, server, clients):
        self._lines = {}
        self.base.begin_round(server, clients)

    def local_update(self, client, payload):
        p = self.faults.dropout
        if p and dropout_draws(self.cfg.seed, self.round, client.id)[0] < p:
            self._lines.setdefault(client.id, {})["dropout"] = "before_upload"
            return {}
        up = self.base.local_update(client, payload)
        if self.faults.attack == "nan" and client.name in self.faults.attackers and up:
            if not _has_float(up):
                raise UsageError(f"--attack nan: the upload of {client.name} holds no "
                                 "floating-point tensor, so no NaN can be injected; drop --attack")
            up = _times_nan(up)
            self._lines.setdefault(client.id, {})["attack"] = "nan"
        bad = fedmed.first_nonfinite(up)
        if bad:
            self._lines.setdefault(client.id, {})["rejected"] = f"upload {bad} is NaN or infinite"
            return {}
        return up

    def line_extra(self, server, client):
        return {**self.base.line_extra(server, client), **self._lines.get(client.id, {})}

    def summary_extra(self, server, lines):
        out = dict(self.base.summary_extra(server, lines))
        one = client_lines(lines)
        out["rejected_uploads"] = sum(1 for m in one if "rejected" in m)
        if self.faults.dropout:
            out["dropouts"] = {"before_upload": sum(1 for m in one
                                                    if m.get("dropout") == "before_upload")}
        return out


def _map_floats(obj, fn):
    """obj with fn applied to every floating tensor (dicts, lists and tuples walked)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _map_floats(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_floats(v, fn) for v in obj)
    return obj


def _has_float(obj) -> bool:
    found = []
    _map_floats(obj, found.append)
    return bool(found)


def _times_nan(obj):
    """obj with every floating tensor replaced by NaN."""
    return _map_floats(obj, lambda x: torch.full_like(x, math.nan))


def check_faults_only(cls, ns, given: set) -> None:
    """For a method outside the PrivacyLayer: only --dropout-prob and --attack nan apply
    (FaultLayer); any other flag of the layer is a one-line error naming it."""
    name = next((n for n, c in fedmed.ALGORITHMS.items() if c is cls), cls.__name__)
    ok = ", ".join(n for n in sorted(fedmed.ALGORITHMS) if eligible(fedmed.ALGORITHMS[n]))
    used = sorted(f"--{f.replace('_', '-')}" for f in given if f in FAULT_FLAGS + FLAGS + SECAGG_FLAGS)
    if hasattr(cls, "protocol") or not getattr(cls, "faults_apply", True):
        raise UsageError(f"{used[0] if used else '--dropout-prob'} does not apply to --algo "
                         f"{name}: " + ("it is a protocol of several runs compared by an audit"
                                        if hasattr(cls, "protocol") else "no site uploads "
                                        "anything") + "; drop the flag")
    if ns.attack == "nan" and getattr(cls, "coded_upload", False):
        raise UsageError(f"--attack nan does not apply to --algo {name}: its upload is coded "
                         "bytes, so no NaN can be injected; use --dropout-prob, or drop --attack")
    allowed = ("dropout_prob", "attack", "attackers")      # what FaultLayer simulates
    other = ["--" + f.replace("_", "-") for f in FLAGS + SECAGG_FLAGS + FAULT_FLAGS
             if f in given and f not in allowed]
    if ns.attack not in (None, "nan"):
        other.insert(0, f"--attack {ns.attack}")
    if other:
        flag = other[0]
        raise UsageError(f"{flag} does not apply to --algo {name}: it needs uploads that are "
                         f"weights averaged by the core ({ok}); for --algo {name} only "
                         "--dropout-prob and --attack nan apply (non-finite uploads are "
                         "rejected)")


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
    g.add_argument("--secagg", action="store_true",
                   help="pairwise-mask secure aggregation of the updates (a simulation: seeded "
                        "secrets), Shamir-shared seeds recover dropped clients")
    g.add_argument("--secagg-threshold", type=int, default=None, metavar="T",
                   help="Shamir threshold t (default floor(n/2) + 1 of the round's n)")
    g.add_argument("--secagg-bits", type=int, default=None, metavar="B",
                   help="quantisation levels Q = 2^B (default 22), modulus M = 2^32")
    g.add_argument("--secagg-range", type=float, default=None, metavar="C",
                   help="coordinates clipped to [-C, C] before quantising (default 8; under "
                        "--dp-clip it is S)")
    g.add_argument("--dropout-prob", type=float, default=None, metavar="P",
                   help="simulate a participant failing with probability P (before or after "
                        "uploading); the round completes with the rest")
    g.add_argument("--aggregator", default=None, choices=AGGREGATORS,
                   help="robust aggregation of the uploads (not with --dp-clip/--secagg): mean "
                        "(default) | median | trimmed_mean | krum")
    g.add_argument("--trim-fraction", type=float, default=None, metavar="B",
                   help="trimmed_mean: share cut at each end per coordinate (default 0.2)")
    g.add_argument("--krum-f", type=int, default=None, metavar="F",
                   help="krum: attackers tolerated (default 1)")
    g.add_argument("--reject-factor", type=float, default=None, metavar="K",
                   help="reject an upload whose update norm exceeds K x the round's median "
                        "(default 10, 0: off; non-finite uploads are always rejected)")
    g.add_argument("--attack", default=None, choices=ATTACKS,
                   help="simulate misbehaving --attackers: sign_flip (sends -Delta), scale "
                        "(--attack-scale x Delta), label_flip (trains on C-1-y), nan")
    g.add_argument("--attackers", default=None, metavar="NAMES",
                   help="comma-separated client names that attack")
    g.add_argument("--attack-scale", type=float, default=None, metavar="L",
                   help="scale attack's factor (default 10)")
    g.add_argument("--dp-plan", action="store_true",
                   help="print the (epsilon, delta) the configured run would spend (or the z "
                        "that reaches --dp-epsilon) and exit without reading data")


FLAGS = ("dp_clip", "dp_noise", "dp_epsilon", "dp_delta", "rdp_conversion", "dp_plan")
FAULT_FLAGS = ("dropout_prob", "aggregator", "trim_fraction", "krum_f", "reject_factor", "attack",
               "attackers", "attack_scale")
SECAGG_FLAGS = ("secagg", "secagg_threshold", "secagg_bits", "secagg_range")


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


def layer_settings(ns: argparse.Namespace, cfg: fedmed.Config, given: set):
    """(DPSettings | None, SecAggSettings | None, dropout probability) from the flags, or
    None when no flag of the privacy layer is given; checked before any data is read."""
    dp = settings(ns, cfg, given)
    sa_used = [f for f in SECAGG_FLAGS if f in given]
    if sa_used and not ns.secagg:
        raise UsageError(f"--{sa_used[0].replace('_', '-')} needs --secagg; add it or drop the flag")
    secagg = None
    if ns.secagg:
        bits = 22 if ns.secagg_bits is None else ns.secagg_bits
        if not 1 <= bits <= 31:
            raise UsageError(f"--secagg-bits must lie in 1..31 (got {bits}; the modulus is 2^32)")
        if ns.secagg_range is not None and dp is not None:
            raise UsageError("--secagg-range does not apply with --dp-clip (the range is the clip "
                             "norm S, so nothing is clipped twice); drop --secagg-range")
        c = 8.0 if ns.secagg_range is None else ns.secagg_range
        if not (c > 0 and math.isfinite(c)):
            raise UsageError(f"--secagg-range must be a positive number (got {c})")
        if ns.secagg_threshold is not None and ns.secagg_threshold < 1:
            raise UsageError(f"--secagg-threshold must be at least 1 (got {ns.secagg_threshold})")
        if dp is not None and math.isinf(dp.clip):
            raise UsageError("--secagg needs a finite --dp-clip (its range is S)")
        secagg = SecAggSettings(levels=2 ** bits, clip_range=c, threshold=ns.secagg_threshold)
    p = ns.dropout_prob
    if p is not None and not 0 <= p < 1:
        raise UsageError(f"--dropout-prob must lie in [0, 1) (got {p})")
    faults = FaultSettings(dropout=p or 0.0)
    if ns.aggregator is not None:
        if dp is not None or secagg is not None:
            raise UsageError(f"--aggregator {ns.aggregator} does not apply with --dp-clip or "
                             "--secagg (their guarantees are for the sum); drop one")
        faults.aggregator = ns.aggregator
    if ns.trim_fraction is not None:
        if faults.aggregator != "trimmed_mean":
            raise UsageError("--trim-fraction applies only with --aggregator trimmed_mean")
        if not 0 <= ns.trim_fraction < 0.5:
            raise UsageError(f"--trim-fraction must lie in [0, 0.5) (got {ns.trim_fraction})")
        faults.trim = ns.trim_fraction
    if ns.krum_f is not None:
        if faults.aggregator != "krum":
            raise UsageError("--krum-f applies only with --aggregator krum")
        if ns.krum_f < 0:
            raise UsageError(f"--krum-f must be >= 0 (got {ns.krum_f})")
        faults.krum_f = ns.krum_f
    if ns.reject_factor is not None:
        if not (ns.reject_factor == 0 or ns.reject_factor > 1):
            raise UsageError(f"--reject-factor must be 0 (off) or above 1 (got {ns.reject_factor})")
        faults.reject_factor = ns.reject_factor
    if (ns.attack is None) != (ns.attackers is None):
        raise UsageError("--attack and --attackers go together: name the attack and the "
                         "clients that make it")
    if ns.attack is not None:
        faults.attack = ns.attack
        faults.attackers = tuple(a.strip() for a in ns.attackers.split(",") if a.strip())
        if not faults.attackers:
            raise UsageError("--attackers: give at least one client name")
    if ns.attack_scale is not None:
        if ns.attack != "scale":
            raise UsageError("--attack-scale applies only with --attack scale")
        faults.attack_scale = ns.attack_scale
    on = (dp, secagg, p, ns.aggregator, ns.attack, ns.reject_factor)
    if not any(v is not None and v is not False for v in on):
        return None
    if "weighting" in given and cfg.weighting != "uniform":
        raise UsageError("--weighting samples does not apply with the privacy layer (--dp-clip, "
                         "--secagg, --aggregator, --attack, --dropout-prob): every client is "
                         "weighted alike; drop --weighting")
    return dp, secagg, faults


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
