"""FedAL: federated active learning with the entropy of a local + global ensemble.

Z. Deng, Y. Yang, K. Suzuki, Federated Active Learning Framework for Efficient Annotation
Strategy in Skin-lesion Classification, Journal of Investigative Dermatology, 2024,
doi:10.1016/j.jid.2024.05.023, arXiv:2406.11310. (Conference version: Z. Deng, Y. Yang,
K. Jin, K. Suzuki, IEEE SMC 2022.) No public code. Specification sheet:
../shared/methods/fedal.md.

A protocol, not a training rule: it drives the one round loop with any registered base
method (--base-algo, FedAvg by default) and changes only WHICH of its images each client
holds labelled. Only the method figure and abstract of the paper are known, so the
schedule, the budget rule, the tie-break and the score variants below are the sheet's
reconstruction [ours]; config.json records them under `algorithm_info`.

    init   L_k = a random p0 share of client k's N_k training images, stream
           (seed, "fedal-init", k); U_k = the rest. U_k's labels are hidden: the training
           view of the labels (`HiddenLabels`) does not contain them (reading one
           raises, or reads -1 = "no label" under a base with its own local training,
           e.g. semi-supervised FedLSM), and only the `Oracle` (the simulated
           annotators) holds them and logs every query.
    cycle c = 0 .. A   (A = --al-cycles acquisitions, so T = (A + 1) R_c rounds)
      FL phase  R_c rounds (--al-rounds-per-cycle) of the base method on the L_k, with
                n_k = |L_k|, warm-started from the previous global model
                (--al-reinit: from the initialisation).
      AL phase  (c < A, at every client, locally, no message) with both models in eval mode
                p_loc  = softmax f_{theta_k}(x),  p_glob = softmax f_{theta_g}(x),  x in U_k
                H(p)   = - sum_c p_c log p_c                                        (S0)
                s(x)   = H((p_loc + p_glob) / 2)            entropy of the mean      (S1)
                s(x)   = (H(p_loc) + H(p_glob)) / 2         --al-score mean_entropy  (S2)
                s(x)   = (S1) - (S2)                        --al-score mi            (S3)
                S_k    = the b_k images of U_k with the highest s; ties -> lower index
                b_k    = min(|U_k|, n_k(c + 1) - |L_k|)                             (B1)
                n_k(c) = round((p0 + c beta) N_k),  beta = (B_total - p0) / A       (B2)
                y(S_k) <- oracle;  L_k <- L_k u S_k;  U_k <- U_k minus S_k
    After the last acquisition one more FL phase; its global model is the result.
(S1)-(S3) are (a)-(c) of the sheet's section 4; the paper's own equation numbers are not
known. theta_g at client k is the model the base method deploys there (`predict`: the
global weights with the client's private tensors under --bn local / params_only);
theta_k is the base method's working model right after the client's last local update
of the phase, before aggregation. Baseline acquisitions with the same schedule
(--acquisition): random; global-entropy H(p_glob); local-entropy H(p_loc);
least-confidence 1 - max p_bar; margin (smallest p_bar(1) - p_bar(2) first), with
p_bar = (p_loc + p_glob) / 2; ensemble-entropy (S1)-(S3) is FedAL.

How FedAL wraps the base method: by composition, through the core's contract for a
protocol (fedmed.Wrapper). `self.base` is an ordinary instance of the base class
(ALGORITHMS[--base-algo]) built on a view of the federation in which the labels of U are
masked, with the base's own hyperparameters (--base-args "mu=0.01"); the core delegates
every hook of the loop to it, and FedAL adds two things: the AL phase in `begin_round`,
and, in `local_update`, the scoring of U_k with theta_k right after the client's last
local update of a phase. The schedule's T rounds are FedAL's own copy of the settings
(self.cfg, which the loop runs); the caller's cfg is left as it was. Chosen over a dynamically built subclass because
the base keeps its own `args` and its own `fed` (the masked view), so nothing of the
protocol and of the method can collide, and a reader sees in one place which calls reach
the base. A base that replaces the participants (pooled) has no per-client local update
and is refused.

theta_k is not kept: its predicted probabilities on U_k (|U_k| x C floats, far fewer
than the weights) are stored in client.state["al_p_local"], with the phase they belong
to in client.state["al_p_phase"], after the client's last local update of the phase;
acquisition c uses them only if they are of phase c - 1, and the client's next local
update drops them. A client that no sampled round of the phase reached (--fraction < 1)
has no theta_k: it scores with theta_g alone.

Where each step runs: the scoring and the choice of S_k read only client k's images and
state, and run where the client is (`pick`, through Algorithm.at_clients: in process
here, on the client's node on Flower); the server keeps the bookkeeping (L_k, U_k, the
oracle's log, the class weights) and sends a client its L_k, U_k and the class weights
with every message (`note_of` / `set_note`), so a node trains on exactly the pools and
the revealed labels the server has. The oracle answers on the server from the labels
the federation was built with (on Flower every party reads the same label files).

Defaults (sheet, all [ours] except B_total = 50% [paper]): p0 = 10%, B_total = 50%,
A = 4 (beta = 10%), R_c = 10 (T = 50 rounds), entropy of the mean, warm start.

Deviations: the paper gives no algorithmic detail beyond the method figure, so every
setting above except B_total = 50% is a reconstruction [ours], not the paper's.
(1) b_k by (B1)-(B2) targets the cumulative fraction p0 + c beta, so |L_k| stays within
one image of it after every cycle (the sheet's b_k = round(beta N_k) each cycle drifts by
up to half an image per cycle); it equals round(beta N_k) +- 1. |L_k| >= 1 at the start.
(2) N_k = the client's labelled training images plus those of its `unlabeled` images
(--unlabeled-fraction) that have a ground truth for the simulated oracle; the initial
L_k is drawn from the labelled ones only. (3) The class weights alpha_c = N / N_c of the
recipe are recomputed each round from the labelled pools L_k (from the whole training
set they would leak U's label histogram). (4) The sheet's `--al-local-model local_only`
(a separately trained local model) is not implemented. (5) The schedule fixes the number
of rounds: T = (A + 1) R_c replaces --rounds (config.json records T, and --rounds as
given under algorithm_info.rounds_rule). It is derived rather than validated because
the command line cannot tell an explicit --rounds from a dataset recipe's default.
(6) Refused: multi-label data and --partition labelset (annotators who cannot label some
classes); a base method's own `recipe` of defaults is not applied under --algo fedal
(pass its settings as flags).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

import fedmed
from fedmed import (Algorithm, ClientState, Config, ServerState, UsageError, Wrapper,
                    class_weights, np_rng, register)

ACQUISITIONS = ("ensemble-entropy", "global-entropy", "local-entropy", "random",
                "least-confidence", "margin")
SCORES = ("entropy_of_mean", "mean_entropy", "mi")


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    base_algo: str = _f("fedavg", "fedal: the federated method trained in each FL phase")
    base_args: str = _f("", "fedal: hyperparameters of --base-algo as name=value[,name=value] "
                            "(e.g. mu=0.01 for fedprox)")
    al_initial: float = _f(0.1, "fedal: initial labelled fraction p0 of each client, in (0, 1]")
    al_budget: float = _f(0.5, "fedal: final labelled fraction B_total, in [p0, 1]")
    al_cycles: int = _f(4, "fedal: acquisitions A; beta = (B_total - p0) / A per cycle")
    al_rounds_per_cycle: int = _f(10, "fedal: rounds R_c per FL phase; the run has (A + 1) R_c "
                                      "rounds, which replaces --rounds")
    acquisition: str = _f("ensemble-entropy", "fedal: " + " | ".join(ACQUISITIONS))
    al_score: str = _f("entropy_of_mean", "fedal: ensemble-entropy score: entropy_of_mean "
                                          "(FedAL) | mean_entropy | mi")
    al_reinit: bool = _f(False, "fedal: restart from the initialisation after each acquisition")


# ---------------------------------------------------------------- scores and selection

def entropy(p: np.ndarray) -> np.ndarray:
    """H(p) = - sum_c p_c log p_c for each row, 0 log 0 = 0, in float64.        (S0)"""
    p = np.asarray(p, np.float64)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(1)


def acquisition_scores(acquisition: str, score: str, p_loc, p_glob,
                       gen: np.random.Generator | None = None) -> np.ndarray:
    """One score per image of U_k; the highest are acquired first."""
    if acquisition == "random":
        return gen.random(len(p_glob if p_glob is not None else p_loc))
    if acquisition == "global-entropy":
        return entropy(p_glob)
    if acquisition == "local-entropy":
        return entropy(p_loc)
    p_bar = (np.asarray(p_loc, np.float64) + np.asarray(p_glob, np.float64)) / 2
    if acquisition == "least-confidence":
        return 1 - p_bar.max(1)
    if acquisition == "margin":
        top2 = np.sort(p_bar, 1)[:, -2:]
        return -(top2[:, 1] - top2[:, 0])                 # smallest margin first
    h_mean = entropy(p_bar)                                                    # (S1)
    if score == "entropy_of_mean":
        return h_mean
    mean_h = (entropy(p_loc) + entropy(p_glob)) / 2                            # (S2)
    return mean_h if score == "mean_entropy" else h_mean - mean_h              # (S3)


def select_top(scores: np.ndarray, pool: np.ndarray, b: int) -> np.ndarray:
    """S_k: the b images of `pool` with the highest scores, ties to the lower index;
    returned sorted."""
    order = np.lexsort((pool, -np.asarray(scores, np.float64)))   # score desc, index asc
    return np.sort(pool[order[:b]])


# ---------------------------------------------------------------- label hygiene

class LabelLeak(RuntimeError):
    """A label of an unlabelled image was asked for outside the oracle."""


class HiddenLabels:
    """The training view of the labels: a copy of y in which every image of an
    unlabelled pool reads -1 (its label is not in this object at all), so a method trains
    only on what the oracle revealed. `strict`: indexing such an image raises LabelLeak
    (for a base method whose training draws its batches from L only, where any such read
    is a bug); not strict: it reads -1, the Federation's "no label" (for a base method
    with its own local training, e.g. a semi-supervised one that gathers images of U)."""

    def __init__(self, y: torch.Tensor, hidden: np.ndarray, strict: bool = True):
        self._y0, self._hidden0 = y.clone(), np.asarray(hidden, np.int64)
        self._y0[torch.as_tensor(self._hidden0)] = -1
        self.strict = self._strict = strict
        self.reset()

    def reset(self) -> None:
        """Back to the initial view (only the initial L and the test sets visible)."""
        self._y = self._y0.clone()
        self._hidden = torch.zeros(len(self._y0), dtype=torch.bool)
        self._hidden[torch.as_tensor(self._hidden0)] = True

    def reveal(self, idx: np.ndarray, labels: np.ndarray) -> None:
        idx = torch.as_tensor(np.asarray(idx, np.int64))
        self._y[idx] = torch.as_tensor(np.asarray(labels), dtype=self._y.dtype)
        self._hidden[idx] = False

    def hidden_at(self, idx: np.ndarray) -> np.ndarray:
        """Which of `idx` are hidden (a bool array)."""
        return self._hidden[torch.as_tensor(np.asarray(idx, np.int64))].numpy()

    def hidden_indices(self) -> np.ndarray:
        return torch.nonzero(self._hidden)[:, 0].numpy()

    def __getitem__(self, idx):
        if self._strict and self._hidden[idx].any():
            raise LabelLeak("a label of an unlabelled image was read outside the oracle")
        return self._y[idx]

    @contextlib.contextmanager
    def inference(self):
        """Predicting on U: the core's `batch` gathers labels with the images and
        `forward_probs` discards them, so inside this block hidden entries read -1
        (which carries nothing) instead of raising."""
        self._strict = False
        try:
            yield
        finally:
            self._strict = self.strict

    def __len__(self) -> int:
        return len(self._y)

    @property
    def ndim(self) -> int:
        return self._y.ndim

    def numpy(self) -> np.ndarray:
        """The view as an array; hidden labels read -1 ("no label")."""
        return self._y.numpy().copy()


class Oracle:
    """The simulated annotators: the only holder of the true labels of the unlabelled
    pools. `query` answers for images of a client's current U_k and logs the query;
    `log` lives in server.state (checkpointed)."""

    def __init__(self, y: torch.Tensor, pool: np.ndarray):
        self._idx = np.sort(np.asarray(pool, np.int64))
        self._y = y[torch.as_tensor(self._idx)].numpy().copy()
        self.log: list = []

    def lookup(self, idx: np.ndarray) -> np.ndarray:
        """The true labels of `idx` (images of the pools), without a query."""
        return self._y[np.searchsorted(self._idx, idx)]

    def query(self, cycle: int, client: ClientState, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, np.int64)
        if len(np.unique(idx)) != len(idx) or not np.isin(idx, client.unlabeled).all():
            raise LabelLeak(f"oracle: query for {client.name} outside its unlabelled pool")
        self.log.append({"cycle": cycle, "client": client.name, "indices": idx.copy()})
        return self.lookup(idx)

    def answered(self) -> tuple[np.ndarray, np.ndarray]:
        """(indices, labels) of every query already answered: replayed, not asked again."""
        if not self.log:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        idx = np.concatenate([e["indices"] for e in self.log])
        return idx, self.lookup(idx)

    @property
    def queries(self) -> int:
        return int(sum(len(e["indices"]) for e in self.log))


# ---------------------------------------------------------------- the protocol

def parse_base_args(Base, text: str):
    """--base-args "name=value,...": the base method's Args, typed by their defaults."""
    items = [s.strip() for s in (text or "").split(",") if s.strip()]
    if Base.Args is None:
        if items:
            raise UsageError(f"--base-args {text!r}: --base-algo {Base.name} has no "
                             "hyperparameters; drop --base-args")
        return None
    fields = {f.name: f for f in dataclasses.fields(Base.Args)}
    values = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if not sep or name not in fields:
            raise UsageError(f"--base-args: {item!r} is not name=value with a name of "
                             f"--base-algo {Base.name} ({', '.join(fields)})")
        default = fields[name].default
        kind = type(default) if default is not None else str
        try:
            values[name] = (value.strip().lower() in ("1", "true", "yes")) if kind is bool \
                else kind(value.strip())
        except ValueError:
            raise UsageError(f"--base-args: {name}={value!r} is not a {kind.__name__}") from None
    return Base.Args(**values)


@register("fedal")
class FedAL(Wrapper):
    Args = Args

    @staticmethod
    def crosses_sites_of(ns) -> str:
        """--al-reinit restarts every client's state from the server's begin_round, which
        a client's node would not see (a Flower run refuses it)."""
        if ns.al_reinit:
            return ("--al-reinit restarts every client's state, kept on its node, from the "
                    "server's begin_round")
        return ""

    def __init__(self, cfg: Config, args: Args, fed):
        a = args
        if not 0 < a.al_initial <= 1:
            raise UsageError(f"--al-initial must lie in (0, 1] (got {a.al_initial})")
        if not a.al_initial <= a.al_budget <= 1:
            raise UsageError(f"--al-budget {a.al_budget} must lie in [--al-initial "
                             f"{a.al_initial}, 1]: it is the final labelled fraction")
        if a.al_cycles < 0:
            raise UsageError(f"--al-cycles must be >= 0 (got {a.al_cycles})")
        if a.al_rounds_per_cycle < 1:
            raise UsageError(f"--al-rounds-per-cycle must be >= 1 (got {a.al_rounds_per_cycle})")
        if a.acquisition not in ACQUISITIONS:
            raise UsageError(f"--acquisition {a.acquisition!r} is unknown; choose one of "
                             + ", ".join(ACQUISITIONS))
        if a.al_score not in SCORES:
            raise UsageError(f"--al-score {a.al_score!r} is unknown; choose one of "
                             + ", ".join(SCORES))
        Base = fedmed.ALGORITHMS.get(a.base_algo)
        wrappable = sorted(n for n, c in fedmed.ALGORITHMS.items() if self._wrappable(c))
        if Base is None or not self._wrappable(Base):
            why = ("is unknown" if Base is None
                   else "cannot be wrapped (it has no per-client local update)")
            raise UsageError(f"--base-algo {a.base_algo!r} {why}; choose one of "
                             + ", ".join(wrappable))
        base_args = parse_base_args(Base, a.base_args)
        if fed.y.ndim != 1:
            raise UsageError("--algo fedal scores single-label predictions; this dataset is "
                             "multi-label: use another --dataset")
        if any(c.label_set is not None for c in fed.clients):
            raise UsageError("--algo fedal: --partition labelset hides classes that a client's "
                             "annotators cannot label; use another --partition")
        T = (a.al_cycles + 1) * a.al_rounds_per_cycle
        super().__init__(cfg, args, fed, rounds=T)    # the schedule fixes the rounds
        rounds_given, cfg = cfg.rounds, self.cfg
        self.R_c, self.A = a.al_rounds_per_cycle, a.al_cycles
        self.beta = (a.al_budget - a.al_initial) / self.A if self.A else 0.0

        # the initial split; the dataset's unlabelled images join U_k when the simulated
        # oracle has a ground truth for them (which images have one is bookkeeping)
        self.N, self.n0, splits, U_all, dropped = [], [], [], [], {}
        for k, c in enumerate(fed.clients):
            train = np.asarray(c.train, np.int64)
            extra = np.asarray(c.unlabeled, np.int64)
            has_truth = fed.y[torch.as_tensor(extra)].numpy() >= 0
            if (~has_truth).any():
                dropped[c.name] = int((~has_truth).sum())
            extra = extra[has_truth]
            N = len(train) + len(extra)
            if N == 0:                    # nothing to train on nor to acquire (training hangs)
                raise UsageError(f"client {c.name} has no image with a ground truth (labelled or "
                                 "for the oracle); use another --partition or fewer --clients")
            n0 = N if a.al_initial == 1 else max(1, int(round(a.al_initial * N)))
            if n0 > len(train):
                raise UsageError(f"--al-initial {a.al_initial} needs {n0} labelled images at "
                                 f"client {c.name} but it has {len(train)} (see "
                                 "--unlabeled-fraction); lower one of them")
            pick = np.zeros(len(train), bool)
            pick[np_rng(cfg.seed, "fedal-init", k).choice(len(train), n0, replace=False)] = True
            L, U = train[pick], np.sort(np.concatenate([train[~pick], extra]))
            self.N.append(N)
            self.n0.append(n0)
            splits.append((L, U))
            U_all.append(U)
        self.initial = splits
        pool = np.concatenate(U_all) if U_all else np.zeros(0, np.int64)
        self.oracle = Oracle(fed.y, pool)
        # strict unless the base replaces FedAvg's local training (see HiddenLabels)
        strict = Base.train is Algorithm.train and Base.local_update is Algorithm.local_update
        self.labels = HiddenLabels(fed.y, pool, strict)
        import datasets
        view_clients = [datasets.ClientSplit(c.name, L, c.test, U, c.label_set)
                        for c, (L, U) in zip(fed.clients, splits)]
        self.fed = dataclasses.replace(fed, y=self.labels, clients=view_clients)
        self.wrap(Base(cfg, base_args, self.fed))
        names = [c.name for c in fed.clients]
        self.info = {
            "protocol": "FedAL (Deng, Yang, Suzuki, JID 2024) has no public code: every "
                        "setting below except the 50% budget is a reconstruction [ours] "
                        "(../shared/methods/fedal.md)",
            "base_algo": a.base_algo,
            "base_args": dataclasses.asdict(base_args) if base_args is not None else {},
            "acquisitions": self.A, "beta": self.beta, "rounds_per_cycle": self.R_c,
            "rounds": T, "rounds_rule": "(al_cycles + 1) * al_rounds_per_cycle, replacing "
                                        f"--rounds ({rounds_given}) [ours]",
            "budget_rule": "|L_k| after c acquisitions = round((p0 + c beta) N_k), at least "
                           "1; b_k = min(|U_k|, that - |L_k|) [ours]",
            "local_model": "the client's weights after its last local update of the phase "
                           "(global model alone where it had none) [ours]",
            "warm_start": not a.al_reinit, "tie_break": "lower index [ours]",
            "unlabelled_label_reads": "raise" if strict else "read -1 (no label)",
            "class_weights": "recomputed from the labelled pools each round [ours]",
            "N_k": dict(zip(names, self.N)), "initial_labelled": dict(zip(names, self.n0)),
            "targets": {n: [self.target(k, c) for c in range(self.A + 1)]
                        for k, n in enumerate(names)},
        }
        if dropped:
            self.info["unlabelled_without_ground_truth"] = dropped

    @staticmethod
    def _wrappable(cls) -> bool:
        return (isinstance(cls, type) and issubclass(cls, Algorithm) and not issubclass(cls, Wrapper)
                and cls.participants is Algorithm.participants)

    @classmethod
    def default_image_size(cls, args):
        Base = fedmed.ALGORITHMS.get(args.base_algo)
        if Base is not None and hasattr(Base, "default_image_size"):
            return Base.default_image_size(parse_base_args(Base, args.base_args))
        return None

    # -- schedule -----------------------------------------------------------------------
    def target(self, k: int, c: int) -> int:
        """n_k(c): |L_k| after c acquisitions.                                   (B2)"""
        if c == 0 or self.A == 0:
            return self.n0[k]
        frac = self.args.al_initial + (self.args.al_budget - self.args.al_initial) * c / self.A
        return min(self.N[k], max(self.n0[k], int(round(frac * self.N[k]))))

    def acquisition_size(self, client: ClientState, c: int) -> int:
        """b_k of acquisition c (1..A): takes what is left when U_k is smaller.   (B1)"""
        return int(min(len(client.unlabeled), max(0, self.target(client.id, c) - len(client.train))))

    def _last_local_round(self, phase: int, k: int) -> int | None:
        """The last round of FL phase `phase` in which client k trains (the loop's sampler)."""
        rounds = [t for t in range(phase * self.R_c, (phase + 1) * self.R_c)
                  if k in fedmed.sample_clients(self.cfg.seed, t, len(self.clients), self.cfg.fraction)]
        return rounds[-1] if rounds else None

    # -- the loop's hooks ---------------------------------------------------------------
    def setup(self, server: ServerState, clients: list) -> None:
        for c, (L, U) in zip(clients, self.initial):
            c.train, c.unlabeled = L.copy(), U.copy()
        super().setup(server, clients)
        server.state["al"] = {"oracle_log": [], "acquisitions": []}

    def begin_round(self, server: ServerState, clients: list) -> None:
        """The AL phase at the start of rounds c R_c, c = 1..A; every round, the training
        view of the labels and the class weights are rebuilt from the oracle's log and the
        labelled pools (so they are right after --resume)."""
        self._sync_labels(server, clients)
        c, r = divmod(self.round, self.R_c)
        if r == 0 and 1 <= c <= self.A:
            self.acquire(server, clients, c)
            if self.args.al_reinit:
                self._reinit(server, clients)
        if self.cfg.class_weights == "inverse":        # alpha_c = N / N_c over the L_k
            y_L = self.labels[torch.as_tensor(np.concatenate([k.train for k in clients]))]
            self.base.alpha = class_weights(y_L.numpy(), self.fed.num_classes).to(self.base.device)
        super().begin_round(server, clients)

    def local_update(self, client, payload):
        client.state.pop("al_p_local", None)          # an earlier phase's: used, or never
        client.state.pop("al_p_phase", None)
        upload = self.base.local_update(client, payload)
        if self._needs_local_scores(client):
            # theta_k = the base method's model right after this update, before aggregation
            with self.labels.inference():
                p_loc = self.base.forward_probs(client.unlabeled)
            client.state["al_p_local"] = torch.from_numpy(p_loc)
            client.state["al_p_phase"] = self.round // self.R_c
        return upload

    def note_of(self, client: ClientState) -> dict:
        """What a client's node needs besides the payload: its pools L_k, U_k and the class
        weights of this round (alpha, recomputed in begin_round from every L_k)."""
        note = dict(super().note_of(client))
        note["al"] = {"train": np.asarray(client.train).tolist(),
                      "unlabeled": np.asarray(client.unlabeled).tolist()}
        if self.base.alpha is not None:                # --class-weights inverse
            note["al"]["alpha"] = self.base.alpha.cpu().tolist()
        return note

    def set_note(self, client: ClientState, note: dict) -> None:
        note = dict(note)
        al = note.pop("al", None)
        super().set_note(client, note)
        if al is None:
            return
        client.train = np.asarray(al["train"], np.int64)
        client.unlabeled = np.asarray(al["unlabeled"], np.int64)
        # the labels of L_k here (on the client's node: those of its acquired images, which
        # its annotators gave; on the server they are revealed already)
        new = client.train[self.labels.hidden_at(client.train)]
        if len(new):
            self.labels.reveal(new, self.oracle.lookup(new))
        if "alpha" in al:
            self.base.alpha = torch.tensor(al["alpha"], dtype=torch.float32).to(self.base.device)

    # -- the AL phase -------------------------------------------------------------------
    def _needs_local_scores(self, client: ClientState) -> bool:
        phase = self.round // self.R_c
        return (phase < self.A and self.args.acquisition not in ("random", "global-entropy")
                and self.acquisition_size(client, phase + 1) > 0
                and self.round == self._last_local_round(phase, client.id))

    def global_probs(self, server: ServerState, client: ClientState, idx: np.ndarray) -> np.ndarray:
        """p_glob: the base method's deployed model at `client` (eval mode)."""
        with self.labels.inference():
            out = self.base.predict(server, client, idx)
        return out[self.base.primary_view] if isinstance(out, dict) else out

    def scores(self, server: ServerState, client: ClientState, c: int) -> np.ndarray:
        """s(x) for every x in U_k at acquisition c (eval mode, no randomness except
        --acquisition random's own stream)."""
        kind = self.args.acquisition
        if kind == "random":
            return acquisition_scores(kind, None, None, client.unlabeled,
                                      np_rng(self.cfg.seed, "fedal-random", c, client.id))
        p_loc = client.state["al_p_local"].numpy() if self._has_local(client, c) else None
        p_glob = (self.global_probs(server, client, client.unlabeled)
                  if kind != "local-entropy" or p_loc is None else None)
        if p_loc is None:
            p_loc = p_glob                             # no local update this phase
        return acquisition_scores(kind, self.args.al_score, p_loc, p_glob)

    @staticmethod
    def _has_local(client: ClientState, c: int) -> bool:
        """Whether theta_k scored U_k for acquisition c (in its phase c - 1)."""
        return "al_p_local" in client.state and client.state.get("al_p_phase") == c - 1

    def pick(self, server: ServerState, client: ClientState, c: int) -> dict:
        """Acquisition c at `client`, where the client is (Algorithm.at_clients): S_k, the
        b_k images of U_k with the highest scores, and whether theta_k scored them. It
        reads the client's images and state and changes nothing."""
        b = self.acquisition_size(client, c)
        S = (select_top(self.scores(server, client, c), client.unlabeled, b) if b > 0
             else np.zeros(0, np.int64))
        return {"S": torch.from_numpy(np.asarray(S, np.int64)),
                "local_model": self._has_local(client, c)}

    def acquire(self, server: ServerState, clients: list, c: int) -> None:
        """Acquisition c: each client scores U_k and picks its top-b_k (`pick`, where the
        client is); the oracle answers for them and they move from U_k to L_k. Nothing of
        the method is sent (FedMed's byte counters)."""
        rec = {"cycle": c, "clients": {}}
        for client, got in zip(clients, self.at_clients(server, clients, "pick", c)):
            S = got["S"].numpy().astype(np.int64)
            b = self.acquisition_size(client, c)
            if len(S) != b:
                raise RuntimeError(f"fedal: client {client.name} picked {len(S)} images at "
                                   f"acquisition {c}, its budget b_k is {b}")
            y_S = np.zeros(0, np.int64)
            if b > 0:
                y_S = self.oracle.query(c, client, S)
                self.labels.reveal(S, y_S)
                client.train = np.sort(np.concatenate([client.train, S]))     # L <- L u S
                client.unlabeled = np.setdiff1d(client.unlabeled, S)           # U <- U \ S
            rec["clients"][client.name] = {
                "acquired": int(b), "local_model": bool(got["local_model"]),
                "classes": np.bincount(y_S, minlength=self.fed.num_classes).tolist()}
        rec["oracle_queries"] = self.oracle.queries
        server.state["al"]["acquisitions"].append(rec)

    def _sync_labels(self, server: ServerState, clients: list) -> None:
        al = server.state["al"]
        self.oracle.log = al["oracle_log"]
        self.labels.reset()
        self.labels.reveal(*self.oracle.answered())
        pools = np.sort(np.concatenate([c.unlabeled for c in clients]))
        if not np.array_equal(pools, self.labels.hidden_indices()):
            raise RuntimeError("fedal: the clients' unlabelled pools disagree with the oracle's "
                               "log (a corrupt checkpoint?)")

    def _reinit(self, server: ServerState, clients: list) -> None:
        """--al-reinit: the base method starts again from the initialisation; only the
        protocol's own state survives."""
        al = server.state["al"]
        server.state = {}
        for c in clients:
            c.state = {}
        self.base.setup(server, clients)
        server.state["al"] = al

    # -- records ------------------------------------------------------------------------
    def line_extra(self, server, client):
        if client.id < 0:
            return {}
        c, r = divmod(self.round, self.R_c)
        m = {"al_cycle": c, "labelled": int(len(client.train)),
             "unlabelled": int(len(client.unlabeled))}
        if r == 0 and 1 <= c <= self.A:               # the acquisition of this round
            rec = server.state["al"]["acquisitions"][c - 1]
            m.update(acquired=rec["clients"][client.name]["acquired"],
                     acquired_classes=rec["clients"][client.name]["classes"],
                     oracle_queries=rec["oracle_queries"])
        return m

    def summary_extra(self, server, lines):
        """al_curve: at the end of every FL phase, the labelled fraction and the metrics
        of the evaluated model; al_area: mean BA under the curve (trapezoids over the
        labelled fraction)."""
        view = lines[0]["view"]
        curve = []
        for c in range(self.A + 1):
            r = (c + 1) * self.R_c
            now = [m for m in lines if m["round"] == r and m["view"] == view and not m["holdout"]]
            per = [m for m in now if m["client"] != "pooled"]
            if not per:
                continue
            pooled = [m for m in now if m["client"] == "pooled"][0]
            labelled = sum(m["labelled"] for m in per)
            total = sum(m["labelled"] + m["unlabelled"] for m in per)
            acq = server.state["al"]["acquisitions"][c - 1] if c else None
            curve.append({
                "cycle": c, "round": r, "labelled": labelled, "label_fraction": labelled / total,
                "balanced_accuracy": float(np.nanmean([m["balanced_accuracy"] for m in per])),
                "pooled_balanced_accuracy": pooled["balanced_accuracy"],
                "macro_auroc": float(np.nanmean([m["macro_auroc"] for m in per])),
                "labelled_per_client": {m["client"]: m["labelled"] for m in per},
                "acquired_classes": ([int(sum(v)) for v in zip(*[x["classes"] for x in
                                                                 acq["clients"].values()])]
                                     if acq else None),
                "oracle_queries": acq["oracle_queries"] if acq else 0})
        out = {"al_curve": curve,
               "al": {"acquisition": self.args.acquisition, "score": self.args.al_score,
                      "base_algo": self.args.base_algo,
                      "oracle_queries": sum(len(e["indices"])
                                            for e in server.state["al"]["oracle_log"])}}
        if len(curve) > 1 and curve[-1]["label_fraction"] > curve[0]["label_fraction"]:
            f = np.array([p["label_fraction"] for p in curve])
            ba = np.array([p["balanced_accuracy"] for p in curve])
            out["al_area"] = float(((ba[1:] + ba[:-1]) / 2 * np.diff(f)).sum() / (f[-1] - f[0]))
        return out

    @staticmethod
    def summary_table(summary: dict) -> str:
        al = summary.get("al", {})
        rows = [f"label-efficiency curve ({al.get('acquisition')}, base {al.get('base_algo')}):",
                f"{'cycle':>5}{'round':>7}{'labelled':>10}{'fraction':>10}{'BA':>8}{'pooled BA':>11}"
                "  acquired per class"]
        for p in summary.get("al_curve", []):
            rows.append(f"{p['cycle']:>5}{p['round']:>7}{p['labelled']:>10}{p['label_fraction']:>10.3f}"
                        f"{p['balanced_accuracy']:>8.3f}{p['pooled_balanced_accuracy']:>11.3f}  "
                        f"{p['acquired_classes'] if p['acquired_classes'] else '-'}")
        if "al_area" in summary:
            rows.append(f"mean BA under the curve {summary['al_area']:.3f}; oracle queries "
                        f"{al.get('oracle_queries')}")
        return "\n".join(rows)
