"""The Fed-ISIC2019 split rule and the lesion-aware splits on the real isic2019-mini data
(../shared/data/isic2019-mini; skipped where it is absent). The centre of every image is
recomputed here from the CSVs with the csv module, independently of datasets.py."""
import csv
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isic2019-mini"
pytestmark = pytest.mark.skipif(
    not (DATA / "ISIC_2019_Training_GroundTruth.csv").is_file(),
    reason=f"real data absent: {DATA} (the shared isic2019-mini copy) is not there")

# ../shared/data/isic2019-mini/README.md, "Acquisition centres" table
README_CENTRES = {"HAM_vidir_molemax": 3954, "HAM_vidir_modern": 3363, "HAM_rosendahl": 2259,
                  "HAM_vienna_dias": 439, "MSK": 819}
README_NO_LESION = 1926
SIZE = 16


def rows(name):
    with open(DATA / name, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def expected():
    """{image: centre or None} by the published rule, written out again."""
    ham = {r["image_id"]: r["dataset"] for r in rows("HAM10000_metadata.csv")}
    out = {}
    for r in rows("ISIC_2019_Training_Metadata.csv"):
        lid = r["lesion_id"]
        if not lid:
            out[r["image"]] = None                                   # rule 1: dropped
        elif lid.startswith("HAM_"):
            out[r["image"]] = "HAM_" + ham[r["image"]]                # rule 3
        elif lid.startswith("MSK4"):
            out[r["image"]] = "MSK"
        elif lid.startswith("BCN_"):
            out[r["image"]] = "BCN"
        else:
            raise AssertionError(lid)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def cat():
    return datasets.load_catalog(datasets.namespace(dataset="isic2019", data_dir=str(DATA)))


def build(cat, cache, seed=0, **flags):
    ns = datasets.namespace(dataset="isic2019", data_dir=str(DATA), image_size=SIZE,
                            cache_dir=cache, **flags)
    return datasets.build(cat, ns, seed)


@pytest.fixture(scope="module")
def fed(cat, cache):
    return build(cat, cache)


def image_of(f):
    return Path(f).stem


def test_centre_assignment_follows_the_rule_for_every_image(cat, expected):
    gt = rows("ISIC_2019_Training_GroundTruth.csv")
    assert len(cat.files) == len(gt) == 12760
    for f, s in zip(cat.files, cat.site):
        want = expected[image_of(f)]
        assert (cat.site_names[s] if s >= 0 else None) == want, f
    assert set(cat.site_names) == {"BCN", "HAM_vidir_molemax", "HAM_vidir_modern",
                                   "HAM_rosendahl", "MSK", "HAM_vienna_dias"}
    assert cat.site_names == datasets.ISIC2019_CENTRES                # published ids 0..5
    assert cat.site_names.index("MSK") == 4 and cat.site_names.index("HAM_vienna_dias") == 5
    assert (cat.site < 0).sum() == README_NO_LESION
    # labels: argmax over the 8 classes; UNK never positive
    classes = datasets.ISIC2019_CLASSES
    for r, y in zip(gt, cat.y):
        assert float(r["UNK"]) == 0.0
        assert float(r[classes[y]]) == 1.0
    assert set(np.unique(cat.y)) <= set(range(8))


def test_natural_federation_matches_the_readme(fed, expected):
    names = [c.name for c in fed.clients]
    assert names == ["HAM_vidir_molemax", "HAM_vidir_modern", "HAM_rosendahl", "MSK",
                     "HAM_vienna_dias"]                               # published id order, no BCN
    totals = {c.name: len(c.train) + len(c.test) for c in fed.clients}
    assert totals == README_CENTRES
    for c in fed.clients:                                             # every image by the rule
        for i in np.concatenate([c.train, c.test]):
            assert expected[image_of(fed.files[i])] == c.name
    assert fed.x.shape == (sum(README_CENTRES.values()), 3, SIZE, SIZE)
    table = fed.table()
    for name, n in README_CENTRES.items():
        assert f"{name} {n:,}" in table
    assert "absent from this folder: BCN" in table
    assert fed.info["centre_ids"]["MSK"] == 4


def test_no_image_in_two_clients_or_on_both_sides(fed):
    seen = Counter()
    for c in fed.clients:
        assert not set(c.train) & set(c.test)
        seen.update(fed.files[i] for i in np.concatenate([c.train, c.test]))
    assert max(seen.values()) == 1 and len(seen) == len(fed.files)
    for c in fed.clients:                                             # about 80/20, per class
        y = fed.y.numpy()
        assert abs(len(c.test) / (len(c.train) + len(c.test)) - 0.2) < 0.02
        for k in np.unique(y[c.train]):
            n = (y[c.train] == k).sum() + (y[c.test] == k).sum()
            assert abs((y[c.test] == k).sum() - 0.2 * n) <= 1


def test_split_is_seeded(cat, cache, fed):
    same = build(cat, cache, seed=0)
    other = build(cat, cache, seed=1)
    assert fed.split_summary() == same.split_summary()
    assert all(np.array_equal(a.test, b.test) for a, b in zip(fed.clients, same.clients))
    assert not all(set(np.array(fed.files)[a.test]) == set(np.array(other.files)[b.test])
                   for a, b in zip(fed.clients, other.clients))
    assert np.array_equal(fed.x.numpy(), same.x.numpy())
    assert same.info["images_decoded"] == 0                           # the cache served it


def lesions(f, idx, lesion_of):
    return {lesion_of[image_of(f.files[i])] for i in idx}


@pytest.fixture(scope="module")
def lesion_of():
    return {r["image"]: r["lesion_id"] or r["image"] for r in rows("ISIC_2019_Training_Metadata.csv")}


def test_isic2019_lesion_split_keeps_each_lesion_on_one_side(cat, cache, lesion_of):
    for partition in ("natural", "dirichlet"):
        f = build(cat, cache, split_unit="lesion", partition=partition, clients=4)
        train = set().union(*(lesions(f, c.train, lesion_of) for c in f.clients))
        test = set().union(*(lesions(f, c.test, lesion_of) for c in f.clients))
        assert train and test and not train & test, partition
    assert len(f.files) == 12760                                      # no centre needed here


def test_ham10000_lesion_aware_split(cache):
    """The HAM10000 loader finds its images anywhere under the root, here inside
    ISIC_2019_Training_Input; sites are its four dataset sources."""
    ham = {r["image_id"]: r for r in rows("HAM10000_metadata.csv")}
    ns = datasets.namespace(dataset="ham10000", data_dir=str(DATA), image_size=SIZE,
                            cache_dir=cache)
    for partition in ("natural", "iid"):
        f = datasets.load(datasets.namespace(**{**vars(ns), "partition": partition}), seed=3)
        assert len(f.files) == 10015 and f.classes == datasets.HAM_CLASSES
        train = {ham[image_of(f.files[i])]["lesion_id"] for c in f.clients for i in c.train}
        test = {ham[image_of(f.files[i])]["lesion_id"] for c in f.clients for i in c.test}
        assert not train & test, partition
        assert 0.15 < sum(len(c.test) for c in f.clients) / len(f.files) < 0.25
        if partition == "natural":
            assert [c.name for c in f.clients] == datasets.HAM_SOURCES
            for c in f.clients:
                assert {ham[image_of(f.files[i])]["dataset"] for i in c.train} == {c.name}
        y = f.y.numpy()
        for i in range(0, len(f.files), 97):
            assert datasets.HAM_CLASSES[y[i]].lower() == ham[image_of(f.files[i])]["dx"]
