"""FedAvg, FedProx, local-only and pooled on the synthetic default federation, over
several seeds (not a test; prints figures). Every run uses the defaults of
`python run.py` (the synthetic recipe; only --algo and --seed change).

    python bench/synthetic_baselines.py [--seeds 0 1 2] [--algos fedavg local pooled]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import fedmed  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--algos", nargs="+", default=["fedavg", "fedprox", "local", "pooled"])
    a = ap.parse_args()
    import algorithms  # noqa: E402 - the methods register themselves
    algorithms.load_all()
    rows = {}
    for algo in a.algos:
        for seed in a.seeds:
            fed = datasets.load(datasets.namespace(), seed=seed)
            cfg = fedmed.Config(algo=algo, seed=seed, **datasets.RECIPES["synthetic"])
            cls = fedmed.ALGORITHMS[algo]
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                s = fedmed.run(cfg, cls.Args() if cls.Args else None, fed, out, quiet=True)
                dt = time.perf_counter() - t0
            rows.setdefault(algo, []).append((s["balanced_accuracy"], s["pooled_balanced_accuracy"], dt))
            print(f"{algo:<8} seed {seed}: mean client BA {s['balanced_accuracy']:.3f}  pooled BA "
                  f"{s['pooled_balanced_accuracy']:.3f}  ({dt:.0f} s)", flush=True)
    print(f"\n{'algo':<8}{'mean client BA':>22}{'pooled BA':>20}   seeds {a.seeds}")
    for algo, r in rows.items():
        ba, pb = [x[0] for x in r], [x[1] for x in r]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        print(f"{algo:<8}{statistics.mean(ba):>14.3f} +- {sd(ba):.3f}{statistics.mean(pb):>12.3f} +- {sd(pb):.3f}")


if __name__ == "__main__":
    main()
