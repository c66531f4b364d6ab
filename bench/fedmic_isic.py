"""FedMIC against its baselines on isic2019-mini's natural centres (not a test; prints
tables). Issue #13, sheet ../shared/methods/fedmic.md section 8. Every method gets the same
budget (--rounds, --local-epochs or --local-steps, --image-size) and FedMIC's recipe as
optimiser (Adam, lr 1e-4, batch 32; FedMIC takes it from run.py, the baselines as flags):

  fedmic        FedMIC: private teachers (--teacher-model mobilenet_v2, ImageNet weights
                unless --no-imagenet), shared small-CNN student, SVD-compressed updates
                (T 0.95 -> 0.98); its client BA is the personalised teachers' (primary
                view), the student's is printed beside it
  fedavg        FedAvg on the student alone (--model cnn, its own --bn average, n_k weights)
  local         local-only teachers (--algo local --model mobilenet_v2, ImageNet weights)
  fedkd-nosvd   FedMIC with T_start = T_end = 1 (FedKD without SVD: dense updates)

Two tables: all clients every round (--fraction 1), and low participation (--fraction 0.5).
Columns: client BA (mean +- sd over seeds, last round), the student's BA where there is
one, bytes up and down (summary.json's byte counter, totals over the run), and the ratio of
each to FedAvg's in the same table. Each run is one `python run.py` command (printed);
finished runs (summary.json present) are reused, so the script can be stopped and
restarted. --extra passes further run.py flags to every run (last on the line).

    python bench/fedmic_isic.py [--seeds 0 1 2] [--rounds 20] [--local-epochs 1]
        [--local-steps N] [--image-size 64] [--fractions 1 0.5] [--methods ...]
        [--no-imagenet] [--threads 1] [--out runs/bench-fedmic-isic] [--extra FLAGS...]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = ["--optimizer", "adam", "--lr", "0.0001", "--batch-size", "32"]   # FedMIC.recipe's
METHODS = {"fedmic": ["--algo", "fedmic"],
           "fedavg": ["--algo", "fedavg", "--model", "cnn"] + RECIPE,
           "local": ["--algo", "local", "--model", "mobilenet_v2"] + RECIPE,
           "fedkd-nosvd": ["--algo", "fedmic", "--energy-start", "1", "--energy-end", "1"]}
TEACHER = {"fedmic": "--teacher-weights", "fedkd-nosvd": "--teacher-weights", "local": "--weights"}


def command(method, seed, fraction, a) -> list:
    flags = list(METHODS[method])
    if method in TEACHER and not a.no_imagenet:
        flags += [TEACHER[method], "imagenet"]
    budget = (["--local-steps", str(a.local_steps)] if a.local_steps
              else ["--local-epochs", str(a.local_epochs)])
    return ([sys.executable, os.path.join(ROOT, "run.py")] + flags
            + ["--dataset", "isic2019", "--data-dir", a.data_dir, "--partition", "natural",
               "--image-size", str(a.image_size), "--rounds", str(a.rounds), *budget,
               "--fraction", str(fraction), "--seed", str(seed), "--quiet",
               "--out", os.path.join(a.out, f"{method}-f{fraction}-s{seed}")] + a.extra)


def figures(summary: dict) -> dict:
    student = summary.get("views", {}).get("global", {}).get("balanced_accuracy")
    return {"ba": summary["balanced_accuracy"], "student": student,
            "up": summary["bytes_up"], "down": summary["bytes_down"]}


def table(rows: dict, fraction: float, a) -> str:
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    mean = {m: {k: statistics.mean(r[k] for r in rs) if rs[0][k] is not None else None
                for k in ("ba", "student", "up", "down")} for m, rs in rows.items()}
    ref = mean.get("fedavg")
    lines = [f"\nisic2019-mini natural centres, --fraction {fraction}, {a.image_size} px, "
             f"{a.rounds} rounds x "
             + (f"{a.local_steps} steps" if a.local_steps else f"{a.local_epochs} epoch(s)")
             + f", seeds {a.seeds}: mean +- sd over seeds (last round)",
             f"{'method':<13}{'client BA':>17}{'student BA':>17}{'bytes up':>15}{'bytes down':>15}"
             f"{'up/FedAvg':>11}{'down/FedAvg':>12}"]
    for m, rs in rows.items():
        st = (f"{mean[m]['student']:>10.3f} +- {sd([r['student'] for r in rs]):.3f}"
              if mean[m]["student"] is not None else f"{'-':>17}")
        ratio = lambda k: (f"{mean[m][k] / ref[k]:.4f}" if ref and ref[k] else "-")  # noqa: E731
        lines.append(f"{m:<13}{mean[m]['ba']:>10.3f} +- {sd([r['ba'] for r in rs]):.3f}{st}"
                     f"{mean[m]['up']:>15,.0f}{mean[m]['down']:>15,.0f}{ratio('up'):>11}"
                     f"{ratio('down'):>12}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--local-steps", type=int, default=0, help="> 0 replaces --local-epochs")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--no-imagenet", action="store_true",
                    help="random initial teachers (no --weights / --teacher-weights imagenet)")
    ap.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data", "isic2019-mini"))
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-fedmic-isic"))
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP_NUM_THREADS of each run (0: torch's default)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="further run.py flags for every run (last on the line)")
    a = ap.parse_args()
    if not os.path.isdir(a.data_dir):
        sys.exit(f"skipped: {a.data_dir} is absent (see ../shared/data/README.md)")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads)) if a.threads else None
    t0 = time.perf_counter()
    runs = [(f, m, s, command(m, s, f, a)) for f in a.fractions for s in a.seeds for m in a.methods]
    for f, m, s, cmd in runs:                      # one at a time
        out = cmd[cmd.index("--out") + 1]
        if os.path.isfile(os.path.join(out, "summary.json")):
            continue
        print("$ " + " ".join(cmd[1:]), flush=True)
        rc = subprocess.run(cmd + (["--overwrite"] if os.path.isdir(out) else []), env=env).returncode
        if rc:
            sys.exit(f"{m} fraction {f} seed {s} failed (exit {rc})")
        print(f"  done: {m} fraction {f} seed {s} after {time.perf_counter() - t0:.0f} s", flush=True)
    for f in a.fractions:
        rows = {}
        for f2, m, s, cmd in runs:
            if f2 != f:
                continue
            out = cmd[cmd.index("--out") + 1]
            r = figures(json.load(open(os.path.join(out, "summary.json"))))
            rows.setdefault(m, []).append(r)
            print(f"{m:<13} fraction {f} seed {s}: client BA {r['ba']:.3f}"
                  + (f"  student BA {r['student']:.3f}" if r["student"] is not None else "")
                  + f"  bytes up {r['up']:,}  down {r['down']:,}", flush=True)
        print(table(rows, f, a), flush=True)


if __name__ == "__main__":
    main()
