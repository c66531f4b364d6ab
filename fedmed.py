"""The federated core: Config, ClientState, the Algorithm base class (its default hooks
ARE FedAvg), the registry, the one round loop, weighted aggregation with an explicit
BatchNorm policy, payload serialisation with byte counting, seeding by derived streams,
checkpoint/resume, evaluation and metrics.

FedAvg: McMahan et al., Communication-Efficient Learning of Deep Networks from
Decentralized Data, AISTATS 2017, arXiv:1602.05629. Server update (Algorithm 1):
    w_{t+1} = sum_{k in S_t} n_k / (sum_{j in S_t} n_j) * w_{t+1}^k
FedBN (the `--bn local` policy): Li et al., ICLR 2021, arXiv:2102.07623.

Everything that crosses the network goes through `transmit`, which serialises the
payload with torch.save, counts the bytes, and hands the receiver the deserialised copy,
so communication is measured, never estimated.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import os
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class UsageError(Exception):
    """Bad input from the user: run.py prints it as one line and exits with status 2."""


class Diverged(Exception):
    """Training produced a non-finite loss, weight or prediction: the run stops before
    writing that round (the last good checkpoint stays), and run.py prints this as one
    line and exits with status EXIT_DIVERGED."""


EXIT_DIVERGED = 3


class Interrupted(Exception):
    """Ctrl-C during the loop: says where the run stopped (run.py adds the command that
    continues it, prints one line and exits with status 130)."""


def first_nonfinite(obj, path: str = "") -> str | None:
    """The key path of the first floating tensor in `obj` (nested dicts/lists) holding a
    NaN or an infinity; None when every one is finite."""
    if isinstance(obj, torch.Tensor):
        bad = (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all())
        return (path or "tensor") if bad else None
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = first_nonfinite(v, f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


def check_private(t: int, client) -> None:
    """Diverged when `client`'s private tensors hold a NaN or an infinity after its local
    update of round t (checked by the party that holds them: this process, or its node)."""
    bad = first_nonfinite(client.state.get("private"))
    if bad:
        raise Diverged(f"round {t + 1}, client {client.name}: weight {bad} is NaN or "
                       "infinite after local training")


# ---------------------------------------------------------------- randomness

def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed for the stream named by (seed, *keys); independent of call order."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def np_rng(seed: int, *keys) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


def torch_rng(seed: int, *keys) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


@contextlib.contextmanager
def seeded(seed: int, *keys):
    """Run a block with torch's global CPU generator seeded from a derived stream (for
    layers that draw from it: weight init, dropout), restoring the caller's state after,
    so the global generator is never advanced by the loop."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, *keys))
        yield


# ---------------------------------------------------------------- records

@dataclass
class Config:
    """Settings shared by every algorithm (each algorithm adds its own `Args`)."""
    algo: str = "fedavg"
    rounds: int = 20                  # R
    local_epochs: int = 1             # E
    local_steps: int = 0              # tau; > 0 replaces E epochs by tau minibatches
    batch_size: int = 32              # B
    lr: float = 0.01                  # eta
    momentum: float = 0.9
    weight_decay: float = 0.0
    optimizer: str = "sgd"            # sgd | adam
    keep_optimizer: bool = False      # carry a client's optimiser state across rounds
    fraction: float = 1.0             # C: share of clients sampled each round
    weighting: str = "samples"        # samples (n_k/n, FedAvg) | uniform (plain mean)
    bn: str = "average"               # average | local (FedBN) | params_only (FLamby)
    model: str = "cnn"
    weights: str | None = None
    loss: str = "ce"                  # ce | focal
    focal_gamma: float = 2.0
    class_weights: str = "inverse"    # inverse (alpha_c = N / N_c, pooled train) | none
    augment: str = "flip"             # flip | none
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int = 256


@dataclass
class ClientState:
    """A client between rounds: who it is, which images it holds, and only the state its
    method really keeps (`state`). No client holds a model object."""
    id: int
    name: str
    train: np.ndarray
    test: np.ndarray
    unlabeled: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    label_set: list | None = None
    state: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.train)


@dataclass
class ServerState:
    weights: dict = field(default_factory=dict)       # the global model's tensors
    state: dict = field(default_factory=dict)         # whatever else the method keeps


# ---------------------------------------------------------------- communication

def transmit(payload: dict) -> tuple[dict, int]:
    """Serialise `payload`, count its bytes, return (what the receiver gets, bytes).
    An empty payload is not sent at all and costs 0 bytes."""
    if not payload:
        return {}, 0
    buf = io.BytesIO()
    torch.save(payload, buf)
    nbytes = buf.tell()
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=True), nbytes


def weighted_average(tensors: list, weights: list) -> torch.Tensor:
    """sum_k weights_k * tensors_k / sum_k weights_k, in float64, cast back."""
    total = float(sum(weights))
    out = torch.zeros_like(tensors[0], dtype=torch.float64)     # ((0 + a_1) + a_2) + ..., in
    term = torch.empty_like(out)                                # place: 2 buffers, not 3K
    for t, w in zip(tensors, weights):
        out.add_(term.copy_(t).mul_(w / total))
    return out.to(tensors[0].dtype)


# ---------------------------------------------------------------- losses and metrics

def class_weights(y: np.ndarray, num_classes: int) -> torch.Tensor:
    """alpha_c = N / N_c on the pooled training labels (0 for a class with no image).
    Multi-label y [N, C] (1 positive, 0 negative, -1 missing): the BCE pos_weight
    alpha_c = #negatives_c / #positives_c over the observed entries (1 where c has none)."""
    if y.ndim == 2:
        pos, neg = (y == 1).sum(0).astype(np.float64), (y == 0).sum(0).astype(np.float64)
        return torch.tensor(np.where(pos > 0, neg / np.maximum(pos, 1), 1.0), dtype=torch.float32)
    counts = np.bincount(y[y >= 0], minlength=num_classes).astype(np.float64)
    alpha = np.where(counts > 0, counts.sum() / np.maximum(counts, 1), 0.0)
    return torch.tensor(alpha, dtype=torch.float32)


def focal_loss(logits: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor | None,
               gamma: float) -> torch.Tensor:
    """Lin et al., ICCV 2017: l = -alpha_y (1 - p_y)^gamma log p_y, averaged over the
    batch. gamma = 0 and alpha = 1 is cross-entropy."""
    logp_y = F.log_softmax(logits, dim=1).gather(1, y[:, None])[:, 0]
    loss = -((1 - logp_y.exp()) ** gamma) * logp_y
    if alpha is not None:
        loss = alpha[y] * loss
    return loss.mean()


def masked_bce(logits: torch.Tensor, y: torch.Tensor, pos_weight: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Multi-label loss: binary cross-entropy with logits, averaged over the observed
    entries of y [B, C] (y = -1 marks a missing label, which contributes nothing);
    pos_weight_c multiplies the positive term, as in BCEWithLogitsLoss."""
    observed = (y >= 0).to(logits.dtype)
    l = F.binary_cross_entropy_with_logits(logits, y.clamp(min=0).to(logits.dtype),
                                           pos_weight=pos_weight, reduction="none")
    return (l * observed).sum() / observed.sum().clamp(min=1)


def _auroc_binary(pos: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney U / (n+ n-), ties counted one half (average ranks)."""
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s), np.float64)
    i = 0
    while i < len(s):                                  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty_like(ranks)
    r[order] = ranks
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(y: np.ndarray, prob: np.ndarray) -> dict:
    """Balanced accuracy (mean recall over the classes present in y, as sklearn), accuracy,
    macro F1 over all classes (zero_division = 0), macro one-vs-rest AUROC over the classes
    with both positives and negatives in y, and mean cross-entropy. A 2-D y is multi-label:
    see `multilabel_metrics`."""
    if y.ndim == 2:
        return multilabel_metrics(y, prob)
    C = prob.shape[1]
    pred = prob.argmax(1)
    present = np.unique(y)
    recall = [(pred[y == c] == c).mean() for c in present]
    f1 = []
    for c in range(C):
        tp = np.sum((pred == c) & (y == c))
        fp = np.sum((pred == c) & (y != c))
        fn = np.sum((pred != c) & (y == c))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    aucs = [_auroc_binary(y == c, prob[:, c]) for c in present if 0 < (y == c).sum() < len(y)]
    p_y = np.clip(prob[np.arange(len(y)), y], 1e-12, None)
    return {"balanced_accuracy": float(np.mean(recall)),
            "accuracy": float((pred == y).mean()),
            "macro_f1": float(np.mean(f1)),
            "macro_auroc": float(np.mean(aucs)) if aucs else float("nan"),
            "loss": float(-np.log(p_y).mean()),
            "n": int(len(y))}


def multilabel_metrics(y: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict:
    """Multi-label metrics (y [N, C]: 1 positive, 0 negative, -1 missing; prob [N, C]
    sigmoid probabilities; prediction = prob >= threshold). Each class c is scored on its
    observed entries only, and only classes with an observed entry count:
    balanced_accuracy = mean_c (TPR_c + TNR_c) / 2, where a class whose observed entries
      are all of one kind uses the one defined rate (sklearn's balanced_accuracy_score
      per class); accuracy = mean_c of the per-class accuracy; macro_f1 = mean_c of the
      per-class F1 (zero_division = 0); macro_auroc = mean AUROC over the classes with
      both positives and negatives; loss = mean binary cross-entropy over observed entries."""
    pred = prob >= threshold
    ba, acc, f1, aucs = [], [], [], []
    for c in range(y.shape[1]):
        obs = y[:, c] >= 0
        if not obs.any():
            continue
        t, p = y[obs, c] == 1, pred[obs, c]
        rates = ([np.mean(p[t])] if t.any() else []) + ([np.mean(~p[~t])] if (~t).any() else [])
        ba.append(np.mean(rates))
        acc.append(np.mean(p == t))
        tp, fp, fn = np.sum(p & t), np.sum(p & ~t), np.sum(~p & t)
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        if 0 < t.sum() < len(t):
            aucs.append(_auroc_binary(t, prob[obs, c]))
    obs = y >= 0
    q = np.clip(prob.astype(np.float64), 1e-12, 1 - 1e-12)   # 1 - 1e-12 is 1.0 in float32
    bce = -(np.where(y == 1, np.log(q), np.log(1 - q)))[obs]
    return {"balanced_accuracy": float(np.mean(ba)) if ba else float("nan"),
            "accuracy": float(np.mean(acc)) if acc else float("nan"),
            "macro_f1": float(np.mean(f1)) if f1 else float("nan"),
            "macro_auroc": float(np.mean(aucs)) if aucs else float("nan"),
            "loss": float(bce.mean()) if bce.size else float("nan"),
            "n": int(len(y))}


# ---------------------------------------------------------------- registry

ALGORITHMS: dict = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        ALGORITHMS[name] = cls
        return cls
    return deco


# The core imports no module of the project: the methods register themselves above
# (`algorithms.load_all()` imports every file of algorithms/), and the model zoo hands the
# core its builder here when models.py is imported (algorithms/ imports it).
_MODEL_FACTORY = None


def set_model_factory(build) -> None:
    """Plug in the model zoo: build(name, num_classes, weights) -> nn.Module, what the
    default `Algorithm.build_model` calls (models.py calls this when imported)."""
    global _MODEL_FACTORY
    _MODEL_FACTORY = build


def model_factory():
    """The builder models.py plugged in; an error that says so when none did."""
    if _MODEL_FACTORY is None:
        raise RuntimeError("no model factory: import models (algorithms.load_all() does) "
                           "before building an algorithm that uses the model zoo")
    return _MODEL_FACTORY


# ---------------------------------------------------------------- the algorithm

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def bn_keys(model: nn.Module) -> tuple[set, set]:
    """(affine keys, running-statistic keys) of every BatchNorm layer's state."""
    affine, stats = set(), set()
    for mname, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            p = f"{mname}." if mname else ""
            affine |= {p + n for n, _ in m.named_parameters(recurse=False)}
            stats |= {p + n for n, _ in m.named_buffers(recurse=False)}
    return affine, stats


class Algorithm:
    """Default hooks = FedAvg. A method overrides only the step its paper changes.

    The loop builds the method with `ALGORITHMS[cfg.algo](cfg, args, fed)`, then follows
    `self.cfg` (the settings the method runs under; config.json records them), hands it
    the held-out clients with `attach`, calls `setup`, and each round t: `set_round(t)`,
    `begin_round`, for every sampled client k broadcast -> transmit -> local_update ->
    transmit; then aggregate; then predict on every client's test set. `self.round` is
    the current round. Whatever must survive --resume lives in `server.state` or
    `client.state` (both are checkpointed every round), or is derived from `self.round`;
    never in other attributes.

    The contract with a protocol (a method that changes the schedule or wraps another):
      * settings: never assign to the caller's cfg. A schedule that fixes the number of
        rounds gives a copy (`dataclasses.replace(cfg, rounds=T)`) to this constructor or
        to Wrapper's; the loop runs self.cfg.rounds. Stages of one run that train under
        budgets of their own return them from `budget()`; a protocol that runs the loop
        several times (`protocol`, a classmethod run.py calls instead of `run`) gives
        each phase its own copy: `run(dataclasses.replace(cfg, rounds=R_phase), ...)`.
      * a method that wraps another registered method is a `Wrapper` (below).
    """
    Args = None
    name = "fedavg"
    primary_view = "global"           # name of the evaluated model in metrics.jsonl
    quiet = False                     # no progress bar (run.py --quiet); set by the loop
    on_node = False                   # built on a client's Flower node (fedmed.build(node=
                                      # True)): the server's files are not there
    adam_betas = (0.9, 0.999)         # --optimizer adam: torch's; a paper's recipe may differ
    crosses_sites = ""                # where the method reads a client's images or labels
                                      # outside that client's own local_update / predict
                                      # ("": nowhere); a Flower run, where each client's
                                      # data stay on its node, refuses it with this reason

    @classmethod
    def crosses_sites_of(cls, ns) -> str:
        """`crosses_sites` under the command line `ns` (a flag may add such a read)."""
        return cls.crosses_sites

    def __init__(self, cfg: Config, args, fed):
        self._bind(cfg, args, fed)
        with seeded(cfg.seed, "init"):
            self.model = self.build_model().to(self.device)
        self.init_weights = {k: v.detach().clone().cpu() for k, v in self.model.state_dict().items()}
        affine, stats = bn_keys(self.model)
        self.bn_stats = stats
        self.private_keys = self._private_keys(affine, stats)     # never leave a client
        self.shared_keys = [k for k in self.init_weights if k not in self.private_keys]
        y = fed.y.numpy()
        self.multilabel = y.ndim == 2                 # y [N, C]: sigmoid per class, masked BCE
        if self.multilabel and cfg.loss == "focal":
            raise UsageError("--loss focal is for single-label data; use --loss ce (masked "
                             "BCE) with this multi-label dataset")
        train_y = np.concatenate([y[c.train] for c in fed.clients]) if fed.clients else y[:0]
        self.alpha = (class_weights(train_y, fed.num_classes).to(self.device)
                      if cfg.class_weights == "inverse" else None)

    def _bind(self, cfg: Config, args, fed) -> None:
        """What every method holds, whether it owns a model or (a Wrapper) not."""
        self.cfg, self.args, self.fed = cfg, args, fed
        self.device = torch.device(cfg.device)
        self.round = 0
        self.clients: list = []                       # set by the loop (setup)
        self.holdout: list = []                       # clients never trained on

    # -- what the loop tells the method --------------------------------------------------
    def attach(self, holdout: list, quiet: bool) -> None:
        """Before `setup`: the held-out clients (evaluated, never trained on) and whether
        to show no progress bars (--quiet)."""
        self.holdout, self.quiet = holdout, quiet

    def set_round(self, t: int) -> None:
        """The loop's clock: round t (0-based) begins; called before `begin_round` (a test
        that drives the hooks calls it too)."""
        self.round = t

    def budget(self) -> Config:
        """The settings this round's local training and aggregation follow (optimizer,
        lr, momentum, weight decay, keep_optimizer, batch size, local epochs / steps,
        weighting): self.cfg. A protocol whose stages train under budgets of their own
        returns the stage's settings (made once, `dataclasses.replace(self.cfg, ...)`);
        `local_batches` also takes one explicitly for a loop of the method's own."""
        return self.cfg

    def build_model(self) -> nn.Module:
        """The one working model whose state_dict is what clients train and send (a CLIP
        method returns its adapter here). Called under the (seed, "init") stream. By
        default the model zoo's --model (see `set_model_factory`)."""
        return model_factory()(self.cfg.model, self.fed.num_classes, self.cfg.weights)

    def _private_keys(self, affine: set, stats: set) -> set:
        return {"average": set(), "local": affine | stats, "params_only": stats}[self.cfg.bn]

    # -- state ------------------------------------------------------------------------
    def setup(self, server: ServerState, clients: list) -> None:
        """Round 0: the server holds the common initialisation; each client holds the
        initial values of its private tensors (e.g. its BN layers under FedBN)."""
        self.clients = clients
        server.weights = {k: v.clone() for k, v in self.init_weights.items()}
        for c in clients:
            c.state["private"] = {k: self.init_weights[k].clone() for k in self.private_keys}

    def begin_round(self, server: ServerState, clients: list) -> None:
        """Called at the start of every round before sampling (protocols such as active
        learning cycles act here). A client's train/unlabeled indices and state are
        checkpointed, so changes made here survive --resume."""

    def line_extra(self, server: ServerState, client: ClientState) -> dict:
        """Extra keys for `client`'s lines in metrics.jsonl (an active-learning protocol
        records its labelled count here); {} by default."""
        return {}

    pooled_kinds: dict = {}           # view -> what its pooled test line is (see pooled_kind)

    def pooled_kind(self, view: str) -> str:
        """What the pooled-test figure of `view` measures, in words, for summary.json."""
        if view in self.pooled_kinds:
            return self.pooled_kinds[view]
        if view == "global" and not self.private_keys:
            return "one global model on every client's test set, joined"
        if view == "global":
            return (f"the global model with each client's private tensors (--bn {self.cfg.bn}) "
                    "on its own test set, joined")
        if view.startswith("model:"):
            return f"client {view[6:]}'s model on every client's test set, joined"
        if view in ("local", "personal"):
            return "each client's own model on its own test set, joined (no single model)"
        return f"the {view!r} model of each client on its own test set, joined"

    def export_models(self, server: ServerState, clients: list) -> dict:
        """{file stem: plain state dict} written at the end of a run, each loadable by
        --weights: `model` = the global model (private tensors, e.g. FedBN's, as their
        n_k-average: the held-out rule), and `model-CLIENT` = each client's own model where
        it keeps private tensors. {} where the trained model is not a models.py model
        (the CLIP methods train adapters)."""
        if type(self).build_model is not Algorithm.build_model:
            return {}
        self.load_model(server.weights, self.average_private())
        out = {"model": _cpu_state(self.model)}
        if self.private_keys:
            for c in clients:
                self.load_model(server.weights, c.state.get("private", {}))
                out[f"model-{c.name}"] = _cpu_state(self.model)
        return out

    def summary_extra(self, server: ServerState, lines: list) -> dict:
        """Extra keys for summary.json, from every line of metrics.jsonl (e.g. a
        label-efficiency curve); {} by default."""
        return {}

    def participants(self, server: ServerState, sampled: list) -> list:
        """The clients that train this round (Pooled replaces them by their union)."""
        return sampled

    # -- the four hooks ---------------------------------------------------------------
    def broadcast(self, server: ServerState, client: ClientState) -> dict:
        return {"w": {k: server.weights[k] for k in self.shared_keys}}

    def local_update(self, client: ClientState, payload: dict) -> dict:
        self.load_model(payload.get("w", {}), client.state.get("private", {}))
        self.train(client, payload)
        sd = self.model.state_dict()
        client.state["private"] = {k: sd[k].detach().cpu().clone() for k in self.private_keys}
        return {"w": {k: sd[k].detach().cpu().clone() for k in self.shared_keys},
                "n": client.n}

    def aggregate(self, server: ServerState, uploads: dict) -> None:
        """w <- sum_k n_k / n w_k over the clients that uploaded (Algorithm 1); BN
        num_batches_tracked takes the maximum over clients.

        The loop does not call this for a method that keeps this aggregation: it folds
        each upload into a running sum as it arrives (`begin_aggregate`, `fold`,
        `finish_aggregate`, the same float64 operations in the same order, so the result
        is bit for bit this one), and peak memory does not grow with the number of
        sampled clients. A method that overrides `aggregate` receives every upload of
        the round at once, because it needs them together (FedLSM's AWPA weights, FedAL's
        and FCU's per-round rules, FedMedCLIP's masked FAM average): memory there grows
        with the uploads kept."""
        ups = [uploads[k] for k in sorted(uploads)]
        acc = self.begin_aggregate(sum(self.upload_weight(u["n"]) for u in ups))
        for u in ups:
            self.fold(acc, u)
        self.finish_aggregate(server, acc)

    stream_uploads = True             # False: keep every upload until aggregate (benchmarks)

    def streams(self) -> bool:
        """Whether the loop may fold uploads as they arrive (the class keeps this
        file's aggregate, so nothing needs them all at once)."""
        return self.stream_uploads and type(self).aggregate is Algorithm.aggregate

    def upload_weight(self, n: int) -> float:
        return n if self.budget().weighting == "samples" else 1

    def begin_aggregate(self, total: float) -> dict:
        """A running aggregate expecting weights summing to `total` (the participants'
        n_k, known before they train)."""
        return {"total": float(total), "seen": 0.0, "sum": {}, "max": {}, "dtype": {},
                "term": None}

    def fold(self, acc: dict, upload: dict) -> None:
        """acc += n_k / total * w_k in float64 (weighted_average's operations, one
        upload at a time); num_batches_tracked: running maximum."""
        w = self.upload_weight(upload["n"])
        acc["seen"] += w
        scale = w / acc["total"]
        for key, t in upload["w"].items():
            if key.endswith("num_batches_tracked"):
                m = acc["max"].get(key)
                acc["max"][key] = t.clone() if m is None else torch.maximum(m, t)
                continue
            out = acc["sum"].get(key)
            if out is None:
                out = acc["sum"][key] = torch.zeros_like(t, dtype=torch.float64)
                acc["dtype"][key] = t.dtype
            if acc["term"] is None or acc["term"].numel() < t.numel():     # one scratch
                acc["term"] = torch.empty(max(v.numel() for v in upload["w"].values()),
                                          dtype=torch.float64)            # buffer, reused
            term = acc["term"][:t.numel()].view(t.shape)
            out.add_(term.copy_(t).mul_(scale))

    def finish_aggregate(self, server: ServerState, acc: dict) -> None:
        """Write the aggregate into the server model. If the uploads' weights did not
        sum to the expected total (a participant sent nothing), rescale to it."""
        fix = acc["total"] / acc["seen"] if acc["seen"] != acc["total"] else None
        for key, out in acc["sum"].items():
            if fix is not None:
                out.mul_(fix)
            server.weights[key] = out.to(acc["dtype"][key])
        server.weights.update(acc["max"])

    def predict(self, server: ServerState, client: ClientState, idx: np.ndarray) -> np.ndarray:
        """Class probabilities for images `idx` with the model this method uses for
        `client` (the global model, with the client's private tensors where it has any;
        a held-out client gets the n_k-average of the training clients' private tensors,
        an evaluation-only rule that is not counted as communication)."""
        private = client.state.get("private")
        if private is None or (self.private_keys and not private):
            private = self.average_private()
        self.load_model(server.weights, private)
        return self.forward_probs(idx)

    def at_clients(self, server: ServerState, clients: list, step: str, *args) -> list:
        """[getattr(self, step)(server, c, *args) for c in clients]: a step of the server's
        code that reads what only each client holds (its images, its state), run where the
        client is: here, in process; on Flower, on each client's node (flower_app replaces
        this method on the instance). A step must not change the client's state; its
        arguments and result are tensors, numbers, strings, lists and dicts of them."""
        return [getattr(self, step)(server, c, *args) for c in clients]

    def note_of(self, client: ClientState) -> dict:
        """What the other party needs to know about `client` besides the payload,
        JSON-able; {} by default: what a layer noted about it in this round for its
        metric line (`line_extra`), FedAL's pools L_k, U_k and class weights. A transport
        whose clients live apart (flower_app.py) carries it with each message between the
        server and the node."""
        return {}

    def set_note(self, client: ClientState, note: dict) -> None:
        """Take the other party's `note_of(client)` in place of this one's."""

    def sends_server_state(self, client: ClientState) -> bool:
        """Whether `local_update` for `client` in this round reads the server's state
        (set from it by `at_node`); a transport whose clients live apart (flower_app.py)
        then sends it with the client's payload, not counted (in process it is read in
        place). False by default."""
        return False

    def at_node(self, server: ServerState) -> None:
        """On a client's node, before `local_update`, where `sends_server_state`: take
        from the server's state what `begin_round` takes from it in process (e.g. FCU's
        theta_o)."""

    def reads_every_private(self, client: ClientState) -> bool:
        """Whether `predict` for `client` in this round reads the private tensors of every
        training client (the held-out rule above). A transport whose clients live apart
        (flower_app.py) gathers them first; in process they are read in place."""
        return client.id < 0 and bool(self.private_keys)

    # -- pieces the hooks share -------------------------------------------------------
    def average_private(self) -> dict:
        if not self.private_keys:
            return {}
        cs = [c for c in self.clients if c.state.get("private")]
        if not cs:
            return {}
        return {k: (torch.stack([c.state["private"][k] for c in cs]).max() if
                    k.endswith("num_batches_tracked") else
                    weighted_average([c.state["private"][k] for c in cs], [c.n for c in cs]))
                for k in self.private_keys}

    def load_model(self, shared: dict, private: dict) -> None:
        sd = dict(self.init_weights)
        sd.update(shared)
        sd.update(private)
        self.model.load_state_dict(sd)

    def batch(self, idx: torch.Tensor, gen: torch.Generator | None = None):
        """Gather images -> float, flip-augment when training (gen given), normalise."""
        x = self.fed.x[idx].float().div_(255)
        if gen is not None and self.cfg.augment == "flip":
            flips = torch.rand(len(idx), 2, generator=gen)
            x = torch.where((flips[:, 0] < 0.5).view(-1, 1, 1, 1), x.flip(3), x)
            x = torch.where((flips[:, 1] < 0.5).view(-1, 1, 1, 1), x.flip(2), x)
        x = (x - IMAGENET_MEAN) / IMAGENET_STD
        return x.to(self.device), self.fed.y[idx].to(self.device)

    def loss(self, model: nn.Module, batch, payload: dict, client: ClientState) -> torch.Tensor:
        x, y = batch
        return self.task_loss(model(x), y)

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The run's task loss (--loss, --class-weights): weighted CE, focal, or masked BCE
        on multi-label data."""
        if self.multilabel:                           # y [B, C], -1 = missing label
            return masked_bce(logits, y, self.alpha)
        if self.cfg.loss == "focal":
            return focal_loss(logits, y, self.alpha, self.cfg.focal_gamma)
        return F.cross_entropy(logits, y, weight=self.alpha)

    def train_parameters(self) -> list:
        """What the local optimiser updates (a method training more than self.model, e.g.
        FedMIC's teacher and adapter, returns those too)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def make_optimizer(self, client: ClientState) -> torch.optim.Optimizer:
        params = self.train_parameters()
        b = self.budget()
        if b.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=b.lr, betas=self.adam_betas,
                                   weight_decay=b.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=b.lr, momentum=b.momentum,
                                  weight_decay=b.weight_decay)
        if b.keep_optimizer and "optimizer" in client.state:
            opt.load_state_dict(client.state["optimizer"])
        return opt

    def local_batches(self, client: ClientState, gen: torch.Generator, steps_scale: int = 1,
                      budget: Config | None = None):
        """Minibatch index tensors for this round: E epochs of fresh permutations, or
        tau minibatches (cycling through permutations) when --local-steps is set, under
        `budget` (default: `self.budget()`; see `minibatches`)."""
        b = budget if budget is not None else self.budget()
        return minibatches(client.train, gen, b.batch_size, epochs=b.local_epochs,
                           steps=b.local_steps * steps_scale)

    def train(self, client: ClientState, payload: dict, steps_scale: int = 1) -> int:
        """Local SGD on the client's labelled images; returns the number of steps.
        With --keep-optimizer the optimiser state is read from and left in
        client.state["optimizer"]; in a run, the loop keeps it there only while the client
        trains and otherwise in a file of the run folder (`page_in`/`page_out`), so that
        memory and checkpoint do not grow with the number of clients. Hooks driven
        outside the loop (tests) keep it in memory."""
        model, cfg = self.model, self.cfg
        model.train()
        opt = self.make_optimizer(client)
        gen = torch_rng(cfg.seed, "batches", self.round, client.id)
        steps, finite = 0, torch.ones((), dtype=torch.bool, device=self.device)
        with seeded(cfg.seed, "local", self.round, client.id):
            for idx in self.local_batches(client, gen, steps_scale):
                loss = self.loss(model, self.batch(idx, gen), payload, client)
                finite &= torch.isfinite(loss.detach())   # checked once, no sync per step
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
        if not bool(finite):
            raise Diverged(f"round {self.round + 1}, client {client.name}: the training loss "
                           "became NaN or infinite")
        if self.budget().keep_optimizer:     # the loop moves it to OUT/optimizer/ (page_out)
            client.state["optimizer"] = opt.state_dict()
        return steps

    @torch.no_grad()
    def forward_probs(self, idx: np.ndarray) -> np.ndarray:
        self.model.eval()
        out = []
        idx = torch.as_tensor(idx, dtype=torch.long)
        for s in range(0, len(idx), self.cfg.eval_batch_size):
            x, _ = self.batch(idx[s:s + self.cfg.eval_batch_size])
            z = self.model(x).float()
            out.append((torch.sigmoid(z) if self.multilabel else F.softmax(z, dim=1)).cpu())
        if not out:
            return np.zeros((0, self.fed.num_classes), np.float32)
        return torch.cat(out).numpy()


def minibatches(train, gen: torch.Generator, B: int, *, epochs: int = 1, steps: int = 0):
    """Minibatch index tensors of the images `train`: `epochs` epochs of fresh
    permutations from `gen`, or, with steps > 0, `steps` minibatches (cycling through
    permutations). A final batch of one image is dropped (BatchNorm cannot train on it).
    The one schedule of the project; a protocol with several budgets passes its own."""
    data = torch.as_tensor(train, dtype=torch.long)
    n = len(data)
    done = 0
    for _ in (range(epochs) if not steps else itertools.count()):
        perm = data[torch.randperm(n, generator=gen)]
        for s in range(0, n, B):
            if steps and done >= steps:
                return
            idx = perm[s:s + B]
            if len(idx) < 2 and n >= 2:
                continue
            done += 1
            yield idx
        if steps and done >= steps:
            return


class Wrapper(Algorithm):
    """A protocol that runs inside ONE run of the loop around another registered method,
    its `base` (FedAL: active-learning cycles around --base-algo), and owns no model.

    What a wrapper provides, in its __init__(cfg, args, fed):
      1. `Wrapper.__init__(self, cfg, args, fed, rounds=T)` first (after checking its own
         args): no model is built; `rounds`, where the wrapper's schedule fixes the
         number of rounds, goes into its own copy of the settings, self.cfg, which the
         loop runs and config.json records (the caller's cfg is never changed);
      2. its base method, an ordinary instance built through its own constructor (with
         self.cfg, its own args, and whatever view of the federation the wrapper gives
         it), handed over with `self.wrap(base)`;
      3. only the hooks it changes (e.g. begin_round, local_update), each calling the
         base's.
    What the core does for it: every other hook, the streaming aggregation included, is
    the base's; the loop's clock (`set_round`) and what it hands over before setup
    (`attach`: the held-out clients, --quiet) reach the base as well as the wrapper; the
    evaluated view (`primary_view`), the wording of the pooled lines and the exported
    models are the base's."""

    def __init__(self, cfg: Config, args, fed, rounds: int | None = None):
        self._bind(cfg if rounds is None else dataclasses.replace(cfg, rounds=rounds), args, fed)
        self.base: Algorithm | None = None

    def wrap(self, base: Algorithm) -> None:
        self.base = base
        self.primary_view = base.primary_view

    def attach(self, holdout: list, quiet: bool) -> None:
        super().attach(holdout, quiet)
        self.base.attach(holdout, quiet)

    def set_round(self, t: int) -> None:
        super().set_round(t)
        self.base.set_round(t)

    def budget(self) -> Config:
        return self.base.budget()

    def setup(self, server: ServerState, clients: list) -> None:
        self.clients = clients
        self.base.setup(server, clients)

    def begin_round(self, server: ServerState, clients: list) -> None:
        self.base.begin_round(server, clients)

    def participants(self, server: ServerState, sampled: list) -> list:
        return self.base.participants(server, sampled)

    def broadcast(self, server: ServerState, client: ClientState) -> dict:
        return self.base.broadcast(server, client)

    def local_update(self, client: ClientState, payload: dict) -> dict:
        return self.base.local_update(client, payload)

    def streams(self) -> bool:
        return type(self).aggregate is Wrapper.aggregate and self.base.streams()

    def aggregate(self, server: ServerState, uploads: dict) -> None:
        self.base.aggregate(server, uploads)

    def upload_weight(self, n: int) -> float:
        return self.base.upload_weight(n)

    def begin_aggregate(self, total: float) -> dict:
        return self.base.begin_aggregate(total)

    def fold(self, acc: dict, upload: dict) -> None:
        self.base.fold(acc, upload)

    def finish_aggregate(self, server: ServerState, acc: dict) -> None:
        self.base.finish_aggregate(server, acc)

    def predict(self, server: ServerState, client: ClientState, idx: np.ndarray):
        return self.base.predict(server, client, idx)

    def reads_every_private(self, client: ClientState) -> bool:
        return self.base.reads_every_private(client)

    def sends_server_state(self, client: ClientState) -> bool:
        return self.base.sends_server_state(client)

    def at_node(self, server: ServerState) -> None:
        self.base.at_node(server)

    def note_of(self, client: ClientState) -> dict:
        return self.base.note_of(client)

    def set_note(self, client: ClientState, note: dict) -> None:
        self.base.set_note(client, note)

    def line_extra(self, server: ServerState, client: ClientState) -> dict:
        return self.base.line_extra(server, client)

    def summary_extra(self, server: ServerState, lines: list) -> dict:
        return self.base.summary_extra(server, lines)

    def pooled_kind(self, view: str) -> str:
        return self.base.pooled_kind(view)

    def export_models(self, server: ServerState, clients: list) -> dict:
        return self.base.export_models(server, clients)


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def trainable(model: nn.Module):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------- results on disk

def atomic_write(path: str, data: bytes | str, fsync: bool = True) -> None:
    """Write to a temporary file, then rename it over `path`: a reader (or a run killed
    mid-write) sees the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:                             # a full disk, a kill: no temporary left
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_torch_save(obj, path: str) -> None:
    """The per-round checkpoint: atomic against a killed run; not fsynced (the rename
    already suffices for that, and fsync each round cost ~2% of a small round), and
    without torch.save's zip CRC32 where torch lets it be skipped (the checksum was 19 of
    the 26 ms of serialising a 28 MB FedMedCLIP checkpoint; torch.load reads it alike)."""
    atomic_write(path, torch_bytes(obj), fsync=False)


def torch_bytes(obj) -> bytes:
    """torch.save of `obj` into bytes, without the zip CRC32 (see atomic_torch_save)."""
    try:
        from torch.utils.serialization import config
        crc, config.save.compute_crc32 = config.save.compute_crc32, False
    except ImportError:                               # torch < 2.6: always checksummed
        config = None
    buf = io.BytesIO()
    try:
        torch.save(obj, buf)
    finally:
        if config is not None:
            config.save.compute_crc32 = crc
    return buf.getvalue()


def _numpy_safe_globals() -> list:
    """The numpy types a checkpoint may hold (index arrays, scalars), allowed by torch's
    weights_only unpickler: arrays of numbers, booleans and strings, never objects."""
    from numpy._core.multiarray import _reconstruct, scalar
    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
             np.uint64, np.float16, np.float32, np.float64, np.str_)
    return [np.ndarray, np.dtype, _reconstruct, scalar, bytes] + [type(np.dtype(k)) for k in kinds]


def safe_torch_load(source, **kw):
    """torch.load that never runs code from the file: weights_only=True with only the
    numpy array/scalar types registered (a pickle that names any other callable fails)."""
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        return torch.load(source, map_location="cpu", weights_only=True, **kw)


def state_digest(obj) -> str:
    """sha256 of a checkpoint's content: every tensor's dtype, shape and bytes, every
    array's, and the repr of every other leaf, walked in order (dict keys included)."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(o, np.ndarray):
            h.update(f"A{o.dtype.str}{o.shape}".encode())
            h.update(np.ascontiguousarray(o).tobytes())
        elif isinstance(o, dict):
            h.update(f"D{len(o)}".encode())
            for k, v in o.items():
                walk(k)
                walk(v)
        elif isinstance(o, (list, tuple)):
            h.update(f"{type(o).__name__[0]}{len(o)}".encode())
            for v in o:
                walk(v)
        else:
            h.update(f"S{type(o).__name__}:{o!r};".encode())
    walk(obj)
    return h.hexdigest()


def save_checkpoint(obj: dict, path: str) -> None:
    """Atomically write checkpoint `obj` with its `state_digest` under "sha256"."""
    atomic_torch_save({**obj, "sha256": state_digest(obj)}, path)


def load_checkpoint(path: str, what: str = "--resume") -> dict:
    """Read a checkpoint written by `save_checkpoint` without executing anything in it,
    and verify its sha256; any failure is a one-line UsageError naming `path`."""
    try:
        ck = safe_torch_load(path)
    except Exception as e:  # noqa: BLE001 - any unreadable or unsafe file
        kind = "unsafe content" if isinstance(e, pickle.UnpicklingError) else type(e).__name__
        raise UsageError(f"{what}: {path} cannot be read ({kind}); start a new run with "
                         "another --out")
    want = ck.pop("sha256", None) if isinstance(ck, dict) else None
    if want is None or state_digest(ck) != want:
        raise UsageError(f"{what}: {path} fails its checksum (damaged or edited since it was "
                         "written); start a new run with another --out")
    return ck


# --keep-optimizer in a run: each client's optimiser state lives in its own file,
#   OUT/optimizer/<client id>-<name>.r<round>.pt   (the state after that round's update)
# and client.state[OPT_REF] = {"file", "sha256", "bytes"} names the one that belongs to
# the state checkpointed with it. A round writes new files (never over a file a
# checkpoint names); the files no checkpoint names any more are deleted only after the
# next checkpoint is written. So a kill at any point leaves checkpoint.pt with every file
# it names, and --resume rewrites the killed round's files with the same content.
OPT_DIR = "optimizer"
OPT_REF = "optimizer_file"


def page_in(out: str, client: ClientState):
    """Before `client` trains: read its optimiser state file (verifying its sha256) into
    client.state["optimizer"], where make_optimizer looks; returns what was read (None
    when the client has none on disk)."""
    ref = client.state.get(OPT_REF)
    if ref is None or "optimizer" in client.state:
        return None
    path = os.path.join(out, OPT_DIR, ref["file"])
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        raise UsageError(f"{path} (client {client.name}'s optimiser state) is missing; the "
                         "run cannot continue as it was; start a new run with another --out"
                         ) from None
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise UsageError(f"{path} (client {client.name}'s optimiser state) fails its checksum "
                         "(damaged or edited since it was written); start a new run with "
                         "another --out")
    client.state["optimizer"] = state = safe_torch_load(io.BytesIO(data))
    return state


def page_out(out: str, client: ClientState, rnd: int, read=None) -> None:
    """After `client` trained in round `rnd` (1-based): move client.state["optimizer"]
    to a new file of round `rnd` (atomically) and keep only its name and checksum in
    client.state; a state the update left as `page_in` read it is dropped, not rewritten."""
    state = client.state.pop("optimizer", None)
    if state is None or state is read:
        return
    name = f"{client.id}-{_file_stem(client.name)}.r{rnd}.pt"
    data = torch_bytes(state)
    os.makedirs(os.path.join(out, OPT_DIR), exist_ok=True)
    atomic_write(os.path.join(out, OPT_DIR, name), data, fsync=False)
    client.state[OPT_REF] = {"file": name, "sha256": hashlib.sha256(data).hexdigest(),
                             "bytes": len(data)}


def prune_optimizer_files(out: str, clients: list) -> None:
    """After a checkpoint is written: delete the optimiser files it does not name
    (superseded rounds, a killed round's leftovers, temporaries)."""
    folder = os.path.join(out, OPT_DIR)
    if not os.path.isdir(folder):
        return
    keep = {c.state[OPT_REF]["file"] for c in clients if OPT_REF in c.state}
    for n in os.listdir(folder):
        if n not in keep:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, n))


def check_optimizer_files(out: str, clients: list) -> None:
    """--resume: every optimiser file the checkpoint names exists with its recorded size
    (its checksum is verified when it is read); else one line naming the first."""
    for c in clients:
        ref = c.state.get(OPT_REF)
        if ref is None:
            continue
        path = os.path.join(out, OPT_DIR, ref["file"])
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size != ref["bytes"]:
            what = "is missing" if size is None else f"has {size} bytes, not {ref['bytes']}"
            raise UsageError(f"--resume: {path} (client {c.name}'s optimiser state) {what}; "
                             "start a new run with another --out")


RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt")
LOCK_NAME = ".lock"


def is_run_folder(out: str) -> bool:
    """Whether `out` holds a FedMed run (its own, or a protocol's phases in subfolders)."""
    if any(os.path.exists(os.path.join(out, n)) for n in RUN_FILES):
        return True
    return any(os.path.isdir(os.path.join(out, d)) and is_run_folder(os.path.join(out, d))
               for d in os.listdir(out))


def clear_out(out: str) -> None:
    """--overwrite: remove everything in `out` (files, phase folders, temporaries) but
    its lock, so that nothing of the old run is left for a later --resume to pick up.
    Refuses a folder that is not a FedMed run (never empties an arbitrary folder)."""
    import shutil
    names = [n for n in os.listdir(out) if n != LOCK_NAME]
    if names and not is_run_folder(out):
        raise UsageError(f"--overwrite: {out} holds files that are not a FedMed run "
                         f"(e.g. {sorted(names)[0]}); give an empty or new --out")
    for n in names:
        p = os.path.join(out, n)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)


_LOCKS: dict = {}                     # realpath -> [fd, depth]: held by this process


@contextlib.contextmanager
def locked(out: str):
    """Hold an exclusive lock on the results folder `out` (flock on out/.lock, which
    holds the owner's PID) for the block; re-entrant within a process; released on exit
    or when the process dies, however it dies. A second process gets a UsageError naming
    the first's PID."""
    import fcntl
    os.makedirs(out, exist_ok=True)
    key = os.path.realpath(out)
    if key in _LOCKS:
        _LOCKS[key][1] += 1
    else:
        path = os.path.join(out, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.pread(fd, 32, 0).decode().strip() or "?"
            finally:
                os.close(fd)
            raise UsageError(f"--out {out} is in use by another run (PID {pid}); wait for it "
                             "to finish or give another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _LOCKS[key] = [fd, 1]
    try:
        yield
    finally:
        _LOCKS[key][1] -= 1
        if _LOCKS[key][1] == 0:
            fd = _LOCKS.pop(key)[0]
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    """Versions of what produced a result (open_clip read from its package metadata:
    importing it costs seconds)."""
    from importlib import metadata
    v = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
         "torch_git": torch.version.git_version, "torch_cuda": torch.version.cuda,
         "torch_threads": torch.get_num_threads(),           # results depend on these
         "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),  # (reduction
         "torch_blas": next((w.split("=")[1] for w in torch.__config__.show().split(", ")
                             if w.startswith("BLAS_INFO=")), None)}        # order, kernels)
    try:
        v["open_clip"] = metadata.version("open_clip_torch")
    except metadata.PackageNotFoundError:
        v["open_clip"] = None
    return v


def _strict(obj):
    """`obj` with every NaN/infinite float replaced by None: the files stay valid JSON
    (json.dumps would write NaN, which JSON does not have)."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.ndarray)):
        return _strict(_jsonable(obj))
    return obj


def jsonl_line(m: dict) -> str:
    """One line of metrics.jsonl (an undefined metric, NaN in memory, is null on disk)."""
    return json.dumps(_strict(m), default=_jsonable, allow_nan=False) + "\n"


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def dumps(obj) -> str:
    return json.dumps(_strict(obj), indent=2, default=_jsonable, sort_keys=True,
                      allow_nan=False) + "\n"


# settings that may differ between a run and its resumption
RESUMABLE = {"rounds", "device"}


def comparable_config(record: dict) -> dict:
    cfg = {k: v for k, v in record["config"].items() if k not in RESUMABLE}
    return {"config": cfg, "algorithm_args": record["algorithm_args"], "data": record["data"],
            **({"layers": record["layers"]} if record.get("layers") else {})}


class Progress:
    """A one-line progress bar on stderr. Off a terminal it prints a line per step, or at
    most one every `every` seconds (and the last). With `what`, it shows rate and ETA."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, what: str = "",
                 every: float = 0.0):
        self.total, self.done, self.enabled = total, start, enabled
        self.what, self.every, self.start = what, every, start
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()

    def status(self, text: str) -> None:
        """What is happening inside the current step (shown on a terminal only)."""
        if self.enabled and self.tty:
            sys.stderr.write("\r" + f"  {text}"[:150].ljust(150))
            sys.stderr.flush()

    def step(self, text: str = "") -> None:
        self.update(1, text)

    def update(self, n: int, text: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if not self.enabled or (not self.tty and now - self.last < self.every
                                and self.done < self.total):
            return
        self.last = now
        fill = int(30 * self.done / max(self.total, 1))
        bar = f"[{'#' * fill}{'.' * (30 - fill)}] {self.done}/{self.total} {text}"
        if self.what:
            rate = (self.done - self.start) / max(now - self.t0, 1e-9)
            bar += f"{self.what} ({rate:.1f}/s, {(self.total - self.done) / max(rate, 1e-9):.0f}s left)"
        if self.tty:
            sys.stderr.write("\r" + bar[:150].ljust(150) + ("\n" if self.done >= self.total else ""))
        else:
            sys.stderr.write(bar + "\n")
        sys.stderr.flush()


# ---------------------------------------------------------------- the round loop

def sample_clients(seed: int, t: int, K: int, fraction: float) -> list:
    """S_t: max(1, round(C K)) clients without replacement, from the (seed, t) stream."""
    m = max(1, int(round(fraction * K)))
    if m >= K:
        return list(range(K))
    return sorted(np_rng(seed, "sample", t).choice(K, size=m, replace=False).tolist())


def data_identity(fed) -> dict:
    """{client: sha256} of what each client holds: its split indices, the labels and the
    files (or keys) of those rows, and the class names. A checkpoint records it, so that
    --resume on changed data (rows removed from a CSV shift every index) is refused
    instead of restoring indices that now point at other images."""
    y = fed.y.numpy()
    files = list(fed.files) if getattr(fed, "files", None) else None
    out = {}
    for c in list(fed.clients) + list(fed.holdout):
        h = hashlib.sha256(repr(list(fed.classes)).encode())
        for split in ("train", "test", "unlabeled"):
            idx = np.asarray(getattr(c, split), dtype=np.int64)
            h.update(split.encode())
            h.update(idx.tobytes())
            h.update(np.ascontiguousarray(y[idx]).astype(np.int64).tobytes())
            if files is not None:
                h.update("\0".join(str(files[i]) for i in idx).encode())
        out[c.name] = h.hexdigest()[:16]
    return out


def make_clients(fed) -> list:
    empty = [c.name for c in fed.clients if len(c.train) == 0 and len(c.unlabeled) == 0]
    if empty:
        raise UsageError(f"--partition left client {empty[0]} with no training images "
                         f"({len(empty)} such client(s)); use fewer --clients or another partition")
    if not fed.clients:
        raise UsageError("--holdout-client left no client to train; hold out fewer clients")
    no_test = [c.name for c in fed.clients if len(c.test) == 0]
    if no_test:                                       # every client is evaluated every round
        raise UsageError(f"client {no_test[0]} has no test image ({len(no_test)} such client(s)); "
                         "raise --max-images-per-client or --test-fraction")
    return [ClientState(k, c.name, np.asarray(c.train), np.asarray(c.test),
                        np.asarray(c.unlabeled), c.label_set) for k, c in enumerate(fed.clients)]


class InProcess:
    """The transport of an ordinary run: every client trains and is evaluated in this
    process, one after another. The round loop (`_rounds`) is written once; it asks its
    transport for the round's uploads (`train`) and its metric lines (`evaluate`).
    flower_app.FlowerTransport is the other implementation: the same hooks, called on
    Flower nodes that each hold one client."""

    def bind(self, algo, cfg, clients, holdout, record, out, resume) -> None:
        """Before the first round (the results folder `out` is locked)."""
        self.algo, self.out = algo, out

    def train(self, t, server, participants, status):
        """Yield (client, upload as received, bytes up, bytes down) for each participant,
        in order: broadcast -> transmit -> local_update -> transmit (a client's optimiser
        state paged in from, and out to, the run folder around its update). A client
        that sent nothing would be yielded with upload None."""
        algo = self.algo
        for client in participants:
            status(f"round {t + 1}/{algo.cfg.rounds}: training {client.name}")
            payload, down = transmit(algo.broadcast(server, client))
            read = page_in(self.out, client)
            upload, up = transmit(algo.local_update(client, payload))
            check_private(t, client)
            page_out(self.out, client, t + 1, read)
            del read, payload
            yield client, upload, up, down

    def evaluate(self, t, server, clients, holdout, up_bytes, down_bytes, seconds) -> list:
        return evaluate_all(self.algo, server, clients, holdout, t, up_bytes, down_bytes,
                            seconds)

    def export(self, algo, server, clients) -> dict:
        """The end-of-run models (`export_models`), with every client's state at hand."""
        return algo.export_models(server, clients)

    def checkpoint(self) -> dict:
        """Extra keys of the per-round checkpoint ({}: none)."""
        return {}

    def client_records(self, clients: list) -> list:
        """What the per-round checkpoint keeps of each client: its state, its labelled
        and unlabelled indices."""
        return [{"state": c.state, "train": c.train, "unlabeled": c.unlabeled} for c in clients]

    def checkpointed(self, clients: list) -> None:
        """After the checkpoint is written: the optimiser files it does not name go."""
        prune_optimizer_files(self.out, clients)

    def restore(self, ck: dict) -> None:
        """--resume: read back what `checkpoint` added."""


def build(cfg: Config, args, fed, layer=None, quiet: bool = False, node: bool = False):
    """(algo, cfg, clients, holdout, server) of a run, set up for round 0: the method built
    with `ALGORITHMS[cfg.algo](cfg, args, fed)` (wrapped by `layer`), the client records,
    the held-out ones, and the server state after `setup`. `run` starts from this; a
    Flower node (flower_app.py) builds the same (`node`: the method's `on_node`), so both
    sides start from one state."""
    clients = make_clients(fed)
    algo = ALGORITHMS[cfg.algo](cfg, args, fed)
    if layer is not None:
        algo = layer(algo)
    level = algo
    while node:
        level.on_node = True
        if not isinstance(level, Wrapper):
            break
        level = level.base
    cfg = algo.cfg                # what the method runs (a protocol's schedule fixes rounds)
    holdout = [ClientState(-1 - i, c.name, np.asarray(c.train), np.asarray(c.test))
               for i, c in enumerate(fed.holdout)]
    server = ServerState()
    algo.attach(holdout, quiet)                       # quiet: e.g. no feature bar in setup
    algo.setup(server, clients)
    return algo, cfg, clients, holdout, server


def run(cfg: Config, args, fed, out: str, *, resume: bool = False, data_args: dict | None = None,
        stop_after: int | None = None, quiet: bool = False, log=print,
        argv: list | None = None, last_k: int = 5, layer=None, transport=None) -> dict:
    """Train `cfg.algo` on federation `fed` for cfg.rounds rounds, writing results to
    `out`; returns the summary (last round, and the mean over the last `last_k` rounds).
    The ONE round loop of the project. `out` is locked against other processes while it
    runs. `layer`, when given, wraps the method (`layer(algo)` returns a Wrapper, e.g. the
    DP layer of privacy.py); the wrapper's `layer_record` goes into config.json and is
    part of what --resume must match. `transport` carries each round's training and
    evaluation to the clients: `InProcess` (default: every client in this process) or
    flower_app.FlowerTransport (each client on its own Flower node)."""
    if last_k < 1:
        raise UsageError(f"--last-k must be at least 1 (got {last_k})")
    algo, cfg, clients, holdout, server = build(cfg, args, fed, layer, quiet)
    transport = transport if transport is not None else InProcess()
    record = {"config": dataclasses.asdict(cfg),
              "algorithm_args": dataclasses.asdict(args) if args is not None else {},
              "data": data_args or {}, "classes": list(fed.classes),
              "clients": [c.name for c in clients], "holdout": [c.name for c in holdout],
              "split": fed.split_summary(), "dataset_info": fed.info,
              "versions": versions(), "git_commit": git_commit(),
              "algorithm_info": getattr(algo, "info", {}),   # e.g. a protocol's derived settings
              "data_identity": data_identity(fed),
              "layers": getattr(algo, "layer_record", {}),
              "argv": list(sys.argv[1:] if argv is None else argv)}   # the command as typed
    with locked(out):
        transport.bind(algo, cfg, clients, holdout, record, out, resume)
        return _loop(cfg, algo, server, clients, holdout, record, out, resume, stop_after,
                     quiet, log, last_k, transport)


def _loop(cfg, algo, server, clients, holdout, record, out, resume, stop_after, quiet, log,
          last_k=5, transport=None):
    ckpt_path = os.path.join(out, "checkpoint.pt")
    metrics_path = os.path.join(out, "metrics.jsonl")
    start = 0
    if resume:
        start, totals = _restore(ckpt_path, record, out, server, clients, algo, transport)
        if cfg.rounds < start:
            raise UsageError(f"--resume --rounds {cfg.rounds}: the run in {out} already did "
                             f"{start} rounds; give --rounds {start} or more (more continue it)")
        _repair_metrics(metrics_path, start)
        record["history"] = _history(out) + [{"rounds": cfg.rounds, "from_round": start,
                                              "argv": record["argv"]}]
        atomic_write(os.path.join(out, "config.json"), dumps(record))
    else:
        clear_out(out)                                    # stale files of a replaced run
        totals = {"bytes_up": 0, "bytes_down": 0, "seconds": 0.0}
        record["history"] = [{"rounds": cfg.rounds, "from_round": 0, "argv": record["argv"]}]
        atomic_write(os.path.join(out, "config.json"), dumps(record))
        atomic_write(metrics_path, "")
    bar = Progress(cfg.rounds, start, enabled=not quiet)
    try:
        return _rounds(cfg, algo, server, clients, holdout, record, out, stop_after, log,
                       start, totals, bar, ckpt_path, metrics_path, last_k, transport)
    except KeyboardInterrupt:
        done = _RoundsDone.get(out, start)
        kept = (f"the checkpoint of round {done} in {out} is kept" if done else
                "no round finished")
        raise Interrupted(f"interrupted in round {done + 1} of {cfg.rounds}; {kept}") from None


_RoundsDone: dict = {}                # out -> rounds checkpointed by the running loop


def _rounds(cfg, algo, server, clients, holdout, record, out, stop_after, log, start, totals,
            bar, ckpt_path, metrics_path, last_k=5, transport=None):
    last = None
    _RoundsDone[out] = start
    for t in range(start, cfg.rounds):
        algo.set_round(t)
        t0 = time.perf_counter()
        algo.begin_round(server, clients)
        sampled = [clients[k] for k in sample_clients(cfg.seed, t, len(clients), cfg.fraction)]
        up_bytes, down_bytes, uploads = {}, {}, {}
        participants = algo.participants(server, sampled)
        stream = algo.streams()           # fold each upload now: memory flat in clients
        if stream:
            acc = algo.begin_aggregate(sum(algo.upload_weight(c.n) for c in participants))
        try:
            for client, upload, up, down in transport.train(t, server, participants, bar.status):
                bad = first_nonfinite(upload)             # (the private tensors: checked
                if bad:                                   # where they are, in train)
                    raise Diverged(f"round {t + 1}, client {client.name}: weight {bad} is NaN "
                                   "or infinite after local training")
                up_bytes[client.id], down_bytes[client.id] = up, down
                if stream and upload:
                    algo.fold(acc, upload)
                    uploads[client.id] = True
                else:
                    uploads[client.id] = upload
                del upload
        except Diverged as e:
            raise Diverged(f"{e}; {_kept(t, out)}") from None
        if stream and any(uploads.values()):
            algo.finish_aggregate(server, acc)
        elif any(uploads.values()) or getattr(algo, "aggregate_empty", False):
            algo.aggregate(server, {k: u for k, u in uploads.items() if u})   # (DP: noise
                                                                              # even if none)
        if any(uploads.values()):
            bad = first_nonfinite(server.weights)
            if bad:
                raise Diverged(f"round {t + 1}, server: aggregated weight {bad} is NaN or "
                               f"infinite; {_kept(t, out)}")
        train_seconds = time.perf_counter() - t0
        try:
            last = transport.evaluate(t, server, clients, holdout, up_bytes, down_bytes,
                                      train_seconds)
        except Diverged as e:
            raise Diverged(f"{e}; {_kept(t, out)}") from None
        with open(metrics_path, "a") as f:
            f.write("".join(jsonl_line(m) for m in last))
        totals["bytes_up"] += sum(up_bytes.values())
        totals["bytes_down"] += sum(down_bytes.values())
        totals["seconds"] += time.perf_counter() - t0
        save_checkpoint({"round": t + 1, "record": comparable_config(record),
                           "data_identity": record["data_identity"], "totals": dict(totals),
                           "threads": torch.get_num_threads(),
                           **transport.checkpoint(),
                           "server": dataclasses.asdict(server),
                           "clients": transport.client_records(clients)}, ckpt_path)
        transport.checkpointed(clients)                   # only now: the checkpoint moved on
        _RoundsDone[out] = t + 1
        pooled = [m for m in _primary(last) if m["client"] == "pooled"][0]
        bar.step(f"round {t + 1}: mean BA {_mean_ba(last):.3f}  pooled BA "
                 f"{pooled['balanced_accuracy']:.3f}  ({time.perf_counter() - t0:.1f}s)")
        if stop_after is not None and t + 1 >= stop_after and t + 1 < cfg.rounds:
            log(f"stopped after round {t + 1} as asked; continue with --resume")
            return {}
    if last is None:          # resumed a finished run: rebuild the summary from the file
        last = _last_round_lines(metrics_path)
    history = _read_lines(metrics_path)
    summary = make_summary(last, totals, cfg.rounds, history, last_k)
    summary["pooled_kind"] = algo.pooled_kind(summary["view"])
    for view, v in summary.get("views", {}).items():
        v["pooled_kind"] = algo.pooled_kind(view)
    summary.update(algo.summary_extra(server, history))
    exported = transport.export(algo, server, clients)
    for stem, sd in exported.items():                 # plain weights, for --weights
        atomic_torch_save(sd, os.path.join(out, _file_stem(stem) + ".pt"))
    if exported:
        summary["exported"] = sorted(_file_stem(stem) + ".pt" for stem in exported)
        summary["client_n"] = {c.name: int(c.n) for c in clients}   # n_k of the held-out rule
    atomic_write(os.path.join(out, "summary.json"), dumps(summary))
    return summary


def _kept(t: int, out: str) -> str:
    """What a diverged run leaves behind (it stopped in round t + 1)."""
    if t == 0:
        return "no round finished, nothing was kept; lower --lr (or check --momentum/--focal-gamma)"
    return (f"the checkpoint of round {t} in {out} is kept; lower --lr (or check "
            "--momentum/--focal-gamma) and start again")


def _file_stem(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def evaluate_all(algo, server, clients, holdout, t, up_bytes, down_bytes, seconds) -> list:
    """Metrics of every client (trained this round or not) on its own test set, of the
    pooled test set (concatenated predictions, not a mean), and of held-out clients; one
    line each per view when `predict` returns several (e.g. personal and global models).
    The round's bytes are repeated on each view's line; totals come from the primary view."""
    lines, ys, probs = [], {}, {}
    for c in clients + holdout:
        mine, seen = client_lines(algo, server, c, t, up_bytes.get(c.id, 0),
                                  down_bytes.get(c.id, 0))
        lines += mine
        for view, (y, prob) in seen.items():
            ys.setdefault(view, []).append(y)
            probs.setdefault(view, []).append(prob)
    return lines + pooled_lines(ys, probs, t, up_bytes, down_bytes, seconds)


def client_lines(algo, server, c, t, up: int, down: int) -> tuple[list, dict]:
    """Client `c`'s metric lines of round t (one per view of `predict`), and {view: (its
    test labels, the predicted probabilities)} for the pooled line ({} for a held-out
    client). Where the client is (this process, or a Flower node) does not matter."""
    out = algo.predict(server, c, c.test)
    views = out if isinstance(out, dict) else {algo.primary_view: out}
    for view, prob in views.items():
        if not np.isfinite(prob).all():
            raise Diverged(f"round {t + 1}, client {c.name}: the {view} model's predicted "
                           "probabilities are NaN or infinite")
    y = algo.fed.y[torch.as_tensor(c.test, dtype=torch.long)].numpy()
    lines, seen = [], {}
    for view, prob in views.items():
        m = classification_metrics(y, prob) if len(y) else {}
        m.update(round=t + 1, client=c.name, view=view, holdout=c.id < 0,
                 bytes_up=up, bytes_down=down)
        m.update(algo.line_extra(server, c))
        lines.append(m)
        if c.id >= 0:
            seen[view] = (y, prob)
    return lines, seen


def pooled_lines(ys: dict, probs: dict, t, up_bytes, down_bytes, seconds) -> list:
    """The pooled test-set line of each view from every training client's labels and
    predictions ({view: [array per client]}, in client order)."""
    lines = []
    for view in ys:
        pooled = classification_metrics(np.concatenate(ys[view]), np.concatenate(probs[view]))
        pooled.update(round=t + 1, client="pooled", view=view, holdout=False,
                      bytes_up=sum(up_bytes.values()), bytes_down=sum(down_bytes.values()),
                      seconds=seconds)
        lines.append(pooled)
    return lines


def _primary(lines: list) -> list:
    """The lines of the first view (the algorithm's primary one)."""
    view = lines[0]["view"]
    return [m for m in lines if m["view"] == view]


def _mean_ba(lines: list) -> float:
    return float(np.mean([m["balanced_accuracy"] for m in _primary(lines)
                          if m["client"] != "pooled" and not m["holdout"]]))


def last_k_means(history: list, view: str, k: int) -> dict:
    """Mean over the last min(k, rounds) rounds of `view` in `history` (metrics.jsonl
    lines) of the round's mean-over-clients balanced accuracy and of its pooled balanced
    accuracy, keyed ..._last{j} for the j rounds actually averaged (a run shorter than k
    says so in its key), with `last_k` = j."""
    lines = [m for m in history if m["view"] == view]
    rounds = sorted({m["round"] for m in lines})[-k:]
    if not rounds:
        return {}
    per_round, pooled = [], []
    for r in rounds:
        at = [m for m in lines if m["round"] == r]
        per_round.append(np.nanmean([m["balanced_accuracy"] for m in at
                                     if m["client"] != "pooled" and not m["holdout"]]))
        pooled.append([m["balanced_accuracy"] for m in at if m["client"] == "pooled"][0])
    j = len(rounds)
    return {f"balanced_accuracy_last{j}": float(np.mean(per_round)),
            f"pooled_balanced_accuracy_last{j}": float(np.mean(pooled)), "last_k": j}


def make_summary(last: list, totals: dict, rounds: int, history: list | None = None,
                 k: int = 5) -> dict:
    """Last-round figures of the primary view, and (given the `history` of every round)
    their means over the last k rounds; other views under `views`."""
    views = list(dict.fromkeys(m["view"] for m in last))
    others = {v: make_summary([m for m in last if m["view"] == v], totals, rounds, history, k)
              for v in views[1:]}
    last = _primary(last)
    per = [m for m in last if m["client"] != "pooled" and not m["holdout"]]
    pooled = [m for m in last if m["client"] == "pooled"][0]
    undefined: dict = {}

    def mean(k):          # over the clients where metric k is defined (e.g. AUROC needs 2 classes)
        vals = [m[k] for m in per if m[k] is not None and not np.isnan(m[k])]
        if len(vals) < len(per):
            undefined[k] = [m["client"] for m in per if m[k] is None or np.isnan(m[k])]
        return float(np.mean(vals)) if vals else float("nan")
    summary = {"balanced_accuracy": mean("balanced_accuracy"),
               "pooled_balanced_accuracy": pooled["balanced_accuracy"],
               "accuracy": mean("accuracy"), "macro_f1": mean("macro_f1"),
               "macro_auroc": mean("macro_auroc"), "loss": mean("loss"),
               "pooled": {k: pooled[k] for k in ("accuracy", "macro_f1", "macro_auroc", "loss")},
               "bytes_up": int(totals["bytes_up"]), "bytes_down": int(totals["bytes_down"]),
               "seconds": float(totals["seconds"]), "rounds": rounds,
               "clients": {m["client"]: {k: m[k] for k in ("balanced_accuracy", "accuracy",
                                                           "macro_f1", "macro_auroc", "n")}
                           for m in per}}
    if undefined:                     # named, never silently dropped from the mean
        summary["undefined_for"] = undefined
    held = [m for m in last if m["holdout"]]
    if held:
        summary["holdout"] = {m["client"]: {k: m[k] for k in ("balanced_accuracy", "accuracy",
                                                              "macro_f1", "macro_auroc", "n")}
                              for m in held}
    summary["view"] = views[0]
    smoothed = last_k_means(history, views[0], k) if history else {}
    summary.update(smoothed)
    if others:
        summary["views"] = {v: {key: o[key] for key in ("balanced_accuracy",
                                                        "pooled_balanced_accuracy", "accuracy",
                                                        "macro_f1", "macro_auroc", "clients")}
                            | ({"holdout": o["holdout"]} if "holdout" in o else {})
                            | {key: val for key, val in o.items() if "_last" in key}
                            for v, o in others.items()}
    return summary


def recorded_rounds(out: str) -> int | None:
    """The total number of rounds config.json in `out` asks for (None if unreadable)."""
    try:
        with open(os.path.join(out, "config.json")) as f:
            return int(json.load(f)["config"]["rounds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _history(out: str) -> list:
    """config.json's list of invocations: {rounds: the total asked for, from_round: the
    round it started from} (0 for the first; a --resume with more --rounds extends)."""
    try:
        with open(os.path.join(out, "config.json")) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return []
    return old.get("history") or [{"rounds": old.get("config", {}).get("rounds"), "from_round": 0}]


def _restore(ckpt_path, record, out, server, clients, algo, transport=None) -> tuple[int, dict]:
    if not os.path.isfile(ckpt_path):
        raise UsageError(f"--resume: {ckpt_path} does not exist; start the run without --resume")
    ck = load_checkpoint(ckpt_path)
    if ck.get("record") != comparable_config(record):
        theirs, ours = ck.get("record") or {}, comparable_config(record)
        diff = sorted(f"{sec}.{k}" for sec in ours for k in set(ours[sec]) | set(theirs.get(sec, {}))
                      if ours[sec].get(k) != theirs.get(sec, {}).get(k))
        raise UsageError(f"--resume: {ckpt_path} comes from another configuration (differs in "
                         f"{', '.join(diff[:4]) or 'structure'}); resume with the same flags "
                         "or start a new --out")
    theirs, ours = ck.get("data_identity") or {}, record["data_identity"]
    if theirs != ours:
        changed = [k for k in ours if theirs.get(k) != ours[k]] or sorted(set(theirs) - set(ours))
        raise UsageError(f"--resume: the data changed since {ckpt_path} was written (the images, "
                         f"labels or split of client {(changed or ['?'])[0]} differ); restore the "
                         "data as it was, or start a new run with another --out")
    if ck.get("threads") != torch.get_num_threads():
        print(f"warning: {ckpt_path} was written with {ck.get('threads')} torch thread(s), this "
              f"process has {torch.get_num_threads()}: the continued run may differ in the last "
              f"bits from one that never stopped (set OMP_NUM_THREADS={ck.get('threads')})",
              file=sys.stderr)
    server.weights, server.state = ck["server"]["weights"], ck["server"]["state"]
    for c, saved in zip(clients, ck["clients"]):
        c.state, c.train, c.unlabeled = saved["state"], saved["train"], saved["unlabeled"]
    check_optimizer_files(out, clients)
    if transport is not None:
        transport.restore(ck)
    return int(ck["round"]), dict(ck["totals"])


def _read_lines(path: str) -> list:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = [json.loads(s) for s in f if s.strip()]
    for m in lines:                   # null on disk = undefined = NaN in memory
        for k in METRIC_KEYS:
            if k in m and m[k] is None:
                m[k] = float("nan")
    return lines


METRIC_KEYS = ("balanced_accuracy", "accuracy", "macro_f1", "macro_auroc", "loss")


def _repair_metrics(path: str, rounds_done: int) -> None:
    """--resume: drop the lines of rounds after the checkpoint and a torn last line (both
    written before a kill); refuse, in one line, a missing file, a damaged line before
    the last, or a file without the checkpoint's last round."""
    if not os.path.isfile(path):
        raise UsageError(f"--resume: {path} is missing, so the rounds before the checkpoint "
                         "cannot be reported; start a new run with another --out")
    with open(path) as f:
        texts = f.read().split("\n")
    while texts and not texts[-1].strip():
        texts.pop()
    keep = []
    for i, text in enumerate(texts):
        try:
            m = json.loads(text)
        except ValueError:
            if i == len(texts) - 1:                   # torn by a kill mid-write: dropped
                break
            raise UsageError(f"--resume: {path} line {i + 1} is damaged; start a new run with "
                             "another --out") from None
        if m.get("round", 0) <= rounds_done:
            keep.append(m)
    if rounds_done and not any(m.get("round") == rounds_done for m in keep):
        raise UsageError(f"--resume: {path} has no line of round {rounds_done}, the round of "
                         "the checkpoint; start a new run with another --out")
    atomic_write(path, "".join(jsonl_line(m) for m in keep))


def _last_round_lines(path: str) -> list:
    lines = _read_lines(path)
    r = max(m["round"] for m in lines)
    return [m for m in lines if m["round"] == r]


def results_table(summary: dict) -> str:
    rows = [f"{'client':<22}{'BA':>7}{'acc':>7}{'F1':>7}{'AUROC':>7}{'n':>7}"]
    for name, m in list(summary["clients"].items()) + list(summary.get("holdout", {}).items()):
        tag = " (holdout)" if name in summary.get("holdout", {}) else ""
        rows.append(f"{(name + tag)[:21]:<22}{m['balanced_accuracy']:>7.3f}{m['accuracy']:>7.3f}"
                    f"{m['macro_f1']:>7.3f}{m['macro_auroc']:>7.3f}{m['n']:>7}")
    rows.append(f"{'mean over clients':<22}{summary['balanced_accuracy']:>7.3f}"
                f"{summary['accuracy']:>7.3f}{summary['macro_f1']:>7.3f}{summary['macro_auroc']:>7.3f}")
    p = summary["pooled"]
    rows.append(f"{'pooled test set':<22}{summary['pooled_balanced_accuracy']:>7.3f}"
                f"{p['accuracy']:>7.3f}{p['macro_f1']:>7.3f}{p['macro_auroc']:>7.3f}")
    return "\n".join(rows)
