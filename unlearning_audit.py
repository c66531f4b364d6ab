"""The forgetting audit of federated unlearning, for any method that forgets a client.

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
import os

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fedmed import np_rng


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
