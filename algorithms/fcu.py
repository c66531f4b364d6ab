"""FCU: federated client unlearning by model-contrastive unlearning (MCU) and
frequency-guided memory preservation (FGMP), and the unlearning protocol that compares it
with its baselines (the audit itself: unlearning_audit.py; PGA: algorithms/pga.py).

Z. Deng, L. Luo, H. Chen, Enable the Right to be Forgotten with Federated Client
Unlearning in Medical Imaging, MICCAI 2024, LNCS pp. 240-250, arXiv:2407.02356; public
code dzp2095/FCU. Specification sheet: ../shared/methods/fcu.md. Baselines: retraining
from scratch without the client; continued training on the remaining clients; projected
gradient ascent, A. Halimi, S. Kadhe, A. Rawat, N. Baracaldo, Federated Unlearning: How to
Efficiently Erase a Client in FL?, arXiv:2207.05521 (2022). The contrastive form of MCU is
MOON's (Q. Li, B. He, D. Song, CVPR 2021, arXiv:2103.16257) with the roles swapped.

The protocol (`--algo fcu` runs all of it; every phase is one `fedmed.run` of this class,
in its own folder under --out, so each is checkpointed and --resume continues it):
  original  R rounds of FedAvg over all K clients from theta_0 -> theta_o. Client u keeps
            its last local model w_u (PGA's reference needs it; nothing else does).
  retrain   R rounds of FedAvg from theta_0 over the K - 1 others, the same schedule and
            the same seed streams (round t, client k) as the original: the gold standard.
  continue  R_post post-training rounds over the K - 1 others, from theta_o.
  pga       round 0: u runs projected gradient ascent on D_f from w_ref, uploads once;
            then the R_post post-training rounds.
  fcu       round 0: u runs MCU + FGMP on D_f from theta_o, uploads once; then the R_post
            post-training rounds.
  fcu_code  the same with the public release's FGMP (code convention, half-open window),
            so that one audit runs both conventions (sheet section 10.1).
Every unlearning method starts from the same theta_o; continue, pga and fcu share the
post-training schedule; only u ever touches D_f after the original run.

MCU (sheet section 4), f = g_theta(x) the penultimate (pooled) features, f_o = g_theta_o(x),
f_d = g_theta_d(x) with theta_d = theta_0 (the "downgraded" model), both references in
eval mode and without gradient, tau = 0.5:
    L_MCU = -log[ exp(cos(f, f_d)/tau) / (exp(cos(f, f_d)/tau) + exp(cos(f, f_o)/tau)) ]
T Adam steps (lr 1e-5, betas (0.9, 0.9999), weight decay 5e-4) on batches of D_f with
training augmentation; after every E steps FGMP on every conv and linear weight W:
    M      = W as a matrix: conv [N, C, k, k] -> permute (C, k, k, N) -> (C k) x (k N)
    F      = fftshift(FFT2(M)),  A = |F|,  Phi = angle(F)
    Omega  = a centred window of half-sizes b_h = floor(h r / 2), b_w = floor(w r / 2)
    Fuse(base, donor) = Re IFFT2(ifftshift(Omega A_donor + (1 - Omega) A_base) e^{i Phi_base})
    paper:  W <- Fuse(base = W, donor = W_o)   (low frequencies of theta_o kept)
    code:   W <- Fuse(base = W_o, donor = W)   (--fgmp-convention code, the release)
BN parameters and buffers and biases come from the fusion's base (--fgmp-bn-from).

What of D_f leaves u (issue #19): theta_u, once. The training-mode steps normalise with
batch statistics and update the BN running estimates on D_f (trigger images included);
those estimates are per-channel means and variances of D_f's features, and the sheet
exchanges no features (section 6). So theta_u's BN running statistics (mean, variance,
batch count) are those of the model unlearning starts from: theta_o's (PGA: w_ref's),
which the server already holds; the trained weights (convolutions, BN affine parameters,
classifier) are the method's result and go up as they are. --unlearn-bn-stats trained
uploads the estimates the steps leave (the release). Measured before the rule: on
isic2019-mini theta_u's D_f accuracy 0.731 as uploaded vs 0.855 with theta_o's buffers;
on synthetic data the backdoor success 0.024 -> 0.465 from the buffers alone.

PGA (Halimi et al., algorithms/pga.py): from w_ref, the aggregate without u's last update,
projected gradient ascent on D_f for at most --pga-epochs epochs.

Post-training (continue, pga, fcu): R_post FedAvg rounds over the K - 1 others with Adam
(lr 1e-4, betas (0.9, 0.9999), L2 weight decay 5e-4: the release's; state carried across
rounds), --post-local-steps steps a round, uniform weights 1/(K - 1) (--post-weighting
samples: n_k).

The audit (unlearning_audit.Audit: any method's final model goes through the same
measurement), in summary.json under `audit` and printed as a table: balanced accuracy and AUROC on the
global test set (every client's test images, u's included); accuracy, error and BA on
D_f (u's training images, clean) and on D_r (the others' training images); the sheet's
membership-inference attack (section 8; unlearning_audit.py): a logistic regression on
(loss, entropy, max-probability) fit on the retrained model's outputs (D_r members, one
half of the test set non-members; without a retrain phase each model is its own shadow),
giving the member rate on D_f (`mia_member_rate`) and the AUROC of D_f against the other
test half (`mia_attack_auroc`); the loss-threshold attack (Yeom et al., CSF 2018): score
= -CE(x, y), AUROC of D_f against u's test images (`mia_loss_auroc`); with --backdoor, the attack
success rate: the share of test images of other classes than the target that the model
assigns to the target once the trigger is stamped on them; and the cost: sample gradients
(the sum of the batch sizes of every optimiser step), optimiser steps, the rounds' wall
seconds (training only, evaluation excluded) and bytes. PGA's and FCU's uploaded theta_u
is audited too (`before_post_training`; row "theta_u"). Cost as time to accuracy
(`time_to_accuracy`, issue #12): the sample gradients retraining spent up to the first
round whose pooled test BA reaches the method's final test BA, over the method's (never
reached: said so, with the bound). `speedup_vs_retrain` = retrain's whole sample
gradients / FCU's (a ratio of the two schedules); `speedup_vs_retrain_wall` the same for
wall seconds, both measured in the same command. summary.json's top-level bytes,
seconds and rounds are the whole protocol's (every phase), `phases` gives each phase's;
the accuracy figures are those of FCU's final model (`figures_of`).
--reuse-original DIR reads the finished original and retrain phases of an earlier run of
the same flags (checked) instead of rerunning them, e.g. to add a variant's rows.
The audit reads each client's images where the client is (`audit_outputs`, through
Algorithm.at_clients: in process here; on Flower on each client's node, which sends the
probabilities and the backdoor hits back), one client at a time, and joins them.

Backdoor (--backdoor) [ours; the sheet notes the paper's poisoning script is not public]:
a share --backdoor-fraction of u's training images (drawn from those not of the target
class, stream (seed, "backdoor")) carry a black-and-white checkerboard patch of side
ceil(--backdoor-patch x image side) in the bottom-right corner, stamped after the flip
augmentation, and the label --backdoor-target. Only u's training batches are stamped;
evaluation images never are (except the attack-success measurement).

Defaults (sheet section 7; public code): T = 100, E = 10, r = 0.7 (ISIC2018; 0.5 for
ICH), tau = 0.5, Adam 1e-5, B = 64 (the recipe of --algo fcu), R_post = 20, 20 post-local
iterations, post Adam 1e-4 with betas (0.9, 0.9999) and weight decay 5e-4, equal post
weights, u = client 0. Halimi et al.: radius 1/3
of the distance to random models, early stop at an accuracy threshold (their MNIST tau
0.12; here 0 means chance, 1/C).

Deviations: (1) the fusion convention defaults to the paper's (the release keeps the
unlearned model's low frequencies: --fgmp-convention code). (2) The FGMP window is the
symmetric inclusive one (frequencies -b..b, no imaginary residue, asserted < 1e-6
relative), the release's half-open window behind --fgmp-window code; a side with b = 0
is not fused in both (the sheet's pitfall 5). (3) theta_o and theta_d are in eval mode
(the release updates theta_o's BN statistics on D_f). (4) theta_d is the stored theta_0
of the original run, not a re-instantiated ImageNet model (identical when the run starts
from ImageNet weights). (5) FGMP is computed in float64. (6) The Adam state of the
unlearning optimiser carries across fusions. (7) In retrain and post-training the inverse
class weights are computed from the remaining clients' labels only (u's data has no
influence after the request). (8) PGA's: see algorithms/pga.py. (9) theta_u's BN running statistics are the starting
model's, none estimated on D_f (see above; the release uploads D_f's:
--unlearn-bn-stats trained). (10) The membership attack is the sheet's [ours; the paper's
MIA use is unverified]; its shadow is our retrain phase.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fedmed
import models
import unlearning_audit as ua
from algorithms import pga
from unlearning_audit import stamp
from fedmed import Algorithm, UsageError, class_weights, np_rng, register, seeded, torch_rng

METHODS = ("retrain", "continue", "pga", "fcu", "fcu_code")
# the arguments that shape the original and retrain phases (--reuse-original checks them)
ORIGINAL_ARGS = ("forget_client", "backdoor", "backdoor_target", "backdoor_fraction",
                 "backdoor_patch")
PHASES = ("original",) + METHODS


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Args(pga.PGAArgs):                 # PGA's hyperparameters (--pga-*): algorithms/pga.py
    forget_client: str = _f("0", "client u that asks to be forgotten: its name or index")
    unlearn_methods: str = _f("retrain,continue,pga,fcu,fcu_code",
                              "comma list of the methods the audit compares with the original")
    unlearn_steps: int = _f(100, "T: MCU steps of the unlearning client")
    fusion_interval: int = _f(10, "E: MCU steps between two FGMP fusions")
    fgmp_ratio: float = _f(0.7, "r: low-frequency window ratio in [0, 1] (0.5 for ICH)")
    fgmp_convention: str = _f("paper", "paper (keep theta_o's low frequencies) | code (release)")
    fgmp_window: str = _f("symmetric", "symmetric (inclusive, Hermitian) | code (half-open)")
    fgmp_bn_from: str = _f("base", "BN tensors and biases after a fusion: base | orig | unlearned")
    mcu_tau: float = _f(0.5, "temperature of the MCU loss")
    unlearn_lr: float = _f(1e-5, "Adam learning rate of the MCU steps")
    post_rounds: int = _f(20, "R_post: post-training rounds on the remaining clients")
    post_local_steps: int = _f(20, "local steps a post-training round")
    post_lr: float = _f(1e-4, "Adam learning rate of post-training (state carried)")
    post_weighting: str = _f("uniform", "post-training aggregation: uniform (1/(K-1)) | samples")
    post_beta2: float = _f(0.9999, "Adam beta2 of post-training (the release)")
    post_weight_decay: float = _f(5e-4, "Adam (L2) weight decay of post-training (the release)")
    unlearn_bn_stats: str = _f("start", "BN running statistics of the uploaded theta_u: start "
                               "(those of the model unlearning starts from, theta_o or PGA's "
                               "w_ref: none estimated on D_f) | trained (the release: what the "
                               "training-mode steps on D_f leave)")
    backdoor: bool = _f(False, "stamp a trigger on a share of u's training images, relabelled")
    backdoor_target: str = _f("0", "the trigger's target class: name or index")
    backdoor_fraction: float = _f(0.2, "share of u's training images that carry the trigger")
    backdoor_patch: float = _f(0.125, "trigger side as a share of the image side")
    reuse_original: str = _f("", "folder of an earlier --algo fcu run of the same flags whose "
                             "finished original (and retrain) phases are reused, not rerun")
    phase: str = _f("audit", "which part of the protocol this run is", internal=True)
    from_run: str = _f("", "folder of the original run the phase starts from", internal=True)


# ---------------------------------------------------------------- the equations

def mcu_loss(f: torch.Tensor, f_o: torch.Tensor, f_d: torch.Tensor, tau: float) -> torch.Tensor:
    """L_MCU, batch mean: -log softmax([cos(f, f_d), cos(f, f_o)] / tau)[0]."""
    pos = F.cosine_similarity(f, f_d, dim=1) / tau
    neg = F.cosine_similarity(f, f_o, dim=1) / tau
    logits = torch.stack([pos, neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(f), dtype=torch.long, device=f.device))


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """FGMP's matrix view: conv [N, C, k, k] -> (C k) x (k N); a matrix as it is."""
    if w.dim() == 4:
        N, C, kh, kw = w.shape
        return w.permute(1, 2, 3, 0).reshape(C * kh, kw * N)
    if w.dim() == 2:
        return w
    raise ValueError(f"FGMP fuses conv and linear weights, not shape {tuple(w.shape)}")


def from_matrix(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 4:
        N, C, kh, kw = like.shape
        return m.reshape(C, kh, kw, N).permute(3, 0, 1, 2).contiguous()
    return m


def window(h: int, w: int, r: float, kind: str = "symmetric") -> torch.Tensor:
    """Omega_r on the fftshift-ed spectrum: centre (h // 2, w // 2), half-sizes
    b = floor(side r / 2). symmetric: rows c-b..c+b inclusive (frequencies -b..b, so
    the window is Hermitian and the fused matrix real), clipped to the matrix; code:
    rows c-b..c+b-1 (2b rows, the release). Empty when b_h or b_w is 0."""
    bh, bw = math.floor(h * r / 2), math.floor(w * r / 2)
    mask = torch.zeros(h, w, dtype=torch.bool)
    if bh == 0 or bw == 0:
        return mask
    ch, cw = h // 2, w // 2
    extra = 1 if kind == "symmetric" else 0
    mask[max(ch - bh, 0):ch + bh + extra, max(cw - bw, 0):cw + bw + extra] = True
    return mask


def fuse(base: torch.Tensor, donor: torch.Tensor, r: float, kind: str = "symmetric"
         ) -> torch.Tensor:
    """Fuse(base, donor): the donor's amplitude inside Omega_r (low frequencies), the
    base's outside, the base's phase everywhere; float64, cast back to base's dtype.
    So r = 0 returns the base, Fuse(W, W) = W, and with the whole spectrum in the window
    the result has the donor's amplitude and the base's phase (the donor itself when the
    two share their phase)."""
    mb, md = as_matrix(base.double()), as_matrix(donor.double())
    fb = torch.fft.fftshift(torch.fft.fft2(mb))
    fd = torch.fft.fftshift(torch.fft.fft2(md))
    om = window(*mb.shape, r, kind)
    amp = torch.where(om, fd.abs(), fb.abs())
    out = torch.fft.ifft2(torch.fft.ifftshift(torch.polar(amp, fb.angle())))
    if kind == "symmetric":
        residue = out.imag.abs().max().item()
        scale = max(out.real.abs().max().item(), 1e-30)
        assert residue <= 1e-6 * scale, f"FGMP imaginary residue {residue / scale:.2e}"
    return from_matrix(out.real, base).to(base.dtype)


def fused_keys(model: nn.Module) -> list:
    """The state-dict keys FGMP fuses: the weights of every conv and linear layer (norm
    layers and biases are skipped)."""
    return [f"{n}.weight" for n, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]


def fgmp(current: dict, orig: dict, keys: list, r: float, convention: str = "paper",
         kind: str = "symmetric", bn_from: str = "base") -> dict:
    """One FGMP fusion of the unlearning model `current` with theta_o (`orig`)."""
    base, donor = (current, orig) if convention == "paper" else (orig, current)
    rest = {"base": base, "orig": orig, "unlearned": current}[bn_from]
    out = {k: v.clone() for k, v in rest.items()}
    for k in keys:
        out[k] = fuse(base[k], donor[k], r, kind)
    return out


def penultimate(model: nn.Module, head: nn.Module, x: torch.Tensor) -> tuple:
    """(features entering the classifier head, logits) in one forward pass."""
    seen = {}
    hook = head.register_forward_pre_hook(lambda m, inp: seen.__setitem__("f", inp[0]))
    try:
        logits = model(x)
    finally:
        hook.remove()
    return seen["f"].flatten(1), logits


def count(client, steps: int, samples: int) -> None:
    """Add optimiser steps and their sample gradients to the client's cost."""
    client.state["grad_steps"] = client.state.get("grad_steps", 0) + steps
    client.state["grad_samples"] = client.state.get("grad_samples", 0) + samples


def resolve_client(spec: str, names: list, flag: str = "--forget-client") -> int:
    if spec in names:
        return names.index(spec)
    if spec.lstrip("-").isdigit() and 0 <= int(spec) < len(names):
        return int(spec)
    raise UsageError(f"{flag} {spec!r} is not a client of this federation (clients: "
                     f"{', '.join(names)}); give one of these names or an index "
                     f"0..{len(names) - 1}")


def resolve_class(spec: str, classes: list) -> int:
    if spec in classes:
        return classes.index(spec)
    if spec.isdigit() and int(spec) < len(classes):
        return int(spec)
    raise UsageError(f"--backdoor-target {spec!r} is not a class ({', '.join(classes)}); "
                     f"give a class name or an index 0..{len(classes) - 1}")


def methods_of(args) -> list:
    ms = [m.strip() for m in args.unlearn_methods.split(",") if m.strip()]
    bad = [m for m in ms if m not in METHODS]
    if bad or not ms:
        raise UsageError(f"--unlearn-methods {args.unlearn_methods!r}: unknown "
                         f"{bad[0] if bad else 'empty list'}; choose from {', '.join(METHODS)}")
    return ms


# ---------------------------------------------------------------- the algorithm

@register("fcu")
class FCU(Algorithm):
    Args = Args
    recipe = {"batch_size": 64}                        # the public code's B

    def __init__(self, cfg, args, fed):
        super().__init__(cfg, args, fed)
        self.validate(cfg, args, fed)
        names = [c.name for c in fed.clients]
        self.u = resolve_client(args.forget_client, names)
        self.phase = args.phase
        self.post_cfg = dataclasses.replace(
            cfg, optimizer="adam", lr=args.post_lr, local_steps=args.post_local_steps,
            keep_optimizer=True, weighting=args.post_weighting,
            weight_decay=args.post_weight_decay)
        self.head_name = models.HEADS.get(cfg.model, "classifier")   # its input: features
        self.fused = fused_keys(self.model)
        y = fed.y.numpy()
        others = np.concatenate([c.train for k, c in enumerate(fed.clients) if k != self.u])
        self.alpha_all = self.alpha
        self.alpha_rest = (class_weights(y[others], fed.num_classes).to(self.device)
                           if cfg.class_weights == "inverse" else None)
        self.alpha = self.alpha_all if self.phase in ("original", "audit") else self.alpha_rest
        self.theta_o = None                             # the trained model u holds
        self.carries = None                             # (see setup)
        self.poison = torch.zeros(len(fed.y), dtype=torch.bool)
        self.target = None
        if args.backdoor:
            self.target = resolve_class(args.backdoor_target, list(fed.classes))
            mine = np.asarray(fed.clients[self.u].train)
            pool = mine[y[mine] != self.target]
            n = int(round(args.backdoor_fraction * len(mine)))
            pick = np_rng(cfg.seed, "backdoor").choice(pool, size=min(n, len(pool)), replace=False)
            self.poison[torch.as_tensor(np.sort(pick), dtype=torch.long)] = True
        self.info = {"phase": self.phase, "forget_client": names[self.u],
                     "poisoned_images": int(self.poison.sum()),
                     "backdoor_target": (fed.classes[self.target] if self.target is not None
                                         else None)}

    @staticmethod
    def validate(cfg, args, fed) -> None:
        if len(fed.clients) < 2:
            raise UsageError("--forget-client: the federation has a single client, and "
                             "forgetting it leaves no one to train; use --clients 2 or more")
        resolve_client(args.forget_client, [c.name for c in fed.clients])
        methods_of(args)
        if fed.y.dim() == 2:
            raise UsageError("--algo fcu is for single-label data; this dataset is multi-label")
        if cfg.bn != "average":
            raise UsageError(f"--bn {cfg.bn}: FCU exchanges the whole model; use --bn average")
        for flag, v, ok in (("--fgmp-convention", args.fgmp_convention, ("paper", "code")),
                            ("--fgmp-window", args.fgmp_window, ("symmetric", "code")),
                            ("--fgmp-bn-from", args.fgmp_bn_from, ("base", "orig", "unlearned")),
                            ("--post-weighting", args.post_weighting, ("uniform", "samples")),
                            ("--unlearn-bn-stats", args.unlearn_bn_stats, ("start", "trained"))):
            if v not in ok:
                raise UsageError(f"{flag} {v!r} is unknown; choose {' or '.join(ok)}")
        if not 0 <= args.fgmp_ratio <= 1:
            raise UsageError(f"--fgmp-ratio must lie in [0, 1] (got {args.fgmp_ratio})")
        for flag, v in (("--unlearn-steps", args.unlearn_steps),
                        ("--fusion-interval", args.fusion_interval),
                        ("--post-rounds", args.post_rounds),
                        ("--post-local-steps", args.post_local_steps),
                        ("--pga-epochs", args.pga_epochs)):
            if v < 1:
                raise UsageError(f"{flag} must be at least 1 (got {v})")
        if args.backdoor and not 0 < args.backdoor_fraction <= 1:
            raise UsageError("--backdoor-fraction must lie in (0, 1] "
                             f"(got {args.backdoor_fraction})")
        if args.backdoor:
            resolve_class(args.backdoor_target, list(fed.classes))
        if args.phase not in PHASES + ("audit",):
            raise UsageError(f"phase {args.phase!r} is unknown")

    # -- the schedule -----------------------------------------------------------------
    @staticmethod
    def phase_rounds(cfg, args, phase: str) -> int:
        return {"original": cfg.rounds, "retrain": cfg.rounds, "continue": args.post_rounds,
                "pga": 1 + args.post_rounds, "fcu": 1 + args.post_rounds,
                "fcu_code": 1 + args.post_rounds}[phase]

    def stage(self) -> str:
        """What this round of this phase is: train | unlearn | post."""
        if self.phase in ("original", "retrain", "audit"):
            return "train"
        if self.phase in ("pga", "fcu", "fcu_code") and self.round == 0:
            return "unlearn"
        return "post"

    def setup(self, server, clients):
        """The unlearning phases start from the finished original run (its folder is the
        server's: on a client's node, `on_node`, theta_o arrives with the unlearning
        round's message, see at_node). PGA's u starts from its last local model of the
        original run: from the original checkpoint in process; where the clients' states
        stayed on their nodes (a Flower run: the checkpoint names its transport) u's node
        takes it from its own state of that run (`carries`)."""
        super().setup(server, clients)
        self.audit = ua.Audit(self, self.u, self.target, self.args.backdoor_patch,
                              self.cfg.seed)
        if self.phase in ("continue", "pga", "fcu", "fcu_code") and not self.on_node:
            ck = self.read_original(self.args.from_run)
            server.weights = {k: v.clone() for k, v in ck["server"]["weights"].items()}
            server.state["theta_o"] = {k: v.clone() for k, v in server.weights.items()}
            if self.phase == "pga" and ck.get("transport"):
                self.carries = {"run": self.args.from_run, "client": clients[self.u].name,
                                "keys": ["last_local"]}
            elif self.phase == "pga":
                last = ck["clients"][self.u]["state"].get("last_local")
                if last is None:
                    raise UsageError(f"{self.args.from_run}: the original run did not keep "
                                     "u's last local model; rerun it with this version")
                clients[self.u].state["last_local"] = last

    def read_original(self, folder: str) -> dict:
        path = os.path.join(folder, "checkpoint.pt")
        if not os.path.isfile(path):
            raise UsageError(f"{path} does not exist; run the original phase first")
        ck = fedmed.load_checkpoint(path, "FCU")
        with open(os.path.join(folder, "config.json")) as fh:
            theirs = json.load(fh)["config"]
        ours = dataclasses.asdict(self.cfg)
        if any(theirs.get(k) != v for k, v in ours.items() if k != "rounds"):
            raise UsageError(f"{folder} was trained with other settings; start the unlearning "
                             "phases from an original run of the same flags")
        if ck["round"] != theirs["rounds"]:
            raise UsageError(f"{path} stopped after round {ck['round']} of "
                             f"{theirs['rounds']}; finish it with --resume first")
        return ck

    def budget(self):
        """The core's contract (fedmed.Algorithm.budget): post-training rounds train under
        post_cfg (Adam, its steps, state carried, its weighting), every other round under
        the run's settings; self.cfg is never swapped."""
        return self.post_cfg if self.stage() == "post" else self.cfg

    def begin_round(self, server, clients):
        self.at_node(server)

    def sends_server_state(self, client) -> bool:
        """u's unlearning step reads theta_o (which u holds: nothing is counted)."""
        return self.stage() == "unlearn"

    def at_node(self, server) -> None:
        self.theta_o = server.state.get("theta_o")     # the trained model u holds

    def participants(self, server, sampled):
        if self.stage() == "unlearn":
            return [self.clients[self.u]]
        if self.phase in ("original", "audit"):
            return sampled
        return [c for c in sampled if c.id != self.u]      # u never trains again

    def line_extra(self, server, client):
        """The stage, and the client's sample gradients and optimiser steps so far (the
        cost curve that time-to-accuracy reads; the phase's cost in summary_extra)."""
        return {"stage": self.stage(), "grad_samples": int(client.state.get("grad_samples", 0)),
                "grad_steps": int(client.state.get("grad_steps", 0))}

    # -- the hooks --------------------------------------------------------------------
    def broadcast(self, server, client):
        if self.stage() == "unlearn":
            return {}                   # u already holds theta_o: nothing new is sent
        return super().broadcast(server, client)

    def local_update(self, client, payload):
        if self.stage() == "unlearn":
            weights = self.pga(client) if self.phase == "pga" else self.mcu_fgmp(client)
            return {"w": weights, "n": client.n}
        up = super().local_update(client, payload)
        if self.phase == "original" and client.id == self.u:
            client.state["last_local"] = {k: v.clone() for k, v in up["w"].items()}
        return up

    def aggregate(self, server, uploads):
        if self.stage() == "unlearn":
            server.weights = dict(uploads[self.u]["w"])       # theta_u replaces theta_o
            server.state["theta_u"] = dict(uploads[self.u]["w"])   # kept for the audit
            return
        super().aggregate(server, uploads)

    def make_optimizer(self, client):
        """Post-training: Adam with the release's betas (0.9, --post-beta2) and L2 weight
        decay --post-weight-decay, its state carried; otherwise the configured one."""
        if self.stage() != "post":
            return super().make_optimizer(client)
        opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad],
                               lr=self.post_cfg.lr, betas=(0.9, self.args.post_beta2),
                               weight_decay=self.post_cfg.weight_decay)
        if "optimizer" in client.state:
            opt.load_state_dict(client.state["optimizer"])
        return opt

    def local_batches(self, client, gen, steps_scale: int = 1):
        """The loop's schedule (the round's config), counting every optimiser step."""
        for idx in super().local_batches(client, gen, steps_scale):
            count(client, 1, len(idx))
            yield idx

    def batch(self, idx, gen=None):
        """Training batches (gen given) of u's poisoned images carry the trigger and the
        target label; evaluation batches never do."""
        x, y = super().batch(idx, gen)
        if gen is not None and self.target is not None:
            hit = self.poison[idx].to(x.device)
            if hit.any():
                x[hit] = stamp(x[hit], self.args.backdoor_patch)
                y[hit] = self.target
        return x, y

    # -- unlearning at u ---------------------------------------------------------------
    def frozen(self, weights: dict) -> nn.Module:
        m = copy.deepcopy(self.model)
        m.load_state_dict({**self.init_weights, **weights})
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    def mcu_fgmp(self, client) -> dict:
        """Phase 2 at u: T Adam steps on L_MCU, FGMP every E steps; returns theta_u."""
        a, seed = self.args, self.cfg.seed
        theta_o = self.theta_o
        ref_o, ref_d = self.frozen(theta_o), self.frozen(self.init_weights)
        head = self.model.get_submodule(self.head_name)
        head_o, head_d = (m.get_submodule(self.head_name) for m in (ref_o, ref_d))
        self.load_model(theta_o, {})
        model = self.model
        model.train()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                               lr=a.unlearn_lr, betas=(0.9, 0.9999), weight_decay=5e-4)
        gen = torch_rng(seed, "batches", "unlearn", client.id)
        batches = fedmed.minibatches(client.train, gen, self.cfg.batch_size,
                                     steps=a.unlearn_steps)           # T steps
        with seeded(seed, "unlearn", client.id):
            for step, idx in enumerate(batches):
                x, _ = self.batch(idx, gen)
                f, _ = penultimate(model, head, x)
                with torch.no_grad():
                    f_o, _ = penultimate(ref_o, head_o, x)
                    f_d, _ = penultimate(ref_d, head_d, x)
                loss = mcu_loss(f, f_o, f_d, a.mcu_tau)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                count(client, 1, len(idx))
                if (step + 1) % a.fusion_interval == 0:
                    cur = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                    model.load_state_dict(fgmp(cur, theta_o, self.fused, a.fgmp_ratio,
                                               a.fgmp_convention, a.fgmp_window, a.fgmp_bn_from))
        return self.uploaded(model, theta_o)

    def uploaded(self, model: nn.Module, start: dict) -> dict:
        """theta_u as it leaves u. The rule (--unlearn-bn-stats start): no BN running
        statistic is estimated on D_f; each is that of the model unlearning started from
        (which the server already holds or derives). The training-mode steps normalise
        with batch statistics and update the running estimates on D_f, trigger images
        included; uploaded, those estimates carry D_f's per-channel feature means and
        variances, features the sheet says are never exchanged (section 6), and they
        alone revive a backdoor. `trained` uploads them (the release)."""
        out = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if self.args.unlearn_bn_stats == "start":
            out.update({k: start[k].clone() for k in self.bn_stats})
        return out

    def reference_model(self, client) -> dict:
        """PGA's w_ref from theta_o and u's last local model (algorithms/pga.py)."""
        if self.cfg.weighting == "samples":
            n, n_u = sum(c.n for c in self.clients), client.n
        else:
            n, n_u = len(self.clients), 1
        return pga.reference_model(self.theta_o, client.state["last_local"], n, n_u)

    def pga_radius(self, ref: dict) -> float:
        """delta: --pga-radius x the mean distance of w_ref to 10 random initialisations,
        each drawn from the stream (seed, "pga-random", i)."""
        keys = [n for n, p in self.model.named_parameters() if p.requires_grad]

        def random_models():
            for i in range(10):
                with seeded(self.cfg.seed, "pga-random", i):
                    yield self.build_model().state_dict()
        return pga.radius(ref, keys, random_models(), self.args.pga_radius)

    def pga(self, client) -> dict:
        """Phase 2 at u with Halimi et al.'s projected gradient ascent (algorithms/pga.py)
        on D_f, one epoch per fresh permutation (stream (seed, "batches", "pga", epoch,
        u)); returns theta_u."""
        a, cfg = self.args, self.cfg
        ref = self.reference_model(client)
        delta = self.pga_radius(ref)
        self.load_model(ref, {})

        def batches(epoch):
            gen = torch_rng(cfg.seed, "batches", "pga", epoch, client.id)
            for idx in fedmed.minibatches(client.train, gen, cfg.batch_size, epochs=1):
                yield self.batch(idx, gen)
        done = pga.ascend(self.model, batches, ref, delta, lr=a.pga_lr, momentum=cfg.momentum,
                          epochs=a.pga_epochs,
                          stop=a.pga_stop_accuracy or 1.0 / self.fed.num_classes,
                          seed=cfg.seed, keys=(client.id,))
        client.state["pga_epochs"] = done["epochs"]
        count(client, done["steps"], done["samples"])
        return self.uploaded(self.model, ref)

    # -- the audit --------------------------------------------------------------------
    def audit_outputs(self, server, client, weights: dict) -> dict:
        """The audit's reads of `client`'s images (unlearning_audit.Audit.outputs), a
        step that runs where the client is (Algorithm.at_clients)."""
        return self.audit.outputs(client, weights)

    def summary_extra(self, server, lines):
        first = lines[0]["view"] if lines else None
        secs = sum(m.get("seconds", 0.0) for m in lines
                   if m["client"] == "pooled" and m["view"] == first)
        last = {}                      # each client's last line: its counters at the end
        for m in lines:                # (read from the lines: a client's state may live on
            if "grad_samples" in m and m["view"] == first and not m["holdout"]:   # its node)
                last[m["client"]] = m
        total = lambda key: int(sum(m[key] for m in last.values()))  # noqa: E731
        return {"phase": self.phase, "forget_client": self.clients[self.u].name,
                "cost": {"grad_samples": total("grad_samples"), "grad_steps": total("grad_steps"),
                         "train_seconds": float(secs)}}

    # -- the whole protocol: one fedmed.run per phase, then the audit -----------------
    @classmethod
    def protocol(cls, cfg, args, fed, out: str, *, resume: bool = False,
                 data_args: dict | None = None, quiet: bool = False, log=print,
                 argv: list | None = None, transport=None) -> dict:
        """original -> each unlearning method -> the audit table in out/summary.json.
        `transport` (default in process; flower_app's: each client on its node) carries
        every phase's rounds and the audit's reads of each client's images; `argv` is
        the command line each phase records."""
        cls.validate(cfg, args, fed)
        methods = methods_of(args)
        argv = list(sys.argv[1:] if argv is None else argv)   # as fedmed.run records it
        os.makedirs(out, exist_ok=True)
        if not resume and os.path.exists(os.path.join(out, "summary.json")):
            os.remove(os.path.join(out, "summary.json"))
        fedmed.atomic_write(os.path.join(out, "config.json"), fedmed.dumps(
            {"config": dataclasses.asdict(cfg), "algorithm_args": dataclasses.asdict(args),
             "data": data_args or {}, "phases": ["original"] + methods}))
        runs, folders = {}, {}
        for phase in ["original"] + [m for m in METHODS if m in methods]:
            folders[phase] = os.path.join(out, phase)
            if args.reuse_original and phase in ("original", "retrain"):
                folders[phase] = os.path.join(args.reuse_original, phase)
                runs[phase] = cls.reused_phase(cfg, args, fed, folders[phase], phase)
                if not quiet:
                    log(f"phase {phase}: reused from {folders[phase]}")
                continue
            a = args
            if phase == "fcu_code":                     # the public release's FGMP
                a = dataclasses.replace(a, fgmp_convention="code", fgmp_window="code")
            runs[phase] = cls.run_phase(cfg, a, fed, folders[phase], phase,
                                        folders["original"], resume=resume,
                                        data_args=data_args, quiet=quiet, log=log,
                                        argv=argv, transport=transport)
        auditor = cls.auditor(cfg, args, fed)
        if transport is not None:                       # its steps run where each client is
            transport.bind(auditor, cfg, auditor.clients, [], {
                "argv": argv,
                "algorithm_args": dataclasses.asdict(auditor.args),
                "data_identity": fedmed.data_identity(fed)}, out, False)
        shadow = None
        if "retrain" in runs:                           # the sheet's shadow model
            shadow = fedmed.load_checkpoint(os.path.join(folders["retrain"], "checkpoint.pt"),
                                            "FCU audit")["server"]["weights"]
        auditor.audit.fit_attack(shadow)
        audit, phases = {}, {}
        for phase, s in runs.items():
            audit[phase] = auditor.audit.run(folders[phase])
            audit[phase].update(s["cost"], bytes_up=s["bytes_up"], bytes_down=s["bytes_down"],
                                rounds=s["rounds"])
            phases[phase] = {k: s[k] for k in ("bytes_up", "bytes_down", "seconds", "rounds")}
            if folders[phase] != os.path.join(out, phase):
                phases[phase]["reused_from"] = folders[phase]
        main = "fcu" if "fcu" in runs else list(runs)[-1]
        summary = dict(runs[main])
        summary.update(phase="audit", audit=audit, forget_client=auditor.info["forget_client"],
                       backdoor_target=auditor.info["backdoor_target"], phases=phases,
                       figures_of=main, mia_shadow="retrain" if shadow is not None else "self")
        for k in ("bytes_up", "bytes_down", "seconds", "rounds"):   # the whole protocol
            summary[k] = sum(p[k] for p in phases.values())
        if "retrain" in audit:
            curve = ua.accuracy_curve(folders["retrain"])
            tta = {}
            for m in ("fcu", "fcu_code", "pga", "continue"):
                if m in audit:
                    r, x = audit["retrain"], audit[m]
                    key = "" if m == "fcu" else f"_{m}"
                    summary[f"speedup_vs_retrain{key}"] = (r["grad_samples"]
                                                           / max(x["grad_samples"], 1))
                    summary[f"speedup_vs_retrain_wall{key}"] = (r["train_seconds"]
                                                                / max(x["train_seconds"], 1e-9))
                    if curve is not None:
                        tta[m] = ua.time_to_accuracy(curve, x["test_balanced_accuracy"],
                                                     x["grad_samples"])
            summary["time_to_accuracy"] = tta
        fedmed.atomic_write(os.path.join(out, "summary.json"), fedmed.dumps(summary))
        return summary

    @classmethod
    def reused_phase(cls, cfg, args, fed, folder: str, phase: str) -> dict:
        """The summary of a finished phase of an earlier run (--reuse-original), after
        checking it ran with these flags on this data."""
        files = [os.path.join(folder, f) for f in ("config.json", "summary.json", "checkpoint.pt")]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise UsageError(f"--reuse-original: {missing[0]} does not exist; give the folder "
                             f"of a finished --algo fcu run that has a {phase} phase")
        with open(files[0]) as fh:
            rec = json.load(fh)
        with open(files[1]) as fh:
            summary = json.load(fh)
        want = dataclasses.asdict(dataclasses.replace(
            cfg, rounds=cls.phase_rounds(cfg, args, phase)))
        theirs = rec.get("algorithm_args", {})
        differ = sorted([k for k in want if rec["config"].get(k) != want[k]]
                        + [k for k in ORIGINAL_ARGS if theirs.get(k) != getattr(args, k)])
        if rec.get("data_identity") != fedmed.data_identity(fed):
            differ.append("the data")
        if summary.get("rounds") != want["rounds"]:
            differ.append("rounds done")
        if differ:
            raise UsageError(f"--reuse-original: {folder} ran with other settings (differs in "
                             f"{', '.join(differ[:4])}); reuse a run of the same flags")
        return summary

    @classmethod
    def run_phase(cls, cfg, args, fed, out: str, phase: str, original: str, *,
                  resume: bool = False, data_args: dict | None = None, quiet: bool = False,
                  log=print, argv: list | None = None, transport=None) -> dict:
        """One phase of the protocol as one run of the loop in `out`; the unlearning
        phases start from the finished original run in folder `original`. With `resume`,
        a phase that has a checkpoint is continued (a finished one is only re-read)."""
        a = dataclasses.replace(args, phase=phase, from_run=(
            original if phase not in ("original", "retrain") else ""))
        c = dataclasses.replace(cfg, rounds=cls.phase_rounds(cfg, args, phase))
        again = resume and os.path.isfile(os.path.join(out, "checkpoint.pt"))
        if not quiet:
            log(f"phase {phase}: {c.rounds} rounds{' (resumed)' if again else ''}")
        return fedmed.run(c, a, fed, out, resume=again, data_args=data_args, quiet=quiet,
                          log=log, argv=argv, transport=transport)

    @classmethod
    def auditor(cls, cfg, args, fed) -> "FCU":
        """An instance that only audits (its clients set, no training): `.audit`."""
        auditor = cls(cfg, dataclasses.replace(args, phase="audit"), fed)
        auditor.setup(fedmed.ServerState(), fedmed.make_clients(fed))
        return auditor

    @staticmethod
    def summary_table(summary: dict) -> str:
        rows = ua.table(summary)
        if "speedup_vs_retrain" in summary:
            rows.append(f"FCU speed-up vs retraining: {summary['speedup_vs_retrain']:.1f}x in "
                        f"sample gradients, {summary['speedup_vs_retrain_wall']:.1f}x in wall time")
        return "\n".join(rows)
