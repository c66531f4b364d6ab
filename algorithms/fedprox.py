"""FedProx. T. Li, A. K. Sahu, M. Zaheer, M. Sanjabi, A. Talwalkar, V. Smith, Federated
Optimization in Heterogeneous Networks, MLSys 2020, arXiv:1812.06127.

Local objective, Eq. (2):  h_k(w; w^t) = F_k(w) + mu/2 ||w - w^t||^2,
whose extra gradient is mu (w - w^t). The proximal term covers the trainable tensors
that the server sent (under `--bn local` the private BN layers have no w^t and no term).
Aggregation is FedAvg's.

Defaults: mu = 0.001 (FLamby's Fed-ISIC2019 value; the paper searches
mu in {0.001, 0.01, 0.1, 1}).
Deviations: fixed local work (E epochs or tau steps) instead of a gamma-inexact solver;
the squared norm of Eq. (2), not the square root used by some public CLIP baselines.
"""
from dataclasses import dataclass

from fedmed import Algorithm, UsageError, register, trainable


@dataclass
class Args:
    mu: float = 0.001                                 # mu in Eq. (2)

    def __post_init__(self):
        if not self.mu >= 0:                          # a negative mu pushes away from w^t
            raise UsageError(f"--mu must be >= 0 (got {self.mu})")


def proximal_term(model, w_t: dict):
    """||w - w^t||^2 over the trainable tensors of `model` that the server sent (w_t):
    the term of Eq. (2) without its mu/2 (algorithms/clip_svm.py's --fl fedprox reuses it)."""
    return sum(((p - w_t[n].to(p.device)) ** 2).sum() for n, p in trainable(model) if n in w_t)


@register("fedprox")
class FedProx(Algorithm):
    Args = Args

    def loss(self, model, batch, payload, client):
        F_k = super().loss(model, batch, payload, client)
        return F_k + self.args.mu / 2 * proximal_term(model, payload["w"])   # Eq. (2)
