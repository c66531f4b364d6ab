"""The FedMed command line. Nothing else lives here.

    python run.py                                  # FedAvg on the synthetic federation
    python run.py --algo fedprox --mu 0.01 --dataset isic2019 --data-dir PATH

Exit status: 0 done; 2 bad input (one line on stderr naming the flag, file or row);
3 training diverged (a NaN/infinite loss, weight or prediction: one line naming the round
and client; the last good checkpoint is kept); 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import os
import shlex
import sys
import tempfile
import time

import algorithms
import datasets
import fedmed
import models
import privacy
import results
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
    "loss": "ce | focal (--algo clip_svm: contrastive | proto_ce)",
    "focal_gamma": "gamma of the focal loss",
    "class_weights": "inverse (alpha_c = N/N_c on the pooled training split) | none",
    "augment": "flip | none",
    "seed": "run seed; every random stream derives from it",
    "device": "cpu | cuda | cuda:N",
    "eval_batch_size": "batch size for evaluation",
}
CHOICES = {"optimizer": ("sgd", "adam"), "weighting": ("samples", "uniform"),
           "bn": ("average", "local", "params_only", "none"),
           "loss": ("ce", "focal", "contrastive", "proto_ce"),
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
        if kind is bool:              # --no-X too: a recipe's True must be undoable
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                               default=None, help=f"{text} (default: {default})")
            continue
        recipes = "".join(f"; {d}: {r[f.name]}" for d, r in datasets.RECIPES.items() if f.name in r)
        group.add_argument(_flag(f.name), type=kind, default=None, choices=CHOICES.get(f.name),
                           metavar=f.name.upper() if f.name not in CHOICES else None,
                           help=f"{text} (default: {default}{recipes})")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (a UsageError) instead of printing the
    whole usage block before it."""

    def error(self, message):
        raise UsageError(f"{message} (see python run.py --help)")


def build_parser() -> argparse.ArgumentParser:
    algorithms.load_all()
    p = Parser(
        prog="run.py", description="FedMed: federated learning for medical image "
        "classification. Trains --algo on --dataset and writes results to --out.")
    p.add_argument("--algo", default="fedavg",
                   help="algorithm: " + ", ".join(sorted(fedmed.ALGORITHMS)) + " (default: fedavg)")
    datasets.add_arguments(p)
    privacy.add_arguments(p)
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
    o.add_argument("--evaluate", default=None, metavar="RUN_DIR",
                   help="no training: evaluate the finished run in RUN_DIR (its exported model(s), "
                   "by its held-out rule) on every labelled image of the data the data flags "
                   "describe (e.g. a new hospital); writes evaluation.md/.json to --out; a --seeds "
                   "folder: every seed, and the mean +- sd over them")
    o.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                   help="run the configuration once per seed S, each in OUT/seed-S, then write "
                   "the mean +- sd over the seeds to OUT/seeds.md and OUT/seeds.json "
                   "(replaces --seed)")
    o.add_argument("--leave-one-out", nargs="?", const="all", default=None, metavar="NAMES",
                   help="leave-one-centre-out: one fold per client (or per client of the "
                   "comma-separated NAMES), each holding that client out (--holdout-client) "
                   "and training on the others, each a normal run in OUT/fold-NAME/seed-S "
                   "(every --seeds), then OUT/loco.md and OUT/loco.json (per fold and mean: "
                   "the unseen centre's figures and the training clients' own test sets); "
                   "--resume skips finished runs, continues interrupted ones, starts the rest")
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
    losses = getattr(fedmed.ALGORITHMS[cfg.algo], "losses", ("ce", "focal"))
    if cfg.loss not in losses:            # a method's own objectives (clip_svm: contrastive)
        raise UsageError(f"--loss {cfg.loss} does not apply to --algo {cfg.algo}; choose one of "
                         + ", ".join(losses))
    if cfg.rounds < 1:
        raise UsageError(f"--rounds must be at least 1 (got {cfg.rounds})")
    if not 0 < cfg.fraction <= 1:
        raise UsageError(f"--fraction must lie in (0, 1] (got {cfg.fraction})")
    if cfg.local_epochs < 1 and cfg.local_steps < 1:
        raise UsageError("--local-epochs must be at least 1 (or set --local-steps)")
    if cfg.local_steps < 0:
        raise UsageError(f"--local-steps must be >= 0 (got {cfg.local_steps})")
    if cfg.batch_size < 2:        # the loop drops a batch of one image (BatchNorm cannot train on it)
        raise UsageError(f"--batch-size must be at least 2 (got {cfg.batch_size}; a batch of one "
                         "image is skipped, so nothing would train)")
    if cfg.lr <= 0:
        raise UsageError(f"--lr must be positive (got {cfg.lr})")
    if not 0 <= cfg.momentum < 1:
        raise UsageError(f"--momentum must lie in [0, 1) (got {cfg.momentum})")
    if cfg.weight_decay < 0:
        raise UsageError(f"--weight-decay must be >= 0 (got {cfg.weight_decay})")
    if cfg.focal_gamma < 0:
        raise UsageError(f"--focal-gamma must be >= 0 (got {cfg.focal_gamma})")
    if cfg.eval_batch_size < 1:
        raise UsageError(f"--eval-batch-size must be at least 1 (got {cfg.eval_batch_size})")
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


def given_flags(parser: argparse.ArgumentParser, argv) -> set:
    """The dests of the flags typed on the command line (not their defaults). Consumes
    `parser` (its defaults are cleared)."""
    for a in parser._actions:
        a.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


# a flag that is read only under a condition: (flag, does it apply?, what makes it apply)
CONDITIONAL = [
    ("momentum", lambda cfg: cfg.optimizer == "sgd" or cfg.algo == "fcu",   # FCU: its PGA SGD
     "--optimizer sgd (or --algo fcu)"),
    ("focal_gamma", lambda cfg: cfg.loss == "focal", "--loss focal"),
    ("local_epochs", lambda cfg: cfg.local_steps == 0, "no --local-steps (which replaces it)"),
]


def check_applies(cfg: Config, ns: argparse.Namespace, given: set) -> None:
    """A flag typed on the command line that this configuration does not read is refused
    (it would be silently ignored): another algorithm's options, SGD momentum with Adam,
    --focal-gamma without the focal loss, --local-epochs with --local-steps."""
    own = {f.name for f in dataclasses.fields(fedmed.ALGORITHMS[cfg.algo].Args or _NoArgs)}
    for name in sorted(fedmed.ALGORITHMS):
        for f in dataclasses.fields(fedmed.ALGORITHMS[name].Args or _NoArgs):
            if f.name in given and f.name not in own and not hasattr(cfg, f.name):
                users = [a for a in sorted(fedmed.ALGORITHMS) if f.name in
                         {g.name for g in dataclasses.fields(fedmed.ALGORITHMS[a].Args or _NoArgs)}]
                raise UsageError(f"{_flag(f.name)} does not apply to --algo {cfg.algo} (only to "
                                 f"{', '.join(users)}); drop it or choose that algorithm")
    for name, applies, when in CONDITIONAL:
        if name in given and not applies(cfg):
            raise UsageError(f"{_flag(name)} does not apply here; it is read only with {when}; "
                             f"drop {_flag(name)}")


def check_before_data(cfg: Config, args, ns: argparse.Namespace, given: set) -> None:
    """What can be checked without reading an image: flags that do not apply, the data
    flags, the model name and weights file, and a CLIP method's --clip-model and
    --pretrained."""
    check_applies(cfg, ns, given)
    datasets.check_flags(ns, given)
    cls = fedmed.ALGORITHMS[cfg.algo]
    if cls.build_model is not fedmed.Algorithm.build_model:   # e.g. CLIP methods
        for name in ("model", "weights"):
            if name == "weights" and getattr(cls, "takes_weights", False):
                continue                              # e.g. clip_svm: its image tower's
            if name in given:
                raise UsageError(f"{_flag(name)} does not apply to --algo {cfg.algo} (it builds "
                                 f"its own model); drop {_flag(name)}")
    else:
        models.check(cfg.model, cfg.weights, ns.image_size)
    if hasattr(cls, "check_before_data"):             # a method's own checks that need cfg
        cls.check_before_data(cfg, args, ns.image_size)   # (FedMIC: its teacher/student pair)
    if hasattr(cls, "check_command"):                 # checks that need the data flags too
        cls.check_command(cfg, args, ns, given)       # (clip_svm: --svm needs a holdout)
    if args is not None and hasattr(args, "clip_model"):
        import clip_adapters
        spec = clip_adapters.resolve_model(args.clip_model)
        if hasattr(args, "pretrained"):
            clip_adapters.resolve_weights(spec, args.pretrained, cfg.seed)


def prepare_out(ns: argparse.Namespace, cfg: Config, out: str) -> str:
    exists = os.path.isdir(out) and [n for n in os.listdir(out) if n != fedmed.LOCK_NAME]
    seeds = results.seeds_folder(out) if exists else None
    if ns.resume and ns.seeds is None and seeds is not None:
        raise UsageError(f"--resume: {out} holds the runs of --seeds "
                         f"{' '.join(map(str, seeds['seeds']))}; add those --seeds")
    if ns.resume and ns.seeds is not None:
        if seeds is None:
            raise UsageError(f"--resume --seeds: {out} is not the folder of a --seeds run (no "
                             f"{results.SEEDS_FILE}); give the --out of an earlier --seeds run")
        if seeds["seeds"] != ns.seeds:
            raise UsageError(f"--resume --seeds {' '.join(map(str, ns.seeds))}: {out} holds the "
                             f"runs of --seeds {' '.join(map(str, seeds['seeds']))}; give those "
                             "seeds, or another --out")
        check_writable(out)
        return out
    if ns.resume:
        marker = "config.json" if hasattr(fedmed.ALGORITHMS[cfg.algo], "protocol") else "checkpoint.pt"
        if not os.path.isfile(os.path.join(out, marker)):
            raise UsageError(f"--resume: no {marker} in {out}; give the --out of an earlier run")
    elif exists and not ns.overwrite:
        raise UsageError(f"--out {out} already holds results; pass --overwrite to replace them, "
                         "--resume to continue, or another --out")
    elif os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; give a folder path")
    check_writable(out)
    return out


def check_writable(out: str) -> None:
    """A one-line error now, before any image is decoded, when folder `out` cannot be
    made or written; leaves the file system as it found it."""
    made, d = [], os.path.abspath(out)
    while not os.path.isdir(d):
        if os.path.exists(d):
            raise UsageError(f"--out {out}: {d} is a file, so the folder cannot be made; "
                             "give another --out")
        made.append(d)
        d = os.path.dirname(d)
    try:
        for m in reversed(made):
            os.mkdir(m)
        with tempfile.TemporaryFile(dir=os.path.abspath(out)):
            pass
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or e}); give another --out")
    finally:
        for m in made:
            try:
                os.rmdir(m)
            except OSError:
                pass


def _remove_stub(out: str, existed: bool) -> None:
    """After a crash before the first round ended: remove the folder when it holds only
    what the loop writes first (config.json, an empty metrics.jsonl), so the next attempt
    is not refused as 'already holds results'."""
    try:
        names = set(os.listdir(out)) - {fedmed.LOCK_NAME}
        if names <= {"config.json", "metrics.jsonl"} and (
                "metrics.jsonl" not in names or not os.path.getsize(os.path.join(out, "metrics.jsonl"))):
            for n in names:
                os.remove(os.path.join(out, n))
            if not existed:
                if os.path.exists(os.path.join(out, fedmed.LOCK_NAME)):
                    os.remove(os.path.join(out, fedmed.LOCK_NAME))
                os.rmdir(out)
    except OSError:
        pass


def _held(out: str) -> contextlib.AbstractContextManager:
    """The lock on an existing --out (a run in progress there is refused before anything
    is read or replaced); a new folder is locked by the loop when it creates it."""
    return fedmed.locked(out) if os.path.isdir(out) else contextlib.nullcontext()


def continue_command(argv: list, out: str) -> str:
    """The command line that continues an interrupted run: the same flags, without
    --overwrite/--stop-after/--out, with --resume --out OUT."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--stop-after", "--out"):
            skip = True
        elif a not in ("--overwrite", "--resume") and not a.startswith(("--stop-after=", "--out=")):
            keep.append(a)
    return shlex.join(["python", "run.py", *keep, "--resume", "--out", out])


def main(argv=None, transport=None) -> int:
    """The command line; `transport` (flower_app.py's) runs the clients elsewhere."""
    argv = list(sys.argv[1:] if argv is None else argv)
    made: dict = {}                  # _main: the results folder, when this run may create it
    try:
        return _main(argv, made, transport)
    except (fedmed.Interrupted, KeyboardInterrupt) as e:
        where = str(e) if isinstance(e, fedmed.Interrupted) else "interrupted before training"
        out = _OUT.get("out")
        more = (f"; continue with: {continue_command(argv, out)}" if out and glob.glob(
            os.path.join(glob.escape(out), "**", "checkpoint.pt"), recursive=True) else "")
        print(f"stopped: {where}{more}", file=sys.stderr)
        return 130
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except fedmed.Diverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return fedmed.EXIT_DIVERGED
    except Exception:
        if made.get("out"):
            _remove_stub(made["out"], made["existed"])
        raise


_OUT: dict = {}                         # the --out of the run in progress (for Ctrl-C)


def configure(ns: argparse.Namespace, given: set):
    """(cfg, the method's class, its args, whether --rounds was typed) from the parsed
    command line `ns`, checked before any image is read; sets ns.layer (the privacy layer's
    constructor, None when off). A Flower node (flower_app.py) configures itself from the
    same command line through this."""
    if ns.bn == "none":
        ns.bn = "params_only"
    rounds_given = ns.rounds is not None
    for key, value in getattr(fedmed.ALGORITHMS.get(ns.algo), "recipe", {}).items():
        if getattr(ns, key) is None:                    # the paper's recipe (e.g. CLIP methods)
            setattr(ns, key, value)
    for key, value in datasets.RECIPES.get(ns.dataset, {}).items():
        if getattr(ns, key) is None:                    # a flag the user left unset
            setattr(ns, key, value)
    check_seeds(ns, given)                             # before anything else is read
    if ns.seeds is not None:
        ns.seed = ns.seeds[0]                           # the checks below see one of them
    cfg = _fill(Config, ns)
    validate(cfg, ns)
    if ns.last_k < 1:
        raise UsageError(f"--last-k must be at least 1 (got {ns.last_k})")
    cls = fedmed.ALGORITHMS[cfg.algo]
    args = _fill(cls.Args, ns) if cls.Args is not None else None
    check_before_data(cfg, args, ns, given)
    layer = privacy.layer_settings(ns, cfg, given)     # DP / secure aggregation (None: off)
    ns.layer = None
    if layer is not None:
        dp, secagg, faults = layer
        if not privacy.eligible(cls):                   # dropouts / NaN rejection only
            privacy.check_faults_only(cls, ns, given)
            layer = None
            ns.layer = lambda algo: privacy.FaultLayer(algo, faults)
        else:
            cfg.weighting = "uniform"                   # every client alike
    ns.layer_settings = layer                          # (--dp-plan prints its plan)
    if layer is not None:
        if ns.dp_plan:
            if dp is None:
                raise UsageError("--dp-plan needs --dp-noise or --dp-epsilon")
            return cfg, cls, args, rounds_given
        ns.layer = lambda algo: privacy.PrivacyLayer(algo, dp, secagg, faults)
    ns.given_flags = given                             # datasets.build: flags a partition ignores
    return cfg, cls, args, rounds_given


def _main(argv, made: dict, transport=None) -> int:
    ns = build_parser().parse_args(argv)
    ns.argv = list(argv)                                # recorded in config.json
    given = given_flags(build_parser(), argv)
    if ns.evaluate is not None:
        return _evaluate(ns, given)
    cfg, cls, args, rounds_given = configure(ns, given)
    if ns.dp_plan and ns.layer_settings is not None:
        print(privacy.plan_text(ns.layer_settings[0]))
        return 0
    out = ns.out or os.path.join("runs", f"{cfg.algo}-{ns.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    _OUT["out"] = out
    if transport is not None:                           # e.g. Flower
        transport.check(ns, cls)
    ns.transport = transport                            # (fedmed.run's; None: in process)
    if ns.leave_one_out is not None:
        return _leave_one_out(ns, cfg, cls, args, out, rounds_given, given)
    if ns.seeds is not None:
        return _seeds(ns, cfg, cls, args, out, rounds_given)
    with _held(out):                                    # before anything there is read
        prepare_out(ns, cfg, out)
        if not ns.resume and not (os.path.isdir(out) and
                                  [n for n in os.listdir(out) if n != fedmed.LOCK_NAME]):
            made.update(out=out, existed=os.path.isdir(out))
        return _train(ns, cfg, cls, args, out, rounds_given)


def load_federation(ns: argparse.Namespace, cfg: Config, cls, args):
    """The federation the data flags describe (the method's default image size where
    --image-size is not given)."""
    if ns.image_size is None and hasattr(cls, "default_image_size"):
        ns.image_size = cls.default_image_size(args)   # e.g. a CLIP model's input size
    fed = datasets.load(ns, seed=cfg.seed)
    if cls.build_model is fedmed.Algorithm.build_model:
        models.check_image_size(cfg.model, int(fed.x.shape[-1]))  # e.g. a dataset's own size
    return fed


def _evaluate(ns: argparse.Namespace, given: set) -> int:
    """--evaluate RUN_DIR: the flags it reads are checked, then the run, before any image
    is read; the run's image size and colour constancy are used (the model saw those)."""
    for name in sorted(given):
        if name not in results.EVAL_FLAGS and name not in datasets.ARG_NAMES:
            raise UsageError(f"{_flag(name)} does not apply to --evaluate (nothing is trained; "
                             "the run's settings are used); drop it")
    seeds = results.seeds_folder(ns.evaluate) if os.path.isdir(ns.evaluate) else None
    if seeds is not None:                               # every seed of a --seeds run
        runs = [(s, seed_folder(ns.evaluate, s)) for s in seeds["seeds"]]
    else:
        runs = [(None, ns.evaluate)]
    found = [(s, d, *results.finished_run(d)) for s, d in runs]
    config = found[0][2]
    run_cfg, run_data = config.get("config", {}), config.get("data", {})
    size = run_data.get("image_size")
    if "image_size" in given and size and ns.image_size != size:
        raise UsageError(f"--image-size {ns.image_size}: the run's model was trained on {size} px "
                         "images; drop --image-size (the run's is used)")
    ns.image_size = size or ns.image_size
    if "color_constancy" in given and not run_data.get("color_constancy"):
        raise UsageError("--color-constancy: the run was trained without it; drop it (the run's "
                         "preprocessing is used)")
    ns.color_constancy = bool(run_data.get("color_constancy"))
    seed_given = ns.seed is not None                    # synthetic data are drawn from it
    datasets.check_flags(ns, given)
    models.check(run_cfg.get("model", "cnn"), None, ns.image_size)
    device = ns.device or "cpu"
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device here; use --device cpu")
    elif device != "cpu":
        raise UsageError(f"--device {device!r} is unknown; use cpu, cuda or cuda:N")
    if ns.eval_batch_size is not None and ns.eval_batch_size < 1:
        raise UsageError(f"--eval-batch-size must be at least 1 (got {ns.eval_batch_size})")
    name = os.path.basename(os.path.normpath(ns.evaluate)) or "run"
    out = ns.out or os.path.join("runs", f"eval-{name}-{ns.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    results.prepare_eval_out(out, ns.overwrite)
    check_writable(out)
    records = []
    for s, d, config, summary in found:
        one = argparse.Namespace(**vars(ns))
        if not seed_given:
            one.seed = int(config.get("config", {}).get("seed", 0))
        records.append(results.evaluate(d, one, config, summary,
                                        out if s is None else seed_folder(out, s)))
    if seeds is None:
        print(results.evaluation_markdown(records[0]).rstrip())
    else:
        print(results.seeds_evaluation(seeds["seeds"], records, out)["markdown"].rstrip())
    print(f"results in {out}")
    return 0


def check_seeds(ns: argparse.Namespace, given: set) -> None:
    """--seeds: distinct seeds >= 0, not with --seed or --stop-after (one line, exit 2)."""
    if ns.seeds is None:
        return
    if "seed" in given:
        raise UsageError("--seeds and --seed exclude each other; give the seeds to run with "
                         "--seeds only (e.g. --seeds 0 1 2)")
    dup = sorted({s for s in ns.seeds if ns.seeds.count(s) > 1})
    if dup:
        raise UsageError(f"--seeds: seed {dup[0]} is given twice; give each seed once")
    if min(ns.seeds) < 0:
        raise UsageError(f"--seeds: seeds must be >= 0 (got {min(ns.seeds)})")
    if ns.stop_after is not None:
        raise UsageError("--stop-after does not apply with --seeds; interrupt the run (Ctrl-C) "
                         "and continue it with --resume")


def seed_folder(out: str, seed: int) -> str:
    return os.path.join(out, f"seed-{seed}")


def _seeds(ns, cfg, cls, args, out, rounds_given) -> int:
    """--seeds S1 S2 ...: the configuration once per seed, in OUT/seed-S (each a plain
    results folder), then OUT/seeds.md and OUT/seeds.json (mean +- sd over the seeds).
    OUT/seeds.json is written first and names the seeds, so a later --resume must give
    the same ones (a second invocation never mixes two sets of seeds in one table); under
    --resume a seed folder with a checkpoint is continued (a finished one only re-read)
    and a missing one is started."""
    marker = "config.json" if hasattr(cls, "protocol") else "checkpoint.pt"
    existed = os.path.isdir(out)
    prepare_out(ns, cfg, out)
    os.makedirs(out, exist_ok=True)
    summaries, wrote = [], False
    try:
        with fedmed.locked(out):
            if ns.overwrite:
                fedmed.clear_out(out)
            if not ns.resume:
                wrote = True
                fedmed.atomic_write(os.path.join(out, results.SEEDS_FILE), fedmed.dumps(
                    {"seeds": ns.seeds, "argv": ns.argv, "status": "running"}))
            for seed in ns.seeds:
                sub = seed_folder(out, seed)
                one = argparse.Namespace(**vars(ns))
                one.seed, one.overwrite = seed, False
                one.resume = bool(ns.resume and os.path.isfile(os.path.join(sub, marker)))
                if not ns.quiet:
                    print(f"--- seed {seed} ({ns.seeds.index(seed) + 1} of {len(ns.seeds)}): {sub}")
                if _train(one, dataclasses.replace(cfg, seed=seed), cls, args, sub,
                          rounds_given) != 0:
                    return 1
                summaries.append(results.read_json(os.path.join(sub, "summary.json"), sub))
            md, record = results.seeds_table(ns.seeds, summaries)
            head = (f"# {cfg.algo} on {ns.dataset}, seeds {' '.join(map(str, ns.seeds))}\n\n"
                    f"Command: `{shlex.join(['python', 'run.py', *ns.argv])}`\n\n")
            fedmed.atomic_write(os.path.join(out, "seeds.md"), head + md)
            record.update(argv=ns.argv, status="done",
                          runs=[os.path.basename(seed_folder(out, s)) for s in ns.seeds])
            fedmed.atomic_write(os.path.join(out, results.SEEDS_FILE), fedmed.dumps(record))
    except BaseException:
        if wrote and not any(os.path.isdir(seed_folder(out, s)) for s in ns.seeds):
            _remove_seeds_stub(out, existed)            # nothing ran: leave no folder
        raise
    print(md.rstrip())
    print(f"mean +- sd over {len(ns.seeds)} seeds in {os.path.join(out, 'seeds.md')}")
    return 0


def _remove_seeds_stub(out: str, existed: bool) -> None:
    """After a failure before any seed folder was made: remove seeds.json (and the folder
    when this invocation made it), so the next attempt is not refused."""
    try:
        for n in (results.SEEDS_FILE, fedmed.LOCK_NAME):
            if os.path.exists(os.path.join(out, n)) and (n != fedmed.LOCK_NAME or not existed):
                os.remove(os.path.join(out, n))
        if not existed:
            os.rmdir(out)
    except OSError:
        pass


def fold_folder(out: str, fold: str, seed: int) -> str:
    return os.path.join(out, f"fold-{fedmed._file_stem(fold)}", f"seed-{seed}")


def _leave_one_out(ns, cfg, cls, args, out, rounds_given, given) -> int:
    """--leave-one-out [NAMES]: for every fold (a client held out) and every seed, a
    normal run (the one round loop) in OUT/fold-NAME/seed-S, then the table. The client
    names come from the federation the data flags describe (loaded once, no holdout).
    OUT/loco.json names the folds and seeds first, so --resume must give the same ones;
    under --resume a run with summary.json for the asked rounds is only re-read, one with
    a checkpoint is continued, the others are started."""
    if "holdout_client" in given:
        raise UsageError("--leave-one-out sets --holdout-client itself (one fold per client); "
                         "drop --holdout-client")
    if ns.stop_after is not None:
        raise UsageError("--stop-after does not apply with --leave-one-out; interrupt the run "
                         "(Ctrl-C) and continue it with --resume")
    seeds = ns.seeds if ns.seeds is not None else [cfg.seed]
    probe = argparse.Namespace(**vars(ns))
    probe.holdout_client, probe.quiet = None, True
    names = [c.name for c in datasets.load(probe, seed=seeds[0]).clients]
    if ns.leave_one_out == "all":
        folds = names
    else:
        folds = datasets.client_names(
            [argparse.Namespace(name=n) for n in names], ns.leave_one_out, "--leave-one-out")
    if len(names) < 2 or not folds:
        raise UsageError(f"--leave-one-out needs at least 2 clients and 1 fold (got clients "
                         f"{', '.join(names)})")
    marker = "config.json" if hasattr(cls, "protocol") else "checkpoint.pt"
    path = os.path.join(out, results.LOCO_FILE)
    with _held(out):
        exists = os.path.isdir(out) and [n for n in os.listdir(out) if n != fedmed.LOCK_NAME]
        if ns.resume:
            old = results.read_json(path, f"--resume: {out}") if os.path.isfile(path) else None
            if old is None:
                raise UsageError(f"--resume --leave-one-out: {out} is not the folder of a "
                                 f"--leave-one-out run (no {results.LOCO_FILE})")
            if old["folds"] != folds or old["seeds"] != seeds:
                raise UsageError(f"--resume: {out} holds folds {','.join(old['folds'])} and seeds "
                                 f"{' '.join(map(str, old['seeds']))}; give those, or another --out")
        elif exists and not ns.overwrite:
            raise UsageError(f"--out {out} already holds results; pass --overwrite to replace "
                             "them, --resume to continue, or another --out")
        check_writable(out)
    os.makedirs(out, exist_ok=True)
    summaries: dict = {}
    with fedmed.locked(out):
        if ns.overwrite and not ns.resume:
            fedmed.clear_out(out)
        if not ns.resume:
            fedmed.atomic_write(path, fedmed.dumps({"folds": folds, "seeds": seeds,
                                                    "argv": ns.argv, "status": "running"}))
        for fold in folds:
            for seed in seeds:
                sub = fold_folder(out, fold, seed)
                done = os.path.join(sub, "summary.json")
                if (ns.resume and os.path.isfile(done)
                        and results.read_json(done, sub).get("rounds", 0) >= cfg.rounds):
                    if not ns.quiet:
                        print(f"--- fold {fold}, seed {seed}: finished, re-read from {sub}")
                    summaries.setdefault(fold, {})[seed] = results.read_json(done, sub)
                    continue
                one = argparse.Namespace(**vars(ns))
                one.seed, one.overwrite, one.holdout_client = seed, False, fold
                one.resume = bool(ns.resume and os.path.isfile(os.path.join(sub, marker)))
                if not ns.quiet:
                    print(f"--- fold {fold} (unseen), seed {seed}: {sub}")
                if _train(one, dataclasses.replace(cfg, seed=seed), cls, args, sub,
                          rounds_given) != 0:
                    return 1
                summaries.setdefault(fold, {})[seed] = results.read_json(done, sub)
        md, record = results.loco_table(folds, seeds, summaries)
        head = (f"# {cfg.algo} on {ns.dataset}, leave-one-centre-out\n\n"
                f"Command: `{shlex.join(['python', 'run.py', *ns.argv])}`\n\n")
        fedmed.atomic_write(os.path.join(out, "loco.md"), head + md)
        record.update(argv=ns.argv, status="done", algo=cfg.algo,
                      runs={f: [os.path.relpath(fold_folder(out, f, s), out) for s in seeds]
                            for f in folds})
        fedmed.atomic_write(path, fedmed.dumps(record))
    print(md.rstrip())
    print(f"leave-one-centre-out table in {os.path.join(out, 'loco.md')}")
    return 0


def _train(ns, cfg, cls, args, out, rounds_given) -> int:
    if ns.resume and not rounds_given:                  # continue to the recorded total
        cfg.rounds = fedmed.recorded_rounds(out) or cfg.rounds
    fed = load_federation(ns, cfg, cls, args)
    if not ns.quiet:
        print(f"{cfg.algo} on {fed.name}: {len(fed.clients)} clients, {fed.num_classes} classes "
              f"({', '.join(fed.classes)})")
        print(fed.table())
    data_args = {a: getattr(ns, a) for a in datasets.ARG_NAMES}
    if hasattr(cls, "protocol"):                       # several runs of the loop (e.g. FCU)
        if ns.stop_after is not None:
            raise UsageError(f"--stop-after does not apply to --algo {cfg.algo} (several runs); "
                             "interrupt it and continue with --resume")
        if ns.overwrite and os.path.isdir(out):       # (the loop clears a plain run's folder)
            fedmed.clear_out(out)                       # nothing of the old run is left
        summary = cls.protocol(cfg, args, fed, out, resume=ns.resume, data_args=data_args,
                               quiet=ns.quiet, argv=ns.argv,
                               transport=getattr(ns, "transport", None))
    else:
        summary = fedmed.run(cfg, args, fed, out, resume=ns.resume, data_args=data_args,
                             stop_after=ns.stop_after, quiet=ns.quiet, argv=ns.argv,
                             last_k=ns.last_k, layer=ns.layer,
                             transport=getattr(ns, "transport", None))
    if summary:
        print(fedmed.results_table(summary))
        if hasattr(cls, "summary_table"):              # e.g. FedAL's label-efficiency curve
            print(cls.summary_table(summary))
        print(f"mean balanced accuracy over clients {summary['balanced_accuracy']:.4f}, "
              f"pooled {summary['pooled_balanced_accuracy']:.4f}; bytes up "
              f"{summary['bytes_up']:,}, down {summary['bytes_down']:,}; results in {out}")
        if "privacy" in summary:
            p = summary["privacy"]
            print(f"privacy: client-level (epsilon, delta) = ({p['epsilon']:.3f}, {p['delta']:g}) "
                  f"after {p['rounds']} rounds (z = {p['noise_multiplier']:g}, S = {p['clip']:g}, "
                  f"q = {p['q']:g}; RDP accountant, order {p['order']:g}, {p['conversion']})")
        j = summary.get("last_k")
        if j:
            print(f"mean of the last {j} rounds: balanced accuracy "
                  f"{summary[f'balanced_accuracy_last{j}']:.4f}, pooled "
                  f"{summary[f'pooled_balanced_accuracy_last{j}']:.4f} (pooled = "
                  f"{summary['pooled_kind']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
