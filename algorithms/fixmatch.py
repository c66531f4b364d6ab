"""FedAvg + FixMatch, a baseline of FGASL (../shared/methods/fgasl.md section 8). Kihyuk
Sohn, David Berthelot, Chun-Liang Li, Zizhao Zhang, Nicholas Carlini, Ekin D. Cubuk, Alex
Kurakin, Han Zhang, Colin Raffel, FixMatch: Simplifying Semi-Supervised Learning with
Consistency and Confidence, NeurIPS 2020, arXiv:2001.07685. Server: FedAvg (the core's
n_k-weighted average; n_k = labelled + unlabelled images, as FGASL --no-gaa).

Client k, each local iteration: a labelled batch (x^l, y^l) of --batch-size and an
unlabelled batch x^u of --unlabeled-batch, one forward of the model in train mode over
[weak(x^l), weak(x^u), strong(x^u)]:
    q = softmax(f(weak(x^u))) (no gradient), y_hat = argmax q                      (FM-1)
    l_u = 1/|B_u| sum_i 1[max q_i >= tau] CE(f(strong(x^u_i)), y_hat_i)            (FM-2)
    L = l_s + lambda_u l_u, l_s = the run's task loss on weak(x^l)                 (FM-3)
one optimiser step. Defaults [paper]: tau 0.95, lambda_u 1.
Augmentations: the same weak (flips) and strong views as FGASL (algorithms/fgasl.py).
Logged per client per round: pl_seen, pl_accept, pl_acc (against the hidden labels).

Deviations: the unlabelled batch equals the labelled one (mu = 1, the paper's mu = 7) by
default (--unlabeled-batch sets it); the strong view is FGASL's (not RandAugment with
Cutout); no EMA model for evaluation, no cosine learning-rate decay (the run's optimiser
and constant lr, as every baseline here); l_s is the run's task loss (--loss,
--class-weights).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from algorithms.fedlsm import cycle
from algorithms.fgasl import flips, normalise, strong
from fedmed import Algorithm, Diverged, UsageError, register, seeded, torch_rng


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class Args:
    confidence: float = field(default=0.95, metadata=_h("FixMatch confidence threshold tau"))
    lambda_u: float = field(default=1.0, metadata=_h("weight lambda_u of the unlabelled loss"))
    unlabeled_batch: int = field(default=0, metadata=_h(
        "unlabelled images per step (0: --batch-size)"))


class SemiSupervised(Algorithm):
    """FedAvg whose local step also reads a batch of unlabelled images: the loop of
    labelled and unlabelled batches and the views, written once for FixMatch and Mean
    Teacher; a subclass gives `unlabelled_loss`."""

    def __init__(self, cfg, args, fed):
        super().__init__(cfg, args, fed)
        a = self.args
        if a.unlabeled_batch < 0 or a.unlabeled_batch == 1:
            raise UsageError(f"--unlabeled-batch must be 0 (= --batch-size) or at least 2 "
                             f"(got {a.unlabeled_batch})")
        if self.multilabel:
            raise UsageError(f"--algo {cfg.algo} is for single-label data; choose a single-label "
                             "dataset")
        for c in fed.clients:
            if len(c.train) == 0:
                raise UsageError(f"client {c.name} has no labelled training image; --algo "
                                 f"{cfg.algo} needs one at every client (lower --unlabeled-fraction)")
            if len(c.unlabeled) == 0:
                raise UsageError(f"client {c.name} has no unlabelled image; --algo {cfg.algo} "
                                 "learns from unlabelled images (give --unlabeled-fraction > 0)")

    def local_update(self, client, payload):
        up = super().local_update(client, payload)
        up["n"] = len(client.train) + len(client.unlabeled)
        return up

    def begin_local(self) -> None:
        """Before the first local step of a client (Mean Teacher resets its teacher)."""

    def after_step(self) -> None:
        """After each optimiser step (Mean Teacher's EMA)."""

    def unlabelled_loss(self, x_l, w_u, s_u, t: int, T_max: int, stats: dict):
        """(the student's logits on the labelled batch x_l, the weighted unlabelled loss)
        from the normalised views x_l, weak w_u and strong s_u; t is the global iteration
        of T_max; the pseudo-label counts go into stats (stats["truth"]: the hidden labels)."""
        raise NotImplementedError

    def train(self, client, payload, steps_scale: int = 1) -> int:
        cfg, model = self.budget(), self.model
        # I: the steps local_batches yields (steps_scale multiplies --local-steps only, as
        # in the core; in epochs the data already set the count)
        I = (cfg.local_steps * steps_scale
             or cfg.local_epochs * math.ceil(len(client.train) / cfg.batch_size))
        T_max = self.cfg.rounds * I
        opt = self.make_optimizer(client)
        gen = torch_rng(cfg.seed, "batches", self.round, client.id)
        gen_u = torch_rng(cfg.seed, "unlabeled", self.round, client.id)
        gen_aug = torch_rng(cfg.seed, "augment", self.round, client.id)
        labelled = self.local_batches(client, gen, steps_scale)
        unlabelled = cycle(client.unlabeled, self.args.unlabeled_batch or cfg.batch_size, gen_u)
        stats = {"seen": 0, "accepted": 0, "correct": 0}
        finite = torch.ones((), dtype=torch.bool)
        steps = 0
        self.begin_local()
        with seeded(cfg.seed, "local", self.round, client.id):
            for i, idx_l in enumerate(labelled):                        # I batches at most
                idx_u = next(unlabelled)
                x_l = flips(self.fed.x[idx_l].float() / 255, gen_aug)
                w_u = flips(self.fed.x[idx_u].float() / 255, gen_aug)
                s_u = strong(w_u, gen_aug)
                x_l, w_u, s_u = (normalise(v).to(self.device) for v in (x_l, w_u, s_u))
                model.train()
                stats["truth"] = self.fed.y[idx_u].to(self.device)     # diagnostics only
                z_l, l_u = self.unlabelled_loss(x_l, w_u, s_u, self.round * I + i, T_max, stats)
                loss = self.task_loss(z_l, self.fed.y[idx_l].to(self.device)) + l_u
                finite &= torch.isfinite(loss.detach()).cpu()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self.after_step()
                steps += 1
        if not bool(finite):
            raise Diverged(f"round {self.round + 1}, client {client.name}: the training loss "
                           "became NaN or infinite")
        if cfg.keep_optimizer:
            client.state["optimizer"] = opt.state_dict()
        stats.pop("truth")
        client.state["pl"] = dict(stats, round=self.round)
        return steps

    def line_extra(self, server, client):
        pl = client.state.get("pl", {})
        if client.id < 0 or pl.get("round") != self.round:
            return {}
        return {"pl_seen": pl["seen"], "pl_accept": pl["accepted"] / max(pl["seen"], 1),
                "pl_acc": pl["correct"] / pl["accepted"] if pl["accepted"] else None}


@register("fixmatch")
class FedFixMatch(SemiSupervised):
    Args = Args

    def __init__(self, cfg, args, fed):
        args = args if args is not None else Args()
        if not 0 <= args.confidence <= 1 or args.lambda_u < 0:
            raise UsageError(f"--confidence must lie in [0, 1] and --lambda-u be >= 0 (got "
                             f"{args.confidence}, {args.lambda_u})")
        super().__init__(cfg, args, fed)

    def unlabelled_loss(self, x_l, w_u, s_u, t, T_max, stats):
        n_l, n_u = len(x_l), len(w_u)
        z = self.model(torch.cat([x_l, w_u, s_u])).float()
        z_l, z_w, z_s = z[:n_l], z[n_l:n_l + n_u], z[n_l + n_u:]
        conf, y_hat = F.softmax(z_w.detach(), 1).max(1)                   # (FM-1)
        mask = (conf >= self.args.confidence).float()
        l_u = (mask * F.cross_entropy(z_s, y_hat, reduction="none")).sum() / n_u   # (FM-2)
        stats["seen"] += n_u
        stats["accepted"] += int(mask.sum())
        stats["correct"] += int(((y_hat == stats["truth"]).float() * mask).sum())
        return z_l, self.args.lambda_u * l_u                               # (FM-3)
