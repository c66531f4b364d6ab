"""Real CLIP weights loaded offline the way open_clip runs them (issue #19, first section):
QuickGELU for OpenAI weights through every way a file can be given, a local folder's
preprocess mean/std, OpenAI's TorchScript `clip.load` file, hf-hub names refused in one
line, and a bad --pretrained found before any image is read. A tiny open_clip config
stands in for ViT-B-32; nothing touches the network."""
import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clip_adapters as ca  # noqa: E402
import datasets  # noqa: E402
import fedmed  # noqa: E402
import run  # noqa: E402
from helpers import one_line_error, register_clip_config  # noqa: E402

UsageError = fedmed.UsageError
TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
GELU, QUICK = "fedmed-tiny-load", "fedmed-tiny-load-quickgelu"


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    register_clip_config(tmp_path_factory, GELU, TINY)
    register_clip_config(tmp_path_factory, QUICK, {**TINY, "quick_gelu": True})
    return ca.resolve_model(GELU), ca.resolve_model(QUICK)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)


def backbone(model, pretrained, seed=7):
    return ca.ClipBackbone(ca.ClipArgs(clip_model=model, pretrained=pretrained), seed,
                           torch.device("cpu"), None)


@pytest.fixture(scope="module")
def saved(specs, images, tmp_path_factory):
    """A QuickGELU model (seed 5) saved as a state dict, its image features, and the
    features of the same weights run with GELU (which must differ, or nothing is shown)."""
    d = tmp_path_factory.mktemp("weights")
    model = ca.build_clip(specs[1], ca.resolve_weights(specs[1], "none", 5), 5)
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    torch.save(model.state_dict(), d / "tiny.pt")
    ref = backbone(QUICK, "none", seed=5).encode_images(images)
    gelu = backbone(GELU, str(d / "tiny.pt")).encode_images(images)
    assert not torch.allclose(gelu, ref, atol=1e-4)
    return {"dir": d, "model": model, "file": str(d / "tiny.pt"), "ref": ref}


def local_dir(root, name, state, model_cfg, preprocess_cfg=None):
    d = root / name
    d.mkdir()
    torch.save(state, d / "open_clip_pytorch_model.bin")
    cfg = {"model_cfg": model_cfg}
    if preprocess_cfg is not None:
        cfg["preprocess_cfg"] = preprocess_cfg
    (d / "open_clip_config.json").write_text(json.dumps(cfg))
    return d


def test_quickgelu_weights_reload_identically_through_a_file_and_a_local_dir(
        specs, saved, images, tmp_path):
    """A model saved with QuickGELU gives the same features back (a) as a file with the
    -quickgelu model config and (b) as local-dir: whose open_clip_config.json (open_clip's
    export format) says quick_gelu, even with the plain --clip-model name."""
    bb = backbone(QUICK, saved["file"])
    assert bb.weights.quick_gelu
    assert torch.equal(bb.encode_images(images), saved["ref"])
    d = local_dir(tmp_path, "export", saved["model"].state_dict(), {**TINY, "quick_gelu": True})
    bb = backbone(GELU, f"local-dir:{d}")
    assert bb.weights.quick_gelu and bb.store.key["quick_gelu"] is True
    assert torch.equal(bb.encode_images(images), saved["ref"])
    d = local_dir(tmp_path, "plain", saved["model"].state_dict(), TINY)   # says nothing: GELU
    assert not backbone(GELU, f"local-dir:{d}").weights.quick_gelu


def test_local_dir_preprocess_mean_and_std_are_honoured(specs, saved, images, tmp_path):
    """preprocess_cfg mean = std = 0.5 in open_clip_config.json: the input is (x - 0.5)/0.5
    and the feature cache key differs from the folder without it."""
    half = local_dir(tmp_path, "half", saved["model"].state_dict(), TINY,
                     {"mean": [0.5] * 3, "std": [0.5] * 3})
    plain = local_dir(tmp_path, "plain", saved["model"].state_dict(), TINY)
    bb = backbone(GELU, f"local-dir:{half}")
    x = images.float() / 255
    assert torch.allclose(bb.preprocess(images), (x - 0.5) / 0.5, atol=1e-6)
    other = backbone(GELU, f"local-dir:{plain}")
    assert not torch.allclose(other.preprocess(images), (x - 0.5) / 0.5, atol=1e-3)
    assert bb.store.key["preprocess"] != other.store.key["preprocess"]
    assert bb.store.key != other.store.key
    ok = local_dir(tmp_path, "neg", saved["model"].state_dict(), TINY,
                   {"mean": [-1, 0, 1], "std": [1, 2, 3]})          # a mean may be <= 0
    assert ca.resolve_weights(specs[0], f"local-dir:{ok}", 0).mean == (-1, 0, 1)
    for i, pre in enumerate(({"mean": [0.5], "std": [1, 1, 1]}, {"std": [0, 1, 1]},
                             {"mean": ["a", 0, 0]}, {"mean": [float("nan"), 0, 0]},
                             {"std": [1, -1, 1]}, "x")):
        bad = local_dir(tmp_path, f"bad{i}", saved["model"].state_dict(), TINY, pre)
        with pytest.raises(UsageError, match="preprocess_cfg"):
            ca.resolve_weights(specs[0], f"local-dir:{bad}", 0)


def torchscript(model, path):
    """A TorchScript archive of the tiny CLIP, as OpenAI's clip.load files are (with
    their three size entries in the state dict, which are not weights)."""
    model = copy.deepcopy(model)
    for k in ("input_resolution", "context_length", "vocab_size"):
        model.__dict__.pop(k, None)                      # open_clip keeps some as ints
        model.register_buffer(k, torch.tensor(7))
    ts = torch.jit.trace_module(model, {
        "encode_image": torch.zeros(1, 3, 32, 32),
        "encode_text": torch.zeros(1, 8, dtype=torch.long)}, check_trace=False)
    ts.save(str(path))
    return str(path)


def test_a_torchscript_clip_file_loads_with_quickgelu(specs, saved, images, tmp_path, monkeypatch):
    """OpenAI's clip.load file: given as --pretrained FILE, or found by a tag in
    ~/.cache/clip (open_clip's url branch), it loads (torch.jit.load; torch.load with
    weights_only refuses the archive) and runs with QuickGELU under the plain model name."""
    with pytest.raises(RuntimeError):
        torch.load(torchscript(saved["model"], tmp_path / "probe.pt"), weights_only=True)
    home = tmp_path / "home"
    (home / ".cache" / "clip").mkdir(parents=True)
    f = torchscript(saved["model"], home / ".cache" / "clip" / "Tiny-B-32.pt")
    bb = backbone(GELU, f)
    assert bb.weights.kind == "file" and bb.weights.quick_gelu
    assert torch.equal(bb.encode_images(images), saved["ref"])

    from open_clip import pretrained as ocp
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(ocp, "get_pretrained_cfg", lambda m, t: {
        "url": "https://example.invalid/clip/Tiny-B-32.pt"} if t == "openai" else {})
    monkeypatch.setattr(ca, "_online", lambda host="huggingface.co": False)
    bb = backbone(GELU, "openai")
    assert (bb.weights.kind, bb.weights.path, bb.weights.quick_gelu) == ("tag", f, True)
    assert torch.equal(bb.encode_images(images), saved["ref"])
    clf = ca.image_classifier(GELU, 3, f)                 # --model clip:NAME --weights FILE
    assert torch.equal(clf.visual.conv1.weight, saved["model"].visual.conv1.weight)
    assert type(clf.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_offline_tag_error_names_the_quickgelu_model(specs, monkeypatch):
    """The tag's weights run with QuickGELU: the way out it names keeps them so."""
    from open_clip import pretrained as ocp
    monkeypatch.setattr(ocp, "get_pretrained_cfg", lambda m, t: {"url": "https://x/none.pt",
                                                                  "quick_gelu": True})
    monkeypatch.setattr(ca, "_tag_local_file", lambda c: None)
    monkeypatch.setattr(ca, "_online", lambda host="huggingface.co": False)
    with pytest.raises(UsageError) as e:
        ca.resolve_weights(specs[0], "openai", 0)
    assert f"--clip-model {QUICK} --pretrained PATH" in str(e.value)
    with pytest.raises(UsageError) as e:
        ca.resolve_weights(specs[1], "openai", 0)            # already the QuickGELU model
    assert "with --pretrained PATH" in str(e.value) and "--clip-model" not in str(e.value)
    other = ca.ModelSpec("fedmed-tiny-nothing", TINY)        # no -quickgelu config exists
    with pytest.raises(UsageError) as e:
        ca.resolve_weights(other, "openai", 0)
    assert "local-dir:FOLDER" in str(e.value) and "quick_gelu" in str(e.value)


def test_hf_hub_model_is_a_one_line_error(tmp_path, capsys):
    code = run.main(["--algo", "clip_zeroshot", "--clip-model", "hf-hub:someone/some-clip",
                     "--pretrained", "none", "--quiet", "--out", str(tmp_path / "o")])
    one_line_error(capsys, code, "--clip-model hf-hub:someone/some-clip", "local-dir:FOLDER")


def test_a_bad_pretrained_file_stops_the_run_before_any_image(specs, tmp_path, capsys, monkeypatch):
    """A junk file or a checkpoint of another architecture: the one-line error comes
    before the dataset is loaded (datasets.load would fail the test)."""
    def no_data(*a, **k):
        raise AssertionError("the dataset was read before the weights were checked")
    monkeypatch.setattr(datasets, "load", no_data)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    wrong = tmp_path / "wrong.pt"
    base = ["--algo", "clip_zeroshot", "--clip-model", GELU, "--quiet", "--clients", "2"]
    code = run.main(base + ["--pretrained", str(junk), "--out", str(tmp_path / "a")])
    one_line_error(capsys, code, str(junk), "cannot be read")
    torch.save({k: torch.zeros(1) for k in ("visual.proj", "text_projection")}, wrong)
    code = run.main(base + ["--pretrained", str(wrong), "--out", str(tmp_path / "b")])
    one_line_error(capsys, code, str(wrong), "does not fit")
    d = local_dir(tmp_path, "d", {"x": torch.zeros(1)}, TINY)
    code = run.main(base + ["--pretrained", f"local-dir:{d}", "--out", str(tmp_path / "c")])
    one_line_error(capsys, code, "does not fit", "missing")
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_an_exported_folder_is_its_own_model_config(specs, saved, images, tmp_path):
    """--clip-model FOLDER/open_clip_config.json --pretrained local-dir:FOLDER (open_clip's
    export, what the hf-hub error points to): registered under the folder's name (open_clip's
    registry reads flat configs only) and loaded with the folder's QuickGELU."""
    d = local_dir(tmp_path, "exported-tiny", saved["model"].state_dict(), {**TINY, "quick_gelu": True})
    bb = backbone(str(d / "open_clip_config.json"), f"local-dir:{d}")
    assert bb.spec.name == "exported-tiny" and bb.weights.quick_gelu
    assert torch.equal(bb.encode_images(images), saved["ref"])


def test_a_torchscript_file_must_fit_exactly(specs, saved, tmp_path, recwarn):
    """A TorchScript file is held to the same strict fit as a state dict: an extra tensor
    or a missing one is named in one line; reading it shows no deprecation warning."""
    extra = copy.deepcopy(saved["model"])
    extra.register_buffer("extra_table", torch.zeros(3))
    with pytest.raises(fedmed.UsageError, match=r"unexpected \['extra_table'\]"):
        ca.resolve_weights(specs[0], torchscript(extra, tmp_path / "extra.pt"), 0)
    lacking = copy.deepcopy(saved["model"])
    del lacking.logit_scale                               # not used by either tower
    with pytest.raises(fedmed.UsageError, match=r"missing \['logit_scale'\]"):
        ca.resolve_weights(specs[0], torchscript(lacking, tmp_path / "lacking.pt"), 0)
    ok = torchscript(saved["model"], tmp_path / "ok.pt")
    recwarn.clear()
    ca.resolve_weights(specs[0], ok, 0)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_a_weights_file_is_checked_once_quietly(specs, saved, tmp_path, monkeypatch, caplog):
    """resolve_weights reads a file once per process (run.py's check before the data, then
    the build): the second call does not read it again; no open_clip warning is shown and
    logging is left as it was; no warning is printed (the check runs on the meta device)."""
    import logging
    import warnings
    f = tmp_path / "once.pt"
    torch.save(saved["model"].state_dict(), f)
    reads = []
    real = ca.load_weights
    monkeypatch.setattr(ca, "load_weights", lambda *a, **k: reads.append(a[1]) or real(*a, **k))
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ca.resolve_weights(specs[1], str(f), 0)
    assert not seen, [str(w.message)[:80] for w in seen[:3]]   # e.g. torch's meta-copy notes
    assert logging.root.manager.disable == logging.NOTSET
    ca.resolve_weights(specs[1], str(f), 0)
    assert reads == [str(f)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
