"""Issue #18, the core half: a run is never silently wrong. Each test states the failure
it guards against; each failed on the code before its fix."""
import json
import os

import pytest
import torch

import datasets
import fedmed
import run
from fedmed import Config, UsageError
from helpers import read_jsonl

fedmed.load_algorithms()


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
        auditor.audit_run(str(folder))
    assert not marker.exists()
