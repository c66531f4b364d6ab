"""FedMIC. Sufen Ren, Yule Hu, Shengchao Chen, Guanjun Wang, Federated Distillation for
Medical Image Classification: Towards Trustworthy Computer-Aided Diagnosis,
arXiv:2407.02261 (preprint, no public code). Template for every formula: FedKD, Chuhan Wu,
Fangzhao Wu, Lingjuan Lyu, Yongfeng Huang, Xing Xie, Communication-efficient federated
learning via knowledge distillation, Nature Communications 13, 2032 (2022),
arXiv:2108.13323, code wuch15/FedKD. Specification: ../shared/methods/fedmic.md; each
statement below carries the sheet's tag: [FedMIC] the abstract, [FedKD] the template,
[ours] a project choice. Section numbers are the sheet's.

State of client k (section 3): a private teacher T_k (its personalised model, never sent)
[FedMIC/FedKD], the shared student S_k [FedKD], a private adapter A_k: Linear(d_S, d_T)
[ours], and the last synchronised student S-bar (client.state["student"]).

Client k, round t (participating):
 (C1) apply the broadcasts it has not applied yet, in order: S-bar <- S-bar + dW_s
      (a client's first contact receives the current S-bar dense) [ours, see below];
      S_k <- S-bar, W_before = S-bar.
 (C2) E local epochs; each batch updates T_k, S_k and A_k jointly with L_T + L_S (4).
 (C3) dW = S_k - W_before for every shared tensor.
 (C4) each matrix-shaped dW (conv kernels reshaped to out x in*kh*kw) is compressed:
      dW = U Sigma V^T, r = the smallest r in [1, len] with
      sum_{i<=r} sigma_i^2 >= T(t) sum_i sigma_i^2  (r = 0 for an all-zero dW)      (SVD)
      and (U_r, sigma_r, V_r^T) is sent [FedKD]; 1-D tensors are sent dense [FedKD].
Server, round t [FedKD]:
 (S1) dW_k = U_r diag(sigma_r) V_r^T                                              (REC)
 (S2) dW = sum_k w_k dW_k / sum_k w_k, w_k = 1 [FedKD] (--weighting uniform, the recipe)
      or n_k (--weighting samples) [ours]                                        (AVG)
 (S3) dW is re-compressed with the same T(t) (SVD) and broadcast; the server's S-bar
      <- S-bar + U diag(sigma) V^T with the same arithmetic as every client   (BCAST)
Energy schedule [FedKD]: T(t) = T_start + (t + 1) / R (T_end - T_start), t = 0..R-1 (SCH)

Losses (section 4) [FedKD form; FedMIC's own equations are unknown], p = softmax(z):
   L_T^task = CE(y, p_T), L_S^task = CE(y, p_S) (the run's --loss / --class-weights,
   as every baseline's task loss) [ours]                                          (4a)
   D = L_T^task + L_S^task, detached [ours] (--attached-denominator: the code's form)
   L_T^d = KL(p_S || p_T) / D,  L_S^d = KL(p_T || p_S) / D, 'batchmean'; the first
   argument is detached, so each KL updates only the model written second [ours]
   (--kd-compat: torch's default 'mean', the code's)                              (4b)
   L^h = MSE(H_T, A_k(H_S)) / D, H = pooled penultimate features [FedKD/ours]; in L_T it
   updates the teacher (A_k(H_S) detached), in L_S the student and the adapter (H_T
   detached) [ours]                                                               (4c)
   L_T = L_T^task + L_T^d + L^h,  L_S = L_S^task + L_S^d + L^h; one optimiser step on
   L_T + L_S over the teacher's, the student's and the adapter's parameters     (4d)
Temperature 1 (none) [FedKD].

Evaluation [ours]: view "personal" (primary) = each client's teacher on its own test set;
view "global" = the shared student S-bar (with the client's private BN layers under
--bn local) on every client's test set. A held-out client has no teacher: both views give
it the student (with the n_k-averaged private BN tensors, the core's held-out rule).
Rank traces: every line of a client in metrics.jsonl carries `energy` (T(t)),
`ranks_up` (its upload's rank per matrix tensor, this round; {} when it did not train)
and `ranks_down` (the broadcast's).

Defaults: T_start 0.95, T_end 0.98 [FedKD]; the recipe (run.py applies it to unset
flags): Adam, lr 1e-4 for teacher, student and adapter, batch 32 [ours, sheet section 7],
--weighting uniform [FedKD], --bn local (the student's BN layers stay home, FedBN) [ours].
Backbones: teacher --teacher-model (default mobilenet_v2, 2.2 M parameters, d_T = 1280,
ImageNet weights with --teacher-weights imagenet) and student --model (the core's, default
cnn, 0.1 M parameters, d_S = 128): a pair a 2-core CPU trains in minutes at 32-64 px, with
the teacher ~24x the student as FedKD's mentor / mentee; the sheet's ResNet-50 / ResNet-18
pair is not in the model zoo (resnet18 is; any pair of models.py backbones works).

Deviations:
 * (C1) [ours, the sheet's answer to its pitfall 7]: every client applies every
   broadcast, in order; an absent client applies the broadcasts it missed when it next
   takes part (the downlink of those rounds is sent and counted then, the loop counts a
   downlink at the start of a round), and a client's first contact receives the current
   S-bar dense (it cannot know the initialisation otherwise). Its student is then bit for
   bit the server's S-bar, as if it had applied each broadcast when sent. What each
   client holds is the server's own record (server.state["synced"]: the round of the
   client's last received upload), never read from the client's state, so the server
   side runs without the clients' states (a Flower server, flower_app.py); the queue
   keeps the broadcasts from the oldest such round on.
 * a factorisation that is not smaller than its matrix (r (m + n + 1) >= m n) is sent as
   the dense dW (exact) [ours]: with T = 1 this is FedKD without SVD exactly, never more
   bytes than the dense update.
 * integer tensors (BatchNorm num_batches_tracked, unused with BN momentum) are not
   communicated; every student keeps its initial value [ours].
 * the SVD and the rank search run in float64, the factors travel in fp32 [ours]; the
   rank is the smallest reaching the threshold (the code's search is off by one and can
   return 0, dropping the update: pitfall 2); the reconstruction is U diag(sigma) V^T
   (the code multiplies by the vector of singular values: pitfall 1).
 * one teacher initialisation for every client (stream (seed, "teacher-init")), one
   adapter initialisation (seed, "adapter-init") [ours].
 * FedKD's attention-map distillation has no CNN counterpart and is left out; the
   sheet's optional per-stage feature distillation (--kd-stages) is not implemented.
 * --error-feedback is an EXTENSION, not FedKD or FedMIC (pitfall 8): the client and the
   server each keep the residual M - rec(C(M)) of what they compressed, M = dW + residual.
 * single-label data only (the KL terms are over a softmax); a multi-label federation is
   refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import models
from fedmed import Algorithm, UsageError, register, seeded, weighted_average


def _h(text: str) -> dict:
    return {"help": text}


# where the pooled penultimate features H enter the head (the input of this submodule,
# before any dropout), for every backbone of models.py [ours]
FEATURE_AT = {"cnn": "classifier", "resnet18": "fc", "efficientnet_b0": "classifier",
              "densenet121": "classifier", "mobilenet_v2": "classifier"}


def no_adapter(name: str, flag: str) -> UsageError:
    return UsageError(f"{flag} {name}: no pooled feature width for the adapter (FedMIC pairs "
                      f"{', '.join(FEATURE_AT)}); choose one of those")


@dataclass
class Args:
    teacher_model: str = field(default="mobilenet_v2", metadata=_h(
        "the private teacher's backbone (the student is --model)"))
    teacher_weights: str | None = field(default=None, metadata=_h(
        "the teacher's initial weights: imagenet or a checkpoint file (default: random)"))
    energy_start: float = field(default=0.95, metadata=_h("SVD energy threshold T_start, in (0, 1]"))
    energy_end: float = field(default=0.98, metadata=_h("SVD energy threshold T_end, in (0, 1], "
                                                        ">= T_start (1: no compression)"))
    kd_compat: bool = field(default=False, metadata=_h(
        "the FedKD code's KL reduction 'mean' (over batch x classes) instead of 'batchmean'"))
    attached_denominator: bool = field(default=False, metadata=_h(
        "the FedKD code's form: gradients flow through the denominators L_T^task + L_S^task"))
    error_feedback: bool = field(default=False, metadata=_h(
        "EXTENSION (not FedKD/FedMIC): keep and resend the SVD residual at clients and server"))

    def __post_init__(self):
        for flag, v in (("--energy-start", self.energy_start), ("--energy-end", self.energy_end)):
            if not 0 < v <= 1:                       # T = 0 would send rank 1 of everything
                raise UsageError(f"{flag} must lie in (0, 1] (got {v})")
        if self.energy_start > self.energy_end:
            raise UsageError(f"--energy-start {self.energy_start} is above --energy-end "
                             f"{self.energy_end}; the threshold rises over the rounds")
        if self.teacher_model not in FEATURE_AT:
            raise no_adapter(self.teacher_model, "--teacher-model")


# ---------------------------------------------------------------- the pieces, testable alone

def energy_threshold(t: int, R: int, T_start: float, T_end: float) -> float:
    """(SCH) T(t) = T_start + (t + 1) / R (T_end - T_start); T(R - 1) = T_end."""
    return T_start + (t + 1) / R * (T_end - T_start)


def energy_rank(sigma: torch.Tensor, T: float) -> int:
    """The smallest r in [1, len(sigma)] with sum_{i<=r} sigma_i^2 >= T sum_i sigma_i^2
    (sigma descending); 0 when every sigma is 0."""
    e = torch.cumsum(sigma.double() ** 2, 0)
    if len(e) == 0 or e[-1] <= 0:
        return 0
    r = int((e < T * e[-1]).sum()) + 1               # entries still short of T, plus one
    return min(r, len(e))


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A >= 2-D tensor as (out, in * kh * kw ...)."""
    return t.reshape(t.shape[0], -1)


def compress(dw: torch.Tensor, T: float):
    """(C4)/(S3): (payload entry, rank). A matrix-shaped dW -> {"U", "s", "V"} (fp32,
    U m x r, s r, V r x n = V_r^T) with the energy rank r, or {"dense": dW} when 1-D or
    when the factors are not smaller than the matrix."""
    if dw.dim() < 2:
        return {"dense": dw.clone()}, None
    M = as_matrix(dw).double()
    m, n = M.shape
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    r = energy_rank(s, T)
    if r * (m + n + 1) >= m * n:                     # factors no smaller: send dW itself
        return {"dense": dw.clone()}, r
    return {"U": U[:, :r].float().contiguous(), "s": s[:r].float().contiguous(),
            "V": Vh[:r].float().contiguous()}, r


def reconstruct(entry: dict, like: torch.Tensor) -> torch.Tensor:
    """(REC) U diag(s) V^T in fp32, reshaped as `like` (a dense entry as it is)."""
    if "dense" in entry:
        return entry["dense"]
    return ((entry["U"] * entry["s"]) @ entry["V"]).reshape(like.shape)


def apply_update(weights: dict, update: dict) -> None:
    """S-bar <- S-bar + rec(update), in place; the same arithmetic at every client and at
    the server, so their students stay bit for bit equal."""
    for k, entry in update.items():
        weights[k] = weights[k] + reconstruct(entry, weights[k])


def kd_losses(zT, zS, HT, AHS, task_T, task_S, *, compat: bool = False,
              attached: bool = False):
    """(4b)-(4d): (L_T, L_S) from the logits, the features (A(H_S) already adapted) and
    the task losses."""
    D = task_T + task_S
    if not attached:
        D = D.detach()                               # [ours] (pitfall 4)
    div = zT.numel() if compat else len(zT)          # 'batchmean' [ours]; the code's 'mean'
    logpT, logpS = F.log_softmax(zT, dim=1), F.log_softmax(zS, dim=1)   # (pitfall 3)
    LT_d = F.kl_div(logpT, logpS.detach(), reduction="sum", log_target=True) / div / D  # KL(p_S||p_T)
    LS_d = F.kl_div(logpS, logpT.detach(), reduction="sum", log_target=True) / div / D  # KL(p_T||p_S)
    Lh_T = F.mse_loss(HT, AHS.detach()) / D          # updates the teacher
    Lh_S = F.mse_loss(HT.detach(), AHS) / D          # updates the student and the adapter
    return task_T + LT_d + Lh_T, task_S + LS_d + Lh_S


def logits_and_features(model: nn.Module, at: str, x: torch.Tensor):
    """(logits, pooled penultimate features): the input of submodule `at`."""
    seen = []
    hook = model.get_submodule(at).register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    try:
        z = model(x)
    finally:
        hook.remove()
    return z, seen[0]


def width(model: nn.Module, at: str) -> int:
    """The width of the features entering `at` (its Linear's in_features)."""
    return [m for m in model.get_submodule(at).modules() if isinstance(m, nn.Linear)][0].in_features


# ---------------------------------------------------------------- the algorithm

@register("fedmic")
class FedMIC(Algorithm):
    Args = Args
    primary_view = "personal"
    pooled_kinds = {"personal": "each client's own teacher on its own test set, joined "
                                "(no single model)"}
    recipe = {"optimizer": "adam", "lr": 1e-4, "batch_size": 32, "weighting": "uniform",
              "bn": "local"}

    @staticmethod
    def check_before_data(cfg, args, image_size=None) -> None:
        """What run.py checks before any image is read: a student with an adapter shape,
        the teacher's backbone and weights."""
        if cfg.model not in FEATURE_AT:
            raise no_adapter(cfg.model, "--model")
        try:
            models.check(args.teacher_model, args.teacher_weights, image_size)
        except UsageError as e:
            raise UsageError(f"the teacher (--teacher-model / --teacher-weights): {e}") from None

    def __init__(self, cfg, args, fed):
        args = args if args is not None else Args()
        self.check_before_data(cfg, args)
        super().__init__(cfg, args, fed)
        if self.multilabel:
            raise UsageError("--algo fedmic is for single-label data (its KL terms are over "
                             "a softmax); choose a single-label dataset")
        with seeded(cfg.seed, "teacher-init"):
            self.teacher = models.build(args.teacher_model, fed.num_classes,
                                        args.teacher_weights).to(self.device)
        self.at_T, self.at_S = FEATURE_AT[args.teacher_model], FEATURE_AT[cfg.model]
        self.d_T, self.d_S = width(self.teacher, self.at_T), width(self.model, self.at_S)
        with seeded(cfg.seed, "adapter-init"):
            self.adapter = nn.Linear(self.d_S, self.d_T).to(self.device)
        self.teacher_init = {k: v.detach().clone().cpu() for k, v in self.teacher.state_dict().items()}
        self.adapter_init = {k: v.detach().clone().cpu() for k, v in self.adapter.state_dict().items()}
        # what the student exchanges: floating shared tensors (integer buffers stay)
        self.sync_keys = [k for k in self.shared_keys if self.init_weights[k].is_floating_point()]
        self.info = {"teacher": args.teacher_model, "student": cfg.model, "d_T": self.d_T,
                     "d_S": self.d_S, "energy": [energy_threshold(t, cfg.rounds, args.energy_start,
                                                                  args.energy_end)
                                                 for t in range(cfg.rounds)]}
        if args.error_feedback:
            self.info["extension"] = "error feedback (not FedKD / FedMIC)"

    def energy(self) -> float:
        a = self.args
        return energy_threshold(self.round, self.cfg.rounds, a.energy_start, a.energy_end)

    # -- state ------------------------------------------------------------------------
    def setup(self, server, clients):
        super().setup(server, clients)
        server.state.update(queue=[], ranks_down={}, residual={}, synced={})
        for c in clients:
            c.state["teacher"] = {k: v.clone() for k, v in self.teacher_init.items()}
            c.state["adapter"] = {k: v.clone() for k, v in self.adapter_init.items()}

    # -- the hooks --------------------------------------------------------------------
    def broadcast(self, server, client):
        """(C1): the current S-bar dense at a first contact, else every broadcast update
        the client has not applied yet, in order."""
        v = server.state["synced"].get(client.id)      # the server's own record, never
        if v is None:                                   # the client's state (a Flower node
            return {"student": {k: server.weights[k] for k in self.sync_keys},   # keeps it)
                    "version": self.round}
        return {"updates": [b["update"] for b in server.state["queue"] if b["round"] >= v]}

    def local_update(self, client, payload):
        if "student" in payload:                                  # (C1) first contact
            client.state["student"] = dict(payload["student"])
            client.state["version"] = int(payload["version"])
        for upd in payload.get("updates", []):                    # (C1) every broadcast
            apply_update(client.state["student"], upd)
            client.state["version"] += 1
        before = client.state["student"]                          # W_before = S-bar
        self.load_model(before, client.state.get("private", {}))
        self.teacher.load_state_dict(client.state["teacher"])
        self.adapter.load_state_dict(client.state["adapter"])
        self.train(client, payload)                                # (C2)
        sd = self.model.state_dict()
        client.state["private"] = {k: sd[k].detach().cpu().clone() for k in self.private_keys}
        client.state["teacher"] = {k: v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}
        client.state["adapter"] = {k: v.detach().cpu().clone() for k, v in self.adapter.state_dict().items()}
        T = self.energy()
        residual = client.state.get("residual", {})
        update, ranks = {}, {}
        for k in self.sync_keys:
            dw = sd[k].detach().cpu() - before[k]                  # (C3)
            if self.args.error_feedback:                           # EXTENSION
                dw = dw + residual.get(k, torch.zeros_like(dw))
            update[k], r = compress(dw, T)                         # (C4)
            if r is not None:
                ranks[k] = r
            if self.args.error_feedback:
                residual[k] = dw - reconstruct(update[k], dw)
        if self.args.error_feedback:
            client.state["residual"] = residual
        client.state["ranks_up"] = {"round": self.round, "ranks": ranks}
        return {"update": update, "n": client.n}

    def aggregate(self, server, uploads):
        """(S1)-(S3)."""
        ups = [uploads[k] for k in sorted(uploads)]
        w = [self.upload_weight(u["n"]) for u in ups]
        T = self.energy()
        update, ranks = {}, {}
        for k in self.sync_keys:
            like = server.weights[k]
            dW = weighted_average([reconstruct(u["update"][k], like) for u in ups], w)  # (REC), (AVG)
            if self.args.error_feedback:                           # EXTENSION
                dW = dW + server.state["residual"].get(k, torch.zeros_like(dW))
            update[k], r = compress(dW, T)                         # (S3)
            if r is not None:
                ranks[k] = r
            if self.args.error_feedback:
                server.state["residual"][k] = dW - reconstruct(update[k], dW)
        apply_update(server.weights, update)                       # (BCAST) the server's S-bar
        for k in uploads:                       # an upload means the client applied the
            server.state["synced"][k] = self.round  # broadcast: it holds S-bar of this round
        oldest = min(server.state["synced"].values())
        server.state["queue"] = [b for b in server.state["queue"] if b["round"] >= oldest]
        server.state["queue"].append({"round": self.round, "update": update})
        server.state["ranks_down"] = {"round": self.round, "ranks": ranks}

    # -- local training: (4) ----------------------------------------------------------
    def loss(self, model, batch, payload, client):
        x, y = batch
        zT, HT = logits_and_features(self.teacher, self.at_T, x)
        zS, HS = logits_and_features(self.model, self.at_S, x)
        L_T, L_S = kd_losses(zT.float(), zS.float(), HT.float(), self.adapter(HS).float(),
                             self.task_loss(zT.float(), y), self.task_loss(zS.float(), y),
                             compat=self.args.kd_compat, attached=self.args.attached_denominator)
        return L_T + L_S                                           # (4d)

    def train_parameters(self) -> list:
        """One optimiser over the teacher's, the student's and the adapter's parameters
        (the same lr for all three, sheet section 7)."""
        return [p for m in (self.teacher, self.model, self.adapter)
                for p in m.parameters() if p.requires_grad]

    def train(self, client, payload, steps_scale: int = 1) -> int:
        self.teacher.train()                       # the student: Algorithm.train
        return super().train(client, payload, steps_scale)

    # -- evaluation -------------------------------------------------------------------
    def predict(self, server, client, idx):
        p_student = super().predict(server, client, idx)           # S-bar (+ private BN)
        if client.id < 0:                                          # held out: no teacher
            return {"personal": p_student, "global": p_student}
        self.teacher.load_state_dict(client.state["teacher"])
        student, self.model = self.model, self.teacher             # forward_probs reads self.model
        try:
            p_teacher = self.forward_probs(idx)
        finally:
            self.model = student
        return {"personal": p_teacher, "global": p_student}

    def line_extra(self, server, client):
        """Rank traces: T(t), this client's upload ranks this round, the broadcast's."""
        up = client.state.get("ranks_up", {})
        down = server.state.get("ranks_down", {})
        return {"energy": self.energy(),
                "ranks_up": up.get("ranks", {}) if up.get("round") == self.round else {},
                "ranks_down": down.get("ranks", {}) if down.get("round") == self.round else {}}
