"""clip_svm's HAM10000 -> ISIC 2018 pair (sheet clip_svm.md sections 8 and 10.5, 11.6) on
a tiny GENERATED fixture in the official layouts (HAM10000_metadata.csv with lesion_id and
dataset; ISIC2018_Task3_{Training,Validation,Test}_GroundTruth.csv, a LesionGroupings
file). Real HAM10000 / ISIC 2018 are not on this machine: the pair was never run on them.

  * only the Validation / Test images of ISIC 2018 form the unseen client `isic2018`
    (the Training ground truth, which IS HAM10000, is never read);
  * the source's train/test splits are lesion-disjoint (--split-unit lesion, the default);
  * the unseen indices are disjoint from every client's training and test images;
  * an unseen image that is a source image, or an unseen lesion that is a source lesion,
    is refused in one line; --unseen-dir with another --dataset too (exit 2, before data).
"""
import json
import os
import shutil

import numpy as np
import pytest

import datasets
import fedmed
import run
from helpers import one_line_error, register_clip_config

import algorithms  # noqa: E402
from algorithms import clip_svm as cs

algorithms.load_all()

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}}
DX = ["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"]
COLS = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]


def jpg(path, seed):
    from PIL import Image
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path, quality=90)


def gt_csv(path, rows):
    with open(path, "w") as f:
        f.write("image," + ",".join(COLS) + "\n")
        for image, k in rows:
            f.write(image + "," + ",".join("1.0" if j == k else "0.0" for j in range(7)) + "\n")


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    base = tmp_path_factory.mktemp("ham-isic2018")
    ham, isic = base / "ham", base / "isic"
    (ham / "HAM10000_images_part_1").mkdir(parents=True)
    lines, n = ["lesion_id,image_id,dx,dataset"], 0
    for si, src in enumerate(datasets.HAM_SOURCES):
        for k, dx in enumerate(DX):
            for lesion in range(2):
                lid = f"HAM_{si}{k}{lesion}"
                for _ in range(2):                                    # two images a lesion
                    iid = f"ISIC_{n:07d}"
                    jpg(ham / "HAM10000_images_part_1" / f"{iid}.jpg", n)
                    lines.append(f"{lid},{iid},{dx},{src}")
                    n += 1
    (ham / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n")
    (isic / "ISIC2018_Task3_Validation_Input").mkdir(parents=True)
    (isic / "ISIC2018_Task3_Test_Input").mkdir()
    val = [(f"ISIC_{9000000 + i:07d}", i % 7) for i in range(7)]
    test = [(f"ISIC_{9100000 + i:07d}", (i * 3) % 7) for i in range(9)]
    for i, (image, _) in enumerate(val):
        jpg(isic / "ISIC2018_Task3_Validation_Input" / f"{image}.jpg", 10_000 + i)
    for i, (image, _) in enumerate(test):
        jpg(isic / "ISIC2018_Task3_Test_Input" / f"{image}.jpg", 20_000 + i)
    gt_csv(isic / "ISIC2018_Task3_Validation_GroundTruth.csv", val)
    gt_csv(isic / "ISIC2018_Task3_Test_GroundTruth.csv", test)
    gt_csv(isic / "ISIC2018_Task3_Training_GroundTruth.csv", [("ISIC_0000000", 0)])  # = HAM
    (isic / "ISIC2018_Task3_Validation_LesionGroupings.csv").write_text(
        "image,lesion_id\n" + "".join(f"{im},HAM_new{i}\n" for i, (im, _) in enumerate(val)))
    return ham, isic, val, test


def load_ham(ham):
    return datasets.load(datasets.namespace(dataset="ham10000", data_dir=str(ham),
                                            image_size=16, cache_dir="none"), seed=0)


def lesions_of(ham, fed, idx):
    md = {r["image_id"]: r["lesion_id"] for r in datasets.read_csv(
        ham / "HAM10000_metadata.csv", ["image_id", "lesion_id"], "")}
    return {md[os.path.splitext(os.path.basename(fed.files[i]))[0]] for i in idx}


def test_only_validation_and_test_images_form_the_unseen_client(layout):
    ham, isic, val, test = layout
    fed = load_ham(ham)
    n_src = len(fed.y)
    cs.add_isic2018_unseen(fed, str(isic))
    h = [c for c in fed.holdout if c.name == "isic2018"]
    assert len(h) == 1 and len(h[0].train) == 0
    idx = h[0].test
    assert np.array_equal(idx, np.arange(n_src, n_src + len(val) + len(test)))
    stems = [os.path.splitext(os.path.basename(fed.files[i]))[0] for i in idx]
    assert sorted(stems) == sorted(im for im, _ in test + val)
    want = dict(val + test)
    assert [int(fed.y[i]) for i in idx] == [want[s] for s in stems]
    assert fed.x.shape[0] == len(fed.y) == len(fed.files) and fed.x.shape[1:] == (3, 16, 16)
    assert np.array_equal(fed.x[idx[0]].numpy(), datasets.decode_file(fed.files[idx[0]], 16))
    for c in fed.clients:                                     # hygiene (sheet 11.6)
        assert not set(idx) & set(np.concatenate([c.train, c.test]).tolist())
        assert not lesions_of(ham, fed, c.train) & lesions_of(ham, fed, c.test)
    assert "lesion-disjoint" in fed.info["notes"][-1]
    assert fed.info["notes"][-1].startswith(
        f"unseen domain isic2018: {len(val) + len(test)} images of "
        "ISIC2018_Task3_Test_GroundTruth.csv, ISIC2018_Task3_Validation_GroundTruth.csv")
    cs.add_isic2018_unseen(fed, str(isic))                    # a second call adds nothing
    assert len(fed.y) == n_src + len(val) + len(test)


def test_an_unseen_image_or_lesion_of_the_source_is_refused(layout, tmp_path):
    ham, isic, val, test = layout
    bad = tmp_path / "leak"
    (bad / "in").mkdir(parents=True)
    jpg(bad / "in" / "ISIC_0000003.jpg", 3)
    gt_csv(bad / "ISIC2018_Task3_Test_GroundTruth.csv", [("ISIC_0000003", 0)])
    with pytest.raises(datasets.UsageError, match="image ISIC_0000003 is also a source"):
        cs.add_isic2018_unseen(load_ham(ham), str(bad))
    les = tmp_path / "lesion"
    (les / "in").mkdir(parents=True)
    jpg(les / "in" / "ISIC_9999999.jpg", 5)
    gt_csv(les / "ISIC2018_Task3_Validation_GroundTruth.csv", [("ISIC_9999999", 1)])
    (les / "ISIC2018_Task3_Validation_LesionGroupings.csv").write_text(
        "image,lesion_id\nISIC_9999999,HAM_010\n")             # a source lesion
    with pytest.raises(datasets.UsageError, match="lesion HAM_010 has images on both sides"):
        cs.add_isic2018_unseen(load_ham(ham), str(les))
    (tmp_path / "empty").mkdir()
    gt_csv(tmp_path / "empty" / "ISIC2018_Task3_Training_GroundTruth.csv", [("ISIC_0000000", 0)])
    with pytest.raises(datasets.UsageError, match="no ISIC2018_Task3_Validation_GroundTruth"):
        cs.add_isic2018_unseen(load_ham(ham), str(tmp_path / "empty"))
    with pytest.raises(datasets.UsageError, match="is not a folder"):
        cs.add_isic2018_unseen(load_ham(ham), str(tmp_path / "nowhere"))
    with pytest.raises(datasets.UsageError, match="pairs with --dataset ham10000"):
        cs.add_isic2018_unseen(datasets.make_synthetic(0, 2, 16), str(isic))


def test_the_command_line_trains_on_ham_and_evaluates_on_isic2018(layout, tmp_path,
                                                                 tmp_path_factory, capsys):
    ham, isic, val, test = layout
    tiny = register_clip_config(tmp_path_factory, "fedmed-clipsvm-ham", TINY)
    out = str(tmp_path / "run")
    base = ["--algo", "clip_svm", "--image-tower", "mobilenet_v2", "--clip-model", tiny,
            "--pretrained", "none", "--feature-cache", "none", "--image-size", "16",
            "--rounds", "1", "--local-steps", "1", "--batch-size", "4", "--quiet",
            "--cache-dir", "none"]
    code = run.main(base + ["--dataset", "ham10000", "--data-dir", str(ham), "--unseen-dir",
                            str(isic), "--svm", "--out", out])
    assert code == 0, capsys.readouterr().err
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert s["holdout"]["isic2018"]["n"] == len(val) + len(test)
    assert s["feature_classifiers"]["isic2018"]["svm"]["n"] == len(val) + len(test)
    capsys.readouterr()
    out2 = str(tmp_path / "run2")
    code = run.main(base + ["--clients", "2", "--unseen-dir", str(isic), "--out", out2])
    one_line_error(capsys, code, "--unseen-dir: the ISIC 2018 unseen domain pairs with "
                   "--dataset ham10000 (got synthetic)", out=out2)


@pytest.mark.parametrize("drop", ["image", "MEL"])
def test_a_ground_truth_without_a_needed_column_is_one_line(layout, tmp_path, drop):
    """The ISIC 2018 ground truth must name the image and every HAM class; a file without
    one of them is refused naming the file and the column."""
    ham, isic, val, test = layout
    bad = tmp_path / "isic"
    shutil.copytree(isic, bad)
    for name in ("ISIC2018_Task3_Validation_GroundTruth.csv", "ISIC2018_Task3_Test_GroundTruth.csv"):
        rows = (bad / name).read_text().splitlines()
        cols = rows[0].split(",")
        keep = [i for i, c in enumerate(cols) if c != drop]
        (bad / name).write_text("\n".join(",".join(r.split(",")[i] for i in keep)
                                          for r in rows) + "\n")
    with pytest.raises(fedmed.UsageError, match=f"missing column\\(s\\) {drop}"):
        cs.add_isic2018_unseen(load_ham(ham), str(bad))
