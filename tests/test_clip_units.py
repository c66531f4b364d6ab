"""The loading, preprocessing and caching pieces of clip_adapters.py, pinned one property
at a time (issue #11: each test fails when one line of the piece it names is wrong).
Nothing here needs network access or real CLIP weights: a tiny open_clip config is
registered, and the network, the Hugging Face cache and open_clip's tag registry are
replaced by fakes where a path needs them."""
import builtins
import json
import logging
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clip_adapters as ca  # noqa: E402
import fedmed  # noqa: E402
from helpers import register_clip_config  # noqa: E402

UsageError = fedmed.UsageError
TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    register_clip_config(tmp_path_factory, "fedmed-tiny-units", TINY)
    return ca.resolve_model("fedmed-tiny-units")


def backbone(**kw):
    args = ca.ClipArgs(**{"clip_model": "fedmed-tiny-units", "pretrained": "none", **kw})
    return ca.ClipBackbone(args, 0, torch.device("cpu"), None)


# ---------------------------------------------------------------- normalisation constants

def test_normalisation_constants_are_the_ones_the_weights_were_trained_with():
    """--clip-preprocess clip uses OpenAI CLIP's dataset mean/std and imagenet uses
    ImageNet's: the values open_clip and torchvision themselves publish."""
    from open_clip import constants
    from torchvision.models import ResNet18_Weights
    assert ca.OPENAI_MEAN == tuple(constants.OPENAI_DATASET_MEAN)
    assert ca.OPENAI_STD == tuple(constants.OPENAI_DATASET_STD)
    assert ca.IMAGENET_MEAN == tuple(constants.IMAGENET_MEAN)
    assert ca.IMAGENET_STD == tuple(constants.IMAGENET_STD)
    tv = ResNet18_Weights.IMAGENET1K_V1.transforms()
    assert list(ca.IMAGENET_MEAN) == list(tv.mean) and list(ca.IMAGENET_STD) == list(tv.std)


# ---------------------------------------------------------------- resolve_model

def test_a_shipped_model_name_resolves_without_importing_open_clip(tiny, monkeypatch):
    """Checking --clip-model ViT-B-32 (done before any data is read) reads open_clip's
    shipped config file; it neither needs open_clip imported nor imports it (a few
    seconds)."""
    for name in [m for m in sys.modules if m == "open_clip" or m.startswith("open_clip.")]:
        monkeypatch.delitem(sys.modules, name)
    real_import = builtins.__import__

    def guarded(name, *a, **kw):
        if name == "open_clip" or name.startswith("open_clip."):
            raise AssertionError("resolve_model imported open_clip for a shipped name")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", guarded)
    spec = ca.resolve_model("ViT-B-32")
    assert (spec.name, spec.embed_dim, spec.image_size) == ("ViT-B-32", 512, 224)


def test_unknown_model_name_suggests_near_names(tiny):
    """The error lists at most five known names sharing the first five letters, else the
    first five names open_clip knows."""
    import open_clip
    known = open_clip.list_models()
    near = [m for m in known if m.lower().startswith("vit-b")]
    assert len(near) > 5
    with pytest.raises(UsageError) as e:
        ca.resolve_model("ViT-Bx")
    assert f"(e.g. {', '.join(near[:5])})" in str(e.value)
    with pytest.raises(UsageError) as e:
        ca.resolve_model("zzzzzz-model")
    assert f"(e.g. {', '.join(known[:5])})" in str(e.value)


def test_non_square_vision_configs_are_refused():
    """The towers FedMed drives take square inputs (a side of image_size)."""
    assert ca.ModelSpec("x", {"embed_dim": 8, "vision_cfg": {"image_size": [40, 40]}}).image_size == 40
    with pytest.raises(UsageError, match="square"):
        ca.ModelSpec("x", {"embed_dim": 8, "vision_cfg": {"image_size": [40, 48]}}).image_size


# ---------------------------------------------------------------- resolve_weights

def test_find_in_dir_takes_only_checkpoint_files(tmp_path):
    (tmp_path / "a-notes.txt").write_text("x")
    (tmp_path / "open_clip_config.json").write_text("{}")
    (tmp_path / "b.pt.d").mkdir()
    (tmp_path / "c.pt").write_bytes(b"")
    assert Path(ca._find_in_dir(tmp_path)).name == "c.pt"
    (tmp_path / "c.pt").unlink()
    (tmp_path / "d.pth").mkdir()                  # a folder named like a checkpoint
    assert ca._find_in_dir(tmp_path) is None


def test_tag_file_from_the_hugging_face_cache_only(monkeypatch, tmp_path):
    """A tag's weights already in the local Hugging Face cache are found without the
    network (local_files_only); a .bin/.pth name is tried as .safetensors first; a bare
    repo tries open_clip's two file names."""
    import huggingface_hub
    calls = []

    def fake(repo, name, local_files_only=False):
        calls.append((repo, name, local_files_only))
        if name in have:
            return f"/cache/{repo}/{name}"
        raise FileNotFoundError(name)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    have = {"open_clip_pytorch_model.bin"}
    assert ca._tag_local_file({"hf_hub": "org/rep/open_clip_pytorch_model.bin"}) == \
        "/cache/org/rep/open_clip_pytorch_model.bin"
    assert calls == [("org/rep", "open_clip_pytorch_model.safetensors", True),
                     ("org/rep", "open_clip_pytorch_model.bin", True)]
    calls.clear()
    have = {"open_clip_pytorch_model.safetensors"}
    assert ca._tag_local_file({"hf_hub": "org/rep/weights.pth"}) is None
    assert [c[1] for c in calls] == ["weights.safetensors", "weights.pth"]
    calls.clear()
    have = {"open_clip_pytorch_model.bin"}
    assert ca._tag_local_file({"hf_hub": "org/rep/"}) == \
        "/cache/org/rep/open_clip_pytorch_model.bin"
    assert calls == [("org/rep", "open_clip_model.safetensors", True),      # open_clip's names
                     ("org/rep", "open_clip_pytorch_model.bin", True)]
    f = tmp_path / "w.pt"
    f.write_bytes(b"")
    assert ca._tag_local_file({"file": str(f), "hf_hub": "org/rep/"}) == str(f)


def test_online_asks_the_resolver_for_port_443(monkeypatch):
    seen = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port: seen.append((host, port)))
    assert ca._online("example.org") is True and seen == [("example.org", 443)]

    def down(host, port):
        raise socket.gaierror("no network")

    monkeypatch.setattr(socket, "getaddrinfo", down)
    assert ca._online() is False


@pytest.fixture
def fake_tags(monkeypatch, tmp_path):
    """open_clip's tag registry for the tiny model: tags t0..tN-1, each with a weights file
    that is either in a local cache (found) or needs a download."""
    from open_clip import pretrained as ocp
    state = {"tags": [], "local": None, "online": False, "downloaded": []}
    dl = tmp_path / "downloaded.pt"
    dl.write_bytes(b"")

    def get_cfg(model, tag):
        return {"url": "https://x/y.pt", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                **state.get("extra", {})} if tag in state["tags"] else {}

    def download(cfg):
        state["downloaded"].append(cfg)
        return str(dl)

    monkeypatch.setattr(ocp, "get_pretrained_cfg", get_cfg)
    monkeypatch.setattr(ocp, "list_pretrained_tags_by_model", lambda m: list(state["tags"]))
    monkeypatch.setattr(ocp, "download_pretrained", download)
    monkeypatch.setattr(ca, "_tag_local_file", lambda c: state["local"])
    monkeypatch.setattr(ca, "_online", lambda host="huggingface.co": state["online"])
    state["file"] = str(dl)
    return state


def test_unknown_tag_lists_six_of_the_models_tags(tiny, fake_tags):
    for n, shown in ((7, "t0, t1, t2, t3, t4, t5, ..."), (6, "t0, t1, t2, t3, t4, t5"),
                     (0, "none")):
        fake_tags["tags"] = [f"t{i}" for i in range(n)]
        with pytest.raises(UsageError) as e:
            ca.resolve_weights(tiny, "nosuchtag", 0)
        assert f"(its tags: {shown});" in str(e.value)


def test_a_tag_is_downloaded_only_when_not_on_this_machine(tiny, fake_tags, tmp_path):
    """A tag: its local file when present (no download); else a download when online;
    else a one-line error. The tag's QuickGELU flag and mean/std come with it."""
    fake_tags["tags"] = ["t0"]
    local = tmp_path / "local.pt"
    local.write_bytes(b"")
    fake_tags.update(local=str(local), online=True)
    w = ca.resolve_weights(tiny, "t0", 0)
    assert (w.kind, w.path, w.tag, w.quick_gelu) == ("tag", str(local), "t0", False)
    assert (w.mean, w.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert fake_tags["downloaded"] == []
    fake_tags.update(local=None, extra={"quick_gelu": True})
    w = ca.resolve_weights(tiny, "t0", 0)
    assert (w.path, w.quick_gelu) == (fake_tags["file"], True) and len(fake_tags["downloaded"]) == 1
    fake_tags["online"] = False
    with pytest.raises(UsageError, match="need a download"):
        ca.resolve_weights(tiny, "t0", 0)
    assert len(fake_tags["downloaded"]) == 1


def test_one_line_message_of_an_exception():
    assert ca._one_line(ValueError("a  b\n\tc ")) == "a b c"
    assert ca._one_line(ValueError()) == "ValueError"
    assert ca._one_line(ValueError("x" * 300)) == "x" * 200


# ---------------------------------------------------------------- load_weights

def test_load_weights_names_the_first_mismatch(tiny, tmp_path):
    """A checkpoint loads only when it fits exactly; otherwise the error names a shape
    mismatch, else the missing keys, else the unexpected ones."""
    model = ca.build_clip(tiny, ca.resolve_weights(tiny, "none", 1), 1)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    other = ca.build_clip(tiny, ca.resolve_weights(tiny, "none", 2), 2)
    good = tmp_path / "good.pt"
    torch.save(sd, good)
    ca.load_weights(other, str(good), tiny)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in sd.items())
    key = sorted(sd)[3]

    def fails(state, needle, name):
        p = tmp_path / name
        torch.save(state, p)
        with pytest.raises(UsageError) as e:
            ca.load_weights(other, str(p), tiny)
        assert needle in str(e.value), str(e.value)

    fails({}, "cannot be read as a checkpoint (an empty state dict)", "empty.pt")
    fails([1, 2], "cannot be read as a checkpoint", "list.pt")
    fails({k: v for k, v in sd.items() if k != key}, f"missing ['{key}']", "missing.pt")
    fails({**sd, "extra.weight": torch.zeros(2)}, "unexpected ['extra.weight']", "extra.pt")
    fails({**sd, key: torch.zeros(*sd[key].shape, 2)},
          f"shape mismatch at {key}: file {tuple(sd[key].shape) + (2,)}", "shape.pt")


# ---------------------------------------------------------------- building quietly

def test_building_a_model_logs_no_warning_and_restores_logging(tiny, tmp_path, caplog):
    """open_clip warns 'initialized randomly' before FedMed loads the weights; that
    warning is not shown, and logging is left as it was."""
    caplog.set_level(logging.INFO)
    ca.build_clip(tiny, ca.resolve_weights(tiny, "none", 0), 0)
    assert logging.root.manager.disable == logging.NOTSET
    ca.image_classifier("fedmed-tiny-units", 3)
    assert logging.root.manager.disable == logging.NOTSET
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    logging.getLogger("fedmed-test").warning("still shown")
    assert caplog.records[-1].getMessage() == "still shown"


# ---------------------------------------------------------------- prompts

def test_readable_keeps_short_acronyms_only():
    assert ca.readable("COVID") == "COVID"
    assert ca.readable("NORMAL") == "normal"              # chest X-ray class folder
    assert ca.readable("PNEUMONIA_bacterial") == "pneumonia bacterial"


# ---------------------------------------------------------------- the feature cache

def test_feature_cache_root_is_beside_the_image_cache():
    class Fed:
        info = {"image_cache": os.path.join("/data", "cache", "isic-64.npy")}
    assert ca.default_cache_root(Fed) == os.path.join("/data", "cache")


def test_image_digest_covers_the_shape():
    a = torch.zeros(3, 2, 4, dtype=torch.uint8)
    b = torch.zeros(3, 4, 2, dtype=torch.uint8)
    ha, hb = ca.image_hashes(torch.stack([a])), ca.image_hashes(torch.stack([b]))
    assert ha != hb and len(ha[0]) == 16


def test_store_key_does_not_depend_on_dict_order(tmp_path):
    one = ca.FeatureStore(str(tmp_path), {"a": 1, "b": 2}, "m")
    two = ca.FeatureStore(str(tmp_path), {"b": 2, "a": 1}, "m")
    assert one.dir == two.dir and one.dir.startswith(str(tmp_path / "clip-features" / "m-"))


def shard(path, h, f):
    with open(path, "wb") as fh:
        np.savez(fh, h=h, f=f)


def test_store_reads_shards_only_and_drops_damaged_ones(tmp_path, capsys):
    """Only part-*.npz files are shards: another process's temporary file is left alone.
    A shard whose arrays disagree, or that holds pickled objects (never unpickled), is a
    cache miss: removed with a log line."""
    store = ca.FeatureStore(str(tmp_path), {"k": 1}, "m")
    h = np.arange(32, dtype=np.uint8).reshape(2, 16)
    store.add(h, np.ones((2, 4), np.float32))
    d = Path(store.dir)
    busy = d / "part-20260101000000-abcd.npz.tmp4242"   # being written by another run
    busy.write_bytes(b"partial")
    stray = d / "notes.npz"
    stray.write_bytes(b"x")
    index, f = store.load()
    assert len(index) == 2 and f.shape == (2, 4)
    assert busy.exists() and stray.exists() and (d / "key.json").exists()
    bad = d / "part-bad-lengths.npz"
    shard(bad, h, np.ones((3, 4), np.float32))
    marker = tmp_path / "pickle-ran"

    class Boom:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    evil = d / "part-evil.npz"
    obj = np.empty((2, 4), dtype=object)
    obj[0, 0] = Boom()
    shard(evil, h, obj)
    index, f = store.load()
    assert len(index) == 2 and f.dtype == np.float32
    assert not bad.exists() and not evil.exists() and not marker.exists()
    assert capsys.readouterr().err.count("removing unreadable shard") == 2


def test_text_features_never_unpickle_a_cached_file(tiny, tmp_path):
    bb = backbone(feature_cache=str(tmp_path))
    bb.store = ca.FeatureStore(str(tmp_path), {"k": 2}, "m")
    names, templates = ["a", "b"], ["{}"]
    ref = bb.text_features(names, templates)
    path = bb.store.text_path(json.dumps({"names": names, "templates": templates}))
    marker = tmp_path / "pickle-ran"

    class Boom:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    obj = np.empty((2, 16), dtype=object)
    obj[0, 0] = Boom()
    np.save(path, obj, allow_pickle=True)
    again = bb.text_features(names, templates)
    assert not marker.exists() and torch.allclose(again, ref)


# ---------------------------------------------------------------- ClipBackbone

def test_feature_batch_size_must_be_positive(tiny):
    assert backbone(feature_batch_size=1).args.feature_batch_size == 1
    with pytest.raises(UsageError, match="--feature-batch-size"):
        backbone(feature_batch_size=0)


def test_build_seconds_is_the_time_the_build_took(tiny):
    import time
    bb = backbone()
    t0 = time.perf_counter()
    bb.model
    wall = time.perf_counter() - t0
    assert 0 < bb.stats["build_seconds"] <= wall


def test_images_at_the_towers_size_are_not_resampled(tiny, monkeypatch):
    """Backbone preprocessing and ClipImageClassifier resize only when a side differs
    from the tower's input size (bicubic, align_corners False; the backbone also
    antialiases), and pass images of the right size through untouched."""
    calls = []
    real = F.interpolate

    def spy(x, *a, **kw):
        calls.append((tuple(x.shape[-2:]), kw.get("size")))
        return real(x, *a, **kw)

    monkeypatch.setattr(F, "interpolate", spy)
    bb = backbone()
    bb.preprocess(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert calls == []
    for shape in ((32, 20), (20, 32)):
        bb.preprocess(torch.zeros(1, 3, *shape, dtype=torch.uint8))
    assert calls == [((32, 20), (32, 32)), ((20, 32), (32, 32))]

    seen = []

    class Visual(nn.Module):
        def forward(self, x):
            seen.append(x)
            return x.mean(dim=(2, 3)).repeat(1, 2)[:, :4]

    m = ca.ClipImageClassifier(Visual(), 4, 2, 8)
    calls.clear()
    x8 = torch.rand(2, 3, 8, 8)
    m(x8)
    assert calls == [] and seen[-1] is x8
    for shape in ((8, 5), (5, 8), (6, 6)):
        x = torch.rand(2, 3, *shape)
        m(x)
        assert torch.equal(seen[-1], real(x, size=(8, 8), mode="bicubic", align_corners=False))
    assert [c[0] for c in calls] == [(8, 5), (5, 8), (6, 6)]


def test_every_image_tower_pass_has_one_block_shape(tiny, monkeypatch):
    """encode_images: every forward pass of the image tower sees exactly ENCODE_BLOCK
    images, the last block padded with copies of its last image."""
    bb = backbone()
    sizes = []
    real = bb.model.encode_image

    def spy(x):
        sizes.append(len(x))
        return real(x)

    monkeypatch.setattr(bb.model, "encode_image", spy)
    g = torch.Generator().manual_seed(1)
    for n in (1, 15, 16, 17, 40):
        sizes.clear()
        imgs = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        assert bb.encode_images(imgs).shape == (n, 16)
        assert sizes == [ca.ENCODE_BLOCK] * -(-n // ca.ENCODE_BLOCK)


def test_image_classifier_loads_a_whole_clip_checkpoint(tiny, tmp_path):
    """--model clip:NAME --weights FILE: the image tower of the checkpoint, a fresh head."""
    src = ca.build_clip(tiny, ca.resolve_weights(tiny, "none", 9), 9)
    f = tmp_path / "clip.pt"
    torch.save(src.state_dict(), f)
    m = ca.image_classifier("fedmed-tiny-units", 3, weights=str(f))
    for k, v in src.visual.state_dict().items():
        assert torch.equal(m.visual.state_dict()[k], v), k
    assert m.head.out_features == 3
    with pytest.raises(UsageError, match="no such file"):
        ca.image_classifier("fedmed-tiny-units", 3, weights=str(tmp_path / "gone.pt"))


# ---------------------------------------------------------------- LMMD kernel

def test_images_are_decoded_at_the_clip_models_input_size(tiny):
    """run.py decodes images at --clip-model's input resolution (the default model's
    when no flags were parsed)."""
    import algorithms
    import fedmed as fm
    algorithms.load_all()
    cls = fm.ALGORITHMS["fedclip"]
    assert cls.default_image_size(ca.ClipArgs(clip_model="fedmed-tiny-units")) == 32
    assert cls.default_image_size(None) == 224                     # ViT-B-32
