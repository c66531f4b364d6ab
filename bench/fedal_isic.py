"""FedAL label-efficiency curves on isic2019-mini (not a test; prints figures): FedAL
(ensemble-entropy) and random acquisition from 10% to 50% of the labels, next to
full-data FedAvg with the same number of rounds, over several seeds. Natural centres,
the small CNN, 32 px, --local-steps 20, batch 32: a CPU-sized setting, not the paper's.

    python bench/fedal_isic.py [--seeds 0 1 2] [--out-root DIR] [--rounds-per-cycle 4]

Each run goes through run.py into OUT_ROOT/<method>-s<seed> (a finished run is reused),
so the numbers can be checked against the files.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "isic2019-mini")


def run(out, flags):
    if not os.path.isfile(os.path.join(out, "summary.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *flags, "--out", out,
                        "--overwrite", "--quiet"], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
    return json.load(open(os.path.join(out, "summary.json")))


def fmt(xs):
    return f"{statistics.mean(xs):.3f} +- {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out-root", default=os.path.join(ROOT, "runs", "fedal_isic"))
    ap.add_argument("--rounds-per-cycle", type=int, default=4)
    a = ap.parse_args()
    if not os.path.isdir(DATA):
        sys.exit(f"{DATA} is absent; this benchmark needs isic2019-mini")
    common = ["--dataset", "isic2019", "--data-dir", DATA, "--partition", "natural",
              "--image-size", "32", "--local-steps", "20", "--batch-size", "32"]
    al = ["--algo", "fedal", "--al-initial", "0.1", "--al-budget", "0.5", "--al-cycles", "4",
          "--al-rounds-per-cycle", str(a.rounds_per_cycle)]
    curves, full = {}, []
    for seed in a.seeds:
        for acq in ("ensemble-entropy", "random"):
            s = run(os.path.join(a.out_root, f"{acq}-s{seed}"),
                    al + ["--acquisition", acq, "--seed", str(seed)] + common)
            curves.setdefault(acq, []).append(s["al_curve"])
        s = run(os.path.join(a.out_root, f"fedavg-s{seed}"),
                ["--algo", "fedavg", "--rounds", str(5 * a.rounds_per_cycle),
                 "--seed", str(seed)] + common)
        full.append(s)
    print(f"mean client balanced accuracy at the end of each FL phase, seeds {a.seeds}")
    print(f"{'labelled':>9}  {'FedAL (ensemble-entropy)':>26}  {'random':>18}")
    for i, p in enumerate(curves["random"][0]):
        ens = [c[i]["balanced_accuracy"] for c in curves["ensemble-entropy"]]
        rnd = [c[i]["balanced_accuracy"] for c in curves["random"]]
        print(f"{p['label_fraction']:>9.2f}  {fmt(ens):>26}  {fmt(rnd):>18}")
    print(f"{1.0:>9.2f}  full-data FedAvg, same rounds: {fmt([s['balanced_accuracy'] for s in full])}")
    for name in ("ensemble-entropy", "random"):
        gap = [c[-1]["balanced_accuracy"] - s["balanced_accuracy"] for c, s in zip(curves[name], full)]
        print(f"{name}: BA at 50% minus full-data FedAvg: {fmt(gap)}")
    print("pooled balanced accuracy at 50%: "
          + ", ".join(f"{n} {fmt([c[-1]['pooled_balanced_accuracy'] for c in curves[n]])}"
                      for n in curves)
          + f", full-data FedAvg {fmt([s['pooled_balanced_accuracy'] for s in full])}")


if __name__ == "__main__":
    main()
