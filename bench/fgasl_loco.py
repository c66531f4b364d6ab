"""FGASL against its baselines, leave-one-centre-out on isic2019-mini's natural centres
(not a test; prints tables). Issue #15, sheet ../shared/methods/fgasl.md section 8. Every
method runs `python run.py --leave-one-out FOLDS --seeds S... --out OUT/METHOD` with the
same budget, data and backbone, so each fold x seed is a normal run folder and
OUT/METHOD/loco.md its table; this script then joins them:

  fedavg-labelled   FedAvg on the labelled images only (--unlabeled-fraction F): lower bound
  fedavg-full       FedAvg with every label (no --unlabeled-fraction): upper bound
  fixmatch          FedAvg + FixMatch (tau 0.95, lambda_u 1)
  meanteacher       FedAvg + Mean Teacher (EMA 0.99, lambda_c 1, ramp-up 25%)
  fgasl             FGASL (GAA + DR + PIA)
  fgasl-no-gaa, fgasl-no-dr, fgasl-no-pia   the ablations

Columns: the unseen centre's balanced accuracy per fold (last round, mean over seeds),
its mean over folds (mean +- sd over seeds of the per-seed mean), the training clients'
own test sets (mean client BA over folds), and for the semi-supervised rows the pseudo
labels of the last round (acceptance rate and accuracy against the hidden labels, pooled
over the training clients, folds and seeds: accepted / seen and correct / accepted).
A method whose loco.json says done is re-read; an unfinished one is continued with
--resume (finished runs skipped, interrupted ones continued). Run it inside one CPU slot
(`cpuslot python bench/fgasl_loco.py ...`): the runs are its subprocesses, one at a time.

    python bench/fgasl_loco.py [--folds all|NAME,...] [--seeds 0 1 2] [--methods ...]
        [--rounds 20] [--local-steps 10] [--unlabeled-fraction 0.9] [--image-size 64]
        [--no-imagenet] [--out runs/bench-fgasl-loco] [--extra FLAGS...]

The full table of issue #15 (5 folds x 3 seeds x 8 methods) is the default command.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {"fedavg-labelled": ["--algo", "fedavg"],
           "fedavg-full": ["--algo", "fedavg"],
           "fixmatch": ["--algo", "fixmatch"],
           "meanteacher": ["--algo", "meanteacher"],
           "fgasl": ["--algo", "fgasl"],
           "fgasl-no-gaa": ["--algo", "fgasl", "--no-gaa"],
           "fgasl-no-dr": ["--algo", "fgasl", "--no-dr"],
           "fgasl-no-pia": ["--algo", "fgasl", "--no-pia"]}
FULL_LABELS = {"fedavg-full"}


def command(method, a, resume) -> list:
    out = os.path.join(a.out, method)
    labels = [] if method in FULL_LABELS else ["--unlabeled-fraction", str(a.unlabeled_fraction)]
    weights = [] if a.no_imagenet else ["--weights", "imagenet"]
    return ([sys.executable, os.path.join(ROOT, "run.py")] + METHODS[method] + labels
            + ["--dataset", "isic2019", "--data-dir", a.data_dir, "--partition", "natural",
               "--model", a.model, *weights, "--image-size", str(a.image_size),
               "--rounds", str(a.rounds), "--local-steps", str(a.local_steps),
               "--batch-size", str(a.batch_size), "--optimizer", "adam", "--lr", str(a.lr),
               "--weight-decay", str(a.weight_decay),
               "--leave-one-out", a.folds, "--seeds", *map(str, a.seeds), "--quiet",
               "--out", out] + (["--resume"] if resume else []) + a.extra)


def pseudo_labels(folder: str, rec: dict) -> tuple:
    """(acceptance, accuracy) of the last round, pooled over training clients, folds and
    seeds; (None, None) for a row without pseudo labels."""
    seen = accepted = correct = 0
    for runs in rec["runs"].values():
        for sub in runs:
            with open(os.path.join(folder, sub, "metrics.jsonl")) as f:
                lines = [json.loads(s) for s in f if s.strip()]
            last = max(m["round"] for m in lines)
            for m in lines:
                if m["round"] == last and "pl_seen" in m and not m["holdout"]:
                    n = m["pl_seen"]
                    seen += n
                    accepted += round(m["pl_accept"] * n)
                    if m.get("pl_acc") is not None:
                        correct += round(m["pl_acc"] * m["pl_accept"] * n)
    if not seen:
        return None, None
    return accepted / seen, (correct / accepted if accepted else None)


def fmt(v, sd=None):
    if v is None:
        return "-"
    return f"{v:.3f}" + (f" +- {sd:.3f}" if sd is not None and sd == sd else "")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data", "isic2019-mini"))
    p.add_argument("--folds", default="all", help="all, or comma-separated centre names")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--unlabeled-fraction", type=float, default=0.9)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--no-imagenet", action="store_true", help="random initial weights")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-fgasl-loco"))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further run.py flags for every run (last on the line)")
    a = p.parse_args()
    recs = {}
    for method in a.methods:
        folder = os.path.join(a.out, method)
        path = os.path.join(folder, "loco.json")
        rec = json.load(open(path)) if os.path.isfile(path) else None
        if rec is None or rec.get("status") != "done":
            cmd = command(method, a, resume=rec is not None)
            print("$ " + " ".join(cmd[1:]), flush=True)
            t0 = time.time()
            rc = subprocess.run(cmd).returncode
            print(f"  {method}: exit {rc}, {time.time() - t0:.0f} s", flush=True)
            if rc != 0:
                continue
            rec = json.load(open(path))
        recs[method] = rec
    if not recs:
        return 1
    folds = next(iter(recs.values()))["folds"]
    head = (["method"] + [f"unseen BA {f}" for f in folds]
            + ["unseen BA, mean over folds", "training clients' BA", "PL accept", "PL acc"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, rec in recs.items():
        acc, pacc = pseudo_labels(os.path.join(a.out, method), rec)
        cells = [fmt(rec["per_fold"][f]["unseen_ba"]["mean"]) for f in folds]
        m = rec["mean"]
        cells += [fmt(m["unseen_ba"]["mean"], m["unseen_ba"]["sd"]),
                  fmt(m["train_ba"]["mean"], m["train_ba"]["sd"]), fmt(acc), fmt(pacc)]
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    seeds = next(iter(recs.values()))["seeds"]
    print(f"\nLeave-one-centre-out on isic2019-mini, seeds {' '.join(map(str, seeds))}, "
          f"{a.rounds} rounds x {a.local_steps} local steps, {a.image_size} px, {a.model}"
          f"{'' if a.no_imagenet else ' (ImageNet)'}, labelled share "
          f"{1 - a.unlabeled_fraction:.2f} (fedavg-full: 1); last round\n")
    print("\n".join(rows))
    if len(seeds) > 1:
        sds = {m: statistics.mean(r["per_fold"][f]["unseen_ba"]["sd"] for f in folds)
               for m, r in recs.items()}
        print("\nmean over folds of the per-fold sd over seeds: "
              + ", ".join(f"{m} {v:.3f}" for m, v in sds.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
