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
