"""FedLSM. Zhipeng Deng, Luyang Luo, Hao Chen, Scale Federated Learning for Label Set
Mismatch in Medical Image Classification, MICCAI 2023, LNCS 14221, pp. 118-127,
doi:10.1007/978-3-031-43898-1_12, arXiv:2304.06931. Public code: github.com/dzp2095/FedLSM.
Specification: ../shared/methods/fedlsm.md (the paper's equations were not available, so
the loss forms follow the released code and the names of the method figure; the step
numbers below are those of the sheet, section 3).

Client k annotates only its label set L_k. Single-label data (skin, softmax): its images of
classes outside L_k are unlabelled (`client.unlabeled`). Multi-label data (chest X-ray
style, sigmoid per class, Federation.y [N, C]): entries of classes outside L_k are missing
(y = -1).

Client k, round r:
 (1) receive theta_g; student theta <- theta_g, EMA teacher theta_t <- theta_g.
 (2) UE, uncertainty estimation: one pass of theta_g over all local training images (no
     augmentation), scores
         single-label   H(x) = -sum_c p_c log p_c                             (UE-s)
         multi-label    H(x) = mean_{c not in L_k} -s_c log s_c, s = sigmoid(z)   (UE-m)
     U = the n_u images of highest H (uncertain), Cf = the n_c of lowest H (confident),
     P = all \\ U (so Cf is inside P, as in the code).
 (3) for I local iterations: a batch of B - b images from P (weak view x_w = flips, strong
     view x_s), b from U and b from Cf (no augmentation);
     pseudo labels from the teacher t = softmax / sigmoid(z_t(x_w)):
         single-label   an image without a label gets onehot(argmax t) when max t >= tau
                        AND argmax t is not in L_k (a class the client does not annotate);
                        otherwise it has no target (zero row)                  (PL-s)
         multi-label    on a missing entry c: y_c = 1 if t_c >= tau_hi, 0 if t_c <= tau_lo,
                        else masked (m_c = 0); observed entries keep the ground truth,
                        m_c = 1                                                 (PL-m)
     (thresholds: P and Cf tau_p (single) / tau_hi, tau_lo (multi); U tau_u / tau_u, tau_u_lo)
     UDE, uncertainty-dependent mixup, lambda ~ Beta(alpha, alpha) once per batch:
         x_mix = lambda x_u + (1 - lambda) x_c,  y_mix = lambda y_u + (1 - lambda) y_c,
         M_mix = m_u AND m_c                                                    (UDE)
     loss
         single-label   L = CE_soft(z(x_s), y_P) + lambda_UDE CE_soft(z(x_mix), y_mix),
                        CE_soft(z, y) = -1/B sum_i sum_c a_c y_ic log softmax(z_i)_c
                        (a_c = 1 as the code; the core's class weights with --ce-weights),
                        rows without a target count in the mean (code)          (L-s)
         multi-label    L = mean(BCE(z(x_s), y_P) * W) + lambda_UDE mean(BCE(z(x_mix), y_mix) * M_mix),
                        W_c = pos_weight_c * m_c (m_c = 1 on observed entries)  (L-m)
     one optimiser step; EMA: theta_t <- d theta_t + (1 - d) theta (parameters; buffers
     copied, as the code's ModelEMA)                                            (EMA)
     EDD: q_{k,c} += ground-truth positives + pseudo positives of c in the P batch (EDD)
 (4) upload theta_k, q_k (C ints) and n_k = all local training images (labelled or not).
Server, AWPA (adaptive weighted proxy aggregation):
     every tensor but the classifier: w = sum_k n_k / n w_k                     (AGG-f)
     classifier row c (weight row and bias entry): W_c = sum_k q_{k,c} / sum_j q_{j,c} W_{k,c}
                                                                                (AGG-c)
     a class with sum_j q_{j,c} = 0 keeps its previous row (--empty-class keep, default) or
     takes the n_k average (--empty-class samples, the sheet's fallback); the code gives NaN.
Multi-label, once before round 1: each client sends its per-class positive / negative
counts (through fedmed.transmit; bytes in server.state["bytes_up_once"]); the server sets
pos_weight_c = #neg_c / #pos_c (with --class-weights none: no message, pos_weight = 1).

Defaults (public code, ISIC / CXR): n_u 50 / 500, n_c 200 / 2000, b = 4, EMA decay 0.999,
tau_p 0.95, tau_hi / tau_lo 0.85 / 0.01, U: 0.7 / 0.005, alpha 0.2, lambda_UDE 0.1,
local iterations 30 / 10 (our --local-steps), Adam lr 1e-4, betas (0.9, 0.9999), weight
decay 5e-4 (L2, torch.optim.Adam's), constant lr, batch 64 (60 + 4 + 4), the optimiser
state of each client carried from round to round (the code reloads it after loading
theta_g), 50 rounds, DenseNet-121 (ImageNet), 224 px.
Evaluation: the global model.

The recipe (`recipe`, applied by run.py to the flags the user leaves unset; a flag given
wins, --no-keep-optimizer included; config.json records what ran, the betas and the
batch split under algorithm_info): --optimizer adam --lr 1e-4 --weight-decay 5e-4
--local-steps 30 (ISIC) --batch-size 64 --keep-optimizer, betas (0.9, 0.9999) whenever
the optimiser is Adam. "Batch 64 (60 + 4 + 4)" in this code's terms: the code's
batch_size 64 is split into 64 - b = 60 images of P plus b = --batch-u = 4 of U and 4 of
Cf (68 images in one step), so --batch-size is that batch_size and P gives
--batch-size minus --batch-u. Not in the recipe: the rounds (50), the model and image
size (DenseNet-121, 224 px), which stay the run's flags.

Privacy: q_k (and, multi-label, the once-only label counts) reveal each client's class
distribution to the server.

Deviations:
 * pseudo labels (single-label) are only given for classes outside L_k (the code takes
   argmax t over all classes; an unlabelled image of a labelset client is never of a
   class in L_k, so such a pseudo label would be wrong by construction);
 * UDE uses the described behaviour: U and Cf get teacher pseudo labels with their own
   thresholds, and the mixed label is kept when both images have a target. The ISIC code
   never adds them (its "label missing" test is always false on softmax outputs) and
   zeroes the mixed label unless both images carry ground truth: --ude-compat;
 * multi-label W multiplies the per-entry BCE; the code multiplies W with the batch-mean
   BCE (a scalar), which only rescales the loss; its M_mix also masks observed entries by
   the teacher's thresholds, here observed entries always count;
 * the strong view is flips + a random translation of up to 1/8 of the side + brightness
   and contrast jitter + one cutout square (the code uses a RandAugment-style policy);
 * none in the single-label loss by default: CE_soft is unweighted, as the code (a_c = 1);
   --ce-weights multiplies it by the core's class weights a_c (--class-weights), as the
   baselines' CE. On isic2019-mini the weighted variant collapsed: inverse-frequency
   weights (up to ~135 for a class with 22 visible images) made the teacher confident in
   that rare class on other clients' unlabelled images, its pseudo labels raised its
   q_{k,c}, and AWPA fed the row back (see README, FedLSM);
 * batches come from a fresh per-round stream rng(seed, round, client) (the code walks
   the same permutation prefix every round, sheet pitfall 1); the code's
   ReduceLROnPlateau is never stepped there (no validation hook), so the lr is constant;
 * a class no client saw this round keeps its previous classifier row (the sheet's
   fallback, n_k weights, is --empty-class samples);
 * with a label_set of None (partitions other than labelset), L_k = the classes with a
   labelled training image at client k, as the sheet's natural mode.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmed import Algorithm, UsageError, np_rng, register, seeded, torch_rng, transmit


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class Args:
    n_u: int = field(default=50, metadata=_h("uncertain pool size n_u (ISIC code 50, CXR 500)"))
    n_c: int = field(default=200, metadata=_h("confident pool size n_c (ISIC code 200, CXR 2000)"))
    batch_u: int = field(default=4, metadata=_h("images drawn from U and from Cf per step; P "
                                                "gives --batch-size minus this"))
    ema_decay: float = field(default=0.999, metadata=_h("EMA teacher decay d"))
    tau_p: float = field(default=0.95, metadata=_h("single-label pseudo-label threshold on P and Cf"))
    tau_u: float = field(default=0.7, metadata=_h("pseudo-label (positive) threshold on U"))
    tau_hi: float = field(default=0.85, metadata=_h("multi-label positive threshold on P and Cf"))
    tau_lo: float = field(default=0.01, metadata=_h("multi-label negative threshold on P and Cf"))
    tau_u_lo: float = field(default=0.005, metadata=_h("multi-label negative threshold on U"))
    mix_alpha: float = field(default=0.2, metadata=_h("UDE mixup lambda ~ Beta(alpha, alpha)"))
    lambda_ude: float = field(default=0.1, metadata=_h("weight lambda_UDE of the mixup loss"))
    ce_weights: bool = field(default=False, metadata=_h(
        "single-label: weight CE_soft by the --class-weights alpha_c (the code: unweighted)"))
    empty_class: str = field(default="keep", metadata=_h(
        "AWPA row of a class no client counted: keep (previous row) | samples (n_k average)"))
    ude_compat: bool = field(default=False, metadata=_h(
        "reproduce the ISIC code's UDE: no pseudo labels on U/Cf, mixed label only where both "
        "images carry ground truth"))
    ue_binary_entropy: bool = field(default=False, metadata=_h(
        "multi-label UE with the binary entropy -s log s - (1-s) log(1-s)"))


# ---------------------------------------------------------------- the pieces, testable alone

def uncertainty(prob: torch.Tensor, missing: torch.Tensor | None = None,
                binary: bool = False) -> torch.Tensor:
    """UE scores. Single-label (missing None): H = -sum_c p_c log p_c (UE-s). Multi-label:
    H = mean over the classes with missing[c] of -s_c log s_c (UE-m; with binary, the
    binary entropy); 0 when the client annotates every class."""
    if missing is None:
        return -torch.special.xlogy(prob, prob).sum(1)
    h = -torch.special.xlogy(prob, prob)
    if binary:
        h = h - torch.special.xlogy(1 - prob, 1 - prob)
    if not missing.any():
        return torch.zeros(len(prob))
    return h[:, missing].mean(1)


def rank_pools(H: torch.Tensor, n_u: int, n_c: int) -> tuple:
    """(U, Cf, P) as positions into H: U = the n_u highest H, Cf = the n_c lowest, P =
    all but U (ties broken by position)."""
    N = len(H)
    n_u, n_c = max(0, min(n_u, N - 1)), max(0, min(n_c, N))
    order = np.argsort(-H.numpy(), kind="stable")
    U = np.sort(order[:n_u])
    Cf = np.sort(np.argsort(H.numpy(), kind="stable")[:n_c])
    P = np.setdiff1d(np.arange(N), U)
    return U, Cf, P


def pseudo_single(Y: torch.Tensor, t: torch.Tensor, tau: float, annotated: torch.Tensor):
    """(PL-s). Y [B, C]: one-hot rows for labelled images, -1 rows for unlabelled ones;
    t teacher softmax; annotated [C] bool = L_k. Returns (target [B, C], has_target [B],
    pseudo [B]): an unlabelled image gets onehot(argmax t) when max t >= tau and argmax t
    is not in L_k."""
    labelled = (Y == 1).any(1)
    conf, arg = t.max(1)
    pseudo = ~labelled & (conf >= tau) & ~annotated[arg]
    y = (Y == 1).to(t.dtype)
    y[pseudo, arg[pseudo]] = 1.0
    return y, labelled | pseudo, pseudo


def pseudo_multi(Y: torch.Tensor, t: torch.Tensor, hi: float, lo: float):
    """(PL-m). Y [B, C] with -1 on missing entries; t teacher sigmoid. Returns (target,
    mask, pseudo positives): missing entries become 1 (t >= hi), 0 (t <= lo) or masked."""
    obs = Y >= 0
    pos, neg = ~obs & (t >= hi), ~obs & (t <= lo)
    y = torch.where(obs, Y.to(t.dtype), pos.to(t.dtype))
    return y, obs | pos | neg, pos


def mixup(x_u, x_c, y_u, y_c, lam: float):
    """(UDE): the same lambda for images and targets."""
    return lam * x_u + (1 - lam) * x_c, lam * y_u + (1 - lam) * y_c


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """(EMA) theta_t <- d theta_t + (1 - d) theta on parameters; buffers are copied."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(decay).add_(ps.detach(), alpha=1 - decay)
    for bt, bs in zip(teacher.buffers(), student.buffers()):
        bt.copy_(bs)


def strong_view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Strong augmentation of an already flipped (weak) batch: a random translation of up
    to 1/8 of the side (zero fill), brightness/contrast jitter, one cutout square."""
    B, _, S, _ = x.shape
    m = max(1, S // 8)
    shift = torch.randint(-m, m + 1, (B, 2), generator=gen)
    c = 0.75 + 0.5 * torch.rand(B, 1, 1, 1, generator=gen)
    b = 0.5 * torch.rand(B, 1, 1, 1, generator=gen) - 0.25
    cut = torch.randint(0, S, (B, 2), generator=gen)
    out = torch.zeros_like(x)
    for i in range(B):
        dy, dx = int(shift[i, 0]), int(shift[i, 1])
        out[i, :, max(dy, 0):S + min(dy, 0), max(dx, 0):S + min(dx, 0)] = \
            x[i, :, max(-dy, 0):S + min(-dy, 0), max(-dx, 0):S + min(-dx, 0)]
        h = S // 4
        y0, x0 = int(cut[i, 0]), int(cut[i, 1])
        out[i, :, max(y0 - h // 2, 0):y0 + h // 2, max(x0 - h // 2, 0):x0 + h // 2] = 0
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return (out - mean) * c + mean + b


def soft_ce(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """CE_soft of (L-s): -1/B sum_i sum_c a_c y_ic log softmax(z_i)_c."""
    logp = F.log_softmax(logits, dim=1)
    w = weight if weight is not None else torch.ones(logits.shape[1], device=logits.device)
    return -(y * logp * w).sum() / len(logits)


def cycle(pool: np.ndarray, size: int, gen: torch.Generator):
    """Endless batches of `size` from concatenated random permutations of `pool`."""
    buf = torch.zeros(0, dtype=torch.long)
    pool = torch.as_tensor(pool, dtype=torch.long)
    while True:
        while len(buf) < size:
            buf = torch.cat([buf, pool[torch.randperm(len(pool), generator=gen)]])
        yield buf[:size]
        buf = buf[size:]


# ---------------------------------------------------------------- the algorithm

@register("fedlsm")
class FedLSM(Algorithm):
    Args = Args
    # the public code's training recipe (configs/isic), applied by run.py to unset flags
    recipe = {"optimizer": "adam", "lr": 1e-4, "weight_decay": 5e-4, "batch_size": 64,
              "local_steps": 30, "keep_optimizer": True}
    adam_betas = (0.9, 0.9999)                                        # its Adam's (beta1, beta2)

    def __init__(self, cfg, args, fed):
        super().__init__(cfg, args, fed)
        a = self.args
        if a.empty_class not in ("keep", "samples"):
            raise UsageError(f"--empty-class {a.empty_class!r} is unknown; use keep or samples")
        if not 0 <= a.batch_u < cfg.batch_size:
            raise UsageError(f"--batch-u must lie in 0..{cfg.batch_size - 1} (below --batch-size); "
                             f"got {a.batch_u}")
        if a.n_u < 0 or a.n_c < 0 or not 0 <= a.ema_decay <= 1 or a.mix_alpha <= 0:
            raise UsageError("--n-u and --n-c must be >= 0, --ema-decay in [0, 1] and "
                             "--mix-alpha > 0")
        self.head = self._head_keys()
        self.info = {"batch": {"P": cfg.batch_size - a.batch_u, "U": a.batch_u, "Cf": a.batch_u}}
        if cfg.optimizer == "adam":
            self.info["adam_betas"] = list(self.adam_betas)
        self.teacher = None
        self.pos_weight = None                                        # multi-label, from setup

    def _head_keys(self) -> list:
        """The classifier ("proxies"): the last Linear layer with num_classes outputs."""
        name = None
        for n, m in self.model.named_modules():
            if isinstance(m, nn.Linear) and m.out_features == self.fed.num_classes:
                name = n
        if name is None:
            raise UsageError(f"--model {self.cfg.model}: no Linear layer with "
                             f"{self.fed.num_classes} outputs to aggregate class-wise")
        return [k for k in (f"{name}.weight", f"{name}.bias") if k in self.init_weights]

    # -- who annotates what ------------------------------------------------------------
    def annotated(self, client) -> torch.Tensor:
        """L_k as a bool mask [C]."""
        C = self.fed.num_classes
        mask = torch.zeros(C, dtype=torch.bool)
        if client.label_set is not None:
            mask[torch.as_tensor(list(client.label_set), dtype=torch.long)] = True
            return mask
        y = self.fed.y[torch.as_tensor(client.train, dtype=torch.long)]
        if self.multilabel:
            return (y >= 0).any(0)
        mask[y.unique()] = True
        return mask

    def local_data(self, client) -> tuple:
        """(image indices, targets Y [N, C] with -1 = unknown): the labelled images then
        the unlabelled ones, whose labels are never read."""
        tr = torch.as_tensor(client.train, dtype=torch.long)
        un = torch.as_tensor(client.unlabeled, dtype=torch.long)
        C = self.fed.num_classes
        if self.multilabel:
            Yl = self.fed.y[tr].float()
        else:
            Yl = F.one_hot(self.fed.y[tr], C).float()
        Yu = torch.full((len(un), C), -1.0)
        return torch.cat([tr, un]), torch.cat([Yl, Yu])

    # -- hooks -------------------------------------------------------------------------
    def setup(self, server, clients):
        super().setup(server, clients)
        for c in clients:
            if c.label_set is not None and len(c.label_set) == 0:
                raise UsageError(f"client {c.name} has an empty label set; FedLSM needs every "
                                 "client to annotate at least one class (--labels-per-client >= 1)")
        server.state["bytes_up_once"] = 0
        if self.multilabel and self.cfg.class_weights == "inverse":
            pos = torch.zeros(self.fed.num_classes, dtype=torch.long)
            neg = torch.zeros_like(pos)
            for c in clients:                 # once: client -> server label counts
                y = self.fed.y[torch.as_tensor(c.train, dtype=torch.long)]
                got, nbytes = transmit({"pos": (y == 1).sum(0), "neg": (y == 0).sum(0)})
                pos, neg = pos + got["pos"], neg + got["neg"]
                server.state["bytes_up_once"] += nbytes
            server.state["pos_weight"] = torch.where(pos > 0, neg / pos.clamp(min=1),
                                                     torch.ones(len(pos))).float()
        self.pos_weight = server.state.get("pos_weight")     # sent to every client once,
                                                             # here (None: single-label or
                                                             # --class-weights none)

    def local_update(self, client, payload):
        up = super().local_update(client, payload)
        up["n"] = len(client.train) + len(client.unlabeled)           # n_k: all its images
        up["q"] = client.state["q"].clone()                           # EDD q_k (counted bytes)
        return up

    def train(self, client, payload, steps_scale: int = 1) -> int:
        cfg, a, model = self.budget(), self.args, self.model
        if self.teacher is None:
            self.teacher = copy.deepcopy(model)
        self.teacher.load_state_dict(model.state_dict())              # (1) theta_t <- theta_g
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        idx, Y = self.local_data(client)
        L = self.annotated(client)
        missing = ~L
        prob = torch.as_tensor(self.forward_probs(idx.numpy()))       # (2) UE under theta_g
        H = uncertainty(prob, missing if self.multilabel else None, a.ue_binary_entropy)
        U, Cf, P = rank_pools(H, a.n_u, a.n_c)
        C = self.fed.num_classes
        q = torch.zeros(C, dtype=torch.long)
        q_pseudo = torch.zeros(C, dtype=torch.long)                   # diagnostics: pseudo part of q
        gen = torch_rng(cfg.seed, "batches", self.round, client.id)
        lam_rng = np_rng(cfg.seed, "mixup", self.round, client.id)
        B_P = cfg.batch_size - a.batch_u
        steps = cfg.local_steps * steps_scale or cfg.local_epochs * -(-len(P) // B_P)
        mix = a.batch_u > 0 and len(U) > 0 and len(Cf) > 0
        pw = self.pos_weight if self.multilabel else None
        alpha = self.alpha if a.ce_weights and not self.multilabel else None
        model.train()
        opt = self.make_optimizer(client)
        dev = self.device
        with seeded(cfg.seed, "local", self.round, client.id):
            it_p = cycle(P, B_P, gen)
            it_u, it_c = (cycle(U, a.batch_u, gen), cycle(Cf, a.batch_u, gen)) if mix else (None, None)
            for _ in range(steps):                                    # (3)
                iP = next(it_p)
                # self.batch also gathers fed.y: discarded, the targets come from Y only
                x_w, _ = self.batch(idx[iP], gen)                     # weak view (flips)
                x_s = strong_view(x_w.cpu(), gen).to(dev)             # strong view
                xs = [x_w]
                if mix:
                    iU, iC = next(it_u), next(it_c)
                    x_u, _ = self.batch(idx[iU])
                    x_c, _ = self.batch(idx[iC])
                    xs += [x_u, x_c]
                with torch.no_grad():
                    z_t = self.teacher(torch.cat(xs)).float()
                    t = torch.sigmoid(z_t) if self.multilabel else F.softmax(z_t, dim=1)
                    t = t.cpu()
                tP = t[:B_P]
                if self.multilabel:                                   # (PL-m)
                    yP, mP, newP = pseudo_multi(Y[iP], tP, a.tau_hi, a.tau_lo)
                    q += ((yP == 1) & mP).sum(0)                      # (EDD) GT + pseudo positives
                    q_pseudo += newP.sum(0)
                else:                                                 # (PL-s)
                    yP, _, newP = pseudo_single(Y[iP], tP, a.tau_p, L)
                    q += yP.sum(0).long()                             # (EDD)
                    q_pseudo += yP[newP].sum(0).long()
                x_in = [x_s]
                if mix:
                    lam = float(lam_rng.beta(a.mix_alpha, a.mix_alpha))
                    tU, tC = t[B_P:B_P + a.batch_u], t[B_P + a.batch_u:]
                    y_u, m_u, y_c, m_c = self._mix_targets(Y[iU], tU, Y[iC], tC, L)
                    x_mix, y_mix = mixup(x_u, x_c, y_u, y_c, lam)     # (UDE)
                    m_mix = m_u & m_c
                    x_in.append(x_mix)
                z = model(torch.cat(x_in)).float()
                zP = z[:B_P]
                if self.multilabel:                                   # (L-m)
                    W = mP.float() * (pw if pw is not None else 1.0)
                    loss = (F.binary_cross_entropy_with_logits(zP, yP.to(dev), reduction="none")
                            * W.to(dev)).mean()
                    if mix:
                        loss = loss + a.lambda_ude * (F.binary_cross_entropy_with_logits(
                            z[B_P:], y_mix.to(dev), reduction="none") * m_mix.float().to(dev)).mean()
                else:                                                 # (L-s)
                    loss = soft_ce(zP, yP.to(dev), alpha)
                    if mix:
                        y_mix = y_mix * m_mix[:, None].float()        # no target -> zero row
                        loss = loss + a.lambda_ude * soft_ce(z[B_P:], y_mix.to(dev), alpha)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ema_update(self.teacher, model, a.ema_decay)          # (EMA)
        if cfg.keep_optimizer:
            client.state["optimizer"] = opt.state_dict()
        client.state["q"], client.state["q_pseudo"] = q, q_pseudo     # this round's EDD
        return steps

    def _mix_targets(self, Yu, tU, Yc, tC, L):
        """Targets and masks of the U and Cf images for (UDE)."""
        a = self.args
        if self.multilabel:
            y_u, m_u, _ = pseudo_multi(Yu, tU, a.tau_u, a.tau_u_lo)
            y_c, m_c, _ = pseudo_multi(Yc, tC, a.tau_hi, a.tau_lo)
            return y_u, m_u, y_c, m_c
        if a.ude_compat:                     # ISIC code: ground truth only
            return ((Yu == 1).float(), (Yu == 1).any(1), (Yc == 1).float(), (Yc == 1).any(1))
        y_u, m_u, _ = pseudo_single(Yu, tU, a.tau_u, L)
        y_c, m_c, _ = pseudo_single(Yc, tC, a.tau_p, L)
        return y_u, m_u, y_c, m_c

    def aggregate(self, server, uploads):
        """(AGG-f) n_k-weighted mean of every tensor, then (AGG-c) each classifier row c
        re-weighted by q_{k,c} / sum_j q_{j,c}."""
        previous = {k: server.weights[k].clone() for k in self.head}
        super().aggregate(server, uploads)                            # (AGG-f)
        ups = [uploads[k] for k in sorted(uploads)]
        Q = torch.stack([u["q"] for u in ups]).double()               # [K, C]
        total = Q.sum(0)
        share = Q / total.clamp(min=1)                                # q_{k,c} / sum_j q_{j,c}
        empty = total == 0
        for key in self.head:
            if key not in ups[0]["w"]:
                continue                                              # a private head (--bn local?)
            rows = torch.stack([u["w"][key] for u in ups]).double()   # [K, C, ...]
            new = (share.view(*share.shape, *[1] * (rows.dim() - 2)) * rows).sum(0)   # (AGG-c)
            fallback = previous[key] if self.args.empty_class == "keep" else server.weights[key]
            new[empty] = fallback.double()[empty]
            server.weights[key] = new.to(ups[0]["w"][key].dtype)
