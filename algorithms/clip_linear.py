"""Linear probe on frozen CLIP image features (Radford et al., Learning Transferable
Visual Models From Natural Language Supervision, ICML 2021, arXiv:2103.00020, §3.2), in
the federation: a linear classifier on the L2-normalised image embedding,
  (1) p(c | x) = softmax(W normalise(I) + b),  trained with the common loss (--loss,
      --class-weights) on cached features,
either federated with FedAvg (`--probe fedavg`: (2) w <- sum_k n_k / n w_k, McMahan et
al. 2017) or trained by each client alone (`--probe local`: nothing is sent; a held-out
client is scored with the n_k-average of the clients' probes, evaluation only).

Defaults (`recipe`): Adam (betas 0.9/0.98, eps 1e-6) lr 1e-3, 1 local epoch, B = 32.
Deviations: Radford et al. fit an L-BFGS logistic regression on the pooled features
with a validation sweep of the L2 penalty; here it is minibatch Adam in the federated
loop (the project's baseline setting), with no validation sweep.
"""
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from clip_adapters import ClipArgs, ClipMethod, flag
from fedmed import UsageError, register


@dataclass
class Args(ClipArgs):
    probe: str = flag("fedavg", "linear probe trained with FedAvg (fedavg) or by each client "
                      "alone (local)")


@register("clip_linear")
class ClipLinear(ClipMethod):
    Args = Args
    recipe = {"optimizer": "adam", "lr": 1e-3, "local_epochs": 1, "batch_size": 32}

    def __init__(self, cfg, args, fed):
        args = args if args is not None else Args()
        if args.probe not in ("fedavg", "local"):
            raise UsageError(f"--probe {args.probe!r} is unknown; choose fedavg or local")
        self.primary_view = "global" if args.probe == "fedavg" else "local"
        super().__init__(cfg, args, fed)

    def build_model(self):
        return nn.Linear(self.d, self.fed.num_classes)

    def _private_keys(self, affine, stats):
        return set(self.init_weights) if self.args.probe == "local" else set()

    def batch(self, idx, gen=None):
        I, y = super().batch(idx, gen)
        return F.normalize(I, dim=-1), y                                 # (1)

    def broadcast(self, server, client):
        return super().broadcast(server, client) if self.args.probe == "fedavg" else {}

    def local_update(self, client, payload):
        upload = super().local_update(client, payload)
        return upload if self.args.probe == "fedavg" else {}
