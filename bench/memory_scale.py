"""Peak memory of one FedAvg round against the number of sampled clients (issue #18).

    cpuslot python bench/memory_scale.py                 # 10, 100, 1000 clients, both paths
    cpuslot python bench/memory_scale.py --clients 10 100 --paths list
    cpuslot python bench/memory_scale.py --keep-optimizer --model cnn [--root OLD_CHECKOUT]

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

--keep-optimizer (path `keep`): the streamed loop with --keep-optimizer, SGD momentum 0.9
(one model-sized buffer of optimiser state per client), two rounds (round 2 reads each
client's state back), every client sampled; also the size of checkpoint.pt and of the
optimiser files. `--root` measures another checkout's fedmed.py: "before" is commit
5daab57 (every client's state in client.state, hence in memory and in checkpoint.pt),
"after" keeps it in OUT/optimizer/, one file per client, read only while it trains.
The figures (2-core CPU box, torch 2.14.1, one thread, 2026-11-30):
  cpuslot python bench/memory_scale.py --keep-optimizer --model cnn --clients 10 100 1000 \
      [--root /work/wt-h18-before]                     # the 93,730-parameter CNN
    before    10 clients: peak RSS   709 MiB,         checkpoint   3.97 MiB
    before   100 clients: peak RSS   780 MiB (1.10x), checkpoint  36.46 MiB
    before  1000 clients: peak RSS  1498 MiB (2.11x), checkpoint 361.43 MiB
    after     10 clients: peak RSS   701 MiB,         checkpoint   0.37 MiB, optimizer/   3.6 MiB
    after    100 clients: peak RSS   704 MiB (1.00x), checkpoint   0.40 MiB, optimizer/  36.1 MiB
    after   1000 clients: peak RSS   727 MiB (1.04x), checkpoint   0.75 MiB, optimizer/ 361.1 MiB
  cpuslot python bench/memory_scale.py --keep-optimizer --clients 10 30 100 [--root ...]
    before    10 clients: peak RSS  2032 MiB,         checkpoint  469 MiB
    before    30 clients: peak RSS  3838 MiB (1.89x), checkpoint 1322 MiB
    before   100 clients: peak RSS 10136 MiB (4.99x), checkpoint 4308 MiB (103 s)
    after     10 clients: peak RSS  1246 MiB,         checkpoint 42.7 MiB, optimizer/  427 MiB
    after     30 clients: peak RSS  1251 MiB (1.00x), checkpoint 42.7 MiB, optimizer/ 1280 MiB
    after    100 clients: peak RSS  1259 MiB (1.01x), checkpoint 42.8 MiB, optimizer/ 4266 MiB (104 s)
ResNet-18 with 1,000 clients is not run: its optimiser states alone are ~43 GiB on disk
(the machine has 47 GiB free), and before the change they would be ~43 GiB in memory.
The state itself cannot vanish: it moves from memory and checkpoint.pt to the files
(the same total bytes); what remains in the checkpoint grows only by each client's file
name, sha256 and index arrays (0.4 MiB for 1,000 clients). MEMORY_SCALE_TMP sets the
folder the runs write into (default: the system's temporary folder).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_MB = 11_689_512 * 4 / 2 ** 20
CNN_MB = 93_730 * 4 / 2 ** 20


def child(k: int, path: str, model: str = "resnet18", root: str = ROOT) -> None:
    sys.path.insert(0, root)
    import numpy as np
    import torch

    import datasets
    import fedmed
    import algorithms  # noqa: E402 - the methods register themselves
    algorithms.load_all()
    fedmed.Algorithm.stream_uploads = path != "list"
    per, size = 6, 32                                     # 4 train + 2 test images each
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (k * per, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.arange(k * per) % 2
    clients = [datasets.ClientSplit(f"c{i}", np.arange(i * per, i * per + 4),
                                    np.arange(i * per + 4, i * per + 6)) for i in range(k)]
    fed = datasets.Federation("tiny", ["a", "b"], x, y, clients)
    keep = path == "keep"                 # two rounds: round 2 reads the kept states back
    cfg = fedmed.Config(model=model, rounds=2 if keep else 1, local_steps=1, batch_size=2,
                        momentum=0.9 if keep else 0.0, keep_optimizer=keep,
                        class_weights="none", augment="none")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=os.environ.get("MEMORY_SCALE_TMP")) as out:
        fedmed.run(cfg, None, fed, out, quiet=True)
        ckpt = os.path.getsize(os.path.join(out, "checkpoint.pt"))
        folder = os.path.join(out, "optimizer")
        files = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
                    ) if os.path.isdir(folder) else 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # KiB -> MiB
    print(json.dumps({"clients": k, "path": path, "peak_mib": round(peak, 1),
                      "checkpoint_mib": round(ckpt / 2 ** 20, 2),
                      "optimizer_files_mib": round(files / 2 ** 20, 2),
                      "seconds": round(time.perf_counter() - t0, 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--paths", nargs="+", default=["list", "stream"],
                   choices=["list", "stream", "keep"])
    p.add_argument("--keep-optimizer", action="store_true",
                   help="measure the keep path (same as --paths keep)")
    p.add_argument("--model", default="resnet18", choices=["resnet18", "cnn"])
    p.add_argument("--root", default=ROOT, help="the checkout whose fedmed.py is measured "
                   "(e.g. a worktree of an older commit, for before/after figures)")
    p.add_argument("--child", nargs=2, metavar=("K", "PATH"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(int(a.child[0]), a.child[1], a.model, a.root)
    if a.keep_optimizer:
        a.paths = ["keep"]
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2 ** 20
    disk = shutil.disk_usage(os.environ.get("MEMORY_SCALE_TMP") or tempfile.gettempdir()
                             ).free / 2 ** 20
    model_mib = MODEL_MB if a.model == "resnet18" else CNN_MB
    rows = {}
    for path in a.paths:
        for k in a.clients:
            if path == "list" and k * model_mib > 0.7 * avail:
                print(f"{path:>6} {k:>5} clients: skipped, its uploads alone need "
                      f"~{k * model_mib / 1024:.0f} GiB (available {avail / 1024:.0f} GiB)")
                continue
            if path == "keep" and k * model_mib > 0.5 * disk:
                print(f"{path:>6} {k:>5} clients: skipped, its optimiser states need "
                      f"~{k * model_mib / 1024:.0f} GiB (free disk {disk / 1024:.0f} GiB)")
                continue
            r = subprocess.run([sys.executable, __file__, "--child", str(k), path,
                                "--model", a.model, "--root", a.root],
                               capture_output=True, text=True)
            if r.returncode:
                print(f"{path:>6} {k:>5} clients: failed\n{r.stderr[-2000:]}")
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows[(path, k)] = row["peak_mib"]
            base = rows.get((path, a.clients[0]))
            sizes = (f"; checkpoint {row['checkpoint_mib']:.2f} MiB, optimizer/ "
                     f"{row['optimizer_files_mib']:.1f} MiB" if path == "keep" else "")
            print(f"{path:>6} {k:>5} clients: peak RSS {row['peak_mib']:>8.0f} MiB "
                  f"({row['peak_mib'] / base:.2f}x the {a.clients[0]}-client peak{sizes}; "
                  f"{row['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
