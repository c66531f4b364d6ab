"""Datasets and client partitioners.

Every loader returns a `Federation`: all images decoded once into one uint8 tensor
`x` [N, 3, H, W] (greyscale is replicated to three channels), integer labels `y` [N]
(-1 where an image has no label), and a fixed-order list of clients, each a set of
indices into `x`. The round loop in fedmed.py only ever indexes this tensor, so the
data pipeline costs the same for every algorithm and for the bare-PyTorch benchmark.

Randomness comes from `fedmed.np_rng(seed, *keys)` streams, never from global
generators: the same seed gives the same federation, and another seed another one.

Real datasets are read in two steps. A *catalog* (`catalog_isic2019`, `catalog_ham10000`,
`catalog_isic2018`, `catalog_imagefolder`, `catalog_medmnist`) reads the CSVs and folders
of the official layout: file names, labels, sites, lesion ids, official splits; no pixel
is decoded. `build` then partitions the catalog into clients, splits each client into
train/test, and only then decodes the images that are used, through an on-disk cache
(`load_images`), so that a second run decodes no JPEG.

Image transform of every file-based dataset, in order: decode (a JPEG is decoded at the
smallest DCT scale that keeps both sides >= the target side), convert to RGB (greyscale
replicated to three channels; 16-bit and float images min-max scaled to 8 bits), crop
the centred largest square, resize it to image_size x image_size with PIL's antialiased
bilinear filter, and, with --color-constancy, Shades of Gray (p = 6).
Deviations from the Fed-ISIC2019 recipe (FLamby, du Terrail et al., NeurIPS 2022,
arXiv:2210.04620): FLamby resizes the shorter side to 224 keeping the aspect ratio and
crops 200 px at training/test time; here every image is stored as its centred square so
that all fit one tensor. Without FLamby's frozen split file, each centre is split 80/20
with a seeded split stratified by class [ours], so results are not comparable to its
published numbers (config.json records the rule under dataset_info.split_rule).
"""
from __future__ import annotations

import argparse
import dataclasses
import csv
import hashlib
import json
import os
import re
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

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
    # `unlabeled` holds training images whose labels the client does not have (their
    # true labels stay in Federation.y for evaluation; methods must not read them)


@dataclass
class Federation:
    name: str
    classes: list                                       # class names, label order
    x: torch.Tensor                                     # uint8 [N, 3, H, W]
    y: torch.Tensor                                     # int64 [N], -1 = no label; or
    # multi-label [N, C] multi-hot (1 positive, 0 negative, -1 missing label)
    clients: list                                       # ClientSplit, training clients
    holdout: list = field(default_factory=list)         # ClientSplit, never trained on
    info: dict = field(default_factory=dict)            # provenance, saved in config.json
    files: list = field(default_factory=list)           # per row of x: its file (or key)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def table(self) -> str:
        """The notes of the loader, then clients x classes counts of the training, test
        (and unlabelled) splits, as printed at the start of a run."""
        names = [c[:6] for c in self.classes]
        head = f"{'client':<20}{'split':<7}" + "".join(f"{n:>7}" for n in names) + f"{'all':>8}"
        lines = [f"note: {n}" for n in self.info.get("notes", [])]
        members = self.clients + self.holdout
        if members and self.info.get("notes") is not None:
            lines.append("images per client: " + ", ".join(
                f"{c.name} {len(c.train) + len(c.test) + len(c.unlabeled):,}" for c in members))
        for c in members:
            if c.label_set is not None:
                lines.append(f"label set of {c.name}: "
                             + " ".join(self.classes[k] for k in c.label_set))
        lines.append(head)
        y = self.y.numpy()
        splits = ("train", "test") + (("unlab",) if any(len(c.unlabeled) for c in members) else ())
        for c in members:
            tag = " (holdout)" if any(c is h for h in self.holdout) else ""
            for split in splits:
                idx = getattr(c, "unlabeled" if split == "unlab" else split)
                counts = class_counts(y[idx], self.num_classes)
                lines.append(f"{(c.name + tag)[:19]:<20}{split:<7}"
                             + "".join(f"{v:>7}" for v in counts) + f"{len(idx):>8}")
        return "\n".join(lines)

    def split_summary(self) -> dict:
        y = self.y.numpy()
        out = {}
        for c in self.clients + self.holdout:
            out[c.name] = {s: class_counts(y[getattr(c, s)], self.num_classes).tolist()
                           for s in ("train", "test")}
            out[c.name]["unlabeled"] = int(len(c.unlabeled))
            out[c.name]["holdout"] = any(c is h for h in self.holdout)
            if c.label_set is not None:
                out[c.name]["label_set"] = [int(k) for k in c.label_set]
        return out


def class_counts(y: np.ndarray, C: int) -> np.ndarray:
    """Images per class: labelled images of each class for integer labels y [n]; positive
    labels of each class for multi-label y [n, C]."""
    return (y == 1).sum(0) if y.ndim == 2 else np.bincount(y[y >= 0], minlength=C)


def stratified_split(labels: np.ndarray, idx: np.ndarray, test_fraction: float,
                     gen: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split `idx` into train/test, drawing round(test_fraction * n_c) test images from
    every class c (at least one when the class has two or more images)."""
    if len(idx) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
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


def grouped_stratified_split(labels: np.ndarray, idx: np.ndarray, groups: np.ndarray,
                             test_fraction: float, gen: np.random.Generator
                             ) -> tuple[np.ndarray, np.ndarray]:
    """Like `stratified_split`, but every group (a lesion) goes wholly to one side.

    A group's class is its most frequent label. For each class c the groups of c are
    shuffled and the prefix whose image count is closest to round(test_fraction * n_c)
    goes to test (at least one group when c has two or more groups, never all of them)."""
    if len(idx) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    _, inv = np.unique(groups[idx], return_inverse=True)
    lab = labels[idx] + 1                                    # +1: -1 (no label) -> 0
    counts = np.zeros((inv.max() + 1, lab.max() + 1), np.int64)
    np.add.at(counts, (inv, lab), 1)
    glabel, gsize = counts.argmax(1), counts.sum(1)
    test_groups = []
    for c in np.unique(glabel):
        gs = np.flatnonzero(glabel == c)
        gs = gs[gen.permutation(len(gs))]
        cum = np.concatenate([[0], np.cumsum(gsize[gs])])    # images in the first m groups
        m = int(np.argmin(np.abs(cum - round(test_fraction * cum[-1]))))
        if len(gs) >= 2:
            m = min(max(m, 1), len(gs) - 1)
        test_groups.append(gs[:m])
    is_test = np.isin(inv, np.concatenate(test_groups))
    return np.sort(idx[~is_test]).astype(np.int64), np.sort(idx[is_test]).astype(np.int64)


def largest_remainder(share: np.ndarray, total: int) -> np.ndarray:
    """Integers q_k >= 0 with sum_k q_k = total and q_k ~ total * share_k / sum(share):
    floors first, then one more to the largest fractional parts (ties: lowest k)."""
    share = np.asarray(share, np.float64)
    exact = share / share.sum() * total
    q = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - q), kind="stable")
    q[order[:total - q.sum()]] += 1
    return q


def stratified_subsample(labels: np.ndarray, idx: np.ndarray, n: int,
                         gen: np.random.Generator) -> np.ndarray:
    """`n` of the images `idx`, each class keeping its share (largest remainder)."""
    if len(idx) <= n:
        return idx
    classes, counts = np.unique(labels[idx], return_counts=True)
    quota = largest_remainder(counts, n)
    keep = [idx[labels[idx] == c][gen.permutation(k)[:q]] for c, k, q in zip(classes, counts, quota)]
    return np.sort(np.concatenate(keep))


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


SYNTHETIC_TRAIN = (40, 160)     # training images per client, drawn uniformly
SYNTHETIC_TEST = 150            # test images per client


def make_synthetic(seed: int, clients: int = 5, image_size: int = 32) -> Federation:
    """A federation that needs no download and is a real test of federated learning.

    Each image shows one of six shapes (its class) at a random place and size on a
    noisy, textured background. Each client is a "hospital" with (i) its own label
    skew, class proportions ~ Dirichlet(1), (ii) its own acquisition shift: a colour
    cast, a contrast change and a noise level, and (iii) its own training-set size
    (SYNTHETIC_TRAIN: 40 to 160 images) beside a test set of SYNTHETIC_TEST (150)
    images from the same distribution (split per class). A client alone sees few or no
    examples of some classes that its test set contains, so training together helps,
    while the label skew and acquisition shifts keep it from being trivially i.i.d.
    The test sets are large so that a client's rare classes are measured on more than
    one or two images (balanced accuracy weighs every class present equally).

    Why these values (measured, 5 seeds, 40 rounds; README "The synthetic federation"):
    with 60-240 images split 3:1 FedAvg beat local by a mean of about +0.02 and lost on
    some seeds, because the rare classes of a test set of 15-60 images are one or two
    images and the figure swings with them; a per-client blur (an earlier shift) alone
    put FedAvg below local on every seed, its averaged BatchNorm statistics matching no
    blurred client.
    """
    if clients < 1:
        raise UsageError(f"--clients must be >= 1 for the synthetic dataset (got {clients})")
    size, C = image_size, len(SYNTHETIC_CLASSES)
    xs, ys, splits, start = [], [], [], 0
    for k in range(clients):
        g = np_rng(seed, "synthetic", k)
        n = int(g.integers(SYNTHETIC_TRAIN[0], SYNTHETIC_TRAIN[1] + 1)) + SYNTHETIC_TEST
        p = g.dirichlet(np.full(C, 1.0))
        cls = g.choice(C, size=n, p=p)
        r = g.uniform(0.22, 0.36, n).astype(np.float32) * size
        cx = g.uniform(0.3, 0.7, n).astype(np.float32) * size
        cy = g.uniform(0.3, 0.7, n).astype(np.float32) * size
        mask = _shape_masks(cls, cx, cy, r, size).astype(np.float32)
        # background: smooth random texture + the shape at a random intensity
        bg = g.normal(0, 1, (n, size // 4, size // 4)).astype(np.float32)
        bg = np.kron(bg, np.ones((4, 4), np.float32))[:, :size, :size] * 0.08 + 0.4
        fg = g.uniform(0.3, 0.5, (n, 1, 1)).astype(np.float32)
        img = bg + mask * fg * np.sign(g.uniform(-0.3, 1, (n, 1, 1))).astype(np.float32)
        img = np.repeat(img[:, None], 3, axis=1)                          # [n, 3, s, s]
        # this client's acquisition shift
        cast = g.uniform(0.85, 1.15, 3).astype(np.float32)[None, :, None, None]
        contrast = g.uniform(0.8, 1.2)
        g.integers(0, 2)   # a draw the stream keeps (it was a blur radius): dropping it shifts every later draw
        noise = g.uniform(0.02, 0.08)
        img = (img - 0.5) * contrast + 0.5
        img = img * cast
        img = img + g.normal(0, noise, img.shape).astype(np.float32)
        xs.append(np.clip(img * 255, 0, 255).astype(np.uint8))
        ys.append(cls)
        idx = np.arange(start, start + n)
        train, test = stratified_split(np.concatenate(ys), idx, SYNTHETIC_TEST / n, g)
        splits.append(ClientSplit(f"site{k}", train, test))
        start += n
    x = torch.from_numpy(np.concatenate(xs))
    y = torch.from_numpy(np.concatenate(ys).astype(np.int64))
    return Federation("synthetic", list(SYNTHETIC_CLASSES), x, y, splits,
                      info={"generator": "datasets.make_synthetic", "seed": seed,
                            "image_size": size})


def make_synthetic_multilabel(seed: int, clients: int = 5, image_size: int = 32,
                              labels_per_client: int = 3, test_fraction: float = 0.25,
                              oracle_labels: bool = False) -> Federation:
    """A multi-label federation in the chest X-ray style of FedLSM (no download): each
    image shows any subset of the six shapes (each present with a client-specific
    prevalence in [0.15, 0.5]), at random places and sizes, on a noisy background with the
    client's own noise level; y [N, 6] is multi-hot. Label sets as the labelset partition
    (`assign_label_sets`): on a client's training images the classes outside its set are
    missing (-1) unless --oracle-labels; test labels are complete."""
    if clients < 1:
        raise UsageError(f"--clients must be >= 1 (got {clients})")
    C, size = len(SYNTHETIC_CLASSES), image_size
    if not 1 <= labels_per_client <= C:
        raise UsageError(f"--labels-per-client must lie in 1..{C} (got {labels_per_client})")
    sets = assign_label_sets(C, clients, labels_per_client, np_rng(seed, "synthetic-ml", "sets"))
    xs, ys, splits, start = [], [], [], 0
    for k in range(clients):
        g = np_rng(seed, "synthetic-ml", k)
        n = int(g.integers(80, 201))
        Y = (g.random((n, C)) < g.uniform(0.15, 0.5, C)).astype(np.float32)
        img = 0.4 + 0.08 * np.kron(g.normal(0, 1, (n, size // 4, size // 4)),
                                   np.ones((4, 4)))[:, :size, :size].astype(np.float32)
        for c in range(C):
            on = np.flatnonzero(Y[:, c])
            r = g.uniform(0.14, 0.22, len(on)).astype(np.float32) * size
            cx, cy = (g.uniform(0.2, 0.8, (2, len(on))).astype(np.float32) * size)
            img[on] += 0.4 * _shape_masks(np.full(len(on), c), cx, cy, r, size)
        img = np.repeat(img[:, None], 3, axis=1) + g.normal(0, g.uniform(0.02, 0.08), (n, 3, size, size))
        xs.append(np.clip(img * 255, 0, 255).astype(np.uint8))
        perm = g.permutation(n) + start
        n_test = max(1, int(round(test_fraction * n)))
        train, test = np.sort(perm[n_test:]), np.sort(perm[:n_test])
        if not oracle_labels:
            Y[np.ix_(train - start, [c for c in range(C) if c not in sets[k]])] = -1
        ys.append(Y)
        splits.append(ClientSplit(f"site{k}", train, test,
                                  label_set=list(range(C)) if oracle_labels else sets[k]))
        start += n
    return Federation("synthetic-multilabel", list(SYNTHETIC_CLASSES),
                      torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)),
                      splits, info={"generator": "datasets.make_synthetic_multilabel",
                                    "seed": seed, "image_size": size, "label_sets": sets,
                                    "oracle_labels": oracle_labels})


# ---------------------------------------------------------------- partitioners
#
# Each partitioner takes the labels of the whole catalog and the indices `idx` of the
# images to share out, and returns one sorted index array per client.

def partition_iid(idx: np.ndarray, K: int, gen: np.random.Generator) -> list:
    """A random permutation cut into K parts of sizes differing by at most one."""
    if K > len(idx):
        raise UsageError(f"--clients {K} exceeds the {len(idx)} images to share out; "
                         "lower --clients")
    return [np.sort(p) for p in np.array_split(idx[gen.permutation(len(idx))], K)]


def partition_dirichlet(labels: np.ndarray, idx: np.ndarray, K: int, alpha: float,
                        min_size: int, gen: np.random.Generator, max_draws: int = 100
                        ) -> tuple[list, dict]:
    """Label skew by Dirichlet proportions (Hsu, Qi, Brown 2019, arXiv:1909.06335):
    for each class c, q_c ~ Dir(alpha 1_K) and client k gets the share q_{c,k} of the
    images of c. As in NIID-Bench (Li et al., ICDE 2022) the draw is repeated until every
    client holds >= min_size images, at most `max_draws` times; if no draw succeeds
    (small alpha, many clients) the draw with the least total shortfall is repaired:
    while a client k has fewer than min_size images, images of the most frequent class
    of the largest client move to k. That client keeps > min_size images (sum n = N >=
    K min_size), so every move shrinks the shortfall and the loop ends after at most
    K * min_size moves. Returns (parts, {"draws": d, "moved": images moved})."""
    N = len(idx)
    if not alpha > 0:
        raise UsageError(f"--alpha must be > 0 for --partition dirichlet (got {alpha})")
    if min_size < 1:
        raise UsageError(f"--min-client-size must be >= 1 (got {min_size})")
    if K * min_size > N:
        raise UsageError(f"--partition dirichlet: {K} clients x --min-client-size {min_size} "
                         f"needs {K * min_size} images but there are {N}; lower --clients or "
                         "--min-client-size")
    lab = labels[idx]
    classes = np.unique(lab)
    n_c = np.array([(lab == c).sum() for c in classes])
    best, best_short, draws = None, None, 0
    for draws in range(1, max_draws + 1):
        counts = np.zeros((len(classes), K), np.int64)        # counts[c, k]: images of c to k
        for i, n in enumerate(n_c):
            q = gen.dirichlet(np.full(K, alpha))               # q_c ~ Dir(alpha 1_K)
            if not np.all(np.isfinite(q)) or q.sum() <= 0:     # underflow at tiny alpha
                q = np.eye(K)[gen.integers(K)]
            cuts = np.minimum((np.cumsum(q) * n).astype(np.int64), n)
            cuts[-1] = n
            counts[i] = np.diff(np.concatenate([[0], cuts]))
        short = np.maximum(min_size - counts.sum(0), 0).sum()
        if best is None or short < best_short:
            best, best_short = counts, short
        if short == 0:
            break
    counts, moved = best, 0
    while True:                                                # repair (see docstring)
        sizes = counts.sum(0)
        needy = np.flatnonzero(sizes < min_size)
        if len(needy) == 0:
            break
        k, donor = needy[0], int(np.argmax(sizes))
        c = int(np.argmax(counts[:, donor]))
        move = min(min_size - sizes[k], sizes[donor] - min_size, counts[c, donor])
        counts[c, donor] -= move
        counts[c, k] += move
        moved += int(move)
    parts = [[] for _ in range(K)]
    for i, c in enumerate(classes):
        members = idx[lab == c]
        members = members[gen.permutation(len(members))]
        for k, p in enumerate(np.split(members, np.cumsum(counts[i])[:-1])):
            parts[k].append(p)
    return [np.sort(np.concatenate(p)) for p in parts], {"draws": draws, "moved": moved}


def partition_shards(labels: np.ndarray, idx: np.ndarray, K: int, per_client: int,
                     gen: np.random.Generator) -> list:
    """Pathological non-IID split of McMahan et al. (AISTATS 2017, arXiv:1602.05629):
    images sorted by label (random order within a label) are cut into K * s equal
    shards and every client gets s shards at random."""
    n_shards = K * per_client
    if per_client < 1:
        raise UsageError(f"--shards-per-client must be >= 1 (got {per_client})")
    if n_shards > len(idx):
        raise UsageError(f"--partition shards: {K} clients x --shards-per-client {per_client} "
                         f"shards exceed the {len(idx)} images; lower either")
    order = idx[np.lexsort((gen.permutation(len(idx)), labels[idx]))]
    shards = np.array_split(order, n_shards)
    pick = gen.permutation(n_shards)
    return [np.sort(np.concatenate([shards[j] for j in pick[k * per_client:(k + 1) * per_client]]))
            for k in range(K)]


def assign_label_sets(C: int, K: int, k: int, gen: np.random.Generator) -> list:
    """FedLSM label sets (Deng, Luo, Chen, MICCAI 2023, arXiv:2304.06931; the rule of the
    public code, ../shared/methods/fedlsm.md section 3):
    1. shuffle the C classes; 2. deal them round-robin, class j of the shuffled list to
    client j mod K; 3. top every client with fewer than k classes up to k classes.
    Deviation: step 3 draws without replacement from the classes the client lacks, so
    it has exactly k distinct classes (the public code samples from all classes and may
    repeat one). Every class is annotated by at least one client; when C > K k, the
    round-robin deal gives some clients ceil(C / K) > k classes."""
    order = gen.permutation(C)
    sets = [set(order[j::K].tolist()) for j in range(K)]            # steps 1-2
    for s in sets:                                                  # step 3
        if len(s) < k:
            lacking = np.array([c for c in range(C) if c not in s])
            s.update(gen.choice(lacking, k - len(s), replace=False).tolist())
    return [sorted(int(c) for c in s) for s in sets]


def distribute_by_class(labels: np.ndarray, test_idx: np.ndarray, train_parts: list,
                        gen: np.random.Generator) -> list:
    """Share an official test split out to clients: the test images of class c go to the
    clients in proportion to their training images of c (largest remainder; by client
    size where no client trains on c)."""
    out = [[] for _ in train_parts]
    for c in np.unique(labels[test_idx]):
        members = test_idx[labels[test_idx] == c]
        members = members[gen.permutation(len(members))]
        w = np.array([(labels[p] == c).sum() for p in train_parts], np.float64)
        if w.sum() == 0:
            w = np.array([len(p) for p in train_parts], np.float64)
        for k, p in enumerate(np.split(members, np.cumsum(largest_remainder(w, len(members)))[:-1])):
            out[k].append(p)
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64)
            for p in out]


# ---------------------------------------------------------------- catalogs of real data

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


@dataclass
class Catalog:
    """What a dataset's files say, before any pixel is decoded."""
    name: str
    root: str                                   # absolute path of the data
    classes: list
    files: list                                 # per image: path relative to root
    y: np.ndarray                               # int64 labels, -1 = none
    stats: list = field(default_factory=list)   # per file (bytes, mtime_ns), for the cache key
    site: np.ndarray | None = None              # int64 index into site_names, -1 = none
    site_names: list | None = None
    group: np.ndarray | None = None             # lesion id per image: kept on one side
    test: np.ndarray | None = None              # bool: in the official test split
    arrays: np.ndarray | None = None            # uint8 [N, H, W, C], datasets shipped as arrays
    default_size: int = 64
    split_unit: str = "image"                   # default of --split-unit
    notes: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def read_csv(path: Path, required: list, hint: str) -> list:
    """Rows of CSV `path` as dicts, each with its line number under "_line"; a UsageError
    naming the file when it is absent, unreadable or lacks a column of `required`."""
    if not path.is_file():
        raise UsageError(f"{path}: file not found; {hint}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            rows = [dict(zip(header, (v.strip() for v in r)), _line=line)
                    for line, r in enumerate(reader, start=2) if any(v.strip() for v in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"{path}: cannot be read as CSV ({_one_line(e)}); {hint}")
    missing = [c for c in required if c not in header]
    if missing:
        raise UsageError(f"{path}: missing column(s) {', '.join(missing)} (found: "
                         f"{', '.join(header[:12]) or 'no header'}); {hint}")
    return rows


def onehot_labels(rows: list, path: Path, classes: list, never: tuple = ()) -> np.ndarray:
    """Class index of each one-hot row; a UsageError naming the row when it has no class,
    two classes, a non-number, or a positive in a column of `never` (e.g. UNK)."""
    y = np.empty(len(rows), np.int64)
    cols = list(classes) + [c for c in never if c in rows[0]] if rows else list(classes)
    for i, r in enumerate(rows):
        try:
            pos = [c for c in cols if float(r.get(c) or 0) > 0.5]
        except ValueError:
            bad = [c for c in cols if not re.fullmatch(r"[-+0-9.eE]*", r.get(c) or "")]
            raise UsageError(f"{path} row {r['_line']} (image {r['image']}): column "
                             f"{bad[0] if bad else '?'} is not a number; fix that cell")
        if len(pos) != 1 or pos[0] in never:
            what = "no class" if not pos else ("classes " + ", ".join(pos) if len(pos) > 1
                                               else f"class {pos[0]}, which is never positive")
            raise UsageError(f"{path} row {r['_line']} (image {r['image']}): one-hot row has "
                             f"{what}; each row needs exactly one of {', '.join(classes)}")
        y[i] = classes.index(pos[0])
    return y


def stat_files(root: Path, files: list, named_in, missing_ok: bool = False) -> list:
    """(bytes, mtime_ns) of every file; a UsageError naming the first missing one and
    where it was named (`named_in(i)`). `missing_ok`: (-1, -1) for a missing file (a
    site's folder on a Flower node holds only that site's images; see `load`)."""
    out = []
    for i, f in enumerate(files):
        try:
            st = os.stat(root / f)
        except OSError:
            if missing_ok:
                out.append((-1, -1))
                continue
            raise UsageError(f"{root / f}: image not found (named in {named_in(i)}); "
                             "restore the file or delete that row")
        out.append((st.st_size, st.st_mtime_ns))
    return out


def index_images(root: Path) -> dict:
    """{file stem: path relative to root} of every image file under root (sorted walk,
    the first of equal stems wins: the Kaggle HAM10000 copy holds every image twice)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            stem, ext = os.path.splitext(fn)
            if ext.lower() in IMAGE_EXTENSIONS and not fn.startswith("."):
                out.setdefault(stem, os.path.relpath(os.path.join(dirpath, fn), root))
    return out


# ISIC 2019 class order; the UNK column is never positive in the training set.
ISIC2019_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
# Fed-ISIC2019 centres in the order of their published ids 0..5 (FLamby, du Terrail et
# al., NeurIPS 2022 Datasets and Benchmarks, arXiv:2210.04620).
ISIC2019_CENTRES = ["BCN", "HAM_vidir_molemax", "HAM_vidir_modern", "HAM_rosendahl", "MSK",
                    "HAM_vienna_dias"]
ISIC2019_PREFIX = {"BCN_": "BCN", "MSK4": "MSK", "HAM_": "HAM"}
ISIC2019_LAYOUT = ("expected the official ISIC 2019 layout: ISIC_2019_Training_Input/, "
                   "ISIC_2019_Training_GroundTruth.csv, ISIC_2019_Training_Metadata.csv and "
                   "HAM10000_metadata.csv (Dataverse version, with its dataset column)")


def fed_isic2019_centre(lesion_id: str, ham_source) -> str | None:
    """The Fed-ISIC2019 centre of an image (baselines.md section 7):
    1. no lesion_id -> None (centre unknown; the image is dropped);
    2. key = the first 4 characters of lesion_id: BCN_ -> BCN, MSK4 -> MSK, HAM_ -> HAM;
    3. HAM images split by the `dataset` column of the HAM10000 metadata
       (`ham_source`, a callable giving it): HAM_vidir_molemax, HAM_vidir_modern,
       HAM_rosendahl, HAM_vienna_dias.
    A ValueError for any other prefix or HAM source."""
    if not lesion_id:
        return None                                                      # rule 1
    key = ISIC2019_PREFIX.get(lesion_id[:4])                             # rule 2
    if key is None:
        raise ValueError(f"lesion_id {lesion_id!r} starts with none of BCN_, HAM_, MSK4")
    if key != "HAM":
        return key
    centre = "HAM_" + ham_source()                                       # rule 3
    if centre not in ISIC2019_CENTRES:
        raise ValueError(f"HAM10000 dataset {centre[4:]!r} is none of vidir_molemax, "
                         "vidir_modern, rosendahl, vienna_dias")
    return centre


def catalog_isic2019(root: Path, missing_ok: bool = False) -> Catalog:
    """ISIC 2019 training set, official layout, with the Fed-ISIC2019 centre of each
    image (`fed_isic2019_centre`; -1 where it has no lesion_id). `missing_ok`: images the
    CSVs name may be absent (a site that holds only its own images)."""
    gt_path = root / "ISIC_2019_Training_GroundTruth.csv"
    md_path = root / "ISIC_2019_Training_Metadata.csv"
    ham_path = root / "HAM10000_metadata.csv"
    gt = read_csv(gt_path, ["image"] + ISIC2019_CLASSES, ISIC2019_LAYOUT)
    if not gt:
        raise UsageError(f"{gt_path}: no rows; {ISIC2019_LAYOUT}")
    y = onehot_labels(gt, gt_path, ISIC2019_CLASSES, never=("UNK",))  # rule 5: argmax of 8
    md = read_csv(md_path, ["image", "lesion_id"], ISIC2019_LAYOUT)
    lesion = {r["image"]: r["lesion_id"] for r in md}
    md_line = {r["image"]: r["_line"] for r in md}
    ham = None

    def ham_source(name, line):
        nonlocal ham
        if ham is None:
            ham = {r["image_id"]: r["dataset"] for r in
                   read_csv(ham_path, ["image_id", "dataset"], ISIC2019_LAYOUT)}
        src = ham.get(name, ham.get(name.replace("_downsampled", "")))
        if src is None:
            raise UsageError(f"{ham_path}: no row for image {name} (HAM lesion in row {line} "
                             f"of {md_path.name}); use the complete HAM10000 metadata")
        return src

    site = np.full(len(gt), -1, np.int64)
    groups = []
    for i, r in enumerate(gt):
        name = r["image"]
        if name not in lesion:
            raise UsageError(f"{md_path}: no row for image {name} (row {r['_line']} of "
                             f"{gt_path.name}); use the metadata file of the same release")
        try:
            centre = fed_isic2019_centre(lesion[name], lambda: ham_source(name, r["_line"]))
        except ValueError as e:
            raise UsageError(f"{md_path} row {md_line[name]} (image {name}): {e}; the "
                             "Fed-ISIC2019 rule knows only the BCN, HAM and MSK centres")
        if centre is not None:
            site[i] = ISIC2019_CENTRES.index(centre)
        groups.append(lesion[name] or name)          # no lesion id: the image is its own
    files = [f"ISIC_2019_Training_Input/{r['image']}.jpg" for r in gt]
    stats = stat_files(root, files, lambda i: f"row {gt[i]['_line']} of {gt_path}", missing_ok)
    present = [ISIC2019_CENTRES[s] for s in sorted(set(site[site >= 0].tolist()))]
    absent = [c for c in ISIC2019_CENTRES if c not in present]
    notes = [f"{len(gt):,} images; {int((site < 0).sum()):,} have no lesion_id, so no "
             "Fed-ISIC2019 centre (used only by partitions other than natural)"]
    if absent:
        notes.append("Fed-ISIC2019 centres absent from this folder: " + ", ".join(absent))
    return Catalog("isic2019", str(root), list(ISIC2019_CLASSES), files, y, stats, site,
                   list(ISIC2019_CENTRES), np.array(groups, dtype=object), notes=notes,
                   info={"centre_ids": {c: ISIC2019_CENTRES.index(c) for c in present},
                         "centre_rule": "Fed-ISIC2019 (FLamby, arXiv:2210.04620): lesion_id "
                         "prefix; HAM by HAM10000 dataset column; no lesion_id dropped"})


# FLamby's frozen Fed-ISIC2019 split (owkin/FLamby, flamby/datasets/fed_isic2019/
# dataset_creation_scripts/train_test_split): a row per image with the one-hot class columns,
# target (class id 0..7), center (centre id 0..5, ISIC2019_CENTRES order), fold (train |
# test) and fold2 (fold_center, the key FLamby selects a client's rows by).
FLAMBY_SPLIT_COLUMNS = ["image"] + ISIC2019_CLASSES + ["target", "center", "fold", "fold2"]
FLAMBY_SPLIT_HINT = ("expected FLamby's Fed-ISIC2019 split file (train_test_split) with "
                     "columns " + ",".join(FLAMBY_SPLIT_COLUMNS[:1] + ISIC2019_CLASSES
                                           + ["UNK"] + FLAMBY_SPLIT_COLUMNS[-4:]))


def apply_split_file(cat: Catalog, path: Path) -> Catalog:
    """`--split-file`: the centre and train/test fold of every image from FLamby's frozen
    split file instead of the centre rule and our seeded split, so that the clients and
    test sets are FLamby's exactly. Images of the catalog the file does not list are not
    used. A centre none of whose listed images is in the catalog is left out with a note
    (BCN on a folder without BCN_20000); any other listed image that is absent, a label
    that disagrees with the ground truth, or another column layout is a UsageError naming
    the file and row."""
    rows = read_csv(path, FLAMBY_SPLIT_COLUMNS, FLAMBY_SPLIT_HINT)
    if not rows:
        raise UsageError(f"--split-file {path}: no rows; {FLAMBY_SPLIT_HINT}")
    unknown = [c for c in rows[0] if c not in FLAMBY_SPLIT_COLUMNS + ["UNK", "_line"]]
    if unknown:
        raise UsageError(f"--split-file {path}: unknown column(s) {', '.join(unknown)}; "
                         f"{FLAMBY_SPLIT_HINT}")
    y_file = onehot_labels(rows, path, ISIC2019_CLASSES, never=("UNK",))
    index = {Path(f).stem: i for i, f in enumerate(cat.files)}
    seen: dict = {}
    listed, present = {}, {}                           # centre -> rows listed / rows here
    for r, y in zip(rows, y_file):
        where = f"--split-file {path} row {r['_line']} (image {r['image']})"
        if r["image"] in seen:
            raise UsageError(f"{where}: image listed twice (also row {seen[r['image']]}); "
                             "use the file as FLamby publishes it")
        seen[r["image"]] = r["_line"]
        if r["center"] not in {str(k) for k in range(len(ISIC2019_CENTRES))}:
            raise UsageError(f"{where}: center {r['center']!r} is not a centre id 0..5")
        if r["fold"] not in ("train", "test") or r["fold2"] != f"{r['fold']}_{r['center']}":
            raise UsageError(f"{where}: fold {r['fold']!r} / fold2 {r['fold2']!r} is not "
                             f"train|test / <fold>_<center>; {FLAMBY_SPLIT_HINT}")
        if r["target"] != str(y):
            raise UsageError(f"{where}: target {r['target']!r} disagrees with its one-hot "
                             f"columns ({ISIC2019_CLASSES[y]} = {y})")
        i = index.get(r["image"])
        if i is not None and cat.y[i] != y:
            raise UsageError(f"{where}: class {ISIC2019_CLASSES[y]} disagrees with the ground "
                             f"truth of --data-dir ({ISIC2019_CLASSES[cat.y[i]]}); use the "
                             "split file of the same ISIC 2019 release")
        c = int(r["center"])
        listed.setdefault(c, []).append(r)
        if i is not None:
            present.setdefault(c, []).append((i, r["fold"] == "test"))
    for c, rs in sorted(listed.items()):
        if c in present and len(present[c]) < len(rs):
            miss = next(r for r in rs if r["image"] not in index)
            raise UsageError(f"--split-file {path} row {miss['_line']}: image {miss['image']} "
                             f"(centre {ISIC2019_CENTRES[c]}) is not in {cat.root}; restore it "
                             "or use a folder with every image of that centre")
    site = np.full(len(cat.files), -1, np.int64)
    test = np.zeros(len(cat.files), bool)
    for c, members in present.items():
        for i, is_test in members:
            site[i], test[i] = c, is_test
    agree = cat.site == site
    notes = [n for n in cat.notes if "lesion_id" not in n]
    notes.append(f"--split-file {path.name}: FLamby's frozen split, {len(rows):,} rows; "
                 f"{int((site >= 0).sum()):,} images used ({int(test.sum()):,} test)")
    gone = [ISIC2019_CENTRES[c] for c in sorted(listed) if c not in present]
    if gone:
        notes.append("centres of the split file with no image here, left out: "
                     + ", ".join(f"{n} ({len(listed[ISIC2019_CENTRES.index(n)]):,} rows)"
                                 for n in gone))
    unused = int(((site < 0) & (cat.site >= 0)).sum())
    if unused:
        notes.append(f"{unused:,} images with a Fed-ISIC2019 centre are not in the split file "
                     "and are not used")
    differ = int((~agree & (site >= 0) & (cat.site >= 0)).sum())
    if differ:
        notes.append(f"{differ:,} images have another centre in the split file than by the "
                     "lesion_id rule; the split file's is used")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    info = dict(cat.info, centre_ids={ISIC2019_CENTRES[c]: c for c in sorted(present)},
                split_file={"path": str(path.resolve()), "sha256": digest, "rows": len(rows)},
                split_rule=f"FLamby's frozen split file {path.name} (sha256 {digest[:12]}): "
                "its centres and train/test folds")
    return dataclasses.replace(cat, site=site, test=test, notes=notes, info=info)


# HAM10000 diagnoses in the ISIC 2018 Task 3 class order
HAM_CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
HAM_DX = {"mel": 0, "nv": 1, "bcc": 2, "akiec": 3, "bkl": 4, "df": 5, "vasc": 6}
HAM_SOURCES = ["vidir_molemax", "vidir_modern", "rosendahl", "vienna_dias"]
HAM_LAYOUT = ("expected the official HAM10000 layout: HAM10000_metadata.csv and the images "
              "(HAM10000_images_part_1/, HAM10000_images_part_2/ or any folder below)")


def catalog_ham10000(root: Path) -> Catalog:
    """HAM10000 (Tschandl et al., Sci. Data 2018): HAM10000_metadata.csv and its images,
    found by image_id anywhere under root. Sites: the `dataset` column when present.
    Train/test splits are lesion-aware by default (`lesion_id` groups)."""
    md_path = root / "HAM10000_metadata.csv"
    rows = read_csv(md_path, ["lesion_id", "image_id", "dx"], HAM_LAYOUT)
    if not rows:
        raise UsageError(f"{md_path}: no rows; {HAM_LAYOUT}")
    index = index_images(root)
    y, files, groups = np.empty(len(rows), np.int64), [], []
    has_sites = "dataset" in rows[0]
    site = np.full(len(rows), -1, np.int64)
    for i, r in enumerate(rows):
        if r["dx"].lower() not in HAM_DX:
            raise UsageError(f"{md_path} row {r['_line']}: dx {r['dx']!r} is none of "
                             f"{', '.join(HAM_DX)}; fix that cell")
        y[i] = HAM_DX[r["dx"].lower()]
        if r["image_id"] not in index:
            raise UsageError(f"{root}: image {r['image_id']}.jpg not found (named in row "
                             f"{r['_line']} of {md_path.name}); restore it or delete that row")
        files.append(index[r["image_id"]])
        groups.append(r["lesion_id"] or r["image_id"])
        if has_sites:
            if r["dataset"] not in HAM_SOURCES:
                raise UsageError(f"{md_path} row {r['_line']}: dataset {r['dataset']!r} is none "
                                 f"of {', '.join(HAM_SOURCES)}; fix that cell")
            site[i] = HAM_SOURCES.index(r["dataset"])
    stats = stat_files(root, files, lambda i: f"row {rows[i]['_line']} of {md_path}")
    return Catalog("ham10000", str(root), list(HAM_CLASSES), files, y, stats,
                   site if has_sites else None, list(HAM_SOURCES) if has_sites else None,
                   np.array(groups, dtype=object), split_unit="lesion",
                   notes=[f"{len(rows):,} images of {len(set(groups)):,} lesions"])


ISIC2018_LAYOUT = ("expected the ISIC 2018 Task 3 layout: ISIC2018_Task3_Training_Input/ and "
                   "ISIC2018_Task3_Training_GroundTruth.csv (optionally the Validation/Test "
                   "pairs and ISIC2018_Task3_Training_LesionGroupings.csv)")


def catalog_isic2018(root: Path) -> Catalog:
    """ISIC 2018 Task 3 (the HAM10000 images with one-hot ground truth): every
    ISIC2018_Task3_*GroundTruth*.csv under root; a Test file is the official test split,
    Training (and Validation, merged into it) the training side. Lesion groupings are
    used when ISIC2018_Task3_*LesionGroupings*.csv is present."""
    gts = sorted(p for p in root.rglob("*.csv") if "groundtruth" in p.name.lower()
                 and "task3" in p.name.lower())
    if not gts:
        raise UsageError(f"{root}: no ISIC2018_Task3_Training_GroundTruth.csv found; "
                         + ISIC2018_LAYOUT)
    index = index_images(root)
    files, ys, is_test, seen = [], [], [], {}
    for gt_path in gts:
        rows = read_csv(gt_path, ["image"] + HAM_CLASSES, ISIC2018_LAYOUT)
        if rows:
            ys.append(onehot_labels(rows, gt_path, HAM_CLASSES))
        for r in rows:
            if r["image"] not in index:
                raise UsageError(f"{root}: image {r['image']}.jpg not found (named in row "
                                 f"{r['_line']} of {gt_path}); restore it or delete that row")
            if r["image"] in seen:
                raise UsageError(f"{gt_path} row {r['_line']}: image {r['image']} is also in "
                                 f"{seen[r['image']]}; keep each image in one file")
            seen[r["image"]] = gt_path.name
            files.append(index[r["image"]])
            is_test.append("test" in gt_path.name.lower())
    if not files:
        raise UsageError(f"{gts[0]}: no rows; {ISIC2018_LAYOUT}")
    y = np.concatenate(ys)
    groups, notes = None, [f"{len(files):,} images from " + ", ".join(p.name for p in gts)]
    lg = sorted(p for p in root.rglob("*.csv") if "lesiongrouping" in p.name.lower())
    if lg:
        lesion = {}
        for p in lg:
            lesion.update({r["image"]: r["lesion_id"] for r in read_csv(p, ["image", "lesion_id"],
                                                                        ISIC2018_LAYOUT)})
        stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
        groups = np.array([lesion.get(s) or s for s in stems], dtype=object)
        notes.append("lesion groups from " + ", ".join(p.name for p in lg))
    stats = stat_files(root, files, lambda i: "the ground-truth CSV")
    test = np.array(is_test)
    return Catalog("isic2018", str(root), list(HAM_CLASSES), files, y, stats, group=groups,
                   test=test if test.any() else None,
                   split_unit="lesion" if groups is not None else "image", notes=notes)


SPLIT_NAMES = {"train": "train", "training": "train", "test": "test", "testing": "test",
               "val": "val", "valid": "val", "validation": "val"}
IMAGEFOLDER_LAYOUT = ("expected root/<split>/<class>/*.jpg (split: train/training, "
                      "test/testing, val), root/<site>/<split>/<class>/*.jpg or root/<class>/*.jpg")


# folders an archive tool leaves beside the data (macOS zip: __MACOSX/), never classes
IGNORED_DIRS = {"__MACOSX"}


def _subdirs(p: Path, ignored: list | None = None) -> list:
    """The sub-folders of `p`, sorted; hidden ones and IGNORED_DIRS are left out (and
    added to `ignored` when given, for a note)."""
    out = []
    for d in p.iterdir():
        if not d.is_dir():
            continue
        if d.name.startswith(".") or d.name in IGNORED_DIRS:
            if ignored is not None and d.name in IGNORED_DIRS:
                ignored.append(d)
            continue
        out.append(d)
    return sorted(out, key=lambda d: d.name)


def _image_files(p: Path, recursive: bool) -> list:
    it = p.rglob("*") if recursive else p.iterdir()
    return sorted(f for f in it if f.suffix.lower() in IMAGE_EXTENSIONS
                  and not f.name.startswith(".") and f.is_file()
                  and not IGNORED_DIRS & set(f.relative_to(p).parts))


def catalog_imagefolder(root: Path) -> Catalog:
    """Folders of images named by class: root/<split>/<class>/, root/<site>/<split>/<class>/
    (each site a natural client) or root/<class>/. Classes are the sorted class folder
    names of the training splits that hold images; a test folder must use the same names.
    A val split is not used (no model selection here). Read as a note, not silently:
    __MACOSX/ folders (ignored), a single wrapper folder around the layout (read through),
    empty class folders (ignored), a test split lacking a class. Refused: fewer than two
    classes with images."""
    notes, ignored = [], []
    data_root = root
    while True:                                # a wrapper: root/<one folder>/<the layout>
        top = _subdirs(data_root, ignored)
        if (len(top) != 1 or top[0].name.lower() in SPLIT_NAMES or _image_files(data_root, False)
                or _image_files(top[0], False) or not _subdirs(top[0])):
            break
        data_root = top[0]
    if data_root != root:
        notes.append(f"read the layout inside {os.path.relpath(data_root, root)}/, the only "
                     f"folder under {root}")
    is_split = lambda ds: bool(ds) and all(d.name.lower() in SPLIT_NAMES for d in ds)  # noqa: E731
    if is_split(top):
        sites = [(None, data_root)]
    elif top and all(is_split(_subdirs(d, ignored)) for d in top):
        sites = [(d.name, d) for d in top]
    elif top and any(_image_files(d, True) for d in top):
        sites = None                                           # root/<class>/
    else:
        raise UsageError(f"{root}: no image folders found; {IMAGEFOLDER_LAYOUT}")
    entries = []                                               # (site, split, class dir)
    if sites is None:
        entries = [(None, "train", d) for d in top]
    else:
        for name, sdir in sites:
            for d in _subdirs(sdir, ignored):
                entries += [(name, SPLIT_NAMES[d.name.lower()], c) for c in _subdirs(d, ignored)]
    if ignored:
        notes.append("ignored (archive debris, not data): "
                     + ", ".join(sorted({os.path.relpath(d, root) for d in ignored})))
    images = {e[2]: _image_files(e[2], True) for e in entries}
    empty = sorted(os.path.relpath(d, root) for d, fs in images.items() if not fs)
    if empty:
        notes.append("empty class folders ignored: " + ", ".join(empty))
    entries = [e for e in entries if images[e[2]]]
    norm = lambda n: re.sub(r"[^0-9a-z]", "", n.lower())      # noqa: E731
    train_names = sorted({e[2].name for e in entries if e[1] == "train"})
    for a in train_names:
        for b in train_names:
            if a < b and norm(a) == norm(b):
                raise UsageError(f"{root}: class folders {a!r} and {b!r} differ only in case or "
                                 "punctuation; rename one so each class has one name")
    for site, split, d in entries:
        if split == "test" and d.name not in train_names:
            near = [n for n in train_names if norm(n) == norm(d.name)]
            raise UsageError(f"{d}: class folder {d.name!r} matches no training class folder "
                             f"with images ({', '.join(train_names)}); rename it"
                             + (f" to {near[0]!r}" if near else " or remove it"))
    if len(train_names) == 1:
        raise UsageError(f"{root}: only one class folder with training images "
                         f"({train_names[0]!r}); a classifier needs two or more: add the other "
                         f"classes' folders; {IMAGEFOLDER_LAYOUT}")
    files, y, site_of, test = [], [], [], []
    site_names = [s for s, _ in sites] if sites and sites[0][0] is not None else None
    skipped = 0
    for site, split, d in entries:
        if split == "val":
            skipped += len(images[d])
            continue
        for f in images[d]:
            files.append(os.path.relpath(f, root))
            y.append(train_names.index(d.name))
            site_of.append(site_names.index(site) if site_names else -1)
            test.append(split == "test")
    if not files:
        raise UsageError(f"{root}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                         f"found; {IMAGEFOLDER_LAYOUT}")
    stats = stat_files(root, files, lambda i: "the folder listing")
    test = np.array(test)
    notes.insert(0, f"{len(files):,} images in {len(train_names)} class folders"
                 + (f" at {len(site_names)} sites" if site_names else ""))
    if skipped:
        notes.append(f"{skipped:,} images of val folders not used")
    if test.any():
        lacking = [train_names[c] for c in sorted(set(range(len(train_names)))
                                                  - set(np.array(y)[test].tolist()))]
        if lacking:
            notes.append("the test split has no image of class " + ", ".join(lacking)
                         + ": balanced accuracy and AUROC are over the classes it has"
                         + (" (AUROC undefined with one)" if len(lacking) == len(train_names) - 1
                            else ""))
    return Catalog("imagefolder", str(root), train_names, files, np.array(y, np.int64), stats,
                   np.array(site_of, np.int64) if site_names else None, site_names,
                   test=test if test.any() else None, notes=notes)


def catalog_medmnist(path: Path) -> Catalog:
    """A MedMNIST 2D .npz (train_images, train_labels, test_images, test_labels; any
    val_* is not used). `path` is the file or a folder holding exactly one .npz."""
    if path.is_dir():
        npz = sorted(path.glob("*.npz"))
        if len(npz) != 1:
            raise UsageError(f"--data-dir {path} holds {len(npz)} .npz files; give the path of "
                             "the MedMNIST .npz file itself")
        path = npz[0]
    try:
        z = dict(np.load(path, allow_pickle=False))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UsageError(f"{path}: not a readable .npz file ({_one_line(e)}); download the "
                         "MedMNIST file again")
    missing = [k for k in ("train_images", "train_labels") if k not in z]
    if missing:
        raise UsageError(f"{path}: missing array(s) {', '.join(missing)} (found: "
                         f"{', '.join(sorted(z)) or 'none'}); expected the MedMNIST npz format")
    xs, ys, files, test = [], [], [], []
    for split in ("train", "test"):
        if f"{split}_images" not in z:
            continue
        im, lab = z[f"{split}_images"], z.get(f"{split}_labels")
        if lab is None or len(lab) != len(im):
            raise UsageError(f"{path}: {split}_labels is missing or its length differs from "
                             f"{split}_images; use an unmodified MedMNIST file")
        if im.ndim == 3:
            im = im[..., None]
        if im.ndim != 4 or im.shape[-1] not in (1, 3):
            raise UsageError(f"{path}: {split}_images has shape {im.shape}; only 2D sets "
                             "([N, H, W] or [N, H, W, 3]) are supported, not 3D volumes")
        lab = np.asarray(lab).reshape(len(lab), -1)
        if lab.shape[1] != 1:
            raise UsageError(f"{path}: {split}_labels has {lab.shape[1]} columns (multi-label, "
                             "e.g. ChestMNIST); only single-label sets are supported")
        if im.dtype != np.uint8:
            im = np.clip(im * 255 if im.dtype.kind == "f" and im.max() <= 1 else im, 0, 255)
        xs.append(im.astype(np.uint8))
        ys.append(lab[:, 0].astype(np.int64))
        files += [f"{split}_images[{i}]" for i in range(len(im))]
        test += [split == "test"] * len(im)
    if len({x.shape[1:] for x in xs}) != 1:
        raise UsageError(f"{path}: train and test images differ in shape; use an unmodified file")
    y = np.concatenate(ys)
    if y.min() < 0:
        raise UsageError(f"{path}: negative label {y.min()} in the labels; use an unmodified file")
    st = os.stat(path)
    test = np.array(test)
    notes = [f"{len(y):,} images from {path.name}" + ("; val_* not used" if "val_images" in z else "")]
    return Catalog("medmnist", str(path), [str(c) for c in range(int(y.max()) + 1)], files, y,
                   [(st.st_size, st.st_mtime_ns)] * len(files), test=test if test.any() else None,
                   arrays=np.concatenate(xs), default_size=int(xs[0].shape[1]), notes=notes)


CATALOGS = {"isic2019": catalog_isic2019, "ham10000": catalog_ham10000,
            "isic2018": catalog_isic2018, "imagefolder": catalog_imagefolder,
            "medmnist": catalog_medmnist}
# Datasets whose catalog a site can read from the CSVs while holding only its own images
# (the files are named by the CSVs, not found by a listing): a Flower node's data folder.
PARTIAL_SITES = {"isic2019"}


# ---------------------------------------------------------------- images and their cache

CACHE_FORMAT = 1          # bump when the transform changes, so old caches are not reused


def shades_of_gray(a: np.ndarray, p: int = 6) -> np.ndarray:
    """Shades-of-Gray colour constancy (Finlayson and Trezzi, CIC 2004) of an RGB uint8
    image [H, W, 3]: illuminant e_c = (mean_x I_c(x)^p)^(1/p), e <- e / ||e||, and
    I'_c = I_c / (sqrt(3) e_c), so a grey illuminant (e_c = 1/sqrt(3)) changes nothing."""
    f = a.astype(np.float64)
    e = np.power(np.mean(np.power(f, p), axis=(0, 1)), 1.0 / p)
    e = e / max(float(np.linalg.norm(e)), 1e-12)
    out = f / (np.sqrt(3) * np.maximum(e, 1e-12))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def transform_image(im, size: int, color_constancy: bool = False) -> np.ndarray:
    """A PIL image -> uint8 [3, size, size]: RGB (greyscale replicated; 16-bit or float
    min-max scaled to 8 bits), the centred largest square, resized with PIL's
    antialiased bilinear filter, optionally Shades of Gray."""
    from PIL import Image
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        im = Image.fromarray(np.rint(a).astype(np.uint8), "L")
    if im.mode != "RGB":
        im = im.convert("RGB")                     # L -> three equal channels
    w, h = im.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    im = im.resize((size, size), Image.Resampling.BILINEAR, box=box)
    a = np.asarray(im, dtype=np.uint8)
    if color_constancy:
        a = shades_of_gray(a, 6)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def decode_file(path: str, size: int, color_constancy: bool = False) -> np.ndarray:
    """Decode one image file with `transform_image`; a UsageError naming the file when
    it is missing or cannot be decoded (corrupt or truncated)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))          # JPEG: DCT-domain downscale, sides >= size
            im.load()
            return transform_image(im, size, color_constancy)
    except FileNotFoundError:
        raise UsageError(f"{path}: image not found; restore the file or remove its entry")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"{path}: cannot decode image ({_one_line(e)}); replace it with a "
                         "valid copy or remove its entry")


def transform_name(size: int, color_constancy: bool) -> str:
    return (f"draft;rgb;centre-square;bilinear-{size};" + ("sog6;" if color_constancy else "")
            + f"format{CACHE_FORMAT}")


def default_cache_dir() -> str:
    return os.environ.get("FEDMED_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fedmed")


def _decode_into(out, rows: np.ndarray, paths: list, size: int, cc: bool, workers: int,
                 finished: list, log=None) -> None:
    """out[rows[j]] = decode(paths[j]) on a thread pool (PIL releases the GIL while it
    decodes and resizes). Appends the finished positions j to `finished` chunk by chunk,
    also when a file fails, so the work already done is kept."""
    chunk = 64
    starts = list(range(0, len(rows), chunk))

    def work(s):
        for j in range(s, min(s + chunk, len(rows))):
            out[rows[j]] = decode_file(paths[j], size, cc)
        return s

    t0, last = time.perf_counter(), time.perf_counter()
    with ThreadPoolExecutor(max(1, workers)) as ex:
        futures = [ex.submit(work, s) for s in starts]
        try:
            for f in futures:
                s = f.result()
                finished.extend(range(s, min(s + chunk, len(rows))))
                if log and time.perf_counter() - last > 5:
                    last = time.perf_counter()
                    log(f"  decoded {len(finished):,}/{len(rows):,} images "
                        f"({len(finished) / (last - t0):.0f}/s)")
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def load_images(cat: Catalog, rows: np.ndarray, size: int, color_constancy: bool = False,
                cache_dir: str | None = None, workers: int | None = None, log=None
                ) -> tuple[np.ndarray, dict]:
    """uint8 [len(rows), 3, size, size] images of catalog rows `rows`, and a dict that
    says where they came from.

    Cache: one .npy [N, 3, size, size] per (catalog root, its files with byte size and
    mtime, size, transform, Pillow version), keyed by their sha256, under `cache_dir`
    (None: no cache), beside a .sums.npy of a CRC-32 per row (0: not decoded). Rows are
    decoded lazily, only when a run uses them, and each only once. The .npy is created
    as a temporary file and linked into place without replacing a concurrent one; the
    checksums are written after a flush, by tmp file + os.replace, so a killed run leaves
    at worst rows decoded but not marked (decoded again next time). The cache verifies
    itself: a data file of the wrong size (truncated, replaced) is rebuilt, and every
    stored row used is checked against its checksum and decoded again when it differs
    (e.g. the .npy deleted, or damaged, while the checksums stayed)."""
    rows = np.asarray(rows, np.int64)
    workers = workers or min(8, os.cpu_count() or 1)
    if cat.arrays is not None:                                   # shipped as arrays
        a = cat.arrays[rows]
        if a.shape[1] == a.shape[2] == size and not color_constancy:
            return np.ascontiguousarray(np.repeat(a, 3 // a.shape[3], 3).transpose(0, 3, 1, 2)), {}
        from PIL import Image
        out = np.stack([transform_image(Image.fromarray(im[..., 0] if im.shape[2] == 1 else im),
                                        size, color_constancy) for im in a])
        return out, {}
    root = Path(cat.root)
    paths = [str(root / f) for f in cat.files]
    if cache_dir is None:
        out = np.empty((len(rows), 3, size, size), np.uint8)
        _decode_into(out, np.arange(len(rows)), [paths[i] for i in rows], size,
                     color_constancy, workers, [], log)
        return out, {"cache": None, "decoded": len(rows)}
    import PIL
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, cat.name, os.path.abspath(cat.root),
                                     cat.files, cat.stats, size,
                                     transform_name(size, color_constancy),
                                     PIL.__version__]).encode()).hexdigest()
    stem = os.path.join(cache_dir, f"{cat.name}-{size}px-{key[:24]}")
    data_path, sums_path = stem + ".npy", stem + ".sums.npy"
    shape = (len(cat.files), 3, size, size)
    say = log or (lambda s: None)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        _remove(stem + ".done.npy")                      # the unverified mask of earlier versions
        if os.path.exists(data_path) and not _cache_file_fits(data_path, shape):
            say(f"image cache {data_path}: wrong size (truncated or replaced); rebuilding it")
            _remove(data_path)
        if not os.path.exists(data_path):
            tmp = f"{data_path}.tmp{os.getpid()}"
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape).flush()
            try:
                os.link(tmp, data_path)                      # never replaces another's file
                _remove(sums_path)                           # it described a file now gone
            except FileExistsError:
                pass
            os.remove(tmp)
            with open(stem + ".json", "w") as f:
                json.dump({"root": cat.root, "dataset": cat.name, "images": len(cat.files),
                           "size": size, "transform": transform_name(size, color_constancy)}, f)
        mm = np.load(data_path, mmap_mode="r+", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"--cache-dir {cache_dir}: cannot use the image cache there "
                         f"({_one_line(e)}); give a writable folder or --cache-dir none")
    if mm.shape != shape or mm.dtype != np.uint8:
        raise UsageError(f"{data_path}: cache file has shape {mm.shape}, expected {shape}; "
                         "delete it")
    sums = _read_sums(sums_path, len(cat.files))
    stored = rows[sums[rows] != 0]
    bad = stored[_row_sums(mm, stored, workers) != sums[stored]]
    if len(bad):
        say(f"image cache {data_path}: {len(bad):,} of {len(stored):,} stored images fail "
            "their checksum; decoding them again")
        sums[bad] = 0
    todo = rows[sums[rows] == 0]
    decoded = 0
    if len(todo):
        if log:
            log(f"decoding {len(todo):,} images at {size}px into the cache {data_path}")
        finished: list = []
        try:
            _decode_into(mm, todo, [paths[i] for i in todo], size, color_constancy, workers,
                         finished, log)
        finally:
            if finished:
                mm.flush()
                ours = todo[np.asarray(finished)]
                theirs = _read_sums(sums_path, len(cat.files))   # a concurrent run's rows
                keep = (sums == 0) & (theirs != 0)
                sums[keep] = theirs[keep]
                sums[ours] = _row_sums(mm, ours, workers)
                tmp = f"{sums_path}.tmp{os.getpid()}.npy"
                np.save(tmp, sums)
                os.replace(tmp, sums_path)
        decoded = len(todo)
    out = np.asarray(mm[rows])
    del mm
    return out, {"cache": data_path, "decoded": decoded, "failed_checksum": int(len(bad))}


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _cache_file_fits(path: str, shape: tuple) -> bool:
    """Whether the .npy at `path` holds exactly a uint8 array of `shape` (a truncated file
    would otherwise be zero-filled back to size by numpy's r+ memmap)."""
    try:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
        ok = (mm.shape == shape and mm.dtype == np.uint8
              and os.path.getsize(path) == mm.offset + mm.nbytes)
        del mm
        return ok
    except (OSError, ValueError):
        return False


def _read_sums(path: str, n: int) -> np.ndarray:
    """The per-image checksums of the cache (0: not decoded); zeros when absent or unreadable."""
    try:
        s = np.load(path, allow_pickle=False)
        if s.shape == (n,) and s.dtype == np.uint64:
            return s
    except (OSError, ValueError, EOFError):
        pass
    return np.zeros(n, np.uint64)


def _row_sums(mm, rows: np.ndarray, workers: int) -> np.ndarray:
    """CRC-32 of each cached image mm[r], tagged with bit 32 so that no checksum is 0 (the
    mark of a row not decoded). zlib releases the GIL, so the threads overlap."""
    def one(r):
        return zlib.crc32(memoryview(np.ascontiguousarray(mm[r])).cast("B")) | (1 << 32)
    if not len(rows):
        return np.zeros(0, np.uint64)
    with ThreadPoolExecutor(max(1, workers)) as ex:
        return np.fromiter(ex.map(one, rows.tolist(), chunksize=256), np.uint64, len(rows))


# ---------------------------------------------------------------- catalog -> federation

PARTITIONS = ("natural", "iid", "dirichlet", "labelset", "shards")


def build(cat: Catalog, ns: argparse.Namespace, seed: int, log=None) -> Federation:
    """Partition catalog `cat` into clients as the flags in `ns` say, split each client
    into train/test, decode the images used, and return the Federation.

    Order: (1) natural keeps the images with a known site; (2) the train/test sides: an
    official test split where the dataset has one; else, for partitions other than
    natural with a lesion-aware split, one global lesion-aware split first; else each
    client is split after partitioning (stratified by class, --test-fraction); (3) the
    partition of the training side; an official or global test side is shared out to
    clients in proportion to their training images of each class (`distribute_by_class`);
    (4) --max-images-per-client; (5) labelset: classes outside L_k -> unlabeled (with
    --oracle-labels L_k = all classes, the same draws otherwise: the full-label bound);
    (6) --unlabeled-fraction; (7) --holdout-client. All draws come from named streams
    np_rng(seed, "data", dataset, step, ...)."""
    C, labels, N = len(cat.classes), cat.y, len(cat.files)
    partition = ns.partition or ("natural" if cat.site_names else "iid")
    unit = ns.split_unit or cat.split_unit
    ns.partition, ns.split_unit = partition, unit     # config.json records what was used
    if unit == "lesion" and cat.group is None:
        raise UsageError(f"--split-unit lesion: {cat.name} at {cat.root} has no lesion ids; "
                         "use --split-unit image")
    groups = cat.group if unit == "lesion" else None
    tf = ns.test_fraction

    def stream(*keys):
        return np_rng(seed, "data", cat.name, *keys)

    def split(idx, gen):
        return (grouped_stratified_split(labels, idx, groups, tf, gen) if groups is not None
                else stratified_split(labels, idx, tf, gen))

    given = getattr(ns, "given_flags", ())               # flags typed (run.py)
    if "clients" in given and partition == "natural":
        raise UsageError(f"--clients does not apply to --partition natural ({cat.name} at "
                         f"{cat.root} has sites: they are the clients); drop --clients or "
                         "choose another --partition")
    if "test_fraction" in given and cat.test is not None:
        raise UsageError(f"--test-fraction does not apply: {cat.name} at {cat.root} has an "
                         "official test split, which is used; drop --test-fraction")
    notes = list(cat.notes)
    pool = np.arange(N, dtype=np.int64)
    if partition == "natural":
        if not cat.site_names:
            raise UsageError(f"--partition natural: {cat.name} at {cat.root} has no sites; use "
                             "--partition iid, dirichlet, labelset or shards")
        pool = pool[cat.site >= 0]                                              # (1)
    elif not ns.partition:
        notes.append(f"partition: iid over {ns.clients} clients ({cat.name} has no sites)")
    test_side = None                                                            # (2)
    if cat.test is not None:
        train_side, test_side = pool[~cat.test[pool]], pool[cat.test[pool]]
        notes.append(f"official test split: {len(test_side):,} images")
    elif partition != "natural" and groups is not None:
        train_side, test_side = grouped_stratified_split(labels, pool, groups, tf,
                                                         stream("split", "global"))
        notes.append("lesion-aware train/test split of all images before partitioning")
    else:
        train_side = pool
    K = ns.clients                                                              # (3)
    if partition != "natural" and K < 1:
        raise UsageError(f"--clients must be >= 1 (got {K})")
    g = stream("partition", partition)
    if partition == "natural":
        names = [n for s, n in enumerate(cat.site_names) if (cat.site[train_side] == s).any()]
        parts = [train_side[cat.site[train_side] == cat.site_names.index(n)] for n in names]
        tests = ([test_side[cat.site[test_side] == cat.site_names.index(n)] for n in names]
                 if test_side is not None else None)
        lost = sorted(set(cat.site_names[s] for s in np.unique(cat.site[test_side]))
                      - set(names)) if test_side is not None and len(test_side) else []
        if lost:
            raise UsageError(f"site {lost[0]} of {cat.root} has test images but no training "
                             f"images; add its training folder or hold it out another way")
    else:
        names = [f"client{k}" for k in range(K)]
        if partition == "iid" or partition == "labelset":    # labelset: FedLSM, equal parts
            parts = partition_iid(train_side, K, g)
        elif partition == "dirichlet":
            parts, how = partition_dirichlet(labels, train_side, K, ns.alpha,
                                             ns.min_client_size, g)
            if how["moved"]:
                notes.append(f"dirichlet: none of {how['draws']} draws gave every client "
                             f">= {ns.min_client_size} images; {how['moved']:,} images moved "
                             "from the largest clients to the smallest")
        elif partition == "shards":
            parts = partition_shards(labels, train_side, K, ns.shards_per_client, g)
        else:
            raise UsageError(f"--partition {partition!r} is unknown; choose one of "
                             + ", ".join(PARTITIONS))
        tests = (distribute_by_class(labels, test_side, parts, stream("distribute"))
                 if test_side is not None else None)
    if not names:
        raise UsageError(f"{cat.root}: no image has a known site, so --partition natural has "
                         "no clients; use another --partition")
    clients = []
    for k, (name, part) in enumerate(zip(names, parts)):
        cap = ns.max_images_per_client                                          # (4)
        if tests is None:
            if cap:
                part = stratified_subsample(labels, part, cap, stream("subsample", name))
            train, test = split(part, stream("split", name))
        else:
            train, test = part, tests[k]
            if cap and len(train) + len(test) > cap:
                n_tr = int(round(cap * len(train) / (len(train) + len(test))))
                train = stratified_subsample(labels, train, n_tr, stream("subsample", name))
                test = stratified_subsample(labels, test, cap - n_tr, stream("subsample", name, "test"))
        unl = train[labels[train] < 0]                                          # no label
        clients.append(ClientSplit(name, train[labels[train] >= 0], test, unl))
    if tests is None and groups is not None:
        moved = keep_groups_on_one_side(clients, groups)
        if moved:
            notes.append(f"{moved} images of lesions seen at two sites moved to the side "
                         "(train/test) the lesion has at its first site")
    if partition == "labelset":                                                 # (5)
        m = ns.labels_per_client
        if not 1 <= m <= C:
            raise UsageError(f"--labels-per-client must lie in 1..{C} (got {m})")
        sets = assign_label_sets(C, len(clients), m, stream("labelset"))
        if C > len(clients) * m:
            notes.append(f"labelset: {C} classes > {len(clients)} clients x {m}: the round-robin "
                         "deal gives some clients more than --labels-per-client classes")
        if ns.oracle_labels:        # the upper bound: same clients, same draws, all labels kept
            notes.append("--oracle-labels: every training image keeps its label (label sets "
                         "that would apply: " + "; ".join(" ".join(str(k) for k in L)
                                                           for L in sets) + ")")
            sets = [list(range(C))] * len(clients)
        for c, L in zip(clients, sets):
            inside = np.isin(labels[c.train], L)
            c.unlabeled = np.sort(np.concatenate([c.unlabeled, c.train[~inside]]))
            c.train, c.label_set = c.train[inside], L
    post_process(clients, labels, ns, stream)                                   # (6)
    clients = keep_clients(clients, getattr(ns, "only_clients", None), notes)
    holdout = take_holdout(clients, ns.holdout_client, notes)                   # (7)
    for c in clients:
        if len(c.train) == 0:
            raise UsageError(f"client {c.name} has no labelled training images after the "
                             f"{partition} partition; lower --clients, --unlabeled-fraction or "
                             "raise --min-client-size / --labels-per-client")
    # decode only the images used, then renumber them 0..n-1
    members = clients + holdout
    used = np.unique(np.concatenate([np.concatenate([c.train, c.test, c.unlabeled])
                                     for c in members]).astype(np.int64))
    size = ns.image_size = ns.image_size or cat.default_size
    only = pixels_of(members, getattr(ns, "decode_only", None))
    if only is None or len(only):
        check_memory(len(used) * 3 * size * size, size, f"{len(used):,} images",
                     " or --max-images-per-client")
    t0 = time.perf_counter()
    if only is None:
        x, where = load_images(cat, used, size, ns.color_constancy, cache_dir(ns), log=log)
    elif not len(only):                               # a Flower server: no pixels at all
        x, where = np.zeros((0, 3, size, size), np.uint8), {"decoded": 0}
    else:                                             # a Flower node: its own client's
        x = np.zeros((len(used), 3, size, size), np.uint8)
        mine, where = load_images(cat, only, size, ns.color_constancy, cache_dir(ns), log=log)
        x[np.searchsorted(used, only)] = mine
    for c in members:
        for f in ("train", "test", "unlabeled"):
            setattr(c, f, np.searchsorted(used, getattr(c, f)).astype(np.int64))
    info = dict(cat.info, dataset=cat.name, root=cat.root, partition=partition,
                split_unit=unit, image_size=size, images=int(len(used)),
                transform=("array" if cat.arrays is not None
                           else transform_name(size, ns.color_constancy)),
                split_rule=cat.info.get("split_rule") or (
                    f"per client, stratified by class, test fraction {tf} [ours; "
                            "not FLamby's frozen split file]" if tests is None else
                            "official test split, shared out by class proportions"),
                image_cache=where.get("cache"), images_decoded=where.get("decoded", 0),
                image_seconds=round(time.perf_counter() - t0, 3), notes=notes)
    return Federation(cat.name, list(cat.classes), torch.from_numpy(x),
                      torch.from_numpy(labels[used].astype(np.int64)), clients, holdout,
                      info, [cat.files[i] for i in used])


def keep_groups_on_one_side(clients: list, groups: np.ndarray) -> int:
    """A lesion photographed at two sites (9 lesions of HAM10000 are) is split per site,
    so it could land in train at one and in test at another: every lesion takes the
    side it has at its first client in client order. Returns the images moved."""
    side: dict = {}
    for c in clients:
        for split in ("train", "test"):
            for gname in groups[getattr(c, split)]:
                side.setdefault(gname, split)
    moved = 0
    for c in clients:
        to_test = np.array([side[gname] == "test" for gname in groups[c.train]], bool)
        to_train = np.array([side[gname] == "train" for gname in groups[c.test]], bool)
        if to_test.any() or to_train.any():
            moved += int(to_test.sum() + to_train.sum())
            c.train, c.test = (np.sort(np.concatenate([c.train[~to_test], c.test[to_train]])),
                               np.sort(np.concatenate([c.test[~to_train], c.train[to_test]])))
    return moved


def post_process(clients: list, labels: np.ndarray, ns, stream) -> None:
    """--unlabeled-fraction f: a class-stratified fraction f of each client's labelled
    training images moves to `unlabeled` (at least one image of each class with two or
    more stays labelled)."""
    f = ns.unlabeled_fraction
    if not 0 <= f < 1:
        raise UsageError(f"--unlabeled-fraction must lie in [0, 1) (got {f})")
    if f == 0:
        return
    for c in clients:
        keep, move = stratified_split(labels, c.train, f, stream("unlabeled", c.name))
        c.train, c.unlabeled = keep, np.sort(np.concatenate([c.unlabeled, move])).astype(np.int64)


def client_names(clients: list, spec: str, flag: str) -> list:
    """The names of a comma-separated client list; one that is not a client is a one-line
    error naming the flag and the clients there are."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    known = [c.name for c in clients]
    for n in names:
        if n not in known:
            raise UsageError(f"{flag} {n!r} is not a client; the clients are " + ", ".join(known))
    return names


def keep_clients(clients: list, spec: str | None, notes: list) -> list:
    """--only-clients NAME[,NAME]: only those clients stay (in their order); the others'
    images are never decoded. E.g. one centre as the new site of `run.py --evaluate`."""
    if not spec:
        return clients
    names = client_names(clients, spec, "--only-clients")
    if not names:
        raise UsageError("--only-clients names no client; give NAME[,NAME]")
    dropped = [c.name for c in clients if c.name not in names]
    if dropped:
        notes.append("--only-clients: left out " + ", ".join(dropped))
    return [c for c in clients if c.name in names]


def take_holdout(clients: list, spec: str | None, notes: list) -> list:
    """--holdout-client NAME[,NAME]: those clients leave `clients`; each keeps all of its
    images (train, test and unlabelled) as its test set, for unseen-domain evaluation."""
    if not spec:
        return []
    names = client_names(clients, spec, "--holdout-client")
    if len(set(names)) >= len(clients):
        raise UsageError("--holdout-client would hold out every client; keep at least one")
    holdout = []
    for n in names:
        c = clients.pop([x.name for x in clients].index(n))
        holdout.append(ClientSplit(c.name, np.zeros(0, np.int64),
                                   np.sort(np.concatenate([c.train, c.test, c.unlabeled])),
                                   label_set=c.label_set))
    notes.append("held out (all their images are test images, never trained on): "
                 + ", ".join(names))
    return holdout


def cache_dir(ns) -> str | None:
    d = getattr(ns, "cache_dir", None) or default_cache_dir()
    return None if d.lower() == "none" else d


# ---------------------------------------------------------------- command line

DATASETS = {"synthetic", "synthetic-multilabel", *CATALOGS}


# Training settings a dataset recommends, used for the flags the user leaves unset (run.py).
# The synthetic federation is small: more, smaller steps let FedAvg converge in about a
# minute on a 2-core CPU.
RECIPES = {"synthetic": {"rounds": 40, "local_epochs": 2, "batch_size": 16}}

ARG_NAMES: list = []          # dests of the data flags, saved in config.json
NOT_SAVED = {"cache_dir"}     # where decoded images are kept changes no result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    before = {a.dest for a in parser._actions}
    g.add_argument("--dataset", default="synthetic",
                   help="dataset name: " + ", ".join(sorted(DATASETS)) + " (default: synthetic)")
    g.add_argument("--data-dir", default=None,
                   help="root of the dataset's official layout (medmnist: the .npz file)")
    g.add_argument("--partition", default=None,
                   help=" | ".join(PARTITIONS) + " (default: natural where the dataset has "
                   "sites, else iid)")
    g.add_argument("--clients", type=int, default=5,
                   help="number of clients for partitions that are not natural (default: 5)")
    g.add_argument("--alpha", type=float, default=0.5,
                   help="Dirichlet concentration for --partition dirichlet (default: 0.5)")
    g.add_argument("--min-client-size", type=int, default=10,
                   help="fewest images per client for --partition dirichlet (default: 10)")
    g.add_argument("--labels-per-client", type=int, default=3,
                   help="classes k each client annotates for --partition labelset (default: 3)")
    g.add_argument("--oracle-labels", action="store_true",
                   help="with --partition labelset: keep every training image's label (the "
                   "full-label upper bound; same clients and images, label sets = all classes)")
    g.add_argument("--shards-per-client", type=int, default=2,
                   help="label-sorted shards per client for --partition shards (default: 2)")
    g.add_argument("--unlabeled-fraction", type=float, default=0.0,
                   help="share of each client's training images kept unlabelled (default: 0)")
    g.add_argument("--holdout-client", default=None, metavar="NAME",
                   help="client(s), comma-separated, kept out of training and evaluated as "
                   "unseen domains on all their images")
    g.add_argument("--only-clients", default=None, metavar="NAME",
                   help="keep only these client(s), comma-separated (e.g. one centre as the new "
                   "site of --evaluate); the others are left out before any image is decoded")
    g.add_argument("--max-images-per-client", type=int, default=None, metavar="N",
                   help="class-stratified subsample of at most N images per client")
    g.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of each client's images held out for its test set where the "
                   "dataset has no official test split (default: 0.2)")
    g.add_argument("--split-unit", default=None, choices=("image", "lesion"),
                   help="what a train/test split keeps whole (default: lesion for ham10000 "
                   "and isic2018 with lesion groupings, image otherwise, as FLamby)")
    g.add_argument("--split-file", default=None, metavar="CSV",
                   help="isic2019: FLamby's frozen Fed-ISIC2019 split file (train_test_split): "
                   "its centres and train/test folds replace the centre rule and the seeded split")
    g.add_argument("--image-size", type=int, default=None,
                   help="side of the square images fed to the model (default: synthetic 32, "
                   "medmnist its own size, others 64; 224 for the published recipes)")
    g.add_argument("--color-constancy", action="store_true",
                   help="Shades-of-Gray colour constancy, p = 6 (Fed-ISIC2019 preprocessing)")
    g.add_argument("--cache-dir", default=None,
                   help="decoded-image cache (default: $FEDMED_CACHE or ~/.cache/fedmed; "
                   "'none': no cache)")
    ARG_NAMES[:] = [a.dest for a in parser._actions
                    if a.dest not in before and a.dest not in NOT_SAVED]


def namespace(**flags) -> argparse.Namespace:
    """The data flags' defaults, updated by `flags` (for tests and scripts)."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    ns = p.parse_args([])
    for k, v in flags.items():
        if not hasattr(ns, k):
            raise TypeError(f"unknown data flag {k}")
        setattr(ns, k, v)
    return ns


def _check_flags(ns) -> None:
    if ns.partition is not None and ns.partition not in PARTITIONS:
        raise UsageError(f"--partition {ns.partition!r} is unknown; choose one of "
                         + ", ".join(PARTITIONS))
    if not 0 < ns.test_fraction < 1:
        raise UsageError(f"--test-fraction must lie in (0, 1) (got {ns.test_fraction})")
    if (getattr(ns, "oracle_labels", False) and ns.partition != "labelset"
            and ns.dataset != "synthetic-multilabel"):
        raise UsageError("--oracle-labels only applies to --partition labelset (it keeps the "
                         "labels that partition hides); add --partition labelset or drop it")
    if ns.image_size is not None and not 4 <= ns.image_size <= 4096:
        raise UsageError(f"--image-size must lie in 4..4096 (got {ns.image_size})")
    if ns.max_images_per_client is not None and ns.max_images_per_client < 2:
        raise UsageError(f"--max-images-per-client must be >= 2 (got {ns.max_images_per_client})")


# data flags that only one partition reads
PARTITION_FLAGS = {"alpha": "dirichlet", "min_client_size": "dirichlet",
                   "shards_per_client": "shards", "labels_per_client": "labelset"}
# data flags that only file-based datasets read
FILE_FLAGS = ("data_dir", "color_constancy", "split_unit", "max_images_per_client")


def check_flags(ns, given=()) -> None:
    """The data flags, checked before anything is read: a known --dataset, values in
    range, and no flag given (`given`: the dests typed) that the dataset does not read."""
    if ns.dataset not in DATASETS:
        raise UsageError(f"--dataset {ns.dataset!r} is unknown; choose one of "
                         + ", ".join(sorted(DATASETS)))
    _check_flags(ns)
    part = ns.partition or ("labelset" if ns.dataset == "synthetic-multilabel" else None)
    for name, reader in PARTITION_FLAGS.items():
        if name in given and part != reader:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} only applies to --partition {reader} (here: "
                             f"{part or 'the default partition'}); add --partition {reader} "
                             f"or drop {flag}")
    if "clients" in given and part == "natural" and not ns.dataset.startswith("synthetic"):
        raise UsageError("--clients does not apply to --partition natural (the clients are the "
                         "dataset's sites); drop --clients or choose another --partition")
    if ns.dataset.startswith("synthetic"):
        for name in FILE_FLAGS:
            if name in given:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} does not apply to --dataset {ns.dataset} (generated, "
                                 "no files); give --dataset imagefolder (or another) or drop "
                                 f"{flag}")
    if ns.dataset == "synthetic" and "test_fraction" in given:
        raise UsageError(f"--test-fraction does not apply to --dataset synthetic (each client has "
                         f"{SYNTHETIC_TEST} test images beside its training images); drop it")


def available_memory() -> int | None:
    """Bytes of memory available now (MemAvailable), None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(nbytes: int, size: int, what: str, hint: str = "") -> None:
    """A one-line error before decoding when the images at --image-size `size` would not
    fit in the memory available (instead of dying part-way)."""
    avail = available_memory()
    if avail is not None and nbytes > 0.8 * avail:
        raise UsageError(f"--image-size {size}: {what} need {nbytes / 2 ** 30:.1f} GiB of "
                         f"memory, more than the {avail / 2 ** 30:.1f} GiB available here; "
                         f"lower --image-size{hint}")


def pixels_of(members: list, decode_only) -> np.ndarray | None:
    """The image rows whose pixels a party reads: None = every member's (an ordinary
    run); else the rows of the members named in `decode_only` (client names, or indices
    into clients + held-out clients, as a Flower node's partition-id), sorted. Empty: no
    pixels at all (a Flower server: it never reads an image)."""
    if decode_only is None:
        return None
    mine = [c for k, c in enumerate(members) if c.name in decode_only or k in decode_only]
    if not mine:
        return np.zeros(0, np.int64)
    return np.unique(np.concatenate([np.concatenate([c.train, c.test, c.unlabeled])
                                     for c in mine]).astype(np.int64))


def keep_pixels(fed: Federation, decode_only) -> Federation:
    """`fed` with the pixels a party may read (see `pixels_of`; the rows of other
    clients zeroed, or none at all): for data generated in full (the synthetic sets),
    so that a Flower node reads its own client's images only, as with real data."""
    only = pixels_of(fed.clients + fed.holdout, decode_only)
    if only is None:
        return fed
    if not len(only):
        fed.x = fed.x[:0].clone()
        return fed
    keep = torch.zeros(len(fed.x), dtype=torch.bool)
    keep[torch.as_tensor(only)] = True
    fed.x = torch.where(keep.view(-1, *[1] * (fed.x.dim() - 1)), fed.x, torch.zeros((), dtype=fed.x.dtype))
    return fed


def load_catalog(ns: argparse.Namespace) -> Catalog:
    """The catalog of --dataset at --data-dir, with a one-line error for a bad path."""
    if not ns.data_dir:
        raise UsageError(f"--dataset {ns.dataset} needs --data-dir (the folder of its official "
                         "layout" + (", or the .npz file" if ns.dataset == "medmnist" else "") + ")")
    root = Path(ns.data_dir).expanduser()
    if not root.exists():
        raise UsageError(f"--data-dir {ns.data_dir} does not exist; give the folder of the "
                         f"{ns.dataset} download")
    if root.is_dir() and not any(root.iterdir()):
        raise UsageError(f"--data-dir {ns.data_dir} is empty; give the folder of the "
                         f"{ns.dataset} download")
    if root.is_file() and ns.dataset != "medmnist":
        raise UsageError(f"--data-dir {ns.data_dir} is a file; give the folder of the "
                         f"{ns.dataset} download")
    if getattr(ns, "decode_only", None) is not None and ns.dataset in PARTIAL_SITES:
        return CATALOGS[ns.dataset](root.resolve(), missing_ok=True)
    return CATALOGS[ns.dataset](root.resolve())


def load(args: argparse.Namespace, seed: int, check=None) -> Federation:
    """The federation the data flags in `args` describe. `check(classes, multilabel)`, when
    given, is called once the class names are known and before any image is decoded
    (run.py --evaluate refuses data whose classes are not the run's there)."""
    if args.dataset not in DATASETS:
        raise UsageError(f"--dataset {args.dataset!r} is unknown; choose one of "
                         + ", ".join(sorted(DATASETS)))
    check_flags(args)
    if getattr(args, "split_file", None):
        if args.dataset != "isic2019":
            raise UsageError(f"--split-file applies to --dataset isic2019 only (FLamby's "
                             f"Fed-ISIC2019 split); drop it for --dataset {args.dataset}")
        if args.partition not in (None, "natural"):
            raise UsageError(f"--split-file fixes FLamby's clients; use --partition natural or "
                             f"drop --split-file (got --partition {args.partition})")
    if args.dataset == "synthetic-multilabel":      # label sets built in (FedLSM, multi-label)
        if args.partition not in (None, "labelset"):
            raise UsageError("--partition: synthetic-multilabel has built-in label sets; use "
                             "--partition labelset or leave it out")
        if args.unlabeled_fraction:
            raise UsageError("--unlabeled-fraction does not apply to synthetic-multilabel "
                             "(its missing labels come from the label sets); drop it")
        size = args.image_size = args.image_size or 32   # (resolved: recorded in config.json)
        args.partition = "labelset"
        check_memory(args.clients * 200 * 3 * size * size * 4 * 4, size,
                     f"{args.clients} synthetic clients")
        fed = make_synthetic_multilabel(seed, args.clients, size,
                                        args.labels_per_client, args.test_fraction,
                                        args.oracle_labels)
        notes: list = []
        fed.clients = keep_clients(fed.clients, getattr(args, "only_clients", None), notes)
        fed.holdout = take_holdout(fed.clients, args.holdout_client, notes)
        fed.info["notes"] = notes
        if check is not None:
            check(fed.classes, True)
        return keep_pixels(fed, getattr(args, "decode_only", None))
    if args.dataset == "synthetic":
        if args.partition not in (None, "natural"):
            raise UsageError("--partition: the synthetic dataset has natural sites only; "
                             "use --partition natural")
        size = args.image_size = args.image_size or 32   # (resolved: recorded in config.json)
        args.partition = "natural"
        most = SYNTHETIC_TRAIN[1] + SYNTHETIC_TEST
        check_memory(args.clients * most * 3 * size * size + most * 3 * size * size * 4 * 4,
                     size, f"{args.clients} synthetic clients")
        fed = make_synthetic(seed, args.clients, size)
        stream = lambda *k: np_rng(seed, "data", "synthetic", *k)  # noqa: E731
        notes: list = []
        post_process(fed.clients, fed.y.numpy(), args, stream)
        fed.clients = keep_clients(fed.clients, getattr(args, "only_clients", None), notes)
        fed.holdout = take_holdout(fed.clients, args.holdout_client, notes)
        if notes:
            fed.info["notes"] = notes
        if check is not None:
            check(fed.classes, False)
        return keep_pixels(fed, getattr(args, "decode_only", None))
    quiet = getattr(args, "quiet", False)
    log = None if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    cat = load_catalog(args)
    if getattr(args, "split_file", None):
        cat = apply_split_file(cat, Path(args.split_file).expanduser())
    if check is not None:
        check(list(cat.classes), cat.y.ndim == 2)
    return build(cat, args, seed, log=log)
