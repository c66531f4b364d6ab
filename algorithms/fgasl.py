"""FGASL (FedSemiDG), adapted to classification. Zhipeng Deng, Zhe Xu, Tsuyoshi Isshiki,
Yefeng Zheng, FedSemiDG: Domain Generalized Federated Semi-supervised Medical Image
Segmentation, Medical Image Analysis (2026), arXiv:2501.07378; code dzp2095/FedSemiDG
(segmentation only). GAA follows FedDG-GA (Ruipeng Zhang et al., Federated Domain
Generalization with Generalization Adjustment, CVPR 2023); PIA's feature dropout follows
UniMatch (Lihe Yang et al., CVPR 2023). Specification: ../shared/methods/fgasl.md; the
labels in brackets below are that sheet's sections, [ours] marks a project choice (the
whole move from segmentation to per-image classification is one).

Setting: every training client holds a few labelled images (client.train) and many
unlabelled ones (client.unlabeled, e.g. from --unlabeled-fraction; their labels are never
read for training, only to log the pseudo-labels' accuracy); the unseen domain is a
--holdout-client (evaluated, never trained on; leave-one-centre-out: run.py
--leave-one-out runs one fold per centre).

Server, round r = 0..R-1 [3, Server]:
 (S1) broadcast theta_g, every tensor (BN included; --bn average only).
 (S2) receive theta_k and the scalar a_k of every client.
 (S3) GA update of the GA state alpha (uniform at the start):
          g_k = a_k / max_j |a_j|      (g = 0 when every a_k = 0)                 (GA-1)
          alpha_k <- alpha_k + g_k (d/3) (1 - r/R)                               (GA-2)
          alpha <- clip(alpha, 0, 1); alpha <- alpha / sum(alpha) (uniform if 0)  (GA-3)
      --ga-center: FedDG-GA's form, a_k - mean_j a_j in place of a_k in (GA-1).
      Round 0 aggregates with uniform weights 1/K; alpha is still updated with the
      round-0 gaps. From round 1 on, alpha is updated first and then used.
 (S4) theta_g <- sum_k w_k theta_k over every floating tensor, BN buffers included
      (num_batches_tracked: the maximum, as the core's)                            (AGG)
Client k, round r [3, Client]:
 (C1) student theta <- theta_g; static teacher theta_S <- frozen theta_g; dynamic teacher
      theta_D <- theta_g (an EMA of the student from here on). Both teachers in eval mode.
 (C2) I iterations (--local-steps; t = r I + i, T_max = R I), each on a labelled batch
      (x^l, y^l) of --batch-size and an unlabelled batch x^u of --unlabeled-batch:
      p_S = softmax(f_S(weak(x^u))), p_D = softmax(f_D(weak(x^u)))                  (DR-1)
      p = (p_S + p_D) / 2, y_hat = argmax p                                         (DR-2)
      u = (H(p_S) + H(p_D)) / 2, H(p) = -sum_c p_c log p_c                          (DR-3)
      q_t = q_s + (q_e - q_s) t / T_max                                             (DR-4)
      tau <- 0.9 tau + 0.1 Quantile_{q_t}(B), B = the last N_buf entropies
      H(softmax(f_theta(x^l))) of the student's labelled images (this batch's included;
      --threshold-source batch: this batch only, the literal transfer); tau_0 = 0, and
      tau and B persist across rounds in client.state (checkpointed)                (DR-5)
      m_i = 1[u_i <= tau]                                                           (DR-6)
      L_s = the run's task loss on f_theta(x^l) (CE with --class-weights none)      (L-s)
      L_u = 1/|B_u| sum_i m_i CE(f_theta(strong(x^u_i)), y_hat_i)                   (L-u)
      L_pert = MSE(F, F^FP): F the pooled penultimate feature of the clean pass over
      [x^l, strong(x^u)], F^FP of a second pass with Dropout2d(p_fp) on the output of
      every backbone stage (each perturbed stage feeding the next); gradients through
      both passes                                                                   (PIA)
      L = L_s + L_u + lambda_f L_pert; one optimiser step (the recipe: Adam);
      theta_D <- 0.99 theta_D + 0.01 theta (parameters; buffers copied)            (EMA)
 (C3) a_k = mean over every local image (labelled and unlabelled, no augmentation) of
      KL(p_g || p_k) = sum_c p_g,c (log p_g,c - log p_k,c), p_g from theta_g (the static
      teacher) and p_k from the trained theta, both in eval mode (no BN buffer moves) (GAP)
 (C4) upload theta and a_k.

Augmentations [ours, sheet section 7]: weak = the core's flips (a horizontal, then a
vertical flip, each with probability 1/2); strong = weak, then per image brightness
x*b, contrast (x - mean) c + mean, saturation (grey + s (x - grey)), b, c, s ~ U(0.5, 1.5),
a Gaussian blur with probability 1/2 (kernel 3, 5 or 7, sigma ~ U(0.1, 2)), one cutout
square of side S/4 (zero in [0, 1] space), clamped to [0, 1], then normalised.

Defaults [sheet 7]: q_s 0.15, q_e 0.30, p_fp 0.3, lambda_f 0.3, d 0.05, EMA 0.99, threshold
EMA 0.9, N_buf 256 [ours]; the recipe (run.py applies it to unset flags): Adam lr 1e-4,
weight decay 5e-4, batch 16 labelled + 16 unlabelled [ours], 100 local iterations [code];
the code's 50 rounds are left to --rounds.

Ablations (--no-gaa, --no-dr, --no-pia) [ours, sheet section 8]: without GAA the server
takes the FedAvg weights n_k = labelled + unlabelled images; without DR the pseudo label
is the dynamic teacher's argmax, kept when its top probability is >= --tau-fixed (0.95,
FixMatch's; a single teacher, no adaptive threshold); without PIA no perturbed pass and
L_pert = 0.

Logged per client per round (metrics.jsonl): pl_seen (unlabelled images seen),
pl_accept (share accepted by the mask), pl_acc (accuracy of the accepted pseudo labels
against the hidden labels; null when none was accepted), tau (the threshold after the
round), gap (a_k) and ga_weight (the weight the client's model got in this round's
aggregate).

Deviations:
 * classification analogue of every loss (no Dice), pooled feature for PIA, Dropout2d on
   the backbone stages of models.py's models (PIA_STAGES) [ours, sheet 5];
 * the quantile is over a running buffer of N_buf labelled entropies (sheet pitfall 6;
   --threshold-source batch gives the per-batch quantile of the transfer);
 * round 0 aggregates with normalised uniform weights (the research code's aliasing
   scales every tensor by up to 1 + d/3: pitfall 2); model.train() before every step
   (pitfall 3); the code's unused pseudo_label_threshold is not a parameter (pitfall 4);
 * the teachers predict in eval mode [ours; the code's mode is unverified]; the dynamic
   teacher copies the student's BN buffers after each step (parameters are EMA'd);
 * L_s is the run's task loss (--loss, --class-weights), as every baseline's [ours];
 * every client takes part every round (--fraction 1): alpha is a vector over clients.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmed import (IMAGENET_MEAN, IMAGENET_STD, Algorithm, Diverged, UsageError, register,
                    seeded, torch_rng, weighted_average)
from algorithms.fedlsm import cycle, ema_update  # FedLSM's batch cycle and (EMA)


def _h(text: str) -> dict:
    return {"help": text}


# where PIA perturbs (the output of every backbone stage) and where F is read (the head's
# input, the pooled penultimate feature), per models.py backbone [ours, sheet 5]
PIA_STAGES = {"cnn": ["features.3", "features.7", "features.11"],
              "mobilenet_v2": ["features.3", "features.6", "features.13", "features.17"],
              "resnet18": ["layer1", "layer2", "layer3", "layer4"],
              "densenet121": ["features.denseblock1", "features.denseblock2",
                              "features.denseblock3", "features.denseblock4"],
              "efficientnet_b0": ["features.2", "features.3", "features.5", "features.7"]}
HEAD_AT = {"cnn": "classifier", "mobilenet_v2": "classifier", "resnet18": "fc",
           "densenet121": "classifier", "efficientnet_b0": "classifier"}


@dataclass
class Args:
    q_s: float = field(default=0.15, metadata=_h("entropy quantile at the start, q_s"))
    q_e: float = field(default=0.30, metadata=_h("entropy quantile at the end, q_e"))
    p_fp: float = field(default=0.3, metadata=_h("PIA channel-dropout probability p_fp"))
    lambda_f: float = field(default=0.3, metadata=_h("PIA weight lambda_f"))
    ga_step: float = field(default=0.05, metadata=_h("GA step d (used as d/3, decaying linearly)"))
    ga_center: bool = field(default=False, metadata=_h(
        "centre the gaps before the GA update (FedDG-GA's form)"))
    dynamic_decay: float = field(default=0.99, metadata=_h("EMA decay of the dynamic teacher"))
    tau_decay: float = field(default=0.9, metadata=_h("EMA decay of the adaptive threshold tau"))
    buffer: int = field(default=256, metadata=_h("N_buf: labelled entropies kept for the quantile"))
    threshold_source: str = field(default="buffer", metadata=_h(
        "buffer (the last N_buf labelled entropies) | batch (this batch's: the literal transfer)"))
    unlabeled_batch: int = field(default=0, metadata=_h(
        "unlabelled images per step (0: --batch-size)"))
    gaa: bool = field(default=True, metadata=_h("generalisation-aware aggregation (--no-gaa: "
                                                "FedAvg weights)"))
    dr: bool = field(default=True, metadata=_h("dual-teacher adaptive refinement (--no-dr: the "
                                               "dynamic teacher with --tau-fixed)"))
    pia: bool = field(default=True, metadata=_h("perturbation-invariant alignment (--no-pia)"))
    tau_fixed: float = field(default=0.95, metadata=_h(
        "--no-dr only: confidence threshold of the single (dynamic) teacher"))


# ---------------------------------------------------------------- the pieces, testable alone

def ga_update(alpha: torch.Tensor, a: torch.Tensor, r: int, R: int, d: float,
              center: bool = False) -> torch.Tensor:
    """(GA-1)-(GA-3): the new GA state from the old one and this round's gaps a."""
    a = a.double()
    if center:                                        # FedDG-GA: (G_k - mean G)
        a = a - a.mean()
    m = a.abs().max()
    g = a / m if m > 0 else torch.zeros_like(a)       # (GA-1)
    alpha = alpha.double() + g * (d / 3) * (1 - r / R)   # (GA-2)
    alpha = alpha.clamp(0, 1)                         # (GA-3)
    s = alpha.sum()
    return alpha / s if s > 0 else torch.full_like(alpha, 1 / len(alpha))


def entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_c p_c log p_c per row (0 log 0 = 0)."""
    return -torch.special.xlogy(p, p).sum(1)


def dual_teacher(p_S: torch.Tensor, p_D: torch.Tensor):
    """(DR-2), (DR-3): pseudo labels argmax (p_S + p_D)/2 and uncertainty (H(p_S) + H(p_D))/2."""
    p = (p_S + p_D) / 2
    return p.argmax(1), (entropy(p_S) + entropy(p_D)) / 2


def accept(u: torch.Tensor, tau: float) -> torch.Tensor:
    """(DR-6) the mask 1[u <= tau] as floats."""
    return (u <= tau).float()


def quantile_at(t: int, T_max: int, q_s: float, q_e: float) -> float:
    """(DR-4) q_t = q_s + (q_e - q_s) t / T_max."""
    return q_s + (q_e - q_s) * t / T_max


def update_threshold(tau: float, buf: torch.Tensor, H_l: torch.Tensor, q: float,
                     decay: float, n_buf: int, source: str = "buffer"):
    """(DR-5): (new tau, new buffer). The buffer keeps the last n_buf entropies."""
    buf = torch.cat([buf, H_l.detach().double().cpu()])[-n_buf:]
    sample = buf if source == "buffer" else H_l.detach().double().cpu()
    return decay * tau + (1 - decay) * float(torch.quantile(sample, q)), buf


def gap_kl(logits_g: torch.Tensor, logits_k: torch.Tensor) -> torch.Tensor:
    """(GAP) per image: sum_c p_g,c (log p_g,c - log p_k,c), from logits."""
    lg, lk = F.log_softmax(logits_g.double(), 1), F.log_softmax(logits_k.double(), 1)
    return (lg.exp() * (lg - lk)).sum(1)


def flips(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The weak view: a horizontal, then a vertical flip, each with probability 1/2 (the
    core's training augmentation, one pair of draws per image)."""
    u = torch.rand(len(x), 2, generator=gen)
    x = torch.where((u[:, 0] < 0.5).view(-1, 1, 1, 1), x.flip(3), x)
    return torch.where((u[:, 1] < 0.5).view(-1, 1, 1, 1), x.flip(2), x)


def strong(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The strong view of weak images x in [0, 1] (see the module docstring). Draws, in
    this order: U [B, 6] (brightness, contrast, saturation, blur?, sigma, kernel), cutout
    centres [B, 2]."""
    B, _, S, _ = x.shape
    u = torch.rand(B, 6, generator=gen)
    cut = torch.randint(0, S, (B, 2), generator=gen)
    b, c, s = (0.5 + u[:, j].view(-1, 1, 1, 1) for j in range(3))
    x = x * b                                                     # brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * c + mean                                     # contrast
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    x = grey + s * (x - grey)                                     # saturation
    out = []
    for i in range(B):
        xi = x[i:i + 1]
        if u[i, 3] < 0.5:                                         # Gaussian blur
            k = 3 + 2 * min(int(u[i, 5] * 3), 2)
            sigma = 0.1 + 1.9 * float(u[i, 4])
            r = torch.arange(k, dtype=x.dtype) - k // 2
            g1 = torch.exp(-r ** 2 / (2 * sigma ** 2))
            g1 = g1 / g1.sum()
            w = (g1[:, None] * g1[None, :]).expand(3, 1, k, k)
            xi = F.conv2d(F.pad(xi, [k // 2] * 4, mode="reflect"), w, groups=3)
        h = S // 4                                                # cutout
        y0, x0 = int(cut[i, 0]), int(cut[i, 1])
        xi = xi.clone()
        xi[:, :, max(y0 - h // 2, 0):y0 + h // 2, max(x0 - h // 2, 0):x0 + h // 2] = 0
        out.append(xi)
    return torch.cat(out).clamp(0, 1)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - IMAGENET_MEAN) / IMAGENET_STD


class Perturbed:
    """PIA's hooks: while `on`, Dropout2d(p) is applied to the output of every stage in
    `stages` (train mode only: F.dropout2d with training=model.training); F is read at the
    input of `head`."""

    def __init__(self, model: nn.Module, stages: list, head: str, p: float):
        self.model, self.p, self.on, self.seen = model, p, False, []
        self.handles = [model.get_submodule(s).register_forward_hook(self._drop) for s in stages]
        self.handles.append(model.get_submodule(head).register_forward_pre_hook(
            lambda m, inp: self.seen.append(inp[0])))

    def _drop(self, module, inp, out):
        if self.on:
            return F.dropout2d(out, self.p, training=self.model.training)
        return None

    def forward(self, x: torch.Tensor, perturb: bool = False):
        """(logits, F) of one pass, perturbed or clean."""
        self.on, self.seen = perturb, []
        try:
            z = self.model(x)
        finally:
            self.on = False
        return z, self.seen[-1]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def pia_loss(feat: torch.Tensor, feat_fp: torch.Tensor) -> torch.Tensor:
    """(PIA) MSE(F, F^FP), gradients through both."""
    return F.mse_loss(feat, feat_fp)


# ---------------------------------------------------------------- the algorithm

def check_args(cfg, a) -> None:
    """The settings FGASL refuses, before any image is read (one line each)."""
    if not (0 <= a.q_s <= 1 and 0 <= a.q_e <= 1):
        raise UsageError(f"--q-s and --q-e must lie in [0, 1] (got {a.q_s}, {a.q_e})")
    if a.q_s > a.q_e:
        raise UsageError(f"--q-s {a.q_s} is above --q-e {a.q_e}; the quantile must rise "
                         "(q_s <= q_e)")
    if not 0 <= a.p_fp < 1:
        raise UsageError(f"--p-fp must lie in [0, 1) (got {a.p_fp})")
    if a.lambda_f < 0 or a.ga_step < 0:
        raise UsageError(f"--lambda-f and --ga-step must be >= 0 (got {a.lambda_f}, {a.ga_step})")
    for name in ("dynamic_decay", "tau_decay", "tau_fixed"):
        if not 0 <= getattr(a, name) <= 1:
            raise UsageError(f"--{name.replace('_', '-')} must lie in [0, 1] "
                             f"(got {getattr(a, name)})")
    if a.buffer < 1:
        raise UsageError(f"--buffer must be at least 1 (got {a.buffer})")
    if a.threshold_source not in ("buffer", "batch"):
        raise UsageError(f"--threshold-source {a.threshold_source!r} is unknown; use buffer "
                         "or batch")
    if a.unlabeled_batch < 0 or a.unlabeled_batch == 1:
        raise UsageError(f"--unlabeled-batch must be 0 (= --batch-size) or at least 2 "
                         f"(got {a.unlabeled_batch})")
    if cfg.model not in PIA_STAGES:
        raise UsageError(f"--model {cfg.model}: FGASL's PIA has no stage list for it; use one of "
                         + ", ".join(PIA_STAGES))
    if cfg.bn != "average":
        raise UsageError(f"--bn {cfg.bn}: FGASL sends and aggregates every tensor, BN included; "
                         "use --bn average")
    if cfg.fraction != 1:
        raise UsageError(f"--fraction {cfg.fraction}: FGASL's GA weights are over every client; "
                         "use --fraction 1")


@register("fgasl")
class FGASL(Algorithm):
    Args = Args
    recipe = {"optimizer": "adam", "lr": 1e-4, "weight_decay": 5e-4, "batch_size": 16,
              "local_steps": 100}

    @staticmethod
    def check_before_data(cfg, args, image_size=None) -> None:
        check_args(cfg, args)

    def __init__(self, cfg, args, fed):
        args = args if args is not None else Args()
        check_args(cfg, args)
        super().__init__(cfg, args, fed)
        if self.multilabel:
            raise UsageError("--algo fgasl is for single-label data (softmax pseudo labels); "
                             "choose a single-label dataset")
        for c in fed.clients:
            if len(c.train) == 0:
                raise UsageError(f"client {c.name} has no labelled training image; FGASL needs a "
                                 "labelled subset at every client (lower --unlabeled-fraction)")
            if len(c.unlabeled) == 0:
                raise UsageError(f"client {c.name} has no unlabelled image; FGASL learns from "
                                 "unlabelled images (give --unlabeled-fraction > 0)")
        self.static = copy.deepcopy(self.model)
        self.dynamic = copy.deepcopy(self.model)
        for m in (self.static, self.dynamic):
            for p in m.parameters():
                p.requires_grad_(False)
        self.info = {"pia_stages": PIA_STAGES[cfg.model], "feature_at": HEAD_AT[cfg.model],
                     "components": [n for n in ("gaa", "dr", "pia") if getattr(args, n)]}

    def b_u(self) -> int:
        return self.args.unlabeled_batch or self.budget().batch_size

    # -- state ------------------------------------------------------------------------
    def setup(self, server, clients):
        super().setup(server, clients)
        server.state["alpha"] = torch.full((len(clients),), 1 / len(clients), dtype=torch.float64)
        for c in clients:
            c.state["tau"] = 0.0                                         # tau_0 = 0
            c.state["buffer"] = torch.zeros(0, dtype=torch.float64)

    # -- the hooks --------------------------------------------------------------------
    def broadcast(self, server, client):
        return {"w": dict(server.weights)}                              # (S1) every tensor

    def local_update(self, client, payload):
        self.load_model(payload["w"], {})                              # (C1)
        self.static.load_state_dict(self.model.state_dict())
        self.dynamic.load_state_dict(self.model.state_dict())
        self.train(client, payload)                                      # (C2)
        up = {"w": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
              "n": len(client.train) + len(client.unlabeled)}
        if self.args.gaa:
            up["gap"] = self.gap(client)                                 # (C3)
        return up

    @torch.no_grad()
    def gap(self, client) -> torch.Tensor:
        """(GAP) a_k over every local image, eval mode, no augmentation."""
        self.static.eval()
        self.model.eval()
        idx = torch.as_tensor(np.concatenate([client.train, client.unlabeled]), dtype=torch.long)
        total = torch.zeros((), dtype=torch.float64)
        for s in range(0, len(idx), self.cfg.eval_batch_size):
            x, _ = self.batch(idx[s:s + self.cfg.eval_batch_size])
            total += gap_kl(self.static(x).float(), self.model(x).float()).sum().cpu()
        a_k = total / len(idx)
        client.state["gap"] = {"round": self.round, "a": float(a_k)}
        return a_k

    def aggregate(self, server, uploads):
        """(S3), (S4)."""
        ids = sorted(uploads)
        ups = [uploads[k] for k in ids]
        K = len(ups)
        if self.args.gaa:
            a = torch.stack([u["gap"].double() for u in ups])
            alpha = ga_update(server.state["alpha"], a, self.round, self.cfg.rounds,
                              self.args.ga_step, self.args.ga_center)
            server.state["alpha"] = alpha
            w = [1 / K] * K if self.round == 0 else alpha.tolist()     # uniform in round 0
        else:
            w = [float(u["n"]) for u in ups]                           # FedAvg n_k
            total = sum(w)
            w = [x / total for x in w]
        server.state["used"] = {"round": self.round, "w": dict(zip(ids, w))}
        for key in ups[0]["w"]:
            ts = [u["w"][key] for u in ups]
            if key.endswith("num_batches_tracked"):
                server.weights[key] = torch.stack(ts).max()
            else:
                server.weights[key] = weighted_average(ts, w)          # (AGG)

    # -- local training: (C2) -----------------------------------------------------------
    def train(self, client, payload, steps_scale: int = 1) -> int:
        cfg, a, model = self.budget(), self.args, self.model
        opt = self.make_optimizer(client)
        gen = torch_rng(cfg.seed, "batches", self.round, client.id)
        gen_u = torch_rng(cfg.seed, "unlabeled", self.round, client.id)
        gen_aug = torch_rng(cfg.seed, "augment", self.round, client.id)
        labelled = list(self.local_batches(client, gen, steps_scale))   # I: --local-steps
        I = len(labelled)                                  # (or E epochs of labelled images)
        T_max = self.cfg.rounds * I
        unlabelled = cycle(client.unlabeled, self.b_u(), gen_u)
        hooks = Perturbed(model, PIA_STAGES[self.cfg.model], HEAD_AT[self.cfg.model], a.p_fp)
        tau, buf = float(client.state["tau"]), client.state["buffer"]
        seen = accepted = correct = 0
        finite = torch.ones((), dtype=torch.bool)
        self.static.eval()
        self.dynamic.eval()
        steps = 0
        try:
            with seeded(cfg.seed, "local", self.round, client.id):
                for i, idx_l in enumerate(labelled):
                    idx_u = next(unlabelled)
                    t = self.round * I + i
                    x_l = flips(self.fed.x[idx_l].float() / 255, gen_aug)
                    y_l = self.fed.y[idx_l].to(self.device)
                    w_u = flips(self.fed.x[idx_u].float() / 255, gen_aug)
                    s_u = strong(w_u, gen_aug)
                    x_l, w_u, s_u = (normalise(v).to(self.device) for v in (x_l, w_u, s_u))
                    with torch.no_grad():
                        p_D = F.softmax(self.dynamic(w_u).float(), 1)            # (DR-1)
                        if a.dr:
                            p_S = F.softmax(self.static(w_u).float(), 1)
                            y_hat, u = dual_teacher(p_S, p_D)                    # (DR-2, 3)
                        else:
                            conf, y_hat = p_D.max(1)
                    model.train()                                       # pitfall 3: every step
                    x_in = torch.cat([x_l, s_u])
                    z, feat = hooks.forward(x_in)
                    z = z.float()
                    z_l, z_u = z[:len(idx_l)], z[len(idx_l):]
                    if a.dr:
                        H_l = entropy(F.softmax(z_l.detach(), 1))
                        q = quantile_at(t, T_max, a.q_s, a.q_e)                  # (DR-4)
                        tau, buf = update_threshold(tau, buf, H_l, q, a.tau_decay, a.buffer,
                                                    a.threshold_source)         # (DR-5)
                        mask = accept(u, tau)                                    # (DR-6)
                    else:
                        mask = (conf >= a.tau_fixed).float()
                    L_s = self.task_loss(z_l, y_l)                                # (L-s)
                    L_u = (mask * F.cross_entropy(z_u, y_hat, reduction="none")).sum() / len(idx_u)
                    loss = L_s + L_u                                              # (L-u)
                    if a.pia:
                        _, feat_fp = hooks.forward(x_in, perturb=True)
                        loss = loss + a.lambda_f * pia_loss(feat.float(), feat_fp.float())
                    finite &= torch.isfinite(loss.detach()).cpu()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    ema_update(self.dynamic, model, a.dynamic_decay)            # (EMA)
                    truth = self.fed.y[idx_u].to(self.device)          # diagnostics only
                    seen += len(idx_u)
                    accepted += int(mask.sum())
                    correct += int(((y_hat == truth).float() * mask).sum())
                    steps += 1
        finally:
            hooks.remove()
        if not bool(finite):
            raise Diverged(f"round {self.round + 1}, client {client.name}: the training loss "
                           "became NaN or infinite")
        if cfg.keep_optimizer:
            client.state["optimizer"] = opt.state_dict()
        client.state["tau"], client.state["buffer"] = tau, buf
        client.state["pl"] = {"round": self.round, "seen": seen, "accepted": accepted,
                              "correct": correct}
        return steps

    def line_extra(self, server, client):
        if client.id < 0:
            return {}
        pl = client.state.get("pl", {})
        now = pl.get("round") == self.round
        gap = client.state.get("gap", {})
        used = server.state.get("used", {})
        out = {"tau": client.state.get("tau")}
        if now:
            out.update(pl_seen=pl["seen"], pl_accept=pl["accepted"] / max(pl["seen"], 1),
                       pl_acc=pl["correct"] / pl["accepted"] if pl["accepted"] else None)
        if gap.get("round") == self.round:
            out["gap"] = gap["a"]
        if used.get("round") == self.round and client.id in used["w"]:
            out["ga_weight"] = used["w"][client.id]
        return out
