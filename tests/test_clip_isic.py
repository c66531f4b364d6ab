"""The CLIP methods end to end on real dermoscopy images (../shared/data/isic2019-mini,
skipped where it is absent): FedMedCLIP with a tiny open_clip configuration registered
here, and the real ViT-B-32 architecture (random weights: nothing can be downloaded) on a
few images per centre."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import run  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isic2019-mini"
pytestmark = pytest.mark.skipif(
    not (DATA / "ISIC_2019_Training_GroundTruth.csv").is_file(),
    reason=f"real data absent: {DATA} (the shared isic2019-mini copy) is not there")

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
CENTRES = {"HAM_vidir_molemax", "HAM_vidir_modern", "HAM_rosendahl", "HAM_vienna_dias", "MSK"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "fedmed-tiny-isic.json"
    p.write_text(json.dumps(TINY))
    return str(p)


def go(tmp_path, cache, *flags):
    out = str(tmp_path / "out")
    code = run.main(["--algo", "fedmedclip", "--dataset", "isic2019", "--data-dir", str(DATA),
                     "--partition", "natural", "--pretrained", "none", "--cache-dir", cache,
                     "--quiet", "--out", out] + list(flags))
    assert code == 0
    return (json.load(open(Path(out) / "summary.json")),
            [json.loads(s) for s in open(Path(out) / "metrics.jsonl")],
            json.load(open(Path(out) / "config.json")))


def test_fedmedclip_tiny_config_on_real_images(tmp_path, cache, tiny):
    s, lines, cfg = go(tmp_path, cache, "--clip-model", tiny, "--max-images-per-client", "60",
                       "--rounds", "2", "--holdout-client", "MSK")
    assert set(s["clients"]) == CENTRES - {"MSK"} and set(s["holdout"]) == {"MSK"}
    assert s["view"] == "personal" and set(s["views"]) == {"global"}
    assert {m["view"] for m in lines} == {"personal", "global"}
    assert cfg["classes"][:2] == ["MEL", "NV"]
    assert cfg["algorithm_info"]["class_prompts"][:4] == [
        "a picture of a melanoma", "a picture of a melanocytic nevus",
        "a picture of a basal cell carcinoma", "a picture of an actinic keratosis"]
    assert cfg["config"]["weighting"] == "uniform"             # the public code's 1/K
    assert 0 < s["bytes_up"] < 4 * 2 * 8000           # 4 clients x 2 rounds x the FAM blob


def test_fedmedclip_on_the_real_vit_b_32_architecture(tmp_path, cache):
    s, lines, cfg = go(tmp_path, cache, "--clip-model", "ViT-B-32", "--max-images-per-client", "10",
                       "--rounds", "1")
    assert set(s["clients"]) == CENTRES
    assert cfg["data"]["image_size"] == 224                 # the CLIP input resolution
    info = cfg["algorithm_info"]["clip"]
    assert info["model"] == "ViT-B-32" and info["images"] == 50
    assert info["computed"] in (0, 50)                       # 0: another test filled the cache
    per_client = s["bytes_up"] / 5                    # the FAM of d = 512: 2 x 512 x 514 values
    assert 0.5 * 2 * 2 * 512 * 514 < per_client < 2 * 2 * 512 * 514 + 4096
