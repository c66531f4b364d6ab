"""The FCU forgetting audit on real images (prints figures; not a test).

isic2019-mini, natural partition (five centres); client 0 (HAM_vidir_molemax, as the
public code) asks to be forgotten; its training images carry a backdoor (--backdoor: 20%
of them, trigger -> MEL). Unlearning with the paper's T = 100 MCU steps, E = 10, r = 0.7;
post-training R_post rounds of 20 Adam steps. A CPU-sized setting, not the paper's
(DenseNet-121 at 224 px). The backbone and the training schedule pass through to run.py:
the paper starts from an ImageNet-initialised network, so theta_d (the "downgraded"
model) is the pretrained initialisation with

    python bench/fcu_audit.py --model mobilenet_v2 --weights imagenet --image-size 64 \
        --optimizer adam --lr 5e-4 --local-steps 10 [--seeds 0 1 2] [--bn-stats both]

(the default, without flags, is the small CNN from scratch at 32 px, SGD 0.01, B = 64).

One `python run.py --algo fcu ...` per seed (each runs original, retrain, continue, pga,
fcu and fcu_code and writes its audit table), then the mean +- sd over seeds. With
--bn-stats both, each seed also runs the unlearning phases again with the release's BN
behaviour (--unlearn-bn-stats trained: theta_u uploads BN statistics estimated on D_f),
reusing that seed's original and retrain phases (--reuse-original), so the rows
"[release BN]" sit beside the new ones.

Columns: the test BA and AUROC, D_f accuracy, D_r BA, the sheet's membership attack
(logistic regression fit on the retrained model's outputs: member rate on D_f and AUROC
of D_f against held-out test images), the loss-threshold AUROC (the audit's earlier MIA),
the backdoor's success and the cost. The cost as time to accuracy: the sample gradients
retraining needed to first reach the method's final test BA (its per-round pooled test BA
curve), over the method's; where retraining never reaches it, the line says so.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "isic2019-mini")
COLS = [("test_balanced_accuracy", "test BA"), ("test_auroc", "test AUROC"),
        ("forgotten_accuracy", "D_f acc"), ("remaining_balanced_accuracy", "D_r BA"),
        ("mia_member_rate", "MIA member rate"), ("mia_attack_auroc", "MIA AUROC"),
        ("mia_loss_auroc", "loss-threshold AUROC"), ("backdoor_success", "backdoor"),
        ("grad_samples", "sample grads"), ("train_seconds", "train s")]
ORDER = ["original", "retrain", "continue", "pga", "fcu", "fcu_code"]
RELEASE = " [release BN]"
PASS = (("model", str), ("weights", str), ("optimizer", str), ("lr", float),
        ("local_steps", int), ("local_epochs", int), ("batch_size", int),
        ("post_local_steps", int), ("unlearn_steps", int))


def command(a, seed: int, out: str, extra: list) -> list:
    flags = ["--algo", "fcu", "--dataset", "isic2019", "--data-dir", a.data_dir,
             "--partition", "natural", "--image-size", str(a.image_size),
             "--rounds", str(a.rounds), "--post-rounds", str(a.post_rounds), "--backdoor",
             "--seed", str(seed), "--out", out, "--quiet"]
    for name, _ in PASS:
        v = getattr(a, name)
        if v is not None:
            flags += ["--" + name.replace("_", "-"), str(v)]
    flags += (["--resume"] if a.resume and os.path.isdir(out) else ["--overwrite"])
    return [sys.executable, os.path.join(ROOT, "run.py"), *flags, *shlex.split(a.flags), *extra]


def launch(a, seed: int, out: str, extra: list) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    t0 = time.perf_counter()
    p = subprocess.run(command(a, seed, out, extra), cwd=ROOT, env=env, capture_output=True,
                       text=True)
    if p.returncode:
        sys.exit(f"seed {seed} ({out}) failed:\n{p.stderr[-3000:]}")
    print(p.stdout[p.stdout.index("forgetting client"):], flush=True)
    print(f"seed {seed} ({os.path.basename(out)}): {time.perf_counter() - t0:.0f} s in all",
          flush=True)
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def one(seed: int, a) -> dict:
    """One seed: the audit with the BN rule a.bn_stats; with `both`, the new rule and
    then the release's unlearning rows (original and retrain reused), merged."""
    out = os.path.join(a.out_root, f"seed{seed}")
    first = "trained" if a.bn_stats == "trained" else "start"
    s = launch(a, seed, out, ["--unlearn-bn-stats", first])
    if a.bn_stats == "both":
        r = launch(a, seed, out + "-release-bn",
                   ["--unlearn-bn-stats", "trained", "--reuse-original", out,
                    "--unlearn-methods", "retrain,pga,fcu,fcu_code"])
        for m in ("pga", "fcu", "fcu_code"):
            s["audit"][m + RELEASE] = r["audit"][m]
            if m in r.get("time_to_accuracy", {}):
                s["time_to_accuracy"][m + RELEASE] = r["time_to_accuracy"][m]
    return s


def cell(k: str, v: np.ndarray) -> str:
    if np.isnan(v).all():
        return ""
    sd = v.std(ddof=1) if len(v) > 1 else 0.0
    if k == "grad_samples":
        return f"{v.mean():,.0f}"
    if k == "train_seconds":
        return f"{v.mean():.1f} +- {sd:.1f}"
    return f"{v.mean():.3f} +- {sd:.3f}"


def table(sums: list, seeds: list) -> list:
    key = lambda m: (ORDER.index(m.replace(RELEASE, "")), RELEASE in m)  # noqa: E731
    methods = sorted(sums[0]["audit"], key=key)
    out = [f"mean +- sd over seeds {seeds} (forgetting {sums[0]['forget_client']})",
           "| method | " + " | ".join(h for _, h in COLS) + " |",
           "|---" * (len(COLS) + 1) + "|"]
    rows = [(m, [s["audit"][m] for s in sums]) for m in methods]
    rows += [(f"{m}, theta_u before post-training", [s["audit"][m]["before_post_training"]
                                                     for s in sums])
             for m in methods if "before_post_training" in sums[0]["audit"][m]]
    for m, audits in rows:
        cells = [cell(k, np.array([x.get(k, np.nan) for x in audits], float)) for k, _ in COLS]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return out


def time_to_accuracy(sums: list) -> list:
    """Per method: each seed's ratio (or 'never reached'), and the mean over the seeds
    where retraining reached the method's BA."""
    out = ["cost as time to accuracy: retraining's sample gradients to first reach the "
           "method's final test BA / the method's sample gradients"]
    for m in sums[0].get("time_to_accuracy", {}):
        ts = [s["time_to_accuracy"][m] for s in sums if m in s.get("time_to_accuracy", {})]
        parts = [f"{t['ratio']:.2f}x (round {t['retrain_round']}/{t['retrain_rounds']}, "
                 f"BA {t['target_test_balanced_accuracy']:.3f})" if t["reached"] else
                 f"never reached in {t['retrain_rounds']} rounds (BA "
                 f"{t['target_test_balanced_accuracy']:.3f}; ratio > {t['ratio_above']:.2f}x)"
                 for t in ts]
        hit = [t["ratio"] for t in ts if t["reached"]]
        mean = (f"mean {np.mean(hit):.2f}x over the {len(hit)} seed(s) that reached it"
                if hit else "reached on no seed")
        out.append(f"  {m}: " + "; ".join(parts) + f" -> {mean}")
    return out


def gaps(sums: list) -> list:
    r = [s["audit"]["retrain"] for s in sums]
    out = []
    for m in sums[0]["audit"]:
        if m in ("original", "retrain"):
            continue
        x = [s["audit"][m] for s in sums]
        gap = lambda k: np.mean([xi[k] - ri[k] for xi, ri in zip(x, r)])  # noqa: E731
        line = (f"{m} - retrain: test BA {gap('test_balanced_accuracy'):+.3f}, D_f error "
                f"{gap('forgotten_error'):+.3f}, MIA member rate {gap('mia_member_rate'):+.3f},"
                f" MIA AUROC {gap('mia_attack_auroc'):+.3f}")
        if "backdoor_success" in r[0]:
            line += f", backdoor {gap('backdoor_success'):+.3f}"
        out.append(line)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--post-rounds", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=32)
    for name, kind in PASS:
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                        help="passed to run.py (its default when not given)")
    ap.add_argument("--flags", default="", help="further run.py flags, one quoted string")
    ap.add_argument("--bn-stats", choices=["start", "trained", "both"], default="start",
                    help="theta_u's BN statistics: the new rule (start), the release's "
                         "(trained), or both side by side")
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
    print()
    print("\n".join(table(sums, a.seeds) + [""] + time_to_accuracy(sums) + [""] + gaps(sums)))
    for key in ("speedup_vs_retrain", "speedup_vs_retrain_fcu_code", "speedup_vs_retrain_pga",
                "speedup_vs_retrain_continue", "speedup_vs_retrain_wall"):
        v = [s[key] for s in sums if key in s]
        if v:
            print(f"{key} (ratio of the schedules, not time to accuracy): "
                  + ", ".join(f"{x:.2f}" for x in v) + f" (mean {np.mean(v):.2f})")


if __name__ == "__main__":
    main()
