"""Datasets and client partitioners.

Every loader returns a `Federation`: all images decoded once into one uint8 tensor
`x` [N, 3, H, W] (greyscale is replicated to three channels), integer labels `y` [N]
(-1 where an image has no label), and a fixed-order list of clients, each a set of
indices into `x`. The round loop in fedmed.py only ever indexes this tensor, so the
data pipeline costs the same for every algorithm and for the bare-PyTorch benchmark.

Randomness comes from `fedmed.rng(seed, *keys)` streams, never from global generators:
the same seed gives the same federation, and another seed another one.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np
import torch

from fedmed import UsageError, np_rng


@dataclass
class ClientSplit:
    name: str
    train: np.ndarray                                   # labelled training images
    test: np.ndarray                                    # this client's test images
    unlabeled: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    label_set: list | None = None                       # classes it annotates (None: all)


@dataclass
class Federation:
    name: str
    classes: list                                       # class names, label order
    x: torch.Tensor                                     # uint8 [N, 3, H, W]
    y: torch.Tensor                                     # int64 [N], -1 = no label
    clients: list                                       # ClientSplit, training clients
    holdout: list = field(default_factory=list)         # ClientSplit, never trained on
    info: dict = field(default_factory=dict)            # provenance, saved in config.json

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def table(self) -> str:
        """Clients x classes counts of the training and test splits, as printed."""
        names = [c[:6] for c in self.classes]
        head = f"{'client':<20}{'split':<7}" + "".join(f"{n:>7}" for n in names) + f"{'all':>8}"
        lines = [head]
        y = self.y.numpy()
        for c in self.clients + self.holdout:
            tag = " (holdout)" if c in self.holdout else ""
            for split in ("train", "test"):
                idx = getattr(c, split)
                counts = np.bincount(y[idx][y[idx] >= 0], minlength=self.num_classes)
                lines.append(f"{(c.name + tag)[:19]:<20}{split:<7}"
                             + "".join(f"{v:>7}" for v in counts) + f"{len(idx):>8}")
        return "\n".join(lines)

    def split_summary(self) -> dict:
        y = self.y.numpy()
        out = {}
        for c in self.clients + self.holdout:
            out[c.name] = {s: np.bincount(y[getattr(c, s)][y[getattr(c, s)] >= 0],
                                          minlength=self.num_classes).tolist()
                           for s in ("train", "test")}
            out[c.name]["unlabeled"] = int(len(c.unlabeled))
            out[c.name]["holdout"] = c in self.holdout
        return out


def stratified_split(labels: np.ndarray, idx: np.ndarray, test_fraction: float,
                     gen: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split `idx` into train/test, drawing round(test_fraction * n_c) test images from
    every class c (at least one when the class has two or more images)."""
    train, test = [], []
    for c in np.unique(labels[idx]):
        members = idx[labels[idx] == c]
        members = members[gen.permutation(len(members))]
        n_test = int(round(test_fraction * len(members)))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# ---------------------------------------------------------------- synthetic federation

SYNTHETIC_CLASSES = ["disc", "ring", "square", "cross", "triangle", "stripes"]


def _shape_masks(cls: np.ndarray, cx, cy, r, size: int) -> np.ndarray:
    """Binary masks [n, size, size] of each image's class shape at (cx, cy) radius r."""
    g = np.arange(size, dtype=np.float32)
    dx = g[None, None, :] - cx[:, None, None]
    dy = g[None, :, None] - cy[:, None, None]
    r = r[:, None, None]
    dist = np.sqrt(dx ** 2 + dy ** 2)
    shapes = [
        dist < r,                                                         # disc
        np.abs(dist - 0.8 * r) < 1.2,                                     # ring
        np.maximum(np.abs(dx), np.abs(dy)) < 0.8 * r,                     # square
        ((np.abs(dx) < r / 3) & (np.abs(dy) < r))
        | ((np.abs(dy) < r / 3) & (np.abs(dx) < r)),                      # cross
        (dy > -0.8 * r) & (dy < 0.8 * r) & (np.abs(dx) < (dy + 0.8 * r) / 1.6),  # triangle
        (dist < r) & (np.sin((dx + dy) * 1.4) > 0),                       # stripes
    ]
    stack = np.stack(shapes, 0)                                           # [6, n, s, s]
    return stack[cls, np.arange(len(cls))]


def make_synthetic(seed: int, clients: int = 5, image_size: int = 32,
                   test_fraction: float = 0.25) -> Federation:
    """A federation that needs no download and is a real test of federated learning.

    Each image shows one of six shapes (its class) at a random place and size on a
    noisy, textured background. Each client is a "hospital" with (i) its own label
    skew, class proportions ~ Dirichlet(0.5), (ii) its own acquisition shift: a colour
    cast, a contrast change, a blur and a noise level, and (iii) its own size (80 to
    400 images). A client alone sees few or no examples of some classes that its test
    set contains, so training together helps, while the acquisition shifts keep it
    from being trivially i.i.d.
    """
    if clients < 1:
        raise UsageError(f"--clients must be >= 1 for the synthetic dataset (got {clients})")
    size, C = image_size, len(SYNTHETIC_CLASSES)
    xs, ys, splits, start = [], [], [], 0
    for k in range(clients):
        g = np_rng(seed, "synthetic", k)
        n = int(g.integers(80, 401))
        p = g.dirichlet(np.full(C, 0.5))
        cls = g.choice(C, size=n, p=p)
        r = g.uniform(0.18, 0.32, n).astype(np.float32) * size
        cx = g.uniform(0.3, 0.7, n).astype(np.float32) * size
        cy = g.uniform(0.3, 0.7, n).astype(np.float32) * size
        mask = _shape_masks(cls, cx, cy, r, size).astype(np.float32)
        # background: smooth random texture + the shape at a random intensity
        bg = g.normal(0, 1, (n, size // 4, size // 4)).astype(np.float32)
        bg = np.kron(bg, np.ones((4, 4), np.float32))[:, :size, :size] * 0.12 + 0.4
        fg = g.uniform(0.25, 0.5, (n, 1, 1)).astype(np.float32)
        img = bg + mask * fg * np.sign(g.uniform(-0.3, 1, (n, 1, 1))).astype(np.float32)
        img = np.repeat(img[:, None], 3, axis=1)                          # [n, 3, s, s]
        # this client's acquisition shift
        cast = g.uniform(0.6, 1.4, 3).astype(np.float32)[None, :, None, None]
        contrast = g.uniform(0.5, 1.3)
        blur = int(g.integers(0, 3))                                      # box radius
        noise = g.uniform(0.03, 0.12)
        img = (img - 0.5) * contrast + 0.5
        img = img * cast
        if blur:
            t = torch.from_numpy(img)
            t = torch.nn.functional.avg_pool2d(t, 2 * blur + 1, 1, blur, count_include_pad=False)
            img = t.numpy()
        img = img + g.normal(0, noise, img.shape).astype(np.float32)
        xs.append(np.clip(img * 255, 0, 255).astype(np.uint8))
        ys.append(cls)
        idx = np.arange(start, start + n)
        train, test = stratified_split(np.concatenate(ys), idx, test_fraction, g)
        splits.append(ClientSplit(f"site{k}", train, test))
        start += n
    x = torch.from_numpy(np.concatenate(xs))
    y = torch.from_numpy(np.concatenate(ys).astype(np.int64))
    return Federation("synthetic", list(SYNTHETIC_CLASSES), x, y, splits,
                      info={"generator": "datasets.make_synthetic", "seed": seed,
                            "image_size": size})


# ---------------------------------------------------------------- command line

DATASETS = {"synthetic"}


ARG_NAMES: list = []          # dests of the data flags, saved in config.json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    before = {a.dest for a in parser._actions}
    g.add_argument("--dataset", default="synthetic",
                   help="dataset name: " + ", ".join(sorted(DATASETS)) + " (default: synthetic)")
    g.add_argument("--data-dir", default=None, help="root of the dataset's official layout")
    g.add_argument("--clients", type=int, default=5,
                   help="number of clients for partitions that are not natural (default: 5)")
    g.add_argument("--partition", default="natural",
                   help="natural | iid | dirichlet (default: natural)")
    g.add_argument("--alpha", type=float, default=0.5,
                   help="Dirichlet concentration for --partition dirichlet (default: 0.5)")
    g.add_argument("--image-size", type=int, default=None,
                   help="side of the square images fed to the model (default: per dataset)")
    g.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of each client's images held out for its test set (default: 0.2)")
    ARG_NAMES[:] = [a.dest for a in parser._actions if a.dest not in before]


def load(args: argparse.Namespace, seed: int) -> Federation:
    if args.dataset not in DATASETS:
        raise UsageError(f"--dataset {args.dataset!r} is unknown; choose one of "
                         + ", ".join(sorted(DATASETS)))
    if args.dataset == "synthetic":
        if args.partition != "natural":
            raise UsageError("--partition: the synthetic dataset has natural sites only; "
                             "use --partition natural")
        return make_synthetic(seed, args.clients, args.image_size or 32, args.test_fraction)
    raise AssertionError(args.dataset)
