"""The core's contract with a protocol (issue #19), fedmed.py: a method that wraps another
(fedmed.Wrapper; FedAL is one), the settings a run follows (the method's own self.cfg,
never the caller's cfg) and the budget of a stage (Algorithm.budget). Each test states
what the contract promises and checks it against a plain run of the wrapped method."""
import dataclasses
import json
import os

import pytest
import torch

import datasets
import fedmed
from fedmed import Config, ServerState, transmit

import algorithms  # noqa: E402 - the methods register themselves

algorithms.load_all()


@pytest.fixture(scope="module")
def fed():
    """3 training clients and a held-out one."""
    f = datasets.make_synthetic(seed=3, clients=4, image_size=16)
    return dataclasses.replace(f, clients=f.clients[:3], holdout=f.clients[3:])


class Probe(fedmed.ALGORITHMS["fedavg"]):
    """FedAvg that records what the loop handed it."""

    def setup(self, server, clients):
        self.seen = {"holdout": [c.name for c in self.holdout], "quiet": self.quiet, "rounds": []}
        super().setup(server, clients)
        server.state["seen"] = {"holdout": self.seen["holdout"], "quiet": self.quiet}

    def begin_round(self, server, clients):
        self.seen["rounds"].append(self.round)
        server.state.setdefault("rounds", []).append(self.round)


class Twice(fedmed.Wrapper):
    """The smallest wrapper: FedAvg for 2 rounds whatever --rounds says."""

    def __init__(self, cfg, args, fed):
        super().__init__(cfg, args, fed, rounds=2)
        self.wrap(Probe(self.cfg, None, fed))


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(fedmed.ALGORITHMS, "probe", Probe)
    monkeypatch.setitem(fedmed.ALGORITHMS, "twice", Twice)


def cfg_of(algo, **kw):
    return Config(**{"algo": algo, "model": "cnn", "rounds": 5, "batch_size": 16,
                     "local_steps": 2, "seed": 1, **kw})


def test_a_wrapper_runs_its_base_unchanged_for_its_own_rounds(fed, tmp_path, registered):
    """Wrapper: the loop runs the wrapper's rounds (its own copy of the settings, recorded in
    config.json) and leaves the caller's cfg as it was; every hook is the base's, so the
    run equals the base's own run of those rounds bit for bit (weights, metrics lines,
    summary with its pooled wording, exported models); the held-out clients, --quiet and
    the round reach the base."""
    cfg = cfg_of("twice")
    before = dataclasses.asdict(cfg)
    s = fedmed.run(cfg, None, fed, str(tmp_path / "w"), quiet=True)
    assert dataclasses.asdict(cfg) == before
    plain = fedmed.run(cfg_of("probe", rounds=2), None, fed, str(tmp_path / "p"), quiet=True)
    rec = json.load(open(tmp_path / "w" / "config.json"))
    assert rec["config"]["rounds"] == 2 and s["rounds"] == 2
    a = torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "p" / "checkpoint.pt", weights_only=False)
    assert a["server"]["state"]["rounds"] == [0, 1]
    assert a["server"]["state"]["seen"] == {"holdout": [fed.holdout[0].name], "quiet": True}
    for k, v in b["server"]["weights"].items():
        assert torch.equal(a["server"]["weights"][k], v), k
    for k in ("balanced_accuracy", "pooled_balanced_accuracy", "pooled_kind", "view",
              "holdout", "exported", "client_n", "bytes_up", "bytes_down"):
        assert s[k] == plain[k], k
    lines = lambda d: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                       for x in open(d / "metrics.jsonl")]
    assert lines(tmp_path / "w") == lines(tmp_path / "p")
    assert any(m["holdout"] for m in lines(tmp_path / "w"))
    for name in s["exported"]:
        x = torch.load(tmp_path / "w" / name, weights_only=True)
        y = torch.load(tmp_path / "p" / name, weights_only=True)
        assert all(torch.equal(x[k], y[k]) for k in y)


def test_the_loop_hands_the_base_its_holdout_quiet_and_clock(fed, registered):
    """attach and set_round reach the wrapper and its base; setup gives both the clients."""
    w = Twice(cfg_of("twice"), None, fed)
    assert w.primary_view == w.base.primary_view == "global"
    hold = [fedmed.ClientState(-1, "h", [], [])]
    w.attach(hold, True)
    assert (w.holdout, w.quiet, w.base.holdout, w.base.quiet) == (hold, True, hold, True)
    clients, server = fedmed.make_clients(fed), ServerState()
    w.setup(server, clients)
    assert w.clients is clients and w.base.clients is clients
    assert w.base.seen["holdout"] == ["h"] and w.base.seen["quiet"] is True
    w.set_round(1)
    assert (w.round, w.base.round) == (1, 1)
    w.begin_round(server, clients)
    assert w.base.seen["rounds"] == [1]
    assert w.participants(server, clients[:2]) == clients[:2]
    payload, _ = transmit(w.broadcast(server, clients[0]))
    assert payload.keys() == {"w"}
    up = w.local_update(clients[0], payload)
    assert up["n"] == clients[0].n
    assert w.upload_weight(7) == 7 and w.budget() is w.base.cfg
    assert w.streams() and w.line_extra(server, clients[0]) == {}
    assert w.summary_extra(server, []) == {}


def test_a_wrapper_that_aggregates_itself_does_not_stream(fed, registered, monkeypatch):
    """Streaming (fold as uploads arrive) is the base's only while the wrapper keeps the
    core's delegation of aggregate, and the base streams."""
    class Own(Twice):
        def aggregate(self, server, uploads):
            super().aggregate(server, uploads)
    w = Own(cfg_of("twice"), None, fed)
    assert not w.streams() and Twice(cfg_of("twice"), None, fed).streams()
    monkeypatch.setattr(Probe, "stream_uploads", False)
    assert not Twice(cfg_of("twice"), None, fed).streams()


def test_a_stage_budget_is_read_by_every_training_helper(fed):
    """Algorithm.budget: the optimiser (class, lr, momentum, weight decay, state kept),
    the minibatches (size, steps or epochs) and the upload weights follow the stage's
    settings; self.cfg is never swapped. local_batches takes an explicit budget too."""
    FedAvg = fedmed.ALGORITHMS["fedavg"]
    cfg = cfg_of("fedavg", local_steps=0, local_epochs=1)
    stage = dataclasses.replace(cfg, optimizer="adam", lr=0.003, weight_decay=0.01,
                                batch_size=5, local_steps=3, keep_optimizer=True,
                                weighting="uniform")

    class Staged(FedAvg):
        def budget(self):
            return stage
    algo = Staged(cfg, None, fed)
    clients, server = fedmed.make_clients(fed), ServerState()
    algo.setup(server, clients)
    c = clients[0]
    gen = torch.Generator().manual_seed(0)
    assert [len(i) for i in algo.local_batches(c, gen)] == [5, 5, 5]
    assert algo.upload_weight(40) == 1
    payload, _ = transmit(algo.broadcast(server, c))
    algo.local_update(c, payload)
    st = c.state["optimizer"]                                  # kept: the stage says so
    g = st["param_groups"][0]
    assert (g["lr"], g["weight_decay"], g["betas"]) == (0.003, 0.01, (0.9, 0.999))
    assert {float(v["step"]) for v in st["state"].values()} == {3.0}
    assert isinstance(algo.make_optimizer(c), torch.optim.Adam)
    assert algo.cfg is cfg and cfg.optimizer == "sgd"
    sgd = dataclasses.replace(stage, optimizer="sgd", momentum=0.5)
    algo.budget = lambda: sgd
    c.state.pop("optimizer")
    o = algo.make_optimizer(c)
    assert isinstance(o, torch.optim.SGD) and o.param_groups[0]["momentum"] == 0.5
    assert [len(i) for i in algo.local_batches(c, gen, budget=dataclasses.replace(
        stage, batch_size=7, local_steps=0, local_epochs=1))] == [7] * (c.n // 7) + (
        [c.n % 7] if c.n % 7 > 1 else [])
    algo.budget = lambda: dataclasses.replace(sgd, keep_optimizer=False)
    algo.local_update(c, payload)
    assert "optimizer" not in c.state


def test_the_adam_betas_of_a_method(fed):
    """--optimizer adam uses the method's adam_betas (torch's by default)."""
    FedAvg = fedmed.ALGORITHMS["fedavg"]

    class B(FedAvg):
        adam_betas = (0.5, 0.75)
    algo = B(cfg_of("fedavg", optimizer="adam"), None, fed)
    assert algo.make_optimizer(fedmed.make_clients(fed)[0]).param_groups[0]["betas"] == (0.5, 0.75)
    assert FedAvg.adam_betas == (0.9, 0.999)


def test_the_model_zoo_is_what_the_core_builds_by_default(fed, monkeypatch):
    """Algorithm.build_model calls the factory models.py plugged in; without one, a clear
    error (the core imports no model code)."""
    import models
    assert fedmed.model_factory() is models.build
    monkeypatch.setattr(fedmed, "_MODEL_FACTORY", None)
    with pytest.raises(RuntimeError, match="no model factory"):
        fedmed.ALGORITHMS["fedavg"](cfg_of("fedavg"), None, fed)
    calls = []
    monkeypatch.setattr(fedmed, "_MODEL_FACTORY",
                        lambda *a: calls.append(a) or models.build(*a))
    fedmed.ALGORITHMS["fedavg"](cfg_of("fedavg"), None, fed)
    assert calls == [("cnn", fed.num_classes, None)]
    fedmed.set_model_factory(models.build)
    assert fedmed.model_factory() is models.build
    assert os.path.basename(models.__file__) == "models.py"
