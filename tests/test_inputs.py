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
    base = ["--image-size", "16", "--rounds", "1", "--batch-size", "16",
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
    (["--test-fraction", "0.3"], ["--test-fraction", "synthetic", "150"]),
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


@pytest.mark.parametrize("flags,needles", [
    (["--algo", "fedprox", "--mu", "-10"], ["--mu", "-10"]),
    (["--momentum", "-1"], ["--momentum", "[0, 1)"]),
    (["--momentum", "1"], ["--momentum", "[0, 1)"]),
    (["--weight-decay", "-1"], ["--weight-decay"]),
    (["--loss", "focal", "--focal-gamma", "-1"], ["--focal-gamma"]),
    (["--eval-batch-size", "0"], ["--eval-batch-size"]),
    (["--eval-batch-size", "-1"], ["--eval-batch-size"]),
    # flags that this configuration would silently ignore
    (["--mu", "0.1"], ["--mu", "fedprox"]),                           # --algo fedavg
    (["--optimizer", "adam", "--momentum", "0.5"], ["--momentum", "sgd"]),
    (["--focal-gamma", "3"], ["--focal-gamma", "--loss focal"]),       # --loss ce
    (["--local-steps", "3", "--local-epochs", "2"], ["--local-epochs", "--local-steps"]),
    (["--dataset", "imagefolder", "--data-dir", "/tmp", "--alpha", "0.1"],
     ["--alpha", "dirichlet"]),
    (["--dataset", "imagefolder", "--data-dir", "/tmp", "--partition", "iid",
      "--shards-per-client", "3"], ["--shards-per-client", "shards"]),
    (["--dataset", "imagefolder", "--data-dir", "/tmp", "--min-client-size", "3"],
     ["--min-client-size", "dirichlet"]),
    (["--dataset", "isic2019", "--data-dir", "/tmp", "--partition", "natural", "--clients", "4"],
     ["--clients", "natural"]),
])
def test_meaningless_values_and_flags_that_do_not_apply(tmp_path, capsys, no_data, flags, needles):
    """Out-of-range values are one-line errors before the data are read (momentum -1, weight
    decay -1 and eval batch size 0 were tracebacks; mu -10 and the others were accepted),
    and a flag that the chosen algorithm, optimiser, loss or partition does not read is
    refused instead of being silently ignored."""
    rc, out = cli(tmp_path, *flags)
    one_line_error(capsys, rc, *needles, out=out)


def write_image(path, value, size=(12, 10)):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(value)
    Image.fromarray(g.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_flags_a_real_dataset_does_not_read_are_refused(tmp_path, capsys):
    """--clients with the natural partition a dataset with sites defaults to, and
    --test-fraction where the folder has an official test split, were silently ignored."""
    root = tmp_path / "sites"
    for site in ("hospA", "hospB"):
        for split in ("train", "test"):
            for c in ("a", "b"):
                for i in range(3):
                    write_image(root / site / split / c / f"{i}.png", i)
    base = ["--dataset", "imagefolder", "--data-dir", str(root), "--cache-dir", "none"]
    rc, out = cli(tmp_path, *base, "--clients", "4")
    one_line_error(capsys, rc, "--clients", "natural", out=out)
    rc, out = cli(tmp_path, *base, "--test-fraction", "0.3")
    one_line_error(capsys, rc, "--test-fraction", "official test split", out=out)


@pytest.mark.parametrize("flags,needles", [
    (["--image-size", "4"], ["--image-size 4", "cnn", "8"]),
    (["--image-size", "16", "--model", "densenet121"], ["--image-size 16", "densenet121"]),
])
def test_image_size_too_small_for_the_model(tmp_path, capsys, no_data, flags, needles):
    """--image-size 4 with the CNN was a max-pool traceback in round 1 (after the results
    folder was made); each model's smallest side is checked before the data are read."""
    rc, out = cli(tmp_path, *flags)
    one_line_error(capsys, rc, *needles, out=out)


def test_images_that_would_not_fit_in_memory_are_refused_before_decoding(tmp_path, capsys,
                                                                           monkeypatch):
    """--image-size 4096 died part-way; the images' size is compared with the memory
    available before anything is generated or decoded."""
    monkeypatch.setattr(datasets, "available_memory", lambda: 2 ** 20)       # 1 MiB
    for name in ("make_synthetic", "load_images"):
        monkeypatch.setattr(datasets, name, lambda *a, **k: pytest.fail("decoded"))
    rc, out = cli(tmp_path, "--image-size", "64")
    one_line_error(capsys, rc, "--image-size 64", "GiB", out=out)
    root = tmp_path / "flat"
    for c in ("a", "b"):
        for i in range(4):
            write_image(root / c / f"{i}.png", i)
    rc, out = cli(tmp_path, "--dataset", "imagefolder", "--data-dir", str(root), "--clients",
                  "2", "--image-size", "300")
    one_line_error(capsys, rc, "--image-size 300", "8 images", out=out)


def test_out_that_cannot_be_created_is_one_line_and_leaves_nothing(tmp_path, capsys, no_data):
    """--out below a file, or where no folder can be made, was a traceback after the data
    had been read."""
    (tmp_path / "file.txt").write_text("x")
    out = str(tmp_path / "file.txt" / "run1")
    rc = run.main(["--quiet", "--out", out])
    one_line_error(capsys, rc, "--out", "file.txt", out=out)
    if os.path.isdir("/proc/self"):
        rc = run.main(["--quiet", "--out", "/proc/fedmed-no-such/run1"])
        one_line_error(capsys, rc, "--out", "/proc/fedmed-no-such/run1",
                       out="/proc/fedmed-no-such")
    deep = tmp_path / "a" / "b" / "c"                         # creatable: nothing left behind
    assert run.check_writable(str(deep)) is None and not (tmp_path / "a").exists()


def test_a_crash_before_the_first_round_leaves_no_folder_that_blocks_the_retry(tmp_path,
                                                                                monkeypatch):
    import fedmed

    def boom(*a, **k):
        raise RuntimeError("simulated crash in round 1")
    monkeypatch.setattr(fedmed.Algorithm, "train", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        cli(tmp_path, "--local-epochs", "1")
    assert not os.path.exists(tmp_path / "out")
    monkeypatch.undo()
    rc, out = cli(tmp_path, "--local-epochs", "1")
    assert rc == 0 and os.path.isfile(os.path.join(out, "summary.json"))


# ---------------------------------------------------------------- the image cache

def small_folder(root, n=6, size=(23, 17)):
    for c in ("a", "b"):
        for i in range(n):
            write_image(root / "train" / c / f"{i}.png", 10 * i + (c == "b"), size)
    return root


def cached_load(root, cache):
    ns = datasets.namespace(dataset="imagefolder", data_dir=str(root), image_size=8,
                            clients=2, cache_dir=str(cache))
    return datasets.load(ns, seed=0)


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_image_cache_verifies_itself_and_rebuilds_what_is_wrong(tmp_path, damage):
    """Deleting the cache .npy (its done-mask staying) gave a zero-filled cache trusted as
    decoded; a truncated .npy was zero-filled back to size; a damaged byte was served.
    Every case must give the pixels of a fresh decode (--cache-dir none) and decode again
    only what is wrong."""
    root = small_folder(tmp_path / "set")
    truth = datasets.load(datasets.namespace(dataset="imagefolder", data_dir=str(root),
                                             image_size=8, clients=2, cache_dir="none"), seed=0)
    first = cached_load(root, tmp_path / "cache")
    assert np.array_equal(first.x.numpy(), truth.x.numpy())
    path = first.info["image_cache"]
    if damage == "delete":
        os.remove(path)
    elif damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        with open(path, "r+b") as f:                       # one byte of the last image
            f.seek(os.path.getsize(path) - 5)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
    again = cached_load(root, tmp_path / "cache")
    assert np.array_equal(again.x.numpy(), truth.x.numpy()), damage
    assert again.info["images_decoded"] == (1 if damage == "flip" else 12)
    third = cached_load(root, tmp_path / "cache")                  # and trusted again after
    assert third.info["images_decoded"] == 0
    assert np.array_equal(third.x.numpy(), truth.x.numpy())


# ---------------------------------------------------------------- the CLIP feature cache

@pytest.mark.parametrize("damage", ["truncated", "bad_crc", "garbage", "mismatched"])
def test_damaged_clip_feature_shard_is_a_cache_miss(tmp_path, damage):
    """A damaged shard raised zipfile.BadZipFile out of FeatureStore.load, which every later
    run calls: it must count as a miss (its features computed again) and be removed."""
    import io
    import clip_adapters
    store = clip_adapters.FeatureStore(str(tmp_path), {"k": 1}, "test")
    g = np.random.default_rng(0)
    h1, f1 = g.integers(0, 256, (4, 16), dtype=np.uint8), g.normal(size=(4, 8)).astype(np.float32)
    h2, f2 = g.integers(0, 256, (3, 16), dtype=np.uint8), g.normal(size=(3, 8)).astype(np.float32)
    store.add(h1, f1)
    store.add(h2, f2)
    bad = os.path.join(store.dir, [n for n in os.listdir(store.dir) if n.startswith("part-")][0])
    with np.load(bad) as z:
        lost = len(z["h"])
    raw = open(bad, "rb").read()
    if damage == "truncated":
        raw = raw[:len(raw) // 2]
    elif damage == "bad_crc":                       # one byte inside the stored f array
        i = raw.index(b"f.npy") + 200
        raw = raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:]
    elif damage == "garbage":
        raw = b"PK\x03\x04" + b"\x00" * 50
    else:
        buf = io.BytesIO()
        np.savez(buf, h=h1, f=f1[:2])
        raw = buf.getvalue()
    open(bad, "wb").write(raw)
    index, f = store.load()
    assert len(index) == 7 - lost and f.shape == (7 - lost, 8)
    assert not os.path.exists(bad)                                   # rebuilt, not re-read
    store.add(h1, f1)                                                # recomputed and stored
    index, f = store.load()
    assert np.array_equal(f[[index[bytes(r)] for r in h1]], f1)


# ---------------------------------------------------------------- image folders read wrongly

def mri(root, layout):
    """Images per {relative class folder: count} (0 makes an empty folder)."""
    for folder, n in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_image(root / folder / f"{i}.png", i + 7 * len(folder))
    return root


def load_folder(root, **kw):
    ns = datasets.namespace(dataset="imagefolder", data_dir=str(root), image_size=8,
                            cache_dir="none", **kw)
    return datasets.load(ns, seed=0)


def notes(fed):
    return " | ".join(fed.info["notes"])


def test_empty_class_folder_is_not_a_class(tmp_path):
    root = mri(tmp_path / "m", {"Training/glioma": 4, "Training/pituitary": 0,
                                "Training/notumor": 4, "Testing/glioma": 2, "Testing/notumor": 2,
                                "Testing/pituitary": 0})
    fed = load_folder(root, clients=2)
    assert fed.classes == ["glioma", "notumor"]                       # no extra model output
    assert "empty class folders ignored" in notes(fed) and "Training/pituitary" in notes(fed)


def test_one_class_is_refused(tmp_path, capsys):
    root = mri(tmp_path / "m", {"Training/glioma": 4, "Testing/glioma": 2})
    rc, out = cli(tmp_path, "--dataset", "imagefolder", "--data-dir", str(root), "--clients", "2")
    one_line_error(capsys, rc, "only one class", "'glioma'", out=out)


def test_macosx_folder_is_ignored_not_read_as_classes(tmp_path):
    """A macOS zip puts __MACOSX/ beside Training/ and Testing/: the top level then looked
    like root/<class>/ with classes Testing, Training, __MACOSX."""
    root = mri(tmp_path / "m", {"Training/glioma": 4, "Training/notumor": 4,
                                "Testing/glioma": 2, "Testing/notumor": 2,
                                "__MACOSX/Training/glioma": 1})
    fed = load_folder(root, clients=2)
    assert fed.classes == ["glioma", "notumor"]
    assert sum(len(c.test) for c in fed.clients) == 4                # the Testing folder
    assert "__MACOSX" in notes(fed)


def test_a_wrapper_folder_is_read_through_not_made_one_site(tmp_path):
    """root/Brain-MRI/{Training,Testing}/<class>/ was read as one site, so the whole
    federation was one natural client."""
    root = mri(tmp_path / "m", {"Brain-MRI/Training/glioma": 6, "Brain-MRI/Training/notumor": 6,
                                "Brain-MRI/Testing/glioma": 2, "Brain-MRI/Testing/notumor": 2})
    fed = load_folder(root, clients=3)
    assert len(fed.clients) == 3 and fed.info["partition"] == "iid"
    assert sum(len(c.test) for c in fed.clients) == 4
    assert "Brain-MRI" in notes(fed)


def test_test_split_lacking_a_class_is_noted(tmp_path):
    root = mri(tmp_path / "m", {"Training/glioma": 4, "Training/notumor": 4,
                                "Training/pituitary": 4, "Testing/glioma": 2,
                                "Testing/notumor": 2})
    fed = load_folder(root, clients=2)
    assert fed.classes == ["glioma", "notumor", "pituitary"]
    assert "no image of class pituitary" in notes(fed)


def test_flags_read_under_a_condition_pass_where_they_apply():
    """The other side of the 'does not apply' checks: FCU's projected gradient ascent is SGD
    with --momentum whatever --optimizer says, and the focal loss reads --focal-gamma."""
    from fedmed import Config
    run.check_applies(Config(algo="fcu", optimizer="adam"), None, {"momentum"})
    run.check_applies(Config(loss="focal"), None, {"focal_gamma"})
    run.check_applies(Config(algo="fedprox"), None, {"mu"})
