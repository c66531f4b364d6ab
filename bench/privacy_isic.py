"""Privacy/utility and robustness tables on isic2019-mini (issue #17; not a test, prints
tables). Sheet ../shared/methods/privacy.md.

Privacy/utility (--part privacy): for each method (--algos, default fedavg and fedclip) and
seed, on isic2019-mini's five natural centres (K = 5, q = --fraction = 1 by default):

  non-private  `--dp-clip inf --dp-noise 0`: the layer's dry run, uniform FedAvg that logs
               every client's update norm (dp_norm in metrics.jsonl)
  z = Z        `--dp-clip S --dp-noise Z` for Z in --z (default 0.3 0.5 1 2); S is --clip,
               or (auto) the median update norm of the method's non-private seed-0 run,
               two significant digits (so about half the updates are clipped)
  + secagg     z = 1 with `--secagg` on seed 0: the cost of secure aggregation (bytes of
               masked payloads and shares, seconds of the simulation) beside the same run
               without it

fedavg trains an ImageNet MobileNetV2 (`python models.py fetch mobilenet_v2`) at 64 px,
Adam 5e-4, --local-steps 10 (the leaderboard's recipe), --rounds rounds. fedclip releases
only its attention adapter, clip_linear (`--probe fedavg`) only its linear probe, each with
its paper's recipe; their CLIP towers are a small RANDOM open_clip ViT at 64 px (embed dim
512, the config written to OUT/clip-vit-64px-512.json, --pretrained none): MECHANICS
ONLY, no CLIP weights exist on this machine. epsilon is at delta 1e-5
(summary.json privacy.epsilon, the project's accountant, Balle et al. conversion).

Robustness (--part robust): fedavg, one attacker (--attacker, default HAM_rosendahl) of
the five, each rule (mean with the norm rejection off, mean with it on (default K = 10),
median, trimmed_mean, krum) against no attack, sign_flip and scale (x10).

Figures: client balanced accuracy (mean over the five centres' test sets) at the last
round and the mean of the last 5 rounds; mean +- sd over seeds. Finished runs (summary.json
present) are reused; an interrupted one resumes. Each run goes through --slot (cpuslot).

    python bench/privacy_isic.py [--part privacy robust] [--algos fedavg fedclip clip_linear]
        [--seeds 0 1 2] [--rounds 10] [--out DIR]
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
TINY_CLIP = {"embed_dim": 512,
             "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "patch_size": 8,
                            "head_width": 64},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4,
                          "layers": 2}}
RULES = ("mean-noreject", "mean", "median", "trimmed_mean", "krum")
ATTACKS = ("none", "sign_flip", "scale")


def method_flags(algo: str, a) -> list:
    if algo == "fedavg":
        return ["--model", "mobilenet_v2", "--weights", "imagenet", "--image-size", "64",
                "--local-steps", "10", "--optimizer", "adam", "--lr", "0.0005"]
    if algo in ("fedclip", "clip_linear"):
        cfg = os.path.join(a.out, "clip-vit-64px-512.json")
        if not os.path.exists(cfg):
            os.makedirs(a.out, exist_ok=True)
            with open(cfg, "w") as f:
                json.dump(TINY_CLIP, f)
        return (["--clip-model", cfg, "--pretrained", "none", "--image-size", "64"]
                + (["--probe", "fedavg"] if algo == "clip_linear" else []))
    raise SystemExit(f"--algos {algo}: this bench knows fedavg, fedclip and clip_linear")


def run(name: str, algo: str, seed: int, extra: list, a) -> dict:
    out = os.path.join(a.out, name)
    summary = os.path.join(out, "summary.json")
    if not os.path.isfile(summary):
        cmd = ([sys.executable, os.path.join(ROOT, "run.py"), "--algo", algo,
                "--dataset", "isic2019", "--data-dir", a.data_dir, "--partition", "natural",
                "--rounds", str(a.rounds), "--fraction", str(a.fraction), "--seed", str(seed),
                "--quiet", "--out", out] + method_flags(algo, a) + extra
               + (["--resume"] if os.path.isdir(out) else []))
        print("$ " + shlex.join(["python"] + cmd[1:]), flush=True)
        t = time.perf_counter()
        rc = subprocess.run((shlex.split(a.slot) if a.slot else []) + cmd).returncode
        if rc:
            sys.exit(f"{name} failed (exit {rc}); run the bench again to resume it")
        print(f"  done {name} in {time.perf_counter() - t:.0f} s (load "
              f"{os.getloadavg()[0]:.1f})", flush=True)
    with open(summary) as f:
        return json.load(f)


def ba(s: dict) -> tuple:
    return s["balanced_accuracy"], s.get(f"balanced_accuracy_last{s.get('last_k', 5)}")


def cell(values: list) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    return f"{statistics.mean(v):.3f}" + (f" +- {statistics.stdev(v):.3f}" if len(v) > 1 else "")


def clip_norm(algo: str, a) -> float:
    if a.clip:
        return a.clip
    with open(os.path.join(a.out, f"{algo}-nonpriv-s{a.seeds[0]}", "metrics.jsonl")) as f:
        norms = [m["dp_norm"] for m in map(json.loads, f) if "dp_norm" in m]
    return float(f"{statistics.median(norms):.2g}")


def privacy(algo: str, a) -> None:
    rows = []
    base = {s: run(f"{algo}-nonpriv-s{s}", algo, s, ["--dp-clip", "inf", "--dp-noise", "0"], a)
            for s in a.seeds}
    S = clip_norm(algo, a)
    rows.append(("non-private", "-", "inf", list(base.values())))
    for z in a.z:
        runs = [run(f"{algo}-S{S:g}-z{z:g}-s{s}", algo, s,
                    ["--dp-clip", f"{S:g}", "--dp-noise", f"{z:g}"], a) for s in a.seeds]
        rows.append((f"z = {z:g}", f"{S:g}", f"{runs[0]['privacy']['epsilon']:.3g}", runs))
    s0 = a.seeds[0]
    plain = run(f"{algo}-S{S:g}-z1-s{s0}", algo, s0, ["--dp-clip", f"{S:g}", "--dp-noise", "1"], a)
    sec = run(f"{algo}-S{S:g}-z1-secagg-s{s0}", algo, s0,
              ["--dp-clip", f"{S:g}", "--dp-noise", "1", "--secagg"], a)
    print(f"\n{algo} on isic2019-mini, 5 natural centres, q = {a.fraction:g}, {a.rounds} rounds, "
          f"delta 1e-5, seeds {a.seeds}; S = {S:g}"
          + ("" if a.clip else f" (median non-private update norm, seed {s0})"))
    print(f"| run | S | epsilon | client BA | client BA last-5 | MB up | seconds |\n"
          f"|---|---:|---:|---:|---:|---:|---:|")
    for label, s, eps, runs in rows:
        print(f"| {label} | {s} | {eps} | {cell([ba(r)[0] for r in runs])} | "
              f"{cell([ba(r)[1] for r in runs])} | {statistics.mean(r['bytes_up'] for r in runs) / 1e6:.2f}"
              f" | {statistics.mean(r['seconds'] for r in runs):.0f} |")
    g = sec["secagg"]
    total = sec["bytes_up"] + g["bytes_up"]
    print(f"\nsecure aggregation (seed {s0}, z = 1): client BA {ba(sec)[0]:.3f} vs {ba(plain)[0]:.3f}"
          f" without; MB up {total / 1e6:.3f} = masked inputs {sec['bytes_up'] / 1e6:.3f} + "
          f"protocol messages {g['bytes_up'] / 1e6:.3f}, vs {plain['bytes_up'] / 1e6:.3f} without "
          f"({total / plain['bytes_up']:.2f}x; protocol down {g['bytes_down'] / 1e6:.3f} MB); "
          f"seconds {sec['seconds']:.0f} vs {plain['seconds']:.0f}, of which the secagg "
          f"simulation {g['seconds_this_process']:.1f}")


def robust(a) -> None:
    table = {}
    for atk in a.attacks:
        for rule in RULES:
            extra = ["--reject-factor", "0"] if rule == "mean-noreject" else ["--aggregator", rule]
            if atk != "none":
                extra += ["--attack", atk, "--attackers", a.attacker]
            table[rule, atk] = [run(f"robust-{rule}-{atk}-s{s}", "fedavg", s, extra, a)
                                for s in a.robust_seeds]
    print(f"\nfedavg on isic2019-mini, {a.rounds} rounds, attacker {a.attacker} (1 of 5), scale "
          f"x10, seeds {a.robust_seeds}: client BA last round (last-5 mean); rejected uploads")
    print("| rule | " + " | ".join(a.attacks) + " |\n|---|" + "---:|" * len(a.attacks))
    for rule in RULES:
        cells = []
        for atk in a.attacks:
            rs = table[rule, atk]
            cells.append(f"{cell([ba(r)[0] for r in rs])} ({cell([ba(r)[1] for r in rs])}); "
                         f"{sum(r.get('rejected_uploads', 0) for r in rs)}")
        print(f"| {rule} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", nargs="+", default=["privacy", "robust"], choices=["privacy", "robust"])
    ap.add_argument("--algos", nargs="+", default=["fedavg", "fedclip", "clip_linear"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--robust-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--z", type=float, nargs="+", default=[0.3, 0.5, 1, 2])
    ap.add_argument("--clip", type=float, default=None, help="S (default: auto, see above)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--fraction", type=float, default=1.0)
    ap.add_argument("--attacker", default="HAM_rosendahl")
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    ap.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data", "isic2019-mini"))
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-privacy-isic"))
    ap.add_argument("--slot", default="cpuslot", help="wrapper of every run ('' for none)")
    a = ap.parse_args()
    if not os.path.isdir(a.data_dir):
        sys.exit(f"skipped: {a.data_dir} is absent (see ../shared/data/README.md)")
    a.out = os.path.abspath(a.out)
    if "privacy" in a.part:
        for algo in a.algos:
            privacy(algo, a)
    if "robust" in a.part:
        robust(a)


if __name__ == "__main__":
    main()
