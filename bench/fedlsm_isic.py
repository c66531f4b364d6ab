"""FedLSM against its two baselines on isic2019-mini with the labelset partition (not a
test; prints a table). 5 clients, 3 annotated classes each (the FedLSM paper's ISIC
setting), small CNN from scratch at 32 px, the same budget and optimiser for every method:
FedLSM's recipe (`FedLSM.recipe`, the public code's: Adam lr 1e-4, weight decay 5e-4,
30 local steps, batch 64 = 60 of P + 4 of U + 4 of Cf for FedLSM, 64 labelled images for
the baselines, each client's optimiser state carried across rounds); FedLSM takes it from
run.py's recipe (no budget flag is passed), the baselines as flags of the same values
(their Adam keeps torch's betas; FedLSM's are (0.9, 0.9999)). --local-steps / --lr /
--batch-size given here replace the recipe for every method, and --extra passes any
other run.py flag (e.g. --extra --model mobilenet_v2 --weights imagenet):

  partial  fedavg trained on each client's annotated images only (the lower bound)
  fedlsm   FedLSM (algorithms/fedlsm.py) on the same clients
  oracle   fedavg with every label visible (--oracle-labels; same clients and images)
optional (--methods): partial-unweighted (fedavg, --class-weights none: FedLSM's loss is
unweighted like the public code) and fedlsm-awpa-only (no pseudo labels, no mixup: the
class-wise aggregation and n_k = all images alone).

Each run is one command of run.py (printed); finished runs (summary.json present) are
reused, so the script can be stopped and restarted.

    python bench/fedlsm_isic.py [--seeds 0 1 2] [--rounds 30] [--local-steps 30]
        [--image-size 64] [--methods partial fedlsm oracle] [--out runs/bench-fedlsm-isic]
        [--jobs 3 --threads 1] [--extra --model mobilenet_v2 --weights imagenet ...]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {"partial": ["--algo", "fedavg"],
           "fedlsm": ["--algo", "fedlsm"],
           "oracle": ["--algo", "fedavg", "--oracle-labels"],
           # optional rows (not in the default set)
           "partial-unweighted": ["--algo", "fedavg", "--class-weights", "none"],
           "fedlsm-awpa-only": ["--algo", "fedlsm", "--tau-p", "1.01", "--lambda-ude", "0"]}
DEFAULT = ["partial", "fedlsm", "oracle"]


def recipe() -> dict:
    """FedLSM's recipe, as run.py applies it (read from the class, so the two agree)."""
    sys.path.insert(0, ROOT)
    import fedmed
    import algorithms  # noqa: E402 - the methods register themselves
    algorithms.load_all()
    return dict(fedmed.ALGORITHMS["fedlsm"].recipe)


def budget(method, a) -> list:
    """The optimiser and budget flags of one run: FedLSM's recipe, passed as flags to the
    baselines (FedLSM's own run reads it from run.py), --local-steps / --lr /
    --batch-size of this script where given."""
    given = {"local_steps": a.local_steps, "lr": a.lr, "batch_size": a.batch_size}
    flags = {k: v for k, v in given.items() if v is not None}
    if METHODS[method][1] != "fedlsm":
        flags = {**recipe(), **flags}
    out = []
    for k, v in flags.items():
        flag = "--" + k.replace("_", "-")
        out += ([flag] if v is True else [f"--no-{flag[2:]}"] if v is False else [flag, str(v)])
    return out


def command(method, seed, a) -> list:
    return ([sys.executable, os.path.join(ROOT, "run.py")] + METHODS[method]
            + ["--dataset", "isic2019", "--data-dir", a.data_dir, "--partition", "labelset",
               "--clients", "5", "--labels-per-client", "3", "--image-size", str(a.image_size),
               "--rounds", str(a.rounds)] + budget(method, a)
            + ["--seed", str(seed), "--quiet",
               "--out", os.path.join(a.out, f"{method}-s{seed}")] + a.extra)


def pseudo_share(out: str):
    """FedLSM only: pseudo positives / all counted positives (q) in the last round."""
    sys.path.insert(0, ROOT)
    import fedmed
    ck = fedmed.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    q = sum(int(c["state"]["q"].sum()) for c in ck["clients"])
    qp = sum(int(c["state"]["q_pseudo"].sum()) for c in ck["clients"])
    return qp / max(q, 1)


def pseudo_quality(out: str, a, seed: int) -> dict:
    """FedLSM only, an evaluation the method itself cannot make: which unlabelled training
    images the final global model would pseudo-label (max softmax >= tau_p, argmax outside
    the client's label set), how many of those labels are right (true labels read here,
    for the benchmark only), and the share that names the majority class NV."""
    import numpy as np
    import torch
    sys.path.insert(0, ROOT)
    import datasets
    import fedmed
    import algorithms  # noqa: E402 - the methods register themselves
    algorithms.load_all()
    cfg_rec = json.load(open(os.path.join(out, "config.json")))
    ns = datasets.namespace(**{k: v for k, v in cfg_rec["data"].items() if k != "cache_dir"})
    ns.quiet = True
    fed = datasets.load(ns, seed=seed)
    cls = fedmed.ALGORITHMS["fedlsm"]
    args = cls.Args(**cfg_rec["algorithm_args"])
    cfg = fedmed.Config(**cfg_rec["config"])
    algo = cls(cfg, args, fed)
    ck = fedmed.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    algo.load_model(ck["server"]["weights"], {})
    y, taken, right, nv = fed.y.numpy(), 0, 0, 0
    total = sum(len(c.unlabeled) for c in fed.clients)
    for c in fed.clients:
        p = algo.forward_probs(c.unlabeled)
        arg = p.argmax(1)
        keep = (p.max(1) >= args.tau_p) & ~np.isin(arg, c.label_set)
        taken += int(keep.sum())
        right += int((arg[keep] == y[c.unlabeled][keep]).sum())
        nv += int((arg[keep] == fed.classes.index("NV")).sum())
    return {"share": taken / max(total, 1), "precision": right / max(taken, 1),
            "nv": nv / max(taken, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=DEFAULT, choices=list(METHODS))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--local-steps", type=int, default=None, help="(default: the recipe's, 30)")
    ap.add_argument("--lr", type=float, default=None, help="(default: the recipe's, 1e-4)")
    ap.add_argument("--batch-size", type=int, default=None, help="(default: the recipe's, 64)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data", "isic2019-mini"))
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-fedlsm-isic"))
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time")
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP_NUM_THREADS of each run (0: torch's default)")
    ap.add_argument("--diagnose", action="store_true",
                    help="FedLSM runs: also the share and precision of the pseudo labels the "
                    "final global model would give (reads the true labels: evaluation only)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="further run.py flags for every run (last on the line)")
    a = ap.parse_args()
    if not os.path.isdir(a.data_dir):
        sys.exit(f"skipped: {a.data_dir} is absent (see ../shared/data/README.md)")
    runs = [(method, seed, command(method, seed, a)) for seed in a.seeds for method in a.methods]
    pending = [r for r in runs if not os.path.isfile(os.path.join(r[2][r[2].index("--out") + 1],
                                                                   "summary.json"))]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads)) if a.threads else None
    active, t0 = [], time.perf_counter()
    while pending or active:                       # at most --jobs runs at a time
        while pending and len(active) < a.jobs:
            method, seed, cmd = pending.pop(0)
            out = cmd[cmd.index("--out") + 1]
            print("$ " + " ".join(cmd[1:]), flush=True)
            active.append((method, seed, subprocess.Popen(
                cmd + (["--overwrite"] if os.path.isdir(out) else []), env=env)))
        time.sleep(1)
        for item in [x for x in active if x[2].poll() is not None]:
            active.remove(item)
            if item[2].returncode:
                sys.exit(f"{item[0]} seed {item[1]} failed (exit {item[2].returncode})")
            print(f"  done: {item[0]} seed {item[1]} after {time.perf_counter() - t0:.0f} s", flush=True)
    rows = {}
    for method, seed, cmd in runs:
        out = cmd[cmd.index("--out") + 1]
        s = json.load(open(os.path.join(out, "summary.json")))
        r = {"ba": s["balanced_accuracy"], "pba": s["pooled_balanced_accuracy"],
             "auc": s["macro_auroc"], "pauc": s["pooled"]["macro_auroc"],
             "pseudo": pseudo_share(out) if method.startswith("fedlsm") else None}
        rows.setdefault(method, []).append(r)
        print(f"{method:<18} seed {seed}: client BA {r['ba']:.3f}  pooled BA {r['pba']:.3f}  "
              f"client AUROC {r['auc']:.3f}  pooled AUROC {r['pauc']:.3f}"
              + (f"  pseudo share {r['pseudo']:.3f}" if r["pseudo"] is not None else "")
              + f"  ({s['seconds']:.0f} s)", flush=True)
        if a.diagnose and method.startswith("fedlsm"):
            d = pseudo_quality(out, a, seed)
            print(f"{'':<18} pseudo labels of the final model: {d['share']:.1%} of the unlabelled "
                  f"images, {d['precision']:.1%} correct, {d['nv']:.1%} of them NV", flush=True)
    keys = [("ba", "client BA"), ("pba", "pooled BA"), ("auc", "client AUROC"), ("pauc", "pooled AUROC")]
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    print(f"\nisic2019-mini, labelset 5 clients x 3 classes, {a.image_size} px, {a.rounds} rounds x "
          f"{a.local_steps or recipe()['local_steps']} steps, seeds {a.seeds}: mean +- sd over "
          "seeds (last round)")
    print(f"{'method':<19}" + "".join(f"{name:>18}" for _, name in keys))
    mean = {}
    for method, rs in rows.items():
        mean[method] = {k: statistics.mean(r[k] for r in rs) for k, _ in keys}
        print(f"{method:<19}" + "".join(f"{mean[method][k]:>11.3f} +- {sd([r[k] for r in rs]):.3f}"
                                        for k, _ in keys))
    if {"partial", "fedlsm", "oracle"} <= set(mean):
        p, f, o = mean["partial"], mean["fedlsm"], mean["oracle"]
        print(f"{'gap closed':<19}" + "".join(
            f"{(f[k] - p[k]) / (o[k] - p[k]) if o[k] != p[k] else float('nan'):>18.2f}" for k, _ in keys)
            + "   (fedlsm - partial) / (oracle - partial)")


if __name__ == "__main__":
    main()
