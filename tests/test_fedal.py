"""FedAL (algorithms/fedal.py): every item of section 11 of ../shared/methods/fedal.md,
each checked against an independent computation, plus resume and bad input."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

import datasets
import fedmed
import run
from fedmed import Config, ServerState, transmit
from helpers import drop_seconds, one_line_error, read_json, read_jsonl

import algorithms  # noqa: E402 - the methods register themselves

algorithms.load_all()
from algorithms.fedal import (FedAL, LabelLeak, acquisition_scores, entropy,  # noqa: E402
                              select_top)

SMALL = {"al_initial": 0.2, "al_budget": 0.6, "al_cycles": 2, "al_rounds_per_cycle": 1}


@pytest.fixture(scope="module")
def fed():
    return datasets.make_synthetic(seed=3, clients=3, image_size=16)


def make_fedal(fed, cfg_kw=None, **kw):
    cfg = Config(**{"algo": "fedal", "model": "cnn", "batch_size": 16, "local_steps": 2,
                    **(cfg_kw or {})})
    algo = FedAL(cfg, FedAL.Args(**{**SMALL, **kw}), fed)
    clients = fedmed.make_clients(fed)
    server = ServerState()
    algo.setup(server, clients)
    return algo, server, clients


def train_round(algo, server, clients, t):
    """Round t through the hooks in the loop's order (all clients take part)."""
    algo.set_round(t)
    algo.begin_round(server, clients)
    uploads = {}
    for c in algo.participants(server, clients):
        payload, _ = transmit(algo.broadcast(server, c))
        uploads[c.id], _ = transmit(algo.local_update(c, payload))
    algo.aggregate(server, uploads)
    return uploads


def cli(tmp_path, *flags, name="out", algo="fedal"):
    out = str(tmp_path / name)
    base = ["--algo", algo, "--image-size", "16", "--clients", "3", "--local-steps", "2",
            "--batch-size", "16", "--quiet", "--out", out]
    if algo == "fedal":
        base += ["--al-initial", "0.2", "--al-budget", "0.6", "--al-cycles", "2",
                 "--al-rounds-per-cycle", "1"]
    return run.main(base + list(flags)), out


def ckpt(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One CLI run of the small schedule (p0 = 0.2 -> 0.6 in 2 acquisitions, R_c = 1)."""
    rc, out = cli(tmp_path_factory.mktemp("fedal"))
    assert rc == 0
    return out


# ---------------------------------------------------------------- 11.1 scores

def hand_entropy(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_scores_equal_their_formulas():
    gen = np.random.default_rng(0)
    p = gen.dirichlet(np.ones(5), size=4)
    q = gen.dirichlet(np.ones(5), size=4)
    for score in ("entropy_of_mean", "mean_entropy", "mi"):   # p_loc = p_glob = p
        s = acquisition_scores("ensemble-entropy", score, p, p)
        want = [hand_entropy(r) for r in p] if score != "mi" else [0.0] * 4
        assert np.allclose(s, want, atol=1e-12)
    a = acquisition_scores("ensemble-entropy", "entropy_of_mean", p, q)
    b = acquisition_scores("ensemble-entropy", "mean_entropy", p, q)
    mi = acquisition_scores("ensemble-entropy", "mi", p, q)
    for i in range(4):
        assert a[i] == pytest.approx(hand_entropy([(x + y) / 2 for x, y in zip(p[i], q[i])]))
        assert b[i] == pytest.approx((hand_entropy(p[i]) + hand_entropy(q[i])) / 2)
        assert mi[i] == pytest.approx(a[i] - b[i]) and mi[i] >= 0      # Jensen
    one, two = np.eye(3)[[0]], np.eye(3)[[1]]                           # opposite one-hots
    ens = lambda score, p, q: acquisition_scores("ensemble-entropy", score, p, q)[0]  # noqa: E731
    assert ens("entropy_of_mean", one, two) == pytest.approx(math.log(2))
    assert ens("mean_entropy", one, two) == 0.0
    assert ens("mi", one, two) == pytest.approx(math.log(2))
    for C in (2, 6, 8):                                                 # uniform: log C
        u = np.full((1, C), 1 / C)
        assert ens("entropy_of_mean", u, u) == pytest.approx(math.log(C))
    assert np.allclose(acquisition_scores("global-entropy", None, p, q), [hand_entropy(r) for r in q])
    assert np.allclose(acquisition_scores("local-entropy", None, p, q), [hand_entropy(r) for r in p])
    pbar = (p + q) / 2
    assert np.allclose(acquisition_scores("least-confidence", None, p, q), 1 - pbar.max(1))
    srt = np.sort(pbar, 1)
    assert np.allclose(acquisition_scores("margin", None, p, q), srt[:, -2] - srt[:, -1])
    assert entropy(np.array([[1.0, 0.0]]))[0] == 0.0                   # 0 log 0 = 0


# ---------------------------------------------------------------- 11.2 selection

def test_top_b_matches_hand_argsort_with_index_ties():
    gen = np.random.default_rng(1)
    for trial in range(30):
        n = int(gen.integers(1, 40))
        pool = np.sort(gen.choice(1000, n, replace=False))
        scores = gen.integers(0, 4, n).astype(float)                     # many ties
        b = int(gen.integers(0, n + 1))
        hand = sorted(range(n), key=lambda i: (-scores[i], pool[i]))[:b]
        assert select_top(scores, pool, b).tolist() == sorted(pool[hand].tolist())
    pool = np.array([3, 7, 9, 12])                                       # a tie goes to 7, not 12
    assert select_top(np.array([0.1, 0.5, 0.9, 0.5]), pool, 2).tolist() == [7, 9]


def test_acquisition_moves_exactly_the_top_b_images(fed):
    algo, server, clients = make_fedal(fed)
    N = [len(c.train) + len(c.unlabeled) for c in clients]
    train_round(algo, server, clients, 0)                 # FL phase 0 (R_c = 1)
    expect, b = {}, {}
    for c in clients:                                     # what acquisition 1 must take
        s = algo.scores(server, c, 1)
        b[c.id] = algo.acquisition_size(c, 1)
        order = sorted(range(len(s)), key=lambda i: (-s[i], c.unlabeled[i]))[:b[c.id]]
        expect[c.id] = (set(c.train.tolist()), set(c.unlabeled[order].tolist()),
                        set(c.unlabeled.tolist()))
    algo.set_round(1)
    algo.begin_round(server, clients)
    for c in clients:
        L0, S, U0 = expect[c.id]
        assert b[c.id] > 0 and len(S) == b[c.id]
        assert set(c.train.tolist()) == L0 | S and set(c.unlabeled.tolist()) == U0 - S
        assert not set(c.train.tolist()) & set(c.unlabeled.tolist())
        assert len(c.train) + len(c.unlabeled) == N[c.id]
        assert len(np.unique(c.train)) == len(c.train)
        assert len(np.unique(c.unlabeled)) == len(c.unlabeled)
    assert algo.oracle.queries == sum(b.values())


@pytest.mark.parametrize("acq", ["random", "global-entropy", "local-entropy", "least-confidence",
                                 "margin"])
def test_every_baseline_acquires_b_per_client(fed, acq):
    algo, server, clients = make_fedal(fed, acquisition=acq)
    train_round(algo, server, clients, 0)
    before = [len(c.train) for c in clients]
    b = [algo.acquisition_size(c, 1) for c in clients]
    algo.set_round(1)
    algo.begin_round(server, clients)
    assert [len(c.train) for c in clients] == [x + y for x, y in zip(before, b)]
    assert algo.oracle.queries == sum(b)


# ---------------------------------------------------------------- 11.3 label hygiene

def test_training_reads_only_labelled_images_and_u_labels_raise(fed):
    algo, server, clients = make_fedal(fed)
    assert algo.labels.strict                             # FedAvg trains on L only
    for c in clients:
        assert len(c.unlabeled)
        seen = torch.cat(list(algo.base.local_batches(c, torch.Generator().manual_seed(0))))
        assert set(seen.tolist()) <= set(c.train.tolist())
        with pytest.raises(LabelLeak):
            algo.fed.y[torch.as_tensor(c.unlabeled[:3])]
        with pytest.raises(LabelLeak):                    # the base method's own gathering
            algo.base.batch(torch.as_tensor(c.unlabeled[:2]))
        with pytest.raises(LabelLeak):                    # the oracle answers for U only
            algo.oracle.query(1, c, c.train[:1])
        assert (algo.fed.y.numpy()[c.unlabeled] == -1).all()     # not even stored there
        assert torch.equal(algo.fed.y[torch.as_tensor(c.test)], fed.y[torch.as_tensor(c.test)])
    assert algo.oracle.queries == 0


def test_scrambled_unlabelled_labels_change_nothing_until_acquired(fed, tmp_path):
    probe, _, clients = make_fedal(fed, al_cycles=1, al_rounds_per_cycle=2)
    U0 = np.concatenate([c.unlabeled for c in clients])
    y2 = fed.y.clone()
    y2[torch.as_tensor(U0)] = (y2[torch.as_tensor(U0)] + 1) % fed.num_classes
    scrambled = dataclasses.replace(fed, y=y2)
    cfg = lambda: Config(algo="fedal", model="cnn", batch_size=16, local_steps=2)  # noqa: E731
    args = FedAL.Args(**{**SMALL, "al_cycles": 1, "al_rounds_per_cycle": 2})
    outs = {}
    for name, f in (("true", fed), ("scrambled", scrambled)):
        out = str(tmp_path / name)
        fedmed.run(cfg(), args, f, out, stop_after=2, quiet=True)     # FL phase 0 only
        outs[name] = (out, ckpt(out))
    (a, ca), (b, cb) = outs["true"], outs["scrambled"]
    assert same_weights(ca["server"]["weights"], cb["server"]["weights"])
    fedmed.run(cfg(), args, fed, a, resume=True, quiet=True)
    fedmed.run(cfg(), args, scrambled, b, resume=True, quiet=True)
    ca, cb = ckpt(a), ckpt(b)
    for s1, s2 in zip(ca["clients"], cb["clients"]):              # the same images acquired
        assert np.array_equal(s1["train"], s2["train"])
    assert not same_weights(ca["server"]["weights"], cb["server"]["weights"])  # labels used after


# ---------------------------------------------------------------- 11.4 budget schedule

def test_budget_schedule_rounds_and_oracle_count(small_run):
    lines = read_jsonl(os.path.join(small_run, "metrics.jsonl"))
    per = [m for m in lines if m["client"] != "pooled"]
    assert sorted({m["round"] for m in per}) == [1, 2, 3]          # (A + 1) R_c rounds
    for m in per:
        N = m["labelled"] + m["unlabelled"]
        frac = 0.2 + 0.2 * (m["round"] - 1)                         # p0 + c beta
        assert abs(m["labelled"] - frac * N) <= 1, m
        assert m["al_cycle"] == m["round"] - 1
    first = {m["client"]: m["labelled"] for m in per if m["round"] == 1}
    last = {m["client"]: m["labelled"] for m in per if m["round"] == 3}
    acquired = sum(m["acquired"] for m in per if "acquired" in m)
    s = json.load(open(os.path.join(small_run, "summary.json")))
    assert s["al"]["oracle_queries"] == acquired == sum(last[k] - first[k] for k in last)
    assert [round(p["label_fraction"], 1) for p in s["al_curve"]] == [0.2, 0.4, 0.6]
    assert s["al_curve"][-1]["balanced_accuracy"] == pytest.approx(s["balanced_accuracy"])
    assert sum(s["al_curve"][1]["acquired_classes"]) == s["al_curve"][1]["oracle_queries"]
    pooled = [m for m in lines if m["client"] == "pooled"]        # the AL phase sends nothing
    assert len({(m["bytes_up"], m["bytes_down"]) for m in pooled}) == 1
    cfg = json.load(open(os.path.join(small_run, "config.json")))
    assert cfg["config"]["rounds"] == 3 and "reconstruction" in cfg["algorithm_info"]["protocol"]


def test_paper_defaults(fed):
    algo = FedAL(Config(algo="fedal", model="cnn"), FedAL.Args(), fed)
    assert (algo.args.al_initial, algo.args.al_budget, algo.A, algo.R_c) == (0.1, 0.5, 4, 10)
    assert algo.cfg.rounds == 50 and algo.beta == pytest.approx(0.1)
    assert algo.args.acquisition == "ensemble-entropy" and algo.args.al_score == "entropy_of_mean"
    for k, N in enumerate(algo.N):
        for c in range(5):
            assert abs(algo.target(k, c) - (0.1 + 0.1 * c) * N) <= 1


# ---------------------------------------------------------------- 11.5 determinism

def test_same_seed_same_acquisitions_and_weights(small_run, tmp_path):
    rc, again = cli(tmp_path, name="again")
    rc2, other = cli(tmp_path, "--seed", "1", name="other")
    assert rc == rc2 == 0
    a, b, c = ckpt(small_run), ckpt(again), ckpt(other)
    assert same_weights(a["server"]["weights"], b["server"]["weights"])
    for s1, s2 in zip(a["clients"], b["clients"]):
        assert np.array_equal(s1["train"], s2["train"])
        assert np.array_equal(s1["unlabeled"], s2["unlabeled"])
    log1, log2 = a["server"]["state"]["al"]["oracle_log"], b["server"]["state"]["al"]["oracle_log"]
    assert [e["indices"].tolist() for e in log1] == [e["indices"].tolist() for e in log2]
    assert any(not np.array_equal(s1["train"], s3["train"])
               for s1, s3 in zip(a["clients"], c["clients"]))


# ---------------------------------------------------------------- 11.6 reduction to FedAvg

def test_all_labelled_equals_fedavg_bit_for_bit(tmp_path):
    rc1, al = cli(tmp_path, "--al-initial", "1", "--al-budget", "1", name="al")
    rc2, avg = cli(tmp_path, "--rounds", "3", name="avg", algo="fedavg")
    assert rc1 == rc2 == 0
    assert same_weights(ckpt(al)["server"]["weights"], ckpt(avg)["server"]["weights"])
    s1, s2 = (json.load(open(os.path.join(d, "summary.json"))) for d in (al, avg))
    assert (s1["bytes_up"], s1["bytes_down"]) == (s2["bytes_up"], s2["bytes_down"])
    assert s1["al"]["oracle_queries"] == 0
    extra = {"al_cycle", "labelled", "unlabelled", "acquired", "acquired_classes", "oracle_queries"}
    strip = [{k: v for k, v in m.items() if k not in extra}
             for m in drop_seconds(read_jsonl(os.path.join(al, "metrics.jsonl")))]
    assert strip == drop_seconds(read_jsonl(os.path.join(avg, "metrics.jsonl")))


# ---------------------------------------------------------------- 11.7 eval mode

def test_scoring_is_repeatable_and_leaves_bn_buffers_alone(fed):
    algo, server, clients = make_fedal(fed)
    algo.set_round(0)
    algo.begin_round(server, clients)
    c = clients[0]
    payload, _ = transmit(algo.broadcast(server, c))
    upload = algo.local_update(c, payload)               # theta_k scored right after it
    assert "al_p_local" in c.state and len(c.state["al_p_local"]) == len(c.unlabeled)
    sd = algo.base.model.state_dict()
    for k in algo.base.bn_stats:                         # scoring with theta_k moved no buffer
        assert torch.equal(sd[k], upload["w"][k]), k
    for other in clients[1:]:
        payload, _ = transmit(algo.broadcast(server, other))
        algo.local_update(other, payload)
    before = {k: v.clone() for k, v in server.weights.items()}
    s1 = algo.scores(server, c, 1)
    after = algo.base.model.state_dict()
    s2 = algo.scores(server, c, 1)
    assert np.array_equal(s1, s2)
    assert same_weights(before, server.weights)
    for k in algo.base.bn_stats:                         # theta_g scored as loaded, in eval mode
        assert torch.equal(after[k], server.weights[k]), k
    assert not algo.base.model.training


def test_local_scores_are_kept_only_until_the_clients_next_update(fed):
    """theta_k's scores are made at the phase's last update, used by the next acquisition
    (which runs where the client is and changes no client state) and dropped at the
    client's next local update."""
    algo, server, clients = make_fedal(fed, al_rounds_per_cycle=2)
    train_round(algo, server, clients, 0)
    assert not any("al_p_local" in c.state for c in clients)       # not the phase's last update
    train_round(algo, server, clients, 1)
    assert all("al_p_local" in c.state and c.state["al_p_phase"] == 0 for c in clients)
    algo.set_round(2)
    algo.begin_round(server, clients)                              # acquisition 1
    rec = server.state["al"]["acquisitions"][0]
    assert all(v["local_model"] for v in rec["clients"].values())
    for c in algo.participants(server, clients):
        assert c.state["al_p_phase"] == 0
        algo.local_update(c, transmit(algo.broadcast(server, c))[0])
        assert "al_p_local" not in c.state and "al_p_phase" not in c.state, c.name


def test_scores_of_an_earlier_phase_are_never_used(fed):
    """A client that does not train in phase 1 (e.g. never sampled) still holds theta_k's
    scores of phase 0 at acquisition 2: it scores with theta_g alone there, as one that
    never trained (global entropy), and the record says no local model."""
    algo, server, clients = make_fedal(fed, al_cycles=2, al_rounds_per_cycle=1)
    train_round(algo, server, clients, 0)
    algo.set_round(1)
    algo.begin_round(server, clients)                              # acquisition 1
    assert all(c.state["al_p_phase"] == 0 for c in clients)       # phase 1: nobody trains
    algo.set_round(2)
    assert all(algo.acquisition_size(c, 2) > 0 for c in clients)
    want = []
    for c in clients:
        p_glob = algo.global_probs(server, c, c.unlabeled)
        want.append(select_top(entropy(p_glob), c.unlabeled, algo.acquisition_size(c, 2)))
    algo.begin_round(server, clients)                              # acquisition 2
    rec = server.state["al"]["acquisitions"][1]
    assert not any(v["local_model"] for v in rec["clients"].values())
    assert [e["cycle"] for e in algo.oracle.log[-len(clients):]] == [2] * len(clients)
    for e, S in zip(algo.oracle.log[-len(clients):], want):
        assert np.array_equal(e["indices"], S), e["client"]


def test_a_pick_of_the_wrong_size_is_refused(fed, monkeypatch):
    """The server checks what each client picked against its budget b_k (a node that
    answered with another S_k would otherwise move the pools silently)."""
    algo, server, clients = make_fedal(fed)
    train_round(algo, server, clients, 0)
    real = algo.pick
    monkeypatch.setattr(algo, "pick", lambda server, c, k: {**real(server, c, k),
                                                            "S": real(server, c, k)["S"][1:]})
    algo.set_round(algo.R_c)
    with pytest.raises(RuntimeError, match="picked"):
        algo.begin_round(server, clients)


def test_reinit_restarts_the_base_method(fed):
    algo, server, clients = make_fedal(fed, al_reinit=True)
    train_round(algo, server, clients, 0)
    assert not same_weights(server.weights, algo.base.init_weights)
    algo.set_round(1)
    algo.begin_round(server, clients)
    assert same_weights(server.weights, algo.base.init_weights) and algo.oracle.queries > 0


# ---------------------------------------------------------------- resume, base methods

def test_stop_and_resume_mid_cycle_equals_uninterrupted(tmp_path):
    """R_c = 2, A = 1 (4 rounds), 2 of 3 clients a round: a stop after round 2 ends FL
    phase 0 (theta_k's scores are in the checkpoint; the acquisition runs after the
    resume); a stop after round 3 is inside FL phase 1."""
    flags = ["--al-rounds-per-cycle", "2", "--al-cycles", "1", "--fraction", "0.67"]
    rc, full = cli(tmp_path, *flags, name="full")
    assert rc == 0
    a = ckpt(full)
    for stop in (2, 3):
        rc2, part = cli(tmp_path, *flags, "--stop-after", str(stop), name=f"part{stop}")
        rc3, _ = cli(tmp_path, *flags, "--resume", name=f"part{stop}")
        assert rc2 == rc3 == 0
        b = ckpt(part)
        assert same_weights(a["server"]["weights"], b["server"]["weights"])
        for s1, s2 in zip(a["clients"], b["clients"]):
            assert np.array_equal(s1["train"], s2["train"])
        assert drop_seconds(read_jsonl(os.path.join(full, "metrics.jsonl"))) == \
            drop_seconds(read_jsonl(os.path.join(part, "metrics.jsonl")))
        assert drop_seconds(json.load(open(os.path.join(full, "summary.json")))) == \
            drop_seconds(json.load(open(os.path.join(part, "summary.json"))))


def test_fedprox_base_gets_its_mu(small_run, tmp_path, fed):
    rc, prox0 = cli(tmp_path, "--base-algo", "fedprox", "--base-args", "mu=0", name="p0")
    assert rc == 0                                                  # mu = 0 is FedAvg
    assert same_weights(ckpt(prox0)["server"]["weights"], ckpt(small_run)["server"]["weights"])
    algo, _, _ = make_fedal(fed, base_algo="fedprox", base_args="mu=0.3")
    assert type(algo.base) is fedmed.ALGORITHMS["fedprox"] and algo.base.args.mu == 0.3
    assert algo.info["base_args"] == {"mu": 0.3} and algo.base.fed.y is algo.labels


def test_semi_supervised_base_sees_no_label_on_u(fed):
    """A base with its own local training (FedLSM gathers images of U) reads -1, the
    Federation's "no label", on U instead of raising; the true labels stay with the oracle."""
    algo, server, clients = make_fedal(fed, base_algo="fedlsm")
    U = torch.as_tensor(clients[0].unlabeled)
    assert not algo.labels.strict and (algo.fed.y[U] == -1).all()
    train_round(algo, server, clients, 0)
    b = [algo.acquisition_size(c, 1) for c in clients]
    algo.set_round(1)
    algo.begin_round(server, clients)
    assert algo.oracle.queries == sum(b) > 0
    assert (algo.fed.y[torch.as_tensor(clients[0].train)] >= 0).all()


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("flags,needle", [
    (["--al-initial", "0"], "--al-initial"),
    (["--al-initial", "1.5"], "--al-initial"),
    (["--al-budget", "0.1"], "--al-budget"),
    (["--al-budget", "1.5"], "--al-budget"),
    (["--al-cycles", "-1"], "--al-cycles"),
    (["--al-rounds-per-cycle", "0"], "--al-rounds-per-cycle"),
    (["--acquisition", "coreset"], "--acquisition"),
    (["--al-score", "bald"], "--al-score"),
    (["--base-algo", "nope"], "--base-algo"),
    (["--base-algo", "pooled"], "cannot be wrapped"),
    (["--base-algo", "fedal"], "cannot be wrapped"),
    (["--base-algo", "fedprox", "--base-args", "mu=abc"], "--base-args"),
    (["--base-algo", "fedprox", "--base-args", "nu=1"], "--base-args"),
    (["--base-args", "mu=1"], "--base-args"),
    (["--unlabeled-fraction", "0.9"], "--al-initial"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, flags, needle):
    rc, out = cli(tmp_path, *flags)
    one_line_error(capsys, rc, needle, out=out)


# ---------------------------------------------------------------- issue #11: what the mutants showed

def test_hidden_labels_raise_by_default_and_an_empty_oracle_answers_nothing(fed):
    from algorithms.fedal import HiddenLabels, Oracle
    view = HiddenLabels(fed.y, np.array([0, 2]))
    with pytest.raises(LabelLeak):
        view[torch.tensor([2])]
    assert view[torch.tensor([1])].tolist() == [int(fed.y[1])]
    idx, labels = Oracle(fed.y, np.array([0, 2])).answered()
    assert len(idx) == len(labels) == 0


def test_base_args_parse_booleans_and_numbers():
    from algorithms.fedal import parse_base_args
    Lsm = fedmed.ALGORITHMS["fedlsm"]
    a = parse_base_args(Lsm, "ude_compat=true, n_u=7, tau_p=0.5, empty_class=samples")
    assert (a.ude_compat, a.n_u, a.tau_p, a.empty_class) == (True, 7, 0.5, "samples")
    for text, want in (("1", True), ("yes", True), ("True", True), ("0", False), ("false", False),
                       ("no", False)):
        assert parse_base_args(Lsm, f"ude_compat={text}").ude_compat is want, text
    assert parse_base_args(Lsm, "") == Lsm.Args()


def test_no_acquisition_cycle_is_one_fl_phase(fed):
    """--al-cycles 0: one FL phase of R_c rounds on the initial L_k, beta = 0."""
    algo, server, clients = make_fedal(fed, al_cycles=0, al_rounds_per_cycle=2)
    assert algo.cfg.rounds == 2 and algo.beta == 0.0 and algo.info["beta"] == 0.0
    assert all(algo.target(c.id, 1) == algo.n0[c.id] for c in clients)


@pytest.mark.parametrize("kw,needle", [
    ({"al_initial": 1.5}, r"^--al-initial must lie in \(0, 1\]"),
    ({"al_initial": 0.0}, r"^--al-initial must lie in \(0, 1\]"),
    ({"al_cycles": -1}, r"^--al-cycles must be >= 0"),
])
def test_each_bound_names_its_own_flag(fed, kw, needle):
    with pytest.raises(fedmed.UsageError, match=needle):
        FedAL(Config(algo="fedal"), FedAL.Args(**kw), fed)


def test_initial_share_targets_and_run_record(fed):
    """n0 = max(1, round(p0 N_k)); the recorded targets are n_k(c) = round((p0 + c beta) N_k)
    for c = 0..A; warm start unless --al-reinit; a budget equal to p0 acquires nothing."""
    algo, _, clients = make_fedal(fed)
    for c in clients:
        N = len(c.train) + len(c.unlabeled)
        want = [max(1, round(0.2 * N)), round(0.4 * N), round(0.6 * N)]
        assert algo.info["targets"][c.name] == want and len(c.train) == want[0]
    assert algo.info["warm_start"] is True
    assert make_fedal(fed, al_reinit=True)[0].info["warm_start"] is False
    tiny, _, clients = make_fedal(fed, al_initial=0.001, al_budget=0.001)
    assert [len(c.train) for c in clients] == [1, 1, 1] == tiny.n0
    assert all(tiny.acquisition_size(c, k) == 0 for c in clients for k in (1, 2))


def test_unlabelled_images_with_a_truth_join_u(fed):
    """Images of a client's `unlabeled` split join U_k when the oracle has a ground truth
    for them (any class, 0 included); those without (y = -1) are left out and counted."""
    y = fed.y.clone()
    c0 = fed.clients[0]
    extra = c0.train[-6:]
    y[torch.as_tensor(extra[:2])] = 0
    y[torch.as_tensor(extra[2])] = -1
    split = dataclasses.replace(c0, train=c0.train[:-6], unlabeled=extra)
    f2 = dataclasses.replace(fed, y=y, clients=[split] + fed.clients[1:])
    algo, _, clients = make_fedal(f2)
    U_and_L = set(clients[0].train.tolist()) | set(clients[0].unlabeled.tolist())
    assert set(extra.tolist()) - U_and_L == {int(extra[2])}
    assert algo.N[0] == len(c0.train) - 1
    assert algo.info["unlabelled_without_ground_truth"] == {c0.name: 1}


def test_a_base_with_its_own_local_update_reads_no_label_on_u(fed):
    """`local` replaces local_update (not train): its reads of U must give -1, not raise."""
    algo, _, _ = make_fedal(fed, base_algo="local")
    assert not algo.labels.strict
    assert make_fedal(fed)[0].labels.strict


def test_every_acquisition_uses_the_local_model_of_its_phase(fed):
    """theta_k is scored after the last local update of EVERY phase before an acquisition,
    not only phase 0, and not before it (R_c = 2: rounds 1 and 3 are the phases' last),
    nor in the final phase (rounds 4, 5)."""
    algo, server, clients = make_fedal(fed, al_rounds_per_cycle=2)
    for t in range(6):
        train_round(algo, server, clients, t)
        assert all(("al_p_local" in c.state) == (t in (1, 3)) for c in clients), t
        if t == 3:
            assert all(len(c.state["al_p_local"]) == len(c.unlabeled) for c in clients)
    recs = server.state["al"]["acquisitions"]
    assert len(recs) == 2 and all(v["local_model"] for r in recs for v in r["clients"].values())


def test_local_scores_only_where_the_next_acquisition_takes_an_image(fed):
    """p0 = 2%, B = 3.4%, A = 2 on clients of 93, 98 and 83 images: n_k(0) = 2, 2, 2,
    n_k(1) = round(2.7% N_k) = 3, 3, 2 and n_k(2) = 3, 3, 3, so b_k(1) = 1, 1, 0 and
    b_k(2) = 0, 0, 1. theta_k is scored exactly where b_k(next acquisition) > 0."""
    assert [len(c.train) for c in fed.clients] == [93, 98, 83]
    algo, server, clients = make_fedal(fed, al_initial=0.02, al_budget=0.034)
    b = [[algo.acquisition_size(c, 1) for c in clients]]
    n0 = [len(c.train) for c in clients]
    train_round(algo, server, clients, 0)
    assert [("al_p_local" in c.state) for c in clients] == [x > 0 for x in b[0]] == [True, True, False]
    train_round(algo, server, clients, 1)                 # acquisition 1, then phase 1
    rec = server.state["al"]["acquisitions"][0]["clients"]
    assert [rec[c.name]["local_model"] for c in clients] == [True, True, False]
    assert [rec[c.name]["acquired"] for c in clients] == b[0]
    assert [len(c.train) - n for c, n in zip(clients, n0)] == b[0]
    assert rec[clients[2].name]["classes"] == [0] * fed.num_classes
    assert [e["client"] for e in algo.oracle.log] == [clients[0].name, clients[1].name]
    b2 = [algo.acquisition_size(c, 2) for c in clients]
    assert [("al_p_local" in c.state) for c in clients] == [x > 0 for x in b2] == [False, False, True]


def test_the_protocol_delegates_begin_round_to_the_base(fed, monkeypatch):
    calls = []

    class Probe(fedmed.ALGORITHMS["fedavg"]):
        def begin_round(self, server, clients):
            calls.append(self.round)
    monkeypatch.setitem(fedmed.ALGORITHMS, "probe", Probe)
    algo, server, clients = make_fedal(fed, base_algo="probe")
    for t in (0, 1):
        algo.set_round(t)
        algo.begin_round(server, clients)
    assert calls == [0, 1]


def test_a_client_without_a_local_model_scores_with_the_global_one(fed):
    """No local update in the phase (e.g. never sampled): p_loc := p_glob for every score,
    so local-entropy and ensemble-entropy equal global-entropy."""
    algo, server, clients = make_fedal(fed)
    c = clients[0]
    assert "al_p_local" not in c.state
    algo.args.acquisition = "global-entropy"
    ref = algo.scores(server, c, 1)
    for acq in ("local-entropy", "ensemble-entropy"):
        algo.args.acquisition = acq
        assert np.allclose(algo.scores(server, c, 1), ref, atol=1e-12), acq


def test_label_efficiency_curve_and_area_by_hand(fed):
    """al_curve: the primary view (the first of the lines) at the end of every FL phase;
    al_area = sum of trapezoids (BA_i + BA_{i+1}) / 2 (f_{i+1} - f_i) / (f_last - f_0);
    the table prints every point. Two views per round, as a base with several has."""
    algo, server, _ = make_fedal(fed, al_rounds_per_cycle=2)   # A = 2: phases end at 2, 4, 6
    ba = {2: (0.2, 0.4), 4: (0.5, 0.7), 6: (0.6, 0.9)}      # (site0, site1) of view "main"
    lab = {2: (2, 4), 4: (4, 6), 6: (7, 8)}
    for r in (1, 3, 5):                                     # rounds inside a phase: not on it
        ba[r], lab[r] = (0.0, 0.0), (1, 1)
    lines = []                                              # in evaluate_all's order:
    for r in range(1, 7):                                   # per client, every view
        for i, name in enumerate(("site0", "site1")):
            for view, shift in (("main", 0.0), ("other", 0.05)):
                lines.append({"round": r, "view": view, "holdout": False, "client": name,
                              "balanced_accuracy": ba[r][i] + shift, "macro_auroc": 0.5,
                              "labelled": lab[r][i], "unlabelled": 10 - lab[r][i]})
        for view, shift in (("main", 0.0), ("other", 0.05)):
            lines.append({"round": r, "view": view, "holdout": False, "client": "pooled",
                          "balanced_accuracy": 0.33 + shift})
    server.state["al"]["acquisitions"] = [
        {"cycle": c, "oracle_queries": q, "clients": {"site0": {"classes": [1, 0, q - 1]},
                                                      "site1": {"classes": [0, 1, 0]}}}
        for c, q in ((1, 4), (2, 9))]
    server.state["al"]["oracle_log"] = [{"indices": np.arange(4)}, {"indices": np.arange(5)}]
    out = algo.summary_extra(server, lines)
    curve = out["al_curve"]
    assert [p["round"] for p in curve] == [2, 4, 6] and [p["cycle"] for p in curve] == [0, 1, 2]
    f = [6 / 20, 10 / 20, 15 / 20]
    mean_ba = [0.3, 0.6, 0.75]
    assert [p["label_fraction"] for p in curve] == pytest.approx(f)
    assert [p["balanced_accuracy"] for p in curve] == pytest.approx(mean_ba)
    assert [p["labelled"] for p in curve] == [6, 10, 15]
    assert [p["pooled_balanced_accuracy"] for p in curve] == pytest.approx([0.33] * 3)
    assert [p["acquired_classes"] for p in curve] == [None, [1, 1, 3], [1, 1, 8]]
    assert [p["oracle_queries"] for p in curve] == [0, 4, 9]
    area = ((0.3 + 0.6) / 2 * (f[1] - f[0]) + (0.6 + 0.75) / 2 * (f[2] - f[1])) / (f[2] - f[0])
    assert out["al_area"] == pytest.approx(area)
    assert out["al"]["oracle_queries"] == 9 and out["al"]["base_algo"] == "fedavg"
    table = FedAL.summary_table({**out, "al_area": out["al_area"]}).splitlines()
    assert len(table) == 2 + 3 + 1
    assert table[2].split()[:6] == ["0", "2", "6", "0.300", "0.300", "0.330"]
    assert table[4].split()[:6] == ["2", "6", "15", "0.750", "0.750", "0.330"]
    assert f"{area:.3f}" in table[-1] and "9" in table[-1]


@pytest.mark.parametrize("labelled,has_area", [
    ([(3, 3), (5, 5)], True),                       # two points
    ([(3, 3), (3, 3), (7, 8)], True),               # flat, then up
    ([(3, 3), (7, 8), (7, 8)], True),               # up, then flat
    ([(3, 3), (3, 3)], False),                      # no label gained: no area
    ([(3, 3)], False),                              # one point
])
def test_area_only_when_the_labelled_fraction_grew(fed, labelled, has_area):
    algo, server, _ = make_fedal(fed, al_cycles=len(labelled) - 1)
    lines = []
    for c, lab in enumerate(labelled):
        for i, name in enumerate(("site0", "site1")):
            lines.append({"round": c + 1, "view": "v", "holdout": False, "client": name,
                          "balanced_accuracy": 0.1 * (c + 1) + 0.1 * i, "macro_auroc": 0.5,
                          "labelled": lab[i], "unlabelled": 10 - lab[i]})
        lines.append({"round": c + 1, "view": "v", "holdout": False, "client": "pooled",
                      "balanced_accuracy": 0.5})
    server.state["al"]["acquisitions"] = [{"oracle_queries": 0, "clients": {
        "site0": {"classes": [0]}, "site1": {"classes": [0]}}}] * (len(labelled) - 1)
    out = algo.summary_extra(server, lines)
    assert len(out["al_curve"]) == len(labelled)
    assert ("al_area" in out) is has_area
    if has_area:
        f = [sum(lab) / 20 for lab in labelled]
        ba = [0.1 * (c + 1) + 0.05 for c in range(len(labelled))]
        area = sum((ba[i] + ba[i + 1]) / 2 * (f[i + 1] - f[i]) for i in range(len(f) - 1))
        assert out["al_area"] == pytest.approx(area / (f[-1] - f[0]))


def test_default_image_size_comes_from_the_base(monkeypatch):
    class Probe(fedmed.ALGORITHMS["fedavg"]):
        @classmethod
        def default_image_size(cls, args):
            return 77
    monkeypatch.setitem(fedmed.ALGORITHMS, "probe", Probe)
    assert FedAL.default_image_size(FedAL.Args(base_algo="probe")) == 77
    assert FedAL.default_image_size(FedAL.Args()) is None               # fedavg has none
    assert FedAL.default_image_size(FedAL.Args(base_algo="nope")) is None


def test_a_client_without_any_ground_truth_is_refused(fed):
    """A client whose images all lack a ground truth has N_k = 0: with --al-initial 1 it
    used to get an empty L_k, on which the local update loops forever; now a usage error."""
    y = fed.y.clone()
    c0 = fed.clients[0]
    y[torch.as_tensor(c0.train)] = -1
    split = dataclasses.replace(c0, train=c0.train[:0], unlabeled=c0.train)
    f2 = dataclasses.replace(fed, y=y, clients=[split] + fed.clients[1:])
    for p0 in (1.0, 0.2):
        with pytest.raises(fedmed.UsageError, match=c0.name):
            FedAL(Config(algo="fedal"), FedAL.Args(al_initial=p0, al_budget=1.0), f2)


# ---------------------------------------------------------------- issue #19: the protocol contract

def test_fedal_is_a_wrapper_and_leaves_the_callers_settings_alone(fed, tmp_path, monkeypatch):
    """FedAL goes through the core's documented constructor for a wrapper
    (fedmed.Wrapper.__init__ with rounds = T = (A + 1) R_c), needs no property shims for
    the loop's attributes, and a run leaves the caller's cfg as it was while the loop runs
    T rounds, recorded in config.json; the base method gets the held-out clients, the
    clock and --quiet from the core."""
    calls = []
    real = fedmed.Wrapper.__init__
    monkeypatch.setattr(fedmed.Wrapper, "__init__",
                        lambda self, *a, **kw: calls.append(kw) or real(self, *a, **kw))
    cfg = Config(algo="fedal", model="cnn", batch_size=16, local_steps=2, rounds=7)
    algo = FedAL(cfg, FedAL.Args(**SMALL), fed)
    assert isinstance(algo, fedmed.Wrapper) and calls == [{"rounds": 3}]
    assert cfg.rounds == 7 and algo.cfg.rounds == 3 and algo.base.cfg.rounds == 3
    assert not {"round", "holdout", "primary_view"} & set(vars(FedAL))
    assert algo.info["rounds"] == 3 and "(7)" in algo.info["rounds_rule"]
    hold = [fedmed.ClientState(-1, "h", np.zeros(0, np.int64), np.zeros(0, np.int64))]
    algo.attach(hold, True)
    algo.set_round(2)
    assert (algo.base.holdout, algo.base.quiet, algo.base.round) == (hold, True, 2)

    before = dataclasses.asdict(cfg)
    s = fedmed.run(cfg, FedAL.Args(**SMALL), fed, str(tmp_path / "r"), quiet=True)
    assert dataclasses.asdict(cfg) == before
    assert s["rounds"] == 3 and read_json(tmp_path / "r" / "config.json")["config"]["rounds"] == 3
    assert sorted({m["round"] for m in read_jsonl(tmp_path / "r" / "metrics.jsonl")}) == [1, 2, 3]
