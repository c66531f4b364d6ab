"""The shared CLIP pieces of clip_adapters.py that the reference-step tests of
test_clip_reference.py use but cannot pin down by themselves (issue #11): the optimiser's
settings on each path (fused Adam / AdamW, a kept torch Adam, SGD), the drop-last rule of
the training batches, the image preprocessing, block encoding of any number of images,
and the fp16 + zlib wire format, each recomputed here by hand."""
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clip_adapters as ca  # noqa: E402
from algorithms import facmic  # noqa: E402
from algorithms import fedmedclip as fmc  # noqa: E402
import datasets  # noqa: E402
from helpers import register_clip_config  # noqa: E402
import fedmed  # noqa: E402
from fedmed import Config, ServerState  # noqa: E402

import algorithms  # noqa: E402 - the methods register themselves

algorithms.load_all()

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return register_clip_config(tmp_path_factory, "fedmed-tiny-parts", TINY)


@pytest.fixture(scope="module")
def fed():
    f = datasets.make_synthetic(seed=3, clients=4, image_size=32)
    f.holdout = datasets.take_holdout(f.clients, "site3", [])
    return f


def make(algo, fed, cache, cfg_extra=None, **kw):
    cls = fedmed.ALGORITHMS[algo]
    cfg = Config(**{"algo": algo, "rounds": 2, **cls.recipe, "batch_size": 16, **(cfg_extra or {})})
    a = cls(cfg, cls.Args(**{"clip_model": "fedmed-tiny-parts", "pretrained": "none",
                             "feature_cache": cache, **kw}), fed)
    clients = fedmed.make_clients(fed)
    a.holdout = [fedmed.ClientState(-1 - i, c.name, np.asarray(c.train), np.asarray(c.test))
                 for i, c in enumerate(fed.holdout)]
    a.setup(ServerState(), clients)
    return a, clients


def test_optimiser_settings_on_every_path(tiny, fed, tmp_path):
    """Sheet §7: Adam with betas (0.9, 0.98), eps 1e-6 and the recipe's weight decay
    (FedCLIP / FACMIC: L2; FedMedCLIP: AdamW, decoupled), its learning rate(s) decayed
    by gamma^r; rebuilt each round through the fused kernel, or (--keep-optimizer, FACMIC)
    a torch Adam whose state is reloaded with the current learning rate; --optimizer
    sgd: momentum SGD."""
    cache = str(tmp_path / "c")
    a, clients = make("fedmedclip", fed, cache)
    a.round = 3
    opt = a.make_optimizer(clients[0])
    assert type(opt) is torch.optim.AdamW
    assert {(g["betas"], g["eps"], g["weight_decay"], g["fused"]) for g in opt.param_groups} == \
        {((0.9, 0.98), 1e-6, 0.02, True)}
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-5 * 0.97 ** 3, 1e-3 * 0.97 ** 3])
    fam = {id(p) for p in a.model.fam.parameters()}
    assert {id(p) for p in opt.param_groups[0]["params"]} == fam
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in a.model.mlp.parameters()}
    b, cb = make("fedclip", fed, cache)
    b.round = 3
    ob = b.make_optimizer(cb[0])
    assert type(ob) is torch.optim.Adam
    assert {(g["betas"], g["eps"], g["weight_decay"], g["fused"]) for g in ob.param_groups} == \
        {((0.9, 0.98), 1e-6, 0.2, True)}
    assert [g["lr"] for g in ob.param_groups] == [5e-5]               # no lr_decay in FedCLIP
    c, cc = make("facmic", fed, cache)
    oc = c.make_optimizer(cc[0])
    assert type(oc) is torch.optim.Adam
    g = oc.param_groups[0]
    assert (g["betas"], g["eps"], g["weight_decay"], g["lr"], g["fused"]) == \
        ((0.9, 0.98), 1e-6, 0.02, 5e-5, True)
    p = g["params"][0]                                               # state kept, lr current
    p.grad = torch.ones_like(p)
    oc.step()
    cc[0].state["optimizer"] = oc.state_dict()
    cc[0].state["optimizer"]["param_groups"][0]["lr"] = 123.0
    again = c.make_optimizer(cc[0])
    assert again.param_groups[0]["lr"] == 5e-5
    assert torch.equal(again.state[again.param_groups[0]["params"][0]]["exp_avg"],
                       oc.state[p]["exp_avg"])
    assert "optimizer" not in cb[0].state
    d, cd = make("fedclip", fed, cache, cfg_extra={"optimizer": "sgd", "momentum": 0.7})
    od = d.make_optimizer(cd[0])
    assert type(od) is torch.optim.SGD and od.param_groups[0]["momentum"] == 0.7
    e, ce = make("fedmedclip", fed, cache, cfg_extra={"keep_optimizer": True})
    oe = e.make_optimizer(ce[0])
    assert type(oe) is torch.optim.AdamW and oe.param_groups[1]["lr"] == 1e-3


def test_training_batches_drop_the_short_last_one(tiny, fed, tmp_path):
    """The public codes' loaders (sheet §7, drop_last): every batch has B images; a client
    with fewer than B images keeps its one short batch; with --local-steps nothing is
    dropped (fedmed's budget rules)."""
    a, clients = make("fedclip", fed, str(tmp_path / "c"))
    c = clients[0]
    n, B = c.n, 16
    got = list(a.local_batches(c, fedmed.torch_rng(0, "x")))
    assert [len(i) for i in got] == [B] * (n // B)
    perm = torch.as_tensor(c.train)[torch.randperm(n, generator=fedmed.torch_rng(0, "x"))]
    assert torch.equal(torch.cat(got), perm[:B * (n // B)])
    small = fedmed.ClientState(9, "small", c.train[:B - 3], c.test)
    assert [len(i) for i in a.local_batches(small, fedmed.torch_rng(0, "x"))] == [B - 3]
    exact = fedmed.ClientState(9, "exact", c.train[:B], c.test)
    assert [len(i) for i in a.local_batches(exact, fedmed.torch_rng(0, "x"))] == [B]
    a.cfg.local_steps = n // B + 1                                  # tau steps, none dropped
    got = list(a.local_batches(c, fedmed.torch_rng(0, "x")))
    assert len(got) == n // B + 1 and sum(len(i) for i in got) > B * (n // B)
    a.cfg.local_steps = 2
    assert a.train(c, {}) == 2                                      # the loop's steps_scale 1


def test_preprocess_and_block_encoding_by_hand(tiny):
    """ClipBackbone.preprocess: uint8 / 255, bicubic antialiased resize to the tower's size
    only when the size differs, clamp to [0, 1], (x - mean) / std with the weights' mean
    and std (OpenAI's), or ImageNet's with --clip-preprocess imagenet. encode_images: any
    number of images (0 included), each row the embedding of its image (tolerance: the
    rows of a product may take another kernel path)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 20, 24), generator=g, dtype=torch.uint8)
    for mode, (mean, std) in (("clip", (ca.OPENAI_MEAN, ca.OPENAI_STD)),
                              ("imagenet", (ca.IMAGENET_MEAN, ca.IMAGENET_STD))):
        bb = ca.ClipBackbone(ca.ClipArgs(clip_model="fedmed-tiny-parts", pretrained="none",
                                         clip_preprocess=mode), 0, torch.device("cpu"), None)
        m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        r = F.interpolate(x.float() / 255, size=(32, 32), mode="bicubic", antialias=True,
                          align_corners=False).clamp(0, 1)
        assert torch.allclose(bb.preprocess(x), (r - m) / s, atol=1e-6)
        for shape in ((32, 20), (20, 32)):                   # one side off: still resized
            xs = torch.randint(0, 256, (1, 3) + shape, generator=g, dtype=torch.uint8)
            assert bb.preprocess(xs).shape[-2:] == (32, 32)
        same = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
        assert torch.allclose(bb.preprocess(same), (same.float() / 255 - m) / s, atol=1e-6)
    bb = ca.ClipBackbone(ca.ClipArgs(clip_model="fedmed-tiny-parts", pretrained="none"), 0,
                         torch.device("cpu"), None)
    imgs = torch.randint(0, 256, (35, 3, 32, 32), generator=g, dtype=torch.uint8)
    one_by_one = torch.cat([bb.encode_images(imgs[i:i + 1]) for i in range(35)])
    with torch.no_grad():
        direct = bb.model.encode_image(bb.preprocess(imgs)).float()
    for n in (0, 1, 2, 15, 16, 17, 35):
        out = bb.encode_images(imgs[:n])
        assert out.shape == (n, 32)
        assert torch.allclose(out, direct[:n], atol=1e-5), n
        assert torch.allclose(out, one_by_one[:n], atol=1e-5), n


def test_fp16_zlib_wire_format_by_hand():
    """pack_fp16_zlib's blob is a standard zlib stream (zlib's default level) with
    Huffman-only coding (memLevel 8) of: 4-byte little-endian header length, the JSON
    header [[name, dtype, shape], ...], then each tensor's bytes, floats as float16 and
    integers as they are; recomputed here with zlib directly."""
    g = torch.Generator().manual_seed(1)
    sd = {"w": torch.randn(3, 4, generator=g), "n": torch.tensor(7), "b": torch.randn(5, generator=g),
          "i": torch.arange(6, dtype=torch.int32).view(2, 3)}
    head = json.dumps([["w", "<f2", [3, 4]], ["n", "<i8", []], ["b", "<f2", [5]],
                       ["i", "<i4", [2, 3]]]).encode()
    raw = (len(head).to_bytes(4, "little") + head + sd["w"].half().numpy().tobytes()
           + sd["n"].numpy().tobytes() + sd["b"].half().numpy().tobytes() + sd["i"].numpy().tobytes())
    for strategy, z in (("huffman", zlib.Z_HUFFMAN_ONLY), ("default", zlib.Z_DEFAULT_STRATEGY)):
        c = zlib.compressobj(-1, zlib.DEFLATED, zlib.MAX_WBITS, 8, z)
        want = c.compress(raw) + c.flush()
        blob = fmc.pack_fp16_zlib(sd, strategy=strategy)
        assert bytes(blob.numpy()) == want, strategy
        if strategy == "default":                          # zlib's default level's header
            assert bytes(blob[:2].numpy()) == b"\x78\x9c"
    back = fmc.unpack_fp16_zlib(torch.frombuffer(bytearray(want), dtype=torch.uint8))
    assert list(back) == ["w", "n", "b", "i"]
    assert torch.equal(back["w"], sd["w"].half().float()) and back["w"].dtype == torch.float32
    assert torch.equal(back["n"], sd["n"]) and back["n"].dtype == torch.int64
    assert torch.equal(back["i"], sd["i"]) and back["i"].dtype == torch.int32
    assert torch.equal(back["b"], sd["b"].half().float())
    assert torch.equal(fmc.unpack_fp16_zlib(want)["w"], back["w"])      # bytes in, too


def test_feature_cache_duplicates_progress_and_compaction(tiny, fed, tmp_path, monkeypatch):
    """image_features: one row per image, identical pixels encoded once; stored in shards
    that a later call reads back (computing only what is missing); with a clock past the
    60 s flush period every chunk is written as it is done (progress kept if the run is
    killed); more than MAX_SHARDS shards are merged into one without losing a row; the
    timings are non-negative and nested."""
    import time as _time
    args = ca.ClipArgs(clip_model="fedmed-tiny-parts", pretrained="none", feature_batch_size=7)
    root = str(tmp_path / "cache")
    x = torch.cat([fed.x[:20], fed.x[3:5], fed.x[:1]])              # 3 duplicates
    bb = ca.ClipBackbone(args, 0, torch.device("cpu"), root)
    t0 = _time.perf_counter()
    f = bb.image_features(x, progress=False)
    elapsed = _time.perf_counter() - t0
    st = bb.stats
    assert st["images"] == 23 and st["computed"] == 20
    assert 0 <= st["extract_seconds"] <= st["feature_seconds"] <= elapsed
    ref = bb.encode_images(fed.x[:20])
    assert torch.allclose(f[:20], ref, atol=1e-5)
    assert torch.equal(f[20], f[3]) and torch.equal(f[21], f[4]) and torch.equal(f[22], f[0])
    shards = bb.store._shards()
    assert len(shards) == 1 and all(Path(p).name.startswith("part-") for p in shards)
    assert json.load(open(Path(bb.store.dir) / "key.json")) == json.loads(json.dumps(bb.store.key))
    index, stored = bb.store.load()
    assert len(index) == 20 and stored.shape == (20, 32)
    again = ca.ClipBackbone(args, 0, torch.device("cpu"), root)
    g = again.image_features(fed.x[:30], progress=False)             # 10 new images
    assert again.stats["computed"] == 10 and torch.equal(g[:20], f[:20])
    clock = iter(range(0, 10 ** 6, 100))                             # 100 s between calls
    monkeypatch.setattr(ca.time, "perf_counter", lambda: float(next(clock)))
    third = ca.ClipBackbone(args, 0, torch.device("cpu"), root)
    h = third.image_features(fed.x[:51], progress=False)              # 21 new: 3 chunks
    assert third.stats["computed"] == 21
    assert len(third.store._shards()) == 2 + 3                        # a shard per chunk
    assert torch.equal(h[:30], g)
    monkeypatch.undo()
    store = third.store
    for i in range(ca.FeatureStore.MAX_SHARDS - 5):                   # up to 16 shards: kept
        store.add(np.full((1, 16), i, np.uint8), np.full((1, 32), i, np.float32))
    assert len(store._shards()) == ca.FeatureStore.MAX_SHARDS
    store.add(np.full((1, 16), 200, np.uint8), np.full((1, 32), 200, np.float32))
    assert len(store._shards()) == 1                                  # 17: merged
    index, stored = store.load()
    assert len(index) == 51 + 12 and stored.shape == (63, 32)
    assert np.array_equal(stored[index[bytes([200] * 16)]], np.full(32, 200, np.float32))
    rows = [index[ca.image_hashes(fed.x[i:i + 1])[0]] for i in range(51)]
    assert np.array_equal(stored[rows], h.numpy())
    mem = ca.ClipBackbone(args, 0, torch.device("cpu"), None)         # --feature-cache none
    assert mem.store.dir is None and mem.store.text_path("k") is None
    assert torch.equal(mem.image_features(fed.x[:20], progress=False), f[:20])
    assert mem.store.load() == ({}, None)


def test_text_features_by_hand_and_cached(tiny, tmp_path):
    """T_c = normalise(mean_t normalise(CLIP_text(template_t(name_c)))), cached on disk
    beside the image features and read back without building CLIP."""
    import open_clip
    args = ca.ClipArgs(clip_model="fedmed-tiny-parts", pretrained="none")
    bb = ca.ClipBackbone(args, 0, torch.device("cpu"), str(tmp_path))
    names, templates = ["disc", "ring", "cross"], ["a picture of a {}", "a {} seen closely"]
    T = bb.text_features(names, templates)
    tok = open_clip.get_tokenizer("fedmed-tiny-parts")
    with torch.no_grad():
        for c, n in enumerate(names):
            e = F.normalize(bb.model.encode_text(tok([t.format(n) for t in templates])), dim=1)
            assert torch.allclose(T[c], F.normalize(e.mean(0), dim=0), atol=1e-6)
    fresh = ca.ClipBackbone(args, 0, torch.device("cpu"), str(tmp_path))
    assert torch.equal(fresh.text_features(names, templates), T) and fresh._model is None
    other = fresh.text_features(names[:2], templates)                 # another key: computed
    assert other.shape == (2, 32) and fresh._model is not None
    key = json.dumps({"prompts": [[ca.fill_prompt(t, n) for t in templates] for n in names]})
    path = fresh.store.text_path(key)
    np.save(path, np.array([[object()] * 32] * 3, dtype=object), allow_pickle=True)
    again = ca.ClipBackbone(args, 0, torch.device("cpu"), str(tmp_path))
    assert torch.equal(again.text_features(names, templates), T)     # a pickle is never read:
    assert again._model is not None                                  # computed again instead


def test_model_and_weights_resolution(tiny, tmp_path):
    """--clip-model: a shipped name, a registered name, a .json config (bare or wrapped
    in model_cfg, as open_clip_config.json); bad files and unknown names are one-line
    UsageErrors. --pretrained: none (seeded random weights), a file, local-dir:FOLDER
    (open_clip's file names preferred, else the first checkpoint by name; a config there
    must match), and the errors for each."""
    UsageError = fedmed.UsageError
    spec = ca.resolve_model("ViT-B-32")
    assert (spec.embed_dim, spec.image_size, spec.path) == (512, 224, None)
    assert ca.resolve_model("fedmed-tiny-parts").config == TINY
    assert ca.ModelSpec("x", {"embed_dim": 8, "vision_cfg": {"image_size": [48, 48]}}).image_size == 48
    assert ca.ModelSpec("x", {"embed_dim": 8, "vision_cfg": {}}).image_size == 224
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {}}))
    s = ca.resolve_model(str(wrapped))
    assert (s.name, s.config, s.path) == ("wrapped", TINY, str(wrapped.resolve()))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "partial.json").write_text(json.dumps({"embed_dim": 8, "vision_cfg": {}}))
    for bad, needle in ((str(tmp_path / "missing.json"), "no such file"),
                        (str(tmp_path / "bad.json"), "cannot be read as JSON"),
                        (str(tmp_path / "partial.json"), "not an open_clip model config"),
                        ("NoSuchModel-Q", "not an open_clip model")):
        with pytest.raises(UsageError, match=needle):
            ca.resolve_model(bad)
    tiny_spec = ca.resolve_model("fedmed-tiny-parts")
    w = ca.resolve_weights(tiny_spec, " None ", 5)
    assert (w.kind, w.path, w.identity) == ("none", None, "random-init:seed=5")
    model = ca.build_clip(tiny_spec, w, 5)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(UsageError, match="no checkpoint"):
        ca.resolve_weights(tiny_spec, f"local-dir:{d}", 0)
    with pytest.raises(UsageError, match="is not a folder"):
        ca.resolve_weights(tiny_spec, f"local-dir:{tmp_path / 'nope'}", 0)
    sd = model.state_dict()
    torch.save(sd, d / "b.pt")
    torch.save(sd, d / "a.pth")
    (d / "notes.txt").write_text("x")
    w = ca.resolve_weights(tiny_spec, f"local-dir:{d}", 0)
    assert (w.kind, Path(w.path).name) == ("file", "a.pth")             # first by name
    torch.save(sd, d / "model.pth")
    torch.save(sd, d / "open_clip_pytorch_model.bin")
    assert Path(ca.resolve_weights(tiny_spec, f"local-dir:{d}", 0).path).name == \
        "open_clip_pytorch_model.bin"                                 # open_clip's name first
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    assert ca.resolve_weights(tiny_spec, f"local-dir:{d}", 0).kind == "file"
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**TINY, "embed_dim": 16}}))
    with pytest.raises(UsageError, match="another architecture"):
        ca.resolve_weights(tiny_spec, f"local-dir:{d}", 0)
    f = ca.resolve_weights(tiny_spec, str(d / "b.pt"), 0)
    assert f.kind == "file" and f.identity.startswith("file:" + str(d / "b.pt"))
    for bad in (str(tmp_path / "gone.pt"), "some/where"):
        with pytest.raises(UsageError, match="no such file"):
            ca.resolve_weights(tiny_spec, bad, 0)


def test_fedmedclip_flags_are_checked(tiny, fed, tmp_path):
    """Every FedMedCLIP choice flag refuses an unknown value by name; --zlib-level takes
    zlib's -1..9 (both ends included) and nothing else."""
    cache = str(tmp_path / "c")
    for flag in ("sim_weight", "mask_compat", "fam_norm", "entropy", "personal_fam",
                 "zlib_strategy"):
        with pytest.raises(fedmed.UsageError, match="--" + flag.replace("_", "-")):
            make("fedmedclip", fed, cache, **{flag: "bogus"})
    for level in (-1, 9):
        make("fedmedclip", fed, cache, zlib_level=level)
    for level in (-2, 10):
        with pytest.raises(fedmed.UsageError, match="--zlib-level"):
            make("fedmedclip", fed, cache, zlib_level=level)


def test_fedmedclip_aggregates_a_single_upload(tiny, fed, tmp_path):
    """(8) with one participant (e.g. --fraction sampling one client): theta_F is its
    decoded upload."""
    a, clients = make("fedmedclip", fed, str(tmp_path / "c"))
    server = ServerState(weights={k: v.clone() for k, v in a.init_weights.items() if k.startswith("fam.")})
    g = torch.Generator().manual_seed(0)
    up = {k: torch.randn(v.shape, generator=g) for k, v in server.weights.items()}
    a.aggregate(server, {2: {"fam": fmc.pack_fp16_zlib(up), "n": 5}})
    for k, v in up.items():
        assert torch.equal(server.weights[k], v.half().float()), k


def test_mask_step_boundaries_and_collapse_reset():
    """(2) exactly at the edges: m = 1[x > offset] is 0 at x = offset; the paper window
    |x| <= 1 passes the gradient at |x| = 1 and not at 1.5, the code window |x| > 1 the
    reverse; kappa resets to 0 in training when at most 1% of the rows are kept (exactly
    1 of 100: reset; 2 of 100: kept), never in evaluation."""
    for mode, passes in (("paper", {1.0: True, 1.5: False}), ("code", {1.0: False, 1.5: True})):
        for xval, ok in passes.items():
            m = fmc.MaskedLinear(4, 2, mode, offset=0.25)
            with torch.no_grad():
                m.weight.fill_(0.5)                                   # u_r = 0.5 exactly
                m.threshold.copy_(torch.tensor([0.25, 0.5 - xval]))    # x = 0.25 (= offset), xval
            mask = m.mask()
            assert mask.tolist() == [0.0, 1.0]
            mask.sum().backward()
            assert (m.threshold.grad[1].item() != 0) == ok, (mode, xval)
    for kept, reset in ((1, True), (2, False)):
        m = fmc.MaskedLinear(4, 100, "paper")
        with torch.no_grad():
            m.threshold.fill_(10.0)
            m.threshold[:kept] = 0.0
        m.eval()(torch.randn(2, 4))
        assert m.threshold[kept:].eq(10.0).all()                      # evaluation: untouched
        m.train()(torch.randn(2, 4))
        assert m.threshold.eq(0.0).all().item() == reset, kept


def test_lmmd_without_a_common_class_is_zero():
    """C' empty (no source label is any target argmax): LMMD = 0 (a constant: it adds no
    gradient to FACMIC's loss)."""
    src = torch.randn(4, 3, requires_grad=True) + 1.0
    p = torch.tensor([[0.1, 0.1, 0.8]] * 5)
    out = facmic.lmmd(src, torch.randn(5, 3), torch.tensor([0, 1, 0, 1]), p, 3)
    assert out.item() == 0.0


def test_hooks_run_on_one_thread_and_restore_the_setting():
    """The adapter hooks run on one intra-op thread; the caller's setting comes back."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = ca.on_one_thread(torch.get_num_threads)()
        assert seen == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


def test_a_warm_feature_cache_reports_no_extraction_time(tmp_path):
    """stats of a call that computes nothing: computed 0 and extract_seconds exactly 0."""
    import json as _json
    import open_clip
    cfg = tmp_path / "fedmed-tiny-warm.json"
    cfg.write_text(_json.dumps(TINY))
    open_clip.add_model_config(str(cfg))
    args = ca.ClipArgs(clip_model="fedmed-tiny-warm", pretrained="none")
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    ca.ClipBackbone(args, 0, torch.device("cpu"), str(tmp_path)).image_features(x, progress=False)
    warm = ca.ClipBackbone(args, 0, torch.device("cpu"), str(tmp_path))
    warm.image_features(x, progress=False)
    assert warm.stats["computed"] == 0 and warm.stats["extract_seconds"] == 0.0


def test_masked_layers_default_to_the_sheets_step_offset():
    """Sheet §5 / §7: the mask's step offset is 0.01 wherever a masked layer is built
    with its defaults."""
    assert fmc.MaskedLinear(4, 3).offset == 0.01
    fam, mlp = fmc.MaskedFAM(4), fmc.MaskedMLP(4, 3)
    assert {m.offset for m in fam.modules() if isinstance(m, fmc.MaskedLinear)} == {0.01}
    assert {m.offset for m in mlp.modules() if isinstance(m, fmc.MaskedLinear)} == {0.01}
