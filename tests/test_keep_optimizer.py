"""Issue #18, memory flat in the number of clients for --keep-optimizer: each client's
optimiser state lives in its own file of the run folder (OUT/optimizer/), named with the
round it belongs to and checksummed by the checkpoint, not in memory nor in
checkpoint.pt. Each test failed on the code that kept every client's state in
client.state (hence in memory and in every checkpoint)."""
import os

import pytest
import torch

import datasets
import fedmed
import run
from fedmed import Config
from helpers import drop_seconds, one_line_error, read_jsonl

import algorithms  # noqa: E402 - the methods register themselves

algorithms.load_all()


@pytest.fixture(scope="module")
def fed():
    return datasets.make_synthetic(seed=3, clients=3, image_size=16)


def cfg(**kw):
    return Config(**{"model": "cnn", "rounds": 3, "batch_size": 16, "keep_optimizer": True,
                     **kw})


def cli(tmp_path, *flags, name="out"):
    out = str(tmp_path / name)
    base = ["--image-size", "16", "--clients", "3", "--rounds", "3", "--local-epochs", "1",
            "--batch-size", "16", "--quiet", "--keep-optimizer", "--out", out]
    return run.main(base + list(flags)), out


def opt_files(out):
    d = os.path.join(out, fedmed.OPT_DIR)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def kept_states(out):
    """{client: its optimiser state as the checkpoint of `out` names it}."""
    ck = fedmed.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    got = {}
    for k, c in enumerate(ck["clients"]):
        ref = c["state"][fedmed.OPT_REF]
        got[k] = fedmed.safe_torch_load(os.path.join(out, fedmed.OPT_DIR, ref["file"]))
    return got


def assert_same_state(a, b):
    """Two optimiser state dicts equal bit for bit (tensors) and value for value."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b


def test_checkpoint_holds_no_optimiser_state_and_does_not_grow_with_clients(tmp_path):
    """checkpoint.pt names each client's optimiser file (round, sha256) instead of
    holding its momentum buffers: 6 clients' checkpoint is hardly larger than 3 clients'
    (before: one momentum buffer, a model's size, per client), and the run folder holds
    exactly one optimiser file per client, of the last round."""
    sizes = {}
    for k in (3, 6):
        f = datasets.make_synthetic(seed=3, clients=k, image_size=16)
        out = str(tmp_path / f"k{k}")
        fedmed.run(cfg(rounds=2), None, f, out, quiet=True)
        ck = fedmed.load_checkpoint(os.path.join(out, "checkpoint.pt"))
        assert all("optimizer" not in c["state"] for c in ck["clients"])
        assert [c["state"][fedmed.OPT_REF]["file"] for c in ck["clients"]] == \
            [f"{i}-{c.name}.r2.pt" for i, c in enumerate(f.clients)]
        assert opt_files(out) == sorted(f"{i}-{c.name}.r2.pt" for i, c in enumerate(f.clients))
        sizes[k] = os.path.getsize(os.path.join(out, "checkpoint.pt"))
        one = os.path.getsize(os.path.join(out, fedmed.OPT_DIR, opt_files(out)[0]))
    assert sizes[6] - sizes[3] < 0.1 * one, (sizes, one)


def test_only_the_training_client_holds_its_optimiser_state_in_memory(tmp_path, fed,
                                                                      monkeypatch):
    """While client k trains, no other client holds an optimiser state in memory; from
    round 2 on, k's own state is back (read from its file) when its update starts, and
    gone from memory once the update is done."""
    cls = fedmed.ALGORITHMS["fedavg"]
    orig, seen = cls.local_update, []

    def spy(self, client, payload):
        others = [c.id for c in self.clients_ref if c is not client and "optimizer" in c.state]
        seen.append((self.round, client.id, "optimizer" in client.state, others))
        return orig(self, client, payload)

    orig_setup = cls.setup

    def setup(self, server, clients):
        self.clients_ref = clients
        return orig_setup(self, server, clients)
    monkeypatch.setattr(cls, "local_update", spy)
    monkeypatch.setattr(cls, "setup", setup)
    fedmed.run(cfg(rounds=2), None, fed, str(tmp_path / "o"), quiet=True)
    assert [(t, k, mine) for t, k, mine, _ in seen] == \
        [(t, k, t > 0) for t in range(2) for k in range(3)]
    assert all(others == [] for *_, others in seen), seen


class Killed(BaseException):
    """Stands for SIGKILL at one point of the loop (nothing after it runs)."""


@pytest.mark.parametrize("where", ["before_checkpoint", "before_prune"])
def test_a_kill_between_optimiser_files_and_checkpoint_resumes_bit_identically(
        tmp_path, fed, monkeypatch, where):
    """Killed in round 2 after its clients wrote their round-2 optimiser files but before
    the round-2 checkpoint (or after it, before the round-1 files were deleted): the
    round-1 checkpoint still finds every file it names, and --resume ends with the same
    weights, optimiser states, metrics and files as a run that never stopped."""
    c = cfg(rounds=4, fraction=0.67)                   # 2 of 3 clients a round: some wait
    full = str(tmp_path / "full")
    fedmed.run(c, None, fed, full, quiet=True)
    part = str(tmp_path / "part")
    target = {"before_checkpoint": "save_checkpoint", "before_prune": "prune_optimizer_files"}
    real, calls = getattr(fedmed, target[where]), []

    def kill_in_round_2(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return real(*a, **kw)
    monkeypatch.setattr(fedmed, target[where], kill_in_round_2)
    with pytest.raises(Killed):
        fedmed.run(c, None, fed, part, quiet=True)
    monkeypatch.undo()
    ck = fedmed.load_checkpoint(os.path.join(part, "checkpoint.pt"))
    assert ck["round"] == (1 if where == "before_checkpoint" else 2)
    named = {s["state"][fedmed.OPT_REF]["file"] for s in ck["clients"]
             if fedmed.OPT_REF in s["state"]}
    assert set(opt_files(part)) > named          # the killed round wrote beside, not over
    fedmed.run(c, None, fed, part, resume=True, quiet=True)
    a, b = (fedmed.load_checkpoint(os.path.join(d, "checkpoint.pt")) for d in (full, part))
    assert all(torch.equal(v, b["server"]["weights"][k]) for k, v in a["server"]["weights"].items())
    assert [s["state"] for s in a["clients"]] == [s["state"] for s in b["clients"]]  # names, sha256
    sa, sb = kept_states(full), kept_states(part)
    for k in sa:
        assert_same_state(sa[k], sb[k])
    assert opt_files(full) == opt_files(part)
    assert drop_seconds(read_jsonl(os.path.join(full, "metrics.jsonl"))) == \
        drop_seconds(read_jsonl(os.path.join(part, "metrics.jsonl")))


class _Trap:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("damage", ["flip", "missing", "pickle", "truncated"])
def test_a_damaged_or_missing_optimiser_file_is_one_line_exit_2(tmp_path, capsys, damage):
    """A flipped bit fails the sha256 the checkpoint holds; a missing, replaced or
    truncated file fails its recorded size before anything runs: each is one line naming
    the file, exit 2, nothing executed, and the run folder left as it was."""
    rc, out = cli(tmp_path, "--stop-after", "1")
    assert rc == 0
    capsys.readouterr()
    path = os.path.join(out, fedmed.OPT_DIR, opt_files(out)[0])
    data = bytearray(open(path, "rb").read())
    marker = str(tmp_path / "ran")
    if damage == "flip":
        data[len(data) // 2] ^= 1
        open(path, "wb").write(bytes(data))
    elif damage == "missing":
        os.remove(path)
    elif damage == "pickle":
        torch.save({"state": {}, "param_groups": [_Trap(marker)]}, path)
    else:
        open(path, "wb").write(bytes(data[:-10]))
    before = sorted(os.listdir(out))
    rc, _ = cli(tmp_path, "--resume")
    err = one_line_error(capsys, rc, path)
    size = os.path.getsize(path) if os.path.exists(path) else None
    want = {"flip": "fails its checksum", "missing": "is missing"}.get(
        damage, f"has {size} bytes, not {len(data)}")
    assert f"{path} (client site0's optimiser state) {want}" in err
    assert not os.path.exists(marker)
    assert sorted(os.listdir(out)) == before
    assert fedmed.load_checkpoint(os.path.join(out, "checkpoint.pt"))["round"] == 1


def test_a_state_the_update_left_untouched_keeps_its_file(tmp_path, fed, monkeypatch):
    """A sampled client whose update does not train (here: round 2 does no step) keeps
    the optimiser file of round 1: nothing is rewritten, the checkpoint still names the
    round-1 file, and the state it read is dropped from memory again."""
    cls = fedmed.ALGORITHMS["fedavg"]
    orig = cls.train
    monkeypatch.setattr(cls, "train", lambda self, client, payload, steps_scale=1: (
        orig(self, client, payload, steps_scale) if self.round == 0 else 0))
    out = str(tmp_path / "o")
    fedmed.run(cfg(rounds=2), None, fed, out, quiet=True)
    ck = fedmed.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert [c["state"][fedmed.OPT_REF]["file"] for c in ck["clients"]] == \
        [f"{k}-{c.name}.r1.pt" for k, c in enumerate(fed.clients)] == opt_files(out)
    assert all("optimizer" not in c["state"] for c in ck["clients"])


def test_overwrite_removes_the_optimiser_files(tmp_path):
    rc, out = cli(tmp_path)
    assert rc == 0 and opt_files(out)
    rc = run.main(["--image-size", "16", "--clients", "3", "--rounds", "1", "--batch-size", "16",
                   "--quiet", "--overwrite", "--out", out])
    assert rc == 0 and not os.path.exists(os.path.join(out, fedmed.OPT_DIR))
