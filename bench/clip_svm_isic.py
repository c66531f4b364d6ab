"""clip_svm on isic2019-mini with one natural centre held out as the unseen site (not a
test; prints tables). Issue #14, sheet ../shared/methods/clip_svm.md sections 3C and 8.

For every tower, held-out centre and seed, one `python run.py --algo clip_svm ... --svm
--svm-pooled` run: the CLIP-style model (image tower + frozen text tower, batch-contrastive
loss, FedAvg) trains on the other centres; after the last round the per-client SVMs and
KNNs (summed probabilities) and the pooled ones (a NON-PRIVATE upper bound) are fitted on
the final tower's source features and evaluated beside the deep head on every image of the
held-out centre (summary.json: feature_classifiers). Towers:

  mobilenet_v2   ImageNet weights (--weights imagenet; `python models.py fetch mobilenet_v2`)
  PAPER_TOWER    one of the paper's towers (--paper-tower, default convnext_t) at random
                 initialisation, a shorter budget (--paper-rounds, --paper-steps):
                 MECHANICS ONLY, not a measurement of the paper's towers

THE TEXT TOWER IS RANDOM (--pretrained none): no pretrained CLIP weights exist on this
machine and no hub can be reached, so the frozen text tower only supplies fixed class
anchors. This is forced by the machine, not the paper's setting (ViT-L/14 OpenAI weights).

Columns: AVG (mean of ACC, BACC, weighted PRE/REC/F1, the paper's), BACC and macro F1 of
the deep head, the federated SVM and KNN and the pooled SVM, on the unseen centre; last
round; per seed, then mean +- sd over seeds, and SVM - deep per seed. Finished runs
(summary.json present) are reused; each run goes through --slot (default cpuslot).

    python bench/clip_svm_isic.py [--seeds 0 1 2] [--holdout MSK ...] [--towers mobilenet_v2
        convnext_t] [--rounds 20] [--local-steps 10] [--image-size 64] [--out DIR]
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("deep", "svm", "knn", "svm_pooled", "knn_pooled")


def command(tower, centre, seed, a) -> list:
    paper = tower != "mobilenet_v2"
    rounds, steps = (a.paper_rounds, a.paper_steps) if paper else (a.rounds, a.local_steps)
    return ([sys.executable, os.path.join(ROOT, "run.py"), "--algo", "clip_svm",
             "--image-tower", tower] + ([] if paper else ["--weights", "imagenet"])
            + ["--clip-model", a.clip_model, "--pretrained", "none",
               "--dataset", "isic2019", "--data-dir", a.data_dir, "--partition", "natural",
               "--image-size", str(a.image_size), "--rounds", str(rounds),
               "--local-steps", str(steps), "--holdout-client", centre, "--svm", "--svm-pooled",
               "--seed", str(seed), "--quiet",
               "--out", os.path.join(a.out, f"{tower}-{centre}-s{seed}")] + a.extra)


def figures(summary: dict, centre: str) -> dict:
    fc = summary["feature_classifiers"][centre]
    return {k: fc[k] for k in KINDS if k in fc}


def sd(v):
    return statistics.stdev(v) if len(v) > 1 else 0.0


def table(tower, centre, per_seed: dict, a) -> str:
    paper = tower != "mobilenet_v2"
    budget = (f"{a.paper_rounds} rounds x {a.paper_steps} steps, random init: MECHANICS ONLY"
              if paper else f"{a.rounds} rounds x {a.local_steps} steps, ImageNet weights")
    lines = [f"\n{tower} on isic2019-mini, unseen centre {centre}, {a.image_size} px, {budget}, "
             f"text tower {a.clip_model} RANDOM (--pretrained none), seeds "
             f"{sorted(per_seed)}: last round",
             f"{'classifier':<12}{'AVG':>16}{'BACC':>16}{'macro F1':>16}{'AUROC':>16}"]
    for k in KINDS:
        rs = [r[k] for r in per_seed.values() if k in r]
        if not rs:
            continue
        cell = lambda m: (f"{statistics.mean(r[m] for r in rs):>8.3f} +- "  # noqa: E731
                          f"{sd([r[m] for r in rs]):.3f}")
        lines.append(f"{k:<12}{cell('avg'):>16}{cell('balanced_accuracy'):>16}"
                     f"{cell('macro_f1'):>16}{cell('macro_auroc'):>16}")
    for k in ("svm", "knn"):
        d = [r[k]["avg"] - r["deep"]["avg"] for r in per_seed.values()]
        db = [r[k]["balanced_accuracy"] - r["deep"]["balanced_accuracy"] for r in per_seed.values()]
        lines.append(f"{k} - deep per seed: AVG " + " ".join(f"{v:+.3f}" for v in d)
                     + f" (mean {statistics.mean(d):+.3f}); BACC "
                     + " ".join(f"{v:+.3f}" for v in db) + f" (mean {statistics.mean(db):+.3f})")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--holdout", nargs="+", default=["MSK"], help="centre(s) held out, one "
                    "run each")
    ap.add_argument("--towers", nargs="+", default=["mobilenet_v2"])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--paper-rounds", type=int, default=3)
    ap.add_argument("--paper-steps", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--clip-model", default="ViT-L-14")
    ap.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data", "isic2019-mini"))
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-clip-svm-isic"))
    ap.add_argument("--slot", default="cpuslot", help="wrapper of every run ('' for none)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="further run.py flags for every run (last on the line)")
    a = ap.parse_args()
    if not os.path.isdir(a.data_dir):
        sys.exit(f"skipped: {a.data_dir} is absent (see ../shared/data/README.md)")
    t0 = time.perf_counter()
    runs = [(t, c, s, command(t, c, s, a)) for t in a.towers for c in a.holdout for s in a.seeds]
    for t, c, s, cmd in runs:                      # one at a time
        out = cmd[cmd.index("--out") + 1]
        if os.path.isfile(os.path.join(out, "summary.json")):
            continue
        print("$ " + shlex.join(["python"] + cmd[1:]), flush=True)
        wrap = shlex.split(a.slot) if a.slot else []
        rc = subprocess.run(wrap + cmd + (["--overwrite"] if os.path.isdir(out) else [])).returncode
        if rc:
            sys.exit(f"{t} holdout {c} seed {s} failed (exit {rc})")
        print(f"  done: {t} holdout {c} seed {s} after {time.perf_counter() - t0:.0f} s", flush=True)
    for t in a.towers:
        for c in a.holdout:
            per_seed = {}
            for t2, c2, s, cmd in runs:
                if (t2, c2) != (t, c):
                    continue
                out = cmd[cmd.index("--out") + 1]
                with open(os.path.join(out, "summary.json")) as f:
                    per_seed[s] = figures(json.load(f), c)
                r = per_seed[s]
                print(f"{t} {c} seed {s}: AVG deep {r['deep']['avg']:.3f} svm {r['svm']['avg']:.3f} "
                      f"knn {r['knn']['avg']:.3f}; BACC deep {r['deep']['balanced_accuracy']:.3f} "
                      f"svm {r['svm']['balanced_accuracy']:.3f} knn "
                      f"{r['knn']['balanced_accuracy']:.3f}", flush=True)
            print(table(t, c, per_seed, a), flush=True)


if __name__ == "__main__":
    main()
