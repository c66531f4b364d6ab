"""Peak memory of one FedAvg round against the number of sampled clients (issue #18).

    cpuslot python bench/memory_scale.py                 # 10, 100, 1000 clients, both paths
    cpuslot python bench/memory_scale.py --clients 10 100 --paths list

ResNet-18 (11.7M parameters, ~47 MB a model in float32), one round, one local step of
two 32x32 images per client, every client sampled. Each figure is the peak resident set
(ru_maxrss) of a fresh child process that builds the federation and runs the round:
  stream  the loop folds each upload into a float64 running sum as it arrives (default)
  list    the loop keeps every deserialised upload until aggregate (the code before
          the streaming change; Algorithm.stream_uploads = False)
The list path is not run where its uploads alone would not fit in this machine's memory
(K x 47 MB: 1,000 clients would need ~47 GB).

Measured (2-core CPU box, torch 2.14.1, one thread, 2026-11-29):
    list    10 clients: peak RSS     1543 MiB
    list   100 clients: peak RSS     5911 MiB (3.83x)
    list  1000 clients: skipped, its uploads alone need ~44 GiB (available 15 GiB)
  stream    10 clients: peak RSS     1187 MiB
  stream   100 clients: peak RSS     1193 MiB (1.01x)
  stream  1000 clients: peak RSS     1224 MiB (1.03x; 263 s)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_MB = 11_689_512 * 4 / 2 ** 20


def child(k: int, path: str) -> None:
    sys.path.insert(0, ROOT)
    import numpy as np
    import torch

    import datasets
    import fedmed
    fedmed.load_algorithms()
    fedmed.Algorithm.stream_uploads = path == "stream"
    per, size = 6, 32                                     # 4 train + 2 test images each
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (k * per, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.arange(k * per) % 2
    clients = [datasets.ClientSplit(f"c{i}", np.arange(i * per, i * per + 4),
                                    np.arange(i * per + 4, i * per + 6)) for i in range(k)]
    fed = datasets.Federation("tiny", ["a", "b"], x, y, clients)
    cfg = fedmed.Config(model="resnet18", rounds=1, local_steps=1, batch_size=2,
                        momentum=0.0, class_weights="none", augment="none")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        fedmed.run(cfg, None, fed, out, quiet=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # KiB -> MiB
    print(json.dumps({"clients": k, "path": path, "peak_mib": round(peak, 1),
                      "seconds": round(time.perf_counter() - t0, 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--paths", nargs="+", default=["list", "stream"], choices=["list", "stream"])
    p.add_argument("--child", nargs=2, metavar=("K", "PATH"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(int(a.child[0]), a.child[1])
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2 ** 20
    rows = {}
    for path in a.paths:
        for k in a.clients:
            if path == "list" and k * MODEL_MB > 0.7 * avail:
                print(f"{path:>6} {k:>5} clients: skipped, its uploads alone need "
                      f"~{k * MODEL_MB / 1024:.0f} GiB (available {avail / 1024:.0f} GiB)")
                continue
            r = subprocess.run([sys.executable, __file__, "--child", str(k), path],
                               capture_output=True, text=True)
            if r.returncode:
                print(f"{path:>6} {k:>5} clients: failed\n{r.stderr[-2000:]}")
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows[(path, k)] = row["peak_mib"]
            base = rows.get((path, a.clients[0]))
            print(f"{path:>6} {k:>5} clients: peak RSS {row['peak_mib']:>8.0f} MiB "
                  f"({row['peak_mib'] / base:.2f}x the {a.clients[0]}-client peak; "
                  f"{row['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
