"""CLIP text tower + torchvision image tower, trained federated (FedAvg / FedProx), and an
SVM / KNN on the final tower's features for an unseen site. Yihang Wu, Muhammad Owais,
Reem Kateb, Ahmad Chaddad, Deep Modeling and Optimization of Medical Image
Classification, IEEE ISBI 2025, arXiv:2505.23040 (code AIPMLab/SkinCancerSimulation holds
only centralised fine-tuning: no CLIP, no FL, no SVM). This file is the RECONSTRUCTION the
specification ../shared/methods/clip_svm.md gives (every run says so in config.json,
algorithm_info.reconstruction); section numbers below are the sheet's.

Model (section 3A):
  image tower g_phi = a torchvision backbone whose classification head is replaced by
  the identity (`--image-tower`: the paper's 12, convnext_t/s/b/l, maxvit_t, swin_t/s/b,
  swin_v2_t/s/b, vit_l_16, and mobilenet_v2 [ours] whose ImageNet weights exist on this
  machine); projection P = Linear(d_img, D), D the CLIP text width            (A1)
  T_c = normalise(h_psi("a picture of a {class}")), the text tower h_psi frozen and its
  class features computed once (clip_adapters: prompts, readable names, text cache) (A3)
  I^ = normalise(P(g_phi(x)))                                                  (A4)
  prediction argmax_c s <I^, T_c>; the deep head's probabilities softmax_c(s <I^, T_c>) (A5)
Losses (section 4), s = 100 fixed (`--learnable-scale`: s = exp(l), l initialised at
  log(1/0.07) and clamped at log 100 as CLIP does, trained and averaged with the tower):
  contrastive (default):  L = 1/2 [CE(s I^ T_y^T, [1..B]) + CE(s T_y I^^T, [1..B])]  (L1)
  --loss proto_ce:        L = CE(s I^ T_all^T, y)  (class-weighted under
                          --class-weights inverse, unweighted by default)         (L2)
  --fl fedprox:           + mu/2 ||w - w^t||^2 over the trainable tensors
                          (FedProx Eq. 2, algorithms/fedprox.proximal_term)         (L3)
Federated training (section 3B): the core's round loop; broadcast w = (phi, P) (and l with
  --learnable-scale; BatchNorm buffers by --bn, present in maxvit_t and mobilenet_v2);
  clients run E epochs (or tau steps) of AdamW; the server sets w <- sum_k n_k/n w_k (the
  core's FedAvg). The text features never travel (a non-persistent buffer of the model).
Feature classifiers for the unseen site (section 3C, `--svm`), after the last round:
  z = normalise(g_phi(x)), the pooled backbone features before P (`--svm-feature proj`:
  I^), from the final global tower, eval mode, no augmentation;                    (C1)
  client k fits its own StandardScaler on ITS training features only, then an SVC (RBF,
  C = 1, gamma 'scale', probability=True: Platt scaling, random_state from the (seed,
  "svm", k) stream) and a KNN (k = 5, Euclidean) on the scaled features;          (C2)
  unseen-site prediction: argmax_c sum_k p_k(c | x), each p_k mapped onto all C
  classes (0 for a class client k never saw; a client with one class predicts it with
  probability 1); AUROC ranks the summed probabilities                             (C3)
  `--svm-pooled`: one scaler and one SVC / KNN on the pooled source features, labelled
  as the NON-PRIVATE upper bound it is;                                           (C4)
  the deep head (A5), the SVM and the KNN are evaluated on the same images of the
  `--holdout-client` (all its images), which no scaler or classifier ever sees.   (C5)
Metrics (section 8), `paper_metrics`: accuracy, balanced accuracy (mean recall over the
  classes present), weighted precision / recall / F1 (weights = true class shares),
  macro precision / recall / F1 over all C classes (zero_division 0), macro AUROC
  (one-vs-rest from the probabilities, classes with both kinds present), and
  AVG = mean(ACC, BACC, weighted PRE, weighted REC, weighted F1) [sheet: inferred].
  summary.json: `paper_metrics` (deep head on the pooled source test set and on every
  held-out client) and, with --svm, `feature_classifiers` (deep / svm / knn [/ pooled]
  per held-out client, and AVG differences to the deep head).

Defaults (section 7): text tower CLIP ViT-L-14 (D = 768) with --pretrained openai, frozen;
prompt "a picture of a {}"; the recipe run.py applies to unset flags: AdamW betas (0.9,
0.98), lr 1e-3 for P (--lr), 1e-4 for the backbone (--backbone-lr), weight decay 0.01,
batch 32, R = 50, E = 1, --loss contrastive, --class-weights none; --fl fedavg,
mu = 0.01; SVC C = 1, RBF, gamma 'scale'; KNN k = 5; image side 224 (swin_v2_*: 256).

Deviations:
 * the whole CLIP / FL / SVM part is a reconstruction (no public code; sheet pitfall 1).
 * the project's image pipeline: images decoded once at --image-size, training
   augmentation = the core's random flips, ImageNet normalisation; not the public code's
   Resize(256) -> RandomCrop(224) (pitfall 4's mismatch does not arise).
 * maxvit_t and vit_l_16 take 224 px inputs only (torchvision builds them for 224);
   convnext_* need >= 32 px; a smaller --image-size is refused before any image is read.
 * `--optimizer adam` is AdamW here (the public code's main2.py); main3.py's Adam with
   beta1 0.99 (pitfall 3) is not offered. `--optimizer sgd` gives momentum SGD with the
   same two learning rates.
 * AUROC from the softmax probabilities (the code's "from logits" ranks the same within a
   class only up to the softmax's normalisation).
 * the text tower is built as a whole open_clip model to encode the prompts once, then
   released; the cached T is the only thing the run keeps of it.
 * ON THIS MACHINE no pretrained CLIP weights exist and no hub can be reached, so the
   evidence runs use --pretrained none: a random, frozen text tower that only supplies
   fixed class anchors. That is forced by the machine, not the paper's setting.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import clip_adapters as ca
import fedmed
import models
from algorithms.fedprox import proximal_term
from fedmed import Algorithm, UsageError, derive_seed, register, seeded


def _h(default, text: str):
    return field(default=default, metadata={"help": text})


# name -> (torchvision builder, the head replaced by the identity, pooled width d_img)
TOWERS = {
    "convnext_t": ("convnext_tiny", "classifier.2", 768),
    "convnext_s": ("convnext_small", "classifier.2", 768),
    "convnext_b": ("convnext_base", "classifier.2", 1024),
    "convnext_l": ("convnext_large", "classifier.2", 1536),
    "maxvit_t": ("maxvit_t", "classifier.5", 512),
    "swin_t": ("swin_t", "head", 768),
    "swin_s": ("swin_s", "head", 768),
    "swin_b": ("swin_b", "head", 1024),
    "swin_v2_t": ("swin_v2_t", "head", 768),
    "swin_v2_s": ("swin_v2_s", "head", 768),
    "swin_v2_b": ("swin_v2_b", "head", 1024),
    "vit_l_16": ("vit_l_16", "heads", 1024),
    "mobilenet_v2": ("mobilenet_v2", "classifier.1", 1280),     # [ours]: weights exist here
}
PAPER_TOWERS = tuple(n for n in TOWERS if n != "mobilenet_v2")
EXACT_SIZE = {"maxvit_t": 224, "vit_l_16": 224}      # torchvision builds them for 224 px
MIN_SIZE = {"convnext_t": 32, "convnext_s": 32, "convnext_b": 32, "convnext_l": 32}
LOSSES = ("contrastive", "proto_ce")


@dataclass
class Args:
    image_tower: str = _h("convnext_t", "the image tower: " + ", ".join(TOWERS)
                          + " (its weights: --weights imagenet or a local file)")
    clip_model: str = _h("ViT-L-14", "open_clip model whose text tower encodes the prompts")
    pretrained: str = _h("openai", "the text tower's weights: open_clip tag, local file, "
                         "local-dir:PATH, or none (random, frozen)")
    prompts: str = _h("a picture of a {}", "class-prompt template(s), '|'-separated")
    class_names: str = _h("", "comma-separated readable class names, in label order")
    logit_scale: float = _h(100.0, "s: scale of the cosine logits")
    learnable_scale: bool = _h(False, "train s = exp(l) from 1/0.07 (CLIP's), averaged "
                               "with the tower")
    feature_cache: str = _h("auto", "folder of the cached class text features; none: memory only")
    backbone_lr: float = _h(1e-4, "learning rate of the image backbone (--lr is the "
                            "projection's)")
    fl: str = _h("fedavg", "fedavg | fedprox (adds mu/2 ||w - w^t||^2)")
    mu: float = _h(0.01, "FedProx mu (only with --fl fedprox)")
    svm: bool = _h(False, "after the last round, fit per-client SVMs and KNNs on the tower's "
                   "features and evaluate them on the --holdout-client beside the deep head")
    svm_pooled: bool = _h(False, "with --svm: also one SVM/KNN on the pooled source "
                          "features (a NON-PRIVATE upper bound)")
    svm_feature: str = _h("backbone", "backbone (normalised g(x), before P) | proj (I^)")
    svm_c: float = _h(1.0, "SVC's C (RBF kernel, gamma 'scale')")
    knn_k: int = _h(5, "KNN's k")
    unseen_dir: str = _h("", "with --dataset ham10000: an ISIC 2018 Task 3 folder whose "
                         "Validation/Test images are the unseen site (held-out client isic2018)")

    def __post_init__(self):
        if self.image_tower not in TOWERS:
            raise UsageError(f"--image-tower {self.image_tower!r} is unknown; choose one of "
                             + ", ".join(TOWERS))
        if self.fl not in ("fedavg", "fedprox"):
            raise UsageError(f"--fl {self.fl!r} is unknown; choose fedavg or fedprox")
        if not self.mu >= 0:
            raise UsageError(f"--mu must be >= 0 (got {self.mu})")
        if self.svm_feature not in ("backbone", "proj"):
            raise UsageError(f"--svm-feature {self.svm_feature!r} is unknown; choose backbone "
                             "or proj")
        if not self.svm_c > 0:
            raise UsageError(f"--svm-c must be > 0 (got {self.svm_c})")
        if self.knn_k < 1:
            raise UsageError(f"--knn-k must be >= 1 (got {self.knn_k})")
        if not self.backbone_lr > 0:
            raise UsageError(f"--backbone-lr must be positive (got {self.backbone_lr})")
        if not self.logit_scale > 0:
            raise UsageError(f"--logit-scale must be positive (got {self.logit_scale})")
        if self.svm_pooled and not self.svm:
            raise UsageError("--svm-pooled needs --svm (it is the SVM stage's upper bound); "
                             "add --svm or drop --svm-pooled")


# ---------------------------------------------------------------- the model (3A)

def build_backbone(name: str) -> tuple[nn.Module, int]:
    """(g_phi, d_img): torchvision's `name` with weights=None (no download) and its head
    replaced by the identity, so that g_phi(x) is the pooled feature (A1)."""
    import torchvision
    builder, head, d_img = TOWERS[name]
    model = getattr(torchvision.models, builder)(weights=None)
    parent, _, attr = head.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    setattr(owner, attr, nn.Identity())
    return model, d_img


class ClipImageModel(nn.Module):
    """g_phi, P (and l with a learnable scale); the class text features T [C, D] are a
    non-persistent buffer: never in the state dict, so never sent or averaged."""

    def __init__(self, backbone: nn.Module, d_img: int, D: int, C: int, s: float,
                 learnable: bool):
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Linear(d_img, D)                                   # P (A1)
        self.s = float(s)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07))) if learnable else None
        self.register_buffer("text", torch.zeros(C, D), persistent=False)

    def scale(self):
        if self.log_scale is None:
            return self.s
        return self.log_scale.clamp(max=math.log(100)).exp()             # CLIP's clamp

    def embed(self, x):
        return F.normalize(self.proj(self.backbone(x)), dim=-1)         # I^ (A4)

    def forward(self, x):
        return self.scale() * self.embed(x) @ self.text.t()             # (A5) logits


def load_tower_weights(model: nn.Module, name: str, path: str, flag: str = "--weights") -> None:
    """A state dict of torchvision's `name` (its head, if present, dropped) into g_phi;
    any other file is a one-line UsageError naming the first mismatch."""
    sd = models._read_checkpoint(path)
    head = TOWERS[name][1] + "."
    sd = {k: v for k, v in sd.items() if not k.startswith(head)}
    what = models.misfit(model.state_dict(), sd)
    if what:
        raise UsageError(f"{flag} {path}: does not fit --image-tower {name} ({what}); pass a "
                         "torchvision state dict of that backbone")
    model.load_state_dict(sd)


def imagenet_path(name: str) -> str:
    """Where `--weights imagenet` reads the tower's ImageNet weights: for mobilenet_v2 the
    file `python models.py fetch mobilenet_v2` makes; for the paper's towers torchvision's
    default weights file in torch hub's cache (never downloaded here)."""
    if name == "mobilenet_v2":
        return str(models.imagenet_file("mobilenet_v2"))
    import torchvision
    url = torchvision.models.get_model_weights(TOWERS[name][0]).DEFAULT.url
    return str(models.hub_checkpoints() / url.rsplit("/", 1)[-1])


def check_tower(name: str, weights: str | None, image_size: int | None) -> None:
    """What can be checked before any image is read: a known tower, an input side it
    takes, an existing weights file."""
    if name not in TOWERS:
        raise UsageError(f"--image-tower {name!r} is unknown; choose one of " + ", ".join(TOWERS))
    if image_size is not None:
        if name in EXACT_SIZE and image_size != EXACT_SIZE[name]:
            raise UsageError(f"--image-size {image_size}: --image-tower {name} takes "
                             f"{EXACT_SIZE[name]} px inputs only; give --image-size "
                             f"{EXACT_SIZE[name]} or another tower")
        if image_size < MIN_SIZE.get(name, 16):
            raise UsageError(f"--image-size {image_size} is too small for --image-tower {name} "
                             f"(it needs at least {MIN_SIZE.get(name, 16)}); raise --image-size")
    if weights == "imagenet":
        path = imagenet_path(name)
        if not os.path.isfile(path):
            how = (f"make it with `{models.FETCH.format(name=name)}`" if name == "mobilenet_v2"
                   else "download it where there is network and copy it there")
            raise UsageError(f"--weights imagenet: {path} not found for --image-tower {name}; "
                             f"{how}, or pass a local checkpoint file")
    elif weights and not os.path.isfile(weights):
        raise UsageError(f"--weights {weights}: no such file; pass a local torchvision "
                         f"checkpoint of {name} or leave --weights out")


# ---------------------------------------------------------------- losses (section 4)

def contrastive(img: torch.Tensor, txt_y: torch.Tensor, s) -> torch.Tensor:
    """(L1): the symmetric batch contrastive loss of clip_adapters."""
    return ca.contrastive_loss(img, txt_y, s)


def proto_ce(img: torch.Tensor, text: torch.Tensor, y: torch.Tensor, s,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """(L2): CE(s I^ T_all^T, y)."""
    return F.cross_entropy(s * img @ text.t(), y, weight=weight)


# ---------------------------------------------------------------- metrics (section 8)

def paper_metrics(y: np.ndarray, prob: np.ndarray) -> dict:
    """The paper's metrics (see the module docstring) from labels y [n] and
    probabilities prob [n, C], computed from the confusion matrix."""
    n, C = prob.shape
    pred = prob.argmax(1)
    cm = np.zeros((C, C), np.int64)
    np.add.at(cm, (y, pred), 1)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    fp, fn = predicted - tp, support - tp
    prec = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
    rec = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    w = support / support.sum()
    out = {"accuracy": float(tp.sum() / n),
           "balanced_accuracy": float(rec[support > 0].mean()),
           "weighted_precision": float((w * prec).sum()),
           "weighted_recall": float((w * rec).sum()),
           "weighted_f1": float((w * f1).sum()),
           "macro_precision": float(prec.mean()), "macro_recall": float(rec.mean()),
           "macro_f1": float(f1.mean()),
           "macro_auroc": fedmed.classification_metrics(y, prob)["macro_auroc"],
           "n": int(n)}
    out["avg"] = float(np.mean([out[k] for k in ("accuracy", "balanced_accuracy",
                                                 "weighted_precision", "weighted_recall",
                                                 "weighted_f1")]))
    return out


# ---------------------------------------------------------------- feature classifiers (3C)

def fit_classifier(kind: str, z: np.ndarray, y: np.ndarray, C: int, *, svm_c: float,
                   knn_k: int, seed: int):
    """(C2): a StandardScaler fitted on z (one party's source features) and an SVC / KNN
    on the scaled z. Returns (scaler, classifier, classes it knows); a party with one
    class gets no classifier (it predicts that class)."""
    from sklearn.preprocessing import StandardScaler
    scaler = StandardScaler().fit(z)
    classes = np.unique(y)
    if len(classes) < 2:
        return scaler, None, classes
    zs = scaler.transform(z)
    if kind == "svm":
        import warnings
        from sklearn.svm import SVC
        with warnings.catch_warnings():            # scikit-learn 1.9 deprecates `probability`
            warnings.simplefilter("ignore", FutureWarning)   # (libsvm's Platt scaling, the
            clf = SVC(C=svm_c, kernel="rbf", gamma="scale", probability=True,   # sheet's)
                      random_state=seed % 2 ** 32).fit(zs, y)
    else:
        from sklearn.neighbors import KNeighborsClassifier
        clf = KNeighborsClassifier(n_neighbors=min(knn_k, len(y))).fit(zs, y)
    return scaler, clf, classes


def classifier_probs(fitted, z: np.ndarray, C: int) -> np.ndarray:
    """p(c | z) over all C classes (0 for a class the classifier never saw)."""
    scaler, clf, classes = fitted
    out = np.zeros((len(z), C))
    if clf is None:
        out[:, classes[0]] = 1.0
        return out
    out[:, clf.classes_] = clf.predict_proba(scaler.transform(z))
    return out


# ---------------------------------------------------------------- HAM10000 -> ISIC 2018

UNSEEN_NAME = "isic2018"


def add_isic2018_unseen(fed, root: str) -> None:
    """Section 8, the unseen domain: `--unseen-dir ROOT` (an ISIC 2018 Task 3 download)
    beside `--dataset ham10000`. Only the Validation and Test ground-truth files are read
    (the ISIC 2018 training set IS HAM10000); the images they name are decoded at the
    federation's size and preprocessing and appended to `fed` as one held-out client
    `isic2018`. Refused in one line: another --dataset, an image id that is also a source
    image, and (where ISIC2018_Task3_*LesionGroupings*.csv names the unseen images'
    lesions) a lesion id that is also a source lesion (HAM10000_metadata.csv)."""
    import datasets
    from pathlib import Path
    if fed.name != "ham10000":
        raise UsageError(f"--unseen-dir: the ISIC 2018 unseen domain pairs with --dataset "
                         f"ham10000 (got {fed.name}); use --holdout-client for other data")
    if any(h.name == UNSEEN_NAME for h in fed.holdout):
        return                                         # already added to this federation
    r = Path(root).expanduser()
    if not r.is_dir():
        raise UsageError(f"--unseen-dir {root} is not a folder; give the ISIC 2018 Task 3 folder")
    gts = sorted(p for p in r.rglob("*.csv") if "groundtruth" in p.name.lower()
                 and "task3" in p.name.lower() and ("validation" in p.name.lower()
                                                   or "test" in p.name.lower()))
    if not gts:
        raise UsageError(f"--unseen-dir {root}: no ISIC2018_Task3_Validation_GroundTruth.csv or "
                         "..._Test_GroundTruth.csv; only those images are the unseen domain")
    index = datasets.index_images(r)
    stems, files, ys = [], [], []
    for gt in gts:
        rows = datasets.read_csv(gt, ["image"] + datasets.HAM_CLASSES, datasets.ISIC2018_LAYOUT)
        if rows:
            ys.append(datasets.onehot_labels(rows, gt, datasets.HAM_CLASSES))
        for row in rows:
            if row["image"] not in index:
                raise UsageError(f"--unseen-dir {root}: image {row['image']}.jpg not found "
                                 f"(named in row {row['_line']} of {gt.name})")
            stems.append(row["image"])
            files.append(str(r / index[row["image"]]))
    src_root = Path(fed.info["root"])
    src_stems = {Path(f).stem for f in fed.files}
    both = sorted(src_stems & set(stems))
    if both:
        raise UsageError(f"--unseen-dir {root}: image {both[0]} is also a source (HAM10000) "
                         f"image ({len(both)} such); the unseen domain must be disjoint")
    lesion = {}
    for p in sorted(q for q in r.rglob("*.csv") if "lesiongrouping" in q.name.lower()):
        lesion.update({row["image"]: row["lesion_id"] for row in datasets.read_csv(
            p, ["image", "lesion_id"], datasets.ISIC2018_LAYOUT)})
    md = datasets.read_csv(src_root / "HAM10000_metadata.csv", ["lesion_id", "image_id"],
                           datasets.HAM_LAYOUT)
    src_lesions = {row["lesion_id"] for row in md if row["image_id"] in src_stems}
    shared = sorted({lesion[s] for s in stems if s in lesion} & src_lesions)
    if shared:
        raise UsageError(f"--unseen-dir {root}: lesion {shared[0]} has images on both sides "
                         f"({len(shared)} such lesions); the unseen domain must be lesion-disjoint")
    size, cc = int(fed.x.shape[-1]), "sog6" in fed.info.get("transform", "")
    x = torch.from_numpy(np.stack([datasets.decode_file(f, size, cc) for f in files]))
    n0 = len(fed.y)
    fed.x = torch.cat([fed.x, x])
    fed.y = torch.cat([fed.y, torch.from_numpy(np.concatenate(ys))])
    fed.files = list(fed.files) + files
    fed.holdout.append(datasets.ClientSplit(UNSEEN_NAME, np.zeros(0, np.int64),
                                            np.arange(n0, n0 + len(files), dtype=np.int64)))
    fed.info.setdefault("notes", []).append(
        f"unseen domain {UNSEEN_NAME}: {len(files)} images of " + ", ".join(g.name for g in gts)
        + (f"; lesion-disjoint from the source ({sum(s in lesion for s in stems)} with lesion "
           "ids)" if lesion else "; image-disjoint from the source (no lesion groupings to "
           "check lesions)"))


# ---------------------------------------------------------------- the algorithm

@register("clip_svm")
class ClipSVM(Algorithm):
    Args = Args
    losses = LOSSES                   # the --loss values this method trains with (run.py)
    takes_weights = True              # --weights: the image tower's (run.py)

    @staticmethod
    def crosses_sites_of(ns) -> str:
        """What reads clients' data in one place (a Flower run refuses it): --svm-pooled
        fits one classifier on every client's features pooled; --unseen-dir adds an
        unseen site that no node holds."""
        if getattr(ns, "svm_pooled", False):
            return "--svm-pooled fits one classifier on every client's features pooled"
        if getattr(ns, "unseen_dir", ""):
            return "--unseen-dir adds an unseen site whose images no node holds"
        return ""
    recipe = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.01, "batch_size": 32,
              "rounds": 50, "local_epochs": 1, "loss": "contrastive", "class_weights": "none"}

    @classmethod
    def default_image_size(cls, args) -> int:
        name = (args or Args()).image_tower
        return 256 if name.startswith("swin_v2") else 224

    @staticmethod
    def check_before_data(cfg, args, image_size=None) -> None:
        check_tower(args.image_tower, cfg.weights, image_size)
        if cfg.loss not in LOSSES:
            raise UsageError(f"--loss {cfg.loss}: --algo clip_svm trains with --loss contrastive "
                             "or proto_ce")
        if cfg.loss == "contrastive" and cfg.class_weights != "none":
            raise UsageError("--class-weights inverse does not apply to --loss contrastive (its "
                             "targets are the batch's own pairs); drop it or use --loss proto_ce")

    @staticmethod
    def check_command(cfg, args, ns, given) -> None:
        """Flags that need the data flags too (run.py, before any image is read)."""
        if args.svm and not ns.holdout_client and not args.unseen_dir:
            raise UsageError("--svm evaluates on an unseen site: add --holdout-client NAME (the "
                             "site no client trains on), or drop --svm")
        if args.unseen_dir and ns.dataset != "ham10000":
            raise UsageError(f"--unseen-dir: the ISIC 2018 unseen domain pairs with --dataset "
                             f"ham10000 (got {ns.dataset}); use --holdout-client for other data")
        if "mu" in given and args.fl != "fedprox":
            raise UsageError("--mu applies only with --fl fedprox; add --fl fedprox or drop --mu")

    def __init__(self, cfg, args, fed):
        args = args if args is not None else Args()
        self.check_before_data(cfg, args, int(fed.x.shape[-1]))
        if args.unseen_dir:
            add_isic2018_unseen(fed, args.unseen_dir)     # before the loop reads fed.holdout
        if fed.y.ndim != 1:
            raise UsageError("--algo clip_svm: class prompts need single-label data; this "
                             "dataset is multi-label")
        if args.svm and not fed.holdout:
            raise UsageError("--svm evaluates on an unseen site: add --holdout-client NAME, or "
                             "drop --svm")
        self.class_names = ca.prompt_class_names(fed, args.class_names)
        self.templates = ca.prompt_templates(args.prompts)
        root = (None if args.feature_cache.lower() == "none" else
                ca.default_cache_root(fed) if args.feature_cache == "auto" else args.feature_cache)
        clip_args = ca.ClipArgs(clip_model=args.clip_model, pretrained=args.pretrained,
                                prompts=args.prompts, class_names=args.class_names,
                                logit_scale=args.logit_scale, feature_cache=args.feature_cache)
        text_tower = ca.ClipBackbone(clip_args, cfg.seed, torch.device(cfg.device), root)
        self.D = text_tower.spec.embed_dim
        ca._register(text_tower.spec)                 # its tokenizer knows a .json config
        self.text = text_tower.text_features(self.class_names, self.templates)   # T (A3)
        self.text_info = dict(text_tower.stats)
        del text_tower                                                  # the tower is released
        super().__init__(cfg, args, fed)
        self.model.text.copy_(self.text.to(self.device))
        self.info = {"reconstruction": "CLIP, FL and SVM parts reconstructed from "
                     "shared/methods/clip_svm.md (no public code)",
                     "image_tower": args.image_tower, "d_img": TOWERS[args.image_tower][2],
                     "D": self.D, "text_tower": self.text_info, "fl": args.fl,
                     "class_prompts": [ca.fill_prompt(self.templates[0], n)
                                       for n in self.class_names]}

    def build_model(self) -> nn.Module:
        a = self.args
        backbone, d_img = build_backbone(a.image_tower)
        w = self.cfg.weights
        if w:
            load_tower_weights(backbone, a.image_tower, imagenet_path(a.image_tower)
                               if w == "imagenet" else w)
        return ClipImageModel(backbone, d_img, self.D, self.fed.num_classes, a.logit_scale,
                              a.learnable_scale)

    # -- local training ---------------------------------------------------------------
    def loss(self, model, batch, payload, client):
        x, y = batch
        img = model.embed(x)                                            # I^ (A4)
        s = model.scale()
        if self.cfg.loss == "contrastive":
            L = contrastive(img, model.text[y], s)                      # (L1)
        else:
            L = proto_ce(img, model.text, y, s, self.alpha)             # (L2)
        if self.args.fl == "fedprox":
            L = L + self.args.mu / 2 * proximal_term(model, payload["w"])   # (L3)
        return L

    def make_optimizer(self, client):
        """AdamW (betas 0.9, 0.98) or momentum SGD with two groups: the backbone at
        --backbone-lr, the projection (and l) at --lr."""
        b = self.budget()
        m = self.model
        head = list(m.proj.parameters()) + ([m.log_scale] if m.log_scale is not None else [])
        groups = [{"params": list(m.backbone.parameters()), "lr": self.args.backbone_lr},
                  {"params": head, "lr": b.lr}]
        if b.optimizer == "adam":
            opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=b.weight_decay)
        else:
            opt = torch.optim.SGD(groups, momentum=b.momentum, weight_decay=b.weight_decay)
        if b.keep_optimizer and "optimizer" in client.state:
            opt.load_state_dict(client.state["optimizer"])
            for g, lr in zip(opt.param_groups, (self.args.backbone_lr, b.lr)):
                g["lr"] = lr
        return opt

    # -- the feature classifiers (3C) -------------------------------------------------
    @torch.no_grad()
    def features(self, server, client, idx) -> np.ndarray:
        """(C1) the features of images idx under the model `predict` uses for `client`."""
        private = client.state.get("private")
        if private is None or (self.private_keys and not private):
            private = self.average_private()
        self.load_model(server.weights, private)
        self.model.eval()
        out = []
        idx = torch.as_tensor(idx, dtype=torch.long)
        for s in range(0, len(idx), self.cfg.eval_batch_size):
            x, _ = self.batch(idx[s:s + self.cfg.eval_batch_size])
            z = (self.model.embed(x) if self.args.svm_feature == "proj"
                 else F.normalize(self.model.backbone(x), dim=-1))
            out.append(z.float().cpu())
        return torch.cat(out).numpy().astype(np.float64)

    def fit_own(self, server, client, z: np.ndarray | None = None) -> dict:
        """(C1)-(C2): {svm, knn}: this client's classifiers, fitted on its own training
        features only (`z`, computed here when not given)."""
        a, C = self.args, self.fed.num_classes
        z = self.features(server, client, client.train) if z is None else z
        y = self.fed.y.numpy()[client.train]
        return {kind: fit_classifier(kind, z, y, C, svm_c=a.svm_c, knn_k=a.knn_k,
                                     seed=derive_seed(self.cfg.seed, "svm", client.id))
                for kind in ("svm", "knn")}

    def fit_pooled(self, server, zs: list | None = None) -> dict:
        """(C4) --svm-pooled: {svm_pooled, knn_pooled}: one classifier each on every
        training client's features pooled (`zs`, per client, computed here when not
        given): a non-private bound."""
        a, C, y_all = self.args, self.fed.num_classes, self.fed.y.numpy()
        zs = zs if zs is not None else [self.features(server, c, c.train) for c in self.clients]
        Z, Y = np.concatenate(zs), np.concatenate([y_all[c.train] for c in self.clients])
        return {f"{kind}_pooled": [fit_classifier(kind, Z, Y, C, svm_c=a.svm_c, knn_k=a.knn_k,
                                                  seed=derive_seed(self.cfg.seed, "svm", "pooled"))]
                for kind in ("svm", "knn")}

    def fit_parties(self, server) -> dict:
        """(C1)-(C2), (C4): {kind: [fitted party, ...]}: one per training client for svm and
        knn, fitted on that client's training features only; one on the pooled source
        features for svm_pooled / knn_pooled (--svm-pooled)."""
        zs = [self.features(server, c, c.train) for c in self.clients]
        own = [self.fit_own(server, c, z) for c, z in zip(self.clients, zs)]
        fitted = {kind: [o[kind] for o in own] for kind in ("svm", "knn")}
        if self.args.svm_pooled:
            fitted.update(self.fit_pooled(server, zs))
        return fitted

    # steps that run where a client is (Algorithm.at_clients): each reads its own images
    def party_probs(self, server, client, zs: list) -> list:
        """(C3) at training client `client`: its own svm and knn, fitted on its own
        features, applied to each held-out client's features in `zs`."""
        own, C = self.fit_own(server, client), self.fed.num_classes
        return [{kind: torch.from_numpy(classifier_probs(f, z.numpy(), C))
                 for kind, f in own.items()} for z in zs]

    def test_probs(self, server, client) -> torch.Tensor:
        """The deep head's probabilities on this client's test images."""
        return torch.from_numpy(np.asarray(self.predict(server, client, client.test)))

    def unseen_view(self, server, client) -> dict:
        """At a held-out client: the deep head's probabilities and (--svm) the features of
        its images."""
        out = {"deep": self.test_probs(server, client)}
        if self.args.svm:
            out["z"] = torch.from_numpy(self.features(server, client, client.test))
        return out

    def feature_classifiers(self, server, held: list | None = None) -> dict:
        """(C3), (C5): the parties' classifiers and the deep head on every held-out
        client's images (none of which any party saw). The federated SVM / KNN of a
        held-out client is the sum of the probabilities each training client's own
        classifiers give its features (computed where each party is); --svm-pooled's
        classifiers are fitted here on the pooled features."""
        C, y_all = self.fed.num_classes, self.fed.y.numpy()
        held = held if held is not None else self.at_clients(server, self.holdout, "unseen_view")
        per_party = self.at_clients(server, self.clients, "party_probs", [r["z"] for r in held])
        pooled = self.fit_pooled(server) if self.args.svm_pooled else {}
        out = {}
        for j, (h, r) in enumerate(zip(self.holdout, held)):
            y = y_all[h.test]
            res = {"deep": paper_metrics(y, r["deep"].numpy())}
            for kind in ("svm", "knn"):
                res[kind] = paper_metrics(y, sum(p[j][kind].numpy() for p in per_party))  # (C3)
            for kind, parties in pooled.items():
                prob = sum(classifier_probs(f, r["z"].numpy(), C) for f in parties)
                res[kind] = paper_metrics(y, prob)
            res["avg_minus_deep"] = {k: res[k]["avg"] - res["deep"]["avg"]
                                     for k in ("svm", "knn", *pooled)}
            out[h.name] = res
        return out

    def summary_extra(self, server, lines) -> dict:
        y_all = self.fed.y.numpy()
        probs = [p.numpy() for p in self.at_clients(server, self.clients, "test_probs")]
        ys = [y_all[c.test] for c in self.clients]
        extra = {"paper_metrics": {"pooled_test": paper_metrics(np.concatenate(ys),
                                                                np.concatenate(probs))}}
        held = self.at_clients(server, self.holdout, "unseen_view")
        for h, r in zip(self.holdout, held):
            extra["paper_metrics"][h.name] = paper_metrics(y_all[h.test], r["deep"].numpy())
        if self.args.svm:
            extra["feature_classifiers"] = self.feature_classifiers(server, held)
            if self.args.svm_pooled:
                extra["feature_classifiers_note"] = ("svm_pooled / knn_pooled: one classifier "
                                                     "on every client's features pooled: a "
                                                     "NON-PRIVATE upper bound")
        return extra

    @staticmethod
    def summary_table(summary: dict) -> str:
        """The unseen site(s): deep head vs SVM vs KNN, the paper's metrics."""
        rows = []
        for site, res in summary.get("feature_classifiers", {}).items():
            rows.append(f"unseen site {site}: {'':<12}{'AVG':>7}{'ACC':>7}{'BACC':>7}"
                        f"{'wF1':>7}{'mF1':>7}{'AUROC':>7}")
            for kind in [k for k in res if k != "avg_minus_deep"]:
                m = res[kind]
                rows.append(f"  {kind:<30}{m['avg']:>7.3f}{m['accuracy']:>7.3f}"
                            f"{m['balanced_accuracy']:>7.3f}{m['weighted_f1']:>7.3f}"
                            f"{m['macro_f1']:>7.3f}{m['macro_auroc']:>7.3f}")
        return "\n".join(rows)
