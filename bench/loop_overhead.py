"""FedAvg through FedMed's round loop versus a bare PyTorch loop doing the same work.

Both sides, in the same process and on the same data: R rounds; for each client, load
the global weights, run E epochs of SGD on the same minibatches (same permutations, same
flips), then average the weights with n_k/n and predict every client's test set. The
FedMed side also serialises every payload, counts bytes, computes metrics, writes
metrics.jsonl and a checkpoint each round. Runs alternate (bare, ours, bare, ours, ...)
and the script prints each pair's times and the median ratio ours / bare.

    python bench/loop_overhead.py [--repeats 5] [--rounds 10] [--image-size 32]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import fedmed  # noqa: E402
from fedmed import Config  # noqa: E402


def bare_fedavg(cfg: Config, fed) -> dict:
    """Plain PyTorch FedAvg: the same SGD steps and evaluation, nothing else."""
    import models
    with fedmed.seeded(cfg.seed, "init"):
        model = models.build(cfg.model, fed.num_classes)
    w = {k: v.clone() for k, v in model.state_dict().items()}
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    y_all = fed.y
    train_y = torch.cat([y_all[torch.as_tensor(c.train)] for c in fed.clients])
    counts = torch.bincount(train_y, minlength=fed.num_classes).double()
    alpha = torch.where(counts > 0, counts.sum() / counts.clamp(min=1), 0.0).float()

    def prep(idx, gen=None):
        x = fed.x[idx].float().div_(255)
        if gen is not None:
            flips = torch.rand(len(idx), 2, generator=gen)
            x = torch.where((flips[:, 0] < 0.5).view(-1, 1, 1, 1), x.flip(3), x)
            x = torch.where((flips[:, 1] < 0.5).view(-1, 1, 1, 1), x.flip(2), x)
        return (x - mean) / std

    for t in range(cfg.rounds):
        states, ns = [], []
        for k, c in enumerate(fed.clients):
            model.load_state_dict(w)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
            gen = fedmed.torch_rng(cfg.seed, "batches", t, k)
            data = torch.as_tensor(c.train, dtype=torch.long)
            with fedmed.seeded(cfg.seed, "local", t, k):
                for _ in range(cfg.local_epochs):
                    perm = data[torch.randperm(len(data), generator=gen)]
                    for s in range(0, len(data), cfg.batch_size):
                        idx = perm[s:s + cfg.batch_size]
                        if len(idx) < 2:
                            continue
                        loss = F.cross_entropy(model(prep(idx, gen)), y_all[idx], weight=alpha)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
            states.append({k2: v.detach().clone() for k2, v in model.state_dict().items()})
            ns.append(len(c.train))
        n = sum(ns)
        w = {key: (torch.stack([s[key] for s in states]).max() if key.endswith("num_batches_tracked")
                   else sum(s[key].double() * (nk / n) for s, nk in zip(states, ns)).to(states[0][key].dtype))
             for key in w}
        model.load_state_dict(w)
        model.eval()
        with torch.no_grad():
            for c in fed.clients:
                idx = torch.as_tensor(c.test, dtype=torch.long)
                F.softmax(model(prep(idx)), dim=1)
    return w


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--clients", type=int, default=5)
    a = ap.parse_args()
    import algorithms  # noqa: E402 - the methods register themselves
    algorithms.load_all()
    fed = datasets.make_synthetic(0, a.clients, a.image_size)
    cfg = Config(**{**datasets.RECIPES["synthetic"], "rounds": a.rounds})   # as `python run.py`
    print(f"synthetic federation: {len(fed.clients)} clients, {sum(len(c.train) for c in fed.clients)} "
          f"training images of {a.image_size} px; {cfg.rounds} rounds x {cfg.local_epochs} epochs, "
          f"batch {cfg.batch_size}; torch threads {torch.get_num_threads()}")
    bare_fedavg(cfg, fed)                                    # warm-up (allocator, kernels)
    ratios, bare_times, our_times = [], [], []
    for r in range(a.repeats):
        t0 = time.perf_counter()
        w_bare = bare_fedavg(cfg, fed)
        t_bare = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            fedmed.run(cfg, None, fed, out, quiet=True)
            t_ours = time.perf_counter() - t0
            ours = fedmed.load_checkpoint(os.path.join(out, "checkpoint.pt"))["server"]["weights"]
        same = all(torch.equal(ours[k], w_bare[k]) for k in w_bare)
        ratios.append(t_ours / t_bare)
        bare_times.append(t_bare)
        our_times.append(t_ours)
        print(f"repeat {r + 1}: bare {t_bare:6.2f} s   fedmed {t_ours:6.2f} s   ratio {ratios[-1]:.3f}"
              f"   same final weights: {same}")
    print(f"median of paired ratios fedmed / bare over {a.repeats} repeats: "
          f"{statistics.median(ratios):.3f} (overhead {100 * (statistics.median(ratios) - 1):+.1f}%)")
    best = min(our_times) / min(bare_times)      # the least disturbed run of each side
    print(f"ratio of best times: {best:.3f} (overhead {100 * (best - 1):+.1f}%); the machine is "
          "shared, so read the best-time ratio when the paired ratios scatter")


if __name__ == "__main__":
    main()
