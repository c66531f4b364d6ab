"""The FedMed command line. Nothing else lives here.

    python run.py                                  # FedAvg on the synthetic federation
    python run.py --algo fedprox --mu 0.01 --dataset isic2019 --data-dir PATH
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import datasets
import fedmed
from fedmed import Config, UsageError

HELP = {
    "rounds": "communication rounds R",
    "local_epochs": "local epochs E per round",
    "local_steps": "local minibatch steps tau per round; > 0 replaces --local-epochs",
    "batch_size": "minibatch size B",
    "lr": "client learning rate eta",
    "momentum": "SGD momentum (state reset every round unless --keep-optimizer)",
    "weight_decay": "L2 weight decay",
    "optimizer": "sgd | adam",
    "keep_optimizer": "carry each client's optimiser state across rounds",
    "fraction": "share C of the clients sampled each round, in (0, 1]",
    "weighting": "samples (n_k/n, FedAvg) | uniform (plain mean, not FedAvg)",
    "bn": "BatchNorm policy: average | local (FedBN) | params_only (FLamby; alias: none)",
    "model": "cnn | resnet18 | efficientnet_b0 | densenet121 | mobilenet_v2",
    "weights": "imagenet (ImageNet weights, offline from the torch hub cache; mobilenet_v2: "
               "`python models.py fetch mobilenet_v2` once) or a local checkpoint file",
    "loss": "ce | focal",
    "focal_gamma": "gamma of the focal loss",
    "class_weights": "inverse (alpha_c = N/N_c on the pooled training split) | none",
    "augment": "flip | none",
    "seed": "run seed; every random stream derives from it",
    "device": "cpu | cuda | cuda:N",
    "eval_batch_size": "batch size for evaluation",
}
CHOICES = {"optimizer": ("sgd", "adam"), "weighting": ("samples", "uniform"),
           "bn": ("average", "local", "params_only", "none"), "loss": ("ce", "focal"),
           "class_weights": ("inverse", "none"), "augment": ("flip", "none")}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_dataclass_flags(group, cls, seen: set, only: set | None = None,
                         users: dict | None = None) -> None:
    """A flag per field of dataclass `cls` (skipping those already added, and those not in
    `only` when given); `users` names the algorithms that read a shared flag."""
    for f in dataclasses.fields(cls):
        if (f.name in seen or f.name == "algo" or f.metadata.get("internal")
                or (only is not None and f.name not in only)):
            continue                                    # internal: set by a protocol only
        seen.add(f.name)
        default = f.default
        kind = type(default) if default is not None else str
        text = HELP.get(f.name, f.metadata.get("help", ""))
        if users:
            text += f" [{', '.join(users[f.name])}]"
        if kind is bool:
            group.add_argument(_flag(f.name), action="store_true", default=None,
                               help=f"{text} (default: {default})")
            continue
        recipes = "".join(f"; {d}: {r[f.name]}" for d, r in datasets.RECIPES.items() if f.name in r)
        group.add_argument(_flag(f.name), type=kind, default=None, choices=CHOICES.get(f.name),
                           metavar=f.name.upper() if f.name not in CHOICES else None,
                           help=f"{text} (default: {default}{recipes})")


def build_parser() -> argparse.ArgumentParser:
    fedmed.load_algorithms()
    p = argparse.ArgumentParser(
        prog="run.py", description="FedMed: federated learning for medical image "
        "classification. Trains --algo on --dataset and writes results to --out.")
    p.add_argument("--algo", default="fedavg",
                   help="algorithm: " + ", ".join(sorted(fedmed.ALGORITHMS)) + " (default: fedavg)")
    datasets.add_arguments(p)
    seen: set = set()
    _add_dataclass_flags(p.add_argument_group("training"), Config, seen)
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="results folder (default: runs/ALGO-DATASET-TIME)")
    o.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    o.add_argument("--overwrite", action="store_true", help="replace the results in an existing --out")
    o.add_argument("--stop-after", type=int, default=None, metavar="R",
                   help="stop after round R (resume later with --resume)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.add_argument("--last-k", type=int, default=5, metavar="K",
                   help="summary.json also gives the mean over the last K rounds (default: 5)")
    users: dict = {}                                    # flag -> algorithms that read it
    for name in sorted(fedmed.ALGORITHMS):
        for f in dataclasses.fields(fedmed.ALGORITHMS[name].Args or _NoArgs):
            if f.metadata.get("internal"):
                continue
            users.setdefault(f.name, []).append(name)
    shared = {k for k, v in users.items() if len(v) > 1 and k not in seen}
    if shared:
        g = p.add_argument_group("options read by several algorithms")
        for name in sorted(fedmed.ALGORITHMS):
            cls = fedmed.ALGORITHMS[name]
            if cls.Args is not None:
                _add_dataclass_flags(g, cls.Args, seen, only=shared, users=users)
    for name in sorted(fedmed.ALGORITHMS):
        cls = fedmed.ALGORITHMS[name]
        if cls.Args is not None:
            fields = [f for f in dataclasses.fields(cls.Args) if f.name not in seen]
            if fields:
                g = p.add_argument_group(f"{name} (only with --algo {name})")
                _add_dataclass_flags(g, cls.Args, seen)
    return p


@dataclasses.dataclass
class _NoArgs:
    pass


def _fill(cls, ns: argparse.Namespace):
    """An instance of dataclass `cls` from the flags the user gave, defaults elsewhere."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)
              if getattr(ns, f.name, None) is not None}
    return cls(**values)


def validate(cfg: Config, ns: argparse.Namespace) -> None:
    if cfg.algo not in fedmed.ALGORITHMS:
        raise UsageError(f"--algo {cfg.algo!r} is unknown; choose one of "
                         + ", ".join(sorted(fedmed.ALGORITHMS)))
    if cfg.rounds < 1:
        raise UsageError(f"--rounds must be at least 1 (got {cfg.rounds})")
    if not 0 < cfg.fraction <= 1:
        raise UsageError(f"--fraction must lie in (0, 1] (got {cfg.fraction})")
    if cfg.local_epochs < 1 and cfg.local_steps < 1:
        raise UsageError("--local-epochs must be at least 1 (or set --local-steps)")
    if cfg.local_steps < 0:
        raise UsageError(f"--local-steps must be >= 0 (got {cfg.local_steps})")
    if cfg.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {cfg.batch_size})")
    if cfg.lr <= 0:
        raise UsageError(f"--lr must be positive (got {cfg.lr})")
    if cfg.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--device {cfg.device}: no CUDA device here; use --device cpu")
    elif cfg.device != "cpu":
        raise UsageError(f"--device {cfg.device!r} is unknown; use cpu, cuda or cuda:N")
    if ns.stop_after is not None and ns.stop_after < 1:
        raise UsageError(f"--stop-after must be at least 1 (got {ns.stop_after})")
    if ns.resume and ns.overwrite:
        raise UsageError("--resume and --overwrite exclude each other; pick one")


def prepare_out(ns: argparse.Namespace, cfg: Config) -> str:
    out = ns.out or os.path.join("runs", f"{cfg.algo}-{ns.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    exists = os.path.isdir(out) and os.listdir(out)
    if ns.resume:
        marker = "config.json" if hasattr(fedmed.ALGORITHMS[cfg.algo], "protocol") else "checkpoint.pt"
        if not os.path.isfile(os.path.join(out, marker)):
            raise UsageError(f"--resume: no {marker} in {out}; give the --out of an earlier run")
    elif exists and not ns.overwrite:
        raise UsageError(f"--out {out} already holds results; pass --overwrite to replace them, "
                         "--resume to continue, or another --out")
    elif os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; give a folder path")
    return out


def main(argv=None) -> int:
    try:
        return _main(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(argv) -> int:
    ns = build_parser().parse_args(argv)
    if ns.bn == "none":
        ns.bn = "params_only"
    for key, value in getattr(fedmed.ALGORITHMS.get(ns.algo), "recipe", {}).items():
        if getattr(ns, key) is None:                    # the paper's recipe (e.g. CLIP methods)
            setattr(ns, key, value)
    for key, value in datasets.RECIPES.get(ns.dataset, {}).items():
        if getattr(ns, key) is None:                    # a flag the user left unset
            setattr(ns, key, value)
    cfg = _fill(Config, ns)
    validate(cfg, ns)
    if ns.last_k < 1:
        raise UsageError(f"--last-k must be at least 1 (got {ns.last_k})")
    cls = fedmed.ALGORITHMS[cfg.algo]
    args = _fill(cls.Args, ns) if cls.Args is not None else None
    out = prepare_out(ns, cfg)
    if ns.image_size is None and hasattr(cls, "default_image_size"):
        ns.image_size = cls.default_image_size(args)   # e.g. a CLIP model's input size
    fed = datasets.load(ns, seed=cfg.seed)
    if not ns.quiet:
        print(f"{cfg.algo} on {fed.name}: {len(fed.clients)} clients, {fed.num_classes} classes "
              f"({', '.join(fed.classes)})")
        print(fed.table())
    data_args = {a: getattr(ns, a) for a in datasets.ARG_NAMES}
    if hasattr(cls, "protocol"):                       # several runs of the loop (e.g. FCU)
        if ns.stop_after is not None:
            raise UsageError(f"--stop-after does not apply to --algo {cfg.algo} (several runs); "
                             "interrupt it and continue with --resume")
        summary = cls.protocol(cfg, args, fed, out, resume=ns.resume, data_args=data_args,
                               quiet=ns.quiet)
    else:
        summary = fedmed.run(cfg, args, fed, out, resume=ns.resume, data_args=data_args,
                             stop_after=ns.stop_after, quiet=ns.quiet, last_k=ns.last_k)
    if summary:
        print(fedmed.results_table(summary))
        if hasattr(cls, "summary_table"):              # e.g. FedAL's label-efficiency curve
            print(cls.summary_table(summary))
        print(f"mean balanced accuracy over clients {summary['balanced_accuracy']:.4f}, "
              f"pooled {summary['pooled_balanced_accuracy']:.4f}; bytes up "
              f"{summary['bytes_up']:,}, down {summary['bytes_down']:,}; results in {out}")
        j = summary.get("last_k")
        if j:
            print(f"mean of the last {j} rounds: balanced accuracy "
                  f"{summary[f'balanced_accuracy_last{j}']:.4f}, pooled "
                  f"{summary[f'pooled_balanced_accuracy_last{j}']:.4f} (pooled = "
                  f"{summary['pooled_kind']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
