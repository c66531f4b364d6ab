"""FCU's unlearning step under other settings, from the original models of an earlier
`bench/fcu_audit.py` run (prints figures; not a test). A diagnostic, not the audit: the
audit keeps the paper's settings.

For each seed folder of the audit and each --unlearn-lr, runs the fcu phase (MCU + FGMP
at the forgotten client, then the post-training) from that seed's original model into
SEED/ablation/fcu-lrX, and prints the audit of theta_u (right after unlearning) and of
the post-trained model next to the seed's retrain row.

    python bench/fcu_ablation.py [--out-root runs/fcu_audit] [--seeds 0 1 2]
                                 [--unlearn-lr 1e-5 1e-4 1e-3] [--convention paper code]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import datasets  # noqa: E402
import fedmed  # noqa: E402

import algorithms  # noqa: E402 - the methods register themselves

algorithms.load_all()
from algorithms.fcu import FCU  # noqa: E402

KEYS = ("test_balanced_accuracy", "forgotten_accuracy", "mia_member_rate", "mia_attack_auroc",
        "mia_loss_auroc", "backdoor_success")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-root", default=os.path.join(ROOT, "runs", "fcu_audit"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--unlearn-lr", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3])
    ap.add_argument("--convention", nargs="+", default=["paper"])
    a = ap.parse_args()
    rows = {}
    for seed in a.seeds:
        top = os.path.join(a.out_root, f"seed{seed}")
        with open(os.path.join(top, "config.json")) as f:
            rec = json.load(f)
        cfg = fedmed.Config(**rec["config"])
        args = FCU.Args(**{k: v for k, v in rec["algorithm_args"].items()})
        fed = datasets.load(datasets.namespace(**{k: v for k, v in rec["data"].items()}),
                            seed=cfg.seed)
        with open(os.path.join(top, "summary.json")) as f:
            rows.setdefault("retrain", []).append(json.load(f)["audit"]["retrain"])
        for conv in a.convention:
            for lr in a.unlearn_lr:
                name = f"fcu-{conv}-lr{lr:g}"
                ph = dataclasses.replace(args, unlearn_lr=lr, fgmp_convention=conv,
                                         fgmp_window="symmetric" if conv == "paper" else "code")
                FCU.run_phase(cfg, ph, fed, os.path.join(top, "ablation", name), "fcu",
                              os.path.join(top, "original"), resume=True, quiet=True)
                auditor = FCU.auditor(cfg, ph, fed)
                auditor.audit.fit_attack(fedmed.load_checkpoint(os.path.join(
                    top, "retrain", "checkpoint.pt"))["server"]["weights"])   # the shadow
                audited = auditor.audit.run(os.path.join(top, "ablation", name))
                rows.setdefault(name + " theta_u", []).append(audited["before_post_training"])
                rows.setdefault(name + " post", []).append(audited)
                print(f"seed {seed} {name}: theta_u " + ", ".join(
                    f"{k} {rows[name + ' theta_u'][-1].get(k, float('nan')):.3f}" for k in KEYS),
                    flush=True)
    print(f"\nmean +- sd over seeds {a.seeds}")
    print("| model | " + " | ".join(KEYS) + " |")
    print("|---" * (len(KEYS) + 1) + "|")
    for name, rs in rows.items():
        cells = []
        for k in KEYS:
            v = np.array([r.get(k, np.nan) for r in rs], float)
            cells.append(f"{v.mean():.3f} +- {v.std(ddof=1) if len(v) > 1 else 0:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
