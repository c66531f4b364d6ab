"""The FCU forgetting audit on real images (prints figures; not a test).

isic2019-mini, natural partition (five centres), the small CNN at 32 px, SGD 0.01, batch 64
(the FCU recipe), R = 40 rounds x 1 local epoch for the original and the retrained model;
client 0 (HAM_vidir_molemax, as the public code) asks to be forgotten; its training images
carry a backdoor (--backdoor: 20% of them, trigger -> MEL). Unlearning with the paper's
T = 100 MCU steps, E = 10, r = 0.7; post-training R_post = 4 rounds (a tenth of R; the
paper's 20 rounds are for its much longer original schedule) of 20 Adam steps. A CPU-sized
setting, not the paper's (DenseNet-121 at 224 px).

One `python run.py --algo fcu ...` per seed (each runs original, retrain, continue, pga,
fcu and fcu_code and writes its audit table), then the mean +- sd over seeds:

    python bench/fcu_audit.py [--seeds 0 1 2] [--rounds 40] [--post-rounds 4] [--jobs 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "isic2019-mini")
COLS = [("test_balanced_accuracy", "test BA"), ("test_auroc", "test AUROC"),
        ("forgotten_accuracy", "D_f acc"), ("remaining_balanced_accuracy", "D_r BA"),
        ("mia_auroc", "MIA AUROC"), ("backdoor_success", "backdoor"),
        ("grad_samples", "sample grads"), ("train_seconds", "train s")]


def one(seed: int, a) -> dict:
    out = os.path.join(a.out_root, f"seed{seed}")
    flags = ["--algo", "fcu", "--dataset", "isic2019", "--data-dir", a.data_dir,
             "--partition", "natural", "--image-size", "32", "--rounds", str(a.rounds),
             "--post-rounds", str(a.post_rounds), "--backdoor", "--seed", str(seed),
             "--out", out, "--quiet"] + (["--resume"] if a.resume and os.path.isdir(out)
                                         else ["--overwrite"])
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *flags], cwd=ROOT,
                       env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"seed {seed} failed:\n{p.stderr[-3000:]}")
    print(p.stdout[p.stdout.index("forgetting client"):], flush=True)
    print(f"seed {seed}: {time.perf_counter() - t0:.0f} s in all", flush=True)
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--post-rounds", type=int, default=4)
    ap.add_argument("--data-dir", default=DATA)
    ap.add_argument("--out-root", default=os.path.join(ROOT, "runs", "fcu_audit"))
    ap.add_argument("--jobs", type=int, default=2, help="seeds run at once")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per run")
    ap.add_argument("--resume", action="store_true", help="continue earlier runs in --out-root")
    a = ap.parse_args()
    if not os.path.isdir(a.data_dir):
        sys.exit(f"--data-dir {a.data_dir}: not found; pass the isic2019-mini folder")
    with ThreadPoolExecutor(a.jobs) as ex:
        sums = list(ex.map(lambda s: one(s, a), a.seeds))
    order = ["original", "retrain", "continue", "pga", "fcu", "fcu_code"]
    methods = sorted(sums[0]["audit"], key=lambda m: order.index(m) if m in order else 99)
    print(f"\nmean +- sd over seeds {a.seeds} (forgetting {sums[0]['forget_client']})")
    print("| method | " + " | ".join(h for _, h in COLS) + " |")
    print("|---" * (len(COLS) + 1) + "|")
    rows = [(m, [s["audit"][m] for s in sums]) for m in methods]
    rows += [(f"{m}, theta_u before post-training", [s["audit"][m]["before_post_training"]
                                                     for s in sums])
             for m in methods if "before_post_training" in sums[0]["audit"][m]]
    for m, audits in rows:
        cells = []
        for k, _ in COLS:
            v = np.array([a.get(k, np.nan) for a in audits], float)
            sd = v.std(ddof=1) if len(v) > 1 else 0.0
            cells.append("" if np.isnan(v).all() else f"{v.mean():,.0f}" if k == "grad_samples"
                         else f"{v.mean():.1f} +- {sd:.1f}" if k == "train_seconds"
                         else f"{v.mean():.3f} +- {sd:.3f}")
        print(f"| {m} | " + " | ".join(cells) + " |")
    for key in ("speedup_vs_retrain", "speedup_vs_retrain_wall", "speedup_vs_retrain_fcu_code",
                "speedup_vs_retrain_pga", "speedup_vs_retrain_continue"):
        v = [s[key] for s in sums if key in s]
        if v:
            print(f"{key}: " + ", ".join(f"{x:.2f}" for x in v) + f" (mean {np.mean(v):.2f})")
    r = [s["audit"]["retrain"] for s in sums]
    for m in methods:
        if m in ("original", "retrain"):
            continue
        x = [s["audit"][m] for s in sums]
        gap = lambda k: np.mean([xi[k] - ri[k] for xi, ri in zip(x, r)])  # noqa: E731
        line = (f"{m} - retrain: test BA {gap('test_balanced_accuracy'):+.3f}, MIA AUROC "
                f"{gap('mia_auroc'):+.3f}, D_f error {gap('forgotten_error'):+.3f}")
        if "backdoor_success" in r[0]:
            line += f", backdoor {gap('backdoor_success'):+.3f}"
        print(line)


if __name__ == "__main__":
    main()
