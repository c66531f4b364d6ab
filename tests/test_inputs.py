"""Bad input is refused as DESIGN.md "Bad input" says (issue #18, the input half): one
line on stderr naming the flag, file or folder, exit status 2, checked before any image
is decoded, and nothing written. Also: caches that verify themselves."""
import os

import numpy as np
import pytest

import datasets
import run
from helpers import one_line_error


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if the command line reaches the data (decoding) before refusing."""
    def touched(*a, **k):
        raise AssertionError("the data were loaded before the bad flag was refused")
    monkeypatch.setattr(datasets, "load", touched)


def cli(tmp_path, *flags):
    out = str(tmp_path / "out")
    base = ["--image-size", "16", "--clients", "3", "--rounds", "1", "--batch-size", "16",
            "--quiet", "--out", out]
    return run.main(base + list(flags)), out


# ---------------------------------------------------------------- the command line

def test_unparsable_value_is_one_line_not_the_usage_block(tmp_path, capsys, no_data):
    rc, out = cli(tmp_path, "--lr", "abc")
    err = one_line_error(capsys, rc, "--lr", "'abc'", "--help", out=out)
    assert "usage:" not in err
    rc, out = cli(tmp_path, "--no-such-flag")
    one_line_error(capsys, rc, "--no-such-flag", "--help", out=out)


@pytest.mark.parametrize("flags,needles", [
    (["--data-dir", "/tmp"], ["--data-dir", "synthetic"]),
    (["--dataset", "synthetic-multilabel", "--color-constancy"], ["--color-constancy"]),
    (["--dataset", "imagefolder", "--data-dir", "/tmp", "--model", "nope"], ["--model", "'nope'"]),
    (["--dataset", "imagefolder", "--data-dir", "/tmp", "--weights", "/nonexistent/w.pt"],
     ["--weights", "/nonexistent/w.pt"]),
    (["--dataset", "imagefolder", "--data-dir", "/tmp", "--algo", "clip_linear",
      "--clip-model", "nope-net"], ["--clip-model", "nope-net"]),
    (["--dataset", "imagefolder", "--data-dir", "/tmp", "--algo", "clip_linear",
      "--pretrained", "/nonexistent/clip.pt"], ["--pretrained", "/nonexistent/clip.pt"]),
    (["--algo", "fedclip", "--model", "resnet18"], ["--model", "fedclip"]),
])
def test_flags_are_checked_before_the_data_are_read(tmp_path, capsys, no_data, flags, needles):
    """--model, --weights, --clip-model, --pretrained and the data flags are refused before
    any image is decoded (no_data fails the test otherwise); a flag the dataset or method
    does not read is refused, not silently ignored."""
    rc, out = cli(tmp_path, *flags)
    one_line_error(capsys, rc, *needles, out=out)


def test_batch_size_one_is_refused_not_zero_steps(tmp_path, capsys, no_data):
    """The loop skips batches of one image (fedmed.Algorithm.local_batches), so B = 1
    trained nothing and reported the untrained model (and with --local-steps never ended)."""
    rc, out = cli(tmp_path, "--batch-size", "1")
    one_line_error(capsys, rc, "--batch-size", "at least 2", out=out)
