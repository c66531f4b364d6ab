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
import os
import subprocess
import sys

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


def assert_same_run(ref, fl) -> dict:
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
    for s in (sa, sb):                 # models that need the nodes' private tensors
        s.pop("exported", None)        # are not exported by a Flower server
        s.pop("client_n", None)
    assert drop_seconds(sa) == drop_seconds(sb)
    ca, cb = read_json(os.path.join(ref, "config.json")), read_json(os.path.join(fl, "config.json"))
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
