"""FedMed's in-process loop against Flower (#16): the same FedAvg workload (synthetic
federation, the small CNN, the same seed and settings) through
  (a) inprocess:  fedmed.run, every client in one process (python run.py);
  (b) simulation: Flower's simulation runtime (a SuperLink with --simulation, Ray, one
      CPU) running flower_app.py's ServerApp and ClientApp with K virtual nodes;
  (c) deployment: a SuperLink and K SuperNodes as processes on this machine.
Per runtime and number of clients K: wall seconds per round, seconds per round outside
the clients' local_update and evaluation (framework overhead: the round's wall time
minus the time spent inside local_update and the per-client evaluation, measured where
they ran), peak resident memory of all its processes together (sampled every 0.2 s),
and bytes on the wire: FedMed's counter (payload bytes, up + down) and the bytes of the
Flower messages (their serialised records) for (b) and (c).

    cpuslot python bench/vs_flower.py --clients 6 50 --rounds 2
    cpuslot python bench/vs_flower.py --clients 500 --runtimes inprocess

Needs flwr (requirements-flower.txt); (b) also ray (flwr[simulation]). Never run as a
test. Prints one markdown table."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WORKLOAD = "--algo fedavg --local-steps 2 --batch-size 8 --quiet --seed 0"


def tree_rss(pids: list) -> int:
    """Resident bytes of processes `pids` and all their descendants (from /proc)."""
    seen, todo, total = set(), list(pids), 0
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


class PeakSampler:
    def __init__(self, pids_fn):
        self.pids_fn, self.peak, self.stop = pids_fn, 0, threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pids_fn()))
            time.sleep(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def child_inprocess(argv: list) -> None:
    """(a), in a child process: run.py's loop with local_update and the per-client
    evaluation timed."""
    import fedmed
    import run
    spent = {"train": 0.0, "evaluate": 0.0}
    real_update, real_lines = fedmed.Algorithm.local_update, fedmed.client_lines

    def update(self, client, payload):
        t0 = time.perf_counter()
        try:
            return real_update(self, client, payload)
        finally:
            spent["train"] += time.perf_counter() - t0

    def lines(*a, **kw):
        t0 = time.perf_counter()
        try:
            return real_lines(*a, **kw)
        finally:
            spent["evaluate"] += time.perf_counter() - t0
    fedmed.Algorithm.local_update, fedmed.client_lines = update, lines
    rc = run.main(argv)
    print("SPENT " + json.dumps({"rc": rc, **spent}), flush=True)


def measure(kind: str, K: int, rounds: int, work: str) -> dict:
    out = os.path.join(work, f"{kind}-{K}")
    args = f"{WORKLOAD} --clients {K} --rounds {rounds} --out {out}"
    t0 = time.perf_counter()
    if kind == "inprocess":
        p = subprocess.Popen([sys.executable, __file__, "--child", *args.split()],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with PeakSampler(lambda: [p.pid]) as mem:
            stdout, stderr = p.communicate()
        if p.returncode:
            raise RuntimeError(stderr[-2000:])
        spent = json.loads(stdout.split("SPENT ")[-1])
        text = stdout + stderr
    else:
        import flower_app
        home = os.path.join(work, f"flwr-{kind}-{K}")
        env = {"FEDMED_NODE_STATE": os.path.join(home, "state")}
        nodes = [] if kind == "simulation" else \
            [{"partition-id": k, "state-dir": os.path.join(home, f"state{k}")} for k in range(K)]
        d = flower_app.LocalDeployment(home, nodes, env=env,
                                       simulation=K if kind == "simulation" else 0)
        with d:
            with PeakSampler(lambda: [p.pid for p in d.procs.values()]) as mem:
                r = d.run(args, timeout=3600, **{"node-timeout": 600})
        text = r.stdout + r.stderr
        if r.returncode or "flower: message bytes" not in text:
            raise RuntimeError(text[-3000:])
        m = re.search(r"message bytes sent ([\d,]+), received ([\d,]+); seconds on the nodes "
                      r"in local_update ([\d.]+), in evaluation ([\d.]+)", text)
        spent = {"train": float(m.group(3)), "evaluate": float(m.group(4)),
                 "wire": int(m.group(1).replace(",", "")) + int(m.group(2).replace(",", ""))}
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    per_round = s["seconds"] / rounds
    return {"runtime": kind, "K": K, "round_s": per_round,
            "overhead_s": per_round - (spent["train"] + spent["evaluate"]) / rounds,
            "peak_mb": mem.peak / 2**20, "fedmed_bytes": s["bytes_up"] + s["bytes_down"],
            "wire_bytes": spent.get("wire"), "command_s": wall}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_inprocess(sys.argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[6, 50, 500])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runtimes", nargs="+", default=["inprocess", "simulation", "deployment"])
    p.add_argument("--max-deployment", type=int, default=6,
                   help="largest K started as SuperNode processes (default 6)")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for K in a.clients:
            for kind in a.runtimes:
                if kind == "deployment" and K > a.max_deployment:
                    print(f"skip deployment K={K}: above --max-deployment", file=sys.stderr)
                    continue
                try:
                    rows.append(measure(kind, K, a.rounds, work))
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"{kind} K={K} failed: {str(e)[-800:]}", file=sys.stderr)
                print(json.dumps(rows[-1]) if rows else "", file=sys.stderr, flush=True)
    print("| runtime | clients | s / round | overhead s / round | peak MB (all processes) "
          "| FedMed bytes | Flower message bytes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        wire = f"{r['wire_bytes']:,}" if r["wire_bytes"] else "-"
        print(f"| {r['runtime']} | {r['K']} | {r['round_s']:.2f} | {r['overhead_s']:.2f} | "
              f"{r['peak_mb']:.0f} | {r['fedmed_bytes']:,} | {wire} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
