"""Projected gradient ascent (PGA) unlearning of one client.

A. Halimi, S. Kadhe, A. Rawat, N. Baracaldo, Federated Unlearning: How to Efficiently
Erase a Client in FL?, arXiv:2207.05521 (2022), Sec. 3. A baseline of FCU's audit
(../shared/methods/fcu.md, section 9: a likely comparator); the unlearning protocol of
algorithms/fcu.py runs it as its phase `pga` (`--algo fcu --unlearn-methods retrain,pga`),
because it needs what only that protocol has: the finished federated model w_o and the
forgetting client's last local model w_u.

The client u that leaves computes, from w_o and its own last update w_u,
    w_ref = (n w_o - n_u w_u) / (n - n_u)          (the aggregate without u's update;
                                                   uniform weighting: (K w_o - w_u) / (K - 1))
    delta = share x mean_i ||w_ref - w_rand_i||     (10 random initialisations; share 1/3)
and, from w = w_ref, takes SGD steps that MAXIMISE the cross-entropy on its data D_f,
    w <- w + lr grad CE(w; x, y)                    (SGD with momentum on -CE)
    w <- w_ref + (w - w_ref) min(1, delta / ||w - w_ref||)   (projection onto the ball)
over the trainable parameters, for at most E epochs, stopping at the first minibatch whose
accuracy (the step's own forward pass, before the step) is below a threshold tau (their
MNIST tau 0.12; here 0 means chance, 1/C). The result is uploaded once; the remaining
clients then post-train it (fcu.py).

Deviations: the stopping rule is checked on each minibatch of D_f (its training-mode
forward pass; the paper's exact check is not known here); the ascent is on the
unweighted CE; w_ref's BN running variances are clipped at 0 (the weighted difference can
dip below it); the uploaded model's BN running statistics are w_ref's, none estimated on
D_f (fcu.py's rule for what leaves u; --unlearn-bn-stats trained keeps the ascent's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmed import seeded


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class PGAArgs:
    pga_lr: float = _f(0.01, "SGD learning rate of projected gradient ascent")
    pga_epochs: int = _f(5, "most epochs of gradient ascent on D_f")
    pga_radius: float = _f(1 / 3, "delta as a share of the mean distance w_ref-random models")
    pga_stop_accuracy: float = _f(0.0, "stop ascent below this D_f batch accuracy "
                                  "(0: chance, 1/C; negative: never)")


def reference_model(w_o: dict, w_u: dict, n: float, n_u: float) -> dict:
    """w_ref = (n w_o - n_u w_u) / (n - n_u), in float64, cast back; integer tensors
    (BN batch counts) are w_o's; running variances clipped at 0."""
    ref = {}
    for k, v in w_o.items():
        if not v.is_floating_point():
            ref[k] = v.clone()
            continue
        ref[k] = ((n * v.double() - n_u * w_u[k].double()) / (n - n_u)).to(v.dtype)
        if k.endswith("running_var"):             # the difference can dip below 0
            ref[k].clamp_(min=0)
    return ref


def radius(ref: dict, keys: list, random_models, share: float) -> float:
    """delta = share x the mean l2 distance (over `keys`) from ref to each random model."""
    dists = [math.sqrt(sum(float((ref[k].double() - rand[k].double()).pow(2).sum())
                           for k in keys)) for rand in random_models]
    return share * float(np.mean(dists))


def ascend(model: nn.Module, batches, ref: dict, delta: float, *, lr: float,
           momentum: float, epochs: int, stop: float, seed: int, keys: tuple) -> dict:
    """Projected gradient ascent of `model` (already holding w_ref) on the minibatches
    `batches(epoch)` yields ((x, y) pairs), at most `epochs` epochs, each epoch under the
    stream (seed, "pga", epoch, *keys); stops before the first batch whose accuracy is
    below `stop`. Returns {"epochs": epochs started, "steps": optimiser steps,
    "samples": their sample gradients}."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    centre = {n: ref[n].to(p.device) for n, p in params}
    opt = torch.optim.SGD([p for _, p in params], lr=lr, momentum=momentum)
    done, ran, steps, samples = False, 0, 0, 0
    for epoch in range(epochs):
        model.train()
        with seeded(seed, "pga", epoch, *keys):
            for x, y in batches(epoch):
                logits = model(x)
                if float((logits.argmax(1) == y).float().mean()) < stop:
                    done = True                   # forgotten: stop before this step
                    break
                loss = -F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps, samples = steps + 1, samples + len(y)
                with torch.no_grad():             # projection onto the ball
                    diff = {n: p - centre[n] for n, p in params}
                    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in diff.values()))
                    if norm > delta:
                        for n, p in params:
                            p.copy_(centre[n] + diff[n] * (delta / norm))
        ran = epoch + 1
        if done:
            break
    return {"epochs": ran, "steps": steps, "samples": samples}
