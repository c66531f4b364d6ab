"""FedMed on Flower's deployment engine (flower_app.py) against `python run.py`.

A SuperLink and 3 SuperNodes run on localhost as separate processes (one client each,
chosen by --node-config partition-id); `flwr run` submits this checkout. The runs must
end with the same weights as run.py on the same seed, bit for bit (server weights, and
under --bn local each node's private BN tensors), and write the same metrics.jsonl and
summary.json but for wall-clock seconds: every node rebuilds the method from the same
command line (same seed, same streams), trains with the same single thread, and the
payloads travel as the bytes fedmed.transmit counts, so nothing may differ.

Skipped where flwr is not installed (pip install -r requirements-flower.txt; .ci/run
installs it)."""
import math
import os
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("flwr", reason="flwr is not installed (pip install -r "
                    "requirements-flower.txt): the Flower deployment is not tested")

import fedmed  # noqa: E402
import flower_app  # noqa: E402
from helpers import drop_seconds, read_json, read_jsonl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = "--clients 3 --local-steps 2 --batch-size 8 --quiet --seed 3"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    home = tmp_path_factory.mktemp("flower")
    nodes = [{"partition-id": k, "state-dir": str(home / f"state{k}")} for k in range(3)]
    d = flower_app.LocalDeployment(str(home), nodes, env={"OMP_NUM_THREADS": "1"})
    with d:
        yield d


def run_py(args: str, out) -> None:
    p = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args.split(),
                        "--out", str(out)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert p.returncode == 0, p.stderr


def flower(deployment, args: str, out, **config):
    p = deployment.run(f"{args} --out {out}", timeout=600, **{"node-timeout": 60, **config})
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout + p.stderr


def assert_same_run(ref, fl, data_dir_differs: bool = False) -> dict:
    """Same server weights and state (bit for bit), metrics and summary but for seconds."""
    a = fedmed.load_checkpoint(os.path.join(ref, "checkpoint.pt"))
    b = fedmed.load_checkpoint(os.path.join(fl, "checkpoint.pt"))
    assert a["round"] == b["round"]
    wa, wb = a["server"]["weights"], b["server"]["weights"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert fedmed.state_digest(a["server"]["state"]) == fedmed.state_digest(b["server"]["state"])
    assert a["totals"]["bytes_up"] == b["totals"]["bytes_up"]
    assert a["totals"]["bytes_down"] == b["totals"]["bytes_down"]
    assert drop_seconds(read_jsonl(os.path.join(ref, "metrics.jsonl"))) == \
        drop_seconds(read_jsonl(os.path.join(fl, "metrics.jsonl")))
    sa, sb = read_json(os.path.join(ref, "summary.json")), read_json(os.path.join(fl, "summary.json"))
    assert drop_seconds(sa) == drop_seconds(sb)
    for name in sa.get("exported", []):     # model.pt, model-CLIENT.pt: the same tensors
        ea = torch.load(os.path.join(ref, name), weights_only=True)
        eb = torch.load(os.path.join(fl, name), weights_only=True)
        assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea), name
    ca, cb = read_json(os.path.join(ref, "config.json")), read_json(os.path.join(fl, "config.json"))
    for c, d in ((ca, ref), (cb, fl)):     # an FCU phase names its original run's folder
        if c["algorithm_args"].get("from_run"):
            c["algorithm_args"]["from_run"] = os.path.relpath(c["algorithm_args"]["from_run"],
                                                              os.path.dirname(d))
    if data_dir_differs:               # the server's folder holds the CSVs only
        assert ca["data"].pop("data_dir") != cb["data"].pop("data_dir")
    assert fedmed.comparable_config(ca) == fedmed.comparable_config(cb)
    assert ca["data_identity"] == cb["data_identity"]
    return a, b


def test_fedavg_on_three_supernodes_equals_run_py(deployment, tmp_path):
    """fedavg, 3 rounds, 3 clients on 3 SuperNodes == python run.py: identical weights,
    metrics (each client evaluated on its node), bytes and summary; model.pt exported."""
    args = f"--algo fedavg --rounds 3 {SMALL}"
    run_py(args, tmp_path / "ref")
    log = flower(deployment, args, tmp_path / "fl")
    assert_same_run(str(tmp_path / "ref"), str(tmp_path / "fl"))
    for k in range(3):
        assert f"holds client site{k}" in log
    a = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "fl" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fedbn_stopped_and_resumed_on_flower_equals_run_py(deployment, tmp_path):
    """--bn local (FedBN: each client's BN layers never leave its node), stopped after
    round 2 and continued with --resume from the server checkpoint and the nodes' kept
    states == one uninterrupted python run.py: identical global weights, identical
    private BN tensors on every node, identical metrics."""
    args = f"--algo fedavg --bn local --rounds 3 {SMALL}"
    run_py(args, tmp_path / "ref")
    out = tmp_path / "fl"
    log = flower(deployment, args + " --stop-after 2", out)
    assert "stopped after round 2" in log
    assert fedmed.load_checkpoint(os.path.join(out, "checkpoint.pt"))["round"] == 2
    flower(deployment, args + " --resume", out)
    a, b = assert_same_run(str(tmp_path / "ref"), str(out))
    token = b["transport"]["flower"]["token"]
    for k, saved in enumerate(a["clients"]):
        path = os.path.join(deployment.nodes[k]["state-dir"], token, f"site{k}.r3.pt")
        mine = fedmed.load_checkpoint(path)["state"]["private"]
        assert mine.keys() == saved["state"]["private"].keys() and mine
        for key in mine:
            assert torch.equal(mine[key], saved["state"]["private"][key]), (k, key)


def test_a_supernode_killed_mid_run_and_started_again_ends_as_run_py(deployment, tmp_path):
    """A real SuperNode process (site1's) is killed with SIGKILL as soon as it has kept
    its state after round 1, and started again (a new node id, the same state folder).
    With on-dropout = wait the server names the lost client, waits for the node to come
    back (the SuperLink reports the killed node gone after its missed heartbeats, about
    a minute), sends it the lost message again, and the run (FedBN: private BN layers on
    the nodes) ends bit for bit as python run.py."""
    import glob
    import threading
    args = f"--algo fedavg --bn local --rounds 3 {SMALL}"
    run_py(args, tmp_path / "ref")
    out, done = tmp_path / "fl", {}
    th = threading.Thread(target=lambda: done.update(p=deployment.run(
        f"{args} --out {out}", timeout=600, **{"node-timeout": 180, "on-dropout": "wait"})))
    th.start()
    kept = os.path.join(deployment.nodes[1]["state-dir"], "*", "site1.r1.pt")
    t0 = time.monotonic()
    while not glob.glob(kept) and th.is_alive() and time.monotonic() - t0 < 400:
        time.sleep(0.2)
    assert glob.glob(kept), "site1's node never kept its round-1 state"
    deployment.kill_node(1)
    time.sleep(1)
    deployment.start_node(1)
    th.join()
    p = done["p"]
    log = p.stdout + p.stderr
    assert p.returncode == 0, log
    assert "client site1 was lost" in log and "waiting up to" in log, log
    a, b = assert_same_run(str(tmp_path / "ref"), str(out))
    token = b["transport"]["flower"]["token"]
    for k, saved in enumerate(a["clients"]):
        path = os.path.join(deployment.nodes[k]["state-dir"], token, f"site{k}.r3.pt")
        mine = fedmed.load_checkpoint(path)["state"]["private"]
        for key in mine:
            assert torch.equal(mine[key], saved["state"]["private"][key]), (k, key)


# ---------------------------------------------------------------- without processes
# The server's and the nodes' code over a Grid that hands each message to
# flower_app.client_app in this process (as a SuperNode does, one ClientApp call per
# message), so that a node can be made to vanish at an exact message.

class InProcessGrid:
    """A stand-in for Flower's Grid. `vanish = (client, message type, round)`: that
    client's node leaves the federation when that message is pushed (never answers);
    `rejoin`: a new node (a new id, the same node config and state folder) then joins."""

    def __init__(self, nodes: list, vanish=None, rejoin: bool = False, late: int = 0,
                 garble=None, also=()):
        from flwr.supercore.task_identity import TaskIdentity
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.nodes = {1000 + k: conf for k, conf in enumerate(nodes)}
        self.vanish, self.gone, self.pending, self.count = vanish, set(), {}, 0
        self.rejoin = rejoin
        self.late, self.calls = late, 0          # the last `late` nodes join at the 3rd look
        self.garble = garble                     # (client, type, round): its reply is lost
        self.also = list(also)                   # node configs that join with the rejoin

    def get_node_ids(self):
        self.calls += 1
        ids = [n for n in self.nodes if n not in self.gone]
        return ids[:len(ids) - self.late] if self.calls < 3 else ids

    def push_messages(self, messages):
        from flwr.app import Context, Message, RecordDict
        ids = []
        for m in messages:
            self.count += 1
            m.metadata.__dict__["_message_id"] = mid = f"m{self.count}"
            node, rec = m.metadata.dst_node_id, m.content[flower_app.KEY]
            if self.vanish == (rec.get("client"), m.metadata.message_type, rec["round"] + 1):
                self.gone.add(node)
                self.vanish = None                  # once
                if self.rejoin:
                    self.nodes[max(self.nodes) + 1] = self.nodes[node]
                for conf in self.also:
                    self.nodes[max(self.nodes) + 1] = conf
            self.pushed = getattr(self, "pushed", []) + [m]
            if node not in self.gone:
                ctx = Context(run_id=1, node_id=node, node_config=self.nodes[node],
                              state=RecordDict(), run_config={})
                self.pending[mid] = flower_app.client_app(m, ctx)   # (the node did the work)
                if self.garble == (rec.get("client"), m.metadata.message_type, rec["round"] + 1):
                    from flwr.common import Error
                    from flwr.common.constant import ErrorCode
                    self.garble = None                  # once: Flower could not deliver it
                    self.pending[mid] = Message(Error(code=ErrorCode.MESSAGE_UNAVAILABLE,
                                                      reason="Reply message objects are "
                                                      "unavailable"), reply_to=m)
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        out = [self.pending.pop(i) for i in list(ids) if i in self.pending]
        self.pulled = getattr(self, "pulled", []) + out
        return out


def on_grid(grid, args: str, log: list, **config) -> int:
    import run
    t = flower_app.FlowerTransport(grid, {"node-timeout": 5, **config}, log=log.append)
    return run.main(args.split(), transport=t)


def nodes_in(tmp_path, **extra):
    return [{"partition-id": k, "state-dir": str(tmp_path / f"state{k}"), "isolate": True,
             **extra} for k in range(3)]


ARGS = "--algo fedavg --rounds 3 --clients 3 --local-steps 1 --batch-size 8 --quiet --seed 5"


def test_a_lost_client_is_logged_and_the_round_completes_with_the_others(tmp_path):
    """on-dropout = continue: site1's node vanishes when its round-2 update is sent; the
    server names it in the log, rounds 2 and 3 aggregate sites 0 and 2 (no upload bytes
    from site1) and are evaluated without it."""
    log = []
    out = tmp_path / "fl"
    grid = InProcessGrid(nodes_in(tmp_path), vanish=("site1", "train", 2))
    assert on_grid(grid, f"{ARGS} --out {out}", log) == 0
    assert any("round 2: client site1 dropped out" in s for s in log), log
    lines = read_jsonl(out / "metrics.jsonl")
    assert {m["client"] for m in lines if m["round"] == 1} == {"site0", "site1", "site2", "pooled"}
    for r in (2, 3):
        assert {m["client"] for m in lines if m["round"] == r} == {"site0", "site2", "pooled"}
    assert sum("site1 dropped out" in s for s in log) == 4, log   # train + evaluate, rounds 2, 3
    one = {m["client"]: m for m in lines if m["round"] == 1}
    two = {m["client"]: m for m in lines if m["round"] == 2}
    assert two["pooled"]["bytes_up"] == two["site0"]["bytes_up"] + two["site2"]["bytes_up"]
    assert two["pooled"]["bytes_down"] == 3 * one["site1"]["bytes_down"]   # it was sent
    assert read_json(out / "summary.json")["rounds"] == 3


def test_a_lost_client_stops_the_run_with_on_dropout_fail_and_resume_ends_as_run_py(
        tmp_path, capsys):
    """on-dropout = fail: site1's node vanishes during round 2; the run stops with one
    line naming the client and --resume, round 1's checkpoint kept. The node comes back
    (a new node id, the same state folder), --resume finishes the run, and it ends bit
    for bit as python run.py (run in this process) on the same seed."""
    import run
    out = tmp_path / "fl"
    grid = InProcessGrid(nodes_in(tmp_path), vanish=("site1", "train", 2))
    capsys.readouterr()
    assert on_grid(grid, f"{ARGS} --out {out}", [], **{"on-dropout": "fail"}) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "client site1" in err and "--resume" in err, err
    assert fedmed.load_checkpoint(str(out / "checkpoint.pt"))["round"] == 1
    assert on_grid(InProcessGrid(nodes_in(tmp_path)), f"{ARGS} --resume --out {out}", []) == 0
    assert run.main(f"{ARGS} --out {tmp_path / 'ref'}".split()) == 0
    assert_same_run(str(tmp_path / "ref"), str(out))


@pytest.mark.parametrize("kind,rnd", [("train", 2), ("evaluate", 2), ("train", 1)])
def test_on_dropout_wait_sends_again_to_the_node_that_comes_back_and_ends_as_run_py(
        tmp_path, kind, rnd):
    """on-dropout = wait: site1's node vanishes when its round-`rnd` message of `kind` is
    sent; the server names the client in the log, waits, a new node with the same state
    folder claims site1, the same message goes to it, and the run ends bit for bit as
    python run.py (every client trained and evaluated every round)."""
    import run
    log: list = []
    out = tmp_path / "fl"
    grid = InProcessGrid(nodes_in(tmp_path), vanish=("site1", kind, rnd), rejoin=True)
    assert on_grid(grid, f"{ARGS} --out {out}", log, **{"on-dropout": "wait"}) == 0
    assert any(f"round {rnd}: client site1 was lost" in s and "waiting" in s for s in log), log
    assert any("node 1003 holds client site1" in s for s in log), log
    assert run.main(f"{ARGS} --out {tmp_path / 'ref'}".split()) == 0
    assert_same_run(str(tmp_path / "ref"), str(out))


def test_a_second_node_for_a_client_after_round_1_replaces_the_first(tmp_path):
    """After rounds began, a new node that claims a client whose node is still registered
    (its SuperNode started again before the SuperLink dropped the old one) takes its
    place (logged), not a configuration error: site2's node vanishes in round 2 under
    wait, site2's and a second site1 node join, and the run ends as run.py."""
    import run
    log: list = []
    nodes = nodes_in(tmp_path)
    grid = InProcessGrid(nodes, vanish=("site2", "train", 2), rejoin=True, also=[nodes[1]])
    out = tmp_path / "fl"
    assert on_grid(grid, f"{ARGS} --out {out}", log, **{"on-dropout": "wait"}) == 0, log
    assert any("holds client site1 (in place of node 1001" in s for s in log), log
    assert run.main(f"{ARGS} --out {tmp_path / 'ref'}".split()) == 0
    assert_same_run(str(tmp_path / "ref"), str(out))


@pytest.mark.parametrize("mode", ["wait", "continue"])
def test_a_reply_flower_could_not_deliver_is_a_lost_client_not_an_error(tmp_path, mode):
    """Flower answers MESSAGE_UNAVAILABLE where a node died while uploading its reply (seen
    with a SuperNode killed mid-round). wait: the same message goes again to the same
    node, which answers from the state it kept, and the run ends as run.py; continue:
    the round completes without that client, which takes part again from round 3."""
    import run
    log: list = []
    out = tmp_path / "fl"
    grid = InProcessGrid(nodes_in(tmp_path), garble=("site1", "train", 2))
    assert on_grid(grid, f"{ARGS} --out {out}", log, **{"on-dropout": mode}) == 0, log
    assert any("client site1" in s and "reply did not arrive" in s for s in log), log
    if mode == "wait":
        assert run.main(f"{ARGS} --out {tmp_path / 'ref'}".split()) == 0
        assert_same_run(str(tmp_path / "ref"), str(out))
    else:
        lines = read_jsonl(out / "metrics.jsonl")
        two = {m["client"]: m for m in lines if m["round"] == 2}
        three = {m["client"]: m for m in lines if m["round"] == 3}
        assert two["site1"]["bytes_up"] == 0 and three["site1"]["bytes_up"] > 0


def test_on_dropout_wait_stops_in_one_line_when_no_node_comes_back(tmp_path, capsys):
    """on-dropout = wait, the node never returns: after node-timeout one line naming the
    client, its state folder and --resume; round 1's checkpoint kept."""
    out = tmp_path / "fl"
    grid = InProcessGrid(nodes_in(tmp_path), vanish=("site1", "train", 2))
    capsys.readouterr()
    assert on_grid(grid, f"{ARGS} --out {out}", [], **{"on-dropout": "wait",
                                                         "node-timeout": 1}) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "site1" in err and "--resume" in err, err
    assert fedmed.load_checkpoint(str(out / "checkpoint.pt"))["round"] == 1


def test_a_node_whose_data_folder_is_missing_fails_in_one_line(tmp_path, capsys):
    """A node whose --node-config data-dir does not exist: the run fails (exit 2) with one
    line naming the node and the folder, before any round."""
    missing = tmp_path / "no-such-folder"
    capsys.readouterr()
    grid = InProcessGrid(nodes_in(tmp_path, **{"data-dir": str(missing)}))
    assert on_grid(grid, f"{ARGS} --out {tmp_path / 'fl'}", []) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and "node " in err, err
    assert not (tmp_path / "fl" / "checkpoint.pt").exists()


def test_a_client_without_a_node_is_named(tmp_path, capsys):
    """Only two of the three clients have a node: after node-timeout the run fails in one
    line naming the client without one and how to start its node."""
    capsys.readouterr()
    grid = InProcessGrid(nodes_in(tmp_path)[:2])
    assert on_grid(grid, f"{ARGS} --out {tmp_path / 'fl'}", [], **{"node-timeout": 1}) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "site2" in err and "--node-config" in err, err


# ---------------------------------------------------------------- every method on Flower
# Each registered method through the Flower transport (the Grid stand-in above: the
# server's code and the nodes' code, every message a ClientApp call) against run.py in
# this process, bit for bit. A method whose server-side code read a client's state, or
# kept on `self` in `broadcast` what its `local_update` needs, fails here: on Flower the
# server never holds the clients' states and a node never runs `broadcast`.

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                            "head_width": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2,
                          "layers": 2}}
EVERY = "--clients 3 --local-steps 1 --batch-size 8 --quiet --seed 5 --rounds 2 --image-size 16"
CLIP = "--clip-model {tiny} --pretrained none --feature-cache {cache}"
ON_FLOWER = {
    "fedavg": "", "fedprox": "", "fedbn": "--algo fedavg --bn local",
    "fedbn_holdout": "--algo fedavg --bn local --clients 4 --holdout-client site3",
    "local": "--clients 4 --holdout-client site3",
    "dp": "--algo fedavg --bn local --dp-clip 1 --dp-noise 0.5 --dropout-prob 0.3 --rounds 3",
    "robust": "--algo fedavg --reject-factor 2 --attack scale --attackers site0 --clients 4",
    "faults": "--algo fedmic --dropout-prob 0.3 --attack nan --attackers site1 --rounds 3",
    "clip_zeroshot": CLIP, "clip_linear": CLIP, "fedclip": CLIP,
    "fedmedclip": CLIP + " --mask-compat code",
    "clip_svm": CLIP + " --image-tower mobilenet_v2 --svm --clients 4 --holdout-client site1",
    "fedlsm": "--dataset synthetic-multilabel --n-u 8 --n-c 20",
    "fedmic": "--bn local --clients 4 --holdout-client site3", "fgasl": "--unlabeled-fraction 0.6 --clients 4 --holdout-client site3",
    "fixmatch": "--unlabeled-fraction 0.6", "meanteacher": "--unlabeled-fraction 0.6",
    "fedal": "--al-cycles 1 --al-rounds-per-cycle 1 --al-initial 0.3",
    "fedal_sampled": "--algo fedal --bn local --fraction 0.5 --al-cycles 2 "
                     "--al-rounds-per-cycle 1 --al-initial 0.2 --clients 4 --holdout-client site3",
    "fedal_faults": "--algo fedal --al-cycles 1 --al-rounds-per-cycle 1 --al-initial 0.3 "
                    "--dropout-prob 0.3",      # FedAL inside the fault layer: its step one
}                                              # wrapper down, the layer's note around its own
VARIANTS = {"fedbn", "fedbn_holdout", "dp", "robust", "faults", "fedal_sampled", "fedal_faults"}
NOT_ON_FLOWER = {"pooled": "", "facmic": CLIP + " --clients 4 --holdout-client site3",
                 "fedal_reinit": "--algo fedal --al-reinit --al-cycles 1 --al-rounds-per-cycle 1"}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from helpers import register_clip_config
    return (register_clip_config(tmp_path_factory, "fedmed-tiny-flower", TINY_CLIP),
            str(tmp_path_factory.mktemp("features")))


def command(name: str, extra: str, tiny_clip) -> str:
    extra = extra.format(tiny=tiny_clip[0], cache=tiny_clip[1])
    algo = "" if "--algo" in extra else f" --algo {name}"
    return f"{EVERY} {extra}{algo}"


def test_every_registered_method_is_either_checked_on_flower_or_refused():
    """A method added later must be put in one of the two lists (and so be checked)."""
    import algorithms
    algorithms.load_all()
    refused = {"pooled", "facmic"}
    protocols = {"fcu"}                # several runs of the loop: test_fcu_on_flower_...
    assert set(ON_FLOWER) - VARIANTS | refused | protocols == set(fedmed.ALGORITHMS)
    for name in refused:
        assert fedmed.ALGORITHMS[name].crosses_sites, name
    for name in protocols:
        assert hasattr(fedmed.ALGORITHMS[name], "protocol"), name
    for name in set(ON_FLOWER) - VARIANTS:
        assert not fedmed.ALGORITHMS[name].crosses_sites, name


@pytest.mark.parametrize("name", sorted(ON_FLOWER))
def test_every_method_on_flower_ends_as_run_py(tmp_path, tiny_clip, name):
    """2 rounds on the Flower transport (one node per client, held-out clients on nodes
    of their own that only evaluate) == python run.py on the same seed: same server
    weights and state, bytes, metrics.jsonl and summary.json but for seconds."""
    import run
    args = command(name, ON_FLOWER[name], tiny_clip)
    n = int(args.split("--clients")[-1].split()[0])
    nodes = [{"partition-id": k, "state-dir": str(tmp_path / f"state{k}"), "isolate": True}
             for k in range(n)]
    assert run.main(f"{args} --out {tmp_path / 'ref'}".split()) == 0
    log: list = []
    assert on_grid(InProcessGrid(nodes), f"{args} --out {tmp_path / 'fl'}", log) == 0, log
    assert list(flower_app._BUILT)[0][2] is not None      # isolate: a build per node
    assert_same_run(str(tmp_path / "ref"), str(tmp_path / "fl"))
    notes = {"dp": ["dp_norm", "dropout"], "robust": ["rejected", "attack"],
             "faults": ["dropout", "rejected"], "fedal_faults": ["dropout"]}.get(name, [])
    lines = read_jsonl(tmp_path / "fl" / "metrics.jsonl")
    for key in notes:                  # the layer's notes travelled (node -> server -> node)
        assert any(key in m for m in lines), key
    if "--holdout-client" in args:
        held = args.split("--holdout-client")[-1].split()[0]
        assert any(f"holds client {held}" in s for s in log), log
        lines = read_jsonl(tmp_path / "fl" / "metrics.jsonl")
        rounds = read_json(tmp_path / "fl" / "config.json")["config"]["rounds"]
        assert {m["round"] for m in lines if m["client"] == held and m["holdout"]} == \
            set(range(1, rounds + 1))
    if name.startswith("fedal"):       # acquisitions took images; some without theta_k
        acq = read_json(tmp_path / "fl" / "summary.json")["al"]
        curve = read_json(tmp_path / "fl" / "summary.json")["al_curve"]
        assert acq["oracle_queries"] > 0 and curve[-1]["labelled"] > curve[0]["labelled"]
    if name == "fedal_sampled":        # picks with and without theta_k's scores (a client
        ck = torch.load(tmp_path / "fl" / "checkpoint.pt", weights_only=False)  # not sampled)
        assert {v["local_model"] for r in ck["server"]["state"]["al"]["acquisitions"]
                for v in r["clients"].values()} == {True, False}


def test_nodes_sharing_one_process_end_as_run_py(tmp_path):
    """Without `isolate` (Flower's simulation runtime: one process serves many virtual
    nodes) the nodes share one build of the federation; each still sees only its own
    client's state (FedBN with a held-out client, whose evaluation gathers the others'
    BN layers): bit for bit as run.py."""
    import run
    args = EVERY + " --algo fedavg --bn local --clients 4 --holdout-client site3"
    nodes = [{"partition-id": k, "state-dir": str(tmp_path / f"state{k}")} for k in range(4)]
    assert run.main(f"{args} --out {tmp_path / 'ref'}".split()) == 0
    flower_app._BUILT.clear()
    log: list = []
    assert on_grid(InProcessGrid(nodes), f"{args} --out {tmp_path / 'fl'}", log) == 0, log
    assert len(flower_app._BUILT) == 1 and list(flower_app._BUILT)[0][2] is None
    assert_same_run(str(tmp_path / "ref"), str(tmp_path / "fl"))


def test_fedal_stopped_mid_acquisition_phase_and_resumed_on_shared_nodes_ends_as_run_py(
        tmp_path, capsys):
    """FedAL (two acquisitions) on nodes that share one process: site1's node vanishes
    when its round-2 update is sent (just after acquisition 1), the run stops (on-dropout
    fail) at round 1's checkpoint; --resume runs acquisition 1 again from the pools the
    checkpoint kept, and the run ends bit for bit as python run.py."""
    import run
    args = (ARGS.replace("fedavg", "fedal") + " --image-size 16 --al-cycles 2 "
            "--al-rounds-per-cycle 1 --al-initial 0.2")
    nodes = [{"partition-id": k, "state-dir": str(tmp_path / f"state{k}")} for k in range(3)]
    out = tmp_path / "fl"
    flower_app._BUILT.clear()
    capsys.readouterr()
    grid = InProcessGrid(nodes, vanish=("site1", "train", 2))
    assert on_grid(grid, f"{args} --out {out}", [], **{"on-dropout": "fail"}) == 2
    assert "client site1" in capsys.readouterr().err
    ck = fedmed.load_checkpoint(str(out / "checkpoint.pt"))
    assert ck["round"] == 1 and ck["server"]["state"]["al"]["acquisitions"] == []
    assert on_grid(InProcessGrid(nodes), f"{args} --resume --out {out}", []) == 0
    assert len(flower_app._BUILT) == 1 and list(flower_app._BUILT)[0][2] is None
    assert run.main(f"{args} --out {tmp_path / 'ref'}".split()) == 0
    assert_same_run(str(tmp_path / "ref"), str(out))
    assert read_json(out / "summary.json")["al"]["oracle_queries"] > 0


FCU_ARGS = (EVERY + " --algo fcu --forget-client site1 --post-rounds 1 --post-local-steps 1 "
            "--unlearn-steps 2 --fusion-interval 1 --pga-epochs 1 --backdoor")


def assert_same_protocol(ref, fl, data_dir_differs: bool = False) -> None:
    """Every phase of an --algo fcu run as assert_same_run, and the audit (summary.json)
    the same but for seconds."""
    phases = read_json(os.path.join(ref, "config.json"))["phases"]
    assert phases == read_json(os.path.join(fl, "config.json"))["phases"]
    for phase in phases:
        assert_same_run(os.path.join(ref, phase), os.path.join(fl, phase), data_dir_differs)
    sa, sb = (read_json(os.path.join(d, "summary.json")) for d in (ref, fl))
    assert drop_seconds(sa) == drop_seconds(sb)


def test_fcu_on_flower_ends_as_run_py(tmp_path):
    """The whole unlearning protocol on Flower (one node per client; nodes that share a
    process): the original run, retraining, continued training, PGA (u's node takes its
    last local model from its own state of the original run), FCU under both FGMP
    conventions (u's node gets theta_o with the unlearning message), and the audit,
    whose reads of each client's images run on that client's node: every phase and
    the audit table bit for bit as python run.py."""
    import run
    from algorithms.fcu import FCU
    assert run.main(f"{FCU_ARGS} --out {tmp_path / 'ref'}".split()) == 0
    log: list = []
    reads, real = [], FCU.read_original

    def read_original(self, folder):       # the server's folder: only the server reads it
        reads.append(self.on_node)
        return real(self, folder)
    FCU.read_original = read_original
    try:
        assert on_grid(InProcessGrid(nodes_in(tmp_path)), f"{FCU_ARGS} --out {tmp_path / 'fl'}",
                       log) == 0, log
    finally:
        FCU.read_original = real
    assert reads == [False] * 4            # continue, pga, fcu, fcu_code: on the server
    assert_same_protocol(str(tmp_path / "ref"), str(tmp_path / "fl"))
    audit = read_json(tmp_path / "fl" / "summary.json")["audit"]
    assert set(audit) == {"original", "retrain", "continue", "pga", "fcu", "fcu_code"}
    assert all("backdoor_success" in a for a in audit.values())
    assert "before_post_training" in audit["fcu"]


def test_a_step_two_wrappers_down_runs_on_the_nodes(tmp_path, monkeypatch):
    """A base method whose server hook runs a step at the clients (at_clients), inside
    FedAL inside the fault layer: the step runs on each node at the base's level (two
    wrappers down), with the client's current pools; the run ends as run.py."""
    import algorithms
    import run
    algorithms.load_all()

    class Stepper(fedmed.ALGORITHMS["fedavg"]):
        def begin_round(self, server, clients):
            super().begin_round(server, clients)
            got = self.at_clients(server, clients, "pool_sizes", self.round)
            server.state.setdefault("sizes", []).append(got)

        def pool_sizes(self, server, client, t):
            return [t, len(client.train), len(client.unlabeled)]
    monkeypatch.setitem(fedmed.ALGORITHMS, "stepper", Stepper)
    args = (EVERY + " --algo fedal --base-algo stepper --al-cycles 1 --al-rounds-per-cycle 1 "
            "--al-initial 0.3 --dropout-prob 0.3")
    assert run.main(f"{args} --out {tmp_path / 'ref'}".split()) == 0
    assert on_grid(InProcessGrid(nodes_in(tmp_path)), f"{args} --out {tmp_path / 'fl'}", []) == 0
    assert_same_run(str(tmp_path / "ref"), str(tmp_path / "fl"))
    sizes = fedmed.load_checkpoint(str(tmp_path / "fl" / "checkpoint.pt"))["server"]["state"]["sizes"]
    assert [s[0][0] for s in sizes] == [0, 1]
    assert all(b[1] > a[1] for a, b in zip(sizes[0], sizes[1]))   # L_k grew at acquisition 1


def test_fcu_on_flower_stopped_in_its_original_run_and_resumed_ends_as_run_py(
        tmp_path, capsys):
    """site2's node is lost in round 2 of the original run (on-dropout fail): the
    protocol stops with one line; --resume continues the original run from its
    checkpoint, then every other phase and the audit: as python run.py."""
    import run
    out = tmp_path / "fl"
    capsys.readouterr()
    grid = InProcessGrid(nodes_in(tmp_path), vanish=("site2", "train", 2))
    assert on_grid(grid, f"{FCU_ARGS} --out {out}", [], **{"on-dropout": "fail"}) == 2
    assert "client site2" in capsys.readouterr().err
    assert not (out / "retrain").exists()
    assert on_grid(InProcessGrid(nodes_in(tmp_path)), f"{FCU_ARGS} --resume --out {out}",
                   []) == 0
    assert run.main(f"{FCU_ARGS} --out {tmp_path / 'ref'}".split()) == 0
    assert_same_protocol(str(tmp_path / "ref"), str(out))


def test_pga_on_flower_needs_u_s_state_of_the_original_run(tmp_path, capsys):
    """PGA starts from u's last local model, which stayed on u's node: a node started
    with another state-dir stops the run with one line naming the missing file."""
    args = FCU_ARGS + " --unlearn-methods pga"
    assert on_grid(InProcessGrid(nodes_in(tmp_path)), f"{args} --out {tmp_path / 'fl'}",
                   []) == 0
    moved = nodes_in(tmp_path / "elsewhere")
    capsys.readouterr()
    assert on_grid(InProcessGrid(moved), f"{args} --overwrite --reuse-original "
                   f"{tmp_path / 'fl'} --out {tmp_path / 'again'}", []) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "state at the end of the run" in err, err


def peeking(where: str, from_round: int = 0):
    """fedavg whose server-side `aggregate` (where = "server") or whose `local_update` on
    a node (where = "node") reads another client's state, as a wiring slip would (from
    round `from_round` on, 0-based)."""
    base = fedmed.ALGORITHMS["fedavg"]

    class Peeking(base):
        def aggregate(self, server, uploads):
            if where == "server" and self.round >= from_round:
                self.clients[1].state.get("private")
            return super().aggregate(server, uploads)

        def local_update(self, client, payload):
            if where == "node":
                [c.state.get("private") for c in self.clients]
            return super().local_update(client, payload)
    return Peeking


@pytest.mark.parametrize("where,needle", [("server", "client site1's state on the server"),
                                          ("node", "on the node of client site0")])
def test_a_method_that_reads_a_client_s_state_where_it_is_not_fails_in_one_line(
        tmp_path, capsys, monkeypatch, where, needle):
    """In process every state is at hand; on Flower the server holds none and a node only
    its own client's. A read of another's (which would silently see the state `setup`
    made) is one line naming the method and the client, exit 2; run.py runs it."""
    import run
    monkeypatch.setitem(fedmed.ALGORITHMS, "fedavg", peeking(where))
    assert run.main(f"{ARGS} --out {tmp_path / 'ref'}".split()) == 0
    capsys.readouterr()
    assert on_grid(InProcessGrid(nodes_in(tmp_path)), f"{ARGS} --out {tmp_path / 'fl'}", []) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "--algo fedavg" in err, err


def test_a_private_tensor_that_goes_nan_on_a_node_stops_the_run_in_one_line(
        tmp_path, capsys, monkeypatch):
    """FedBN whose local update leaves a NaN in a private BN layer, which never leaves
    the node: the node checks it (fedmed.check_private, as the in-process loop does) and
    the run stops with one line naming the round, the client and the tensor (the exit
    status of a diverged run); round 1's checkpoint is kept."""
    import algorithms
    algorithms.load_all()
    base = fedmed.ALGORITHMS["fedavg"]

    class NaNPrivate(base):
        def local_update(self, client, payload):
            up = super().local_update(client, payload)
            if self.round == 1 and client.name == "site2":
                key = next(iter(client.state["private"]))
                client.state["private"][key] = client.state["private"][key].float() * math.nan
            return up
    monkeypatch.setitem(fedmed.ALGORITHMS, "fedavg", NaNPrivate)
    capsys.readouterr()
    out = tmp_path / "fl"
    assert on_grid(InProcessGrid(nodes_in(tmp_path)), f"{ARGS} --bn local --out {out}",
                   []) == fedmed.EXIT_DIVERGED
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "round 2" in err and "site2" in err, err
    assert "NaN" in err and fedmed.load_checkpoint(str(out / "checkpoint.pt"))["round"] == 1


@pytest.mark.parametrize("flags,subs", [
    ("--seeds 4 5", ["seed-4", "seed-5"]),
    ("--leave-one-out --seeds 4", ["fold-site0/seed-4", "fold-site1/seed-4", "fold-site2/seed-4"])])
def test_seeds_and_leave_one_out_on_flower_end_as_run_py(tmp_path, flags, subs):
    """--seeds and --leave-one-out run the loop once per seed and fold; each run's nodes
    build it from that run's command line (--seed S, --holdout-client FOLD) and are asked
    again which client they hold (nodes named by client, as sites are): every run and
    the mean +- sd table equal python run.py's."""
    import run
    args = f"--algo fedavg --bn local --rounds 2 --clients 3 --local-steps 1 --batch-size 8 --quiet {flags}"
    nodes = [{"client": f"site{k}", "state-dir": str(tmp_path / f"state{k}"), "isolate": True}
             for k in range(3)]
    assert run.main(f"{args} --out {tmp_path / 'ref'}".split()) == 0
    log: list = []
    assert on_grid(InProcessGrid(nodes), f"{args} --out {tmp_path / 'fl'}", log) == 0, log
    for sub in subs:
        assert_same_run(str(tmp_path / "ref" / sub), str(tmp_path / "fl" / sub))
    table = "loco.json" if "fold" in subs[0] else "seeds.json"
    a, b = read_json(tmp_path / "ref" / table), read_json(tmp_path / "fl" / table)
    assert a.pop("argv") != b.pop("argv")                  # (--out differs)
    assert drop_seconds(a) == drop_seconds(b) and a["status"] == "done"
    assert sum("holds client site0" in s for s in log) == len(subs)


@pytest.mark.parametrize("flags,needle", [
    ("--secagg", "--secagg"),
    ("--algo clip_svm --image-tower mobilenet_v2 --svm --svm-pooled --holdout-client site2 "
     + CLIP, "--svm-pooled")])
def test_what_reads_every_client_in_one_place_is_refused_on_flower(tmp_path, tiny_clip,
                                                                   capsys, flags, needle):
    """--secagg simulates its key agreement and unmasking in one process; --svm-pooled
    fits one classifier on every client's features: one line each, exit 2."""
    flags = flags.format(tiny=tiny_clip[0], cache=tiny_clip[1])
    capsys.readouterr()
    assert on_grid(InProcessGrid([]), f"{ARGS} {flags} --out {tmp_path / 'fl'}", []) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "python run.py" in err, err


@pytest.mark.parametrize("name", sorted(NOT_ON_FLOWER))
def test_methods_that_read_a_client_s_data_elsewhere_are_refused_on_flower(
        tmp_path, tiny_clip, capsys, name):
    """pooled, FACMIC (every client trains on the target's images) and FedAL's
    --al-reinit (every client's state restarted from the server's hook): one line naming
    the method, exit 2, before any node is asked (a Grid without nodes)."""
    args = command(name, NOT_ON_FLOWER[name], tiny_clip)
    algo = args.split("--algo ")[1].split()[0]
    capsys.readouterr()
    out = tmp_path / "fl"
    assert on_grid(InProcessGrid([]), f"{args} --out {out}", []) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--algo {algo}" in err and "python run.py" in err, err
    if name == "fedal_reinit":
        assert "--al-reinit" in err, err
    assert not out.exists() or not (out / "checkpoint.pt").exists()


# ---------------------------------------------------------------- real data, real sites

ISIC = os.path.join(os.path.dirname(ROOT), "shared", "data", "isic2019-mini")
CSVS = ("ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_Metadata.csv",
        "HAM10000_metadata.csv")


def site_folder(path, images=()) -> str:
    """An ISIC 2019 folder of symlinks: the three CSVs and the images named."""
    os.makedirs(os.path.join(path, "ISIC_2019_Training_Input"))
    for name in CSVS:
        os.symlink(os.path.join(ISIC, name), os.path.join(path, name))
    for f in images:
        os.symlink(os.path.join(ISIC, f), os.path.join(path, f))
    return str(path)


@pytest.mark.skipif(not os.path.isfile(os.path.join(ISIC, CSVS[0])),
                    reason=f"real data absent: {ISIC} (the shared isic2019-mini copy)")
@pytest.mark.parametrize("method", ["--algo fedavg --bn local",
                                    "--algo fedal --bn local --al-cycles 1 --al-rounds-per-cycle 1 "
                                    "--al-initial 0.3",
                                    "--algo fcu --forget-client MSK --post-rounds 1 "
                                    "--post-local-steps 1 --unlearn-steps 2 --fusion-interval 1 "
                                    "--pga-epochs 1 --unlearn-methods retrain,pga,fcu"])
def test_isic_sites_holding_only_their_own_images_and_a_server_with_none_end_as_run_py(
        tmp_path, method):
    """Real ISIC 2019 (three Fed-ISIC2019 centres): each node's folder holds the CSVs and
    its own centre's images only, the server's folder the CSVs only; the run ends bit
    for bit as python run.py on the whole folder (FedBN: private BN layers on the
    nodes; FedAL: each node picks the images of its own pool to label). A node never
    decodes another centre's image (they are not there), the server none."""
    import datasets
    import run
    cat = datasets.catalog_isic2019(datasets.Path(ISIC))
    names = ["HAM_vidir_modern", "HAM_rosendahl", "MSK"]
    nodes = []
    for k, name in enumerate(names):
        mine = [f for f, s in zip(cat.files, cat.site) if s == datasets.ISIC2019_CENTRES.index(name)]
        nodes.append({"client": name, "state-dir": str(tmp_path / f"state{k}"),
                      "data-dir": site_folder(tmp_path / f"site{k}", mine)})
    args = (f"{method} --dataset isic2019 --only-clients HAM_vidir_modern,HAM_rosendahl,MSK "
            "--max-images-per-client 40 --image-size 32 --rounds 2 --local-steps 1 "
            "--batch-size 8 --cache-dir none --quiet --seed 1")
    assert run.main(f"{args} --data-dir {ISIC} --out {tmp_path / 'ref'}".split()) == 0
    server = site_folder(tmp_path / "server")
    log: list = []
    assert on_grid(InProcessGrid(nodes), f"{args} --data-dir {server} --out {tmp_path / 'fl'}",
                   log) == 0, log
    fcu = "--algo fcu" in method                      # (a protocol: a folder per phase)
    (assert_same_protocol if fcu else assert_same_run)(
        str(tmp_path / "ref"), str(tmp_path / "fl"), data_dir_differs=True)
    info = read_json(tmp_path / "fl" / ("original" if fcu else "") / "config.json")["dataset_info"]
    assert info["images_decoded"] == 0 and info["images"] == 120
    if "fedal" in method:
        assert read_json(tmp_path / "fl" / "summary.json")["al"]["oracle_queries"] > 0


@pytest.mark.skipif(not os.path.isfile(os.path.join(ISIC, CSVS[0])),
                    reason=f"real data absent: {ISIC} (the shared isic2019-mini copy)")
def test_isic_nodes_without_a_data_dir_read_the_run_s_folder(tmp_path):
    """Nodes given no data-dir (a folder every party mounts at the same path) read the
    command line's --data-dir; with isolate each decodes its own centre's images only:
    bit for bit as run.py."""
    import run
    args = ("--algo fedavg --bn local --dataset isic2019 --only-clients HAM_rosendahl,MSK "
            f"--max-images-per-client 30 --image-size 32 --rounds 1 --local-steps 1 "
            f"--batch-size 8 --cache-dir none --quiet --seed 2 --data-dir {ISIC}")
    nodes = [{"client": name, "state-dir": str(tmp_path / f"state{k}"), "isolate": True}
             for k, name in enumerate(["HAM_rosendahl", "MSK"])]
    assert run.main(f"{args} --out {tmp_path / 'ref'}".split()) == 0
    assert on_grid(InProcessGrid(nodes), f"{args} --out {tmp_path / 'fl'}", []) == 0
    assert_same_run(str(tmp_path / "ref"), str(tmp_path / "fl"))


@pytest.mark.skipif(not os.path.isfile(os.path.join(ISIC, CSVS[0])),
                    reason=f"real data absent: {ISIC} (the shared isic2019-mini copy)")
def test_a_site_missing_one_of_its_own_images_fails_in_one_line_naming_it(tmp_path, capsys):
    """A site whose folder lacks an image of its own client: one line naming the file and
    the node, exit 2, before any round (another site's images are not needed)."""
    import datasets
    cat = datasets.catalog_isic2019(datasets.Path(ISIC))
    mine = [f for f, s in zip(cat.files, cat.site) if s == datasets.ISIC2019_CENTRES.index("MSK")]
    folder = site_folder(tmp_path / "site", mine)
    args = ("--algo fedavg --dataset isic2019 --only-clients MSK --max-images-per-client 40 "
            "--image-size 32 --rounds 1 --local-steps 1 --batch-size 8 --cache-dir none --quiet "
            "--seed 0")
    used = datasets.load(datasets.namespace(dataset="isic2019", data_dir=ISIC, only_clients="MSK",
                                            max_images_per_client=40, image_size=32,
                                            cache_dir="none"), seed=0).files
    os.remove(os.path.join(folder, used[0]))
    capsys.readouterr()
    node = {"client": "MSK", "state-dir": str(tmp_path / "state"), "data-dir": folder}
    assert on_grid(InProcessGrid([node]), f"{args} --data-dir {site_folder(tmp_path / 'server')} "
                   f"--out {tmp_path / 'fl'}", []) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and used[0] in err and "node " in err, err
    assert not (tmp_path / "fl" / "checkpoint.pt").exists()


def test_the_wire_refuses_anything_but_tensors_and_plain_values(tmp_path):
    """unpack loads with weights_only: a payload that would run code when unpickled (an
    object of any class) is refused, not executed."""
    import io
    import pickle
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2), "x": Opaque()}, buf)
    with pytest.raises(pickle.UnpicklingError):
        flower_app.unpack(buf.getvalue())
    assert torch.equal(flower_app.unpack(flower_app.pack({"w": torch.ones(3)}))["w"], torch.ones(3))
    assert flower_app.pack({}) == b"" and flower_app.unpack(b"") == {}


class Opaque:
    """Any class: what a malicious payload would carry."""


def test_run_config_defaults_are_the_documented_ones():
    """node-timeout 120 s, no round-timeout, on-dropout continue (pyproject.toml's)."""
    t = flower_app.FlowerTransport(None, {})
    assert (t.node_timeout, t.round_timeout, t.on_dropout) == (120.0, None, "continue")
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    assert "node-timeout = 120" in text and "round-timeout = 0" in text
    assert 'on-dropout = "continue"' in text


def test_the_flower_byte_and_second_counters_add_up_every_message(tmp_path):
    """transport.wire counts the serialised records of every message sent and every reply
    received (bench/vs_flower.py's "Flower message bytes"), node_seconds the seconds the
    nodes report inside local_update and evaluation: both equal the sums over the
    messages the Grid carried."""
    import run
    grid = InProcessGrid(nodes_in(tmp_path))
    t = flower_app.FlowerTransport(grid, {"node-timeout": 5}, log=lambda s: None)
    t0 = time.perf_counter()
    assert run.main(f"{ARGS} --out {tmp_path / 'fl'}".split(), transport=t) == 0
    wall = time.perf_counter() - t0
    assert 0 < t.node_seconds["train"] < wall and 0 < t.node_seconds["evaluate"] < wall
    assert t.wire["sent"] == sum(flower_app._size(m) for m in grid.pushed) > 0
    assert t.wire["received"] == sum(flower_app._size(m) for m in grid.pulled) > 0
    reported = {"train": 0.0, "evaluate": 0.0}
    for m in grid.pulled:
        rec = dict(m.content[flower_app.KEY])
        if "upload" in rec:
            reported["train"] += rec["seconds"]
        elif "lines" in rec:
            reported["evaluate"] += rec["seconds"]
    assert t.node_seconds == pytest.approx(reported) and reported["train"] > 0


def test_two_nodes_that_claim_one_client_before_round_1_fail_in_one_line(tmp_path, capsys):
    """Before any round two nodes given the same client are a configuration error (after
    round 1 a new claimant replaces a lost node: on-dropout = wait)."""
    nodes = nodes_in(tmp_path) + [{"partition-id": 0, "state-dir": str(tmp_path / "again")}]
    capsys.readouterr()
    assert on_grid(InProcessGrid(nodes), f"{ARGS} --out {tmp_path / 'fl'}", []) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "both hold client site0" in err, err


def test_a_server_that_reads_a_client_s_state_after_resume_fails_in_one_line(
        tmp_path, capsys, monkeypatch):
    """The guard holds after --resume too (the checkpoint's client records hold no state
    on Flower): a server-side read in round 2 of a resumed run is one line, exit 2."""
    monkeypatch.setitem(fedmed.ALGORITHMS, "fedavg", peeking("server", from_round=1))
    out = tmp_path / "fl"
    assert on_grid(InProcessGrid(nodes_in(tmp_path)), f"{ARGS} --stop-after 1 --out {out}",
                   []) == 0
    capsys.readouterr()
    assert on_grid(InProcessGrid(nodes_in(tmp_path)), f"{ARGS} --resume --out {out}", []) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "client site1's state on the server" in err, err


def test_a_held_out_client_s_node_that_joins_late_is_waited_for(tmp_path):
    """The held-out client's node appears after the training clients' nodes: the server
    waits for it too (every client, held out or not, needs a node) and evaluates it."""
    args = EVERY + " --algo fedavg --clients 3 --holdout-client site2"
    log: list = []
    grid = InProcessGrid(nodes_in(tmp_path), late=1)
    assert on_grid(grid, f"{args} --out {tmp_path / 'fl'}", log) == 0, log
    lines = read_jsonl(tmp_path / "fl" / "metrics.jsonl")
    assert {m["round"] for m in lines if m["client"] == "site2" and m["holdout"]} == {1, 2}
