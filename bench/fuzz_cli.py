"""Fuzz table of bad input (issue #18): runs run.py on bad flags and broken dataset
folders, each in a subprocess, and prints a markdown table: input, exit code, first line
of the message, and a flag for anything that breaks DESIGN.md "Bad input" (one line on
stderr, exit 2, nothing written): a traceback, exit 0, more than one stderr line, or a
results folder left behind.

    cpuslot python bench/fuzz_cli.py [--data /work/shared/data/isic2019-mini] [--only WORD]

Every folder is generated in a temporary directory; the ISIC 2019 cases are broken
copies of the first rows of --data's CSVs (images linked, one corrupt JPEG copied), made
in the temporary directory too: nothing is written under --data or the repository.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "isic2019-mini"


def png(path: Path, seed: int, size=(20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    Image.fromarray(g.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def folder(root: Path, layout: dict) -> str:
    for sub, n in layout.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            png(root / sub / f"{i}.png", i + 31 * len(sub))
    return str(root)


def isic_copy(src: Path, dst: Path, rows: int, damage, ham: bool = False) -> str:
    """The first `rows` images of the ISIC 2019 folder `src` as a copy in `dst` (CSV rows
    copied, images linked), then `damage(dst, gt_rows, metadata_rows)` applied. The
    folder's first ~1,300 images have no lesion_id, hence no Fed-ISIC2019 centre (the
    default natural partition refuses them, and HAM10000_metadata.csv is never read):
    `ham` takes the first `rows` images of a HAM lesion instead, which have both."""
    dst.mkdir(parents=True)
    with open(src / "ISIC_2019_Training_Metadata.csv", newline="") as f:
        md_all = list(csv.reader(f))
    col = md_all[0].index("lesion_id")
    keep = {r[0] for r in md_all[1:] if not ham or r[col].startswith("HAM_")}
    with open(src / "ISIC_2019_Training_GroundTruth.csv", newline="") as f:
        gt = [r for i, r in enumerate(csv.reader(f)) if i == 0 or r[0] in keep][:rows + 1]
    names = {r[0] for r in gt[1:]}
    md = [r for i, r in enumerate(md_all) if i == 0 or r[0] in names]
    img = dst / "ISIC_2019_Training_Input"
    img.mkdir()
    for n in names:
        os.symlink(src / "ISIC_2019_Training_Input" / f"{n}.jpg", img / f"{n}.jpg")
    os.symlink(src / "HAM10000_metadata.csv", dst / "HAM10000_metadata.csv")
    damage(dst, gt, md)
    for name, table in (("ISIC_2019_Training_GroundTruth.csv", gt),
                        ("ISIC_2019_Training_Metadata.csv", md)):
        if table is not None:
            with open(dst / name, "w", newline="") as f:
                csv.writer(f).writerows(table)
    return str(dst)


def cases(tmp: Path, data: Path | None) -> list:
    """(label, argv) of every bad input."""
    junk = tmp / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    afile = tmp / "a-file"
    afile.write_text("x")
    empty = tmp / "empty"
    empty.mkdir()
    flags = [
        ["--lr", "abc"], ["--rounds", "0"], ["--rounds", "-1"], ["--batch-size", "0"],
        ["--batch-size", "1"], ["--lr", "0"], ["--lr", "-1"], ["--momentum", "-1"],
        ["--momentum", "1.5"], ["--weight-decay", "-1"], ["--loss", "focal", "--focal-gamma", "-1"],
        ["--focal-gamma", "2"], ["--eval-batch-size", "0"], ["--eval-batch-size", "-1"],
        ["--fraction", "0"], ["--fraction", "2"], ["--local-epochs", "0"], ["--local-steps", "-1"],
        ["--image-size", "4"], ["--image-size", "4096"], ["--image-size", "2"],
        ["--model", "densenet121", "--image-size", "16"], ["--model", "nope"],
        ["--weights", "/nonexistent/w.pt"], ["--weights", str(junk)], ["--algo", "nope"],
        ["--algo", "fedprox", "--mu", "-10"], ["--mu", "0.1"],
        ["--optimizer", "adam", "--momentum", "0.5"], ["--optimizer", "rmsprop"],
        ["--data-dir", str(tmp)], ["--dataset", "nope"], ["--partition", "dirichlet"],
        ["--clients", "0"], ["--test-fraction", "1.5"], ["--unlabeled-fraction", "1"],
        ["--holdout-client", "nosuch"], ["--device", "tpu"], ["--out", str(afile / "sub")],
        ["--out", "/proc/fedmed-fuzz/out"], ["--resume", "--out", str(empty)],
        ["--stop-after", "0"], ["--resume", "--overwrite"], ["--algo", "fedclip", "--model", "resnet18"],
        ["--algo", "clip_linear", "--pretrained", "/nonexistent/clip.pt"],
        ["--algo", "clip_linear", "--clip-model", "nope-net"],
        ["--split-unit", "lesion"], ["--max-images-per-client", "1"], ["--seed", "1e3"],
        ["--local-steps", "3", "--local-epochs", "2"],
    ]
    out = [(" ".join(f), f) for f in flags]
    imf = lambda name, layout: folder(tmp / name, layout)  # noqa: E731
    ok2 = {"Training/a": 3, "Training/b": 3, "Testing/a": 2, "Testing/b": 2}
    corrupt = tmp / "corrupt"
    folder(corrupt, {"train/a": 4, "train/b": 4})
    (corrupt / "train" / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    sites = folder(tmp / "sites", {f"{s}/{sp}/{c}": 3 for s in ("A", "B") for sp in ("train", "test")
                                   for c in ("x", "y")})
    npz = tmp / "bad.npz"
    npz.write_bytes(b"PK\x03\x04 not really")
    folders = [
        ("imagefolder: empty folder", ["--data-dir", str(empty)]),
        ("imagefolder: folder does not exist", ["--data-dir", str(tmp / "nowhere")]),
        ("imagefolder: one class", ["--data-dir", imf("one", {"Training/a": 4, "Testing/a": 2})]),
        ("imagefolder: only __MACOSX", ["--data-dir", imf("mac", {"__MACOSX/Training/a": 2})]),
        ("imagefolder: test class not in training",
         ["--data-dir", imf("testonly", {**ok2, "Testing/c": 2})]),
        ("imagefolder: corrupt PNG", ["--data-dir", str(corrupt)]),
        ("imagefolder: --alpha without dirichlet", ["--data-dir", imf("alpha", ok2), "--alpha", "0.1"]),
        ("imagefolder: --clients with sites (natural)", ["--data-dir", sites, "--clients", "4"]),
        ("imagefolder: --test-fraction with a Testing split",
         ["--data-dir", imf("tf", ok2), "--test-fraction", "0.3"]),
        ("imagefolder: --partition natural without sites",
         ["--data-dir", imf("nat", ok2), "--partition", "natural"]),
        ("imagefolder: --clients 50 > images", ["--data-dir", imf("few", ok2), "--clients", "50"]),
    ]
    out += [(label, ["--dataset", "imagefolder"] + argv) for label, argv in folders]
    out.append(("medmnist: not an npz", ["--dataset", "medmnist", "--data-dir", str(npz)]))
    if data is not None and (data / "ISIC_2019_Training_GroundTruth.csv").is_file():
        def drop_col(d, gt, md):
            for r in gt:
                del r[1]
        def two_classes(d, gt, md):
            gt[5][1] = gt[5][2] = "1.0"
        def missing_image(d, gt, md):
            os.remove(d / "ISIC_2019_Training_Input" / f"{gt[7][0]}.jpg")
        def no_md_row(d, gt, md):
            del md[3]
        def no_ham(d, gt, md):
            os.remove(d / "HAM10000_metadata.csv")
        def no_ham_row(d, gt, md):
            p = d / "HAM10000_metadata.csv"
            with open(p, newline="") as f:
                ham = [r for r in csv.reader(f) if r[1] != gt[3][0]]
            p.unlink()
            with open(p, "w", newline="") as f:
                csv.writer(f).writerows(ham)
        def bad_jpeg(d, gt, md):
            p = d / "ISIC_2019_Training_Input" / f"{gt[9][0]}.jpg"
            raw = p.read_bytes()
            p.unlink()
            p.write_bytes(raw[:len(raw) // 3])
        def text_label(d, gt, md):
            gt[4][3] = "yes"
        # (label, damage, HAM rows: the fault lies past the Fed-ISIC2019 centre rule)
        for label, damage, ham in [("GT CSV lacks the MEL column", drop_col, False),
                                   ("GT row with two classes", two_classes, False),
                                   ("GT names a missing image", missing_image, False),
                                   ("metadata lacks an image's row", no_md_row, False),
                                   ("HAM rows, HAM10000_metadata.csv missing", no_ham, True),
                                   ("HAM rows, HAM10000 metadata lacks an image's row",
                                    no_ham_row, True),
                                   ("HAM rows, truncated JPEG", bad_jpeg, True),
                                   ("GT cell not a number", text_label, False)]:
            root = isic_copy(data, tmp / f"isic-{damage.__name__}", 200, damage, ham)
            out.append((f"isic2019-mini copy: {label}", ["--dataset", "isic2019", "--data-dir", root]))
        root = isic_copy(data, tmp / "isic-iid-bad_jpeg", 200, bad_jpeg)
        out.append(("isic2019-mini copy: truncated JPEG, --partition iid",
                    ["--dataset", "isic2019", "--data-dir", root, "--partition", "iid"]))
        root = isic_copy(data, tmp / "isic-ok", 200, lambda d, gt, md: None)
        out.append(("isic2019-mini copy: --clients with natural",
                    ["--dataset", "isic2019", "--data-dir", root, "--partition", "natural",
                     "--clients", "3"]))
        out.append(("isic2019-mini copy: --partition iid --test-fraction 0",
                    ["--dataset", "isic2019", "--data-dir", root, "--partition", "iid",
                     "--test-fraction", "0"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA), help="isic2019-mini folder (read only)")
    ap.add_argument("--only", default=None, help="run only the cases whose input contains this")
    ap.add_argument("--timeout", type=float, default=300)
    a = ap.parse_args()
    rows, bad = [], 0
    with tempfile.TemporaryDirectory(prefix="fedmed-fuzz-") as t:
        tmp = Path(t)
        data = Path(a.data) if a.data and Path(a.data).is_dir() else None
        todo = [c for c in cases(tmp, data) if not a.only or a.only in c[0]]
        for i, (label, argv) in enumerate(todo, 1):
            out = tmp / f"out{i}"
            if "--out" not in argv:
                argv = argv + ["--out", str(out)]
            else:
                out = Path(argv[argv.index("--out") + 1])
            existed = out.exists()
            cmd = [sys.executable, str(ROOT / "run.py"), "--quiet", "--rounds", "1",
                   "--cache-dir", str(tmp / "cache")] + argv
            t0 = time.perf_counter()
            try:
                p = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=a.timeout)
                code, err = p.returncode, p.stderr.strip()
            except subprocess.TimeoutExpired:
                code, err = "timeout", ""
            secs = time.perf_counter() - t0
            lines = err.splitlines()
            problems = []
            if "Traceback" in err:
                problems.append("TRACEBACK")
            if code == 0:
                problems.append("EXIT 0")
            elif code != 2:
                problems.append(f"exit {code}")
            if code == 2 and len(lines) != 1:
                problems.append(f"{len(lines)} stderr lines")
            if code != 0 and not existed and out.exists() and os.listdir(out):
                problems.append("folder left")
            bad += bool(problems)
            first = (lines[-1] if "Traceback" in err else lines[0]) if lines else ""
            rows.append((label, code, first.replace("|", "\\|")[:160], ", ".join(problems) or "ok",
                         secs))
            print(f"[{i}/{len(todo)}] {label}: {code} {', '.join(problems) or 'ok'}",
                  file=sys.stderr, flush=True)
    print("| # | input | exit | message (first line) | check | s |")
    print("|---|---|---|---|---|---|")
    for i, (label, code, first, flag, secs) in enumerate(rows, 1):
        print(f"| {i} | `{label}` | {code} | {first} | {flag} | {secs:.1f} |")
    print(f"\n{len(rows)} cases, {bad} flagged")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
