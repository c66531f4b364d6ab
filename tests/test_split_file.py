"""--split-file: FLamby's frozen Fed-ISIC2019 split (baselines.md section 7, "Train/test
split": columns image, the 9 class columns, target, center, fold in {train, test}, fold2 in
{train_k, test_k}) read over a generated folder in the official ISIC 2019 layout; the
clients and their train/test sets must be exactly the file's, a centre with no image here
is left out with a note, and every other fault is a one-line error."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasets
import run
from helpers import one_line_error

CLASSES = datasets.ISIC2019_CLASSES + ["UNK"]
HEADER = ["image"] + CLASSES + ["target", "center", "fold", "fold2"]
# centre id (published order) -> lesion_id prefix and HAM10000 source of the generated images
CENTRE = {0: ("BCN_", None), 1: ("HAM_", "vidir_molemax"), 2: ("HAM_", "vidir_modern"),
          3: ("HAM_", "rosendahl"), 4: ("MSK4_", None), 5: ("HAM_", "vienna_dias")}


def fake_folder(root: Path, per_centre=(0, 7, 9, 6, 5, 4), no_lesion=3, seed=0):
    """An official-layout folder; returns [(image, centre or None, class)] of its images.
    Centre 0 (BCN) has no image here, as in isic2019-mini."""
    g = np.random.default_rng(seed)
    images, i = [], 0
    for c, n in list(enumerate(per_centre)) + [(None, no_lesion)]:
        for _ in range(n):
            images.append((f"ISIC_{i:07d}", c, int(g.integers(0, 8))))
            i += 1
    (root / "ISIC_2019_Training_Input").mkdir(parents=True)
    for k, (name, _, _) in enumerate(images):
        a = np.random.default_rng(k).integers(0, 256, (12, 14, 3)).astype(np.uint8)
        Image.fromarray(a).save(root / "ISIC_2019_Training_Input" / f"{name}.jpg")
    with open(root / "ISIC_2019_Training_GroundTruth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image"] + CLASSES)
        for name, _, y in images:
            w.writerow([name] + [f"{float(j == y):.1f}" for j in range(9)])
    with open(root / "ISIC_2019_Training_Metadata.csv", "w", newline="") as f, \
         open(root / "HAM10000_metadata.csv", "w", newline="") as h:
        w, wh = csv.writer(f), csv.writer(h)
        w.writerow(["image", "age_approx", "anatom_site_general", "lesion_id", "gender"])
        wh.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization",
                     "dataset"])
        for k, (name, c, _) in enumerate(images):
            lid = "" if c is None else f"{CENTRE[c][0]}{k:07d}"
            w.writerow([name, 50, "torso", lid, "female"])
            if c is not None and CENTRE[c][1]:
                wh.writerow([lid, name, "nv", "histo", 50, "male", "back", CENTRE[c][1]])
    return images


def split_rows(images, bcn_rows=4, seed=1):
    """FLamby-format rows for every image with a centre (every centre's 2nd, 5th, ... image
    in test: not the project's seeded split), plus `bcn_rows` BCN images that are not in
    the folder, in a shuffled order."""
    listed = [(n, c, y) for n, c, y in images if c is not None]
    listed += [(f"ISIC_9{k:06d}", 0, 1) for k in range(bcn_rows)]
    rows, count = [], {}
    for name, c, y in listed:
        count[c] = count.get(c, 0) + 1
        fold = "test" if count[c] % 3 == 2 else "train"
        rows.append([name] + [f"{float(j == y):.1f}" for j in range(9)]
                    + [y, c, fold, f"{fold}_{c}"])
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order]


def write_split(path: Path, rows, header=HEADER):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "isic"
    images = fake_folder(root)
    return root, images


def load(root, split, tmp_path, **flags):
    ns = datasets.namespace(dataset="isic2019", data_dir=str(root), split_file=str(split),
                            image_size=8, cache_dir=str(tmp_path / "cache"), **flags)
    return datasets.load(ns, seed=0)


def test_clients_and_test_sets_are_exactly_the_files(folder, tmp_path):
    root, images = folder
    rows = split_rows(images)
    fed = load(root, write_split(tmp_path / "train_test_split", rows), tmp_path)
    names = datasets.ISIC2019_CENTRES
    want = {}                                            # centre -> fold -> set of images
    for r in rows:
        want.setdefault(names[int(r[-3])], {}).setdefault(r[-2], set()).add(r[0])
    got = {c.name: {"train": {Path(fed.files[i]).stem for i in c.train},
                    "test": {Path(fed.files[i]).stem for i in c.test}} for c in fed.clients}
    del want["BCN"]                                      # no BCN image here: left out
    assert [c.name for c in fed.clients] == [n for n in names if n in want]   # id order
    for name in want:
        assert got[name]["train"] == want[name].get("train", set()), name
        assert got[name]["test"] == want[name].get("test", set()), name
    for c in fed.clients:                                # labels are the ground truth's
        for i in np.concatenate([c.train, c.test]):
            assert fed.y[i] == dict((n, y) for n, _, y in images)[Path(fed.files[i]).stem]
    notes = " | ".join(fed.info["notes"])
    assert "BCN (4 rows)" in notes and "left out" in notes
    assert "lesion_id" not in notes                      # no-lesion images: simply unused
    assert fed.info["split_rule"].startswith("FLamby's frozen split file train_test_split")
    assert fed.info["split_file"]["rows"] == len(rows)
    # the project's seeded split of the same folder gives other test sets
    seeded = datasets.load(datasets.namespace(dataset="isic2019", data_dir=str(root),
                                              image_size=8, cache_dir=str(tmp_path / "cache")), 0)
    assert any({Path(seeded.files[i]).stem for i in c.test} != got[c.name]["test"]
               for c in seeded.clients)


def test_run_with_split_file_records_it(folder, tmp_path):
    root, images = folder
    split = write_split(tmp_path / "train_test_split", split_rows(images))
    out = tmp_path / "out"
    rc = run.main(["--dataset", "isic2019", "--data-dir", str(root), "--split-file", str(split),
                   "--image-size", "8", "--rounds", "1", "--local-steps", "1", "--batch-size",
                   "4", "--cache-dir", str(tmp_path / "cache"), "--quiet", "--out", str(out)])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["split_file"] == str(split)
    assert len(cfg["dataset_info"]["split_file"]["sha256"]) == 64


def edit(rows, i, col, value):
    rows = [list(r) for r in rows]
    rows[i][HEADER.index(col)] = value
    return rows


@pytest.mark.parametrize("case", ["missing column", "unknown column", "image missing",
                                  "bad fold", "fold2", "target", "label", "centre", "twice",
                                  "no file"])
def test_bad_split_files_are_one_line_errors(case, folder, tmp_path, capsys):
    root, images = folder
    rows = split_rows(images)
    path, header, needles = tmp_path / "split.csv", HEADER, []
    if case == "missing column":
        header = HEADER[:-1]
        rows, needles = [r[:-1] for r in rows], ["fold2"]
    elif case == "unknown column":
        header = HEADER + ["extra"]
        rows, needles = [r + ["x"] for r in rows], ["unknown column", "extra"]
    elif case == "image missing":                        # one image of a centre that has others
        (root / "ISIC_2019_Training_Input" / f"{rows[3][0]}.jpg").unlink()
        gt = root / "ISIC_2019_Training_GroundTruth.csv"
        gt.write_text("".join(line for line in gt.read_text().splitlines(True)
                              if not line.startswith(rows[3][0])))
        needles = [rows[3][0], "row 5", "not in"]
    elif case == "bad fold":
        rows, needles = edit(rows, 2, "fold", "valid"), ["row 4", "valid"]
    elif case == "fold2":
        rows, needles = edit(rows, 2, "fold2", f"{rows[2][-2]}_5"), ["row 4", "fold2"]
    elif case == "target":
        rows, needles = edit(rows, 1, "target", (rows[1][-4] + 1) % 8), ["row 3", "target"]
    elif case == "label":                                # one-hot + target both changed
        y = (rows[1][-4] + 1) % 8
        rows = edit(rows, 1, "target", y)
        for j in range(9):
            rows = edit(rows, 1, CLASSES[j], f"{float(j == y):.1f}")
        needles = ["row 3", "ground truth"]
    elif case == "centre":
        rows, needles = edit(edit(rows, 0, "center", 6), 0, "fold2", "train_6"), ["row 2", "6"]
    elif case == "twice":
        rows, needles = rows + [rows[0]], ["twice", rows[0][0]]
    if case == "no file":
        needles = [str(tmp_path / "nowhere.csv"), "not found"]
        path = tmp_path / "nowhere.csv"
    else:
        write_split(path, rows, header)
    out = tmp_path / "out"
    rc = run.main(["--dataset", "isic2019", "--data-dir", str(root), "--split-file", str(path),
                   "--image-size", "8", "--rounds", "1", "--cache-dir", str(tmp_path / "cache"),
                   "--quiet", "--out", str(out)])
    one_line_error(capsys, rc, *needles, out=str(out))


def test_split_file_only_with_isic2019_and_its_natural_clients(folder, tmp_path, capsys):
    root, images = folder
    split = write_split(tmp_path / "s.csv", split_rows(images))
    base = ["--data-dir", str(root), "--split-file", str(split), "--image-size", "8",
            "--rounds", "1", "--quiet", "--out", str(tmp_path / "out")]
    rc = run.main(["--dataset", "isic2019", "--partition", "iid"] + base)
    one_line_error(capsys, rc, "--split-file", "--partition natural")
    rc = run.main(["--dataset", "ham10000"] + base)
    one_line_error(capsys, rc, "--split-file", "isic2019")
