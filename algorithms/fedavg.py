"""FedAvg. H. B. McMahan, E. Moore, D. Ramage, S. Hampson, B. Aguera y Arcas,
Communication-Efficient Learning of Deep Networks from Decentralized Data, AISTATS 2017,
arXiv:1602.05629.

Algorithm 1. Round t: the server sends w_t to the sampled clients S_t (a fraction C of
the K clients); client k runs E epochs of minibatch SGD (batch B, step eta) on its loss
F_k from w_t and returns w_{t+1}^k; the server sets
    w_{t+1} = sum_{k in S_t} n_k / (sum_{j in S_t} n_j) w_{t+1}^k.
The hooks of fedmed.Algorithm implement exactly this; this file only names it.

BatchNorm: `--bn average` averages affine parameters and running statistics with the
same n_k weights (num_batches_tracked: maximum); `--bn local` is FedBN (Li et al., ICLR
2021, arXiv:2102.07623): BN layers never leave the client; `--bn params_only` averages
every parameter but keeps running statistics local (FLamby's behaviour).

Paper defaults: C = 0.1, E in {1, 5, 20}, B in {10, 50}. Our defaults follow the
cross-silo setting (all clients every round, C = 1).
Deviations: momentum SGD is allowed (--momentum, default 0.9, state reset every round
unless --keep-optimizer); the paper uses plain SGD. `--weighting uniform` gives the plain
mean, which is NOT FedAvg and is named as such.
"""
from fedmed import Algorithm, register


@register("fedavg")
class FedAvg(Algorithm):
    Args = None
