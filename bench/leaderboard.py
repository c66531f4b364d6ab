"""Every registered algorithm that applies, on one federation, with one budget and the
same seeds, into one table (bench/report.py's) and plots.

    python bench/leaderboard.py --out runs/leaderboard --seeds 0 1 2 RUN_FLAGS...

RUN_FLAGS are run.py's flags (the dataset, the model, the budget: --rounds, --local-steps
or --local-epochs, --batch-size, ...); each row gets the ones its algorithm reads (e.g.
--mu only fedprox, --model/--weights not the CLIP methods, which build their own model).
Each row runs `python run.py --algo A ... --seeds S... --out OUT/ROW` (in this process)
and the table groups the rows by name. Rows: fedavg, fedprox, fedbn (fedavg --bn local),
local, pooled, then every other registered algorithm that applies:
  * the CLIP methods only when their weights can be had offline (--pretrained FILE, or
    the tag's file already on this machine); otherwise they are left out with a note;
  * facmic only with --holdout-client (its target domain);
  * the semi-supervised methods (fgasl and its ablations fgasl-no-gaa, fgasl-no-dr,
    fgasl-no-pia; fixmatch; meanteacher) only with --unlabeled-fraction F > 0 (few labels
    per client); the baseline rows then train on the labelled images only;
  * clip_svm (FedAvg variant) with --image-tower = --model when --model is one of its
    towers (e.g. mobilenet_v2, with the same --weights), and --svm when --holdout-client
    is given (summary.json then holds its SVM / KNN figures on the unseen site);
  * fedlsm only on a label-set federation (--partition labelset, synthetic-multilabel);
  * fedmic with --model as its shared student and its own teacher (--teacher-model,
    mobilenet_v2 unless given; --teacher-weights imagenet passes ImageNet weights); its
    row's figures are the personalised teachers' (its primary view);
  * fcu and fedal are protocols with their own measures (bench/fcu_audit.py,
    bench/fedal_isic.py), left out with a note.
A row that run.py refuses (exit 2) is left out with its one-line error as the note.

Writes OUT/ROW/seed-S/ (the runs), OUT/leaderboard.md (the command, the table, the notes,
the plots), OUT/leaderboard.json, and the plots when matplotlib is installed.
--resume continues an interrupted leaderboard (rows with a folder are resumed, the others
started); --overwrite replaces OUT. Smoke test on the synthetic federation (seconds):

    python bench/leaderboard.py --out /tmp/lb --seeds 0 1 --image-size 16 --clients 3 \\
        --rounds 2 --local-steps 2 --batch-size 16
"""
import argparse
import contextlib
import dataclasses
import io
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import fedmed  # noqa: E402
import results  # noqa: E402
import run  # noqa: E402
from fedmed import UsageError  # noqa: E402

# (row name, --algo, extra flags): the baselines first, in this order
BASE_ROWS = [("fedavg", "fedavg", []), ("fedprox", "fedprox", []),
             ("fedbn", "fedavg", ["--bn", "local"]), ("local", "local", []),
             ("pooled", "pooled", [])]
PROTOCOLS = {"fcu": "a protocol (forgetting a client: original, unlearning, retraining "
                    "phases), measured by bench/fcu_audit.py, not a training rule to rank here",
             "fedal": "a protocol (active-learning cycles under a label budget), measured "
                      "against random acquisition by bench/fedal_isic.py"}
SEMI = {"fgasl", "fixmatch", "meanteacher"}
OWN = {"algo", "out", "seeds", "seed", "resume", "overwrite", "evaluate", "stop_after", "quiet"}
OUTPUT = {"last_k", "cache_dir"}                 # and the data flags (datasets.ARG_NAMES)
# flags a row does not get although its algorithm reads them: clip_svm's --mu is read only
# with --fl fedprox, and its row is the FedAvg variant
DROP = {"clip_svm": {"mu"}}


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see python bench/leaderboard.py --help)")


def flag_groups(argv: list, parser) -> list:
    """run.py flags as [(dest, [tokens])]; a flag run.py does not know is a UsageError."""
    groups, i = [], 0
    actions = parser._option_string_actions
    while i < len(argv):
        tok = argv[i]
        name = tok.split("=", 1)[0]
        if name not in actions:
            raise UsageError(f"{tok}: not a flag of run.py (see python run.py --help)")
        a = actions[name]
        n = 0 if "=" in tok or a.nargs == 0 else 1
        groups.append((a.dest, argv[i:i + 1 + n]))
        i += 1 + n
    return groups


def reads(algo: str) -> set:
    """The dests of the run.py flags that --algo `algo` reads."""
    cls = fedmed.ALGORITHMS[algo]
    own = {f.name for f in dataclasses.fields(cls.Args)} if cls.Args is not None else set()
    shared = {f.name for f in dataclasses.fields(fedmed.Config)}
    if cls.build_model is not fedmed.Algorithm.build_model:
        shared -= {"model", "weights"}                  # a CLIP method builds its own model
        if getattr(cls, "takes_weights", False):
            shared.add("weights")                       # clip_svm: its image tower's
    return (shared | own | OUTPUT | set(datasets.ARG_NAMES)) - DROP.get(algo, set())


def clip_weights(groups: list, args_cls) -> str | None:
    """None when the CLIP weights that --clip-model/--pretrained (or their defaults) name
    can be had offline; else why not (one line)."""
    import clip_adapters
    given = {d: toks[-1] for d, toks in groups}
    model = given.get("clip_model", args_cls.clip_model)
    pretrained = given.get("pretrained", args_cls.pretrained)
    try:
        clip_adapters.resolve_weights(clip_adapters.resolve_model(model), pretrained, 0)
    except UsageError as e:
        why = str(e).split(";")[0]
        return (f"a CLIP method, and no CLIP weights here for --clip-model {model} --pretrained "
                f"{pretrained} ({why}); pass --pretrained FILE (a local open_clip checkpoint) "
                "to include it")
    return None


def plan(algos: list | None, groups: list) -> tuple[list, dict]:
    """(rows [(name, algo, flags)], {algorithm: why it is left out})."""
    import algorithms  # noqa: E402 - the methods register themselves
    algorithms.load_all()
    given = {d: toks for d, toks in groups}
    rows = list(BASE_ROWS)
    notes, clip_checked = {}, {}
    labelset = (given.get("partition", [""])[-1] == "labelset"
                or given.get("dataset", [""])[-1] == "synthetic-multilabel")
    try:
        unlabelled = float((given.get("unlabeled_fraction") or ["0"])[-1].split("=")[-1]) > 0
    except ValueError:
        unlabelled = False                              # run.py reports the bad value
    for name in sorted(fedmed.ALGORITHMS):
        if name in {a for _, a, _ in BASE_ROWS} or (algos is not None and name not in algos):
            continue
        cls = fedmed.ALGORITHMS[name]
        if name in PROTOCOLS or hasattr(cls, "protocol"):
            notes[name] = PROTOCOLS.get(name, "a protocol of several runs, not a training rule")
            continue
        if name == "fedlsm" and not labelset:
            notes[name] = ("its setting is clients that annotate different classes (--partition "
                           "labelset or --dataset synthetic-multilabel); not this federation")
            continue
        if name in SEMI and not unlabelled:
            notes[name] = ("semi-supervised (labelled + unlabelled images at every client): "
                           "needs --unlabeled-fraction F > 0")
            continue
        if name == "facmic" and "holdout_client" not in given:
            notes[name] = "domain adaptation to a target site: needs --holdout-client TARGET"
            continue
        if cls.Args is not None and "clip_model" in {f.name for f in dataclasses.fields(cls.Args)}:
            key = (given.get("clip_model", [""])[-1], given.get("pretrained", [""])[-1])
            if key not in clip_checked:
                clip_checked[key] = clip_weights(groups, cls.Args)
            if clip_checked[key]:
                notes[name] = clip_checked[key]
                continue
        extra = []
        if name == "clip_svm":        # the image tower is --model when it is one of its towers;
            from algorithms.clip_svm import TOWERS        # --svm with an unseen site
            model = given.get("model", [""])[-1]
            extra = (["--image-tower", model] if model in TOWERS else []) + (
                ["--svm"] if "holdout_client" in given else [])
        rows.append((name, name, extra))
        if name == "fgasl":                                  # its ablations (sheet section 8)
            rows += [(f"fgasl-no-{part}", "fgasl", [f"--no-{part}"]) for part in ("gaa", "dr", "pia")]
    if algos is not None:
        known = {r[0] for r in rows} | set(notes)
        for a in algos:
            if a not in known:
                raise UsageError(f"--algos {a!r} is not a row; choose from "
                                 + ", ".join([r[0] for r in rows] + sorted(notes)))
        rows = [r for r in rows if r[0] in algos]
        notes = {k: v for k, v in notes.items() if k in algos}
    return rows, notes


def budget(run_dir: str, name: str) -> str:
    """One line of what a row ran: rounds, local work, batch, lr, model, data."""
    c = results.read_json(os.path.join(run_dir, "config.json"), run_dir)
    cfg, data = c.get("config", {}), c.get("data", {})
    local = (f"{cfg.get('local_steps')} local steps" if cfg.get("local_steps")
             else f"{cfg.get('local_epochs')} local epoch(s)")
    return (f"{name}: {cfg.get('rounds')} rounds x {local}, batch {cfg.get('batch_size')}, "
            f"{cfg.get('optimizer')} lr {cfg.get('lr')}, --model {cfg.get('model')}"
            + (f" --weights {cfg['weights']}" if cfg.get("weights") else "")
            + f"; {data.get('dataset')} ({len(c.get('clients', []))} clients, "
            f"{data.get('image_size')} px)")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = Parser(description="Every applicable algorithm, same federation, budget and seeds, "
               "into one table and plots. Other flags go to run.py.", allow_abbrev=False)
    p.add_argument("--out", required=True, help="folder of the rows and the table")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: 0 1 2")
    p.add_argument("--algos", default=None,
                   help="comma-separated rows to run (default: every one that applies)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted leaderboard")
    p.add_argument("--overwrite", action="store_true", help="replace the leaderboard in --out")
    p.add_argument("--no-plots", action="store_true", help="the table only")
    try:
        a, rest = p.parse_known_args(argv)
        parser = run.build_parser()
        groups = flag_groups(rest, parser)
        for dest, toks in groups:
            if dest in OWN:
                raise UsageError(f"{toks[0]} is set by the leaderboard; drop it (use the "
                                 "leaderboard's --out/--seeds/--resume/--overwrite)")
        if a.resume and a.overwrite:
            raise UsageError("--resume and --overwrite exclude each other; pick one")
        run.check_seeds(argparse.Namespace(seeds=a.seeds, stop_after=None), set())
        rows, notes = plan(a.algos.split(",") if a.algos else None, groups)
        if not rows:
            raise UsageError("no row to run: every algorithm asked for is left out ("
                             + "; ".join(f"{k}: {v}" for k, v in notes.items()) + ")")
        out = a.out
        if os.path.exists(out) and not os.path.isdir(out):
            raise UsageError(f"--out {out} is a file; give a folder path")
        names = [n for n in os.listdir(out) if n != fedmed.LOCK_NAME] if os.path.isdir(out) else []
        if names and not (a.resume or a.overwrite):
            raise UsageError(f"--out {out} already holds results; pass --resume to continue, "
                             "--overwrite to replace them, or another --out")
        run.check_writable(out)
        os.makedirs(out, exist_ok=True)
        if a.overwrite:
            fedmed.clear_out(out)
        seeds = [str(s) for s in a.seeds]
        done, t_all = {}, time.perf_counter()
        for name, algo, extra in rows:
            keep = reads(algo)
            flags = [t for dest, toks in groups if dest in keep for t in toks]
            folder = os.path.join(out, name)
            again = a.resume and os.path.isdir(folder) and results.seeds_folder(folder) is not None
            cmd = (["--algo", algo, *extra, *flags, "--seeds", *seeds, "--out", folder, "--quiet"]
                   + (["--resume"] if again else []))
            t0 = time.perf_counter()
            err, so = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(so):
                rc = run.main(cmd)
            line = (err.getvalue().strip().splitlines() or [""])[-1]
            if rc == 130:
                print(f"{name}: interrupted; continue with --resume", file=sys.stderr)
                return 130
            if rc != 0:
                notes[name] = f"not run: {line.removeprefix('error: ')} (exit {rc})"
                print(f"{name:<12} left out: {notes[name]}", flush=True)
                continue
            done[name] = {"algo": algo, "command": shlex.join(["python", "run.py", *cmd])}
            print(f"{name:<12} {len(seeds)} seed(s) in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        if not done:
            raise UsageError("no row ran: " + "; ".join(f"{k}: {v}" for k, v in notes.items()))
        command = shlex.join(["python", "bench/leaderboard.py", *argv])
        preface = (f"Command: `{command}`\n\nEvery row: the same federation and budget, seeds "
                   f"{' '.join(seeds)}; the row's own command is in leaderboard.json.\n\n"
                   + "".join(f"* {budget(os.path.join(out, n, 'seed-' + seeds[0]), n)}\n"
                             for n in done) + "\n")
        appendix = ("\nLeft out:\n\n" + "".join(f"* {k}: {v}\n" for k, v in notes.items())
                    if notes else "")
        rep = results.write_report([os.path.join(out, n) for n in done], out,
                                   names={os.path.join(out, n): n for n in done},
                                   title="Leaderboard", plots=not a.no_plots, name="leaderboard",
                                   preface=preface, appendix=appendix,
                                   log=lambda s: print(s, file=sys.stderr),
                                   extra={"rows": done, "left_out": notes, "command": command})
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(rep["markdown"].rstrip())
    print(f"leaderboard in {os.path.join(out, 'leaderboard.md')} "
          f"({time.perf_counter() - t_all:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
