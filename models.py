"""Image classifiers for the federated baselines.

`cnn` is a small three-block CNN with BatchNorm that trains on a 2-core CPU. The
torchvision backbones (`resnet18`, `efficientnet_b0`, `densenet121`) are built with no
download; `--weights PATH` loads a local checkpoint (an ImageNet checkpoint with its
1000-class head, whose head is then replaced, or one of our own with `num_classes`
outputs). `clip:NAME` is the image encoder of the open_clip model NAME (e.g.
`clip:ViT-B-32`, random weights, or a whole-CLIP checkpoint with --weights) with a linear
head: FedAvg on the full CLIP image encoder, the communication baseline of the CLIP
methods (clip_adapters.image_classifier).
"""
from __future__ import annotations

import os

import torch
from torch import nn

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


HEADS = {"resnet18": "fc", "efficientnet_b0": "classifier.1", "densenet121": "classifier"}


def _replace_head(model: nn.Module, name: str, num_classes: int) -> None:
    parent_name, _, attr = HEADS[name].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Linear(getattr(parent, attr).in_features, num_classes))


MODELS = ("cnn", "resnet18", "efficientnet_b0", "densenet121")


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
    if weights and not os.path.isfile(weights):
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


def _load(model: nn.Module, sd: dict, path: str, name: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        what = (f"missing {missing[:2]}" if missing else
                f"unexpected {unexpected[:2]}" if unexpected else
                f"shape mismatch at {wrong[0]}: file {tuple(sd[wrong[0]].shape)} vs "
                f"model {tuple(own[wrong[0]].shape)}")
        raise UsageError(f"--weights {path}: does not fit --model {name} ({what}); pass a "
                         "checkpoint of this architecture")
    model.load_state_dict(sd)


def build(name: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """A freshly initialised model (seed it from outside with fedmed.seeded)."""
    if name.startswith("clip:"):                        # the full CLIP image encoder + head
        import clip_adapters
        return clip_adapters.image_classifier(name[len("clip:"):], num_classes, weights)
    if name not in MODELS:
        raise UsageError(f"--model {name!r} is unknown; choose one of {', '.join(MODELS)} "
                         "or clip:NAME (an open_clip image encoder)")
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
