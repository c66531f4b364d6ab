"""Small helpers shared by the test files (imported as `helpers`: pytest puts tests/ on
sys.path)."""
import json
import os


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(s) for s in f]


def drop_seconds(obj):
    """The same record without its wall-clock fields (the only ones allowed to differ
    between two runs of one seed)."""
    if isinstance(obj, dict):
        return {k: drop_seconds(v) for k, v in obj.items()
                if not (k == "seconds" or k.endswith("_seconds")
                        or k.startswith("speedup_vs_retrain_wall"))}
    if isinstance(obj, list):
        return [drop_seconds(v) for v in obj]
    return obj


def one_line_error(capsys, code, *needles, out=None):
    """A usage error as run.py must give it: exit status 2, one line on stderr naming
    every needle, and (when `out` is given) no results folder written."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    if out is not None:
        assert not os.path.exists(out), out
    return err


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def weak_view(fed, idx, gen=None):
    """Reference tests: the images of `idx` as the model sees them, recomputed by hand;
    with `gen`, the core's training augmentation (a horizontal, then a vertical flip, each
    with probability 1/2, one pair of uniform draws per image from `gen`)."""
    import numpy as np
    import torch
    x = fed.x[torch.as_tensor(np.asarray(idx), dtype=torch.long)].float() / 255
    if gen is not None:
        u = torch.rand(len(idx), 2, generator=gen)
        for i in range(len(idx)):
            if u[i, 0] < 0.5:
                x[i] = x[i].flip(2)
            if u[i, 1] < 0.5:
                x[i] = x[i].flip(1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def register_clip_config(tmp_path_factory, name, config):
    """Register an open_clip model config (a tiny one the tests build) under `name`;
    returns the path of its .json file."""
    import open_clip
    path = tmp_path_factory.mktemp("configs") / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(str(path))
    return str(path)
