"""What is done with finished runs: the mean +- sd table over seeds (`run.py --seeds`),
evaluating a finished run on new data (`run.py --evaluate`), and the comparison table and
pictures of result folders (`bench/report.py`, `bench/leaderboard.py`).

Figures are read from each run's summary.json (the last round, and the mean over the
last k rounds) and metrics.jsonl (the curves); nothing is recomputed from weights except
by `evaluate`. A mean +- sd is over seeds, sd with ddof = 1 (the sample standard
deviation; a single seed shows its value alone). matplotlib is optional: only `plot_*`
imports it.
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import torch

import fedmed
from fedmed import UsageError

SEEDS_FILE = "seeds.json"            # in the folder of `run.py --seeds`: what ran, the table
PLOTS_HINT = "pip install matplotlib (or -r requirements-plots.txt) to get the plots"

# (key in figures(), column title, kind) of the comparison table, in order
COLUMNS = [("balanced_accuracy", "client BA", "ba"),
           ("pooled_balanced_accuracy", "pooled BA", "ba"),
           ("balanced_accuracy_lastk", "client BA last-{k}", "ba"),
           ("pooled_balanced_accuracy_lastk", "pooled BA last-{k}", "ba"),
           ("macro_auroc", "macro AUROC", "ba"),
           ("bytes_up", "MB up", "mb"),
           ("seconds", "seconds", "s")]


# ---------------------------------------------------------------- reading runs

def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise UsageError(f"{what}: cannot read {path} ({e.strerror or e})") from None
    except ValueError:
        raise UsageError(f"{what}: {path} is not valid JSON (damaged?); run again with "
                         "another --out") from None


def figures(summary: dict) -> dict:
    """The flat figures of one run's summary.json: the headline ones (keys of COLUMNS;
    the last-k means under ..._lastk), accuracy, macro F1, bytes down, and `client:NAME`
    = each client's balanced accuracy."""
    j = summary.get("last_k")
    out = {k: summary.get(k) for k in ("balanced_accuracy", "pooled_balanced_accuracy")}
    if j:
        out["balanced_accuracy_lastk"] = summary.get(f"balanced_accuracy_last{j}")
        out["pooled_balanced_accuracy_lastk"] = summary.get(f"pooled_balanced_accuracy_last{j}")
    out.update({k: summary.get(k) for k in ("macro_auroc", "accuracy", "macro_f1", "bytes_up",
                                            "bytes_down", "seconds")})
    for name, m in summary.get("clients", {}).items():
        out[f"client:{name}"] = m.get("balanced_accuracy")
    return out


def mean_sd(values: list) -> tuple[float, float]:
    """(mean, sample sd with ddof = 1) of the defined values; sd is NaN for fewer than 2."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")


def aggregate(summaries: list) -> dict:
    """{figure: {"mean", "sd", "values"}} over the runs' summaries (one per seed)."""
    figs = [figures(s) for s in summaries]
    keys = list(dict.fromkeys(k for f in figs for k in f))
    out = {}
    for k in keys:
        values = [f.get(k) for f in figs]
        m, sd = mean_sd(values)
        out[k] = {"mean": m, "sd": sd, "values": values}
    return out


def fmt(mean: float, sd: float, kind: str = "ba") -> str:
    """'0.781 +- 0.012' (kind ba), MB with 2 decimals (mb), seconds with 1 (s); '-' for
    an undefined mean, the mean alone without an sd."""
    if mean is None or math.isnan(mean):
        return "-"
    scale, digits = {"ba": (1, 3), "mb": (1e-6, 2), "s": (1, 1)}[kind]
    text = f"{mean * scale:.{digits}f}"
    if sd is not None and not math.isnan(sd):
        text += f" +- {sd * scale:.{digits}f}"
    return text


# ---------------------------------------------------------------- run.py --seeds

def seeds_table(seeds: list, summaries: list) -> tuple[str, dict]:
    """(markdown, json record) of the mean +- sd over seeds of one configuration's
    summary figures, one row per figure with every seed's value."""
    agg = aggregate(summaries)
    k = next((s.get("last_k") for s in summaries if s.get("last_k")), None)
    kinds = sorted({s.get("pooled_kind") for s in summaries if s.get("pooled_kind")})
    names = {"balanced_accuracy": "client BA (mean over clients)",
             "pooled_balanced_accuracy": "pooled BA",
             "balanced_accuracy_lastk": f"client BA, mean of the last {k} rounds",
             "pooled_balanced_accuracy_lastk": f"pooled BA, mean of the last {k} rounds",
             "macro_auroc": "macro AUROC (mean over clients)", "accuracy": "accuracy",
             "macro_f1": "macro F1", "bytes_up": "MB up", "bytes_down": "MB down",
             "seconds": "seconds"}
    head = "| figure | mean +- sd | " + " | ".join(f"seed {s}" for s in seeds) + " |"
    rows = [head, "|" + "---|" * (2 + len(seeds))]
    for key, v in agg.items():
        kind = "mb" if key.startswith("bytes") else "s" if key == "seconds" else "ba"
        title = names.get(key) or f"BA of client {key.split(':', 1)[1]}"
        cells = [fmt(x, None, kind) if x is not None else "-" for x in v["values"]]
        rows.append(f"| {title} | {fmt(v['mean'], v['sd'], kind)} | " + " | ".join(cells) + " |")
    lines = [f"Mean +- sd (ddof 1) over seeds {' '.join(map(str, seeds))}.", ""] + rows
    if kinds:
        lines += ["", "pooled = " + "; ".join(kinds)]
    record = {"seeds": list(seeds), "figures": agg, "last_k": k, "pooled_kind": kinds[0] if
              len(kinds) == 1 else kinds}
    return "\n".join(lines) + "\n", record


LOCO_FILE = "loco.json"              # in the folder of `run.py --leave-one-out`


def loco_table(folds: list, seeds: list, summaries: dict) -> tuple[str, dict]:
    """(markdown, json record) of a leave-one-centre-out run: `summaries[fold][seed]` is
    the summary.json of the run that held `fold` out. Per fold: the unseen centre's
    balanced accuracy, macro AUROC and macro F1 (last round), and the training clients'
    own test sets (mean BA over them, pooled BA), each as mean +- sd over the seeds; then
    the mean over folds (for each seed the mean over its folds, then mean +- sd over
    seeds)."""
    keys = [("unseen_ba", "unseen BA"), ("unseen_auroc", "unseen AUROC"),
            ("unseen_f1", "unseen macro F1"), ("train_ba", "training clients' BA (mean)"),
            ("train_pooled_ba", "training clients' pooled BA")]

    def row(s, fold):
        h = s["holdout"][fold]
        return {"unseen_ba": h["balanced_accuracy"], "unseen_auroc": h["macro_auroc"],
                "unseen_f1": h["macro_f1"], "train_ba": s["balanced_accuracy"],
                "train_pooled_ba": s["pooled_balanced_accuracy"]}
    per = {f: {sd: row(summaries[f][sd], f) for sd in seeds} for f in folds}
    record = {"folds": list(folds), "seeds": list(seeds), "per_fold": {}, "mean": {}}
    head = "| unseen centre | " + " | ".join(t for _, t in keys) + " |"
    lines = [f"Leave-one-centre-out, last round; mean +- sd (ddof 1) over seeds "
             f"{' '.join(map(str, seeds))}.", "", head, "|" + "---|" * (1 + len(keys))]
    for f in folds:
        stats = {k: mean_sd([per[f][sd][k] for sd in seeds]) for k, _ in keys}
        record["per_fold"][f] = {k: {"mean": m, "sd": d, "values": [per[f][sd][k] for sd in seeds]}
                                 for k, (m, d) in stats.items()}
        lines.append(f"| {f} | " + " | ".join(fmt(*stats[k]) for k, _ in keys) + " |")
    means = {}
    for k, _ in keys:
        by_seed = [float(np.nanmean([per[f][sd][k] for f in folds])) for sd in seeds]
        m, d = mean_sd(by_seed)
        means[k] = (m, d)
        record["mean"][k] = {"mean": m, "sd": d, "values": by_seed}
    lines.append("| **mean over folds** | " + " | ".join(fmt(*means[k]) for k, _ in keys) + " |")
    return "\n".join(lines) + "\n", record


def seeds_folder(out: str) -> dict | None:
    """The seeds.json of a `--seeds` folder, None when `out` is not one."""
    path = os.path.join(out, SEEDS_FILE)
    return read_json(path, f"--out {out}") if os.path.isfile(path) else None


# ---------------------------------------------------------------- comparison table

def find_runs(paths: list) -> tuple[list, list]:
    """(finished run folders, notes) under `paths`: a folder with config.json and
    summary.json is a run (not searched further: a protocol's phases stay inside it); one
    with config.json and no summary.json did not finish (noted); any other folder is
    searched."""
    runs, notes = [], []

    def walk(d):
        if os.path.isfile(os.path.join(d, "config.json")):
            if os.path.isfile(os.path.join(d, "summary.json")):
                runs.append(d)
            else:
                notes.append(f"{d}: not finished (no summary.json), left out")
            return
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            if os.path.isdir(p) and not name.startswith("."):
                walk(p)

    for p in paths:
        if not os.path.isdir(p):
            raise UsageError(f"{p}: no such folder; give result folders (of run.py --out)")
        walk(p)
    return runs, notes


def group_key(config: dict) -> str:
    """What must be equal for two runs to be seeds of one configuration: every setting
    (config, algorithm_args, data) but the seed. A setting recorded as null (unset) counts
    as absent, so a run made before a new flag existed groups with one made after."""
    def given(sec):
        return {k: v for k, v in config.get(sec, {}).items() if k != "seed" and v is not None}
    return json.dumps({sec: given(sec) for sec in ("config", "algorithm_args", "data")},
                      sort_keys=True, default=str)


def _settings(config: dict) -> dict:
    flat = {}
    for sec in ("config", "data", "algorithm_args"):
        for k, v in config.get(sec, {}).items():
            if k != "seed" and v is not None:
                flat[(sec, k)] = v
    return flat


def labels(configs: list) -> list:
    """A short name per configuration: the algorithm, then the settings that tell it
    apart from the others (a shared setting or data flag that differs anywhere; an
    algorithm's own option only where two configurations of that algorithm differ)."""
    flats = [_settings(c) for c in configs]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    shown = []
    for key in keys:
        if key == ("config", "algo"):
            continue
        if key[0] != "algorithm_args":
            if len({json.dumps(f.get(key), default=str) for f in flats}) > 1:
                shown.append(key)
            continue
        by_algo: dict = {}
        for f in flats:
            by_algo.setdefault(f.get(("config", "algo")), set()).add(
                json.dumps(f.get(key), default=str))
        if any(len(v) > 1 for v in by_algo.values()):
            shown.append(key)
    out = []
    for f in flats:
        parts = [str(f.get(("config", "algo"), "?"))]
        for s, k in shown:
            v = f.get((s, k))
            if v is None or v is False:                 # unset: nothing on the command line
                continue
            parts.append(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}"))
        out.append(" ".join(parts))
    return out


def collect(paths: list, names: dict | None = None) -> tuple[list, list]:
    """(groups, notes): the finished runs under `paths` grouped by every setting but the
    seed, in the order found; each group {label, runs, seeds, config, summaries,
    pooled_kind, figures}. `names` maps a folder (a group's common parent, e.g. a
    leaderboard row) to the label to use."""
    runs, notes = find_runs(paths)
    groups: dict = {}
    for d in runs:
        config = read_json(os.path.join(d, "config.json"), d)
        summary = read_json(os.path.join(d, "summary.json"), d)
        g = groups.setdefault(group_key(config), {"runs": [], "seeds": [], "summaries": [],
                                                  "config": config})
        seed = config.get("config", {}).get("seed")
        if seed in g["seeds"]:
            notes.append(f"{d}: seed {seed} of this configuration already read from "
                         f"{g['runs'][g['seeds'].index(seed)]}; left out (each seed counts once)")
            continue
        g["runs"].append(d)
        g["seeds"].append(seed)
        g["summaries"].append(summary)
    out = list(groups.values())
    for g, label in zip(out, labels([g["config"] for g in out])):
        g["label"] = _named(g["runs"], names) or label
        kinds = sorted({s.get("pooled_kind") for s in g["summaries"] if s.get("pooled_kind")})
        g["pooled_kind"] = "; ".join(kinds) or "?"
        g["figures"] = aggregate(g["summaries"])
        g["last_k"] = next((s.get("last_k") for s in g["summaries"] if s.get("last_k")), None)
    return out, notes


def _named(runs: list, names: dict | None) -> str | None:
    """The label `names` gives to a folder holding every one of `runs`."""
    for folder, label in (names or {}).items():
        f = os.path.abspath(folder)
        if all(os.path.abspath(r) == f or os.path.abspath(r).startswith(f + os.sep) for r in runs):
            return label
    return None


def comparison_table(groups: list) -> str:
    """Markdown: one row per configuration (mean +- sd over its seeds) of the headline
    figures, a per-client balanced-accuracy table, and what each pooled figure is."""
    ks = sorted({g["last_k"] for g in groups if g["last_k"]})
    k = ks[0] if len(ks) == 1 else "k"
    head = ["run", "seeds"] + [title.format(k=k) for _, title, _ in COLUMNS]
    rows = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    for g in groups:
        cells = [g["label"], str(len(g["runs"]))]
        for key, _, kind in COLUMNS:
            v = g["figures"].get(key)
            cells.append(fmt(v["mean"], v["sd"], kind) if v else "-")
        rows.append("| " + " | ".join(cells) + " |")
    clients = list(dict.fromkeys(key for g in groups for key in g["figures"]
                                 if key.startswith("client:")))
    lines = rows
    if clients:
        lines += ["", "Balanced accuracy of each client (mean +- sd over seeds):", "",
                  "| run | " + " | ".join(c.split(":", 1)[1] for c in clients) + " |",
                  "|---|" + "---:|" * len(clients)]
        for g in groups:
            cells = [fmt(g["figures"][c]["mean"], g["figures"][c]["sd"]) if c in g["figures"]
                     else "-" for c in clients]
            lines.append(f"| {g['label']} | " + " | ".join(cells) + " |")
    lines += ["", "What each pooled BA is:", ""]
    lines += [f"* {g['label']}: {g['pooled_kind']}" for g in groups]
    lines += ["", "client BA = mean over clients of each client's balanced accuracy on its "
              "own test set; last-k = mean over the last k rounds; MB up = bytes sent by the "
              "clients over the whole run / 1e6; mean +- sd over seeds (ddof 1)."]
    return "\n".join(lines) + "\n"


def report_record(groups: list, notes: list) -> dict:
    return {"groups": [{"label": g["label"], "runs": g["runs"], "seeds": g["seeds"],
                        "pooled_kind": g["pooled_kind"], "last_k": g["last_k"],
                        "figures": g["figures"], "config": {
                            s: g["config"].get(s, {}) for s in ("config", "algorithm_args", "data")}}
                       for g in groups], "notes": notes}


# ---------------------------------------------------------------- curves and plots

def curves(run: str) -> dict | None:
    """Per-round figures of the primary view of one run's metrics.jsonl: {"round": [...],
    "pooled": [...], "mean": [...] (mean client BA), "clients": {name: [...]},
    "bytes": [...] (cumulative bytes up + down)}; None without metrics.jsonl."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    lines = fedmed._read_lines(path)
    if not lines:
        return None
    view = lines[0]["view"]
    lines = [m for m in lines if m["view"] == view]
    rounds = sorted({m["round"] for m in lines})
    out: dict = {"round": rounds, "pooled": [], "mean": [], "clients": {}, "bytes": []}
    total = 0
    for r in rounds:
        at = [m for m in lines if m["round"] == r]
        pooled = [m for m in at if m["client"] == "pooled"][0]
        per = [m for m in at if m["client"] != "pooled" and not m["holdout"]]
        total += (pooled.get("bytes_up") or 0) + (pooled.get("bytes_down") or 0)
        out["pooled"].append(pooled["balanced_accuracy"])
        out["mean"].append(float(np.nanmean([m["balanced_accuracy"] for m in per])))
        out["bytes"].append(total)
        for m in per:
            out["clients"].setdefault(m["client"], []).append(m["balanced_accuracy"])
    return out


def _stack(series: list) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd over seeds of equally long series (cut to the shortest)."""
    n = min(len(s) for s in series)
    a = np.array([s[:n] for s in series], dtype=np.float64)
    return a.mean(0), (a.std(0, ddof=1) if len(a) > 1 else np.zeros(n))


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[:80] or "run"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_all(groups: list, out: str) -> list:
    """curves-LABEL.png per configuration (each client and pooled BA per round, mean
    over seeds, +- sd shaded) and ba-vs-bytes.png (mean client BA and pooled BA against
    the cumulative bytes sent, up + down; a method that sends nothing is a dashed line at
    its last-round BA). Returns the files written. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    written = []
    series = []
    for g in groups:
        cs = [c for c in (curves(r) for r in g["runs"]) if c]
        if not cs:
            continue
        series.append((g, cs))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        n = min(len(c["round"]) for c in cs)
        x = np.array(cs[0]["round"][:n])
        for name in cs[0]["clients"]:
            if all(name in c["clients"] for c in cs):
                m, _ = _stack([c["clients"][name] for c in cs])
                ax.plot(x, m, lw=1, alpha=0.8, label=name)
        for key, style, text in (("mean", "--", "mean over clients"), ("pooled", "-", "pooled")):
            m, sd = _stack([c[key] for c in cs])
            ax.plot(x, m, style, lw=2.5, color="black", label=text)
            if len(cs) > 1 and key == "pooled":
                ax.fill_between(x, m - sd, m + sd, color="black", alpha=0.12,
                                label="pooled +- sd over seeds")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set(xlabel="round", ylabel="balanced accuracy",
               title=f"{g['label']} ({len(cs)} seed{'s' if len(cs) > 1 else ''})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = os.path.join(out, f"curves-{slug(g['label'])}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if series:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for ax, key, title in zip(axes, ("mean", "pooled"), ("mean client BA", "pooled BA")):
            logx = False
            for i, (g, cs) in enumerate(series):
                color = f"C{i % 10}"
                m, sd = _stack([c[key] for c in cs])
                b, _ = _stack([c["bytes"] for c in cs])
                if b[-1] <= 0:
                    ax.axhline(m[-1], ls="--", color=color, label=f"{g['label']} (0 bytes)")
                    continue
                logx = True
                ax.plot(b, m, "-o", ms=2.5, color=color, label=g["label"])
                if len(cs) > 1:
                    ax.fill_between(b, m - sd, m + sd, color=color, alpha=0.12)
            if logx:
                ax.set_xscale("log")
            ax.set(xlabel="cumulative bytes sent (up + down)", title=title)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("balanced accuracy")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, "ba-vs-bytes.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(paths: list, out: str, names: dict | None = None, title: str = "",
                 plots: bool = True, log=print, name: str = "report", preface: str = "",
                 appendix: str = "", extra: dict | None = None) -> dict:
    """The comparison of the runs under `paths` into folder `out`: NAME.md (`title`,
    `preface`, the table, the notes, `appendix`, the plots), NAME.json (the figures of
    every configuration with every seed's value, and `extra`), and the plots when
    matplotlib is present (else one line saying how to get them)."""
    groups, notes = collect(paths, names)
    if not groups:
        raise UsageError(f"no finished run under {', '.join(paths)} (a run folder holds "
                         "config.json and summary.json)")
    os.makedirs(out, exist_ok=True)
    md = (f"# {title}\n\n" if title else "") + preface + comparison_table(groups)
    if notes:
        md += "\nNotes:\n\n" + "".join(f"* {n}\n" for n in notes)
    md += appendix
    pictures = []
    if plots and have_matplotlib():
        pictures = plot_all(groups, out)
        md += "\n" + "".join(f"![{os.path.basename(p)}]({os.path.basename(p)})\n"
                             for p in pictures)
    elif plots:
        log(f"no plots: matplotlib is not installed; {PLOTS_HINT}")
    fedmed.atomic_write(os.path.join(out, f"{name}.md"), md)
    record = report_record(groups, notes)
    record["plots"] = [os.path.basename(p) for p in pictures]
    record.update(extra or {})
    fedmed.atomic_write(os.path.join(out, f"{name}.json"), fedmed.dumps(record))
    return {"markdown": md, "groups": groups, "notes": notes, "plots": pictures}


# ---------------------------------------------------------------- run.py --evaluate

EVAL_FILES = ("evaluation.json", "evaluation.md")
MULTILABEL = {"synthetic-multilabel"}          # datasets whose y is [N, C] multi-hot
# flags that --evaluate reads besides the data flags
EVAL_FLAGS = {"evaluate", "out", "overwrite", "quiet", "device", "eval_batch_size", "seed",
              "cache_dir"}


def finished_run(run: str) -> tuple[dict, dict]:
    """(config.json, summary.json) of the finished run in folder `run` that exported its
    models; every other case is a one-line UsageError saying what to give instead."""
    what = f"--evaluate {run}"
    if not os.path.isdir(run):
        raise UsageError(f"{what}: no such folder; give the --out of a finished run")
    if not os.path.isfile(os.path.join(run, "config.json")):
        raise UsageError(f"{what}: not a FedMed run (no config.json); give the --out of a "
                         "finished run")
    config = read_json(os.path.join(run, "config.json"), what)
    if "phases" in config:
        raise UsageError(f"{what}: a protocol folder (phases {', '.join(config['phases'])}); "
                         f"evaluate one phase's run, e.g. {os.path.join(run, config['phases'][-1])}")
    if not os.path.isfile(os.path.join(run, "summary.json")):
        raise UsageError(f"{what}: the run did not finish (no summary.json); finish it with "
                         "--resume first")
    summary = read_json(os.path.join(run, "summary.json"), what)
    algo = config.get("config", {}).get("algo", "?")
    if not summary.get("exported"):
        raise UsageError(f"{what}: the run exported no model (--algo {algo} trains CLIP "
                         "adapters, or the run predates exported weights); --evaluate loads "
                         "model.pt / model-CLIENT.pt")
    for name in summary["exported"]:
        if not os.path.isfile(os.path.join(run, name)):
            raise UsageError(f"{what}: {name} is listed in summary.json but missing; the folder "
                             "is incomplete, run it again")
    return config, summary


def held_out_rule(run: str, config: dict, summary: dict) -> tuple[str, str, list]:
    """(primary view, the rule in words, [(view, file)] of every model to evaluate) as the
    run's loop evaluates a client it never trained (fedmed.Algorithm.predict with no
    private state): the global model where there is one (model.pt: FedAvg, FedProx,
    pooled, and FedBN / --bn params_only with the n_k-average of the clients' private
    tensors); else (local) the n_k-weighted average of the clients' own models. Each
    client's own model (model-CLIENT.pt) is evaluated too, as view model:CLIENT."""
    exported = summary["exported"]
    stems = {fedmed._file_stem(f"model-{c}") + ".pt": c for c in config.get("clients", [])}
    own = [(f"model:{stems.get(f, f[6:-3])}", os.path.join(run, f)) for f in exported
           if f != "model.pt"]
    bn = config.get("config", {}).get("bn")
    if "model.pt" in exported:
        rule = "model.pt, the run's global model"
        if own:
            rule += (f" with the n_k-average of the clients' private tensors (--bn {bn}), as the "
                     "run evaluates a held-out client; also each client's own model (model:CLIENT)")
        else:
            rule += ", as the run evaluates a held-out client"
        return "global", rule, [("global", os.path.join(run, "model.pt"))] + own
    rule = ("the n_k-weighted average of the clients' own models (model-CLIENT.pt, n_k = "
            "training images; BatchNorm num_batches_tracked: maximum), as the run evaluates a "
            "held-out client; also each client's own model (model:CLIENT)")
    return "average", rule, [("average", None)] + own


def client_n(config: dict, summary: dict) -> dict:
    """n_k per client: summary.json's client_n, else (older runs) the training-split
    counts in config.json (single-label only)."""
    if summary.get("client_n"):
        return summary["client_n"]
    split = config.get("split", {})
    if config.get("data", {}).get("dataset") in MULTILABEL:
        raise UsageError("--evaluate: summary.json has no client_n (a run made before it was "
                         "recorded); run it again to evaluate its average model")
    return {c: int(sum(split[c]["train"])) for c in config.get("clients", []) if c in split}


def average_state(states: dict, n: dict) -> dict:
    """sum_k n_k w_k / sum_k n_k of the clients' state dicts (num_batches_tracked: max),
    the weights fedmed.Algorithm.average_private gives a held-out client."""
    names = list(states)
    first = states[names[0]]
    return {k: (torch.stack([states[c][k] for c in names]).max() if k.endswith("num_batches_tracked")
                else fedmed.weighted_average([states[c][k] for c in names],
                                             [n[c] for c in names]))
            for k in first}


def _earlier_evaluation(path: str, name: str) -> bool:
    """Whether `name` in `out` is part of an earlier evaluation (its files, or the
    seed-S folder of one made from a --seeds run)."""
    if name in EVAL_FILES:
        return True
    p = os.path.join(path, name)
    return (re.fullmatch(r"seed-\d+", name) is not None and os.path.isdir(p)
            and set(os.listdir(p)) <= set(EVAL_FILES) | {fedmed.LOCK_NAME})


def prepare_eval_out(out: str, overwrite: bool) -> None:
    """--out of --evaluate: a new or empty folder, or (with --overwrite) one holding only
    an earlier evaluation, which is removed; never a run's folder."""
    import shutil
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; give a folder path")
    names = [n for n in os.listdir(out) if n != fedmed.LOCK_NAME] if os.path.isdir(out) else []
    if names and not overwrite:
        raise UsageError(f"--out {out} already holds results; pass --overwrite to replace an "
                         "earlier evaluation there, or give another --out")
    other = sorted(n for n in names if not _earlier_evaluation(out, n))
    if other:
        raise UsageError(f"--overwrite: {out} holds files that are not an evaluation (e.g. "
                         f"{other[0]}); give an empty or new --out")
    for n in names:
        p = os.path.join(out, n)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def seeds_evaluation(seeds: list, records: list, out: str) -> dict:
    """evaluation.md / evaluation.json in `out` for the evaluations of a --seeds run's
    seeds (each in out/seed-S): mean +- sd over the seeds (ddof 1) of each client's,
    the mean-over-clients and the pooled balanced accuracy and macro AUROC of the held-out
    rule's model."""
    views = [r["views"][r["primary_view"]] for r in records]
    rows = {}
    for name in views[0]["clients"]:
        for key in ("balanced_accuracy", "macro_auroc"):
            rows.setdefault(name, {})[key] = [v["clients"][name][key] for v in views]
    rows["mean over clients"] = {k: [v[k] for v in views]
                                 for k in ("balanced_accuracy", "macro_auroc")}
    rows["pooled (all images joined)"] = {k: [v["pooled"][k] for v in views]
                                          for k in ("balanced_accuracy", "macro_auroc")}
    figures = {name: {k: dict(zip(("mean", "sd"), mean_sd(vals)), values=vals)
                      for k, vals in r.items()} for name, r in rows.items()}
    r0 = records[0]
    data = r0["data"]
    where = data.get("dataset") + (f" at {data['data_dir']}" if data.get("data_dir") else "")
    lines = [f"# Evaluation of the --seeds run {os.path.dirname(r0['run'])} ({r0['algo']}) on "
             f"{where}", "", f"Model of each seed: {r0['rule']}. No training; every image with "
             "a label of each client below is a test image. Mean +- sd (ddof 1) over seeds "
             f"{' '.join(map(str, seeds))}; each seed's evaluation is in seed-S/.", "",
             "| client | BA | macro AUROC | " + " | ".join(f"BA seed {s}" for s in seeds) + " |",
             "|---|---:|---:|" + "---:|" * len(seeds)]
    for name, f in figures.items():
        ba, auc = f["balanced_accuracy"], f["macro_auroc"]
        lines.append(f"| {name} | {fmt(ba['mean'], ba['sd'])} | {fmt(auc['mean'], auc['sd'])} | "
                     + " | ".join(fmt(v, None) for v in ba["values"]) + " |")
    notes = list(dict.fromkeys(n for r in records for n in r["notes"]))
    if notes:
        lines += [""] + [f"note: {n}" for n in notes]
    md = "\n".join(lines) + "\n"
    record = {"seeds": list(seeds), "runs": [r["run"] for r in records], "algo": r0["algo"],
              "rule": r0["rule"], "primary_view": r0["primary_view"], "data": data,
              "figures": figures, "notes": notes}
    with fedmed.locked(out):
        fedmed.atomic_write(os.path.join(out, "evaluation.json"), fedmed.dumps(record))
        fedmed.atomic_write(os.path.join(out, "evaluation.md"), md)
    record["markdown"] = md
    return record


def evaluate(run: str, ns, config: dict, summary: dict, out: str, log=print) -> dict:
    """Evaluate the finished run in `run` on the data the flags in `ns` describe, without
    training: every client of that data is a new site, evaluated on all its labelled
    images with the run's held-out rule (see held_out_rule); writes evaluation.json and
    evaluation.md to `out` and returns the record."""
    import dataclasses

    import datasets
    cfg_run = config.get("config", {})
    classes = list(config.get("classes", []))

    run_multilabel = config.get("data", {}).get("dataset") in MULTILABEL

    def same_classes(got, multilabel):
        if multilabel != run_multilabel:
            kind = {True: "multi-label", False: "single-label"}
            raise UsageError(f"--evaluate: the data is {kind[multilabel]} and the run "
                             f"{kind[run_multilabel]}; evaluate on data labelled like the run's")
        if list(got) != classes:
            raise UsageError(f"--evaluate: the data's classes ({', '.join(map(str, got))}) are "
                             f"not the run's ({', '.join(classes)}); evaluate on data with the "
                             "run's classes, in the same order")

    fed = datasets.load(ns, seed=ns.seed, check=same_classes)
    known = {f.name for f in dataclasses.fields(fedmed.Config)}
    cfg = fedmed.Config(**{k: v for k, v in cfg_run.items() if k in known})
    cfg = dataclasses.replace(cfg, weights=None, device=ns.device or "cpu",
                              eval_batch_size=ns.eval_batch_size or cfg.eval_batch_size)
    view0, rule, models_ = held_out_rule(run, config, summary)
    with fedmed.seeded(0, "evaluate"):
        algo = fedmed.Algorithm(cfg, None, fed)
    y_all = fed.y.numpy()
    sites = []
    for c in list(fed.clients) + list(fed.holdout):
        idx = np.sort(np.concatenate([c.train, c.test, c.unlabeled]).astype(np.int64))
        keep = (y_all[idx] >= 0).any(1) if y_all.ndim == 2 else y_all[idx] >= 0
        if keep.any():
            sites.append((c.name, idx[keep]))
    if not sites:
        raise UsageError("--evaluate: the data has no labelled image to evaluate on")
    states = {}
    for view, path in models_:
        if path is not None:
            states[view] = fedmed.safe_torch_load(path)
    if view0 == "average":
        n = client_n(config, summary)
        own = {v[len("model:"):]: sd for v, sd in states.items()}
        missing = [c for c in own if c not in n]
        if missing:
            raise UsageError(f"--evaluate: no n_k for client {missing[0]} in {run}; run it again")
        states = {"average": average_state(own, n), **states}
    views: dict = {}
    for view, sd in states.items():
        try:
            algo.model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            first = " ".join(str(e).split())[:160]
            raise UsageError(f"--evaluate: the {view} model of {run} does not fit --model "
                             f"{cfg.model} with {len(classes)} classes ({first})") from None
        ys, ps, per = [], [], {}
        for name, idx in sites:
            prob = algo.forward_probs(idx)
            y = y_all[idx]
            per[name] = fedmed.classification_metrics(y, prob)
            ys.append(y)
            ps.append(prob)
        pooled = fedmed.classification_metrics(np.concatenate(ys), np.concatenate(ps))
        views[view] = {"clients": per, "pooled": pooled,
                       "balanced_accuracy": mean_sd([m["balanced_accuracy"] for m in per.values()])[0],
                       "macro_auroc": mean_sd([m["macro_auroc"] for m in per.values()])[0]}
    notes = list(fed.info.get("notes", []))
    data_run = config.get("data", {})
    same_data = (data_run.get("dataset") == ns.dataset and
                 _real(data_run.get("data_dir")) == _real(ns.data_dir))
    trained = [name for name, _ in sites if same_data and name in config.get("clients", [])]
    if trained:
        notes.append(f"{', '.join(trained)} trained in this run (same dataset and --data-dir): "
                     "its figures may include images the run trained on; evaluate on a site the "
                     "run held out (--holdout-client) or never saw")
    record = {"run": os.path.abspath(run), "algo": cfg_run.get("algo"), "model": cfg.model,
              "rule": rule, "primary_view": view0, "classes": classes,
              "data": {a: getattr(ns, a, None) for a in datasets.ARG_NAMES}, "seed": ns.seed,
              "images": {name: int(len(idx)) for name, idx in sites}, "views": views,
              "notes": notes, "argv": getattr(ns, "argv", None),
              "versions": fedmed.versions(), "git_commit": fedmed.git_commit()}
    md = evaluation_markdown(record)
    os.makedirs(out, exist_ok=True)
    with fedmed.locked(out):
        fedmed.atomic_write(os.path.join(out, "evaluation.json"), fedmed.dumps(record))
        fedmed.atomic_write(os.path.join(out, "evaluation.md"), md)
    return record


def _real(path) -> str | None:
    return os.path.realpath(os.path.expanduser(path)) if path else None


def evaluation_markdown(r: dict) -> str:
    data = r["data"]
    where = data.get("dataset") + (f" at {data['data_dir']}" if data.get("data_dir") else "")
    v = r["views"][r["primary_view"]]
    lines = [f"# Evaluation of {r['run']} ({r['algo']}) on {where}", "",
             f"Model: {r['rule']}. No training; every image with a label of each client "
             "below is a test image.", "",
             "| client | BA | accuracy | macro F1 | macro AUROC | n |", "|---|---:|---:|---:|---:|---:|"]

    def row(name, m):
        return (f"| {name} | {fmt(m['balanced_accuracy'], None)} | {fmt(m['accuracy'], None)} | "
                f"{fmt(m['macro_f1'], None)} | {fmt(m['macro_auroc'], None)} | {m['n']} |")
    lines += [row(name, m) for name, m in v["clients"].items()]
    lines.append(f"| mean over clients | {fmt(v['balanced_accuracy'], None)} | | | "
                 f"{fmt(v['macro_auroc'], None)} | |")
    lines.append(row("pooled (all images joined)", v["pooled"]))
    others = [k for k in r["views"] if k != r["primary_view"]]
    if others:
        names = list(v["clients"])
        lines += ["", "Balanced accuracy of the other models:", "",
                  "| model | " + " | ".join(names) + " | pooled |",
                  "|---|" + "---:|" * (len(names) + 1)]
        for k in others:
            o = r["views"][k]
            lines.append(f"| {k} | " + " | ".join(fmt(o["clients"][c]["balanced_accuracy"], None)
                                                  for c in names)
                         + f" | {fmt(o['pooled']['balanced_accuracy'], None)} |")
    if r["notes"]:
        lines += [""] + [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"
