"""The forgetting audit of federated unlearning, for any method that forgets a client.

`Audit(algo, u, ...)` measures any model of a federation run by `algo` (a fedmed
Algorithm: its `load_model`, `forward_probs`, `batch` and `model`) for the forgetting of
client u, the same way for every method (the original, retrained and unlearned models
alike): balanced accuracy, accuracy and AUROC on the global test set (every client's test
images), on D_f (u's training images, clean) and on D_r (the others' training images);
error = 1 - accuracy on D_f (sheet section 8); the membership attacks below; and with a
backdoor target, the attack success rate: the share of test images of the other classes
that the model assigns to the target once the trigger is stamped on them.

Backdoor trigger [ours; the sheet notes the paper's poisoning script is not public]: a
black-and-white checkerboard of side ceil(share x image side), 1 at the corner pixel,
stamped in the bottom-right corner of the normalised image.

What a forgotten client's data may still reveal, measured on the unlearned model's outputs
(specification sheet ../shared/methods/fcu.md, section 8; the measurements are [ours]
there, not the paper's):

Membership inference, the sheet's attack (section 8; Yeom et al., Privacy Risk in Machine
Learning: Analyzing the Connection to Overfitting, CSF 2018, for the loss signal):
  1. each image gives the features (loss, entropy, max-probability) of the model's
     predicted distribution p: loss = -log max(p_y, 1e-12), entropy = -sum_c p_c log p_c,
     max-probability = max_c p_c;
  2. a logistic regression on the standardised features is fit on a SHADOW model's
     outputs: members = the images it trained on (the retrained model's D_r), non-members
     = one half of the test set; classes weighted to balance (D_r is much larger);
  3. it is applied to D_f under each model: the member rate is the share of D_f it calls
     members (decision value > 0), the attack AUROC separates D_f from the other, held-out
     half of the test set (0.5: no better than chance).
  A second, simpler figure: the loss-threshold AUROC (score = -loss) of D_f against the
  forgotten client's own test images.

Cost as time to accuracy (issue #12): the sample gradients retraining needed to first
reach a method's final test balanced accuracy (its per-round pooled test BA curve), over
the sample gradients the method spent. A ratio of two fixed schedules restates the
schedules; this one asks how long retraining really takes to get as good.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import fedmed
from fedmed import (IMAGENET_MEAN, IMAGENET_STD, classification_metrics, load_checkpoint,
                    np_rng)


# ---------------------------------------------------------------- membership inference

def output_features(prob: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[n, 3]: (loss, entropy, max-probability) of each row of prob [n, C] with label y."""
    p = np.asarray(prob, np.float64)
    y = np.asarray(y, np.int64)
    loss = -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(1)        # 0 log 0 = 0
    return np.stack([loss, entropy, p.max(1)], 1)


class MembershipAttack:
    """The sheet's attack (section 8): a class-balanced logistic regression on the
    standardised (loss, entropy, max-probability) of a shadow model's members (label 1)
    and non-members (label 0)."""

    def __init__(self, members: np.ndarray, nonmembers: np.ndarray):
        x = np.concatenate([members, nonmembers])
        t = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
        self.model = make_pipeline(StandardScaler(),
                                   LogisticRegression(class_weight="balanced"))
        self.model.fit(x, t)

    def score(self, feats: np.ndarray) -> np.ndarray:
        """The decision value (log-odds of membership) of each row."""
        return self.model.decision_function(feats)

    def member_rate(self, feats: np.ndarray) -> float:
        """Share of the rows the attack calls members."""
        return float((self.score(feats) > 0).mean())

    def auroc(self, members: np.ndarray, nonmembers: np.ndarray) -> float:
        """AUROC of the attack's score, members against non-members."""
        t = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
        return float(roc_auc_score(t, self.score(np.concatenate([members, nonmembers]))))


def loss_threshold_auroc(member_loss: np.ndarray, nonmember_loss: np.ndarray) -> float:
    """Loss-threshold membership inference (Yeom et al. 2018): score = -loss; AUROC of
    members against non-members (0.5: the model does not tell them apart)."""
    t = np.r_[np.ones(len(member_loss)), np.zeros(len(nonmember_loss))]
    return float(roc_auc_score(t, -np.concatenate([member_loss, nonmember_loss])))


def split_test_set(n: int, seed: int) -> tuple:
    """Positions 0..n-1 of the test set in two halves drawn from the stream (seed,
    "mia-split"): (the shadow attack's non-members, the held-out non-members)."""
    perm = np_rng(seed, "mia-split").permutation(n)
    return np.sort(perm[:n // 2]), np.sort(perm[n // 2:])


# ---------------------------------------------------------------- cost

def accuracy_curve(folder: str) -> list | None:
    """[(round, cumulative sample gradients, pooled test BA)] of a run folder whose
    metrics.jsonl client lines carry the client's cumulative `grad_samples` (None when
    they do not: a run from before they were recorded)."""
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        lines = [json.loads(s) for s in f if s.strip()]
    view = lines[0]["view"]
    if any("grad_samples" not in m for m in lines if m["client"] != "pooled"):
        return None
    curve = []
    for r in sorted({m["round"] for m in lines}):
        at = [m for m in lines if m["round"] == r and m["view"] == view]
        grads = sum(m["grad_samples"] for m in at if m["client"] != "pooled" and not m["holdout"])
        ba = [m["balanced_accuracy"] for m in at if m["client"] == "pooled"][0]
        curve.append((r, int(grads), float(ba)))
    return curve


def time_to_accuracy(curve: list, target: float, spent: int) -> dict:
    """The first round of `curve` (retraining's) whose test BA reaches `target` (the
    method's final test BA), the sample gradients retraining had spent by then, and their
    ratio to the method's `spent`. Never reached: round and ratio None, and
    `ratio_above` = retraining's whole spend / the method's (the ratio exceeds it)."""
    hit = next(((r, g) for r, g, ba in curve if ba >= target), None)
    out = {"target_test_balanced_accuracy": float(target), "method_grad_samples": int(spent),
           "retrain_rounds": len(curve), "reached": hit is not None,
           "retrain_round": None, "retrain_grad_samples": None, "ratio": None}
    if hit is None:
        out["ratio_above"] = curve[-1][1] / max(spent, 1) if curve else None
    else:
        out.update(retrain_round=hit[0], retrain_grad_samples=hit[1],
                   ratio=hit[1] / max(spent, 1))
    return out


def time_to_accuracy_text(t: dict) -> str:
    if t["reached"]:
        return (f"retraining first reaches test BA {t['target_test_balanced_accuracy']:.3f} in "
                f"round {t['retrain_round']} after {t['retrain_grad_samples']:,} sample "
                f"gradients = {t['ratio']:.2f}x the method's {t['method_grad_samples']:,}")
    return (f"retraining never reaches test BA {t['target_test_balanced_accuracy']:.3f} in "
            f"{t['retrain_rounds']} rounds (ratio above {t['ratio_above']:.2f}x the method's "
            f"{t['method_grad_samples']:,} sample gradients)")


# ---------------------------------------------------------------- the backdoor trigger

def trigger(size: int, share: float) -> tuple:
    """(side s, [s, s] pattern of 0/1): a checkerboard, 1 at the corner pixel."""
    s = max(1, math.ceil(share * size))
    ij = torch.arange(s)
    return s, ((ij.view(-1, 1) + ij.view(1, -1)) % 2 == 0).float()


def stamp(x: torch.Tensor, share: float) -> torch.Tensor:
    """x (normalised images [B, 3, H, W]) with the trigger in the bottom-right corner."""
    s, pattern = trigger(x.shape[-1], share)
    x = x.clone()
    patch = (pattern.view(1, 1, s, s) - IMAGENET_MEAN) / IMAGENET_STD
    x[:, :, -s:, -s:] = patch.to(x.device, x.dtype)
    return x


# ---------------------------------------------------------------- the audit

class Audit:
    """The audit of models of the federation `algo` runs, for the forgetting of client
    index `u`; `target` the backdoor's target class (None: no backdoor), `patch` its
    trigger's share of the image side; `seed` draws the test halves of the attack."""

    def __init__(self, algo, u: int, target: int | None, patch: float, seed: int):
        self.algo, self.target, self.patch = algo, target, patch
        self.forgotten = algo.clients[u]
        self.test = np.concatenate([c.test for c in algo.clients])
        self.remaining = np.concatenate([c.train for c in algo.clients if c.id != u])
        self.halves = split_test_set(len(self.test), seed)
        self.attack = None

    def fit_attack(self, shadow: dict | None) -> None:
        """Fit the membership attack on the outputs of the shadow model `shadow` (the
        retrained model's weights): D_r members, the first test half non-members. None:
        each audited model is its own shadow."""
        self.attack = None if shadow is None else self.shadow_attack(shadow)

    def probs(self, weights: dict, idx: np.ndarray) -> np.ndarray:
        self.algo.load_model(weights, {})
        return self.algo.forward_probs(idx)

    @torch.no_grad()
    def outputs(self, client, weights: dict) -> dict:
        """What the audit reads of one client's images, where the client is (the method's
        `audit_outputs` step, through Algorithm.at_clients): the model `weights`'
        probabilities on its training and its test images, and with a backdoor how many
        of its test images of other classes than the target the stamped trigger sends to
        the target (`hits` of `tried`)."""
        out = {"train": torch.from_numpy(self.probs(weights, client.train)),
               "test": torch.from_numpy(self.probs(weights, client.test))}
        if self.target is not None:
            out["hits"], out["tried"] = self.attack_success(client.test)
        return out

    def gather(self, weights: dict) -> dict:
        """Every client's `outputs`, joined in the order of self.test and self.remaining:
        {"test", "forgotten", "remaining", "forgotten_test": probabilities, "backdoor":
        share of hits or None}."""
        algo = self.algo
        got = algo.at_clients(fedmed.ServerState(), algo.clients, "audit_outputs", weights)
        u = self.forgotten.id
        out = {"test": np.concatenate([g["test"].numpy() for g in got]),
               "forgotten": got[u]["train"].numpy(), "forgotten_test": got[u]["test"].numpy(),
               "remaining": np.concatenate([g["train"].numpy() for c, g in
                                            zip(algo.clients, got) if c.id != u]),
               "backdoor": None}
        if self.target is not None:
            out["backdoor"] = (sum(int(g["hits"]) for g in got)
                               / max(sum(int(g["tried"]) for g in got), 1))
        return out

    def shadow_attack(self, weights: dict, got: dict | None = None) -> MembershipAttack:
        y = self.algo.fed.y.numpy()
        got = got or self.gather(weights)
        half = self.halves[0]
        return MembershipAttack(output_features(got["remaining"], y[self.remaining]),
                                output_features(got["test"][half], y[self.test[half]]))

    def model(self, weights: dict) -> dict:
        """The audit of one model (any method's result)."""
        got = self.gather(weights)
        attack = self.attack or self.shadow_attack(weights, got)
        y = self.algo.fed.y.numpy()
        u, test, rest = self.forgotten, self.test, self.remaining
        p_test, p_f, p_r, p_uh = (got[k] for k in ("test", "forgotten", "remaining",
                                                   "forgotten_test"))
        mt = classification_metrics(y[test], p_test)
        mf = classification_metrics(y[u.train], p_f)
        mr = classification_metrics(y[rest], p_r)
        feats_f = output_features(p_f, y[u.train])
        held = self.halves[1]
        feats_h = output_features(p_test[held], y[test[held]])
        out = {"test_balanced_accuracy": mt["balanced_accuracy"], "test_auroc": mt["macro_auroc"],
               "test_accuracy": mt["accuracy"],
               "forgotten_accuracy": mf["accuracy"], "forgotten_error": 1 - mf["accuracy"],
               "forgotten_balanced_accuracy": mf["balanced_accuracy"],
               "forgotten_auroc": mf["macro_auroc"],
               "remaining_balanced_accuracy": mr["balanced_accuracy"],
               "remaining_accuracy": mr["accuracy"], "remaining_auroc": mr["macro_auroc"],
               "mia_member_rate": attack.member_rate(feats_f),
               "mia_attack_auroc": attack.auroc(feats_f, feats_h),
               "mia_loss_auroc": loss_threshold_auroc(
                   feats_f[:, 0], output_features(p_uh, y[u.test])[:, 0])}
        if self.target is not None:
            out["backdoor_success"] = got["backdoor"]
        return out

    @torch.no_grad()
    def attack_success(self, idx: np.ndarray) -> tuple:
        """(hits, tried): of the images of `idx` not of the target class, how many the
        loaded model (in eval mode) assigns to the target class once the trigger is
        stamped on them."""
        algo = self.algo
        idx = idx[algo.fed.y.numpy()[idx] != self.target]
        algo.model.eval()
        hits, B = 0, algo.cfg.eval_batch_size
        for s in range(0, len(idx), B):
            x, _ = algo.batch(torch.as_tensor(idx[s:s + B]))
            hits += int((algo.model(stamp(x, self.patch)).argmax(1) == self.target).sum())
        return hits, len(idx)

    def run(self, folder: str) -> dict:
        """The audit of a run's final model, and of its theta_u (`before_post_training`)
        when the run kept one (the model as uploaded, before post-training)."""
        ck = load_checkpoint(os.path.join(folder, "checkpoint.pt"), "the unlearning audit")
        out = self.model(ck["server"]["weights"])
        if "theta_u" in ck["server"]["state"]:
            out["before_post_training"] = self.model(ck["server"]["state"]["theta_u"])
        return out


# ---------------------------------------------------------------- the table

def audit_row(name: str, a: dict) -> str:
    bd = f"{a['backdoor_success']:>9.3f}" if "backdoor_success" in a else f"{'-':>9}"
    return (f"{name:<10}{a['test_balanced_accuracy']:>8.3f}{a['test_auroc']:>7.3f}"
            f"{a['forgotten_accuracy']:>8.3f}{a['remaining_balanced_accuracy']:>8.3f}"
            f"{a['mia_member_rate']:>8.3f}{a['mia_attack_auroc']:>8.3f}"
            f"{a['mia_loss_auroc']:>9.3f}{bd}")


def table(summary: dict) -> list:
    """The audit table of a protocol's summary (`audit`: method -> its audit and cost),
    then what the MIA columns are and each method's time to accuracy."""
    rows = [f"forgetting client {summary['forget_client']}"
            + (f" (backdoor target {summary['backdoor_target']})"
               if summary.get("backdoor_target") else ""),
            f"{'method':<10}{'test BA':>8}{'AUROC':>7}{'D_f acc':>8}{'D_r BA':>8}"
            f"{'MIA mem':>8}{'MIA AUC':>8}{'loss AUC':>9}{'backdoor':>9}"
            f"{'sample grads':>14}{'train s':>9}"]
    for m, a in summary["audit"].items():
        rows.append(audit_row(m, a) + f"{a['grad_samples']:>14,}{a['train_seconds']:>9.1f}")
        if "before_post_training" in a:
            rows.append(audit_row(" theta_u", a["before_post_training"]))
    rows.append(f"MIA: attack fit on the {summary.get('mia_shadow', 'self')} model's outputs "
                "(D_r members, half the test set non-members); member rate on D_f, AUROC "
                "D_f vs the other test half; loss AUC: -loss, D_f vs u's test images")
    for m, t in summary.get("time_to_accuracy", {}).items():
        rows.append(f"time to accuracy, {m}: " + time_to_accuracy_text(t))
    return rows
