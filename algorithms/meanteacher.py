"""FedAvg + Mean Teacher, a baseline of FGASL (../shared/methods/fgasl.md section 8). Antti
Tarvainen, Harri Valpola, Mean teachers are better role models: Weight-averaged
consistency targets improve semi-supervised deep learning results, NeurIPS 2017,
arXiv:1703.01780. Server: FedAvg (n_k = labelled + unlabelled images).

Client k, round r: the teacher theta' <- theta_g (as FGASL's dynamic teacher [ours]); each
local iteration, on a labelled batch and an unlabelled batch x^u:
    J = l_s(f_theta(weak(x^l)), y^l)
        + w(t) lambda_c MSE(softmax(f_theta(strong(x^u))), softmax(f_theta'(weak(x^u))))  (MT-1)
    w(t) = exp(-5 (1 - min(t / T_r, 1))^2), T_r = --rampup x R x I (sigmoid ramp-up;
           w = 1 with --rampup 0)                                                   (MT-2)
one optimiser step, then theta' <- a theta' + (1 - a) theta on parameters (buffers copied)
                                                                                    (MT-3)
MSE over classes and images (mean), the teacher's prediction without gradient.
Defaults: a = 0.99 [paper, its value during ramp-up], lambda_c 1 [ours: the paper tunes
the consistency weight per dataset], ramp-up over the first 25% of the iterations [ours;
the paper ramps up over its first 80 epochs].

Deviations: the teacher predicts in eval mode (no dropout/BN noise on the teacher) on the
weak view and the student sees FGASL's strong view (the paper gives both independent
input noise); the consistency term covers the unlabelled batch only; the teacher restarts
from theta_g every round (federated; the paper keeps one teacher throughout); l_s is the
run's task loss. Logged: pl_seen, pl_accept (1: no mask) and pl_acc (the teacher's argmax
against the hidden labels).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from algorithms.fixmatch import SemiSupervised
from algorithms.fedlsm import ema_update
from fedmed import UsageError, register


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class Args:
    mt_decay: float = field(default=0.99, metadata=_h("Mean Teacher EMA decay a"))
    lambda_c: float = field(default=1.0, metadata=_h("consistency weight lambda_c"))
    rampup: float = field(default=0.25, metadata=_h(
        "share of the R x I iterations over which the consistency weight ramps up (0: none)"))
    unlabeled_batch: int = field(default=0, metadata=_h(
        "unlabelled images per step (0: --batch-size)"))


def rampup_weight(t: int, T_r: float) -> float:
    """(MT-2) exp(-5 (1 - min(t / T_r, 1))^2); 1 without a ramp-up."""
    if T_r <= 0:
        return 1.0
    return math.exp(-5 * (1 - min(t / T_r, 1.0)) ** 2)


@register("meanteacher")
class FedMeanTeacher(SemiSupervised):
    Args = Args

    def __init__(self, cfg, args, fed):
        args = args if args is not None else Args()
        if not 0 <= args.mt_decay <= 1 or args.lambda_c < 0 or not 0 <= args.rampup <= 1:
            raise UsageError(f"--mt-decay and --rampup must lie in [0, 1], --lambda-c be >= 0 "
                             f"(got {args.mt_decay}, {args.rampup}, {args.lambda_c})")
        super().__init__(cfg, args, fed)
        self.teacher = copy.deepcopy(self.model)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def begin_local(self) -> None:
        self.teacher.load_state_dict(self.model.state_dict())          # theta' <- theta_g

    def after_step(self) -> None:
        ema_update(self.teacher, self.model, self.args.mt_decay)       # (MT-3)

    def unlabelled_loss(self, x_l, w_u, s_u, t, T_max, stats):
        n_l = len(x_l)
        self.teacher.eval()
        with torch.no_grad():
            p_t = F.softmax(self.teacher(w_u).float(), 1)
        z = self.model(torch.cat([x_l, s_u])).float()
        z_l, z_s = z[:n_l], z[n_l:]
        w = rampup_weight(t, self.args.rampup * T_max)                  # (MT-2)
        l_c = F.mse_loss(F.softmax(z_s, 1), p_t)                        # (MT-1)
        stats["seen"] += len(w_u)
        stats["accepted"] += len(w_u)
        stats["correct"] += int((p_t.argmax(1) == stats["truth"]).sum())
        return z_l, w * self.args.lambda_c * l_c
