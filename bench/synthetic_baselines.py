"""FedAvg, FedProx, local-only and pooled on the synthetic default federation, over
several seeds (not a test; prints figures). Every run uses the defaults of
`python run.py` (the synthetic recipe; only --algo and --seed change), so a row is what
`python run.py --algo ALGO --seed S` prints with that many torch threads.

    python bench/synthetic_baselines.py [--seeds 0 1 2 3 4] [--algos fedavg local]
                                        [--threads 1]

Per seed: the mean client balanced accuracy (each client's model on its own test set,
the headline of `python run.py`) at the last round and over the last 5 rounds; with both
fedavg and local, the per-seed difference FedAvg - local and its mean and minimum (the
embedded default must show federation beating training alone: README, "The synthetic
federation"). The thread count changes the floating-point reduction order and so the
trajectory; run it with --threads 1 and --threads 2.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import algorithms  # noqa: E402
import datasets  # noqa: E402
import fedmed  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--algos", nargs="+", default=["fedavg", "local"])
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's, as python run.py)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    algorithms.load_all()
    rows: dict = {}
    for seed in a.seeds:
        fed = datasets.load(datasets.namespace(), seed=seed)
        for algo in a.algos:
            cfg = fedmed.Config(algo=algo, seed=seed, **datasets.RECIPES["synthetic"])
            cls = fedmed.ALGORITHMS[algo]
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                s = fedmed.run(cfg, cls.Args() if cls.Args else None, fed, out, quiet=True)
                dt = time.perf_counter() - t0
            rows.setdefault(algo, []).append((s["balanced_accuracy"], s["balanced_accuracy_last5"],
                                              s["pooled_balanced_accuracy"], dt))
            print(f"seed {seed}  {algo:<8} client BA {s['balanced_accuracy']:.3f}  last5 "
                  f"{s['balanced_accuracy_last5']:.3f}  pooled BA {s['pooled_balanced_accuracy']:.3f}"
                  f"  ({dt:.0f} s)", flush=True)
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    print(f"\n{torch.get_num_threads()} thread(s), seeds {a.seeds}")
    print(f"{'algo':<8}{'client BA':>18}{'last5':>18}{'pooled BA':>18}{'s/run':>8}")
    for algo, r in rows.items():
        cols = [[x[i] for x in r] for i in range(4)]
        print(f"{algo:<8}" + "".join(f"{statistics.mean(c):>10.3f} +- {sd(c):.3f}" for c in cols[:3])
              + f"{statistics.median(cols[3]):>8.0f}")
    if "fedavg" in rows and "local" in rows:
        for i, name in ((0, "client BA"), (1, "last5")):
            gap = [f[i] - loc[i] for f, loc in zip(rows["fedavg"], rows["local"])]
            print(f"fedavg - local, {name}: " + " ".join(f"{g:+.3f}" for g in gap)
                  + f"   mean {statistics.mean(gap):+.3f}  min {min(gap):+.3f}")


if __name__ == "__main__":
    main()
