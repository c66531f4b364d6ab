"""Result folders -> one comparison table and pictures.

    python bench/report.py runs/fedavg-seeds runs/local-seeds ... --out runs/report

Every finished run under the folders given (a folder with config.json and summary.json,
e.g. an --out of run.py, its seed-S folders under --seeds, or any folder holding such
folders) is read; runs whose settings differ only in --seed are one row, mean +- sd over
their seeds (ddof 1). Writes to --out:

    report.md      the table: per configuration client BA (mean over clients), pooled BA
                   (and what it is: pooled_kind), the means over the last k rounds, macro
                   AUROC, MB sent up, seconds; then each client's BA
    report.json    the same figures with every seed's value and the runs read
    curves-ROW.png each client's and the pooled BA per round (mean over seeds, +- sd)
    ba-vs-bytes.png  mean client BA and pooled BA against the cumulative bytes sent

The plots need matplotlib (optional: `pip install matplotlib`); without it the table is
still written and one line says how to get the plots. Exit status 2 with one line for a
folder that does not exist, holds no finished run, or an --out that holds other files.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fedmed  # noqa: E402
import results  # noqa: E402
from fedmed import UsageError  # noqa: E402


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see python bench/report.py --help)")


REPORT_FILES = ("report.md", "report.json")


def prepare(out: str, overwrite: bool) -> None:
    """--out: new or empty, or (--overwrite) holding only an earlier report."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; give a folder path")
    names = [n for n in os.listdir(out) if n != fedmed.LOCK_NAME] if os.path.isdir(out) else []
    ours = [n for n in names if n in REPORT_FILES or (n.endswith(".png") and (
        n.startswith("curves-") or n == "ba-vs-bytes.png"))]
    if names and not overwrite:
        raise UsageError(f"--out {out} is not empty; pass --overwrite to replace an earlier "
                         "report there, or give another --out")
    other = sorted(set(names) - set(ours))
    if other:
        raise UsageError(f"--overwrite: {out} holds files that are not a report (e.g. "
                         f"{other[0]}); give an empty or new --out")
    for n in ours:
        os.remove(os.path.join(out, n))


def main(argv=None) -> int:
    p = Parser(description="Result folders -> a comparison table (mean +- sd over seeds) "
               "and plots.")
    p.add_argument("folders", nargs="+", metavar="RESULT_DIR",
                   help="run folders, --seeds folders, or folders holding them")
    p.add_argument("--out", required=True, help="folder for report.md, report.json and the plots")
    p.add_argument("--title", default="", help="a heading for report.md")
    p.add_argument("--no-plots", action="store_true", help="the table only")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    try:
        a = p.parse_args(argv)
        for f in a.folders:
            if not os.path.isdir(f):
                raise UsageError(f"{f}: no such folder; give result folders (run.py --out)")
        prepare(a.out, a.overwrite)
        rep = results.write_report(a.folders, a.out, title=a.title, plots=not a.no_plots,
                                   log=lambda s: print(s, file=sys.stderr))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(rep["markdown"].rstrip())
    print(f"report in {os.path.join(a.out, 'report.md')}"
          + (f" with {len(rep['plots'])} plot(s)" if rep["plots"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
