"""Issue #18, the core half: a run is never silently wrong. Each test states the failure
it guards against; each failed on the code before its fix."""
import json
import os

import numpy as np
import pytest
import torch

import datasets
import fedmed
import run
from fedmed import Config, UsageError
from helpers import read_jsonl

import algorithms  # noqa: E402 - the methods register themselves

algorithms.load_all()


@pytest.fixture(scope="module")
def fed():
    return datasets.make_synthetic(seed=3, clients=3, image_size=16)


def cli(tmp_path, *flags, name="out"):
    out = str(tmp_path / name)
    base = ["--image-size", "16", "--clients", "3", "--rounds", "3", "--local-epochs", "1",
            "--batch-size", "16", "--quiet", "--out", out]
    return run.main(base + list(flags)), out


def stderr_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


class _Trap:
    """Unpickling this calls open(marker, "w"): a file appears iff the loader ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------- loading never runs code

def test_resume_does_not_execute_a_tampered_checkpoint(tmp_path, capsys):
    rc, out = cli(tmp_path, "--stop-after", "1")
    assert rc == 0
    marker = tmp_path / "pwned"
    ck = os.path.join(out, "checkpoint.pt")
    torch.save({"round": 1, "trap": _Trap(str(marker))}, ck)
    rc, _ = cli(tmp_path, "--resume")
    err = stderr_line(capsys)
    assert rc == 2 and ck in err
    assert not marker.exists()


def test_fcu_phase_checkpoint_is_loaded_without_running_code(tmp_path, fed):
    from algorithms.fcu import FCU
    marker = tmp_path / "pwned"
    folder = tmp_path / "original"
    folder.mkdir()
    torch.save({"round": 1, "trap": _Trap(str(marker))}, folder / "checkpoint.pt")
    cfg = Config(algo="fcu", model="cnn", rounds=1, local_steps=1, batch_size=8)
    auditor = FCU.auditor(cfg, FCU.Args(), fed)
    with pytest.raises(UsageError, match="checkpoint.pt"):
        auditor.audit.run(str(folder))
    assert not marker.exists()


# ---------------------------------------------------------------- divergence

def strict_json(path):
    """Parse as JSON proper: NaN/Infinity (which json.dumps writes by default) fail."""
    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")
    with open(path) as f:
        return [json.loads(s, parse_constant=refuse) for s in f if s.strip()] \
            if str(path).endswith(".jsonl") else json.loads(f.read(), parse_constant=refuse)


class _NanInRound2(fedmed.ALGORITHMS["fedavg"]):
    """FedAvg whose client 1 uploads a NaN weight in round 2."""
    def local_update(self, client, payload):
        up = super().local_update(client, payload)
        if self.round == 1 and client.id == 1:
            key = next(iter(up["w"]))
            up["w"][key] = up["w"][key].clone().fill_(float("nan"))
        return up


def test_a_nan_weight_stops_the_run_naming_round_and_client_and_keeps_round_1(
        tmp_path, capsys):
    fedmed.ALGORITHMS["_nan2"] = _NanInRound2
    try:
        rc, out = cli(tmp_path, "--algo", "_nan2")
    finally:
        del fedmed.ALGORITHMS["_nan2"]
    err = stderr_line(capsys)
    assert rc == fedmed.EXIT_DIVERGED == 3
    assert "round 2" in err and "site1" in err and "round 1" in err
    ck = fedmed.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["round"] == 1 and fedmed.first_nonfinite(ck["server"]["weights"]) is None
    assert {m["round"] for m in strict_json(os.path.join(out, "metrics.jsonl"))} == {1}
    assert not os.path.exists(os.path.join(out, "summary.json"))


@pytest.mark.parametrize("kw", [{"lr": 1e30}, {"lr": float("nan")},
                                {"loss": "focal", "focal_gamma": -5.0},
                                {"momentum": 2.0, "local_steps": 40}])
def test_divergent_settings_are_caught_at_runtime(tmp_path, fed, kw):
    """Whatever the flag checks let through: a non-finite loss or weight is an error."""
    cfg = Config(**{"model": "cnn", "rounds": 2, "batch_size": 16, **kw})
    with pytest.raises(fedmed.Diverged, match=r"round \d, client site\d"):
        fedmed.run(cfg, None, fed, str(tmp_path / "o"), quiet=True)
    assert not os.path.exists(tmp_path / "o" / "summary.json")
    strict_json(tmp_path / "o" / "metrics.jsonl")


def test_summary_is_strict_json_and_names_clients_without_a_metric(tmp_path, fed):
    """AUROC is undefined on a test set of one class: the mean is over the other clients,
    the client is named, and no NaN reaches a file."""
    y = fed.y.numpy()
    c0 = fed.clients[0]
    one_class = c0.test[y[c0.test] == y[c0.test][0]]
    clients = [datasets.ClientSplit(c0.name, c0.train, one_class)] + list(fed.clients[1:])
    f2 = datasets.Federation("one-class", fed.classes, fed.x, fed.y, clients)
    s = fedmed.run(Config(model="cnn", rounds=1, batch_size=16), None, f2,
                   str(tmp_path / "o"), quiet=True)
    disk = strict_json(tmp_path / "o" / "summary.json")
    lines = strict_json(tmp_path / "o" / "metrics.jsonl")
    assert disk["undefined_for"] == {"macro_auroc": [c0.name]}
    assert disk["clients"][c0.name]["macro_auroc"] is None
    others = [m["macro_auroc"] for m in lines if m["client"] in ("site1", "site2")]
    assert disk["macro_auroc"] == pytest.approx(sum(others) / 2)
    assert s["balanced_accuracy"] == disk["balanced_accuracy"]


# ---------------------------------------------------------------- resume on other data

def test_resume_on_changed_data_is_refused_naming_the_client(tmp_path, fed):
    """Rows removed from a CSV: the same flags, but client 1's rows now hold other files
    (and labels); the restored indices would point at other images."""
    out = str(tmp_path / "o")
    cfg = Config(model="cnn", rounds=2, batch_size=16)
    fedmed.run(cfg, None, fed, out, stop_after=1, quiet=True)
    files = [f"img{i}.jpg" for i in range(len(fed.y))]
    shifted = datasets.Federation(fed.name, fed.classes, fed.x, fed.y, fed.clients,
                                  files=files[1:] + files[:1])
    plain = datasets.Federation(fed.name, fed.classes, fed.x, fed.y, fed.clients, files=files)
    fedmed.run(cfg, None, plain, str(tmp_path / "p"), stop_after=1, quiet=True)
    with pytest.raises(UsageError, match="data changed.*client site0"):
        fedmed.run(cfg, None, shifted, str(tmp_path / "p"), resume=True, quiet=True)
    y2 = fed.y.clone()
    y2[fed.clients[1].train[0]] = (y2[fed.clients[1].train[0]] + 1) % len(fed.classes)
    relabelled = datasets.Federation(fed.name, fed.classes, fed.x, y2, fed.clients)
    with pytest.raises(UsageError, match="data changed.*client site1"):
        fedmed.run(cfg, None, relabelled, out, resume=True, quiet=True)
    assert fedmed.run(cfg, None, fed, out, resume=True, quiet=True)["rounds"] == 2


# ---------------------------------------------------------------- --resume with --rounds

def test_resume_with_fewer_rounds_than_done_is_refused(tmp_path, capsys):
    rc, out = cli(tmp_path)
    before = open(os.path.join(out, "summary.json")).read()
    rc, _ = cli(tmp_path, "--resume", "--rounds", "2")
    err = stderr_line(capsys)
    assert rc == 2 and "--rounds" in err and "3 rounds" in err
    assert open(os.path.join(out, "summary.json")).read() == before
    assert json.load(open(os.path.join(out, "config.json")))["config"]["rounds"] == 3


def test_resume_with_more_rounds_extends_the_run_and_records_it(tmp_path):
    """3 rounds then --resume --rounds 5 = 5 rounds straight (FedAvg's rounds do not
    depend on R); config.json holds the new total and both invocations."""
    rc, full = cli(tmp_path, "--rounds", "5", name="full")
    rc, out = cli(tmp_path)
    rc2, _ = cli(tmp_path, "--resume", "--rounds", "5")
    assert rc == rc2 == 0
    rec = json.load(open(os.path.join(out, "config.json")))
    assert rec["config"]["rounds"] == 5
    assert [(h["rounds"], h["from_round"]) for h in rec["history"]] == [(3, 0), (5, 3)]
    assert rec["history"][1]["argv"][-3:] == ["--resume", "--rounds", "5"] == rec["argv"][-3:]
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["rounds"] == 5 and max(m["round"] for m in read_jsonl(
        os.path.join(out, "metrics.jsonl"))) == 5
    a = fedmed.load_checkpoint(os.path.join(full, "checkpoint.pt"))["server"]["weights"]
    b = fedmed.load_checkpoint(os.path.join(out, "checkpoint.pt"))["server"]["weights"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    s_full = json.load(open(os.path.join(full, "summary.json")))
    assert s["balanced_accuracy"] == s_full["balanced_accuracy"]


def test_resume_without_rounds_continues_to_the_recorded_total(tmp_path):
    rc, out = cli(tmp_path, "--stop-after", "1")
    rc = run.main(["--image-size", "16", "--clients", "3", "--local-epochs", "1",
                   "--batch-size", "16", "--quiet", "--out", out, "--resume"])
    assert rc == 0
    assert json.load(open(os.path.join(out, "summary.json")))["rounds"] == 3


# ---------------------------------------------------------------- --overwrite

def test_overwrite_leaves_nothing_of_the_old_run(tmp_path, capsys):
    """An FCU run (phase folders) replaced by FedAvg: no phase folder, no temporary, no
    old file is left for a later --resume to pick up."""
    out = tmp_path / "out"
    (out / "original").mkdir(parents=True)
    for name in ("original/checkpoint.pt", "original/config.json", "config.json",
                 "summary.json", "checkpoint.pt.tmp123"):
        (out / name).write_text("old")
    rc, _ = cli(tmp_path, "--overwrite", "--stop-after", "1")
    assert rc == 0
    assert sorted(n for n in os.listdir(out) if n != fedmed.LOCK_NAME) == [
        "checkpoint.pt", "config.json", "metrics.jsonl"]
    rc, _ = cli(tmp_path, "--resume")
    assert rc == 0


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    rc, _ = cli(tmp_path, "--overwrite")
    err = stderr_line(capsys)
    assert rc == 2 and "thesis.tex" in err and (out / "thesis.tex").read_text() == "precious"


# ---------------------------------------------------------------- one run per folder

def test_a_second_process_on_the_same_out_is_refused_naming_the_first(tmp_path, capsys):
    import subprocess
    import sys
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, fedmed\nwith fedmed.locked(sys.argv[1]):\n"
         "    print('locked', flush=True); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert holder.stdout.readline().strip() == "locked"
        for flags in ([], ["--overwrite"], ["--resume"]):
            rc, _ = cli(tmp_path, *flags)
            err = stderr_line(capsys)
            assert rc == 2 and f"PID {holder.pid}" in err, err
        assert os.listdir(out) == [fedmed.LOCK_NAME]              # nothing written
    finally:
        holder.communicate("")                                    # the holder exits
    rc, _ = cli(tmp_path)                                         # released with it
    assert rc == 0


# ---------------------------------------------------------------- metrics.jsonl on resume

def test_resume_drops_a_torn_last_line_and_keeps_the_byte_totals(tmp_path):
    rc, full = cli(tmp_path, name="full")
    rc, out = cli(tmp_path, "--stop-after", "1")
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"round": 2, "client": "si')                     # killed mid-write
    rc, _ = cli(tmp_path, "--resume")
    assert rc == 0
    lines = strict_json(os.path.join(out, "metrics.jsonl"))
    assert [m["round"] for m in lines] == [m["round"] for m in read_jsonl(
        os.path.join(full, "metrics.jsonl"))]
    s, s_full = (json.load(open(os.path.join(d, "summary.json"))) for d in (out, full))
    assert (s["bytes_up"], s["bytes_down"]) == (s_full["bytes_up"], s_full["bytes_down"]) != (0, 0)


def test_resume_without_metrics_or_with_a_damaged_line_is_refused(tmp_path, capsys):
    rc, out = cli(tmp_path, "--stop-after", "2")
    path = os.path.join(out, "metrics.jsonl")
    good = open(path).read()
    with open(path, "w") as f:
        f.write("garbage\n" + good)
    rc, _ = cli(tmp_path, "--resume")
    assert rc == 2 and "line 1" in stderr_line(capsys)
    os.remove(path)
    rc, _ = cli(tmp_path, "--resume")
    assert rc == 2 and "metrics.jsonl is missing" in stderr_line(capsys)
    with open(path, "w") as f:                                    # round 2 lost
        f.write("".join(s + "\n" for s in good.splitlines() if '"round": 1,' in s))
    rc, _ = cli(tmp_path, "--resume")
    assert rc == 2 and "round 2" in stderr_line(capsys)


# ---------------------------------------------------------------- checkpoint integrity

def test_a_flipped_float_in_the_checkpoint_is_refused(tmp_path, capsys):
    rc, out = cli(tmp_path, "--stop-after", "1")
    path = os.path.join(out, "checkpoint.pt")
    ck = torch.load(path, weights_only=False)
    w = ck["server"]["weights"]
    key = next(k for k, v in w.items() if v.is_floating_point())
    bits = w[key].view(torch.int32).reshape(-1)
    bits[0] ^= 1                                                  # one mantissa bit
    torch.save(ck, path)
    rc, _ = cli(tmp_path, "--resume")
    err = stderr_line(capsys)
    assert rc == 2 and "checksum" in err and path in err


# ---------------------------------------------------------------- temporaries

def test_a_full_disk_leaves_no_temporary_and_the_old_file(tmp_path, monkeypatch):
    import errno
    path = tmp_path / "summary.json"
    path.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        fedmed.atomic_write(str(path), "new")
    assert os.listdir(tmp_path) == ["summary.json"] and path.read_text() == "old"


# ---------------------------------------------------------------- Ctrl-C

def test_ctrl_c_is_one_line_with_the_command_that_continues(tmp_path, capsys, monkeypatch):
    cls = fedmed.ALGORITHMS["fedavg"]
    original = cls.local_update
    pressed = []

    def press_ctrl_c_in_round_2(self, client, payload):
        if self.round == 1 and not pressed:
            pressed.append(1)
            raise KeyboardInterrupt
        return original(self, client, payload)
    monkeypatch.setattr(cls, "local_update", press_ctrl_c_in_round_2)
    rc, out = cli(tmp_path, "--seed", "4")
    err = stderr_line(capsys)
    assert rc == 130 and "round 2" in err and "round 1" in err
    command = err.split("continue with: ")[1]
    assert command.endswith(f"--resume --out {out}")
    import shlex
    argv = shlex.split(command)[2:]                               # drop "python run.py"
    assert run.main(argv) == 0
    rc, full = cli(tmp_path, "--seed", "4", name="full")
    a = fedmed.load_checkpoint(os.path.join(full, "checkpoint.pt"))["server"]["weights"]
    b = fedmed.load_checkpoint(os.path.join(out, "checkpoint.pt"))["server"]["weights"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- what config.json records

def test_config_records_the_command_line_and_the_thread_count(tmp_path, capsys):
    rc, out = cli(tmp_path, "--lr", "0.02", "--stop-after", "1")
    rec = json.load(open(os.path.join(out, "config.json")))
    assert rec["argv"][rec["argv"].index("--lr") + 1] == "0.02"
    assert rec["versions"]["torch_threads"] == torch.get_num_threads()
    assert rec["versions"]["torch_cpu_capability"] and "torch_git" in rec["versions"]
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        rc, _ = cli(tmp_path, "--lr", "0.02", "--resume")
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert rc == 0 and "warning" in err and f"OMP_NUM_THREADS={threads}" in err


def test_config_records_the_resolved_data_settings_not_null(tmp_path):
    """A data flag left unset is recorded with the value the run used (the partition the
    dataset defaults to, the image size), not null; what stays null means 'none' (no data
    folder, no held-out client, no cap, no split file, no client selection)."""
    out = str(tmp_path / "r")
    assert run.main(["--rounds", "1", "--clients", "2", "--quiet", "--out", out]) == 0
    data = json.load(open(os.path.join(out, "config.json")))["data"]
    assert data["partition"] == "natural" and data["image_size"] == 32
    assert {k for k, v in data.items() if v is None} <= {
        "data_dir", "holdout_client", "max_images_per_client", "split_file", "split_unit",
        "color_constancy", "only_clients"}, data


def test_multilabel_loss_of_a_saturated_wrong_sigmoid_is_finite():
    """float32 1 - 1e-12 rounds to 1.0: the clip must happen in float64, or a sigmoid
    saturated at 1 on a negative label gives log(0) and an infinite loss."""
    m = fedmed.multilabel_metrics(np.array([[0], [1]]), np.array([[1.0], [1.0]], np.float32))
    assert np.isfinite(m["loss"]) and m["loss"] == pytest.approx(-np.log(1e-12) / 2, rel=1e-6)


# ---------------------------------------------------------------- memory flat in clients

def test_streamed_fedavg_aggregate_is_bit_identical_to_the_list_one(fed):
    """fold/finish (one upload at a time) against the pre-streaming aggregation: per key
    weighted_average over the list (float64, sum_k w_k * (n_k / n)) and the max of
    num_batches_tracked; unequal n_k; bit for bit."""
    from test_core import make_algo
    algo, server, _ = make_algo(fed)
    gen = torch.Generator().manual_seed(5)
    n = [3, 11, 7, 1]
    ups = [{"w": {k: (torch.randn(v.shape, generator=gen) if v.is_floating_point()
                      else v + i) for k, v in server.weights.items()}, "n": n[i]}
           for i in range(4)]
    acc = algo.begin_aggregate(sum(n))
    for u in ups:
        algo.fold(acc, u)
    algo.finish_aggregate(server, acc)
    for key in server.weights:
        tensors = [u["w"][key] for u in ups]
        ref = (torch.stack(tensors).max() if key.endswith("num_batches_tracked")
               else fedmed.weighted_average(tensors, n))
        assert server.weights[key].dtype == ref.dtype and torch.equal(server.weights[key], ref), key


def test_the_loop_folds_each_upload_before_the_next_client_trains(tmp_path, fed, monkeypatch):
    cls = fedmed.ALGORITHMS["fedavg"]
    events = []
    orig_update, orig_fold = cls.local_update, cls.fold
    monkeypatch.setattr(cls, "local_update", lambda self, c, p: (
        events.append(("train", c.id)), orig_update(self, c, p))[1])
    monkeypatch.setattr(cls, "fold", lambda self, acc, u: (
        events.append(("fold",)), orig_fold(self, acc, u))[1])
    fedmed.run(Config(model="cnn", rounds=1, batch_size=16), None, fed, str(tmp_path / "o"),
               quiet=True)
    assert events == [("train", 0), ("fold",), ("train", 1), ("fold",), ("train", 2), ("fold",)]


def test_streamed_and_listed_runs_give_the_same_weights(tmp_path, fed, monkeypatch):
    cfg = Config(model="cnn", rounds=2, batch_size=16, fraction=0.67)
    fedmed.run(cfg, None, fed, str(tmp_path / "s"), quiet=True)
    monkeypatch.setattr(fedmed.Algorithm, "stream_uploads", False)
    fedmed.run(cfg, None, fed, str(tmp_path / "l"), quiet=True)
    a, b = (fedmed.load_checkpoint(str(tmp_path / d / "checkpoint.pt"))["server"]["weights"]
            for d in "sl")
    assert all(torch.equal(a[k], b[k]) for k in a)
