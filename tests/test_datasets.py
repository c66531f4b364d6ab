"""Datasets and partitioners on generated data: every property is checked against a
second, independent computation (counts, set algebra, the rule written out again)."""
import copy
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
import run  # noqa: E402
from fedmed import UsageError, np_rng  # noqa: E402


# ---------------------------------------------------------------- helpers

def toy_catalog(n_per_class=(60, 40, 30, 20, 12, 8, 5, 25), size=8, test=None) -> datasets.Catalog:
    """An in-memory catalog (arrays, no files): image i is filled with the value i % 256."""
    y = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)]).astype(np.int64)
    arrays = (np.arange(len(y)) % 256).astype(np.uint8)[:, None, None, None] * np.ones(
        (1, size, size, 1), np.uint8)
    return datasets.Catalog("toy", "/nonexistent/toy.npz", [f"c{c}" for c in range(len(n_per_class))],
                            [f"img{i}" for i in range(len(y))], y, arrays=arrays,
                            default_size=size, test=test)


def all_indices(fed):
    return [np.concatenate([c.train, c.test, c.unlabeled]) for c in fed.clients + fed.holdout]


def assert_disjoint(fed):
    idx = np.concatenate(all_indices(fed))
    assert len(idx) == len(np.unique(idx)), "an image sits in two clients or two splits"


def write_image(path: Path, size=(40, 30), mode="RGB", value=None, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    a = g.integers(0, 256, shape).astype(np.uint8) if value is None else np.full(shape, value, np.uint8)
    Image.fromarray(a, mode).save(path)


def main_err(argv, capsys):
    """run.main's exit status and its stderr, which must be one line."""
    rc = run.main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


# ---------------------------------------------------------------- dirichlet

LABELS = np.concatenate([np.full(n, c) for c, n in
                         enumerate([2000, 1200, 900, 700, 500, 300, 200, 120, 50, 30])])


@pytest.mark.parametrize("alpha", [0.01, 0.1, 1.0, 100.0])
@pytest.mark.parametrize("K", [2, 10, 100, 500])
def test_dirichlet_terminates_and_respects_min_size(alpha, K):
    idx = np.arange(len(LABELS))
    t0 = time.perf_counter()
    parts, how = datasets.partition_dirichlet(LABELS, idx, K, alpha, 10, np_rng(0, "t", alpha, K))
    assert time.perf_counter() - t0 < 10
    sizes = np.array([len(p) for p in parts])
    assert len(parts) == K and sizes.min() >= 10
    together = np.concatenate(parts)
    assert np.array_equal(np.sort(together), idx)                    # a partition of idx
    assert how["draws"] >= 1 and how["moved"] >= 0


def test_dirichlet_skew_follows_alpha():
    """Small alpha: each client holds few classes; large alpha: close to the global mix."""
    idx = np.arange(len(LABELS))
    glob = np.bincount(LABELS) / len(LABELS)

    def mean_tv(alpha):
        parts, _ = datasets.partition_dirichlet(LABELS, idx, 10, alpha, 10, np_rng(1, alpha))
        return np.mean([0.5 * np.abs(np.bincount(LABELS[p], minlength=10) / len(p) - glob).sum()
                        for p in parts])
    assert mean_tv(0.05) > 0.5 > 0.1 > mean_tv(1000.0)


def test_dirichlet_impossible_min_size_is_a_usage_error():
    with pytest.raises(UsageError, match="min-client-size"):
        datasets.partition_dirichlet(LABELS, np.arange(100), 20, 0.5, 10, np_rng(0))
    with pytest.raises(UsageError, match="alpha"):
        datasets.partition_dirichlet(LABELS, np.arange(100), 2, 0.0, 1, np_rng(0))


def test_dirichlet_seeded():
    idx = np.arange(len(LABELS))
    a, _ = datasets.partition_dirichlet(LABELS, idx, 7, 0.3, 10, np_rng(5, "d"))
    b, _ = datasets.partition_dirichlet(LABELS, idx, 7, 0.3, 10, np_rng(5, "d"))
    c, _ = datasets.partition_dirichlet(LABELS, idx, 7, 0.3, 10, np_rng(6, "d"))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


# ---------------------------------------------------------------- other partitioners

def test_iid_and_shards_are_partitions():
    idx = np.arange(len(LABELS))
    parts = datasets.partition_iid(idx, 7, np_rng(0))
    assert np.array_equal(np.sort(np.concatenate(parts)), idx)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    parts = datasets.partition_shards(LABELS, idx, 20, 2, np_rng(0))
    assert np.array_equal(np.sort(np.concatenate(parts)), idx)
    # every shard is a run of label-sorted images, so a client sees few classes
    assert np.mean([len(np.unique(LABELS[p])) for p in parts]) <= 4
    with pytest.raises(UsageError, match="shards"):
        datasets.partition_shards(LABELS, idx[:10], 20, 2, np_rng(0))


def test_label_sets_follow_the_fedlsm_rule():
    C, K, k = 8, 5, 3
    sets = datasets.assign_label_sets(C, K, k, np_rng(3, "ls"))
    order = np_rng(3, "ls").permutation(C)          # step 1 again, from the same stream
    for j, c in enumerate(order):                   # step 2: class j of the shuffle -> client j mod K
        assert c in sets[j % K]
    assert all(len(s) == k == len(set(s)) for s in sets)              # step 3, distinct
    assert set().union(*map(set, sets)) == set(range(C))              # every class covered
    assert sets == datasets.assign_label_sets(C, K, k, np_rng(3, "ls"))
    many = datasets.assign_label_sets(8, 2, 3, np_rng(0))             # C > K k: deal wins
    assert sorted(len(s) for s in many) == [4, 4]


def test_labelset_partition_gives_each_client_exactly_its_classes():
    cat = toy_catalog(n_per_class=(80,) * 8)
    ns = datasets.namespace(partition="labelset", clients=5, labels_per_client=3)
    fed = datasets.build(cat, ns, seed=11)
    y = fed.y.numpy()
    assert_disjoint(fed)
    for c in fed.clients:
        assert len(c.label_set) == 3
        assert set(np.unique(y[c.train])) == set(c.label_set)         # exactly its k classes
        assert not set(np.unique(y[c.unlabeled])) & set(c.label_set)  # the rest: unlabelled
        assert len(np.unique(y[c.test])) == 8                         # tests keep all classes
    assert fed.split_summary()["client0"]["label_set"] == fed.clients[0].label_set
    assert "label set of client0" in fed.table()


def test_grouped_split_keeps_groups_whole_and_is_seeded():
    g = np.random.default_rng(0)
    sizes = g.integers(1, 5, 300)                       # images per lesion
    groups = np.repeat(np.arange(300), sizes).astype(str).astype(object)
    labels = np.repeat(g.integers(0, 3, 300), sizes).astype(np.int64)
    idx = np.arange(len(groups))
    tr, te = datasets.grouped_stratified_split(labels, idx, groups, 0.2, np_rng(0))
    assert not set(groups[tr]) & set(groups[te])
    assert np.array_equal(np.sort(np.concatenate([tr, te])), idx)
    assert abs(len(te) / len(idx) - 0.2) < 0.05
    tr2, te2 = datasets.grouped_stratified_split(labels, idx, groups, 0.2, np_rng(0))
    tr3, te3 = datasets.grouped_stratified_split(labels, idx, groups, 0.2, np_rng(1))
    assert np.array_equal(te, te2) and not np.array_equal(te, te3)


def test_official_test_split_is_shared_by_class_proportions():
    labels = np.array([0] * 60 + [1] * 40 + [0] * 30 + [1] * 20)
    train = [np.arange(0, 45), np.arange(45, 100)]      # client0: 45 of class 0; client1: 15 + 40
    test = np.arange(100, 150)
    out = datasets.distribute_by_class(labels, test, train, np_rng(0))
    assert np.array_equal(np.sort(np.concatenate(out)), test)
    assert (labels[out[0]] == 0).sum() == 23              # 30 * 45/60 = 22.5, tie -> lowest k
    assert (labels[out[0]] == 1).sum() == 0 and (labels[out[1]] == 1).sum() == 20


# ---------------------------------------------------------------- build: the generic steps

def test_build_partitions_are_deterministic_and_disjoint():
    cat = toy_catalog()
    for part in ("iid", "dirichlet", "shards"):
        ns = datasets.namespace(partition=part, clients=4, min_client_size=5)
        a, b = datasets.build(cat, ns, seed=1), datasets.build(cat, ns, seed=1)
        c = datasets.build(cat, ns, seed=2)
        assert_disjoint(a)
        assert a.split_summary() == b.split_summary()
        assert [x.train.tolist() for x in a.clients] == [x.train.tolist() for x in b.clients]
        assert [x.train.tolist() for x in a.clients] != [x.train.tolist() for x in c.clients]
        assert len(np.concatenate(all_indices(a))) == len(cat.y)      # nothing dropped
    # image content follows its index: x[j] holds the value of catalog row files[j]
    rows = np.array([int(f[3:]) for f in a.files])
    assert np.array_equal(a.x[:, 0, 0, 0].numpy(), (rows % 256).astype(np.uint8))
    assert np.array_equal(a.y.numpy(), cat.y[rows])


def test_unlabeled_fraction_holdout_and_max_images():
    cat = toy_catalog(n_per_class=(100,) * 4)
    ns = datasets.namespace(partition="iid", clients=4, unlabeled_fraction=0.5)
    fed = datasets.build(cat, ns, seed=0)
    assert_disjoint(fed)
    y = fed.y.numpy()
    for c in fed.clients:
        n = len(c.train) + len(c.unlabeled)
        assert abs(len(c.unlabeled) / n - 0.5) < 0.05
        for k in np.unique(y[c.train]):                   # stratified: every class half
            assert abs((y[c.unlabeled] == k).sum() - (y[c.train] == k).sum()) <= 1
    assert "unlab" in fed.table()
    fed = datasets.build(cat, datasets.namespace(partition="iid", clients=4,
                                                 holdout_client="client2"), seed=0)
    assert [c.name for c in fed.clients] == ["client0", "client1", "client3"]
    assert [c.name for c in fed.holdout] == ["client2"]
    assert len(fed.holdout[0].train) == 0 and len(fed.holdout[0].test) == 100
    assert fed.split_summary()["client2"]["holdout"] is True
    with pytest.raises(UsageError, match="client0, client1, client2, client3"):
        datasets.build(cat, datasets.namespace(partition="iid", clients=4,
                                               holdout_client="nope"), seed=0)
    fed = datasets.build(cat, datasets.namespace(partition="iid", clients=1,
                                                 max_images_per_client=50), seed=0)
    for c in fed.clients:
        assert len(c.train) + len(c.test) == 50
        assert set(np.bincount(fed.y.numpy()[np.concatenate([c.train, c.test])])) <= {12, 13}


def test_synthetic_keeps_natural_only_and_accepts_generic_steps():
    ns = datasets.namespace(clients=3, holdout_client="site1", unlabeled_fraction=0.25)
    fed = datasets.load(ns, seed=0)
    assert [c.name for c in fed.clients] == ["site0", "site2"] and fed.holdout[0].name == "site1"
    assert all(len(c.unlabeled) > 0 for c in fed.clients)
    with pytest.raises(UsageError, match="natural"):
        datasets.load(datasets.namespace(partition="iid"), seed=0)


# ---------------------------------------------------------------- imagefolder

def test_imagefolder_split_class_layout_with_greyscale(tmp_path):
    root = tmp_path / "mri"
    for split, n in (("Training", 6), ("Testing", 2)):
        for ci, cls in enumerate(["glioma", "meningioma", "notumor"]):
            for i in range(n):
                write_image(root / split / cls / f"{i}.png", (50, 40), "L", seed=100 * ci + i)
    ns = datasets.namespace(dataset="imagefolder", data_dir=str(root), image_size=16,
                            clients=2, cache_dir=str(tmp_path / "cache"))
    fed = datasets.load(ns, seed=0)
    assert fed.classes == ["glioma", "meningioma", "notumor"]
    assert fed.info["partition"] == "iid" and len(fed.clients) == 2
    assert sum(len(c.test) for c in fed.clients) == 6                  # the official Testing/
    assert all(f.startswith("Testing") for c in fed.clients for f in np.array(fed.files)[c.test])
    x = fed.x
    assert x.shape == (24, 3, 16, 16) and x.dtype == torch.uint8
    assert (x[:, 0] == x[:, 1]).all() and (x[:, 1] == x[:, 2]).all()  # grey -> 3 equal channels
    # the transform: centre square of 50x40 is columns 5..45, resized to 16 (bilinear)
    j = fed.files.index("Training/notumor/3.png")
    with Image.open(root / "Training/notumor/3.png") as im:
        ref = np.asarray(im.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR,
                                                  box=(5, 0, 45, 40)))
    assert np.array_equal(x[j].numpy().transpose(1, 2, 0), ref)


def test_imagefolder_sites_are_natural_clients(tmp_path):
    root = tmp_path / "multi"
    for s, site in enumerate(["hospA", "hospB", "hospC"]):
        for split, n in (("train", 4), ("test", 2)):
            for cls in ("benign", "malignant"):
                for i in range(n + s):
                    write_image(root / site / split / cls / f"{i}.jpg", (20, 20), "RGB", seed=i)
    ns = datasets.namespace(dataset="imagefolder", data_dir=str(root), image_size=8,
                            cache_dir=str(tmp_path / "cache"))
    fed = datasets.load(ns, seed=0)
    assert [c.name for c in fed.clients] == ["hospA", "hospB", "hospC"]
    for s, c in enumerate(fed.clients):
        assert len(c.train) == 2 * (4 + s) and len(c.test) == 2 * (2 + s)
        assert all(f.startswith(c.name + os.sep) for f in np.array(fed.files)[c.train])
    fed = datasets.load(datasets.namespace(**{**vars(ns), "partition": "dirichlet", "clients": 2,
                                              "min_client_size": 3}), seed=0)
    assert len(fed.clients) == 2 and sum(len(c.test) for c in fed.clients) == 2 * (2 + 3 + 4)


def test_imagefolder_class_only_layout(tmp_path):
    root = tmp_path / "flat"
    for cls in ("a", "b"):
        for i in range(10):
            write_image(root / cls / f"{i}.jpg", (12, 12), seed=i)
    fed = datasets.load(datasets.namespace(dataset="imagefolder", data_dir=str(root),
                                           image_size=8, clients=2, cache_dir="none"), seed=0)
    assert fed.classes == ["a", "b"] and len(fed.y) == 20
    assert all(len(c.test) >= 2 for c in fed.clients)                  # >= 1 per class present
    assert 3 <= sum(len(c.test) for c in fed.clients) <= 6
    assert fed.info["image_cache"] is None


# ---------------------------------------------------------------- medmnist

def test_medmnist_npz_round_trips(tmp_path):
    g = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 5), ("test", 12)):
        arrays[f"{split}_images"] = g.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = g.integers(0, 4, (n, 1)).astype(np.uint8)
    path = tmp_path / "dermamnist.npz"
    np.savez(path, **arrays)
    fed = datasets.load(datasets.namespace(dataset="medmnist", data_dir=str(path), clients=3),
                        seed=0)
    assert fed.x.shape == (52, 3, 28, 28) and fed.classes == ["0", "1", "2", "3"]
    for j, f in enumerate(fed.files):                                   # pixel for pixel
        split, i = f.split("_images[")
        i = int(i[:-1])
        assert np.array_equal(fed.x[j, 1].numpy(), arrays[f"{split}_images"][i])
        assert fed.y[j].item() == arrays[f"{split}_labels"][i, 0]
    test_files = {f for c in fed.clients for f in np.array(fed.files)[c.test]}
    assert test_files == {f"test_images[{i}]" for i in range(12)}      # the official test split
    rgb = dict(arrays, train_images=g.integers(0, 256, (40, 28, 28, 3), dtype=np.uint8),
               test_images=g.integers(0, 256, (12, 28, 28, 3), dtype=np.uint8))
    np.savez(path, **rgb)
    fed = datasets.load(datasets.namespace(dataset="medmnist", data_dir=str(path), clients=2,
                                           image_size=14), seed=0)
    assert fed.x.shape == (52, 3, 14, 14)
    bad = dict(arrays, train_labels=g.integers(0, 2, (40, 14)))        # ChestMNIST: multi-label
    np.savez(path, **bad)
    with pytest.raises(UsageError, match="multi-label"):
        datasets.load(datasets.namespace(dataset="medmnist", data_dir=str(path)), seed=0)


# ---------------------------------------------------------------- the image cache

def test_second_load_decodes_nothing_and_a_changed_file_is_noticed(tmp_path):
    root = tmp_path / "set"
    for cls in ("a", "b"):
        for i in range(8):
            write_image(root / "train" / cls / f"{i}.jpg", (30, 20), seed=i)
    ns = datasets.namespace(dataset="imagefolder", data_dir=str(root), image_size=8,
                            clients=2, cache_dir=str(tmp_path / "cache"))
    a = datasets.load(ns, seed=0)
    b = datasets.load(ns, seed=0)
    assert a.info["images_decoded"] == 16 and b.info["images_decoded"] == 0
    assert np.array_equal(a.x.numpy(), b.x.numpy())
    nocache = datasets.load(datasets.namespace(**{**vars(ns), "cache_dir": "none"}), seed=0)
    assert np.array_equal(a.x.numpy(), nocache.x.numpy())
    write_image(root / "train" / "a" / "0.jpg", (30, 20), value=200)
    os.utime(root / "train" / "a" / "0.jpg", ns=(1, 1))
    c = datasets.load(ns, seed=0)
    assert c.info["images_decoded"] == 16 and c.info["image_cache"] != a.info["image_cache"]


def test_shades_of_gray_leaves_a_grey_world_alone_and_balances_a_cast():
    g = np.random.default_rng(0)
    grey = np.repeat(g.integers(0, 200, (16, 16, 1)), 3, 2).astype(np.uint8)
    assert np.array_equal(datasets.shades_of_gray(grey), grey)
    cast = np.clip(grey * np.array([1.0, 0.7, 0.5]), 0, 255).astype(np.uint8)
    out = datasets.shades_of_gray(cast).astype(float)
    e = np.power(np.mean(out ** 6, axis=(0, 1)), 1 / 6)
    assert e.max() / e.min() < 1.05                                     # illuminant now grey


# ---------------------------------------------------------------- bad input: one line, exit 2

CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


def fake_isic2019(root: Path, n=12) -> list:
    """A tiny official-layout ISIC 2019 folder: n images over HAM (two sources), MSK and
    BCN, plus two without lesion_id."""
    names = [f"ISIC_{i:07d}" for i in range(n)]
    for i, name in enumerate(names):
        write_image(root / "ISIC_2019_Training_Input" / f"{name}.jpg", (24, 20), seed=i)
    with open(root / "ISIC_2019_Training_GroundTruth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image"] + CLASSES)
        for i, name in enumerate(names):
            w.writerow([name] + [f"{float(c == i % 3):.1f}" for c in range(9)])
    lesion = ["HAM_%07d" % i if i % 4 in (0, 1) else ("MSK4_%07d" % i if i % 4 == 2 else "BCN_%07d" % i)
              for i in range(n)]
    lesion[-1] = lesion[-2] = ""
    with open(root / "ISIC_2019_Training_Metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "age_approx", "anatom_site_general", "lesion_id", "gender"])
        for name, lid in zip(names, lesion):
            w.writerow([name, 50, "torso", lid, "female"])
    with open(root / "HAM10000_metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"])
        for i, (name, lid) in enumerate(zip(names, lesion)):
            if lid.startswith("HAM_"):
                w.writerow([lid, name, "nv", "histo", 50, "male", "back",
                            "rosendahl" if i % 4 == 0 else "vidir_modern"])
    return names


def isic_argv(root, tmp_path, *extra):
    return ["--dataset", "isic2019", "--data-dir", str(root), "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--image-size", "8", "--rounds", "1",
            "--quiet", *extra]


def test_fake_isic2019_runs_end_to_end(tmp_path, capsys):
    root = tmp_path / "isic"
    fake_isic2019(root, n=24)
    rc, err = main_err(isic_argv(root, tmp_path), capsys)
    assert rc == 0, err
    cat = datasets.load_catalog(datasets.namespace(dataset="isic2019", data_dir=str(root)))
    assert [cat.site_names[s] if s >= 0 else None for s in cat.site[:5]] == [
        "HAM_rosendahl", "HAM_vidir_modern", "MSK", "BCN", "HAM_rosendahl"]
    fed = datasets.build(cat, datasets.namespace(dataset="isic2019", image_size=8,
                                                 cache_dir=str(tmp_path / "cache")), seed=0)
    assert [c.name for c in fed.clients] == ["BCN", "HAM_vidir_modern", "HAM_rosendahl", "MSK"]


def corrupt(path: Path):
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def rewrite_csv(path: Path, edit):
    rows = list(csv.reader(open(path, newline="")))
    rows = edit(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def set_row(i, values):
    def edit(rows):
        rows[i] = rows[i][:1] + values
        return rows
    return edit


BAD_ISIC = {
    "missing image": (lambda r: (r / "ISIC_2019_Training_Input/ISIC_0000003.jpg").unlink(),
                      ["ISIC_0000003.jpg", "row 5"]),
    "corrupt jpeg": (lambda r: corrupt(r / "ISIC_2019_Training_Input/ISIC_0000004.jpg"),
                     ["ISIC_0000004.jpg", "cannot decode"]),
    "truncated jpeg": (lambda r: truncate(r / "ISIC_2019_Training_Input/ISIC_0000005.jpg"),
                       ["ISIC_0000005.jpg", "cannot decode"]),
    "missing column": (lambda r: rewrite_csv(r / "ISIC_2019_Training_GroundTruth.csv",
                                             lambda rows: [x[:1] + x[2:] for x in rows]),
                       ["ISIC_2019_Training_GroundTruth.csv", "MEL"]),
    "metadata without lesion_id": (lambda r: rewrite_csv(r / "ISIC_2019_Training_Metadata.csv",
                                                         lambda rows: [x[:3] for x in rows]),
                                   ["ISIC_2019_Training_Metadata.csv", "lesion_id"]),
    "no class": (lambda r: rewrite_csv(r / "ISIC_2019_Training_GroundTruth.csv",
                                       set_row(3, ["0.0"] * 9)),
                 ["ISIC_2019_Training_GroundTruth.csv", "row 4", "ISIC_0000002", "no class"]),
    "two classes": (lambda r: rewrite_csv(r / "ISIC_2019_Training_GroundTruth.csv",
                                          set_row(7, ["1.0", "1.0"] + ["0.0"] * 7)),
                    ["row 8", "ISIC_0000006", "MEL, NV"]),
    "UNK positive": (lambda r: rewrite_csv(r / "ISIC_2019_Training_GroundTruth.csv",
                                           set_row(2, ["0.0"] * 8 + ["1.0"])),
                     ["row 3", "UNK"]),
    "HAM without dataset column": (lambda r: rewrite_csv(r / "HAM10000_metadata.csv",
                                                         lambda rows: [x[:7] for x in rows]),
                                   ["HAM10000_metadata.csv", "dataset"]),
    "unknown lesion prefix": (lambda r: rewrite_csv(r / "ISIC_2019_Training_Metadata.csv",
                                                    lambda rows: rows[:2] + [[rows[2][0], 1, "",
                                                    "XYZ_1", ""]] + rows[3:]),
                              ["row 3", "ISIC_0000001", "XYZ_1"]),
}


@pytest.mark.parametrize("case", sorted(BAD_ISIC))
def test_bad_isic2019_input_is_one_line_exit_2(case, tmp_path, capsys):
    root = tmp_path / "isic"
    fake_isic2019(root)
    damage, expected = BAD_ISIC[case]
    damage(root)
    rc, err = main_err(isic_argv(root, tmp_path), capsys)
    assert rc == 2
    assert "\n" not in err and err.startswith("error: "), err
    for word in expected:
        assert word in err, (word, err)
    assert not (tmp_path / "out").exists()                             # nothing written


def test_bad_paths_and_folders_are_one_line_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, words in [
        (["--dataset", "isic2019", "--data-dir", str(tmp_path / "nowhere")], ["nowhere", "does not exist"]),
        (["--dataset", "imagefolder", "--data-dir", str(empty)], [str(empty), "empty"]),
        (["--dataset", "ham10000"], ["--data-dir"]),
        (["--dataset", "isic2019", "--data-dir", str(tmp_path), "--partition", "random"], ["--partition"]),
    ]:
        rc, err = main_err(argv + ["--out", str(tmp_path / "out"), "--quiet"], capsys)
        assert rc == 2 and "\n" not in err, err
        assert all(w in err for w in words), err
    mix = tmp_path / "mix"
    write_image(mix / "Training" / "no_tumor" / "0.png", (10, 10), "L")
    write_image(mix / "Training" / "glioma" / "0.png", (10, 10), "L")
    write_image(mix / "Testing" / "notumor" / "0.png", (10, 10), "L")
    rc, err = main_err(["--dataset", "imagefolder", "--data-dir", str(mix), "--out",
                        str(tmp_path / "out"), "--quiet"], capsys)
    assert rc == 2 and "\n" not in err and "Testing/notumor" in err and "'no_tumor'" in err, err
    write_image(mix / "Testing" / "notumor" / "0.png", (10, 10), "L")
    (mix / "Testing" / "notumor" / "0.png").rename(mix / "Testing" / "notumor.png")
    (mix / "Testing" / "notumor").rmdir()
    write_image(mix / "Training" / "Glioma" / "1.png", (10, 10), "L")
    rc, err = main_err(["--dataset", "imagefolder", "--data-dir", str(mix), "--out",
                        str(tmp_path / "out"), "--quiet"], capsys)
    assert rc == 2 and "\n" not in err and "'Glioma' and 'glioma'" in err, err
    rc, err = main_err(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "flat"), "--out",
                        str(tmp_path / "out"), "--quiet"], capsys)
    assert rc == 2 and "does not exist" in err


# ---------------------------------------------------------------- isic2018 and ham10000 layouts

def fake_isic2018(root: Path, n_train=30, n_test=10, groupings=True):
    classes = datasets.HAM_CLASSES
    for split, n, off in (("Training", n_train, 0), ("Test", n_test, 1000)):
        gt_dir = root / f"ISIC2018_Task3_{split}_GroundTruth"
        gt_dir.mkdir(parents=True)
        with open(gt_dir / f"ISIC2018_Task3_{split}_GroundTruth.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image"] + classes)
            for i in range(n):
                name = f"ISIC_{off + i:07d}"
                write_image(root / f"ISIC2018_Task3_{split}_Input" / f"{name}.jpg", (16, 12), seed=i)
                w.writerow([name] + [f"{float(c == i % 7):.1f}" for c in range(7)])
    if groupings:
        with open(root / "ISIC2018_Task3_Training_LesionGroupings.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "lesion_id", "diagnosis_confirm_type"])
            for i in range(n_train):                      # lesion k holds images k, k + 7, ...
                w.writerow([f"ISIC_{i:07d}", f"HAM_{i % 14:07d}", "histopathology"])


def test_isic2018_task3_layout(tmp_path):
    root = tmp_path / "isic2018"
    fake_isic2018(root)
    ns = datasets.namespace(dataset="isic2018", data_dir=str(root), image_size=8, clients=2,
                            cache_dir=str(tmp_path / "cache"))
    fed = datasets.load(ns, seed=0)
    assert fed.classes == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    test = [f for c in fed.clients for f in np.array(fed.files)[c.test]]
    assert len(test) == 10 and all("Test_Input" in f for f in test)  # the official test split
    for j, f in enumerate(fed.files):
        assert fed.y[j].item() == int(Path(f).stem[5:]) % 1000 % 7
    # without the Test files: one global lesion-aware split before partitioning
    (root / "ISIC2018_Task3_Test_GroundTruth" / "ISIC2018_Task3_Test_GroundTruth.csv").unlink()
    fed = datasets.load(ns, seed=0)
    lesion = {f"ISIC_{i:07d}": i % 14 for i in range(30)}
    train = {lesion[Path(fed.files[i]).stem] for c in fed.clients for i in c.train}
    test = {lesion[Path(fed.files[i]).stem] for c in fed.clients for i in c.test}
    assert test and not train & test
    assert fed.info["split_unit"] == "lesion"


def test_ham10000_bad_rows(tmp_path, capsys):
    root = tmp_path / "ham"
    with open(tmp_path / "meta.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"])
        for i in range(6):
            w.writerow([f"HAM_{i // 2}", f"ISIC_{i:07d}", ["nv", "mel", "bkl"][i % 3], "histo",
                        50, "male", "back", "rosendahl"])
            write_image(root / "HAM10000_images_part_1" / f"ISIC_{i:07d}.jpg", (10, 10), seed=i)
    (root / "HAM10000_metadata.csv").write_text((tmp_path / "meta.csv").read_text().replace(
        "ISIC_0000004,mel", "ISIC_0000004,melanoma"))
    argv = ["--dataset", "ham10000", "--data-dir", str(root), "--out", str(tmp_path / "o"), "--quiet"]
    rc, err = main_err(argv, capsys)
    assert rc == 2 and "\n" not in err and "row 6" in err and "'melanoma'" in err, err
    (root / "HAM10000_metadata.csv").write_text((tmp_path / "meta.csv").read_text())
    (root / "HAM10000_images_part_1" / "ISIC_0000002.jpg").unlink()
    rc, err = main_err(argv, capsys)
    assert rc == 2 and "\n" not in err and "ISIC_0000002.jpg" in err and "row 4" in err, err


def test_color_constancy_flag_changes_pixels_and_cache_key(tmp_path):
    root = tmp_path / "set"
    for cls in ("a", "b"):
        for i in range(6):
            write_image(root / "train" / cls / f"{i}.jpg", (20, 20), seed=i)
    ns = datasets.namespace(dataset="imagefolder", data_dir=str(root), image_size=8, clients=1,
                            cache_dir=str(tmp_path / "cache"))
    plain = datasets.load(ns, seed=0)
    sog = datasets.load(datasets.namespace(**{**vars(ns), "color_constancy": True}), seed=0)
    assert sog.info["image_cache"] != plain.info["image_cache"]
    assert sog.info["images_decoded"] == 12
    assert not np.array_equal(sog.x.numpy(), plain.x.numpy())
    j = 3
    ref = datasets.shades_of_gray(plain.x[j].numpy().transpose(1, 2, 0))
    assert np.array_equal(sog.x[j].numpy().transpose(1, 2, 0), ref)


def test_pixels_of_and_keep_pixels_leave_a_party_only_the_images_it_may_read():
    """A Flower node keeps its own client's pixels (named, or by index into clients +
    held-out clients) and zeros for every other row; a server keeps none (an empty
    tensor, so that a read fails); None is an ordinary run (unchanged)."""
    fed = datasets.make_synthetic(seed=1, clients=3, image_size=16)
    fed.holdout = datasets.take_holdout(fed.clients, "site2", [])
    x = fed.x.clone()
    members = fed.clients + fed.holdout
    assert datasets.pixels_of(members, None) is None
    assert len(datasets.pixels_of(members, ())) == 0
    rows = lambda c: np.unique(np.concatenate([c.train, c.test, c.unlabeled]))   # noqa: E731
    assert np.array_equal(datasets.pixels_of(members, ("site1",)), rows(fed.clients[1]))
    assert np.array_equal(datasets.pixels_of(members, (2,)), rows(fed.holdout[0]))
    assert datasets.keep_pixels(fed, None).x is fed.x
    mine = datasets.keep_pixels(copy.copy(fed), ("site1",)).x
    own = torch.as_tensor(rows(fed.clients[1]))
    others = torch.ones(len(x), dtype=torch.bool)
    others[own] = False
    assert torch.equal(mine[own], x[own]) and x[own].any()
    assert not mine[others].any() and x[others].any()
    server = datasets.keep_pixels(copy.copy(fed), ()).x
    assert server.shape == (0, *x.shape[1:])
    with pytest.raises(IndexError):
        server[torch.as_tensor(fed.clients[0].test)]
