"""FedAL label-efficiency curves on isic2019-mini (not a test; prints figures): FedAL
(ensemble-entropy) and random acquisition from 10% to 50% of the labels, next to
full-data FedAvg with the same number of rounds, over several seeds. Natural centres;
by default the small CNN, 32 px, --local-steps 20, batch 32 (a CPU-sized setting, not the
paper's); --extra passes further run.py flags to every run, e.g. the pretrained setting
of README's baselines table:

    python bench/fedal_isic.py [--seeds 0 1 2] [--out-root DIR] [--rounds-per-cycle 4]
        [--image-size 64 --local-steps 10] [--no-full]
        [--extra --model mobilenet_v2 --weights imagenet --optimizer adam --lr 0.0005]

Each run goes through run.py into OUT_ROOT/<method>-s<seed> (a finished run is reused),
so the numbers can be checked against the files; every AL run comes before the
full-data FedAvg runs. Besides the curve at the end of each FL phase (one round, which
swings by 0.1 BA on this data), it prints each phase's mean over its last two rounds and
the class histogram of what each method acquired (where the claim does not reproduce,
it shows what the acquisition did differently).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "isic2019-mini")


def run(out, flags, wrap):
    if not os.path.isfile(os.path.join(out, "summary.json")):
        subprocess.run([*wrap, sys.executable, os.path.join(ROOT, "run.py"), *flags, "--out",
                        out, "--overwrite", "--quiet"], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
    return json.load(open(os.path.join(out, "summary.json")))


def phase_means(out, R_c, k=2):
    """Mean client BA over the last k rounds of each FL phase (rounds c R_c + 1 .. (c+1) R_c)."""
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    view = lines[0].get("view")
    by_round: dict = {}
    for m in lines:
        if m["client"] != "pooled" and not m.get("holdout") and m.get("view") == view:
            by_round.setdefault(m["round"], []).append(m["balanced_accuracy"])
    last = max(by_round)
    k = min(k, R_c)                                       # within the phase
    return [statistics.mean(statistics.mean(by_round[r]) for r in range(e - k + 1, e + 1))
            for e in range(R_c, last + 1, R_c)]


def fmt(xs):
    return f"{statistics.mean(xs):.3f} +- {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out-root", default=os.path.join(ROOT, "runs", "fedal_isic"))
    ap.add_argument("--rounds-per-cycle", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-full", action="store_true",
                    help="skip the full-data FedAvg runs (e.g. cite README's baselines table)")
    ap.add_argument("--slot", default="cpuslot",
                    help="command that wraps each run (a CPU-slot wrapper; '' for none)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="further run.py flags for every run (last on the line)")
    a = ap.parse_args()
    if not os.path.isdir(DATA):
        sys.exit(f"{DATA} is absent; this benchmark needs isic2019-mini")
    wrap = a.slot.split() if a.slot and shutil.which(a.slot.split()[0]) else []
    common = ["--dataset", "isic2019", "--data-dir", DATA, "--partition", "natural",
              "--image-size", str(a.image_size), "--local-steps", str(a.local_steps),
              "--batch-size", str(a.batch_size)] + a.extra
    al = ["--algo", "fedal", "--al-initial", "0.1", "--al-budget", "0.5", "--al-cycles", "4",
          "--al-rounds-per-cycle", str(a.rounds_per_cycle)]
    curves, smooth, full, hist = {}, {}, [], {}
    names = ("ensemble-entropy", "random")
    for seed in a.seeds:
        for acq in names:
            out = os.path.join(a.out_root, f"{acq}-s{seed}")
            s = run(out, al + ["--acquisition", acq, "--seed", str(seed)] + common, wrap)
            curves.setdefault(acq, []).append(s["al_curve"])
            smooth.setdefault(acq, []).append(phase_means(out, a.rounds_per_cycle))
            h = [p["acquired_classes"] for p in s["al_curve"] if p["acquired_classes"]]
            hist.setdefault(acq, []).append([sum(v) for v in zip(*h)])
    if not a.no_full:
        for seed in a.seeds:
            full.append(run(os.path.join(a.out_root, f"fedavg-s{seed}"),
                            ["--algo", "fedavg", "--rounds", str(5 * a.rounds_per_cycle),
                             "--seed", str(seed)] + common, wrap))
    print(f"isic2019-mini natural centres, {a.image_size} px, {a.local_steps} local steps x "
          f"{a.batch_size}, R_c {a.rounds_per_cycle}, extra: {' '.join(a.extra) or '-'}")
    print(f"mean client balanced accuracy at the end of each FL phase (mean over the phase's "
          f"last two rounds in brackets), seeds {a.seeds}")
    print(f"{'labelled':>9}  {'FedAL (ensemble-entropy)':>40}  {'random':>40}")
    for i, p in enumerate(curves["random"][0]):
        cols = []
        for n in names:
            end = [c[i]["balanced_accuracy"] for c in curves[n]]
            two = [c[i] for c in smooth[n]]
            cols.append(f"{fmt(end)} ({fmt(two)})")
        print(f"{p['label_fraction']:>9.2f}  {cols[0]:>40}  {cols[1]:>40}")
    print("acquired images per class over all seeds and acquisitions:")
    for n in names:
        print(f"  {n:>17}: {[sum(v) for v in zip(*hist[n])]}")
    for n in names:
        gap = [c[-1] - c[0] for c in smooth[n]]
        print(f"{n}: last-two-round BA, 50% minus 10%: {fmt(gap)}")
    d = [e[-1] - r[-1] for e, r in zip(smooth[names[0]], smooth[names[1]])]
    print(f"FedAL minus random at 50% (last two rounds), per seed: "
          f"{', '.join(f'{x:+.3f}' for x in d)}; mean {fmt(d)}")
    if not full:
        return
    print(f"{1.0:>9.2f}  full-data FedAvg, same rounds: {fmt([s['balanced_accuracy'] for s in full])}")
    for name in names:
        gap = [c[-1]["balanced_accuracy"] - s["balanced_accuracy"] for c, s in zip(curves[name], full)]
        print(f"{name}: BA at 50% minus full-data FedAvg: {fmt(gap)}")
    print("pooled balanced accuracy at 50%: "
          + ", ".join(f"{n} {fmt([c[-1]['pooled_balanced_accuracy'] for c in curves[n]])}"
                      for n in curves)
          + f", full-data FedAvg {fmt([s['pooled_balanced_accuracy'] for s in full])}")


if __name__ == "__main__":
    main()
