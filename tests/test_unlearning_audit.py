"""The forgetting audit's measurements (unlearning_audit.py), against independent
computations: the sheet's membership-inference attack (../shared/methods/fcu.md,
section 8) on a model built to overfit and on one that saw neither set, the
loss-threshold AUROC (Yeom et al.), the test-set halves, and time to accuracy (issue #12)."""
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import unlearning_audit as ua


def test_output_features_are_loss_entropy_and_max_probability_by_hand():
    """Sheet section 8: (loss, entropy, max-probability), loss = -log max(p_y, 1e-12),
    entropy = -sum p log p with 0 log 0 = 0."""
    p = np.array([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [0.25, 0.25, 0.5], [1e-13, 0.5, 0.5],
                  [1 - 1e-13, 1e-13, 0.0]])
    y = np.array([1, 1, 2, 0, 0])
    got = ua.output_features(p, y)
    want = [[-np.log(0.2), -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1)), 0.7],
            [0.0, 0.0, 1.0],
            [-np.log(0.5), -(0.5 * np.log(0.25) + 0.5 * np.log(0.5)), 0.5],
            [-np.log(1e-12), -(1e-13 * np.log(1e-12) + np.log(0.5)), 0.5],
            [-np.log(1 - 1e-13), -((1 - 1e-13) * np.log(1 - 1e-13) + 1e-13 * np.log(1e-12)),
             1 - 1e-13]]           # entropy ~3e-12: p below 1e-12 enters as p log 1e-12
    assert got == pytest.approx(np.array(want), rel=1e-12, abs=1e-15)


def memoriser(x, y, steps=400, seed=0):
    """An MLP trained to fit (x, y) exactly: labels are random, so what it learns is
    the member set itself, not a rule."""
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(),
                            torch.nn.Linear(256, 4))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m


def outputs(m, x, y):
    with torch.no_grad():
        return ua.output_features(m(x).softmax(1).double().numpy(), y.numpy())


@pytest.fixture(scope="module")
def sets():
    """Five disjoint sets of 200 points from one distribution, random labels of 4 classes:
    shadow members / non-members, target members / non-members, and another model's."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 20, generator=g)
    y = torch.randint(0, 4, (1000,), generator=g)
    return [(x[i:i + 200], y[i:i + 200]) for i in range(0, 1000, 200)]


def test_the_attack_separates_a_model_that_memorised_its_members(sets):
    """Sheet section 8 steps 2-4: fit on a shadow model's members and non-members, the
    attack calls most of an overfit target's members members and few of its
    non-members, AUROC near 1; against a model trained on neither set, both sets look
    alike (AUROC 0.5 +- 0.1 with 200 + 200 points, sheet test 11.7) and few are called
    members."""
    (xs, ys), (xn, yn), (xm, ym), (xo, yo), (xe, ye) = sets
    shadow, target, neither = memoriser(xs, ys, seed=0), memoriser(xm, ym, seed=1), \
        memoriser(xe, ye, seed=2)
    attack = ua.MembershipAttack(outputs(shadow, xs, ys), outputs(shadow, xn, yn))
    mem, non = outputs(target, xm, ym), outputs(target, xo, yo)
    assert attack.auroc(mem, non) > 0.95
    assert attack.member_rate(mem) > 0.9 and attack.member_rate(non) < 0.3
    mem, non = outputs(neither, xm, ym), outputs(neither, xo, yo)
    assert abs(attack.auroc(mem, non) - 0.5) < 0.1
    assert attack.member_rate(mem) < 0.3 and attack.member_rate(non) < 0.3


def test_the_attack_is_a_balanced_logistic_regression_on_standardised_features():
    """The decision value is the logistic regression's (class_weight balanced, C = 1) on
    features standardised with the training rows' mean and population sd; the member
    rate is the share with a positive decision; the AUROC is scikit-learn's of that
    score. A 9:1 imbalance of members shows the class weighting."""
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(0)
    mem = rng.normal([0.2, 0.5, 0.9], [0.1, 0.2, 0.05], (900, 3))
    non = rng.normal([1.0, 1.0, 0.6], [0.5, 0.3, 0.2], (100, 3))
    attack = ua.MembershipAttack(mem, non)
    x = np.concatenate([mem, non])
    mu, sd = x.mean(0), x.std(0)
    lr = LogisticRegression(class_weight="balanced").fit(
        (x - mu) / sd, np.r_[np.ones(900), np.zeros(100)])
    probe = rng.normal(0.6, 0.4, (50, 3))
    want = lr.decision_function((probe - mu) / sd)
    assert attack.score(probe) == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert attack.member_rate(probe) == (want > 0).mean()
    attack.score = lambda f: np.array([0.0, 1.0, -1.0, 2.0])    # a tie is not a member
    assert attack.member_rate(probe[:4]) == 0.5
    del attack.score
    assert 0 < attack.member_rate(probe) < 1
    a, b = probe[:20], probe[20:]
    assert attack.auroc(a, b) == pytest.approx(
        roc_auc_score(np.r_[np.ones(20), np.zeros(30)], np.r_[want[:20], want[20:]]))
    unweighted = LogisticRegression().fit((x - mu) / sd, np.r_[np.ones(900), np.zeros(100)])
    assert not np.allclose(unweighted.decision_function((probe - mu) / sd), want)


def test_loss_threshold_auroc():
    """Yeom et al.: score = -loss; AUROC of members against non-members, ties one half."""
    rng = np.random.default_rng(0)
    same = [ua.loss_threshold_auroc(rng.exponential(1, 2000), rng.exponential(1, 2000))
            for _ in range(5)]
    assert abs(np.mean(same) - 0.5) < 0.02
    assert ua.loss_threshold_auroc(rng.uniform(0, 0.1, 300), rng.uniform(1, 2, 300)) == 1.0
    assert ua.loss_threshold_auroc(rng.uniform(1, 2, 300), rng.uniform(0, 0.1, 300)) == 0.0
    m, nm = np.array([0.0, 1.0, 1.0]), np.array([1.0, 2.0])
    # pairs (member beats non-member): 0<1 yes, 0<2 yes, 1=1 half, 1<2 yes, twice -> 5/6
    assert ua.loss_threshold_auroc(m, nm) == pytest.approx(5 / 6)


def test_test_halves_are_a_seeded_partition():
    """Two halves (n // 2 and the rest) of a permutation drawn from (seed, "mia-split")."""
    import fedmed
    a, b = ua.split_test_set(11, seed=3)
    perm = fedmed.np_rng(3, "mia-split").permutation(11)
    assert a.tolist() == sorted(perm[:5].tolist()) and b.tolist() == sorted(perm[5:].tolist())


def write_metrics(path, rows):
    """rows: (round, [(client, cumulative grad_samples)], pooled BA)."""
    with open(path / "metrics.jsonl", "w") as f:
        for r, clients, ba in rows:
            for name, g in clients:
                f.write(json.dumps({"round": r, "client": name, "view": "global",
                                    "holdout": False, "grad_samples": g,
                                    "balanced_accuracy": 0.0}) + "\n")
            f.write(json.dumps({"round": r, "client": "pooled", "view": "global",
                                "holdout": False, "balanced_accuracy": ba}) + "\n")


def test_accuracy_curve_and_time_to_accuracy(tmp_path):
    """Per round: the clients' cumulative sample gradients summed, the pooled BA; the
    first round at or above the target gives retraining's cost; never reached: no ratio,
    a lower bound instead."""
    write_metrics(tmp_path, [(1, [("a", 10), ("b", 6)], 0.4), (2, [("a", 20), ("b", 12)], 0.6),
                             (3, [("a", 30), ("b", 18)], 0.55), (4, [("a", 40), ("b", 24)], 0.7)])
    curve = ua.accuracy_curve(str(tmp_path))
    assert curve == [(1, 16, 0.4), (2, 32, 0.6), (3, 48, 0.55), (4, 64, 0.7)]
    t = ua.time_to_accuracy(curve, 0.55, 8)
    assert (t["reached"], t["retrain_round"], t["retrain_grad_samples"], t["ratio"]) == \
        (True, 2, 32, 4.0)
    t = ua.time_to_accuracy(curve, 0.6, 8)                 # reaching it exactly counts
    assert t["retrain_round"] == 2
    t = ua.time_to_accuracy(curve, 0.71, 8)
    assert (t["reached"], t["retrain_round"], t["ratio"], t["ratio_above"]) == \
        (False, None, None, 8.0)
    assert t["retrain_rounds"] == 4 and t["method_grad_samples"] == 8
    assert t["target_test_balanced_accuracy"] == 0.71
    assert ua.time_to_accuracy(curve, 0.55, 1)["ratio"] == 32.0          # one sample gradient
    assert ua.time_to_accuracy(curve, 0.71, 1)["ratio_above"] == 64.0


def test_the_curve_is_the_first_views(tmp_path):
    """A run with two views (e.g. personal and global models): the curve follows the
    first line's view, the primary one."""
    lines = []
    for r, (ba1, ba2) in enumerate([(0.3, 0.9), (0.5, 0.1)], 1):
        for view, ba in (("global", ba1), ("personal", ba2)):
            lines.append({"round": r, "client": "a", "view": view, "holdout": False,
                          "grad_samples": 10 * r, "balanced_accuracy": 0.0})
            lines.append({"round": r, "client": "pooled", "view": view, "holdout": False,
                          "balanced_accuracy": ba})
    lines.insert(1, lines.pop(2))                      # line 1 is of the other view
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    assert ua.accuracy_curve(str(tmp_path)) == [(1, 10, 0.3), (2, 20, 0.5)]


def test_a_curve_without_sample_counts_is_none(tmp_path):
    write_metrics(tmp_path, [(1, [("a", 10)], 0.4)])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    del first["grad_samples"]
    (tmp_path / "metrics.jsonl").write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    assert ua.accuracy_curve(str(tmp_path)) is None


def test_the_audit_joins_each_clients_outputs_in_the_order_of_its_index_sets():
    """Audit.gather: one `audit_outputs` step per client (where the client is), joined
    as self.test (every client's test images, in client order), D_f (u's training
    images), D_r (the others' training images) and u's test images; the backdoor share
    is the hits over the images tried, summed over the clients."""
    import fedmed

    class Stub:
        hits, tried = (0, 1, 0), (0, 1, 0)

        def __init__(self):
            self.clients = [fedmed.ClientState(k, f"s{k}", np.arange(2 * k, 2 * k + 2),
                                               np.arange(10 + k, 11 + k)) for k in range(3)]

        def at_clients(self, server, clients, step, weights):
            assert step == "audit_outputs" and clients == self.clients and weights == {"w": 1}
            return [{"train": torch.full((2, 2), float(c.id)),
                     "test": torch.full((1, 2), 10.0 + c.id),
                     "hits": self.hits[c.id], "tried": self.tried[c.id]} for c in clients]
    algo = Stub()
    a = ua.Audit(algo, 1, target=0, patch=0.1, seed=0)
    got = a.gather({"w": 1})
    assert got["test"][:, 0].tolist() == [10.0, 11.0, 12.0]
    assert got["forgotten"][:, 0].tolist() == [1.0, 1.0]
    assert got["forgotten_test"][:, 0].tolist() == [11.0]
    assert got["remaining"][:, 0].tolist() == [0.0, 0.0, 2.0, 2.0]
    assert a.remaining.tolist() == [0, 1, 4, 5] and a.test.tolist() == [10, 11, 12]
    assert got["backdoor"] == 1.0                # 1 hit of the 1 image tried (at s1)
    algo.hits, algo.tried = (1, 0, 0), (2, 2, 0)
    assert a.gather({"w": 1})["backdoor"] == 0.25
    b = ua.Audit(algo, 1, target=None, patch=0.1, seed=0)
    assert b.gather({"w": 1})["backdoor"] is None
