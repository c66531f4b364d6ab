"""Image loading throughput on the real isic2019-mini data (not a test; prints figures).

    python bench/data_throughput.py [--image-size 64 224] [--workers N] [--data-dir PATH]

For each image size: the catalog (CSVs, no pixels), then the first pass with an empty
cache (every JPEG decoded, centre-cropped, resized and written to the cache), then the
cached pass (the same federation again: no JPEG decoded). All 12,760 images are used
(--partition iid; natural would drop the 1,926 without a centre).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "isic2019-mini"))
    p.add_argument("--image-size", type=int, nargs="+", default=[64])
    p.add_argument("--workers", type=int, default=None,
                   help="decoding threads (default: min(8, CPUs))")
    p.add_argument("--repeats", type=int, default=3, help="cached passes timed (best shown)")
    a = p.parse_args()
    if not (Path(a.data_dir) / "ISIC_2019_Training_GroundTruth.csv").is_file():
        sys.exit(f"skipped: {a.data_dir} does not hold isic2019-mini")
    workers = a.workers or min(8, os.cpu_count() or 1)
    print(f"isic2019-mini at {a.data_dir}; {os.cpu_count()} CPUs, {workers} decoding threads")
    t0 = time.perf_counter()
    cat = datasets.load_catalog(datasets.namespace(dataset="isic2019", data_dir=a.data_dir))
    t_cat = time.perf_counter() - t0
    print(f"catalog (3 CSVs, stat of {len(cat.files):,} files): {t_cat:.2f} s")
    rows = list(range(len(cat.files)))
    print(f"{'size':>5} {'images':>8} {'first pass s':>13} {'img/s':>8} {'cached s':>9} "
          f"{'img/s':>9} {'speed-up':>9} {'cache MB':>9}")
    for size in a.image_size:
        cache = tempfile.mkdtemp(prefix="fedmed-bench-")
        try:
            t0 = time.perf_counter()
            x, where = datasets.load_images(cat, rows, size, cache_dir=cache, workers=workers)
            cold = time.perf_counter() - t0
            assert where["decoded"] == len(rows)
            warm = float("inf")
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                x2, where2 = datasets.load_images(cat, rows, size, cache_dir=cache, workers=workers)
                warm = min(warm, time.perf_counter() - t0)
                assert where2["decoded"] == 0 and (x2 == x).all()
            mb = os.path.getsize(where["cache"]) / 2 ** 20
            n = len(rows)
            print(f"{size:>5} {n:>8,} {cold:>13.2f} {n / cold:>8,.0f} {warm:>9.3f} "
                  f"{n / warm:>9,.0f} {cold / warm:>8.0f}x {mb:>9.0f}")
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    # the whole loader, as run.py calls it (catalog + partition + cached images)
    cache = tempfile.mkdtemp(prefix="fedmed-bench-")
    try:
        ns = datasets.namespace(dataset="isic2019", data_dir=a.data_dir, cache_dir=cache,
                                image_size=a.image_size[0])
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fed = datasets.load(ns, seed=0)
            times.append(time.perf_counter() - t0)
        print(f"datasets.load, natural partition, {a.image_size[0]} px, {len(fed.files):,} images: "
              f"first run {times[0]:.2f} s, second run {times[1]:.2f} s")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
